"""Segment: create/open/verify, O_EXCL, stale or foreign headers, modes, clean-up."""

from __future__ import annotations

import errno
import os
import stat
import struct
import uuid

import posix_ipc
import pytest

from shm import (
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    Doorbell,
    LayoutMismatch,
    Segment,
    SegmentExists,
    SegmentNotFound,
    ShmError,
    ShmNoSpace,
    ShmPermissionError,
    list_segments,
    list_semaphores,
    new_boot_id,
    shm_name,
)

pytestmark = pytest.mark.timeout(60)

KIND = 7


@pytest.fixture
def broker():
    """A unique broker name; every object under it is removed after the test."""
    token = f"t{os.getpid()}x{uuid.uuid4().hex[:12]}"  # the suite's names: conftest
    yield token
    prefix = f"shmwatch.{token}."
    for name in list_segments(prefix):
        Segment.unlink_name(name)
    for name in list_semaphores(prefix):
        Doorbell.unlink_name(name)


@pytest.fixture
def umask():
    """Set the process umask for a test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def test_shm_name_valid():
    assert shm_name("b1", "ctl") == "/shmwatch.b1.ctl"
    assert shm_name("A-z_0" * 12 + "abcd", "c3g1.a0").startswith("/shmwatch.A-z_0")


@pytest.mark.parametrize("bad", ["", "a.b", "a/b", "a b", "x" * 65, "é", None])
def test_shm_name_rejects_bad_broker(bad):
    with pytest.raises(ValueError):
        shm_name(bad, "ctl")


@pytest.mark.parametrize("bad", ["", "a/b", "a\0b"])
def test_shm_name_rejects_bad_part(bad):
    with pytest.raises(ValueError):
        shm_name("b", bad)


def test_new_boot_id():
    a, b = new_boot_id(), new_boot_id()
    assert len(a) == 16 and isinstance(a, bytes)
    assert a != b


def test_create_open_roundtrip(broker):
    name = shm_name(broker, "seg")
    boot = new_boot_id()
    seg = Segment.create(name, 1000, kind=KIND, boot_id=boot)
    try:
        assert seg.name == name and seg.kind == KIND and seg.boot_id == boot
        assert seg.size == 1000
        assert len(seg.payload) == 1000 and len(seg.buf) == HEADER_SIZE + 1000
        assert bytes(seg.buf[:8]) == MAGIC
        version, kind, boot_id, size = struct.unpack_from("=II16sQ", seg.buf, 8)
        assert (version, kind, boot_id, size) == (LAYOUT_VERSION, KIND, boot, 1000)
        assert bytes(seg.buf[40:HEADER_SIZE]) == bytes(HEADER_SIZE - 40)
        assert bytes(seg.payload) == bytes(1000)  # fresh space is zero
        assert os.fstat(seg.fd).st_size == HEADER_SIZE + 1000
        seg.payload[0:5] = b"hello"
        with Segment.open(name, kind=KIND, boot_id=boot) as other:
            assert other.size == 1000 and other.kind == KIND and other.boot_id == boot
            assert bytes(other.payload[0:5]) == b"hello"
            other.payload[999] = 42
        assert seg.payload[999] == 42
        # kind and boot id are optional checks
        with Segment.open(name) as other:
            assert other.kind == KIND
        assert name in list_segments(f"shmwatch.{broker}.")
    finally:
        seg.close()
        seg.unlink()
    assert name not in list_segments()


def test_zero_size_segment(broker):
    name = shm_name(broker, "empty")
    with Segment.create(name, 0, kind=1, boot_id=new_boot_id()) as seg:
        assert len(seg.payload) == 0
        seg.unlink()


def test_create_is_exclusive(broker):
    name = shm_name(broker, "seg")
    boot = new_boot_id()
    seg = Segment.create(name, 64, kind=KIND, boot_id=boot)
    try:
        seg.payload[0] = 9
        with pytest.raises(SegmentExists):
            Segment.create(name, 128, kind=KIND, boot_id=new_boot_id())
        # the failed create did not unlink or clobber the existing one
        with Segment.open(name, kind=KIND, boot_id=boot) as other:
            assert other.size == 64 and other.payload[0] == 9
    finally:
        seg.close()
        seg.unlink()


def test_open_missing(broker):
    with pytest.raises(SegmentNotFound):
        Segment.open(shm_name(broker, "nope"))
    assert issubclass(SegmentNotFound, ShmError)


def _corrupt(name: str, offset: int, data: bytes) -> None:
    shm = posix_ipc.SharedMemory(name)
    try:
        os.pwrite(shm.fd, data, offset)
    finally:
        shm.close_fd()


@pytest.mark.parametrize(
    ("offset", "data", "words"),
    [
        (0, b"NOTMINE!", "magic"),
        (0, bytes(8), "magic"),
        (8, struct.pack("=I", LAYOUT_VERSION + 1), "version"),
        (32, struct.pack("=Q", 1 << 40), "payload bytes"),
    ],
)
def test_open_rejects_bad_header(broker, offset, data, words):
    name = shm_name(broker, "seg")
    Segment.create(name, 64, kind=KIND, boot_id=new_boot_id()).close()
    _corrupt(name, offset, data)
    with pytest.raises(LayoutMismatch, match=words):
        Segment.open(name)
    Segment.unlink_name(name)


def test_open_rejects_wrong_kind_and_boot_id(broker):
    name = shm_name(broker, "seg")
    boot = new_boot_id()
    Segment.create(name, 64, kind=KIND, boot_id=boot).close()
    with pytest.raises(LayoutMismatch, match="kind"):
        Segment.open(name, kind=KIND + 1)
    with pytest.raises(LayoutMismatch, match="boot id"):
        Segment.open(name, kind=KIND, boot_id=new_boot_id())
    Segment.open(name, kind=KIND, boot_id=boot).close()
    Segment.unlink_name(name)


def test_open_rejects_short_object(broker):
    name = shm_name(broker, "short")
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=10)
    shm.close_fd()
    try:
        with pytest.raises(LayoutMismatch, match="shorter"):
            Segment.open(name)
    finally:
        Segment.unlink_name(name)


@pytest.mark.parametrize("mask", [0o777, 0o077, 0o000])
def test_mode_is_0600_regardless_of_umask(broker, umask, mask):
    name = shm_name(broker, "seg")
    umask(mask)
    with Segment.create(name, 64, kind=KIND, boot_id=new_boot_id()) as seg:
        assert stat.S_IMODE(os.fstat(seg.fd).st_mode) == 0o600
        assert stat.S_IMODE(os.stat("/dev/shm" + name).st_mode) == 0o600
        seg.unlink()


def test_wider_mode_survives_umask(broker, umask):
    name = shm_name(broker, "seg")
    umask(0o077)
    with Segment.create(name, 64, kind=KIND, boot_id=new_boot_id(), mode=0o660) as seg:
        assert stat.S_IMODE(os.fstat(seg.fd).st_mode) == 0o660
        seg.unlink()


def test_enospc_is_clear_and_leaves_nothing(broker, monkeypatch):
    name = shm_name(broker, "big")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(ShmNoSpace, match="/dev/shm is full") as info:
        Segment.create(name, 1 << 20, kind=KIND, boot_id=new_boot_id())
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert name not in list_segments()


def test_other_create_failure_leaves_nothing(broker, monkeypatch):
    name = shm_name(broker, "bad")

    def broken(fd, offset, length):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "posix_fallocate", broken)
    with pytest.raises(OSError) as info:
        Segment.create(name, 64, kind=KIND, boot_id=new_boot_id())
    assert not isinstance(info.value, ShmNoSpace)
    assert name not in list_segments()


def test_open_without_permission(broker):
    """Another user's 0600 segment cannot be opened: ShmPermissionError."""
    name = shm_name(broker, "private")
    seg = Segment.create(name, 64, kind=KIND, boot_id=new_boot_id())
    try:
        if os.geteuid() != 0:
            os.fchmod(seg.fd, 0)  # not even the owner may open it now
            with pytest.raises(ShmPermissionError) as info:
                Segment.open(name)
            assert isinstance(info.value, PermissionError)
            return
        # root bypasses modes: try as an unprivileged user in a forked child
        pid = os.fork()
        if pid == 0:  # child: report through the exit code only
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                Segment.open(name)
                code = 1
            except ShmPermissionError as e:
                code = 0 if isinstance(e, PermissionError) else 2
            except BaseException:  # noqa: BLE001 - a forked child must never return to pytest
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        seg.close()
        seg.unlink()


