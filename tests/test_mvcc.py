"""Unit tests of broker.mvcc.MVCCStore: every rule, as observed on a real etcd 3.4.23."""

from __future__ import annotations

import msgpack
import pytest

from broker.mvcc import MAX_TXN_OPS, MVCCStore, events_at_compact_rev
from shmwatch.wire.errors import (
    CompactedError,
    DuplicateKeyError,
    EmptyKeyError,
    FutureRevisionError,
    KeyNotFoundError,
    TooManyOpsError,
    ValueProvidedError,
)
from shmwatch.wire.ops import (
    DeleteOp,
    PutOp,
    RangeOp,
    TxnOp,
    compare_create,
    compare_lease,
    compare_mod,
    compare_value,
    compare_version,
    op_delete,
    op_get,
    op_put,
    op_txn,
)
from shmwatch.wire.types import (
    CompactResponse,
    DeleteRangeResponse,
    Event,
    KeyValue,
    PutResponse,
    RangeResponse,
    TxnResponse,
)

ALL = b"\0"


def kv(key, value, create, mod, version):
    return KeyValue(key, value, create, mod, version, 0)


def tomb(key, rev):
    return KeyValue(key, b"", 0, rev, 0, 0)


@pytest.fixture
def s():
    store = MVCCStore()
    yield store
    store._check()
    # every state survives a snapshot round trip through msgpack
    data = msgpack.unpackb(msgpack.packb(store.snapshot()), raw=False, strict_map_key=False)
    copy = MVCCStore.restore(data)
    assert copy.snapshot() == store.snapshot()


def keys(resp):
    return [k.key for k in resp.kvs]


# ---------------------------------------------------------------------- revisions, put


def test_fresh_store(s):
    assert s.rev == 1 and s.compact_rev == 0
    assert s.range(b"a") == RangeResponse(1, [], 0, False)
    assert s.range(b"a", ALL) == RangeResponse(1, [], 0, False)


def test_put_versions_and_events(s):
    r, ev = s.put(b"a", b"1")
    assert r == PutResponse(2, None)
    assert ev == [Event("PUT", kv(b"a", b"1", 2, 2, 1), None)]
    r, ev = s.put(b"a", b"2", prev_kv=True)
    assert r == PutResponse(3, kv(b"a", b"1", 2, 2, 1))
    assert ev == [Event("PUT", kv(b"a", b"2", 2, 3, 2), kv(b"a", b"1", 2, 2, 1))]
    r, ev = s.put(b"a", b"3")
    assert r.prev_kv is None  # only with prev_kv=True
    assert ev[0].prev_kv == kv(b"a", b"2", 2, 3, 2)  # events always carry it
    assert s.range(b"a").kvs == [kv(b"a", b"3", 2, 4, 3)]
    assert s.rev == 4


def test_delete_then_recreate_resets_version_and_create(s):
    s.put(b"a", b"1")
    s.put(b"a", b"2")
    r, ev = s.delete_range(b"a", prev_kv=True)
    assert r == DeleteRangeResponse(4, 1, [kv(b"a", b"2", 2, 3, 2)])
    assert ev == [Event("DELETE", tomb(b"a", 4), kv(b"a", b"2", 2, 3, 2))]
    assert s.range(b"a").kvs == []
    r, ev = s.put(b"a", b"x", prev_kv=True)
    assert r == PutResponse(5, None)
    assert ev == [Event("PUT", kv(b"a", b"x", 5, 5, 1), None)]
    assert s.range(b"a", revision=3).kvs == [kv(b"a", b"2", 2, 3, 2)]
    assert s.range(b"a", revision=4).kvs == []


def test_noop_delete_keeps_revision(s):
    s.put(b"a", b"1")
    assert s.delete_range(b"zz") == (DeleteRangeResponse(2, 0, []), [])
    assert s.delete_range(b"b", b"c", prev_kv=True) == (DeleteRangeResponse(2, 0, []), [])
    assert s.delete_range(b"b", b"a") == (DeleteRangeResponse(2, 0, []), [])  # key >= end
    assert s.rev == 2


def test_delete_range_events_in_key_order(s):
    for k in (b"c", b"a", b"b", b"d"):
        s.put(k, k)
    r, ev = s.delete_range(b"a", b"d")
    assert r == DeleteRangeResponse(6, 3, [])
    assert [e.kv for e in ev] == [tomb(b"a", 6), tomb(b"b", 6), tomb(b"c", 6)]
    assert [e.prev_kv.key for e in ev] == [b"a", b"b", b"c"]
    r, ev = s.delete_range(b"a", ALL)
    assert r.deleted == 1 and ev[0].kv == tomb(b"d", 7)


