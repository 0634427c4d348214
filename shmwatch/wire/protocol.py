"""The wire protocol between clients and the broker: msgpack arrays, no I/O.

Requests (client -> broker, on the client's request ring): ``[op, req_id, *args]``;
put / range / delete / txn are all ``[OP_KV, req_id, encode_op(op)]``.
Replies (broker -> client, on the response ring): ``[req_id, status, body]`` where
status 0 is success and any other value is an error code of `shmwatch.wire.errors`
(body is then the message). Watch responses travel on the watcher's own ring, so the
watch id is implied by the ring: ``[kind, header_revision, compact_revision,
cancel_reason, fragment, events]`` with events last, so that the broker can build a
response by concatenating event encodings it made once per revision.

Every message has its encoder and its decoder side by side, and nothing else builds or
takes apart a message: requests are built by the `*_request` functions and read back by
`parse_request`; replies are `encode_reply`/`decode_reply` with a body codec per request
(`encode_response`/`decode_response` for KV and lease responses). The messages that
carry events, watch responses (`encode_watch_control`/`events_blob` and
`decode_watch_response`) and revision-log records (`log_record`/`read_log_record`), are
in `shmwatch.wire.events`.

Every decoder bounds what it accepts (`max_buffer_size`, shape checks) and raises
`ProtocolError` on anything malformed: bytes from shared memory are never trusted.
"""

from __future__ import annotations

from typing import NamedTuple

import msgpack

from .errors import ProtocolError, error_from_code
from .ops import (
    RESULTS,
    SORT_ORDERS,
    SORT_TARGETS,
    TARGETS,
    Compare,
    DeleteOp,
    PutOp,
    RangeOp,
    TxnOp,
)
from .types import (
    CompactResponse,
    DeleteRangeResponse,
    KeyValue,
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    LeaseLeasesResponse,
    LeaseRevokeResponse,
    LeaseTimeToLiveResponse,
    PutResponse,
    RangeResponse,
    TxnResponse,
)

# Request ops. A KV request carries one op in the txn-op encoding (`encode_op`).
OP_KV = 1
OP_COMPACT = 5
OP_WATCH_CREATE = 6
OP_WATCH_CANCEL = 7
OP_PROGRESS = 8
OP_ARENA = 9
OP_BYE = 10
OP_LEASE_GRANT = 11  # [ttl, id, bound]
OP_LEASE_REVOKE = 12  # [id]
OP_LEASE_KEEPALIVE = 13  # [id]
OP_LEASE_TTL = 14  # [id, keys]
OP_LEASE_LEASES = 15  # []

# Watch response kinds.
W_EVENTS = 0
W_CREATED = 1
W_CANCELED = 2
W_PROGRESS = 3  # answer to a progress request: watch_id -1 (etcd 3.4)
W_PROGRESS_NOTIFY = 4  # periodic progress_notify: the watcher's own id
W_CATCHUP = 5  # not a response: the watcher catches up itself from the revision log

# A watcher ring's consumer tells the broker it has room again (the space hint) once
# this fraction of the ring is free; the broker resumes a victim at the same point.
RESUME_FREE_FRACTION = 0.5

# Watch filters as bits.
FILTER_NOPUT = 1
FILTER_NODELETE = 2

# Inner txn op kinds on the wire.
K_PUT = 0
K_RANGE = 1
K_DELETE = 2
K_TXN = 3

_EV_TYPES = ("PUT", "DELETE")
_RESULTS = frozenset(RESULTS.values())


def packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data, max_size: int = 64 << 20):
    """Decode one msgpack document from untrusted bytes; ProtocolError on anything wrong.

    msgpack bounds every container and string by the input's length, so a lying length
    prefix cannot make it allocate more than the message itself."""
    if len(data) > max_size:
        raise ProtocolError(f"shmwatch: message of {len(data)} bytes exceeds {max_size}")
    try:
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"shmwatch: undecodable message: {exc}") from None


# ---------------------------------------------------------------- requests
#
# A request is ``[op, req_id, *args]``. The builders below leave req_id 0: the sender
# numbers each request as it writes it (`number`).

NIL = b"\xc0"  # msgpack nil


class WatchSpec(NamedTuple):
    """What a watch asks for (etcd's WatchCreateRequest, minus the id)."""

    key: bytes
    end: bytes | None  # None: one key; b"\0": every key >= key; else [key, end)
    start_revision: int = 0
    prev_kv: bool = False
    filters: int = 0  # FILTER_* bits
    progress_notify: bool = False
    fragment: bool = False


