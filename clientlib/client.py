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
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import psutil

from shm import layout as L
from shm.doorbell import Doorbell
from shm.errors import (
    LayoutMismatch,
    MessageTooLarge,
    RingCorrupt,
    SegmentNotFound,
    ShmError,
    ShmNoSpace,
    ShmPermissionError,
)
from shm.lock import is_locked, try_lock, unlock
from shm.ring import Ring, ring_bytes
from shm.segment import Segment, shm_name, shm_path

from shmwatch.wire import errors
from shmwatch.wire.ops import (
    DeleteOp,
    PutOp,
    RangeOp,
    TxnOp,
    op_delete,
    op_get,
    op_put,
    op_txn,
    resolve_range,
    to_bytes,
)
from shmwatch.wire.protocol import (
    FILTER_NODELETE,
    FILTER_NOPUT,
    OP_ARENA,
    OP_BYE,
    OP_COMPACT,
    OP_KV,
    OP_PROGRESS,
    OP_WATCH_CANCEL,
    OP_WATCH_CREATE,
    K_PUT,
    RESUME_FREE_FRACTION,
    W_CANCELED,
    decode_reply,
    decode_response,
    decode_watch_response,
    encode_op,
    packb,
    peek_id,
)
from shmwatch.wire.types import (
    CompactResponse,
    DeleteRangeResponse,
    KeyValue,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchResponse,
)

WAIT_SLICE_S = 0.05  # a dead broker is noticed within this
SPIN = 200  # ready() checks before sleeping on the doorbell: ~50 us of spinning
DEFAULT_TIMEOUT = 5.0
REPLY_ENVELOPE = 64 << 10  # bytes of a reply beyond the broker's --max-response-bytes
# A watch response is bounded by the broker (a catch-up by its ring's free space or one
# revision); a revision with prev_kv can exceed --max-response-bytes, so the reader's
# bound is gRPC's own default message limit (math.MaxInt32).
MAX_WATCH_RESPONSE = (1 << 31) - 1
INT64 = range(-(1 << 63), 1 << 63)

# Fork safety: bumped in every child right after fork(); clients and watches compare it
# with the value they were made under (cheaper than os.getpid() on every call).
_fork_generation = 0
_live_clients: "weakref.WeakSet[Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for c in list(_live_clients):
        c._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def from_shm(exc: ShmError, name: str) -> errors.ShmwatchError:
    """The user-facing error for a shared-memory failure under a call: nothing of
    `shm.errors` reaches a user of clientlib."""
    if isinstance(exc, ShmPermissionError):
        return errors.PermissionDenied(f"shmwatch: permission denied by broker {name!r}: {exc}")
    if isinstance(exc, ShmNoSpace):
        return errors.NoSpaceError(f"shmwatch: /dev/shm is full: {exc}")
    if isinstance(exc, (SegmentNotFound, LayoutMismatch)):
        return errors.BrokerUnavailable(
            f"shmwatch: the shared memory of broker {name!r} changed under this client "
            f"(a restarted or replaced broker?): {exc}")
    if isinstance(exc, (RingCorrupt, MessageTooLarge)):
        return errors.ProtocolError(f"shmwatch: shared memory of broker {name!r} is "
                                    f"damaged: {exc}")
    return errors.ShmwatchError(f"shmwatch: {exc}")

_FILTERS = {"noput": FILTER_NOPUT, "nodelete": FILTER_NODELETE,
            "NOPUT": FILTER_NOPUT, "NODELETE": FILTER_NODELETE}


def connect(name: str, timeout: float = DEFAULT_TIMEOUT, *, label: str | None = None) -> "Client":
    """Attach to the broker called `name`. `timeout` is the default for every call.

    `label` names this client in the broker's metrics (tools/top); by default the
    multiprocessing process name, or `<script>:<pid>` in a main process."""
    return Client(name, timeout=timeout, label=label)


def default_label() -> str:
    """The multiprocessing process name, unless it is "MainProcess"; else script:pid."""
    import multiprocessing
    import sys

    name = multiprocessing.current_process().name
    if name != "MainProcess":
        return name
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
    return f"{script}:{os.getpid()}"


