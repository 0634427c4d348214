"""The client table of tools/top's screen: one row per client (pid, label, CPU, RSS,
watchers, bound leases held, requests/s, worst ring fill, lag, victims, state; victims
marked `!`) under a
title that names the sort column. Narrow terminals drop columns rather than wrap."""

from __future__ import annotations

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from .fmt import FILL_WARN, bar, fill_style, fmt_bytes, fmt_pct, fmt_rate, short_cmd

# Below NARROW_COLUMNS the fill bars and the victims column go (the `!` marker stays);
# below TINY_COLUMNS the RSS and requests/s columns too.
NARROW_COLUMNS = 110
TINY_COLUMNS = 90
FILL_BAR_CELLS = 6
STATE_STYLES = {"victim": "bold red", "lagging": "yellow"}


def client_label(c: dict) -> str:
    """What names a client row: the label it connected with (the broker publishes it:
    by default the multiprocessing process name, or the script and pid), else its
    command line, else its process name."""
    return c.get("label") or short_cmd(c.get("cmdline")) or c.get("name") or "?"


def client_section(clients: list[dict], *, sort: str, width: int, room: int | None,
                   broker_alive: bool) -> list[RenderableType]:
    """The title and the table of `clients` (in the order given), at most `room` rows
    (None: all); a line saying why there are none when there are none."""
    shown = clients if room is None else clients[:room]
    title = Text.assemble((" CLIENTS ", "bold"), (f"{len(clients)}", "bold cyan"),
                          ("   sorted by ", "dim"), (sort, "bold"))
    if len(clients) > len(shown):
        title.append(f"   (+{len(clients) - len(shown)} more: enlarge the terminal)",
                     style="yellow")
    if not clients:
        return [title, Text("  no clients connected" if broker_alive else
                            "  the broker has exited", style="dim")]
    narrow, tiny = width < NARROW_COLUMNS, width < TINY_COLUMNS
    t = _table(sort, narrow, tiny)
    for c in shown:
        t.add_row(*_row(c, narrow, tiny))
    return [title, t]


def _table(sort: str, narrow: bool, tiny: bool) -> Table:
    """The table's columns; the sort column's head marked (▲ pid: smallest first)."""
    t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, padding=(0, 1),
              header_style="bold", show_edge=False)

    def col(label: str, key: str, **kw) -> None:
        lab = label + ((" ▲" if key == "pid" else " ▼") if key == sort else "")
        t.add_column(lab, header_style="bold reverse" if key == sort else "bold", **kw)

    t.add_column("", width=1, no_wrap=True)
    col("PID", "pid", justify="right", no_wrap=True)
    t.add_column("CLIENT", ratio=1, no_wrap=True, overflow="ellipsis", min_width=12)
    col("CPU%", "cpu", justify="right", no_wrap=True)
    if not tiny:
        col("RSS", "rss", justify="right", no_wrap=True)
    col("WATCH", "watchers", justify="right", no_wrap=True)
    col("LEASES", "leases", justify="right", no_wrap=True)
    if not tiny:
        col("REQ/S", "req/s", justify="right", no_wrap=True)
    col("FILL" if narrow else "RING FILL", "fill", no_wrap=True, justify="right")
    col("LAG", "lag", justify="right", no_wrap=True)
    if not narrow:
        t.add_column("VICT", justify="right", no_wrap=True)
    t.add_column("STATE", no_wrap=True)
    return t


def _row(c: dict, narrow: bool, tiny: bool) -> list[RenderableType]:
    st = c["state"]
    fill = c.get("worst_fill", 0.0)
    marker = Text("!", style="bold white on red") if st == "victim" else Text(" ")
    if not c.get("alive"):
        state = Text("exited", style="dim")
        row_style = "dim"
    else:
        state = Text(st, style=STATE_STYLES.get(st, "green"))
        row_style = "red" if st == "victim" else ""
    pct = Text(f"{100 * fill:4.0f}%", style=fill_style(fill) if fill >= FILL_WARN else "")
    fillcell = pct if narrow else Text.assemble(bar(fill, FILL_BAR_CELLS, fill_style(fill)),
                                                " ", pct)
    cells: list[RenderableType] = [marker, str(c["pid"]),
                                   Text(client_label(c), style=row_style, no_wrap=True),
                                   fmt_pct(c.get("cpu_percent"))]
    if not tiny:
        cells.append(fmt_bytes(c.get("rss_bytes")))
    cells.append(f"{c.get('watchers', 0):,}")
    cells.append(Text(f"{len(c.get('leases') or ()):,}", style="" if c.get("leases") else "dim"))
    if not tiny:
        cells.append(fmt_rate(c.get("requests_per_s")))
    cells += [fillcell, Text(f"{c.get('max_lag', 0):,}",
                             style="bold red" if c.get("max_lag") else "")]
    if not narrow:
        cells.append(Text(str(c.get("victims", 0)), style="red" if c.get("victims") else "dim"))
    cells.append(state)
    return cells
