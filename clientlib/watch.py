"""Watch: one watch's stream of responses, as its reader takes them.

Responses are taken out of the watch's ring one at a time as the application asks for
them (one response of read-ahead), so a slow reader's ring fills, the broker makes it
a victim, and its backlog stays in the broker's revision log. A watch belongs to the
process that created it (`InheritedWatchError` in a forked child).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator

from shm.errors import MessageTooLarge, RingCorrupt
from shm.ring import Ring
from shmwatch.wire import errors
from shmwatch.wire.events import decode_watch_response
from shmwatch.wire.protocol import W_CANCELED, W_CATCHUP, watch_cancel_request
from shmwatch.wire.types import WatchResponse

from . import forks


class Watch:
    """A stream of `WatchResponse`s for one watch: iterate it, or `get()` / `get_nowait()`.

    Responses are taken from the watch's ring one at a time as you ask for them, so a
    slow reader leaves its backlog with the broker (see the module docstring).

    How a stream ends (trio-style, a distinct outcome for each way):
    - you cancelled it (`cancel()`, or leaving its `with` block): the final `canceled`
      response is delivered, then iteration stops cleanly (`get()` raises `WatchClosed`);
    - refused at creation: the created+canceled response, then iteration raises the
      refusal (`InvalidRangeError`, `DuplicateWatchIdError`);
    - compacted: the `canceled` response with `compact_revision`, then iteration raises
      `CompactedError` (its `compact_revision` set);
    - cancelled by the broker for another reason: `WatchClosed` with the reason;
    - the broker is gone (and the watch does not resume): `BrokerUnavailable`;
    - used in a forked child: `InheritedWatchError`.
    """

    def __init__(self, client, watch_id: int, ring_slot, ring: Ring | None,
                 refused: tuple | None = None, spec=None, resume: bool = False):
        self._client = client
        self.watch_id = watch_id
        self._ring_slot = ring_slot
        self._ring = ring
        self._buf: deque[WatchResponse] = deque()  # read-ahead: at most one response
        self._final = False  # the canceled response is in _buf or was returned
        self._error: errors.ShmwatchError | None = None
        self._clean_end = False  # ended by our own cancel(): iteration stops cleanly
        self._spec = spec
        self._resume = resume
        self._next_rev = spec.start_revision if spec else 0  # where a resumed watch starts
        self._skip_created = False
        self._catchup: Iterator[WatchResponse] | None = None  # one it makes itself
        self._draining = False  # read to the end, delivering nothing more (cancel, orphan)
        self._fork_gen = forks.generation
        if refused is not None:
            rev, reason, err = refused
            self._buf.append(WatchResponse(watch_id=-1, revision=rev, created=True,
                                           canceled=True, cancel_reason=reason))
            self._final = True
            self._error = err

    def _mine(self) -> None:
        if self._fork_gen != forks.generation:
            raise errors.InheritedWatchError(
                f"shmwatch: watch {self.watch_id} was created by another process before "
                f"fork(); it belongs to that process: create a new watch in this one")

    def _pull(self) -> bool:
        """Have the next response ready (client lock held): when the read-ahead buffer
        is empty, take at most one response, from the catch-up this watch is making
        itself (clientlib.catchup) or else from the ring. True if one is ready."""
        if self._buf:
            return True
        if self._catchup is not None:
            resp = next(self._catchup, None)
            if resp is not None:
                self._take(resp)
                if resp.canceled:  # its history went while it read it: compacted
                    self._history_lost(resp.compact_revision)
                return True
            self._catchup = None
        ring = self._ring
        if ring is None or self._final:
            return False
        c = self._client
        while True:
            try:
                data = ring.read()
            except (RingCorrupt, MessageTooLarge) as exc:
                self._ring = None
                self._final = True
                self._error = errors.ProtocolError(
                    f"shmwatch: the ring of watch {self.watch_id} is damaged: {exc}")
                raise self._error from None
            if data is None:
                c._room_made(ring)
                return False
            kind, resp = decode_watch_response(data, self.watch_id)
            if kind == W_CATCHUP:
                c._room_made(ring)
                if self._draining or self._spec is None:
                    continue
                self._catchup = c._catch_up(resp, self._spec, self.watch_id)
                return self._pull()
            if resp.created and self._skip_created:
                self._skip_created = False
                continue  # a resumed watch's re-creation is invisible
            self._take(resp)
            if kind == W_CANCELED:
                self._final = True
                if resp.compact_revision:
                    self._error = errors.CompactedError(compact_revision=resp.compact_revision)
                elif not self._clean_end:
                    self._error = errors.WatchClosed(
                        "shmwatch: watch canceled by the broker"
                        + (f": {resp.cancel_reason}" if resp.cancel_reason else ""))
                self._ring = None
                if ring.producer_blocked:
                    c._space_freed(ring)
                c._watch_closed(self)
            else:
                c._room_made(ring)
            return True

    def _take(self, resp: WatchResponse) -> None:
        """Queue `resp` for the reader, and note where a resumed watch would start."""
        if resp.events:
            self._next_rev = resp.events[-1].kv.mod_revision + 1
        elif resp.created:
            if not self._next_rev:
                self._next_rev = resp.revision + 1
        elif not resp.canceled and resp.revision >= self._next_rev:
            self._next_rev = resp.revision + 1  # progress: nothing before it is owed
        self._buf.append(resp)

    def _history_lost(self, compact_rev: int) -> None:
        """The catch-up this watch made itself found its history gone: the stream ends
        with etcd's compaction cancel (already queued). The broker still has the watch:
        it is cancelled at the client's next request, and its ring read to its end by
        an orphan reader before the ring is used again."""
        c = self._client
        self._final = True
        self._error = errors.CompactedError(compact_revision=compact_rev)
        ring, slot, self._ring, self._ring_slot = self._ring, self._ring_slot, None, None
        c._watches.pop(self.watch_id, None)
        if ring is not None:
            orphan = Watch(c, self.watch_id, slot, ring, spec=self._spec)
            orphan._clean_end = orphan._draining = True
            c._orphans.add(orphan)
            c._to_cancel.append(self.watch_id)

    def _ready(self) -> bool:
        r = self._ring
        return (bool(self._buf) or self._catchup is not None
                or (r is not None and r.readable()))

    def get_nowait(self) -> WatchResponse | None:
        """The next response if one is here, else None. Raises once the watch is over
        (see the class docstring for which error). O(size of one response)."""
        self._mine()
        with self._client._cond:
            if self._pull():
                return self._buf.popleft()
        self._raise_if_over()
        return None

    def get(self, timeout: float | None = None) -> WatchResponse:
        """The next response, waiting up to `timeout` seconds (None: forever, while the
        broker lives). Raises `Timeout`, `BrokerUnavailable`, or the watch's end error
        (see the class docstring)."""
        self._mine()
        c = self._client
        deadline = None if timeout is None else time.monotonic() + timeout
        with c._cond:
            if self._pull():
                return self._buf.popleft()
        self._raise_if_over()
        while True:
            gen = c.generation
            try:
                ok = c._wait(lambda: self._pull() or self._final, self._ready, deadline)
                break
            except errors.BrokerUnavailable:
                if not self._resume or c._user_closed:
                    self._lost()
                    raise
                c.reconnect(_generation=gen)
        if not ok:
            raise errors.Timeout("shmwatch: no watch response within the timeout")
        with c._cond:
            if self._buf:
                return self._buf.popleft()
        self._raise_if_over()
        raise errors.Timeout("shmwatch: no watch response within the timeout")

    def _lost(self) -> None:
        """The broker went away and this watch does not resume: it is over."""
        self._ring = None
        self._ring_slot = None
        if not self._final:
            self._final = True
            self._error = errors.BrokerUnavailable(
                f"shmwatch: broker {self._client.name!r} is gone; the watch ended")

    def _recreate(self, timeout: float | None) -> None:
        """Re-create this watch on a reconnected client from `_next_rev`."""
        c = self._client
        spec = self._spec._replace(start_revision=self._next_rev)
        wid, rev, reason, code, ring_slot, ring = c._create_watch(spec, self.watch_id, timeout)
        if code:
            self._lost()
            return
        self.watch_id = wid
        self._ring_slot = ring_slot
        self._ring = ring
        self._catchup = None  # the old broker's log: the new one catches up anew
        self._skip_created = True
        with c._cond:
            c._watches[wid] = self

    def _raise_if_over(self) -> None:
        if self._final and not self._buf:
            raise self._error or errors.WatchClosed()

    def __iter__(self) -> Iterator[WatchResponse]:
        return self

    def __next__(self) -> WatchResponse:
        try:
            return self.get()
        except errors.WatchClosed:
            if self._clean_end and self._final and not self._buf:
                raise StopIteration from None
            raise

    @property
    def canceled(self) -> bool:
        """True once the watch is over: its final `canceled` response has arrived (or
        the broker is gone), so no response after those already queued will come."""
        return self._final

    def cancel(self, timeout: float | None = None) -> None:
        """Cancel the watch. Responses already sent stay readable, then the `canceled`
        response, then iteration ends cleanly."""
        self._mine()
        if self._final:
            return
        self._clean_end = True
        self._draining = True  # a catch-up not read yet is dropped: the stream ends
        self._catchup = None
        c = self._client
        c._call(watch_cancel_request(self.watch_id), timeout)
        deadline = c._deadline(timeout)
        if not c._wait(lambda: self._final or (self._drain_to_end() and self._final),
                       self._ready, deadline):
            raise errors.Timeout("shmwatch: cancel not confirmed within the timeout")

    def _drain_to_end(self) -> bool:
        """While cancelling (lock held): read responses until the final one, keeping
        them readable (the cancel's own wait may read past the one-response read-ahead:
        the stream is over, so what it holds is bounded by what was already sent)."""
        ring = self._ring
        while ring is not None and not self._final:
            buf, self._buf = self._buf, deque()
            got = self._pull()
            self._buf = buf + self._buf
            if not got:
                break
            ring = self._ring
        return True

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        if self._fork_gen != forks.generation:
            return  # the parent's watch: nothing to do here
        if not self._final and not self._client._closed:
            try:
                self.cancel()
            except errors.ShmwatchError:
                pass


def wait_any(watches, timeout: float | None = None) -> list[Watch]:
    """Wait until at least one of `watches` has a response to read; those watches, in
    the order given ([] after `timeout` seconds; None waits while the broker lives).

    Like `multiprocessing.connection.wait` for watches: a process with thousands of
    watches sleeps on its client's doorbell instead of polling `get_nowait()` on each.
    A returned watch's `get_nowait()` has a response (or raises how its stream ended:
    an ended watch counts as ready). Every watch must belong to one client (a client's
    watches share its doorbell): `ValueError` otherwise. Each wake-up checks every
    watch, O(len(watches)).
    """
    ws = list(watches)
    if not ws:
        raise ValueError("wait_any needs at least one watch")
    c = ws[0]._client
    if any(w._client is not c for w in ws):
        raise ValueError("wait_any: every watch must belong to the same client "
                         "(wait on each client's watches separately)")
    for w in ws:
        w._mine()
    got: list[Watch] = []

    def done() -> bool:  # with the client's lock held, after its replies were read
        got[:] = [w for w in ws if w._final or (w._ready() and w._pull())]
        return bool(got)

    deadline = None if timeout is None else time.monotonic() + timeout
    if c._wait(done, lambda: any(w._ready() for w in ws), deadline):
        return got
    return []
