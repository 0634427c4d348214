"""The etcd API as flows: each verb as a generator that yields the requests it needs
and is sent their replies. No I/O here: `Client._run` drives a flow with blocking
calls, `AsyncClient._run` (clientlib.aio) with awaits, so both clients share one
implementation of every verb (requests built by shmwatch.wire.protocol, replies decoded
there too).
"""

from __future__ import annotations

from collections.abc import Iterable

from shm import layout as L
from shm.errors import ShmError
from shm.ring import Ring
from shm.segment import Segment
from shmwatch.wire import errors
from shmwatch.wire.ops import DeleteOp, PutOp, RangeOp, TxnOp, op_put, op_txn, resolve_range, to_bytes
from shmwatch.wire.protocol import (
    FILTER_NODELETE,
    FILTER_NOPUT,
    WatchSpec,
    arena_request,
    compact_request,
    decode_arena,
    decode_put_response,
    decode_response,
    decode_watch_created,
    kv_request,
    lease_grant_request,
    lease_request,
    progress_request,
    put_request,
    watch_create_request,
)

from .watch import Watch

# A watch response is bounded by the broker (a catch-up by its ring's free space or one
# revision); a revision with prev_kv can exceed --max-response-bytes, so the reader's
# bound is gRPC's own default message limit (math.MaxInt32).
MAX_WATCH_RESPONSE = (1 << 31) - 1
INT64 = range(-(1 << 63), 1 << 63)
_FILTERS = {"noput": FILTER_NOPUT, "nodelete": FILTER_NODELETE,
            "NOPUT": FILTER_NOPUT, "NODELETE": FILTER_NODELETE}


class Late:
    """What a flow yields for a request whose effect must not be lost if its caller
    stops waiting (a timeout, a cancelled task): `on_late(reply)` gets the reply when
    it comes after all (the drivers register it with the client)."""

    __slots__ = ("msg", "on_late")

    def __init__(self, msg: list, on_late):
        self.msg = msg
        self.on_late = on_late


class Pipelined:
    """What a flow yields to send several requests at once (replies: a list, errors in
    place rather than raised)."""

    __slots__ = ("msgs",)

    def __init__(self, msgs: list[list]):
        self.msgs = msgs


def flow_kv(op):
    """Any KV op (range, delete, txn) -> its response."""
    return decode_response((yield kv_request(op)))


def put_message(key, value, prev_kv: bool, ignore_value: bool, lease=0,
                ignore_lease: bool = False) -> list:
    """A put's request (the put path is hot: no PutOp is built)."""
    return put_request(to_bytes(key), to_bytes(value, "value"), bool(prev_kv),
                       bool(ignore_value), _lease_id(lease), bool(ignore_lease))


def flow_put(key, value, prev_kv: bool, ignore_value: bool, lease: int = 0,
             ignore_lease: bool = False):
    return decode_put_response(
        (yield put_message(key, value, prev_kv, ignore_value, lease, ignore_lease)))


def _lease_id(lease) -> int:
    """A lease id as etcd takes it (int64), from an int or a `Lease`."""
    lease = getattr(lease, "id", lease)
    if isinstance(lease, bool) or not isinstance(lease, int):
        raise TypeError(f"lease must be a lease id (int) or a Lease, not {type(lease).__name__}")
    if lease not in INT64:
        raise ValueError(f"lease id {lease} is outside etcd's int64 range")
    return lease


def flow_lease_grant(ttl: int, lease_id: int, bound: bool):
    if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl not in INT64:
        raise TypeError(f"ttl must be an integer number of seconds, not {ttl!r}")
    return decode_response((yield lease_grant_request(ttl, _lease_id(lease_id), bound)))


def flow_lease(op: int, lease_id, keys: bool = False):
    """revoke, keep-alive, time-to-live or the lease list (shmwatch.wire.protocol
    OP_LEASE_*) -> its response."""
    return decode_response((yield lease_request(op, _lease_id(lease_id), keys)))


def raise_first_failure(what: str, out: list) -> None:
    """Of a batch's results (responses, or errors for the writes that failed), raise
    the first failure as its own type, with `.index` (its position) and `.results`."""
    first = next((i for i, r in enumerate(out) if isinstance(r, errors.ShmwatchError)), None)
    if first is None:
        return
    err = out[first]
    failed = sum(isinstance(r, errors.ShmwatchError) for r in out)
    exc = type(err)(f"{what} {first} of {len(out)} failed ({failed} failed "
                    f"in all; the others were applied): {err.message}")
    for name, value in err.wire_fields().items():
        setattr(exc, name, value)
    exc.index = first
    exc.results = out
    raise exc


def flow_put_many(items: Iterable[tuple], prev_kv: bool):
    msgs = [kv_request(op_put(k, v, prev_kv)) for k, v in items]
    if not msgs:
        return []
    out = [body if isinstance(body, errors.ShmwatchError) else decode_response(body)
           for body in (yield Pipelined(msgs))]
    raise_first_failure("put_many: item", out)
    return out


