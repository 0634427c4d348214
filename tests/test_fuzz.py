"""Untrusted bytes: what a faulty peer can put in shared memory, and what a decoder does
with it.

The contract under test (shm/ring.py, clientlib/protocol.py): every length and counter
read from shared memory is bound-checked and a bad one raises `RingCorrupt`; every
decoder raises `ProtocolError` on anything malformed. Nothing else may escape, nothing
may hang, and a faulty client costs the broker that client only.
"""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import broker
import clientlib
from broker.mvcc import MVCCStore
from shm.errors import MessageTooLarge, RingCorrupt, RingFull
from shm.ring import ABORT, MORE, RING_HEADER, WRAP, Ring
from shmwatch.wire.errors import ProtocolError, ShmwatchError
from shmwatch.wire.events import decode_watch_response, encode_event, encode_watch_control, events_blob
from shmwatch.wire.ops import DeleteOp, PutOp, RangeOp, TxnOp
from shmwatch.wire.protocol import (
    OP_ARENA,
    OP_LEASE_GRANT,
    OP_LEASE_KEEPALIVE,
    OP_LEASE_LEASES,
    OP_LEASE_REVOKE,
    OP_LEASE_TTL,
    OP_BYE,
    OP_COMPACT,
    OP_KV,
    OP_PROGRESS,
    OP_WATCH_CANCEL,
    OP_WATCH_CREATE,
    W_CANCELED,
    W_CREATED,
    W_EVENTS,
    W_PROGRESS,
    W_PROGRESS_NOTIFY,
    decode_op,
    decode_reply,
    decode_response,
    encode_op,
    packb,
    unpackb,
)
from shmwatch.wire.types import Event, KeyValue, WatchResponse
from tests import fault_workers as fw

FUZZ = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# ------------------------------------------------------------------ strategies

leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
        | st.binary(max_size=12) | st.text(max_size=8))
tree = st.recursive(
    leaf,
    lambda ch: st.lists(ch, max_size=7) | st.dictionaries(
        st.text(max_size=4) | st.integers(-5, 5), ch, max_size=3),
    max_leaves=25)
# Structures shaped like what the decoders expect, with arbitrary values in the fields:
# random trees almost never reach the checks past the first shape test.
kv_like = st.one_of(st.none(), st.lists(leaf, min_size=6, max_size=6), tree)
event_like = st.lists(st.sampled_from(["PUT", "DELETE"]) | leaf, min_size=3, max_size=3).map(
    lambda e: [e[0], *e[1:]]) | st.tuples(st.sampled_from(["PUT", "DELETE"]), kv_like,
                                          kv_like).map(list)
compare_like = st.tuples(
    leaf, st.sampled_from(["VALUE", "VERSION", "CREATE", "MOD", "LEASE"]) | leaf,
    st.sampled_from(["EQUAL", "NOT_EQUAL", "GREATER", "LESS"]) | leaf, leaf, leaf).map(list)
op_like = st.recursive(
    st.one_of(
        st.tuples(st.just(0), leaf, leaf, leaf, leaf).map(list),
        st.tuples(st.just(1), leaf, leaf, leaf, leaf, leaf, leaf).map(list),
        st.tuples(st.just(2), leaf, leaf, leaf).map(list),
        st.tuples(st.just(0), st.binary(max_size=4), st.binary(max_size=4), st.booleans(),
                  st.booleans()).map(list),
        st.tuples(st.just(1), st.binary(max_size=4), st.none() | st.binary(max_size=4),
                  st.integers(-3, 10), st.integers(-3, 10), st.booleans(),
                  st.booleans()).map(list),
        st.lists(leaf, max_size=8),
    ),
    lambda ch: st.tuples(st.just(3), st.lists(compare_like, max_size=3),
                         st.lists(ch, max_size=3), st.lists(ch, max_size=3)).map(list),
    max_leaves=8)
reply_like = st.tuples(leaf, tree, tree).map(list) | tree
watch_like = st.tuples(st.integers(-1, 5) | leaf, leaf, leaf, leaf, leaf,
                       st.lists(event_like, max_size=3) | leaf).map(list) | tree


def wire(x):
    """What the peer's decoder sees: `x` after a msgpack round trip."""
    return msgpack.unpackb(packb(x), raw=False, strict_map_key=False)


# ------------------------------------------------------------------ ring decoder

