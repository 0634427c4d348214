"""The broker process: a thin shell that moves bytes between rings and the pure cores.

It decides nothing about keys, revisions or watches itself: `MVCCStore` applies
requests, `History` keeps the revision log and its compaction point, `WatchCore`
decides who gets what and owns every watch stream's rules, `Lessor` owns the leases and
their deadlines, `Registry` owns the shared objects and the clients. The shell drains
request rings, calls the cores, writes the WAL, rings doorbells and reclaims dead
clients.

One loop (docs/INTERNALS.md, "The life of one put"): drain every client's request ring in batches; apply each
request; append a write's events to the revision log, then (after the WAL write)
notify synced watchers, then publish the replies (so a put's reply means its watchers
can already see the events); catch up unsynced watchers; retry victims; wake the
clients it wrote to; sleep on the doorbell when idle (never past the next lease
deadline). Housekeeping (registrations, liveness, heartbeat, metrics, snapshots) runs
between batches. A lease that ends (revoked, expired, or bound to a client that is
gone) deletes its keys as one write: logged, in the WAL, and notified like any other.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from dataclasses import replace
from typing import Callable

from shm import layout as L
from shm.errors import MessageTooLarge, RingCorrupt, ShmNoSpace
from shm.segment import SHM_DIR, new_boot_id
from shmwatch.wire import errors
from shmwatch.wire.events import log_record
from shmwatch.wire.protocol import (
    ArenaRequest,
    ByeRequest,
    CompactRequest,
    KvRequest,
    LeaseGrantRequest,
    LeaseRequest,
    ProgressRequest,
    WatchCancelRequest,
    WatchCreateRequest,
    arena_body,
    encode_error,
    encode_reply,
    encode_response,
    parse_request,
    peek_id,
    watch_created_body,
)
from shmwatch.wire.types import (
    Event,
)

from .config import BrokerConfig, start_bytes
from .errors import BrokerStartError
from .history import History, HistoryDamaged
from .lease import Lessor
from .lease_requests import LeaseRequests
from .metrics import StatsWriter, snapshot
from .mvcc import MVCCStore
from .outbox import RingWriter
from .recovery import recover, snapshot_doc
from .registry import REQUEST_ENVELOPE, ClientConn, Registry
from .sizing import check_start, no_space_message, shm_free
from .wal import (
    KIND_COMPACT,
    KIND_KV,
    DataDir,
)
from .watch import WatchCore

log = logging.getLogger("shmwatch.broker")

HOUSEKEEPING_S = 0.05  # registrations, liveness and heartbeat at most this often
STATS_EVERY = 4  # publish metrics every 4th housekeeping pass (~5 times a second)
# Look at every client slot at least every 20th pass (~1 s), whatever the registration
# sequence says: it is shared memory, and a value written back behind our back (or
# wrapped) must not hide a registration.
SCAN_EVERY = 20
# metrics walk every watcher: with many, publish less often (measured: 10k watchers at
# 5 snapshots a second cost an idle broker 7% of a core).
STATS_WATCHERS_PER_STEP = 2000
SNAPSHOT_WAL_BYTES = 256 << 20  # a snapshot also when the WAL grew this much
VICTIM_RETRY_S = 0.01  # etcd's syncVictimsLoop period
REQUESTS_PER_CLIENT_PASS = 256  # fairness: at most this many requests per client per pass
IDLE_SLEEP_MAX_S = 0.1
# Checks of every request ring before sleeping on the doorbell (~0.5 us each with a few
# clients): a request arriving within ~50 us is served without a semaphore wake-up
# (~30 us each way, measured on the 2-core reference machine), which is what keeps a
# synchronous put fast.
BROKER_SPIN = 100


class Broker(LeaseRequests):
    """One broker instance. `serve_forever()` runs until `stop()` or a signal."""

    def __init__(self, cfg: BrokerConfig):
        self.cfg = cfg
        self.boot_id = new_boot_id()
        self.cluster_id = int.from_bytes(self.boot_id[:8], "little") >> 1
        self.lessor = Lessor(cfg.min_lease_ttl, cfg.max_leases, member_id=self.cluster_id)
        self._set_store(MVCCStore())
        self.core = WatchCore(
            max_request_bytes=cfg.max_request_bytes,
            max_response_bytes=cfg.max_response_bytes,
            max_watchers_per_sync=cfg.max_watchers_per_sync,
            owner_budget=cfg.max_client_backlog_bytes,
            max_watchers_per_client=cfg.max_watchers_per_client,
        )
        self.writes = 0
        self.log_damage = 0  # times the revision log's shared memory was found damaged
        self.started = time.time()
        self._stopping = False
        self._closed = False
        self._held: list[tuple[ClientConn, bytes]] = []  # replies waiting for the commit
        self._pending: list[tuple] = []  # (rev, logged events) not yet notified
        self._house_passes = 0
        self.wal: DataDir | None = None
        snap, records = None, []
        if cfg.data_dir:
            # Every file is checked before anything is created in shared memory: a
            # damaged data directory refuses the start with nothing to undo.
            self.wal = DataDir(cfg.data_dir, cfg.fsync)
            try:
                snap, records = self.wal.load()
                self.cluster_id = self.wal.cluster_id(self.cluster_id)
            except BaseException:
                self.wal.close()
                raise
        try:
            self.registry = Registry(cfg, self.boot_id, self.cluster_id, self.mvcc.rev)
        except BaseException:
            if self.wal is not None:
                self.wal.close()
            raise
        self.words = self.registry.words
        self.bell = self.registry.bell
        self.history = History(self.registry.log)
        self.stats = StatsWriter(self.registry.statseg)
        self.mirror = None  # broker.mirror.Mirror when it mirrors an etcd cluster
        if cfg.upstream:
            try:
                try:
                    from .mirror import start_mirror  # the optional extra `etcd`: only here
                except ImportError as exc:
                    raise BrokerStartError(
                        f"--upstream needs the optional extra `etcd` (pip install "
                        f"'shmwatch[etcd]'): {exc}") from None
                self.mirror = start_mirror(self)
            except BaseException:
                self.stats.release()
                self.registry.unlink_all()
                raise
        if self.wal is not None:
            try:
                recover(self, snap, records)
            except BaseException:
                self.wal.close()
                self.stats.release()
                self.registry.unlink_all()
                raise

    def _set_store(self, store: MVCCStore) -> None:
        store.lease_exists = self.lessor.__contains__
        self.mvcc = store

    # ------------------------------------------------------------ life

    def close(self) -> None:
        """Unlink every shared object of this broker. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.mirror is not None:
            self.mirror.close()
        try:
            self._commit_batch()
        except Exception:  # noqa: BLE001 - shutting down: log it, unlink anyway
            log.exception("final commit failed")
        if self.wal is not None:
            self.wal.close()
        self.words[L.CTL_STATE] = L.CTL_STATE_STOPPING
        for c in list(self.registry.clients.values()):
            self._disconnect(c)
        self.stats.release()
        self.registry.unlink_all()

    def stop(self, *_args) -> None:
        """Make serve_forever() return (signal-handler safe)."""
        self._stopping = True
        try:
            self.bell.post()
        except Exception:  # noqa: BLE001 - already closed: nothing to wake
            pass

    def serve_forever(self) -> None:
        self.words[L.CTL_STATE] = L.CTL_STATE_RUNNING
        now = time.monotonic()
        self._next = {"house": 0.0, "victims": 0.0,
                      "progress": now + self.cfg.progress_notify_interval}
        try:
            while not self._stopping:
                worked = self._pass(time.monotonic())
                if not worked:
                    self._sleep(time.monotonic())
        finally:
            self.close()

    def _pass(self, now: float) -> bool:
        """One turn of the loop; True if it did work (then it loops without sleeping)."""
        core = self.core
        words = self.words
        nxt = self._next
        # A client freed room in a ring we were blocked on (a victim's, or its response
        # ring holding replies): taken once per pass, before the drain, so a hint raised
        # meanwhile is seen next pass, never lost.
        hint = words[L.CTL_SPACE_HINT]
        if hint:
            words[L.CTL_SPACE_HINT] = 0
        worked = self._drain_requests()
        if self.mirror is not None and self.mirror.pump(now):
            worked = True
        deadline = self.lessor.next_deadline()
        if deadline is not None and now >= deadline and self._expire(now):
            worked = True
        if (core.victims or core.canceling) and (hint or now >= nxt["victims"]):
            core.move_victims()
            nxt["victims"] = now + VICTIM_RETRY_S
        if core.unsynced:
            try:
                core.sync_watchers(self._read_history,
                                   self.history.locate if self.cfg.client_catch_up else None)
            except HistoryDamaged as exc:
                self._contain(exc)  # the next pass cancels who needed it
            worked = True
        self._settle()
        if now >= nxt["house"]:
            self._housekeeping()
            nxt["house"] = now + HOUSEKEEPING_S
        if now >= nxt["progress"]:
            core.progress_tick(c.stream for c in self.registry.clients.values())
            self._settle()
            nxt["progress"] = now + self.cfg.progress_notify_interval
        while self._pending:  # leases of clients that went (settle, housekeeping)
            self._commit_batch()
            worked = True
        return worked

    def _sleep(self, now: float) -> None:
        nxt = self._next
        timeout = min(nxt["house"], nxt["progress"]) - now
        if self.core.victims or self.core.canceling:
            timeout = min(timeout, nxt["victims"] - now)
        deadline = self.lessor.next_deadline()
        if deadline is not None:
            timeout = min(timeout, deadline - now)
        self.bell.wait(self._has_work, max(0.0, min(timeout, IDLE_SLEEP_MAX_S)),
                       spin=BROKER_SPIN, slice=IDLE_SLEEP_MAX_S)

    def _has_work(self) -> bool:
        if self.registry.registrations() or self.words[L.CTL_SPACE_HINT] or self._stopping:
            return True
        if self.mirror is not None and self.mirror.has_work():
            return True
        for c in self.registry.clients.values():
            if c.req.readable():
                return True
        return False

    def _settle(self) -> None:
        """Disconnect clients that damaged their rings; wake the ones written to."""
        core = self.core
        while core.faulted:
            c = core.faulted.pop().client
            log.warning("client %s corrupted one of its rings: disconnecting", c)
            self._disconnect(c)
        if core.woken:
            for stream in core.woken:
                stream.client.bell.ring()
            core.woken.clear()

    def _disconnect(self, c: ClientConn) -> None:
        """Forget a client: revoke its bound leases (their deletes are committed with
        the pass), drop its watchers, then its rings. Not while closing: the WAL is
        closed then, and a restart revokes bound leases itself."""
        if not self._closed:
            for lease_id in self.lessor.owned_by(c):
                self._revoke(lease_id)
            if self.mirror is not None:
                self.mirror.client_gone(c)
        self.core.drop_stream(c.stream)
        self.registry.reclaim(c)

    # ------------------------------------------------------------ requests

    def _drain_requests(self) -> bool:
        worked = False
        for c in list(self.registry.clients.values()):
            if c.replies.pending and not self._flush_replies(c):
                continue
            for _ in range(REQUESTS_PER_CLIENT_PASS):
                if self.mirror is not None and self.mirror.saturated():
                    break  # etcd has enough of our requests: the rest wait in the rings
                if self._reply_bytes(c) >= c.replies.sink.capacity:
                    # Its replies already fill its response ring: it is not reading
                    # them. Leave its requests in its ring (backpressure) rather than
                    # hold more: at most a ring's worth plus one reply is ever held.
                    break
                try:
                    data = c.req.read()
                except MessageTooLarge as exc:
                    # A client that ignored --max-request-bytes: the message was dropped
                    # as it streamed in (never buffered); the client gets etcd's error.
                    worked = True
                    self._reply(c, encode_error(peek_id(exc.head, 1), errors.RequestTooLargeError()))
                    continue
                except RingCorrupt as exc:
                    log.warning("client %s wrote a corrupt record (%s): disconnecting", c, exc)
                    self._disconnect(c)
                    break
                if data is None:
                    break
                worked = True
                c.requests += 1
                if not self._handle(c, data) or c.replies.pending:
                    break
        if worked:
            self._commit_batch()
        return worked

    def _reply_bytes(self, c: ClientConn) -> int:
        return c.replies.held + c.batch_bytes

    def _reply(self, c: ClientConn, data: bytes) -> None:
        self._held.append((c, data))
        c.batch_bytes += len(data)

    def _flush_replies(self, c: ClientConn) -> bool:
        try:
            done = c.replies.flush()
        except RingCorrupt:
            self.core.faulted.add(c.stream)
            self._settle()
            return False
        self.core.woken.add(c.stream)
        return done

    def _commit_batch(self) -> None:
        """Make the batch's writes durable, then notify watchers, then publish replies
        (so a reply means the write is logged and its watchers can see it)."""
        if self.wal is not None:
            self.wal.commit(time.monotonic())
        if self._pending:
            notify = self.core.notify
            for rev, logged in self._pending:
                notify(rev, logged)
            self._pending.clear()
        if self._held:
            clients = self.registry.clients
            touched = set()
            for c, data in self._held:
                c.batch_bytes = 0
                if clients.get(c.slot) is not c or c.stream in self.core.faulted:
                    continue  # disconnected meanwhile
                try:
                    c.replies.write(data)
                except RingCorrupt:
                    self.core.faulted.add(c.stream)
                    continue
                touched.add(c)
            self._held.clear()
            for c in touched:
                if c.stream not in self.core.faulted:
                    c.replies.publish()
                    self.core.woken.add(c.stream)
        if self.core.faulted:
            self._settle()

    def _handle(self, c: ClientConn, data: bytes) -> bool:
        """Apply one request; False if the client left with it."""
        req_id = 0
        try:
            if len(data) > self.cfg.max_request_bytes:
                # etcd compares the encoded request with --max-request-bytes; ours is
                # the msgpack request (within a few bytes of etcd's protobuf).
                # Read the id without decoding the (oversized) body.
                req_id = peek_id(data, 1)
                raise errors.RequestTooLargeError()
            try:
                req = parse_request(data, self.cfg.max_request_bytes + REQUEST_ENVELOPE)
            except errors.ProtocolError as exc:
                req_id = getattr(exc, "req_id", 0)
                raise
            req_id = req.req_id
            if self.mirror is not None and self.mirror.take(c, req):
                return True  # etcd answers; the reply waits for the mirror to have it
            if type(req) is KvRequest:
                self._reply(c, self._kv(req))
                return True
            if type(req) is ByeRequest:
                self._disconnect(c)
                return False
            # Anything else sees the store as committed and notified so far.
            self._commit_batch()
            data = encode_reply(req_id, self._other(c, req))
            if len(data) > self.cfg.max_response_bytes:  # a lease's keys, the lease list
                raise errors.ResponseTooLargeError.for_reply(
                    len(data), self.cfg.max_response_bytes, 0)
            self._reply(c, data)
        except errors.ShmwatchError as exc:
            self._reply(c, encode_error(req_id, exc))
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, never the broker
            log.exception("request from %s failed", c)
            self._reply(c, encode_error(req_id, errors.ShmwatchError(
                f"shmwatch: internal error: {exc!r}")))
        return True

    def _kv(self, req: KvRequest) -> bytes:
        rev = self.mvcc.rev
        data = encode_reply(req.req_id, self._apply(req.op, req.raw))
        if len(data) > self.cfg.max_response_bytes:
            raise errors.ResponseTooLargeError.for_reply(
                len(data), self.cfg.max_response_bytes,
                self.mvcc.rev if self.mvcc.rev != rev else 0)
        return data

    def _other(self, c: ClientConn, req):
        """The reply body of a request that is not a KV op."""
        kind = type(req)
        if kind is WatchCreateRequest:
            ring = self.registry.watch_ring(c, req.arena, req.ring)
            wid, code, reason = self.core.create(c.stream, req.spec, req.watch_id,
                                                 RingWriter(ring), (req.arena, req.ring))
            if code:
                ring.release()
            return watch_created_body(wid, self.mvcc.rev, reason, code)
        if kind is WatchCancelRequest:
            self.core.cancel_id(c.stream, req.watch_id)
            return None
        if kind is ProgressRequest:
            self.core.request_progress(c.stream)
            return None
        if kind is CompactRequest:
            resp = self._do_compact(req.revision)
            if self.wal is not None:
                self.wal.append(KIND_COMPACT, req.revision)
                self._commit_batch()
            return encode_response(resp)
        if kind is ArenaRequest:
            return arena_body(*self.registry.new_arena(c))
        if kind is LeaseRequest or kind is LeaseGrantRequest:
            return encode_response(self._lease(c, req))
        raise errors.ProtocolError(f"shmwatch: unexpected request {kind.__name__}")

    # ------------------------------------------------------------ writes and history

    def _apply(self, op, raw, durable: bool = True):
        resp, events = self.mvcc.apply(op)
        if events:
            if durable and self.wal is not None:
                self.wal.append(KIND_KV, raw)
            self._commit(self.mvcc.rev, events)
        return encode_response(resp)

    def _commit(self, rev: int, events: list[Event]) -> None:
        """Log a revision's events (moving the compaction point if the log wrapped);
        its watchers are notified at the batch's commit."""
        self.writes += 1
        record, logged = log_record(events)
        compact_to = self.history.append(rev, record)
        if compact_to:
            self._compact_to(compact_to)
        self.words[L.CTL_REVISION] = rev
        self._pending.append((rev, logged))

    def _compact_to(self, rev: int) -> None:
        """One compaction point for reads and watches (the log wrapped, or damage)."""
        if rev > self.mvcc.compact_rev:
            self.mvcc.compact(rev)
            self.words[L.CTL_COMPACT_REV] = self.mvcc.compact_rev
        self.core.compact(self.mvcc.compact_rev)

    def _do_compact(self, rev: int):
        resp = self.mvcc.compact(rev)
        self.history.truncate(rev)
        self.core.compact(self.mvcc.compact_rev)
        self.words[L.CTL_COMPACT_REV] = self.mvcc.compact_rev
        return resp

    def _read_history(self, lo: int, hi: int):
        return self.history.read(lo, hi, self.mvcc.compact_rev)

    def _contain(self, exc: HistoryDamaged) -> None:
        """Someone wrote into the revision log's shared memory and damaged a record;
        `History` dropped it and everything before it. The store (in this process) is
        intact: history up to it is treated as compacted, for reads and watches alike.
        Logged loudly; the broker keeps serving."""
        log.error("%s: shared memory of the revision log was overwritten by another "
                  "process (treated as a compaction)", exc)
        self.log_damage += 1
        self._compact_to(min(exc.compact_to, self.mvcc.rev))
        # The watch core's compaction point may pass the store's by one (damage in the
        # newest record): a watcher that needs it must be cancelled, never skip it.
        self.core.compact(exc.compact_to)

    # ------------------------------------------------------------ housekeeping

    def metrics(self) -> dict:
        """A snapshot of the broker's state (see broker.metrics)."""
        return snapshot(self)

    def _housekeeping(self) -> None:
        reg = self.registry
        self.words[L.CTL_HEARTBEAT_NS] = time.time_ns()
        self._house_passes += 1
        if self.wal is not None:
            self.wal.commit(time.monotonic())  # fsync=batch: sync what is waiting
            if (self.wal.records_since_snapshot >= self.cfg.snapshot_every
                    or self.wal.bytes_since_snapshot >= SNAPSHOT_WAL_BYTES):
                self._commit_batch()
                self.wal.snapshot(snapshot_doc(self))
        n_watchers = sum(len(c.stream.watchers) for c in reg.clients.values())
        if self._house_passes % (STATS_EVERY * max(1, n_watchers // STATS_WATCHERS_PER_STEP)) == 1:
            self.stats.publish(self.metrics())
        self.core.release_finished()
        for c in reg.dead_clients():
            log.info("client %s is gone: reclaiming its watchers and rings", c)
            self._disconnect(c)
        if reg.registrations() or self._house_passes % SCAN_EVERY == 0:
            reg.scan_slots()


def run(cfg: BrokerConfig, on_ready: Callable[[Broker], None] | None = None) -> None:
    """Run a broker in this process until SIGINT/SIGTERM; unlink everything on the way out.

    Raises `BrokerStartError` (nothing created, or all of it removed again) if it cannot
    start: the name is in use, or /dev/shm has no room (checked before creating anything
    against the free space `cfg.sizing` assumed, and again when creating). Once it
    accepts clients it calls `on_ready(broker)` (`python -m broker` prints its ready line)."""
    reason = check_start(cfg.sizing, start_bytes(cfg))
    if reason:
        raise BrokerStartError(reason)
    try:
        b = Broker(cfg)
    except ShmNoSpace:
        # Less room than the budget assumed (or another process took it meanwhile):
        # report the space there really is.
        measured = replace(cfg.sizing, free=shm_free(), source=SHM_DIR)
        raise BrokerStartError(no_space_message(measured, start_bytes(cfg))) from None
    signal.signal(signal.SIGTERM, b.stop)
    signal.signal(signal.SIGINT, b.stop)
    if on_ready is not None:
        try:
            on_ready(b)
        except BaseException:
            b.close()
            raise
    b.serve_forever()


def unique_name(prefix: str = "b") -> str:
    """A broker name no other broker uses: `prefix`, this process's pid, random hex."""
    return f"{prefix}{os.getpid()}x{secrets.token_hex(4)}"
