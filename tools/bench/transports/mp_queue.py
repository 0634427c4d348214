"""multiprocessing.Queue as a transport: one queue per reader, the writer puts each record
(msgpack [key, value, seq]) into every reader's queue. No server; it never waits for the
reader, so it has no batched path of its own.
"""

from __future__ import annotations

import contextlib
import queue

import msgpack

from ..procs import CTX
from .base import Transport, packb

DRAIN_MAX = 1024  # records one recv() takes


class QueueWriter:
    def __init__(self, env, trial, idx):
        self.qs = env["queues"]

    def send(self, key, value, seq):
        data = packb(key, value, seq)
        for q in self.qs:
            q.put(data)

    send_async = send  # Queue.put never waits for anyone: its only path

    def flush(self):
        return None  # a Queue has no replies to count

    def close(self):
        for q in self.qs:
            q.close()
        # the Queue's feeder thread is joined at process exit (a stalled reader's queue
        # keeps this process alive until that reader has drained it)


class QueueReader:
    def __init__(self, env, trial, idx):
        self.q = env["queues"][idx]

    def recv(self, timeout):
        q = self.q
        try:
            data = q.get(True, timeout)
        except queue.Empty:
            return []
        out = [msgpack.unpackb(data)[1]]
        for _ in range(DRAIN_MAX - 1):
            try:
                data = q.get_nowait()
            except queue.Empty:
                break
            out.append(msgpack.unpackb(data)[1])
        return out

    def close(self):
        pass


class QueueT(Transport):
    name = "queue"
    label = "multiprocessing.Queue"
    write_paths = ("sync", "async")
    writer = QueueWriter
    reader = QueueReader

    def prepare(self, trial):
        return {"queues": [CTX.Queue() for _ in range(trial.readers)]}

    def cleanup(self, env):
        for q in env["queues"]:
            with contextlib.suppress(Exception):
                q.close()
                q.cancel_join_thread()
