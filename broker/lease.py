"""Leases: etcd's lessor, pure (no I/O, no clock of its own: every call is handed `now`,
a `time.monotonic()` reading).

This module owns which leases exist, their TTLs and deadlines, and which client a
*bound* lease belongs to. It does not own keys: the MVCC store keeps which live keys are
attached to which lease (`MVCCStore.keys_of_lease`), and the broker deletes them when a
lease goes (`revoke` here only forgets the lease).

etcd 3.4's rules, kept exactly:
- A grant with a TTL over `MAX_LEASE_TTL` is `LeaseTTLTooLargeError`, one whose id
  exists `LeaseExistsError` (in that order); a TTL under the minimum (etcd: derived from
  the election timeout, 2 s by default; here `min_ttl`) is granted as the minimum.
  Id 0 asks for a fresh id (`new_id`: etcd's request-id layout).
- A keep-alive renews the deadline to now + TTL and answers the TTL; a lease that does
  not exist, or whose deadline passed (it is being revoked), answers 0.
- Time-to-live answers the whole seconds left (truncated, as etcd's
  `int64(Remaining().Seconds())`) and the granted TTL; -1 if there is no such lease.
- A restart renews every lease to its full TTL (etcd's `Promote` on a new leader).

Beyond etcd, a lease may be *bound* to one client (`owner`): the broker revokes it when
that client's connection ends (close, death, broker restart). A bound lease granted
with TTL 0 has no deadline at all: the broker keeps it alive for exactly as long as the
client lives, and reports its TTL as the minimum (what it would grant), always full.

Costs: grant, renew and revoke O(log L) (a heap of deadlines with lazy deletion: a
renewed lease leaves its old entry behind, skipped when it surfaces; the heap is rebuilt
when stale entries outnumber live ones); `expired` O(E log L) for E due entries.
"""

from __future__ import annotations

import heapq
import math

from shmwatch.wire.errors import (
    LeaseExistsError,
    LeaseNotFoundError,
    LeaseTTLTooLargeError,
    TooManyLeasesError,
)

MAX_LEASE_TTL = 9_000_000_000  # etcd's MaxLeaseTTL, seconds
_ID_MASK = (1 << 63) - 1  # etcd's lease ids are positive int64


class Lease:
    """One lease. `expiry` is a monotonic deadline, None for a bound lease without TTL
    (renewed by the broker while its client lives); `owner` is the client a bound lease
    belongs to (None: not bound)."""

    __slots__ = ("expiry", "id", "owner", "ttl")

    def __init__(self, lease_id: int, ttl: int, expiry: float | None, owner) -> None:
        self.id = lease_id
        self.ttl = ttl
        self.expiry = expiry
        self.owner = owner

    def __repr__(self) -> str:
        bound = f" bound to {self.owner}" if self.owner is not None else ""
        return f"<Lease {self.id:x} ttl={self.ttl}{bound}>"


