"""The revision history: what the revision log keeps and what reading it back means.

Pure policy over the log's storage (`shm.revlog.RevLog`, handed in; an in-memory one
works as well). This module owns:
- appending a revision's record, and the rule that the log running out of room *is* a
  compaction: the oldest revision it still holds becomes the compaction point for reads
  and watches alike (etcd has one compaction point; so do we);
- a revision larger than the whole log, kept beside it until the next one evicts it;
- explicit compaction (`truncate`);
- reading history back as `LoggedEvent`s (no decoding of keys and values: a catch-up
  response is built by concatenating their encodings), with etcd's rule for what a
  watch still gets of the compaction revision itself (`at_compact_rev`);
- damage: the log lives in shared memory that any process of the same user can write.
  A record that fails its checks is contained here: everything up to it is dropped and
  `HistoryDamaged` tells the caller the compaction point that follows.

It never touches the MVCC store, clients or watchers, and reads no clock.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from shm.errors import LogRecordCorrupt
from shm.revlog import RevLog
from shmwatch.wire.errors import ProtocolError
from shmwatch.wire.events import LoggedEvent, at_compact_rev, read_log_record


class HistoryDamaged(Exception):
    """A record read back was damaged (someone wrote into the log's shared memory).
    The damage is already contained: history up to `rev` is gone, and `compact_to`
    (rev + 1) is the compaction point the caller must apply to the store and watches."""

    def __init__(self, rev: int, what: str):
        super().__init__(f"{what}: history up to revision {rev} is dropped")
        self.rev = rev
        self.compact_to = rev + 1
        self.what = what


class History:
    """The revision log's policy (module docstring). Costs: `append` O(len) plus O(1)
    per evicted record; `read` O(log n + bytes read)."""

    def __init__(self, log: RevLog):
        self.log = log
        self._oversized: tuple[int, bytes] | None = None  # a revision larger than the log

    def append(self, rev: int, record: bytes) -> int:
        """Keep revision `rev`'s record. Returns the new compaction point if keeping it
        evicted history (the oldest revision still held), else 0."""
        log = self.log
        if len(record) > log.max_payload:
            # Larger than the whole log: every older revision goes, and this one is kept
            # beside the log until the next revision evicts it.
            log.truncate_before(rev + 1)
            self._oversized = (rev, record)
            return rev
        evicted = log.append(rev, record)
        if evicted or self._oversized:
            self._oversized = None
            return log.oldest_rev or rev
        return 0

    def locate(self, lo: int, hi: int) -> int | None:
        """Where the shared log holds revisions lo..hi whole (the absolute position of
        the first record >= lo), for a watcher that catches up itself; None when it
        cannot: history before the log's oldest record, or a revision kept beside the
        log (larger than it). O(log n)."""
        log = self.log
        over = self._oversized
        if over is not None and lo <= over[0] <= hi:
            return None
        oldest = log.oldest_rev
        if not oldest or lo < oldest or log.newest_rev < hi:
            return None
        return log.position(lo)

    def truncate(self, rev: int) -> None:
        """Explicit compaction at `rev`: drop every revision before it."""
        self.log.truncate_before(rev)
        if self._oversized is not None and self._oversized[0] < rev:
            self._oversized = None

    def read(self, lo: int, hi: int, compact_rev: int) -> Iterator[tuple[int, list[LoggedEvent]]]:
        """(rev, events) of every kept revision lo <= rev <= hi, in order; the compaction
        revision as a watch still gets it. Raises `HistoryDamaged` (contained)."""
        for rev, record in self._records(lo, hi):
            try:
                events = read_log_record(record, rev)
            except ProtocolError:
                # A record with a valid checksum but not our encoding: written by others.
                raise self._damaged(rev, f"revision log: undecodable record for revision {rev}") from None
            yield rev, (at_compact_rev(events) if rev == compact_rev else events)

    def entries(self) -> list[list]:
        """[rev, record] of every kept revision (a snapshot's copy of the log).
        Raises `HistoryDamaged` (contained)."""
        lo = self.log.oldest_rev
        return [[rev, record] for rev, record in self._records(lo if lo else 1, None)]

    def restore(self, entries: list) -> None:
        """Append the `entries()` of a snapshot (at recovery, before anything else)."""
        for rev, record in entries:
            self.append(rev, record)

    def _records(self, lo: int, hi: int | None) -> Iterator[tuple[int, bytes]]:
        records = self.log.read_from(lo, hi)
        over = self._oversized
        if over is not None and lo <= over[0] and (hi is None or over[0] <= hi):
            records = itertools.chain([over], records)
        try:
            yield from records
        except LogRecordCorrupt as exc:
            raise self._damaged(exc.rev, str(exc)) from None

    def _damaged(self, rev: int, what: str) -> HistoryDamaged:
        """Contain damage at `rev`: drop it and everything before it."""
        self.truncate(rev + 1)
        return HistoryDamaged(rev, what)

    # ------------------------------------------------------------ figures

    def figures(self) -> dict:
        """used, capacity, count, oldest_rev, newest_rev (for metrics)."""
        log = self.log
        return {"used": log.used, "capacity": log.capacity, "count": log.count,
                "oldest_rev": log.oldest_rev, "newest_rev": log.newest_rev}
