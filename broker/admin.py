"""Finding brokers on this machine and removing what dead ones left in /dev/shm.

A broker is alive exactly when the kernel-held lock on byte 0 of its control segment is
held (see shm/lock.py). A broker takes that lock before its control segment gets its
name (`Segment.publish`), so a published control segment whose lock is free belongs to
a dead broker, and stays dead: nothing ever locks it again. Liveness is therefore
decided by the lock alone, before anything in the segment is parsed: a damaged or
foreign header, a zombie process, a reused pid change nothing. Anything named after a
broker whose lock is free is stale.

This module never removes an object of another user, nor one of a name whose lock is
held.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import struct
import time

from shm import layout as L
from shm.errors import LayoutMismatch, ShmError
from shm.lock import is_locked, try_lock
from shm.segment import HEADER_SIZE, Segment, check_header, shm_name, shm_path

SHM_DIR = "/dev/shm"

# Objects of a name without any control segment may belong to a broker that publishes
# its control segment a moment later: only objects older than this are removed then.
STARTING_GRACE_S = 10.0


def _entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def _ctl_entry(name: str) -> str:
    return f"shmwatch.{name}.{L.CTL_PART}"


def broker_names() -> list[str]:
    """Names of every broker with a control segment in /dev/shm, alive or not."""
    out = []
    for e in _entries():
        if e.startswith("shmwatch.") and e.endswith("." + L.CTL_PART) and e.count(".") == 2:
            out.append(e[len("shmwatch."):-len("." + L.CTL_PART)])
    return sorted(out)


def owner(uid: int) -> str:
    """`user (uid N)`, or `uid N` for a uid without a user name."""
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _open_regular(path: str, flags: int) -> int:
    """A descriptor of `path`, which must be a regular file: never through a symlink,
    and never blocking (anyone can put a FIFO in /dev/shm). OSError otherwise."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", path)
    return fd


def _open_ctl(name: str, flags: int) -> int:
    """A descriptor of broker `name`'s control segment file."""
    return _open_regular(shm_path(shm_name(name, L.CTL_PART)), flags)


def _ctl_words(fd: int, name: str) -> tuple[int, ...]:
    """The control segment's header words, read through `fd` without mapping it.
    Raises LayoutMismatch if its header is not this version's control header."""
    total = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER_SIZE + L.CTL_SLOTS_OFFSET, 0)
    check_header(raw, shm_name(name, L.CTL_PART), total, kind=L.KIND_CTL)
    if len(raw) < HEADER_SIZE + L.CTL_SLOTS_OFFSET:
        raise LayoutMismatch(f"control segment of {name!r} is too short ({total} bytes)")
    return struct.unpack_from(f"={L.CTL_WORDS}Q", raw, HEADER_SIZE)


