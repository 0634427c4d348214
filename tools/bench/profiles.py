"""The sizes of a run: how long trials write, how many repetitions, how many watchers.

Owns the three profiles (--smoke, --quick, full) and nothing else: no workload reads a
size from anywhere but its run's Profile.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Profile:
    """Sizes of one run (--smoke / --quick / full)."""

    name: str
    reps: int
    dur: float  # seconds of writing per throughput trial
    lat_dur: float  # seconds of paced writing in W3
    stall_dur: float  # seconds of writing in W4
    fanout: int = 8
    w5_counts: tuple = (1, 100, 1000, 10000)
    w5_dur: float = 2.0
    w5_procs: int = 4
    mem_writes: int = 1_000_000
    mem_watchers: int = 1000
    idle_s: float = 1.5  # a lossy peer's reader gives up after this long without a record
    stall_log_bytes: int = 256 << 20  # W4's revision log: the stalled watcher's whole backlog
    light_dur: float = 4.0  # seconds of paced writing per LIGHT trial
    cu_watchers: int = 1000  # CATCHUP: stalled watchers, then all catching up at once
    cu_events: int = 10_000  # CATCHUP: events written while they are stalled
    lease_n: int = 40  # LEASE L1: leases granted per trial
    lease_spread_s: float = 1.5  # LEASE L1: over this long (etcd's 500 ms check at every phase)
    lease_holders: int = 12  # LEASE L2: holder processes SIGKILLed per trial


PROFILES = {
    "smoke": Profile("smoke", reps=1, dur=0.25, lat_dur=0.3, stall_dur=0.3, fanout=3,
                     w5_counts=(1, 100), w5_dur=0.3, w5_procs=2, mem_writes=6400,
                     mem_watchers=50, idle_s=1.0, stall_log_bytes=16 << 20, light_dur=0.3,
                     cu_watchers=20, cu_events=640, lease_n=6, lease_spread_s=0.5,
                     lease_holders=3),
    "quick": Profile("quick", reps=2, dur=1.0, lat_dur=2.0, stall_dur=1.5,
                     w5_dur=1.5, mem_writes=200_000, light_dur=2.0,
                     cu_watchers=200, cu_events=5_000, lease_n=20, lease_spread_s=1.0,
                     lease_holders=8),
    "full": Profile("full", reps=3, dur=3.0, lat_dur=6.0, stall_dur=3.0,
                    w5_dur=4.0, mem_writes=1_000_000),
}


def from_dict(d: dict) -> Profile:
    """A Profile back from its --json form (`dataclasses.asdict`; tuples came back lists)."""
    return Profile(**{**d, "w5_counts": tuple(d["w5_counts"])})