CAP = 256


def read_all(r: Ring, limit: int = 64) -> list[bytes]:
    """Read until the ring is empty, RingCorrupt, or `limit` messages (a hang guard:
    each record is >= 8 bytes, so a ring of CAP bytes holds at most CAP / 8)."""
    out = []
    for _ in range(limit):
        m = r.read()
        if m is None:
            return out
        assert isinstance(m, bytes) and len(m) <= r.max_message
        out.append(m)
    raise AssertionError(f"read() returned {limit} messages from a {CAP}-byte ring")


@FUZZ
@given(st.binary(min_size=RING_HEADER + CAP, max_size=RING_HEADER + CAP),
       st.integers(0, 64))
def test_ring_attach_and_read_arbitrary_bytes(raw, max_message):
    """A ring whose header and data are arbitrary bytes: attaching and reading give
    messages or RingCorrupt, nothing else, and reading ends."""
    try:
        r = Ring(memoryview(bytearray(raw)), max_message=max_message * 8)
    except (RingCorrupt, MessageTooLarge):
        return
    try:
        read_all(r)
    except (RingCorrupt, MessageTooLarge):
        pass


record = st.one_of(
    st.tuples(st.just("rec"), st.binary(max_size=80), st.booleans(), st.booleans()),
    st.tuples(st.just("wrap")),
    st.tuples(st.just("abort")),
    st.tuples(st.just("word"), st.integers(0, 2**64 - 1)),
)


@FUZZ
@given(st.lists(record, max_size=12),
       st.integers(0, 2**64 - 1) | st.integers(0, 4 * CAP),
       st.integers(-16, 48), st.sampled_from([0, CAP, 8, 2**63]), st.integers(0, 40))
def test_ring_read_structured_garbage(recs, tail, dhead, stamp, max_message):
    """Records that are almost right (good or bad CRCs, MORE chains, wrap markers in odd
    places, lying lengths) under arbitrary counters and capacity stamps."""
    tail &= ~7
    buf = bytearray(RING_HEADER + CAP)
    off = 0
    for r in recs:
        p = (tail + off) % CAP
        if r[0] == "rec":
            payload, more, good = r[1], r[2], r[3]
            n = len(payload)
            if p + ((n + 15) & -8) > CAP:
                break
            crc = zlib.crc32(payload) ^ (0 if good else 1)
            struct.pack_into("=II", buf, RING_HEADER + p, n | (MORE if more else 0), crc)
            buf[RING_HEADER + p + 8:RING_HEADER + p + 8 + n] = payload
            off += (n + 15) & -8
        elif r[0] == "wrap":
            struct.pack_into("=I", buf, RING_HEADER + p, WRAP)
            off += CAP - p
        elif r[0] == "abort":
            struct.pack_into("=I", buf, RING_HEADER + p, ABORT)
            off += 8
        else:
            struct.pack_into("=Q", buf, RING_HEADER + p, r[1])
            off += 8
    struct.pack_into("=Q", buf, 0, (tail + max(0, off + dhead * 8)) % 2**64)
    struct.pack_into("=Q", buf, 64, tail)
    struct.pack_into("=Q", buf, 136, stamp)
    try:
        ring = Ring(memoryview(buf), max_message=max_message * 8)
        read_all(ring)
    except (RingCorrupt, MessageTooLarge):
        pass


@FUZZ
@given(st.lists(st.binary(max_size=150), min_size=1, max_size=6), st.data())
def test_ring_corrupted_byte_never_yields_a_wrong_message(msgs, data):
    """Messages written properly, then one byte of the data area flipped anywhere
    (record headers, payloads, padding, wrap markers): the reader gets the original
    messages, or RingCorrupt at some point, never a message that was not written.

    (The counters are out of scope: `head` is the producer's to publish, and a head
    moved past the written records over zeroed memory reads as empty messages, since a
    zero length with a zero CRC is a valid empty record.)"""
    buf = bytearray(RING_HEADER + CAP)
    w = Ring(memoryview(buf), init=True)
    sent = []
    for m in msgs:
        try:
            if w.write(m, 0) != len(m):
                break
        except RingFull:  # b"" without room
            break
        sent.append(m)
    w.publish()
    assume(sent)
    i = data.draw(st.integers(RING_HEADER, len(buf) - 1), label="byte")
    buf[i] ^= data.draw(st.integers(1, 255), label="xor")
    try:
        r = Ring(memoryview(buf))
        got = read_all(r)
    except (RingCorrupt, MessageTooLarge):
        return
    assert got == sent[:len(got)], "a corrupted ring produced a message that was not written"