def _ready_clients(fd: int, words: tuple[int, ...]) -> int:
    size = os.fstat(fd).st_size - HEADER_SIZE - L.CTL_SLOTS_OFFSET
    # A damaged max_clients word must not send us past the end of the file.
    n = max(0, min(words[L.CTL_MAX_CLIENTS], size // (L.SLOT_WORDS * 8)))
    raw = os.pread(fd, n * L.SLOT_WORDS * 8, HEADER_SIZE + L.CTL_SLOTS_OFFSET)
    states = struct.unpack_from(f"={len(raw) // 8}Q", raw)
    return sum(1 for s in range(n) if states[s * L.SLOT_WORDS + L.SLOT_STATE] == L.SLOT_READY)


def broker_info(name: str) -> dict:
    """pid, state, revision and client count of broker `name`, read from its control
    segment without talking to it.

    `state`: "alive" (its lock is held: whatever its header says), "stale" (its lock is
    free: the broker is dead and its leftovers may be removed), "absent", or "unknown"
    (the control segment cannot be opened: another user's). `owner` names the user the
    control segment belongs to; `error` says why its header could not be read, if so."""
    info = {"name": name, "pid": 0, "state": "absent", "revision": 0, "compact_revision": 0,
            "clients": 0, "heartbeat_ns": 0}
    try:
        fd = _open_ctl(name, os.O_RDONLY)
    except FileNotFoundError:
        return info
    except OSError as exc:  # another user's (EACCES), a symlink (ELOOP), a FIFO...
        try:
            info["owner"] = owner(os.lstat(shm_path(shm_name(name, L.CTL_PART))).st_uid)
        except OSError:
            pass
        info.update(state="unknown", error=f"cannot open its control segment: {exc.strerror}")
        return info
    try:
        info["owner"] = owner(os.fstat(fd).st_uid)
        # The lock first: nothing read from the segment may make a live broker look dead.
        info["state"] = "alive" if is_locked(fd, L.BROKER_LOCK_BYTE) else "stale"
        try:
            w = _ctl_words(fd, name)
        except LayoutMismatch as exc:
            info["error"] = f"unreadable control header: {exc}"
            return info
        info.update(pid=w[L.CTL_PID], revision=w[L.CTL_REVISION],
                    compact_revision=w[L.CTL_COMPACT_REV], heartbeat_ns=w[L.CTL_HEARTBEAT_NS],
                    clients=_ready_clients(fd, w), cluster_id=w[L.CTL_CLUSTER_ID])
        return info
    finally:
        os.close(fd)


def read_stats(name: str, retries: int = 100) -> dict:
    """The broker's latest published metrics (a consistent snapshot: the sequence word is
    read before and after copying, and the copy retried if the broker was writing).

    Raises ShmError if the broker has no stats segment, TimeoutError if it never settles."""
    import msgpack

    try:
        fd = _open_ctl(name, os.O_RDONLY)
    except OSError as exc:
        raise ShmError(f"cannot open the control segment of broker {name!r}: "
                       f"{exc.strerror}") from None
    try:
        token = _ctl_words(fd, name)[L.CTL_STATS_TOKEN]
    finally:
        os.close(fd)
    if not token:
        raise ShmError(f"broker {name!r} has no stats segment yet")
    seg = Segment.open(shm_name(name, L.stats_part(token)), kind=L.KIND_STATS)
    try:
        words = seg.payload[:16].cast("Q")
        try:
            for _ in range(retries):
                seq = words[0]
                if seq & 1 or seq == 0:
                    time.sleep(0.002)
                    continue
                n = words[1]
                if n > len(seg.payload) - 16:
                    raise ShmError("stats segment holds an impossible length")
                data = bytes(seg.payload[16:16 + n])
                if words[0] == seq:
                    return msgpack.unpackb(data, raw=False)
            raise TimeoutError(f"broker {name!r} did not publish a settled snapshot")
        finally:
            words.release()
    finally:
        seg.close()


def list_brokers() -> list[dict]:
    return [broker_info(n) for n in broker_names()]


def _objects_of(name: str) -> list[str]:
    prefix = f"shmwatch.{name}."
    return sorted(e for e in _entries() if e.startswith(prefix) or e.startswith("sem." + prefix))


def _is_temp_ctl(entry: str, name: str) -> bool:
    return entry.startswith(f"shmwatch.{name}.{L.CTL_TEMP_PREFIX}")


def _held(entry: str) -> bool:
    """Whether a (temporary) control segment's broker lock is held: a starting broker."""
    try:
        fd = _open_regular(os.path.join(SHM_DIR, entry), os.O_RDONLY)
    except OSError:
        return False
    try:
        return is_locked(fd, L.BROKER_LOCK_BYTE)
    finally:
        os.close(fd)


def _remove(entry: str, name: str, cutoff: float | None) -> bool:
    """Unlink one entry unless it is another user's, a starting broker's control
    segment, or (with `cutoff`) changed after `cutoff`. True if removed."""
    path = os.path.join(SHM_DIR, entry)
    try:
        st = os.lstat(path)
        if st.st_uid != os.geteuid():
            return False
        if cutoff is not None and st.st_ctime > cutoff:
            return False  # created after the check: not the dead broker's
        if _is_temp_ctl(entry, name) and _held(entry):
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _cleanup_name(name: str) -> list[str]:
    try:
        fd = _open_ctl(name, os.O_RDWR)
    except FileNotFoundError:
        # No control segment: a broker that is about to publish one may own these, so
        # only what is older than the grace period goes.
        cutoff = time.time() - STARTING_GRACE_S
        return [e for e in _objects_of(name) if _remove(e, name, cutoff)]
    except OSError:
        return []  # another user's, or not a file: not ours to judge
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or is_locked(fd, L.BROKER_LOCK_BYTE):
            return []
        # Dead. Only one cleaner works on it at a time, and only while the name still
        # means this file: then no broker can publish a new control segment under the
        # name (link fails while this one exists), so every other object of the name is
        # the dead broker's, or a starting broker's temporary control segment (locked).
        if not try_lock(fd, L.REAPER_LOCK_BYTE):
            return []
        try:
            now = os.lstat(shm_path(shm_name(name, L.CTL_PART)))
        except FileNotFoundError:
            return []
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return []
        ctl = _ctl_entry(name)
        removed = [e for e in _objects_of(name) if e != ctl and _remove(e, name, None)]
        if _remove(ctl, name, None):  # last: it guards the name until the rest is gone
            removed.append(ctl)
        return removed
    finally:
        os.close(fd)


def cleanup_stale(name: str | None = None) -> list[str]:
    """Remove every object of dead brokers (or of broker `name`, if it is dead).

    A broker whose lock is held is never touched, whatever its control segment holds;
    neither is anything of another user. Objects of a name without a control segment go
    only when older than STARTING_GRACE_S. Returns the removed /dev/shm entries."""
    names = [name] if name else sorted({e.split(".")[1] for e in _entries()
                                        if e.startswith("shmwatch.")}
                                       | {e.split(".")[2] for e in _entries()
                                          if e.startswith("sem.shmwatch.")})
    removed = []
    for n in names:
        try:
            shm_name(n, L.CTL_PART)
        except ValueError:
            continue  # not a broker name this code could have made
        removed += _cleanup_name(n)
    return removed
