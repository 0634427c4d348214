"""etcd's txn rules: how a compare is evaluated (`compare_holds`), and the request checks
made before any compare is: v3rpc's checkTxnRequest (op count, empty keys, ignore_value
with a value, ignore_lease with a lease) and checkIntervals (duplicate keys in one
branch, a put inside a delete range). Pure; `MVCCStore.txn` calls them (see the order
of all checks in broker/mvcc.py's docstring)."""

from __future__ import annotations

from shmwatch.wire.errors import (
    DuplicateKeyError,
    EmptyKeyError,
    LeaseProvidedError,
    ProtocolError,
    TooManyOpsError,
    ValueProvidedError,
)
from shmwatch.wire.ops import Compare, DeleteOp, PutOp, RangeOp, TxnOp
from shmwatch.wire.types import KeyValue

FROM_KEY = b"\0"  # range end meaning "every key >= key"
_MISSING = KeyValue(b"")  # what compares see for a missing key: every number 0
_FIELDS = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision",
           "LEASE": "lease"}


def _covers(d: tuple[bytes, bytes | None], key: bytes) -> bool:
    """Does the delete range d = (key, end) include `key`?"""
    k, end = d
    if end is None:
        return key == k
    if end == FROM_KEY:
        return key >= k
    return k <= key < end


# ---------------------------------------------------------------------- compares


def compare_holds(c: Compare, kvs: list[KeyValue]) -> bool:
    """etcd applyCompare: `c` holds for every one of `kvs` (the live key-values of its
    key or range). A missing key has no value (a VALUE compare fails) and every number
    0 (version, revisions, lease)."""
    target = c.target
    if not kvs:
        if target == "VALUE":
            return False
        kvs = [_MISSING]
    result = c.result
    b = c.value
    for kv in kvs:
        if target == "VALUE":
            a = kv.value
        elif target in _FIELDS:
            a = getattr(kv, _FIELDS[target])
        else:
            raise ProtocolError(f"shmwatch: unknown compare target {target!r}")
        if result == "EQUAL":
            ok = a == b
        elif result == "NOT_EQUAL":
            ok = a != b
        elif result == "GREATER":
            ok = a > b
        elif result == "LESS":
            ok = a < b
        else:
            raise ProtocolError(f"shmwatch: unknown compare result {result!r}")
        if not ok:
            return False
    return True


# ---------------------------------------------------------------------- request checks


def _check_txn_request(compare, success, failure, budget: int) -> None:
    """etcd v3rpc checkTxnRequest: op count, empty keys, ignore_value with a value,
    ignore_lease with a lease (checkPutRequest's order)."""
    opc = max(len(compare), len(success), len(failure))
    if opc > budget:
        raise TooManyOpsError()
    for c in compare:
        if not c.key:
            raise EmptyKeyError()
    for ops in (success, failure):
        for op in ops:
            t = type(op)
            if t is TxnOp:
                _check_txn_request(op.compare, op.success, op.failure, budget - opc)
            elif t is PutOp:
                if not op.key:
                    raise EmptyKeyError()
                if op.ignore_value and op.value:
                    raise ValueProvidedError()
                if op.ignore_lease and op.lease:
                    raise LeaseProvidedError()
            elif t is RangeOp or t is DeleteOp:
                if not op.key:
                    raise EmptyKeyError()
            else:
                raise ProtocolError(f"shmwatch: unknown txn op {t.__name__}")


class _Dels:
    """The delete intervals of etcd's checkIntervals, queried by single keys.

    etcd keeps [key, range_end) as a literal interval: a from-key delete (range_end
    b"\\0") or one with range_end <= key intersects nothing; a single-key delete is the
    point [key, key + b"\\0")."""

    __slots__ = ("points", "ranges")

    def __init__(self) -> None:
        self.points: set[bytes] = set()
        self.ranges: list[tuple[bytes, bytes]] = []

    def add(self, key: bytes, end: bytes | None) -> None:
        if end is None:
            self.points.add(key)
        elif key < end:
            self.ranges.append((key, end))

    def update(self, other: _Dels) -> None:
        self.points |= other.points
        self.ranges.extend(other.ranges)

    def hits(self, key: bytes) -> bool:
        return key in self.points or any(b <= key < e for b, e in self.ranges)


def _check_intervals(ops) -> tuple[set[bytes], _Dels]:
    """etcd v3rpc checkIntervals: puts and deletes of one txn branch must not overlap.

    Returns (puts, deletes) of the branch, nested txns included. Mirrors etcd's order
    exactly: this level's deletes, then each nested txn (its puts against the deletes
    gathered so far, then its deletes join), then this level's puts against everything.
    So a put in an earlier nested txn and a delete of that key in a later one pass."""
    dels = _Dels()
    for op in ops:
        if type(op) is DeleteOp:
            dels.add(op.key, op.range_end)
    puts: set[bytes] = set()
    for op in ops:
        if type(op) is not TxnOp:
            continue
        puts_then, dels_then = _check_intervals(op.success)
        puts_else, dels_else = _check_intervals(op.failure)
        for k in puts_then:
            if k in puts or dels.hits(k):
                raise DuplicateKeyError()
            puts.add(k)
        for k in puts_else:
            if (k in puts and k not in puts_then) or dels.hits(k):
                raise DuplicateKeyError()
            puts.add(k)
        dels.update(dels_then)
        dels.update(dels_else)
    for op in ops:
        if type(op) is PutOp:
            k = op.key
            if k in puts or dels.hits(k):
                raise DuplicateKeyError()
            puts.add(k)
    return puts, dels
