"""etcd's Range after reading: the revision filters and the sort of a RangeRequest.
Pure; `MVCCStore` calls `shape_range` on what it read (see broker/mvcc.py)."""

from __future__ import annotations

from shmwatch.wire.ops import RangeOp
from shmwatch.wire.types import KeyValue

_SORT_KEYS = {
    "KEY": lambda kv: kv.key,
    "VERSION": lambda kv: kv.version,
    "CREATE": lambda kv: kv.create_revision,
    "MOD": lambda kv: kv.mod_revision,
    "VALUE": lambda kv: kv.value,
}


def shape_range(kvs: list[KeyValue], op: RangeOp) -> list[KeyValue]:
    """etcd's Range after reading: drop what the revision bounds exclude, then sort. A
    target other than KEY with no order sorts ascending (etcd's default); ties keep key
    order (etcd's Go sort leaves their order unspecified). O(k log k)."""
    lo_mod, hi_mod = op.min_mod_revision, op.max_mod_revision
    lo_create, hi_create = op.min_create_revision, op.max_create_revision
    if lo_mod or hi_mod or lo_create or hi_create:
        kvs = [kv for kv in kvs
               if not (hi_mod and kv.mod_revision > hi_mod)
               and not (lo_mod and kv.mod_revision < lo_mod)
               and not (hi_create and kv.create_revision > hi_create)
               and not (lo_create and kv.create_revision < lo_create)]
    order = op.sort_order
    if op.sort_target != "KEY" and order == "NONE":
        order = "ASCEND"
    if order != "NONE":
        kvs = sorted(kvs, key=_SORT_KEYS[op.sort_target], reverse=order == "DESCEND")
    return kvs
