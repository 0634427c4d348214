"""A watcher's own catch-up: its history read from the broker's revision log in shared
memory, in this process, as etcd's catch-up would deliver it.

A watcher behind (started in the past, or a victim whose ring has room again) gets a
W_CATCHUP message from the broker instead of its history: revisions lo..hi are in the
log, from byte position `pos`, and the watcher is synced from hi + 1 (live events
follow in its ring). `catch_up` reads those records lazily, as the application takes
responses (memory: one response), and groups them exactly as the broker's catch-up
does (`broker.watch.WatchCore._gather`): the watcher's keys and filters, whole
revisions, at most `max_revs` revisions (etcd's watchBatchMaxRevs, 1,000) and
`max_bytes` of encoded events per response (both the broker's, in the message), header
revision `hi`, prev_kv only above the compaction revision, etcd's rule for the
compaction revision itself, and etcd's fragments for a watcher that asked for them. So
the broker does no per-event work for a watcher that catches up.

The log is shared memory the broker keeps writing: a record evicted before or while it
is read (`RecordEvicted`) means the history is gone, a compaction: what was read whole
is delivered, then etcd's compaction cancel (header revision 0, `compact_revision` the
broker's compaction point). A record that fails its checks (someone wrote into the log)
is treated the same way, and logged. Nothing is ever delivered that was not read whole
and checked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from shm import layout as L
from shm.errors import LogRecordCorrupt, RecordEvicted
from shm.revlog import RevLogReader
from shm.segment import Segment, shm_name
from shmwatch.wire.errors import ProtocolError
from shmwatch.wire.events import CatchUp, kept_at_compact_rev, read_log_events
from shmwatch.wire.protocol import FILTER_NODELETE, FILTER_NOPUT, NIL, WatchSpec
from shmwatch.wire.types import Event, WatchResponse

log = logging.getLogger("shmwatch.client")

# The broker moves its compaction point right after the eviction a reader saw; a reader
# that saw it waits at most this long for the word (then reports the revision after).
COMPACTION_WAIT_S = 1.0

def _matcher(spec: WatchSpec) -> Callable[[bytes], bool]:
    key, end = spec.key, spec.end
    if end is None:
        return key.__eq__
    if end == b"\0":
        return lambda k: k >= key
    return lambda k: key <= k < end


def catch_up(reader: RevLogReader, cu: CatchUp, spec: WatchSpec, watch_id: int,
             compacted: Callable[[int], int]) -> Iterator[WatchResponse]:
    """The responses of catch-up `cu` for a watch of `spec`; if its history goes (or is
    damaged) on the way, the responses read whole, then the compaction cancel, whose
    `compact_revision` is `compacted(rev)` for the first revision that could not be
    read. O(bytes read); holds at most one response."""
    match = _matcher(spec)
    drop = (FILTER_NOPUT if spec.filters & FILTER_NOPUT else 0,
            FILTER_NODELETE if spec.filters & FILTER_NODELETE else 0)
    acc: list[Event] = []
    sizes: list[int] = []
    size = revs = 0
    try:
        for rev, payload in reader.read(cu.pos, cu.lo, cu.hi):
            pairs = read_log_events(payload, rev)
            if rev == cu.compact_rev:
                pairs = [(pairs[i][0]._replace(prev=NIL), pairs[i][1]._replace(prev_kv=None))
                         for i in kept_at_compact_rev([lg for lg, _ in pairs])]
            with_prev = spec.prev_kv and rev - 1 >= cu.compact_rev
            chosen = [(lg, ev) for lg, ev in pairs if match(lg.key)
                      and not (drop[0] and lg.type == "PUT")
                      and not (drop[1] and lg.type == "DELETE")]
            if not chosen:
                continue
            enc = [len(lg.head) + (len(lg.prev) if with_prev else 1) for lg, _ in chosen]
            n = sum(enc)
            if acc and (size + n > cu.max_bytes or revs >= cu.max_revs):
                yield from _responses(watch_id, cu.hi, acc, sizes, spec.fragment,
                                      cu.fragment_limit)
                acc, sizes, size, revs = [], [], 0, 0
            acc.extend(ev if with_prev or ev.prev_kv is None else ev._replace(prev_kv=None)
                       for _, ev in chosen)
            sizes.extend(enc)
            size += n
            revs += 1
    except RecordEvicted as exc:
        yield from _responses(watch_id, cu.hi, acc, sizes, spec.fragment, cu.fragment_limit)
        yield WatchResponse(watch_id, 0, canceled=True, compact_revision=compacted(exc.rev))
        return
    except (LogRecordCorrupt, ProtocolError) as exc:
        rev = getattr(exc, "rev", cu.lo)
        log.error("watch %d: the revision log is damaged (%s): its history from revision "
                  "%d is treated as compacted", watch_id, exc, rev)
        yield from _responses(watch_id, cu.hi, acc, sizes, spec.fragment, cu.fragment_limit)
        yield WatchResponse(watch_id, 0, canceled=True, compact_revision=compacted(rev))
        return
    yield from _responses(watch_id, cu.hi, acc, sizes, spec.fragment, cu.fragment_limit)


def _responses(watch_id: int, rev: int, events: list[Event], sizes: list[int],
               fragment: bool, limit: int) -> Iterator[WatchResponse]:
    """One response, or etcd's fragments for a watcher that asked for them (as
    broker.batches.responses cuts them: whole events, each part under the limit)."""
    if not events:
        return
    if not fragment or len(events) < 2 or sum(sizes) < limit:
        yield WatchResponse(watch_id, rev, events)
        return
    parts, cur, size = [], [], 0
    for ev, n in zip(events, sizes):
        if cur and size + n >= limit:
            parts.append(cur)
            cur, size = [], 0
        cur.append(ev)
        size += n
    parts.append(cur)
    for i, part in enumerate(parts):
        yield WatchResponse(watch_id, rev, part, fragment=i < len(parts) - 1)


class LogAccess:
    """A client's read-only view of its broker's revision log, opened at the first
    catch-up it makes itself. `compacted(rev)` is the broker's compaction point past
    `rev` (it moves just after the eviction a reader saw: wait for it a moment)."""

    def __init__(self, name: str, words, boot_id: bytes):
        self._words = words
        self._seg = Segment.open(shm_name(name, L.log_part(words[L.CTL_LOG_TOKEN])),
                                 kind=L.KIND_LOG, boot_id=boot_id)
        try:
            self.reader = RevLogReader(self._seg.payload)
        except BaseException:
            self._seg.close()
            raise

    def catch_up(self, cu: CatchUp, spec: WatchSpec, watch_id: int) -> Iterator[WatchResponse]:
        return catch_up(self.reader, cu, spec, watch_id, self.compacted)

    def compacted(self, rev: int) -> int:
        deadline = time.monotonic() + COMPACTION_WAIT_S
        while True:
            c = self._words[L.CTL_COMPACT_REV]
            if c > rev or time.monotonic() > deadline:
                return max(c, rev + 1)
            time.sleep(0.001)

    def release(self) -> None:
        self.reader.release()
        self._seg.close()
