"""RevLog: eviction order, get/read_from, truncate_before, limits, attach, corruption,
and a seeded random test against a model."""

from __future__ import annotations

import os
import random
import struct
import uuid

import pytest

from shm import (
    REVLOG_HEADER,
    Doorbell,
    RevLog,
    RingCorrupt,
    Segment,
    list_segments,
    list_semaphores,
    new_boot_id,
    revlog_bytes,
    shm_name,
)

pytestmark = pytest.mark.timeout(60)


def make_log(capacity: int) -> RevLog:
    return RevLog(memoryview(bytearray(revlog_bytes(capacity))), init=True)


def rec_size(n: int) -> int:
    return (16 + n + 7) // 8 * 8


def payload(rev: int, size: int) -> bytes:
    return random.Random(rev).randbytes(size)


@pytest.fixture
def broker():
    token = f"t{os.getpid()}x{uuid.uuid4().hex[:12]}"  # the suite's names: conftest
    yield token
    prefix = f"shmwatch.{token}."
    for name in list_segments(prefix):
        Segment.unlink_name(name)
    for name in list_semaphores(prefix):
        Doorbell.unlink_name(name)


@pytest.mark.parametrize("bad", [0, 8, 60, 65, -64])
def test_revlog_bytes_rejects_bad_capacity(bad):
    with pytest.raises(ValueError):
        revlog_bytes(bad)


def test_empty_log():
    log = make_log(256)
    assert log.capacity == 256 and log.max_payload == 240
    assert (log.oldest_rev, log.newest_rev, log.count, log.used) == (0, 0, 0, 0)
    assert log.get(1) is None
    assert list(log.read_from(0)) == []
    assert log.truncate_before(100) == []
    log._check()


def test_append_get_read_from_with_gaps():
    log = make_log(1024)
    revs = [2, 3, 7, 8, 20]
    for r in revs:
        assert log.append(r, payload(r, r)) == []
        log._check()
    assert (log.oldest_rev, log.newest_rev, log.count) == (2, 20, 5)
    assert log.used == sum(rec_size(r) for r in revs)
    for r in revs:
        assert log.get(r) == payload(r, r)
    for missing in (0, 1, 4, 9, 21):
        assert log.get(missing) is None
    assert [r for r, _ in log.read_from(0)] == revs
    assert [r for r, _ in log.read_from(4)] == [7, 8, 20]
    assert [r for r, _ in log.read_from(7, 8)] == [7, 8]
    assert [r for r, _ in log.read_from(9, 19)] == []
    assert list(log.read_from(21)) == []
    assert all(p == payload(r, r) for r, p in log.read_from(1))
    assert isinstance(log.get(7), bytes)


def test_revisions_must_increase():
    log = make_log(256)
    log.append(5, b"a")
    for bad in (5, 4, 0):
        with pytest.raises(ValueError):
            log.append(bad, b"b")
    log.truncate_before(100)  # empty now, but revisions still may not go back
    assert log.count == 0 and log.newest_rev == 0 and log.last_rev == 5
    with pytest.raises(ValueError):
        log.append(5, b"c")
    log.append(6, b"c")
    log._check()


def test_eviction_order_and_wrap():
    log = make_log(128)
    for r in range(1, 6):
        assert log.append(r, b"x" * 8) == []  # 24 bytes each: head 120
    assert log.used == 120
    # 24 bytes do not fit the 8 left before the end: a wrap marker (8) plus the record
    # needs 32, so the oldest record goes
    assert log.append(6, b"y" * 8) == [1]
    assert (log.oldest_rev, log.newest_rev, log.count) == (2, 6, 5)
    assert log.used == 4 * 24 + 8 + 24
    log._check()
    # a 56-byte record at position 24 needs three more evictions
    assert log.append(7, b"z" * 40) == [2, 3, 4]
    assert (log.oldest_rev, log.newest_rev, log.count) == (5, 7, 3)
    assert log.get(4) is None and log.get(5) == b"x" * 8
    assert [r for r, _ in log.read_from(0)] == [5, 6, 7]
    log._check()


