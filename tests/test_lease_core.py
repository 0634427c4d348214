"""broker.lease.Lessor on its own (pure: time is passed in), and the MVCC store's side of
leases (the lease index, revoke's deletes). The broker and the differential tests are in
test_leases.py and test_lease_differential.py."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from broker.lease import MAX_LEASE_TTL, Lessor
from broker.mvcc import MVCCStore
from shmwatch.wire.errors import (
    KeyNotFoundError,
    LeaseExistsError,
    LeaseNotFoundError,
    LeaseProvidedError,
    LeaseTTLTooLargeError,
    TooManyLeasesError,
)
from shmwatch.wire.ops import op_put
from shmwatch.wire.types import DELETE


def test_grant_checks_in_etcds_order_and_grants_the_minimum():
    le = Lessor(min_ttl=2)
    assert le.grant(5, 1, 100.0).ttl == 2  # under the minimum: the minimum
    assert le.grant(6, 0, 100.0).ttl == 2
    assert le.grant(7, -3, 100.0).ttl == 2
    assert le.grant(8, MAX_LEASE_TTL, 100.0).ttl == MAX_LEASE_TTL
    with pytest.raises(LeaseTTLTooLargeError, match="too large lease TTL"):
        le.grant(9, MAX_LEASE_TTL + 1, 100.0)
    with pytest.raises(LeaseExistsError, match="lease already exists"):
        le.grant(5, 10, 100.0)
    with pytest.raises(LeaseTTLTooLargeError):  # the TTL is checked before the id
        le.grant(5, MAX_LEASE_TTL + 1, 100.0)
    le._check()


def test_renew_time_to_live_and_expiry():
    le = Lessor(min_ttl=1)
    le.grant(1, 10, 100.0)
    le.grant(2, 3, 100.0)
    assert le.time_to_live(1, 100.0) == (10, 10)
    assert le.time_to_live(1, 104.9) == (5, 10)  # whole seconds left, truncated
    assert le.time_to_live(9, 100.0) == (-1, 0)  # no such lease
    assert le.next_deadline() == 103.0
    assert le.renew(2, 102.0) == 3  # now due at 105
    assert le.renew(9, 102.0) == 0
    assert le.expired(104.0) == []  # the stale 103 entry is skipped
    assert le.expired(105.0) == [2]
    assert le.renew(1, 110.0) == 0  # its deadline passed: being revoked, TTL 0
    assert le.expired(110.0) == [1]
    le.revoke(1)
    le.revoke(2)
    with pytest.raises(LeaseNotFoundError, match="requested lease not found"):
        le.revoke(2)
    assert le.next_deadline() is None or le.expired(1e9) == []
    le._check()


def test_bound_leases_belong_to_their_owner():
    le = Lessor(min_ttl=2)
    a, b = object(), object()
    le.grant(1, 0, 0.0, owner=a)  # bound without TTL: no deadline at all
    le.grant(2, 5, 0.0, owner=a)  # bound with a TTL: both
    le.grant(3, 5, 0.0, owner=b)
    le.grant(4, 5, 0.0)
    assert le.owned_by(a) == [1, 2] and le.owned_by(b) == [3]
    assert le.time_to_live(1, 1e6) == (2, 2)  # always full: the broker keeps it alive
    assert le.renew(1, 1e6) == 2
    assert le.expired(1e6) == [2, 3, 4]
    for lease_id in (2, 3, 4):  # the caller revokes what expired() reports
        le.revoke(lease_id)
    assert le.owned_by(a) == [1] and le.owned_by(b) == [] and le.bound_count() == 1
    le.revoke(1)
    assert le.owned_by(a) == []
    le._check()


def test_max_leases_bounds_what_clients_can_make_the_broker_hold():
    le = Lessor(max_leases=3)
    for i in range(1, 4):
        le.grant(i, 10, 0.0)
    with pytest.raises(TooManyLeasesError, match="--max-leases is 3"):
        le.grant(4, 10, 0.0)
    le.revoke(1)
    le.grant(4, 10, 0.0)


def test_fresh_ids_are_positive_distinct_and_skip_taken_ones():
    le = Lessor(member_id=0xABCD)
    first = le.new_id(1_700_000_000_000)
    assert first >> 48 == 0xABCD & 0x7FFF and first > 0  # int64, positive (etcd masks too)
    le.grant(first + 1, 10, 0.0)  # someone chose the next id explicitly
    ids = [le.new_id(1_700_000_000_000) for _ in range(1000)]
    assert first + 1 not in ids and len(set(ids)) == 1000
    assert all(0 < i < 1 << 63 for i in ids)
    assert le.new_id(0) > ids[-1]  # a clock going back never repeats an id
    wide = Lessor(member_id=0xFFFF)
    assert 0 < wide.new_id(2 ** 50) < 1 << 63


def test_renewals_do_not_grow_the_deadline_heap_without_bound():
    le = Lessor(min_ttl=1)
    le.grant(1, 10, 0.0)
    for i in range(10_000):
        le.renew(1, float(i) / 1000)
    assert len(le._heap) <= 130
    le._check()


class LessorMachine(RuleBasedStateMachine):
    """Random grants, renewals, revokes and time against a dict of deadlines."""

    def __init__(self):
        super().__init__()
        self.le = Lessor(min_ttl=2, max_leases=8)
        self.now = 0.0
        self.model: dict[int, tuple[int, float | None, object]] = {}

    @rule(lease_id=st.integers(1, 10), ttl=st.integers(-1, 6),
          owner=st.sampled_from([None, None, "a", "b"]))
    def grant(self, lease_id, ttl, owner):
        if lease_id in self.model:
            with pytest.raises(LeaseExistsError):
                self.le.grant(lease_id, ttl, self.now, owner)
            return
        if len(self.model) >= 8:
            with pytest.raises(TooManyLeasesError):
                self.le.grant(lease_id, ttl, self.now, owner)
            return
        lease = self.le.grant(lease_id, ttl, self.now, owner)
        granted = max(ttl, 2)
        assert lease.ttl == granted
        forever = owner is not None and ttl <= 0
        self.model[lease_id] = (granted, None if forever else self.now + granted, owner)

    @rule(lease_id=st.integers(1, 10))
    def renew(self, lease_id):
        got = self.le.renew(lease_id, self.now)
        entry = self.model.get(lease_id)
        if entry is None or (entry[1] is not None and entry[1] <= self.now):
            assert got == 0
            return
        ttl, deadline, owner = entry
        assert got == ttl
        if deadline is not None:
            self.model[lease_id] = (ttl, self.now + ttl, owner)

    @rule(lease_id=st.integers(1, 10))
    def revoke(self, lease_id):
        if lease_id not in self.model:
            with pytest.raises(LeaseNotFoundError):
                self.le.revoke(lease_id)
            return
        self.le.revoke(lease_id)
        del self.model[lease_id]

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]))
    def tick(self, dt):
        self.now += dt
        due = sorted(i for i, (_, d, _) in self.model.items() if d is not None and d <= self.now)
        assert sorted(self.le.expired(self.now)) == due
        for i in due:
            self.le.revoke(i)
            del self.model[i]

    @invariant()
    def agrees(self):
        self.le._check()
        assert set(self.le.leases) == set(self.model)
        for owner in ("a", "b"):
            assert self.le.owned_by(owner) == sorted(
                i for i, (_, _, o) in self.model.items() if o == owner)
        for i, (ttl, deadline, _) in self.model.items():
            left, granted = self.le.time_to_live(i, self.now)
            assert granted == ttl
            assert left == (ttl if deadline is None else max(0, int(deadline - self.now)))


TestLessorMachine = LessorMachine.TestCase
TestLessorMachine.settings = settings(max_examples=120, stateful_step_count=40, deadline=None)


# -- the store's side -------------------------------------------------------------------


def store_with_leases(*ids: int) -> MVCCStore:
    s = MVCCStore()
    s.lease_exists = set(ids).__contains__
    return s


def test_put_attaches_moves_detaches_and_keeps():
    s = store_with_leases(7, 8)
    s.put(b"a", b"1", lease=7)
    s.put(b"b", b"1", lease=7)
    assert s.keys_of_lease(7) == [b"a", b"b"]
    s.put(b"a", b"2", lease=8)  # moves
    assert s.keys_of_lease(7) == [b"b"] and s.keys_of_lease(8) == [b"a"]
    s.put(b"a", b"3", ignore_lease=True)  # keeps
    assert s.keys_of_lease(8) == [b"a"] and s.range(b"a").kvs[0].lease == 8
    s.put(b"a", b"4")  # a put without a lease detaches
    assert s.keys_of_lease(8) == [] and s.range(b"a").kvs[0].lease == 0
    s.delete_range(b"b")
    assert s.keys_of_lease(7) == []
    s._check()


def test_lone_put_checks_the_lease_before_the_key_and_txn_the_other_way():
    s = store_with_leases(7)
    with pytest.raises(LeaseProvidedError, match="lease is provided"):
        s.put(b"k", b"", ignore_lease=True, lease=7)
    # a lone put (etcd's applier, txn == nil): the lease first
    with pytest.raises(LeaseNotFoundError):
        s.put(b"missing", b"", ignore_value=True, lease=9)
    # inside a txn (etcd's checkRequestPut): the key first
    with pytest.raises(KeyNotFoundError):
        s.txn([], [op_put(b"missing", b"", ignore_value=True, lease=9)], [])
    with pytest.raises(LeaseNotFoundError):
        s.txn([], [op_put(b"x", b"1", lease=9)], [])
    assert s.rev == 1  # nothing applied


def test_delete_keys_is_one_revision_in_key_order():
    s = store_with_leases(7)
    for k in (b"c", b"a", b"b"):
        s.put(k, b"v", lease=7)
    rev = s.rev
    resp, events = s.delete_keys(s.keys_of_lease(7))
    assert resp.revision == rev + 1 and resp.deleted == 3
    assert [(e.type, e.kv.key, e.kv.mod_revision, e.prev_kv.lease) for e in events] == [
        (DELETE, b"a", rev + 1, 7), (DELETE, b"b", rev + 1, 7), (DELETE, b"c", rev + 1, 7)]
    assert s.delete_keys([])[0].revision == rev + 1  # nothing to delete: no revision
    assert s.rev == rev + 1
    s._check()


def test_the_lease_index_survives_a_snapshot():
    s = store_with_leases(7, 8)
    s.put(b"a", b"1", lease=7)
    s.put(b"b", b"1", lease=8)
    s.put(b"b", b"2", lease=7)
    r = MVCCStore.restore(s.snapshot())
    assert r.keys_of_lease(7) == [b"a", b"b"] and r.keys_of_lease(8) == []
