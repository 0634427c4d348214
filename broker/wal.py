"""Durability for `--data-dir`: the write-ahead log, snapshots, and their integrity.

Owns the files of one data directory and nothing else: it never decides what a write
means (the broker replays records through the MVCC core, which is deterministic, so the
same records give the same revisions, versions and events). It must never drop a byte
that may hold an acknowledged write without an explicit `shmwatch repair --yes`.

Files in DIR. Every one is created mode 0600 through os.open + fchmod, so no umask can
widen it, whatever --mode/--group say: those share the shared-memory objects that
clients must open, while only the broker (and `shmwatch repair`, run as its user) ever
reads these. DIR is created 0700; an existing DIR keeps its mode (a warning says so when
others may list it).
  lock   flock'ed by the broker that owns the directory, and by `shmwatch repair`,
         which therefore never runs beside a live broker
  wal    file header, then frames: the records applied since the last snapshot
  snap   file header, u64 length | u32 crc32(length word + data), msgpack
         {"seq", "mvcc", "log"}: the last snapshot (written to snap.tmp, fsync'ed,
         renamed, so the name always holds a whole one)
  meta   the same framing around msgpack {"cluster_id": int}: kept across restarts,
         so clients can tell a restarted broker with its data from a new store

File header (12 bytes): b"shmw" | a 4-byte kind (b"wal\\0", b"snap", b"meta") | u32
format version (1). A file without it, or of another version, is refused with a message
saying so: there is no released older format to migrate from, and a future one must be
detected, not misread.

WAL frame: u32 length | u32 crc32(body) | u32 crc32(the 8 bytes before it) | body, the
body msgpack [seq, kind, payload]; seq counts records from 1 across snapshots (a KV
record is exactly one revision: only writes that change something are logged). The
header's own CRC is what lets recovery trust a length: without it one flipped bit in a
length made everything after it look like a torn tail, and recovery truncated it away.

Recovery reads frames until the first one that does not check out and classifies the
bytes from there to the end of the file. A *torn tail* is what a write interrupted by a
crash leaves behind; it cannot hold a whole record (a record's body starts with the
non-zero byte 0x93), so nothing acknowledged is lost by dropping it (logged, truncated):
  T1 fewer bytes remain than a frame header (a header cut short by the end of the file);
  T2 the header fails its check and every byte after its 12 is zero: a header cut short
     and a zero-filled rest (blocks a crash left unwritten read as zeros, e.g. after a
     power loss on XFS; so does a preallocated tail);
  T3 the header checks out and the body runs past the end of the file;
  T4 the header checks out, the body fails its CRC, only zeros follow the frame, and
     one of the body's 512-byte sectors is all zeros (etcd's torn-entry rule: a sector
     the crash never wrote). A bad body CRC in the last frame *without* a zero sector is
     a damaged record, not an unfinished one: corruption, as etcd treats it.
Anything else is *corruption*: a header or body failing its check with non-zero bytes
after it, a frame whose CRCs pass but whose body is not a record, a sequence number out
of order (records missing), a damaged or half-written snapshot or meta. Recovery then
raises `WalCorrupt` naming the file, the offset and how many bytes follow, and changes
nothing: etcd refuses to start too. A crash that leaves written sectors after unwritten
ones inside one batch is also refused (it cannot be told apart from a zeroed record
with acknowledged ones after it); `shmwatch repair` then shows what it would drop.

`shmwatch repair --data-dir DIR` (`repair()` here) reports what is damaged, where, how
many bytes and intact records a repair drops and the revision the store will be at; with
--yes it keeps the damaged file (`wal.corrupt-<time>`, a hard link to the original) and
writes a WAL cut back to its last good frame. A damaged snapshot cannot be repaired:
the history before it exists nowhere else.

Group commit: the records of one batch of requests go out in one write();
`fsync="always"` syncs before the batch's replies are published, `"batch"` at most every
10 ms, `"never"` leaves it to the kernel. Any of them survives a SIGKILL of the broker
(the data is in the page cache once write() returned); only "always" also survives a
machine crash.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
import time
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import msgpack

log = logging.getLogger("shmwatch.wal")

KIND_KV = 0  # payload: the op in the wire's txn-op encoding
KIND_COMPACT = 1  # payload: the revision
KIND_LEASE_GRANT = 2  # payload: [id, ttl, bound]
KIND_LEASE_REVOKE = 3  # payload: the id (a revoke, an expiry, a bound lease's owner gone)
KINDS = (KIND_KV, KIND_COMPACT, KIND_LEASE_GRANT, KIND_LEASE_REVOKE)
FSYNC_MODES = ("always", "batch", "never")
BATCH_FSYNC_S = 0.01
# 1: the first framed format; 2: a snapshot's copy of the revision log holds the
# records of shmwatch.wire.events.log_record (LoggedEvent pieces).
FORMAT_VERSION = 2
FILE_MODE = 0o600
DIR_MODE = 0o700
SECTOR = 512  # the unit a torn write leaves unwritten (T4); the smallest a disk writes
FILE_HEADER = struct.Struct("<4s4sI")  # magic, kind, format version
FRAME_HEADER = struct.Struct("<III")  # length, crc32(body), crc32(previous 8 bytes)
CHECKED_HEADER = struct.Struct("<QI")  # snap/meta: length, crc32(length word + data)
_MAGIC = b"shmw"
_KINDS = {"wal": (b"wal\0", "WAL"), "snap": (b"snap", "snapshot"), "meta": (b"meta", "meta file")}
_RECORD_START = b"\x93"  # msgpack fixarray of 3: the first byte of every frame body


class WalCorrupt(RuntimeError):
    """A file of the data directory is damaged, or of a format this shmwatch does not
    read. The broker refuses to start and changes nothing; `shmwatch repair` shows what
    a repair would drop. `path` names the file, `offset` where the damage starts (0 for
    a bad file header, None when the whole file is in question)."""

    def __init__(self, message: str, path: str, offset: int | None = None):
        super().__init__(message)
        self.path = path
        self.offset = offset


class DataDirBusy(RuntimeError):
    """Another live broker (or a running `shmwatch repair`) holds this data directory."""


class Record(NamedTuple):
    """One WAL record and where its frame starts."""

    offset: int
    seq: int
    kind: int
    payload: object


@dataclass
class Damage:
    """Where a WAL stops checking out, and what the bytes from there on are."""

    offset: int  # the first byte after the last good frame
    size: int  # bytes from `offset` to the end of the file
    reason: str
    torn: bool  # a torn tail (T1-T4): recovery drops it; otherwise corruption


@dataclass
class WalScan:
    records: list[Record]  # every good frame's record, in file order
    end: int  # the end of the last good frame
    damage: Damage | None


# ------------------------------------------------------------------ reading (pure)


def scan_wal(data: bytes, path: str, snap_seq: int = 0) -> WalScan:
    """Check a WAL's header and frames; stop at the first frame that does not check out
    and classify what follows (module docstring: torn tail T1-T4 or corruption).
    `snap_seq` is the snapshot's sequence: the first record may be at most one past it
    (records up to it are left over from a crash between snapshot and truncation).
    Raises WalCorrupt only for a bad file header. O(len(data))."""
    check_file_header(data, path, "wal")
    records: list[Record] = []
    size = len(data)
    view = memoryview(data)  # frame bodies are checked and decoded without a copy
    pos = FILE_HEADER.size
    expect = None
    while pos < size:
        damage = None
        if size - pos < FRAME_HEADER.size:
            damage = Damage(pos, size - pos, "a frame header cut short by the end of the file", True)
            return WalScan(records, pos, damage)
        n, body_crc, head_crc = FRAME_HEADER.unpack_from(data, pos)
        start = pos + FRAME_HEADER.size
        end = start + n
        if zlib.crc32(data[pos:pos + 8]) != head_crc:
            if _zero_from(data, start):
                damage = Damage(pos, size - pos, "a frame header cut short, zeros after it", True)
            else:
                damage = Damage(pos, size - pos, "a frame header fails its check", False)
        elif end > size:
            damage = Damage(pos, size - pos, f"a frame of {n} bytes cut short by the end of the "
                                             f"file ({size - start} bytes of it present)", True)
        elif zlib.crc32(view[start:end]) != body_crc:
            if _zero_from(data, end) and _has_zero_sector(data, start, end):
                damage = Damage(pos, size - pos, "the last frame has a zero-filled sector "
                                                 "(a write the crash left unfinished)", True)
            else:
                damage = Damage(pos, size - pos, "a frame's data fails its checksum", False)
        else:
            try:
                seq, kind, payload = _decode_record(view[start:end])
            except ValueError as exc:
                damage = Damage(pos, size - pos,
                                f"a frame whose checksums pass holds no record ({exc})", False)
            else:
                if expect is None and not 1 <= seq <= snap_seq + 1:
                    want = "1" if snap_seq == 0 else f"at most {snap_seq + 1} (after the snapshot)"
                    damage = Damage(pos, size - pos, f"the first record has sequence {seq} where {want} "
                                                     "was expected: records are missing", False)
                elif expect is not None and seq != expect:
                    damage = Damage(pos, size - pos, f"record sequence {seq} where {expect} was "
                                                     "expected: records are missing or repeated", False)
        if damage is not None:
            return WalScan(records, pos, damage)
        records.append(Record(pos, seq, kind, payload))
        expect = seq + 1
        pos = end
    return WalScan(records, pos, None)


def check_file_header(data: bytes, path: str, kind: str) -> None:
    """Raise WalCorrupt unless `data` starts with the header of a `kind` file of the
    format version this code reads."""
    tag, what = _KINDS[kind]
    if len(data) < FILE_HEADER.size:
        raise WalCorrupt(f"{what} {path} is {len(data)} bytes, shorter than the "
                         f"{FILE_HEADER.size}-byte header of a shmwatch {what}: damaged, or not "
                         f"one of ours", path, 0)
    magic, got, version = FILE_HEADER.unpack_from(data)
    if magic != _MAGIC or got != tag:
        raise WalCorrupt(f"{what} {path} is not a shmwatch {what} (no 'shmw' {tag!r} header): "
                         f"written by an older shmwatch, which no version can read, or "
                         f"damaged; move the data directory aside to start an empty store",
                         path, 0)
    if version != FORMAT_VERSION:
        who = "an older" if version < FORMAT_VERSION else "a newer"
        raise WalCorrupt(f"{what} {path} is of format version {version}, written by {who} "
                         f"shmwatch; this one reads version {FORMAT_VERSION}", path, 0)


def encode_frame(body: bytes) -> bytes:
    """One WAL frame around `body` (module docstring). O(len(body))."""
    head = struct.pack("<II", len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def _decode_record(body: bytes | memoryview) -> tuple[int, int, object]:
    try:
        rec = msgpack.unpackb(body, raw=False)
    except Exception as exc:  # msgpack raises several types; any means "not a record"
        raise ValueError(f"undecodable: {exc}") from None
    if not (isinstance(rec, list) and len(rec) == 3 and type(rec[0]) is int
            and rec[1] in KINDS):
        raise ValueError("not a [seq, kind, payload] record")
    kind, payload = rec[1], rec[2]
    if kind in (KIND_COMPACT, KIND_LEASE_REVOKE) and type(payload) is not int:
        raise ValueError("a compaction or revoke record without its number")
    if kind == KIND_LEASE_GRANT and not (
            isinstance(payload, list) and len(payload) == 3 and type(payload[0]) is int
            and type(payload[1]) is int and type(payload[2]) is bool):
        raise ValueError("a lease grant record that is not [id, ttl, bound]")
    return rec[0], rec[1], rec[2]


def _zero_from(data: bytes, pos: int) -> bool:
    return data.count(0, pos) == len(data) - pos


def _has_zero_sector(data: bytes, start: int, end: int) -> bool:
    """Whether a part of data[start:end] lying in one 512-byte sector of the file is
    all zeros (etcd's isTornEntry)."""
    s = start
    while s < end:
        e = min(end, (s // SECTOR + 1) * SECTOR)
        if data.count(0, s, e) == e - s:
            return True
        s = e
    return False


def _intact_after(data: bytes, pos: int) -> list[int]:
    """The sequence numbers of the frames after `pos` that still check out: what a
    repair cutting the WAL at `pos` drops besides damage. A frame body starts with
    0x93, so only those bytes are tried as frame starts. O(len(data))."""
    seqs = []
    q = data.find(_RECORD_START, pos + 1 + FRAME_HEADER.size)
    while q != -1:
        at = q - FRAME_HEADER.size
        n, body_crc, head_crc = FRAME_HEADER.unpack_from(data, at)
        end = q + n
        if (zlib.crc32(data[at:at + 8]) == head_crc and end <= len(data)
                and zlib.crc32(data[q:end]) == body_crc):
            try:
                seqs.append(_decode_record(data[q:end])[0])
            except ValueError:
                pass
            else:
                q = data.find(_RECORD_START, end + FRAME_HEADER.size)
                continue
        q = data.find(_RECORD_START, q + 1)
    return seqs


# ------------------------------------------------------------------ files


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _read_checked(path: str, kind: str) -> memoryview | None:
    """The data of a snap or meta file (None if there is none), its framing checked.
    A view, not a copy: a snapshot may be hundreds of megabytes."""
    data = _read(path)
    if data is None:
        return None
    check_file_header(data, path, kind)
    what = _KINDS[kind][1]
    h = FILE_HEADER.size + CHECKED_HEADER.size
    if len(data) < h:
        raise WalCorrupt(f"{what} {path} is cut short: {len(data)} bytes, not even its "
                         f"{h}-byte header", path, len(data))
    n, crc = CHECKED_HEADER.unpack_from(data, FILE_HEADER.size)
    body = memoryview(data)[h:]
    if len(body) != n:
        raise WalCorrupt(f"{what} {path} is damaged: its header says {n} bytes of data, the "
                         f"file holds {len(body)} (cut short, or the header is damaged)",
                         path, h + min(n, len(body)))
    if zlib.crc32(body, zlib.crc32(data[FILE_HEADER.size:FILE_HEADER.size + 8])) != crc:
        raise WalCorrupt(f"{what} {path} is damaged: its {n} bytes of data fail their checksum",
                         path, h)
    return body


def _checked(kind: str, body: bytes) -> tuple[bytes, bytes]:
    """(header, body) of a snap or meta file: written as two chunks, not copied."""
    length = struct.pack("<Q", len(body))
    return (FILE_HEADER.pack(_MAGIC, _KINDS[kind][0], FORMAT_VERSION) + length
            + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))), body)


