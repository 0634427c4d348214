"""clientlib.concurrency: etcd's coordination recipes (clientv3/concurrency) on shmwatch.

    from clientlib.concurrency import Election, Lock, Session
    with Lock(c, "jobs/lock"):          # a key jobs/lock/<lease hex> with the session's lease
        ...
    e = Election(c, "svc/leader")
    e.campaign(b"worker-1")             # blocks until this candidate leads

The algorithms and the keys are etcd's own, so a lock or an election looks exactly as
etcdctl's `lock` / `elect` make it on a real etcd: every contender puts `NAME/<lease id
in hex>` (empty for a lock, the proposal for an election) with its session's lease, in a
txn that creates it only if it is missing; the holder is the key with the lowest create
revision; a waiter watches only the key created just before its own (etcd's
waitDeletes), so a release wakes one waiter, never the whole queue.

A `Session` owns the lease. By default it is a *bound* lease (not in etcd): the broker
revokes it the moment this client's process dies or the client closes, so a crashed
holder releases the lock (and a crashed leader its leadership) at once, without a TTL to
wait out. With a `ttl` it is a TTL lease kept alive in the background, as clientv3's.
Errors carry etcd's texts ("mutex: session is expired", "election: not leader", ...).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from shmwatch.wire import errors
from shmwatch.wire.ops import compare_create, compare_lease, op_delete, op_get, op_put, to_bytes
from shmwatch.wire.types import DELETE, PUT, RangeResponse

from .lease import Lease

DEFAULT_SESSION_TTL = 60  # clientv3's defaultSessionTTL, for an unbound session
POLL_S = 0.25  # how often a waiter looks at its session while it waits for a delete


class Session:
    """etcd's concurrency.Session: one lease that locks and elections put their keys
    with. `Session(client)` grants a bound lease with no TTL (it lives exactly as long
    as `client`); `Session(client, ttl=10)` a lease of 10 s kept alive in the
    background (bound too unless `bound=False`; unbound and without a ttl: etcd's 60 s).
    `lease_id` grants the lease with that id (0: a fresh one).

    `lease_id`, `lease` (the `Lease`), `done` (True once the lease is lost: etcd's
    Done()), `wait_done(timeout)`, `close()` (revokes the lease, deleting its keys:
    every lock and candidacy of the session ends), `orphan()` (stops the keep-alive
    without revoking). A context manager that closes it."""

    def __init__(self, client, ttl: int | None = None, *, bound: bool = True,
                 lease_id: int = 0, timeout: float | None = None):
        if ttl is None and not bound:
            ttl = DEFAULT_SESSION_TTL
        self.client = client
        self.ttl = ttl
        self.lease: Lease = client.lease(ttl or 0, bound=bound, lease_id=lease_id,
                                         timeout=timeout)

    @property
    def lease_id(self) -> int:
        """The session's lease id (etcd's Session.Lease())."""
        return self.lease.id

    @property
    def done(self) -> bool:
        """True once the lease is known to be gone (etcd's Done() channel closed)."""
        return self.lease.lost

    lost = done

    def wait_done(self, timeout: float | None = None) -> bool:
        """Block until the session is done (True) or `timeout` passes (False)."""
        return self.lease.wait_lost(timeout)

    def orphan(self) -> None:
        """Stop keeping the lease alive without revoking it (etcd's Orphan)."""
        self.lease.close()

    def close(self, *, timeout: float | None = None) -> None:
        """Revoke the lease (etcd's Close): its keys are deleted at one revision. A lease
        that is gone already is not an error."""
        try:
            self.lease.revoke(timeout=timeout)
        except (errors.LeaseNotFoundError, errors.ClientClosed):
            pass
        finally:
            self.lease.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session lease={self.lease_id:x}{' done' if self.done else ''}>"


# ---------------------------------------------------------------- waiting for deletes


def _first_create(prefix: bytes):
    """etcd's WithFirstCreate: the key of the prefix with the lowest create revision."""
    return op_get(prefix, prefix=True, limit=1, sort_order="ascend", sort_target="create")


def _oldest(client, prefix: bytes, timeout: float | None = None) -> RangeResponse:
    """The same read as a Get: the owner of a lock, the leader of an election."""
    return client.get(prefix, prefix=True, limit=1, sort_order="ascend", sort_target="create",
                      timeout=timeout)


class _Deadline:
    """A wait's deadline (None: none), the session whose loss ends it early, and the
    `cancel` event (a threading.Event: etcd's context) that ends it on demand."""

    def __init__(self, timeout: float | None, session: Session | None, what: str,
                 cancel=None, error=errors.RecipeTimeout):
        self.at = None if timeout is None else time.monotonic() + timeout
        self.timeout = timeout
        self.session = session
        self.what = what
        self.cancel = cancel
        self.error = error

    def slice(self) -> float:
        """How long the next wait may block; raises when the time is up, the wait is
        cancelled or the session is gone."""
        if self.cancel is not None and self.cancel.is_set():
            raise errors.RecipeCancelled()
        if self.session is not None and self.session.done:
            raise errors.SessionExpiredError()
        if self.at is None:
            return POLL_S
        left = self.at - time.monotonic()
        if left <= 0:
            raise self.error(f"shmwatch: {self.what} within {self.timeout:g} s")
        return min(POLL_S, left)

    def get(self, w):
        """`w`'s next response, waiting in slices (each checks the deadline, the
        cancel event and the session)."""
        while True:
            wait = self.slice()
            try:
                return w.get(wait)
            except errors.Timeout:
                continue


def wait_delete(client, key: bytes, revision: int, deadline: _Deadline) -> None:
    """Return once `key` is deleted at or after `revision` (etcd's waitDelete): one watch
    on that key only, for its DELETE."""
    with client.watch(key, start_revision=revision, filters=["noput"]) as w:
        while True:
            resp = deadline.get(w)
            if any(ev.type == DELETE for ev in resp.events):
                return
            if resp.canceled:
                raise errors.WatchClosed(f"shmwatch: lost watcher waiting for delete "
                                         f"({resp.cancel_reason or 'canceled'})")


def wait_deletes(client, prefix: bytes, max_create_revision: int, deadline: _Deadline) -> int:
    """etcd's waitDeletes: wait until no key of `prefix` created at or before
    `max_create_revision` remains, watching one predecessor at a time (the latest
    created of those). Returns the revision at which none remained."""
    while True:
        resp = client.get(prefix, prefix=True, limit=1, sort_order="descend",
                          sort_target="create", max_create_revision=max_create_revision)
        if not resp.kvs:
            return resp.revision
        wait_delete(client, resp.kvs[0].key, resp.revision, deadline)


# ---------------------------------------------------------------- Lock


class _Recipe:
    """What Lock and Election share: a name's prefix and a session, given or owned
    (granted when first needed, revoked when the lock or candidacy ends)."""

    def __init__(self, client, name, session: Session | None, ttl: int | None):
        self.client = client
        self.name = to_bytes(name, "name")
        self.prefix = self.name + b"/"
        self._session = session
        self._owns_session = session is None
        self._ttl = ttl

    @property
    def session(self) -> Session | None:
        """The session in use (None: an owned one not granted yet)."""
        return self._session

    def _ensure_session(self) -> Session:
        s = self._session
        if s is None or (self._owns_session and s.done):
            s = self._session = Session(self.client, self._ttl)
        if s.done:
            raise errors.SessionExpiredError()
        return s

    def _end_owned_session(self) -> None:
        if self._owns_session and self._session is not None:
            s, self._session = self._session, None
            s.close()

    def _key_for(self, s: Session) -> bytes:
        return self.prefix + f"{s.lease_id:x}".encode()


class Lock(_Recipe):
    """etcd's concurrency.Mutex: `Lock(client, "name")`; `acquire(timeout=None)`,
    `release()`, `is_owner()`, `key`, a context manager.

    Its key is `name/<lease id hex>`, put with the session's lease (empty value). With
    no `session` the lock grants its own for each acquisition (a bound lease, or with
    `ttl` a kept-alive TTL lease) and revokes it on release; pass one `Session` to
    share a lease between several locks and elections, as in etcd."""

    def __init__(self, client, name, *, ttl: int | None = None,
                 session: Session | None = None):
        super().__init__(client, name, session, ttl)
        self.key: bytes | None = None  # set while held
        self.create_revision = -1  # the key's create revision (etcd's myRev)
        self.revision = 0  # the revision at which the lock was acquired (etcd's Header)
        self._held = False

    def _try(self, s: Session):
        """etcd's tryAcquire: one txn puts our key if missing (else reads it) and reads
        the owner; returns the owner's KeyValue (None: no key)."""
        self.key = key = self._key_for(s)  # set first: a txn that fails may have applied
        resp = self.client.txn(
            [compare_create(key, "=", 0)],
            [op_put(key, b"", lease=s.lease_id), _first_create(self.prefix)],
            [op_get(key), _first_create(self.prefix)])
        self.create_revision = (resp.revision if resp.succeeded
                                else resp.responses[0].kvs[0].create_revision)
        owner = resp.responses[1].kvs
        self.revision = resp.revision
        return owner[0] if owner else None

    def acquire(self, blocking: bool = True, timeout: float | None = None, *,
                cancel=None) -> int:
        """Take the lock; returns the revision at which it was acquired (etcdctl's
        ETCD_LOCK_REV). Waits for the holder before us in the queue (`timeout` None:
        for as long as it takes); on `RecipeTimeout` our key is removed again.
        `blocking=False` is etcd's TryLock: `LockedError` if someone holds it.
        `SessionExpiredError` if the session ends before we get it; `cancel` (a
        threading.Event) set by another thread ends the wait with `RecipeCancelled`."""
        if self.key is not None:
            raise RuntimeError(f"lock {self.name!r} is already held by this Lock object")
        s = self._ensure_session()
        try:
            owner = self._try(s)
            if owner is None or owner.create_revision == self.create_revision:
                self._held = True
                return self.revision
            if not blocking:
                raise errors.LockedError()
            wait_deletes(self.client, self.prefix, self.create_revision - 1,
                         _Deadline(timeout, s, f"lock {self.name.decode(errors='replace')!r} "
                                             f"not acquired", cancel))
            got = self.client.get(self.key)  # is our key still there (our session)?
            if not got.kvs or got.kvs[0].create_revision != self.create_revision:
                raise errors.SessionExpiredError()
            self.revision = got.revision
            self._held = True
            return self.revision
        except BaseException:
            self._give_up()
            raise

    def _give_up(self) -> None:
        """Remove our key after a failed acquire (etcd's Unlock in Lock's error path)."""
        key, self.key, self.create_revision = self.key, None, -1
        try:
            if key is not None:
                self.client.delete(key)
            self._end_owned_session()
        except errors.ShmwatchError:
            pass  # the client is gone: so is a bound lease, and its key with it

    def release(self) -> int:
        """Release the lock (delete our key; an owned session is revoked); returns the
        revision of the delete. `LockReleasedError` if not held; `LockLostError` if
        the key had vanished already (the session's lease ended while held)."""
        if self.key is None:
            raise errors.LockReleasedError()
        key, self.key, self._held = self.key, None, False
        rev = self.create_revision
        self.create_revision = -1
        try:
            resp = self.client.delete(key, prev_kv=True)
        finally:
            self._end_owned_session()
        if not resp.prev_kvs or resp.prev_kvs[0].create_revision != rev:
            raise errors.LockLostError(
                f"mutex: session is expired: lock key {key.decode(errors='replace')!r} "
                f"vanished while held (its lease ended)")
        return resp.revision

    def is_owner(self) -> bool:
        """Whether this Lock holds the lock now: its key is the oldest under the prefix
        (one read at the broker)."""
        if self.key is None:
            return False
        resp = _oldest(self.client, self.prefix)
        return bool(resp.kvs) and (resp.kvs[0].key, resp.kvs[0].create_revision) == (
            self.key, self.create_revision)

    def owner_compare(self):
        """etcd's IsOwner(): a compare for a txn that holds only while we own the lock."""
        return compare_create(self.key or b"\0", "=", self.create_revision)

    @property
    def locked(self) -> bool:
        """Whether this Lock object believes it holds the lock (no request)."""
        return self._held

    def __enter__(self) -> Lock:
        self.acquire()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self.release()
        except errors.LockLostError:
            if exc_type is None:
                raise  # otherwise the body's own error is the one to see

    def __repr__(self) -> str:
        held = f" held key={self.key!r}" if self.key else ""
        return f"<Lock {self.name!r}{held}>"


# ---------------------------------------------------------------- Election


class Election(_Recipe):
    """etcd's concurrency.Election: `Election(client, "name")`; `campaign(value)`,
    `proclaim(value)`, `resign()`, `leader()`, `observe()`; `key`, `revision`.

    A candidate's key is `name/<lease id hex>` with its proposal as value and the
    session's lease; the leader is the candidate with the lowest create revision."""

    def __init__(self, client, name, *, session: Session | None = None,
                 ttl: int | None = None):
        super().__init__(client, name, session, ttl)
        self.key: bytes | None = None  # our candidate key while campaigning / leading
        self.revision = -1  # its create revision (etcd's Rev())
        self.header_revision = 0  # the revision of our last successful change
        self._leader_session: Session | None = None

    def campaign(self, value, timeout: float | None = None, *, cancel=None) -> int:
        """Become the leader with `value`: blocks until every earlier candidate is gone
        (`timeout` None: as long as it takes; on `RecipeTimeout` our candidacy is
        withdrawn; so it is when `cancel`, a threading.Event, is set: `RecipeCancelled`).
        Returns the revision of the txn that entered the race. Campaigning
        again while a candidate updates the value (etcd's)."""
        s = self._ensure_session()
        value = to_bytes(value, "value")
        key = self._key_for(s)
        try:
            resp = self.client.txn([compare_create(key, "=", 0)],
                                   [op_put(key, value, lease=s.lease_id)], [op_get(key)])
        except BaseException:
            self._remove_candidate(key, s)  # it may have been applied (a timeout)
            raise
        self.key, self.revision, self._leader_session = key, resp.revision, s
        try:
            if not resp.succeeded:
                kv = resp.responses[0].kvs[0]
                self.revision = kv.create_revision
                if kv.value != value:
                    self.proclaim(value)
            name = f"campaign {self.name.decode(errors='replace')!r} not won"
            wait_deletes(self.client, self.prefix, self.revision - 1,
                         _Deadline(timeout, s, name, cancel))
            got = self.client.get(key)
            if not got.kvs or got.kvs[0].create_revision != self.revision:
                raise errors.SessionExpiredError("election: session is expired")
        except BaseException:
            self._withdraw()
            raise
        self.header_revision = resp.revision
        return resp.revision

    def _remove_candidate(self, key: bytes, s: Session) -> None:
        """Best effort: delete `key` if it carries our lease; end an owned session."""
        try:
            self.client.txn([compare_lease(key, "=", s.lease_id)], [op_delete(key)])
            self._end_owned_session()
        except errors.ShmwatchError:
            pass  # the client is gone: so is a bound lease, and its key with it

    def _withdraw(self) -> None:
        try:
            self.resign()
        except errors.ShmwatchError:
            self.key, self._leader_session = None, None

    def proclaim(self, value) -> int:
        """Change the leader's value without an election; returns its revision.
        `ElectionNotLeaderError` if this candidate is not (or no longer) the leader."""
        s = self._leader_session
        if s is None or self.key is None:
            raise errors.ElectionNotLeaderError()
        resp = self.client.txn([compare_create(self.key, "=", self.revision)],
                               [op_put(self.key, to_bytes(value, "value"), lease=s.lease_id)])
        if not resp.succeeded:
            self.key = None
            raise errors.ElectionNotLeaderError()
        self.header_revision = resp.revision
        return resp.revision

    def resign(self) -> int:
        """Give up leadership (or the candidacy): delete our key if it is still ours;
        an owned session is revoked. Returns the revision (0: nothing to resign)."""
        if self._leader_session is None:
            return 0
        key, self.key, self._leader_session = self.key, None, None
        try:
            resp = self.client.txn([compare_create(key, "=", self.revision)], [op_delete(key)])
            self.header_revision = resp.revision
            return resp.revision
        finally:
            self._end_owned_session()

    def is_leader(self) -> bool:
        """Whether our key is the leader's now (one read at the broker)."""
        if self.key is None:
            return False
        resp = _oldest(self.client, self.prefix)
        return bool(resp.kvs) and resp.kvs[0].key == self.key

    def leader(self, *, timeout: float | None = None) -> RangeResponse:
        """The current leader as etcd's Leader(): a RangeResponse whose `kvs[0]` is the
        leader's key and value. `ElectionNoLeaderError` if there is none."""
        resp = _oldest(self.client, self.prefix, timeout)
        if not resp.kvs:
            raise errors.ElectionNoLeaderError()
        return resp

    def observe(self, timeout: float | None = None, *,
                cancel=None) -> Iterator[RangeResponse]:
        """etcd's Observe: an iterator of RangeResponses, one per leader and one per
        value a leader proclaims, in order (the first is the leader now, or the next
        one; `count` is 0, as in etcd's). `timeout`: the longest wait for the next one
        (`Timeout`; None: forever); `cancel` (a threading.Event) set ends it with
        `RecipeCancelled`. Closing the iterator (or leaving a `for`) cancels its watch."""
        while True:
            resp = _oldest(self.client, self.prefix)
            if resp.kvs:
                kv, rev = resp.kvs[0], resp.revision
            else:
                kv = self._next_put(resp.revision, timeout, cancel)
                rev = kv.mod_revision
            yield RangeResponse(revision=rev, kvs=[kv])
            yield from self._follow(kv.key, rev + 1, timeout, cancel)

    def _waiting(self, timeout: float | None, cancel) -> _Deadline:
        return _Deadline(timeout, None, f"observe {self.name.decode(errors='replace')!r}: "
                         "nothing new", cancel, errors.Timeout)

    def _next_put(self, revision: int, timeout: float | None, cancel):
        """The first key put under the prefix from `revision` on (no leader yet)."""
        with self.client.watch(self.prefix, prefix=True, start_revision=revision) as w:
            while True:
                for ev in self._waiting(timeout, cancel).get(w).events:
                    if ev.type == PUT:
                        return ev.kv

    def _follow(self, key: bytes, revision: int, timeout: float | None, cancel):
        """The leader's proclamations until its key is deleted."""
        with self.client.watch(key, start_revision=revision) as w:
            while True:
                wr = self._waiting(timeout, cancel).get(w)
                for ev in wr.events:
                    if ev.type == DELETE:
                        return
                    yield RangeResponse(revision=wr.revision, kvs=[ev.kv])

    def __repr__(self) -> str:
        return f"<Election {self.name!r}{' key=' + repr(self.key) if self.key else ''}>"


__all__ = ["DEFAULT_SESSION_TTL", "Election", "Lock", "Session", "wait_deletes"]