class Lessor:
    """etcd's lessor over monotonic time. `min_ttl`: the smallest TTL granted (seconds);
    `max_leases`: how many leases may exist at once (a grant past it is
    `TooManyLeasesError`: every byte a client can make the broker hold is bounded)."""

    def __init__(self, min_ttl: int = 2, max_leases: int = 100_000,
                 member_id: int = 0) -> None:
        self.min_ttl = min_ttl
        self.max_leases = max_leases
        self.leases: dict[int, Lease] = {}
        self._heap: list[tuple[float, int]] = []  # (deadline, id); stale entries skipped
        self._owned: dict[object, set[int]] = {}  # owner -> its bound leases
        # etcd's idutil.Generator: 16 bits of member id, then a counter started from
        # the time in milliseconds (40 bits) shifted over 8 bits of sequence.
        self._prefix = (member_id & 0xFFFF) << 48
        self._suffix = 0
        self.expired_total = 0  # leases revoked by their deadline (metrics)

    def __contains__(self, lease_id: int) -> bool:
        return lease_id in self.leases

    def __len__(self) -> int:
        return len(self.leases)

    # ------------------------------------------------------------ ids

    def new_id(self, now_ms: int) -> int:
        """A fresh lease id, as etcd's request-id generator lays them out; never 0 and
        never one that exists. `now_ms` seeds the counter (wall-clock milliseconds)."""
        start = (now_ms & ((1 << 40) - 1)) << 8
        if start > self._suffix:
            self._suffix = start
        while True:
            self._suffix = (self._suffix + 1) & ((1 << 48) - 1)
            lease_id = (self._prefix | self._suffix) & _ID_MASK
            if lease_id and lease_id not in self.leases:
                return lease_id

    # ------------------------------------------------------------ changes

    def grant(self, lease_id: int, ttl: int, now: float, owner=None) -> Lease:
        """Grant `lease_id` (not 0: the caller picks a fresh one with `new_id`). A TTL
        under the minimum is the minimum; with an `owner` and TTL 0 the lease has no
        deadline (bound: it lives exactly as long as its owner)."""
        if ttl > MAX_LEASE_TTL:
            raise LeaseTTLTooLargeError()
        if lease_id in self.leases:
            raise LeaseExistsError()
        if len(self.leases) >= self.max_leases:
            raise TooManyLeasesError.limit(self.max_leases)
        forever = owner is not None and ttl <= 0
        ttl = max(ttl, self.min_ttl)
        lease = Lease(lease_id, ttl, None if forever else now + ttl, owner)
        self.leases[lease_id] = lease
        if lease.expiry is not None:
            self._push(lease)
        if owner is not None:
            self._owned.setdefault(owner, set()).add(lease_id)
        return lease

    def restore(self, lease_id: int, ttl: int, now: float, owner=None) -> Lease:
        """A lease read back from the data directory: granted as it was (its TTL is the
        one granted then), renewed to its full TTL, whatever --max-leases and
        --min-lease-ttl say now (a changed option must not make a data directory
        unreadable)."""
        if lease_id in self.leases or ttl < 1:
            raise ValueError(f"lease {lease_id:x} restored twice, or with TTL {ttl}")
        lease = Lease(lease_id, ttl, now + ttl, owner)
        self.leases[lease_id] = lease
        self._push(lease)
        if owner is not None:
            self._owned.setdefault(owner, set()).add(lease_id)
        return lease

    def revoke(self, lease_id: int) -> Lease:
        """Forget the lease (its keys are the broker's to delete). LeaseNotFoundError if
        there is none."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            raise LeaseNotFoundError()
        if lease.owner is not None:
            owned = self._owned[lease.owner]
            owned.discard(lease_id)
            if not owned:
                del self._owned[lease.owner]
        return lease

    def renew(self, lease_id: int, now: float) -> int:
        """etcd's keep-alive: the TTL the lease was renewed to, or 0 if it does not
        exist or its deadline has passed (it is revoked at the next `expired`)."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return 0
        if lease.expiry is not None:
            if lease.expiry <= now:
                return 0
            lease.expiry = now + lease.ttl
            self._push(lease)
        return lease.ttl

    # ------------------------------------------------------------ reads

    def time_to_live(self, lease_id: int, now: float) -> tuple[int, int]:
        """(seconds left, granted TTL); (-1, 0) if there is no such lease."""
        lease = self.leases.get(lease_id)
        if lease is None:
            return -1, 0
        if lease.expiry is None:
            return lease.ttl, lease.ttl
        return max(0, math.trunc(lease.expiry - now)), lease.ttl

    def expired(self, now: float) -> list[int]:
        """The leases whose deadline has passed, earliest first (still granted: the
        caller revokes each)."""
        heap = self._heap
        due = []
        while heap and heap[0][0] <= now:
            deadline, lease_id = heapq.heappop(heap)
            lease = self.leases.get(lease_id)
            if lease is not None and lease.expiry == deadline and lease_id not in due:
                due.append(lease_id)
        return due

    def next_deadline(self) -> float | None:
        """The earliest deadline in the heap (maybe a stale one: waking for it is
        harmless), None if no lease has one."""
        return self._heap[0][0] if self._heap else None

    def by_expiry(self) -> list[int]:
        """Every lease id, soonest deadline first (etcd's LeaseLeases order; leases
        without a deadline last). O(L log L)."""
        inf = float("inf")
        return [x.id for x in sorted(self.leases.values(),
                                     key=lambda x: (inf if x.expiry is None else x.expiry, x.id))]

    def owned_by(self, owner) -> list[int]:
        """The bound leases of `owner`, sorted."""
        return sorted(self._owned.get(owner, ()))

    def bound_count(self) -> int:
        return sum(len(ids) for ids in self._owned.values())

    def expiring_within(self, now: float, seconds: float) -> int:
        """How many leases have a deadline within `seconds` (metrics). O(L)."""
        limit = now + seconds
        return sum(1 for lease in self.leases.values()
                   if lease.expiry is not None and lease.expiry <= limit)

    # ------------------------------------------------------------ persistence

    def snapshot(self) -> list[list]:
        """Every lease as [id, ttl, bound] (sorted by id): deadlines are not kept, a
        restart renews them (etcd's Promote)."""
        return [[lease.id, lease.ttl, lease.owner is not None]
                for lease in sorted(self.leases.values(), key=lambda x: x.id)]

    def _push(self, lease: Lease) -> None:
        heap = self._heap
        heapq.heappush(heap, (lease.expiry, lease.id))
        if len(heap) > 64 and len(heap) > 2 * len(self.leases):
            # Renewals leave stale entries behind: rebuild from the live deadlines.
            self._heap = [(x.expiry, x.id) for x in self.leases.values()
                          if x.expiry is not None]
            heapq.heapify(self._heap)

    def _check(self) -> None:
        """Assert every invariant. O(L log L)."""
        live = {(x.expiry, x.id) for x in self.leases.values() if x.expiry is not None}
        assert live <= set(self._heap), "a lease deadline is missing from the heap"
        owned = {}
        for lease in self.leases.values():
            assert lease.ttl >= 1, lease
            if lease.owner is not None:
                owned.setdefault(lease.owner, set()).add(lease.id)
            else:
                assert lease.expiry is not None, lease
        assert owned == self._owned, (owned, self._owned)


__all__ = ["MAX_LEASE_TTL", "Lease", "Lessor"]
