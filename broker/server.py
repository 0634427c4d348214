"""The broker process: a thin shell that moves bytes between rings and the pure cores.

It owns every shared-memory object of its broker name: it creates them, hands them to
clients, and unlinks them on shutdown or when a client dies. It decides nothing about
keys or watches itself: `MVCCStore` applies requests, `WatchCore` decides who gets what.

One loop (DESIGN.md section 3): drain every client's request ring in batches; apply each
request; append a write's events to the revision log, then notify synced watchers,
then reply (so a put's reply means its watchers can already see the events); catch up
unsynced watchers; retry victims; wake the clients it wrote to; sleep on the doorbell
when idle. Housekeeping (registrations, liveness, heartbeat) runs between batches.
"""

from __future__ import annotations

import grp
import itertools
import logging
import os
import secrets
import signal
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable

import msgpack
import psutil

from shmwatch.wire import errors
from shmwatch.wire.protocol import (
    OP_ARENA,
    OP_BYE,
    OP_COMPACT,
    OP_KV,
    OP_PROGRESS,
    OP_WATCH_CANCEL,
    OP_WATCH_CREATE,
    FILTER_NODELETE,
    array_header,
    encode_event,
    FILTER_NOPUT,
    decode_op,
    encode_error,
    encode_reply,
    encode_response,
    peek_id,
    unpackb,
)
from shmwatch.wire.types import Event, KeyValue
from shm import layout as L
from shm.doorbell import Doorbell
from shm.errors import (
    LogRecordCorrupt,
    MessageTooLarge,
    RingCorrupt,
    SegmentExists,
    SegmentNotFound,
    ShmNoSpace,
)
from shm.lock import is_locked, try_lock
from shm.revlog import RevLog, revlog_bytes
from shm.ring import MIN_CAPACITY, Ring, check_capacity, ring_bytes
from shm.segment import (
    HEADER_SIZE,
    SHM_DIR,
    Segment,
    new_boot_id,
    new_token,
    shm_name,
    shm_path,
)

from .admin import broker_info, cleanup_stale, owner
from .errors import BrokerStartError
from .mvcc import MVCCStore, events_at_compact_rev
from .sizing import Sizing, budget, check_start, no_space_message, plan, shm_free
from .sizing import start_bytes as start_bytes_for
from .wal import KIND_COMPACT, KIND_KV, DataDir, Record, WalCorrupt
from .watch import Watcher, WatchCore

log = logging.getLogger("shmwatch.broker")

HOUSEKEEPING_S = 0.05  # registrations, liveness and heartbeat at most this often
STATS_EVERY = 4  # publish metrics every 4th housekeeping pass (~5 times a second)
STATS_BYTES = 1 << 20
STATS_TOP_WATCHERS = 100  # per-watcher rows in the metrics: the most lagging ones
VICTIM_RETRY_S = 0.01  # etcd's syncVictimsLoop period
REQUESTS_PER_CLIENT_PASS = 256  # fairness: at most this many requests per client per pass
IDLE_SLEEP_MAX_S = 0.1
# Checks of every request ring before sleeping on the doorbell (~0.5 us each with a few
# clients): a request arriving within ~50 us is served without a semaphore wake-up
# (~30 us each way, PERF-ANCHORS.md), which is what keeps a synchronous put fast.
BROKER_SPIN = 100
REQUEST_ENVELOPE = 1024  # bytes of a request beyond its payload (op, ids, msgpack framing)
# Fresh random names tried for one object before giving up: a clash of 64-bit random
# tokens is only ever somebody creating names on purpose, and it is logged.
NAME_ATTEMPTS = 4
# How long a starting broker keeps trying to take its name while a dead broker's
# leftovers are being removed by someone else.
TAKE_NAME_S = 5.0


@dataclass
class BrokerConfig:
    """Broker options; defaults follow etcd where etcd has one (documented in README).

    Sizes left as None are chosen from the free space of /dev/shm (`broker.sizing`)
    when the config is made; `sizing` records what they were sized from. Bad values
    raise ValueError naming the command-line option.
    """

    name: str
    log_bytes: int | None = None  # None: a quarter of /dev/shm's free space, <= 64 MiB
    watch_ring_bytes: int | None = None  # None: 256 KiB, less on a small /dev/shm
    request_ring_bytes: int | None = None  # None: 1 MiB, less on a small /dev/shm
    response_ring_bytes: int | None = None  # None: 1 MiB, less on a small /dev/shm
    max_request_bytes: int = 1536 * 1024  # etcd --max-request-bytes
    max_clients: int = 256
    rings_per_arena: int = 32
    progress_notify_interval: float = 600.0  # etcd's default: 10 minutes
    max_watchers_per_sync: int = 512  # etcd's maxWatchersPerSync
    mode: int = 0o600
    data_dir: str | None = None  # durability: WAL + snapshots; None = in memory only
    fsync: str = "always"  # always | batch | never (see broker/wal.py)
    snapshot_every: int = 100_000  # WAL records between snapshots
    group: str | None = None  # share with this group (give --mode 660 too)
    # Memory a client can make the broker hold (README, "Broker options"):
    max_response_bytes: int = 64 << 20  # largest reply (a range); larger -> typed error
    max_client_backlog_bytes: int = 64 << 20  # watch responses held for one client
    max_watchers_per_client: int = 1000  # each watch is a ring in /dev/shm
    shm_budget: int | None = None  # assume /dev/shm has this much free (None: measure)
    sizing: Sizing = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shm_name(self.name, "ctl")  # ValueError for a bad name, before anything exists
        for opt, value in (("--max-clients", self.max_clients),
                           ("--rings-per-arena", self.rings_per_arena),
                           ("--max-request-bytes", self.max_request_bytes),
                           ("--max-watchers-per-sync", self.max_watchers_per_sync),
                           ("--snapshot-every", self.snapshot_every)):
            if value < 1:
                raise ValueError(f"{opt} must be at least 1, got {value}")
        if self.group is not None and not str(self.group).isdigit():
            try:
                grp.getgrnam(self.group)
            except KeyError:
                raise ValueError(f"--group: no group named {self.group!r}") from None
        if self.shm_budget is not None and self.shm_budget < 0:
            raise ValueError(f"--shm-budget must be a size, got {self.shm_budget}")
        free, source = budget(self.shm_budget)
        self.sizing = sized = plan(
            free, source, rings_per_arena=self.rings_per_arena, log_bytes=self.log_bytes,
            request_ring_bytes=self.request_ring_bytes,
            response_ring_bytes=self.response_ring_bytes,
            watch_ring_bytes=self.watch_ring_bytes)
        for attr in ("log_bytes", "request_ring_bytes", "response_ring_bytes",
                     "watch_ring_bytes"):
            value = getattr(sized, attr)
            option = "--" + attr.replace("_", "-")
            try:
                check_capacity(value, option)
            except ValueError:
                raise ValueError(f"{option} {value}: a size must be a multiple of 8 and at "
                                 f"least {MIN_CAPACITY} bytes") from None
            setattr(self, attr, value)


