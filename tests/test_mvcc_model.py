"""Model-based test of broker.mvcc.MVCCStore against a naive reference.

The reference keeps the full history as a flat list of (revision, key, KeyValue or None)
and recomputes every read from it; compaction only moves the "compacted" mark. Random
puts, deletes, range deletes, nested txns, compactions and snapshot round trips run on
both; responses, events, errors, and reads at retained revisions must agree, and the
store's invariants must hold after every step.
"""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.mvcc import MVCCStore, events_at_compact_rev
from shmwatch.wire.errors import (
    CompactedError,
    DuplicateKeyError,
    FutureRevisionError,
    KeyNotFoundError,
    LeaseNotFoundError,
    LeaseProvidedError,
    ShmwatchError,
    ValueProvidedError,
)
from shmwatch.wire.ops import Compare, DeleteOp, PutOp, RangeOp, TxnOp
from shmwatch.wire.types import (
    CompactResponse,
    DeleteRangeResponse,
    Event,
    KeyValue,
    PutResponse,
    RangeResponse,
    TxnResponse,
)

KEYS = [b"a", b"ab", b"b", b"c", b"d"]
ENDS = [None, None, None, b"\0", b"b", b"c", b"e", b"a"]  # b"a": often an empty range
VALUES = [b"", b"x", b"y"]
LEASES = frozenset({7, 8})  # the leases that exist (lease 9 never does)


def in_range(k: bytes, key: bytes, end: bytes | None) -> bool:
    if end is None:
        return k == key
    if end == b"\0":
        return k >= key
    return key <= k < end


