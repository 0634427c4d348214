"""Child-process bodies and helpers for the hostile-neighbour tests (another user creating
names in /dev/shm, a full /dev/shm): module-level so "spawn" children can import them.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

SHM_DIR = "/dev/shm"


def squat_as(uid: int, gid: int, entries: list[str], conn) -> None:
    """Drop to uid/gid, then create each /dev/shm entry (an empty file, mode 0644, as
    a squatter would). Sends the list of entries created on `conn`."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    made = []
    try:
        for e in entries:
            fd = os.open(os.path.join(SHM_DIR, e), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
            made.append(e)
    finally:
        conn.send(made)
        conn.close()


def squat(entries: list[str], uid: int, gid: int) -> list[str]:
    """Create `entries` in /dev/shm as uid/gid from a spawned child; returns them."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    p = ctx.Process(target=squat_as, args=(uid, gid, entries, child), daemon=True)
    p.start()
    child.close()
    try:
        assert parent.poll(60), "the squatting child reported nothing"
        made = parent.recv()
    finally:
        p.join(30)
        parent.close()
    assert made == entries, f"could only create {made} of {entries}"
    return made


def unsquat(entries: list[str]) -> None:
    for e in entries:
        try:
            os.unlink(os.path.join(SHM_DIR, e))
        except FileNotFoundError:
            pass


@contextmanager
def broker_in_thread(**options):
    """A `broker.server.Broker` serving from a thread of this process, so that a test can
    patch what the broker calls (os.posix_fallocate, new_token). Yields the Broker."""
    import broker
    from broker import server

    b = server.Broker(server.BrokerConfig(name=broker.unique_name(), **options))
    t = threading.Thread(target=b.serve_forever, daemon=True)
    t.start()
    try:
        yield b
    finally:
        b.stop()
        t.join(10)
        b.close()


def full_shm_scenario() -> None:
    """Run in a private 48 MiB /dev/shm (its own mount namespace: see test_registration),
    so that the space really runs out: a client whose rings do not fit, and a watch
    whose arena does not fit. Prints a JSON report on stdout."""
    import json

    import broker
    import clientlib

    out: dict = {}
    with broker.spawn(log_bytes=1 << 20, request_ring_bytes=32 << 20,
                      response_ring_bytes=32 << 20) as b:
        try:
            clientlib.connect(b.name, timeout=30)
            out["register"] = ["ok"]
        except clientlib.ShmwatchError as exc:
            out["register"] = [type(exc).__name__, str(exc)]
        out["left_after_register"] = sorted(e for e in os.listdir(SHM_DIR) if b.name in e)
    with broker.spawn(log_bytes=1 << 20, watch_ring_bytes=1 << 20, rings_per_arena=64) as b:
        with clientlib.connect(b.name, timeout=30) as c:
            try:
                c.watch("k", timeout=30)
                out["arena"] = ["ok"]
            except clientlib.ShmwatchError as exc:
                out["arena"] = [type(exc).__name__, str(exc)]
            out["put_after"] = c.put("k", "v").revision
    out["end"] = sorted(os.listdir(SHM_DIR))
    print(json.dumps(out))
