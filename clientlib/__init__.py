"""clientlib: attach a worker process to a shmwatch broker.

    import clientlib
    with clientlib.connect("mybroker") as c:
        c.put("config/a", "1")
        for resp in c.watch("config/", prefix=True, start_revision=1):
            ...

Semantics are etcd v3's: see the README and `clientlib.types`.
"""

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

from .client import Client, Watch, connect
from .errors import (
    BrokerUnavailable,
    ClientClosed,
    CompactedError,
    DuplicateKeyError,
    DuplicateWatchIdError,
    EmptyKeyError,
    FutureRevisionError,
    InheritedWatchError,
    InvalidRangeError,
    KeyNotFoundError,
    NoSpaceError,
    PermissionDenied,
    ProtocolError,
    RequestTooLargeError,
    ResponseTooLargeError,
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
    "BrokerUnavailable", "ClientClosed", "CompactedError", "DuplicateKeyError",
    "DuplicateWatchIdError", "EmptyKeyError", "FutureRevisionError", "InheritedWatchError",
    "InvalidRangeError", "KeyNotFoundError", "NoSpaceError", "PermissionDenied",
    "ProtocolError", "RequestTooLargeError", "ResponseTooLargeError", "ShmwatchError",
    "Timeout", "TooManyClientsError", "TooManyOpsError", "TooManyWatchersError",
    "ValueProvidedError", "WatchClosed",
    "Compare", "compare_create", "compare_lease", "compare_mod", "compare_value",
    "compare_version", "op_delete", "op_get", "op_put", "op_txn", "prefix_range_end",
    "DELETE", "PUT", "CompactResponse", "DeleteRangeResponse", "Event", "KeyValue",
    "PutResponse", "RangeResponse", "TxnResponse", "WatchResponse",
]
