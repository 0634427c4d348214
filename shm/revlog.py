"""The revision log ring: every revision's record, bounded by bytes.

The broker is its only writer. It reads it through `RevLog` (with an in-process index);
watchers catching up read it from shared memory in their own processes through
`RevLogReader` (no index: the broker hands them the position to start from), and tools
show its fill (`RevLog.peek`). Appending evicts the oldest records until the new one
fits; the oldest retained revision is the log's compaction point. Revisions increase
but may have gaps. Payloads are opaque bytes: this module knows nothing of keys, events
or msgpack.

Readers in other processes (a seqlock on the tail): the writer publishes the new `tail`
*before* it overwrites the bytes of evicted records, and publishes `head` only after a
new record is whole. A reader loads `head`, copies a record that starts at or after
the `tail` it loaded, then loads `tail` again: if the tail moved past the record, the
copy may be torn and the record is gone (`RecordEvicted`); else the copy is the record
(x86-64 keeps the writer's stores and the reader's loads in order: see shm/ring.py).
Each record's CRC is checked too: the log is shared memory anyone of the user can write.

Layout (native byte order)::

    header (REVLOG_HEADER = 64 bytes):
      0   u64 head        bytes ever appended (monotonic)
      8   u64 tail        start of the oldest retained record
      16  u64 oldest_rev  0 if empty
      24  u64 newest_rev  0 if empty
      32  u64 count       records retained
      40  u64 capacity    stamp, checked at attach
      48  u64 last_rev    highest revision ever appended (appends must exceed it)
      56  u64 zero
    data area (capacity bytes), position = counter % capacity:
      record = u64 rev | u32 length | u32 crc32(payload) | payload | pad to 8
      rev 0xFFFFFFFFFFFFFFFF: wrap marker, the rest of the data area is skipped

An in-process index (revisions and positions, oldest first) makes `get` O(log n) and
`read_from` O(log n + k) without scanning shared memory.
"""

from __future__ import annotations

import operator
import zlib
from bisect import bisect_left
from collections.abc import Iterator

from .errors import LogRecordCorrupt, RecordEvicted, RingCorrupt
from .ring import check_capacity

REVLOG_HEADER = 64
RECORD_HEADER = 16
WRAP_REV = 0xFFFFFFFFFFFFFFFF
MAX_REV = (1 << 63) - 1

_H_HEAD, _H_TAIL, _H_OLDEST, _H_NEWEST, _H_COUNT, _H_CAP, _H_LAST = range(7)
_crc32 = zlib.crc32


def revlog_bytes(capacity: int) -> int:
    """Bytes a revision log of `capacity` data bytes needs (header included).

    `capacity` must be a multiple of 8 and >= 64.
    """
    check_capacity(capacity, "revision log")
    return REVLOG_HEADER + capacity


