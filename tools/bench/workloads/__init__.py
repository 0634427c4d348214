"""The workloads, in the order a repetition runs them (and BENCHMARKS.md shows them).

  W1  unicast put -> watch, 1 and 4 writers with synchronous writes, and the batched,
      pipelined (64 puts per txn / per call) and async (put_async) write paths;
      records/s to 1 watcher.
  W2  fan-out: 1 writer -> 8 watcher processes on one prefix; total delivered/s.
  W3  one-way latency at a paced 5,000 records/s (etcd: 500/s), stamped with the
      intended send time (no coordinated omission); p50 / p99 / p99.9 in us.
  W4  one stalled watcher beside 3 fast ones: the fast ones' rate with and without it,
      and how many records the stalled one gets once it resumes.
  W5  (shmwatch) 1 .. 10,000 watchers on single keys and on ranges, held by a few
      processes, while one writer writes keys; write rate and broker CPU per write.
  MEM (shmwatch) broker RSS with 1,000 stalled watchers as N writes pile up.
  LIGHT CPU per record of every process at a paced 1,000 and 5,000 records/s to 4
      watchers, beside multiprocessing.Queue; and an idle broker's and watchers' CPU.
  CATCHUP (shmwatch) 1,000 stalled watchers catch up at once, replayed by the broker
      or read from the shared log by the watchers: broker CPU per replayed event.
  LEASE (shmwatch and etcd) L1 lease expiry lag (deadline -> DELETE at a watcher), idle
      and under writes; L2 release lag after SIGKILL of the holder (bound lease; etcd:
      its minimum TTL running out).

Adding a workload is one Workload subclass in a module here, one entry in WORKLOADS,
and its section in report/sections.py (a test checks that every workload has one).
"""

from __future__ import annotations

from .base import Workload
from .catchup import MassCatchUp
from .latency import Latency
from .lease import Leases
from .light import Light
from .many_watchers import ManyWatchers
from .memory import Memory
from .stall import Stall
from .throughput import FanOut, Unicast

WORKLOADS: tuple[Workload, ...] = (Unicast(), FanOut(), Latency(), Stall(), ManyWatchers(),
                                   Memory(), Light(), MassCatchUp(), Leases())
NAMES = tuple(w.name for w in WORKLOADS)

__all__ = ["NAMES", "WORKLOADS", "Workload"]
