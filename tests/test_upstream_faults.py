"""A mirroring broker's failure model, each fault against a real 3-member etcd cluster,
with the acknowledged writes counted and checked after it (README, "Beyond one host"):

- a member killed (the leader, a follower): the mirror fails over and resumes its
  upstream watch at the last applied revision + 1; a local watch equals etcd's own;
- the whole cluster down: local writes fail with UpstreamUnavailable after their
  timeout (never acknowledged), the local watch stays open and goes on when it is back;
- etcd compacted past the mirror while it was away: the watch that needed the lost
  history gets etcd's compaction cancel, the mirror reloads and equals etcd again;
- etcd faster than the broker takes its revisions: the upstream queue stays bounded and
  nothing is lost once the broker reads again.
"""

from __future__ import annotations

import threading
import time

import pytest

import broker
import clientlib
from shmwatch.wire import errors as E
from tests.upstream_support import (
    Writer,
    assert_acked_in,
    assert_same_stream,
    collect,
    direct_events,
    etcdctl,
    gateway,
    needs_upstream,
)

pytestmark = needs_upstream
TIMEOUT = 2.0  # --upstream-timeout of the brokers here


def _fault_with_writer(cluster, victim_of, name: str) -> None:
    """Writers through a mirroring broker while `victim_of(cluster)` is killed; then the
    local watch equals etcd's and every acknowledged write is in it."""
    victim = victim_of(cluster)
    # the broker's watch starts on the victim: its failure is the mirror's to survive
    eps = [victim.url] + [m.url for m in cluster.members if m is not victim]
    with broker.spawn(upstream=eps, upstream_timeout=TIMEOUT) as b, \
            clientlib.connect(b.name) as c:
        start = c.put(f"/{name}/start", "1").revision
        w = c.watch(f"/{name}/", prefix=True, prev_kv=True, start_revision=start)
        writer = Writer(b.name, f"/{name}/")
        writer.start()
        time.sleep(0.5)
        cluster.kill(victim)
        time.sleep(1.5)
        etcdctl(eps[1], "put", f"/{name}/direct", "during")
        time.sleep(0.5)
        writer.stop()
        end = c.put(f"/{name}/end", "1").revision
        local = collect(w, end)
        direct = direct_events(eps[1], f"/{name}/", start, end)
        n = assert_same_stream(local, direct)
        acked = assert_acked_in(writer.acked, local)
        assert acked > 20, f"only {acked} writes acknowledged"
        assert n >= acked
        print(f"{name}: {acked} acknowledged writes, {n} revisions equal etcd's, "
              f"{len(writer.errors)} typed errors")


def test_leader_killed(etcd_cluster):
    _fault_with_writer(etcd_cluster, lambda c: c.leader(), "lead")


def test_follower_killed(etcd_cluster):
    _fault_with_writer(etcd_cluster, lambda c: c.follower(), "foll")


def test_whole_cluster_down_then_back(etcd_cluster):
    cluster = etcd_cluster
    eps = cluster.endpoints
    with broker.spawn(upstream=eps, upstream_timeout=TIMEOUT) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        start = c.put("/down/start", "1").revision
        w = c.watch("/down/", prefix=True, prev_kv=True, start_revision=start)
        acked = [(b"/down/a", b"1", c.put("/down/a", "1").revision)]
        for m in cluster.members:
            cluster.kill(m)
        t0 = time.monotonic()
        with pytest.raises(E.UpstreamUnavailable):
            c.put("/down/a", "never")
        took = time.monotonic() - t0
        assert TIMEOUT * 0.9 <= took <= TIMEOUT + 3, took
        with pytest.raises(E.UpstreamUnavailable):
            c.lease_grant(5)
        assert not w.canceled  # the watch keeps its stream
        for m in cluster.members:
            cluster.restart(m, wait=False)
        cluster.wait_healthy(cluster.members)
        deadline = time.monotonic() + 15
        while True:  # the first writes may still meet an election
            try:
                acked.append((b"/down/b", b"2", c.put("/down/b", "2").revision))
                break
            except E.UpstreamUnavailable:
                assert time.monotonic() < deadline
        end = c.put("/down/end", "1").revision
        local = collect(w, end)
        n = assert_same_stream(local, direct_events(eps[0], "/down/", start, end))
        assert assert_acked_in(acked, local) == 2
        assert all(ev.kv.value != b"never" for ev in local)  # unacknowledged: not applied
        assert n == 4


