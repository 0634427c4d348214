"""tools/top's screen, put together from its sections (header.py, clients.py,
watchers.py): what fits a terminal's height, the screen while no broker is there, the
key help, and which of those the live view shows for its current state."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.layout import Layout
from rich.text import Text

from .clients import client_section
from .fmt import banner
from .header import header_lines, header_panel
from .state import LiveState, Monitor, lagging_watchers, sort_clients
from .watchers import MAX_ONCE_ROWS, watcher_section

PANEL_BORDER = 2  # lines: the header panel's top and bottom borders
SECTION_HEAD = 3  # lines: a table's title and its head (column names and rule)
PANEL_INSIDE = 4  # cells: the panel's borders and padding
MIN_INNER = 20  # cells inside the panel however narrow the terminal
BACK_BANNER_S = 5.0  # how long "broker ... is back" stays up after a restart


def render(view: dict, *, width: int, height: int | None = None, sort: str = "lag",
           history: tuple = ((), ()), status: Text | None = None,
           paused: bool = False) -> Group:
    """The screen for one view (without the key help). `height` (live view) bounds the
    tables; None (--once) shows every client. `history`: the writes/s and events/s
    sparkline values; `status`: an optional banner under the header."""
    lines = header_lines(view, history, max(MIN_INNER, width - PANEL_INSIDE))
    parts: list[RenderableType] = [header_panel(view, lines, alert=status is not None,
                                                paused=paused)]
    if status is not None:
        parts.append(status)
    clients = sort_clients(view.get("clients", []), sort)
    lagging = lagging_watchers(view)
    if height is None:
        room, shown = None, min(len(lagging), MAX_ONCE_ROWS)
    else:
        used = len(lines) + PANEL_BORDER
        if status is not None:
            used += -(-status.cell_len // max(1, width))  # the banner's lines
        room, shown = _fit(height - used, len(clients), len(lagging))
    parts += client_section(clients, sort=sort, width=width, room=room,
                            broker_alive=view.get("broker_state", "alive") == "alive")
    parts += watcher_section(lagging, shown)
    return Group(*parts)


def _fit(lines: int, clients: int, lagging: int) -> tuple[int, int]:
    """How many client rows and lagging-watcher rows fit in `lines` under the header:
    every client first (at least one row), the lagging watchers in what they leave."""
    room = lines - SECTION_HEAD
    shown = min(lagging, room - max(1, clients) - SECTION_HEAD)
    if shown > 0:
        room -= shown + SECTION_HEAD
    return max(1, room), max(0, shown)


def render_waiting(name: str, message: str, *, last: dict | None, width: int,
                   height: int, sort: str) -> RenderableType:
    """The screen while no broker is there: the message under a header of dashes (what
    the last broker published is no longer true; its pid stays, to say which exited)."""
    note = banner(message, "bold white on red")
    if last is None:
        return Group(Text.assemble(("shmwatch top", "bold"), " · broker ", (name, "bold cyan")),
                     Text(""), note)
    gone = {"name": last.get("name", name), "pid": last.get("pid"), "broker_state": "exited"}
    return render(gone, width=width, height=height, sort=sort, status=note)


def footer(sort: str, paused: bool, interval: float | None) -> Text:
    return Text.assemble(
        (" q ", "bold black on cyan"), (" quit  ", ""),
        (" s ", "bold black on cyan"), (f" sort: {sort}  ", ""),
        (" p ", "bold black on cyan"), (" resume  " if paused else " pause  ", ""),
        (f"   refresh {interval:g}s · reads the stats segment only" if interval else "",
         "dim"),
    )


def live_screen(body: RenderableType, foot: RenderableType) -> Layout:
    """The body above, the key help on the terminal's last line."""
    layout = Layout()
    layout.split_column(Layout(body, name="body"), Layout(foot, name="footer", size=1))
    return layout


def live_body(ls: LiveState, mon: Monitor, *, width: int, height: int,
              now: float) -> RenderableType:
    """What the live view shows above the key help: the broker, or why it is not there."""
    name, sort = ls.name, ls.sort
    if ls.gone_since is not None:
        left = max(0.0, ls.wait_broker - (now - ls.gone_since))
        if ls.ever_seen:
            pid = ls.last.get("pid") if ls.last else None
            msg = (f"broker {name} (pid {pid}) has exited{ls.gone_reason} · waiting "
                   f"{left:.0f}s for a broker named {name} to come back · q quits")
        else:
            msg = (f"broker {name} is not running · waiting {left:.0f}s for it to "
                   f"start · q quits")
        return render_waiting(name, msg, last=ls.last, width=width, height=height, sort=sort)
    if ls.last is None:
        return render_waiting(name, f"broker {name} is running but its stats are not "
                              f"readable yet ({ls.unavailable}) · q quits", last=None,
                              width=width, height=height, sort=sort)
    status = None
    if ls.unavailable:
        status = banner(f"could not read the stats this time ({ls.unavailable}); "
                        "showing the previous snapshot", "bold black on yellow")
    elif mon.restarts and now - mon.restarted_at < BACK_BANNER_S:
        status = banner(f"broker {name} is back (new pid {ls.last.get('pid')})",
                        "bold black on green")
    view, hist = ls.frozen if ls.paused and ls.frozen is not None else \
        (ls.last, mon.history())
    return render(view, width=width, height=height, sort=sort, history=hist, status=status,
                  paused=ls.paused)
