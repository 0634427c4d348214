"""Leases through a real broker: expiry, keep-alive, bound leases (close, SIGKILL), the
Lease object, the WAL across restarts, the bounds. etcd's own answers are compared in
test_lease_differential.py; the lessor alone in test_lease_core.py.

No assertion here is a timing: waits are generous deadlines (the expiry lag itself is
measured by tools/bench)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

import broker
import clientlib
from clientlib import aio
from tests import fault_workers as fw

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def deletes(w, timeout: float = 10.0):
    """The next response of `w` that has events (skipping progress and created)."""
    deadline = time.monotonic() + timeout
    while True:
        r = w.get(max(0.1, deadline - time.monotonic()))
        if r.events:
            return r


@pytest.fixture
def quick():
    """A broker whose leases may be as short as 1 s."""
    with broker.spawn(min_lease_ttl=1) as b:
        yield b


def test_expiry_deletes_every_key_at_one_revision_in_one_response(quick):
    with clientlib.connect(quick.name, timeout=5) as c:
        g = c.lease_grant(1)
        assert g.ttl == 1 and g.id > 0
        for k in ("job/c", "job/a", "job/b"):
            c.put(k, "x", lease=g.id)
        c.put("job/free", "x")
        w = c.watch("job/", prefix=True, prev_kv=True)
        assert w.get(5).created
        r = deletes(w)
        rev = r.events[0].kv.mod_revision
        assert [(e.type, e.kv.key, e.kv.mod_revision, e.prev_kv.lease) for e in r.events] == [
            ("DELETE", b"job/a", rev, g.id), ("DELETE", b"job/b", rev, g.id),
            ("DELETE", b"job/c", rev, g.id)]
        assert r.revision == rev == 6
        assert [kv.key for kv in c.get("job/", prefix=True).kvs] == [b"job/free"]
        assert c.lease_time_to_live(g.id).ttl == -1
        assert c.lease_keep_alive_once(g.id).ttl == 0
        assert c.leases().leases == []
        with pytest.raises(clientlib.LeaseNotFoundError):
            c.lease_revoke(g.id)
        with pytest.raises(clientlib.LeaseNotFoundError):
            c.put("job/a", "y", lease=g.id)


def test_grants_and_keep_alives_do_not_move_the_revision(quick):
    with clientlib.connect(quick.name, timeout=5) as c:
        rev = c.put("k", "v").revision
        g = c.lease_grant(100, 0x1234)
        assert (g.revision, g.id, g.ttl) == (rev, 0x1234, 100)
        assert c.lease_keep_alive_once(0x1234).revision == rev
        empty = c.lease_revoke(0x1234)  # no keys: no new revision
        assert empty.revision == rev
        assert c.get("k").revision == rev


def test_keep_alive_holds_a_lease_past_its_ttl_and_revoke_ends_it(quick):
    with clientlib.connect(quick.name, timeout=5) as c:
        lease = c.lease(1)
        c.put("held", "1", lease=lease)
        time.sleep(3.5)  # three and a half TTLs: renewed at a third of each
        assert not lease.lost
        assert c.get("held").kvs[0].lease == lease.id
        assert lease.keys() == [b"held"] and lease.remaining() >= 0
        lease.revoke()
        assert lease.lost and c.get("held").kvs == []
        with pytest.raises(clientlib.LeaseNotFoundError):
            lease.refresh()


def test_a_lease_revoked_elsewhere_is_lost(quick):
    with clientlib.connect(quick.name, timeout=5) as c, \
            clientlib.connect(quick.name, timeout=5) as other:
        lease = c.lease(3)
        other.lease_revoke(lease.id)
        assert lease.wait_lost(10)  # its next keep-alive hears TTL 0
        with lease:  # exit revokes: already gone is fine
            pass


def test_context_manager_revokes_on_exit(quick):
    with clientlib.connect(quick.name, timeout=5) as c:
        with c.lease(30) as lease:
            c.put("ctx", "1", lease=lease)
            assert c.lease_time_to_live(lease.id, keys=True).keys == [b"ctx"]
        assert lease.lost
        assert c.get("ctx").kvs == [] and c.lease_time_to_live(lease.id).ttl == -1


def test_bound_lease_ends_with_close_and_without_ttl_lives_as_long_as_the_client(quick):
    with clientlib.connect(quick.name, timeout=5) as watcher:
        w = watcher.watch("w/", prefix=True)
        assert w.get(5).created
        c = clientlib.connect(quick.name, timeout=5)
        forever = c.lease(0, bound=True)  # no TTL: no keep-alive thread either
        timed = c.lease(30, bound=True)
        unbound = c.lease(30)
        c.put("w/forever", "1", lease=forever)
        c.put("w/timed", "1", lease=timed)
        c.put("w/unbound", "1", lease=unbound)
        time.sleep(2.5)  # past the minimum TTL of 1 s, which "forever" reports
        assert c.lease_time_to_live(forever.id).ttl == 1
        assert [kv.key for kv in watcher.get("w/", prefix=True).kvs] == [
            b"w/forever", b"w/timed", b"w/unbound"]
        unbound.close()  # stop its keep-alive: it then ends by its TTL only
        c.close()
        seen = []
        while len(seen) < 2:
            seen += [e.kv.key for e in deletes(w).events if e.type == "DELETE"]
        assert sorted(seen) == [b"w/forever", b"w/timed"]
        assert watcher.lease_time_to_live(unbound.id).ttl > 0  # not bound: still there
        assert sorted(watcher.leases().leases) == [unbound.id]


BOUND_WORKER = """
import clientlib, sys, time
c = clientlib.connect(sys.argv[1], timeout=5)
bound = c.lease(0, bound=True)
plain = c.lease(30)
c.put("reg/bound", "1", lease=bound)
c.put("reg/plain", "1", lease=plain)
print(bound.id, plain.id, flush=True)
time.sleep(120)
"""


def test_sigkill_of_the_owner_revokes_its_bound_leases_only(quick):
    with clientlib.connect(quick.name, timeout=5) as c:
        w = c.watch("reg/", prefix=True, prev_kv=True, filters=["noput"])
        assert w.get(5).created
        p = subprocess.Popen([sys.executable, "-c", BOUND_WORKER, quick.name],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
        try:
            bound_id, plain_id = map(int, p.stdout.readline().split())
            os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
            r = deletes(w)
            got = [(e.type, e.kv.key, e.prev_kv.lease) for e in r.events]
            assert got == [("DELETE", b"reg/bound", bound_id)]
            assert c.lease_time_to_live(bound_id).ttl == -1
            assert c.lease_time_to_live(plain_id).ttl > 0  # ends by its TTL, as etcd's
            assert [kv.key for kv in c.get("reg/", prefix=True).kvs] == [b"reg/plain"]
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_leases_survive_a_restart_and_bound_ones_end_with_it(tmp_path):
    data = str(tmp_path / "data")
    b = broker.spawn(data_dir=data, min_lease_ttl=1, snapshot_every=3)
    try:
        with clientlib.connect(b.name, timeout=10) as c:
            plain = c.lease_grant(100, 0x77)
            c.put("p/1", "x", lease=plain.id)
            c.put("p/2", "x", lease=plain.id)
            bound = c.lease_grant(0, 0x88, bound=True)
            c.put("b/1", "x", lease=bound.id)
            c.put("b/2", "x", lease=bound.id)
            gone = c.lease_grant(100, 0x99)
            c.put("g/1", "x", lease=gone.id)
            c.lease_revoke(gone.id)
            before = c.get("k").revision
            b.stop()  # the client is still open: its bound lease outlives the broker
            b = broker.spawn(b.name, data_dir=data, min_lease_ttl=1)
        with clientlib.connect(b.name, timeout=10) as c:
            ttl = c.lease_time_to_live(0x77, keys=True)
            assert (ttl.granted_ttl, ttl.keys) == (100, [b"p/1", b"p/2"])
            assert ttl.ttl >= 98  # renewed to its full TTL at the restart (etcd's Promote)
            assert c.leases().leases == [0x77]
            r = c.get("", prefix=True)
            assert [kv.key for kv in r.kvs] == [b"p/1", b"p/2"]
            assert r.revision == before + 1  # the bound lease's keys went at one revision
            revs = c.get("b/", prefix=True, revision=before).kvs
            assert [kv.key for kv in revs] == [b"b/1", b"b/2"]
        b.stop()
        b = broker.spawn(b.name, data_dir=data, min_lease_ttl=1)  # the replay agrees
        with clientlib.connect(b.name, timeout=10) as c:
            r = c.get("", prefix=True)
            assert [kv.key for kv in r.kvs] == [b"p/1", b"p/2"]
            assert r.revision == before + 1
            assert c.leases().leases == [0x77]
            c.lease_revoke(0x77)
            assert c.get("", prefix=True).kvs == []
    finally:
        b.stop()
    assert fw.shm_entries(b.name) == []


def test_max_leases_and_bad_requests_are_typed_errors():
    with broker.spawn(max_leases=2) as b, clientlib.connect(b.name, timeout=5) as c:
        c.lease_grant(10, 1)
        c.lease_grant(10, 2)
        with pytest.raises(clientlib.TooManyLeasesError, match="--max-leases is 2"):
            c.lease_grant(10)
        with pytest.raises(clientlib.LeaseExistsError, match="lease already exists"):
            c.lease_grant(10, 1)
        with pytest.raises(clientlib.LeaseTTLTooLargeError, match="too large lease TTL"):
            c.lease_grant(9_000_000_001)
        with pytest.raises(clientlib.LeaseProvidedError, match="lease is provided"):
            c.put("k", "v", lease=1, ignore_lease=True)
        with pytest.raises(TypeError):
            c.put("k", "v", lease="1")
        with pytest.raises(ValueError):
            c.lease_grant(10, 1 << 63)
        c.lease_revoke(1)
        assert c.lease_grant(10).id not in (0, 2)


def test_async_leases(quick):
    async def main():
        async with aio.connect(quick.name, timeout=5) as c:
            lease = await c.lease(1)
            await c.put("a", "1", lease=lease)
            await asyncio.sleep(2.5)  # kept alive by its task
            assert not lease.lost
            assert await lease.keys() == [b"a"]
            ttl = await c.lease_time_to_live(lease.id)
            assert ttl.granted_ttl == 1
            async with lease:
                pass
            assert lease.lost and (await c.get("a")).kvs == []
            g = await c.lease_grant(5, 42, bound=True)
            assert (await c.leases()).leases == [42] and g.ttl == 5
            assert (await c.lease_keep_alive_once(42)).ttl == 5
            await c.lease_revoke(42)
    asyncio.run(main())