def test_compaction_past_the_mirror_while_away(etcd_cluster):
    cluster = etcd_cluster
    only = cluster.members[0]
    others = [m for m in cluster.members if m is not only]
    # the mirror knows one member only: killing it takes the mirror away, not etcd
    # serializable: a read shows the mirror itself (a linearizable one may ask etcd)
    with broker.spawn(upstream=[only.url], upstream_timeout=TIMEOUT, consistency="s") as b, \
            clientlib.connect(b.name, timeout=10) as c:
        start = c.put("/cp/start", "1").revision
        w = c.watch("/cp/", prefix=True, start_revision=start + 1)
        assert w.get(timeout=5).created
        cluster.kill(only)
        cluster.leader()  # the two others elect one if it led
        for i in range(5):
            etcdctl(others[0].url, "put", f"/cp/k{i}", str(i))
        etcdctl(others[1].url, "del", "/cp/k0")
        with gateway(others[0].url) as g:
            head = g.put("/cp/last", "x").revision
            g.compact(head)
        cluster.restart(only)
        # the local watch needed revisions etcd no longer has: etcd's compaction cancel
        deadline = time.monotonic() + 15
        got = []
        with pytest.raises(E.CompactedError) as info:
            while time.monotonic() < deadline:
                got.append(w.get(timeout=max(0.1, deadline - time.monotonic())))
        assert info.value.compact_revision == head
        assert all(not r.events for r in got if not r.created)  # nothing half-delivered
        # the mirror reloaded: its state is etcd's, and it goes on from there
        deadline = time.monotonic() + 10
        with gateway(others[0].url) as g:
            want = g.get("/cp/", prefix=True).kvs
        while c.get("/cp/", prefix=True).kvs != want:
            assert time.monotonic() < deadline, "the mirror did not reload"
            time.sleep(0.05)
        w2 = c.watch("/cp/", prefix=True)
        rev = c.put("/cp/after", "1").revision
        assert [ev.kv.mod_revision for ev in collect(w2, rev)] == [rev]


def test_a_slow_broker_bounds_the_upstream_queue(etcd_cluster):
    """etcd's revisions come faster than the broker takes them: the session's queue
    holds at most ITEMS_MAX responses, the watch thread then stops reading (gRPC flow
    control holds the rest in etcd), and every revision arrives once it reads again."""
    from broker import upstream as U

    eps = etcd_cluster.endpoints
    woken = threading.Event()
    up = U.Upstream(eps, b"/slow/", 5.0, woken.set)
    old = U.ITEMS_MAX
    up.items.maxsize = 8
    try:
        up.start()
        kind, *_ = up.items.get(timeout=10)
        assert kind == "load"
        with gateway(eps[0]) as g:
            revs = [g.put(f"/slow/k{i % 7}", str(i)).revision for i in range(60)]
        time.sleep(1.0)
        assert up.items.qsize() <= 8  # bounded while nobody reads
        stuck = up.next_rev
        assert stuck <= revs[-1], "the watch thread read everything into memory"
        seen = []
        deadline = time.monotonic() + 10
        while (not seen or seen[-1] < revs[-1]) and time.monotonic() < deadline:
            kind, rev, *_ = up.items.get(timeout=5)
            if kind == "rev":
                seen.append(rev)
        assert seen == revs, "a revision was lost or duplicated"
    finally:
        U.ITEMS_MAX = old
        up.close()
