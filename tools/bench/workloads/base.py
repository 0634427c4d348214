"""What a workload is to the run: a name, when it runs, and `run(session)`.

A workload decides which trials to run (through `session.trial()`, or its own processes
for shmwatch-only measurements) and which figures to keep (`session.add()`); it prints
one progress line per trial. Its figures are read by its section in report/sections.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..session import Session


class Workload:
    name = "?"  # --only, and its key in the results and the --json document
    once = False  # True: runs once after the repetitions (not repeated, not interleaved)

    def run(self, s: Session) -> None:
        raise NotImplementedError