def test_ignore_value(s):
    with pytest.raises(KeyNotFoundError):
        s.put(b"a", b"", ignore_value=True)
    with pytest.raises(ValueProvidedError):
        s.put(b"a", b"v", ignore_value=True)  # checked before the key lookup
    s.put(b"a", b"1")
    with pytest.raises(ValueProvidedError):
        s.put(b"a", b"v", ignore_value=True)
    r, ev = s.put(b"a", b"", ignore_value=True, prev_kv=True)
    assert r == PutResponse(3, kv(b"a", b"1", 2, 2, 1))
    assert ev[0].kv == kv(b"a", b"1", 2, 3, 2)
    assert s.rev == 3


def test_empty_key(s):
    with pytest.raises(EmptyKeyError):
        s.put(b"", b"x")
    with pytest.raises(EmptyKeyError):
        s.range(b"")
    with pytest.raises(EmptyKeyError):
        s.range(b"", b"z")
    with pytest.raises(EmptyKeyError):
        s.delete_range(b"", b"z")
    assert s.rev == 1


# ---------------------------------------------------------------------- ranges


@pytest.fixture
def abc(s):
    for k in (b"a", b"b", b"c", b"c1", b"d"):
        s.put(k, k + b"v")  # revisions 2..6
    return s


def test_range_forms(abc):
    s = abc
    assert keys(s.range(b"b")) == [b"b"]
    assert keys(s.range(b"bb")) == []
    assert keys(s.range(b"b", b"d")) == [b"b", b"c", b"c1"]
    assert keys(s.range(b"c", ALL)) == [b"c", b"c1", b"d"]
    assert keys(s.range(b"\0", ALL)) == [b"a", b"b", b"c", b"c1", b"d"]
    assert keys(s.range(b"c", b"c\xff")) == [b"c", b"c1"]  # a prefix
    assert s.range(b"d", b"b") == RangeResponse(6, [], 0, False)  # key >= end
    assert s.range(b"b", b"b") == RangeResponse(6, [], 0, False)


def test_range_limit_count_more(abc):
    s = abc
    r = s.range(b"a", ALL, limit=2)
    assert keys(r) == [b"a", b"b"] and r.count == 5 and r.more
    r = s.range(b"a", ALL, limit=5)
    assert len(r.kvs) == 5 and r.count == 5 and not r.more
    r = s.range(b"a", ALL, limit=-1)  # etcd: a limit <= 0 is no limit
    assert len(r.kvs) == 5 and not r.more
    r = s.range(b"a", ALL, count_only=True, limit=1)
    assert r == RangeResponse(6, [], 5, False)  # etcd: more stays false with count_only
    r = s.range(b"a", b"c", keys_only=True)
    assert r.kvs == [kv(b"a", b"", 2, 2, 1), kv(b"b", b"", 3, 3, 1)]
    r = s.range(b"a", ALL, count_only=True, revision=3)
    assert r == RangeResponse(6, [], 2, False)
    r = s.range(b"a", ALL, limit=1, revision=4, keys_only=True)
    assert r == RangeResponse(6, [kv(b"a", b"", 2, 2, 1)], 3, True)


def test_range_past_revision_reports_current(abc):
    s = abc
    s.put(b"b", b"new")  # 7
    s.delete_range(b"a")  # 8
    r = s.range(b"a", ALL, revision=6)
    assert r.revision == 8
    assert [(k.key, k.value) for k in r.kvs] == [
        (b"a", b"av"),
        (b"b", b"bv"),
        (b"c", b"cv"),
        (b"c1", b"c1v"),
        (b"d", b"dv"),
    ]
    assert keys(s.range(b"a", ALL, revision=2)) == [b"a"]
    assert s.range(b"a", ALL, revision=1).kvs == []
    assert s.range(b"b", revision=7).kvs == [kv(b"b", b"new", 3, 7, 2)]
    assert s.range(b"a", revision=8).kvs == []
    assert s.range(b"a", revision=-5).revision == 8  # negative: current, as etcd


def test_range_future(abc):
    with pytest.raises(FutureRevisionError):
        abc.range(b"a", revision=7)
    assert abc.range(b"a", revision=6).count == 1


# ---------------------------------------------------------------------- txn


