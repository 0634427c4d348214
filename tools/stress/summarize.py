"""What a stress run reports: a progress line while it runs; then the summary (`summarize`:
the figures, each stream's row, and the verdict: PASSED only if nothing was violated,
enough streams were verified with events, and what the run was set up to provoke
happened), printed as tables or written as JSON."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .verify import Checked

if TYPE_CHECKING:
    from .drain import End
    from .load import Load
    from .start import Setup

# The reasons of a verdict quote the first few of each kind (every stream's row still
# lists all of its problems, and the tables show five of each).
SHOWN_PROBLEMS = 5
SHOWN_STREAMS = 8
SHOWN_PER_STREAM = 2
STATS_DELTAS = ("victims_entered", "catchups", "compactions")  # counted during the run
PRINT_COLUMNS = 120  # the tables' width when stdout is not a terminal
STATUS_STYLES = {"ok": "green", "compacted": "yellow", "killed": "cyan"}  # else red


def summarize(setup: Setup, load: Load, end: End, checked: Checked) -> dict:
    """Every figure of the run, each stream's row, and the verdict (`passed`, with the
    `reasons` it failed for)."""
    a, hist, streams = setup.a, checked.hist, checked.streams
    delta = {k: end.last_stats.get(k, 0) - setup.stats0.get(k, 0) for k in STATS_DELTAS}
    good = [s for s in streams if s["checked"] and s["status"] != "FAILED"]
    with_events = [s for s in good if s["events"]]
    cancels = [s for s in good if s["compact_revision"]]
    exercised = {
        "victims": (delta["victims_entered"] > 0,
                    any(s.behaviour.startswith("stall") for s in load.specs)),
        "compaction": (bool(cancels),
                       bool(setup.interval) and any(s.behaviour == "stall-long"
                                                    for s in load.specs)),
    }
    bad = [s for s in streams if s["status"] == "FAILED"]
    reasons = _reasons(setup, checked, bad, len(with_events), exercised)
    revisions = end.final_rev - setup.base
    return {
        "broker": setup.name, "seed": setup.seed, "duration_s": round(end.elapsed, 2),
        "writers": a.writers, "watchers": a.watchers,
        "revisions_written": revisions,
        "events_written": sum(len(e) for e in hist.events),
        "writes_per_s": round(revisions / end.elapsed, 1),
        "writes_acknowledged": checked.acked,
        "writes_found": checked.acked - hist.acks_failed,
        "streams_total": len(streams), "streams_verified": len(good),
        "streams_with_events": len(with_events), "min_streams": a.min_streams,
        "streams_compacted": len(cancels),
        "events_verified": sum(s["events"] for s in good),
        "kills": dict(load.kills), "replacements": load.replacements,
        "killed": [w.name for w in load.workers if w.killed],
        **delta,
        "store_compactions": load.store_compactions,
        "compact_revision": end.compactions.final,
        "log_wrapped": end.compactions.wrapped, "max_log_fill": round(load.max_log_fill, 3),
        "max_lag": load.max_lag, "lag_samples": load.lag_samples,
        "exercised": {k: {"done": d, "required": m} for k, (d, m) in exercised.items()},
        "reference_problem": setup.ref.problem,
        "violations": len(hist.problems) + len(checked.writer_problems) + len(bad)
        + bool(setup.ref.problem),
        "reasons": reasons, "streams": streams, "passed": not reasons,
    }


def _reasons(setup: Setup, checked: Checked, bad: list, with_events: int,
             exercised: dict) -> list[str]:
    """Why the run FAILED; none if it PASSED."""
    reasons = []
    if setup.ref.problem:
        reasons.append(f"reference history: {setup.ref.problem}")
    reasons += [f"history: {p}" for p in checked.hist.problems[:SHOWN_PROBLEMS]]
    reasons += [f"writes: {p}" for p in checked.writer_problems[:SHOWN_PROBLEMS]]
    reasons += [f"{s['stream']}: {'; '.join(s['problems'][:SHOWN_PER_STREAM])}"
                for s in bad[:SHOWN_STREAMS]]
    if with_events < setup.a.min_streams:
        reasons.append(f"only {with_events} stream(s) verified with events; "
                       f"--min-streams is {setup.a.min_streams}")
    for what, (done, meant) in exercised.items():
        if meant and not done:
            reasons.append(f"{what} not exercised although the run was set up to "
                           f"provoke it")
    return reasons


def write_json(s: dict, path: str) -> None:
    """The summary as JSON to `path` ("-": stdout)."""
    text = json.dumps(s, indent=2)
    if path == "-":
        print(text)
    else:
        with open(path, "w") as f:
            f.write(text)


def print_summary(s: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else PRINT_COLUMNS)
    console.print(_figures(s))
    console.print(_streams(s))
    for r in s["streams"]:
        for p in r["problems"][:SHOWN_PROBLEMS]:
            console.print(f"[red]{r['stream']}[/]: {p}", highlight=False)
    for what, e in s["exercised"].items():
        if e["done"]:
            console.print(f"[green]exercised[/]: {what}")
        elif e["required"]:
            console.print(f"[bold red]NOT EXERCISED[/]: {what}")
        else:
            console.print(f"[bold yellow]not exercised[/]: {what} (not set up to provoke "
                          "it; see --stall / --stall-long / --compact-every)")
    if s["passed"]:
        console.print(f"[bold green]PASSED[/]: {s['streams_with_events']} streams verified "
                      f"with events ({s['events_verified']:,} events): every one in order, "
                      "once, each revision whole, or correctly cancelled; every acknowledged "
                      f"write found. Replay the choices with --seed {s['seed']}.")
    else:
        console.print(f"[bold red]FAILED[/] (seed {s['seed']}):")
        for r in s["reasons"]:
            console.print(f"  - {r}", markup=False)


def _figures(s: dict) -> Table:
    t = Table(title=f"shmwatch stress on broker {s['broker']} (seed {s['seed']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("duration", f"{s['duration_s']} s"),
        ("writers / watchers at start", f"{s['writers']} / {s['watchers']}"),
        ("revisions written", f"{s['revisions_written']:,} ({s['writes_per_s']:,}/s)"),
        ("events written", f"{s['events_written']:,}"),
        ("writes acknowledged / found", f"{s['writes_acknowledged']:,} / "
                                        f"{s['writes_found']:,}"),
        ("streams verified with events / total",
         f"{s['streams_with_events']} / {s['streams_total']} (need {s['min_streams']})"),
        ("events verified", f"{s['events_verified']:,}"),
        ("victims entered", str(s["victims_entered"])),
        ("catch-ups", str(s["catchups"])),
        ("compactions (watches cancelled)", f"{s['compactions']} ({s['streams_compacted']}"
                                            " streams checked)"),
        ("store compacted", f"{s['store_compactions']} times, to revision "
                            f"{s['compact_revision']:,}"),
        ("max lag during the run", f"{s['max_lag']:,} revisions ({s['lag_samples']} "
                                   "samples)"),
        ("killed (chaos)", f"{s['kills']['writer']} writers, {s['kills']['watcher']} "
                           f"watchers; {s['replacements']} replaced"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def _streams(s: dict) -> Table:
    w = Table(title="streams, verified against the revision log")
    w.add_column("stream", no_wrap=True)
    w.add_column("status", no_wrap=True)
    w.add_column("events", justify="right", no_wrap=True)
    w.add_column("revisions", no_wrap=True)
    w.add_column("watch", overflow="fold")
    for r in s["streams"]:
        style = STATUS_STYLES.get(r["status"], "red")
        span = f"{r['first']}..{r['last']}" if r["events"] else f"{r['first']}.."
        if r["compact_revision"]:
            span += f" cancel@{r['compact_revision']}"
        name, _, was = r["stream"].partition(" (replacement of ")
        w.add_row(name, f"[{style}]{r['status']}[/]", f"{r['events']:,}", span,
                  r["watch"] + (f" (replaces {was[:-1]})" if was else ""))
    return w


class Progress:
    """A live line of progress (rich) on stderr, or nothing when quiet."""

    REFRESH_S = 0.25

    def __init__(self, quiet: bool):
        self.live = None
        self._last = 0.0
        if not quiet:
            self.live = Live(console=Console(stderr=True), refresh_per_second=1 / self.REFRESH_S,
                             transient=True)
            self.live.start()

    def update(self, load: Load, now: float) -> None:
        if self.live is None or now - self._last < self.REFRESH_S:
            return
        self._last = now
        st = load.last_stats
        wat = st.get("watchers", {})
        tab = Table.grid(padding=(0, 2))
        tab.add_row(f"[bold]stress[/] {now - load.t0:5.1f}/{load.a.duration:.0f}s",
                    f"rev {st.get('revision', 0)}", f"writes~{load.written.value}",
                    f"delivered~{load.delivered.value}",
                    f"watchers {wat.get('synced', 0)} synced / {wat.get('unsynced', 0)} "
                    f"unsynced / [red]{wat.get('victim', 0)} victims[/]",
                    f"lag max {load.max_lag}", f"compact {st.get('compact_revision', 0)}",
                    f"killed {sum(load.kills.values())}")
        self.live.update(tab)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
