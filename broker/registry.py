"""The broker's shared-memory objects: its name, and every client's rings.

Owns the life of every named object of one broker: the control segment (published
under the broker's name only once its lock is held, so "alive" is "locked", see
docs/INTERNALS.md "Liveness"), the doorbell, the revision-log and stats segments, and
per client its request and response rings, doorbell and arenas of watch rings. It
creates them under unpredictable names, hands them to clients through the control
segment's slots, tells a client at once why it cannot be registered, notices dead
clients by their kernel-held slot locks, and unlinks everything it made.

It decides nothing about requests, keys or watches (the shell and the cores do), and
never waits: every call does its work and returns.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import psutil

from shm import layout as L
from shm.doorbell import Doorbell
from shm.errors import RingCorrupt, SegmentExists, SegmentNotFound, ShmNoSpace
from shm.lock import is_locked, try_lock
from shm.revlog import RevLog, revlog_bytes
from shm.ring import Ring, ring_bytes
from shm.segment import HEADER_SIZE, Segment, new_token, shm_name, shm_path
from shmwatch.wire import errors

from .admin import broker_info, cleanup_stale, owner
from .config import STATS_BYTES, BrokerConfig
from .errors import BrokerRunning, NameClash, NameTaken
from .outbox import RingWriter
from .watch import WatchStream

log = logging.getLogger("shmwatch.broker")

# Fresh random names tried for one object before giving up: a clash of 64-bit random
# tokens is only ever somebody creating names on purpose, and it is logged.
NAME_ATTEMPTS = 4
# How long a starting broker keeps trying to take its name while a dead broker's
# leftovers are being removed by someone else.
TAKE_NAME_S = 5.0
REQUEST_ENVELOPE = 1024  # bytes of a request beyond its payload (op, ids, msgpack framing)


class ClientConn:
    """The broker's side of one registered client: its rings, its watch stream."""

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
        self.replies = RingWriter(resp)
        self.bell = bell
        self.arenas: list[Segment] = []
        self.stream = WatchStream(self)
        self.batch_bytes = 0  # replies of the current batch not yet written
        self.requests = 0

    def __repr__(self) -> str:
        return f"<client slot={self.slot} pid={self.pid}>"


def describe(path: str) -> str:
    """`path (owner ...)` for a log line about an object we did not expect."""
    for candidate in (path, os.path.join(os.path.dirname(path),
                                         "sem." + os.path.basename(path))):
        try:
            return f"{candidate} (owner {owner(os.lstat(candidate).st_uid)})"
        except OSError:
            continue
    return path


