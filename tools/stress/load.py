"""The load of a stress run, from the main process: the writer and watcher processes
(workers.py) started together, and the schedule while they run: the broker's stats
sampled, the store compacted every interval as etcd's periodic auto-compaction does,
and with --chaos a writer or a watcher SIGKILLed in turn and replaced."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import signal
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import clientlib

from .spec import START_TIMEOUT_S, WatchSpec, plan_watchers
from .start import COMPACTIONS_PER_RUN, SEED_RANGE, Setup
from .verify import Stream
from .workers import watcher_main, writer_main

if TYPE_CHECKING:
    from .summarize import Progress

CHAOS_ROLES = ("watcher", "writer", "watcher")  # the kinds killed, in turn
CHAOS_EVERY_S = (0.4, 0.9)  # a kill every so often, drawn between these
# The first kill waits for the load to settle: this long, or this share of a short run.
CHAOS_FIRST_S = 1.0
CHAOS_FIRST_SHARE = 0.15
# No kill this close to the end: its replacement would have no time to connect.
CHAOS_QUIET_END_S = 0.5
LATE_REPLACEMENT_EVERY = 3  # one watcher replacement in three starts from revision 1
TICK_S = 0.1  # the schedule's resolution
START_POLL_S = 0.01  # how often the start looks whether every process has connected
REAP_S = 10.0  # a killed process is reaped at once; this is the bound


@dataclass
class Worker:
    """A writer or watcher process of the run, and where it records what it did."""

    name: str  # its process name; a replacement's says whose: "... (replacement of ...)"
    role: str  # writer | watcher
    proc: mp.process.BaseProcess
    path: str
    spec: WatchSpec | None = None
    wid: int = 0  # a writer's number, in the values it writes
    killed: bool = False

    @property
    def short(self) -> str:
        """The name without "(replacement of ...)"."""
        return self.name.split()[0]


class Load:
    """The run's processes and what was seen while they ran: the kills and
    replacements, the compactions made and seen, the worst lag and log fill sampled."""

    def __init__(self, setup: Setup):
        self.setup = setup
        self.a = setup.a
        self.ctx = mp.get_context("spawn")
        self.written = self.ctx.Value("q", 0)  # approximate counts for the progress line
        self.delivered = self.ctx.Value("q", 0)
        # ready count, start signal, start and end times (monotonic)
        self.sync = (self.ctx.Value("i", 0), self.ctx.Event(), self.ctx.Value("d", 0.0),
                     self.ctx.Value("d", 0.0))
        self.workers: list[Worker] = []
        self.specs: list[WatchSpec] = []
        self.kills = {"writer": 0, "watcher": 0}
        self.replacements = 0
        self.store_compactions = 0
        self.compacted_to: set[int] = set()  # the revisions this run compacted to
        self.seen_compact = {setup.stats0.get("compact_revision", 0)}  # in the stats
        self.max_lag = 0
        self.max_log_fill = 0.0
        self.lag_samples = 0
        self.rev_samples: deque[tuple[float, int]] = deque()  # (time, revision)
        self.last_stats: dict = {}
        # the clock, set by start() (monotonic)
        self.t0 = self.stop_at = self.next_chaos = self.next_compact = 0.0

    def start(self) -> None:
        """Start every process, then the clock once all are connected, so stalls, late
        starts and chaos happen inside the run, not during start-up."""
        # without compaction the stalls are still placed as if for the default interval
        self.specs = plan_watchers(self.a, self.setup.rnd, self.setup.interval
                                   or self.a.duration / COMPACTIONS_PER_RUN)
        for s in self.specs:
            self._start_watcher(s)
        for _ in range(self.a.writers):
            self._start_writer(None)
        ready, go, t0_v, stop_v = self.sync
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready.value < len(self.workers):
            if time.monotonic() > deadline or any(w.proc.exitcode for w in self.workers):
                raise RuntimeError("worker processes did not start")
            time.sleep(START_POLL_S)
        self.t0 = t0_v.value = time.monotonic()
        self.stop_at = stop_v.value = self.t0 + self.a.duration
        self.rev_samples.append((self.t0, self.setup.base))
        self.next_chaos = self.t0 + min(CHAOS_FIRST_S, CHAOS_FIRST_SHARE * self.a.duration)
        self.next_compact = self.t0 + self.setup.interval
        go.set()

    def drive(self, progress: Progress) -> None:
        """Until the run's end: sample, kill (with --chaos), compact, show progress."""
        while (now := time.monotonic()) < self.stop_at:
            stats = self.setup.read_stats()
            if stats:
                self._sample(now, stats)
            if self.a.chaos and self.next_chaos <= now < self.stop_at - CHAOS_QUIET_END_S:
                self._chaos()
                self.next_chaos = now + self.setup.rnd.uniform(*CHAOS_EVERY_S)
            if self.setup.interval and now >= self.next_compact:
                self._compact(now)
                self.next_compact += self.setup.interval
            progress.update(self, now)
            time.sleep(TICK_S)

    def stop(self) -> None:
        """Kill what still runs (after a failure: the drain has ended the rest)."""
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(REAP_S)

    def _start_watcher(self, spec: WatchSpec) -> None:
        path = self.setup.path(spec.name.split()[0])
        p = self.ctx.Process(target=watcher_main, name=spec.name, daemon=True,
                             args=(self.setup.name, spec, path, self.sync, self.delivered))
        p.start()
        self.workers.append(Worker(spec.name, "watcher", p, path, spec=spec))

    def _start_writer(self, replaces: str | None) -> None:
        wid = sum(w.role == "writer" for w in self.workers) + 1
        name = f"writer-{wid}" + (f" (replacement of {replaces})" if replaces else "")
        path = self.setup.path(f"writer-{wid}")
        p = self.ctx.Process(target=writer_main, name=name, daemon=True,
                             args=(self.setup.name, wid, self.a.keys,
                                   self.setup.rnd.randrange(SEED_RANGE), path, self.sync,
                                   self.written))
        p.start()
        self.workers.append(Worker(name, "writer", p, path, wid=wid))

    def _sample(self, now: float, stats: dict) -> None:
        """The lag of the worst watcher right now (metrics are a snapshot: the maximum
        over the run is the maximum of samples taken during it)."""
        self.last_stats = stats
        self.lag_samples += 1
        lags = [c.get("max_lag", 0) for c in stats.get("clients", ())]
        self.max_lag = max([self.max_lag, *lags])
        log = stats.get("log", {})
        self.max_log_fill = max(self.max_log_fill, log.get("used", 0) / (log.get("capacity") or 1))
        self.seen_compact.add(stats.get("compact_revision", 0))
        self.rev_samples.append((now, stats.get("revision", 0)))

    def _compact(self, now: float) -> None:
        """etcd-style periodic compaction: to the revision of one interval ago, and
        never past what the reference has read."""
        interval = self.setup.interval
        while len(self.rev_samples) > 1 and self.rev_samples[1][0] <= now - interval:
            self.rev_samples.popleft()
        target = min(self.rev_samples[0][1], self.setup.ref.last)
        if target <= max(self.setup.base, self.last_stats.get("compact_revision", 0)):
            return
        try:
            self.setup.client.compact(target)
            self.store_compactions += 1
            self.compacted_to.add(target)
        except clientlib.CompactedError:
            pass  # the log wrapped past it meanwhile: compacted anyway

    def _chaos(self) -> None:
        """SIGKILL a writer or a watcher (in turn) and replace it. The long-stalling
        watchers are spared: they are the run's compaction probes."""
        role = CHAOS_ROLES[sum(self.kills.values()) % len(CHAOS_ROLES)]
        alive = [w for w in self.workers if w.role == role and not w.killed
                 and w.proc.is_alive() and not (w.spec and w.spec.behaviour == "stall-long")]
        if not alive:
            return
        w = self.setup.rnd.choice(alive)
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.join(REAP_S)
        w.killed = True
        self.kills[role] += 1
        self.replacements += 1
        if role == "writer":
            self._start_writer(w.short)
        else:
            self._replace_watcher(w)

    def _replace_watcher(self, w: Worker) -> None:
        """A watcher in place of killed `w`, with its watch: one in three a late one from
        revision 1 (compacted by now: it must get the cancel), the others resuming from
        the predecessor's last delivered revision + 1."""
        n = sum(1 for x in self.workers if x.spec and x.spec.replaces)
        if n % LATE_REPLACEMENT_EVERY == 1:
            kind, start = "late", 1
        else:
            kind, start = "resume", Stream.read(w.path).resume_from()
        spec = dataclasses.replace(
            w.spec, name=f"watcher-{kind}-{len(self.specs) + n + 1} (replacement of "
            f"{w.short})", behaviour=kind, start_revision=start, start_at=0.0, stall=None,
            replaces=w.short)
        self._start_watcher(spec)
