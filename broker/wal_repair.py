"""`shmwatch repair --data-dir DIR`: the explicit way out of a damaged data directory.

A dry run says what is damaged, where, and what a repair would drop; `apply=True` keeps
the damaged file aside byte for byte, cuts the WAL back to its last good frame (or
starts a fresh meta), and says exactly what was dropped. It never runs beside a live
broker (it takes the directory's lock). The formats and their checks are broker/wal.py's.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

from .wal import (
    _KINDS,
    _MAGIC,
    FILE_HEADER,
    FORMAT_VERSION,
    KIND_KV,
    DataDirBusy,
    WalCorrupt,
    _atomic_write,
    _fsync_dir,
    _intact_after,
    _lock,
    _read,
    read_meta,
    read_snapshot,
    scan_wal,
)

def repair(path: str, apply: bool = False) -> tuple[int, list[str]]:
    """`shmwatch repair --data-dir DIR [--yes]`: check every file of DIR and say what is
    damaged, where, and what a repair drops; with `apply`, do it: a damaged WAL is cut
    back to its last good frame (a missing one started empty), a damaged meta moved
    aside (the broker then records a new cluster id, so old clients connect anew), the
    originals kept as NAME.corrupt-<time>. A damaged snapshot, or a WAL of an unknown
    format, cannot be repaired. Holds DIR's lock throughout, so never runs beside a live
    broker. Returns (exit status: 0 nothing to repair or repaired, 1 otherwise; the
    report's lines). O(size of the files)."""
    if not os.path.isdir(path):
        return 1, [f"{path}: no such data directory"]
    try:
        lock_fd = _lock(path)
    except DataDirBusy as exc:
        return 1, [f"{exc}: stop it first; nothing was changed"]
    try:
        return _repair_locked(path, apply)
    finally:
        os.close(lock_fd)


class _Finding(NamedTuple):
    lines: list[str]  # what `repair` reports about one file
    fix: bytes | None  # what a repair writes in its place (b"": remove it), None: nothing
    broken: bool  # damaged beyond repair


def _repair_locked(path: str, apply: bool) -> tuple[int, list[str]]:
    meta = _inspect_meta(os.path.join(path, "meta"))
    snap_path = os.path.join(path, "snap")
    try:
        snap = read_snapshot(snap_path)
    except WalCorrupt as exc:
        snap_finding = _Finding([f"  snap: DAMAGED: {exc}",
                                 "    cannot be repaired: the store it holds exists nowhere "
                                 "else; restore the directory from a backup, or move it aside "
                                 "to start an empty store",
                                 "  wal: not checked (it continues the snapshot)"], None, True)
        findings = {"meta": meta, "snap": snap_finding}
    else:
        lines = [f"  snap: ok, record {snap['seq']}, revision {snap['mvcc']['rev']}"
                 if snap is not None else "  snap: none"]
        findings = {"meta": meta, "snap": _Finding(lines, None, False),
                    "wal": _inspect_wal(path, snap)}
    out = [f"data directory {path}"] + [ln for f in findings.values() for ln in f.lines]
    if any(f.broken for f in findings.values()):
        out.append("cannot repair this directory; nothing was changed")
        return 1, out
    fixes = [(name, f.fix) for name, f in findings.items() if f.fix is not None]
    if not fixes:
        out.append("nothing to repair")
        return 0, out
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if not apply:
        out.append(f"dry run: nothing was changed; with --yes the above is done, the damaged "
                   f"files kept as NAME.corrupt-{stamp}")
        return 1, out
    for name, content in fixes:
        target = os.path.join(path, name)
        if os.path.exists(target):
            out.append(f"kept the original {name} as {_keep_aside(path, name, stamp)}")
        if content:
            _atomic_write(path, name, content)
            out.append(f"wrote {target}: {len(content)} bytes")
        else:
            os.unlink(target)
            out.append(f"removed {target}")
    _fsync_dir(path)
    out.append("repaired")
    return 0, out


def _inspect_meta(meta_path: str) -> _Finding:
    try:
        cid = read_meta(meta_path)
    except WalCorrupt as exc:
        return _Finding([f"  meta: DAMAGED: {exc}",
                         "    repair: move it aside; the broker records a new cluster id, so "
                         "clients of the old broker connect anew (reconnect() refuses)"],
                        b"", False)
    return _Finding([f"  meta: ok, cluster id {cid}" if cid is not None else "  meta: none"],
                    None, False)


def _inspect_wal(path: str, snap: dict | None) -> _Finding:
    """What a repair does to the WAL after `snap`: cut it back to its last good frame
    (each KV record kept is one revision past the snapshot's)."""
    wal_path = os.path.join(path, "wal")
    snap_seq, rev = (snap["seq"], snap["mvcc"]["rev"]) if snap is not None else (0, 1)
    data = _read(wal_path)
    if data is None:
        if snap is None and not os.path.exists(os.path.join(path, "meta")):
            return _Finding(["  wal: none"], None, False)
        return _Finding(["  wal: MISSING: the writes after the snapshot are lost",
                         f"    repair: start an empty WAL; the store will be at revision {rev}"],
                        FILE_HEADER.pack(_MAGIC, _KINDS["wal"][0], FORMAT_VERSION), False)
    try:
        scan = scan_wal(data, wal_path, snap_seq)
    except WalCorrupt as exc:
        return _Finding([f"  wal: DAMAGED: {exc}",
                         "    cannot be repaired: its frames cannot be found without its header"],
                        None, True)
    kept = [r for r in scan.records if r.seq > snap_seq]
    rev += sum(1 for r in kept if r.kind == KIND_KV)
    d = scan.damage
    if d is None:
        return _Finding([f"  wal: ok, {len(kept)} records, the store is at revision {rev}"],
                        None, False)
    lost = _intact_after(data, d.offset)
    what = "a torn tail (never acknowledged; the broker drops it itself)" if d.torn else "DAMAGED"
    return _Finding([
        f"  wal: {what} at offset {d.offset} of {len(data)}: {d.reason}",
        f"    keeps {len(kept)} records, up to offset {d.offset}: the store will be at "
        f"revision {rev}",
        f"    drops {d.size} bytes from offset {d.offset}: the damaged frame"
        + (f" and {len(lost)} intact records after it (sequence {min(lost)}-{max(lost)}), "
           "lost with it" if lost else " and what follows it, in which no intact record "
                                       "was found")], data[:scan.end], False)


def _keep_aside(path: str, name: str, stamp: str) -> str:
    """Hard-link DIR/name as name.corrupt-<stamp> (a unique name): the original bytes
    stay, and DIR/name can be replaced atomically afterwards."""
    for i in range(1000):
        dest = os.path.join(path, f"{name}.corrupt-{stamp}" + (f".{i}" if i else ""))
        try:
            os.link(os.path.join(path, name), dest)
            return dest
        except FileExistsError:
            continue
    raise FileExistsError(f"{path}: too many {name}.corrupt-{stamp}.* files")
