"""Errors of the shared-memory layer.

Whose fault each one is: `SegmentExists` / `SegmentNotFound` / `ShmPermissionError` /
`ShmNoSpace` are about the named object or the host; `LayoutMismatch` means the object
exists but is not ours (stale from another broker boot, another layout version, or
foreign); `RingCorrupt` means the *peer* wrote a bad record or a bad counter and must be
treated as faulty. Nothing here knows about keys or watches.
"""

from __future__ import annotations


class ShmError(Exception):
    """Base of every error raised by `shm`."""


class SegmentExists(ShmError):
    """A named segment or semaphore already exists (create uses O_EXCL)."""


class SegmentNotFound(ShmError):
    """A named segment or semaphore does not exist."""


class LayoutMismatch(ShmError):
    """Bad magic, layout version, kind or boot id: a stale or foreign segment."""


class RingCorrupt(ShmError):
    """A bad record or counter in a ring: bad length, alignment, CRC or wrap marker.

    The peer that writes the ring is at fault; treat it as a protocol fault of that peer.
    """


class LogRecordCorrupt(RingCorrupt):
    """A retained record of the revision log failed its checks when read back: someone
    wrote into the log's shared memory. `rev` is the damaged record's revision."""

    def __init__(self, message: str, rev: int):
        super().__init__(message)
        self.rev = rev


class RecordEvicted(ShmError):
    """A reader in another process found that a record it needed was evicted from the
    revision log (before or while it copied it): history from `rev` on, up to where it
    read, is gone (a compaction, not damage)."""

    def __init__(self, rev: int):
        super().__init__(f"revision log: revision {rev} was evicted while being read")
        self.rev = rev


class MessageTooLarge(ShmError):
    """A consumer read a whole message longer than its `max_message`: it was consumed
    and dropped chunk by chunk, and the ring is still in step (not corruption: the
    peer sent something too big). `head` holds its first bytes (enough to read a
    request id), `size` its length."""

    HEAD = 64

    def __init__(self, head: bytes, size: int, limit: int):
        super().__init__(f"message of {size} bytes exceeds max_message {limit}")
        self.head = head
        self.size = size


class RingFull(ShmError):
    """A ring has no room, where a caller documents that as an error (not `Ring.write`,
    which returns the unchanged offset instead)."""


class ShmPermissionError(ShmError, PermissionError):
    """The named object exists but this process may not open it (mode 0600 of another
    user, by default)."""


class ShmNoSpace(ShmError, OSError):
    """posix_fallocate / ftruncate failed with ENOSPC: /dev/shm is full."""