def test_largest_payload_evicts_everything_and_larger_raises():
    log = make_log(128)
    for r in range(1, 5):
        log.append(r, b"a" * 10)
    assert log.append(5, b"b" * log.max_payload) == [1, 2, 3, 4]
    assert log.used == 128 and log.count == 1
    log._check()
    with pytest.raises(ValueError, match="never fit"):
        log.append(6, b"c" * (log.max_payload + 1))
    assert log.count == 1 and log.get(5) == b"b" * log.max_payload  # unchanged
    assert log.append(6, b"") == [5]
    log._check()


def test_empty_log_restarts_at_the_beginning():
    log = make_log(128)
    log.append(1, b"a" * 40)  # 56 bytes
    log.truncate_before(2)
    assert log.count == 0 and log.used == 0
    # 72 bytes at position 56 would cross the end; with nothing retained the log
    # starts over at position 0 instead of evicting
    assert log.append(2, b"b" * 56) == []
    assert log.used == 72
    log._check()


def test_truncate_before():
    log = make_log(1024)
    for r in (1, 2, 4, 8, 16):
        log.append(r, payload(r, 20))
    assert log.truncate_before(1) == []
    assert log.truncate_before(5) == [1, 2, 4]
    assert (log.oldest_rev, log.newest_rev, log.count) == (8, 16, 2)
    assert log.get(4) is None and log.get(8) == payload(8, 20)
    log._check()
    assert log.truncate_before(100) == [8, 16]
    assert (log.oldest_rev, log.newest_rev, log.count, log.used) == (0, 0, 0, 0)
    log._check()
    log.append(17, b"after")
    assert log.oldest_rev == 17 and log.get(17) == b"after"
    log._check()


def test_read_from_snapshot_and_invalidation():
    log = make_log(256)
    for r in range(1, 4):
        log.append(r, payload(r, 10))
    it = log.read_from(1)
    assert next(it)[0] == 1
    log.append(4, b"new")  # appends do not disturb it; upto was fixed at the call
    assert [r for r, _ in it] == [2, 3]
    it = log.read_from(1)
    assert next(it)[0] == 1
    log.truncate_before(3)  # revision 2, not yet yielded, is gone: no silent gap
    with pytest.raises(RuntimeError, match="evicted"):
        next(it)


def test_many_evictions_compact_the_index():
    log = make_log(4096)
    for r in range(1, 20001):
        log.append(r, payload(r, r % 50))
    assert log.newest_rev == 20000
    assert log.count == len(list(log.read_from(0)))
    assert len(log._revs) <= 2 * log.count + 1024
    log._check()


def test_header_for_outside_readers_and_attach(broker):
    name = shm_name(broker, "log")
    seg = Segment.create(name, revlog_bytes(512), kind=3, boot_id=new_boot_id())
    log = RevLog(seg.payload, init=True)
    try:
        for r in range(10, 40, 3):
            log.append(r, payload(r, 30))
        log.truncate_before(15)
        with Segment.open(name, kind=3) as other:
            info = RevLog.peek(other.payload)
            assert info == {
                "capacity": 512,
                "used": log.used,
                "count": log.count,
                "oldest_rev": log.oldest_rev,
                "newest_rev": log.newest_rev,
            }
            q = struct.unpack_from("=7Q", other.payload, 0)
            assert q[0] - q[1] == log.used and q[6] == log.last_rev
            attached = RevLog(other.payload)
            assert [r for r, _ in attached.read_from(0)] == [r for r, _ in log.read_from(0)]
            assert attached.get(log.newest_rev) == log.get(log.newest_rev)
            assert attached.last_rev == log.last_rev
            attached._check()
            attached.release()
    finally:
        log.release()
        seg.close()
        seg.unlink()


