"""shmwatch as a transport: clientlib `put` (or a 64-put `txn`, `put_many`, `put_async`) -> a fresh
broker per trial -> a watcher's ring -> `Watch.get()` decoding every event.

Owns spawning and stopping each trial's broker (registered in `procs.REG`) and reading
its counters after a trial; the writer and reader are plain clientlib code, as a user
would write them.
"""

from __future__ import annotations

import time

import broker
import clientlib
from broker.admin import read_stats

from ..procs import REG
from .base import Transport

CONNECT_S = 30.0
DRAIN_MAX = 4096  # values one recv() gathers from responses already in the ring
STATS_SETTLE_S = 0.4  # the broker publishes its counters ~5 times a second
STATS_KEYS = ("writes", "events_delivered", "victims_entered", "catchups", "compactions",
              "pending_events")


class ShmWriter:
    def __init__(self, env, trial, idx):
        self.c = clientlib.connect(env["name"], timeout=CONNECT_S)
        self.last = None  # the async path's latest write, and its replies counted
        self.acks = 0

    def send(self, key, value, seq):
        self.c.put(key, value)

    def send_batch(self, items):
        op_put = clientlib.op_put
        self.c.txn(success=[op_put(k, v) for k, v, _ in items])

    def send_many(self, items):
        self.c.put_many([(k, v) for k, v, _ in items])

    def send_async(self, key, value, seq):
        self.last = self.c.put_async(key, value)
        self.last.add_done_callback(self._acked)

    def _acked(self, fut):
        if fut.exception(0) is None:
            self.acks += 1

    def flush(self):
        if self.last is not None:
            self.last.result(CONNECT_S)  # replies come in order: the last one is last
        return self.acks

    def close(self):
        self.c.close()


class ShmReader:
    def __init__(self, env, trial, idx):
        self.c = clientlib.connect(env["name"], timeout=CONNECT_S)
        self.w = self.c.watch(trial.prefix, prefix=True)
        first = self.w.get(CONNECT_S)
        if not first.created:
            raise RuntimeError(f"first watch response is not `created`: {first}")

    def recv(self, timeout):
        w = self.w
        try:
            resp = w.get(timeout)
        except clientlib.Timeout:
            return []
        if resp.canceled:
            raise RuntimeError(f"watch canceled: {resp.cancel_reason!r}")
        out = [ev.kv.value for ev in resp.events]
        while len(out) < DRAIN_MAX:
            resp = w.get_nowait()
            if resp is None:
                break
            out.extend([ev.kv.value for ev in resp.events])
        return out

    def close(self):
        self.c.close()


class ShmwatchT(Transport):
    name = "shmwatch"
    label = "shmwatch"
    write_paths = ("sync", "batched", "pipelined", "async")
    writer = ShmWriter
    reader = ShmReader

    def __init__(self):
        self.handles: dict[str, broker.BrokerProcess] = {}

    def prepare(self, trial):
        b = broker.spawn(**trial.broker_opts)
        REG.add_broker(b)
        self.handles[b.name] = b
        return {"name": b.name, "pid": b.pid}

    def server_pid(self, env):
        return env["pid"]

    def stats(self, env):
        time.sleep(STATS_SETTLE_S)
        try:
            st = read_stats(env["name"])
        except Exception as exc:  # the figures do not depend on it: record why it is missing
            return {"error": repr(exc)}
        return {k: st.get(k) for k in STATS_KEYS}

    def cleanup(self, env):
        b = self.handles.pop(env["name"], None)
        if b is not None:
            REG.stop_broker(b)