class Registry:
    """A broker's named objects and its clients (see the module docstring)."""

    def __init__(self, cfg: BrokerConfig, boot_id: bytes, cluster_id: int, revision: int):
        self.cfg = cfg
        self.boot_id = boot_id
        self.clients: dict[int, ClientConn] = {}
        self._gid = None
        if cfg.group:
            import grp

            self._gid = (int(cfg.group) if cfg.group.isdigit()
                         else grp.getgrnam(cfg.group).gr_gid)
        self._take_name(cluster_id, revision)
        try:
            self._create_shared()
        except BaseException:
            self.unlink_all()
            raise
        self._reg_seq = -1

    # ------------------------------------------------------------ names

    def name(self, part: str) -> str:
        return shm_name(self.cfg.name, part)

    def _share(self, obj) -> None:
        """Hand a new segment (or doorbell) to the configured group, if any."""
        if self._gid is None:
            return
        if isinstance(obj, Segment):
            os.fchown(obj.fd, -1, self._gid)
        else:
            os.chown("/dev/shm/sem." + obj.name.lstrip("/"), -1, self._gid)

    def _create_unique(self, part_of: Callable[[int], str], create):
        """`create(part)` with `part = part_of(token)` for fresh random tokens until one
        is free: (object, token). Raises NameClash after NAME_ATTEMPTS names."""
        for _ in range(NAME_ATTEMPTS):
            token = new_token()
            part = part_of(token)
            try:
                return create(part), token
            except SegmentExists:
                log.warning("%s already exists (someone creates our names?): trying another "
                            "name", describe(shm_path(self.name(part))))
        raise NameClash(f"{NAME_ATTEMPTS} fresh random names for {part_of(0)} all existed")

    def _segment(self, part: str, size: int, kind: int) -> Segment:
        return Segment.create(self.name(part), size, kind=kind, boot_id=self.boot_id,
                              mode=self.cfg.mode)

    def _create_shared(self) -> None:
        cfg = self.cfg
        w = self.words
        flag = self.ctl.payload[L.CTL_BROKER_SLEEPING * 8:L.CTL_BROKER_SLEEPING * 8 + 4]
        self.bell, w[L.CTL_BELL_TOKEN] = self._create_unique(
            L.bell_part, lambda p: Doorbell.create(self.name(p), flag, mode=cfg.mode))
        self.logseg, w[L.CTL_LOG_TOKEN] = self._create_unique(
            L.log_part, lambda p: self._segment(p, revlog_bytes(cfg.log_bytes), L.KIND_LOG))
        self.log = RevLog(self.logseg.payload, init=True)
        self.statseg, w[L.CTL_STATS_TOKEN] = self._create_unique(
            L.stats_part, lambda p: self._segment(p, STATS_BYTES, L.KIND_STATS))
        for obj in (self.bell, self.logseg, self.statseg):
            self._share(obj)

    def _fill_ctl(self, words, cluster_id: int, revision: int) -> None:
        cfg = self.cfg
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
        words[L.CTL_CLUSTER_ID] = cluster_id
        words[L.CTL_HEARTBEAT_NS] = time.time_ns()
        words[L.CTL_REVISION] = revision

    def _take_name(self, cluster_id: int, revision: int) -> None:
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
                L.ctl_temp_part,
                lambda p: self._segment(p, L.ctl_payload_size(cfg.max_clients), L.KIND_CTL))
            words = seg.payload.cast("Q")
            try:
                if not try_lock(seg.fd, L.BROKER_LOCK_BYTE):
                    raise RuntimeError(f"could not lock the new control segment {seg.name}")
                self._fill_ctl(words, cluster_id, revision)
                self._share(seg)
                seg.publish(self.name(L.CTL_PART))
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
        path = shm_path(self.name(L.CTL_PART))
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

    def unlink_all(self) -> None:
        """Remove every object of this broker (clients' first, the control segment
        last: while it stands, nobody else can take the name). Idempotent."""
        for c in list(self.clients.values()):
            self.reclaim(c)
        if getattr(self, "log", None) is not None:
            self.log.release()
            self.log = None
        if getattr(self, "words", None) is not None:
            self.words.release()
            self.words = None
        if getattr(self, "bell", None) is not None:
            self.bell.close()
            self.bell.unlink()
            self.bell = None
        for seg_attr in ("statseg", "logseg", "ctl"):
            seg = getattr(self, seg_attr, None)
            if seg is not None:
                seg.unlink()
                seg.close()
                setattr(self, seg_attr, None)

    # ------------------------------------------------------------ clients

    def registrations(self) -> bool:
        """Whether a client changed the registration sequence since the last scan."""
        return self.words[L.CTL_REG_SEQ] != self._reg_seq

    def dead_clients(self) -> list[ClientConn]:
        """Registered clients whose slot lock is free: their process is gone."""
        fd = self.ctl.fd
        return [c for c in self.clients.values() if not is_locked(fd, L.slot_lock_byte(c.slot))]

    def scan_slots(self) -> None:
        """Register every client that asked (slot REQUESTED, its lock held); refuse at
        once one that cannot be; free slots whose requester died."""
        w = self.words
        self._reg_seq = w[L.CTL_REG_SEQ]
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
            except Exception as exc:  # whatever it is, the client is told, not left waiting
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

    def _client_objects(self, part: str, req_size: int, resp_size: int) -> tuple[Segment, Doorbell]:
        seg = self._segment(part, L.CLIENT_HEADER + req_size + resp_size, L.KIND_CLIENT)
        try:
            flag = seg.payload[L.CLIENT_SLEEPING:L.CLIENT_SLEEPING + 4]
            bell = Doorbell.create(self.name(L.client_bell_part(part)), flag, mode=self.cfg.mode)
        except BaseException:
            seg.unlink()
            seg.close()
            raise
        return seg, bell

    def _register(self, slot: int) -> None:
        w = self.words
        gen = w[L.slot_word(slot, L.SLOT_GEN)] + 1
        req_size = ring_bytes(self.cfg.request_ring_bytes)
        resp_size = ring_bytes(self.cfg.response_ring_bytes)
        (seg, bell), token = self._create_unique(
            lambda token: L.client_part(slot, gen, token),
            lambda part: self._client_objects(part, req_size, resp_size))
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
        c = ClientConn(slot, gen, L.client_part(slot, gen, token),
                       w[L.slot_word(slot, L.SLOT_PID)],
                       w[L.slot_word(slot, L.SLOT_CREATE_TIME_US)],
                       label.decode("utf-8", errors="replace"), seg, req, resp, bell)
        self.clients[slot] = c
        w[L.slot_word(slot, L.SLOT_GEN)] = gen
        w[L.slot_word(slot, L.SLOT_TOKEN)] = token
        w[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_READY

    def new_arena(self, c: ClientConn) -> tuple[int, str]:
        """Another arena of watch rings for `c`: (its number, its segment's name)."""
        k = len(c.arenas)
        if k * self.cfg.rings_per_arena >= self.cfg.max_watchers_per_client:
            # Rings enough for every watch it may hold: the client asks for more only
            # when all are in use, so its next watch would be refused anyway (and a
            # client that asks regardless must not fill /dev/shm).
            raise errors.TooManyWatchersError(
                f"shmwatch: this client's watch rings already number the broker's "
                f"--max-watchers-per-client ({self.cfg.max_watchers_per_client})")
        rs = ring_bytes(self.cfg.watch_ring_bytes)
        size = rs * self.cfg.rings_per_arena
        try:
            seg, _ = self._create_unique(lambda token: L.arena_part(c.part, k, token),
                                         lambda p: self._segment(p, size, L.KIND_ARENA))
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
        return k, seg.name

    def watch_ring(self, c: ClientConn, arena: int, idx: int) -> Ring:
        """Ring `idx` of `c`'s arena `arena`, checked (a client names it: never trust)."""
        if not (0 <= arena < len(c.arenas) and 0 <= idx < self.cfg.rings_per_arena):
            raise errors.ProtocolError("shmwatch: watch ring out of range")
        rs = ring_bytes(self.cfg.watch_ring_bytes)
        try:
            return Ring(c.arenas[arena].payload[idx * rs:(idx + 1) * rs], init=False)
        except RingCorrupt as exc:
            raise errors.ProtocolError(f"shmwatch: watch ring header damaged: {exc}") from None

    def reclaim(self, c: ClientConn) -> None:
        """Forget a client: unlink its rings, arenas and doorbell, free its slot. (Its
        watchers must be dropped from the watch core first.)"""
        if self.clients.get(c.slot) is not c:
            return
        del self.clients[c.slot]
        c.req.release()
        c.replies.drop()
        c.replies.sink.release()
        for seg in c.arenas:
            seg.unlink()
            seg.close()
        c.bell.close()
        c.bell.unlink()
        c.seg.unlink()
        c.seg.close()
        if self.words is not None:
            self.words[L.slot_word(c.slot, L.SLOT_STATE)] = L.SLOT_FREE
