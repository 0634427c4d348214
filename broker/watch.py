"""The watch core: who watches what, and what each watcher gets next. Pure logic.

This module owns the watcher life cycle of etcd's watchableStore and the rules of each
client's watch stream (ids, duplicates, range checks, rings in use); nothing else
changes a watcher's state. It does no I/O of its own: it writes encoded responses
through each watcher's `RingWriter` (a shared-memory ring in the broker, an in-memory
fake in tests), reads history through a callable it is handed, and reads no clock.

The life cycle (states, the transition table and what triggers each transition) is in
`broker/watch_states.py`; every change of state goes through `WatchCore._move`.

Where etcd's victim keeps the batch its channel refused, ours keeps nothing: the
revision log already holds it, so a victim remembers the revision it missed (minRev)
and catches up from the log once its ring has room again. The only bytes ever held for
a watcher are the rest of a response its ring took in part (a response larger than
the ring's free space streams through in chunks), bounded per client by
`owner_budget`. So a slow reader's backlog lives in the log, never in the broker's or
the client's memory, and comes back in etcd-sized catch-up responses (up to 1,000
revisions each). "Room again" is `VICTIM_RESUME_FREE` of the ring free: the hysteresis
that turns a slow reader's backlog into a few large catch-ups instead of many small.
And when the shell can say where the shared log holds a watcher's history (`locate`),
the watcher makes its catch-up itself (clientlib.catchup): the broker sends one small
W_CATCHUP message and reads, encodes and copies nothing of that history.

Guarantees kept here: per watcher, responses are in revision order, without gaps or
duplicates, and the events of one revision are never split across responses (unless
the watcher asked for etcd's `fragment`). A victim costs nothing per write: it is not in
the synced group and holds at most the unwritten rest of one response.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from shm.errors import RingCorrupt
from shmwatch.wire.errors import DuplicateWatchIdError, InvalidRangeError, ProtocolError, TooManyWatchersError
from shmwatch.wire.events import CatchUp, LoggedEvent, encode_watch_catchup, encode_watch_control
from shmwatch.wire.protocol import (
    RESUME_FREE_FRACTION,
    W_CANCELED,
    W_CREATED,
    W_PROGRESS,
    W_PROGRESS_NOTIFY,
    WatchSpec,
)

from .batches import RevisionBatch, responses, select
from .outbox import RingWriter
from .watch_states import (  # noqa: F401 - the states are the core's vocabulary too
    CANCELING, REMOVED, SYNCED, TRANSITIONS, UNSYNCED, VICTIM, S, State)
from .watcher_group import Watcher, WatcherGroup


# etcd's tunables, as module values so tests can shrink them.
MAX_WATCHERS_PER_SYNC = 512  # etcd: maxWatchersPerSync
WATCH_BATCH_MAX_REVS = 1000  # etcd: watchBatchMaxRevs
GRPC_OVERHEAD_BYTES = 512 * 1024  # etcd v3rpc: grpcOverheadBytes
# Bytes of a catch-up response beyond its events' encodings (header, array framing).
RESPONSE_OVERHEAD = 32
# A victim resumes (and an unsynced watcher is caught up) only when at least this
# fraction of its ring is free; clientlib's reader raises the space hint at the same
# point (protocol.RESUME_FREE_FRACTION).
VICTIM_RESUME_FREE = RESUME_FREE_FRACTION

HistoryReader = Callable[[int, int], Iterable[tuple[int, list[LoggedEvent]]]]
# (lo, hi) -> where the shared log holds revisions lo..hi whole, or None (History.locate)
Locator = Callable[[int, int], "int | None"]


class WatchStream:
    """One client's watch stream (etcd's watchStream): its watchers by id, the rings they
    use (by the shell's tag), the next automatic id, and the bytes held for it across
    its watchers (counted against the core's `owner_budget`). `client` is the shell's
    own object for that client."""

    __slots__ = ("client", "watchers", "rings", "next_id", "held")

    def __init__(self, client=None):
        self.client = client
        self.watchers: dict[int, Watcher] = {}
        self.rings: dict[object, Watcher] = {}
        self.next_id = 0
        self.held = 0

    def __repr__(self) -> str:
        return f"<WatchStream of {self.client!r}: {len(self.watchers)} watchers>"


class WatchCore:
    """etcd's watchableStore without the store: synced / unsynced / victims, and every
    client's watch stream.

    The shell calls `notify` after every write revision, `sync_watchers` and
    `move_victims` when they have work, and `compact` when the compaction point moves.
    Delivered responses are published at once; `woken` collects the streams to wake
    (the shell rings their clients' doorbells once per batch and clears it), `faulted`
    the streams whose consumer damaged a ring (the shell disconnects them).
    """

    def __init__(self, *, max_request_bytes: int = 1536 * 1024,
                 max_response_bytes: int = 1 << 20,
                 max_watchers_per_sync: int | None = None,
                 batch_max_revs: int | None = None,
                 owner_budget: int = 64 << 20,
                 max_watchers_per_client: int = 1 << 30):
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
        self.max_watchers_per_client = max_watchers_per_client
        self.woken: set[WatchStream] = set()
        self.faulted: set[WatchStream] = set()
        self.removed: list[Watcher] = []  # finished: their ids and rings may be reused
        # Counters for metrics.
        self.events_delivered = 0
        self.victims_entered = 0
        self.catchups = 0
        self.catchups_delegated = 0  # of which the watcher made itself (W_CATCHUP)
        self.compactions = 0

    # ------------------------------------------------------------ state changes

    def _move(self, w: Watcher, event: str) -> None:
        new = TRANSITIONS.get((w.state, event))
        if new is None:
            raise AssertionError(f"watcher {w.id}: no transition from {w.state} on {event}")
        old = w.state
        if old is new:
            return
        if old is S.SYNCED:
            self.synced.remove(w)
        elif old is S.UNSYNCED:
            del self.unsynced[w]
        elif old is S.VICTIM:
            del self.victims[w]
        elif old is S.CANCELING:
            del self.canceling[w]
        w.state = new
        if new is S.SYNCED:
            self.synced.add(w)
        elif new is S.UNSYNCED:
            self.unsynced[w] = None
        elif new is S.VICTIM:
            self.victims[w] = None
            self.victims_entered += 1
        elif new is S.CANCELING:
            self.canceling[w] = None
        else:
            self.removed.append(w)

    # ------------------------------------------------------------ writing

    def _written(self, w: Watcher, before: int) -> None:
        """Account what `w` holds now against its owner, and wake the owner."""
        w.owner.held += w.out.held - before
        self.woken.add(w.owner)

    def _write(self, w: Watcher, payload: bytes) -> None:
        """A control response (created, canceled, progress): written now if it fits and
        nothing is pending, else kept in order behind what is (a few dozen bytes,
        never dropped). A synced or unsynced watcher left holding it waits as a victim
        (its ring is full), so nothing is written ahead of it. O(len)."""
        out = w.out
        before = out.held
        try:
            out.write(payload)
            out.publish()
        except RingCorrupt:  # the consumer damaged its ring: the shell drops its client
            self.faulted.add(w.owner)
            return
        self._written(w, before)
        if out.pending and w.state in (S.SYNCED, S.UNSYNCED):
            if w.state is S.SYNCED:
                w.min_rev = self.cur_rev + 1  # it has every revision up to now
            self._move(w, "ring_full")

    def _deliver(self, w: Watcher, blobs: list[bytes]) -> bool | None:
        """Write the responses of one revision (or one catch-up) to `w`, which holds
        nothing. True: all went out. None: nothing went out and nothing is kept (its
        ring is full, or holding the rest would put its owner over budget): the caller
        leaves `w` at that revision, which the log keeps. False: part went out and the
        rest is held. O(bytes)."""
        out = w.out
        owner = w.owner
        first = blobs[0]
        try:
            if (len(first) > out.sink.max_chunk and owner.held
                    and owner.held + len(first) > self.owner_budget):
                # It could only go out in part, and holding the rest would put the owner
                # over its budget: wait for room instead (the log keeps the events).
                out.sink.producer_blocked = 1
                return None
            if out.try_write(first) == 0:
                return None
            for blob in blobs[1:]:  # the rest of a revision that started going out
                out.write(blob)
            out.publish()
        except RingCorrupt:
            self.faulted.add(owner)
            return None
        owner.held += out.held
        self.woken.add(owner)
        return not out.pending

    def _flush(self, w: Watcher) -> bool:
        """Write what `w` holds; True when nothing is left."""
        out = w.out
        before = out.held
        try:
            done = out.flush()
        except RingCorrupt:
            self.faulted.add(w.owner)
            return False
        if out.held != before:
            self._written(w, before)
        return done

    def _has_room(self, w: Watcher) -> bool:
        """Whether `w`'s ring is free enough to be worth a catch-up response."""
        return self._free(w) >= w.out.sink.capacity * VICTIM_RESUME_FREE

    def _free(self, w: Watcher) -> int:
        """Free bytes of `w`'s ring; -1 if its consumer published a bad tail (the shell
        drops its owner, as for a failed write: never an exception out of the loop)."""
        try:
            return w.out.room()
        except RingCorrupt:
            self.faulted.add(w.owner)
            return -1

    # ------------------------------------------------------------ the watch stream

    def create(self, stream: WatchStream, spec: WatchSpec, want_id: int, out: RingWriter,
               tag) -> tuple[int, int, str]:
        """etcd's watch-stream rules for a create, then the watch: (id, refusal, reason).

        The range check first, then the id: 0 picks the next free one; any other is
        taken as given unless in use (etcd: negative ids too). A refusal (an error code)
        is etcd's created+canceled response, sent by the caller. Raises ProtocolError
        for a ring already in use, TooManyWatchersError past the per-client cap.
        O(log W)."""
        old = stream.rings.get(tag)
        if old is not None:
            if old.state is not S.REMOVED:
                raise ProtocolError("shmwatch: watch ring already in use")
            self._forget(old)
        if len(stream.watchers) >= self.max_watchers_per_client:
            self.release_finished()
            if len(stream.watchers) >= self.max_watchers_per_client:
                raise TooManyWatchersError(
                    f"shmwatch: this client already has {len(stream.watchers)} watches, the "
                    f"broker's --max-watchers-per-client")
        key, end = spec.key, spec.end
        if end is not None and end != b"\0" and key >= end:
            return 0, InvalidRangeError.code, InvalidRangeError.default_message
        if want_id:
            old = stream.watchers.get(want_id)
            if old is not None and old.state is not S.REMOVED:
                return want_id, DuplicateWatchIdError.code, DuplicateWatchIdError.default_message
            if old is not None:
                self._forget(old)
            wid = want_id
        else:
            while stream.next_id in stream.watchers:
                stream.next_id += 1
            wid = stream.next_id
            stream.next_id += 1
        w = Watcher(wid, stream, key, end, out, prev_kv=spec.prev_kv, filters=spec.filters,
                    progress_notify=spec.progress_notify, fragment=spec.fragment, tag=tag)
        stream.watchers[wid] = w
        stream.rings[tag] = w
        self.add_watcher(w, spec.start_revision)
        return wid, 0, ""

    def add_watcher(self, w: Watcher, start_rev: int) -> None:
        """Start a watcher: its `created` response first, then history or live events.

        O(log W) for the group insert."""
        w.state = S.NEW
        self._write(w, encode_watch_control(W_CREATED, self.cur_rev))
        if start_rev == 0 or start_rev > self.cur_rev:
            w.min_rev = max(start_rev, self.cur_rev + 1)
            self._move(w, "created_live")
        else:
            w.min_rev = start_rev
            self._move(w, "created_past")

    def cancel_id(self, stream: WatchStream, watch_id: int) -> None:
        """The client cancels a watch by id; etcd ignores an unknown id (the watch may
        have ended already)."""
        w = stream.watchers.get(watch_id)
        if w is not None:
            self.cancel(w)

    def cancel(self, w: Watcher, *, reason: str = "", compact_rev: int = 0,
               header_rev: int | None = None) -> None:
        """Cancel a watch: its final `canceled` response follows whatever it holds."""
        if w.state in (S.CANCELING, S.REMOVED):
            return
        self._move(w, "cancel")
        rev = self.cur_rev if header_rev is None else header_rev
        self._write(w, encode_watch_control(W_CANCELED, rev, compact_rev, reason))
        if not w.out.pending:
            self._move(w, "delivered")

    def drop_stream(self, stream: WatchStream) -> None:
        """Its client is gone: drop every watcher at once, sending nothing."""
        for w in list(stream.watchers.values()):
            if w.state is not S.REMOVED:
                stream.held -= w.out.drop()
                self._move(w, "dropped")
        self.woken.discard(stream)
        self.faulted.discard(stream)
        self.release_finished()

    def release_finished(self) -> None:
        """Forget finished watchers (their ids and rings may be reused). O(finished)."""
        removed = self.removed
        while removed:
            self._forget(removed.pop())

    def _forget(self, w: Watcher) -> None:
        stream = w.owner
        if stream.watchers.get(w.id) is w:
            del stream.watchers[w.id]
        if stream.rings.get(w.tag) is w:
            del stream.rings[w.tag]
        if w.out is not None:
            w.out.sink.release()
            w.out = None

    def compact(self, rev: int) -> None:
        """The compaction point moved to `rev` (a compaction, or the log wrapped)."""
        self.compact_rev = max(self.compact_rev, rev)

    def cancel_behind(self, rev: int, compact_rev: int | None = None) -> None:
        """A mirroring broker lost revisions (< `rev`) it never delivered (etcd compacted
        them, or it reloaded): every synced or unsynced watcher that still needs one is
        cancelled with `compact_rev` (default `rev`: etcd's compaction revision), as a
        direct etcd watch from there would be. (Victims meet the compaction point when
        they resume.)"""
        compact_rev = rev if compact_rev is None else compact_rev
        for w in list(self.synced):
            w.min_rev = self.cur_rev + 1
            self._move(w, "behind")
        for w in list(self.unsynced):
            if w.min_rev < rev:
                self.compactions += 1
                self._move(w, "compacted")
                self._write(w, encode_watch_control(W_CANCELED, 0, compact_rev))
                if not w.out.pending:
                    self._move(w, "delivered")

    # ------------------------------------------------------------ live events

    def notify(self, rev: int, events: list[LoggedEvent]) -> None:
        """Deliver one revision's events to the synced watchers they match (etcd's
        notify). O(E·log B + M·len) for E events and M matching watchers; each distinct
        response is built once."""
        self.cur_rev = rev
        if not self.synced:
            return
        batch = RevisionBatch(rev, events)
        for w, idxs in select(self.synced.match, events, rev).items():
            self._send_live(w, batch, idxs)

    def _send_live(self, w: Watcher, batch: RevisionBatch, idxs: tuple[int, ...]) -> None:
        done = self._deliver(w, batch.responses(w, idxs, self.fragment_limit))
        if done is not None:
            w.sent_since_tick = True
            self.events_delivered += len(idxs)
            if done:
                return
        # Not taken whole: a victim. If nothing of this revision went out, the watcher
        # still owes it (the log has it); else the rest is held.
        w.min_rev = batch.rev if done is None else batch.rev + 1
        self._move(w, "ring_full")

    # ------------------------------------------------------------ victims

    def move_victims(self) -> int:
        """etcd's syncVictimsLoop step: every victim whose ring has room again (what it
        held written, and `VICTIM_RESUME_FREE` of the ring free) moves on to catch up
        from the log (or straight to synced if nothing happened meanwhile); canceling
        watchers deliver their final response. O(V) plus the bytes written. Returns
        how many victims were released."""
        released = 0
        for w in list(self.victims):
            if w.out.pending and not self._flush(w):
                continue
            if not self._has_room(w):
                w.out.sink.producer_blocked = 1
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

    def sync_watchers(self, read_history: HistoryReader, locate: Locator | None = None) -> int:
        """etcd's syncWatchers: catch up to `max_watchers_per_sync` unsynced watchers.

        With `locate`, a watcher whose history the shared revision log holds whole
        (`locate(lo, hi)` gives where it starts; None if it cannot) catches up itself:
        it gets one W_CATCHUP message naming lo..hi and is synced from hi + 1 at once
        (clientlib.catchup reads the log in its process, as this method would have):
        no event of it is read, encoded or copied here. The others, and all without
        `locate`, are caught up here:
        `read_history(lo, hi)` yields (rev, events) for lo <= rev <= hi; it is read once
        for the chosen watchers, from the smallest minRev. Each watcher gets its events
        of whole revisions in one response of at most `batch_max_revs` revisions and
        `max_response_bytes` (etcd's moreRev: it stays unsynced for the rest), or, while
        its owner already holds bytes, no more than its ring has free (at least one
        revision), so at most one catch-up per owner is ever held and its other watches
        keep moving. Header revision: the current one. Returns how many watchers became
        synced. O(H·log B + bytes) for H events read."""
        group, limit, lo = self._choose(locate)
        if lo is None:
            return 0
        hi = self.cur_rev
        acc = self._gather(group, limit, read_history(lo, hi))
        synced = 0
        for w, (enc, more) in acc.items():
            synced += self._catch_up(w, enc, more, hi)
        return synced

    def _choose(self, locate: Locator | None) -> tuple[WatcherGroup, dict[Watcher, int],
                                                       int | None]:
        """The unsynced watchers this pass catches up, with their response size limits;
        settles on the way those that need no history (caught up, compacted), those that
        catch up themselves (`locate`), and those that cannot take any now (ring too
        full, or their owner over its budget: victims)."""
        chosen = []
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
                if not w.out.pending:
                    self._move(w, "delivered")
            elif w.min_rev > self.cur_rev:
                self._move(w, "caught_up")
                self._owe_progress(w)
            elif not self._has_room(w):
                w.out.sink.producer_blocked = 1  # wait as a victim for room in its ring
                self._move(w, "ring_full")
            elif locate is not None and (pos := locate(w.min_rev, self.cur_rev)) is not None:
                self._delegate(w, pos)  # holds nothing here: its owner's budget is moot
            elif w.owner.held >= self.owner_budget:
                # Wait as a victim for its owner's held bytes to drain (nothing is built
                # for it meanwhile).
                w.out.sink.producer_blocked = 1
                self._move(w, "ring_full")
            else:
                limit[w] = (self.max_response_bytes if not w.owner.held
                            else self._free(w) - RESPONSE_OVERHEAD)
                group.add(w)
                lo = w.min_rev if lo is None else min(lo, w.min_rev)
        return group, limit, lo

    def _delegate(self, w: Watcher, pos: int) -> None:
        """`w` catches up itself from the log (see `sync_watchers`): synced from the
        current revision on, behind one W_CATCHUP message."""
        cu = CatchUp(w.min_rev, self.cur_rev, self.compact_rev, pos, self.batch_max_revs,
                     self.max_response_bytes, self.fragment_limit)
        self.catchups += 1
        self.catchups_delegated += 1
        w.min_rev = self.cur_rev + 1
        self._move(w, "caught_up")
        self._write(w, encode_watch_catchup(cu))  # kept behind pending, never dropped
        self._owe_progress(w)

    def _gather(self, group: WatcherGroup, limit: dict[Watcher, int],
                history) -> dict[Watcher, tuple[list[bytes], int]]:
        """Each watcher's catch-up events (encoded) and the first revision it still owes
        after them (0: none). A watcher leaves `group` once its response is full."""
        acc: dict[Watcher, list] = {w: [] for w in group}
        size = dict.fromkeys(acc, 0)
        revs = dict.fromkeys(acc, 0)
        more: dict[Watcher, int] = {}
        compact_rev = self.compact_rev
        for rev, events in history:
            batch = RevisionBatch(rev, events)
            for w, idxs in select(group.match, events, rev).items():
                enc = batch.encoded(idxs, w.prev_kv and rev - 1 >= compact_rev)
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
        return {w: (enc, more.get(w, 0)) for w, enc in acc.items()}

    def _catch_up(self, w: Watcher, enc: list[bytes], more: int, hi: int) -> int:
        """Send `w` its catch-up response and move it on; 1 if it became synced."""
        self.catchups += 1
        done: bool | None = True
        if enc:
            done = self._deliver(w, responses(hi, enc, w.fragment, self.fragment_limit))
            if done is None:  # nothing went out: stay at min_rev, wait for room
                self._move(w, "ring_full")
                return 0
            self.events_delivered += len(enc)
            w.sent_since_tick = True
        w.min_rev = more or hi + 1
        if not done:
            self._move(w, "ring_full")
        elif more:
            self._move(w, "more")
            del self.unsynced[w]  # to the back, so the others get their turn
            self.unsynced[w] = None
        else:
            self._move(w, "caught_up")
            self._owe_progress(w)
            return 1
        return 0

    # ------------------------------------------------------------ progress

    def request_progress(self, stream: WatchStream) -> None:
        """Answer a progress request (etcd 3.4: watch_id -1, header = current revision)
        on each of the stream's watchers; one still catching up gets it once synced, so
        a progress response never claims a revision whose events it has not delivered."""
        for w in stream.watchers.values():
            if w.state is S.SYNCED and not w.out.pending:
                self._write(w, encode_watch_control(W_PROGRESS, self.cur_rev))
            elif w.state in (S.UNSYNCED, S.VICTIM):
                w.progress_pending = True

    def _owe_progress(self, w: Watcher) -> None:
        if w.progress_pending:
            w.progress_pending = False
            self._write(w, encode_watch_control(W_PROGRESS, self.cur_rev))

    def progress_tick(self, streams: Iterable[WatchStream]) -> None:
        """etcd's progress_notify ticker: a synced watcher that asked for it and received
        no events since the last tick gets an empty response at the current revision."""
        for stream in streams:
            for w in stream.watchers.values():
                if (w.progress_notify and w.state is S.SYNCED and not w.out.pending
                        and not w.sent_since_tick):
                    self._write(w, encode_watch_control(W_PROGRESS_NOTIFY, self.cur_rev))
                w.sent_since_tick = False

    # ------------------------------------------------------------ introspection

    def pending_events(self) -> int:
        """Responses held for victims (the unwritten rest of ones their rings took in part)."""
        return sum(len(w.out.pending) for w in self.victims)

    def states(self) -> dict[str, int]:
        """How many watchers are in each live state."""
        return {"synced": len(self.synced), "unsynced": len(self.unsynced),
                "victim": len(self.victims), "canceling": len(self.canceling)}

    def lag(self, w: Watcher) -> int:
        """Revisions `w` is behind (0 for a synced watcher)."""
        return 0 if w.state is S.SYNCED else max(0, self.cur_rev - w.min_rev + 1)

    def _check(self) -> None:
        """Every invariant of the groups, the states and the held-bytes accounting."""
        self.synced._check()
        members = {S.SYNCED: set(self.synced), S.UNSYNCED: set(self.unsynced),
                   S.VICTIM: set(self.victims), S.CANCELING: set(self.canceling)}
        for state, ws in members.items():
            for w in ws:
                assert w.state is state, w
                if state in (S.SYNCED, S.UNSYNCED):
                    assert not w.out.pending, w
                if state is S.CANCELING:
                    assert w.out.pending, w
        groups = list(members.values())
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                assert not (a & b)
        held: dict[WatchStream, int] = {}
        for ws in groups:
            for w in ws:
                assert w.out.held == sum(len(p) - off for p, off in w.out.pending), w
                held[w.owner] = held.get(w.owner, 0) + w.out.held
        for stream, n in held.items():
            assert stream.held == n, (stream, stream.held, n)
