"""Fork safety: a Client inherited through fork() attaches again in the child; nothing the
child does reaches the parent's rings; an inherited Watch refuses to be used.

Each test fails on a client that is not fork-safe: inherited clients used to write into
the parent's request ring (repeated revisions, lost writes, replies to the wrong caller),
and a child kept the parent's slot lock alive."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import clientlib
from broker.admin import broker_info
from tests.mp_workers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORK = mp.get_context("fork")


def clients_of(name: str) -> int:
    return broker_info(name)["clients"]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_module_level_client_in_a_pool(broker_proc, method):
    """The issue's reproduction at scale: a module-level client used by Pool(4), 10,000
    puts and gets. Every put is applied exactly once at a revision of its own, every
    reply belongs to its request, and the parent's client keeps working."""
    n = 10_000
    base = clients_of(broker_proc.name)
    env = dict(os.environ, SHMWATCH_NAME=broker_proc.name,
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "tests.fork_app", method, str(n)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    results, parent = doc["results"], doc["parent"]
    assert len(results) == n
    revisions = [r[2] for r in results]
    # Every put applied once, at its own revision, with no gap: exactly the revisions
    # between the parent's two writes.
    assert sorted(revisions) == list(range(doc["before"] + 1, doc["before"] + 1 + n))
    assert doc["after"] == doc["before"] + n + 1
    pids = set()
    for i, pid, rev, value, mod_rev, get_rev in results:
        assert pid != parent
        pids.add(pid)
        # The reply belongs to its request: the get saw this task's own put.
        assert value == f"{i}:{pid}" and mod_rev == rev and get_rev >= rev
        assert doc["stored"][f"fork/{i:05d}"] == [f"{i}:{pid}", rev]
    assert len(doc["stored"]) == n + 1
    assert len(pids) >= 2, "the pool should have spread the work"
    # The workers' clients went with their processes; the program's own one closed.
    wait_for(lambda: clients_of(broker_proc.name) == base, 10, "worker clients reclaimed")


def _child_uses_inherited_watch(c: clientlib.Client, w: clientlib.Watch, conn) -> None:
    out = {}
    for name, call in (("get", lambda: w.get(1)), ("get_nowait", w.get_nowait),
                       ("next", lambda: next(iter(w))), ("cancel", w.cancel)):
        try:
            call()
            out[name] = "no error"
        except clientlib.InheritedWatchError as exc:
            out[name] = "InheritedWatchError" if "before fork" in str(exc) else str(exc)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            out[name] = repr(exc)
    out["put"] = c.put("inh/k", "from-child").revision
    out["kv"] = c.get("inh/k").kvs[0].value.decode()
    with w:  # leaving the inherited watch's block must not cancel the parent's watch
        pass
    conn.send(out)
    conn.close()


@pytest.mark.timeout(60)
def test_inherited_watch_raises_and_the_parents_keeps_working(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        w = c.watch("inh/", prefix=True)
        assert w.get(5).created
        c.put("inh/k", "from-parent")
        assert w.get(5).events[0].kv.value == b"from-parent"
        parent_end, child_end = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_child_uses_inherited_watch, args=(c, w, child_end))
        p.start()
        try:
            out = parent_end.recv() if parent_end.poll(30) else {}
        finally:
            p.join(10)
            if p.is_alive():
                p.kill()
        assert {k: out.get(k) for k in ("get", "get_nowait", "next", "cancel")} == dict.fromkeys(
            ("get", "get_nowait", "next", "cancel"), "InheritedWatchError"), out
        assert out["kv"] == "from-child"
        # The child's write reaches the parent's watch, which was not cancelled.
        r = w.get(5)
        assert [e.kv.value for e in r.events] == [b"from-child"] and r.revision == out["put"]
        assert c.put("inh/k", "parent-again").revision == out["put"] + 1
        assert w.get(5).events[0].kv.value == b"parent-again"


def _child_puts(c: clientlib.Client, conn) -> None:
    try:
        conn.send(("ok", c.put("lock/child", "x").revision, c.get("lock/child").count))
    except Exception as exc:  # noqa: BLE001 - reported to the test
        conn.send(("error", repr(exc), 0))
    conn.close()


@pytest.mark.timeout(60)
def test_lock_held_by_another_parent_thread_at_fork_does_not_deadlock_the_child(broker_proc):
    """A parent thread inside a call (holding the client's locks) while another thread
    forks: the child's copy of those locks would stay held forever."""
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        holding, release = threading.Event(), threading.Event()

        def hold():
            with c._send_lock, c._cond:
                holding.set()
                release.wait(30)

        t = threading.Thread(target=hold, daemon=True)
        t.start()
        assert holding.wait(10)
        parent_end, child_end = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_child_puts, args=(c, child_end))
        p.start()
        try:
            got = parent_end.recv() if parent_end.poll(20) else ("timeout", 0, 0)
        finally:
            release.set()
            t.join(10)
            p.join(10)
            if p.is_alive():
                p.kill()
        assert got[0] == "ok" and got[2] == 1, got
        assert c.get("lock/child").kvs[0].mod_revision == got[1]


def _middle(name: str, conn) -> None:
    """Connect, fork a grandchild that keeps the inherited client unused, then die
    without closing (as a crashed worker would)."""
    c = clientlib.connect(name, timeout=10)
    c.put("mid/alive", "1")
    q = os.fork()
    if q == 0:  # the grandchild: holds its inherited copy, never uses it
        time.sleep(60)
        os._exit(0)
    conn.send(q)
    conn.close()
    os._exit(0)


@pytest.mark.timeout(60)
def test_a_dead_parent_is_seen_dead_while_its_forked_child_lives(broker_proc):
    base = clients_of(broker_proc.name)
    parent_end, child_end = FORK.Pipe(duplex=False)
    p = FORK.Process(target=_middle, args=(broker_proc.name, child_end))
    p.start()
    grandchild = parent_end.recv() if parent_end.poll(20) else None
    p.join(10)
    try:
        assert grandchild is not None
        os.kill(grandchild, 0)  # alive, holding the inherited client
        wait_for(lambda: clients_of(broker_proc.name) == base, 10,
                 "the dead parent's slot to be reclaimed while its child lives")
    finally:
        if grandchild:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _child_closes(c: clientlib.Client, conn) -> None:
    c.close()  # drops the child's copy only: sends nothing on the parent's rings
    conn.send("closed")
    conn.close()


@pytest.mark.timeout(60)
def test_closing_an_inherited_client_in_the_child_leaves_the_parents_alone(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        w = c.watch("close/", prefix=True)
        assert w.get(5).created
        parent_end, child_end = FORK.Pipe(duplex=False)
        p = FORK.Process(target=_child_closes, args=(c, child_end))
        p.start()
        assert parent_end.poll(20) and parent_end.recv() == "closed"
        p.join(10)
        assert p.exitcode == 0
        rev = c.put("close/k", "v").revision
        assert w.get(5).events[0].kv.mod_revision == rev
