"""What a worker process uses: a connection to a broker, KV calls and watches.

A `Client` is one registered client of the broker (etcd: one gRPC connection with one
watch stream). It owns a request ring, a response ring and one ring per watch, all in
shared memory the broker created for it, plus a doorbell the broker rings when it
wrote something while the client slept. A `Client` is safe to share between threads;
it must not be used across fork().

Every blocking call has a timeout, and notices a dead broker within one wait slice
(50 ms) through the broker's kernel-held lock: it then raises `BrokerUnavailable`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator

import psutil

from shm import layout as L
from shm.doorbell import Doorbell
from shm.errors import LayoutMismatch, SegmentNotFound, ShmPermissionError
from shm.lock import is_locked, try_lock, unlock
from shm.ring import Ring, ring_bytes
from shm.segment import Segment, shm_name, shm_path

from . import errors
from .ops import (
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
from .protocol import (
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
    W_CANCELED,
    decode_reply,
    decode_response,
    decode_watch_response,
    encode_op,
    packb,
)
from .types import (
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
        self._sleeper = False
        self._replies: dict[int, object] = {}
        self._abandoned: set[int] = set()
        self._req_id = 0
        self._watches: dict[int, Watch] = {}
        self._free_rings: list[tuple[int, int]] = []
        self._arenas: list[Segment] = []
        self._seg: Segment | None = None
        self._bell: Doorbell | None = None
        self._ctl: Segment | None = None
        self.generation = 0  # bumped by every reconnect()
        self._user_closed = False
        deadline = time.monotonic() + timeout
        try:
            self._attach(deadline)
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
        self._resp = Ring(p[L.CLIENT_HEADER + req_size:L.CLIENT_HEADER + req_size + resp_size])
        self._bell = Doorbell.open(shm_name(self.name, L.client_bell_part(part)),
                                   p[L.CLIENT_SLEEPING:L.CLIENT_SLEEPING + 4])

    def _claim_slot(self, words) -> int:
        fd = self._ctl.fd
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
        """Leave the broker: it drops this client's watches and unlinks its rings."""
        self._user_closed = True
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
            seg.close()
        self._arenas.clear()
        if self._bell is not None:
            self._bell.close()
        if getattr(self, "_broker_bell", None) is not None:
            self._broker_bell.close()
        if self._seg is not None:
            self._seg.close()
        self._words = None
        if self._ctl is not None:
            slot = getattr(self, "_slot", None)
            if slot is not None and self._ctl.fd >= 0:
                # mmap holds its own descriptor of the file, so closing ours would not
                # drop the OFD lock while any view lives: drop it explicitly.
                try:
                    unlock(self._ctl.fd, L.slot_lock_byte(slot))
                except OSError:
                    pass
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
            self._free_rings.clear()
            self._watches.clear()
            self._seg = self._bell = self._ctl = None
            self._broker_bell = None
            while True:
                self._closed = False
                try:
                    self._attach(deadline)
                    break
                except (errors.BrokerUnavailable, errors.Timeout):
                    self._release()
                    self._seg = self._bell = self._ctl = None
                    self._broker_bell = None
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            self.generation += 1
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
            raise errors.BrokerUnavailable("shmwatch: client is closed")
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
        so waiting for the last one waits for all. Errors are returned, not raised."""
        if self._closed:
            raise errors.BrokerUnavailable("shmwatch: client is closed")
        deadline = self._deadline(timeout)
        rids = []
        with self._send_lock:
            for msg in msgs:
                rid = msg[1] = self._req_id + 1
                data = packb(msg)
                if len(data) > self.max_request_bytes:
                    if rids:
                        break  # send what came before; this one fails below
                    raise errors.RequestTooLargeError()
                self._req_id = rid
                self._send(data, deadline, flush=False)
                rids.append(rid)
            self._req.publish()
            self._broker_bell.ring()
        last = rids[-1]
        if not self._wait(lambda: last in self._replies, self._resp_readable, deadline):
            with self._cond:
                if last not in self._replies:
                    self._abandoned.update(r for r in rids if r not in self._replies)
                    for r in rids:
                        self._replies.pop(r, None)
                    raise errors.Timeout("shmwatch: no reply from the broker within the timeout")
        with self._cond:
            out = [self._replies.pop(r) for r in rids]
        if len(rids) < len(msgs):
            out += [errors.RequestTooLargeError()] * (len(msgs) - len(rids))
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
            data = resp.read()
            if data is None:
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

    # ------------------------------------------------------------ KV

    def _kv(self, op, timeout: float | None):
        return decode_response(self._call([OP_KV, 0, encode_op(op)], timeout))

    def put(self, key, value, prev_kv: bool = False, ignore_value: bool = False, *,
            timeout: float | None = None) -> PutResponse:
        """etcd Put. O(log n) at the broker plus delivery to matching watchers."""
        body = self._call([OP_KV, 0, [K_PUT, to_bytes(key), to_bytes(value, "value"),
                                      bool(prev_kv), bool(ignore_value)]], timeout)
        try:
            return PutResponse(body[1], None if body[2] is None else KeyValue(*body[2]))
        except (TypeError, IndexError):
            raise errors.ProtocolError("shmwatch: malformed put response") from None

    def put_many(self, items: Iterable[tuple], prev_kv: bool = False, *,
                 timeout: float | None = None) -> list[PutResponse]:
        """Pipelined puts: the same as `put(k, v)` for each (k, v) in order — each its own
        request and revision, as etcd would apply them — but written to the ring in one
        go with one wake-up of the broker. Raises the first error after all were tried."""
        msgs = [[OP_KV, 0, encode_op(op_put(k, v, prev_kv))] for k, v in items]
        if not msgs:
            return []
        out = []
        first_error = None
        for body in self._call_many(msgs, timeout):
            if isinstance(body, errors.ShmwatchError):
                first_error = first_error or body
                out.append(body)
            else:
                out.append(decode_response(body))
        if first_error is not None:
            raise first_error
        return out

    def get(self, key, range_end=None, prefix: bool = False, revision: int = 0,
            limit: int = 0, keys_only: bool = False, count_only: bool = False, *,
            timeout: float | None = None) -> RangeResponse:
        """etcd Range: one key, [key, range_end), a prefix, or every key >= key
        (range_end=b"\\0"), at the current or a retained past revision."""
        return self._kv(op_get(key, range_end, prefix, revision, limit, keys_only, count_only),
                        timeout)

    def delete(self, key, range_end=None, prefix: bool = False, prev_kv: bool = False, *,
               timeout: float | None = None) -> DeleteRangeResponse:
        """etcd DeleteRange."""
        return self._kv(op_delete(key, range_end, prefix, prev_kv), timeout)

    def txn(self, compare: Iterable = (), success: Iterable = (), failure: Iterable = (), *,
            timeout: float | None = None) -> TxnResponse:
        """etcd Txn: if every compare holds, apply `success`, else `failure`, atomically at
        one revision. Build compares and ops with clientlib.compare_* and clientlib.op_*."""
        for op in (*success, *failure):
            if not isinstance(op, (PutOp, RangeOp, DeleteOp, TxnOp)):
                raise TypeError(f"not a txn op: {op!r} (build ops with clientlib.op_put etc.)")
        return self._kv(op_txn(compare, success, failure), timeout)

    def compact(self, revision: int, *, timeout: float | None = None) -> CompactResponse:
        """etcd Compact: forget history before `revision`."""
        return decode_response(self._call([OP_COMPACT, 0, int(revision)], timeout))

    # ------------------------------------------------------------ watches

    def watch(self, key, range_end=None, prefix: bool = False, start_revision: int = 0,
              prev_kv: bool = False, filters: Iterable[str] = (), progress_notify: bool = False,
              fragment: bool = False, watch_id: int | None = None, *,
              resume: bool = False, timeout: float | None = None) -> "Watch":
        """etcd Watch on one key, a range, a prefix or every key >= key.

        Returns a `Watch` whose first response is the `created` one. A refused watch
        (key >= range_end, duplicate watch_id) yields created+canceled with etcd's reason.
        With `resume=True` the watch survives a broker restart (see `reconnect()`).
        """
        k, end = resolve_range(key, range_end, prefix)
        bits = 0
        for f in filters:
            if f not in _FILTERS:
                raise ValueError(f"unknown watch filter {f!r} (noput, nodelete)")
            bits |= _FILTERS[f]
        spec = [k, end, int(start_revision), bool(prev_kv), bits, bool(progress_notify),
                bool(fragment)]
        wid, rev, reason, ring_slot, ring = self._create_watch(spec, int(watch_id or 0), timeout)
        if wid < 0:
            err = (errors.DuplicateWatchIdError(reason) if "duplicate" in reason
                   else errors.InvalidRangeError(reason))
            return Watch(self, -1, None, None, refused=(rev, reason, err))
        w = Watch(self, wid, ring_slot, ring, spec=spec, resume=resume)
        with self._cond:
            self._watches[wid] = w
        return w

    def _create_watch(self, spec: list, want_id: int, timeout: float | None):
        ring_slot = self._take_ring(timeout)
        try:
            wid, rev, reason = self._call(
                [OP_WATCH_CREATE, 0, ring_slot[0], ring_slot[1], *spec, want_id], timeout)
        except BaseException:
            self._free_rings.append(ring_slot)
            raise
        if wid < 0:
            self._free_rings.append(ring_slot)
            return wid, rev, reason, None, None
        a, i = ring_slot
        rs = self._watch_ring_size
        return wid, rev, reason, ring_slot, Ring(self._arenas[a].payload[i * rs:(i + 1) * rs])

    def _take_ring(self, timeout: float | None) -> tuple[int, int]:
        with self._cond:
            if not self._free_rings:
                k, name = self._call([OP_ARENA, 0], timeout)
                seg = Segment.open(name, kind=L.KIND_ARENA, boot_id=self._boot_id)
                if k != len(self._arenas):
                    raise errors.ProtocolError("shmwatch: arena numbering out of step")
                self._arenas.append(seg)
                self._free_rings.extend((k, i) for i in range(self._rings_per_arena - 1, -1, -1))
            return self._free_rings.pop()

    def request_progress(self, *, timeout: float | None = None) -> None:
        """etcd's progress request: each watch receives a response (watch_id -1) whose
        header revision says the watch has seen everything up to it."""
        self._call([OP_PROGRESS, 0], timeout)

    def _watch_closed(self, w: "Watch") -> None:
        with self._cond:
            self._watches.pop(w.watch_id, None)
            if w._ring_slot is not None:
                self._free_rings.append(w._ring_slot)
                w._ring_slot = None


class Watch:
    """A stream of `WatchResponse`s for one watch: iterate it, or `get()` / `get_nowait()`.

    Iteration ends after the final `canceled` response (yours, a compaction's, or the
    broker's). After that, `get()` raises: `CompactedError` if the watch was compacted,
    the refusal's error for a refused watch, else `WatchClosed`.
    """

    def __init__(self, client: Client, watch_id: int, ring_slot, ring: Ring | None,
                 refused: tuple | None = None, spec: list | None = None, resume: bool = False):
        self._client = client
        self.watch_id = watch_id
        self._ring_slot = ring_slot
        self._ring = ring
        self._buf: deque[WatchResponse] = deque()
        self._final = False  # the canceled response is in _buf or was returned
        self._error: errors.ShmwatchError | None = None
        self._spec = spec
        self._resume = resume
        self._next_rev = spec[2] if spec else 0  # where a resumed watch starts
        self._skip_created = False
        if refused is not None:
            rev, reason, err = refused
            self._buf.append(WatchResponse(watch_id=-1, revision=rev, created=True,
                                           canceled=True, cancel_reason=reason))
            self._final = True
            self._error = err

    def _pull(self) -> bool:
        """Move what the ring holds into the buffer (client lock held). True if any."""
        ring = self._ring
        if ring is not None and not self._final:
            while True:
                data = ring.read()
                if data is None:
                    break
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
                        self._error = errors.CompactedError()
                    else:
                        self._error = errors.WatchClosed(
                            "shmwatch: watch canceled" + (f": {resp.cancel_reason}"
                                                          if resp.cancel_reason else ""))
                    self._ring = None
                    if ring.producer_blocked:
                        self._client._space_freed(ring)
                    self._client._watch_closed(self)
                    return True
            if ring.producer_blocked:
                self._client._space_freed(ring)
        return bool(self._buf)

    def _ready(self) -> bool:
        r = self._ring
        return bool(self._buf) or (r is not None and r.readable())

    def get_nowait(self) -> WatchResponse | None:
        """The next response if one is here, else None. Raises once the watch is over."""
        with self._client._cond:
            if self._pull():
                return self._buf.popleft()
        self._raise_if_over()
        return None

    def get(self, timeout: float | None = None) -> WatchResponse:
        """The next response, waiting up to `timeout` seconds (None: forever, while the
        broker lives). Raises `Timeout`, `BrokerUnavailable`, or the watch's end error."""
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
        wid, rev, reason, ring_slot, ring = c._create_watch(spec, self.watch_id, timeout)
        if wid < 0:
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
        except (errors.WatchClosed, errors.CompactedError, errors.InvalidRangeError,
                errors.DuplicateWatchIdError):
            raise StopIteration from None

    @property
    def canceled(self) -> bool:
        return self._final

    def cancel(self, timeout: float | None = None) -> None:
        """Cancel the watch. Responses already sent stay readable, then the `canceled`
        response, then iteration ends."""
        if self._final:
            return
        c = self._client
        c._call([OP_WATCH_CANCEL, 0, self.watch_id], timeout)
        deadline = c._deadline(timeout)
        if not c._wait(lambda: (self._pull() or True) and self._final, self._ready, deadline):
            raise errors.Timeout("shmwatch: cancel not confirmed within the timeout")

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        if not self._final and not self._client._closed:
            try:
                self.cancel()
            except errors.ShmwatchError:
                pass
