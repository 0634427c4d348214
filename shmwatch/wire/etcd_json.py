"""etcd's v3 JSON shapes <-> shmwatch's wire types.

The shapes are those of etcd's grpc-gateway (snake_case field names, int64 as strings,
bytes base64, zero fields omitted), which is also what protobuf's `MessageToDict(msg,
preserving_proto_field_name=True)` gives for etcd's gRPC messages: the differential
tests' gateway client and the mirroring broker's gRPC session (broker/upstream.py)
convert through the same functions. Standard library only.
"""

from __future__ import annotations

import base64
import json

from . import errors as E
from .ops import Compare, DeleteOp, PutOp, RangeOp, TxnOp
from .types import (
    DELETE,
    PUT,
    DeleteRangeResponse,
    Event,
    KeyValue,
    LeaseLeasesResponse,
    LeaseTimeToLiveResponse,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchResponse,
)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _int(obj: dict, name: str) -> int:
    return int(obj.get(name, 0) or 0)


def _header_rev(obj: dict) -> int:
    return _int(obj.get("header") or {}, "revision")


def kv_from_json(obj: dict | None) -> KeyValue | None:
    if obj is None:
        return None
    return KeyValue(
        key=_unb64(obj.get("key")),
        value=_unb64(obj.get("value")),
        create_revision=_int(obj, "create_revision"),
        mod_revision=_int(obj, "mod_revision"),
        version=_int(obj, "version"),
        lease=_int(obj, "lease"),
    )


def event_from_json(obj: dict) -> Event:
    etype = DELETE if obj.get("type") == "DELETE" else PUT
    return Event(etype, kv_from_json(obj.get("kv") or {}), kv_from_json(obj.get("prev_kv")))


def _error_classes() -> dict[str, type[E.ShmwatchError]]:
    out: dict[str, type[E.ShmwatchError]] = {}
    for cls in E.ERRORS_BY_CODE.values():
        out.setdefault(cls.default_message, cls)
    return out


ERROR_BY_MESSAGE = _error_classes()


class EtcdError(E.ShmwatchError):
    """An etcd error whose text matches none of clientlib's classes (keeps text and code)."""

    def __init__(self, message: str, grpc_code: int = 0):
        super().__init__(message)
        self.grpc_code = grpc_code


def error_from_json(obj: dict) -> E.ShmwatchError:
    message = obj.get("message") or obj.get("error") or ""
    if not isinstance(message, str):
        message = json.dumps(message)
    cls = ERROR_BY_MESSAGE.get(message)
    err = cls(message) if cls is not None else EtcdError(message, int(obj.get("code", 0) or 0))
    err.grpc_code = int(obj.get("code", 0) or 0)
    return err


def _range_fields(key: bytes, end: bytes | None) -> dict:
    out = {"key": _b64(key)}
    if end is not None:
        out["range_end"] = _b64(end)
    return out


def put_json(op: PutOp) -> dict:
    out = {"key": _b64(op.key)}
    if op.value:
        out["value"] = _b64(op.value)
    if op.prev_kv:
        out["prev_kv"] = True
    if op.ignore_value:
        out["ignore_value"] = True
    if op.lease:
        out["lease"] = str(op.lease)
    if op.ignore_lease:
        out["ignore_lease"] = True
    return out


def range_json(op: RangeOp) -> dict:
    out = _range_fields(op.key, op.range_end)
    if op.revision:
        out["revision"] = op.revision
    if op.limit:
        out["limit"] = op.limit
    if op.keys_only:
        out["keys_only"] = True
    if op.count_only:
        out["count_only"] = True
    if op.sort_order != "NONE":
        out["sort_order"] = op.sort_order
    if op.sort_target != "KEY":
        out["sort_target"] = op.sort_target
    for field in ("min_mod_revision", "max_mod_revision", "min_create_revision",
                  "max_create_revision"):
        if getattr(op, field):
            out[field] = getattr(op, field)
    return out