def _label_bytes(label: str) -> bytes:
    """`label` as at most SLOT_LABEL_BYTES of UTF-8, cut at a character boundary."""
    raw = label.encode("utf-8", errors="replace")[:L.SLOT_LABEL_BYTES]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def _registration_error(name: str, words, slot: int) -> errors.ShmwatchError:
    """The error the broker reported in our slot instead of registering us. Frees the
    slot (we still hold its lock, so it is ours to free)."""
    code = words[L.slot_word(slot, L.SLOT_ERROR)]
    needed = words[L.slot_word(slot, L.SLOT_ERROR_ARG)]
    words[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_FREE
    if code == errors.NoSpaceError.code:
        return errors.NoSpaceError(
            f"shmwatch: /dev/shm is full: broker {name!r} needs {needed} bytes for this "
            f"client's request and response rings; free space in /dev/shm or start the "
            f"broker with smaller --request-ring-bytes/--response-ring-bytes")
    return errors.error_from_code(
        code, f"shmwatch: broker {name!r} could not register this client (see its log)")


class Client:
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
        self._abandoned: set[int] = set()
        self._req_id = 0
        self._watches: dict[int, Watch] = {}
        self._free_rings: list[tuple[int, int]] = []
        self._arenas: list[Segment | None] = []  # None: an arena we could not open
        self._seg: Segment | None = None
        self._bell: Doorbell | None = None
        self._ctl: Segment | None = None
        self.generation = 0  # bumped by every reconnect()
        self._user_closed = False
        self._lock_fd = -1  # our own descriptor of the ctl file, holding our slot lock
        self._broken: str | None = None  # why this client's response ring is unusable
        self._fork_gen = _fork_generation
        _live_clients.add(self)
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
        try:
            self._ctl = Segment.open(shm_name(self.name, "ctl"), kind=L.KIND_CTL)
        except SegmentNotFound:
            raise errors.BrokerUnavailable(
                f"shmwatch: no broker named {self.name!r} is running") from None
        except ShmPermissionError:
            raise errors.PermissionDenied(
                f"shmwatch: permission denied: broker {self.name!r} belongs to another user "
                f"(its segments are mode 0600 unless started with --mode/--group)") from None
        except LayoutMismatch as exc:
            try:
                whose = f" (owner uid {os.stat(shm_path(shm_name(self.name, L.CTL_PART))).st_uid})"
            except OSError:
                whose = ""
            raise errors.BrokerUnavailable(
                f"shmwatch: broker {self.name!r} has an incompatible layout{whose}: "
                f"{exc}") from None
        st = os.fstat(self._ctl.fd)
        if st.st_mode & 0o002:
            raise errors.PermissionDenied(
                f"shmwatch: broker {self.name!r} control segment is world-writable: refusing")
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
        self._watch_ring_size = ring_bytes(words[L.CTL_WATCH_RING])
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
        req_size = ring_bytes(words[L.CTL_REQUEST_RING])
        resp_size = ring_bytes(words[L.CTL_RESPONSE_RING])
        self._req = Ring(p[L.CLIENT_HEADER:L.CLIENT_HEADER + req_size])
        self._resp = Ring(p[L.CLIENT_HEADER + req_size:L.CLIENT_HEADER + req_size + resp_size],
                          max_message=words[L.CTL_MAX_RESPONSE_BYTES] + REPLY_ENVELOPE)
        self._bell = Doorbell.open(shm_name(self.name, L.client_bell_part(part)),
                                   p[L.CLIENT_SLEEPING:L.CLIENT_SLEEPING + 4])

    def _claim_slot(self, words) -> int:
        # The slot lock lives on a descriptor of its own (a new open file description
        # of the same file, never mapped), so that after fork() the child can close its
        # copy and no mmap's internal dup keeps the parent's lock alive.
        fd = self._lock_fd = os.open(f"/proc/self/fd/{self._ctl.fd}", os.O_RDWR)
        me = psutil.Process()
        for slot in range(words[L.CTL_MAX_CLIENTS]):
            if words[L.slot_word(slot, L.SLOT_STATE)] != L.SLOT_FREE:
                continue
            if not try_lock(fd, L.slot_lock_byte(slot)):
                continue
            if words[L.slot_word(slot, L.SLOT_STATE)] != L.SLOT_FREE:
                unlock(fd, L.slot_lock_byte(slot))  # the broker has not reclaimed it yet
                continue
            words[L.slot_word(slot, L.SLOT_PID)] = os.getpid()
            words[L.slot_word(slot, L.SLOT_CREATE_TIME_US)] = int(me.create_time() * 1e6)
            label = _label_bytes(default_label() if self.label is None else self.label)
            off = L.slot_label_offset(slot)
            self._ctl.payload[off:off + L.SLOT_LABEL_BYTES] = label.ljust(L.SLOT_LABEL_BYTES,
                                                                          b"\0")
            words[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_REQUESTED
            words[L.CTL_REG_SEQ] += 1
            self._broker_bell.ring()
            return slot
        raise errors.TooManyClientsError()

    def close(self) -> None:
        """Leave the broker: it drops this client's watches and unlinks its rings.

        Idempotent. Later calls raise `ClientClosed`. In a forked child that never used
        an inherited client, this only drops the child's copy (the parent's client is
        untouched)."""
        self._user_closed = True
        if self._fork_gen != _fork_generation:
            self._drop_inherited()
            return
        if self._closed:
            return
        self._closed = True
        try:
            if self._seg is not None and self._broker_alive():
                with self._send_lock:
                    self._send(packb([OP_BYE, 0]), time.monotonic() + 1.0)
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
        for w in list(self._watches.values()):
            if w._ring is not None:
                w._ring.release()
            w._ring = None
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

    # ------------------------------------------------------------ fork safety

    def _forked(self) -> None:
        """In a child right after fork() (one thread): drop the child's copy of the
        parent's slot lock, and replace every lock (another thread of the parent may
        have held one mid-call). Touches no shared memory."""
        if self._lock_fd >= 0:
            try:
                os.close(self._lock_fd)
            except OSError:
                pass
            self._lock_fd = -1
        self._cond = threading.Condition(threading.RLock())
        self._send_lock = threading.Lock()
        self._watch_lock = threading.Lock()
        self._sleeper = False

    def _drop_inherited(self) -> None:
        """Forget the parent's client in this child: unmap our copies of its segments
        and close our semaphore handles; send nothing, unlock nothing, unlink nothing."""
        for w in self._watches.values():
            if w._ring is not None:
                w._ring.release()
                w._ring = None
        self._watches.clear()
        self._replies.clear()
        self._abandoned.clear()
        self._free_rings.clear()
        self._slot = None  # the slot (and its lock) is the parent's
        self._release()
        self._seg = self._bell = self._ctl = None
        self._broker_bell = None
        self._fork_gen = _fork_generation

    def _own(self) -> None:
        """Make sure this client belongs to this process: in a forked child, attach as
        a new client on first use (the parent's stays as it was)."""
        if self._fork_gen == _fork_generation:
            return
        with self._send_lock, self._cond:
            if self._fork_gen == _fork_generation:
                return  # another thread of this child did it
            user_closed = self._user_closed
            self._drop_inherited()
            if user_closed:
                return  # closed in the parent: stays closed (ClientClosed)
            self._closed = False
            self._broken = None
            try:
                self._attach(time.monotonic() + self.timeout)
            except BaseException as exc:
                self._release()
                self._seg = self._bell = self._ctl = None
                self._broker_bell = None
                if isinstance(exc, ShmError):
                    raise from_shm(exc, self.name) from None
                raise
            self.generation += 1

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
        the caller publishes and rings the broker once for the whole batch)."""
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
            self._check_alive()
            if deadline is not None and time.monotonic() > deadline:
                raise errors.Timeout("shmwatch: request ring full: broker not keeping up")
            time.sleep(0.0002)

    def _call(self, msg: list, timeout: float | None = None):
        """Send a request and wait for its reply body; raise the broker's typed error."""
        result = self._call_many([msg], timeout)[0]
        if isinstance(result, errors.ShmwatchError):
            raise result
        return result

    def _call_many(self, msgs: list[list], timeout: float | None = None) -> list:
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
            for i, msg in enumerate(msgs):
                rid = msg[1] = self._req_id + 1
                data = packb(msg)
                if len(data) > self.max_request_bytes:
                    out[i] = errors.RequestTooLargeError()
                    continue
                self._req_id = rid
                self._send(data, deadline, flush=False)
                rids.append((i, rid))
            if rids:
                self._req.publish()
                self._broker_bell.ring()
        if not rids:
            return out
        last = rids[-1][1]
        if not self._wait(lambda: last in self._replies, self._resp_readable, deadline):
            with self._cond:
                if last not in self._replies:
                    self._abandoned.update(r for _, r in rids if r not in self._replies)
                    for _, r in rids:
                        self._replies.pop(r, None)
                    raise errors.Timeout("shmwatch: no reply from the broker within the timeout")
        with self._cond:
            for i, r in rids:
                out[i] = self._replies.pop(r)
        return out

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
                self._abandoned.discard(rid)
                continue
            except RingCorrupt as exc:
                self._broken = (
                    f"shmwatch: this client's response ring is damaged ({exc}); "
                    f"reconnect() to attach again")
                raise errors.ProtocolError(self._broken) from None
            if data is None:
                if resp.producer_blocked:
                    self._space_freed(resp)  # the broker holds replies for us: room now
                return
            rid, result = decode_reply(data)
            if not rid:
                continue  # the broker could not read a request id: nobody waits for it
            if rid in self._abandoned:
                self._abandoned.discard(rid)
            else:
                self._replies[rid] = result

    def _wait(self, done: Callable[[], bool], ready: Callable[[], bool],
              deadline: float | None) -> bool:
        """Block until `done()` (called with the lock held, after pumping replies).

        One thread at a time sleeps on the client's doorbell; the others wait on a
        condition it signals when it wakes, so no wake-up is lost between threads.
        """
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
                          spin=SPIN, slice=WAIT_SLICE_S)
            finally:
                with self._cond:
                    self._sleeper = False
                    self._cond.notify_all()

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

    # ------------------------------------------------------------ KV
    #
    # Each verb is a *flow* (module-level generators below): it yields the requests it
    # needs and gets their replies back, so one implementation serves this blocking
    # client and clientlib.aio's awaitable one. `_run` is the blocking driver.

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
            timeout: float | None = None) -> RangeResponse:
        """etcd Range: one key, [key, range_end), a prefix, or every key >= key
        (range_end=b"\\0"), at the current or a retained past revision."""
        return self._run(flow_kv(op_get(key, range_end, prefix, revision, limit, keys_only,
                                        count_only)), timeout)

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

    def _watch_closed(self, w: "Watch") -> None:
        with self._cond:
            self._watches.pop(w.watch_id, None)
            if w._ring_slot is not None:
                self._free_rings.append(w._ring_slot)
                w._ring_slot = None


