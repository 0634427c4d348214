"""Attaching to a broker: what a client says about itself, how it learns it was
refused, and how a shared-memory failure reaches the user (as a clientlib error: nothing
of `shm.errors` ever does)."""

from __future__ import annotations

import os

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