class Model:
    """etcd semantics, the slow and obvious way."""

    def __init__(self) -> None:
        self.rev = 1
        self.compacted = -1  # etcd's compactMainRev
        self.hist: list[tuple[int, bytes, KeyValue | None]] = []

    def at(self, rev: int) -> dict[bytes, KeyValue]:
        state: dict[bytes, KeyValue] = {}
        for r, k, v in self.hist:
            if r > rev:
                break
            if v is None:
                del state[k]
            else:
                state[k] = v
        return state

    def read(self, state, op: RangeOp, cur) -> RangeResponse:
        kvs = [state[k] for k in sorted(state) if in_range(k, op.key, op.range_end)]
        count = len(kvs)  # etcd counts the range before its revision filters
        if op.count_only:
            return RangeResponse(cur, [], count, False)
        kvs = [kv for kv in kvs
               if (not op.min_mod_revision or kv.mod_revision >= op.min_mod_revision)
               and (not op.max_mod_revision or kv.mod_revision <= op.max_mod_revision)
               and (not op.min_create_revision or kv.create_revision >= op.min_create_revision)
               and (not op.max_create_revision or kv.create_revision <= op.max_create_revision)]
        order = op.sort_order
        if order == "NONE" and op.sort_target != "KEY":
            order = "ASCEND"
        if order != "NONE":
            field = {"KEY": "key", "VERSION": "version", "CREATE": "create_revision",
                     "MOD": "mod_revision", "VALUE": "value"}[op.sort_target]
            kvs.sort(key=lambda kv: getattr(kv, field), reverse=order == "DESCEND")
        more = 0 < op.limit < len(kvs)
        if op.limit > 0:
            kvs = kvs[:op.limit]
        if op.keys_only:
            kvs = [k._replace(value=b"") for k in kvs]
        return RangeResponse(cur, kvs, count, more)

    def range(self, op: RangeOp):
        if op.revision > self.rev:
            raise FutureRevisionError()
        rev = op.revision if op.revision > 0 else self.rev
        if rev < self.compacted:
            raise CompactedError()
        return self.read(self.at(rev), op, self.rev), []

    def put(self, key, value, prev_kv, ignore_value, lease=0, ignore_lease=False):
        op = PutOp(key, value, prev_kv, ignore_value, lease, ignore_lease)
        self._validate(TxnOp((), (op,), ()))
        if lease and lease not in LEASES:  # a lone put looks the lease up first
            raise LeaseNotFoundError()
        return self._single(op)

    def delete(self, key, end, prev_kv):
        return self._single(DeleteOp(key, end, prev_kv))

    def _single(self, op):
        resp, events = self.txn(TxnOp((), (op,), ()))
        return resp.responses[0], events

    def compact(self, rev):
        if rev <= self.compacted:
            raise CompactedError()
        if rev > self.rev:
            raise FutureRevisionError()
        self.compacted = rev
        return CompactResponse(self.rev)

    # -- txn

    def _validate(self, t: TxnOp) -> None:
        """etcd's checkTxnRequest, minus what the strategies never produce (too many
        ops, empty keys): an ignore_value put with a value, an ignore_lease put with a
        lease, anywhere in the request (the first such op decides)."""
        for op in t.success + t.failure:
            if type(op) is TxnOp:
                self._validate(op)
            elif type(op) is PutOp and op.ignore_value and op.value:
                raise ValueProvidedError()
            elif type(op) is PutOp and op.ignore_lease and op.lease:
                raise LeaseProvidedError()

    def txn(self, t: TxnOp):
        self._validate(t)
        for branch in (t.success, t.failure):
            self._no_dups(branch)
        before = self.at(self.rev)
        work = dict(before)
        ctx = {"changed": False, "events": [], "puterr": None, "badrange": None}
        begin, new = self.rev, self.rev + 1
        resp = self._run(t, before, work, ctx, begin, new)
        if ctx["puterr"]:  # every put is checked before any range (the first one counts)
            raise ctx["puterr"]
        if ctx["badrange"]:
            raise ctx["badrange"]
        if ctx["changed"]:
            self.rev = new
            for ev in ctx["events"]:
                self.hist.append((new, ev.kv.key, ev.kv if ev.type == "PUT" else None))
        resp.revision = self.rev
        return resp, ctx["events"]

    def _holds(self, c: Compare, before) -> bool:
        kvs = [before[k] for k in sorted(before) if in_range(k, c.key, c.range_end)]
        if not kvs:
            if c.target == "VALUE":
                return False
            kvs = [KeyValue(c.key)]
        field = {
            "VALUE": "value",
            "VERSION": "version",
            "CREATE": "create_revision",
            "MOD": "mod_revision",
            "LEASE": "lease",
        }[c.target]
        ops = {
            "EQUAL": lambda a, b: a == b,
            "NOT_EQUAL": lambda a, b: a != b,
            "GREATER": lambda a, b: a > b,
            "LESS": lambda a, b: a < b,
        }
        return all(ops[c.result](getattr(kv, field), c.value) for kv in kvs)

    def _run(self, t: TxnOp, before, work, ctx, begin, new) -> TxnResponse:
        ok = all(self._holds(c, before) for c in t.compare)
        out = []
        for op in t.success if ok else t.failure:
            if type(op) is RangeOp:
                cur = new if ctx["changed"] else begin
                bad = None
                if op.revision > begin:
                    bad = FutureRevisionError()
                elif op.revision != 0 and op.revision < self.compacted:
                    bad = CompactedError()
                if bad is not None:
                    ctx["badrange"] = ctx["badrange"] or bad  # the first one counts
                    out.append(None)
                    continue
                state = work if op.revision <= 0 else self.at(op.revision)
                out.append(self.read(state, op, cur))
            elif type(op) is PutOp:
                prev = work.get(op.key)
                bad = None
                if (op.ignore_value or op.ignore_lease) and prev is None:
                    bad = KeyNotFoundError()
                elif op.lease and op.lease not in LEASES:
                    bad = LeaseNotFoundError()
                if bad is not None:
                    ctx["puterr"] = ctx["puterr"] or bad
                    out.append(None)
                    continue
                value = prev.value if op.ignore_value else op.value
                lease = prev.lease if op.ignore_lease else op.lease
                if prev is None:
                    kv = KeyValue(op.key, value, new, new, 1, lease)
                else:
                    kv = KeyValue(op.key, value, prev.create_revision, new, prev.version + 1,
                                  lease)
                work[op.key] = kv
                ctx["changed"] = True
                ctx["events"].append(
                    Event("PUT", kv, None if kv.version == 1 else before.get(op.key))
                )
                out.append(PutResponse(new, prev if op.prev_kv else None))
            elif type(op) is DeleteOp:
                gone = [work[k] for k in sorted(work) if in_range(k, op.key, op.range_end)]
                for p in gone:
                    del work[p.key]
                    tomb = KeyValue(p.key, b"", 0, new, 0)
                    ctx["events"].append(Event("DELETE", tomb, before.get(p.key)))
                ctx["changed"] = ctx["changed"] or bool(gone)
                rev = new if ctx["changed"] else begin
                out.append(DeleteRangeResponse(rev, len(gone), gone if op.prev_kv else []))
            else:
                inner = self._run(op, before, work, ctx, begin, new)
                inner.revision = 0
                out.append(inner)
        return TxnResponse(0, ok, out)

    def _no_dups(self, ops) -> tuple[set, list]:
        """etcd's checkIntervals, spelled out: deletes as literal [key, end) intervals."""

        def hit(dels, k):
            for key, end in dels:
                if end is None and k == key:
                    return True
                if end is not None and key <= k < end:  # b"\0" end: never (literal)
                    return True
            return False

        dels = [(op.key, op.range_end) for op in ops if type(op) is DeleteOp]
        puts: set = set()
        for op in ops:
            if type(op) is TxnOp:
                p1, d1 = self._no_dups(op.success)
                p2, d2 = self._no_dups(op.failure)
                for k in p1:
                    if k in puts or hit(dels, k):
                        raise DuplicateKeyError()
                    puts.add(k)
                for k in p2:
                    if (k in puts and k not in p1) or hit(dels, k):
                        raise DuplicateKeyError()
                    puts.add(k)
                dels += d1 + d2
        for op in ops:
            if type(op) is PutOp:
                if op.key in puts or hit(dels, op.key):
                    raise DuplicateKeyError()
                puts.add(op.key)
        return puts, dels


