"""Open-file-description (OFD) byte locks: exact, kernel-released liveness.

A process that holds an OFD write lock on a byte of a shared file keeps it until it
closes that descriptor or dies, whatever else it opens or closes (unlike classic POSIX
record locks, which any close() in the process drops). So "is byte N locked?" answers
"is the holder alive?" exactly, with no timeouts and no pid-reuse trap. Linux only.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

_FLOCK = "hhqqi4x"  # struct flock: l_type, l_whence, l_start, l_len, l_pid (+ padding)
_F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
_F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)


def _flock(kind: int, byte: int) -> bytes:
    return struct.pack(_FLOCK, kind, os.SEEK_SET, byte, 1, 0)


def try_lock(fd: int, byte: int) -> bool:
    """Take a write lock on `byte` of `fd` without waiting. True if taken. O(1) syscall."""
    try:
        fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_WRLCK, byte))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def unlock(fd: int, byte: int) -> None:
    fcntl.fcntl(fd, _F_OFD_SETLK, _flock(fcntl.F_UNLCK, byte))


def is_locked(fd: int, byte: int) -> bool:
    """Whether another open file description holds a lock on `byte`. O(1) syscall."""
    res = fcntl.fcntl(fd, _F_OFD_GETLK, _flock(fcntl.F_WRLCK, byte))
    return struct.unpack(_FLOCK, res)[0] != fcntl.F_UNLCK


def unlock_all(fd: int) -> None:
    """Drop every OFD lock this open file description holds on the file."""
    fcntl.fcntl(fd, _F_OFD_SETLK, struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
