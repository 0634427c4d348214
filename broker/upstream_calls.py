"""The requests a mirroring broker forwards to etcd, as gRPC calls (see broker/mirror.py).

Each function runs on one of the session's call threads and returns `(revision,
response)`: the revision the mirror must have applied before the reply goes out (0: no
need to wait), and the response as shmwatch's wire type. Requests and responses are
converted through etcd's JSON shapes (`shmwatch.wire.etcd_json`), so a forwarded call
answers exactly what etcd answered.
"""

from __future__ import annotations

import grpc
from google.protobuf.json_format import ParseDict
from pyetcd import etcdrpc

from shmwatch.wire.etcd_json import (
    _header_rev,
    _int,
    delete_json,
    delete_response,
    lease_leases_response,
    lease_time_to_live_response,
    put_json,
    put_response,
    range_json,
    range_response,
    txn_json,
    txn_response,
)
from shmwatch.wire.ops import DeleteOp, PutOp, RangeOp, TxnOp
from shmwatch.wire.protocol import OP_LEASE_KEEPALIVE, OP_LEASE_REVOKE, OP_LEASE_TTL
from shmwatch.wire.types import (
    CompactResponse,
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    LeaseRevokeResponse,
)

from .upstream import REQUIRE_LEADER, rpc_error, to_dict

# op type -> (gRPC method, request class, JSON builder, response converter)
KV_CALLS = {
    PutOp: ("Put", etcdrpc.PutRequest, put_json, put_response),
    DeleteOp: ("DeleteRange", etcdrpc.DeleteRangeRequest, delete_json, delete_response),
    RangeOp: ("Range", etcdrpc.RangeRequest, range_json, range_response),
}


def _kv(call, op):
    t = type(op)
    if t is TxnOp:
        req = ParseDict(txn_json(op.compare, op.success, op.failure), etcdrpc.TxnRequest())
        obj = to_dict(call("KV", "Txn", req, write=True))
        resp = txn_response(obj)
        return resp.revision, resp
    method, cls, build, convert = KV_CALLS[t]
    obj = to_dict(call("KV", method, ParseDict(build(op), cls()), write=t is not RangeOp))
    resp = convert(obj)
    # a write is answered once the mirror has it; a read of old history at once
    return (0 if t is RangeOp else _header_rev(obj)), resp


def forward_call(up, call, what: tuple):
    """Run one forwarded request (`what` as Mirror._forward names it)."""
    kind = what[0]
    if kind == "kv":
        return _kv(call, what[1])
    if kind == "confirm":
        return up.current_revision(call), None
    if kind == "compact":
        obj = to_dict(call("KV", "Compact", etcdrpc.CompactionRequest(
            revision=int(what[1]), physical=True), write=True))
        return 0, CompactResponse(_header_rev(obj))
    if kind == "grant":
        _, ttl, lease_id, _bound = what
        obj = to_dict(call("Lease", "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=ttl, ID=lease_id),
                           write=True))
        return 0, LeaseGrantResponse(_header_rev(obj), _int(obj, "ID"), _int(obj, "TTL"))
    _, op, lease_id, keys = what
    if op == OP_LEASE_REVOKE:
        obj = to_dict(call("Lease", "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease_id)))
        return _header_rev(obj), LeaseRevokeResponse(_header_rev(obj))
    if op == OP_LEASE_KEEPALIVE:
        return 0, keep_alive_once(up, lease_id)
    if op == OP_LEASE_TTL:
        obj = to_dict(call("Lease", "LeaseTimeToLive",
                           etcdrpc.LeaseTimeToLiveRequest(ID=lease_id, keys=bool(keys))))
        return 0, lease_time_to_live_response(obj)
    obj = to_dict(call("Lease", "LeaseLeases", etcdrpc.LeaseLeasesRequest()))
    return 0, lease_leases_response(obj)


def keep_alive_once(up, lease_id: int) -> LeaseKeepAliveResponse:
    """One keep-alive on a keep-alive stream of its own (TTL 0: no such lease)."""
    req = etcdrpc.LeaseKeepAliveRequest(ID=lease_id)

    last_exc = None
    for target in _targets(up):
        stub = etcdrpc.LeaseStub(up.channel(target))
        try:
            for resp in stub.LeaseKeepAlive(iter([req]), timeout=up.timeout,
                                            metadata=REQUIRE_LEADER):
                return LeaseKeepAliveResponse(resp.header.revision, resp.ID, resp.TTL)
            return LeaseKeepAliveResponse(0, lease_id, 0)
        except grpc.RpcError as exc:
            last_exc = exc
    raise rpc_error(last_exc)


def _targets(up):
    n = len(up.endpoints)
    return [up.endpoints[(up._current + i) % n] for i in range(n)]
