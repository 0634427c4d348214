"""Doorbell: ring only when asleep, wake on post, time out, the lost-wake-up guard,
alive() aborting a wait, names and modes."""

from __future__ import annotations

import os
import stat
import threading
import time
import uuid

import pytest

from shm import (
    Doorbell,
    Ring,
    Segment,
    SegmentExists,
    SegmentNotFound,
    list_segments,
    list_semaphores,
    ring_bytes,
    shm_name,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def broker():
    token = f"t{os.getpid()}x{uuid.uuid4().hex[:12]}"  # the suite's names: conftest
    yield token
    prefix = f"shmwatch.{token}."
    for name in list_segments(prefix):
        Segment.unlink_name(name)
    for name in list_semaphores(prefix):
        Doorbell.unlink_name(name)


@pytest.fixture
def bell(broker):
    """A doorbell whose flag lives in a bytearray, plus its flag view."""
    flag = memoryview(bytearray(4))
    name = shm_name(broker, "bell")
    b = Doorbell.create(name, flag)
    yield b, flag
    b.close()
    b.unlink()


def wait_until_sleeping(bell: Doorbell) -> None:
    """Let a waiter in another thread reach its sleep (flag set). No time bound here:
    the test's timeout is the bound."""
    while not bell.sleeping:
        time.sleep(0.001)


def test_ring_posts_only_when_flag_set(bell):
    b, flag = bell
    assert b.ring() is False  # consumer awake: no post
    # nothing was posted: a wait with no spin times out
    assert b.wait(lambda: False, 0.05, spin=0) is False
    flag[0] = 1
    assert b.ring() is True
    assert flag.cast("I")[0] == 0  # cleared
    assert b.ring() is False


def test_wait_returns_at_once_when_ready(bell):
    b, _ = bell
    assert b.wait(lambda: True, 0) is True
    assert b.wait(lambda: True, None, spin=0) is True
    assert b.sleeping == 0


def test_wait_times_out(bell):
    b, _ = bell
    calls = []

    def ready():
        calls.append(1)
        return False

    assert b.wait(ready, 0.2, spin=5, slice=0.05) is False
    assert len(calls) > 5  # spun, then re-checked around its sleeps
    assert b.sleeping == 0


def test_wait_with_zero_timeout_checks_once(bell):
    b, _ = bell
    calls = []

    def ready():
        calls.append(1)
        return False

    assert b.wait(ready, 0, spin=0) is False
    assert calls == [1]


def test_wait_returns_on_ring_from_another_thread(bell):
    b, _ = bell
    ready = threading.Event()
    result = []
    # a long slice: if the post did not wake it, the test would hit its timeout
    t = threading.Thread(target=lambda: result.append(b.wait(ready.is_set, None, slice=120)))
    t.start()
    wait_until_sleeping(b)
    ready.set()
    assert b.ring() is True
    t.join()
    assert result == [True]
    assert b.sleeping == 0


def test_wait_returns_on_post(bell):
    b, _ = bell
    ready = threading.Event()
    result = []
    t = threading.Thread(target=lambda: result.append(b.wait(ready.is_set, None, slice=120)))
    t.start()
    wait_until_sleeping(b)
    ready.set()
    b.post()
    t.join()
    assert result == [True]


def test_lost_wakeup_guard(bell):
    """The producer publishes between the consumer's last check and its sleep and does
    not ring (it saw the flag clear): the re-check after setting the flag catches it,
    so the consumer never sleeps (the slice is far longer than the test timeout)."""
    b, flag = bell
    words = flag.cast("I")
    published = []

    def ready():
        # The 'producer' publishes right before the consumer sets the flag, i.e. it
        # looked at the flag while it was still clear: the classic lost wake-up.
        if not published and words[0] == 0:
            return False
        published.append(1)
        return True

    # spin=0: the first ready() call is the one right after setting the flag
    assert b.wait(ready, None, spin=0, slice=3600) is True
    assert b.sleeping == 0


def test_stale_post_costs_one_extra_round(bell):
    b, flag = bell
    flag[0] = 1
    b.ring()  # posts while no one waits: the semaphore holds one stale post
    calls = []

    def ready():
        calls.append(1)
        return len(calls) >= 2

    # the stale post ends the first sleep at once; the re-check then finds the work
    assert b.wait(ready, None, spin=0, slice=3600) is True
    assert len(calls) == 2


def test_alive_aborts_the_wait(bell):
    b, _ = bell
    checks = []

    def alive():
        checks.append(1)
        if len(checks) == 3:
            raise ConnectionError("peer died")

    with pytest.raises(ConnectionError, match="peer died"):
        b.wait(lambda: False, None, spin=0, slice=0.01, alive=alive)
    assert len(checks) == 3
    assert b.sleeping == 0


def test_ready_raising_leaves_the_flag_clear(bell):
    b, _ = bell

    def ready():
        if b.sleeping:
            raise KeyError("boom")
        return False

    with pytest.raises(KeyError):
        b.wait(ready, 1, spin=0)
    assert b.sleeping == 0


def test_flag_in_a_ring_word_across_handles(broker):
    seg_name = shm_name(broker, "ring")
    bell_name = shm_name(broker, "ring.bell")
    seg = Segment.create(seg_name, ring_bytes(256), kind=1, boot_id=os.urandom(16))
    ring = Ring(seg.payload, init=True)
    consumer = Doorbell.create(bell_name, ring.consumer_sleeping_word)
    other = Segment.open(seg_name)
    other_ring = Ring(other.payload)
    producer = Doorbell.open(bell_name, other_ring.consumer_sleeping_word)
    try:
        result = []
        t = threading.Thread(
            target=lambda: result.append(consumer.wait(ring.readable, 30, slice=120)))
        t.start()
        while not other_ring.consumer_sleeping:
            time.sleep(0.001)
        other_ring.write(b"hi")
        other_ring.publish()
        assert producer.ring() is True
        t.join()
        assert result == [True]
        assert ring.read() == b"hi"
        assert ring.consumer_sleeping == 0
    finally:
        for b in (producer, consumer):
            b.close()
        consumer.unlink()
        for r in (other_ring, ring):
            r.release()
        for s in (other, seg):
            s.close()
        seg.unlink()


def test_create_is_exclusive_and_open_missing(broker):
    name = shm_name(broker, "bell")
    flag = memoryview(bytearray(4))
    b = Doorbell.create(name, flag)
    try:
        with pytest.raises(SegmentExists):
            Doorbell.create(name, flag)
        with Doorbell.open(name, flag) as again:
            flag[0] = 1
            assert again.ring() is True
        assert b.wait(lambda: False, 0.01, spin=0) is False
    finally:
        b.close()
        b.unlink()
    with pytest.raises(SegmentNotFound):
        Doorbell.open(name, flag)


def test_flag_must_be_four_bytes(broker):
    with pytest.raises(ValueError):
        Doorbell.create(shm_name(broker, "bell"), memoryview(bytearray(8)))
    assert list_semaphores(f"shmwatch.{broker}.") == []


def test_mode_is_0600_regardless_of_umask(broker):
    name = shm_name(broker, "bell")
    old = os.umask(0o777)
    try:
        b = Doorbell.create(name, memoryview(bytearray(4)))
    finally:
        os.umask(old)
    try:
        path = "/dev/shm/sem." + name[1:]
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        b.close()
        b.unlink()


def test_unlink_and_close_are_idempotent(broker):
    name = shm_name(broker, "bell")
    b = Doorbell.create(name, memoryview(bytearray(4)))
    assert list_semaphores(f"shmwatch.{broker}.") == [name]
    b.unlink()
    b.unlink()
    b.close()
    b.close()
    assert Doorbell.unlink_name(name) is False
    Doorbell.create(name, memoryview(bytearray(4))).close()
    assert Doorbell.unlink_name(name) is True
    assert list_semaphores(f"shmwatch.{broker}.") == []


# -- adaptive spinning -----------------------------------------------------------------


def test_spinning_stops_when_work_comes_later_than_a_spin(bell):
    """Sleeps that last longer than a spin would (a record a millisecond) halve the
    budget each time: within a few waits the consumer goes straight to sleep."""
    b, _ = bell
    assert b._budget >= 200  # a fresh doorbell spins as the caller allows
    for _ in range(40):
        b._adapt(1e-3, 200)
    assert b._budget == 0
    calls = []

    def ready():
        calls.append(1)
        return len(calls) > 1  # true on the re-check after the flag is set

    assert b.wait(ready, 1.0, spin=200) is True
    assert len(calls) == 2  # no spin at all: the check after setting the flag, then work


def test_spinning_comes_back_when_work_comes_within_a_spin(bell):
    b, _ = bell
    b._budget = 0
    b._adapt(1e-6, 200)  # woken almost at once: a spin would have caught it
    assert b._budget == 16
    for _ in range(10):
        b._adapt(1e-6, 200)
    assert b._budget == 200  # never past the caller's `spin`
    b._budget = 16
    n = iter(range(1000))
    assert b.wait(lambda: next(n) == 12, 1.0, spin=200) is True  # found late in the spin
    assert b._budget == 32


def test_a_sleep_without_work_halves_the_budget(bell):
    b, _ = bell
    b._budget = 64
    assert b.wait(lambda: False, 0.02, spin=0, slice=0.01) is False
    assert b._budget == 32
