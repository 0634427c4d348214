"""The code a stress run's child processes run (started with multiprocessing's spawn, so
everything here is importable by name): writers that put, delete and commit txns on
overlapping keys, and watchers that watch as their `WatchSpec` says. Each records what
it did, as it does it, in its own file (records.py), so a SIGKILLed one leaves exactly
what it had done."""

from __future__ import annotations

import random
import signal
import time
from typing import BinaryIO

import clientlib
from broker.admin import broker_info
from clientlib import op_delete, op_put

from .drain import drain_watch
from .records import record_response, write_record
from .spec import CONNECT_TIMEOUT_S, START_COMPACT, START_TIMEOUT_S, WatchSpec, key_name

# A writer's ops: puts, deletes, and the rest txns of a few keys, mostly puts.
PUT_SHARE = 0.75
DELETE_SHARE = 0.15
TXN_KEYS = (2, 5)  # randrange bounds: 2 to 4 keys
TXN_PUT_SHARE = 0.8
# The progress line's counters are shared values behind a lock: added to in batches.
WRITTEN_BATCH = 64
DELIVERED_BATCH = 256
READ_POLL_S = 0.1  # a watcher's longest wait for a response before it looks at the clock
SLOW_PAUSE_S = 0.001  # a slow watcher's pause per response with events (--slow)


def _arrive(ready, go, t0_v, stop_v) -> tuple[float, float]:
    """Report ready, wait for the start signal; the run's start and end (monotonic,
    which is one clock for every process of the machine)."""
    with ready.get_lock():
        ready.value += 1
    go.wait(START_TIMEOUT_S)
    return t0_v.value, stop_v.value


def writer_main(name: str, wid: int, keys: int, seed: int, ack_path: str, sync: tuple,
                counter) -> None:
    """Write until the run ends; record every acknowledged write as [op number, revision,
    [[key, value or None (a delete), deleted count], ...]] before making the next."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    with open(ack_path, "wb", buffering=0) as acks, \
            clientlib.connect(name, timeout=CONNECT_TIMEOUT_S) as c:
        _, stop_at = _arrive(*sync)
        n = 0
        while time.monotonic() < stop_at:
            rev, changes = _write(c, rnd, keys, f"s{wid}.{n}".encode())
            write_record(acks, [n, rev, changes])
            n += 1
            if n % WRITTEN_BATCH == 0:
                with counter.get_lock():
                    counter.value += WRITTEN_BATCH


def _write(c: clientlib.Client, rnd: random.Random, keys: int, value: bytes) -> tuple:
    """One random op with `value` (which says who wrote it: verify.STAMP): its revision
    and its changes as recorded."""
    r = rnd.random()
    k = key_name(rnd.randrange(keys)).encode()
    if r < PUT_SHARE:
        return c.put(k, value).revision, [[k, value, 0]]
    if r < PUT_SHARE + DELETE_SHARE:
        d = c.delete(k)
        return d.revision, [[k, None, d.deleted]]
    ks = sorted({key_name(rnd.randrange(keys)).encode()
                 for _ in range(rnd.randrange(*TXN_KEYS))})
    puts = [rnd.random() < TXN_PUT_SHARE for _ in ks]
    t = c.txn(success=[op_put(x, value) if p else op_delete(x) for x, p in zip(ks, puts)])
    return t.revision, [[x, value, 0] if p else [x, None, resp.deleted]
                        for x, p, resp in zip(ks, puts, t.responses)]


def watcher_main(name: str, spec: WatchSpec, out_path: str, sync: tuple, delivered) -> None:
    """Watch as `spec` says; record ["start", revision] and then every response as it is
    received, so a killed watcher's file holds exactly what it was delivered."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(out_path, "wb", buffering=0) as out, \
            clientlib.connect(name, timeout=CONNECT_TIMEOUT_S) as c:
        t0, stop_at = _arrive(*sync)
        time.sleep(max(0.0, min(t0 + spec.start_at, stop_at) - time.monotonic()))
        start = spec.start_revision
        if start == START_COMPACT:
            start = max(1, broker_info(name).get("compact_revision", 0))
        write_record(out, ["start", start])
        w = c.watch(spec.key, spec.end, start_revision=start, prev_kv=spec.prev_kv,
                    filters=spec.filters)
        if not _follow(w, out, spec, t0, stop_at, delivered):
            drain_watch(c, w, out, spec.name)


def _follow(w: clientlib.Watch, out: BinaryIO, spec: WatchSpec, t0: float, stop_at: float,
            delivered) -> bool:
    """Read until the run ends (stalling and sleeping as the behaviour says); True if
    the watch was cancelled."""
    stall = (t0 + spec.stall[0], t0 + spec.stall[1]) if spec.stall else None
    n = 0
    while True:
        now = time.monotonic()
        if now >= stop_at:
            return False
        if stall and stall[0] <= now < stall[1]:
            time.sleep(max(0.0, min(stall[1], stop_at) - now))
            continue
        try:
            r = w.get(timeout=READ_POLL_S)
        except clientlib.Timeout:
            continue
        n += record_response(out, r)
        if r.canceled:
            return True
        if r.events and spec.behaviour == "slow":
            time.sleep(SLOW_PAUSE_S)
        if n >= DELIVERED_BATCH:
            with delivered.get_lock():
                delivered.value += n
            n = 0
