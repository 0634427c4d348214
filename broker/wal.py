"""Durability for `--data-dir`: a write-ahead log of applied writes, plus snapshots.

Owns the files of one data directory and nothing else: it never decides what a write
means (the broker replays records through the MVCC core, which is deterministic, so the
same records give the same revisions, versions and events).

Files in DIR:
  lock       flock'ed by the broker that owns the directory (one broker per directory)
  meta       msgpack {"cluster_id": int}: kept across restarts, so clients can tell a
             restarted broker with its data from a new, empty store
  snap       msgpack {"seq", "mvcc", "log"}: the last snapshot (written to snap.tmp,
             fsync'ed, renamed: never half-written)
  wal        records after the snapshot: u32 length | u32 crc32 | msgpack [seq, kind, body]

A torn tail (a record cut short or failing its CRC: the broker died mid-write) is
detected at load, reported, and truncated away; records before it are kept. Group
commit: records of one batch of requests go out in one write(); `fsync="always"` syncs
before the batch's replies are published, `"batch"` at most every 10 ms, `"never"`
leaves it to the kernel. Any of them survives a SIGKILL of the broker (the data is in
the page cache once write() returned); only "always" also survives a machine crash.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib

import msgpack

log = logging.getLogger("shmwatch.wal")

KIND_KV = 0  # body: the op in the wire's txn-op encoding
KIND_COMPACT = 1  # body: the revision
FSYNC_MODES = ("always", "batch", "never")
BATCH_FSYNC_S = 0.01
_HDR = struct.Struct("<II")
MAX_RECORD = 256 << 20


class WalCorrupt(RuntimeError):
    """The WAL is damaged before its end: records after the damage would be lost."""


class DataDirBusy(RuntimeError):
    """Another live broker owns this data directory."""


class DataDir:
    def __init__(self, path: str, fsync: str = "always"):
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {FSYNC_MODES}, not {fsync!r}")
        self.path = path
        self.fsync = fsync
        os.makedirs(path, mode=0o700, exist_ok=True)
        self._lock_fd = os.open(os.path.join(path, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise DataDirBusy(f"data directory {path!r} is in use by another broker") from None
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
        p = os.path.join(self.path, "meta")
        try:
            with open(p, "rb") as f:
                return int(msgpack.unpackb(f.read())["cluster_id"])
        except FileNotFoundError:
            self._atomic_write("meta", msgpack.packb({"cluster_id": new}))
            return new

    def load(self) -> tuple[dict | None, list[tuple[int, object]]]:
        """(snapshot or None, [(kind, body)] of the WAL records after it).

        Truncates a torn tail. O(size of the files)."""
        snap = None
        try:
            with open(os.path.join(self.path, "snap"), "rb") as f:
                snap = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
            self.seq = snap["seq"]
        except FileNotFoundError:
            pass
        records = []
        wal_path = os.path.join(self.path, "wal")
        try:
            with open(wal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos < len(data):
            if pos + 8 > len(data):
                break
            n, crc = _HDR.unpack_from(data, pos)
            if n > MAX_RECORD or pos + 8 + n > len(data):
                break
            body = data[pos + 8:pos + 8 + n]
            if zlib.crc32(body) != crc:
                if pos + 8 + n < len(data):
                    # Not a torn tail: acknowledged writes follow the damage. etcd
                    # refuses to start on a corrupt WAL; so do we, rather than drop them.
                    raise WalCorrupt(
                        f"WAL {wal_path} is corrupt at offset {pos} with {len(data) - pos - 8 - n}"
                        f" bytes of records after it; refusing to start (move the data "
                        f"directory aside to start empty)")
                break
            seq, kind, payload = msgpack.unpackb(body, raw=False)
            pos += 8 + n
            if seq <= self.seq:
                continue  # already in the snapshot (crash between snapshot and truncate)
            self.seq = seq
            records.append((kind, payload))
        if pos < len(data):
            log.warning("WAL %s: torn tail of %d bytes at offset %d dropped (the broker "
                        "died mid-write; those writes were never acknowledged)",
                        wal_path, len(data) - pos, pos)
            with open(wal_path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        self._wal_fd = os.open(wal_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.records_since_snapshot = len(records)
        self.bytes_since_snapshot = pos
        return snap, records

    # ------------------------------------------------------------ writing

    def append(self, kind: int, body) -> None:
        """Buffer one record; it reaches the file at `commit()`. O(len)."""
        self.seq += 1
        rec = msgpack.packb([self.seq, kind, body], use_bin_type=True)
        self._buf += _HDR.pack(len(rec), zlib.crc32(rec))
        self._buf += rec
        self.records_since_snapshot += 1
        self.bytes_since_snapshot += len(rec) + 8

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
        """Persist `state` (plus the sequence it covers) and start an empty WAL."""
        self.commit(time.monotonic())
        if self._dirty:
            os.fdatasync(self._wal_fd)
            self._dirty = False
        state = dict(state, seq=self.seq)
        self._atomic_write("snap", msgpack.packb(state, use_bin_type=True))
        os.ftruncate(self._wal_fd, 0)
        os.fsync(self._wal_fd)
        self.records_since_snapshot = 0
        self.bytes_since_snapshot = 0

    def _atomic_write(self, name: str, data: bytes) -> None:
        tmp = os.path.join(self.path, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(self.path, name))
        dfd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
