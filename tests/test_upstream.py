"""A mirroring broker against a real 3-member etcd cluster (README, "Beyond one host"):
two brokers (two names standing in for two hosts), writers on both and etcdctl writing
directly; every local watcher's stream equals a direct etcd watch's, revision by
revision. Plus reads (serializable / linearizable), history before the mirror, leases."""

from __future__ import annotations

import time

import pytest

import broker
import clientlib
from shmwatch.wire import errors as E
from tests.upstream_support import (
    assert_acked_in,
    assert_same_stream,
    collect,
    direct_events,
    etcdctl,
    gateway,
    needs_upstream,
)

pytestmark = needs_upstream


def test_two_mirrors_equal_a_direct_watch(etcd_cluster):
    eps = etcd_cluster.endpoints
    etcdctl(eps[0], "put", "/m/before", "x")
    with broker.spawn(upstream=eps) as a, broker.spawn(upstream=eps[::-1]) as b, \
            clientlib.connect(a.name) as ca, clientlib.connect(b.name) as cb:
        start = ca.get("/m/before").revision + 1
        assert cb.get("/m/before").kvs[0].value == b"x"  # the initial load
        wa = ca.watch("/m/", prefix=True, prev_kv=True, start_revision=start)
        wb = cb.watch("/m/", prefix=True, prev_kv=True, start_revision=start)
        acked = []
        for i in range(12):
            r = ca.put(f"/m/a{i % 3}", f"a{i}")
            acked.append((f"/m/a{i % 3}".encode(), f"a{i}".encode(), r.revision))
            # read-your-writes on the writer's broker
            assert ca.get(f"/m/a{i % 3}").kvs[0].mod_revision == r.revision
            r = cb.put(f"/m/b{i % 2}", f"b{i}", prev_kv=True)
            acked.append((f"/m/b{i % 2}".encode(), f"b{i}".encode(), r.revision))
            if i % 4 == 0:
                etcdctl(eps[i % 3], "put", f"/m/e{i}", "direct")
            if i % 5 == 4:
                ca.delete("/m/a", prefix=True)
                cb.txn(success=[clientlib.op_put("/m/t1", "1"), clientlib.op_put("/m/t2", "2")])
        etcdctl(eps[1], "del", "--prefix", "/m/e")
        end = cb.put("/m/end", "1").revision
        local_a, local_b = collect(wa, end), collect(wb, end)
        direct = direct_events(eps[2], "/m/", start, end)
        n = assert_same_stream(local_a, direct)
        assert assert_same_stream(local_b, direct) == n
        assert n == 33  # 24 puts, 3 etcdctl puts, 2 deletes, 2 txns, 1 etcdctl del, the end
        assert assert_acked_in(acked, local_a) == 24
        # the mirror's state is etcd's
        with gateway(eps[0]) as g:
            want = g.get("/m/", prefix=True)
        assert ca.get("/m/", prefix=True).kvs == want.kvs
        assert cb.get("/m/", prefix=True).kvs == want.kvs


def test_history_before_the_mirror_is_etcds(etcd_cluster):
    """The mirror replays etcd's retained history at start: a watch from an old
    revision gets exactly etcd's events, and below etcd's compaction etcd's cancel."""
    eps = etcd_cluster.endpoints
    with gateway(eps[0]) as g:
        first = g.put("/old/a", "1").revision
        g.put("/old/b", "2")
        g.delete("/old/a")
        mid = g.put("/old/c", "3").revision
        g.compact(mid - 1)
        last = g.put("/old/a", "4").revision
    with broker.spawn(upstream=eps) as b, clientlib.connect(b.name) as c:
        w = c.watch("/old/", prefix=True, prev_kv=True, start_revision=mid - 1)
        local = collect(w, last)
        # (etcd keeps no event of its compaction revision here: the tombstone went with it)
        assert assert_same_stream(local, direct_events(eps[1], "/old/", mid - 1, last)) == 2
        old = c.watch("/old/", prefix=True, start_revision=first)
        got = old.get(timeout=5)
        got = got if got.canceled else old.get(timeout=5)
        assert got.canceled and got.compact_revision == mid - 1  # etcd's compaction
        assert c.get("/old/b", revision=mid - 1).kvs[0].value == b"2"