class KvRequest(NamedTuple):
    req_id: int
    op: object  # PutOp | RangeOp | DeleteOp | TxnOp
    raw: list  # the op as it came on the wire (the WAL keeps it as is)


class CompactRequest(NamedTuple):
    req_id: int
    revision: int


class WatchCreateRequest(NamedTuple):
    req_id: int
    arena: int
    ring: int
    spec: WatchSpec
    watch_id: int  # 0: pick one


class WatchCancelRequest(NamedTuple):
    req_id: int
    watch_id: int


class ProgressRequest(NamedTuple):
    req_id: int


class ArenaRequest(NamedTuple):
    req_id: int


class ByeRequest(NamedTuple):
    req_id: int


class LeaseGrantRequest(NamedTuple):
    req_id: int
    ttl: int
    lease_id: int  # 0: a fresh id
    bound: bool  # revoked when this client's connection ends


class LeaseRequest(NamedTuple):
    """revoke, keep-alive, time-to-live (`keys`) or the list of leases (`lease_id` 0)."""

    req_id: int
    op: int  # OP_LEASE_REVOKE | OP_LEASE_KEEPALIVE | OP_LEASE_TTL | OP_LEASE_LEASES
    lease_id: int
    keys: bool = False


def kv_request(op) -> list:
    return [OP_KV, 0, encode_op(op)]


def put_request(key: bytes, value: bytes, prev_kv: bool, ignore_value: bool,
                lease: int = 0, ignore_lease: bool = False) -> list:
    """`kv_request(PutOp(...))` without building the PutOp (the put path is hot)."""
    if lease or ignore_lease:
        return [OP_KV, 0, [K_PUT, key, value, prev_kv, ignore_value, lease, ignore_lease]]
    return [OP_KV, 0, [K_PUT, key, value, prev_kv, ignore_value]]


def compact_request(revision: int) -> list:
    return [OP_COMPACT, 0, int(revision)]


def watch_create_request(arena: int, ring: int, spec: WatchSpec, watch_id: int) -> list:
    return [OP_WATCH_CREATE, 0, arena, ring, *spec, watch_id]


def watch_cancel_request(watch_id: int) -> list:
    return [OP_WATCH_CANCEL, 0, watch_id]


def progress_request() -> list:
    return [OP_PROGRESS, 0]


def arena_request() -> list:
    return [OP_ARENA, 0]


def bye_request() -> list:
    return [OP_BYE, 0]


def lease_grant_request(ttl: int, lease_id: int, bound: bool) -> list:
    return [OP_LEASE_GRANT, 0, int(ttl), int(lease_id), bool(bound)]


def lease_request(op: int, lease_id: int = 0, keys: bool = False) -> list:
    """A revoke, keep-alive or time-to-live of `lease_id` (op OP_LEASE_*), or the list
    of leases (OP_LEASE_LEASES)."""
    if op == OP_LEASE_TTL:
        return [op, 0, int(lease_id), bool(keys)]
    if op == OP_LEASE_LEASES:
        return [op, 0]
    return [op, 0, int(lease_id)]


def number(request: list, req_id: int) -> bytes:
    """The request's bytes, numbered `req_id`."""
    request[1] = req_id
    return packb(request)


_INT64 = range(-(1 << 63), 1 << 63)


def _parse_watch_create(rid: int, args: list) -> WatchCreateRequest:
    try:
        (arena, ring, key, end, start_rev, prev_kv, filters, progress_notify, fragment,
         want_id) = args
    except ValueError:
        raise ProtocolError("shmwatch: malformed watch request") from None
    if type(arena) is not int or type(ring) is not int:
        raise ProtocolError("shmwatch: watch ring out of range")
    spec = WatchSpec(_bytes(key, "watch key"), _opt_bytes(end, "watch range end"),
                     _int(start_rev, "start_revision"), bool(prev_kv),
                     _int(filters, "filters") & (FILTER_NOPUT | FILTER_NODELETE),
                     bool(progress_notify), bool(fragment))
    if type(want_id) is not int or want_id not in _INT64:
        raise ProtocolError("shmwatch: malformed watch id")
    return WatchCreateRequest(rid, arena, ring, spec, want_id)


