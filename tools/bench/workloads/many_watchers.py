"""W5 (shmwatch only): many watchers, on single keys or on ranges of 10 keys, held by a
few processes (many watches per client), while one writer puts synchronously; 1 write
in 100 hits a watched key. Figures: write rate, broker CPU per write, events delivered.

Every watcher count gets its own broker, all set up at once, and the one writer
alternates between them in SLICE_S slices (order rotated every cycle), so noise hits
every count alike: the ratios between counts are paired measurements.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import broker
import clientlib

from .. import log
from ..machine import cpu_ns
from ..procs import CTX, REG, Mailbox, Tell
from ..record import clock_ns, value
from .base import Workload

if TYPE_CHECKING:
    from ..profiles import Profile
    from ..session import Session

KINDS = ("keys", "ranges")
HIT_EVERY = 100  # 1 write in HIT_EVERY goes to a watched key
RANGE_KEYS = 10  # keys per watched range
SLICE_S = 0.1
# 10,000 watches in w5_procs clients: 2,500 a client, over the default per-client cap
BROKER_OPTS = {"watch_ring_bytes": 16 << 10, "rings_per_arena": 256,
               "max_watchers_per_client": 10_000}
DRAIN_MAX_WATCHES = 16  # a holder with more watches reads only at the end (polling
#                         thousands of watches would cost more CPU than it measures)
SETUP_S = 600.0  # 10,000 watches on a loaded 2-core machine take minutes
CONNECT_S = 60.0  # a client connecting, a watch created
READY_S = 60.0  # the writer connected; the writer waiting for go
DONE_S = 120.0  # beyond the writing itself: the last events delivered and counted


def watch_keys(kind: str, i: int) -> tuple[bytes, bytes | None]:
    """Watcher i's key (single keys) or range [key, end) of RANGE_KEYS keys."""
    if kind == "keys":
        return b"w5/k/%011d" % i, None
    return b"w5/r/%011d" % (i * 100), b"w5/r/%011d" % (i * 100 + RANGE_KEYS)


