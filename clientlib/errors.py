"""Typed errors a client sees. Messages are etcd's texts where etcd has one.

Each error class carries a stable numeric `code` used on the wire, so the broker can
send an error and the client can raise the same class.
"""

from __future__ import annotations


class ShmwatchError(Exception):
    """Base of every error shmwatch raises to users."""

    code = 1
    default_message = "shmwatch: error"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
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
    code = 10
    default_message = "etcdserver: mvcc: required revision has been compacted"


class FutureRevisionError(ShmwatchError):
    code = 11
    default_message = "etcdserver: mvcc: required revision is a future revision"


class EmptyKeyError(ShmwatchError):
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
    code = 16
    default_message = "etcdserver: too many operations in txn request"


class RequestTooLargeError(ShmwatchError):
    code = 17
    default_message = "etcdserver: request is too large"


class InvalidRangeError(ShmwatchError):
    """A watch whose key >= range_end (etcd: mvcc: watcher range is empty)."""

    code = 18
    default_message = "mvcc: watcher range is empty"


class DuplicateWatchIdError(ShmwatchError):
    code = 19
    default_message = "mvcc: duplicate watch ID provided on the WatchStream"


class ProtocolError(ShmwatchError):
    """A malformed request or response: a bug or corruption, never user input."""

    code = 20
    default_message = "shmwatch: protocol error"


class TooManyWatchersError(ShmwatchError):
    code = 21
    default_message = "shmwatch: too many watchers for this client"


class TooManyClientsError(ShmwatchError):
    code = 22
    default_message = "shmwatch: every client slot of the broker is taken"


class NoSpaceError(ShmwatchError):
    """/dev/shm has no room for the rings the broker would create for this client (its
    request and response rings at registration, an arena of watch rings for a watch).
    The message says how many bytes were needed and which broker option to shrink."""

    code = 25
    default_message = "shmwatch: /dev/shm is full"


class WatchClosed(ShmwatchError):
    """The watch was cancelled (by you, by compaction, or by the broker); iteration ends."""

    code = 23
    default_message = "shmwatch: watch closed"


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
    )
}


def error_from_code(code: int, message: str | None) -> ShmwatchError:
    """Rebuild the typed error the broker reported."""
    return ERRORS_BY_CODE.get(code, ShmwatchError)(message)