def parse_request(data: bytes, max_size: int):
    """A request's bytes as one of the *Request tuples above; ProtocolError (with what
    `peek_id` can tell of its id, in `.req_id`) on anything malformed."""
    msg = unpackb(data, max_size=max_size)
    if not isinstance(msg, list) or len(msg) < 2 or type(msg[1]) is not int:
        raise ProtocolError("shmwatch: malformed request")
    op, rid, args = msg[0], msg[1], msg[2:]
    try:
        if op == OP_KV and len(args) == 1:
            return KvRequest(rid, decode_op(args[0]), args[0])
        if op == OP_COMPACT and len(args) == 1:
            return CompactRequest(rid, _int(args[0], "compact revision"))
        if op == OP_WATCH_CREATE:
            return _parse_watch_create(rid, args)
        if op == OP_WATCH_CANCEL and len(args) == 1:
            return WatchCancelRequest(rid, _int(args[0], "watch id"))
        if op == OP_LEASE_GRANT and len(args) == 3:
            return LeaseGrantRequest(rid, _int64(args[0], "TTL"), _int64(args[1], "lease id"),
                                     _bool(args[2], "bound"))
        if op in (OP_LEASE_REVOKE, OP_LEASE_KEEPALIVE) and len(args) == 1:
            return LeaseRequest(rid, op, _int64(args[0], "lease id"))
        if op == OP_LEASE_TTL and len(args) == 2:
            return LeaseRequest(rid, op, _int64(args[0], "lease id"), _bool(args[1], "keys"))
        if not args:
            if op == OP_PROGRESS:
                return ProgressRequest(rid)
            if op == OP_ARENA:
                return ArenaRequest(rid)
            if op == OP_BYE:
                return ByeRequest(rid)
            if op == OP_LEASE_LEASES:
                return LeaseRequest(rid, op, 0)
    except ProtocolError as exc:
        exc.req_id = rid
        raise
    exc = ProtocolError(f"shmwatch: unknown or malformed request op {op!r}")
    exc.req_id = rid
    raise exc


# ---------------------------------------------------------------- encoding of ops

def encode_op(op) -> list:
    """A txn op (PutOp/RangeOp/DeleteOp/TxnOp) as a wire list."""
    if isinstance(op, PutOp):
        if op.lease or op.ignore_lease:
            return [K_PUT, op.key, op.value, op.prev_kv, op.ignore_value, op.lease,
                    op.ignore_lease]
        return [K_PUT, op.key, op.value, op.prev_kv, op.ignore_value]
    if isinstance(op, RangeOp):
        return [K_RANGE, *op]
    if isinstance(op, DeleteOp):
        return [K_DELETE, op.key, op.range_end, op.prev_kv]
    if isinstance(op, TxnOp):
        return [K_TXN, [list(c) for c in op.compare], [encode_op(o) for o in op.success],
                [encode_op(o) for o in op.failure]]
    raise TypeError(f"not a txn op: {op!r}")


def _bytes(v, what: str) -> bytes:
    if not isinstance(v, bytes):
        raise ProtocolError(f"shmwatch: {what} must be bytes")
    return v


def _opt_bytes(v, what: str) -> bytes | None:
    return None if v is None else _bytes(v, what)