class Pipelined:
    """What a flow yields to send several requests at once (replies: a list, errors in
    place rather than raised)."""

    __slots__ = ("msgs",)

    def __init__(self, msgs: list[list]):
        self.msgs = msgs


def flow_kv(op):
    """Any KV op (range, delete, txn) -> its response."""
    return decode_response((yield [OP_KV, 0, encode_op(op)]))


def flow_put(key, value, prev_kv: bool, ignore_value: bool):
    body = yield [OP_KV, 0, [K_PUT, to_bytes(key), to_bytes(value, "value"),
                             bool(prev_kv), bool(ignore_value)]]
    try:
        return PutResponse(body[1], None if body[2] is None else KeyValue(*body[2]))
    except (TypeError, IndexError):
        raise errors.ProtocolError("shmwatch: malformed put response") from None


def flow_put_many(items: Iterable[tuple], prev_kv: bool):
    msgs = [[OP_KV, 0, encode_op(op_put(k, v, prev_kv))] for k, v in items]
    if not msgs:
        return []
    out: list = []
    first: int | None = None
    for i, body in enumerate((yield Pipelined(msgs))):
        if isinstance(body, errors.ShmwatchError):
            if first is None:
                first = i
            out.append(body)
        else:
            out.append(decode_response(body))
    if first is not None:
        err = out[first]
        failed = sum(isinstance(r, errors.ShmwatchError) for r in out)
        exc = type(err)(f"put_many: item {first} of {len(out)} failed ({failed} failed "
                        f"in all; the others were applied): {err.message}")
        for name, value in err.wire_fields().items():
            setattr(exc, name, value)
        exc.index = first
        exc.results = out
        raise exc
    return out


