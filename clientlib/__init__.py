"""clientlib: attach a worker process to a shmwatch broker.

    import clientlib
    with clientlib.connect("mybroker") as c:
        c.put("config/a", "1")
        for resp in c.watch("config/", prefix=True, start_revision=1):
            ...

Semantics are etcd v3's: see the README and `clientlib.types`.
"""

from .client import Client, Watch, connect
from .errors import (
    BrokerUnavailable,
    CompactedError,
    DuplicateKeyError,
    DuplicateWatchIdError,
    EmptyKeyError,
    FutureRevisionError,
    InvalidRangeError,
    KeyNotFoundError,
    NoSpaceError,
    PermissionDenied,
    ProtocolError,
    RequestTooLargeError,
    ShmwatchError,
    Timeout,
    TooManyClientsError,
    TooManyOpsError,
    TooManyWatchersError,
    ValueProvidedError,
    WatchClosed,
)
from .ops import (
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
from .types import (
    DELETE,
    PUT,
    CompactResponse,
    DeleteRangeResponse,
    Event,
    KeyValue,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchResponse,
)

__all__ = [
    "Client", "Watch", "connect",
    "BrokerUnavailable", "CompactedError", "DuplicateKeyError", "DuplicateWatchIdError",
    "EmptyKeyError", "FutureRevisionError", "InvalidRangeError", "KeyNotFoundError",
    "NoSpaceError", "PermissionDenied",
    "ProtocolError", "RequestTooLargeError", "ShmwatchError", "Timeout", "TooManyClientsError",
    "TooManyOpsError", "TooManyWatchersError",
    "ValueProvidedError", "WatchClosed",
    "Compare", "compare_create", "compare_lease", "compare_mod", "compare_value",
    "compare_version", "op_delete", "op_get", "op_put", "op_txn", "prefix_range_end",
    "DELETE", "PUT", "CompactResponse", "DeleteRangeResponse", "Event", "KeyValue",
    "PutResponse", "RangeResponse", "TxnResponse", "WatchResponse",
]
