"""tools/top: a live monitor of a running shmwatch broker, like htop or `redis-cli --stat`.

    tools/top [--name NAME] [--interval 0.5] [--wait-broker 30]
    tools/top [--name NAME] --once [--json]
    tools/top --list [--json]

It reads the broker's shared-memory stats segment (`broker.admin.read_stats`: a seqlock
snapshot the broker publishes ~5 times a second) and its control segment's liveness lock
(`broker_info`); it never sends the broker a request, so watching costs the broker nothing.
Process figures (CPU %, RSS, command) come from psutil; a process is matched by pid *and*
create time, so a recycled pid is never mistaken for a client.

Shown: the broker's pid, uptime, CPU and RSS; revision and compact revision; the revision
log's fill and the revisions it holds; writes/s and events delivered/s (rates between two
published snapshots, on the broker's own clock) with their recent history as sparklines;
watchers by state and pending events; one row per client (pid, the client's label --
by default its multiprocessing process name, or its script and pid -- or, from a broker
that publishes no labels, its command line; CPU, RSS, watchers, requests/s, worst
watch-ring fill, lag in revisions, state), sorted by lag with victims marked; and the
most lagging watchers. Rows whose sort figures tie stay in pid order, so they do not
move between refreshes.

Keys: q quits, s cycles the sort column, p pauses (the screen freezes; sampling goes on,
so the rates and history stay whole). A broker that exits is reported, its figures
replaced by dashes; the monitor waits --wait-broker seconds for a broker of the same name
to come back (then shows it), else exits with 1.

--once prints one snapshot (rich when stdout is a terminal, plain text otherwise), with
rates and CPU measured over one --interval; --json prints it as JSON: the read_stats fields
plus uptime_s, cpu_percent, rss_bytes, writes_per_s, events_per_s, rate_interval_s (null
when not measurable) and, per client, the broker's fields (with `label` from a broker that
publishes it) plus name, cmdline, alive, cpu_percent, rss_bytes, requests_per_s and state
("victim" if it has victims, "lagging" if max_lag > 0, else "ok").

Exit status: 0 normally, 1 when the broker is not running or went away for good, 2 on a
usage error (e.g. several brokers are running and no --name was given).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import sys
import time
from collections import deque
from datetime import datetime

import psutil

from broker.admin import broker_info, list_brokers, read_stats

HISTORY = 240  # samples of rate history kept (2 minutes at the default interval)
STALE_AFTER_S = 3.0  # a live broker whose snapshot is older than this is flagged
BLOCKS = "▁▂▃▄▅▆▇█"
GONE = "—"  # a figure of a broker that has exited
# the client table's sort columns, cycled by "s": largest first (pid: smallest first)
SORTS = ("lag", "fill", "cpu", "rss", "watchers", "req/s", "pid")


class BrokerGone(Exception):
    """The broker is not running (never was, exited, or was killed)."""


class StatsUnavailable(Exception):
    """The broker is alive but its stats could not be read just now (not published yet,
    or never settled while it was rewriting them): try again at the next refresh."""


# =============================================================================== formatting


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def fmt_dur(s: float) -> str:
    s = int(max(0, s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d {h:02d}h {m:02d}m"
    if h:
        return f"{h}h {m:02d}m {s:02d}s"
    if m:
        return f"{m}m {s:02d}s"
    return f"{s}s"


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 1000:
        return f"{x:.1f}"
    if x < 1_000_000:
        return f"{x / 1e3:.1f}k"
    return f"{x / 1e6:.2f}M"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def sparkline(values, width: int) -> str:
    """The last `width` values as unicode blocks, scaled to their maximum, right-aligned."""
    vals = list(values)[-width:] if width > 0 else []
    if not vals:
        return " " * max(0, width)
    hi = max(vals)
    out = []
    for v in vals:
        if hi <= 0 or v <= 0:
            out.append(BLOCKS[0])
        else:
            out.append(BLOCKS[max(1, min(7, round(v / hi * 7)))])
    return " " * (width - len(out)) + "".join(out)


def short_cmd(cmdline: str | None) -> str | None:
    """A command line with its program's directory dropped: `python worker.py --x`."""
    if not cmdline:
        return cmdline
    prog, _, rest = cmdline.partition(" ")
    return (os.path.basename(prog) + (" " + rest if rest else "")) if "/" in prog else cmdline


