"""pyzmq PUB/SUB over ipc sockets as a transport: each writer binds an XPUB socket and
waits until every reader subscribed, each reader SUBscribes to every writer. No server;
PUB drops what a slow subscriber cannot take (the report counts it).
"""

from __future__ import annotations

import shutil
import tempfile
import time

import msgpack

from .base import Transport, packb

SUBSCRIBE_S = 30.0
LINGER_MS = 3000  # a writer's last records still leave after close()
DRAIN_MAX = 1024  # records one recv() takes


class ZmqWriter:
    def __init__(self, env, trial, idx):
        import zmq  # optional (the bench extra): only imported once chosen

        self.ctx = zmq.Context()
        s = self.s = self.ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.XPUB_VERBOSE, 1)
        s.setsockopt(zmq.LINGER, LINGER_MS)
        s.bind(f"ipc://{env['dir']}/w{idx}.ipc")
        # Wait until every reader's subscription arrived: PUB drops what it sends before.
        subs = 0
        deadline = time.monotonic() + SUBSCRIBE_S
        while subs < trial.readers:
            if not s.poll(100):
                if time.monotonic() > deadline:
                    raise TimeoutError("zmq: readers did not subscribe")
                continue
            if s.recv()[:1] == b"\x01":
                subs += 1

    def send(self, key, value, seq):
        self.s.send(packb(key, value, seq))

    def close(self):
        self.s.close()
        self.ctx.term()


class ZmqReader:
    def __init__(self, env, trial, idx):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        s = self.s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        for w in range(trial.writers):
            s.connect(f"ipc://{env['dir']}/w{w}.ipc")

    def recv(self, timeout):
        s = self.s
        if not s.poll(int(timeout * 1000)):
            return []
        out = []
        recv, again, nb = s.recv, self.zmq.Again, self.zmq.NOBLOCK
        unpackb = msgpack.unpackb
        for _ in range(DRAIN_MAX):
            try:
                out.append(unpackb(recv(nb))[1])
            except again:
                break
        return out

    def close(self):
        self.s.close()
        self.ctx.term()


class ZmqT(Transport):
    name = "zmq"
    label = "pyzmq PUB/SUB (ipc)"
    writer = ZmqWriter
    reader = ZmqReader

    @staticmethod
    def missing():
        try:
            import zmq  # noqa: F401
        except ImportError:
            return "pyzmq is not installed (pip install pyzmq)"
        return ""

    def prepare(self, trial):
        return {"dir": tempfile.mkdtemp(prefix="shmwatch-bench-zmq-")}

    def cleanup(self, env):
        shutil.rmtree(env["dir"], ignore_errors=True)
