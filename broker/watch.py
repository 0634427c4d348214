"""The watch core: who watches what, and what each watcher gets next. Pure logic.

This module owns the watcher life cycle of etcd's watchableStore, and nothing else
changes a watcher's state. It does no I/O of its own: it writes encoded responses to
the `Sink` each watcher was created with (a shared-memory ring in the broker, an
in-memory fake in tests), reads history through a callable it is handed, and never
reads a clock (timers are the shell's business).

Life cycle (etcd's names; `TRANSITIONS` below is the whole table):

    created (start_revision 0 or in the future) -> SYNCED
    created (start_revision in the past)        -> UNSYNCED
    SYNCED   --ring cannot take a revision-->      VICTIM   (minRev = that revision)
    VICTIM   --ring has room again-->              UNSYNCED (or SYNCED if nothing happened since)
    UNSYNCED --caught up from the log-->           SYNCED
    UNSYNCED --more history remains-->             UNSYNCED (etcd's moreRev)
    UNSYNCED --ring too full for a catch-up-->     VICTIM
    UNSYNCED --minRev below the compaction-->      CANCELING (compact_revision response)
    any      --cancel-->                           CANCELING
    CANCELING --final response delivered-->        (removed)

Where etcd's victim keeps the batch its channel refused, ours keeps nothing: the
revision log already holds that batch, so a victim just remembers the revision it
missed (minRev) and catches up from the log once its ring has room again. The only
bytes ever held for a watcher are the rest of a response its ring took in part (a
response larger than the ring's free space streams through in chunks), bounded per
client by `owner_budget`. So the backlog of a slow reader lives in the log, never in
the broker's or the client's memory, and comes back in etcd-sized catch-up responses
(up to 1,000 revisions each).

"Room again" is `VICTIM_RESUME_FREE` of the ring free: the hysteresis that turns a
slow reader's backlog into a few large catch-up responses instead of many one-revision
ones. The consumer signals it (`producer_blocked` + the shell's space hint) once it
has drained that far; the shell also retries victims on a timer.

Guarantees kept here: per watcher, responses are in revision order, without gaps or
duplicates, and the events of one revision are never split across responses (unless
the watcher asked for etcd's `fragment`). A victim costs nothing per write: it is not in
the synced group and holds at most the unwritten rest of one response.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

from sortedcontainers import SortedList

from shm.errors import RingCorrupt

from shmwatch.wire.protocol import (
    FILTER_NODELETE,
    FILTER_NOPUT,
    RESUME_FREE_FRACTION,
    W_CANCELED,
    W_CREATED,
    W_PROGRESS,
    W_PROGRESS_NOTIFY,
    encode_event,
    encode_watch_control,
    events_blob,
)
from shmwatch.wire.types import Event

SYNCED = "synced"
UNSYNCED = "unsynced"
VICTIM = "victim"
CANCELING = "canceling"
REMOVED = "removed"

TRANSITIONS: dict[tuple[str, str], str] = {
    (SYNCED, "ring_full"): VICTIM,
    (SYNCED, "cancel"): CANCELING,
    (VICTIM, "room_behind"): UNSYNCED,
    (VICTIM, "room_current"): SYNCED,
    (VICTIM, "cancel"): CANCELING,
    (UNSYNCED, "caught_up"): SYNCED,
    (UNSYNCED, "more"): UNSYNCED,
    (UNSYNCED, "ring_full"): VICTIM,
    (UNSYNCED, "compacted"): CANCELING,
    (UNSYNCED, "cancel"): CANCELING,
    (CANCELING, "cancel"): CANCELING,
    (CANCELING, "delivered"): REMOVED,
}

# etcd's tunables, as module values so tests can shrink them.
MAX_WATCHERS_PER_SYNC = 512  # etcd: maxWatchersPerSync
WATCH_BATCH_MAX_REVS = 1000  # etcd: watchBatchMaxRevs
GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd v3rpc: grpcOverheadBytes
# Bytes of a catch-up response beyond its events' encodings (header, array framing).
RESPONSE_OVERHEAD = 32
# A victim resumes (and an unsynced watcher is caught up) only when at least this
# fraction of its ring is free. Shared with clientlib, whose reader raises the space
# hint at the same point (protocol.RESUME_FREE_FRACTION).
VICTIM_RESUME_FREE = RESUME_FREE_FRACTION


class Sink(Protocol):
    """Where a watcher's responses go: an SPSC ring's producer side.

    `write` writes a message of at most `max_chunk` bytes whole or not at all, and
    streams a longer one in chunks as room allows (see shm.ring.Ring.write)."""

    producer_blocked: int
    capacity: int
    max_chunk: int

    def write(self, payload: bytes, offset: int = 0) -> int: ...

    def publish(self) -> None: ...

    def free(self) -> int: ...


class Watcher:
    """One watch: its range, options, position (`min_rev`) and state."""

    __slots__ = (
        "id", "owner", "key", "end", "min_rev", "prev_kv", "filters", "progress_notify",
        "fragment", "sink", "state", "outbox", "sent_since_tick", "progress_pending", "tag",
    )

    def __init__(self, wid: int, owner, key: bytes, end: bytes | None, sink: Sink, *,
                 prev_kv: bool = False, filters: int = 0, progress_notify: bool = False,
                 fragment: bool = False):
        self.id = wid
        self.owner = owner
        self.key = key
        self.end = end  # None: one key; b"\0": every key >= key; else [key, end)
        self.sink = sink
        self.prev_kv = prev_kv
        self.filters = filters
        self.progress_notify = progress_notify
        self.fragment = fragment
        self.min_rev = 0
        self.state = UNSYNCED
        self.outbox: deque[list] = deque()  # [payload, offset] not yet fully written
        self.sent_since_tick = False
        self.progress_pending = 0  # a progress response is owed once synced
        self.tag = None  # the shell's own data (which ring this is)

    @property
    def interval(self) -> tuple[bytes, bytes | None]:
        """[lo, hi) with hi None for unbounded (from-key)."""
        return self.key, (None if self.end == b"\0" else self.end)

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        if self.end == b"\0":
            return key >= self.key
        return self.key <= key < self.end

    def __repr__(self) -> str:
        return f"<Watcher {self.id} {self.key!r}..{self.end!r} {self.state} min_rev={self.min_rev}>"


class IntervalIndex:
    """Stabbing queries over half-open byte intervals [lo, hi); hi None means unbounded.

    Built on elementary segments: the sorted distinct boundaries cut the key space, and
    each segment keeps the set of intervals covering it. Identical intervals share one
    entry (fan-out to many watchers of one prefix costs one interval).

    Runtime complexity: stab O(log B) returning the covering set (B = boundaries);
    add/remove O(log B + S) where S = segments the interval spans.
    """

    def __init__(self):
        self._bounds = SortedList()
        self._cover: dict[bytes, set] = {}
        self._refs: dict[bytes, int] = {}
        self.members: dict[tuple, set] = {}

    def _acquire(self, b: bytes) -> None:
        if b in self._refs:
            self._refs[b] += 1
            return
        i = self._bounds.bisect_right(b)
        self._cover[b] = set(self._cover[self._bounds[i - 1]]) if i else set()
        self._bounds.add(b)
        self._refs[b] = 1

    def _release(self, b: bytes) -> None:
        self._refs[b] -= 1
        if self._refs[b] == 0:
            del self._refs[b]
            del self._cover[b]
            self._bounds.remove(b)

    def _span(self, lo: bytes, hi: bytes | None):
        if hi is None:
            return self._bounds.irange(minimum=lo)
        return self._bounds.irange(lo, hi, inclusive=(True, False))

    def add(self, interval: tuple, item) -> None:
        group = self.members.get(interval)
        if group is not None:
            group.add(item)
            return
        self.members[interval] = {item}
        lo, hi = interval
        self._acquire(lo)
        if hi is not None:
            self._acquire(hi)
        for b in self._span(lo, hi):
            self._cover[b].add(interval)

    def remove(self, interval: tuple, item) -> None:
        group = self.members[interval]
        group.discard(item)
        if group:
            return
        del self.members[interval]
        lo, hi = interval
        for b in self._span(lo, hi):
            self._cover[b].discard(interval)
        self._release(lo)
        if hi is not None:
            self._release(hi)

    def stab(self, key: bytes) -> set:
        """The intervals containing `key`. O(log B). Do not mutate the result."""
        i = self._bounds.bisect_right(key)
        if not i:
            return _EMPTY
        return self._cover[self._bounds[i - 1]]

    def _check(self) -> None:
        assert set(self._bounds) == set(self._cover) == set(self._refs)
        refs: dict[bytes, int] = {}
        for lo, hi in self.members:
            refs[lo] = refs.get(lo, 0) + 1
            if hi is not None:
                refs[hi] = refs.get(hi, 0) + 1
        assert refs == self._refs, (refs, self._refs)
        for b in self._bounds:
            want = {iv for iv in self.members if iv[0] <= b and (iv[1] is None or b < iv[1])}
            assert self._cover[b] == want, (b, self._cover[b], want)
        for group in self.members.values():
            assert group


_EMPTY: frozenset = frozenset()


class WatcherGroup:
    """etcd's watcherGroup: a dict for single-key watchers plus an interval index.

    Runtime complexity: add/remove O(log B + S); match O(log B + M) for M matches.
    """

    def __init__(self):
        self.keys: dict[bytes, set[Watcher]] = {}
        self.ranges = IntervalIndex()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def add(self, w: Watcher) -> None:
        if w.end is None:
            self.keys.setdefault(w.key, set()).add(w)
        else:
            self.ranges.add(w.interval, w)
        self._n += 1

    def remove(self, w: Watcher) -> None:
        if w.end is None:
            s = self.keys[w.key]
            s.remove(w)
            if not s:
                del self.keys[w.key]
        else:
            self.ranges.remove(w.interval, w)
        self._n -= 1

    def match(self, key: bytes) -> list[Watcher]:
        """Every watcher interested in `key`, as a fresh list (callers may mutate the group)."""
        s = self.keys.get(key)
        out = list(s) if s else []
        ivs = self.ranges.stab(key)
        if ivs:
            members = self.ranges.members
            for iv in ivs:
                out.extend(members[iv])
        return out

    def __iter__(self):
        for s in self.keys.values():
            yield from s
        for s in self.ranges.members.values():
            yield from s

    def _check(self) -> None:
        self.ranges._check()
        assert self._n == sum(len(s) for s in self.keys.values()) + sum(
            len(s) for s in self.ranges.members.values())
        for k, s in self.keys.items():
            assert s and all(w.key == k and w.end is None for w in s)


class RevisionBatch:
    """The events of one revision, each encoded at most twice (with and without prev_kv)
    however many watchers receive it; whole responses are cached per selection."""

    __slots__ = ("rev", "events", "_enc", "_blobs")

    def __init__(self, rev: int, events: list[Event], encoded: list[bytes] | None = None):
        self.rev = rev
        self.events = events
        self._enc: dict[tuple[int, bool], bytes] = {}
        self._blobs: dict[tuple, bytes] = {}
        if encoded is not None:  # the with-prev_kv encodings the shell already made
            for i, e in enumerate(encoded):
                self._enc[(i, True)] = e
                if events[i].prev_kv is None:
                    self._enc[(i, False)] = e

    def encoded(self, i: int, with_prev: bool) -> bytes:
        k = (i, with_prev)
        e = self._enc.get(k)
        if e is None:
            e = self._enc[k] = encode_event(self.events[i], with_prev)
        return e

    def blob(self, idxs: tuple[int, ...], with_prev: bool) -> bytes:
        k = (idxs, with_prev)
        b = self._blobs.get(k)
        if b is None:
            b = self._blobs[k] = events_blob(self.rev, [self.encoded(i, with_prev) for i in idxs])
        return b


def split_fragments(rev: int, encoded: list[bytes], limit: int) -> list[bytes]:
    """etcd's sendFragments: cut a response larger than `limit` into responses of whole
    events, each under the limit (at least one event each), all but the last marked
    `fragment`. A response under the limit, or of one event, is not split."""
    if len(encoded) < 2 or sum(len(e) for e in encoded) < limit:
        return [events_blob(rev, encoded)]
    out, cur, size = [], [], 0
    for e in encoded:
        if cur and size + len(e) >= limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += len(e)
    out.append(cur)
    return [events_blob(rev, part, fragment=i < len(out) - 1) for i, part in enumerate(out)]


HistoryReader = Callable[[int, int], Iterable[tuple[int, list[Event]]]]


class WatchCore:
    """etcd's watchableStore without the store: synced / unsynced / victims.

    The shell calls `notify` after every write revision, `sync_watchers` and
    `move_victims` when they have work, and hands in the compaction point. Delivered
    responses are published to each sink at once; `woken` collects the owners to wake
    (the shell rings their doorbells once per batch and clears it).

    `owner_budget` bounds the bytes held for one owner (client) across its watchers:
    the unwritten rest of responses its rings took in part. A response that would need
    to be held while the owner is over budget is not started (the watcher waits as a
    victim, nothing held), so an owner that never reads costs at most its budget plus
    one response.
    """

    def __init__(self, *, max_request_bytes: int = 1536 * 1024,
                 max_response_bytes: int = 1 << 20,
                 max_watchers_per_sync: int | None = None,
                 batch_max_revs: int | None = None,
                 owner_budget: int = 64 << 20):
        self.synced = WatcherGroup()
        self.unsynced: dict[Watcher, None] = {}  # insertion order = sync fairness
        self.victims: dict[Watcher, None] = {}
        self.canceling: dict[Watcher, None] = {}
        self.cur_rev = 1
        self.compact_rev = 0
        self.max_request_bytes = max_request_bytes
        # etcd's watch server fragments above --max-request-bytes plus gRPC's overhead
        # allowance (v3rpc: maxRequestBytes + grpcOverheadBytes), not at the limit itself.
        self.fragment_limit = max_request_bytes + GRPC_OVERHEAD_BYTES
        self.max_response_bytes = max_response_bytes
        self.max_watchers_per_sync = max_watchers_per_sync or MAX_WATCHERS_PER_SYNC
        self.batch_max_revs = batch_max_revs or WATCH_BATCH_MAX_REVS
        self.owner_budget = owner_budget
        self.held: dict[object, int] = {}  # owner -> bytes waiting in its watchers' outboxes
        self.woken: set = set()
        self.faulted: set = set()  # owners whose ring raised on write: to disconnect
        self.removed: list[Watcher] = []  # finished watchers whose bookkeeping may go
        # Counters for metrics.
        self.events_delivered = 0
        self.victims_entered = 0
        self.catchups = 0
        self.compactions = 0

    # ------------------------------------------------------------ state changes

    def _move(self, w: Watcher, event: str) -> None:
        new = TRANSITIONS.get((w.state, event))
        if new is None:
            raise AssertionError(f"watcher {w.id}: no transition from {w.state} on {event}")
        old = w.state
        if old == new:
            return
        if old == SYNCED:
            self.synced.remove(w)
        elif old == UNSYNCED:
            del self.unsynced[w]
        elif old == VICTIM:
            del self.victims[w]
        elif old == CANCELING:
            del self.canceling[w]
        w.state = new
        if new == SYNCED:
            self.synced.add(w)
        elif new == UNSYNCED:
            self.unsynced[w] = None
        elif new == VICTIM:
            self.victims[w] = None
            self.victims_entered += 1
        elif new == CANCELING:
            self.canceling[w] = None
        elif new == REMOVED:
            self.removed.append(w)

    # ------------------------------------------------------------ writing

    def _hold(self, w: Watcher, payload: bytes, off: int) -> None:
        """Keep `payload[off:]` for `w` until its ring has room (counted to its owner)."""
        w.outbox.append([payload, off])
        self.held[w.owner] = self.held.get(w.owner, 0) + len(payload) - off

    def _unhold(self, w: Watcher, n: int) -> None:
        left = self.held[w.owner] - n
        if left:
            self.held[w.owner] = left
        else:
            del self.held[w.owner]

    def _write(self, w: Watcher, payload: bytes) -> bool:
        """Write a control response (created, canceled, progress): written now if nothing
        is pending and it fits, else kept in order behind what is pending (these are a
        few dozen bytes and never dropped). True when it went out whole. O(len)."""
        if w.outbox:
            self._hold(w, payload, 0)
            return False
        sink = w.sink
        try:
            off = sink.write(payload, 0)
        except RingCorrupt:  # the consumer corrupted its ring: the shell drops its owner
            self.faulted.add(w.owner)
            return False
        if off:
            sink.publish()
            self.woken.add(w.owner)
        if off == len(payload):
            return True
        self._hold(w, payload, off)
        sink.producer_blocked = 1
        return False

    def _deliver(self, w: Watcher, blobs) -> bool | None:
        """Write the responses of one revision (or one catch-up) to `w`, whose outbox is
        empty. True: all went out. None: nothing went out and nothing is kept (its ring
        is full, or its owner is over budget): the caller leaves `w` at that revision.
        False: part went out and the rest waits in `w.outbox`. O(bytes)."""
        sink = w.sink
        wrote = False
        for i, blob in enumerate(blobs):
            n = len(blob)
            if (not wrote and n > sink.max_chunk
                    and self.held.get(w.owner, 0) + n > self.owner_budget
                    and self.held.get(w.owner, 0)):
                # Could only go out in part, and holding the rest would put the owner
                # over its budget: wait for room instead (the log keeps the events).
                sink.producer_blocked = 1
                return None
            try:
                off = sink.write(blob, 0)
            except RingCorrupt:
                self.faulted.add(w.owner)
                return None
            if off == n:
                wrote = True
                continue
            if off == 0 and not wrote:
                sink.producer_blocked = 1
                return None
            self._hold(w, blob, off)
            for rest in blobs[i + 1:]:
                self._hold(w, rest, 0)
            sink.producer_blocked = 1
            wrote = True
            break
        sink.publish()
        self.woken.add(w.owner)
        return not w.outbox

    def _flush(self, w: Watcher) -> bool:
        """Write what `w` has pending; True when nothing is left."""
        sink = w.sink
        box = w.outbox
        wrote = False
        while box:
            item = box[0]
            try:
                off = sink.write(item[0], item[1])
            except RingCorrupt:  # see _write
                self.faulted.add(w.owner)
                return False
            if off != item[1]:
                wrote = True
                self._unhold(w, off - item[1])
            if off < len(item[0]):
                item[1] = off
                break
            box.popleft()
        if wrote:
            sink.publish()
            self.woken.add(w.owner)
        if box:
            sink.producer_blocked = 1
            return False
        return True

    def _has_room(self, w: Watcher) -> bool:
        """Whether `w`'s ring is free enough to be worth a catch-up response."""
        sink = w.sink
        return sink.free() >= sink.capacity * VICTIM_RESUME_FREE

    # ------------------------------------------------------------ watch / cancel

    def add_watcher(self, w: Watcher, start_rev: int) -> None:
        """Create a watch: its `created` response first, then history or live events.

        O(log W) for the group insert."""
        self._write(w, encode_watch_control(W_CREATED, self.cur_rev))
        if start_rev == 0 or start_rev > self.cur_rev:
            w.min_rev = max(start_rev, self.cur_rev + 1)
            w.state = SYNCED
            self.synced.add(w)
        else:
            w.min_rev = start_rev
            w.state = UNSYNCED
            self.unsynced[w] = None

    def cancel(self, w: Watcher, *, reason: str = "", compact_rev: int = 0,
               header_rev: int | None = None) -> None:
        """Cancel a watch: its final `canceled` response follows whatever it has pending."""
        if w.state in (CANCELING, REMOVED):
            return
        self._move(w, "cancel")
        rev = self.cur_rev if header_rev is None else header_rev
        self._write(w, encode_watch_control(W_CANCELED, rev, compact_rev, reason))
        if not w.outbox:
            self._move(w, "delivered")

    def drop(self, w: Watcher) -> None:
        """Forget a watcher at once, sending nothing (its owner is gone)."""
        if w.state == SYNCED:
            self.synced.remove(w)
        elif w.state == UNSYNCED:
            self.unsynced.pop(w, None)
        elif w.state == VICTIM:
            self.victims.pop(w, None)
        elif w.state == CANCELING:
            self.canceling.pop(w, None)
        w.state = REMOVED
        if w.outbox:
            self._unhold(w, sum(len(p) - off for p, off in w.outbox))
            w.outbox.clear()

    # ------------------------------------------------------------ live events

    def notify(self, rev: int, events: list[Event], encoded: list[bytes] | None = None) -> None:
        """Deliver one revision's events to the synced watchers they match.

        `encoded`, if given, holds each event's encoding with its prev_kv (the shell made
        them for the log). Runtime: O(E·log B + M·len) for E events and M matching
        watchers; each event is encoded at most twice and each distinct response built
        once."""
        self.cur_rev = rev
        if not self.synced._n:
            return
        batch = RevisionBatch(rev, events, encoded)
        if len(events) == 1:
            ev = events[0]
            ws = self.synced.match(ev.kv.key)
            if not ws:
                return
            bit = FILTER_NOPUT if ev.type == "PUT" else FILTER_NODELETE
            for w in ws:
                if not w.filters & bit and w.min_rev <= rev:
                    self._send_live(w, batch, (0,))
            return
        per: dict[Watcher, list[int]] = {}
        for i, ev in enumerate(events):
            bit = FILTER_NOPUT if ev.type == "PUT" else FILTER_NODELETE
            for w in self.synced.match(ev.kv.key):
                if not w.filters & bit and w.min_rev <= rev:
                    idxs = per.get(w)
                    if idxs is None:
                        per[w] = [i]
                    elif idxs[-1] != i:
                        idxs.append(i)
        for w, idxs in per.items():
            self._send_live(w, batch, tuple(idxs))

    def _send_live(self, w: Watcher, batch: RevisionBatch, idxs: tuple[int, ...]) -> None:
        if w.fragment and len(idxs) > 1:
            enc = [batch.encoded(i, w.prev_kv) for i in idxs]
            blobs = split_fragments(batch.rev, enc, self.fragment_limit)
        else:
            blobs = (batch.blob(idxs, w.prev_kv),)
        done = self._deliver(w, blobs)
        if done is not None:
            w.sent_since_tick = True
            self.events_delivered += len(idxs)
            if done:
                return
        # Not taken whole: a victim. If nothing of this revision went out, the watcher
        # still owes it (the log has it); else the rest waits in its outbox.
        w.min_rev = batch.rev if done is None else batch.rev + 1
        self._move(w, "ring_full")

    # ------------------------------------------------------------ victims

    def move_victims(self) -> int:
        """etcd's syncVictimsLoop step: every victim whose ring has room again (what it
        had pending written, and `VICTIM_RESUME_FREE` of the ring free) moves on to
        catch up from the log (or straight to synced if nothing happened meanwhile).

        O(V) plus the bytes written. Returns how many victims were released."""
        released = 0
        for w in list(self.victims):
            if w.outbox:
                if not self._flush(w):
                    continue
            if not self._has_room(w):
                w.sink.producer_blocked = 1
                continue
            released += 1
            if w.min_rev <= self.cur_rev:
                self._move(w, "room_behind")
            else:
                self._move(w, "room_current")
                self._owe_progress(w)
        for w in list(self.canceling):
            if self._flush(w):
                self._move(w, "delivered")
        return released

    # ------------------------------------------------------------ catch-up

    def sync_watchers(self, read_history: HistoryReader) -> int:
        """Catch up to `max_watchers_per_sync` unsynced watchers from the history.

        `read_history(lo, hi)` yields (rev, events) for lo <= rev <= hi. The history is
        read once for the chosen watchers, from the smallest minRev; each watcher gets
        its matching events of whole revisions in one response of at most
        `batch_max_revs` revisions and `max_response_bytes` (etcd's moreRev: the
        watcher stays unsynced for the rest); a response larger than the ring's free
        space streams through, its unwritten rest held against the owner's budget.
        While the owner already has bytes held, a response is cut to what the ring has
        free instead (at least one revision), so at most one catch-up per owner is ever
        held and its other watches keep moving. A
        watcher whose ring is less than `VICTIM_RESUME_FREE` free waits as a victim;
        one whose minRev fell below the compaction point is cancelled with
        `compact_revision` (etcd: header revision 0). Returns how many watchers
        became synced.
        O(H·log B + bytes) for H events read.
        """
        if not self.unsynced:
            return 0
        chosen: list[Watcher] = []
        for w in self.unsynced:
            if len(chosen) >= self.max_watchers_per_sync:
                break
            chosen.append(w)
        group = WatcherGroup()
        limit: dict[Watcher, int] = {}
        lo = None
        for w in chosen:
            if w.min_rev < self.compact_rev:
                self.compactions += 1
                self._move(w, "compacted")
                self._write(w, encode_watch_control(W_CANCELED, 0, self.compact_rev))
                if not w.outbox:
                    self._move(w, "delivered")
                continue
            if w.min_rev > self.cur_rev:
                self._move(w, "caught_up")
                self._owe_progress(w)
                continue
            if not self._has_room(w) or self.held.get(w.owner, 0) >= self.owner_budget:
                # Wait as a victim: for room in its ring, or for its owner's held bytes
                # to drain (nothing is built for it meanwhile).
                w.sink.producer_blocked = 1
                self._move(w, "ring_full")
                continue
            # etcd-sized (up to batch_max_revs revisions and max_response_bytes), or,
            # while its owner already has bytes held, no more than its ring has free:
            # then it is written whole and nothing more is held for that owner, so a
            # client's unread watches never starve the ones it reads.
            limit[w] = (self.max_response_bytes if not self.held.get(w.owner)
                        else w.sink.free() - RESPONSE_OVERHEAD)
            group.add(w)
            lo = w.min_rev if lo is None else min(lo, w.min_rev)
        if lo is None:
            return 0
        hi = self.cur_rev
        acc: dict[Watcher, list] = {w: [] for w in group}  # encoded events
        size: dict[Watcher, int] = dict.fromkeys(acc, 0)
        revs: dict[Watcher, int] = dict.fromkeys(acc, 0)
        more: dict[Watcher, int] = {}  # watcher -> first revision not included
        for rev, events in read_history(lo, hi):
            batch = RevisionBatch(rev, events)
            per: dict[Watcher, list[int]] = {}
            for i, ev in enumerate(events):
                bit = FILTER_NOPUT if ev.type == "PUT" else FILTER_NODELETE
                for w in group.match(ev.kv.key):
                    if w.min_rev <= rev and not w.filters & bit:
                        idxs = per.get(w)
                        if idxs is None:
                            per[w] = [i]
                        elif idxs[-1] != i:
                            idxs.append(i)
            for w, idxs in per.items():
                enc = [batch.encoded(i, w.prev_kv and events[i].kv.mod_revision - 1 >=
                                     self.compact_rev) for i in idxs]
                n = sum(len(e) for e in enc)
                if acc[w] and (size[w] + n > limit[w] or revs[w] >= self.batch_max_revs):
                    more[w] = rev
                    group.remove(w)
                    continue
                acc[w].extend(enc)
                size[w] += n
                revs[w] += 1
            if not group:
                break
        synced = 0
        for w, enc in acc.items():
            self.catchups += 1
            done: bool | None = True
            if enc:
                if w.fragment:
                    blobs = split_fragments(hi, enc, self.fragment_limit)
                else:
                    blobs = [events_blob(hi, enc)]
                done = self._deliver(w, blobs)
                if done is None:  # nothing went out: stay at min_rev, wait for room
                    self._move(w, "ring_full")
                    continue
                self.events_delivered += len(enc)
                w.sent_since_tick = True
            w.min_rev = more.get(w, hi + 1)
            if not done:
                self._move(w, "ring_full")
            elif w in more:
                self._move(w, "more")
                # Rotate to the back so others get their turn.
                del self.unsynced[w]
                self.unsynced[w] = None
            else:
                self._move(w, "caught_up")
                self._owe_progress(w)
                synced += 1
        return synced

    # ------------------------------------------------------------ progress

    def request_progress(self, watchers: Iterable[Watcher]) -> None:
        """Answer a progress request (etcd 3.4: watch_id -1, header = current revision)
        on each of these watchers; one still catching up gets it once synced, so a
        progress response never claims a revision whose events it has not delivered."""
        for w in watchers:
            if w.state == SYNCED and not w.outbox:
                self._write(w, encode_watch_control(W_PROGRESS, self.cur_rev))
            elif w.state in (UNSYNCED, VICTIM):
                w.progress_pending = 1

    def _owe_progress(self, w: Watcher) -> None:
        if w.progress_pending:
            w.progress_pending = 0
            self._write(w, encode_watch_control(W_PROGRESS, self.cur_rev))

    def progress_tick(self, watchers: Iterable[Watcher]) -> None:
        """etcd's progress_notify ticker: a synced watcher that asked for it and received
        no events since the last tick gets an empty response at the current revision."""
        for w in watchers:
            if w.progress_notify and w.state == SYNCED and not w.outbox and not w.sent_since_tick:
                self._write(w, encode_watch_control(W_PROGRESS_NOTIFY, self.cur_rev))
            w.sent_since_tick = False

    # ------------------------------------------------------------ introspection

    def pending_events(self) -> int:
        """Responses held for victims (the unwritten rest of ones their rings took in part)."""
        return sum(len(w.outbox) for w in self.victims)

    def _check(self) -> None:
        self.synced._check()
        for w in self.synced:
            assert w.state == SYNCED and not w.outbox, w
        for w in self.unsynced:
            assert w.state == UNSYNCED and not w.outbox, w
        for w in self.victims:
            assert w.state == VICTIM, w
        for w in self.canceling:
            assert w.state == CANCELING and w.outbox, w
        groups = [set(self.synced), set(self.unsynced), set(self.victims), set(self.canceling)]
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                assert not (a & b)
        held: dict[object, int] = {}
        for g in groups:
            for w in g:
                n = sum(len(p) - off for p, off in w.outbox)
                if n:
                    held[w.owner] = held.get(w.owner, 0) + n
        assert held == self.held, (held, self.held)