def test_a_compaction_made_at_etcd_directly_is_followed(etcd_cluster):
    """etcdctl compacts etcd while a broker mirrors it: within the probe period the
    mirror compacts the same revision, so an old read or watch fails as etcd's does."""
    eps = etcd_cluster.endpoints
    with broker.spawn(upstream=eps) as b, clientlib.connect(b.name) as c:
        revs = [c.put("/dc/k", str(i)).revision for i in range(4)]
        assert c.get("/dc/k", revision=revs[0]).kvs[0].value == b"0"
        etcdctl(eps[1], "compact", str(revs[2]), "--physical")
        deadline = time.monotonic() + 10
        while True:
            try:
                c.get("/dc/k", revision=revs[1])
            except E.CompactedError:
                break
            assert time.monotonic() < deadline, "the mirror kept history etcd compacted"
            time.sleep(0.1)
        w = c.watch("/dc/", prefix=True, start_revision=revs[1])
        got = w.get(timeout=5)
        got = got if got.canceled else w.get(timeout=5)
        assert got.canceled and got.compact_revision == revs[2]
        assert c.get("/dc/k", revision=revs[2]).kvs[0].value == b"2"


def test_reads_and_history_before_the_mirror(etcd_cluster):
    eps = etcd_cluster.endpoints
    etcdctl(eps[0], "put", "/h/k", "v1")
    etcdctl(eps[0], "put", "/h/k", "v2")
    with broker.spawn(upstream=eps) as b, clientlib.connect(b.name) as c:
        now = c.get("/h/k")
        assert now.kvs[0].value == b"v2"
        # a read below the mirror's start is etcd's
        old = c.get("/h/k", revision=now.revision - 1)
        assert old.kvs[0].value == b"v1"
        # linearizable (etcd's default): a direct write is seen by the next read
        etcdctl(eps[1], "put", "/h/k", "v3")
        assert c.get("/h/k").kvs[0].value == b"v3"
        # compaction is etcd's: forwarded, and older reads then fail as etcd's do
        rev = c.put("/h/k", "v4").revision
        c.compact(rev)
        with pytest.raises(E.CompactedError):
            c.get("/h/k", revision=rev - 1)
        with gateway(eps[2]) as g, pytest.raises(E.CompactedError):
            g.get("/h/k", revision=rev - 1)


def test_serializable_reads_serve_the_mirror(etcd_cluster):
    eps = etcd_cluster.endpoints
    with broker.spawn(upstream=eps, consistency="s") as b, clientlib.connect(b.name) as c:
        r = c.put("/s/k", "1")
        got = c.get("/s/k")
        assert got.kvs[0].mod_revision == r.revision  # own writes are there at once
        assert got.revision >= r.revision


def test_bound_lease_is_revoked_upstream_when_its_process_dies(etcd_cluster):
    eps = etcd_cluster.endpoints
    with broker.spawn(upstream=eps) as b:
        c = clientlib.connect(b.name)
        lease = c.lease_grant(2, bound=True)
        c.put("/l/k", "v", lease=lease.id)
        with gateway(eps[1]) as g:
            assert g.lease_time_to_live(lease.id).ttl > 0
            time.sleep(3)  # longer than its TTL: the broker keeps it alive upstream
            assert g.get("/l/k").kvs, "a bound lease expired while its process lived"
            c.close()  # the process's connection ends: revoked upstream at once
            deadline = time.monotonic() + 5
            while g.get("/l/k").kvs and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not g.get("/l/k").kvs
            assert g.lease_time_to_live(lease.id).ttl == -1


def test_status_shows_the_upstream(etcd_cluster):
    import json
    import subprocess
    import sys

    eps = etcd_cluster.endpoints
    with broker.spawn(upstream=eps) as b, clientlib.connect(b.name) as c:
        rev = c.put("/st/k", "v").revision
        deadline = time.monotonic() + 5
        while True:  # stats are published ~5 times a second
            out = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", "status", "--name",
                                  b.name, "-w", "json"], capture_output=True, text=True, timeout=30)
            up = json.loads(out.stdout)[0]["Status"].get("upstream") or {}
            if up.get("mirror_revision", 0) >= rev or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert up["endpoints"] == eps
        assert up["connected"] == eps[0]
        assert up["mirror_revision"] >= rev and up["lag"] == 0
        simple = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", "status", "--name",
                                 b.name], capture_output=True, text=True, timeout=30).stdout
        assert f"upstream: {','.join(eps)}, connected {eps[0]}" in simple


