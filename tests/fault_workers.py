"""Child-process bodies for the failure-model tests (tests/test_faults.py,
tests/test_durability.py, tests/test_permissions.py), run under multiprocessing's
"spawn" start method, so they live at module level in an importable module.

They never use multiprocessing locks or events: a child is SIGKILLed at an arbitrary
moment, and a lock it held then would hang the test. They report through files written
atomically (`report`) and through lock-free shared counters (`RawValue`), and bound
every wait by WORKER_DEADLINE_S so that an orphan never outlives the test run by long.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

from tests.mp_workers import load, reap, report, wait_for  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import clientlib

WORKER_DEADLINE_S = 90.0


def _client_info(c) -> dict:
    return {"pid": os.getpid(), "part": c._part, "slot": c._slot}


# ------------------------------------------------------------------ values a writer writes

def value_size(n: int) -> int:
    """Size of the n-th value of `put_loop`: mostly small, every 5th one large enough to
    be streamed through a 64 KiB request ring in several chunks and publishes."""
    return (16, 200, 3000, 20000, 150000)[n % 5]


def writer_value(n: int) -> bytes:
    return f"{n}:".encode() + bytes([97 + n % 26]) * value_size(n)


def writer_key(tag: str, n: int) -> str:
    return f"kw/{tag}/{n % 7}"


def parse_writer_value(value: bytes) -> int:
    """n if `value` is exactly `writer_value(n)` for some n, else ValueError."""
    head, sep, _ = value.partition(b":")
    if not sep or not head.isdigit():
        raise ValueError(f"not a writer value: {value[:40]!r}")
    n = int(head)
    if value != writer_value(n):
        raise ValueError(f"value of n={n} is damaged: {value[:40]!r}... ({len(value)} bytes)")
    return n


# ------------------------------------------------------------------ children

def put_loop(name: str, tag: str, info_path: str, done) -> None:
    """Puts `writer_value(n)` at `writer_key(tag, n)` for n = 0, 1, ... until killed;
    `done.value` is the number of acknowledged puts."""
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + WORKER_DEADLINE_S
    with clientlib.connect(name, timeout=20) as c:
        report(info_path, _client_info(c))
        n = 0
        while time.monotonic() < deadline:
            c.put(writer_key(tag, n), writer_value(n))
            n += 1
            done.value = n


def watch_reader(name: str, info_path: str, n_watches: int, seen) -> None:
    """`n_watches` watches on the prefix kw/, read round-robin until killed;
    `seen.value` counts events received."""
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + WORKER_DEADLINE_S
    with clientlib.connect(name, timeout=20) as c:
        watches = [c.watch("kw/", prefix=True) for _ in range(n_watches)]
        for w in watches:
            assert w.get(20).created
        report(info_path, _client_info(c))
        while time.monotonic() < deadline:
            for w in watches:
                r = w.get_nowait()
                if r is not None:
                    seen.value += len(r.events)
            time.sleep(0.0005)


def stalled_watcher(name: str, info_path: str) -> None:
    """One watch on the prefix kw/ that is never read after `created`: its ring fills and
    the broker makes it a victim. Waits to be killed."""
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    c = clientlib.connect(name, timeout=20)
    w = c.watch("kw/", prefix=True)
    assert w.get(20).created
    report(info_path, _client_info(c))
    deadline = time.monotonic() + WORKER_DEADLINE_S
    while time.monotonic() < deadline:
        time.sleep(0.05)


def acked_writer(name: str, tag: str, ack_path: str, done) -> None:
    """Puts d/<tag><n % 13> = <tag><n> until the broker goes away. After each
    acknowledged put, appends "rev key value" to `ack_path` and flushes (a line in the
    file means the broker acknowledged that write). Ends with "END <error class>" once
    the broker is gone; `done.value` counts acknowledged puts."""
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + WORKER_DEADLINE_S
    with open(ack_path, "w", buffering=1) as out, clientlib.connect(name, timeout=10) as c:
        n = 0
        try:
            while time.monotonic() < deadline:
                key, value = f"d/{tag}{n % 13}", f"{tag}{n}"
                rev = c.put(key, value).revision
                out.write(f"{rev} {key} {value}\n")
                out.flush()
                n += 1
                done.value = n
        except clientlib.ShmwatchError as exc:
            out.write(f"END {type(exc).__name__}\n")
            out.flush()


def attach_as(name: str, uid: int, gid: int, groups: list, conn) -> None:
    """Drop to uid/gid (and supplementary `groups`), then try to attach to broker `name`
    and put one key. Sends ("ok", revision) or (error class name, message) on `conn`."""
    import clientlib  # before dropping root: the packages may not be readable after

    os.setgroups(groups)
    os.setgid(gid)
    os.setuid(uid)
    try:
        with clientlib.connect(name, timeout=5) as c:
            rev = c.put(f"perm/{uid}.{gid}", "x").revision
            got = c.get(f"perm/{uid}.{gid}").kvs
            conn.send(("ok", rev, [kv.value for kv in got]))
    except BaseException as exc:  # noqa: BLE001 - report anything: the test decides
        conn.send((type(exc).__name__, str(exc), [c.__name__ for c in type(exc).__mro__]))
    finally:
        conn.close()


# ------------------------------------------------------------------ helpers for the tests

SHM_DIR = "/dev/shm"


def read_until(w: clientlib.Watch, final_rev: int, out: list | None = None,
               timeout: float = 30.0) -> list[tuple]:
    """Append to `out` (mod_revision, type, key, value) of every event `w` delivers until
    `out` reaches `final_rev`; return `out`."""
    out = [] if out is None else out
    last = out[-1][0] if out else 0
    while last < final_rev:
        r = w.get(timeout=timeout)
        assert not r.canceled, f"watch canceled: {r}"
        for e in r.events:
            assert e.kv.mod_revision >= last, "events out of order"
            last = e.kv.mod_revision
            out.append((last, e.type, e.kv.key, e.kv.value))
    return out


def drain(w: clientlib.Watch, into: list) -> None:
    """Move whatever `w` has ready into `into`, without waiting."""
    while True:
        r = w.get_nowait()
        if r is None:
            return
        into.extend((e.kv.mod_revision, e.type, e.kv.key, e.kv.value) for e in r.events)


def history(c: clientlib.Client, prefix: str, final_rev: int) -> list[tuple]:
    """Every event under `prefix` from revision 1 to `final_rev` (a fresh watch)."""
    with c.watch(prefix, prefix=True, start_revision=1) as w:
        assert w.get(20).created
        return read_until(w, final_rev)


def shm_entries(name: str) -> list[str]:
    """Every /dev/shm entry of broker `name` (segments and semaphores)."""
    seg, sem = f"shmwatch.{name}.", f"sem.shmwatch.{name}."
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith((seg, sem)))


def client_entries(name: str, part: str) -> list[str]:
    """The /dev/shm entries of one client (`part` = c<slot>g<gen>): its rings, arenas
    and doorbell semaphore."""
    base = f"shmwatch.{name}.{part}"
    return [e for e in shm_entries(name)
            if e in (base, "sem." + base + ".bell") or e.startswith(base + ".")]


def stats(name: str) -> dict | None:
    """The broker's latest published metrics, or None if none are readable yet."""
    from broker.admin import read_stats
    from shm.errors import ShmError

    try:
        return read_stats(name)
    except (ShmError, TimeoutError):
        return None


