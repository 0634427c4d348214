"""Typed errors a client sees. Messages are etcd's texts where etcd has one.

Each error class carries a stable numeric `code` used on the wire, so the broker can
send an error and the client can raise the same class.
"""

from __future__ import annotations


class ShmwatchError(Exception):
    """Base of every error shmwatch raises to users."""

    code = 1
    default_message = "shmwatch: error"
    #: integer attributes that travel with the error on the wire (see `wire_fields`)
    fields: tuple[str, ...] = ()

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)

    def wire_fields(self) -> dict[str, int]:
        """The error's extra integer attributes, for the wire."""
        return {f: getattr(self, f, 0) for f in self.fields}

    @property
    def message(self) -> str:
        """The error's text (etcd's where etcd has one)."""
        return str(self.args[0]) if self.args else self.default_message


class BrokerUnavailable(ShmwatchError):
    """The broker is not running, died, or was replaced by another broker instance."""

    code = 2
    default_message = "shmwatch: broker unavailable"


class PermissionDenied(BrokerUnavailable, PermissionError):
    """The broker's segments belong to another user (or group) and do not let us in."""

    code = 24
    default_message = "shmwatch: permission denied"


class Timeout(ShmwatchError, TimeoutError):
    """A blocking call ran out of time (the broker is alive but did not answer in time)."""

    code = 3
    default_message = "shmwatch: timed out"


class CompactedError(ShmwatchError):
    """The revision asked for is older than the compaction point (a read at a past
    revision, or a watch that needs history the log no longer holds). `compact_revision`
    is that point when known (a watch's compaction cancel carries it; etcd's range
    error does not, so there it is 0)."""

    code = 10
    default_message = "etcdserver: mvcc: required revision has been compacted"
    fields = ("compact_revision",)

    def __init__(self, message: str | None = None, compact_revision: int = 0):
        super().__init__(message)
        self.compact_revision = compact_revision


class FutureRevisionError(ShmwatchError):
    """A read at a revision the store has not reached yet."""

    code = 11
    default_message = "etcdserver: mvcc: required revision is a future revision"


class EmptyKeyError(ShmwatchError):
    """A request without a key (etcd requires one, even for a range)."""

    code = 12
    default_message = "etcdserver: key is not provided"


class KeyNotFoundError(ShmwatchError):
    """put(ignore_value=True) on a key that does not exist."""

    code = 13
    default_message = "etcdserver: key not found"


class ValueProvidedError(ShmwatchError):
    """put(ignore_value=True) with a non-empty value."""

    code = 14
    default_message = "etcdserver: value is provided"


class DuplicateKeyError(ShmwatchError):
    """A txn writes the same key twice (or a put overlaps a delete range)."""

    code = 15
    default_message = "etcdserver: duplicate key given in txn request"


class TooManyOpsError(ShmwatchError):
    """A txn with more operations than etcd allows (--max-txn-ops, 128)."""

    code = 16
    default_message = "etcdserver: too many operations in txn request"


class RequestTooLargeError(ShmwatchError):
    """A request larger than the broker's --max-request-bytes (1.5 MiB by default)."""

    code = 17
    default_message = "etcdserver: request is too large"


class InvalidRangeError(ShmwatchError):
    """A watch whose key >= range_end (etcd: mvcc: watcher range is empty)."""

    code = 18
    default_message = "mvcc: watcher range is empty"


class DuplicateWatchIdError(ShmwatchError):
    """A watch asked for a watch_id this client already uses."""

    code = 19
    default_message = "mvcc: duplicate watch ID provided on the WatchStream"


class ProtocolError(ShmwatchError):
    """A malformed request or response: a bug or corruption, never user input."""

    code = 20
    default_message = "shmwatch: protocol error"


class TooManyWatchersError(ShmwatchError):
    """This client has as many watches open as the broker allows."""

    code = 21
    default_message = "shmwatch: too many watchers for this client"


class TooManyClientsError(ShmwatchError):
    """Every client slot of the broker (--max-clients) is taken."""

    code = 22
    default_message = "shmwatch: every client slot of the broker is taken"


class ResponseTooLargeError(ShmwatchError):
    """A reply larger than the broker's --max-response-bytes (a range over too much
    data). `revision` is non-zero when the request changed the store anyway (a txn that
    wrote and also read too much): it was applied at that revision."""

    code = 25
    default_message = "shmwatch: response is too large"
    fields = ("revision",)

    def __init__(self, message: str | None = None, revision: int = 0):
        super().__init__(message)
        self.revision = revision

    @classmethod
    def for_reply(cls, size: int, limit: int, applied_rev: int) -> "ResponseTooLargeError":
        applied = (f"; the request changed the store: it was applied at revision {applied_rev}"
                   if applied_rev else "")
        return cls(f"shmwatch: response of {size} bytes exceeds the broker's "
                   f"--max-response-bytes {limit} (use limit, keys_only, count_only or a "
                   f"narrower range){applied}", applied_rev)


class InheritedWatchError(ShmwatchError):
    """A `Watch` used in a process forked after it was created: it belongs to the
    process that created it (whose ring it reads). Create a new watch in this process."""

    code = 26
    default_message = "shmwatch: this watch was created in another process before fork()"


class ClientClosed(ShmwatchError):
    """The client was closed by `close()` (or its `with` block ended): you closed it.
    (Not a `BrokerUnavailable`: the broker may be fine; reconnecting would not help.)"""

    code = 27
    default_message = "shmwatch: client is closed"