def key_range(key: str, end: str | None) -> str:
    """A watcher's key as etcdctl would ask for it: a key, a prefix, from-key or a range."""
    if end is None:
        return key
    if end == "\0":
        return f"{key} (from key)"
    if key and end == key[:-1] + chr(ord(key[-1]) + 1):
        return f"{key} (prefix)"
    return f"[{key}, {end})"


def client_state(c: dict) -> str:
    if c.get("victims", 0) > 0:
        return "victim"
    if c.get("max_lag", 0) > 0:
        return "lagging"
    return "ok"


# =============================================================================== sampling


class Monitor:
    """Reads one broker's stats and adds what the broker does not publish: process
    figures (psutil), uptime, rates between snapshots and their history.

    `sample()` returns the enriched snapshot, or raises BrokerGone / StatsUnavailable. A broker with the same
    name but another pid / start time (a restart) resets rates and history."""

    def __init__(self, name: str):
        self.name = name
        self.identity: tuple | None = None
        self.restarts = 0
        self.restarted_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.prev: dict | None = None  # the previous distinct snapshot
        self.rates: tuple[float, float, float] | None = None  # writes/s, events/s, dt
        self.client_rates: dict[tuple, float] = {}
        self.hist_writes: deque[float] = deque(maxlen=HISTORY)
        self.hist_events: deque[float] = deque(maxlen=HISTORY)
        self._procs: dict[tuple, psutil.Process | None] = {}
        self._meta: dict[tuple, tuple[str | None, str | None]] = {}
        self._primed: set[tuple] = set()

    def history(self) -> tuple[list[float], list[float]]:
        """Copies of the writes/s and events/s histories, oldest first."""
        return list(self.hist_writes), list(self.hist_events)

    # ------------------------------------------------------------ reading

    def read_raw(self) -> dict:
        info = broker_info(self.name)
        if info.get("state") != "alive":
            raise BrokerGone(info.get("state", "gone"))
        try:
            return read_stats(self.name)
        except Exception as exc:  # segment vanished mid-read, unsettled, undecodable
            # the broker may have exited between the two reads: ask its lock again
            info = broker_info(self.name)
            if info.get("state") != "alive":
                raise BrokerGone(info.get("state", "gone")) from exc
            raise StatsUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def sample(self) -> dict:
        return self.enrich(self.read_raw())

    # ------------------------------------------------------------ processes

    def _proc_figures(self, pid: int, create_time_us: int | None) -> dict:
        """name, cmdline, alive, cpu_percent (None until measured over an interval), rss."""
        key = (pid, create_time_us)
        out = {"alive": False, "name": None, "cmdline": None, "cpu_percent": None,
               "rss_bytes": None}
        p = self._procs.get(key, False)
        if p is False:
            try:
                p = psutil.Process(pid)
                if create_time_us and abs(p.create_time() - create_time_us / 1e6) > 1.0:
                    p = None  # the pid was recycled: not our client
            except psutil.Error:
                p = None
            self._procs[key] = p
        if p is None:
            name, cmd = self._meta.get(key, (None, None))
            out.update(name=name, cmdline=cmd)
            return out
        try:
            with p.oneshot():
                if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                if key not in self._meta:
                    try:
                        cmd = " ".join(p.cmdline()) or None
                    except psutil.AccessDenied:
                        cmd = None
                    self._meta[key] = (p.name(), cmd)
                cpu = p.cpu_percent(None)
                rss = p.memory_info().rss
        except psutil.NoSuchProcess:  # gone (or a zombie) since the last refresh
            self._procs[key] = None
            name, cmd = self._meta.get(key, (None, None))
            out.update(name=name, cmdline=cmd)
            return out
        except psutil.AccessDenied:
            name, cmd = self._meta.get(key, (None, None))
            out.update(alive=True, name=name, cmdline=cmd)
            return out
        name, cmd = self._meta[key]
        out.update(alive=True, name=name, cmdline=cmd, rss_bytes=rss,
                   cpu_percent=round(cpu, 1) if key in self._primed else None)
        self._primed.add(key)
        return out

    # ------------------------------------------------------------ enrichment

    def enrich(self, stats: dict) -> dict:
        ident = (stats.get("pid"), stats.get("started"))
        if self.identity is not None and ident != self.identity:
            self.restarts += 1
            self.restarted_at = time.monotonic()
            self._reset()
        self.identity = ident
        now = time.time()
        prev = self.prev
        fresh = prev is None or stats.get("time", 0) > prev.get("time", 0)
        if prev is not None and fresh:
            dt = stats["time"] - prev["time"]
            w = max(0, stats["writes"] - prev["writes"]) / dt
            e = max(0, stats["events_delivered"] - prev["events_delivered"]) / dt
            self.rates = (w, e, dt)
            self.hist_writes.append(w)
            self.hist_events.append(e)
            before = {(c["slot"], c["pid"], c["create_time_us"]): c["requests"]
                      for c in prev.get("clients", ())}
            self.client_rates = {}
            for c in stats.get("clients", ()):
                k = (c["slot"], c["pid"], c["create_time_us"])
                if k in before:
                    self.client_rates[k] = max(0, c["requests"] - before[k]) / dt
        if fresh:
            self.prev = stats

        view = dict(stats)
        view["broker_state"] = "alive"
        view["uptime_s"] = round(max(0.0, now - stats.get("started", now)), 3)
        view["snapshot_age_s"] = round(max(0.0, now - stats.get("time", now)), 3)
        bp = self._proc_figures(stats.get("pid", 0), None)
        view["cpu_percent"] = bp["cpu_percent"]
        view["rss_bytes"] = bp["rss_bytes"]
        if self.rates is not None:
            view["writes_per_s"] = round(self.rates[0], 2)
            view["events_per_s"] = round(self.rates[1], 2)
            view["rate_interval_s"] = round(self.rates[2], 4)
        else:
            view["writes_per_s"] = view["events_per_s"] = view["rate_interval_s"] = None
        clients = []
        seen = {(stats.get("pid", 0), None)}
        for c in stats.get("clients", ()):
            row = dict(c)
            row.update(self._proc_figures(c["pid"], c.get("create_time_us")))
            seen.add((c["pid"], c.get("create_time_us")))
            k = (c["slot"], c["pid"], c["create_time_us"])
            rate = self.client_rates.get(k)
            row["requests_per_s"] = None if rate is None else round(rate, 2)
            row["state"] = client_state(c)
            clients.append(row)
        view["clients"] = clients
        for k in [k for k in self._procs if k not in seen]:  # forget departed processes
            self._procs.pop(k, None)
            self._meta.pop(k, None)
            self._primed.discard(k)
        return view