def stats_where(name: str, pred, timeout: float, what: str) -> dict:
    """Poll the published metrics until `pred(metrics)` holds; return them."""
    def check():
        s = stats(name)
        return s if s is not None and pred(s) else None
    return wait_for(check, timeout, what, interval=0.05)


def client_pids(s: dict) -> set[int]:
    return {c["pid"] for c in s["clients"]}


def spawn_cli(name: str, *args: str, timeout: float = 15.0):
    """`python -m broker --name NAME *args` as `broker.spawn` runs it (ready pipe, dies
    with this process), but with the options given verbatim as command-line strings.
    Returns a `broker.BrokerProcess`."""
    import subprocess
    import sys

    from broker import BrokerProcess
    from broker.admin import cleanup_stale

    r, w = os.pipe()
    cmd = [sys.executable, "-m", "broker", "--name", name, *args,
           "--ready-fd", str(w), "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(cmd, pass_fds=(w,))
    os.close(w)
    try:
        with os.fdopen(r, "rb") as pipe:
            os.set_blocking(pipe.fileno(), False)
            buf = b""
            deadline = time.monotonic() + timeout
            while b"ready" not in buf:
                if proc.poll() is not None:
                    raise RuntimeError(f"broker {name!r} exited with {proc.returncode} at start")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broker {name!r} did not start in {timeout}s")
                buf += pipe.read() or b""
                time.sleep(0.005)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        cleanup_stale(name)
        raise
    return BrokerProcess(name, proc)


def global_cleanup_scenario() -> None:
    """Run in a private /dev/shm (a mount namespace of its own: see test_faults), so
    that `shmwatch cleanup` without --name can only see our brokers: one killed (with a
    client's segments left behind), one live with a client and a watch. Prints a JSON
    report on stdout."""
    import json
    import subprocess
    import sys

    import broker
    import clientlib

    dead, live = broker.spawn(), broker.spawn()
    try:
        c = clientlib.connect(dead.name, timeout=10)
        assert c.watch("x").get(10).created
        dead.kill()
        c.close()
        with clientlib.connect(live.name, timeout=10) as lc:
            assert lc.watch("x").get(10).created
            before = {"dead": shm_entries(dead.name), "live": shm_entries(live.name)}
            r = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", "cleanup"],
                               check=False, capture_output=True, text=True, timeout=60)
            after = {"dead": shm_entries(dead.name), "live": shm_entries(live.name)}
            rev = lc.put("x", "1").revision
        out = {"dead": dead.name, "live": live.name, "before": before, "after": after,
               "rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr, "rev": rev,
               "all": sorted(os.listdir(SHM_DIR))}
    finally:
        live.stop()
        dead.stop()
    out["end"] = sorted(os.listdir(SHM_DIR))
    print(json.dumps(out))
