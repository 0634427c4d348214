"""How BENCHMARKS.md writes numbers, and the tables every throughput section shares.

Pure functions of the figures: a number as 21k / 1.48M / 60.8, a cell as the median with
(min–max) over repetitions, a ratio or a share, and the per-workload tables (figures by
transport and variant, shmwatch / peer ratios, where the CPU went, lost records).
"""

from __future__ import annotations

from ..results import Results, ratios, summary
from ..transports import LABELS, ORDER


def fmt_num(x, unit: str = "") -> str:
    """A figure for people: 21k, 1.48M, 60.8 (unit "us": whole microseconds from 100)."""
    if x is None:
        return "-"
    if unit == "us":
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.0f}k"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    if abs(x) >= 10:
        return f"{x:.0f}"
    return f"{x:.2f}"


def cell(xs, unit: str = "") -> str:
    """Median (min–max) over repetitions; the value alone if there was one; "-" if none."""
    s = summary(xs or [])
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return fmt_num(s["median"], unit)
    return (f"{fmt_num(s['median'], unit)} ({fmt_num(s['min'], unit)}–"
            f"{fmt_num(s['max'], unit)})")


def pct_cell(xs) -> str:
    """Shares as percentages: 103% (79–113)."""
    s = summary(xs)
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median'] * 100:.0f}%"
    return f"{s['median'] * 100:.0f}% ({s['min'] * 100:.0f}–{s['max'] * 100:.0f})"


def ratio_cell(xs) -> str:
    """Ratios: 0.26x (0.23–0.28)."""
    s = summary(xs)
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.2f}x"
    return f"{s['median']:.2f}x ({s['min']:.2f}–{s['max']:.2f})"


def row(label: str, cells: list[str]) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def table(R: Results, wl: str, variants: list[str], metric: str, unit: str = "") -> list[str]:
    """One metric: a row per transport, a column per variant."""
    lines = [row("transport", variants), "|---|" + "---|" * len(variants)]
    for tn in R.transports(wl, ORDER):
        lines.append(row(LABELS[tn], [cell(R.get(wl, v, tn, metric), unit) for v in variants]))
    return lines


def ratio_table(R: Results, wl: str, variants: list[str], metric: str) -> list[str]:
    """shmwatch / each peer, paired by repetition; nothing if no peer ran."""
    peers = [t for t in R.transports(wl, ORDER) if t != "shmwatch"]
    if not peers:
        return []
    lines = ["", "shmwatch / peer (median of per-repetition ratios, min–max):", "",
             row("peer", variants), "|---|" + "---|" * len(variants)]
    for tn in peers:
        lines.append(row(LABELS[tn], [
            ratio_cell(ratios(R.get(wl, v, "shmwatch", metric), R.get(wl, v, tn, metric)))
            for v in variants]))
    return lines


def cpu_table(R: Results, wl: str, variants: list[str], cores) -> list[str]:
    """Cores busy per role (median) and CPU us per delivered record, all processes."""
    lines = ["", "Where the CPU went (median over repetitions): cores used by the writer "
             "process(es) / the watcher process(es) / the process in between (shmwatch "
             "broker, redis-server, etcd; Queue and zmq have none), and CPU microseconds of "
             "all of them per delivered record. The machine has "
             f"{cores} cores.", "",
             row("transport", [f"{v}: cores W / R / S | {v}: CPU us/record" for v in variants]),
             "|---|" + "---|---|" * len(variants)]
    for tn in R.transports(wl, ORDER):
        cells = []
        for v in variants:
            m = [R.median(wl, v, tn, k) for k in ("cpu_writers", "cpu_readers", "cpu_server")]
            if m[0] is None:
                cells += ["-", "-"]
                continue
            cells.append(" / ".join("-" if x is None else f"{x:.2f}" for x in m))
            cells.append(fmt_num(R.median(wl, v, tn, "cpu_us_per_record"), "us"))
        lines.append(row(LABELS[tn], cells))
    return lines


def loss_lines(R: Results, wl: str, variants: list[str]) -> list[str]:
    """A line for each transport and variant that lost records in some repetition."""
    out = []
    for tn in R.transports(wl, ORDER):
        for v in variants:
            d = R.get(wl, v, tn, "delivered")
            if d and min(d) < 0.999:
                out.append(f"- {LABELS[tn]} ({v}) dropped records: it delivered "
                           f"{min(d) * 100:.1f}% of them in the worst repetition.")
    return ([""] + out) if out else []
