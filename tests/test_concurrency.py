"""clientlib.concurrency (etcd's Session, Mutex and Election) through a real broker, with
real processes for contention and SIGKILLs, and the key layout compared with what
etcdctl's own `lock` and `elect` make on a real etcd.

Waits are generous deadlines, never timing assertions (the hand-over latency is a
figure tools/stress reports)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import broker
import clientlib
from clientlib.concurrency import Election, Lock, Session
from shmwatch.tools.stress.lock import LockRun
from tests import fault_workers as fw
from tests.etcd_support import etcd_server  # noqa: F401  (a fixture)

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def keys(c, prefix: str) -> list[bytes]:
    return [kv.key for kv in c.get(prefix, prefix=True).kvs]


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; its result or error lands in the dict."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kw)
        except BaseException as exc:  # noqa: BLE001 (handed to the test)
            out["error"] = exc
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def spawn_holder(name: str, script: str, *args: str) -> tuple[subprocess.Popen, str]:
    """A process that runs `script` (it prints one line once it holds), and that line."""
    p = subprocess.Popen([sys.executable, "-c", script, name, *args], stdout=subprocess.PIPE,
                         text=True, cwd=ROOT)
    line = p.stdout.readline().strip()
    assert line, "the holder process printed nothing"
    return p, line


def kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait(10)


HOLDER = """
import sys, time, clientlib
from clientlib.concurrency import Lock
c = clientlib.connect(sys.argv[1], timeout=5)
lock = Lock(c, sys.argv[2])
lock.acquire(timeout=10)
print(lock.key.decode(), flush=True)
time.sleep(120)
"""

LEADER = """
import sys, time, clientlib
from clientlib.concurrency import Election
c = clientlib.connect(sys.argv[1], timeout=5)
e = Election(c, sys.argv[2])
e.campaign(sys.argv[3], timeout=10)
print(e.key.decode(), flush=True)
time.sleep(120)
"""


# ------------------------------------------------------------------ Lock


def test_lock_key_is_etcds_and_trylock_leaves_nothing(client):
    s = Session(client)
    lock = Lock(client, "jobs/lock", session=s)
    rev = lock.acquire()
    assert lock.key == f"jobs/lock/{s.lease_id:x}".encode()
    kv = client.get(lock.key).kvs[0]
    assert (kv.value, kv.lease, kv.create_revision) == (b"", s.lease_id, rev)
    assert lock.is_owner() and lock.locked
    other = Lock(client.__class__(client.name), "jobs/lock")
    with pytest.raises(clientlib.LockedError, match="^mutex: Locked by another session$"):
        other.acquire(blocking=False)
    assert keys(client, "jobs/lock/") == [lock.key]  # TryLock removed its key
    assert other.session is None  # and revoked the session it had granted
    other.client.close()
    assert lock.release() > rev
    assert not lock.is_owner() and keys(client, "jobs/lock/") == []
    with pytest.raises(clientlib.LockReleasedError, match="^mutex: lock has already been released$"):
        lock.release()
    s.close()


def test_timeout_removes_the_waiters_key(broker_proc):
    with clientlib.connect(broker_proc.name) as a, clientlib.connect(broker_proc.name) as b:
        held = Lock(a, "L")
        held.acquire()
        waiter = Lock(b, "L")
        with pytest.raises(clientlib.RecipeTimeout) as info:
            waiter.acquire(timeout=0.3)
        assert isinstance(info.value, clientlib.Timeout)
        assert keys(a, "L/") == [held.key] and not waiter.locked
        assert a.leases().leases == [held.session.lease_id]  # the waiter's session went too
        held.release()
        assert waiter.acquire(timeout=5) and waiter.is_owner()
        waiter.release()


def test_a_waiter_whose_predecessor_gives_up_waits_for_the_one_before(broker_proc):
    name = broker_proc.name
    with clientlib.connect(name) as a, clientlib.connect(name) as b, \
            clientlib.connect(name) as c:
        holder, quitter, last = Lock(a, "chain"), Lock(b, "chain"), Lock(c, "chain")
        holder.acquire()
        tq, outq = in_thread(quitter.acquire, timeout=0.5)
        fw.wait_for(lambda: len(keys(a, "chain/")) == 2, 10, "the quitter queued")
        tl, outl = in_thread(last.acquire, timeout=30)
        tq.join(10)
        assert isinstance(outq.get("error"), clientlib.RecipeTimeout)
        time.sleep(0.3)  # the last waiter now watches the holder: it must not acquire
        assert tl.is_alive() and keys(a, "chain/") == sorted([holder.key, last.key])
        holder.release()
        tl.join(10)
        assert "error" not in outl and last.is_owner()
        last.release()


def test_waiters_watch_only_their_predecessor(broker_proc):
    name = broker_proc.name
    clients = [clientlib.connect(name, timeout=5) for _ in range(4)]
    try:
        locks = [Lock(c, "q") for c in clients]
        locks[0].acquire()
        waiting = []
        for lk in locks[1:]:  # queued in order: each one's key created after the last
            waiting.append(in_thread(lk.acquire, timeout=30))
            fw.wait_for(lambda lk=lk: lk.key is not None and lk.create_revision > 0, 10,
                        "the waiter's key")
        queue = [lk.key for lk in locks]
        st = fw.stats_where(name, lambda s: s["watchers"]["total"] >= 3, 10, "3 waiter watches")
        watched = sorted((w["pid"], w["key"], w["range_end"]) for w in st["top_watchers"])
        assert [(k, end) for _, k, end in watched] == sorted(
            (k.decode(), None) for k in queue[:-1]), "one watch per waiter, on its predecessor"
        assert st["watchers"]["total"] == 3
        for i, (t, out) in enumerate(waiting):  # releasing hands over in queue order
            locks[i].release()
            t.join(10)
            assert "error" not in out and locks[i + 1].is_owner()
            assert all(not lk.is_owner() for lk in locks[i + 2:])
        locks[-1].release()
    finally:
        for c in clients:
            c.close()


def test_mutual_exclusion_between_processes(broker_proc):
    a = argparse.Namespace(name=broker_proc.name, seed=7, lockers=3, duration=1.5,
                           chaos=False, min_acquisitions=10)
    run = LockRun(a)
    try:
        run.start()
        run.drive()
        s = run.finish()
    finally:
        run.close()
    assert s["passed"], s["problems"]
    assert s["acquisitions"] >= 10 and s["killed_holding"] == 0


def test_sigkill_of_the_holder_hands_the_lock_over(broker_proc):
    with clientlib.connect(broker_proc.name) as c:
        p, held_key = spawn_holder(broker_proc.name, HOLDER, "job")
        try:
            waiter = Lock(c, "job")
            t, out = in_thread(waiter.acquire, timeout=30)
            fw.wait_for(lambda: len(keys(c, "job/")) == 2, 10, "the waiter queued")
            kill(p)
            t.join(30)
            assert "error" not in out, out
            assert waiter.is_owner() and keys(c, "job/") == [waiter.key]
            assert held_key.encode() != waiter.key
            waiter.release()
        finally:
            kill(p)


def test_a_lost_session_is_a_lost_lock(client):
    s = Session(client)
    lock = Lock(client, "lost", session=s)
    lock.acquire()
    s.close()  # the lease is revoked: our key is deleted
    assert s.done and not lock.is_owner()
    with pytest.raises(clientlib.LockLostError, match="^mutex: session is expired"):
        lock.release()
    with pytest.raises(clientlib.SessionExpiredError, match="^mutex: session is expired$"):
        Lock(client, "lost", session=s).acquire()
    with pytest.raises(clientlib.LockLostError):
        with Lock(client, "lost") as lk:
            client.lease_revoke(lk.session.lease_id)


def test_ttl_sessions_are_kept_alive_leases():
    with broker.spawn(min_lease_ttl=1) as b, clientlib.connect(b.name) as c:
        with Session(c, ttl=2) as s:
            assert s.lease.bound and c.lease_time_to_live(s.lease_id).granted_ttl == 2
            with Lock(c, "t", session=s) as lk:
                time.sleep(2.5)  # past the TTL: the keep-alive renewed it
                assert lk.is_owner()
        with Session(c, bound=False) as s:
            assert not s.lease.bound and c.lease_time_to_live(s.lease_id).granted_ttl == 60
        with Lock(c, "t", ttl=3) as lk:
            assert c.lease_time_to_live(lk.session.lease_id).granted_ttl == 3
        assert c.leases().leases == []


# ------------------------------------------------------------------ Election


def test_election_verbs_and_etcds_texts(broker_proc):
    with clientlib.connect(broker_proc.name) as a, clientlib.connect(broker_proc.name) as b:
        ea, eb = Election(a, "svc"), Election(b, "svc")
        with pytest.raises(clientlib.ElectionNoLeaderError, match="^election: no leader$"):
            ea.leader()
        with pytest.raises(clientlib.ElectionNotLeaderError, match="^election: not leader$"):
            ea.proclaim("x")
        ea.campaign("one")
        kv = eb.leader().kvs[0]
        assert (kv.key, kv.value, kv.lease) == (ea.key, b"one", ea.session.lease_id)
        assert kv.key == f"svc/{ea.session.lease_id:x}".encode() and ea.is_leader()
        ea.proclaim("two")
        assert eb.leader().kvs[0].value == b"two"
        with pytest.raises(clientlib.RecipeTimeout):
            eb.campaign("b", timeout=0.3)
        assert keys(a, "svc/") == [ea.key]  # the timed-out candidacy was withdrawn
        t, out = in_thread(eb.campaign, "b", timeout=30)
        fw.wait_for(lambda: len(keys(a, "svc/")) == 2, 10, "b queued")
        assert ea.resign() > 0 and ea.resign() == 0
        t.join(30)
        assert "error" not in out and eb.leader().kvs[0].value == b"b"
        with pytest.raises(clientlib.ElectionNotLeaderError):
            ea.proclaim("late")
        eb.resign()
        assert keys(a, "svc/") == [] and a.leases().leases == []


def test_observe_sees_every_leader_and_value_in_order(broker_proc):
    with clientlib.connect(broker_proc.name) as a, clientlib.connect(broker_proc.name) as b:
        obs = Election(b, "o").observe(timeout=10)
        seen: list[bytes] = []
        t, out = in_thread(lambda: [seen.append(next(obs).kvs[0].value) for _ in range(5)])
        fw.stats_where(broker_proc.name, lambda st: st["watchers"]["total"] >= 1, 10,
                       "the observer waiting for a first leader (its watch)")
        e1, e2 = Election(a, "o"), Election(a.__class__(a.name), "o")
        e1.campaign("l1")
        e1.proclaim("l1b")
        t2, out2 = in_thread(e2.campaign, "l2", timeout=30)
        fw.wait_for(lambda: len(keys(a, "o/")) == 2, 10, "l2 queued")
        e1.proclaim("l1c")
        e1.resign()
        t2.join(30)
        # Observe reports the leader's value when it looks: proclaimed before it looks
        # at the new leader, "l2" would be skipped (etcd's too), so wait for it.
        fw.wait_for(lambda: b"l2" in seen, 10, "the observer saw l2")
        e2.proclaim("l2b")
        t.join(30)
        obs.close()
        assert "error" not in out and "error" not in out2, (out, out2)
        assert seen == [b"l1", b"l1b", b"l1c", b"l2", b"l2b"]
        e2.resign()
        e2.client.close()


def test_sigkill_of_the_leader_fails_over(broker_proc):
    with clientlib.connect(broker_proc.name) as c:
        p, leader_key = spawn_holder(broker_proc.name, LEADER, "ha", "first")
        try:
            obs = Election(c, "ha").observe(timeout=30)
            assert next(obs).kvs[0].key == leader_key.encode()
            e = Election(c, "ha")
            t, out = in_thread(e.campaign, "second", timeout=30)
            fw.wait_for(lambda: len(keys(c, "ha/")) == 2, 10, "the candidate queued")
            kill(p)
            t.join(30)
            assert "error" not in out, out
            assert next(obs).kvs[0].value == b"second" and e.is_leader()
            obs.close()
            e.resign()
        finally:
            kill(p)


# ------------------------------------------------------------------ etcd's own layout


def etcdctl(server, *args: str) -> subprocess.Popen:
    return subprocess.Popen(["etcdctl", "--endpoints", server.url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "ETCDCTL_API": "3"})


def held_by_etcdctl(server, args: list[str]) -> tuple[subprocess.Popen, bytes]:
    """etcdctl lock/elect left running: the key it printed once it held."""
    p = etcdctl(server, *args)
    return p, p.stdout.readline().rstrip(b"\n")


@pytest.mark.parametrize("recipe", ["lock", "elect"])
def test_layout_equals_etcdctls_for_the_same_lease(etcd_server, client, recipe):  # noqa: F811
    if subprocess.run(["which", "etcdctl"], capture_output=True).returncode:
        pytest.skip("etcdctl not installed")
    args = ["lock", "mylock"] if recipe == "lock" else ["elect", "myelection", "proposal-1"]
    p, printed = held_by_etcdctl(etcd_server, args)
    try:
        ec = etcd_server.client()
        theirs = ec.get(args[1] + "/", prefix=True).kvs
        assert len(theirs) == 1 and theirs[0].key == printed
        kv = theirs[0]
        s = Session(client, lease_id=kv.lease)  # our session with etcdctl's lease id
        if recipe == "lock":
            lk = Lock(client, "mylock", session=s)
            lk.acquire()
        else:
            el = Election(client, "myelection", session=s)
            el.campaign("proposal-1")
        ours = client.get(args[1] + "/", prefix=True).kvs
        assert [(x.key, x.value, x.lease) for x in ours] == [(kv.key, kv.value, kv.lease)]
        assert kv.value == (b"" if recipe == "lock" else b"proposal-1")
        s.close()
        ec.close()
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
