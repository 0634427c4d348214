"""A mirroring broker's gRPC session with a real etcd cluster (the optional extra `etcd`).

Two kinds of threads talk to etcd; the broker's loop never blocks on the network:

- the *watch thread* loads the mirrored range at one revision R (paginated, every page
  at R), then keeps one etcd watch from the last revision it handed over + 1 with
  prev_kv and progress notifications, and hands each etcd revision, whole, to the broker
  through a bounded queue (`items`). A full queue blocks the thread, which stops reading
  the gRPC stream, so a slow broker slows etcd's sender instead of buffering (gRPC's flow
  control). A failed stream (member killed, no leader: the watch carries etcd's
  require-leader metadata) moves to the next endpoint and resumes at the next revision:
  no gap, no duplicate. A compaction past that revision hands over `("compacted", c)`
  and reloads at a fresh R.
- a small pool of *call threads* runs the forwarded unary calls (put, delete, txn,
  compact, leases, linearizable confirmations), each against the endpoint in use, moving
  on to the next one on UNAVAILABLE until the call's deadline; then `UpstreamUnavailable`.

Watch events and loaded keys are converted field by field (`event_of`, `kv_of`: the hot
path); forwarded calls go through etcd's JSON shapes (`shmwatch.wire.etcd_json`, shared
with the differential tests' gateway client) with protobuf's `MessageToDict`/`ParseDict`.
The stubs are etcd-sdk-python's (`pyetcd.etcdrpc`), generated from etcd's .proto files.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import grpc
from google.protobuf.json_format import MessageToDict
from pyetcd import etcdrpc

from shmwatch.wire import errors as E
from shmwatch.wire.etcd_json import error_from_json
from shmwatch.wire.types import DELETE, PUT, Event, KeyValue

log = logging.getLogger("shmwatch.broker.upstream")

ITEMS_MAX = 256  # etcd watch responses waiting for the broker's loop (bounded)
LOAD_PAGE = 1000  # keys per range page of the initial load
CALL_THREADS = 8
RETRY_S = 0.1  # pause before trying the next endpoint
GRPC_OPTIONS = [("grpc.max_receive_message_length", 256 << 20),
                ("grpc.max_send_message_length", 16 << 20),
                ("grpc.keepalive_time_ms", 2000), ("grpc.keepalive_timeout_ms", 2000),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000)]
REQUIRE_LEADER = (("hasleader", "true"),)  # clientv3.WithRequireLeader's metadata
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.CANCELLED)
# UNAVAILABLE details that say the request was never applied: a write may then be sent
# to the next endpoint. Any other failure of a write (connection lost after sending,
# "leader changed", timed out) may have been applied: it is not sent again (clientv3
# retries a mutating call only when no connection was available, alike).
NOT_APPLIED = ("failed to connect", "connection refused", "etcdserver: no leader",
               "etcdserver: not capable")


def to_dict(msg) -> dict:
    """A protobuf message as etcd's gateway would write it in JSON."""
    return MessageToDict(msg, preserving_proto_field_name=True)


def parse_endpoints(spec) -> list[str]:
    """`http://h:p,http://h:p` (or a list) -> ['h:p', ...] (gRPC targets)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        for scheme in ("http://", "https://"):
            if item.startswith(scheme):
                item = item[len(scheme):]
        out.append(item.rstrip("/"))
    if not out:
        raise ValueError("--upstream needs at least one etcd endpoint (http://host:port)")
    return out


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end of a prefix (b'\\0' for everything)."""
    if not prefix:
        return b"\0"
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


def kv_of(kv) -> KeyValue:
    """etcd's mvccpb.KeyValue as shmwatch's (the hot path: no JSON detour)."""
    return KeyValue(kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease)


def event_of(ev) -> Event:
    """etcd's mvccpb.Event as shmwatch's (type 0 PUT, 1 DELETE)."""
    return Event(DELETE if ev.type == 1 else PUT, kv_of(ev.kv),
                 kv_of(ev.prev_kv) if ev.HasField("prev_kv") else None)


