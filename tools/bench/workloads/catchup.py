"""CATCHUP (shmwatch only): mass catch-up. `cu_watchers` watchers on one prefix (BULK),
held by a few processes, read nothing while `cu_events` events are written to it (txns
of 64 as fast as they go): their rings fill and they become victims. Then they all
resume and read their whole backlog, while a writer paced at PACE records/s keeps
writing beside BULK to the fast watchers (FAST processes reading all of PREFIX live
all along), so the broker's CPU meanwhile is the catch-up's plus the same small live
load in both modes.

Run twice, with the broker replaying each victim's backlog (`--catch-up broker`) and
with the watchers reading it from the shared revision log themselves (`--catch-up
client`, the default). Figures: the broker's CPU per replayed event during the catch-up
phase, the watchers' CPU per event, the catch-up's wall time, the share of the paced
records the fast watchers received meanwhile, and exactness: every stalled and fast
stream must hold every event once, in revision order, up to the last revision.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import broker
import clientlib

from .. import log
from ..machine import cpu_seconds
from ..procs import CTX, REG, Mailbox, Tell
from ..record import clock_ns
from .base import Workload

if TYPE_CHECKING:
    from ..profiles import Profile
    from ..session import Session

MODES = ("broker", "client")  # where a victim's backlog is replayed
PREFIX = b"cu/"  # what the fast watchers watch: every write
BULK = PREFIX + b"bulk/"  # what the stalled watchers watch: the writes made while stalled
BATCH = 64  # puts per txn while the watchers are stalled
PACE = 1000.0  # records/s written while they catch up
FAST = 2  # watcher processes reading live throughout
VALUE = b"x" * 32
SETUP_S = 300.0
DONE_S = 600.0  # the whole backlog read by every stalled watcher
BASELINE_S = 1.0  # the broker's CPU for the live load alone is measured this long


def _holder(tell: Tell, name: str, n: int, resume, bulk_rev) -> None:
    """Holds n watches of BULK, reads nothing until `resume`, then reads every one up to
    `bulk_rev` (the stalled writes' last revision), checking each stream's order; tells
    ("caught", (CPU s, wall s)) then ("done", counts)."""
    with clientlib.connect(name, timeout=60) as c:
        ws = [c.watch(BULK, prefix=True) for _ in range(n)]
        for w in ws:
            if not w.get(60).created:
                raise RuntimeError("first watch response is not `created`")
        tell("ready")
        resume.wait(SETUP_S)
        cpu0, t0 = time.process_time(), clock_ns()
        end = bulk_rev.value
        last = [0] * n
        count = [0] * n
        open_ = set(range(n))
        index = {id(w): i for i, w in enumerate(ws)}
        deadline = time.monotonic() + DONE_S
        while open_:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(open_)} watches did not reach revision {end}")
            for w in clientlib.wait_any([ws[i] for i in open_], timeout=0.2):
                i = index[id(w)]
                resp = w.get_nowait()
                for ev in resp.events:
                    rev = ev.kv.mod_revision
                    if rev < last[i]:
                        raise AssertionError(f"watch {i}: revision {rev} after {last[i]}")
                    last[i] = rev
                count[i] += len(resp.events)
                if last[i] >= end:
                    open_.discard(i)
        tell("caught", (time.process_time() - cpu0, (clock_ns() - t0) / 1e9))
        tell("done", {"count": count, "last": last})


def _fast(tell: Tell, name: str, resume, target, stop) -> None:
    """Reads live throughout; counts the events received during the catch-up phase."""
    with clientlib.connect(name, timeout=60) as c:
        w = c.watch(PREFIX, prefix=True)
        w.get(60)
        tell("ready")
        count = during = 0
        last = 0
        while True:
            try:
                resp = w.get(0.2)
            except clientlib.Timeout:
                if target.value and last >= target.value:
                    break
                continue
            for ev in resp.events:
                if ev.kv.mod_revision < last:
                    raise AssertionError("fast watcher: revisions out of order")
                last = ev.kv.mod_revision
            count += len(resp.events)
            if resume.is_set() and not stop.is_set():
                during += len(resp.events)
            if target.value and last >= target.value:
                break
        tell("done", {"count": count, "during": during, "last": last})


def _writer(tell: Tell, name: str, events: int, resume, stop) -> None:
    """Writes `events` in txns of BATCH, tells "written", then writes at PACE/s until
    `stop` (from before `resume`: the parent measures the broker's CPU for this live load
    alone first); tells ("done", totals, and how many it wrote from `resume` on)."""
    with clientlib.connect(name, timeout=60) as c:
        op_put = clientlib.op_put
        sent = rev = 0
        while sent < events:
            k = min(BATCH, events - sent)
            rev = c.txn(success=[op_put(BULK + b"%06d" % (sent + j), VALUE)
                                 for j in range(k)]).revision
            sent += k
        tell("written", rev)
        paced = 0
        at_resume = -1
        t0 = time.monotonic()
        last = 0
        while not stop.is_set():
            if at_resume < 0 and resume.is_set():
                at_resume = paced
            due = t0 + paced / PACE
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            last = c.put(PREFIX + b"live%06d" % (paced % 1000), VALUE).revision
            paced += 1
        tell("done", {"bulk": sent, "paced": paced, "last": last,
                      "during": paced - max(at_resume, 0)})


def measure(mode: str, prof: Profile) -> dict:
    n, events, procs = prof.cu_watchers, prof.cu_events, prof.w5_procs
    log_bytes = max(16 << 20, events * 512)
    b = broker.spawn(watch_ring_bytes=16 << 10, log_bytes=log_bytes, catch_up=mode,
                     max_watchers_per_client=max(1000, n))
    REG.add_broker(b)
    box = Mailbox(f"CATCHUP {mode}")
    resume, stop = CTX.Event(), CTX.Event()
    target = CTX.RawValue("q", 0)
    bulk_rev = CTX.RawValue("q", 1 << 62)
    try:
        parts = [len(range(p, n, procs)) for p in range(procs)]
        for i, k in enumerate(parts):
            REG.spawn(box, "holder", i, _holder, b.name, k, resume, bulk_rev)
        for i in range(FAST):
            REG.spawn(box, "fast", i, _fast, b.name, resume, target, stop)
        box.expect("ready", "holder", procs, SETUP_S)
        box.expect("ready", "fast", FAST, SETUP_S)
        REG.spawn(box, "writer", 0, _writer, b.name, events, resume, stop)
        bulk_rev.value = box.expect("written", "writer", 1, SETUP_S)[0]
        time.sleep(0.3)  # the broker has moved the stalled watchers to the victims
        # The broker's CPU for the paced live load alone, then with the catch-up: the
        # difference is the catch-up's.
        cpu_a, t_a = cpu_seconds(b.pid), time.monotonic()
        time.sleep(BASELINE_S)
        cpu0, t0 = cpu_seconds(b.pid), time.monotonic()
        live_rate = (cpu0 - cpu_a) / (t0 - t_a)  # CPU seconds per second
        resume.set()
        caught = box.expect("caught", "holder", procs, DONE_S)  # (CPU s, wall s) each
        cpu1, t1 = cpu_seconds(b.pid), time.monotonic()
        stop.set()
        wr = box.expect("done", "writer", 1, 60)[0]
        target.value = wr["last"]
        holders = box.expect("done", "holder", procs, DONE_S)
        fasts = box.expect("done", "fast", FAST, 60)
        total = wr["bulk"] + wr["paced"]
        exact = all(c == wr["bulk"] for h in holders for c in h["count"]) and all(
            f["count"] == total for f in fasts)
        replayed = n * events
        net = max(0.0, (cpu1 - cpu0) - live_rate * (t1 - t0))
        return {"broker_us_per_event": net / replayed * 1e6,
                "broker_gross_us_per_event": (cpu1 - cpu0) / replayed * 1e6,
                "watchers_us_per_event": sum(c for c, _ in caught) / replayed * 1e6,
                "catchup_s": max(w for _, w in caught), "replayed": replayed,
                "fast_kept": min(f["during"] for f in fasts) / max(wr["during"], 1),
                "exact": 1.0 if exact else 0.0}
    finally:
        resume.set()
        stop.set()
        target.value = max(target.value, 1)
        REG.stop_children(box.procs, grace=10)
        box.close()
        REG.stop_broker(b)


class MassCatchUp(Workload):
    name = "CATCHUP"
    FIGURES = ("broker_us_per_event", "broker_gross_us_per_event", "watchers_us_per_event",
               "catchup_s", "replayed", "fast_kept", "exact")

    def run(self, s: Session) -> None:
        if "shmwatch" not in s.transports():
            return
        for mode in MODES:
            r = s.guarded(f"CATCHUP {mode}", measure, mode, s.prof)
            if r is None:
                continue
            s.add(self.name, f"catch-up {mode}", "shmwatch", {k: r[k] for k in self.FIGURES})
            log(f"  CATCHUP {mode:6} broker {r['broker_us_per_event']:7.3f} us CPU per "
                f"replayed event, watchers {r['watchers_us_per_event']:6.2f}; "
                f"{r['replayed']:,} events in {r['catchup_s']:.1f}s; fast watchers kept "
                f"{r['fast_kept']:.0%}; exact {bool(r['exact'])}")