@settings(max_examples=50, deadline=None, database=None)
@given(st.binary(min_size=CAP, max_size=CAP), st.integers(0, 2**64 - 1) | st.integers(0, CAP))
def test_ring_hostile_producer_head(data, head):
    """A fresh ring whose producer wrote arbitrary data and published an arbitrary head
    (what a hostile client can do to the broker's request ring)."""
    buf = bytearray(RING_HEADER + CAP)
    r = Ring(memoryview(buf), init=True)
    buf[RING_HEADER:] = data
    r._hq[0] = head
    try:
        read_all(r)
    except (RingCorrupt, MessageTooLarge):
        pass


# ------------------------------------------------------------------ protocol decoders


@FUZZ
@given(st.binary(max_size=200))
def test_unpackb_arbitrary_bytes(data):
    try:
        unpackb(data)
    except ProtocolError:
        pass


@FUZZ
@given(tree)
def test_unpackb_bounds_the_size(x):
    data = packb(x)
    if len(data) > 16:
        with pytest.raises(ProtocolError):
            unpackb(data, max_size=16)
    else:
        try:
            assert packb(unpackb(data, max_size=16)) == data  # (NaN != NaN: compare bytes)
        except ProtocolError:  # a map with a non-string key (strict_map_key)
            pass


@FUZZ
@given(tree | op_like)
def test_decode_op_arbitrary_structures(x):
    """decode_op (the broker's request decoder) on anything msgpack can carry: an op of
    the right types, or ProtocolError."""
    try:
        op = decode_op(wire(x))
    except ProtocolError:
        return
    _check_op(op)


def _check_op(op) -> None:
    if isinstance(op, PutOp):
        assert isinstance(op.key, bytes) and isinstance(op.value, bytes)
    elif isinstance(op, RangeOp):
        assert isinstance(op.key, bytes) and isinstance(op.revision, int)
        assert isinstance(op.limit, int)
    elif isinstance(op, DeleteOp):
        assert isinstance(op.key, bytes)
    else:
        assert isinstance(op, TxnOp)
        for o in (*op.success, *op.failure):
            _check_op(o)


@FUZZ
@given(op_like | tree)
def test_decoded_requests_never_crash_the_store(x):
    """A request that decodes is applied or refused with a ShmwatchError by the MVCC
    core: never another exception (the broker would report it as an internal error)."""
    try:
        op = decode_op(wire(x))
    except ProtocolError:
        return
    store = MVCCStore()
    store.apply(PutOp(b"a", b"1", False, False))
    store.apply(PutOp(b"b", b"2", False, False))
    try:
        store.apply(op)
    except ShmwatchError:
        pass
    store._check()  # a refused request left the store consistent


def _valid_kv(kv) -> bool:
    return (type(kv) is KeyValue and type(kv.key) is bytes and type(kv.value) is bytes
            and all(type(v) is int for v in kv[2:]))


def _valid_watch_response(resp: WatchResponse) -> bool:
    """Every field of the type WatchResponse promises (bool is not an int here)."""
    return (type(resp.watch_id) is int and type(resp.revision) is int
            and type(resp.compact_revision) is int and type(resp.cancel_reason) is str
            and type(resp.fragment) is bool and type(resp.created) is bool
            and type(resp.canceled) is bool and type(resp.events) is list
            and all(type(e) is Event and e.type in ("PUT", "DELETE") and _valid_kv(e.kv)
                    and (e.prev_kv is None or _valid_kv(e.prev_kv)) for e in resp.events))


@FUZZ
@given(st.binary(max_size=120))
def test_decode_watch_response_arbitrary_bytes(data):
    """Bytes from a watch ring: a well-typed response, or ProtocolError."""
    try:
        _kind, resp = decode_watch_response(data, 7)
    except ProtocolError:
        return
    assert _valid_watch_response(resp), f"accepted an ill-typed response: {resp}"


