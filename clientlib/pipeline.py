"""Writes that do not wait for their replies one by one: `Client.put_async` and
`Client.pipeline()`.

Each write is sent at once (in the client's request ring, in call order: the broker
applies a client's requests in that order) and its reply completes a
`concurrent.futures.Future` when it comes: the `PutResponse` (or delete / txn response),
or the broker's typed error, exactly what the blocking call would have returned or
raised. Nothing is acknowledged before the broker applied it. A bounded window keeps at
most `window` writes in flight: the next one waits (for the oldest reply) until there
is room, so a fast writer is held to the broker's pace instead of buffering without
bound.

Replies are taken whenever the client reads its response ring: on every async write,
in `Future.result()` / `exception()`, and in any other call. Done-callbacks run in the
thread that took the reply, with the client's lock held: they must not call the
client. A write the broker never answers because it went away fails with
`BrokerUnavailable` (`ClientClosed` if you closed the client).
"""

from __future__ import annotations

import concurrent.futures
import threading
from concurrent.futures import _base
from collections import deque
from collections.abc import Callable, Iterable

from shmwatch.wire import errors
from shmwatch.wire.ops import op_delete, op_txn
from shmwatch.wire.protocol import decode_put_response, decode_response, kv_request, number

from .flows import put_message, raise_first_failure

DEFAULT_WINDOW = 1024  # writes in flight per client (or per pipeline)
PUMP_EVERY = 32  # an async write reads the replies waiting at least this often


_SHARED = threading.Condition()  # the condition of every WriteFuture (see __init__)
_DONE = frozenset((_base.FINISHED, _base.CANCELLED, _base.CANCELLED_AND_NOTIFIED))


class WriteFuture(concurrent.futures.Future):
    """A write's reply to come. `result(timeout)` and `exception(timeout)` read the
    client's replies while they wait (there is no thread doing it in the background);
    a timeout raises `clientlib.Timeout` (a `TimeoutError`). The write is already sent:
    `cancel()` returns False, as for a running future."""

    def __init__(self, client) -> None:
        # Future's own fields, set here: one Condition shared by all WriteFutures (a
        # Condition of its own would cost more than the rest of a put_async; nothing
        # sleeps on it: result() reads replies instead), and running from the start.
        self._condition = _SHARED
        self._state = _base.RUNNING
        self._result = None
        self._exception = None
        self._waiters: list = []
        self._done_callbacks: list = []
        self._client = client

    def done(self) -> bool:
        """True once the reply came (or the write failed); reads no replies itself."""
        return self._state in _DONE

    def result(self, timeout: float | None = None):
        """The write's response, reading the client's replies until it comes; raises
        the broker's typed error, or `Timeout` after `timeout` seconds."""
        self._client._await_done(self, timeout)
        return super().result(0)

    def exception(self, timeout: float | None = None):
        """The write's error (None if it succeeded), reading replies until it is known;
        `Timeout` after `timeout` seconds."""
        self._client._await_done(self, timeout)
        return super().exception(0)


class AsyncWrites:
    """The client's side of async writes (a mixin of `Client`): a write's reply
    completes its future from whichever thread reads replies."""

    def _send_async(self, msg: list, on_reply: Callable, fut: concurrent.futures.Future,
                    timeout: float | None) -> None:
        """Send one request without waiting; `on_reply(reply)` runs when its reply comes
        (from whichever thread reads replies), `fut` fails if it never will."""
        self._own()
        if self._closed:
            self._check_alive()
        if self._broken is not None:
            raise errors.ProtocolError(self._broken)
        deadline = self._deadline(timeout)
        with self._send_lock:
            self._send_pending(deadline)
            rid = self._req_id + 1
            data = number(msg, rid)
            if len(data) > self.max_request_bytes:
                fut.set_exception(errors.RequestTooLargeError())
                return
            with self._cond:  # before it is sent: its reply may come at once
                self._abandoned[rid] = on_reply
                self._futures[rid] = fut
            try:
                self._send(data, deadline)
            except BaseException:
                with self._cond:
                    self._abandoned.pop(rid, None)
                    self._futures.pop(rid, None)
                raise
            self._req_id = rid
        if not rid % PUMP_EVERY or self._resp.producer_blocked:
            with self._cond:
                self._pump()  # replies already here complete their futures now

    def _await_done(self, fut: concurrent.futures.Future, timeout: float | None) -> None:
        """Read replies until `fut` is done; Timeout if it is not within `timeout`."""
        try:
            self._own()  # in a forked child this fails the parent's writes (not ours)
        except errors.ShmwatchError:
            if not fut.done():
                raise
        if fut.done():
            return
        try:
            if not self._wait(fut.done, lambda: False, self._deadline(timeout)):
                raise errors.Timeout("shmwatch: no reply from the broker within the timeout")
        except (errors.BrokerUnavailable, errors.ProtocolError) as exc:
            self._fail_futures(exc)

    def _fail_futures(self, exc: errors.ShmwatchError) -> None:
        """Writes that will never be answered (the broker went away, the client closed)."""
        futures, self._futures = self._futures, {}
        for rid, fut in futures.items():
            self._abandoned.pop(rid, None)
            if not fut.done():
                fut.set_exception(exc)


