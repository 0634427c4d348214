"""The etcd API as blocking calls: each verb runs its flow (clientlib.flows) through
`_run`, the blocking driver; `Client` supplies the connection (`_call`, `_call_many`).
clientlib.aio drives the same flows with awaits."""

from __future__ import annotations

from collections.abc import Iterable

from shm.errors import ShmError
from shmwatch.wire import errors
from shmwatch.wire.ops import op_delete, op_get
from shmwatch.wire.types import (
    CompactResponse,
    DeleteRangeResponse,
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
    flow_progress,
    flow_put,
    flow_put_many,
    flow_txn,
    flow_watch,
    watch_spec,
)
from .watch import Watch


class Calls:
    """put, get, delete, txn, compact, put_many, watch, request_progress (mixed into
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

    def put(self, key, value, prev_kv: bool = False, ignore_value: bool = False, *,
            timeout: float | None = None) -> PutResponse:
        """etcd Put. O(log n) at the broker plus delivery to matching watchers."""
        return self._run(flow_put(key, value, prev_kv, ignore_value), timeout)

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

    def request_progress(self, *, timeout: float | None = None) -> None:
        """etcd's progress request: each watch receives a response (watch_id -1) whose
        header revision says the watch has seen everything up to it."""
        self._run(flow_progress(), timeout)
