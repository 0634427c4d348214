"""The lagging-watcher table of tools/top's screen: the watchers the broker lists as its
most lagging (or not synced), with their key or range, state, lag, ring fill and
pending events."""

from __future__ import annotations

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from .fmt import key_range

MAX_ONCE_ROWS = 10  # rows --once shows (the live view: what its height leaves)
STATE_STYLES = {"victim": "bold red", "unsynced": "yellow"}


def watcher_section(lagging: list[dict], shown: int) -> list[RenderableType]:
    """The title and the first `shown` rows of `lagging` (most lagging first); nothing
    when `shown` is 0."""
    if shown <= 0:
        return []
    t = Table(box=box.SIMPLE_HEAD, expand=True, pad_edge=False, show_edge=False,
              header_style="bold", padding=(0, 1))
    t.add_column("PID", justify="right", no_wrap=True)
    t.add_column("WATCH", justify="right", no_wrap=True)
    t.add_column("KEY / RANGE", ratio=1, no_wrap=True, overflow="ellipsis")
    t.add_column("STATE", no_wrap=True)
    t.add_column("LAG", justify="right", no_wrap=True)
    t.add_column("RING FILL", justify="right", no_wrap=True)
    t.add_column("PENDING", justify="right", no_wrap=True)
    for w in lagging[:shown]:
        st = w.get("state", "?")
        t.add_row(str(w.get("pid")), str(w.get("watch_id")),
                  key_range(w.get("key", ""), w.get("range_end")),
                  Text(st, style=STATE_STYLES.get(st, "")),
                  f"{w.get('lag', 0):,}", f"{100 * w.get('fill', 0):.0f}%",
                  f"{w.get('pending', 0):,}")
    title = Text.assemble((" LAGGING WATCHERS ", "bold"), (f"{len(lagging)}", "bold red"),
                          (f"   the {shown} most lagging" if shown < len(lagging) else "",
                           "dim"))
    return [title, t]
