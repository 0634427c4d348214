"""W4: one stalled watcher beside 3 fast ones. The fast ones' rate with and without it
(run back to back, ABBA across repetitions), the share they keep, and how many records
the stalled one gets once it resumes (shmwatch: it becomes a victim and replays from
the revision log, which is sized to hold its whole backlog).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

from .. import log
from ..results import rate
from .base import Workload

if TYPE_CHECKING:
    from ..session import Session

FAST = 3
RING_BYTES = 64 << 10  # shmwatch's watch rings: small, so the stalled one fills its ring
ALONE, BESIDE = f"{FAST} fast", f"{FAST} fast + 1 stalled"


class Stall(Workload):
    name = "W4"

    def run(self, s: Session) -> None:
        for tn in s.transports():
            pair = [(ALONE, 0), (BESIDE, 1)]
            if s.rep % 2:
                pair.reverse()  # ABBA across repetitions: a drift in the machine cancels out
            fast = {}
            for variant, stalled in pair:
                rate_each = self._trial(s, tn, variant, stalled)
                if rate_each is not None:
                    fast[variant] = rate_each
            if len(fast) == 2 and fast[ALONE] > 0:
                s.add(self.name, "kept", tn, {"kept": fast[BESIDE] / fast[ALONE]})

    def _trial(self, s: Session, tn: str, variant: str, stalled: int) -> float | None:
        """One trial; returns the mean rate of the fast watchers."""
        write = "batched" if "batched" in s.transport(tn).write_paths else "sync"
        opts = {"watch_ring_bytes": RING_BYTES, "log_bytes": s.prof.stall_log_bytes}
        res = s.trial(workload=self.name, variant=variant, transport=tn, writers=1,
                      readers=FAST + stalled, stalled=stalled, write=write,
                      duration=s.prof.stall_dur, broker_stats=True,
                      broker_opts=opts if tn == "shmwatch" else {})
        if res is None:
            return None
        fast = [r for r in res["readers"] if not r["stalled"]]
        each = statistics.mean(rate(r["count"], res["start"], r["last"]) for r in fast)
        got = [r["count"] for r in fast]
        figs = {"fast_rate": each, "fast_delivered": min(got) / max(res["sent"], 1)}
        line = (f"  W4 {variant:18} {tn:9} fast {each:12,.0f} /s each "
                f"(got {min(got)}..{max(got)} of {res['sent']})")
        st = res.get("stats") or {}
        if st.get("victims_entered") is not None:
            figs["victims_entered"] = st["victims_entered"]
            line += f"; broker: {st['victims_entered']} victim entries"
        if stalled:
            one = next(r for r in res["readers"] if r["stalled"])
            catchup = (one["last"] - one["began"]) / 1e9 if one["last"] else 0.0
            figs.update({"stalled_got": one["count"], "sent": res["sent"],
                         "stalled_all": 1.0 if one["count"] == res["sent"] else 0.0,
                         "catchup_s": catchup})
            line += (f"; stalled got {one['count']}/{res['sent']} in {catchup:.2f}s "
                     "after resuming")
        s.add(self.name, variant, tn, figs)
        log(line)
        return each
