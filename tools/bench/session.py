"""One benchmark run: the chosen workloads, repetition by repetition, interleaved.

Owns the run's transports (which peers are available, starting and stopping their
servers), the order of work (repetition r runs every chosen workload through every
transport before repetition r+1 starts, so the machine's noise hits everyone alike;
`once` workloads run after the repetitions), and what a workload needs from the run:
`trial()` to run one trial (a failure is recorded, not raised), `add()` to record
figures, `fail()` to record a failure. Never knows what a workload measures.
"""

from __future__ import annotations

import contextlib
import traceback
from typing import Callable

from . import log
from .procs import TrialError
from .profiles import Profile
from .pyspy import Spies
from .results import Results, Run
from .transports import CLASSES, LABELS, Transport
from .trials import Runner, Trial
from .workloads import Workload

PREFIXES = 4096  # trial key prefixes "000/".."fff/" (4 bytes: the record's key length)


class Session:
    def __init__(self, prof: Profile, workloads: list[Workload], peers: list[str],
                 profile_dir: str | None = None):
        self.prof = prof
        self.workloads = workloads
        self.results = Results()
        self.errors: list[str] = []
        self.skipped: dict[str, str] = {}
        self.rep = 0
        self.spies = Spies(profile_dir) if profile_dir else None
        self.started: dict[str, Transport] = {"shmwatch": CLASSES["shmwatch"]()}
        for name in peers:
            why = CLASSES[name].missing()
            if why:
                self._skip(name, why)
            else:
                self.started[name] = CLASSES[name]()
        self.runner = Runner(self.started, self.spies)
        self._trials = 0

    def _skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log(f"skipping {LABELS[name]}: {why}")

    # ------------------------------------------------------------ the run

    def run(self) -> None:
        """Every workload, every repetition; servers stopped by `stop` (call it in a
        finally: Ctrl-C lands anywhere in here)."""
        self._start_servers()
        for rep in range(self.prof.reps):
            self.rep = rep
            for w in self.workloads:
                if not w.once:
                    log(f"[rep {rep + 1}/{self.prof.reps}] {w.name}")
                    w.run(self)
        for w in self.workloads:
            if w.once:
                log(f"[once] {w.name}")
                w.run(self)

    def _start_servers(self) -> None:
        for name in list(self.started):
            t = self.started[name]
            try:
                t.start()
            except Exception as exc:  # a peer that cannot start is skipped, said so
                self._skip(name, f"could not start: {exc}")
                with contextlib.suppress(Exception):
                    t.stop()
                del self.started[name]

    def stop(self) -> None:
        for t in self.started.values():
            with contextlib.suppress(Exception):
                t.stop()

    def as_run(self, machine: dict, elapsed_s: float) -> Run:
        return Run(profile=self.prof, machine=machine, results=self.results,
                   skipped=self.skipped, errors=self.errors, elapsed_s=elapsed_s)

    # ------------------------------------------------------------ for workloads

    def transports(self, write: str = "sync") -> list[str]:
        """The started transports that have this write path, shmwatch first."""
        return [n for n, t in self.started.items() if write in t.write_paths]

    def transport(self, name: str) -> Transport:
        return self.started[name]

    def trial(self, **kw) -> dict | None:
        """Run one Trial (its fields but prefix and idle_s); None if it failed (recorded
        in errors and on stderr)."""
        self._trials += 1
        t = self.started[kw["transport"]]
        tr = Trial(prefix=b"%03x/" % (self._trials % PREFIXES),
                   idle_s=max(self.prof.idle_s, t.min_idle_s), **kw)
        try:
            return self.runner.run(tr)
        except TrialError as exc:
            self.fail(f"{tr.workload} {tr.variant} {tr.transport}: {exc}")
            return None

    def add(self, wl: str, variant: str, transport: str, figures: dict) -> None:
        self.results.add(wl, variant, transport, figures)

    def fail(self, msg: str, detail: str = "") -> None:
        """A failed trial: listed in BENCHMARKS.md's "Failed trials" (first line)."""
        self.errors.append(msg)
        log("  FAILED " + msg + (("\n" + detail) if detail else ""))

    def guarded(self, label: str, fn: Callable, *args):
        """fn(*args) for a workload that runs its own processes; an exception is recorded
        as a failure under `label` (with its traceback on stderr) and gives None."""
        try:
            return fn(*args)
        except Exception as exc:
            self.fail(f"{label}: {exc!r}", traceback.format_exc())
            return None