def read_snapshot(path: str) -> dict | None:
    """The snapshot at `path` (None if there is none), checked; WalCorrupt if damaged."""
    body = _read_checked(path, "snap")
    if body is None:
        return None
    try:
        snap = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception as exc:  # any decoder error: the data is not a snapshot
        raise WalCorrupt(f"snapshot {path} passes its checksum but cannot be decoded "
                         f"({exc}): written damaged?", path) from None
    if not (isinstance(snap, dict) and type(snap.get("seq")) is int
            and isinstance(snap.get("mvcc"), dict) and type(snap["mvcc"].get("rev")) is int
            and isinstance(snap.get("log"), list)):
        raise WalCorrupt(f"snapshot {path} passes its checksum but does not hold a "
                         f"snapshot: written damaged?", path)
    return snap


def read_meta(path: str) -> int | None:
    """The cluster id recorded at `path` (None if there is none); WalCorrupt if damaged."""
    body = _read_checked(path, "meta")
    if body is None:
        return None
    try:
        meta = msgpack.unpackb(body, raw=False)
        return int(meta["cluster_id"])
    except Exception as exc:  # any decoder or shape error: the data is not a meta
        raise WalCorrupt(f"meta file {path} passes its checksum but holds no cluster id "
                         f"({exc!r})", path) from None


