"""etcd 3.4's MVCC key-value store, in memory and pure (no I/O, no clocks, no threads).

`MVCCStore` reproduces what an etcd 3.4 client observes of the KV API: revisions,
versions, ranges at past revisions, txns (compares, nested txns, request validation),
compaction, and the events each write produces. Every rule below was checked against a
real etcd 3.4.23.

Revisions
    A fresh store is at revision 1. Each write request that changes something advances the
    revision by exactly one; all changes of one txn share that revision. A write that
    changes nothing (delete of nothing, a txn whose chosen branch writes nothing) leaves the
    revision alone and reports the current revision.

Events (what the watch layer gets back from every write)
    The events of one revision, in the order the changes were made (a delete range
    deletes in key order). A PUT carries the new KeyValue; a DELETE carries
    ``KeyValue(key, b"", 0, deleting_rev, 0, 0)`` -- etcd's tombstone has only key and
    mod_revision. ``prev_kv`` is what etcd's watch attaches: the key's KeyValue at
    revision ``rev - 1``, i.e. *before the whole txn* (not before the op inside the txn),
    and None for a create (a PUT of version 1) or if the key did not exist. Example: a
    txn that puts ``k`` (version 2 -> 3) and later deletes ``k`` (possible through a
    from-key delete or a later nested txn) yields PUT(k v3, prev=k v2) and
    DELETE(k, prev=k v2).

Compaction (keyIndex.compact of etcd)
    ``compact(r)`` drops every version older than the newest version at or below ``r`` of
    each key, so every read at a revision >= r still works. A tombstone at or below ``r``
    that is the newest entry at or below ``r`` is dropped too, with everything before it
    -- *including a tombstone at exactly r*. etcd behaves the same: a watch that starts at
    the compact revision does not receive a DELETE event at that revision, nor a PUT
    that a later change of the same txn deleted (the other PUTs of that revision are
    kept, but arrive without prev_kv). The watch layer, which replays history
    from its own log, must know this to reproduce etcd there: `events_at_compact_rev`
    turns a revision's events into what etcd still delivers once it is the compaction
    revision.

Leases
    A put may attach its key to a lease (``lease``; 0: none). A re-put without a lease
    detaches the key, one with another lease moves it, ``ignore_lease`` keeps the key's
    lease. The store knows which leases exist only through ``lease_exists`` (the
    broker's lessor); it keeps the index lease -> live keys (`keys_of_lease`), which a
    revoke deletes in key order at one revision (`delete_keys`). A standalone put checks
    (etcd's v3rpc, then the applier): empty key, ignore_value with a value, ignore_lease
    with a lease, then lease not found, then ignore_value/ignore_lease on a missing key.

Txn validation (etcd's v3rpc checks, then the applier's), in this order; a failing txn
applies nothing:
    1. too many ops (``max(len(compare), len(success), len(failure)) > 128``; a nested
       txn gets the budget ``128 - opc`` of its parent), empty keys (compares first, then
       success ops, then failure ops, depth first), ignore_value with a value,
       ignore_lease with a lease;
    2. duplicate keys (etcd's checkIntervals, success and failure branch separately);
    3. compares of the whole chosen path are evaluated against the state before the txn
       (also the compares of nested txns, even when earlier ops changed the keys);
    4. puts of the chosen path, each in turn: ignore_value or ignore_lease needs the key
       to exist before the txn, then its lease must exist (etcd's checkRequestPut);
    5. ranges of the chosen path: revision > current -> future, < compaction -> compacted.
    One deviation: etcd 3.4.23 *panics* (the server crashes) when an ignore_value put
    targets a key an earlier from-key delete of the same txn removed (checkIntervals does
    not see from-key deletes). Here that txn fails with KeyNotFoundError, nothing applied.

Inner response revisions of a txn (etcd 3.4 applier): a range reports the txn's begin
revision, +1 once the txn has made a change; a put reports begin + 1; a delete range
reports begin + 1 if it deleted something or the txn already changed something, else
begin; a nested txn's response header is never filled by etcd, its revision is 0. The
TxnResponse itself reports the revision after the txn.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice

from sortedcontainers import SortedList

from . import mvcc_state
from .mvcc_state import History
from .range_rules import shape_range
from .txn_rules import (
    FROM_KEY,
    _check_intervals,
    _check_txn_request,
    _covers,
    compare_holds,
)

from shmwatch.wire.errors import (
    CompactedError,
    EmptyKeyError,
    FutureRevisionError,
    KeyNotFoundError,
    LeaseNotFoundError,
    LeaseProvidedError,
    ProtocolError,
    ValueProvidedError,
)
from shmwatch.wire.ops import Compare, DeleteOp, Op, PutOp, RangeOp, TxnOp
from shmwatch.wire.types import (
    DELETE,
    PUT,
    CompactResponse,
    DeleteRangeResponse,
    Event,
    KeyValue,
    PutResponse,
    RangeResponse,
    TxnResponse,
)

MAX_TXN_OPS = 128  # etcd's default --max-txn-ops


class _TxnCtx:
    """Bookkeeping of one write txn being applied."""

    __slots__ = ("begin", "changed", "events", "keys", "new", "pre")

    def __init__(self, begin: int) -> None:
        self.begin = begin
        self.new = begin + 1
        self.changed = False
        self.pre: dict[bytes, KeyValue | None] = {}  # key -> its KeyValue before the txn
        self.events: list[Event] = []
        self.keys: list[bytes] = []


class MVCCStore:
    """etcd's MVCC store, in memory. Revisions start at 1 (a fresh etcd is at revision 1;
    the first write makes revision 2).

    n = number of keys with retained history, k = keys returned or deleted, h = retained
    versions of one key, c = changes since the previous compaction.
    """

    def __init__(self) -> None:
        self.rev: int = 1
        # etcd's compactMainRev: -1 until the first compaction (etcd accepts compact(0)
        # once on a fresh store, and then rejects a second compact(0) as compacted).
        self._compact_main: int = -1
        self._hist: dict[bytes, History] = {}
        self._keys: SortedList = SortedList()  # keys of _hist
        self._live: dict[bytes, KeyValue] = {}
        self._live_keys: SortedList = SortedList()  # keys of _live
        # Change log since the last compaction: _log[i] holds the key (bytes) or keys
        # (tuple) changed at revision _log_start + i. Every revision has an entry.
        self._log: deque = deque()
        self._log_start: int = 2
        # lease id -> its live keys (etcd's lessor item sets, kept by the store that
        # owns the keys). Which leases exist is the lessor's: `lease_exists`.
        self._by_lease: dict[int, set[bytes]] = {}
        self.lease_exists: Callable[[int], bool] = _no_leases

    # ------------------------------------------------------------------ properties

    @property
    def compact_rev(self) -> int:
        """Last compaction revision, 0 if never compacted."""
        return max(0, self._compact_main)

    # ------------------------------------------------------------------ reads

    def range(
        self,
        key: bytes,
        end: bytes | None = None,
        *,
        revision: int = 0,
        limit: int = 0,
        keys_only: bool = False,
        count_only: bool = False,
        **options,
    ) -> RangeResponse:
        """etcd Range: the keys in [key, end) (end None: just key; b"\\0": every key >= key).

        Sorted by key unless `options` say otherwise (RangeOp's sort_order, sort_target,
        min/max_mod_revision, min/max_create_revision, as etcd's RangeRequest);
        ``count`` counts every key in range (before the revision filters, as etcd),
        ``more`` = limit > 0 and keys beyond it. ``revision`` <= 0 reads the current
        revision; the response revision is always the current revision.

        Raises EmptyKeyError, FutureRevisionError (revision > current), CompactedError
        (revision < compaction revision; the compaction revision itself is readable).

        Complexity: current revision O(log n + k) (count_only O(log n)); past revision
        O(log n + m log h), m = keys with retained history in range; sorting or
        filtering reads the whole range, O(k log k).
        """
        op = RangeOp(key, end, revision, limit, keys_only, count_only, **options)
        if not key:
            raise EmptyKeyError()
        if revision > self.rev:
            raise FutureRevisionError()
        return self._range(op, self.rev)

    def _range(self, op: RangeOp, cur: int) -> RangeResponse:
        revision = op.revision if op.revision > 0 else cur
        if revision < self._compact_main:
            raise CompactedError()
        limit = op.limit
        # etcd (v3 server, apply Range): to sort or filter, read everything first.
        shaped = (op.sort_order != "NONE" or op.sort_target != "KEY" or op.min_mod_revision
                  or op.max_mod_revision or op.min_create_revision or op.max_create_revision)
        kvs, count = self._read_range(op.key, op.range_end, revision, cur,
                                      0 if shaped else limit, op.count_only)
        if op.count_only:
            return RangeResponse(cur, [], count, False)
        if shaped:
            kvs = shape_range(kvs, op)
            more = limit > 0 and len(kvs) > limit
        else:
            more = limit > 0 and count > limit
        if more and len(kvs) > limit:
            del kvs[limit:]
        if op.keys_only:
            kvs = [kv._replace(value=b"") for kv in kvs]
        return RangeResponse(cur, kvs, count, more)

    def _read_range(self, key, end, revision, cur, limit, count_only) -> tuple[list, int]:
        """(key-values in key order, at most `limit` of them if > 0; how many are in range)."""
        if revision == cur:  # the live state (inside a txn: including its changes)
            if end is None:
                kv = self._live.get(key)
                kvs = [kv] if kv is not None else []
                return kvs, len(kvs)
            lk = self._live_keys
            lo = lk.bisect_left(key)
            if end == FROM_KEY:
                hi = len(lk)
            elif key >= end:
                hi = lo
            else:
                hi = lk.bisect_left(end)
            count = hi - lo
            if count_only:
                return [], count
            n = count if limit <= 0 or limit >= count else limit
            live = self._live
            return [live[k] for k in islice(lk.islice(lo, hi), n)], count
        kvs = []
        if end is None:
            h = self._hist.get(key)
            kv = h.at(revision) if h is not None else None
            if kv is not None:
                kvs.append(kv)
        elif end == FROM_KEY or key < end:
            hist = self._hist
            it = (
                self._keys.irange(key)
                if end == FROM_KEY
                else self._keys.irange(key, end, inclusive=(True, False))
            )
            for k in it:
                kv = hist[k].at(revision)
                if kv is not None:
                    kvs.append(kv)
        return kvs, len(kvs)

    def _live_keys_in(self, key: bytes, end: bytes | None) -> list[bytes]:
        """Sorted live keys in the range. O(log n + k)."""
        if end is None:
            return [key] if key in self._live else []
        if end == FROM_KEY:
            return list(self._live_keys.irange(key))
        if key >= end:
            return []
        return list(self._live_keys.irange(key, end, inclusive=(True, False)))

    # ------------------------------------------------------------------ writes

    def put(
        self, key: bytes, value: bytes, *, prev_kv: bool = False, ignore_value: bool = False,
        lease: int = 0, ignore_lease: bool = False,
    ) -> tuple[PutResponse, list[Event]]:
        """etcd Put: a new revision with key = value. Returns (response, [PUT event]).

        ignore_value keeps the current value, ignore_lease the current lease (the key
        must exist: KeyNotFoundError; a value or a lease given with them:
        ValueProvidedError, LeaseProvidedError). `lease` attaches the key to that lease
        (LeaseNotFoundError if it does not exist); 0 detaches it. Raises EmptyKeyError.
        Checks in etcd's order (module docstring).

        Complexity: O(1) amortized to update a live key; O(log n) to create one.
        """
        if not key:
            raise EmptyKeyError()
        if ignore_value and value:
            raise ValueProvidedError()
        if ignore_lease and lease:
            raise LeaseProvidedError()
        if lease and not self.lease_exists(lease):
            raise LeaseNotFoundError()
        prev = self._live.get(key)
        if ignore_value or ignore_lease:
            if prev is None:
                raise KeyNotFoundError()
            if ignore_value:
                value = prev.value
            if ignore_lease:
                lease = prev.lease
        rev = self.rev + 1
        kv = self._write(key, value, rev, prev, lease)
        self.rev = rev
        self._log.append(key)
        return PutResponse(rev, prev if prev_kv else None), [Event(PUT, kv, prev)]

    def _write(self, key: bytes, value: bytes, rev: int, prev: KeyValue | None,
               lease: int = 0) -> KeyValue:
        """Record a put of key at rev; prev = its live KeyValue. No revision bookkeeping."""
        if prev is None:
            kv = KeyValue(key, value, rev, rev, 1, lease)
            self._live_keys.add(key)
        else:
            kv = KeyValue(key, value, prev.create_revision, rev, prev.version + 1, lease)
            if prev.lease and prev.lease != lease:
                self._detach(prev.lease, key)
        if lease and (prev is None or prev.lease != lease):
            keys = self._by_lease.get(lease)
            if keys is None:
                keys = self._by_lease[lease] = set()
            keys.add(key)
        self._live[key] = kv
        h = self._hist.get(key)
        if h is None:
            h = self._hist[key] = History()
            self._keys.add(key)
        h.revs.append(rev)
        h.kvs.append(kv)
        return kv

    def _erase(self, key: bytes, rev: int) -> KeyValue:
        """Record a tombstone of live key at rev; returns the deleted KeyValue."""
        prev = self._live.pop(key)
        self._live_keys.remove(key)
        if prev.lease:
            self._detach(prev.lease, key)
        h = self._hist[key]
        h.revs.append(rev)
        h.kvs.append(None)
        return prev

    def _detach(self, lease: int, key: bytes) -> None:
        keys = self._by_lease[lease]
        keys.discard(key)
        if not keys:
            del self._by_lease[lease]

    def keys_of_lease(self, lease: int) -> list[bytes]:
        """The live keys attached to `lease`, sorted. O(k log k)."""
        return sorted(self._by_lease.get(lease, ()))

    def delete_keys(self, keys: Sequence[bytes]) -> tuple[DeleteRangeResponse, list[Event]]:
        """Delete the live `keys` (sorted, distinct) at one revision, in that order: a
        lease's revoke (etcd's lessor deletes its keys sorted, in one txn). Nothing to
        delete keeps the revision. O(k log n)."""
        if not keys:
            return DeleteRangeResponse(self.rev, 0, []), []
        rev = self.rev + 1
        prevs = [self._erase(k, rev) for k in keys]
        events = [Event(DELETE, KeyValue(p.key, b"", 0, rev, 0, 0), p) for p in prevs]
        self.rev = rev
        self._log.append(keys[0] if len(keys) == 1 else tuple(keys))
        return DeleteRangeResponse(rev, len(keys), []), events

    def delete_range(
        self, key: bytes, end: bytes | None = None, *, prev_kv: bool = False
    ) -> tuple[DeleteRangeResponse, list[Event]]:
        """etcd DeleteRange of [key, end) (end as in `range`). Returns (response, DELETE
        events in key order). Deleting nothing keeps the revision. Raises EmptyKeyError.

        Complexity: O(log n + k log n).
        """
        if not key:
            raise EmptyKeyError()
        resp, events = self.delete_keys(self._live_keys_in(key, end))
        if prev_kv:
            resp.prev_kvs = [e.prev_kv for e in events]
        return resp, events

    # ------------------------------------------------------------------ txn

    def txn(
        self, compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]
    ) -> tuple[TxnResponse, list[Event]]:
        """etcd Txn: if every compare holds, run `success`, else `failure`, atomically.

        All changes share one new revision (none if nothing changed); ops see the effects
        of earlier ops. See the module docstring for validation order, inner response
        revisions and event prev_kv. Raises TooManyOpsError, EmptyKeyError,
        ValueProvidedError, DuplicateKeyError, KeyNotFoundError, FutureRevisionError,
        CompactedError -- always before anything is applied.

        Complexity: O(validation + compares + ops), each op as its standalone call; the
        duplicate-key check is O(puts * range deletes) of the request.
        """
        _check_txn_request(compare, success, failure, MAX_TXN_OPS)
        _check_intervals(success)
        _check_intervals(failure)
        plan = self._plan(compare, success, failure)
        self._check_plan_puts(plan, [])
        self._check_plan_ranges(plan)
        ctx = _TxnCtx(self.rev)
        resp = self._apply_plan(plan, ctx)
        if ctx.changed:
            self.rev = ctx.new
            keys = ctx.keys
            self._log.append(keys[0] if len(keys) == 1 else tuple(keys))
        resp.revision = self.rev
        return resp, ctx.events

    def _plan(self, compare, success, failure) -> tuple:
        """(succeeded, [(op, nested plan or None)]) for the chosen path (compareToPath)."""
        ok = all(self._compare(c) for c in compare)
        ops = success if ok else failure
        return ok, [
            (op, self._plan(op.compare, op.success, op.failure) if type(op) is TxnOp else None)
            for op in ops
        ]

    def _compare(self, c: Compare) -> bool:
        """etcd applyCompare against the live state."""
        if c.range_end is None:
            kv = self._live.get(c.key)
            return compare_holds(c, [kv] if kv is not None else [])
        return compare_holds(c, [self._live[k] for k in self._live_keys_in(c.key, c.range_end)])

    def _check_plan_puts(self, plan, dels: list) -> None:
        """etcd checkRequestPut over the chosen path, op by op: ignore_value or
        ignore_lease needs the key to exist before the txn, then the lease must exist.
        `dels` collects the path's earlier delete ranges: a key one of them removed
        would make etcd panic mid-txn; we refuse the txn instead."""
        for op, sub in plan[1]:
            t = type(op)
            if t is PutOp:
                if (op.ignore_value or op.ignore_lease) and (
                    op.key not in self._live or any(_covers(d, op.key) for d in dels)
                ):
                    raise KeyNotFoundError()
                if op.lease and not self.lease_exists(op.lease):
                    raise LeaseNotFoundError()
            elif t is DeleteOp:
                dels.append((op.key, op.range_end))
            elif t is TxnOp:
                self._check_plan_puts(sub, dels)

    def _check_plan_ranges(self, plan) -> None:
        """etcd checkRequestRange over the chosen path."""
        for op, sub in plan[1]:
            t = type(op)
            if t is RangeOp:
                if op.revision == 0:
                    continue
                if op.revision > self.rev:
                    raise FutureRevisionError()
                if op.revision < self._compact_main:
                    raise CompactedError()
            elif t is TxnOp:
                self._check_plan_ranges(sub)

    def _apply_plan(self, plan, ctx: _TxnCtx) -> TxnResponse:
        ok, ops = plan
        responses: list = []
        live = self._live
        for op, sub in ops:
            t = type(op)
            if t is RangeOp:
                cur = ctx.new if ctx.changed else ctx.begin
                responses.append(self._range(op, cur))
            elif t is PutOp:
                key = op.key
                prev = live.get(key)
                value = prev.value if op.ignore_value else op.value  # prev checked in plan
                lease = prev.lease if op.ignore_lease else op.lease
                if key not in ctx.pre:
                    ctx.pre[key] = prev
                kv = self._write(key, value, ctx.new, prev, lease)
                ctx.changed = True
                ctx.keys.append(key)
                ctx.events.append(Event(PUT, kv, None if kv.version == 1 else ctx.pre[key]))
                responses.append(PutResponse(ctx.new, prev if op.prev_kv else None))
            elif t is DeleteOp:
                keys = self._live_keys_in(op.key, op.range_end)
                prevs = []
                for k in keys:
                    if k not in ctx.pre:
                        ctx.pre[k] = live[k]
                    prevs.append(self._erase(k, ctx.new))
                    ctx.events.append(Event(DELETE, KeyValue(k, b"", 0, ctx.new, 0, 0), ctx.pre[k]))
                if keys:
                    ctx.changed = True
                    ctx.keys.extend(keys)
                responses.append(
                    DeleteRangeResponse(
                        ctx.new if ctx.changed else ctx.begin,
                        len(keys),
                        prevs if op.prev_kv else [],
                    )
                )
            elif t is TxnOp:
                inner = self._apply_plan(sub, ctx)
                inner.revision = 0  # etcd never fills a nested txn's response header
                responses.append(inner)
            else:  # pragma: no cover - rejected by validation
                raise ProtocolError("shmwatch: unknown txn op")
        return TxnResponse(0, ok, responses)

    # ------------------------------------------------------------------ compaction

    def compact(self, revision: int) -> CompactResponse:
        """etcd Compact: forget history before `revision` (see the module docstring: a
        tombstone at or below `revision` goes with everything before it, also one at
        exactly `revision`). Reads at `revision` and later are unaffected.

        Raises CompactedError (revision <= the last compaction revision; compact(0) is
        accepted once on a never-compacted store, as etcd does), FutureRevisionError
        (revision > current). Response revision = current revision.

        Complexity: O(c log h + d log n) (d = keys that vanish), amortized O(changes):
        only keys changed since the previous compaction are visited.
        """
        if revision <= self._compact_main:
            raise CompactedError()
        if revision > self.rev:
            raise FutureRevisionError()
        self._compact_main = revision
        log = self._log
        touched: set[bytes] = set()
        while log and self._log_start <= revision:
            entry = log.popleft()
            self._log_start += 1
            if type(entry) is bytes:
                touched.add(entry)
            else:
                touched.update(entry)
        hist = self._hist
        for key in touched:
            h = hist.get(key)
            if h is None:
                continue
            revs = h.revs
            i = bisect_right(revs, revision) - 1
            if i < 0:
                continue
            cut = i + 1 if h.kvs[i] is None else i
            if cut:
                del revs[:cut]
                del h.kvs[:cut]
                if not revs:
                    del hist[key]
                    self._keys.remove(key)
        return CompactResponse(self.rev)

    # ------------------------------------------------------------------ dispatch

    def apply(self, op: Op):
        """Run a PutOp / RangeOp / DeleteOp / TxnOp; returns (response, events) -- events
        are [] for a range. Complexity: that of the call it dispatches to."""
        t = type(op)
        if t is PutOp:
            return self.put(op.key, op.value, prev_kv=op.prev_kv, ignore_value=op.ignore_value,
                            lease=op.lease, ignore_lease=op.ignore_lease)
        if t is RangeOp:
            if not op.key:
                raise EmptyKeyError()
            if op.revision > self.rev:
                raise FutureRevisionError()
            return self._range(op, self.rev), []
        if t is DeleteOp:
            return self.delete_range(op.key, op.range_end, prev_kv=op.prev_kv)
        if t is TxnOp:
            return self.txn(op.compare, op.success, op.failure)
        raise ProtocolError(f"shmwatch: unknown op {t.__name__}")

    # ------------------------------------------------------------------ durability

    def snapshot(self) -> dict:
        """The whole state as data (see broker.mvcc_state.snapshot). O(retained versions)."""
        return mvcc_state.snapshot(self)

    @classmethod
    def restore(cls, data: dict) -> MVCCStore:
        """Rebuild a store from `snapshot()` data; ValueError if it is inconsistent."""
        return mvcc_state.restore(cls(), data)

    def _check(self) -> None:
        """Assert every internal invariant (raises AssertionError, also under -O). O(N)."""
        mvcc_state.check(self)

def _no_leases(_lease: int) -> bool:
    """A store on its own knows no lease: every lease is "not found"."""
    return False


def events_at_compact_rev(events: Sequence[Event]) -> list[Event]:
    """The events of revision ``compact_rev`` as etcd 3.4 still delivers them to a watch
    replaying history after ``compact(compact_rev)``.

    etcd's compaction keeps, at the compact revision, only the versions that are still
    the newest of their key at that revision (checked on etcd 3.4.23): every DELETE goes,
    and so does a PUT that a later change of the same revision deleted (a txn that puts
    k and then deletes it). And etcd's watch looks prev_kv up at ``rev - 1``, below the
    compaction, which fails: the surviving PUTs come without prev_kv. O(len(events)).
    """
    last = {e.kv.key: i for i, e in enumerate(events)}
    return [
        e._replace(prev_kv=None) if e.prev_kv is not None else e
        for i, e in enumerate(events)
        if e.type == PUT and last[e.kv.key] == i
    ]