def _sample_retrying(mon: Monitor, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return mon.sample()
        except StatsUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def snapshot_once(name: str, interval: float) -> dict:
    """One enriched snapshot; with interval > 0, rates and CPU are measured over it (the
    second read waits for the broker to publish a newer snapshot, up to a second more)."""
    mon = Monitor(name)
    view = _sample_retrying(mon, 2.0)
    if interval <= 0:
        return view
    time.sleep(interval)
    deadline = time.monotonic() + 1.0
    while True:
        view = _sample_retrying(mon, 2.0)
        if view["writes_per_s"] is not None or time.monotonic() > deadline:
            return view
        time.sleep(0.05)


# =============================================================================== rendering


def _sort_key(col: str):
    def num(x):
        return -1.0 if x is None else float(x)

    return {
        "lag": lambda c: (c["max_lag"], c["victims"]),
        "fill": lambda c: c["worst_fill"],
        "cpu": lambda c: num(c.get("cpu_percent")),
        "rss": lambda c: num(c.get("rss_bytes")),
        "watchers": lambda c: c["watchers"],
        "req/s": lambda c: num(c.get("requests_per_s")),
        "pid": lambda c: -c["pid"],
    }[col]


def sort_clients(clients: list[dict], col: str) -> list[dict]:
    """Largest first by `col` (pid: smallest first). Ties keep pid, then slot, order,
    whatever order the broker listed them in: rows whose figures tie stay in place from
    one refresh to the next (sorted() is stable, also with reverse=True)."""
    by_identity = sorted(clients, key=lambda c: (c["pid"], c["slot"]))
    return sorted(by_identity, key=_sort_key(col), reverse=True)


def sort_watchers(rows: list[dict]) -> list[dict]:
    """The lagging watchers, most lagging first; ties in pid and watch id order (the
    broker also orders by ring fill, which moves at every snapshot)."""
    by_identity = sorted(rows, key=lambda w: (w.get("pid", 0), w.get("watch_id", 0)))
    return sorted(by_identity, key=lambda w: w.get("lag", 0), reverse=True)


def client_label(c: dict) -> str:
    """What names a client row: the label it connected with (the broker publishes it:
    by default the multiprocessing process name, or the script and pid), else its
    command line, else its process name."""
    return c.get("label") or short_cmd(c.get("cmdline")) or c.get("name") or "?"


def _bar(frac: float, width: int, style: str):
    from rich.text import Text

    frac = min(1.0, max(0.0, frac))
    full = round(frac * width)
    return Text.assemble(("█" * full, style), ("░" * (width - full), "grey35"))


def _fill_style(frac: float) -> str:
    return "red" if frac >= 0.9 else "yellow" if frac >= 0.5 else "green"


def flow(items: list, sep: str, width: int) -> list:
    """Pack Text items into as few lines of `width` cells as they fit, `sep` between."""
    from rich.text import Text

    lines: list = []
    cur = None
    for it in items:
        if cur is not None and cur.cell_len + len(sep) + it.cell_len <= width:
            cur.append(sep, style="dim")
            cur.append_text(it)
        else:
            cur = Text().append_text(it)
            lines.append(cur)
    return lines


def _header_lines(view: dict, history: tuple, inner: int) -> list:
    """The header's figures. For a broker that has exited (`broker_state` other than
    "alive") every figure is a dash: what it last published is no longer true."""
    from rich.text import Text

    T = Text.assemble
    gone = view.get("broker_state", "alive") != "alive"

    def num(x, fmt: str = "{:,}") -> str:
        return GONE if gone or x is None else fmt.format(x)

    lg = {} if gone else view.get("log", {})
    cap = lg.get("capacity") or 1
    used = lg.get("used", 0)
    held = (f"{lg.get('oldest_rev', 0):,}..{lg.get('newest_rev', 0):,} "
            f"({lg.get('count', 0):,} revs)" if lg.get("count") else
            GONE if gone else "no revisions")
    log = (T(("log ", "dim"), GONE) if gone else
           T(("log ", "dim"), _bar(used / cap, 12, _fill_style(used / cap)),
             f" {fmt_bytes(used)} / {fmt_bytes(lg.get('capacity'))} ({100 * used / cap:.0f}%)"))
    wt = view.get("watchers", {})
    pend = view.get("pending_events")
    lines = flow([
        T(("pid ", "dim"), (str(view.get("pid", "?")), "bold"),
          (" exited", "bold red") if gone else ""),
        T(("up ", "dim"), (GONE if gone else fmt_dur(view.get("uptime_s", 0)), "bold")),
        T(("cpu ", "dim"), (GONE if gone else f"{fmt_pct(view.get('cpu_percent'))}%", "bold")),
        T(("rss ", "dim"), (GONE if gone else fmt_bytes(view.get("rss_bytes")), "bold")),
        T(("clients ", "dim"), (num(len(view.get("clients", ()))), "bold")),
    ], "   ", inner)
    lines += flow([
        T(("revision ", "dim"), (num(view.get("revision", 0)), "bold cyan")),
        T(("compact ", "dim"), (num(view.get("compact_revision", 0)), "bold")),
        log,
        T(("holds ", "dim"), held),
    ], "   ", inner)
    spark_w = max(8, inner - 34)
    for label, key, values, style in (("writes/s", "writes_per_s", history[0], "cyan"),
                                      ("events/s", "events_per_s", history[1], "magenta")):
        rate = GONE if gone else fmt_rate(view.get(key))
        ln = T((f"{label:9}", "dim"), (f"{rate:>8}", "bold " + style))
        if values and not gone:  # the live view: the recent history, newest on the right
            ln.append_text(T("  ", (sparkline(values, spark_w), style),
                             ("  max ", "dim"), (f"{fmt_rate(max(values)):>7}", "")))
        elif key == "writes_per_s" and view.get("rate_interval_s") and not gone:
            ln.append(f"   (over {view['rate_interval_s']:.2f}s)", style="dim")
        lines.append(ln)
    lines += flow([
        T(("watchers ", "dim"), (num(wt.get("total", 0)), "bold"), (" total", "dim")),
        T((num(wt.get("synced", 0)), "green"), (" synced", "dim")),
        T((num(wt.get("unsynced", 0)), "bold yellow" if wt.get("unsynced") else ""),
          (" unsynced", "dim")),
        T((num(wt.get("victim", 0)), "bold red" if wt.get("victim") else ""),
          (" victims", "dim")),
        T((num(wt.get("canceling", 0)), ""), (" canceling", "dim")),
        T(("pending events ", "dim"), (num(pend or 0), "bold yellow" if pend else "bold")),
    ], " · ", inner)
    lines += flow([
        T(("totals   ", "dim"), num(view.get("writes", 0)), (" writes", "dim")),
        T(num(view.get("events_delivered", 0)), (" events delivered", "dim")),
        T(num(view.get("victims_entered", 0)), (" victims entered", "dim")),
        T(num(view.get("catchups", 0)), (" catch-ups", "dim")),
        T(num(view.get("compactions", 0)), (" compactions", "dim")),
    ], " · ", inner)
    return lines


def render(view: dict, *, width: int, height: int | None = None, sort: str = "lag",
           history: tuple = ((), ()), status=None, paused: bool = False):
    """The screen for one enriched snapshot (without the key help). `height` (live view)
    bounds the tables; None (--once) shows every client. `history`: the writes/s and
    events/s sparkline values; `status`: an optional banner under the header."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    parts = []
    inner = max(20, width - 4)  # inside the panel's borders and padding

    # ---------------------------------------------------------------- header
    lines = _header_lines(view, history, inner)
    for ln in lines:
        ln.no_wrap = True
        ln.overflow = "ellipsis"
    title = Text.assemble(("shmwatch top", "bold"), " · broker ",
                          (str(view.get("name", "?")), "bold cyan"))
    if paused:
        title.append("  PAUSED", style="bold black on yellow")
    sub = datetime.fromtimestamp(view.get("time") or time.time()).strftime("%H:%M:%S")
    age = view.get("snapshot_age_s") or 0
    if age > STALE_AFTER_S:
        sub = f"[bold yellow]stats {age:.0f}s old: broker busy or stuck?[/]  {sub}"
    parts.append(Panel(Group(*lines), title=title, title_align="left", subtitle=sub,
                       subtitle_align="right", box=box.ROUNDED, padding=(0, 1),
                       border_style="red" if status is not None else "blue"))
    if status is not None:
        parts.append(status)

    # ---------------------------------------------------------------- clients
    clients = sort_clients(view.get("clients", []), sort)
    top = sort_watchers([w for w in view.get("top_watchers", []) if w.get("lag", 0) > 0
                         or w.get("state") not in ("synced", None)])
    room = None  # client rows that fit
    show_top = min(len(top), 10)  # lagging-watcher rows shown
    if height is not None:
        # panel (lines + 2 borders), banner, "CLIENTS" title, table head (2 lines)
        banner = 0 if status is None else -(-status.cell_len // max(1, width))
        room = height - (len(lines) + 2) - banner - 1 - 2
        # the lagging watchers (title + head 2 lines + rows) only in what clients leave
        show_top = min(len(top), room - max(1, len(clients)) - 3)
        if show_top > 0:
            room -= show_top + 3
        room = max(1, room)
        show_top = max(0, show_top)

    t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, padding=(0, 1),
              header_style="bold", show_edge=False)

    def col(label, key, **kw):
        lab = label + ((" ▲" if key == "pid" else " ▼") if key == sort else "")
        t.add_column(lab, header_style="bold reverse" if key == sort else "bold", **kw)

    t.add_column("", width=1, no_wrap=True)
    col("PID", "pid", justify="right", no_wrap=True)
    narrow = width < 110  # drop the fill bars and the victims column (the marker stays)
    tiny = width < 90  # and the RSS and requests/s columns
    t.add_column("CLIENT", ratio=1, no_wrap=True, overflow="ellipsis", min_width=12)
    col("CPU%", "cpu", justify="right", no_wrap=True)
    if not tiny:
        col("RSS", "rss", justify="right", no_wrap=True)
    col("WATCH", "watchers", justify="right", no_wrap=True)
    if not tiny:
        col("REQ/S", "req/s", justify="right", no_wrap=True)
    col("FILL" if narrow else "RING FILL", "fill", no_wrap=True, justify="right")
    col("LAG", "lag", justify="right", no_wrap=True)
    if not narrow:
        t.add_column("VICT", justify="right", no_wrap=True)
    t.add_column("STATE", no_wrap=True)
    shown = clients if room is None else clients[:room]
    for c in shown:
        st = c["state"]
        fill = c.get("worst_fill", 0.0)
        marker = Text("!", style="bold white on red") if st == "victim" else Text(" ")
        if not c.get("alive"):
            state = Text("exited", style="dim")
            row_style = "dim"
        else:
            state = Text(st, style={"victim": "bold red", "lagging": "yellow"}.get(st, "green"))
            row_style = "red" if st == "victim" else ""
        cmd = client_label(c)
        pct = Text(f"{100 * fill:4.0f}%", style=_fill_style(fill) if fill >= 0.5 else "")
        fillcell = pct if narrow else Text.assemble(_bar(fill, 6, _fill_style(fill)), " ", pct)
        cells = [marker, str(c["pid"]), Text(cmd, style=row_style or "", no_wrap=True),
                 fmt_pct(c.get("cpu_percent"))]
        if not tiny:
            cells.append(fmt_bytes(c.get("rss_bytes")))
        cells.append(f"{c.get('watchers', 0):,}")
        if not tiny:
            cells.append(fmt_rate(c.get("requests_per_s")))
        cells += [fillcell, Text(f"{c.get('max_lag', 0):,}",
                                 style="bold red" if c.get("max_lag") else "")]
        if not narrow:
            cells.append(Text(str(c.get("victims", 0)),
                              style="red" if c.get("victims") else "dim"))
        t.add_row(*cells, state)
    more = len(clients) - len(shown)
    ctitle = Text.assemble((" CLIENTS ", "bold"), (f"{len(clients)}", "bold cyan"),
                           ("   sorted by ", "dim"), (sort, "bold"))
    if more > 0:
        ctitle.append(f"   (+{more} more: enlarge the terminal)", style="yellow")
    parts.append(ctitle)
    if clients:
        parts.append(t)
    else:
        parts.append(Text("  no clients connected" if view.get("broker_state", "alive") ==
                          "alive" else "  the broker has exited", style="dim"))

    # ---------------------------------------------------------------- lagging watchers
    if show_top:
        wt_ = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False,
                    header_style="bold", padding=(0, 1))
        wt_.add_column("PID", justify="right", no_wrap=True)
        wt_.add_column("WATCH", justify="right", no_wrap=True)
        wt_.add_column("KEY / RANGE", ratio=1, no_wrap=True, overflow="ellipsis")
        wt_.add_column("STATE", no_wrap=True)
        wt_.add_column("LAG", justify="right", no_wrap=True)
        wt_.add_column("RING FILL", justify="right", no_wrap=True)
        wt_.add_column("PENDING", justify="right", no_wrap=True)
        for w in top[:show_top]:
            key = w.get("key", "")
            end = w.get("range_end")
            rng = key_range(key, end)
            st = w.get("state", "?")
            wt_.add_row(str(w.get("pid")), str(w.get("watch_id")), rng,
                        Text(st, style={"victim": "bold red", "unsynced": "yellow"}.get(st, "")),
                        f"{w.get('lag', 0):,}", f"{100 * w.get('fill', 0):.0f}%",
                        f"{w.get('pending', 0):,}")
        parts.append(Text.assemble((" LAGGING WATCHERS ", "bold"),
                                   (f"{len(top)}", "bold red"),
                                   (f"   the {show_top} most lagging" if show_top < len(top)
                                    else "", "dim")))
        parts.append(wt_)

    return Group(*parts)


def _footer(sort: str, paused: bool, interval: float | None):
    from rich.text import Text

    return Text.assemble(
        (" q ", "bold black on cyan"), (" quit  ", ""),
        (" s ", "bold black on cyan"), (f" sort: {sort}  ", ""),
        (" p ", "bold black on cyan"), (" resume  " if paused else " pause  ", ""),
        (f"   refresh {interval:g}s · reads the stats segment only" if interval else "",
         "dim"),
    )


def _banner(text: str, style: str):
    from rich.text import Text

    return Text(f" {text} ", style=style)


def render_waiting(name: str, message: str, *, last: dict | None, width: int,
                   height: int, sort: str):
    """The screen while no broker is there: the message under a header of dashes (what
    the last broker published is no longer true; its pid stays, to say which exited)."""
    from rich.console import Group
    from rich.text import Text

    banner = _banner(message, "bold white on red")
    if last is None:
        return Group(Text.assemble(("shmwatch top", "bold"), " · broker ",
                                   (name, "bold cyan")), Text(""), banner)
    gone = {"name": last.get("name", name), "pid": last.get("pid"), "broker_state": "exited"}
    return render(gone, width=width, height=height, sort=sort, status=banner)


def live_screen(body, foot):
    """The body above, the key help on the terminal's last line."""
    from rich.layout import Layout

    layout = Layout()
    layout.split_column(Layout(body, name="body"), Layout(foot, name="footer", size=1))
    return layout


# =============================================================================== live view


class _Keys:
    """stdin in cbreak mode (restored on exit) plus a self-pipe woken by SIGWINCH."""

    def __init__(self):
        self.fd = None
        self._saved = None
        self._old_winch = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def __enter__(self):
        import termios
        import tty

        try:
            fd = sys.stdin.fileno()
            if os.isatty(fd):
                self._saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
                self.fd = fd
        except (OSError, ValueError, termios.error):
            self.fd = None

        def on_winch(*_):
            with contextlib.suppress(OSError):
                os.write(self.wake_w, b"w")

        with contextlib.suppress(ValueError):  # not the main thread: no resize wake-up
            self._old_winch = signal.signal(signal.SIGWINCH, on_winch)
        return self

    def __exit__(self, *exc) -> None:
        import termios

        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def wait(self, timeout: float | None) -> tuple[str, bool]:
        """Keys typed (possibly "") and whether the terminal was resized, waiting at most
        `timeout` seconds for either."""
        fds = [self.wake_r] + ([self.fd] if self.fd is not None else [])
        r, _, _ = select.select(fds, [], [], timeout)
        keys, resized = "", False
        if self.wake_r in r:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_r, 4096)
            resized = True
        if self.fd is not None and self.fd in r:
            data = os.read(self.fd, 1024)
            if not data:  # stdin closed: no more keys
                self.fd = None
            keys = data.decode(errors="ignore")
        return keys, resized