def flow_txn(compare: Iterable, success: Iterable, failure: Iterable):
    success, failure = tuple(success), tuple(failure)
    for op in (*success, *failure):
        if not isinstance(op, (PutOp, RangeOp, DeleteOp, TxnOp)):
            raise TypeError(f"not a txn op: {op!r} (build ops with clientlib.op_put etc.)")
    return (yield from flow_kv(op_txn(compare, success, failure)))


def flow_compact(revision: int):
    return decode_response((yield [OP_COMPACT, 0, int(revision)]))


def flow_progress():
    yield [OP_PROGRESS, 0]


def watch_spec(key, range_end, prefix: bool, start_revision: int, prev_kv: bool,
               filters: Iterable[str], progress_notify: bool, fragment: bool,
               watch_id: int | None) -> tuple[list, int]:
    """A watch's wire spec and the id asked for, checked client-side."""
    k, end = resolve_range(key, range_end, prefix)
    bits = 0
    for f in filters:
        if f not in _FILTERS:
            raise ValueError(f"unknown watch filter {f!r} (noput, nodelete)")
        bits |= _FILTERS[f]
    want = int(watch_id or 0)
    if want not in INT64:
        raise ValueError(f"watch_id must be an int64, got {watch_id}")
    return [k, end, int(start_revision), bool(prev_kv), bits, bool(progress_notify),
            bool(fragment)], want