def _int(v, what: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ProtocolError(f"shmwatch: {what} must be an integer")
    return v


def _int64(v, what: str) -> int:
    v = _int(v, what)
    if v not in _INT64:
        raise ProtocolError(f"shmwatch: {what} out of the int64 range")
    return v


def _bool(v, what: str) -> bool:
    if not isinstance(v, bool):
        raise ProtocolError(f"shmwatch: {what} must be a boolean")
    return v


def decode_compare(c) -> Compare:
    if not isinstance(c, list) or len(c) != 5:
        raise ProtocolError("shmwatch: malformed compare")
    key, target, result, value, end = c
    if target not in TARGETS:
        raise ProtocolError(f"shmwatch: unknown compare target {target!r}")
    if result not in _RESULTS:
        raise ProtocolError(f"shmwatch: unknown compare result {result!r}")
    if target == "VALUE":
        value = _bytes(value, "compare value")
    else:
        value = _int(value, "compare value")
    return Compare(_bytes(key, "key"), target, result, value, _opt_bytes(end, "range_end"))


def decode_op(o, depth: int = 0):
    if not isinstance(o, list) or not o:
        raise ProtocolError("shmwatch: malformed txn op")
    kind = o[0]
    try:
        if kind == K_PUT:
            # 5 fields, or 7 with a lease (records written before leases have 5)
            _, key, value, prev_kv, ignore_value, *lease = o
            lease_id, ignore_lease = lease if lease else (0, False)
            return PutOp(_bytes(key, "key"), _bytes(value, "value"), _bool(prev_kv, "prev_kv"),
                         _bool(ignore_value, "ignore_value"), _int64(lease_id, "lease"),
                         _bool(ignore_lease, "ignore_lease"))
        if kind == K_RANGE:
            (_, key, end, rev, limit, keys_only, count_only, order, target, min_mod, max_mod,
             min_create, max_create) = o
            if order not in SORT_ORDERS or target not in SORT_TARGETS:
                raise ProtocolError("shmwatch: unknown sort order or target")
            return RangeOp(_bytes(key, "key"), _opt_bytes(end, "range_end"), _int(rev, "revision"),
                           _int(limit, "limit"), _bool(keys_only, "keys_only"),
                           _bool(count_only, "count_only"), order, target,
                           _int(min_mod, "min_mod_revision"), _int(max_mod, "max_mod_revision"),
                           _int(min_create, "min_create_revision"),
                           _int(max_create, "max_create_revision"))
        if kind == K_DELETE:
            _, key, end, prev_kv = o
            return DeleteOp(_bytes(key, "key"), _opt_bytes(end, "range_end"), _bool(prev_kv, "prev_kv"))
        if kind == K_TXN:
            if depth > 32:
                raise ProtocolError("shmwatch: txn nested too deeply")
            _, cmp, suc, fail = o
            return decode_txn(cmp, suc, fail, depth + 1)
    except ValueError:
        raise ProtocolError("shmwatch: malformed txn op") from None
    raise ProtocolError(f"shmwatch: unknown txn op kind {kind!r}")


def decode_txn(cmp, suc, fail, depth: int = 0) -> TxnOp:
    if not (isinstance(cmp, list) and isinstance(suc, list) and isinstance(fail, list)):
        raise ProtocolError("shmwatch: malformed txn")
    return TxnOp(tuple(decode_compare(c) for c in cmp),
                 tuple(decode_op(o, depth) for o in suc),
                 tuple(decode_op(o, depth) for o in fail))


# ---------------------------------------------------------------- responses (broker side)

_RESPONSE_ENCODERS = {
    PutResponse: lambda r: (K_PUT, r.revision, r.prev_kv),
    RangeResponse: lambda r: (K_RANGE, r.revision, r.kvs, r.count, r.more),
    DeleteRangeResponse: lambda r: (K_DELETE, r.revision, r.deleted, r.prev_kvs),
    TxnResponse: lambda r: (K_TXN, r.revision, r.succeeded,
                            [_RESPONSE_ENCODERS[type(x)](x) for x in r.responses]),
    CompactResponse: lambda r: (-1, r.revision),
    LeaseGrantResponse: lambda r: (-2, r.revision, r.id, r.ttl),
    LeaseRevokeResponse: lambda r: (-3, r.revision),
    LeaseKeepAliveResponse: lambda r: (-4, r.revision, r.id, r.ttl),
    LeaseTimeToLiveResponse: lambda r: (-5, r.revision, r.id, r.ttl, r.granted_ttl, r.keys),
    LeaseLeasesResponse: lambda r: (-6, r.revision, r.leases),
}


def encode_response(resp):
    """A KV response as its wire body (a tuple msgpack packs as an array). O(size)."""
    try:
        return _RESPONSE_ENCODERS[type(resp)](resp)
    except KeyError:
        raise TypeError(f"not a response: {resp!r}") from None


# ---------------------------------------------------------------- responses (client side)

def decode_kv(x) -> KeyValue | None:
    """A KeyValue from its wire array (None stays None); ProtocolError if malformed."""
    if x is None:
        return None
    try:
        key, value, create, mod, version, lease = x
    except (TypeError, ValueError):
        raise ProtocolError("shmwatch: malformed key-value") from None
    if (type(key) is not bytes or type(value) is not bytes or type(create) is not int
            or type(mod) is not int or type(version) is not int or type(lease) is not int):
        raise ProtocolError("shmwatch: malformed key-value")
    return KeyValue(key, value, create, mod, version, lease)


def decode_response(body):
    """The wire body of a KV response back into its response object."""
    try:
        kind = body[0]
        if type(body[1]) is not int:
            raise TypeError
        if kind == K_PUT:
            return PutResponse(body[1], decode_kv(body[2]))
        if kind == K_RANGE:
            return RangeResponse(body[1], [decode_kv(k) for k in body[2]], body[3], body[4])
        if kind == K_DELETE:
            return DeleteRangeResponse(body[1], body[2], [decode_kv(k) for k in body[3]])
        if kind == K_TXN:
            return TxnResponse(body[1], body[2], [decode_response(r) for r in body[3]])
        if kind == -1:
            return CompactResponse(body[1])
        if kind < -1:
            return _decode_lease_response(kind, body)
    except (TypeError, IndexError, KeyError, ValueError):
        pass
    raise ProtocolError("shmwatch: malformed response")


def _decode_lease_response(kind: int, body):
    if any(type(x) is not int for x in body[1:4 if kind != -6 else 2]):
        raise TypeError
    if kind == -2 and len(body) == 4:
        return LeaseGrantResponse(body[1], body[2], body[3])
    if kind == -3 and len(body) == 2:
        return LeaseRevokeResponse(body[1])
    if kind == -4 and len(body) == 4:
        return LeaseKeepAliveResponse(body[1], body[2], body[3])
    if kind == -5 and len(body) == 6 and type(body[4]) is int:
        keys = body[5]
        if not isinstance(keys, list) or any(type(k) is not bytes for k in keys):
            raise TypeError
        return LeaseTimeToLiveResponse(body[1], body[2], body[3], body[4], keys)
    if kind == -6 and len(body) == 3:
        ids = body[2]
        if not isinstance(ids, list) or any(type(i) is not int for i in ids):
            raise TypeError
        return LeaseLeasesResponse(body[1], ids)
    raise ValueError


def decode_reply(data: bytes):
    """(req_id, result-or-error) from a reply record; error is a ShmwatchError instance."""
    msg = unpackb(data)
    if (not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[0], int)
            or not isinstance(msg[1], int)):
        raise ProtocolError("shmwatch: malformed reply")
    req_id, status, body = msg
    if status:
        fields = None
        if isinstance(body, list) and len(body) == 2 and isinstance(body[1], dict):
            body, fields = body
        return req_id, error_from_code(status, body if isinstance(body, str) else None, fields)
    return req_id, body