def run_live(name: str, interval: float, wait_broker: float) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    mon = Monitor(name)
    sort_i = 0
    paused = False
    frozen: dict | None = None
    last: dict | None = None
    gone_since: float | None = None
    gone_reason = ""
    unavailable: str | None = None
    ever_seen = False
    exit_msg = None
    rc = 0
    next_tick = 0.0

    with _Keys() as keys, Live(console=console, screen=True, auto_refresh=False,
                               redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + interval
                try:
                    last = mon.sample()
                    ever_seen = True
                    gone_since = unavailable = None
                except StatsUnavailable as exc:  # alive, but no settled snapshot just now
                    gone_since = None
                    unavailable = str(exc)
                except BrokerGone as exc:
                    unavailable = None
                    if gone_since is None:
                        gone_since = now
                        gone_reason = (" (killed? it left its segments: `shmwatch cleanup`)"
                                       if exc.args and exc.args[0] == "stale" else "")
                    if now - gone_since >= wait_broker:
                        if ever_seen:
                            exit_msg = (f"shmwatch top: broker {name!r} exited and no broker "
                                        f"of that name came back within {wait_broker:g}s")
                        else:
                            exit_msg = (f"shmwatch top: broker {name!r} is not running "
                                        f"(waited {wait_broker:g}s)")
                        rc = 1
                        break
            sort = SORTS[sort_i]
            w, h = console.size
            if gone_since is not None:
                left = max(0.0, wait_broker - (time.monotonic() - gone_since))
                pid = last.get("pid") if last else None
                if ever_seen:
                    msg = (f"broker {name} (pid {pid}) has exited{gone_reason} · waiting "
                           f"{left:.0f}s for a broker named {name} to come back · q quits")
                else:
                    msg = (f"broker {name} is not running · waiting {left:.0f}s for it to "
                           f"start · q quits")
                body = render_waiting(name, msg, last=last, width=w, height=h - 1, sort=sort)
            elif last is None:
                body = render_waiting(name, f"broker {name} is running but its stats are not "
                                      f"readable yet ({unavailable}) · q quits", last=None,
                                      width=w, height=h - 1, sort=sort)
            else:
                status = None
                if unavailable:
                    status = _banner(f"could not read the stats this time ({unavailable}); "
                                     "showing the previous snapshot", "bold black on yellow")
                elif mon.restarts and time.monotonic() - mon.restarted_at < 5:
                    status = _banner(f"broker {name} is back (new pid {last.get('pid')})",
                                     "bold black on green")
                view, hist = frozen if paused and frozen is not None else (last, mon.history())
                body = render(view, width=w, height=h - 1, sort=sort, history=hist,
                              status=status, paused=paused)
            live.update(live_screen(body, _footer(sort, paused, interval)), refresh=True)
            typed, _resized = keys.wait(max(0.0, next_tick - time.monotonic()))
            quit_ = False
            for ch in typed:
                if ch in "qQ":
                    quit_ = True
                elif ch in "sS":
                    sort_i = (sort_i + 1) % len(SORTS)
                elif ch in "pP ":
                    paused = not paused
                    frozen = (last, mon.history()) if paused and last else None
            if quit_:
                break
    if exit_msg:
        print(exit_msg, file=sys.stderr)
    return rc


# =============================================================================== CLI


def _alive_brokers() -> list[dict]:
    return [b for b in list_brokers() if b.get("state") == "alive"]


def _print_brokers(rows: list[dict], file=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    file = file or sys.stdout
    console = Console(file=file, width=None if file.isatty() else 100)
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


def _choose(name: str | None) -> tuple[str | None, int]:
    if name:
        return name, 0
    alive = _alive_brokers()
    if len(alive) == 1:
        return alive[0]["name"], 0
    if not alive:
        print("shmwatch top: no broker is running (start one with `shmwatch serve --name "
              "NAME`)", file=sys.stderr)
        return None, 1
    print("shmwatch top: several brokers are running; pick one with --name:",
          file=sys.stderr)
    _print_brokers(alive, file=sys.stderr)
    return None, 2


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if a.list:
            rows = list_brokers()
            if a.json:
                print(json.dumps(rows, indent=2))
            else:
                _print_brokers(rows)
            return 0
        name, rc = _choose(a.name)
        if name is None:
            return rc
        if a.once or a.json:
            try:
                view = snapshot_once(name, a.interval)
            except StatsUnavailable as exc:
                print(f"shmwatch top: could not read the stats of broker {name!r}: {exc}",
                      file=sys.stderr)
                return 1
            except BrokerGone:
                print(f"shmwatch top: broker {name!r} is not running", file=sys.stderr)
                alive = _alive_brokers()
                if alive:
                    print("running: " + ", ".join(b["name"] for b in alive), file=sys.stderr)
                return 1
            if a.json:
                print(json.dumps(view, indent=2))
            else:
                from rich.console import Console

                tty = sys.stdout.isatty()
                console = Console(width=None if tty or os.environ.get("COLUMNS") else 120)
                console.print(render(view, width=console.width, sort="lag"))
            return 0
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


if __name__ == "__main__":
    sys.exit(main())