def test_txn_compare_targets(s):
    s.put(b"c1", b"b")  # 2
    s.put(b"c2", b"d")  # 3
    s.put(b"c2", b"e")  # 4  c1: v1 create 2 mod 2; c2: v2 create 3 mod 4

    def ok(*cmps):
        r, ev = s.txn(cmps, [], [])
        assert ev == [] and r.revision == 4
        return r.succeeded

    assert ok(compare_value(b"c1", "=", b"b"))
    assert ok(compare_value(b"c1", ">", b"a"))
    assert ok(compare_value(b"c1", "<", b"c"))
    assert not ok(compare_value(b"c1", "!=", b"b"))
    assert ok(compare_version(b"c2", "=", 2))
    assert ok(compare_version(b"c2", ">", 1))
    assert not ok(compare_version(b"c2", "<", 2))
    assert ok(compare_create(b"c2", "=", 3))
    assert ok(compare_mod(b"c2", "=", 4))
    assert ok(compare_mod(b"c2", "!=", 3))
    assert ok(compare_lease(b"c1", "=", 0))
    # missing key: VALUE always fails, numbers compare as 0
    assert not ok(compare_value(b"nope", "!=", b"zz"))
    assert not ok(compare_value(b"nope", "=", b""))
    assert ok(compare_version(b"nope", "=", 0))
    assert ok(compare_create(b"nope", "=", 0))
    assert ok(compare_mod(b"nope", "<", 1))
    assert ok(compare_lease(b"nope", "=", 0))
    # range compares: every key must satisfy
    assert ok(compare_version(b"c1", ">", 0, b"c3"))
    assert not ok(compare_version(b"c1", "=", 1, b"c3"))
    assert ok(compare_value(b"c1", ">", b"a", b"c3"))
    assert not ok(compare_value(b"c1", "<", b"c", ALL))
    assert ok(compare_mod(b"c", ">", 0, ALL))
    assert not ok(compare_value(b"x1", ">", b"a", b"x3"))  # empty range: VALUE fails
    assert ok(compare_version(b"x1", "=", 0, b"x3"))  # empty range: compares 0
    # all compares must hold
    assert not ok(compare_version(b"c1", "=", 1), compare_version(b"c2", "=", 1))
    assert ok(compare_version(b"c1", "=", 1), compare_version(b"c2", "=", 2))
    assert ok()  # no compares: success


def test_txn_branches(s):
    s.put(b"k", b"1")
    r, ev = s.txn([compare_value(b"k", "=", b"1")], [op_put(b"a", b"s")], [op_put(b"a", b"f")])
    assert r.succeeded and r.revision == 3 and ev[0].kv.value == b"s"
    r, ev = s.txn([compare_value(b"k", "=", b"2")], [op_put(b"a", b"s")], [op_put(b"a", b"f")])
    assert not r.succeeded and r.revision == 4 and ev[0].kv == kv(b"a", b"f", 3, 4, 2)


def test_txn_atomic_revision_and_inner_revisions(s):
    s.put(b"m", b"2")  # 2
    r, ev = s.txn(
        [],
        [
            op_get(b"m"),
            op_delete(b"nokey"),
            op_put(b"t1", b"v"),
            op_get(b"m"),
            op_delete(b"nokey"),
            op_txn([], [op_get(b"m"), op_put(b"t2", b"v")]),
            op_delete(b"t1x", prev_kv=True),
        ],
        [],
    )
    assert r.revision == 3 and r.succeeded
    inner = r.responses
    assert isinstance(inner[0], RangeResponse) and inner[0].revision == 2
    assert inner[1] == DeleteRangeResponse(2, 0, [])  # no change yet: begin revision
    assert inner[2] == PutResponse(3, None)
    assert inner[3].revision == 3  # a range after a change: begin + 1
    assert inner[4] == DeleteRangeResponse(3, 0, [])  # deleted nothing, but txn changed
    assert isinstance(inner[5], TxnResponse) and inner[5].revision == 0  # etcd: no header
    assert inner[5].succeeded and inner[5].responses[0].revision == 3
    assert inner[5].responses[1] == PutResponse(3, None)
    assert inner[6] == DeleteRangeResponse(3, 0, [])
    assert [e.kv for e in ev] == [kv(b"t1", b"v", 3, 3, 1), kv(b"t2", b"v", 3, 3, 1)]
    assert s.rev == 3


def test_txn_without_changes_keeps_revision(s):
    s.put(b"m", b"2")
    r, ev = s.txn([], [op_delete(b"nokey"), op_get(b"m")], [])
    assert ev == [] and s.rev == 2 and r.revision == 2
    assert r.responses[0] == DeleteRangeResponse(2, 0, [])
    assert r.responses[1].revision == 2
    r, ev = s.txn([], [op_txn([], [op_get(b"m")])], [])
    assert r.revision == 2 and r.responses[0].revision == 0
    r, ev = s.txn([], [], [])
    assert r == TxnResponse(2, True, []) and ev == []


