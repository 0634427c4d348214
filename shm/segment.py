"""Named POSIX shared-memory segments with a self-describing header.

This module owns the life cycle of a segment (create O_EXCL with reserved space, open
and verify, map, close, unlink) and the 64-byte header every shmwatch segment starts
with. It never interprets the payload.

Header (native byte order, one host):

    offset  size  field
    0       8     magic b"SHMWATCH"
    8       4     u32 layout version
    12      4     u32 kind (what the payload is; chosen by the caller)
    16      16    boot id of the broker instance that created it
    32      8     u64 payload size (bytes after the header)
    40      24    zero

`create` writes the magic last, so an `open` racing with `create` sees either a
complete header or a bad magic (`LayoutMismatch`: retry), never a half-written one.
`publish` gives a segment its final name atomically (link(2) in /dev/shm, which is
where Linux keeps POSIX shared memory), so a segment can be completed, and locked,
before anyone can find it.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from typing import TYPE_CHECKING

import posix_ipc

from .errors import (
    LayoutMismatch,
    SegmentExists,
    SegmentNotFound,
    ShmNoSpace,
    ShmPermissionError,
)

if TYPE_CHECKING:
    from typing_extensions import Self

MAGIC = b"SHMWATCH"
# 2: reply bounds in the control segment; 3: random tokens in names, 16-word client
# slots with a label and a failure code
LAYOUT_VERSION = 3
HEADER_SIZE = 64
SHM_DIR = "/dev/shm"

_FIELDS = struct.Struct("=II16sQ")  # version, kind, boot id, payload size at offset 8
_BROKER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NAME_MAX = 255 - len("sem.")  # the semaphore file name /dev/shm/sem.<x> must fit NAME_MAX


def shm_name(broker: str, part: str) -> str:
    """`/shmwatch.<broker>.<part>`; the broker name is 1-64 chars of [A-Za-z0-9_-]."""
    if not isinstance(broker, str) or not _BROKER_RE.fullmatch(broker):
        raise ValueError(
            f"invalid broker name {broker!r}: need 1-64 characters of [A-Za-z0-9_-]"
        )
    if not isinstance(part, str) or not part or "/" in part or "\0" in part:
        raise ValueError(f"invalid segment part {part!r}")
    name = f"/shmwatch.{broker}.{part}"
    if len(name) - 1 > _NAME_MAX:
        raise ValueError(f"shared-memory name too long: {name!r}")
    return name


def new_boot_id() -> bytes:
    """16 random bytes identifying one broker instance (stale segments carry another)."""
    return os.urandom(16)


def new_token() -> int:
    """A random, non-zero 64-bit token for an object name nobody can guess in advance."""
    return int.from_bytes(os.urandom(8), "little") or 1


def shm_path(name: str) -> str:
    """The file behind POSIX shared-memory object `name` ("/x" -> /dev/shm/x)."""
    _check_name(name)
    return os.path.join(SHM_DIR, name[1:])


def check_header(raw: bytes, name: str, total: int, kind: int | None = None,
                 boot_id: bytes | None = None) -> tuple[int, bytes, int]:
    """(kind, boot id, payload size) of a segment whose first bytes are `raw` and whose
    file holds `total` bytes; `LayoutMismatch` saying what is wrong otherwise."""
    if total < HEADER_SIZE or len(raw) < HEADER_SIZE:
        raise LayoutMismatch(
            f"segment {name}: {total} bytes, shorter than the {HEADER_SIZE}-byte "
            f"header (not a shmwatch segment, or still being created)"
        )
    magic = bytes(raw[0:8])
    if magic != MAGIC:
        raise LayoutMismatch(
            f"segment {name}: bad magic {magic!r}, expected {MAGIC!r} "
            f"(foreign segment, or still being created)"
        )
    version, seg_kind, seg_boot, size = _FIELDS.unpack_from(raw, 8)
    if version != LAYOUT_VERSION:
        raise LayoutMismatch(
            f"segment {name}: layout version {version}, this code speaks "
            f"{LAYOUT_VERSION} (made by another shmwatch version)"
        )
    if kind is not None and seg_kind != kind:
        raise LayoutMismatch(f"segment {name}: kind {seg_kind}, expected {kind}")
    if boot_id is not None and seg_boot != bytes(boot_id):
        raise LayoutMismatch(
            f"segment {name}: boot id {seg_boot.hex()}, expected {bytes(boot_id).hex()} "
            f"(stale segment of another broker instance)"
        )
    if size > total - HEADER_SIZE:
        raise LayoutMismatch(
            f"segment {name}: header says {size} payload bytes, object holds only "
            f"{total - HEADER_SIZE}"
        )
    return seg_kind, seg_boot, size


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.startswith("/") or "/" in name[1:] or len(name) < 2:
        raise ValueError(f"invalid shared-memory name {name!r}: need '/<name>' without '/'")


class Segment:
    """One mapped, named shared-memory segment.

    Attributes: `name`, `fd` (kept open: callers take fcntl OFD locks on it), `kind`,
    `boot_id`, `size` (payload size), `buf` (the whole mapping, header included) and
    `payload` (`buf[HEADER_SIZE:HEADER_SIZE + size]`).

    Callers that derive memoryviews from `buf`/`payload` (rings, doorbell flags) should
    release them before `close()`. If they do not, `close()` still succeeds: it drops its
    own references and the mapping is unmapped when the last derived view goes away.
    """

    __slots__ = ("_mmap", "_shm", "boot_id", "buf", "fd", "kind", "name", "payload", "size")

    def __init__(self, name: str, shm: posix_ipc.SharedMemory, mm: mmap.mmap, kind: int,
                 boot_id: bytes, size: int) -> None:
        self.name = name
        self._shm = shm
        self.fd: int = shm.fd
        self._mmap: mmap.mmap | None = mm
        self.kind = kind
        self.boot_id = boot_id
        self.size = size
        self.buf: memoryview = memoryview(mm)
        self.payload: memoryview = self.buf[HEADER_SIZE:HEADER_SIZE + size]

    # -- life cycle -------------------------------------------------------------------

    @classmethod
    def create(cls, name: str, size: int, *, kind: int, boot_id: bytes,
               mode: int = 0o600) -> Segment:
        """Create `name` exclusively with `size` payload bytes reserved, and map it.

        The space is reserved with posix_fallocate, so a full /dev/shm fails here with
        `ShmNoSpace` rather than with SIGBUS on first touch later. The mode is set with
        fchmod, so the umask cannot strip it. On any failure nothing is left behind.
        Raises `SegmentExists` if the name is taken.
        """
        _check_name(name)
        if size < 0:
            raise ValueError(f"segment size must be >= 0, got {size}")
        if not 0 <= kind <= 0xFFFFFFFF:
            raise ValueError(f"kind must be a u32, got {kind}")
        if len(boot_id) != 16:
            raise ValueError(f"boot_id must be 16 bytes, got {len(boot_id)}")
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=mode, size=0)
        except posix_ipc.ExistentialError:
            raise SegmentExists(f"shared-memory segment {name} already exists") from None
        except posix_ipc.PermissionsError as e:
            raise ShmPermissionError(f"cannot create shared-memory segment {name}: {e}") from None
        total = HEADER_SIZE + size
        mm = None
        try:
            os.fchmod(shm.fd, mode)
            try:
                os.posix_fallocate(shm.fd, 0, total)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise ShmNoSpace(
                        errno.ENOSPC,
                        f"/dev/shm is full: cannot reserve {total} bytes for {name} "
                        f"(free space in /dev/shm or shrink the ring sizes)",
                    ) from None
                raise
            mm = mmap.mmap(shm.fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            _FIELDS.pack_into(mm, 8, LAYOUT_VERSION, kind, bytes(boot_id), size)
            mm[0:8] = MAGIC  # last: an opener sees a complete header or a bad magic
        except BaseException:
            if mm is not None:
                mm.close()
            shm.close_fd()
            Segment.unlink_name(name)
            raise
        return cls(name, shm, mm, kind, bytes(boot_id), size)

    @classmethod
    def open(cls, name: str, *, kind: int | None = None,
             boot_id: bytes | None = None) -> Segment:
        """Open and map an existing segment, verifying magic, version, kind, boot id.

        Raises `SegmentNotFound`, `ShmPermissionError`, or `LayoutMismatch` (saying what
        was wrong: a stale or foreign segment, or one still being created).
        """
        _check_name(name)
        try:
            shm = posix_ipc.SharedMemory(name, 0)
        except posix_ipc.ExistentialError:
            raise SegmentNotFound(f"shared-memory segment {name} does not exist") from None
        except posix_ipc.PermissionsError as e:
            raise ShmPermissionError(f"cannot open shared-memory segment {name}: {e}") from None
        mm = None
        try:
            total = os.fstat(shm.fd).st_size
            if total < HEADER_SIZE:
                check_header(b"", name, total)  # raises: too short
            mm = mmap.mmap(shm.fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            seg_kind, seg_boot, size = check_header(mm[:HEADER_SIZE], name, total, kind,
                                                    boot_id)
        except BaseException:
            if mm is not None:
                mm.close()
            shm.close_fd()
            raise
        return cls(name, shm, mm, seg_kind, seg_boot, size)

    def close(self) -> None:
        """Release the views, the mapping and the fd. Idempotent; never raises
        BufferError (see the class docstring)."""
        if self._shm is None:
            return
        for view in (self.payload, self.buf):
            try:
                view.release()
            except BufferError:  # something exported a buffer from it: let GC unmap
                pass
        mm, self._mmap = self._mmap, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                # Derived views still exist: the mapping lives until they are collected.
                pass
        shm, self._shm = self._shm, None
        try:
            # mmap keeps a dup of the descriptor, and an OFD lock lives until the last
            # descriptor of its open file description closes: drop our locks explicitly
            # so closing a segment always releases what this handle locked.
            from .lock import unlock_all

            unlock_all(shm.fd)
        except OSError:
            pass
        try:
            shm.close_fd()
        except (OSError, posix_ipc.Error):
            pass
        self.fd = -1

    def unlink(self) -> None:
        """Remove the name (the mapping stays valid until closed). Idempotent."""
        Segment.unlink_name(self.name)

    def publish(self, name: str) -> None:
        """Rename this segment to `name` atomically, failing if `name` exists.

        link(2) the new name, then unlink the old one: no moment shows `name` holding
        anything but the complete segment (whatever the caller wrote and locked before),
        and an existing `name` is never replaced. Raises `SegmentExists` if `name` is
        taken, `SegmentNotFound` if this segment's own name was removed meanwhile.
        """
        try:
            os.link(shm_path(self.name), shm_path(name))
        except FileExistsError:
            raise SegmentExists(f"shared-memory segment {name} already exists") from None
        except FileNotFoundError:
            raise SegmentNotFound(f"shared-memory segment {self.name} was removed") from None
        old, self.name = self.name, name
        Segment.unlink_name(old)

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Unlink `name` if present; return whether it existed."""
        try:
            posix_ipc.unlink_shared_memory(name)
        except posix_ipc.ExistentialError:
            return False
        except posix_ipc.PermissionsError as e:
            raise ShmPermissionError(f"cannot unlink shared-memory segment {name}: {e}") from None
        return True

    @property
    def closed(self) -> bool:
        return self._shm is None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._shm is None else f"size={self.size}"
        return f"<Segment {self.name} kind={self.kind} {state}>"


def list_segments(prefix: str = "shmwatch.") -> list[str]:
    """Names ("/x") of the shared-memory objects in /dev/shm whose name starts with
    `prefix` (semaphores excluded), sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(
        "/" + e for e in entries if e.startswith(prefix) and not e.startswith("sem.")
    )


def list_semaphores(prefix: str = "shmwatch.") -> list[str]:
    """Names ("/x") of the POSIX semaphores (/dev/shm/sem.x) whose name starts with
    `prefix`, sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    sem = "sem." + prefix
    return sorted("/" + e[4:] for e in entries if e.startswith(sem))


__all__ = [
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "Segment",
    "list_segments",
    "check_header",
    "list_semaphores",
    "new_boot_id",
    "new_token",
    "shm_name",
    "shm_path",
]