def test_corrupted_payload_is_detected():
    buf = memoryview(bytearray(revlog_bytes(256)))
    log = RevLog(buf, init=True)
    log.append(1, b"hello")
    log.append(2, b"world")
    buf[REVLOG_HEADER + 16 + 1] ^= 0xFF  # a byte of revision 1's payload
    with pytest.raises(RingCorrupt, match="CRC"):
        log.get(1)
    assert log.get(2) == b"world"
    with pytest.raises(RingCorrupt):
        RevLog(buf)  # attach walks and verifies every record


def test_attach_rejects_bad_header():
    buf = memoryview(bytearray(revlog_bytes(256)))
    RevLog(buf, init=True).append(1, b"x")
    struct.pack_into("=Q", buf, 0, 1 << 20)  # head far beyond tail + capacity
    with pytest.raises(RingCorrupt):
        RevLog(buf)
    with pytest.raises(RingCorrupt, match="capacity"):
        RevLog(buf[:revlog_bytes(128)])


@pytest.mark.parametrize("seed", range(8))
def test_random_against_model(seed):
    """Evictions are always a prefix of the retained revisions, oldest first; what is
    retained reads back exactly; fill never exceeds capacity."""
    rnd = random.Random(seed)
    capacity = rnd.choice([64, 128, 1000, 4096])
    log = make_log(capacity)
    model: dict[int, bytes] = {}  # insertion-ordered: oldest first
    rev = 0
    for _ in range(3000):
        op = rnd.random()
        if op < 0.75:
            rev += rnd.choice([1, 1, 1, 2, 5])
            size = rnd.choice([0, 1, 8, rnd.randrange(0, log.max_payload + 1),
                               rnd.randrange(0, 40)])
            data = payload(rev, size)
            evicted = log.append(rev, data)
            retained = list(model)
            assert evicted == retained[:len(evicted)]
            last_evicted = model[evicted[-1]] if evicted else None
            for r in evicted:
                del model[r]
            model[rev] = data
            if last_evicted is not None:
                # minimal eviction: had the last evicted record stayed, the records
                # plus at most one wrap skip (shorter than the largest record) would
                # not have fit
                sizes = [rec_size(len(p)) for p in model.values()]
                sizes.append(rec_size(len(last_evicted)))
                assert sum(sizes) + max(sizes) - 8 > capacity
        elif op < 0.85:
            cut = rnd.randrange(0, rev + 2)
            dropped = log.truncate_before(cut)
            assert dropped == [r for r in model if r < cut]
            for r in dropped:
                del model[r]
        elif op < 0.95:
            lo = rnd.randrange(0, rev + 2)
            hi = rnd.choice([None, rnd.randrange(0, rev + 2)])
            want = [(r, p) for r, p in model.items() if r >= lo and (hi is None or r <= hi)]
            assert list(log.read_from(lo, hi)) == want
        else:
            r = rnd.randrange(0, rev + 2)
            assert log.get(r) == model.get(r)
        assert log.count == len(model)
        assert log.oldest_rev == (next(iter(model)) if model else 0)
        assert log.newest_rev == (next(reversed(model)) if model else 0)
        assert 0 <= log.used <= capacity
        assert log.used >= sum(rec_size(len(p)) for p in model.values())
        log._check()


def test_append_accepts_bytes_like_and_rejects_junk_before_mutating():
    log = make_log(128)
    for r in range(1, 5):
        log.append(r, b"a" * 10)
    log.append(5, bytearray(b"ba"))
    log.append(6, memoryview(b"\x01\x00\x00\x00").cast("I"))  # counted as 4 bytes
    assert log.get(5) == b"ba" and log.get(6) == b"\x01\x00\x00\x00"
    before = list(log.read_from(0))
    with pytest.raises(TypeError):
        log.append(7, "not bytes")
    with pytest.raises(TypeError):
        log.append(7.0, b"x")
    assert list(log.read_from(0)) == before
    log._check()
