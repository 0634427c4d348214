"""Attaching to a broker: opening its control segment (every refusal a clientlib error),
claiming a client slot and saying who we are, how a client learns it was refused, and how
a shared-memory failure reaches the user (as a clientlib error: nothing of `shm.errors`
ever does). `Client._attach` runs these steps in order."""

from __future__ import annotations

import os

import psutil

from shm import layout as L
from shm.errors import (
    LayoutMismatch,
    MessageTooLarge,
    RingCorrupt,
    SegmentNotFound,
    ShmError,
    ShmNoSpace,
    ShmPermissionError,
)
from shm.lock import try_lock, unlock
from shm.ring import ring_bytes
from shm.segment import Segment, shm_name, shm_path
from shmwatch.wire import errors


def from_shm(exc: ShmError, name: str) -> errors.ShmwatchError:
    """The user-facing error for a shared-memory failure under a call: nothing of
    `shm.errors` reaches a user of clientlib."""
    if isinstance(exc, ShmPermissionError):
        return errors.PermissionDenied(f"shmwatch: permission denied by broker {name!r}: {exc}")
    if isinstance(exc, ShmNoSpace):
        return errors.NoSpaceError(f"shmwatch: /dev/shm is full: {exc}")
    if isinstance(exc, (SegmentNotFound, LayoutMismatch)):
        return errors.BrokerUnavailable(
            f"shmwatch: the shared memory of broker {name!r} changed under this client "
            f"(a restarted or replaced broker?): {exc}")
    if isinstance(exc, (RingCorrupt, MessageTooLarge)):
        return errors.ProtocolError(f"shmwatch: shared memory of broker {name!r} is "
                                    f"damaged: {exc}")
    return errors.ShmwatchError(f"shmwatch: {exc}")


def default_label() -> str:
    """The multiprocessing process name, unless it is "MainProcess"; else script:pid."""
    import multiprocessing
    import sys

    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{script}:{os.getpid()}"


def _label_bytes(label: str) -> bytes:
    """`label` as at most SLOT_LABEL_BYTES of UTF-8, cut at a character boundary."""
    raw = label.encode("utf-8", errors="replace")[:L.SLOT_LABEL_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def _registration_error(name: str, words, slot: int) -> errors.ShmwatchError:
    """The error the broker reported in our slot instead of registering us. Frees the
    slot (we still hold its lock, so it is ours to free)."""
    code = words[L.slot_word(slot, L.SLOT_ERROR)]
    needed = words[L.slot_word(slot, L.SLOT_ERROR_ARG)]
    words[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_FREE
    if code == errors.NoSpaceError.code:
        return errors.NoSpaceError(
            f"shmwatch: /dev/shm is full: broker {name!r} needs {needed} bytes for this "
            f"client's request and response rings; free space in /dev/shm or start the "
            f"broker with smaller --request-ring-bytes/--response-ring-bytes")
    return errors.error_from_code(
        code, f"shmwatch: broker {name!r} could not register this client (see its log)")


def _damaged(name: str, what: str, value: int) -> errors.ProtocolError:
    return errors.ProtocolError(f"shmwatch: the control segment of broker {name!r} is "
                                f"damaged: {what} {value}")


def _ring_size(name: str, words, index: int) -> int:
    """Bytes of a ring whose capacity is control word `index` (ProtocolError if bad)."""
    try:
        return ring_bytes(words[index])
    except ValueError:
        raise _damaged(name, "ring capacity", words[index]) from None


def open_control(name: str) -> Segment:
    """Broker `name`'s control segment, or the clientlib error saying why not (none
    running, another user's, another layout, world-writable)."""
    try:
        ctl = Segment.open(shm_name(name, "ctl"), kind=L.KIND_CTL)
    except SegmentNotFound:
        raise errors.BrokerUnavailable(
            f"shmwatch: no broker named {name!r} is running") from None
    except ShmPermissionError:
        raise errors.PermissionDenied(
            f"shmwatch: permission denied: broker {name!r} belongs to another user "
            f"(its segments are mode 0600 unless started with --mode/--group)") from None
    except LayoutMismatch as exc:
        try:
            whose = f" (owner uid {os.stat(shm_path(shm_name(name, L.CTL_PART))).st_uid})"
        except OSError:
            whose = ""
        raise errors.BrokerUnavailable(
            f"shmwatch: broker {name!r} has an incompatible layout{whose}: {exc}") from None
    if os.fstat(ctl.fd).st_mode & 0o002:
        ctl.close()
        raise errors.PermissionDenied(
            f"shmwatch: broker {name!r} control segment is world-writable: refusing")
    return ctl


def claim_slot(ctl: Segment, words, lock_fd: int, label: str, broker_bell) -> int:
    """Take a free client slot: lock its byte on `lock_fd`, write our pid, start time and
    `label`, mark it requested and wake the broker. TooManyClientsError if none is free."""
    me = psutil.Process()
    # Never past the end of the segment, whatever the (shared) word says.
    slots = (len(words) - L.CTL_WORDS) // L.SLOT_WORDS
    for slot in range(min(words[L.CTL_MAX_CLIENTS], slots)):
        if words[L.slot_word(slot, L.SLOT_STATE)] != L.SLOT_FREE:
            continue
        if not try_lock(lock_fd, L.slot_lock_byte(slot)):
            continue
        if words[L.slot_word(slot, L.SLOT_STATE)] != L.SLOT_FREE:
            unlock(lock_fd, L.slot_lock_byte(slot))  # the broker has not reclaimed it yet
            continue
        words[L.slot_word(slot, L.SLOT_PID)] = os.getpid()
        words[L.slot_word(slot, L.SLOT_CREATE_TIME_US)] = int(me.create_time() * 1e6)
        off = L.slot_label_offset(slot)
        ctl.payload[off:off + L.SLOT_LABEL_BYTES] = _label_bytes(label).ljust(
            L.SLOT_LABEL_BYTES, b"\0")
        words[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_REQUESTED
        # Wraps: the word is shared memory, and 2**64-1 must not stop a registration.
        words[L.CTL_REG_SEQ] = (words[L.CTL_REG_SEQ] + 1) & ((1 << 64) - 1)
        broker_bell.ring()
        return slot
    raise errors.TooManyClientsError()