def test_unlink_is_idempotent(broker):
    name = shm_name(broker, "seg")
    seg = Segment.create(name, 64, kind=KIND, boot_id=new_boot_id())
    seg.unlink()
    seg.unlink()
    # the mapping outlives the name
    seg.payload[0] = 1
    assert seg.payload[0] == 1
    seg.close()
    assert Segment.unlink_name(name) is False
    Segment.create(name, 64, kind=KIND, boot_id=new_boot_id()).close()
    assert Segment.unlink_name(name) is True
    assert Segment.unlink_name(name) is False


def test_close_is_idempotent_and_tolerates_derived_views(broker):
    name = shm_name(broker, "seg")
    seg = Segment.create(name, 64, kind=KIND, boot_id=new_boot_id())
    seg.unlink()
    view = seg.payload[8:16]
    words = seg.buf[:HEADER_SIZE].cast("Q")
    seg.close()  # must not raise BufferError
    seg.close()
    assert seg.closed and seg.fd == -1
    view[0] = 5  # the mapping stays alive while views exist
    assert view[0] == 5 and words[4] == 64
    view.release()
    words.release()


def test_list_segments_and_semaphores(broker):
    seg_name = shm_name(broker, "seg")
    sem_name = shm_name(broker, "bell")
    seg = Segment.create(seg_name, 64, kind=KIND, boot_id=new_boot_id())
    bell = Doorbell.create(sem_name, seg.payload[0:4])
    try:
        prefix = f"shmwatch.{broker}."
        assert list_segments(prefix) == [seg_name]
        assert list_semaphores(prefix) == [sem_name]
    finally:
        bell.close()
        bell.unlink()
        seg.close()
        seg.unlink()
    assert list_segments(prefix) == [] and list_semaphores(prefix) == []