# ---------------------------------------------------------------------- strategies

keys = st.sampled_from(KEYS)
ends = st.sampled_from(ENDS)
values = st.sampled_from(VALUES)
leases = st.sampled_from([0, 0, 0, 7, 8, 9])  # 9: never granted (an error)
plain_puts = st.builds(PutOp, keys, values, st.booleans(), st.just(False), leases,
                       st.just(False))
ignore_puts = st.builds(PutOp, keys, st.just(b""), st.booleans(), st.just(True), leases,
                        st.just(False))
keep_lease_puts = st.builds(PutOp, keys, values, st.booleans(), st.booleans(), st.just(0),
                            st.just(True))
puts = st.one_of(
    *[plain_puts] * 6,
    ignore_puts,
    ignore_puts,
    keep_lease_puts,
    st.builds(PutOp, keys, st.just(b"x"), st.booleans(), st.just(True)),  # rare: an error
    st.builds(PutOp, keys, values, st.booleans(), st.just(False), st.sampled_from([7, 9]),
              st.just(True)),  # rare: lease is provided
)
deletes = st.builds(DeleteOp, keys, ends, st.booleans())
ranges = st.builds(
    RangeOp, keys, ends, st.integers(-1, 14), st.integers(0, 3), st.booleans(), st.booleans(),
    st.sampled_from(["NONE", "NONE", "ASCEND", "DESCEND"]),
    st.sampled_from(["KEY", "KEY", "VERSION", "CREATE", "MOD", "VALUE"]),
    st.sampled_from([0, 0, 3, 6]), st.sampled_from([0, 0, 5, 9]),
    st.sampled_from([0, 0, 3, 6]), st.sampled_from([0, 0, 5, 9]),
)
compares = st.one_of(
    st.builds(
        Compare, keys, st.just("VALUE"),
        st.sampled_from(["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]), values, ends,
    ),
    st.builds(
        Compare, keys, st.sampled_from(["VERSION", "CREATE", "MOD", "LEASE"]),
        st.sampled_from(["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]), st.integers(0, 6), ends,
    ),
)  # fmt: skip


def _txn(children):
    return st.builds(
        TxnOp,
        st.lists(compares, max_size=2).map(tuple),
        st.lists(children, max_size=3).map(tuple),
        st.lists(children, max_size=2).map(tuple),
    )


request_ops = st.recursive(st.one_of(puts, deletes, ranges), _txn, max_leaves=6)
txns = _txn(request_ops)


def same(store_call, model_call):
    """Both raise the same error class, or both return equal results (returned)."""
    try:
        expected = model_call()
    except ShmwatchError as e:
        try:
            store_call()
        except ShmwatchError as got:
            assert type(got) is type(e), (got, e)
            return None
        raise AssertionError(f"store did not raise {type(e).__name__}") from None
    got = store_call()
    assert got == expected
    return got


class MVCCMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MVCCStore()
        self.store.lease_exists = LEASES.__contains__
        self.model = Model()
        self.events: dict[int, list[Event]] = {}  # revision -> the events it produced

    def write(self, store_call, model_call):
        result = same(store_call, model_call)
        if result is not None and result[1]:
            assert self.store.rev not in self.events
            assert {e.kv.mod_revision for e in result[1]} == {self.store.rev}
            self.events[self.store.rev] = result[1]

    @rule(key=keys, value=values, prev_kv=st.booleans(), ignore=st.booleans(),
          lease=leases, keep=st.sampled_from([False, False, True]))
    def put(self, key, value, prev_kv, ignore, lease, keep):
        self.write(
            lambda: self.store.put(key, value, prev_kv=prev_kv, ignore_value=ignore,
                                   lease=lease, ignore_lease=keep),
            lambda: self.model.put(key, value, prev_kv, ignore, lease, keep),
        )

    @rule(key=keys, value=values)
    def put_plain(self, key, value):
        self.write(
            lambda: self.store.put(key, value), lambda: self.model.put(key, value, False, False)
        )

    @rule(key=keys, end=ends, prev_kv=st.booleans())
    def delete(self, key, end, prev_kv):
        self.write(
            lambda: self.store.delete_range(key, end, prev_kv=prev_kv),
            lambda: self.model.delete(key, end, prev_kv),
        )

    @rule(t=txns)
    def txn(self, t):
        self.write(lambda: self.store.apply(t), lambda: self.model.txn(t))

    @rule(first=deletes, then=st.lists(st.one_of(plain_puts, ranges, deletes), max_size=3))
    def txn_delete_then_write(self, first, then):
        """Aims at one txn changing a key twice: a from-key delete escapes the dup check."""
        t = TxnOp((), (first._replace(range_end=b"\0"), *then), ())
        self.write(lambda: self.store.apply(t), lambda: self.model.txn(t))

    @rule(before=st.lists(st.one_of(puts, ranges), max_size=3), last=deletes)
    def txn_write_then_delete(self, before, last):
        t = TxnOp((), (*before, last._replace(range_end=b"\0")), ())
        self.write(lambda: self.store.apply(t), lambda: self.model.txn(t))

    @rule(back=st.integers(-1, 4))
    def compact(self, back):
        rev = self.model.rev - back
        if same(lambda: self.store.compact(rev), lambda: self.model.compact(rev)) is None:
            return
        # what a watch replaying revision `rev` still gets == what compaction kept there
        kept = sorted(
            kv for h in self.store._hist.values() for r, kv in zip(h.revs, h.kvs) if r == rev
        )
        delivered = events_at_compact_rev(self.events.get(rev, []))
        assert all(e.prev_kv is None for e in delivered)
        assert sorted(e.kv for e in delivered) == kept

    @rule(op=ranges, back=st.integers(-1, 8), relative=st.booleans())
    def read(self, op, back, relative):
        if relative:  # aim at the retained window
            op = op._replace(revision=self.model.rev - back)
        same(lambda: self.store.apply(op), lambda: self.model.range(op))

    @rule()
    def snapshot_round_trip(self):
        blob = msgpack.packb(self.store.snapshot())
        self.store = MVCCStore.restore(msgpack.unpackb(blob, strict_map_key=False))
        self.store.lease_exists = LEASES.__contains__

    @invariant()
    def agrees(self):
        s, m = self.store, self.model
        s._check()
        assert s.rev == m.rev
        assert s.compact_rev == max(0, m.compacted)
        first = max(1, m.compacted)
        for rev in {first, *range(max(first, m.rev - 4), m.rev + 1)}:
            got = s.range(b"\0", b"\0", revision=rev)
            state = m.at(rev)
            assert got.kvs == [state[k] for k in sorted(state)], rev
        live = m.at(m.rev)
        for lease in (7, 8, 9):  # the store's lease index is the live keys' leases
            assert s.keys_of_lease(lease) == sorted(k for k, kv in live.items()
                                                    if kv.lease == lease)
        if m.compacted > 1:
            try:
                s.range(b"\0", b"\0", revision=m.compacted - 1)
            except CompactedError:
                pass
            else:
                raise AssertionError("read below the compaction revision worked")


MVCCMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMVCCModel = MVCCMachine.TestCase