class RevLog:
    """The revision log over `buf` (`revlog_bytes(capacity)` bytes or more).

    `init=True` makes an empty log. `init=False` attaches to an existing one and
    rebuilds the in-process index by walking the records (O(n); verifies each record,
    raising `RingCorrupt` on a bad one).
    """

    __slots__ = (
        "_base",
        "_buf",
        "_data",
        "_dq",
        "_first",
        "_head",
        "_hq",
        "_last",
        "_pos",
        "_revs",
        "_tail",
        "capacity",
        "max_payload",
    )

    def __init__(self, buf: memoryview, *, init: bool = False) -> None:
        buf = memoryview(buf)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        if buf.readonly:
            raise ValueError("revision log buffer must be writable")
        cap = (len(buf) - REVLOG_HEADER) // 8 * 8
        check_capacity(cap, "revision log")
        self.capacity: int = cap
        #: the largest payload that can ever be appended (its record fills the log)
        self.max_payload: int = cap - RECORD_HEADER
        self._buf = buf
        header = buf[:REVLOG_HEADER]
        self._hq = header.cast("Q")
        header.release()
        self._data = buf[REVLOG_HEADER:REVLOG_HEADER + cap]
        self._dq = self._data.cast("Q")
        # Index: _revs[i], _pos[i] (absolute start counter) for i >= _first are the
        # retained records, oldest first. Evicting advances _first; the dead prefix is
        # deleted now and then, and _base counts what was deleted, so `_base + i` is a
        # stable sequence number for iterators.
        self._revs: list[int] = []
        self._pos: list[int] = []
        self._first = 0     # index in _revs/_pos of the oldest retained record
        self._base = 0      # sequence number of _revs[0]
        if init:
            buf[:REVLOG_HEADER] = bytes(REVLOG_HEADER)
            self._hq[_H_CAP] = cap
            self._head = self._tail = self._last = 0
        else:
            self._attach()

    def _attach(self) -> None:
        hq = self._hq
        cap = self.capacity
        if hq[_H_CAP] not in (0, cap):
            raise RingCorrupt(f"revision log header says capacity {hq[_H_CAP]}, buffer gives {cap}")
        head, tail, last = hq[_H_HEAD], hq[_H_TAIL], hq[_H_LAST]
        if head & 7 or tail & 7 or not tail <= head <= tail + cap:
            raise RingCorrupt(f"revision log counters invalid: head={head} tail={tail}")
        self._head, self._tail, self._last = head, tail, last
        prev = 0
        for rev, t, _n in self._walk(tail, head):
            if rev <= prev or rev > last:
                raise RingCorrupt(f"revision log record at {t}: revision {rev} out of order")
            prev = rev
            self._revs.append(rev)
            self._pos.append(t)
        self._hq[_H_CAP] = cap
        self._sync_header()

    def _walk(self, t: int, end: int) -> Iterator[tuple[int, int, int]]:
        """Yield (rev, start, length) of every record in [t, end), verifying each."""
        cap = self.capacity
        dq = self._dq
        while t < end:
            pos = t % cap
            rev = dq[pos >> 3]
            if rev == WRAP_REV:
                if pos == 0:
                    raise RingCorrupt(f"revision log: wrap marker at the start (at {t})")
                t += cap - pos
                continue
            if cap - pos < RECORD_HEADER:
                raise RingCorrupt(f"revision log: record header at {t} crosses the end")
            v = dq[(pos >> 3) + 1]
            n = v & 0xFFFFFFFF
            rec = (n + RECORD_HEADER + 7) & -8
            if pos + rec > cap or t + rec > end or rev == 0 or rev > MAX_REV:
                raise RingCorrupt(f"revision log: bad record at {t} (rev {rev}, length {n})")
            if _crc32(self._data[pos + RECORD_HEADER:pos + RECORD_HEADER + n]) != v >> 32:
                raise RingCorrupt(f"revision log: CRC mismatch in revision {rev} at {t}")
            yield rev, t, n
            t += rec
        if t != end:
            raise RingCorrupt(f"revision log: records end at {t}, head is {end}")

    def release(self) -> None:
        """Release the memoryviews on the segment (before Segment.close)."""
        for view in (self._dq, self._data, self._hq, self._buf):
            view.release()

    # -- writing ----------------------------------------------------------------------

    # 61 lines: the append is one sequence of steps (check, evict until it fits, wrap,
    # write, publish the header) that reads best whole.
    def append(self, rev: int, payload: bytes) -> list[int]:
        """Append the record of revision `rev`, evicting the oldest records until it fits.

        `rev` must exceed every revision appended before (gaps allowed). Returns the
        evicted revisions, oldest first (usually none or one). A payload longer than
        `max_payload` raises ValueError. Cost: O(len) plus O(1) amortized per eviction.
        """
        rev = operator.index(rev)
        if type(payload) is not bytes:
            payload = memoryview(payload).cast("B")  # len() must count bytes
        if rev <= self._last or rev > MAX_REV:
            raise ValueError(
                f"revision {rev} must be greater than the last appended revision {self._last}"
            )
        n = len(payload)
        if n > self.max_payload:
            raise ValueError(
                f"revision {rev}: payload of {n} bytes can never fit a revision log of "
                f"{self.capacity} bytes (max {self.max_payload})"
            )
        cap = self.capacity
        rec = (n + RECORD_HEADER + 7) & -8
        h = self._head
        evicted: list[int] = []
        while True:
            pos = h % cap
            room = cap - pos
            if self._first == len(self._revs):
                # Empty: nothing to keep, so skip to the start of the data area rather
                # than leave a wrap marker (the tail always points at the oldest record).
                if rec > room:
                    h += room
                self._tail = h
                break
            need = rec if rec <= room else rec + room
            if h + need - self._tail <= cap:
                break
            evicted.append(self._evict_oldest())
        if evicted:
            # Readers in other processes must see the tail move before the bytes they
            # may be copying are overwritten (the seqlock of the module docstring).
            self._hq[_H_TAIL] = self._tail
        pos = h % cap
        if rec > cap - pos:
            self._dq[pos >> 3] = WRAP_REV
            h += cap - pos
            pos = 0
        i = pos >> 3
        dq = self._dq
        dq[i] = rev
        self._data[pos + RECORD_HEADER:pos + RECORD_HEADER + n] = payload
        dq[i + 1] = n | (_crc32(payload) << 32)
        self._revs.append(rev)
        self._pos.append(h)
        self._head = h + rec
        self._last = rev
        hq = self._hq
        hq[_H_LAST] = rev
        hq[_H_HEAD] = self._head
        hq[_H_NEWEST] = rev
        if evicted or hq[_H_OLDEST] == 0:
            self._sync_header()
        else:
            # From the index, never from the shared word (anyone may have written it).
            hq[_H_COUNT] = len(self._revs) - self._first
        return evicted

    def _evict_oldest(self) -> int:
        i = self._first
        rev = self._revs[i]
        i += 1
        self._first = i
        self._tail = self._pos[i] if i < len(self._pos) else self._head
        if i >= 1024 and i * 2 >= len(self._revs):
            del self._revs[:i]
            del self._pos[:i]
            self._base += i
            self._first = 0
        return rev

    def position(self, rev: int) -> int | None:
        """The absolute position of the first retained record with revision >= `rev`
        (where a `RevLogReader` starts), None if there is none. O(log n)."""
        i = bisect_left(self._revs, rev, self._first)
        return self._pos[i] if i < len(self._revs) else None

    def truncate_before(self, rev: int) -> list[int]:
        """Drop every record with revision < `rev` (explicit compaction); return the
        dropped revisions, oldest first. Cost: O(dropped) amortized."""
        dropped: list[int] = []
        revs = self._revs
        while self._first < len(revs) and revs[self._first] < rev:
            dropped.append(self._evict_oldest())
            revs = self._revs
        if dropped:
            self._sync_header()
        return dropped

    def _sync_header(self) -> None:
        hq = self._hq
        count = len(self._revs) - self._first
        hq[_H_TAIL] = self._tail
        hq[_H_HEAD] = self._head
        hq[_H_COUNT] = count
        hq[_H_OLDEST] = self._revs[self._first] if count else 0
        hq[_H_NEWEST] = self._revs[-1] if count else 0
        hq[_H_LAST] = self._last

    # -- reading ----------------------------------------------------------------------

    @property
    def oldest_rev(self) -> int:
        """Oldest retained revision (0 if empty): the log's compaction point."""
        return self._revs[self._first] if self._first < len(self._revs) else 0

    @property
    def newest_rev(self) -> int:
        """Newest retained revision (0 if empty)."""
        return self._revs[-1] if self._first < len(self._revs) else 0

    @property
    def last_rev(self) -> int:
        """Highest revision ever appended (kept when the log empties)."""
        return self._last

    @property
    def used(self) -> int:
        """Bytes held by retained records (wrap padding included)."""
        return self._head - self._tail

    @property
    def count(self) -> int:
        """Number of retained records."""
        return len(self._revs) - self._first

    def __len__(self) -> int:
        return len(self._revs) - self._first

    def _payload(self, i: int) -> bytes:
        """The payload of index entry `i`, checked against the index and its CRC
        (shared memory may have been written by anyone: `LogRecordCorrupt`)."""
        cap = self.capacity
        pos = self._pos[i] % cap
        v = self._dq[(pos >> 3) + 1]
        n = v & 0xFFFFFFFF
        rev = self._revs[i]
        nxt = self._pos[i + 1] if i + 1 < len(self._pos) else self._head
        if (pos + RECORD_HEADER + n > cap or self._dq[pos >> 3] != rev
                or self._pos[i] + RECORD_HEADER + n > nxt):
            raise LogRecordCorrupt(f"revision log: bad record for revision {rev}", rev)
        payload = self._data[pos + RECORD_HEADER:pos + RECORD_HEADER + n].tobytes()
        if _crc32(payload) != v >> 32:
            raise LogRecordCorrupt(f"revision log: CRC mismatch in revision {rev}", rev)
        return payload

    def get(self, rev: int) -> bytes | None:
        """The payload of exactly revision `rev` if retained, else None. O(log n)."""
        revs = self._revs
        i = bisect_left(revs, rev, self._first)
        if i < len(revs) and revs[i] == rev:
            return self._payload(i)
        return None

    def read_from(self, rev: int, upto: int | None = None) -> Iterator[tuple[int, bytes]]:
        """Iterate (rev, payload) over retained revisions `rev <= r <= upto` in order
        (`upto` None: the newest at the time of the call). O(log n + k).

        Appending while iterating is fine (new records past `upto` are not yielded);
        if records this iterator has yet to yield are evicted or truncated, the next
        step raises RuntimeError rather than skip them silently.
        """
        if upto is None:
            upto = self.newest_rev
        return self._iter_from(self._base + bisect_left(self._revs, rev, self._first), upto)

    def _iter_from(self, seq: int, upto: int) -> Iterator[tuple[int, bytes]]:
        while True:
            i = seq - self._base
            if i < self._first:
                raise RuntimeError(
                    "revision log: records were evicted during read_from iteration")
            revs = self._revs
            if i >= len(revs) or revs[i] > upto:
                return
            yield revs[i], self._payload(i)
            seq += 1

    @staticmethod
    def peek(buf: memoryview) -> dict[str, int]:
        """Header fields of a log in `buf`, for outside readers (tools): capacity, used,
        count, oldest_rev, newest_rev. Reads only the header; no index, no checks."""
        hq = memoryview(buf)[:REVLOG_HEADER].cast("Q")
        try:
            return {
                "capacity": hq[_H_CAP],
                "used": hq[_H_HEAD] - hq[_H_TAIL],
                "count": hq[_H_COUNT],
                "oldest_rev": hq[_H_OLDEST],
                "newest_rev": hq[_H_NEWEST],
            }
        finally:
            hq.release()

    # -- invariants -------------------------------------------------------------------

    def _check(self) -> None:
        """Assert every invariant and verify every record against the index. O(n)."""
        cap = self.capacity
        hq = self._hq
        head, tail = self._head, self._tail
        assert head % 8 == 0 and tail % 8 == 0, (head, tail)
        assert tail <= head <= tail + cap, (tail, head)
        assert 0 <= self._first <= len(self._revs) == len(self._pos)
        count = len(self._revs) - self._first
        assert hq[_H_HEAD] == head and hq[_H_TAIL] == tail, (hq[_H_HEAD], hq[_H_TAIL])
        assert hq[_H_COUNT] == count, (hq[_H_COUNT], count)
        assert hq[_H_OLDEST] == self.oldest_rev and hq[_H_NEWEST] == self.newest_rev
        assert hq[_H_LAST] == self._last and hq[_H_CAP] == cap
        assert self.newest_rev <= self._last
        records = list(self._walk(tail, head))
        assert len(records) == count, (len(records), count)
        prev = 0
        for j, (rev, t, _n) in enumerate(records):
            i = self._first + j
            assert rev == self._revs[i] and t == self._pos[i], (rev, t, i)
            assert rev > prev
            prev = rev
        if count:
            assert self._pos[self._first] == tail, (self._pos[self._first], tail)
        else:
            assert head == tail

    def __repr__(self) -> str:
        return (f"<RevLog capacity={self.capacity} used={self.used} count={self.count} "
                f"revs={self.oldest_rev}..{self.newest_rev}>")