def test_txn_ops_see_earlier_ops(s):
    s.put(b"a", b"0")  # 2
    r, _ev = s.txn(
        [],
        [
            op_put(b"a", b"1", prev_kv=True),
            op_get(b"a"),
            op_put(b"b", b"x"),
            op_get(b"a", ALL, count_only=True),
            op_get(b"a", revision=2),
        ],
        [],
    )
    assert r.responses[0].prev_kv == kv(b"a", b"0", 2, 2, 1)
    assert r.responses[1].kvs == [kv(b"a", b"1", 2, 3, 2)]
    assert r.responses[3].count == 2
    assert r.responses[4].kvs == [kv(b"a", b"0", 2, 2, 1)] and r.responses[4].revision == 3


def test_txn_delete_from_key_then_put_same_key(s):
    """A from-key delete escapes etcd's duplicate check: delete then put k in one txn."""
    s.put(b"t1", b"v")  # 2
    s.put(b"t2", b"v")  # 3
    r, ev = s.txn(
        [],
        [op_delete(b"t1", ALL, prev_kv=True), op_put(b"t1", b"again", prev_kv=True), op_get(b"t1")],
        [],
    )
    assert r.revision == 4
    assert r.responses[0] == DeleteRangeResponse(
        4, 2, [kv(b"t1", b"v", 2, 2, 1), kv(b"t2", b"v", 3, 3, 1)]
    )
    assert r.responses[1] == PutResponse(4, None)  # deleted earlier in the txn
    assert r.responses[2].kvs == [kv(b"t1", b"again", 4, 4, 1)]
    assert ev == [
        Event("DELETE", tomb(b"t1", 4), kv(b"t1", b"v", 2, 2, 1)),
        Event("DELETE", tomb(b"t2", 4), kv(b"t2", b"v", 3, 3, 1)),
        Event("PUT", kv(b"t1", b"again", 4, 4, 1), None),  # a create: no prev_kv
    ]
    assert s.range(b"t", b"u").kvs == [kv(b"t1", b"again", 4, 4, 1)]
    assert s.range(b"t", b"u", revision=3).count == 2


def test_txn_put_then_delete_same_key(s):
    s.put(b"w1", b"new")  # 2
    r, ev = s.txn(
        [], [op_put(b"w1", b"newer", prev_kv=True), op_delete(b"w1", ALL, prev_kv=True)], []
    )
    assert r.revision == 3
    assert r.responses[0] == PutResponse(3, kv(b"w1", b"new", 2, 2, 1))
    assert r.responses[1] == DeleteRangeResponse(3, 1, [kv(b"w1", b"newer", 2, 3, 2)])
    # etcd's watch prev_kv is the value at rev - 1: before the txn, for both events
    assert ev == [
        Event("PUT", kv(b"w1", b"newer", 2, 3, 2), kv(b"w1", b"new", 2, 2, 1)),
        Event("DELETE", tomb(b"w1", 3), kv(b"w1", b"new", 2, 2, 1)),
    ]
    assert s.range(b"w1").kvs == []
    # created and deleted in one txn
    r, ev = s.txn([], [op_txn([], [op_put(b"w2", b"p")]), op_delete(b"w2", ALL)], [])
    assert r.revision == 4 and r.responses[1] == DeleteRangeResponse(4, 1, [])
    assert ev == [
        Event("PUT", kv(b"w2", b"p", 4, 4, 1), None),
        Event("DELETE", tomb(b"w2", 4), None),
    ]
    assert s.range(b"w", b"x", revision=4).kvs == []


def test_txn_nested_compares_see_state_before_txn(s):
    r, _ev = s.txn(
        [],
        [
            op_put(b"n1", b"1"),
            op_txn(
                [compare_value(b"n1", "=", b"1")], [op_put(b"n2", b"yes")], [op_put(b"n2", b"no")]
            ),
        ],
        [],
    )
    assert not r.responses[1].succeeded
    assert s.range(b"n2").kvs[0].value == b"no"
    r, _ = s.txn(
        [compare_value(b"n1", "=", b"1")],
        [op_txn([compare_version(b"n1", "=", 1)], [op_get(b"n1")], [op_get(b"n2")])],
        [],
    )
    assert r.succeeded and r.responses[0].succeeded and keys(r.responses[0].responses[0]) == [b"n1"]