@FUZZ
@example([0, 5, 0, "", False, [["PUT", None, None]]])
@example([0, "x", 0, "", False, []])
@given(watch_like)
def test_decode_watch_response_arbitrary_structures(x):
    """Structures shaped almost like a watch response: a well-typed response, or
    ProtocolError."""
    try:
        _kind, resp = decode_watch_response(packb(x), 7)
    except ProtocolError:
        return
    assert _valid_watch_response(resp), f"accepted an ill-typed response: {resp}"


i64 = st.integers(-(2**63), 2**63 - 1)
kvs = st.builds(KeyValue, st.binary(min_size=1, max_size=16), st.binary(max_size=32),
                i64, i64, i64, i64)
events = st.builds(Event, st.sampled_from(["PUT", "DELETE"]), kvs, st.none() | kvs)


@FUZZ
@given(st.lists(events, max_size=6), i64, st.booleans(), st.booleans(),
       st.integers(-(2**31), 2**31))
def test_watch_events_round_trip(evs, rev, with_prev, fragment, watch_id):
    """What the broker writes for a revision's events (each event encoded once, with or
    without prev_kv, joined by events_blob) decodes to exactly those events, with
    every field and type intact."""
    data = events_blob(rev, [encode_event(e, with_prev) for e in evs], fragment)
    kind, resp = decode_watch_response(data, watch_id)
    want = [e if with_prev else Event(e.type, e.kv, None) for e in evs]
    assert kind == W_EVENTS
    assert resp == WatchResponse(watch_id=watch_id, revision=rev, events=want,
                                 fragment=fragment)
    assert _valid_watch_response(resp)
    assert all(type(e.kv) is KeyValue for e in resp.events)


@FUZZ
@given(st.sampled_from([W_CREATED, W_CANCELED, W_PROGRESS, W_PROGRESS_NOTIFY]), i64, i64,
       st.text(max_size=40), st.integers(0, 2**31))
def test_watch_control_responses_round_trip(kind, rev, compact_rev, reason, watch_id):
    """created / canceled / progress responses decode to their flags and fields; a
    progress answer carries watch id -1, as in etcd 3.4."""
    got_kind, resp = decode_watch_response(
        encode_watch_control(kind, rev, compact_rev, reason), watch_id)
    assert got_kind == kind
    assert resp == WatchResponse(
        watch_id=-1 if kind == W_PROGRESS else watch_id, revision=rev, events=[],
        created=kind == W_CREATED, canceled=kind == W_CANCELED,
        compact_revision=compact_rev, cancel_reason=reason, fragment=False)


wrong_type = {
    "kind": st.sampled_from(["0", None, 1.0, True, [0], 5, -1]),
    "revision": st.sampled_from(["5", None, 5.0, True, b"5", [5]]),
    "compact_revision": st.sampled_from(["0", None, 0.0, False, b"", {}]),
    "reason": st.sampled_from([b"x", None, 0, ["x"]]),
    "fragment": st.sampled_from([0, 1, None, "true", b""]),
    "events": st.sampled_from([None, {}, "[]", b"", 0]),
}
FIELDS = list(wrong_type)


@FUZZ
@given(st.lists(events, max_size=3), st.sampled_from(FIELDS), st.data())
def test_watch_response_with_an_ill_typed_field_is_refused(evs, field, data):
    """A valid response with any one field of the wrong type (a bool for an int, bytes
    for a str, 0/1 for a bool, ...): ProtocolError, never a response."""
    msg = [W_EVENTS, 9, 0, "", False, [list(e) for e in evs]]
    msg[FIELDS.index(field)] = data.draw(wrong_type[field], label=field)
    with pytest.raises(ProtocolError):
        decode_watch_response(packb(msg), 7)


bad_kv = st.one_of(
    st.tuples(st.text(max_size=3), st.binary(), i64, i64, i64, i64).map(list),
    st.tuples(st.binary(), st.binary(), st.booleans(), i64, i64, i64).map(list),
    st.tuples(st.binary(), st.binary(), i64, i64, st.floats(), i64).map(list),
    st.lists(st.binary(), min_size=0, max_size=5), st.just("kv"), st.just(7))


@FUZZ
@given(st.sampled_from(["PUT", "DELETE"]), bad_kv, st.booleans(),
       st.sampled_from(["put", "PUT ", "", None, 0]))
