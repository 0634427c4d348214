"""W1 (unicast put -> 1 watcher) and W2 (fan-out: 1 writer -> `fanout` watchers): records
delivered per second through each write path a transport has, with where the CPU went
and how many records were lost.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import log
from ..results import rate
from ..trials import cpu_figures
from .base import Workload

if TYPE_CHECKING:
    from ..session import Session


class Unicast(Workload):
    name = "W1"
    # variant -> (writers, write path)
    VARIANTS = {"1 writer": (1, "sync"), "4 writers": (4, "sync"),
                "batched": (1, "batched"), "pipelined": (1, "pipelined"),
                "async": (1, "async")}

    def run(self, s: Session) -> None:
        for variant, (writers, write) in self.VARIANTS.items():
            for tn in s.transports(write):
                res = s.trial(workload=self.name, variant=variant, transport=tn,
                              writers=writers, readers=1, write=write, duration=s.prof.dur)
                if res is None:
                    continue
                r = res["readers"][0]
                got = rate(r["count"], res["start"], r["last"])
                fig = {"rate": got, "delivered": r["count"] / max(res["sent"], 1),
                       "write_rate": res["sent"] / res["write_s"], **cpu_figures(res)}
                acked = res["writers"][0].get("acked")
                if acked is not None:  # async writes: every reply must have come
                    fig["acked"] = acked / max(res["sent"], 1)
                s.add(self.name, variant, tn, fig)
                log(f"  W1 {variant:9} {tn:9} {got:12,.0f} /s  "
                    f"(delivered {r['count']}/{res['sent']})")


class FanOut(Workload):
    name = "W2"
    VARIANTS = {"sync writes": "sync", "batched": "batched", "pipelined": "pipelined",
                "async": "async"}

    def run(self, s: Session) -> None:
        n = s.prof.fanout
        for variant, write in self.VARIANTS.items():
            for tn in s.transports(write):
                res = s.trial(workload=self.name, variant=variant, transport=tn, writers=1,
                              readers=n, write=write, duration=s.prof.dur)
                if res is None:
                    continue
                total = sum(r["count"] for r in res["readers"])
                got = rate(total, res["start"], max(r["last"] for r in res["readers"]))
                s.add(self.name, variant, tn, {
                    "rate": got, "delivered": total / max(res["sent"] * n, 1),
                    **cpu_figures(res)})
                log(f"  W2 {variant:11} {tn:9} {got:12,.0f} /s total  "
                    f"(delivered {total}/{res['sent'] * n})")
