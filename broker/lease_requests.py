"""The broker shell's lease requests (a mixin of `Broker`): grant, revoke, keep-alive,
time-to-live and the list answered from the `Lessor` core, and the revoke that deletes a
lease's keys at one revision. Policy stays in `broker/lease.py`; this moves bytes."""

from __future__ import annotations

import logging
import time

from shmwatch.wire.protocol import (
    OP_LEASE_KEEPALIVE,
    OP_LEASE_REVOKE,
    OP_LEASE_TTL,
    LeaseGrantRequest,
)
from shmwatch.wire.types import (
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    LeaseLeasesResponse,
    LeaseRevokeResponse,
    LeaseTimeToLiveResponse,
)

from .registry import ClientConn
from .wal import KIND_LEASE_GRANT, KIND_LEASE_REVOKE

log = logging.getLogger("shmwatch.broker")


class LeaseRequests:
    """Needs `lessor`, `mvcc`, `wal` and `_commit` of the Broker it is mixed into."""

    def _lease(self, c: ClientConn, req):
        """A lease request's response. Deadlines that passed are settled first, so no
        one is told of a lease that is already due to go (etcd's keep-alive of an
        expired lease waits for its revoke, then answers TTL 0)."""
        now = time.monotonic()
        self._expire(now)
        lessor = self.lessor
        rev = self.mvcc.rev
        if type(req) is LeaseGrantRequest:
            lease_id = req.lease_id or lessor.new_id(time.time_ns() // 1_000_000)
            lease = lessor.grant(lease_id, req.ttl, now, c if req.bound else None)
            if self.wal is not None:
                self.wal.append(KIND_LEASE_GRANT, [lease.id, lease.ttl, req.bound])
            return LeaseGrantResponse(rev, lease.id, lease.ttl)
        lease_id = req.lease_id
        if req.op == OP_LEASE_REVOKE:
            self._revoke(lease_id)
            return LeaseRevokeResponse(self.mvcc.rev)
        if req.op == OP_LEASE_KEEPALIVE:
            return LeaseKeepAliveResponse(rev, lease_id, lessor.renew(lease_id, now))
        if req.op == OP_LEASE_TTL:
            ttl, granted = lessor.time_to_live(lease_id, now)
            keys = self.mvcc.keys_of_lease(lease_id) if req.keys and ttl >= 0 else []
            return LeaseTimeToLiveResponse(rev, lease_id, ttl, granted, keys)
        return LeaseLeasesResponse(rev, lessor.by_expiry())

    def _revoke(self, lease_id: int, durable: bool = True) -> None:
        """End a lease: forget it, and delete its keys in key order at one revision
        (etcd's lessor revokes in one txn; no keys, no new revision)."""
        self.lessor.revoke(lease_id)  # LeaseNotFoundError if there is none
        _, events = self.mvcc.delete_keys(self.mvcc.keys_of_lease(lease_id))
        if durable and self.wal is not None:
            self.wal.append(KIND_LEASE_REVOKE, lease_id)
        if events:
            self._commit(self.mvcc.rev, events)

    def _expire(self, now: float) -> int:
        """Revoke every lease whose deadline passed; how many."""
        due = self.lessor.expired(now)
        for lease_id in due:
            log.info("lease %x expired: revoking it", lease_id)
            self._revoke(lease_id)
        self.lessor.expired_total += len(due)
        return len(due)
