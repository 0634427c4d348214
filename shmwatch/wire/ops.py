"""Txn building blocks: compares and request ops, as etcd's Compare and RequestOp.

Small immutable values; the client encodes them for the wire and the broker's MVCC core
evaluates them. Helpers mirror clientv3 (`Compare(Value(k), "=", v)` becomes
`compare_value(k, "=", v)`).
"""

from __future__ import annotations

from typing import NamedTuple, Union

TARGETS = ("VALUE", "VERSION", "CREATE", "MOD", "LEASE")
RESULTS = {"=": "EQUAL", "==": "EQUAL", "!=": "NOT_EQUAL", ">": "GREATER", "<": "LESS"}


def to_bytes(value: bytes | str, what: str = "key") -> bytes:
    """Keys and values are bytes; str is UTF-8 encoded. Anything else is a TypeError."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"{what} must be bytes or str, not {type(value).__name__}")


def prefix_range_end(key: bytes) -> bytes:
    """clientv3's GetPrefixRangeEnd: the smallest key greater than every key with this prefix.

    An empty prefix (or one of only 0xff bytes) means "every key": b"\\0".
    """
    end = bytearray(key)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


def resolve_range(key: bytes | str, range_end: bytes | str | None,
                  prefix: bool) -> tuple[bytes, bytes | None]:
    """(key, end) as the broker takes them: end None = single key, b"\\0" = every key >= key."""
    k = to_bytes(key)
    if prefix:
        if not k:
            return b"\0", b"\0"
        return k, prefix_range_end(k)
    if range_end is None:
        return k, None
    end = to_bytes(range_end, "range_end")
    return k, (end if end else None)


class Compare(NamedTuple):
    """etcd's Compare: `target` of `key` (or of every key in [key, range_end)) `result` `value`."""

    key: bytes
    target: str  # VALUE | VERSION | CREATE | MOD | LEASE
    result: str  # EQUAL | NOT_EQUAL | GREATER | LESS
    value: Union[bytes, int]
    range_end: bytes | None = None


class PutOp(NamedTuple):
    """etcd's PutRequest inside a txn; build it with `op_put`."""

    key: bytes
    value: bytes = b""
    prev_kv: bool = False
    ignore_value: bool = False
    lease: int = 0  # attach the key to this lease (0: none; a re-put without detaches)
    ignore_lease: bool = False  # keep the key's current lease


SORT_ORDERS = ("NONE", "ASCEND", "DESCEND")
SORT_TARGETS = ("KEY", "VERSION", "CREATE", "MOD", "VALUE")


class RangeOp(NamedTuple):
    """etcd's RangeRequest (inside a txn too); build it with `op_get`."""

    key: bytes
    range_end: bytes | None = None
    revision: int = 0
    limit: int = 0
    keys_only: bool = False
    count_only: bool = False
    sort_order: str = "NONE"  # SORT_ORDERS
    sort_target: str = "KEY"  # SORT_TARGETS
    min_mod_revision: int = 0  # 0: no bound
    max_mod_revision: int = 0
    min_create_revision: int = 0
    max_create_revision: int = 0


class DeleteOp(NamedTuple):
    """etcd's DeleteRangeRequest inside a txn; build it with `op_delete`."""

    key: bytes
    range_end: bytes | None = None
    prev_kv: bool = False


class TxnOp(NamedTuple):
    """etcd's TxnRequest nested in a txn; build it with `op_txn`."""

    compare: tuple
    success: tuple
    failure: tuple


Op = Union[PutOp, RangeOp, DeleteOp, TxnOp]


def _compare(target: str, key, op: str, value, range_end=None) -> Compare:
    if op not in RESULTS:
        raise ValueError(f"compare operator must be one of {sorted(RESULTS)}, not {op!r}")
    end = None if range_end is None else to_bytes(range_end, "range_end")
    return Compare(to_bytes(key), target, RESULTS[op], value, end)


def compare_value(key, op: str, value, range_end=None) -> Compare:
    """clientv3's `Compare(Value(key), op, value)`: the value of `key` (or of every key
    in [key, range_end)) compared with `value`; `op` is "=", "!=", ">" or "<"."""
    return _compare("VALUE", key, op, to_bytes(value, "value"), range_end)


def compare_version(key, op: str, version: int, range_end=None) -> Compare:
    """clientv3's `Compare(Version(key), op, version)`: 0 for a key that does not exist."""
    return _compare("VERSION", key, op, int(version), range_end)


def compare_create(key, op: str, revision: int, range_end=None) -> Compare:
    """clientv3's `Compare(CreateRevision(key), op, revision)`: 0 for a missing key."""
    return _compare("CREATE", key, op, int(revision), range_end)


def compare_mod(key, op: str, revision: int, range_end=None) -> Compare:
    """clientv3's `Compare(ModRevision(key), op, revision)`: 0 for a missing key."""
    return _compare("MOD", key, op, int(revision), range_end)


def compare_lease(key, op: str, lease: int, range_end=None) -> Compare:
    """clientv3's `Compare(LeaseValue(key), op, lease)`: the key's lease id (0: none)."""
    return _compare("LEASE", key, op, int(lease), range_end)


def op_put(key, value=b"", prev_kv: bool = False, ignore_value: bool = False,
           lease: int = 0, ignore_lease: bool = False) -> PutOp:
    """A put inside a txn (clientv3's `OpPut`); the arguments are `Client.put`'s."""
    return PutOp(to_bytes(key), to_bytes(value, "value"), bool(prev_kv), bool(ignore_value),
                 int(lease), bool(ignore_lease))


def _choice(value: str, choices: tuple[str, ...], what: str) -> str:
    v = str(value).upper()
    if v not in choices:
        raise ValueError(f"{what} must be one of {', '.join(c.lower() for c in choices)}, "
                         f"not {value!r}")
    return v


def op_get(key, range_end=None, prefix: bool = False, revision: int = 0, limit: int = 0,
           keys_only: bool = False, count_only: bool = False, *, sort_order: str = "none",
           sort_target: str = "key", min_mod_revision: int = 0, max_mod_revision: int = 0,
           min_create_revision: int = 0, max_create_revision: int = 0) -> RangeOp:
    """A range read inside a txn (clientv3's `OpGet`); the arguments are `Client.get`'s."""
    k, end = resolve_range(key, range_end, prefix)
    return RangeOp(k, end, int(revision), int(limit), bool(keys_only), bool(count_only),
                   _choice(sort_order, SORT_ORDERS, "sort_order"),
                   _choice(sort_target, SORT_TARGETS, "sort_target"),
                   int(min_mod_revision), int(max_mod_revision), int(min_create_revision),
                   int(max_create_revision))


def op_delete(key, range_end=None, prefix: bool = False, prev_kv: bool = False) -> DeleteOp:
    """A delete inside a txn (clientv3's `OpDelete`); the arguments are `Client.delete`'s."""
    k, end = resolve_range(key, range_end, prefix)
    return DeleteOp(k, end, bool(prev_kv))


def op_txn(compare=(), success=(), failure=()) -> TxnOp:
    """A txn nested in a txn (clientv3's `OpTxn`): its ops share the outer revision."""
    return TxnOp(tuple(compare), tuple(success), tuple(failure))
