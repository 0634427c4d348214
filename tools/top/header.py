"""The header of tools/top's screen: the broker's process, its revisions and revision log,
the write and event rates with their history, its watchers by state, its leases (all,
bound to a client process, expiring within 5 s) and its totals, in a panel titled with
the broker's name and the snapshot's time.

For a broker that has exited (`broker_state` other than "alive") every figure is a dash:
what it last published is no longer true; its pid stays, to say which one exited."""

from __future__ import annotations

import time
from datetime import datetime

from rich import box
from rich.console import Group
from rich.panel import Panel
from rich.text import Text

from .fmt import GONE, bar, fill_style, flow, fmt_bytes, fmt_dur, fmt_pct, fmt_rate, sparkline

STALE_AFTER_S = 3.0  # a live broker whose snapshot is older than this is flagged
LOG_BAR_CELLS = 12
# A rate line's sparkline gets the width its other parts leave: the label (9), the rate
# (8), a gap (2), "  max " (6) and the maximum (7) take 32 cells; 2 more stay free.
RATE_LINE_CELLS = 34
MIN_SPARK_CELLS = 8
BIG_SEP, SMALL_SEP = "   ", " · "  # between the figures of a line: groups, counts

T = Text.assemble


def header_lines(view: dict, history: tuple, inner: int) -> list[Text]:
    """The header's lines for a panel `inner` cells wide; `history`: the writes/s and
    events/s values of the sparklines (empty for --once)."""
    gone = view.get("broker_state", "alive") != "alive"
    lines = flow(_process_items(view, gone), BIG_SEP, inner)
    lines += flow(_store_items(view, gone), BIG_SEP, inner)
    lines += _rate_lines(view, gone, history, inner)
    lines += flow(_watcher_items(view, gone), SMALL_SEP, inner)
    lines += flow(_lease_items(view, gone), SMALL_SEP, inner)
    lines += flow(_total_items(view, gone), SMALL_SEP, inner)
    if view.get("upstream"):
        lines += flow(upstream_items(view["upstream"]), SMALL_SEP, inner)
    return lines


def upstream_items(up: dict) -> list[Text]:
    """A mirroring broker's etcd: endpoints, the member its watch is on, the mirror's
    revision against etcd's, the lag, failovers and forwarded requests."""
    conn = up.get("connected")
    return [
        T(("etcd ", "dim"), (",".join(up.get("endpoints", ())), "bold")),
        T(("on ", "dim"), (conn, "bold green") if conn else ("no member", "bold red")),
        T(("mirror ", "dim"), (f"{up.get('mirror_revision', 0):,}", "bold cyan"),
          (" / etcd ", "dim"), (f"{up.get('etcd_revision', 0):,}", "bold")),
        T(("lag ", "dim"), (f"{up.get('lag', 0):,}", "bold yellow" if up.get("lag") else "bold")),
        T(("failovers ", "dim"), f"{up.get('failovers', 0):,}"),
        T(("forwarded ", "dim"), f"{up.get('forwarded', 0):,}"),
    ]


def header_panel(view: dict, lines: list[Text], *, alert: bool, paused: bool) -> Panel:
    """`lines` in a panel titled with the broker's name, the snapshot's time on its
    border (with a warning when it is stale); a red border when a banner follows."""
    for ln in lines:
        ln.no_wrap = True
        ln.overflow = "ellipsis"
    title = T(("shmwatch top", "bold"), " · broker ", (str(view.get("name", "?")), "bold cyan"))
    if paused:
        title.append("  PAUSED", style="bold black on yellow")
    sub = datetime.fromtimestamp(view.get("time") or time.time()).strftime("%H:%M:%S")
    age = view.get("snapshot_age_s") or 0
    if age > STALE_AFTER_S:
        sub = f"[bold yellow]stats {age:.0f}s old: broker busy or stuck?[/]  {sub}"
    return Panel(Group(*lines), title=title, title_align="left", subtitle=sub,
                 subtitle_align="right", box=box.ROUNDED, padding=(0, 1),
                 border_style="red" if alert else "blue")


def _num(gone: bool, x, fmt: str = "{:,}") -> str:
    return GONE if gone or x is None else fmt.format(x)