def rpc_error(exc: grpc.RpcError) -> E.ShmwatchError:
    """etcd's gRPC error as shmwatch's typed error (by etcd's text)."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else str(exc)
    if code in RETRYABLE:
        return E.UpstreamUnavailable(f"shmwatch: etcd upstream unavailable: {details}")
    return error_from_json({"message": details or str(code),
                            "code": code.value[0] if code is not None else 0})


class Upstream:
    """The session: endpoints, the watch thread, the call pool, and what they report.

    `wake()` is called (from any thread) when an item or a finished call is waiting."""

    def __init__(self, endpoints, prefix: bytes, timeout: float, wake: Callable[[], None],
                 replay_max: int = 0):
        self.endpoints = parse_endpoints(endpoints)
        self.prefix = prefix
        self.range_end = prefix_end(prefix)
        self.timeout = timeout
        self.wake = wake
        self.replay_max = replay_max  # revisions of etcd's history the mirror replays
        self.items: queue.Queue = queue.Queue(maxsize=ITEMS_MAX)
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.next_rev = 0  # the next etcd revision the watch thread asks for (0: load)
        self.etcd_rev = 0  # the newest header revision etcd sent
        self.connected: str | None = None  # the watch thread's endpoint
        self.failovers = 0
        self._current = 0  # index of the endpoint calls use first
        self._channels: dict[str, grpc.Channel] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._pool = ThreadPoolExecutor(CALL_THREADS, thread_name_prefix="etcd-call")
        self._thread = threading.Thread(target=self._watch_loop, name="etcd-watch", daemon=True)

    # ------------------------------------------------------------ life

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            ch.close()
        self._thread.join(timeout=5)

    def channel(self, target: str) -> grpc.Channel:
        with self._lock:
            ch = self._channels.get(target)
            if ch is None:
                ch = self._channels[target] = grpc.insecure_channel(target, options=GRPC_OPTIONS)
            return ch

    # ------------------------------------------------------------ forwarded calls

    def submit(self, token, fn: Callable) -> None:
        """Run `fn(call)` on a call thread; `(token, result, error)` lands in `done`.
        `call(stub_name, method, request)` does one unary call with failover."""
        def run():
            try:
                result, error = fn(self.call), None
            except E.ShmwatchError as exc:
                result, error = None, exc
            except Exception as exc:  # noqa: BLE001 - a bug costs this request only
                log.exception("forwarded call failed")
                result, error = None, E.ShmwatchError(f"shmwatch: internal error: {exc!r}")
            self.done.put((token, result, error))
            self.wake()
        self._pool.submit(run)

    def call(self, stub: str, method: str, request, metadata=(), write: bool = False):
        """One unary call, trying the endpoints in turn until the deadline. A `write` is
        tried again only where it cannot have been applied (`NOT_APPLIED`)."""
        deadline = time.monotonic() + self.timeout
        last = "no endpoint answered"
        n = len(self.endpoints)
        i = self._current
        while not self._stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            target = self.endpoints[i % n]
            fn = getattr(getattr(etcdrpc, stub + "Stub")(self.channel(target)), method)
            try:
                resp = fn(request, timeout=left, metadata=metadata)
                self._current = i % n
                return resp
            except grpc.RpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise rpc_error(exc) from None
                last = f"{target}: {exc.details()}"
                if write and not any(s in (exc.details() or "").lower() for s in NOT_APPLIED):
                    raise E.UpstreamUnavailable(
                        f"shmwatch: etcd upstream unavailable: the write may or may not have "
                        f"been applied ({last})") from None
            i += 1
            if i % n == self._current % n:
                time.sleep(min(RETRY_S, max(0.0, deadline - time.monotonic())))
        raise E.UpstreamUnavailable(
            f"shmwatch: etcd upstream unavailable: no answer within {self.timeout:g} s ({last})")

    def current_revision(self, call) -> int:
        """etcd's current revision, confirmed by a linearizable read (a one-key count)."""
        req = etcdrpc.RangeRequest(key=self.prefix or b"\0", range_end=self.range_end,
                                   count_only=True, limit=1)
        rev = call("KV", "Range", req).header.revision
        self.etcd_rev = max(self.etcd_rev, rev)
        return rev

    # ------------------------------------------------------------ the watch thread

    def _hand(self, item) -> bool:
        """Put one item in the bounded queue, waiting while it is full; False if stopping."""
        while not self._stopping.is_set():
            try:
                self.items.put(item, timeout=0.1)
                self.wake()
                return True
            except queue.Full:
                continue
        return False

    def _watch_loop(self) -> None:
        n = len(self.endpoints)
        i = 0
        failing = 0  # endpoints failed in a row (logged now and then, not per attempt)
        while not self._stopping.is_set():
            target = self.endpoints[i % n]
            try:
                self._session(target)
                failing = 0
            except grpc.RpcError as exc:
                if not self._stopping.is_set() and failing % (n * 50) == 0:  # ~every 15 s
                    log.warning("etcd watch on %s failed (%s): trying the next endpoint%s",
                                target, exc.code(), "s" if failing else "")
                failing += 1
            except Exception:  # noqa: BLE001 - keep mirroring; a bug is logged
                log.exception("etcd watch session on %s failed", target)
            self.connected = None
            i += 1
            self.failovers += 1
            self._stopping.wait(RETRY_S)

    def _readable(self, stub, rev: int) -> bool:
        """Whether etcd still answers a read at `rev` (False: compacted)."""
        try:
            stub.Range(etcdrpc.RangeRequest(key=self.prefix or b"\0", range_end=self.range_end,
                                            count_only=True, revision=rev),
                       timeout=self.timeout, metadata=REQUIRE_LEADER)
            return True
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.OUT_OF_RANGE:
                raise
            return False

    def _oldest(self, stub, head: int, lo: int = 1) -> int:
        """etcd's compaction revision (1 if it never compacted), known to be >= `lo`: the
        oldest revision a read may ask for. A binary search of count-only reads (a read
        below it fails with etcd's compaction error), ~log2(head - lo) of them."""
        hi = head  # the answer is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if self._readable(stub, mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def compaction_since(self, compact_rev: int, head: int) -> int:
        """etcd's compaction revision if it moved past `compact_rev` (someone compacted
        etcd directly), else 0. One count-only read when it did not; a call thread's."""
        for target in self.endpoints[self._current:] + self.endpoints[:self._current]:
            stub = etcdrpc.KVStub(self.channel(target))
            try:
                if self._readable(stub, max(1, compact_rev)):
                    return 0
                return self._oldest(stub, head, compact_rev + 1)
            except grpc.RpcError:
                continue
        return 0

    def _load(self, target: str) -> None:
        """Range the mirrored keys at one revision and hand them over as one item: at
        etcd's compaction revision when the history since is at most `replay_max`
        revisions (the watch then replays it, so the mirror holds what etcd holds and
        its compaction point is etcd's), else at etcd's current revision (older reads
        are forwarded to etcd)."""
        stub = etcdrpc.KVStub(self.channel(target))
        head = stub.Range(etcdrpc.RangeRequest(key=self.prefix or b"\0", range_end=self.range_end,
                                               count_only=True),
                          timeout=self.timeout, metadata=REQUIRE_LEADER).header.revision
        oldest = self._oldest(stub, head) if self.replay_max else head
        start = oldest if head - oldest <= self.replay_max else head
        key, rev, kvs = self.prefix or b"\0", start, []
        while True:
            req = etcdrpc.RangeRequest(key=key, range_end=self.range_end, limit=LOAD_PAGE,
                                       revision=rev)
            resp = stub.Range(req, timeout=self.timeout, metadata=REQUIRE_LEADER)
            if not rev:
                rev = resp.header.revision
            kvs += [kv_of(kv) for kv in resp.kvs]
            if not resp.more or not resp.kvs:
                break
            key = resp.kvs[-1].key + b"\0"
        self.etcd_rev = max(self.etcd_rev, head)
        if self._hand(("load", rev, kvs, head)):
            self.next_rev = rev + 1

    def _requests(self, create, stream_done: threading.Event):
        # No progress requests: etcd 3.4 answers one at once with its current revision
        # even while this watch is still catching up (watch id -1), which would let the
        # mirror skip revisions. Only a watch's own progress notifications are trusted.
        yield create
        while not (self._stopping.is_set() or stream_done.is_set()):
            stream_done.wait(0.2)

    def _session(self, target: str) -> None:
        """One watch stream on one endpoint, until it fails or the session stops."""
        if not self.next_rev:
            self._load(target)
        create = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
            key=self.prefix or b"\0", range_end=self.range_end, start_revision=self.next_rev,
            prev_kv=True, progress_notify=True))
        stream_done = threading.Event()
        responses = etcdrpc.WatchStub(self.channel(target)).Watch(
            self._requests(create, stream_done), metadata=REQUIRE_LEADER)
        try:
            self.connected = target
            for resp in responses:
                if self._stopping.is_set():
                    break
                if not self._response(resp):
                    break
        finally:
            stream_done.set()
            responses.cancel()

    def _response(self, resp) -> bool:
        """Hand over one watch response's revisions; False to end the stream."""
        self.etcd_rev = max(self.etcd_rev, resp.header.revision)
        if resp.compact_revision:
            log.warning("etcd compacted revision %d the mirror still needed (at %d): "
                        "reloading", resp.compact_revision, self.next_rev)
            if self._hand(("compacted", resp.compact_revision)):
                self.next_rev = 0
            return False
        if resp.canceled:
            log.warning("etcd canceled the mirror's watch: %s", resp.cancel_reason)
            return False
        if resp.created:
            return True
        if not resp.events:
            if resp.watch_id == -1:  # a stream-wide progress answer: see _requests
                return True
            return self._hand(("progress", resp.header.revision))
        batch: list = []
        rev = 0
        for ev in resp.events:
            r = ev.kv.mod_revision
            if batch and r != rev:
                if not self._hand(("rev", rev, batch)):
                    return False
                self.next_rev = rev + 1
                batch = []
            rev = r
            batch.append(event_of(ev))
        if not self._hand(("rev", rev, batch)):
            return False
        self.next_rev = rev + 1
        return True
