"""The figures of a run, and the statistics over its repetitions.

`Results` is what every workload writes into (one value per repetition of each metric)
and what the report reads; `Run` is a whole run as the report and --json see it. The
helpers are pure: percentiles of samples, median and min-max over repetitions, ratios
paired by repetition, a rate from a count and two clock readings. Nothing here runs a
process or formats text.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from .profiles import Profile


def pctl(sorted_xs, q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (nan if it is empty)."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return float(sorted_xs[k])


def summary(xs: list) -> dict:
    """Median, min, max and count of the values that exist (None and nan are left out)."""
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def ratios(a: list, b: list) -> list:
    """Per-repetition ratios a[i]/b[i] (same repetition: same noise); pairs where either
    side is missing or zero are left out."""
    return [x / y for x, y in zip(a, b) if x and y]


def rate(count: int, start_ns: int, last_ns: int) -> float:
    """Records per second from the first send (start) to the last receipt (last)."""
    if count <= 0 or last_ns <= start_ns:
        return 0.0
    return count / ((last_ns - start_ns) / 1e9)


class Results:
    """results[workload][variant][transport][metric] = [value per repetition], in the
    order the figures were first recorded (the report's and the JSON's order)."""

    def __init__(self, data: dict | None = None):
        self.data: dict = {} if data is None else data

    def add(self, wl: str, variant: str, transport: str, figures: dict) -> None:
        """Append this repetition's value of each metric in `figures`."""
        ms = self.data.setdefault(wl, {}).setdefault(variant, {}).setdefault(transport, {})
        for metric, value in figures.items():
            ms.setdefault(metric, []).append(value)

    def get(self, wl: str, variant: str, transport: str, metric: str) -> list:
        """Every repetition's value ([] if never recorded)."""
        return self.data.get(wl, {}).get(variant, {}).get(transport, {}).get(metric, [])

    def median(self, wl: str, variant: str, transport: str, metric: str):
        return summary(self.get(wl, variant, transport, metric))["median"]

    def variants(self, wl: str) -> list[str]:
        return list(self.data.get(wl, {}))

    def transports(self, wl: str, order: tuple[str, ...]) -> list[str]:
        """The transports with figures in any variant of `wl`, in `order`."""
        seen: set[str] = set()
        for ts in self.data.get(wl, {}).values():
            seen |= set(ts)
        return [t for t in order if t in seen]

    def __contains__(self, wl: str) -> bool:
        return wl in self.data


@dataclass
class Run:
    """A finished run as the report sees it (built by the session, or read back from
    --json)."""

    profile: Profile
    machine: dict
    results: Results = field(default_factory=Results)
    skipped: dict[str, str] = field(default_factory=dict)  # peer -> why it did not run
    errors: list[str] = field(default_factory=list)  # failed trials, one line each first
    elapsed_s: float = 0.0