def test_watch_event_with_a_malformed_part_is_refused(etype, kv, as_prev, bad_type):
    """An event whose kv or prev_kv is malformed, or whose type is unknown, or which is
    missing its kv: ProtocolError."""
    good = list(KeyValue(b"k", b"v", 1, 2, 1, 0))
    for event in ([etype, good, kv] if as_prev else [etype, kv, None],
                  [bad_type, good, None], [etype, None, good], [etype, good]):
        with pytest.raises(ProtocolError):
            decode_watch_response(packb([W_EVENTS, 2, 0, "", False, [event]]), 7)


@FUZZ
@given(tree | st.lists(leaf, max_size=6))
def test_decode_response_arbitrary_structures(x):
    try:
        decode_response(wire(x))
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=120))
def test_decode_reply_arbitrary_bytes(data):
    try:
        decode_reply(data)
    except ProtocolError:
        pass


@FUZZ
@example([1, [1], "x"])
@given(reply_like)
def test_decode_reply_arbitrary_structures(x):
    try:
        rid, _result = decode_reply(packb(x))
    except ProtocolError:
        return
    assert isinstance(rid, int)


# ------------------------------------------------------------------ a live broker


def send_raw(c: clientlib.Client, payload: bytes) -> None:
    """Put `payload` in `c`'s request ring as one well-formed record (CRC right)."""
    with c._send_lock:
        off = c._req.write(payload, 0)
        assert off == len(payload)
        c._req.publish()
        c._broker_bell.ring()


def check_still_serving(other: clientlib.Client, n: int) -> None:
    """put / get / watch on a client the garbage did not come from."""
    with other.watch(f"probe/{n}") as w:
        assert w.get(10).created
        rev = other.put(f"probe/{n}", "v").revision
        r = w.get(10)
        assert [(e.kv.key, e.kv.mod_revision) for e in r.events] == [(f"probe/{n}".encode(), rev)]
    assert other.get(f"probe/{n}").kvs[0].value == b"v"


# A request: [op, req_id, *args] with arbitrary args. req_ids never collide with the
# client's own (which count up from 1); OP_BYE (leave), OP_ARENA (8 MB of /dev/shm
# per call) and OP_LEASE_GRANT are left out (`leaves_the_client`): legitimate, not garbage.
ops = st.sampled_from([OP_KV, OP_COMPACT, OP_WATCH_CREATE, OP_WATCH_CANCEL, OP_PROGRESS,
                       OP_LEASE_REVOKE, OP_LEASE_KEEPALIVE, OP_LEASE_TTL, OP_LEASE_LEASES,
                       0, 99, -1, 2**40]) | leaf
rids = st.integers(-(2**63), -1) | st.just(0) | st.integers(2**50, 2**64 - 1) | leaf
request_like = st.one_of(
    st.tuples(ops, rids).flatmap(lambda t: st.lists(tree, max_size=12).map(lambda a: [*t, *a])),
    st.tuples(st.just(OP_KV), rids, op_like).map(list),
    tree,
)
# Requests with a good id whose body may well be valid: writes and compactions that the
# broker applies, so the store really changes under the garbage.
valid_id = st.integers(2**50, 2**60)
valid_op = st.one_of(
    # every field given: st.builds would otherwise draw the defaulted ones too (a lease id
    # past int64 cannot even be encoded, and a lease id nobody granted is a refusal)
    st.builds(PutOp, st.binary(min_size=1, max_size=3), st.binary(max_size=8), st.booleans(),
              st.just(False), st.just(0), st.just(False)),
    st.builds(DeleteOp, st.binary(min_size=1, max_size=2), st.none() | st.binary(max_size=2),
              st.booleans()),
).map(encode_op)
writes_like = st.one_of(
    st.tuples(st.just(OP_KV), valid_id, valid_op | op_like).map(list),
    st.tuples(st.just(OP_COMPACT), valid_id, st.integers(-2, 40)).map(list),
)


def model_apply(model: MVCCStore, payload: bytes) -> None:
    """What a request record does to the store, by the broker's rules
    (Broker._handle): only a well-formed KV request or compaction changes anything."""
    try:
        msg = unpackb(payload)
    except ProtocolError:
        return
    if not isinstance(msg, list) or len(msg) != 3 or not isinstance(msg[1], int):
        return
    try:
        if msg[0] == OP_KV:
            model.apply(decode_op(msg[2]))
        elif msg[0] == OP_COMPACT and isinstance(msg[2], int):
            model.compact(msg[2])
    except ShmwatchError:  # refused: changes nothing (ProtocolError is one)
        pass