def test_txn_nested_failure_branch(s):
    r, ev = s.txn(
        [compare_version(b"x", "=", 0)],
        [
            op_txn(
                [compare_version(b"x", ">", 0)],
                [op_put(b"a", b"1")],
                [op_put(b"b", b"2"), op_get(b"b")],
            )
        ],
        [op_put(b"c", b"3")],
    )
    assert r.succeeded and not r.responses[0].succeeded
    assert r.responses[0].responses[1].kvs == [kv(b"b", b"2", 2, 2, 1)]
    assert [e.kv.key for e in ev] == [b"b"]


def test_txn_duplicate_key(s):
    s.put(b"d1", b"x")
    s.put(b"d2", b"x")
    rev = s.rev

    def dup(success, failure=()):
        with pytest.raises(DuplicateKeyError):
            s.txn([], success, failure)
        assert s.rev == rev

    dup([op_put(b"d1", b"x"), op_put(b"d1", b"y")])
    dup([op_delete(b"d1"), op_put(b"d1", b"y")])
    dup([op_put(b"d1", b"y"), op_delete(b"d1")])
    dup([op_put(b"d2", b"x"), op_delete(b"d0", b"d9")])
    dup([op_txn([], [op_delete(b"d1")]), op_txn([], [op_put(b"d1", b"x")])])
    dup([op_put(b"d1", b"x"), op_txn([], [op_delete(b"d1")])])
    dup([op_txn([], [op_put(b"d1", b"x")]), op_delete(b"d0", b"d2")])
    dup([op_put(b"d1", b"x"), op_txn([], [], [op_put(b"d1", b"y")])])
    dup(
        [
            op_txn([], [op_put(b"d1", b"x")], [op_put(b"d2", b"y")]),
            op_txn([], [op_put(b"d3", b"x")], [op_put(b"d1", b"y")]),
        ]
    )
    dup([op_put(b"z", b"1")], [op_put(b"d2", b"x"), op_put(b"d2", b"y")])  # unused branch too
    dup([op_txn([], [op_txn([], [op_put(b"q", b"1"), op_put(b"q", b"2")])])])  # deep nesting

    def fine(success, failure=()):
        s.txn([], success, failure)

    _r, ev = s.txn([], [op_txn([], [op_put(b"d1", b"x")]), op_txn([], [op_delete(b"d1")])], [])
    assert [e.type for e in ev] == ["PUT", "DELETE"]  # earlier nested put, later nested delete
    assert s.range(b"d1").count == 0
    fine([op_txn([], [op_put(b"d1", b"x")], [op_put(b"d1", b"y")])])
    fine([op_delete(b"d1"), op_delete(b"d1")])
    fine([op_put(b"d1", b"x")], [op_delete(b"d1")])
    fine([op_delete(b"d5", b"d0"), op_put(b"d2", b"x")])  # inverted range: empty interval
    fine([op_delete(b"\0", ALL), op_put(b"d2", b"x")])  # from-key: never intersects
    fine([op_put(b"d2", b"y"), op_delete(b"d", ALL)])


def test_txn_duplicate_key_second_delete_reports(s):
    s.put(b"d1", b"x")  # 2
    r, ev = s.txn([], [op_delete(b"d1"), op_delete(b"d1")], [])
    assert r.responses == [DeleteRangeResponse(3, 1, []), DeleteRangeResponse(3, 0, [])]
    assert len(ev) == 1


def test_txn_inverted_delete_reports_begin(s):
    s.put(b"d1", b"x")  # 2
    r, _ = s.txn([], [op_delete(b"d5", b"d0"), op_put(b"d2", b"x")], [])
    assert r.responses[0] == DeleteRangeResponse(2, 0, []) and r.revision == 3


def test_txn_too_many_ops(s):
    n = MAX_TXN_OPS
    assert n == 128
    r, ev = s.txn([], [op_put(b"o%d" % i, b"x") for i in range(n)], [])
    assert len(ev) == n and r.revision == 2 and {e.kv.mod_revision for e in ev} == {2}
    for args in (
        ([], [op_put(b"o%d" % i, b"x") for i in range(n + 1)], []),
        ([compare_version(b"o1", ">", -1)] * (n + 1), [], []),
        ([], [], [op_get(b"a")] * (n + 1)),
        ([], [op_get(b"a")] * 99 + [op_txn([], [op_get(b"a")] * 29)], []),  # nested budget 28
        ([], [op_get(b"a")] * 127 + [op_txn([], [op_get(b"a")])], []),  # nested budget 0
        ([], [op_put(b"", b"x")] * (n + 1), []),  # counted before empty keys
    ):
        with pytest.raises(TooManyOpsError):
            s.txn(*args)
    s.txn([], [op_get(b"a")] * 99 + [op_txn([], [op_get(b"a")] * 28)], [])
    s.txn([], [op_get(b"a")] * 127 + [op_txn([], [])], [])
    assert s.rev == 2