def write_key(kind: str, n: int, seq: int) -> bytes:
    """1 write in HIT_EVERY hits a watched key (round robin over the n watchers); the rest
    hit keys next to them that nobody watches (for ranges: the gaps between ranges)."""
    hit = seq % HIT_EVERY == 0
    i = (seq // HIT_EVERY) % n if hit else seq % n
    if kind == "keys":
        return b"w5/k/%011d" % (i if hit else 100_000_000 + (seq % 997))
    return b"w5/r/%011d" % (i * 100 + (5 if hit else 50))


def _holder(tell: Tell, name: str, kind: str, ids: list[int], stop, drain: bool,
            bi: int) -> None:
    """Holds the watches `ids` of broker `bi`; tells ("done", (bi, events received))."""
    with clientlib.connect(name, timeout=CONNECT_S) as c:
        ws = []
        for i in ids:
            key, end = watch_keys(kind, i)
            ws.append(c.watch(key, range_end=end))
        for w in ws:
            if not w.get(CONNECT_S).created:
                raise RuntimeError("first watch response is not `created`")
        tell("ready", len(ws))
        got = 0
        while not stop.wait(0.02 if drain else 0.5):
            if drain:
                for w in ws:
                    while (r := w.get_nowait()) is not None:
                        got += len(r.events)
        time.sleep(0.2)  # the broker delivers the last writes
        for w in ws:
            while (r := w.get_nowait()) is not None:
                got += len(r.events)
        tell("done", (bi, got))


def _writer(tell: Tell, names: list[str], pids: list[int], kind: str, counts: list[int],
            dur: float, go) -> None:
    """One client per broker: writes to broker i for a slice, then to the next (order
    rotated every cycle), until each broker had `dur` seconds."""
    cs = [clientlib.connect(nm, timeout=CONNECT_S) for nm in names]
    try:
        v = value(0, 0)
        k = len(cs)
        seqs, hits, secs, cpu = [0] * k, [0] * k, [0] * k, [0] * k
        tell("ready")
        go.wait(READY_S)
        slice_ns = int(SLICE_S * 1e9)
        for cyc in range(max(1, round(dur / SLICE_S))):
            for j in range(k):
                i = (j + cyc) % k
                put, n, seq = cs[i].put, counts[i], seqs[i]
                c0 = cpu_ns(pids[i])
                t0 = clock_ns()
                end = t0 + slice_ns
                while clock_ns() < end:
                    put(write_key(kind, n, seq), v)
                    if seq % HIT_EVERY == 0:
                        hits[i] += 1
                    seq += 1
                secs[i] += clock_ns() - t0
                cpu[i] += cpu_ns(pids[i]) - c0
                seqs[i] = seq
        tell("done", {"sent": seqs, "hits": hits, "ns": secs, "cpu_ns": cpu})
    finally:
        for c in cs:
            c.close()


def _setup(box: Mailbox, kind: str, n: int, bi: int, prof: Profile, stop) -> broker.BrokerProcess:
    """Broker `bi` with n watches held by min(n, w5_procs) processes, all created."""
    b = broker.spawn(**BROKER_OPTS)
    REG.add_broker(b)
    nproc = max(1, min(prof.w5_procs, n))
    for p in range(nproc):
        part = list(range(p, n, nproc))
        REG.spawn(box, "holder", len(box.procs), _holder, b.name, kind, part, stop,
                  len(part) <= DRAIN_MAX_WATCHES, bi)
    box.expect("ready", "holder", nproc, SETUP_S)
    return b


def measure(kind: str, counts, prof: Profile) -> list[dict]:
    """One broker per watcher count, all set up at once; one writer alternates."""
    brokers: list = []
    box = Mailbox(f"W5 {kind}")
    stop, go = CTX.Event(), CTX.Event()
    try:
        setup = []
        for bi, n in enumerate(counts):
            t0 = time.monotonic()
            brokers.append(_setup(box, kind, n, bi, prof, stop))
            setup.append(time.monotonic() - t0)
        holders = len(box.procs)
        REG.spawn(box, "writer", 0, _writer, [b.name for b in brokers],
                  [b.pid for b in brokers], kind, list(counts), prof.w5_dur, go)
        box.expect("ready", "writer", 1, READY_S)
        go.set()
        wr = box.expect("done", "writer", 1, prof.w5_dur * len(counts) + DONE_S)[0]
        stop.set()
        delivered = [0] * len(counts)
        for bi, got in box.expect("done", "holder", holders, DONE_S):
            delivered[bi] += got
        return [{"write_rate": wr["sent"][i] / (wr["ns"][i] / 1e9),
                 "cpu_us_per_write": wr["cpu_ns"][i] / 1e3 / max(wr["sent"][i], 1),
                 "delivered": delivered[i], "expected": wr["hits"][i], "setup_s": setup[i]}
                for i in range(len(counts))]
    finally:
        stop.set()
        go.set()
        REG.stop_children(box.procs, grace=10)
        box.close()
        for b in brokers:
            REG.stop_broker(b)


class ManyWatchers(Workload):
    name = "W5"
    FIGURES = ("write_rate", "cpu_us_per_write", "delivered", "expected", "setup_s")

    def run(self, s: Session) -> None:
        for kind in KINDS:
            rs = s.guarded(f"W5 {kind}", measure, kind, s.prof.w5_counts, s.prof)
            for n, r in zip(s.prof.w5_counts, rs or ()):
                v = f"{kind} {n}"
                s.add(self.name, v, "shmwatch", {k: r[k] for k in self.FIGURES})
                log(f"  W5 {v:13} write {r['write_rate']:9,.0f} /s  broker "
                    f"{r['cpu_us_per_write']:6.1f} us CPU/write  delivered "
                    f"{r['delivered']}/{r['expected']}  (set-up {r['setup_s']:.1f}s)")