def _completer(fut: WriteFuture, decode: Callable) -> Callable:
    def complete(reply) -> None:
        if fut.done():
            return
        if isinstance(reply, errors.ShmwatchError):
            fut.set_exception(reply)
            return
        try:
            fut.set_result(decode(reply))
        except errors.ShmwatchError as exc:
            fut.set_exception(exc)
    return complete


def submit(c, msg: list, decode: Callable, inflight: deque, limit: int,
           timeout: float | None) -> WriteFuture:
    """Send one write of client `c` without waiting; its future. Waits first, while
    `limit` writes of `inflight` (a window) are still in flight, for the oldest."""
    while inflight and inflight[0].done():
        inflight.popleft()
    while len(inflight) >= limit:
        c._await_done(inflight[0], timeout)
        inflight.popleft()
    fut = WriteFuture(c)
    c._send_async(msg, _completer(fut, decode), fut, timeout)
    inflight.append(fut)
    return fut


class Pipeline:
    """Asynchronous writes with a window of their own (`Client.pipeline()`): `put`,
    `delete` and `txn` return futures; leaving the `with` block (or `flush()`) waits for
    every reply and raises the first failure no one has looked at, like `put_many`, with
    `.index` (its position) and `.results` (a response or an error per write)."""

    def __init__(self, client, window: int = DEFAULT_WINDOW,
                 timeout: float | None = None) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self._client = client
        self._window = window
        self._timeout = timeout
        self._inflight: deque[WriteFuture] = deque()
        self._all: list[WriteFuture] = []

    def put(self, key, value, prev_kv: bool = False, ignore_value: bool = False,
            lease: int = 0, ignore_lease: bool = False) -> WriteFuture:
        """`Client.put`, not waiting: a future of its `PutResponse`."""
        return self._track(submit(
            self._client, put_message(key, value, prev_kv, ignore_value, lease, ignore_lease),
            decode_put_response, self._inflight, self._window, self._timeout))

    def delete(self, key, range_end=None, prefix: bool = False,
               prev_kv: bool = False) -> WriteFuture:
        """`Client.delete`, not waiting: a future of its `DeleteRangeResponse`."""
        return self._track(submit(
            self._client, kv_request(op_delete(key, range_end, prefix, prev_kv)),
            decode_response, self._inflight, self._window, self._timeout))

    def txn(self, compare: Iterable = (), success: Iterable = (),
            failure: Iterable = ()) -> WriteFuture:
        """`Client.txn`, not waiting: a future of its `TxnResponse`."""
        return self._track(submit(
            self._client, kv_request(op_txn(compare, success, failure)), decode_response,
            self._inflight, self._window, self._timeout))

    def _track(self, fut: WriteFuture) -> WriteFuture:
        self._all.append(fut)
        return fut

    def flush(self, timeout: float | None = None) -> list:
        """Wait for every reply; the results in order (responses, or errors for the
        writes that failed, raised as `put_many` raises them)."""
        out = []
        for fut in self._all:
            exc = fut.exception(timeout)
            out.append(exc if exc is not None else fut.result(0))
        self._all.clear()
        raise_first_failure("pipeline: write", out)
        return out

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.flush()
        else:  # an error is already leaving the block: still wait, never lose a reply
            try:
                self.flush()
            except errors.ShmwatchError:
                pass


__all__ = ["AsyncWrites", "DEFAULT_WINDOW", "Pipeline", "WriteFuture", "submit"]