def _open_private(path: str, flags: int) -> int:
    """os.open with mode 0600 made exact: fchmod, as the umask may have narrowed it and
    an existing file may have been created wider."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(dirpath: str, name: str, *chunks: bytes) -> None:
    """Write DIR/name (the chunks one after the other) whole or not at all: a 0600
    temporary, fsync'ed, renamed."""
    tmp = os.path.join(dirpath, name + ".tmp")
    try:
        os.unlink(tmp)  # a leftover: O_EXCL below creates it anew, with our mode
    except FileNotFoundError:
        pass
    fd = _open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(dirpath, name))
    _fsync_dir(dirpath)


def _prepare_dir(path: str) -> None:
    """Create DIR 0700 (missing parents as os.makedirs does); an existing one keeps its
    mode: it may be the operator's choice, and the files in it are 0600 regardless."""
    if os.path.isdir(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("data directory %s is mode %04o: other users can see the names in "
                        "it (its files are 0600); chmod 700 it to hide them", path, mode)
        return
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.mkdir(path, DIR_MODE)
        os.chmod(path, DIR_MODE)  # the umask may have narrowed it
    except OSError as exc:  # a file of that name, no permission, a read-only parent
        raise DataDirBusy(f"data directory {path!r} cannot be made: {exc.strerror}") from None


def _lock(path: str) -> int:
    fd = _open_private(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirBusy(f"data directory {path!r} is in use by another broker") from None
    return fd


# ------------------------------------------------------------------ the broker's side


class DataDir:
    """The files of one data directory, held (flock) for one broker."""

    def __init__(self, path: str, fsync: str = "always"):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        self.path = path
        self.fsync = fsync
        self.wal_path = os.path.join(path, "wal")
        _prepare_dir(path)
        self._lock_fd = _lock(path)
        for name in ("wal", "snap", "meta"):  # a crash's leftovers, never read
            try:
                os.unlink(os.path.join(path, name + ".tmp"))
            except FileNotFoundError:
                pass
        self._buf = bytearray()
        self.seq = 0
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0
        self._last_sync = 0.0
        self._dirty = False
        self._wal_fd = -1

    # ------------------------------------------------------------ loading

    def cluster_id(self, new: int) -> int:
        """The directory's cluster id, or `new` recorded as it if it has none."""
        cid = read_meta(os.path.join(self.path, "meta"))
        if cid is None:
            _atomic_write(self.path, "meta", *_checked("meta", msgpack.packb({"cluster_id": new})))
            return new
        return cid

    def load(self) -> tuple[dict | None, list[Record]]:
        """(snapshot or None, the WAL records after it); opens the WAL for appending.

        Drops a torn tail (logged); raises WalCorrupt, changing nothing, if any file is
        damaged or of another format (module docstring). O(size of the files)."""
        snap = read_snapshot(os.path.join(self.path, "snap"))
        snap_seq = snap["seq"] if snap is not None else 0
        data = _read(self.wal_path)
        if data is None:
            others = [n for n in ("snap", "meta") if os.path.exists(os.path.join(self.path, n))]
            if others:
                raise WalCorrupt(f"WAL {self.wal_path} is missing but {' and '.join(others)} "
                                 f"{'exist' if len(others) > 1 else 'exists'}: the writes it "
                                 f"held are lost; `shmwatch repair "
                                 f"--data-dir {self.path}` starts a new WAL", self.wal_path)
            _atomic_write(self.path, "wal", FILE_HEADER.pack(_MAGIC, _KINDS["wal"][0],
                                                             FORMAT_VERSION))
            scan = WalScan([], FILE_HEADER.size, None)
        else:
            scan = scan_wal(data, self.wal_path, snap_seq)
            d = scan.damage
            if d is not None and not d.torn:
                raise WalCorrupt(
                    f"WAL {self.wal_path} is corrupt at offset {d.offset}: {d.reason}; the "
                    f"{d.size} bytes from there to its end may hold acknowledged writes. "
                    f"Refusing to start; nothing was changed. `shmwatch repair --data-dir "
                    f"{self.path}` shows what a repair would drop", self.wal_path, d.offset)
            if d is not None:
                log.warning("WAL %s: torn tail of %d bytes at offset %d dropped (%s: the "
                            "broker died mid-write; those writes were never acknowledged)",
                            self.wal_path, d.size, d.offset, d.reason)
                fd = os.open(self.wal_path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, scan.end)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self._wal_fd = _open_private(self.wal_path, os.O_WRONLY | os.O_APPEND)
        records = [r for r in scan.records if r.seq > snap_seq]
        self.seq = max(snap_seq, scan.records[-1].seq if scan.records else 0)
        self.records_since_snapshot = len(records)
        self.bytes_since_snapshot = scan.end - FILE_HEADER.size
        return snap, records

    # ------------------------------------------------------------ writing

    def append(self, kind: int, body) -> None:
        """Buffer one record; it reaches the file at `commit()`. O(len)."""
        self.seq += 1
        frame = encode_frame(msgpack.packb([self.seq, kind, body], use_bin_type=True))
        self._buf += frame
        self.records_since_snapshot += 1
        self.bytes_since_snapshot += len(frame)

    def commit(self, now: float) -> None:
        """Write the batch's records (one write), fsync per the mode."""
        if self._buf:
            view = memoryview(self._buf)
            while view:
                n = os.write(self._wal_fd, view)
                view = view[n:]
            del view
            self._buf.clear()
            self._dirty = True
        if self._dirty and (self.fsync == "always" or
                            (self.fsync == "batch" and now - self._last_sync >= BATCH_FSYNC_S)):
            os.fdatasync(self._wal_fd)
            self._dirty = False
            self._last_sync = now

    def snapshot(self, state: dict) -> None:
        """Persist `state` (plus the sequence it covers) and empty the WAL. A crash
        between the two leaves WAL records the snapshot covers: loading skips them."""
        self.commit(time.monotonic())
        if self._dirty:
            os.fdatasync(self._wal_fd)
            self._dirty = False
        state = dict(state, seq=self.seq)
        _atomic_write(self.path, "snap", *_checked("snap", msgpack.packb(state, use_bin_type=True)))
        os.ftruncate(self._wal_fd, FILE_HEADER.size)
        os.fsync(self._wal_fd)
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0

    def close(self) -> None:
        if self._wal_fd >= 0:
            self.commit(time.monotonic())
            if self._dirty:
                os.fdatasync(self._wal_fd)
            os.close(self._wal_fd)
            self._wal_fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


# ------------------------------------------------------------------ shmwatch repair