def test_txn_validation(s):
    s.put(b"o1", b"x")  # 2
    s.put(b"o2", b"x")  # 3
    with pytest.raises(EmptyKeyError):
        s.txn([compare_version(b"", "=", 0)], [], [])
    with pytest.raises(EmptyKeyError):
        s.txn([], [], [op_get(b"")])
    with pytest.raises(EmptyKeyError):
        s.txn([], [op_txn([], [op_delete(b"")])], [])
    # value provided: checked in both branches
    with pytest.raises(ValueProvidedError):
        s.txn([], [op_put(b"o1", b"")], [op_put(b"nope", b"v", ignore_value=True)])
    # missing key for ignore_value: only on the chosen path, whole txn fails
    s.txn([], [op_put(b"o1", b"")], [op_put(b"nope", b"", ignore_value=True)])
    with pytest.raises(KeyNotFoundError):
        s.txn([], [op_put(b"o2", b"z"), op_put(b"nope", b"", ignore_value=True)], [])
    assert s.range(b"o2").kvs[0].value == b"x"
    # future / compacted range revisions: only on the chosen path
    s.txn([], [op_get(b"a")], [op_get(b"a", revision=1000)])
    with pytest.raises(FutureRevisionError):
        s.txn([], [op_put(b"o2", b"z"), op_get(b"a", revision=1000)], [])
    # order: checkTxnRequest (value provided, empty key) before duplicates ...
    with pytest.raises(DuplicateKeyError):
        s.txn(
            [],
            [op_put(b"nope", b"", ignore_value=True), op_put(b"q", b"1"), op_put(b"q", b"2")],
            [],
        )
    with pytest.raises(ValueProvidedError):
        s.txn(
            [],
            [op_put(b"q", b"1"), op_put(b"q", b"2"), op_put(b"nope", b"x", ignore_value=True)],
            [],
        )
    with pytest.raises(EmptyKeyError):
        s.txn([], [op_put(b"q", b"1"), op_put(b"q", b"2"), op_put(b"", b"x")], [])
    # ... and ignore_value before range revisions
    with pytest.raises(KeyNotFoundError):
        s.txn([], [op_get(b"a", revision=1000), op_put(b"nope", b"", ignore_value=True)], [])
    assert s.rev == 4


def test_txn_ignore_value(s):
    s.put(b"o1", b"x")  # 2
    r, _ev = s.txn([], [op_put(b"o1", b"", ignore_value=True, prev_kv=True), op_get(b"o1")], [])
    assert r.responses[0] == PutResponse(3, kv(b"o1", b"x", 2, 2, 1))
    assert r.responses[1].kvs == [kv(b"o1", b"x", 2, 3, 2)]


def test_txn_ignore_value_after_from_key_delete_refused(s):
    """etcd 3.4.23 panics on this txn; we refuse it whole (KeyNotFoundError)."""
    s.put(b"i1", b"v")  # 2
    with pytest.raises(KeyNotFoundError):
        s.txn([], [op_delete(b"i", ALL), op_put(b"i1", b"", ignore_value=True)], [])
    with pytest.raises(KeyNotFoundError):
        s.txn([], [op_txn([], [op_delete(b"i", ALL)]), op_put(b"i1", b"", ignore_value=True)], [])
    assert s.rev == 2 and s.range(b"i1").count == 1
    # a from-key delete that does not cover the key is fine
    s.txn([], [op_delete(b"j", ALL), op_put(b"i1", b"", ignore_value=True)], [])
    assert s.rev == 3


def test_txn_range_revision_checks(s):
    s.put(b"a", b"1")  # 2
    s.put(b"a", b"2")  # 3
    s.compact(3)
    with pytest.raises(CompactedError):
        s.txn([], [op_get(b"a", revision=2)], [])
    r, _ = s.txn([], [op_get(b"a", revision=3)], [])
    assert r.responses[0].kvs[0].value == b"2"
    with pytest.raises(CompactedError):  # etcd: negative < compaction revision in a txn
        s.txn([], [op_get(b"a", revision=-1)], [])
    assert s.range(b"a", revision=-1).count == 1  # but not outside a txn


