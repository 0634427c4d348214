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


class RingFull(ShmError):
    """A ring has no room, where a caller documents that as an error (not `Ring.write`,
    which returns the unchanged offset instead)."""


class ShmPermissionError(ShmError, PermissionError):
    """The named object exists but this process may not open it (mode 0600 of another
    user, by default)."""


class ShmNoSpace(ShmError, OSError):
    """posix_fallocate / ftruncate failed with ENOSPC: /dev/shm is full."""