def delete_json(op: DeleteOp) -> dict:
    out = _range_fields(op.key, op.range_end)
    if op.prev_kv:
        out["prev_kv"] = True
    return out


_COMPARE_FIELD = {
    "VALUE": "value",
    "VERSION": "version",
    "CREATE": "create_revision",
    "MOD": "mod_revision",
    "LEASE": "lease",
}


def compare_json(cmp: Compare) -> dict:
    out = {"result": cmp.result, "target": cmp.target, "key": _b64(cmp.key)}
    field = _COMPARE_FIELD[cmp.target]
    out[field] = _b64(cmp.value) if cmp.target == "VALUE" else str(int(cmp.value))
    if cmp.range_end is not None:
        out["range_end"] = _b64(cmp.range_end)
    return out


def op_json(op) -> dict:
    if isinstance(op, PutOp):
        return {"request_put": put_json(op)}
    if isinstance(op, RangeOp):
        return {"request_range": range_json(op)}
    if isinstance(op, DeleteOp):
        return {"request_delete_range": delete_json(op)}
    if isinstance(op, TxnOp):
        return {"request_txn": txn_json(op.compare, op.success, op.failure)}
    raise TypeError(f"not a txn op: {op!r}")


def txn_json(compare, success, failure) -> dict:
    out: dict = {}
    if compare:
        out["compare"] = [compare_json(c) for c in compare]
    if success:
        out["success"] = [op_json(o) for o in success]
    if failure:
        out["failure"] = [op_json(o) for o in failure]
    return out


def put_response(obj: dict) -> PutResponse:
    return PutResponse(_header_rev(obj), kv_from_json(obj.get("prev_kv")))


def range_response(obj: dict) -> RangeResponse:
    return RangeResponse(
        _header_rev(obj),
        [kv_from_json(kv) for kv in obj.get("kvs") or []],
        _int(obj, "count"),
        bool(obj.get("more", False)),
    )


def delete_response(obj: dict) -> DeleteRangeResponse:
    return DeleteRangeResponse(
        _header_rev(obj), _int(obj, "deleted"), [kv_from_json(kv) for kv in obj.get("prev_kvs") or []]
    )


def txn_response(obj: dict) -> TxnResponse:
    inner = []
    for r in obj.get("responses") or []:
        if "response_put" in r:
            inner.append(put_response(r["response_put"]))
        elif "response_range" in r:
            inner.append(range_response(r["response_range"]))
        elif "response_delete_range" in r:
            inner.append(delete_response(r["response_delete_range"]))
        elif "response_txn" in r:
            inner.append(txn_response(r["response_txn"]))
        else:
            raise E.ProtocolError(f"unknown txn response op: {r!r}")
    return TxnResponse(_header_rev(obj), bool(obj.get("succeeded", False)), inner)


def lease_time_to_live_response(obj: dict) -> LeaseTimeToLiveResponse:
    # etcd lists the keys in its lease's map order (random): the API promises them sorted
    return LeaseTimeToLiveResponse(
        _header_rev(obj), _int(obj, "ID"), _int(obj, "TTL"), _int(obj, "grantedTTL"),
        sorted(_unb64(k) for k in obj.get("keys") or []),
    )


def lease_leases_response(obj: dict) -> LeaseLeasesResponse:
    # etcd lists leases by expiry time, soonest first (so does the broker)
    return LeaseLeasesResponse(_header_rev(obj), [_int(x, "ID") for x in obj.get("leases") or []])


def watch_response_from_json(obj: dict) -> WatchResponse:
    return WatchResponse(
        watch_id=_int(obj, "watch_id"),
        revision=_header_rev(obj),
        events=[event_from_json(ev) for ev in obj.get("events") or []],
        created=bool(obj.get("created", False)),
        canceled=bool(obj.get("canceled", False)),
        compact_revision=_int(obj, "compact_revision"),
        cancel_reason=obj.get("cancel_reason", "") or "",
        fragment=bool(obj.get("fragment", False)),
    )