class RevLogReader:
    """Reads a revision log from another process (module docstring: the tail seqlock).
    Never writes. Every value read from shared memory is checked: a bad one raises
    `LogRecordCorrupt`; a record evicted before or while it was copied raises
    `RecordEvicted` (the caller treats its history as compacted)."""

    __slots__ = ("_buf", "_data", "_dq", "_hq", "capacity")

    def __init__(self, buf: memoryview) -> None:
        buf = memoryview(buf)
        if buf.format != "B" or buf.ndim != 1:
            buf = buf.cast("B")
        cap = (len(buf) - REVLOG_HEADER) // 8 * 8
        check_capacity(cap, "revision log")
        self.capacity = cap
        self._buf = buf
        header = buf[:REVLOG_HEADER]
        self._hq = header.cast("Q")
        header.release()
        self._data = buf[REVLOG_HEADER:REVLOG_HEADER + cap]
        self._dq = self._data.cast("Q")
        if self._hq[_H_CAP] != cap:
            raise RingCorrupt(f"revision log header says capacity {self._hq[_H_CAP]}, "
                              f"the segment gives {cap}")

    def release(self) -> None:
        for view in (self._dq, self._data, self._hq, self._buf):
            view.release()

    def read(self, pos: int, lo: int, hi: int) -> Iterator[tuple[int, bytes]]:
        """(rev, payload) of the records from absolute position `pos` on, for revisions
        lo <= rev <= hi, in order: the first record must be at `pos` with a revision
        >= lo, and the log must hold every record up to the one of `hi` (else
        `LogRecordCorrupt`, or `RecordEvicted` if they went). O(bytes read)."""
        cap = self.capacity
        hq, dq = self._hq, self._dq
        t = pos
        prev = lo - 1
        head = hq[_H_HEAD]
        while True:
            if t >= head:
                head = hq[_H_HEAD]
                if t >= head:
                    raise LogRecordCorrupt(
                        f"revision log: no record of revision {hi} (read to {t})", prev + 1)
            if hq[_H_TAIL] > t:
                raise RecordEvicted(prev + 1)
            if t & 7 or head - t > cap:
                raise LogRecordCorrupt(f"revision log: position {t} is not in the log", lo)
            p = t % cap
            rev = dq[p >> 3]
            if rev == WRAP_REV:
                if p == 0 or hq[_H_TAIL] > t:
                    raise (RecordEvicted(prev + 1) if p else
                           LogRecordCorrupt("revision log: wrap marker at the start", lo))
                t += cap - p
                continue
            if cap - p < RECORD_HEADER:
                raise LogRecordCorrupt(f"revision log: record header at {t} crosses the end",
                                       lo)
            v = dq[(p >> 3) + 1]
            n = v & 0xFFFFFFFF
            rec = (n + RECORD_HEADER + 7) & -8
            ok = p + rec <= cap and t + rec <= head and prev < rev <= MAX_REV
            payload = self._data[p + RECORD_HEADER:p + RECORD_HEADER + n].tobytes() if ok else b""
            if hq[_H_TAIL] > t:  # moved while we copied: the copy may be torn
                raise RecordEvicted(prev + 1)
            if not ok or _crc32(payload) != v >> 32:
                raise LogRecordCorrupt(f"revision log: bad record at {t} (revision {rev}, "
                                       f"length {n})", max(prev + 1, lo))
            if rev > hi:
                if prev < hi:
                    raise LogRecordCorrupt(f"revision log: no record of revision {hi}", hi)
                return
            yield rev, payload
            prev = rev
            if rev == hi:
                return
            t += rec


__all__ = ["REVLOG_HEADER", "RecordEvicted", "RevLog", "RevLogReader", "revlog_bytes"]
