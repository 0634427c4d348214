"""How tools/top writes a figure: sizes, durations, rates, percentages, sparklines, key
ranges and command lines as strings, and the small rich pieces the header and the tables
share (fill bars, banners, items packed into lines). Nothing here reads a broker or
decides a layout."""

from __future__ import annotations

import os
from collections.abc import Iterable

from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"
GONE = "—"  # a figure of a broker that has exited
# A ring this full is worth a look (yellow); this full, its watcher is about to become a
# victim (red).
FILL_WARN = 0.5
FILL_FULL = 0.9


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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


def sparkline(values: Iterable[float], width: int) -> str:
    """The last `width` values as unicode blocks, scaled to their maximum, right-aligned."""
    vals = list(values)[-width:] if width > 0 else []
    if not vals:
        return " " * max(0, width)
    hi = max(vals)
    top = len(BLOCKS) - 1
    out = []
    for v in vals:
        if hi <= 0 or v <= 0:
            out.append(BLOCKS[0])
        else:  # the lowest block is kept for "nothing": any activity shows at least one up
            out.append(BLOCKS[max(1, min(top, round(v / hi * top)))])
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


# ------------------------------------------------------------------ rich pieces


def fill_style(frac: float) -> str:
    return "red" if frac >= FILL_FULL else "yellow" if frac >= FILL_WARN else "green"


def bar(frac: float, width: int, style: str) -> Text:
    frac = min(1.0, max(0.0, frac))
    full = round(frac * width)
    return Text.assemble(("█" * full, style), ("░" * (width - full), "grey35"))


def banner(text: str, style: str) -> Text:
    return Text(f" {text} ", style=style)


def flow(items: list[Text], sep: str, width: int) -> list[Text]:
    """Pack Text items into as few lines of `width` cells as they fit, `sep` between."""
    lines: list[Text] = []
    cur = None
    for it in items:
        if cur is not None and cur.cell_len + len(sep) + it.cell_len <= width:
            cur.append(sep, style="dim")
            cur.append_text(it)
        else:
            cur = Text().append_text(it)
            lines.append(cur)
    return lines