def test_txn_negative_range_revision_fresh_store(s):
    s.put(b"a", b"1")
    r, _ = s.txn([], [op_get(b"a", revision=-1)], [])  # -1 is not < etcd's initial -1
    assert r.responses[0].count == 1
    with pytest.raises(CompactedError):
        s.txn([], [op_get(b"a", revision=-2)], [])


def test_apply_dispatch(s):
    r, ev = s.apply(PutOp(b"a", b"1"))
    assert r == PutResponse(2) and len(ev) == 1
    r, ev = s.apply(RangeOp(b"a"))
    assert r.count == 1 and ev == []
    r, ev = s.apply(TxnOp((), (PutOp(b"b", b"2"),), ()))
    assert r.revision == 3 and len(ev) == 1
    r, ev = s.apply(DeleteOp(b"a", b"\0"))
    assert r.deleted == 2 and r.revision == 4 and len(ev) == 2


# ---------------------------------------------------------------------- compaction


def test_compact_errors(s):
    with pytest.raises(FutureRevisionError):
        s.compact(2)
    assert s.compact(0) == CompactResponse(1)  # etcd accepts compact(0) once
    assert s.compact_rev == 0
    with pytest.raises(CompactedError):
        s.compact(0)
    with pytest.raises(CompactedError):
        s.compact(-3)
    s.compact(1)
    assert s.compact_rev == 1 and s.range(b"a", revision=1).count == 0
    with pytest.raises(CompactedError):
        s.compact(1)
    s.put(b"a", b"1")
    assert s.compact(2) == CompactResponse(2)
    assert s.range(b"a", revision=2).count == 1
    with pytest.raises(CompactedError):
        s.range(b"a", revision=1)


def test_compact_keeps_latest_at_or_below(s):
    s.put(b"a", b"1")  # 2
    s.put(b"a", b"2")  # 3
    s.put(b"b", b"1")  # 4
    s.put(b"a", b"3")  # 5
    s.compact(4)
    assert s.compact_rev == 4
    assert s.range(b"a", revision=4).kvs == [kv(b"a", b"2", 2, 3, 2)]
    assert s.range(b"a", ALL, revision=4).count == 2
    assert s.range(b"a").kvs == [kv(b"a", b"3", 2, 5, 3)]
    with pytest.raises(CompactedError):
        s.range(b"a", revision=3)
    assert s._hist[b"a"].revs == [3, 5]
    _r, ev = s.put(b"a", b"4")
    assert ev[0].kv == kv(b"a", b"4", 2, 6, 4)  # version/create survive compaction


def test_compact_drops_tombstone_at_revision(s):
    s.put(b"k1", b"a")  # 2
    s.put(b"k1", b"b")  # 3
    s.delete_range(b"k1")  # 4
    s.put(b"k2", b"x")  # 5
    s.compact(4)  # the tombstone at exactly 4 goes, and the key with it
    assert b"k1" not in s._hist
    assert s.range(b"k", b"l", revision=4).kvs == []
    assert s.range(b"k", b"l", revision=5).count == 1
    with pytest.raises(CompactedError):
        s.range(b"k", b"l", revision=3)
    _r, ev = s.put(b"k1", b"c")
    assert ev[0] == Event("PUT", kv(b"k1", b"c", 6, 6, 1), None)


def test_compact_keeps_tombstone_above_revision(s):
    s.put(b"k", b"a")  # 2
    s.delete_range(b"k")  # 3
    s.put(b"k", b"b")  # 4
    s.put(b"k", b"c")  # 5
    s.compact(2)
    assert s._hist[b"k"].revs == [2, 3, 4, 5]
    assert s.range(b"k", revision=2).kvs == [kv(b"k", b"a", 2, 2, 1)]
    assert s.range(b"k", revision=3).kvs == []
    s.compact(3)
    assert s._hist[b"k"].revs == [4, 5]
    assert s.range(b"k", revision=3).kvs == []
    s.compact(5)
    assert s._hist[b"k"].revs == [5]
    assert s.range(b"k", revision=5).kvs == [kv(b"k", b"c", 4, 5, 2)]


def test_compact_txn_delete_and_put_in_one_revision(s):
    s.put(b"a", b"1")  # 2
    s.txn([], [op_delete(b"a", ALL), op_put(b"a", b"2")], [])  # 3: tombstone + put
    s.txn([], [op_put(b"b", b"1"), op_delete(b"b", ALL)], [])  # 4: put + tombstone
    s.compact(4)
    assert s._hist[b"a"].revs == [3] and b"b" not in s._hist
    assert s.range(b"a", ALL, revision=4).kvs == [kv(b"a", b"2", 3, 3, 1)]