def _process_items(view: dict, gone: bool) -> list[Text]:
    return [
        T(("pid ", "dim"), (str(view.get("pid", "?")), "bold"),
          (" exited", "bold red") if gone else ""),
        T(("up ", "dim"), (GONE if gone else fmt_dur(view.get("uptime_s", 0)), "bold")),
        T(("cpu ", "dim"), (GONE if gone else f"{fmt_pct(view.get('cpu_percent'))}%", "bold")),
        T(("rss ", "dim"), (GONE if gone else fmt_bytes(view.get("rss_bytes")), "bold")),
        T(("clients ", "dim"), (_num(gone, len(view.get("clients", ()))), "bold")),
    ]


def _store_items(view: dict, gone: bool) -> list[Text]:
    """Revision, compact revision, the log's fill and the revisions it holds."""
    lg = {} if gone else view.get("log", {})
    cap = lg.get("capacity") or 1
    used = lg.get("used", 0)
    held = (f"{lg.get('oldest_rev', 0):,}..{lg.get('newest_rev', 0):,} "
            f"({lg.get('count', 0):,} revs)" if lg.get("count") else
            GONE if gone else "no revisions")
    log = (T(("log ", "dim"), GONE) if gone else
           T(("log ", "dim"), bar(used / cap, LOG_BAR_CELLS, fill_style(used / cap)),
             f" {fmt_bytes(used)} / {fmt_bytes(lg.get('capacity'))} ({100 * used / cap:.0f}%)"))
    return [
        T(("revision ", "dim"), (_num(gone, view.get("revision", 0)), "bold cyan")),
        T(("compact ", "dim"), (_num(gone, view.get("compact_revision", 0)), "bold")),
        log,
        T(("holds ", "dim"), held),
    ]


def _rate_lines(view: dict, gone: bool, history: tuple, inner: int) -> list[Text]:
    """writes/s and events/s: with a history (the live view) its sparkline, newest on
    the right, and its maximum; without (--once) the interval the rates were taken over."""
    spark_w = max(MIN_SPARK_CELLS, inner - RATE_LINE_CELLS)
    lines = []
    for label, key, values, style in (("writes/s", "writes_per_s", history[0], "cyan"),
                                      ("events/s", "events_per_s", history[1], "magenta")):
        rate = GONE if gone else fmt_rate(view.get(key))
        ln = T((f"{label:9}", "dim"), (f"{rate:>8}", "bold " + style))
        if values and not gone:
            ln.append_text(T("  ", (sparkline(values, spark_w), style),
                             ("  max ", "dim"), (f"{fmt_rate(max(values)):>7}", "")))
        elif key == "writes_per_s" and view.get("rate_interval_s") and not gone:
            ln.append(f"   (over {view['rate_interval_s']:.2f}s)", style="dim")
        lines.append(ln)
    return lines


def _watcher_items(view: dict, gone: bool) -> list[Text]:
    wt = view.get("watchers", {})
    pend = view.get("pending_events")
    return [
        T(("watchers ", "dim"), (_num(gone, wt.get("total", 0)), "bold"), (" total", "dim")),
        T((_num(gone, wt.get("synced", 0)), "green"), (" synced", "dim")),
        T((_num(gone, wt.get("unsynced", 0)), "bold yellow" if wt.get("unsynced") else ""),
          (" unsynced", "dim")),
        T((_num(gone, wt.get("victim", 0)), "bold red" if wt.get("victim") else ""),
          (" victims", "dim")),
        T((_num(gone, wt.get("canceling", 0)), ""), (" canceling", "dim")),
        T(("pending events ", "dim"),
          (_num(gone, pend or 0), "bold yellow" if pend else "bold")),
    ]


def _lease_items(view: dict, gone: bool) -> list[Text]:
    ls = view.get("leases", {})
    soon = ls.get("expiring_soon", 0)
    return [
        T(("leases   ", "dim"), (_num(gone, ls.get("total", 0)), "bold"), (" total", "dim")),
        T((_num(gone, ls.get("bound", 0)), ""), (" bound", "dim")),
        T((_num(gone, soon), "bold yellow" if soon and not gone else ""),
          (" expiring soon (<5s)", "dim")),
        T((_num(gone, ls.get("expired", 0)), ""), (" expired", "dim")),
    ]


def _total_items(view: dict, gone: bool) -> list[Text]:
    return [
        T(("totals   ", "dim"), _num(gone, view.get("writes", 0)), (" writes", "dim")),
        T(_num(gone, view.get("events_delivered", 0)), (" events delivered", "dim")),
        T(_num(gone, view.get("victims_entered", 0)), (" victims entered", "dim")),
        T(_num(gone, view.get("catchups", 0)), (" catch-ups", "dim")),
        T(_num(gone, view.get("compactions", 0)), (" compactions", "dim")),
    ]