class BrokerRunning(BrokerStartError):
    """A live broker already holds this name."""


class NameTaken(BrokerRunning):
    """The broker's name is taken by an object another user owns."""


class NameClash(Exception):
    """Every fresh random name tried for an object already existed."""


class HistoryDamaged(Exception):
    """A catch-up pass met a damaged revision-log record (already contained)."""

    def __init__(self, rev: int):
        super().__init__(rev)
        self.rev = rev


class ClientConn:
    """The broker's side of one registered client."""

    def __init__(self, slot: int, gen: int, part: str, pid: int, create_time_us: int,
                 label: str, seg: Segment, req: Ring, resp: Ring, bell: Doorbell):
        self.slot = slot
        self.gen = gen
        self.part = part  # the name part of its rings; arenas and doorbell extend it
        self.pid = pid
        self.create_time_us = create_time_us
        self.label = label  # the client's own words: display only, never trusted
        self.seg = seg
        self.req = req
        self.resp = resp
        self.bell = bell
        self.arenas: list[Segment] = []
        self.watchers: dict[int, Watcher] = {}
        self.rings_in_use: dict[tuple[int, int], Watcher] = {}
        self.next_watch_id = 0
        self.backlog: deque[list] = deque()  # replies that did not fit the response ring
        self.reply_bytes = 0  # bytes of replies held for it (this batch's and backlog)
        self.requests = 0

    def __repr__(self) -> str:
        return f"<client slot={self.slot} pid={self.pid}>"