def leaves_the_client(payload: bytes) -> bool:
    """A request that legitimately ends or grows the client (OP_BYE leaves, OP_ARENA
    creates 8 MB of /dev/shm), or grants a lease (whose TTL then runs on the broker's
    clock and deletes keys the model knows nothing of): not garbage, left out. Other
    lease requests stay in: with no lease granted they change nothing."""
    try:
        msg = unpackb(payload)
    except ProtocolError:
        return False
    return (isinstance(msg, list) and len(msg) >= 2 and isinstance(msg[1], int)
            and not isinstance(msg[0], (list, dict))
            and msg[0] in (OP_BYE, OP_ARENA, OP_LEASE_GRANT))


EVERY_KEY = RangeOp(b"\0", b"\0")


@pytest.mark.timeout(240)
def test_garbage_requests_are_answered_and_the_broker_keeps_serving():
    """Arbitrary msgpack documents and arbitrary bytes, each in a record with a valid
    header and CRC, sent to a live broker: each is answered (in order: the client's next
    real call gets its own reply), the client stays connected, the store holds exactly
    what a model store given the same records holds (garbage that happens to be a valid
    write is applied, everything else changes nothing), and another client can still
    put, get and watch."""
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c, \
            clientlib.connect(b.name, timeout=10) as other:
        model = MVCCStore()
        model.apply(PutOp(b"fz/probe", b"v", False, False))
        assert c.put("fz/probe", "v").revision == 2
        changed = [0]

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(writes_like | request_like | st.binary(max_size=64).map(lambda b: ("raw", b)))
        def run(x):
            payload = x[1] if isinstance(x, tuple) else packb(x)
            assume(not leaves_the_client(payload))
            send_raw(c, payload)
            model_apply(model, payload)
            got = c.get(b"\0", range_end=b"\0", timeout=10)
            want, _ = model.apply(EVERY_KEY)
            assert (got.revision, got.kvs) == (want.revision, want.kvs), \
                f"after {payload!r}: the store differs from the model"
            changed[0] = max(changed[0], got.revision)
            with c._cond:
                c._replies.clear()  # the garbage's own answers

        run()
        assert changed[0] > 2, "no garbage was a valid write: the model was never tested"
        assert b.alive()
        check_still_serving(other, 0)
        check_still_serving(c, 1)
        s = fw.stats_where(b.name, lambda s: len(s["clients"]) == 2, 10, "two clients")
        assert len(s["clients"]) == 2


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["bad_crc", "bad_length", "wrap_at_start", "bad_head"])
def test_corrupt_record_disconnects_only_that_client(fault):
    """A record the ring decoder rejects (CRC mismatch, a length beyond the chunk limit,
    a wrap marker at offset 0, a head counter out of range) makes the broker disconnect
    that client (its segments go, it leaves the client list); its next call fails with
    a ShmwatchError instead of hanging; every other client keeps working."""
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as other:
        w = other.watch("probe/", prefix=True)
        assert w.get(10).created
        c = clientlib.connect(b.name, timeout=2)
        part = c._part
        r = c._req
        h = r._head
        assert r.write(packb([OP_KV, 2**60, encode_op(clientlib.op_put("bad", "x"))]), 0)
        pos = h % r.capacity
        if fault == "bad_crc":
            r._dq[pos >> 3] ^= 1 << 40
        elif fault == "bad_length":
            r._dq[pos >> 3] = (r._dq[pos >> 3] & ~0x7FFFFFFF) | (r.max_chunk + 8)
        elif fault == "wrap_at_start":
            assert pos == 0
            r._dq[0] = WRAP
        r.publish()
        if fault == "bad_head":
            r._hq[0] = r.capacity * 4 + 8
        c._broker_bell.ring()
        fw.wait_for(lambda: not fw.client_entries(b.name, part), 30,
                    "the broker to disconnect the faulty client")
        fw.stats_where(b.name, lambda s: len(s["clients"]) == 1, 30, "one client left")
        with pytest.raises(clientlib.ShmwatchError):
            c.put("bad", "y", timeout=2)
        assert b.alive()
        check_still_serving(other, 0)
        assert other.get("bad").kvs == []
        c.close()


