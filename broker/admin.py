"""Finding brokers on this machine and removing what dead ones left in /dev/shm.

A broker is alive exactly when its kernel-held lock on its control segment is held
(see shm/lock.py); anything named after a broker whose lock is free is stale.
"""

from __future__ import annotations

import os
import time

import psutil

from shm import layout as L
from shm.errors import SegmentNotFound, ShmError
from shm.lock import is_locked
from shm.segment import Segment

SHM_DIR = "/dev/shm"


def _entries() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []


def broker_names() -> list[str]:
    """Names of every broker with a control segment in /dev/shm, alive or not."""
    out = []
    for e in _entries():
        if e.startswith("shmwatch.") and e.endswith(".ctl"):
            out.append(e[len("shmwatch."):-len(".ctl")])
    return sorted(out)


STARTING_GRACE_S = 10.0  # a control segment this young without its lock may be starting


def _young(name: str) -> bool:
    try:
        st = os.stat(os.path.join(SHM_DIR, f"shmwatch.{name}.ctl"))
    except FileNotFoundError:
        return False
    return time.time() - st.st_ctime < STARTING_GRACE_S


def _process_lives(pid: int, create_time_us: int) -> bool:
    try:
        p = psutil.Process(pid)
        return abs(p.create_time() * 1e6 - create_time_us) < 1e6
    except psutil.Error:
        return False


def broker_info(name: str) -> dict:
    """pid, state, revision and client count of broker `name`, read from its control
    segment without talking to it.

    `state`: "alive" (holds its lock), "starting" (created its control segment but has
    not taken its lock yet: its process lives, or the segment is seconds old), "stale"
    (dead: its leftovers may be removed), "broken" (an old unreadable segment) or
    "absent"."""
    try:
        seg = Segment.open(f"/shmwatch.{name}.ctl", kind=L.KIND_CTL)
    except SegmentNotFound:
        return {"name": name, "pid": 0, "state": "absent", "revision": 0, "clients": 0}
    except ShmError as exc:
        return {"name": name, "pid": 0, "state": "starting" if _young(name) else "broken",
                "revision": 0, "clients": 0, "error": str(exc)}
    try:
        w = seg.payload.cast("Q")
        alive = is_locked(seg.fd, L.BROKER_LOCK_BYTE)
        state = "alive"
        if not alive:
            pid = w[L.CTL_PID]
            starting = (_process_lives(pid, w[L.CTL_CREATE_TIME_US]) if pid
                        else _young(name))
            state = "starting" if starting else "stale"
        clients = sum(1 for s in range(w[L.CTL_MAX_CLIENTS])
                      if w[L.slot_word(s, L.SLOT_STATE)] == L.SLOT_READY)
        info = {"name": name, "pid": w[L.CTL_PID], "state": state,
                "revision": w[L.CTL_REVISION], "compact_revision": w[L.CTL_COMPACT_REV],
                "clients": clients, "heartbeat_ns": w[L.CTL_HEARTBEAT_NS],
                "cluster_id": w[L.CTL_CLUSTER_ID]}
        del w
        return info
    finally:
        seg.close()


def read_stats(name: str, retries: int = 100) -> dict:
    """The broker's latest published metrics (a consistent snapshot: the sequence word is
    read before and after copying, and the copy retried if the broker was writing).

    Raises ShmError if the broker has no stats segment, TimeoutError if it never settles."""
    import msgpack

    seg = Segment.open(f"/shmwatch.{name}.stats", kind=L.KIND_STATS)
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
    return [e for e in _entries() if e.startswith(prefix) or e.startswith("sem." + prefix)]


def cleanup_stale(name: str | None = None) -> list[str]:
    """Remove every object of dead brokers (or of broker `name`, if it is dead).

    A live or starting broker's objects are never touched: only objects older than the
    moment the broker was found dead are removed (a new broker of the same name may be
    creating its own meanwhile), and with no control segment at all, only objects older
    than the start-up grace period. Returns the removed /dev/shm entries."""
    names = [name] if name else sorted({e.split(".")[1] for e in _entries()
                                        if e.startswith("shmwatch.")}
                                       | {e.split(".")[2] for e in _entries()
                                          if e.startswith("sem.shmwatch.")})
    removed = []
    for n in names:
        checked = time.time()
        state = broker_info(n)["state"]
        if state in ("alive", "starting"):
            continue
        cutoff = checked - STARTING_GRACE_S if state == "absent" else checked
        for e in _objects_of(n):
            path = os.path.join(SHM_DIR, e)
            try:
                if os.stat(path).st_ctime > cutoff:
                    continue  # created after the check: not the dead broker's
                os.unlink(path)
                removed.append(e)
            except FileNotFoundError:
                pass
    return removed
