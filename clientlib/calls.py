"""The etcd API as blocking calls: each verb runs its flow (clientlib.flows) through
`_run`, the blocking driver; `Client` supplies the connection (`_call`, `_call_many`).
clientlib.aio drives the same flows with awaits."""

from __future__ import annotations

from collections.abc import Iterable

from shm.errors import ShmError
from shmwatch.wire import errors
from shmwatch.wire.ops import op_delete, op_get
from shmwatch.wire.protocol import (
    OP_LEASE_KEEPALIVE,
    decode_put_response,
    OP_LEASE_LEASES,
    OP_LEASE_REVOKE,
    OP_LEASE_TTL,
)
from shmwatch.wire.types import (
    CompactResponse,
    DeleteRangeResponse,
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    LeaseLeasesResponse,
    LeaseRevokeResponse,
    LeaseTimeToLiveResponse,
    PutResponse,
    RangeResponse,
    TxnResponse,
)

from .attach import from_shm
from .flows import (
    Late,
    Pipelined,
    flow_compact,
    flow_create_watch,
    flow_kv,
    flow_lease,
    flow_lease_grant,
    flow_progress,
    flow_put,
    flow_put_many,
    flow_txn,
    flow_watch,
    put_message,
    watch_spec,
)
from .lease import Lease
from .pipeline import DEFAULT_WINDOW, Pipeline, WriteFuture, submit
from .watch import Watch