class Broker:
    """One broker instance. `serve_forever()` runs until `stop()` or a signal."""

    def __init__(self, cfg: BrokerConfig):
        self.cfg = cfg
        self.boot_id = new_boot_id()
        self.cluster_id = int.from_bytes(self.boot_id[:8], "little") >> 1
        self.mvcc = MVCCStore()
        self.core = WatchCore(
            max_request_bytes=cfg.max_request_bytes,
            # A catch-up response is also bounded by the free space of the watcher's
            # ring (see WatchCore.sync_watchers); this caps it for huge rings.
            max_response_bytes=cfg.max_response_bytes,
            max_watchers_per_sync=cfg.max_watchers_per_sync,
            owner_budget=cfg.max_client_backlog_bytes,
        )
        self.clients: dict[int, ClientConn] = {}
        self._stopping = False
        self.writes = 0
        self.log_damage = 0  # times the revision log's shared memory was found damaged
        self.started = time.time()
        self._held: list[tuple[ClientConn, bytes]] = []  # replies waiting for the commit
        self._pending: list[tuple] = []  # (rev, events, encoded) not yet notified
        self._oversized: tuple[int, bytes] | None = None  # a revision too big for the log
        self.wal: DataDir | None = None
        self._replaying = False
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
            self._create_shared()
            if self.wal is not None:
                self._recover(snap, records)
        except BaseException:
            if self.wal is not None:
                self.wal.close()
            self._unlink_all()
            raise
        self.words[L.CTL_CLUSTER_ID] = self.cluster_id

    # ------------------------------------------------------------ set-up / tear-down

    def _name(self, part: str) -> str:
        return shm_name(self.cfg.name, part)

    def _share(self, obj) -> None:
        """Hand a new segment (or doorbell) to the configured group, if any."""
        if self._gid is None:
            return
        if isinstance(obj, Segment):
            os.fchown(obj.fd, -1, self._gid)
        else:
            os.chown("/dev/shm/sem." + obj.name.lstrip("/"), -1, self._gid)

    def _create_unique(self, part_of, create):
        """`create(part)` with `part = part_of(token)` for fresh random tokens until one
        is free: (object, token). Raises NameClash after NAME_ATTEMPTS names."""
        for _ in range(NAME_ATTEMPTS):
            token = new_token()
            part = part_of(token)
            try:
                return create(part), token
            except SegmentExists:
                log.warning("%s already exists (someone creates our names?): trying another "
                            "name", _describe(self._name(part)))
        raise NameClash(f"{NAME_ATTEMPTS} fresh random names for {part_of(0)} all existed")

    def _create_shared(self) -> None:
        cfg = self.cfg
        self._gid = None
        if cfg.group:
            import grp

            self._gid = (int(cfg.group) if cfg.group.isdigit()
                         else grp.getgrnam(cfg.group).gr_gid)
        self._take_name()
        try:
            w = self.words
            flag = self.ctl.payload[L.CTL_BROKER_SLEEPING * 8:L.CTL_BROKER_SLEEPING * 8 + 4]
            self.bell, w[L.CTL_BELL_TOKEN] = self._create_unique(
                L.bell_part, lambda p: Doorbell.create(self._name(p), flag, mode=cfg.mode))
            self.logseg, w[L.CTL_LOG_TOKEN] = self._create_unique(
                L.log_part, lambda p: Segment.create(self._name(p), revlog_bytes(cfg.log_bytes),
                                                     kind=L.KIND_LOG, boot_id=self.boot_id,
                                                     mode=cfg.mode))
            self.log = RevLog(self.logseg.payload, init=True)
            self.statseg, w[L.CTL_STATS_TOKEN] = self._create_unique(
                L.stats_part, lambda p: Segment.create(self._name(p), STATS_BYTES,
                                                       kind=L.KIND_STATS,
                                                       boot_id=self.boot_id, mode=cfg.mode))
            self._stats_words = self.statseg.payload[:16].cast("Q")
            for obj in (self.bell, self.logseg, self.statseg):
                self._share(obj)
        except BaseException:
            self._unlink_all()
            raise
        self._reg_seq = -1

    def _take_name(self) -> None:
        """Create the control segment under a temporary random name, fill it in, take
        the broker lock, then publish it as `ctl`: so the name never shows a control
        segment without its lock held, and "alive" is "locked" with no exception (see
        "Liveness" in docs/INTERNALS.md). A taken name is a live broker (refused), a dead
        one of ours (its leftovers are removed, then we try again), or another user's
        object (refused at once, naming the owner)."""
        cfg = self.cfg
        deadline = time.monotonic() + TAKE_NAME_S
        while True:
            seg, _ = self._create_unique(
                L.ctl_temp_part, lambda p: Segment.create(
                    self._name(p), L.ctl_payload_size(cfg.max_clients), kind=L.KIND_CTL,
                    boot_id=self.boot_id, mode=cfg.mode))
            words = seg.payload.cast("Q")
            try:
                if not try_lock(seg.fd, L.BROKER_LOCK_BYTE):
                    raise RuntimeError(f"could not lock the new control segment {seg.name}")
                words[L.CTL_PID] = os.getpid()
                words[L.CTL_CREATE_TIME_US] = int(psutil.Process().create_time() * 1e6)
                words[L.CTL_MAX_CLIENTS] = cfg.max_clients
                words[L.CTL_MAX_REQUEST_BYTES] = cfg.max_request_bytes
                words[L.CTL_REQUEST_RING] = cfg.request_ring_bytes
                words[L.CTL_RESPONSE_RING] = cfg.response_ring_bytes
                words[L.CTL_WATCH_RING] = cfg.watch_ring_bytes
                words[L.CTL_RINGS_PER_ARENA] = cfg.rings_per_arena
                words[L.CTL_MAX_RESPONSE_BYTES] = cfg.max_response_bytes
                words[L.CTL_MAX_WATCHERS] = cfg.max_watchers_per_client
                words[L.CTL_CLUSTER_ID] = self.cluster_id
                words[L.CTL_HEARTBEAT_NS] = time.time_ns()
                words[L.CTL_REVISION] = self.mvcc.rev
                self._share(seg)
                seg.publish(self._name(L.CTL_PART))
            except (SegmentExists, SegmentNotFound) as exc:
                words.release()
                seg.unlink()
                seg.close()
                if isinstance(exc, SegmentExists):
                    self._name_taken()
                # else a cleaner removed our temporary name before we published it
            except BaseException:
                words.release()
                seg.unlink()
                seg.close()
                raise
            else:
                self.ctl, self.words = seg, words
                return
            if time.monotonic() > deadline:
                raise BrokerRunning(f"could not take the name {cfg.name!r} in {TAKE_NAME_S} s: "
                                    f"another process keeps creating it")
            time.sleep(0.005)

    def _name_taken(self) -> None:
        """Our control segment's name exists: raise if it is a live broker's or another
        user's; remove it if it is a dead broker's (the caller then tries again)."""
        name = self.cfg.name
        path = shm_path(self._name(L.CTL_PART))
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if st.st_uid != os.geteuid():
            raise NameTaken(
                f"the broker name {name!r} is taken: {path} belongs to {owner(st.st_uid)}, "
                f"not to us ({owner(os.geteuid())}); remove it as its owner or root, or "
                f"choose another name")
        info = broker_info(name)
        if info["state"] == "alive":
            pid = (f"pid {info['pid']}" if "error" not in info
                   else f"pid unknown: {info['error']}")
            raise BrokerRunning(f"a broker named {name!r} is already running ({pid})")
        if info["state"] == "unknown":
            raise NameTaken(f"the broker name {name!r} is taken: {path} is not a control "
                            f"segment ({info['error']}); remove it or choose another name")
        if info["state"] == "stale":
            removed = cleanup_stale(name)
            if removed:
                log.warning("removed what a dead broker named %r left: %s", name,
                            ", ".join(removed))

    def _unlink_all(self) -> None:
        for c in list(self.clients.values()):
            self._reclaim(c)
        for attr in ("log", "words", "_stats_words"):
            if hasattr(self, attr):
                delattr(self, attr)
        if hasattr(self, "bell"):
            self.bell.close()
            self.bell.unlink()
        # The control segment last: while it stands, nobody else can take the name.
        for seg_attr in ("statseg", "logseg", "ctl"):
            seg = getattr(self, seg_attr, None)
            if seg is not None:
                seg.unlink()
                seg.close()

    def _recover(self, snap: dict | None, records: list[Record]) -> None:
        """Rebuild the store and the revision log from the data directory's snapshot and
        WAL records (checked by `DataDir.load`). A record or snapshot that passed its
        checksums but cannot be replayed is corruption too: WalCorrupt, not a traceback."""
        wal = self.wal
        if snap is not None:
            try:
                self.mvcc = MVCCStore.restore(snap["mvcc"])
                for rev, payload in snap["log"]:
                    self._log_append(rev, payload)
            except Exception as exc:  # any failure: the snapshot is not one we wrote
                path = os.path.join(wal.path, "snap")
                raise WalCorrupt(f"snapshot {path} passes its checksum but cannot be "
                                 f"restored ({exc!r}); refusing to start", path) from exc
        self._replaying = True
        try:
            for r in records:
                try:
                    if r.kind == KIND_KV:
                        rev = self.mvcc.rev
                        self._apply(decode_op(r.payload), r.payload)
                        if self.mvcc.rev != rev + 1:  # only changes are logged
                            raise ValueError("the write changes nothing")
                    else:
                        try:
                            self._do_compact(r.payload)
                        except errors.CompactedError:
                            pass  # a smaller --log-bytes than before compacted past it
                except Exception as exc:  # these records replayed once already: not ours
                    raise WalCorrupt(
                        f"WAL {wal.wal_path} is corrupt at offset {r.offset}: record "
                        f"{r.seq} passes its checksums but cannot be replayed ({exc!r}); "
                        f"refusing to start; nothing was changed", wal.wal_path, r.offset) from exc
            self._commit_batch()
        finally:
            self._replaying = False
        self.core.cur_rev = self.mvcc.rev
        self.core.compact_rev = self.mvcc.compact_rev
        self.words[L.CTL_REVISION] = self.mvcc.rev
        self.words[L.CTL_COMPACT_REV] = self.mvcc.compact_rev
        log.info("recovered revision %d (compacted at %d) from %s: snapshot %s, %d WAL records",
                 self.mvcc.rev, self.mvcc.compact_rev, self.cfg.data_dir,
                 "yes" if snap else "no", len(records))

    def _snapshot(self) -> None:
        self._commit_batch()
        while True:
            lo = self.log.oldest_rev
            entries = [list(self._oversized)] if self._oversized else []
            try:
                entries += [[rev, payload] for rev, payload in self.log.read_from(lo)] if lo else []
                break
            except LogRecordCorrupt as exc:
                self._log_damaged(exc.rev, str(exc))
        self.wal.snapshot({"mvcc": self.mvcc.snapshot(), "log": entries})

    def close(self) -> None:
        """Unlink every shared object of this broker. Idempotent."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        try:
            self._commit_batch()
        except Exception:
            log.exception("final commit failed")
        if self.wal is not None:
            self.wal.close()
        if hasattr(self, "words"):
            self.words[L.CTL_STATE] = L.CTL_STATE_STOPPING
        self._unlink_all()

    def stop(self, *_args) -> None:
        self._stopping = True
        try:
            self.bell.post()
        except Exception:
            pass

    # ------------------------------------------------------------ main loop

    def serve_forever(self) -> None:
        self.words[L.CTL_STATE] = L.CTL_STATE_RUNNING
        next_house = 0.0
        next_victims = 0.0
        next_progress = time.monotonic() + self.cfg.progress_notify_interval
        core = self.core
        words = self.words
        try:
            while not self._stopping:
                # A client freed room in a ring we were blocked on (a victim's, or its
                # response ring holding a backlog): taken once per pass, before the
                # drain, so a hint raised meanwhile is seen next pass, never lost.
                hint = words[L.CTL_SPACE_HINT]
                if hint:
                    words[L.CTL_SPACE_HINT] = 0
                worked = self._drain_requests()
                now = time.monotonic()
                if core.victims or core.canceling:
                    if hint or now >= next_victims:
                        core.move_victims()
                        next_victims = now + VICTIM_RETRY_S
                if core.unsynced:
                    try:
                        core.sync_watchers(self._read_history)
                    except HistoryDamaged:
                        pass  # contained; the next pass cancels who needed it
                    worked = True
                if core.faulted:
                    self._drop_faulted()
                self._wake()
                if now >= next_house:
                    self._housekeeping()
                    next_house = now + HOUSEKEEPING_S
                if now >= next_progress:
                    core.progress_tick(w for c in self.clients.values() for w in c.watchers.values())
                    self._wake()
                    next_progress = now + self.cfg.progress_notify_interval
                if not worked:
                    timeout = min(next_house, next_progress) - now
                    if core.victims or core.canceling:
                        timeout = min(timeout, next_victims - now)
                    self.bell.wait(self._has_work, max(0.0, min(timeout, IDLE_SLEEP_MAX_S)),
                                   spin=BROKER_SPIN, slice=IDLE_SLEEP_MAX_S)
        finally:
            self.close()

    def _has_work(self) -> bool:
        w = self.words
        if w[L.CTL_REG_SEQ] != self._reg_seq or w[L.CTL_SPACE_HINT] or self._stopping:
            return True
        for c in self.clients.values():
            if c.req.readable():
                return True
        return False

    def _wake(self) -> None:
        woken = self.core.woken
        if woken:
            for c in woken:
                c.bell.ring()
            woken.clear()

    def _drain_requests(self) -> bool:
        worked = False
        for c in list(self.clients.values()):
            if c.backlog and not self._flush_backlog(c):
                continue
            req = c.req
            for _ in range(REQUESTS_PER_CLIENT_PASS):
                if c.reply_bytes >= c.resp.capacity:
                    # Its replies already fill its response ring: it is not reading
                    # them. Leave its requests in its ring (backpressure) rather than
                    # hold more: at most a ring's worth plus one reply is ever held.
                    break
                try:
                    data = req.read()
                except MessageTooLarge as exc:
                    # A client that ignored --max-request-bytes: the message was dropped
                    # as it streamed in (never buffered); the client gets etcd's error.
                    worked = True
                    self._reply(c, encode_error(peek_id(exc.head, 1), errors.RequestTooLargeError()))
                    continue
                except RingCorrupt as exc:
                    log.warning("client %s wrote a corrupt record (%s): disconnecting", c, exc)
                    self._reclaim(c)
                    break
                if data is None:
                    break
                worked = True
                c.requests += 1
                if not self._handle(c, data):
                    break
                if c.backlog:
                    break
        if worked:
            self._commit_batch()
        return worked

    def _drop_faulted(self) -> None:
        """Disconnect clients whose rings failed on write (they corrupted them)."""
        faulted = self.core.faulted
        while faulted:
            c = faulted.pop()
            log.warning("client %s corrupted one of its rings: disconnecting", c)
            self._reclaim(c)

    def _commit_batch(self) -> None:
        """Make the batch's writes durable, then notify watchers, then publish replies
        (so a reply means the write is logged and its watchers can see it)."""
        if self.wal is not None and not self._replaying:
            self.wal.commit(time.monotonic())
        if self._pending:
            notify = self.core.notify
            for rev, events, encoded in self._pending:
                notify(rev, events, encoded)
            self._pending.clear()
        if self._held:
            touched = set()
            for c, data in self._held:
                if c.resp is None:
                    continue  # reclaimed meanwhile
                if c.backlog:
                    c.backlog.append([data, 0])
                    continue
                try:
                    off = c.resp.write(data, 0)
                except RingCorrupt:
                    self.core.faulted.add(c)
                    continue
                if off != len(data):
                    c.backlog.append([data, off])
                    c.resp.producer_blocked = 1  # the client hints when it made room
                else:
                    c.reply_bytes -= len(data)
                touched.add(c)
            self._held.clear()
            woken = self.core.woken
            for c in touched:
                if c.resp is not None and c not in self.core.faulted:
                    c.resp.publish()
                    woken.add(c)
        if self.core.faulted:
            self._drop_faulted()

    # ------------------------------------------------------------ requests

    def _reply(self, c: ClientConn, data: bytes) -> None:
        self._held.append((c, data))
        c.reply_bytes += len(data)

    def _flush_backlog(self, c: ClientConn) -> bool:
        while c.backlog:
            item = c.backlog[0]
            try:
                off = c.resp.write(item[0], item[1])
            except RingCorrupt:
                self.core.faulted.add(c)
                self._drop_faulted()
                return False
            if off < len(item[0]):
                item[1] = off
                c.resp.producer_blocked = 1
                break
            c.backlog.popleft()
            c.reply_bytes -= len(item[0])
        c.resp.publish()
        self.core.woken.add(c)
        return not c.backlog

    def _handle(self, c: ClientConn, data: bytes) -> bool:
        """Apply one request; False if the client was disconnected for it."""
        req_id = 0
        try:
            if len(data) > self.cfg.max_request_bytes:
                # etcd compares the encoded request with --max-request-bytes; ours is
                # the msgpack request (within a few bytes of etcd's protobuf).
                # Read the id without decoding the (oversized) body.
                req_id = peek_id(data, 1)
                raise errors.RequestTooLargeError()
            msg = unpackb(data, max_size=self.cfg.max_request_bytes + REQUEST_ENVELOPE)
            if not isinstance(msg, list) or len(msg) < 2 or not isinstance(msg[1], int):
                raise errors.ProtocolError("shmwatch: malformed request")
            op, req_id = msg[0], msg[1]
            if op == OP_KV:
                if len(msg) != 3:
                    raise errors.ProtocolError("shmwatch: malformed request")
                rev = self.mvcc.rev
                data = encode_reply(req_id, self._apply(decode_op(msg[2]), msg[2]))
                if len(data) > self.cfg.max_response_bytes:
                    raise errors.ResponseTooLargeError.for_reply(
                        len(data), self.cfg.max_response_bytes,
                        self.mvcc.rev if self.mvcc.rev != rev else 0)
                self._reply(c, data)
                return True
            # Anything else sees the store as committed and notified so far.
            self._commit_batch()
            if op == OP_WATCH_CREATE:
                self._reply(c, encode_reply(req_id, self._watch_create(c, msg)))
            elif op == OP_WATCH_CANCEL:
                self._watch_cancel(c, msg)
                self._reply(c, encode_reply(req_id, None))
            elif op == OP_PROGRESS:
                self.core.request_progress(list(c.watchers.values()))
                self._reply(c, encode_reply(req_id, None))
            elif op == OP_COMPACT:
                self._reply(c, encode_reply(req_id, self._compact(msg)))
            elif op == OP_ARENA:
                self._reply(c, encode_reply(req_id, self._new_arena(c)))
            elif op == OP_BYE:
                self._reclaim(c)
                return False
            else:
                raise errors.ProtocolError(f"shmwatch: unknown request op {op!r}")
        except errors.ShmwatchError as exc:
            self._reply(c, encode_error(req_id, exc))
        except Exception as exc:  # a bug must cost one request, never the broker
            log.exception("request from %s failed", c)
            self._reply(c, encode_error(req_id, errors.ShmwatchError(f"shmwatch: internal error: {exc!r}")))
        return True

    def _apply(self, op, raw) -> list:
        resp, events = self.mvcc.apply(op)
        if events:
            if self.wal is not None and not self._replaying:
                self.wal.append(KIND_KV, raw)
            self._commit(self.mvcc.rev, events)
        return encode_response(resp)

    def _commit(self, rev: int, events: list[Event]) -> None:
        """Log a revision's events, move the compaction point if the log wrapped, notify."""
        self.writes += 1
        # Each event is encoded once here: the log record is the array of them, and
        # notify reuses the same bytes for watchers with prev_kv (and for creates).
        encoded = [encode_event(ev, True) for ev in events]
        self._log_append(rev, array_header(len(encoded)) + b"".join(encoded))
        self.words[L.CTL_REVISION] = rev
        self._pending.append((rev, events, encoded))

    def _log_append(self, rev: int, payload: bytes) -> None:
        """Append to the revision log; if it wrapped, its oldest revision becomes the
        compaction point of the store too (one compaction point for reads and watches)."""
        if len(payload) > self.log.max_payload:
            # One revision larger than the whole log: every older revision goes, and
            # this one is kept beside the ring until the next revision evicts it, so
            # the compaction point is `rev` for the store and the watchers alike.
            self.log.truncate_before(rev + 1)
            self._oversized = (rev, payload)
            self._compact_to(rev)
        else:
            evicted = self.log.append(rev, payload)
            if evicted or self._oversized:
                self._oversized = None
                self._compact_to(self.log.oldest_rev or rev)

    def _compact_to(self, rev: int) -> None:
        if rev > self.mvcc.compact_rev:
            self.mvcc.compact(rev)
            self.core.compact_rev = max(self.core.compact_rev, self.mvcc.compact_rev)
            self.words[L.CTL_COMPACT_REV] = self.mvcc.compact_rev

    def _compact(self, msg) -> list:
        if len(msg) != 3 or not isinstance(msg[2], int):
            raise errors.ProtocolError("shmwatch: malformed compact request")
        resp = self._do_compact(msg[2])
        if self.wal is not None:
            self.wal.append(KIND_COMPACT, msg[2])
            self._commit_batch()
        return encode_response(resp)

    def _do_compact(self, rev: int):
        resp = self.mvcc.compact(rev)
        self.log.truncate_before(rev)
        self.core.compact_rev = self.mvcc.compact_rev
        self.words[L.CTL_COMPACT_REV] = self.core.compact_rev
        return resp

    def _read_history(self, lo: int, hi: int):
        """Yield (rev, events) of the log for lo <= rev <= hi (the core's history
        reader). A record damaged in shared memory raises `HistoryDamaged` after the
        damage was contained (`_log_damaged`)."""
        compact_rev = self.mvcc.compact_rev
        records = self.log.read_from(lo, hi)
        if self._oversized is not None and lo <= self._oversized[0] <= hi:
            records = itertools.chain([self._oversized], records)
        rev = lo
        try:
            for rev, payload in records:
                events = [
                    Event(t, KeyValue(*kv), KeyValue(*prev) if prev is not None else None)
                    for t, kv, prev in msgpack.unpackb(payload, raw=False)
                ]
                if rev == compact_rev:
                    events = events_at_compact_rev(events)
                yield rev, events
        except LogRecordCorrupt as exc:
            self._log_damaged(exc.rev, str(exc))
            raise HistoryDamaged(exc.rev) from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # A record with a valid CRC but not our encoding: written by someone else.
            self._log_damaged(rev, f"revision log: undecodable record for revision {rev}: {exc}")
            raise HistoryDamaged(rev) from None

    def _log_damaged(self, rev: int, what: str) -> None:
        """Someone wrote into the revision log's shared memory and damaged revision
        `rev`. Contain it: history up to and including `rev` is treated as compacted
        (watchers that still need it get etcd's compaction cancel; reads below it get
        the compacted error); the store itself, in this process, is intact; nothing
        newer is touched. Logged loudly; the broker keeps serving."""
        log.error("%s: shared memory of the revision log was overwritten by another "
                  "process; history up to revision %d is dropped (treated as compacted)",
                  what, rev)
        self.log_damage += 1
        self.log.truncate_before(rev + 1)
        if self._oversized is not None and self._oversized[0] <= rev:
            self._oversized = None
        self._compact_to(min(rev + 1, self.mvcc.rev))
        # The watch core's compaction point may pass the store's by one (damage in the
        # newest record): a watcher that needs `rev` must be cancelled, never skip it.
        self.core.compact_rev = max(self.core.compact_rev, rev + 1)

    # ------------------------------------------------------------ watches

    def _watch_create(self, c: ClientConn, msg) -> list:
        """etcd's watch-stream rules for a create: the range check, then the id (0 picks
        the next free one; any other int64, negative ones included, is taken as given
        unless in use). Reply `[watch_id, revision, cancel_reason, refusal_code]`, where
        a refusal (code != 0) is etcd's created+canceled response with that reason."""
        try:
            (_, _, arena, idx, key, end, start_rev, prev_kv, filters, progress_notify,
             fragment, want_id) = msg
        except ValueError:
            raise errors.ProtocolError("shmwatch: malformed watch request") from None
        if not (isinstance(arena, int) and 0 <= arena < len(c.arenas)
                and isinstance(idx, int) and 0 <= idx < self.cfg.rings_per_arena):
            raise errors.ProtocolError("shmwatch: watch ring out of range")
        if not isinstance(key, bytes) or not (end is None or isinstance(end, bytes)):
            raise errors.ProtocolError("shmwatch: malformed watch key")
        if (not isinstance(want_id, int) or not isinstance(start_rev, int)
                or not -(1 << 63) <= want_id < 1 << 63):
            raise errors.ProtocolError("shmwatch: malformed watch request")
        old = c.rings_in_use.get((arena, idx))
        if old is not None:
            if old.state != "removed":
                raise errors.ProtocolError("shmwatch: watch ring already in use")
            self._forget_watcher(c, old)
        if len(c.watchers) >= self.cfg.max_watchers_per_client:
            self._release_finished_watchers()
            if len(c.watchers) >= self.cfg.max_watchers_per_client:
                raise errors.TooManyWatchersError(
                    f"shmwatch: this client already has {len(c.watchers)} watches, the "
                    f"broker's --max-watchers-per-client")
        rev = self.mvcc.rev
        if end is not None and end != b"\0" and key >= end:
            return [0, rev, errors.InvalidRangeError.default_message,
                    errors.InvalidRangeError.code]
        if want_id:
            old = c.watchers.get(want_id)
            if old is not None and old.state == "removed":
                self._forget_watcher(c, old)
            elif old is not None:
                return [want_id, rev, errors.DuplicateWatchIdError.default_message,
                        errors.DuplicateWatchIdError.code]
            wid = want_id
        else:
            while c.next_watch_id in c.watchers:
                c.next_watch_id += 1
            wid = c.next_watch_id
            c.next_watch_id += 1
        ring_size = ring_bytes(self.cfg.watch_ring_bytes)
        buf = c.arenas[arena].payload[idx * ring_size:(idx + 1) * ring_size]
        try:
            sink = Ring(buf, init=False)
        except RingCorrupt as exc:
            raise errors.ProtocolError(f"shmwatch: watch ring header damaged: {exc}") from None
        w = Watcher(wid, c, key, end, sink, prev_kv=bool(prev_kv),
                    filters=int(filters) & (FILTER_NOPUT | FILTER_NODELETE),
                    progress_notify=bool(progress_notify), fragment=bool(fragment))
        w.tag = (arena, idx)
        c.watchers[wid] = w
        c.rings_in_use[(arena, idx)] = w
        self.core.add_watcher(w, start_rev)
        return [wid, rev, "", 0]

    def _watch_cancel(self, c: ClientConn, msg) -> None:
        if len(msg) != 3 or not isinstance(msg[2], int):
            raise errors.ProtocolError("shmwatch: malformed cancel request")
        w = c.watchers.get(msg[2])
        if w is None:
            # etcd ignores a cancel of an unknown id (the watch may have ended already).
            return
        self.core.cancel(w)

    def _new_arena(self, c: ClientConn) -> list:
        k = len(c.arenas)
        rs = ring_bytes(self.cfg.watch_ring_bytes)
        size = rs * self.cfg.rings_per_arena
        try:
            seg, _ = self._create_unique(
                lambda token: L.arena_part(c.part, k, token),
                lambda p: Segment.create(self._name(p), size, kind=L.KIND_ARENA,
                                         boot_id=self.boot_id, mode=self.cfg.mode))
        except ShmNoSpace:
            raise errors.NoSpaceError(
                f"shmwatch: /dev/shm is full: need {size} bytes for {self.cfg.rings_per_arena} "
                f"more watch rings; free space in /dev/shm or start the broker with a "
                f"smaller --watch-ring-bytes or --rings-per-arena") from None
        except NameClash as exc:
            raise errors.ShmwatchError(f"shmwatch: could not create a watch-ring arena: "
                                       f"{exc}") from None
        try:
            self._share(seg)
            for i in range(self.cfg.rings_per_arena):
                Ring(seg.payload[i * rs:(i + 1) * rs], init=True).release()
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        c.arenas.append(seg)
        return [k, seg.name]

    def _forget_watcher(self, c: ClientConn, w: Watcher) -> None:
        """Drop a finished watcher's bookkeeping: its id and ring may be reused."""
        if c.watchers.get(w.id) is w:
            del c.watchers[w.id]
        if c.rings_in_use.get(w.tag) is w:
            del c.rings_in_use[w.tag]
        if w.sink is not None:
            w.sink.release()
            w.sink = None

    def _release_finished_watchers(self) -> None:
        """Forget watchers the core finished (cancelled, compacted). O(finished)."""
        removed = self.core.removed
        while removed:
            w = removed.pop()
            if self.clients.get(w.owner.slot) is w.owner:
                self._forget_watcher(w.owner, w)

    # ------------------------------------------------------------ metrics

    def metrics(self) -> dict:
        """A snapshot of the broker's state for tools/top and tools/stress.

        O(W) over watchers; published a few times a second, never per request."""
        core = self.core
        cur = self.mvcc.rev
        clients = []
        rows = []
        totals = dict.fromkeys(("synced", "unsynced", "victim", "canceling"), 0)
        for c in self.clients.values():
            worst_fill = 0.0
            max_lag = 0
            victims = 0
            for w in c.watchers.values():
                st = w.state
                if st in totals:
                    totals[st] += 1
                victims += st == "victim"
                lag = 0 if st == "synced" else max(0, cur - w.min_rev + 1)
                fill = w.sink.used() / w.sink.capacity if w.sink is not None else 0.0
                worst_fill = max(worst_fill, fill)
                max_lag = max(max_lag, lag)
                rows.append((lag, fill, c.pid, w.id, w.key, w.end, st, len(w.outbox)))
            clients.append({"slot": c.slot, "pid": c.pid, "create_time_us": c.create_time_us,
                            "label": c.label,
                            "watchers": len(c.watchers), "requests": c.requests,
                            "worst_fill": round(worst_fill, 4), "max_lag": max_lag,
                            "victims": victims})
        rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        log_ = self.log
        return {
            "name": self.cfg.name, "pid": os.getpid(), "started": self.started,
            "time": time.time(), "revision": cur, "compact_revision": self.mvcc.compact_rev,
            "log": {"used": log_.used, "capacity": log_.capacity, "count": log_.count,
                    "oldest_rev": log_.oldest_rev, "newest_rev": log_.newest_rev},
            "writes": self.writes, "events_delivered": core.events_delivered,
            "watchers": {"total": sum(len(c.watchers) for c in self.clients.values()),
                         **totals},
            "pending_events": core.pending_events(),
            "victims_entered": core.victims_entered, "catchups": core.catchups,
            "compactions": core.compactions,
            "log_damage": self.log_damage,
            "clients": clients,
            "top_watchers": [
                {"lag": lag, "fill": round(fill, 4), "pid": pid, "watch_id": wid,
                 "key": key.decode(errors="replace"),
                 "range_end": None if end is None else end.decode(errors="replace"),
                 "state": st, "pending": pend}
                for lag, fill, pid, wid, key, end, st, pend in rows[:STATS_TOP_WATCHERS]],
        }

    def _publish_stats(self) -> None:
        """Write the metrics under a sequence lock: odd while writing, even when done."""
        data = msgpack.packb(self.metrics(), use_bin_type=True)
        if len(data) > STATS_BYTES - 64:
            return
        sw = self._stats_words
        buf = self.statseg.payload
        sw[0] += 1
        sw[1] = len(data)
        buf[16:16 + len(data)] = data
        sw[0] += 1

    # ------------------------------------------------------------ clients

    def _housekeeping(self) -> None:
        w = self.words
        w[L.CTL_HEARTBEAT_NS] = time.time_ns()
        self._house_passes = getattr(self, "_house_passes", 0) + 1
        self._n_watchers = sum(len(c.watchers) for c in self.clients.values())
        if self.wal is not None:
            self.wal.commit(time.monotonic())  # fsync=batch: sync what is waiting
            if (self.wal.records_since_snapshot >= self.cfg.snapshot_every
                    or self.wal.bytes_since_snapshot >= 256 << 20):
                self._snapshot()
        # metrics() walks every watcher: with many, publish less often (measured: 10k
        # watchers at 5 snapshots/s cost an idle broker 7% of a core).
        every = STATS_EVERY * max(1, self._n_watchers // 2000)
        if self._house_passes % every == 1:
            self._publish_stats()
        seq = w[L.CTL_REG_SEQ]
        scan = seq != self._reg_seq
        self._reg_seq = seq
        fd = self.ctl.fd
        self._release_finished_watchers()
        for c in list(self.clients.values()):
            if not is_locked(fd, L.slot_lock_byte(c.slot)):
                log.info("client %s is gone: reclaiming its watchers and rings", c)
                self._reclaim(c)
        if scan:
            self._scan_slots()

    def _scan_slots(self) -> None:
        w = self.words
        fd = self.ctl.fd
        for slot in range(self.cfg.max_clients):
            state = w[L.slot_word(slot, L.SLOT_STATE)]
            if state == L.SLOT_FAILED and not is_locked(fd, L.slot_lock_byte(slot)):
                w[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_FREE  # told, and gone
                continue
            if state != L.SLOT_REQUESTED:
                continue
            c = self.clients.get(slot)
            if c is not None:
                # Registered already: only a process writing into the control segment
                # behind the client's back asks again. Refuse, keep the registration.
                log.warning("slot %d of %s was set to REQUESTED again: ignored", slot, c)
                w[L.slot_word(slot, L.SLOT_GEN)] = c.gen
                w[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_READY
                continue
            if not is_locked(fd, L.slot_lock_byte(slot)):
                w[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_FREE  # requester died
                continue
            try:
                self._register(slot)
            except Exception as exc:
                self._refuse(slot, exc)

    def _refuse(self, slot: int, exc: Exception) -> None:
        """Tell the client in `slot` at once why it cannot be registered (it raises the
        matching error instead of waiting for a registration that will not come)."""
        w = self.words
        arg = 0
        if isinstance(exc, ShmNoSpace):
            code = errors.NoSpaceError.code
            arg = (HEADER_SIZE + L.CLIENT_HEADER + ring_bytes(self.cfg.request_ring_bytes)
                   + ring_bytes(self.cfg.response_ring_bytes))
            log.warning("cannot register the client in slot %d: %s", slot, exc)
        elif isinstance(exc, NameClash):
            code = errors.ShmwatchError.code
            log.warning("cannot register the client in slot %d: %s", slot, exc)
        else:
            code = errors.ShmwatchError.code
            log.exception("could not register the client in slot %d", slot)
        w[L.slot_word(slot, L.SLOT_ERROR)] = code
        w[L.slot_word(slot, L.SLOT_ERROR_ARG)] = arg
        w[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_FAILED

    def _register(self, slot: int) -> None:
        w = self.words
        gen = w[L.slot_word(slot, L.SLOT_GEN)] + 1
        req_size = ring_bytes(self.cfg.request_ring_bytes)
        resp_size = ring_bytes(self.cfg.response_ring_bytes)
        mode = self.cfg.mode

        def create(part: str) -> tuple[Segment, Doorbell]:
            seg = Segment.create(self._name(part), L.CLIENT_HEADER + req_size + resp_size,
                                 kind=L.KIND_CLIENT, boot_id=self.boot_id, mode=mode)
            try:
                flag = seg.payload[L.CLIENT_SLEEPING:L.CLIENT_SLEEPING + 4]
                bell = Doorbell.create(self._name(L.client_bell_part(part)), flag, mode=mode)
            except BaseException:
                seg.unlink()
                seg.close()
                raise
            return seg, bell

        (seg, bell), token = self._create_unique(
            lambda token: L.client_part(slot, gen, token), create)
        part = L.client_part(slot, gen, token)
        try:
            p = seg.payload
            # A request streamed in chunks is bounded by --max-request-bytes (plus the
            # envelope), not by the ring's default: a client cannot make us buffer more.
            req = Ring(p[L.CLIENT_HEADER:L.CLIENT_HEADER + req_size], init=True,
                       max_message=self.cfg.max_request_bytes + REQUEST_ENVELOPE)
            resp = Ring(p[L.CLIENT_HEADER + req_size:L.CLIENT_HEADER + req_size + resp_size],
                        init=True)
            self._share(seg)
            self._share(bell)
        except BaseException:
            bell.close()
            bell.unlink()
            seg.unlink()
            seg.close()
            raise
        off = L.slot_label_offset(slot)
        label = bytes(self.ctl.payload[off:off + L.SLOT_LABEL_BYTES]).rstrip(b"\0")
        c = ClientConn(slot, gen, part, w[L.slot_word(slot, L.SLOT_PID)],
                       w[L.slot_word(slot, L.SLOT_CREATE_TIME_US)],
                       label.decode("utf-8", errors="replace"), seg, req, resp, bell)
        self.clients[slot] = c
        w[L.slot_word(slot, L.SLOT_GEN)] = gen
        w[L.slot_word(slot, L.SLOT_TOKEN)] = token
        w[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_READY

    def _reclaim(self, c: ClientConn) -> None:
        """Forget a client: drop its watchers, unlink its rings, arenas and doorbell."""
        if self.clients.get(c.slot) is not c:
            return
        del self.clients[c.slot]
        for w in c.watchers.values():
            self.core.drop(w)
            if w.sink is not None:
                w.sink.release()
                w.sink = None
        c.watchers.clear()
        c.rings_in_use.clear()
        self.core.woken.discard(c)
        c.req.release()
        c.resp.release()
        c.req = c.resp = None  # type: ignore[assignment]
        for seg in c.arenas:
            seg.unlink()
            seg.close()
        c.bell.close()
        c.bell.unlink()
        c.seg.unlink()
        c.seg.close()
        if hasattr(self, "words"):
            self.words[L.slot_word(c.slot, L.SLOT_STATE)] = L.SLOT_FREE


def _describe(name: str) -> str:
    """`/dev/shm/x (owner ...)` for a log line about an object we did not expect."""
    path = shm_path(name)
    for candidate in (path, os.path.join(os.path.dirname(path), "sem." + name[1:])):
        try:
            return f"{candidate} (owner {owner(os.lstat(candidate).st_uid)})"
        except OSError:
            continue
    return path


def start_bytes(cfg: BrokerConfig) -> int:
    """What the broker takes in /dev/shm before any client connects."""
    return start_bytes_for(cfg.log_bytes, cfg.max_clients, STATS_BYTES)


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