class NoSpaceError(ShmwatchError):
    """/dev/shm has no room for the rings the broker would create for this client (its
    request and response rings at registration, an arena of watch rings for a watch).
    The message says how many bytes were needed and which broker option to shrink."""

    code = 28
    default_message = "shmwatch: /dev/shm is full"


class LeaseNotFoundError(ShmwatchError):
    """etcd's ErrLeaseNotFound: the lease does not exist (never granted, revoked, or
    expired), in a revoke or in a put that attaches it."""

    code = 29
    default_message = "etcdserver: requested lease not found"


class LeaseExistsError(ShmwatchError):
    """etcd's ErrLeaseExist: a grant asked for an id that is already granted."""

    code = 30
    default_message = "etcdserver: lease already exists"


class LeaseProvidedError(ShmwatchError):
    """etcd's ErrGRPCLeaseProvided: a put with ignore_lease=True also names a lease."""

    code = 31
    default_message = "etcdserver: lease is provided"


class LeaseTTLTooLargeError(ShmwatchError):
    """etcd's ErrLeaseTTLTooLarge: a grant's TTL is over etcd's MaxLeaseTTL (9e9 s)."""

    code = 32
    default_message = "etcdserver: too large lease TTL"


class TooManyLeasesError(ShmwatchError):
    """The broker holds its --max-leases leases already: revoke some, or raise it."""

    code = 33
    default_message = "shmwatch: too many leases"

    @classmethod
    def limit(cls, n: int) -> "TooManyLeasesError":
        return cls(f"shmwatch: too many leases (the broker's --max-leases is {n})")


class WatchClosed(ShmwatchError):
    """The watch was cancelled (by you, by compaction, or by the broker); iteration ends."""

    code = 23
    default_message = "shmwatch: watch closed"


class UpstreamUnavailable(Timeout):
    """A mirroring broker could not get an answer from its etcd cluster in time (every
    endpoint down, or no leader): the request was not acknowledged. A write may or may
    not have been applied by etcd; read the key to find out (as with etcd's own
    "context deadline exceeded")."""

    code = 34
    default_message = "shmwatch: etcd upstream unavailable"


# ---------------------------------------------------------------- coordination recipes
# (clientlib.concurrency; raised by the client itself, never sent by the broker)


class LockedError(ShmwatchError):
    """etcd's ErrLocked: `Lock.acquire(blocking=False)` found the lock held (TryLock)."""

    code = 40
    default_message = "mutex: Locked by another session"


class SessionExpiredError(ShmwatchError):
    """etcd's ErrSessionExpired: the session's lease ended (revoked, expired, or its
    bound client went), so a lock or a campaign built on it is not held."""

    code = 41
    default_message = "mutex: session is expired"


class LockLostError(SessionExpiredError):
    """A held lock's key vanished before `release()` (its session's lease ended, or
    someone deleted it): the critical section was not protected to its end."""

    code = 42
    default_message = "mutex: session is expired: the lock was lost while held"


class LockReleasedError(ShmwatchError):
    """etcd's ErrLockReleased: `release()` of a lock that is not held."""

    code = 43
    default_message = "mutex: lock has already been released"


class ElectionNotLeaderError(ShmwatchError):
    """etcd's ErrElectionNotLeader: `proclaim()` by a candidate that is not the leader."""

    code = 44
    default_message = "election: not leader"


class ElectionNoLeaderError(ShmwatchError):
    """etcd's ErrElectionNoLeader: `leader()` of an election nobody holds."""

    code = 45
    default_message = "election: no leader"


class RecipeTimeout(Timeout):
    """`Lock.acquire(timeout=...)` or `Election.campaign(timeout=...)` ran out of time;
    the waiter's key was removed (etcd's Lock/Campaign after its context's deadline)."""

    code = 46
    default_message = "shmwatch: not acquired within the timeout"


class RecipeCancelled(ShmwatchError):
    """A wait of a lock, a campaign or an observer was cancelled through its `cancel`
    event (etcd's context cancellation, with its text); a waiter's key was removed."""

    code = 47
    default_message = "context canceled"


ERRORS_BY_CODE: dict[int, type[ShmwatchError]] = {
    cls.code: cls
    for cls in (
        ShmwatchError,
        BrokerUnavailable,
        PermissionDenied,
        Timeout,
        CompactedError,
        FutureRevisionError,
        EmptyKeyError,
        KeyNotFoundError,
        ValueProvidedError,
        DuplicateKeyError,
        TooManyOpsError,
        RequestTooLargeError,
        InvalidRangeError,
        DuplicateWatchIdError,
        ProtocolError,
        TooManyWatchersError,
        TooManyClientsError,
        NoSpaceError,
        WatchClosed,
        ResponseTooLargeError,
        InheritedWatchError,
        ClientClosed,
        LeaseNotFoundError,
        LeaseExistsError,
        LeaseProvidedError,
        LeaseTTLTooLargeError,
        TooManyLeasesError,
        UpstreamUnavailable,
        LockedError,
        SessionExpiredError,
        LockLostError,
        LockReleasedError,
        ElectionNotLeaderError,
        ElectionNoLeaderError,
        RecipeTimeout,
        RecipeCancelled,
    )
}


def error_from_code(code: int, message: str | None,
                    fields: dict | None = None) -> ShmwatchError:
    """Rebuild the typed error the broker reported (with its wire fields, if any)."""
    exc = ERRORS_BY_CODE.get(code, ShmwatchError)(message)
    if fields:
        for name in exc.fields:
            value = fields.get(name)
            if type(value) is int:
                setattr(exc, name, value)
    return exc