def flow_watch(c: Client, spec: list, want: int, resume: bool):
    """Create a watch -> `Watch` (a refused one carries its refusal)."""
    wid, rev, reason, code, ring_slot, ring = yield from flow_create_watch(c, spec, want)
    if code:
        err = errors.error_from_code(code, reason)
        return Watch(c, -1, None, None, refused=(rev, reason, err))
    w = Watch(c, wid, ring_slot, ring, spec=spec, resume=resume)
    with c._cond:
        c._watches[wid] = w
    return w


def flow_create_watch(c: Client, spec: list, want_id: int):
    """Take a free watcher ring of `c` (asking the broker for a new arena of them when
    none is left) and create the watch on it."""
    ring_slot = yield from flow_take_ring(c)
    try:
        reply = yield [OP_WATCH_CREATE, 0, ring_slot[0], ring_slot[1], *spec, want_id]
        try:
            wid, rev, reason, code = reply
            if not (type(wid) is int and type(rev) is int and type(reason) is str
                    and type(code) is int):
                raise TypeError
        except (TypeError, ValueError):
            raise errors.ProtocolError("shmwatch: malformed watch-create reply") from None
    except BaseException:
        c._free_rings.append(ring_slot)
        raise
    if code:
        c._free_rings.append(ring_slot)
        return wid, rev, reason, code, None, None
    a, i = ring_slot
    rs = c._watch_ring_size
    ring = Ring(c._arenas[a].payload[i * rs:(i + 1) * rs], max_message=MAX_WATCH_RESPONSE)
    return wid, rev, reason, 0, ring_slot, ring


def flow_take_ring(c: Client):
    if not c._free_rings:
        k, name = yield [OP_ARENA, 0]
        if k != len(c._arenas):
            raise errors.ProtocolError("shmwatch: arena numbering out of step")
        try:
            seg = Segment.open(name, kind=L.KIND_ARENA, boot_id=c._boot_id)
        except ShmError:
            c._arenas.append(None)  # keeps step with the broker's numbering; never used
            raise
        c._arenas.append(seg)
        c._free_rings.extend((k, i) for i in range(c._rings_per_arena - 1, -1, -1))
    return c._free_rings.pop()


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

    def __init__(self, client: Client, watch_id: int, ring_slot, ring: Ring | None,
                 refused: tuple | None = None, spec: list | None = None, resume: bool = False):
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
        self._next_rev = spec[2] if spec else 0  # where a resumed watch starts
        self._skip_created = False
        self._fork_gen = _fork_generation
        if refused is not None:
            rev, reason, err = refused
            self._buf.append(WatchResponse(watch_id=-1, revision=rev, created=True,
                                           canceled=True, cancel_reason=reason))
            self._final = True
            self._error = err

    def _mine(self) -> None:
        if self._fork_gen != _fork_generation:
            raise errors.InheritedWatchError(
                f"shmwatch: watch {self.watch_id} was created by another process before "
                f"fork(); it belongs to that process: create a new watch in this one")

    def _pull(self) -> bool:
        """Have the next response ready (client lock held): when the read-ahead buffer
        is empty, take at most one response from the ring. True if one is ready."""
        if self._buf:
            return True
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
            if resp.events:
                self._next_rev = resp.events[-1].kv.mod_revision + 1
            elif resp.created:
                if self._skip_created:
                    self._skip_created = False
                    continue  # a resumed watch's re-creation is invisible
                if not self._next_rev:
                    self._next_rev = resp.revision + 1
            elif not resp.canceled and resp.revision >= self._next_rev:
                self._next_rev = resp.revision + 1  # progress: nothing before it is owed
            self._buf.append(resp)
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

    def _ready(self) -> bool:
        r = self._ring
        return bool(self._buf) or (r is not None and r.readable())

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
        spec = list(self._spec)
        spec[2] = self._next_rev
        wid, rev, reason, code, ring_slot, ring = c._create_watch(spec, self.watch_id, timeout)
        if code:
            self._lost()
            return
        self.watch_id = wid
        self._ring_slot = ring_slot
        self._ring = ring
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
        c = self._client
        c._call([OP_WATCH_CANCEL, 0, self.watch_id], timeout)
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
        if self._fork_gen != _fork_generation:
            return  # the parent's watch: nothing to do here
        if not self._final and not self._client._closed:
            try:
                self.cancel()
            except errors.ShmwatchError:
                pass
