"""W3: one-way latency at a paced rate, from each record's intended send time to its
receipt (a writer's stall counts against every record it delays: no coordinated
omission); percentiles in us, and how late the writer itself was.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

from .. import log
from ..results import pctl
from .base import Workload

if TYPE_CHECKING:
    from ..session import Session

RATE = 5000.0  # records/s (a transport may hold it lower: etcd)


class Latency(Workload):
    name = "W3"
    variant = "paced"

    def run(self, s: Session) -> None:
        for tn in s.transports():
            pace = s.transport(tn).pace(RATE)
            res = s.trial(workload=self.name, variant=self.variant, transport=tn, writers=1,
                          readers=1, pace=pace, duration=s.prof.lat_dur)
            if res is None:
                continue
            lat = array("q")
            lat.frombytes(res["readers"][0]["lat"])
            xs = sorted(lat)
            w = res["writers"][0]
            p50, p99, p999, top = (pctl(xs, q) / 1000 for q in (50, 99, 99.9, 100))
            s.add(self.name, self.variant, tn, {
                "rate": pace, "p50": p50, "p99": p99, "p999": p999, "samples": len(xs),
                "late_p99": w.get("late_p99_us"), "late_max": w.get("late_max_us"),
                "stalls": w.get("stalls"), "max": top})
            log(f"  W3 {tn:9} at {pace:,.0f}/s  p50 {p50:8.1f}  p99 {p99:8.1f}  "
                f"p99.9 {p999:8.1f}  max {top:8.0f} us  ({len(xs)} samples; "
                f"writer late p99 {w.get('late_p99_us', 0):.0f} max "
                f"{w.get('late_max_us', 0):.0f} us, {w.get('stalls')} stalls > 5 ms)")
