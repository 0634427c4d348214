"""clientlib for asyncio: the same client, with awaitable calls and `async for` watches.

    from clientlib import aio

    async with aio.connect("mybroker") as c:          # or: c = await aio.connect(...)
        await c.put("config/a", "1")
        async for resp in c.watch("config/", prefix=True, start_revision=1):
            ...

Semantics, errors and limits are `clientlib.Client`'s (etcd v3's); only the waiting
differs. A POSIX semaphore (the client's doorbell) cannot be put in a selector, so each
`AsyncClient` has exactly one helper thread, whatever the number of its watches and
calls in flight: it sleeps on the doorbell and, when the broker wrote something the
event loop waits for (a reply, or a response of a watch somebody awaits), hands over to
the loop with `call_soon_threadsafe` and sleeps again once the loop has taken it. No
thread per watch or per call, no polling: an idle client costs nothing but one
50 ms liveness check per wait slice.

Cancelling a task that awaits a call or a watch (`task.cancel()`, `asyncio.timeout`)
behaves as asyncio users expect: the await raises `CancelledError`, a reply that
arrives later is dropped, and the client and the watch stay usable. A request that
was only partly written when cancelled is abandoned (an abort marker tells the broker to
drop it): it is never applied later, after newer writes. `timeout=` arguments raise
`clientlib.Timeout`, as the blocking client does.

An `AsyncClient` belongs to the event loop and process that created it (use one per
loop; across fork(), create a new one in the child).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable

from shmwatch.wire import errors
from shm.errors import ShmError

from . import forks
from .client import DEFAULT_TIMEOUT, WAIT_SLICE_S, Client, from_shm
from .flows import (
    Late,
    Pipelined,
    flow_compact,
    flow_kv,
    flow_lease,
    flow_lease_grant,
    flow_progress,
    flow_put,
    flow_put_many,
    flow_txn,
    flow_watch,
    watch_spec,
)
from .lease import AsyncLease
from .watch import Watch
from shmwatch.wire.ops import op_delete, op_get
from shmwatch.wire.protocol import (
    OP_LEASE_KEEPALIVE,
    OP_LEASE_LEASES,
    OP_LEASE_REVOKE,
    OP_LEASE_TTL,
    number,
    watch_cancel_request,
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
    WatchResponse,
)

__all__ = ["AsyncClient", "AsyncLease", "AsyncWatch", "connect"]

WRITE_RETRY_S = 0.0005  # the request ring is full (the broker is behind): retry after this


def connect(name: str, timeout: float = DEFAULT_TIMEOUT, **kwargs) -> "_Connecting":
    """Attach to the broker called `name` from asyncio: `c = await aio.connect(name)`, or
    `async with aio.connect(name) as c:`. `timeout` is the default for every call;
    other keyword arguments are `clientlib.connect`'s."""
    return _Connecting(name, timeout, kwargs)


class _Connecting:
    """Awaitable and async context manager returned by `connect()`."""

    def __init__(self, name: str, timeout: float, kwargs: dict):
        self._args = (name, timeout, kwargs)
        self._client: AsyncClient | None = None

    async def _open(self) -> "AsyncClient":
        name, timeout, kwargs = self._args
        loop = asyncio.get_running_loop()
        # Registration waits for the broker (bounded by `timeout`): off the loop.
        sync = await loop.run_in_executor(None, lambda: Client(name, timeout=timeout, **kwargs))
        return AsyncClient(sync, loop)

    def __await__(self):
        return self._open().__await__()

    async def __aenter__(self) -> "AsyncClient":
        self._client = await self._open()
        return self._client

    async def __aexit__(self, *exc) -> None:
        if self._client is not None:
            await self._client.close()