def peek_id(head: bytes, index: int) -> int:
    """Element `index` of a msgpack array message, read from its first bytes only (the
    request id of a request, index 1, or of a reply, index 0); 0 if unreadable. Used
    for messages too large to decode, so their sender still gets its typed error."""
    try:
        u = msgpack.Unpacker(max_buffer_size=max(len(head), 1))
        u.feed(head[:64])
        u.read_array_header()
        for _ in range(index):
            u.skip()
        rid = u.unpack()
        return rid if type(rid) is int else 0
    except Exception:  # any malformed prefix: the id is simply unknown
        return 0


def watch_created_body(watch_id: int, revision: int, reason: str = "", code: int = 0) -> list:
    """The reply to a watch create: the id, the revision it was created at, and for a
    refusal (code != 0, an error code) etcd's cancel reason."""
    return [watch_id, revision, reason, code]


def decode_watch_created(body) -> tuple[int, int, str, int]:
    try:
        wid, rev, reason, code = body
        if type(wid) is int and type(rev) is int and type(reason) is str and type(code) is int:
            return wid, rev, reason, code
    except (TypeError, ValueError):
        pass
    raise ProtocolError("shmwatch: malformed watch-create reply")


def arena_body(index: int, name: str) -> list:
    """The reply to an arena request: its number and its segment's name."""
    return [index, name]


def decode_arena(body) -> tuple[int, str]:
    try:
        index, name = body
        if type(index) is int and type(name) is str:
            return index, name
    except (TypeError, ValueError):
        pass
    raise ProtocolError("shmwatch: malformed arena reply")


def decode_put_response(body) -> PutResponse:
    """The put path's reply body (see `encode_response`), checked like the others."""
    resp = decode_response(body)
    if type(resp) is not PutResponse:
        raise ProtocolError("shmwatch: malformed put response")
    return resp


def encode_reply(req_id: int, body) -> bytes:
    return packb([req_id, 0, body])


def encode_error(req_id: int, exc) -> bytes:
    """An error reply: `[req_id, code, message]`, or `[req_id, code, [message, fields]]`
    for an error with wire fields (e.g. the revision a too-large reply was applied at)."""
    fields = exc.wire_fields()
    return packb([req_id, exc.code, [exc.message, fields] if fields else exc.message])
