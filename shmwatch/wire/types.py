"""The values users see: etcd v3's KeyValue, Event, and responses, as plain dataclasses.

Field names and meanings follow etcd's `mvccpb` and `etcdserverpb` messages, so code
written against etcd reads the same here. Keys and values are always bytes.
This module owns no I/O and no wire format (see `shmwatch.wire.protocol`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

PUT = "PUT"
DELETE = "DELETE"


class KeyValue(NamedTuple):
    """etcd's mvccpb.KeyValue. `version` is 1 at creation, +1 per put, reset by delete.

    A NamedTuple: immutable, cheap to build on the write path, and msgpack packs it as
    the wire array `[key, value, create_revision, mod_revision, version, lease]` as is.
    """

    key: bytes
    value: bytes = b""
    create_revision: int = 0
    mod_revision: int = 0
    version: int = 0
    lease: int = 0


class Event(NamedTuple):
    """etcd's mvccpb.Event. A DELETE carries the key with mod_revision = the deleting revision."""

    type: str
    kv: KeyValue
    prev_kv: KeyValue | None = None


@dataclass(slots=True)
class PutResponse:
    """etcd's PutResponse: the revision of the put, and the previous KeyValue when
    asked for with prev_kv=True (None if the key did not exist)."""

    revision: int
    prev_kv: KeyValue | None = None


@dataclass(slots=True)
class RangeResponse:
    """etcd's RangeResponse: the store's revision, the KeyValues found (in key order,
    at most `limit`), how many keys the range holds, and whether `limit` cut some."""

    revision: int
    kvs: list[KeyValue] = field(default_factory=list)
    count: int = 0
    more: bool = False


@dataclass(slots=True)
class DeleteRangeResponse:
    """etcd's DeleteRangeResponse: the revision, how many keys were deleted, and their
    KeyValues when asked for with prev_kv=True."""

    revision: int
    deleted: int = 0
    prev_kvs: list[KeyValue] = field(default_factory=list)


@dataclass(slots=True)
class TxnResponse:
    """etcd's TxnResponse: the revision, whether every compare held, and one response
    per op of the branch that ran (PutResponse, RangeResponse, ... in op order)."""

    revision: int
    succeeded: bool
    responses: list = field(default_factory=list)


@dataclass(slots=True)
class CompactResponse:
    """etcd's CompactionResponse: the store's revision when it compacted."""

    revision: int


@dataclass(slots=True)
class LeaseGrantResponse:
    """etcd's LeaseGrantResponse: the lease's id and the TTL granted (a TTL under the
    broker's minimum is granted as the minimum, as etcd does). `revision` is the
    header's: a grant does not change the store."""

    revision: int
    id: int
    ttl: int


@dataclass(slots=True)
class LeaseRevokeResponse:
    """etcd's LeaseRevokeResponse: the revision after the revoke (the keys it deleted
    share one new revision; a lease without keys leaves the revision alone)."""

    revision: int


@dataclass(slots=True)
class LeaseKeepAliveResponse:
    """etcd's LeaseKeepAliveResponse: the TTL the lease was renewed to; 0 if the lease
    does not exist (any more): what etcd answers, not an error."""

    revision: int
    id: int
    ttl: int


@dataclass(slots=True)
class LeaseTimeToLiveResponse:
    """etcd's LeaseTimeToLiveResponse: seconds left (`ttl`, -1 if the lease does not
    exist, as etcd), the TTL it was granted with, and its keys (sorted) when asked."""

    revision: int
    id: int
    ttl: int
    granted_ttl: int = 0
    keys: list[bytes] = field(default_factory=list)


@dataclass(slots=True)
class LeaseLeasesResponse:
    """etcd's LeaseLeasesResponse: the ids of every lease that exists, soonest to expire
    first (etcd's order)."""

    revision: int
    leases: list[int] = field(default_factory=list)


@dataclass(slots=True)
class WatchResponse:
    """One etcd WatchResponse as delivered to a watch.

    `revision` is the response header's revision. A progress response (answer to
    `Client.request_progress()`) has `watch_id == -1` as in etcd 3.4, and no events.
    """

    watch_id: int
    revision: int
    events: list[Event] = field(default_factory=list)
    created: bool = False
    canceled: bool = False
    compact_revision: int = 0
    cancel_reason: str = ""
    fragment: bool = False

    @property
    def is_progress_notify(self) -> bool:
        """True for a response that only reports progress (clientv3's IsProgressNotify)."""
        return (
            not self.events
            and not self.canceled
            and not self.created
            and self.compact_revision == 0
            and self.revision != 0
        )