def test_stress_verifies_a_mirroring_broker(etcd_cluster):
    """tools/stress's standard verification through a broker mirroring the cluster
    (small watch rings: etcd's write rate here is ~100/s, and the stalled watchers must
    still become victims and meet a compaction)."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "shmwatch.tools.stress", "--upstream",
         ",".join(etcd_cluster.endpoints), "--duration", "6", "--watch-ring-bytes", "4k",
         "--quiet"], capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "PASSED" in out.stdout and "exercised: victims" in out.stdout


def test_bench_upstream_smoke():
    """`shmwatch bench upstream` end to end at a tiny size (its own etcd): every event
    delivered on both paths, and the report's rows."""
    import subprocess
    import sys

    from tests.etcd_support import SKIP_REASON, etcd_binary

    if etcd_binary() is None:
        pytest.skip(SKIP_REASON)
    out = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", "bench", "upstream",
                          "--watchers", "2", "--rate", "20", "--seconds", "1"],
                         capture_output=True, text=True, timeout=110)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| 2 ")]
    assert len(rows) == 2 and all("| 100.0% |" in ln for ln in rows), out.stdout
    assert "through the mirroring broker" in out.stdout


def test_upstream_without_the_extra_is_a_clear_start_error(monkeypatch):
    """Without the extra `etcd`, --upstream refuses the start with what to install, and
    leaves nothing in /dev/shm."""
    import os
    import sys

    from broker.config import BrokerConfig
    from broker.errors import BrokerStartError
    from broker.server import Broker, unique_name

    for mod in ("broker.mirror", "broker.upstream", "broker.upstream_calls", "pyetcd"):
        monkeypatch.delitem(sys.modules, mod, raising=False)
    monkeypatch.setitem(sys.modules, "pyetcd", None)  # import pyetcd -> ImportError
    name = unique_name()
    with pytest.raises(BrokerStartError, match=r"shmwatch\[etcd\]"):
        Broker(BrokerConfig(name=name, upstream="http://127.0.0.1:1", log_bytes=1 << 20))
    assert not [e for e in os.listdir("/dev/shm") if f".{name}." in e]


def test_lock_and_election_work_across_hosts_and_with_etcdctl(etcd_cluster):
    """The recipes through mirroring brokers are etcd's own (issue: "the lock and election
    recipes therefore work across hosts"): a Lock held through broker A excludes a Lock
    through broker B (another "host") and `etcdctl lock` on etcd directly, which gets
    the lock once A releases; an Election won through A is the leader that B and
    `etcdctl elect -l` see. The session is a bound lease, kept alive upstream."""
    import os
    import subprocess

    from clientlib.concurrency import Election, Lock
    from tests.upstream_support import ETCDCTL

    if ETCDCTL is None:
        pytest.skip("etcd-client not installed (apt-get install etcd-client)")
    eps = etcd_cluster.endpoints
    env = dict(os.environ, ETCDCTL_API="3")
    with broker.spawn(upstream=eps) as a, broker.spawn(upstream=eps) as b, \
            clientlib.connect(a.name, timeout=10) as ca, clientlib.connect(b.name, timeout=10) as cb:
        la = Lock(ca, "/locks/job")
        la.acquire(timeout=15)
        assert la.key.startswith(b"/locks/job/")
        assert etcdctl(eps[2], "get", la.key.decode(), "--print-value-only") == "\n"  # etcd has it
        with pytest.raises(clientlib.LockedError):
            Lock(cb, "/locks/job").acquire(blocking=False)  # the other host sees it held
        waiter = subprocess.Popen([ETCDCTL, "--endpoints", eps[1], "lock", "/locks/job", "echo",
                                   "etcdctl-holds-it"], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)
            assert waiter.poll() is None, "etcdctl got the lock while broker A's client held it"
            la.release()
            out, err = waiter.communicate(timeout=20)
        finally:
            if waiter.poll() is None:
                waiter.kill()
        assert waiter.returncode == 0 and "etcdctl-holds-it" in out, err
        lb = Lock(cb, "/locks/job")
        lb.acquire(timeout=15)  # etcdctl's key is gone: host B gets it
        lb.release()

        e = Election(ca, "/elect/x")
        e.campaign("host-a", timeout=15)
        assert Election(cb, "/elect/x").leader(timeout=10).kvs[0].value == b"host-a"
        observer = subprocess.Popen([ETCDCTL, "--endpoints", eps[0], "elect", "-l", "/elect/x"],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
        import threading

        guard = threading.Timer(20, observer.kill)  # a read that never comes cannot hang
        guard.start()
        try:
            lines = [observer.stdout.readline().rstrip("\n") for _ in range(2)]
        finally:
            guard.cancel()
            observer.kill()
            observer.communicate(timeout=10)
        assert lines == [e.key.decode(), "host-a"]
        e.resign()
