"""Ring: records, wrap-around, full ring, streaming chunks, corruption, a model test,
and two processes passing 100k messages through a ring in a segment."""

from __future__ import annotations

import multiprocessing
import os
import random
import struct
import uuid
from collections import deque

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shm import (
    RING_HEADER,
    Doorbell,
    MessageTooLarge,
    Ring,
    RingCorrupt,
    RingFull,
    Segment,
    list_segments,
    list_semaphores,
    max_chunk_for,
    new_boot_id,
    ring_bytes,
    shm_name,
)

pytestmark = pytest.mark.timeout(120)

REC = struct.Struct("=II")  # length | crc, as laid out in the data area
WRAP = 0xFFFFFFFF
MORE = 0x80000000


def make_ring(capacity: int, **kw) -> Ring:
    return Ring(memoryview(bytearray(ring_bytes(capacity))), init=True, **kw)


def record_size(n: int) -> int:
    return (8 + n + 7) // 8 * 8


def msg_bytes(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def roundtrip(ring: Ring, payload: bytes, reader: Ring | None = None) -> bytes:
    """Stream `payload` through `ring`, draining as needed; return what was read."""
    reader = reader or ring
    off = 0
    got = None
    while True:
        off = ring.write(payload, off)
        ring.publish()
        ring._check()
        m = reader.read()
        if m is not None:
            assert got is None
            got = m
        if off == len(payload) and got is not None:
            return got


@pytest.fixture
def broker():
    token = f"t{os.getpid()}x{uuid.uuid4().hex[:12]}"  # the suite's names: conftest
    yield token
    prefix = f"shmwatch.{token}."
    for name in list_segments(prefix):
        Segment.unlink_name(name)
    for name in list_semaphores(prefix):
        Doorbell.unlink_name(name)


# -- basics ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, 8, 56, 63, 65, 100, -64])
def test_ring_bytes_rejects_bad_capacity(bad):
    with pytest.raises(ValueError):
        ring_bytes(bad)


def test_ring_bytes_and_capacity():
    assert ring_bytes(64) == RING_HEADER + 64
    assert make_ring(1024).capacity == 1024
    # a longer buffer: capacity is the rest rounded down to 8
    assert Ring(memoryview(bytearray(RING_HEADER + 1029)), init=True).capacity == 1024
    assert max_chunk_for(1024) == 256 - 8
    assert max_chunk_for(64) == 8
    with pytest.raises(ValueError):
        Ring(memoryview(bytearray(RING_HEADER + 60)), init=True)


def test_header_layout_and_flags():
    buf = memoryview(bytearray(ring_bytes(256)))
    ring = Ring(buf, init=True)
    ring.write(b"abc")
    ring.publish()
    assert struct.unpack_from("=Q", buf, 0)[0] == ring.head == 16
    assert struct.unpack_from("=Q", buf, 64)[0] == ring.tail == 0
    ring.consumer_sleeping = 1
    ring.producer_blocked = 2
    assert struct.unpack_from("=II", buf, 128) == (1, 2)
    word = ring.consumer_sleeping_word
    assert len(word) == 4
    word[0] = 0
    assert ring.consumer_sleeping == 0
    assert ring.producer_blocked_word.tobytes() == struct.pack("=I", 2)
    word.release()
    assert ring.read() == b"abc"
    assert struct.unpack_from("=Q", buf, 64)[0] == 16


def test_attach_sees_existing_state_and_checks_capacity():
    buf = memoryview(bytearray(ring_bytes(256)))
    producer = Ring(buf, init=True)
    producer.write(b"one")
    producer.publish()
    consumer = Ring(buf)
    assert consumer.read() == b"one"
    assert consumer.read() is None
    # the same bytes seen through a shorter buffer: capacity stamp mismatch
    with pytest.raises(RingCorrupt, match="capacity"):
        Ring(buf[:ring_bytes(128)])


def test_empty_ring_reads_none():
    ring = make_ring(256)
    assert ring.read() is None
    assert not ring.readable() and not ring.pending()
    assert ring.used() == 0 and ring.free() == 256
    ring._check()


def test_nothing_visible_until_publish():
    ring = make_ring(256)
    assert ring.write(b"hello") == 5
    assert ring.pending() and not ring.readable()
    assert ring.read() is None
    assert ring.head == 0 and ring.used() == 0
    assert ring.free() == 256 - 16
    ring._check()
    ring.publish()
    assert not ring.pending() and ring.readable()
    assert ring.used() == 16
    ring.publish()  # unchanged: no-op
    assert ring.read() == b"hello"
    assert ring.read() is None
    assert ring.used() == 0 and not ring.readable()
    ring._check()


def test_empty_message_is_a_message():
    ring = make_ring(64)
    assert ring.write(b"") == 0
    ring.publish()
    assert ring.used() == 8
    assert ring.read() == b""
    assert ring.read() is None


def test_empty_message_that_does_not_fit_raises_ring_full():
    ring = make_ring(64)  # max chunk 8: records of 16 bytes
    for _ in range(4):
        assert ring.write(b"12345678") == 8
    assert ring.free() == 0
    with pytest.raises(RingFull):
        ring.write(b"")
    ring._check()
    ring.publish()
    assert ring.read() == b"12345678"
    assert ring.write(b"") == 0
    ring.publish()
    assert [ring.read() for _ in range(4)] == [b"12345678"] * 3 + [b""]


def test_writing_a_complete_message_again_is_a_no_op():
    ring = make_ring(256)
    payload = msg_bytes(9, 100)  # two chunks
    assert ring.write(payload) == 100
    assert ring.write(payload, 100) == 100
    assert ring.write(b"abc", 3) == 3
    ring.publish()
    assert ring.read() == payload
    assert ring.read() is None


def test_accepts_bytearray_and_memoryview():
    ring = make_ring(256)
    ring.write(bytearray(b"ab"))
    ring.write(memoryview(b"xcd")[1:])
    with pytest.raises(ValueError):  # only byte-format views: len() must count bytes
        ring.write(memoryview(b"\x01\x00\x00\x00").cast("I"))
    ring.publish()
    assert [ring.read(), ring.read(), ring.read()] == [b"ab", b"cd", None]


def test_bad_offset():
    ring = make_ring(256)
    with pytest.raises(ValueError):
        ring.write(b"abc", 4)
    with pytest.raises(ValueError):
        ring.write(b"abc", -1)


def test_batch_of_records_one_publish():
    ring = make_ring(1024)
    msgs = [bytes([i]) * i for i in range(20)]
    for m in msgs:
        assert ring.write(m) == len(m)
    assert ring.used() == 0
    ring.publish()
    assert [ring.read() for _ in msgs] == msgs
    assert ring.read() is None


# -- full ring and wrap-around ---------------------------------------------------------


def test_full_ring_returns_offset_unchanged():
    ring = make_ring(256)  # max chunk 56: a 40-byte message is one 48-byte record
    msg = b"x" * 40
    written = 0
    while ring.write(msg) == len(msg):
        written += 1
    assert written == 256 // 48
    assert ring.write(msg) == 0  # still full, nothing changed
    assert ring.free() == 256 - written * 48
    ring._check()
    ring.publish()
    assert ring.read() == msg
    # one record of room freed: the next write goes in (after a wrap marker, if needed)
    assert ring.write(msg) == len(msg)
    ring.publish()
    ring._check()
    got = []
    while (m := ring.read()) is not None:
        got.append(m)
    assert got == [msg] * written


def test_wrap_marker_and_wrap_space_counts_as_used():
    ring = make_ring(128)  # max chunk 24: records up to 32 bytes
    data = ring._data
    for _ in range(3):
        ring.write(b"a" * 24)  # 3 x 32 = 96
    ring.publish()
    for _ in range(3):
        assert ring.read() == b"a" * 24
    # head at 96: 32 bytes left before the end, a 40-byte record needs a wrap ...
    ring.write(b"b" * 20)  # 32-byte record fits exactly at 96
    ring.write(b"c" * 8)   # at 128 = position 0
    ring.write(b"d" * 16)  # 24 bytes at position 16
    ring.publish()
    assert ring.head == 96 + 32 + 16 + 24
    assert ring.read() == b"b" * 20
    assert ring.read() == b"c" * 8
    assert ring.read() == b"d" * 16
    # head at 168 = position 40: 88 bytes left; fill to position 104 leaves 24 bytes
    for _ in range(2):
        ring.write(b"e" * 24)  # 2 x 32 -> position 104
    ring.publish()
    assert ring.read() == b"e" * 24 and ring.read() == b"e" * 24
    assert ring.head % 128 == 104
    head = ring.head
    ring.write(b"f" * 24)  # 32 bytes do not fit the 24 left: wrap marker, then at 0
    ring.publish()
    assert REC.unpack_from(data, 104)[0] == WRAP
    assert ring.head == head + 24 + 32
    assert ring.used() == 24 + 32  # the skipped bytes count as used until read
    assert ring.read() == b"f" * 24
    assert ring.used() == 0
    ring._check()


def test_wrap_needs_room_for_marker_and_record():
    ring = make_ring(128)  # max chunk 24
    ring.write(b"a" * 16)  # 24 bytes
    ring.write(b"a" * 24)  # 32
    ring.write(b"a" * 24)  # 32
    ring.write(b"")  # 8
    ring.write(b"")  # 8 -> head 104
    ring.publish()
    assert ring.read() == b"a" * 16  # tail 24: free 48, of which 24 at the end
    assert ring.free() == 48
    # a 32-byte record fits the free space, but not before the end, and a wrap
    # marker (24) plus the record (32) needs 56 > 48: refused, nothing written
    assert ring.write(b"g" * 24) == 0
    assert not ring.pending() and ring.free() == 48
    # a 24-byte record fits before the end
    assert ring.write(b"h" * 16) == 16
    ring.publish()
    ring._check()


# -- every size, streamed through chunks ----------------------------------------------


@pytest.mark.parametrize("capacity", [64, 256, 1000])
def test_every_size_up_to_and_beyond_the_chunk_limit(capacity):
    ring = make_ring(capacity)
    limit = max_chunk_for(capacity)
    for size in range(3 * capacity + 17):
        payload = msg_bytes(size, size)
        assert roundtrip(ring, payload) == payload, size
        if size == limit:
            assert ring.used() == 0
    ring._check()


def test_large_message_streams_while_consumer_drains():
    capacity = 4096
    buf = memoryview(bytearray(ring_bytes(capacity)))
    producer = Ring(buf, init=True)
    consumer = Ring(buf)
    payload = msg_bytes(1, 1_000_003)
    assert roundtrip(producer, payload, consumer) == payload
    # the chunk records were all MORE except the last
    assert consumer.read() is None and producer.used() == 0


def test_partial_message_is_kept_across_reads():
    ring = make_ring(256)  # max chunk 56
    payload = msg_bytes(2, 150)  # 3 chunks: 56 + 56 + 38
    off = ring.write(payload)
    assert off == 150  # all three chunks fit (64 + 64 + 48 = 176)
    # publish only the first two chunks by hand
    ring._hq[0] = 128
    assert ring.read() is None  # consumed two chunks, kept as partial
    assert ring.tail == 128
    ring._check()
    ring.publish()
    assert ring.read() == payload


def test_small_message_after_partial_is_not_mistaken_for_whole():
    ring = make_ring(256)
    big = msg_bytes(3, 100)  # chunks 56 + 44
    small = b"tiny"
    assert ring.write(big) == 100
    ring.write(small)
    ring.publish()
    assert ring.read() == big
    assert ring.read() == small


# -- abandoning a streamed message -------------------------------------------------------


def test_abort_discards_a_message_written_in_part():
    """A producer that gives up half way (a timed-out request) leaves an abort marker:
    the consumer drops the chunks it reassembled and reads the next message whole,
    never as the abandoned one's continuation."""
    ring = make_ring(256)  # max chunk 56
    reader = Ring(ring._buf)
    big = msg_bytes(4, 400)
    off = ring.write(big)
    assert 0 < off < 400
    ring.publish()
    assert reader.read() is None  # chunks consumed into the partial message
    assert reader._partial
    assert ring.abort() is True
    assert ring.write(b"next") == 4
    ring.publish()
    assert reader.read() == b"next"
    assert reader._partial is None
    ring._check()
    assert ring.abort() is False  # nothing open any more


def test_abort_with_nothing_open_writes_nothing():
    ring = make_ring(128)
    assert ring.write(b"whole") == 5
    head = ring._head
    assert ring.abort() is False
    assert ring._head == head


def test_abort_always_has_room():
    """The producer keeps 8 bytes free behind every chunk that leaves a message open,
    so even a ring the message filled to the brim can take the marker."""
    for capacity in (64, 128, 256, 1024):
        for shift in range(0, capacity, 8):
            ring = make_ring(capacity)
            reader = Ring(ring._buf)
            if shift:  # move the counters so chunks and the marker wrap
                ring._head = ring._published = ring._tail_seen = shift
                ring._hq[0] = ring._hq[8] = shift
                reader._tail = shift
            off = ring.write(msg_bytes(shift, capacity * 3))
            assert 0 < off < capacity * 3
            assert ring.abort() is True
            ring._check()
            assert ring.write(b"ok") == 2 or ring.free() < 16
            ring.publish()
            got = [reader.read() for _ in range(3)]
            assert [g for g in got if g is not None] in ([b"ok"], [])
            reader._check()


def test_abort_while_the_consumer_drops_an_oversized_message():
    ring = make_ring(256, max_message=60)
    big = msg_bytes(5, 400)  # three MORE chunks fit (168 bytes > max_message)
    off = ring.write(big)
    assert off == 168
    ring.publish()
    assert ring.read() is None and ring._skip is not None
    assert ring.abort() is True
    ring.write(b"after")
    ring.publish()
    assert ring.read() == b"after"
    assert ring._skip is None


def test_abort_marker_with_no_message_open_is_corrupt():
    consumer, data = published_ring(b"a" * 8)
    REC.pack_into(data, 0, 0xFFFFFFFE, 0)
    with pytest.raises(RingCorrupt, match="abort marker"):
        consumer.read()


# -- seeded random model ---------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_random_interleaving_against_model(seed):
    rnd = random.Random(seed)
    capacity = rnd.choice([64, 128, 512, 1024, 4096])
    buf = memoryview(bytearray(ring_bytes(capacity)))
    producer = Ring(buf, init=True)
    consumer = Ring(buf, max_message=1 << 20)
    limit = max_chunk_for(capacity)
    unpublished: list[bytes] = []
    published: deque[bytes] = deque()
    current: tuple[bytes, int] | None = None  # message being streamed
    seq = 0
    for _ in range(4000):
        op = rnd.random()
        if op < 0.5:
            if current is None:
                size = rnd.choice([0, 1, 7, 8, 9, limit - 1, limit, limit + 1,
                                   rnd.randrange(0, 3 * capacity), rnd.randrange(0, 64)])
                seq += 1
                current = (msg_bytes(seq, size), 0)
            payload, off = current
            try:
                new = producer.write(payload, off)
            except RingFull:
                assert payload == b"" and producer.free() < 8
                continue
            assert off <= new <= len(payload)
            if len(payload) - off <= limit:
                assert new in (off, len(payload))  # whole or nothing
            if new == len(payload):
                unpublished.append(payload)
                current = None
            else:
                current = (payload, new)
        elif op < 0.7:
            producer.publish()
            published.extend(unpublished)
            unpublished.clear()
        else:
            got = consumer.read()
            if published:
                assert got == published.popleft()
            else:
                assert got is None
        producer._check()
        consumer._check()
        assert 0 <= producer.used() <= capacity
    producer.publish()
    published.extend(unpublished)
    while published:
        assert consumer.read() == published.popleft()


class RingMachine(RuleBasedStateMachine):
    """Producer and consumer objects on one buffer against a deque model."""

    def __init__(self):
        super().__init__()
        self.capacity = 256
        buf = memoryview(bytearray(ring_bytes(self.capacity)))
        self.producer = Ring(buf, init=True)
        self.consumer = Ring(buf)
        self.limit = max_chunk_for(self.capacity)
        self.current: tuple[bytes, int] | None = None
        self.unpublished: list[bytes] = []
        self.published: deque[bytes] = deque()

    @precondition(lambda self: self.current is None)
    @rule(payload=st.binary(max_size=700))
    def write_new(self, payload):
        self._write(payload, 0)

    @precondition(lambda self: self.current is not None)
    @rule()
    def write_more(self):
        self._write(*self.current)

    def _write(self, payload, off):
        before = self.producer.free()
        try:
            new = self.producer.write(payload, off)
        except RingFull:
            assert payload == b"" and before < 8
            self.current = (payload, off)
            return
        remaining = len(payload) - off
        if 0 < remaining <= self.limit:
            if new == off:
                # refused: the record (plus a wrap marker if needed) did not fit
                rec = record_size(remaining)
                head = self.capacity - before + self.producer.tail
                room = self.capacity - head % self.capacity
                need = rec if rec <= room else rec + room
                assert need > before
            else:
                assert new == len(payload)
        if new == len(payload):
            self.unpublished.append(payload)
            self.current = None
        else:
            self.current = (payload, new)

    @rule()
    def abort(self):
        open_ = self.current is not None and self.current[1] > 0
        assert self.producer.abort() == open_
        self.current = None  # an unwritten message is simply never written

    @rule()
    def publish(self):
        self.producer.publish()
        self.published.extend(self.unpublished)
        self.unpublished.clear()

    @rule()
    def read(self):
        got = self.consumer.read()
        if self.published:
            assert got == self.published.popleft()
        else:
            assert got is None

    @invariant()
    def consistent(self):
        self.producer._check()
        self.consumer._check()
        assert self.producer.pending() == bool(
            self.producer.free() != self.capacity - self.producer.used())


TestRingMachine = RingMachine.TestCase
TestRingMachine.settings = settings(max_examples=150, stateful_step_count=60, deadline=None)


# -- corruption ------------------------------------------------------------------------


def published_ring(*msgs: bytes, capacity: int = 256) -> tuple[Ring, memoryview]:
    buf = memoryview(bytearray(ring_bytes(capacity)))
    ring = Ring(buf, init=True)
    for m in msgs:
        assert ring.write(m) == len(m)
    ring.publish()
    return Ring(buf), buf[RING_HEADER:]


def test_flipped_payload_byte_is_detected():
    consumer, data = published_ring(b"hello world")
    data[8 + 3] ^= 0x01
    with pytest.raises(RingCorrupt, match="CRC"):
        consumer.read()


def test_flipped_crc_in_chunk_is_detected():
    consumer, data = published_ring(msg_bytes(4, 150))
    data[64 + 4] ^= 0x80  # the second chunk's CRC
    with pytest.raises(RingCorrupt, match="CRC"):
        consumer.read()


@pytest.mark.parametrize("length", [0x7FFFFFFF, 57, 1 << 20, MORE | 1000])
def test_absurd_length_is_detected(length):
    consumer, data = published_ring(b"x" * 10)
    REC.pack_into(data, 0, length, 0)
    with pytest.raises(RingCorrupt, match="length|chunk limit"):
        consumer.read()


def test_length_past_published_head_is_detected():
    consumer, data = published_ring(b"x" * 10)  # one 24-byte record published
    REC.pack_into(data, 0, 40, 0)  # claims 48 bytes
    with pytest.raises(RingCorrupt, match="past the published head"):
        consumer.read()


def test_misaligned_head_is_detected():
    consumer, _ = published_ring(b"x" * 10)
    consumer._hq[0] = 20
    with pytest.raises(RingCorrupt, match="bad head"):
        consumer.read()


def test_head_beyond_capacity_is_detected():
    consumer, _ = published_ring(b"x" * 10)
    consumer._hq[0] = 256 + 8
    with pytest.raises(RingCorrupt, match="bad head"):
        consumer.read()


def test_head_moving_backwards_is_detected():
    consumer, _ = published_ring(b"a", b"b")
    assert consumer.read() == b"a"
    consumer._hq[0] = 8
    with pytest.raises(RingCorrupt, match="bad head"):
        consumer.read()


def test_wrap_marker_where_none_can_be():
    consumer, data = published_ring(b"x" * 10)
    REC.pack_into(data, 0, WRAP, 0)  # at position 0
    with pytest.raises(RingCorrupt, match="wrap marker"):
        consumer.read()


def test_wrap_marker_without_following_record():
    consumer, data = published_ring(b"a" * 8, b"b" * 8)  # 16 + 16 bytes
    REC.pack_into(data, 16, WRAP, 0)  # would skip 240 bytes, only 16 published
    assert consumer.read() == b"a" * 8
    with pytest.raises(RingCorrupt, match="wrap marker"):
        consumer.read()


def test_empty_more_chunk_is_corrupt():
    consumer, data = published_ring(b"")
    REC.pack_into(data, 0, MORE | 0, 0)
    with pytest.raises(RingCorrupt, match="MORE"):
        consumer.read()


def test_max_message_bounds_reassembly():
    buf = memoryview(bytearray(ring_bytes(4096)))
    producer = Ring(buf, init=True)
    consumer = Ring(buf, max_message=3000)
    ok = msg_bytes(5, 3000)
    assert roundtrip(producer, ok, consumer) == ok
    big = msg_bytes(6, 3001)
    with pytest.raises(MessageTooLarge, match="max_message") as exc:
        roundtrip(producer, big, consumer)
    assert exc.value.size == 3001 and exc.value.head == big[:MessageTooLarge.HEAD]
    # Dropped without being buffered, and the ring is still in step.
    assert consumer._partial is None and consumer._skip is None
    assert roundtrip(producer, ok, consumer) == ok


def test_message_over_max_message_is_dropped_as_it_streams():
    """A message far larger than max_message streams through a small ring while the
    consumer drops its chunks: the consumer never holds more than max_message."""
    buf = memoryview(bytearray(ring_bytes(4096)))
    producer = Ring(buf, init=True)
    consumer = Ring(buf, max_message=3000)
    big = msg_bytes(7, 100_000)
    off = 0
    raised = None
    while off < len(big):
        off = producer.write(big, off)
        producer.publish()
        try:
            assert consumer.read() is None
        except MessageTooLarge as exc:
            raised = exc
        held = len(consumer._partial or b"")
        assert held <= 3000
    if raised is None:
        with pytest.raises(MessageTooLarge) as info:
            consumer.read()
        raised = info.value
    assert raised.size == len(big)
    ok = msg_bytes(8, 100)
    assert roundtrip(producer, ok, consumer) == ok


def test_max_message_bounds_single_record():
    buf = memoryview(bytearray(ring_bytes(4096)))
    producer = Ring(buf, init=True)
    consumer = Ring(buf, max_message=100)
    producer.write(b"y" * 100)
    producer.write(b"z" * 101)
    producer.publish()
    assert consumer.read() == b"y" * 100
    with pytest.raises(MessageTooLarge, match="max_message"):
        consumer.read()
    assert consumer.read() is None  # consumed: the ring is in step


def test_bad_tail_from_consumer_is_detected_by_producer():
    ring = make_ring(256)
    for _ in range(5):
        ring.write(b"q" * 40)
    ring.publish()
    ring._hq[8] = 1000  # tail ahead of head
    with pytest.raises(RingCorrupt, match="bad tail"):
        ring.write(b"q" * 40)
    ring._hq[8] = 4  # misaligned
    with pytest.raises(RingCorrupt, match="bad tail"):
        ring.free()


def test_attach_rejects_invalid_counters():
    buf = memoryview(bytearray(ring_bytes(256)))
    Ring(buf, init=True)
    struct.pack_into("=Q", buf, 0, 1024)  # head far past tail + capacity
    with pytest.raises(RingCorrupt):
        Ring(buf)


# -- two processes ---------------------------------------------------------------------

N_MESSAGES = 100_000
CAPACITY = 1 << 16


def message(i: int) -> bytes:
    """Message i: its number, then filler; every 5000th is larger than the ring."""
    if i % 5000 == 4999:
        size = CAPACITY * 2 + i % 97
    else:
        size = (i * 7919) % 200
    return i.to_bytes(8, "little") + bytes([i % 251]) * size


def producer_main(seg_name: str, data_bell: str, space_bell: str, n: int) -> None:
    parent = multiprocessing.parent_process()

    def parent_alive() -> None:
        if parent is not None and not parent.is_alive():
            raise RuntimeError("consumer died")

    seg = Segment.open(seg_name)
    ring = Ring(seg.payload)
    data = Doorbell.open(data_bell, ring.consumer_sleeping_word)
    space = Doorbell.open(space_bell, ring.producer_blocked_word)
    # Room for any next step: a full chunk record plus the largest wrap skip before it.
    # (Waiting for "more room than now" could deadlock: the consumer may already have
    # drained everything published.)
    step = 2 * (ring.max_chunk + 8)

    def room() -> bool:
        return ring.free() >= step

    try:
        for i in range(n):
            msg = message(i)
            off = ring.write(msg)
            while off < len(msg):
                ring.publish()
                data.ring()
                if not space.wait(room, 30.0, alive=parent_alive):
                    raise RuntimeError("consumer stalled")
                off = ring.write(msg, off)
            if i % 64 == 63:  # batch: one publish and at most one post per 64 records
                ring.publish()
                data.ring()
        ring.publish()
        data.ring()
    finally:
        data.close()
        space.close()
        ring.release()
        seg.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_two_processes_pass_100k_messages_in_order(broker, method):
    ctx = multiprocessing.get_context(method)
    seg_name = shm_name(broker, "ring")
    data_name = shm_name(broker, "data.bell")
    space_name = shm_name(broker, "space.bell")
    n = N_MESSAGES if method == "spawn" else N_MESSAGES // 10
    seg = Segment.create(seg_name, ring_bytes(CAPACITY), kind=1, boot_id=new_boot_id())
    ring = Ring(seg.payload, init=True)
    data = Doorbell.create(data_name, ring.consumer_sleeping_word)
    space = Doorbell.create(space_name, ring.producer_blocked_word)
    proc = ctx.Process(target=producer_main, args=(seg_name, data_name, space_name, n))
    try:
        proc.start()

        def child_alive() -> None:
            if proc.exitcode not in (None, 0):
                raise RuntimeError(f"producer died with exit code {proc.exitcode}")

        i = 0
        while i < n:
            msg = ring.read()
            if msg is None:
                space.ring()  # we consumed: wake a producer waiting for room
                assert data.wait(ring.readable, 30.0, alive=child_alive), f"stalled at {i}"
                continue
            assert msg == message(i), f"message {i}"
            i += 1
            if i % 32 == 0:
                space.ring()
        assert ring.read() is None
        proc.join(60)
        assert proc.exitcode == 0
        ring._check()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join()
        for bell in (data, space):
            bell.close()
            bell.unlink()
        ring.release()
        seg.close()
        seg.unlink()
