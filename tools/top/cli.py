"""tools/top's command line: options, which broker to attach to, --list, --once and
--json, and the live view (live.py) for a terminal."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TextIO

from rich import box
from rich.console import Console
from rich.table import Table

from broker.admin import list_brokers

from .live import run_live
from .sampling import BrokerGone, StatsUnavailable
from .screen import render
from .state import snapshot_once

# Widths of what is printed to a pipe or a file, where no terminal says how wide to be.
LIST_COLUMNS = 100
ONCE_COLUMNS = 120


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="shmwatch top" if os.path.basename(sys.argv[0]) == "shmwatch" else "tools/top",
        description="Live monitor of a running shmwatch broker "
        "(reads its shared-memory stats; sends it no requests).",
        epilog="keys: q quit, s cycle the sort column, p pause")
    p.add_argument("--name", help="broker name (default: the only broker running)")
    p.add_argument("--interval", type=float, default=0.5,
                   help="refresh period in seconds (default 0.5)")
    p.add_argument("--wait-broker", type=float, default=30.0, metavar="SECONDS",
                   help="when the broker exits, wait this long for one of the same name "
                   "to come back before exiting (default 30)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot and exit (rates over one --interval)")
    p.add_argument("--json", action="store_true",
                   help="print the snapshot (or with --list the brokers) as JSON; implies "
                   "--once")
    p.add_argument("--list", action="store_true", help="list the brokers on this machine")
    a = p.parse_args(argv)
    if a.interval < 0 or (a.interval == 0 and not (a.once or a.json)):
        p.error("--interval must be > 0 (0 is allowed with --once: no rates)")
    if a.wait_broker < 0:
        p.error("--wait-broker must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0 normally, 1 when the broker is not running or went away for good,
    2 on a usage error (e.g. several brokers are running and no --name was given)."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.list:
            rows = list_brokers()
            if a.json:
                print(json.dumps(rows, indent=2))
            else:
                print_brokers(rows)
            return 0
        name, rc = choose(a.name)
        if name is None:
            return rc
        if a.once or a.json:
            return once(name, a.interval, a.json)
        if not sys.stdout.isatty():
            print("shmwatch top: stdout is not a terminal; use --once or --json",
                  file=sys.stderr)
            return 2
        try:
            return run_live(name, a.interval, a.wait_broker)
        except KeyboardInterrupt:
            return 0
    except BrokenPipeError:  # `tools/top --json | head`
        with contextlib.suppress(OSError):  # no second error at interpreter exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def once(name: str, interval: float, as_json: bool) -> int:
    """Print one view: JSON, or the screen (rich on a terminal, plain text otherwise)."""
    try:
        view = snapshot_once(name, interval)
    except StatsUnavailable as exc:
        print(f"shmwatch top: could not read the stats of broker {name!r}: {exc}",
              file=sys.stderr)
        return 1
    except BrokerGone:
        print(f"shmwatch top: broker {name!r} is not running", file=sys.stderr)
        alive = alive_brokers()
        if alive:
            print("running: " + ", ".join(b["name"] for b in alive), file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(view, indent=2))
    else:
        tty = sys.stdout.isatty()
        console = Console(width=None if tty or os.environ.get("COLUMNS") else ONCE_COLUMNS)
        console.print(render(view, width=console.width, sort="lag"))
    return 0


def alive_brokers() -> list[dict]:
    return [b for b in list_brokers() if b.get("state") == "alive"]


def choose(name: str | None) -> tuple[str | None, int]:
    """The broker to attach to: `name`, else the only one running; else None and the
    exit status (1: none running, 2: several, pick one)."""
    if name:
        return name, 0
    alive = alive_brokers()
    if len(alive) == 1:
        return alive[0]["name"], 0
    if not alive:
        print("shmwatch top: no broker is running (start one with `shmwatch serve --name "
              "NAME`)", file=sys.stderr)
        return None, 1
    print("shmwatch top: several brokers are running; pick one with --name:",
          file=sys.stderr)
    print_brokers(alive, file=sys.stderr)
    return None, 2


def print_brokers(rows: list[dict], file: TextIO | None = None) -> None:
    file = file or sys.stdout
    console = Console(file=file, width=None if file.isatty() else LIST_COLUMNS)
    if not rows:
        console.print("no brokers")
        return
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for label, just in (("NAME", "left"), ("PID", "right"), ("STATE", "left"),
                        ("REVISION", "right"), ("CLIENTS", "right")):
        t.add_column(label, justify=just, no_wrap=True)
    for r in rows:
        st = r.get("state", "?")
        t.add_row(r["name"], str(r.get("pid", 0)),
                  f"[green]{st}[/]" if st == "alive" else f"[red]{st}[/]",
                  f"{r.get('revision', 0):,}", str(r.get("clients", 0)))
    console.print(t)
