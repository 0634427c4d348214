"""What a worker process uses: a connection to a broker, KV calls and watches.

A `Client` is one registered client of the broker (etcd: one gRPC connection with one
watch stream). It owns a request ring, a response ring and one ring per watch, all in
shared memory the broker created for it, plus a doorbell the broker rings when it
wrote something while the client slept. A `Client` is safe to share between threads.

Fork safety (as redis-py's connection pools): a `Client` inherited through fork() —
multiprocessing's fork start method, Pool, gunicorn or celery prefork workers — attaches
again as a new client (its own slot and rings) on its first call in the child; the
parent's client is untouched, and nothing the child does reaches the parent's rings.
At fork, the child drops its copy of the parent's slot lock (so a dead parent is seen
dead even while children live) and gets fresh locks (so a lock another parent thread
held mid-call cannot deadlock it). A `Watch` belongs to the process that created it: in
a forked child it raises `InheritedWatchError`.

Watch responses are taken out of the watch's ring only as the application asks for
them (one response of read-ahead), so a slow reader's ring fills, the broker turns it
into a victim, and the backlog stays in the broker's revision log, coming back in
catch-up responses of many revisions: client memory per watch is one response.

Every blocking call has a timeout, and notices a dead broker within one wait slice
(50 ms) through the broker's kernel-held lock: it then raises `BrokerUnavailable`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable

from shm import layout as L
from shm.doorbell import Doorbell
from shm.errors import (
    MessageTooLarge,
    RingCorrupt,
    ShmError,
)
from shm.lock import is_locked, unlock
from shm.ring import Ring
from shm.segment import Segment, shm_name
from shmwatch.wire import errors
from shmwatch.wire.protocol import (
    RESUME_FREE_FRACTION,
    bye_request,
    decode_reply,
    number,
    peek_id,
    watch_cancel_request,
)

from . import forks
from .attach import (
    _damaged,
    _registration_error,
    _ring_size,
    claim_slot,
    default_label,
    from_shm,
    open_control,
)
from .calls import Calls
from .pipeline import AsyncWrites
from .catchup import LogAccess
from .watch import Watch

WAIT_SLICE_S = 0.05  # a dead broker is noticed within this
SPIN = 200  # ready() checks before sleeping on the doorbell: ~50 us of spinning
DEFAULT_TIMEOUT = 5.0
REPLY_ENVELOPE = 64 << 10  # bytes of a reply beyond the broker's --max-response-bytes
MAX_RINGS_PER_ARENA = 1 << 20  # a sanity bound on a control word (the default is 32)


def connect(name: str, timeout: float = DEFAULT_TIMEOUT, *, label: str | None = None) -> "Client":
    """Attach to the broker called `name`. `timeout` is the default for every call.

    `label` names this client in the broker's metrics (tools/top); by default the
    multiprocessing process name, or `<script>:<pid>` in a main process."""
    return Client(name, timeout=timeout, label=label)


class Client(Calls, AsyncWrites, forks.ForkSafety):
    """A connection to one broker. Use as a context manager, or call `close()`."""

    def __init__(self, name: str, timeout: float = DEFAULT_TIMEOUT, *,
                 label: str | None = None):
        self.name = name
        self.timeout = timeout
        self.label = label  # None: default_label() at each attach (a fork gets its own)
        self._closed = False
        self._cond = threading.Condition(threading.RLock())
        self._send_lock = threading.Lock()
        self._watch_lock = threading.Lock()
        self._sleeper = False
        self._replies: dict[int, object] = {}
        # Replies nobody waits for any more (timed out, cancelled): dropped when they
        # come, or handed to a late handler (a watch created after its caller gave up).
        self._abandoned: dict[int, Callable | None] = {}
        self._to_cancel: list[int] = []  # watches created late, to cancel at next send
        self._futures: dict = {}  # async writes in flight (clientlib.pipeline)
        self._inflight: deque = deque()  # put_async's window
        self._orphans: set = set()  # those watches: drained until their final response
        self._req_id = 0
        self._watches: dict[int, Watch] = {}
        self._free_rings: list[tuple[int, int]] = []
        self._arenas: list[Segment | None] = []  # None: an arena we could not open
        self._log: LogAccess | None = None  # the broker's revision log, once a watch catches up
        self._seg: Segment | None = None
        self._bell: Doorbell | None = None
        self._ctl: Segment | None = None
        self.generation = 0  # bumped by every reconnect()
        self._user_closed = False
        self._lock_fd = -1  # our own descriptor of the ctl file, holding our slot lock
        self._broken: str | None = None  # why this client's response ring is unusable
        self._fork_gen = forks.generation
        forks.track(self)
        deadline = time.monotonic() + timeout
        try:
            self._attach(deadline)
        except ShmError as exc:
            self._release()
            raise from_shm(exc, name) from None
        except BaseException:
            self._release()
            raise

    # ------------------------------------------------------------ attach / detach

    def _attach(self, deadline: float) -> None:
        self._ctl = open_control(self.name)
        words = self._words = self._ctl.payload.cast("Q")
        while words[L.CTL_STATE] != L.CTL_STATE_RUNNING:
            self._check_alive()
            if time.monotonic() > deadline:
                raise errors.Timeout(f"shmwatch: broker {self.name!r} is not running yet")
            time.sleep(0.001)
        self._check_alive()
        self._boot_id = self._ctl.boot_id
        self._cluster_id = words[L.CTL_CLUSTER_ID]
        self.max_request_bytes = words[L.CTL_MAX_REQUEST_BYTES]
        self._rings_per_arena = words[L.CTL_RINGS_PER_ARENA]
        # Sizes read from shared memory lay out our rings: checked, never trusted.
        if not 1 <= self._rings_per_arena <= MAX_RINGS_PER_ARENA:
            raise _damaged(self.name, "rings per arena", self._rings_per_arena)
        self._watch_ring_size = _ring_size(self.name, words, L.CTL_WATCH_RING)
        flag = self._ctl.payload[L.CTL_BROKER_SLEEPING * 8:L.CTL_BROKER_SLEEPING * 8 + 4]
        self._broker_bell = Doorbell.open(
            shm_name(self.name, L.bell_part(words[L.CTL_BELL_TOKEN])), flag)
        self._slot = self._claim_slot(words)
        state = L.slot_word(self._slot, L.SLOT_STATE)
        while words[state] != L.SLOT_READY:
            if words[state] == L.SLOT_FAILED:
                raise _registration_error(self.name, words, self._slot)
            self._check_alive()
            if time.monotonic() > deadline:
                raise errors.Timeout(f"shmwatch: broker {self.name!r} did not register us")
            time.sleep(0.0005)
        gen = self._gen = words[L.slot_word(self._slot, L.SLOT_GEN)]
        part = L.client_part(self._slot, gen, words[L.slot_word(self._slot, L.SLOT_TOKEN)])
        self._part = part
        self._seg = Segment.open(shm_name(self.name, part), kind=L.KIND_CLIENT,
                                 boot_id=self._boot_id)
        p = self._seg.payload
        req_size = _ring_size(self.name, words, L.CTL_REQUEST_RING)
        resp_size = _ring_size(self.name, words, L.CTL_RESPONSE_RING)
        if L.CLIENT_HEADER + req_size + resp_size > len(p):
            raise _damaged(self.name, "request and response ring sizes", req_size + resp_size)
        self._req = Ring(p[L.CLIENT_HEADER:L.CLIENT_HEADER + req_size])
        self._resp = Ring(p[L.CLIENT_HEADER + req_size:L.CLIENT_HEADER + req_size + resp_size],
                          max_message=words[L.CTL_MAX_RESPONSE_BYTES] + REPLY_ENVELOPE)
        self._bell = Doorbell.open(shm_name(self.name, L.client_bell_part(part)),
                                   p[L.CLIENT_SLEEPING:L.CLIENT_SLEEPING + 4])

    def _claim_slot(self, words) -> int:
        # The slot lock lives on a descriptor of its own (a new open file description
        # of the same file, never mapped), so that after fork() the child can close its
        # copy and no mmap's internal dup keeps the parent's lock alive.
        self._lock_fd = os.open(f"/proc/self/fd/{self._ctl.fd}", os.O_RDWR)
        label = default_label() if self.label is None else self.label
        return claim_slot(self._ctl, words, self._lock_fd, label, self._broker_bell)

    def close(self) -> None:
        """Leave the broker: it drops this client's watches and unlinks its rings.

        Idempotent. Later calls raise `ClientClosed`. In a forked child that never used
        an inherited client, this only drops the child's copy (the parent's client is
        untouched)."""
        self._user_closed = True
        if self._fork_gen != forks.generation:
            self._drop_inherited()
            return
        if self._closed:
            return
        self._closed = True
        try:
            if self._seg is not None and self._broker_alive():
                with self._send_lock:
                    self._send(number(bye_request(), 0), time.monotonic() + 1.0)
        except errors.ShmwatchError:
            pass
        finally:
            with self._cond:
                self._evict_sleeper()
                self._release()

    def _evict_sleeper(self) -> None:
        """Wake the thread sleeping on our doorbell and wait until it has left it, so the
        semaphore is never closed under a waiter (lock held; bounded)."""
        deadline = time.monotonic() + 2.0
        while self._sleeper and time.monotonic() < deadline:
            if self._bell is not None:
                self._bell.post()
            self._cond.wait(0.05)

    def _release(self) -> None:
        self._fail_futures(errors.ClientClosed() if self._user_closed else
                           errors.BrokerUnavailable(f"shmwatch: broker {self.name!r} went away "
                                                    f"before it answered"))
        for w in list(self._watches.values()):
            if w._ring is not None:
                w._ring.release()
            w._ring = None
            w._catchup = None  # it reads the log released below
        if self._log is not None:
            self._log.release()
            self._log = None
        for ring in (getattr(self, "_req", None), getattr(self, "_resp", None)):
            if ring is not None:
                ring.release()
        self._req = self._resp = None  # type: ignore[assignment]
        for seg in self._arenas:
            if seg is not None:
                seg.close()
        self._arenas.clear()
        if self._bell is not None:
            self._bell.close()
        if getattr(self, "_broker_bell", None) is not None:
            self._broker_bell.close()
        if self._seg is not None:
            self._seg.close()
        self._words = None
        if self._lock_fd >= 0:
            slot = getattr(self, "_slot", None)
            if slot is not None:
                try:
                    unlock(self._lock_fd, L.slot_lock_byte(slot))
                except OSError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = -1
        if self._ctl is not None:
            self._slot = self._gen = None
            self._ctl.close()
        self._closed = True

    def reconnect(self, timeout: float | None = None, *, _generation: int | None = None) -> None:
        """Attach again to a broker of the same name after the old one went away.

        Watches created with `resume=True` are re-created from the revision after the
        last one they delivered (no gap, no duplicate; a compaction cancel if that
        revision is gone); other watches end with `BrokerUnavailable`. A broker that
        restarted without its data (a new cluster id: revisions start over) is refused
        with `BrokerUnavailable` rather than silently resetting revisions.
        """
        deadline = self._deadline(timeout)
        with self._send_lock, self._cond:
            if _generation is not None and _generation != self.generation:
                return  # another thread reconnected while we waited for the lock
            old_cluster = self._cluster_id
            watches = sorted(self._watches.values(), key=lambda w: w.watch_id)
            self._closed = True  # a woken sleeper must not go back to the old doorbell
            self._evict_sleeper()
            self._release()
            self._replies.clear()
            self._abandoned.clear()
            self._to_cancel.clear()
            self._orphans.clear()
            self._free_rings.clear()
            self._watches.clear()
            self._seg = self._bell = self._ctl = None
            self._broker_bell = None
            while True:
                self._closed = False
                try:
                    try:
                        self._attach(deadline)
                    except ShmError as exc:  # e.g. a broker that died as we attached
                        raise from_shm(exc, self.name) from None
                    break
                except (errors.BrokerUnavailable, errors.Timeout):
                    self._release()
                    self._seg = self._bell = self._ctl = None
                    self._broker_bell = None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.generation += 1
            self._broken = None
            if self._cluster_id != old_cluster:
                for w in watches:
                    w._lost()
                raise errors.BrokerUnavailable(
                    f"shmwatch: broker {self.name!r} restarted without its data (new cluster "
                    f"id): revisions start over, so watches cannot resume")
        for w in watches:
            if w._resume and not w._final:
                w._recreate(timeout)
            else:
                w._lost()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------ plumbing

    def _broker_alive(self) -> bool:
        return self._ctl is not None and is_locked(self._ctl.fd, L.BROKER_LOCK_BYTE)

    def _check_alive(self) -> None:
        if self._closed:
            if self._user_closed:
                raise errors.ClientClosed()
            raise errors.BrokerUnavailable("shmwatch: client is not attached")
        if not self._broker_alive():
            raise errors.BrokerUnavailable(f"shmwatch: broker {self.name!r} is gone")
        words = self._words
        slot = getattr(self, "_slot", None)
        if (slot is not None and getattr(self, "_gen", None) is not None
                and (words[L.slot_word(slot, L.SLOT_STATE)] != L.SLOT_READY
                     or words[L.slot_word(slot, L.SLOT_GEN)] != self._gen)):
            raise errors.BrokerUnavailable(
                f"shmwatch: broker {self.name!r} disconnected this client (its rings held "
                f"data the broker could not accept)")

    def _deadline(self, timeout: float | None) -> float:
        return time.monotonic() + (self.timeout if timeout is None else timeout)

    def _send(self, data: bytes, deadline: float | None, flush: bool = True) -> None:
        """Write one request (caller holds _send_lock); waits for ring space if needed.

        With flush=False the request is published only when the ring fills (pipelining:
        the caller publishes and rings the broker once for the whole batch). If the
        deadline passes first, the request is not sent: a part already streamed into
        the ring is abandoned with an abort marker, which the broker discards."""
        off = 0
        while True:
            off = self._req.write(data, off)
            if off == len(data):
                if flush:
                    self._req.publish()
                    self._broker_bell.ring()
                return
            self._req.publish()
            self._broker_bell.ring()
            try:
                self._check_alive()
                if deadline is not None and time.monotonic() > deadline:
                    raise errors.Timeout("shmwatch: request ring full: broker not keeping "
                                         "up (the request was not sent)")
                time.sleep(0.0002)
            except BaseException:  # also KeyboardInterrupt in the sleep
                self._abort_partial()
                raise

    def _abort_partial(self) -> None:
        """Abandon a request streamed into the ring in part (see `_send`). Best effort:
        a client the broker dropped or closed has no ring to mark."""
        if self._closed:
            return
        try:
            if self._req.abort():
                self._req.publish()
                self._broker_bell.ring()
        except (ValueError, ShmError):  # released views; a ring the broker damaged
            pass

    def _send_pending(self, deadline: float | None) -> None:
        """Before new requests (send lock held): cancels of watches created after their
        caller gave up."""
        while self._to_cancel:
            rid = self._req_id + 1
            self._send(number(watch_cancel_request(self._to_cancel[-1]), rid), deadline,
                       flush=False)
            self._req_id = rid
            self._abandoned[rid] = None
            self._to_cancel.pop()

    def _call(self, msg: list, timeout: float | None = None, on_late: Callable | None = None):
        """Send a request and wait for its reply body; raise the broker's typed error.
        If the wait is abandoned (timeout), `on_late` gets the reply when it comes."""
        result = self._call_many([msg], timeout, on_late)[0]
        if isinstance(result, errors.ShmwatchError):
            raise result
        return result

    def _call_many(self, msgs: list[list], timeout: float | None = None,
                   on_late: Callable | None = None) -> list:
        """Pipeline requests: write them all, wake the broker once, wait for every reply.

        Replies come back in request order (the broker serves a client's ring in order),
        so waiting for the last one waits for all. Errors are returned, not raised: a
        request too large to send gets `RequestTooLargeError` in its place and the
        others are still sent."""
        self._own()
        if self._closed:
            self._check_alive()
        if self._broken is not None:
            raise errors.ProtocolError(self._broken)
        deadline = self._deadline(timeout)
        rids = []
        out: list = [None] * len(msgs)
        with self._send_lock:
            try:
                self._send_pending(deadline)
                for i, msg in enumerate(msgs):
                    rid = self._req_id + 1
                    data = number(msg, rid)
                    if len(data) > self.max_request_bytes:
                        out[i] = errors.RequestTooLargeError()
                        continue
                    self._send(data, deadline, flush=False)
                    self._req_id = rid
                    rids.append((i, rid))
            except errors.Timeout:
                self._abandon([r for _, r in rids], on_late)
                raise
            finally:
                self._req.publish()
                self._broker_bell.ring()
        if not rids:
            return out
        last = rids[-1][1]
        if not self._wait(lambda: last in self._replies, self._resp_readable, deadline):
            with self._cond:
                if last not in self._replies:
                    self._abandon([r for _, r in rids], on_late)
                    raise errors.Timeout("shmwatch: no reply from the broker within the timeout")
        with self._cond:
            for i, r in rids:
                out[i] = self._replies.pop(r)
        return out

    def _abandon(self, rids: list[int], on_late: Callable | None) -> None:
        """Nobody waits for these replies any more (lock held or not needed): drop them
        when they come, or hand them to `on_late` (single requests only)."""
        with self._cond:
            for r in rids:
                result = self._replies.pop(r, None)
                if result is not None and on_late is not None:
                    on_late(result)  # it came just now: too late for its caller
                elif r not in self._replies:
                    self._abandoned[r] = on_late if len(rids) == 1 else None

    def _resp_readable(self) -> bool:
        r = self._resp
        return r is not None and r.readable()

    def _pump(self) -> None:
        """Move every reply waiting in the response ring into `_replies` (lock held)."""
        resp = self._resp
        if resp is None:
            return
        while True:
            try:
                data = resp.read()
            except MessageTooLarge as exc:
                # The broker bounds replies by --max-response-bytes, which bounds this
                # read too: reaching this means a reply over it. Its caller gets a typed
                # error; the ring is still in step.
                rid = peek_id(exc.head, 0)
                if rid and rid not in self._abandoned:
                    self._replies[rid] = errors.ResponseTooLargeError(
                        f"shmwatch: reply of {exc.size} bytes exceeds this client's limit")
                self._abandoned.pop(rid, None)
                continue
            except RingCorrupt as exc:
                self._broken = (
                    f"shmwatch: this client's response ring is damaged ({exc}); "
                    f"reconnect() to attach again")
                raise errors.ProtocolError(self._broken) from None
            if data is None:
                if resp.producer_blocked:
                    self._space_freed(resp)  # the broker holds replies for us: room now
                break
            rid, result = decode_reply(data)
            if not rid:
                continue  # the broker could not read a request id: nobody waits for it
            if rid in self._abandoned:
                late = self._abandoned.pop(rid)
                self._futures.pop(rid, None)
                if late is not None:
                    late(result)
            else:
                self._replies[rid] = result
        for w in list(self._orphans):  # watches nobody holds: read to their end
            w._drain_to_end()
            w._buf.clear()
            if w._final:
                self._orphans.discard(w)

    def _wait(self, done: Callable[[], bool], ready: Callable[[], bool],
              deadline: float | None) -> bool:
        """Block until `done()` (called with the lock held, after pumping replies).

        One thread at a time sleeps on the client's doorbell; the others wait on a
        condition it signals when it wakes, so no wake-up is lost between threads.
        """
        spin = SPIN  # only before the first sleep: an idle wait's later slices never spin
        while True:
            with self._cond:
                self._pump()
                if done():
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                if self._sleeper:
                    self._cond.wait(WAIT_SLICE_S if remaining is None
                                    else min(remaining, WAIT_SLICE_S))
                    continue
                self._sleeper = True
            try:
                self._check_alive()
                bell = self._bell
                bell.wait(lambda: self._resp_readable() or ready(),
                          WAIT_SLICE_S if remaining is None else min(remaining, WAIT_SLICE_S),
                          spin=spin, slice=WAIT_SLICE_S)
                spin = 0
            finally:
                with self._cond:
                    self._sleeper = False
                    self._cond.notify_all()

    def _catch_up(self, cu, spec, watch_id: int):
        """The responses of a catch-up the broker handed watch `watch_id`, read from
        its revision log in this process (clientlib.catchup)."""
        if self._log is None:
            try:
                self._log = LogAccess(self.name, self._words, self._boot_id)
            except ShmError as exc:
                raise from_shm(exc, self.name) from None
        return self._log.catch_up(cu, spec, watch_id)

    def _space_freed(self, ring: Ring) -> None:
        """The broker is waiting for space in `ring`: tell it there is some now."""
        ring.producer_blocked = 0
        self._words[L.CTL_SPACE_HINT] = 1
        self._broker_bell.ring()

    def _room_made(self, ring: Ring) -> None:
        """After reading from a watch ring: if the broker is waiting for room in it and
        the reader has freed the share the broker resumes at, say so (once)."""
        if ring.producer_blocked and ring.used() <= ring.capacity * RESUME_FREE_FRACTION:
            self._space_freed(ring)

    def _watch_closed(self, w: "Watch") -> None:
        with self._cond:
            self._watches.pop(w.watch_id, None)
            if w._ring_slot is not None:
                self._free_rings.append(w._ring_slot)
                w._ring_slot = None