@pytest.mark.timeout(60)
def test_disconnected_client_is_told_so():
    with broker.spawn() as b:
        c = clientlib.connect(b.name, timeout=5)
        try:
            w = c.watch("k")
            assert w.get(10).created
            r = c._req
            h = r._head
            r.write(b"\x90", 0)
            r._dq[(h % r.capacity) >> 3] ^= 1 << 40
            r.publish()
            c._broker_bell.ring()
            fw.wait_for(lambda: not fw.client_entries(b.name, c._part), 30, "disconnect")
            with pytest.raises(clientlib.BrokerUnavailable):
                w.get(timeout=2)
        finally:
            c.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ring", ["watch", "response"])
def test_bad_consumer_tail_costs_only_that_client(ring):
    with broker.spawn(watch_ring_bytes=4096, response_ring_bytes=4096) as b, \
            clientlib.connect(b.name, timeout=5) as other:
        c = clientlib.connect(b.name, timeout=5)
        try:
            if ring == "watch":
                w = c.watch("k")
                assert w.get(10).created
                w._ring._hq[8] = 3  # tail: not a multiple of 8, beyond head
                for _ in range(40):  # fill the 4 KiB watch ring: the broker rereads tail
                    other.put("k", "x" * 200)
            else:
                c._resp._hq[8] = 3
                with c._send_lock:  # 200 requests, their replies never read
                    for i in range(200):
                        c._req.write(packb([OP_KV, 2**60 + i,
                                            encode_op(clientlib.op_get("k"))]), 0)
                    c._req.publish()
                    c._broker_bell.ring()
            fw.wait_for(lambda: not b.alive() or not fw.client_entries(b.name, c._part), 30,
                        "the broker to disconnect the faulty client (or die)")
            assert b.alive(), "the broker died of one client's bad ring counter"
            check_still_serving(other, 0)
        finally:
            c.close()


# ------------------------------------------------------------------ hostile requests


@pytest.mark.timeout(60)
def test_oversized_request_and_invalid_range_watch_are_refused():
    """A request over max_request_bytes raises RequestTooLargeError, whether the client
    catches it or the broker does (a client that ignores the limit); a watch with
    key >= range_end is refused (created + canceled, InvalidRangeError); the broker
    keeps serving both clients."""
    with broker.spawn(max_request_bytes=4096) as b, \
            clientlib.connect(b.name, timeout=10) as c, \
            clientlib.connect(b.name, timeout=10) as other:
        with pytest.raises(clientlib.RequestTooLargeError):
            c.put("big", "x" * 10_000)
        c.max_request_bytes = 1 << 30  # a client that does not check: the broker does
        with pytest.raises(clientlib.RequestTooLargeError):
            c.put("big", "x" * 10_000)
        with pytest.raises(clientlib.RequestTooLargeError):
            c.txn(success=[clientlib.op_put(f"t{i}", "y" * 100) for i in range(100)])
        assert c.get("big").kvs == [] and c.get("t0").kvs == []
        w = c.watch("b", "a")
        first = w.get(5)
        assert first.created and first.canceled and first.cancel_reason
        with pytest.raises(clientlib.InvalidRangeError):
            w.get(5)
        w = c.watch("z", "z")  # key == range_end: empty as well
        first = w.get(5)
        assert first.created and first.canceled
        with pytest.raises(clientlib.InvalidRangeError):
            w.get(5)
        check_still_serving(c, 0)
        check_still_serving(other, 1)
        assert c.put("big", "x" * 1000).revision == 4


# ------------------------------------------------------------------ coverage-guided


@pytest.mark.timeout(120)
def test_atheris_targets_run_clean(tmp_path):
    """A short coverage-guided run of tests/fuzz_atheris.py (ring reads, the broker's
    request path through the MVCC core, the client's decoders), from valid seeds."""
    pytest.importorskip("atheris")
    import subprocess
    import sys
    from pathlib import Path

    target = str(Path(__file__).with_name("fuzz_atheris.py"))
    corpus = tmp_path / "corpus"
    subprocess.run([sys.executable, target, "--write-seeds", str(corpus)], check=True,
                   timeout=60)
    r = subprocess.run([sys.executable, target, str(corpus), "-runs=30000", "-seed=1",
                        f"-artifact_prefix={tmp_path}/"],
                       check=False, capture_output=True, text=True, timeout=100)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Done 30000 runs" in r.stderr
