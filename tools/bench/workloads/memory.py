"""MEM (shmwatch only): the broker's memory as writes pile up behind stalled watchers.

`mem_watchers` watchers on one prefix in 2 processes that never read (each becomes a
victim once its small ring is full) while one writer commits `mem_writes` puts in
txns of 64 over 1,000 keys; beside it the same writes with no watcher. The broker's
RssAnon and VmRSS are read at CHECKPOINTS points (the writer waits at each). Runs once
per run: the figures are sizes, not rates.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import broker
import clientlib

from .. import log
from ..machine import proc_mem
from ..procs import CTX, REG, Mailbox, Tell
from ..record import BATCH, clock_ns, value
from .base import Workload

if TYPE_CHECKING:
    from ..profiles import Profile
    from ..session import Session

CHECKPOINTS = 4  # broker memory read after each quarter of the writes
KEYS = 1000
HOLDERS = 2  # processes holding the stalled watchers
BROKER_OPTS = {"watch_ring_bytes": 16 << 10, "rings_per_arena": 256, "log_bytes": 16 << 20}
SETUP_S = 600.0
CONNECT_S = 60.0
WRITER_CONNECT_S = 120.0
CHECKPOINT_S = 1800.0  # a quarter of a million writes on a loaded machine
HOLD_S = 3600.0  # a holder's longest wait for the end (the parent sets `stop` long before)
SETTLE_S = 0.1  # after a checkpoint: the broker's victim retries settle before reading


def _holder(tell: Tell, name: str, n: int, stop) -> None:
    """n watches on mem/ that never read."""
    with clientlib.connect(name, timeout=CONNECT_S) as c:
        ws = [c.watch(b"mem/", prefix=True) for _ in range(n)]
        for w in ws:
            if not w.get(CONNECT_S).created:
                raise RuntimeError("first watch response is not `created`")
        tell("ready", n)
        stop.wait(HOLD_S)  # stalled: never reads
        tell("done", 0)


def _writer(tell: Tell, name: str, total: int, cont) -> None:
    """`total` puts in txns of BATCH; after each quarter, tells a checkpoint and waits for
    the parent to read the broker's memory."""
    with clientlib.connect(name, timeout=WRITER_CONNECT_S) as c:
        keys = [b"mem/%012d" % i for i in range(KEYS)]
        v = value(0, 0)
        tell("ready")
        done = 0
        t0 = clock_ns()
        for k in range(1, CHECKPOINTS + 1):
            goal = total * k // CHECKPOINTS
            while done < goal:
                nb = min(BATCH, goal - done)
                c.txn(success=[clientlib.op_put(keys[(done + j) % KEYS], v)
                               for j in range(nb)])
                done += nb
            tell("checkpoint", {"writes": done, "s": (clock_ns() - t0) / 1e9})
            cont.acquire()
        tell("done", done)


def _split(n: int) -> list[int]:
    """n watchers over HOLDERS processes (fewer if n is smaller)."""
    k = max(1, min(HOLDERS, n))
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def measure(n_watchers: int, prof: Profile) -> dict:
    b = broker.spawn(**BROKER_OPTS)
    REG.add_broker(b)
    box = Mailbox("MEM")
    stop, cont = CTX.Event(), CTX.Semaphore(0)
    try:
        holders = _split(n_watchers) if n_watchers else []
        for i, part in enumerate(holders):
            REG.spawn(box, "holder", i, _holder, b.name, part, stop)
        box.expect("ready", "holder", len(holders), SETUP_S)
        REG.spawn(box, "writer", 0, _writer, b.name, prof.mem_writes, cont)
        box.expect("ready", "writer", 1, CONNECT_S)
        time.sleep(SETTLE_S * 2)  # the writer's registration settles before the baseline
        cps = [{"writes": 0, **proc_mem(b.pid)}]
        last_s = 0.0
        for _ in range(CHECKPOINTS):
            cp = box.expect("checkpoint", "writer", 1, CHECKPOINT_S)[0]
            time.sleep(SETTLE_S)
            cps.append({"writes": cp["writes"], **proc_mem(b.pid)})
            last_s = cp["s"]
            cont.release()
        box.expect("done", "writer", 1, CONNECT_S)
        stop.set()
        box.expect("done", "holder", len(holders), CONNECT_S)
        return {"checkpoints": cps, "write_rate": prof.mem_writes / max(last_s, 1e-9)}
    finally:
        stop.set()
        for _ in range(CHECKPOINTS + 1):
            cont.release()
        REG.stop_children(box.procs, grace=10)
        box.close()
        REG.stop_broker(b)


class Memory(Workload):
    name = "MEM"
    once = True

    def run(self, s: Session) -> None:
        n = s.prof.mem_watchers
        for variant, watchers in (("0 watchers", 0), (f"{n} stalled watchers", n)):
            r = s.guarded(f"MEM {variant}", measure, watchers, s.prof)
            if r is None:
                continue
            figs = {}
            for cp in r["checkpoints"]:
                figs[f"anon@{cp['writes']}"] = cp["RssAnon"]
                figs[f"rss@{cp['writes']}"] = cp["VmRSS"]
            s.add(self.name, variant, "shmwatch", {**figs, "write_rate": r["write_rate"]})
            log(f"  MEM {variant}: " + "  ".join(
                f"{cp['writes']}: anon {cp['RssAnon']:.1f} rss {cp['VmRSS']:.1f} MiB"
                for cp in r["checkpoints"]))