class AsyncClient:
    """A `clientlib.Client` driven from an asyncio event loop (see the module docstring).

    Every call takes `timeout=` (default: the client's) and raises the same errors as
    the blocking client."""

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop):
        self._c = client
        self._loop = loop
        self._futures: dict[int, asyncio.Future] = {}
        self._waiters: dict[Watch, asyncio.Future] = {}  # watches someone awaits
        self._wanted: tuple = ()  # their rings, read by the helper thread
        self._send_lock = asyncio.Lock()
        self._watch_lock = asyncio.Lock()
        self._closed = False
        self._dead: errors.ShmwatchError | None = None
        self._taken = threading.Event()  # the loop took what the helper handed over
        self._fork_gen = forks.generation
        self._thread = threading.Thread(target=self._helper, daemon=True,
                                        name=f"shmwatch-aio-{client.name}")
        self._thread.start()

    @property
    def name(self) -> str:
        """The broker's name."""
        return self._c.name

    @property
    def timeout(self) -> float:
        """The default timeout of every call, in seconds."""
        return self._c.timeout

    # ------------------------------------------------------------ the helper thread

    def _ready(self) -> bool:
        if self._closed or self._c._resp_readable():
            return True
        for ring in self._wanted:
            if ring.readable():
                return True
        return False

    def _helper(self) -> None:
        """Sleep on the doorbell; hand what arrived to the loop; notice a dead broker,
        and an event loop that ended without closing us (`asyncio.run` returned): then
        nothing can use this client any more, so it leaves the broker by itself."""
        c = self._c
        bell = c._bell
        while not self._closed:
            if self._loop.is_closed():
                self._orphaned()
                return
            try:
                woke = bell.wait(self._ready, WAIT_SLICE_S, spin=0, slice=WAIT_SLICE_S)
                if not woke:
                    c._check_alive()
                    continue
            except errors.ShmwatchError as exc:
                self._hand(self._on_dead, exc)
                return
            if self._closed:
                return
            self._taken.clear()
            if not self._hand(self._on_wake):
                return
            while not self._taken.wait(WAIT_SLICE_S):
                if self._closed:
                    return
                if self._loop.is_closed():
                    self._orphaned()
                    return

    def _orphaned(self) -> None:
        """Our loop is closed and we were never closed: close the connection (in this
        helper thread: the loop can no longer run anything)."""
        self._closed = True
        try:
            self._c.close()
        except errors.ShmwatchError:
            pass  # the broker is gone too: nothing to leave

    def _hand(self, fn, *args) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the loop is closed: nobody to hand anything to
            self._orphaned()
            return False

    def _on_wake(self) -> None:
        """In the loop: take the replies, wake the awaited watches that have data."""
        c = self._c
        try:
            try:
                with c._cond:
                    c._pump()
            except errors.ShmwatchError as exc:
                self._on_dead(exc)
                return
            replies = c._replies
            for rid in [r for r in self._futures if r in replies]:
                fut = self._futures.pop(rid)
                if not fut.done():
                    fut.set_result(replies.pop(rid))
                else:
                    replies.pop(rid)
            for w in [w for w in self._waiters if w._ready() or w._final]:
                fut = self._waiters.pop(w)
                if not fut.done():
                    fut.set_result(None)
            self._wanted = tuple(w._ring for w in self._waiters if w._ring is not None)
        finally:
            self._taken.set()

    def _on_dead(self, exc: errors.ShmwatchError) -> None:
        self._dead = exc
        for fut in [*self._futures.values(), *self._waiters.values()]:
            if not fut.done():
                fut.set_exception(exc)
        self._futures.clear()
        self._waiters.clear()
        self._wanted = ()

    # ------------------------------------------------------------ calls

    def _check(self) -> None:
        if self._fork_gen != forks.generation:
            raise errors.ShmwatchError(
                "shmwatch: an AsyncClient belongs to the process that created it; "
                "connect again in this one")
        if self._closed:
            raise errors.ClientClosed()
        if self._dead is not None:
            raise self._dead
        if self._c._broken is not None:
            raise errors.ProtocolError(self._c._broken)

    async def _write(self, data: bytes, deadline: float) -> None:
        """Write one request; wait (without blocking the loop) while the ring is full.
        Cut short by the deadline or a cancellation, the request is not sent: a part
        already streamed into the ring is abandoned with an abort marker (see Client)."""
        c = self._c
        off = 0
        while True:
            off = c._req.write(data, off)
            if off == len(data):
                return
            c._req.publish()
            c._broker_bell.ring()
            try:
                c._check_alive()
                if time.monotonic() > deadline:
                    raise errors.Timeout("shmwatch: request ring full: broker not keeping up "
                                         "(the request was not sent)")
                await asyncio.sleep(WRITE_RETRY_S)
            except BaseException:
                c._abort_partial()
                raise

    async def _send_pending(self, deadline: float) -> None:
        """Before new requests (send lock held): cancels of watches created after their
        caller gave up (see Client)."""
        c = self._c
        while c._to_cancel:
            rid = c._req_id + 1
            await self._write(number(watch_cancel_request(c._to_cancel[-1]), rid), deadline)
            c._req_id = rid
            c._abandoned[rid] = None
            c._to_cancel.pop()

    async def _call_many(self, msgs: list[list], timeout: float | None,
                         on_late=None) -> list:
        """Send requests in one go and await every reply (errors in place). If the wait
        is abandoned (timeout, cancellation), `on_late` gets a single request's reply
        when it comes."""
        self._check()
        c = self._c
        deadline = c._deadline(timeout)
        out: list = [None] * len(msgs)
        waiting: list[tuple[int, int, asyncio.Future]] = []
        try:
            async with self._send_lock:
                try:
                    await self._send_pending(deadline)
                    for i, msg in enumerate(msgs):
                        rid = c._req_id + 1
                        data = number(msg, rid)
                        if len(data) > c.max_request_bytes:
                            out[i] = errors.RequestTooLargeError()
                            continue
                        await self._write(data, deadline)  # published below
                        c._req_id = rid
                        fut = self._loop.create_future()
                        self._futures[rid] = fut
                        waiting.append((i, rid, fut))
                finally:
                    # Also when cut short: what was written goes now, never left in the
                    # ring to be applied whenever a later call publishes (after newer
                    # writes).
                    c._req.publish()
                    c._broker_bell.ring()
            for i, _rid, fut in waiting:
                remaining = deadline - time.monotonic()
                try:
                    out[i] = await asyncio.wait_for(asyncio.shield(fut), max(remaining, 0))
                except asyncio.TimeoutError:
                    raise errors.Timeout(
                        "shmwatch: no reply from the broker within the timeout") from None
        except BaseException:
            late = on_late if len(waiting) == 1 else None
            for _, rid, fut in waiting:
                if self._futures.pop(rid, None) is None and not fut.done():
                    continue
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    if late is not None:
                        late(fut.result())  # it came, but too late for its caller
                else:
                    c._abandoned[rid] = late  # its reply, when it comes: dropped or late
                    fut.cancel()
            raise
        return out

    async def _call(self, msg: list, timeout: float | None, on_late=None):
        result = (await self._call_many([msg], timeout, on_late))[0]
        if isinstance(result, errors.ShmwatchError):
            raise result
        return result

    async def _run(self, flow, timeout: float | None):
        """The awaitable driver of a flow (see Client._run)."""
        try:
            return await self._drive(flow, timeout)
        except ShmError as exc:
            raise from_shm(exc, self._c.name) from None

    async def _drive(self, flow, timeout: float | None):
        try:
            msg = next(flow)
            while True:
                if isinstance(msg, Pipelined):
                    reply = await self._call_many(msg.msgs, timeout)
                else:
                    try:
                        if isinstance(msg, Late):
                            reply = await self._call(msg.msg, timeout, msg.on_late)
                        else:
                            reply = await self._call(msg, timeout)
                    except errors.ShmwatchError as exc:
                        msg = flow.throw(exc)
                        continue
                msg = flow.send(reply)
        except StopIteration as stop:
            return stop.value

    async def put(self, key, value, prev_kv: bool = False, ignore_value: bool = False,
                  lease: int = 0, ignore_lease: bool = False, *,
                  timeout: float | None = None) -> PutResponse:
        """etcd Put (see `Client.put`)."""
        return await self._run(flow_put(key, value, prev_kv, ignore_value, lease,
                                        ignore_lease), timeout)

    async def put_many(self, items: Iterable[tuple], prev_kv: bool = False, *,
                       timeout: float | None = None) -> list[PutResponse]:
        """Pipelined puts (see `Client.put_many`)."""
        return await self._run(flow_put_many(items, prev_kv), timeout)

    async def get(self, key, range_end=None, prefix: bool = False, revision: int = 0,
                  limit: int = 0, keys_only: bool = False, count_only: bool = False, *,
                  sort_order: str = "none", sort_target: str = "key", min_mod_revision: int = 0,
                  max_mod_revision: int = 0, min_create_revision: int = 0,
                  max_create_revision: int = 0, timeout: float | None = None) -> RangeResponse:
        """etcd Range (see `Client.get`)."""
        return await self._run(flow_kv(op_get(
            key, range_end, prefix, revision, limit, keys_only, count_only,
            sort_order=sort_order, sort_target=sort_target, min_mod_revision=min_mod_revision,
            max_mod_revision=max_mod_revision, min_create_revision=min_create_revision,
            max_create_revision=max_create_revision)), timeout)

    async def delete(self, key, range_end=None, prefix: bool = False, prev_kv: bool = False, *,
                     timeout: float | None = None) -> DeleteRangeResponse:
        """etcd DeleteRange (see `Client.delete`)."""
        return await self._run(flow_kv(op_delete(key, range_end, prefix, prev_kv)), timeout)

    async def txn(self, compare: Iterable = (), success: Iterable = (),
                  failure: Iterable = (), *, timeout: float | None = None) -> TxnResponse:
        """etcd Txn (see `Client.txn`)."""
        return await self._run(flow_txn(compare, success, failure), timeout)

    async def compact(self, revision: int, *, timeout: float | None = None) -> CompactResponse:
        """etcd Compact (see `Client.compact`)."""
        return await self._run(flow_compact(revision), timeout)

    async def lease_grant(self, ttl: int, lease_id: int = 0, *, bound: bool = False,
                          timeout: float | None = None) -> LeaseGrantResponse:
        """etcd LeaseGrant (see `Client.lease_grant`)."""
        return await self._run(flow_lease_grant(ttl, lease_id, bound), timeout)

    async def lease_revoke(self, lease_id, *,
                           timeout: float | None = None) -> LeaseRevokeResponse:
        """etcd LeaseRevoke (see `Client.lease_revoke`)."""
        return await self._run(flow_lease(OP_LEASE_REVOKE, lease_id), timeout)

    async def lease_keep_alive_once(self, lease_id, *,
                                    timeout: float | None = None) -> LeaseKeepAliveResponse:
        """One etcd keep-alive (see `Client.lease_keep_alive_once`)."""
        return await self._run(flow_lease(OP_LEASE_KEEPALIVE, lease_id), timeout)

    async def lease_time_to_live(self, lease_id, keys: bool = False, *,
                                 timeout: float | None = None) -> LeaseTimeToLiveResponse:
        """etcd LeaseTimeToLive (see `Client.lease_time_to_live`)."""
        return await self._run(flow_lease(OP_LEASE_TTL, lease_id, keys), timeout)

    async def leases(self, *, timeout: float | None = None) -> LeaseLeasesResponse:
        """etcd LeaseLeases (see `Client.leases`)."""
        return await self._run(flow_lease(OP_LEASE_LEASES, 0), timeout)

    async def lease(self, ttl: int = 0, *, bound: bool = False, lease_id: int = 0,
                    keep_alive: bool = True, timeout: float | None = None) -> "AsyncLease":
        """Grant a lease as an `AsyncLease` (see `Client.lease`): its keep-alive is a
        task of this loop; `async with` revokes it on exit."""
        resp = await self.lease_grant(ttl, lease_id, bound=bound, timeout=timeout)
        return AsyncLease(self, resp, bound=bound, forever=bound and ttl <= 0,
                          keep_alive=keep_alive)

    async def request_progress(self, *, timeout: float | None = None) -> None:
        """etcd's progress request (see `Client.request_progress`)."""
        await self._run(flow_progress(), timeout)

    def watch(self, key, range_end=None, prefix: bool = False, start_revision: int = 0,
              prev_kv: bool = False, filters: Iterable[str] = (), progress_notify: bool = False,
              fragment: bool = False, watch_id: int | None = None, *,
              timeout: float | None = None) -> "AsyncWatch":
        """etcd Watch (see `Client.watch`): use it in `async for`, `async with`, or await
        it. It is created on first use; its first response is the `created` one."""
        spec, want = watch_spec(key, range_end, prefix, start_revision, prev_kv, filters,
                                progress_notify, fragment, watch_id)
        return AsyncWatch(self, spec, want, timeout)

    # ------------------------------------------------------------ waiting for watches

    async def _readable(self, w: Watch, deadline: float | None) -> None:
        """Until `w` has a response to take (or is over); Timeout at `deadline`."""
        self._check()
        fut = self._waiters.get(w)
        if fut is None or fut.done():
            fut = self._waiters[w] = self._loop.create_future()
            self._wanted = tuple(x._ring for x in self._waiters if x._ring is not None)
            self._c._bell.post()  # the helper re-reads what is wanted
        try:
            if deadline is None:
                await asyncio.shield(fut)
            else:
                await asyncio.wait_for(asyncio.shield(fut),
                                       max(deadline - time.monotonic(), 0))
        except asyncio.TimeoutError:
            raise errors.Timeout("shmwatch: no watch response within the timeout") from None
        finally:
            if fut.done() or self._waiters.get(w) is fut:
                if self._waiters.get(w) is fut and not fut.done():
                    pass  # still awaited by nobody now: leave it; _on_wake clears it
                elif self._waiters.get(w) is fut:
                    del self._waiters[w]

    # ------------------------------------------------------------ life cycle

    async def close(self) -> None:
        """Leave the broker (as `Client.close`). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for fut in [*self._futures.values(), *self._waiters.values()]:
            if not fut.done():
                fut.set_exception(errors.ClientClosed())
        self._futures.clear()
        self._waiters.clear()
        try:
            self._c._bell.post()
        except Exception:  # noqa: BLE001 - already gone: the helper exits by itself
            pass
        self._taken.set()
        self._thread.join(1.0)
        self._c.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncWatch:
    """A watch of an `AsyncClient`: `async for resp in w`, `await w.get(timeout)`,
    `w.get_nowait()`, `await w.cancel()`, `async with w`. Ends as `clientlib.Watch`
    does (see its docstring): a clean stop after your cancel, the refusal or
    `CompactedError` raised otherwise."""

    def __init__(self, ac: AsyncClient, spec: list, want: int, timeout: float | None):
        self._ac = ac
        self._spec = spec
        self._want = want
        self._timeout = timeout
        self._w: Watch | None = None

    async def _ensure(self) -> Watch:
        if self._w is None:
            ac = self._ac
            ac._check()
            async with ac._watch_lock:  # one arena request at a time
                if self._w is None:
                    self._w = await ac._run(flow_watch(ac._c, self._spec, self._want, False),
                                            self._timeout)
        return self._w

    @property
    def watch_id(self) -> int | None:
        """The watch's id (None until created; -1 if refused)."""
        return None if self._w is None else self._w.watch_id

    @property
    def canceled(self) -> bool:
        """True once the final `canceled` response has arrived."""
        return self._w is not None and self._w.canceled

    def __await__(self):
        async def created():
            await self._ensure()
            return self
        return created().__await__()

    def get_nowait(self) -> WatchResponse | None:
        """The next response if one is here, else None (the watch must be created)."""
        if self._w is None:
            raise errors.WatchClosed("shmwatch: the watch is not created yet: await it first")
        return self._w.get_nowait()

    async def get(self, timeout: float | None = None) -> WatchResponse:
        """The next response, waiting up to `timeout` seconds (None: as long as the
        broker lives). Raises `Timeout`, `BrokerUnavailable`, or the watch's end error."""
        w = await self._ensure()
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            r = w.get_nowait()
            if r is not None:
                return r
            try:
                await self._ac._readable(w, deadline)
            except errors.BrokerUnavailable:
                w._lost()
                raise

    def __aiter__(self) -> "AsyncWatch":
        return self

    async def __anext__(self) -> WatchResponse:
        try:
            return await self.get()
        except errors.WatchClosed:
            w = self._w
            if w is not None and w._clean_end and w._final and not w._buf:
                raise StopAsyncIteration from None
            raise

    async def cancel(self, timeout: float | None = None) -> None:
        """Cancel the watch; responses already sent stay readable, then the `canceled`
        one, then iteration stops."""
        w = await self._ensure()
        if w._final:
            return
        w._clean_end = True
        ac = self._ac
        await ac._call(watch_cancel_request(w.watch_id), timeout)
        deadline = ac._c._deadline(timeout)
        while True:
            with ac._c._cond:
                w._drain_to_end()
            if w._final:
                return
            await ac._readable(w, deadline)

    async def __aenter__(self) -> "AsyncWatch":
        await self._ensure()
        return self

    async def __aexit__(self, *exc) -> None:
        w = self._w
        if w is not None and not w._final and not self._ac._closed and self._ac._dead is None:
            try:
                await self.cancel()
            except errors.ShmwatchError:
                pass
