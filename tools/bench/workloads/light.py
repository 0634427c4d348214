"""LIGHT: what a modest load costs. A writer paced at 1,000 and at 5,000 records/s to 4
watcher processes (the same record to each), for a few seconds: the CPU time of every
process involved (writer, readers, and the server in between: the shmwatch broker,
redis-server) per record written, beside multiprocessing.Queue (the writer puts each
record into the 4 readers' queues; its feeder thread counts, it is in the writer's
process). And the idle cost: a broker with 4 watchers and no writes, each process's
share of a core.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import log
from ..machine import cpu_seconds
from .base import Workload

if TYPE_CHECKING:
    from ..session import Session

RATES = (1000.0, 5000.0)
READERS = 4
IDLE_S = 3.0  # how long the idle broker and its watchers are measured
PEERS = ("shmwatch", "queue", "zmq", "redis")  # etcd cannot hold 5,000/s


def variant(rate: float) -> str:
    return f"paced {rate:,.0f}/s"


class Light(Workload):
    name = "LIGHT"

    def run(self, s: Session) -> None:
        for rate in RATES:
            for tn in s.transports():
                if tn not in PEERS:
                    continue
                res = s.trial(workload=self.name, variant=variant(rate), transport=tn,
                              writers=1, readers=READERS, pace=rate,
                              duration=s.prof.light_dur)
                if res is None:
                    continue
                self._add(s, rate, tn, res)
        if "shmwatch" in s.transports():
            s.guarded("LIGHT idle", self._idle, s)

    def _add(self, s: Session, rate: float, tn: str, res: dict) -> None:
        sent = max(res["sent"], 1)
        wcpu = sum(w["cpu_s"] for w in res["writers"])
        rcpu = sum(r["cpu_s"] for r in res["readers"])
        scpu = res.get("server_cpu_s", 0.0)
        got = sum(r["count"] for r in res["readers"])
        figs = {"cpu_us_per_write": (wcpu + rcpu + scpu) / sent * 1e6,
                "writer_us": wcpu / sent * 1e6, "readers_us": rcpu / sent * 1e6,
                "server_us": scpu / sent * 1e6, "delivered": got / (sent * READERS),
                "write_rate": sent / res["write_s"]}
        s.add(self.name, variant(rate), tn, figs)
        log(f"  LIGHT {variant(rate):15} {tn:9} {figs['cpu_us_per_write']:8.0f} us CPU/write "
            f"(writer {figs['writer_us']:.0f}, readers {figs['readers_us']:.0f}, "
            f"server {figs['server_us']:.0f}; delivered {got}/{sent * READERS})")

    def _idle(self, s: Session) -> None:
        """A broker and READERS watcher processes, nothing written: each one's share of
        a core over IDLE_S (the watchers wait in Watch.get, as an application would)."""
        import broker

        from ..procs import CTX, REG

        b = broker.spawn()
        REG.add_broker(b)
        procs = []
        try:
            stop = CTX.Event()
            for _ in range(READERS):
                p = CTX.Process(target=_idle_watcher, args=(b.name, stop), daemon=True)
                p.start()
                procs.append(p)
            deadline = time.monotonic() + 30
            while _watchers(b.name) < READERS:
                if time.monotonic() > deadline:
                    raise TimeoutError("the idle watchers did not start")
                time.sleep(0.05)
            time.sleep(0.5)  # let start-up work settle
            pids = [b.pid] + [p.pid for p in procs]
            before = [cpu_seconds(pid) for pid in pids]
            time.sleep(IDLE_S)
            after = [cpu_seconds(pid) for pid in pids]
            shares = [(a - x) / IDLE_S for a, x in zip(after, before)]
            s.add(self.name, "idle", "shmwatch",
                  {"broker_core": shares[0], "watcher_core_max": max(shares[1:]),
                   "watcher_core_mean": sum(shares[1:]) / READERS})
            log(f"  LIGHT idle      shmwatch  broker {shares[0]:.2%} of a core, watchers "
                f"max {max(shares[1:]):.2%}")
        finally:
            stop.set()
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
            REG.stop_broker(b)


def _watchers(name: str) -> int:
    from broker.admin import read_stats

    try:
        return read_stats(name)["watchers"]["total"]
    except Exception:  # noqa: BLE001 - not published yet
        return 0


def _idle_watcher(name: str, stop) -> None:
    import clientlib

    with clientlib.connect(name, timeout=30) as c:
        w = c.watch("idle/", prefix=True)
        w.get(30)
        while not stop.is_set():
            try:
                w.get(0.5)
            except clientlib.Timeout:
                pass
