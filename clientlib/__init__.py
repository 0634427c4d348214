"""clientlib: attach a worker process to a shmwatch broker.

    import clientlib
    with clientlib.connect("mybroker") as c:
        c.put("config/a", "1")
        for resp in c.watch("config/", prefix=True, start_revision=1):
            ...

Semantics are etcd v3's: see the README and `shmwatch.wire.types`.
"""

from shmwatch import __version__  # noqa: F401  (clientlib.__version__)
from shmwatch.wire.errors import (
    BrokerUnavailable,
    ClientClosed,
    CompactedError,
    DuplicateKeyError,
    DuplicateWatchIdError,
    ElectionNoLeaderError,
    ElectionNotLeaderError,
    EmptyKeyError,
    FutureRevisionError,
    InheritedWatchError,
    InvalidRangeError,
    KeyNotFoundError,
    LeaseExistsError,
    LeaseNotFoundError,
    LeaseProvidedError,
    LeaseTTLTooLargeError,
    LockedError,
    LockLostError,
    LockReleasedError,
    NoSpaceError,
    PermissionDenied,
    ProtocolError,
    RecipeCancelled,
    RecipeTimeout,
    RequestTooLargeError,
    ResponseTooLargeError,
    SessionExpiredError,
    ShmwatchError,
    Timeout,
    TooManyClientsError,
    TooManyLeasesError,
    TooManyOpsError,
    TooManyWatchersError,
    ValueProvidedError,
    WatchClosed,
)
from shmwatch.wire.ops import (
    Compare,
    compare_create,
    compare_lease,
    compare_mod,
    compare_value,
    compare_version,
    op_delete,
    op_get,
    op_put,
    op_txn,
    prefix_range_end,
)
from shmwatch.wire.types import (
    DELETE,
    PUT,
    CompactResponse,
    DeleteRangeResponse,
    Event,
    KeyValue,
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    LeaseLeasesResponse,
    LeaseRevokeResponse,
    LeaseTimeToLiveResponse,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchResponse,
)

from .client import Client, Watch, connect
from .lease import Lease
from .pipeline import Pipeline, WriteFuture
from .watch import wait_any

__all__ = [
    "Client", "Lease", "Pipeline", "Watch", "WriteFuture", "connect", "wait_any",
    "BrokerUnavailable", "ClientClosed", "CompactedError", "DuplicateKeyError",
    "DuplicateWatchIdError", "EmptyKeyError", "FutureRevisionError", "InheritedWatchError",
    "InvalidRangeError", "KeyNotFoundError", "LeaseExistsError", "LeaseNotFoundError",
    "LeaseProvidedError", "LeaseTTLTooLargeError", "NoSpaceError", "PermissionDenied",
    "ProtocolError", "RequestTooLargeError", "ResponseTooLargeError", "ShmwatchError",
    "Timeout", "TooManyClientsError", "TooManyLeasesError", "TooManyOpsError",
    "TooManyWatchersError",
    "ValueProvidedError", "WatchClosed",
    "ElectionNoLeaderError", "ElectionNotLeaderError", "LockedError", "LockLostError",
    "LockReleasedError", "RecipeCancelled", "RecipeTimeout", "SessionExpiredError",
    "Compare", "compare_create", "compare_lease", "compare_mod", "compare_value",
    "compare_version", "op_delete", "op_get", "op_put", "op_txn", "prefix_range_end",
    "DELETE", "PUT", "CompactResponse", "DeleteRangeResponse", "Event", "KeyValue",
    "LeaseGrantResponse", "LeaseKeepAliveResponse", "LeaseLeasesResponse",
    "LeaseRevokeResponse", "LeaseTimeToLiveResponse",
    "PutResponse", "RangeResponse", "TxnResponse", "WatchResponse",
]