def test_compact_is_incremental(s):
    for i in range(50):
        s.put(b"k%02d" % i, b"v")  # 2..51
    s.compact(51)
    assert len(s._log) == 0
    s.put(b"k00", b"w")  # 52
    s.put(b"k00", b"x")  # 53
    assert list(s._log) == [b"k00", b"k00"]
    s.compact(53)
    assert s._hist[b"k00"].revs == [53] and s._hist[b"k01"].revs == [3]


def test_range_at_exactly_compact_rev_after_more_writes(s):
    s.put(b"a", b"1")  # 2
    s.put(b"b", b"1")  # 3
    s.delete_range(b"a")  # 4
    s.put(b"b", b"2")  # 5
    s.compact(3)
    r = s.range(b"a", ALL, revision=3)
    assert r.revision == 5 and keys(r) == [b"a", b"b"]
    assert keys(s.range(b"a", ALL, revision=4)) == [b"b"]


def test_events_at_compact_rev(s):
    """etcd 3.4.23: txn [put w, put k, delete w..] at r; compact(r); a watch from r with
    prev_kv gets only PUT k, without prev_kv."""
    s.put(b"k", b"1")  # 2
    s.put(b"k", b"2")  # 3
    _, ev = s.txn([], [op_put(b"w", b"p"), op_put(b"k", b"3"), op_delete(b"w", ALL)], [])  # 4
    assert [e.type for e in ev] == ["PUT", "PUT", "DELETE"] and ev[1].prev_kv is not None
    s.compact(4)
    assert events_at_compact_rev(ev) == [Event("PUT", kv(b"k", b"3", 2, 4, 3), None)]
    # the store kept exactly those versions at revision 4
    kept = [k for h in s._hist.values() for r, k in zip(h.revs, h.kvs) if r == 4]
    assert kept == [kv(b"k", b"3", 2, 4, 3)]
    _, ev = s.txn([], [op_delete(b"k", ALL), op_put(b"k", b"4")], [])  # 5
    assert events_at_compact_rev(ev) == [Event("PUT", kv(b"k", b"4", 5, 5, 1), None)]
    _, ev = s.delete_range(b"k")  # 6
    assert events_at_compact_rev(ev) == []


# ---------------------------------------------------------------------- snapshot


def test_snapshot_restore_round_trip(s):
    s.put(b"a", b"1")
    s.put(b"b", b"1")
    s.put(b"a", b"2")
    s.delete_range(b"b")
    s.txn([], [op_delete(b"a", ALL), op_put(b"a", b"3"), op_put(b"c", b"1")], [])
    s.compact(3)
    s.put(b"d", b"1")
    data = s.snapshot()
    blob = msgpack.packb(data)
    t = MVCCStore.restore(msgpack.unpackb(blob, strict_map_key=False))
    t._check()
    assert t.rev == s.rev and t.compact_rev == 3
    for rev in range(3, s.rev + 1):
        assert t.range(b"\0", ALL, revision=rev) == s.range(b"\0", ALL, revision=rev)
    with pytest.raises(CompactedError):
        t.range(b"a", revision=2)
    with pytest.raises(CompactedError):
        t.compact(3)
    # both continue identically
    assert t.put(b"a", b"9") == s.put(b"a", b"9")
    t.compact(8)
    s.compact(8)
    assert t.snapshot() == s.snapshot()


def test_snapshot_fresh_and_compact0(s):
    t = MVCCStore.restore(s.snapshot())
    assert t.rev == 1 and t.compact_rev == 0
    t.compact(0)
    u = MVCCStore.restore(t.snapshot())
    with pytest.raises(CompactedError):
        u.compact(0)


def test_restore_rejects_inconsistent(s):
    s.put(b"a", b"1")
    data = s.snapshot()
    bad = dict(data, rev=5)  # revisions 3..5 have no change
    with pytest.raises(ValueError):
        MVCCStore.restore(bad)
    bad = dict(data, keys=[[b"a", [[2]]]])  # starts with a tombstone
    with pytest.raises(ValueError):
        MVCCStore.restore(bad)
    with pytest.raises(ValueError):
        MVCCStore.restore(dict(data, format=99))


def test_check_detects_corruption(s):
    s.put(b"a", b"1")
    s._live[b"a"] = kv(b"a", b"other", 2, 2, 1)
    with pytest.raises(AssertionError):
        s._check()
    s._live[b"a"] = s._hist[b"a"].kvs[-1]