def flow_txn(compare: Iterable, success: Iterable, failure: Iterable):
    success, failure = tuple(success), tuple(failure)
    for op in (*success, *failure):
        if not isinstance(op, (PutOp, RangeOp, DeleteOp, TxnOp)):
            raise TypeError(f"not a txn op: {op!r} (build ops with clientlib.op_put etc.)")
    return (yield from flow_kv(op_txn(compare, success, failure)))


def flow_compact(revision: int):
    return decode_response((yield compact_request(revision)))


def flow_progress():
    yield progress_request()


def watch_spec(key, range_end, prefix: bool, start_revision: int, prev_kv: bool,
               filters: Iterable[str], progress_notify: bool, fragment: bool,
               watch_id: int | None) -> tuple[WatchSpec, int]:
    """A watch's wire spec and the id asked for, checked client-side."""
    k, end = resolve_range(key, range_end, prefix)
    bits = 0
    for f in filters:
        if f not in _FILTERS:
            raise ValueError(f"unknown watch filter {f!r} (noput, nodelete)")
        bits |= _FILTERS[f]
    want = int(watch_id or 0)
    if want not in INT64:
        raise ValueError(f"watch_id must be an int64, got {watch_id}")
    return WatchSpec(k, end, int(start_revision), bool(prev_kv), bits, bool(progress_notify),
                     bool(fragment)), want


def flow_watch(c, spec: WatchSpec, want: int, resume: bool):
    """Create a watch -> `Watch` (a refused one carries its refusal)."""
    wid, rev, reason, code, ring_slot, ring = yield from flow_create_watch(c, spec, want)
    if code:
        err = errors.error_from_code(code, reason)
        return Watch(c, -1, None, None, refused=(rev, reason, err))
    w = Watch(c, wid, ring_slot, ring, spec=spec, resume=resume)
    with c._cond:
        c._watches[wid] = w
    return w


def flow_create_watch(c, spec: WatchSpec, want_id: int):
    """Take a free watcher ring of `c` (asking the broker for a new arena of them when
    none is left) and create the watch on it. If the caller stops waiting, the ring
    stays taken until the late reply says what became of it (`_created_late`)."""
    ring_slot = yield from flow_take_ring(c)
    request = watch_create_request(ring_slot[0], ring_slot[1], spec, want_id)
    try:
        body = yield Late(request, lambda reply: _created_late(c, ring_slot, spec, reply))
    except (errors.Timeout, GeneratorExit):
        raise  # the broker may still create it: its late reply frees or adopts the ring
    except BaseException:
        c._free_rings.append(ring_slot)  # refused (or the client broke): ring unused
        raise
    wid, rev, reason, code = decode_watch_created(body)
    if code:
        c._free_rings.append(ring_slot)
        return wid, rev, reason, code, None, None
    return wid, rev, reason, 0, ring_slot, _ring_of(c, ring_slot)


def _ring_of(c, ring_slot) -> Ring:
    a, i = ring_slot
    rs = c._watch_ring_size
    return Ring(c._arenas[a].payload[i * rs:(i + 1) * rs], max_message=MAX_WATCH_RESPONSE)


def _created_late(c, ring_slot, spec: WatchSpec, reply) -> None:
    """The reply to a watch create whose caller gave up (called with the client's lock
    held, from its reply pump): a refusal frees the ring; a watch it created is
    cancelled at the next send and read to its end, then its ring is free again."""
    if isinstance(reply, errors.ShmwatchError):
        c._free_rings.append(ring_slot)
        return
    wid, rev, reason, code = decode_watch_created(reply)
    if code:
        c._free_rings.append(ring_slot)
        return
    w = Watch(c, wid, ring_slot, _ring_of(c, ring_slot), spec=spec)
    w._clean_end = True
    c._orphans.add(w)
    c._to_cancel.append(wid)


def flow_take_ring(c):
    """A free watcher ring of `c` (arena, index), asking the broker for a new arena of
    them when none is left (an arena whose caller gave up is still adopted: the
    broker numbers them in order)."""
    if not c._free_rings:
        reply = yield Late(arena_request(), lambda late: _adopt_arena(c, late))
        _adopt_arena(c, reply)
    return c._free_rings.pop()


def _adopt_arena(c, reply) -> None:
    """Map the arena a reply names and add its rings to the free list."""
    if isinstance(reply, errors.ShmwatchError):
        return  # no arena was made
    k, name = decode_arena(reply)
    if k != len(c._arenas):
        raise errors.ProtocolError("shmwatch: arena numbering out of step")
    try:
        seg = Segment.open(name, kind=L.KIND_ARENA, boot_id=c._boot_id)
    except ShmError:
        c._arenas.append(None)  # keeps step with the broker's numbering; never used
        raise
    if c._rings_per_arena * c._watch_ring_size > len(seg.payload):
        seg.close()
        c._arenas.append(None)
        raise errors.ProtocolError(
            f"shmwatch: broker {c.name!r} sent an arena smaller than its control segment "
            f"says ({c._rings_per_arena} x {c._watch_ring_size} bytes)")
    c._arenas.append(seg)
    c._free_rings.extend((k, i) for i in range(c._rings_per_arena - 1, -1, -1))
