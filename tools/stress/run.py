"""One stress run from its command line to its exit status: start, load, drain, verify,
summarize, each in its module; the records are read back and checked here."""

from __future__ import annotations

import argparse
import sys

from .drain import End, drain
from .load import Load
from .records import read_records
from .start import Setup, parse_args
from .summarize import Progress, print_summary, summarize, write_json
from .verify import Checked, History, Stream, check_writes, stream_report


def run(a: argparse.Namespace) -> dict:
    """The summary of one run (summarize.py says what it holds)."""
    setup = Setup(a)
    load = None
    try:
        setup.start()
        load = Load(setup)
        load.start()
        progress = Progress(a.quiet)
        try:
            load.drive(progress)
        finally:
            progress.close()
        end = drain(setup, load)
        return summarize(setup, load, end, check(setup, load, end))
    finally:
        if load is not None:
            load.stop()
        setup.close()


def check(setup: Setup, load: Load, end: End) -> Checked:
    """Every record the workers left, against the reference history."""
    writers = [w for w in load.workers if w.role == "writer"]
    acks = {w.wid: read_records(w.path) for w in writers}
    hist = History(setup.base, setup.initial, setup.ref.groups, end.final, acks)
    streams = [stream_report(w.name, w.spec, Stream.read(w.path), hist, end.compactions,
                             reference_ok=not setup.ref.problem, killed=w.killed,
                             exitcode=w.proc.exitcode)
               for w in load.workers if w.role == "watcher"]
    problems = check_writes(hist, acks, {w.wid for w in writers if w.killed})
    problems += [f"{w.name}: exit code {w.proc.exitcode}" for w in writers
                 if not w.killed and w.proc.exitcode != 0]
    return Checked(hist, streams, problems, sum(map(len, acks.values())))


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when the run passed, 1 when it failed, 2 on a usage or start error."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():
        a.quiet = True
    if a.scenario == "lock":
        from .lock import run_lock
        try:
            return run_lock(a)
        except Exception as exc:
            print(f"stress: could not run: {exc!r}", file=sys.stderr)
            return 2
    if a.scenario == "registry":
        from .registry import Registry, print_registry

        return _verdict(a, lambda: Registry(a).run(), print_registry)
    return _verdict(a, lambda: run(a), print_summary)


def _verdict(a, run_it, print_it) -> int:
    """Run a scenario; its JSON (--json) and summary; 0 passed, 1 failed, 2 could not run."""
    try:
        s = run_it()
    except Exception as exc:
        print(f"stress: could not run: {exc!r}", file=sys.stderr)
        return 2
    if a.json:
        write_json(s, a.json)
    if a.json != "-":
        print_it(s)
    return 0 if s["passed"] else 1
