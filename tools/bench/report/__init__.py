"""The report of a run: BENCHMARKS.md (document, with one section per workload in
sections, the targets in targets, number formatting and shared tables in cells) and
the --json document. Pure functions of a `results.Run`.
"""

from __future__ import annotations

from .document import as_json, markdown, run_from_json
from .targets import compute as compute_targets

__all__ = ["as_json", "compute_targets", "markdown", "run_from_json"]