class Calls:
    """put, get, delete, txn, compact, put_many, watch, request_progress, the lease
    verbs (mixed into
    `Client`, which provides `name`, `_own`, `_call`, `_call_many`, `_watch_lock`)."""

    def _run(self, flow, timeout: float | None):
        """Drive `flow`: send each request it yields, hand it the reply (or raise the
        broker's error into it), and return what it returns."""
        try:
            return self._drive(flow, timeout)
        except ShmError as exc:
            raise from_shm(exc, self.name) from None

    def _drive(self, flow, timeout: float | None):
        try:
            msg = next(flow)
            while True:
                if isinstance(msg, Pipelined):
                    reply = self._call_many(msg.msgs, timeout)
                else:
                    try:
                        if isinstance(msg, Late):
                            reply = self._call(msg.msg, timeout, msg.on_late)
                        else:
                            reply = self._call(msg, timeout)
                    except errors.ShmwatchError as exc:
                        msg = flow.throw(exc)
                        continue
                msg = flow.send(reply)
        except StopIteration as stop:
            return stop.value

    def put(self, key, value, prev_kv: bool = False, ignore_value: bool = False,
            lease: int = 0, ignore_lease: bool = False, *,
            timeout: float | None = None) -> PutResponse:
        """etcd Put. `lease` (an id or a `Lease`) attaches the key to it, 0 detaches it;
        `ignore_lease` keeps the key's lease. O(log n) at the broker plus delivery to
        matching watchers."""
        return self._run(flow_put(key, value, prev_kv, ignore_value, lease, ignore_lease),
                         timeout)

    def put_async(self, key, value, prev_kv: bool = False, ignore_value: bool = False,
                  lease: int = 0, ignore_lease: bool = False, *,
                  timeout: float | None = None) -> WriteFuture:
        """`put` without waiting for the reply: sent at once (in call order), it returns
        a `concurrent.futures.Future` of the `PutResponse` (or the broker's error).
        At most `DEFAULT_WINDOW` (1,024) async writes of this client are in flight: the
        next one waits for the oldest reply. `timeout` bounds that wait and the send.
        See clientlib.pipeline."""
        return submit(self, put_message(key, value, prev_kv, ignore_value, lease, ignore_lease),
                      decode_put_response, self._inflight, DEFAULT_WINDOW, timeout)

    def pipeline(self, window: int = DEFAULT_WINDOW, *,
                 timeout: float | None = None) -> Pipeline:
        """Asynchronous writes with a window of their own: `with c.pipeline() as p:
        p.put(...)`, `p.delete(...)`, `p.txn(...)` return futures; leaving the block
        waits for every reply and raises the first failure (see clientlib.pipeline)."""
        return Pipeline(self, window, timeout)

    def put_many(self, items: Iterable[tuple], prev_kv: bool = False, *,
                 timeout: float | None = None) -> list[PutResponse]:
        """Pipelined puts: the same as `put(k, v)` for each (k, v) in order — each its own
        request and revision, as etcd would apply them — but written to the ring in one
        go with one wake-up of the broker.

        Every item is tried, in order, whatever happens to the others (an item too
        large to send, or refused by the broker, does not stop the ones after it from
        being applied). If any failed, raises the first failure's error type with a
        message naming the item, and with `.index` (that item's position) and
        `.results` (one `PutResponse` or error per item) set."""
        return self._run(flow_put_many(items, prev_kv), timeout)

    def get(self, key, range_end=None, prefix: bool = False, revision: int = 0,
            limit: int = 0, keys_only: bool = False, count_only: bool = False, *,
            sort_order: str = "none", sort_target: str = "key", min_mod_revision: int = 0,
            max_mod_revision: int = 0, min_create_revision: int = 0,
            max_create_revision: int = 0, timeout: float | None = None) -> RangeResponse:
        """etcd Range: one key, [key, range_end), a prefix, or every key >= key
        (range_end=b"\\0"), at the current or a retained past revision.

        As etcd's RangeRequest: `sort_order` none/ascend/descend and `sort_target`
        key/version/create/mod/value (a target other than key sorts ascending unless
        told), `min_`/`max_mod_revision` and `min_`/`max_create_revision` keep only the
        keys within those bounds (0: no bound); `count` still counts the whole range."""
        return self._run(flow_kv(op_get(
            key, range_end, prefix, revision, limit, keys_only, count_only,
            sort_order=sort_order, sort_target=sort_target, min_mod_revision=min_mod_revision,
            max_mod_revision=max_mod_revision, min_create_revision=min_create_revision,
            max_create_revision=max_create_revision)), timeout)

    def delete(self, key, range_end=None, prefix: bool = False, prev_kv: bool = False, *,
               timeout: float | None = None) -> DeleteRangeResponse:
        """etcd DeleteRange."""
        return self._run(flow_kv(op_delete(key, range_end, prefix, prev_kv)), timeout)

    def txn(self, compare: Iterable = (), success: Iterable = (), failure: Iterable = (), *,
            timeout: float | None = None) -> TxnResponse:
        """etcd Txn: if every compare holds, apply `success`, else `failure`, atomically at
        one revision. Build compares and ops with clientlib.compare_* and clientlib.op_*."""
        return self._run(flow_txn(compare, success, failure), timeout)

    def compact(self, revision: int, *, timeout: float | None = None) -> CompactResponse:
        """etcd Compact: forget history before `revision`."""
        return self._run(flow_compact(revision), timeout)

    # ------------------------------------------------------------ watches

    def watch(self, key, range_end=None, prefix: bool = False, start_revision: int = 0,
              prev_kv: bool = False, filters: Iterable[str] = (), progress_notify: bool = False,
              fragment: bool = False, watch_id: int | None = None, *,
              resume: bool = False, timeout: float | None = None) -> "Watch":
        """etcd Watch on one key, a range, a prefix or every key >= key.

        Returns a `Watch` whose first response is the `created` one. `watch_id` 0 or
        None picks the next free id; any other int64 (negative ones too, as etcd) is
        used as given. A refused watch (key >= range_end, a watch_id in use) yields
        etcd's created+canceled response with its reason, then iterating it raises the
        refusal (`InvalidRangeError`, `DuplicateWatchIdError`).
        With `resume=True` the watch survives a broker restart (see `reconnect()`).
        The watch belongs to this process (see the module docstring on fork).
        """
        self._own()
        spec, want = watch_spec(key, range_end, prefix, start_revision, prev_kv, filters,
                                progress_notify, fragment, watch_id)
        with self._watch_lock:  # one arena request at a time (their replies number them)
            return self._run(flow_watch(self, spec, want, resume), timeout)

    def _create_watch(self, spec: list, want_id: int, timeout: float | None):
        with self._watch_lock:
            return self._run(flow_create_watch(self, spec, want_id), timeout)

    # ------------------------------------------------------------ leases

    def lease_grant(self, ttl: int, lease_id: int = 0, *, bound: bool = False,
                    timeout: float | None = None) -> LeaseGrantResponse:
        """etcd LeaseGrant: a lease of `ttl` seconds (under the broker's --min-lease-ttl:
        granted as the minimum); `lease_id` 0 picks a fresh id. `bound=True` (not in
        etcd): the broker also revokes it when this client closes or its process dies;
        with ttl 0 it then has no TTL at all (see `lease()`)."""
        return self._run(flow_lease_grant(ttl, lease_id, bound), timeout)

    def lease_revoke(self, lease_id, *, timeout: float | None = None) -> LeaseRevokeResponse:
        """etcd LeaseRevoke: end the lease and delete its keys (one revision)."""
        return self._run(flow_lease(OP_LEASE_REVOKE, lease_id), timeout)

    def lease_keep_alive_once(self, lease_id, *,
                              timeout: float | None = None) -> LeaseKeepAliveResponse:
        """One etcd keep-alive: renew the lease to its full TTL. `ttl` is 0 if the lease
        does not exist any more (not an error, as etcd's server answers)."""
        return self._run(flow_lease(OP_LEASE_KEEPALIVE, lease_id), timeout)

    def lease_time_to_live(self, lease_id, keys: bool = False, *,
                           timeout: float | None = None) -> LeaseTimeToLiveResponse:
        """etcd LeaseTimeToLive: seconds left and the granted TTL (ttl -1: no such
        lease), and the lease's keys (sorted) with `keys=True`."""
        return self._run(flow_lease(OP_LEASE_TTL, lease_id, keys), timeout)

    def leases(self, *, timeout: float | None = None) -> LeaseLeasesResponse:
        """etcd LeaseLeases: the ids of every lease, soonest to expire first (etcd's
        order)."""
        return self._run(flow_lease(OP_LEASE_LEASES, 0), timeout)

    def lease(self, ttl: int = 0, *, bound: bool = False, lease_id: int = 0,
              keep_alive: bool = True, timeout: float | None = None) -> Lease:
        """Grant a lease and return it as a `Lease` (a context manager that revokes it
        on exit). With `keep_alive` a background thread renews it at a third of its TTL,
        as clientv3's KeepAlive. `bound=True`: revoked the moment this client closes or
        its process dies; `ttl=0` with `bound=True` lives exactly as long as this client
        (no TTL, no keep-alive needed)."""
        resp = self.lease_grant(ttl, lease_id, bound=bound, timeout=timeout)
        return Lease(self, resp, bound=bound, forever=bound and ttl <= 0,
                     keep_alive=keep_alive)

    def request_progress(self, *, timeout: float | None = None) -> None:
        """etcd's progress request: each watch receives a response (watch_id -1) whose
        header revision says the watch has seen everything up to it."""
        self._run(flow_progress(), timeout)
