"""The mirroring broker: the local face of a real etcd cluster (`serve --upstream`).

The hook the broker's loop calls (server.py keeps a `mirror` attribute, None when
standalone). Revisions are etcd's: `MirrorStore` takes etcd's revisions as they come,
sparse when a prefix is mirrored (a revision that touched nothing mirrored is skipped,
its slot in the store's change log left empty). What the store needs to follow etcd:

- `pump()` applies what the watch thread handed over (`broker.upstream`): the initial
  load, each etcd revision's events (to the store, the shared log and the watchers, as a
  local write would be), progress (etcd's revision moved without touching the mirror),
  and a compaction past the mirror (reload: watchers that need the lost history are
  cancelled with etcd's compaction revision, as etcd would cancel them);
- `take(c, req)` forwards a write (put/delete/txn with a write, compact, every lease
  call) to etcd and holds its reply until the mirror applied the reply's header
  revision, so a client reads its own writes and its watchers have them. Reads are the
  mirror's (etcd's "serializable"); with `--consistency l` (etcd's default) a read first
  confirms etcd's current revision and waits for the mirror to reach it. A read below
  the mirror's oldest revision is served by etcd (or its compaction error).
- a `bound` lease is kept alive upstream while its client lives and revoked upstream
  the moment it goes (`client_gone`).

Nothing waits without bound: at most `MAX_INFLIGHT` forwarded requests (more stay in
the clients' request rings), and the watch thread's queue is bounded.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time

from shm import layout as L
from shmwatch.wire import errors
from shmwatch.wire.ops import DeleteOp, PutOp, RangeOp, TxnOp
from shmwatch.wire.protocol import (
    OP_LEASE_REVOKE,
    CompactRequest,
    KvRequest,
    LeaseGrantRequest,
    LeaseRequest,
    encode_error,
    encode_reply,
    encode_response,
)
from shmwatch.wire.types import DELETE, Event, KeyValue

from .mvcc import History, MVCCStore
from .upstream_calls import forward_call, keep_alive_once

log = logging.getLogger("shmwatch.broker.mirror")

CONFIRM_WAIT_S = 0.05  # a linearizable read waits this long for the mirror, then asks etcd
MAX_INFLIGHT = 1024
# How often the mirror asks whether etcd was compacted directly (etcdctl compact, another
# client): then it compacts the same revision, so old reads and watches fail as etcd's.
COMPACTION_PROBE_S = 2.0
# At start the mirror replays etcd's history since its compaction when it is at most
# this many revisions (then the mirror's compaction point is etcd's, and old watches
# and reads are answered as etcd would); a longer one starts at etcd's current revision.
REPLAY_MAX = 100_000  # forwarded requests at once (the rest wait in the request rings)
GAP = ()  # the change-log entry of an etcd revision that touched nothing mirrored


class MirrorStore(MVCCStore):
    """An MVCC store whose revisions are etcd's (see the module docstring)."""

    def load(self, rev: int, kvs: list[KeyValue]) -> None:
        """Start from etcd's state at revision `rev` (history before it is etcd's)."""
        self.__init__()
        for kv in kvs:
            h = self._hist[kv.key] = History()
            h.revs.append(kv.mod_revision)
            h.kvs.append(kv)
            self._live[kv.key] = kv
            if kv.lease:
                self._by_lease.setdefault(kv.lease, set()).add(kv.key)
        self._keys.update(self._hist)
        self._live_keys.update(self._live)
        self.rev = rev
        self._compact_main = rev
        self._log_start = rev + 1

    def advance(self, rev: int) -> None:
        """etcd reached `rev` without touching the mirrored keys."""
        if rev > self.rev:
            self._log.extend([GAP] * (rev - self.rev))
            self.rev = rev

    def apply_revision(self, rev: int, events: list[Event]) -> None:
        """Apply etcd's events of revision `rev` (> the store's) exactly as etcd has them."""
        if rev <= self.rev:
            raise ValueError(f"etcd revision {rev} is not after the mirror's {self.rev}")
        self.advance(rev - 1)
        keys = []
        for ev in events:
            key = ev.kv.key
            keys.append(key)
            if ev.type == DELETE:
                if key in self._live:
                    self._erase(key, rev)
                continue
            prev = self._live.get(key)
            kv = ev.kv
            if prev is None:
                self._live_keys.add(key)
            elif prev.lease and prev.lease != kv.lease:
                self._detach(prev.lease, key)
            if kv.lease and (prev is None or prev.lease != kv.lease):
                self._by_lease.setdefault(kv.lease, set()).add(key)
            self._live[key] = kv
            h = self._hist.get(key)
            if h is None:
                h = self._hist[key] = History()
                self._keys.add(key)
            h.revs.append(rev)
            h.kvs.append(kv)
        self.rev = rev
        self._log.append(keys[0] if len(keys) == 1 else tuple(keys))


def _writes(op) -> bool:
    """Whether an op may write (a txn: if any branch may)."""
    t = type(op)
    if t is PutOp or t is DeleteOp:
        return True
    if t is TxnOp:
        return any(_writes(o) for o in (*op.success, *op.failure))
    return False


class Mirror:
    """The broker's side of the mirror (module docstring)."""

    def __init__(self, broker, upstream, consistency: str = "l"):
        self.b = broker
        self.up = upstream
        self.linearizable = consistency == "l"
        self.loaded = False
        self.head = 0  # etcd's revision when the mirror loaded (start waits for it)
        self.applied = 0  # the newest etcd revision the mirror applied
        self.inflight = 0
        self.forwarded = 0
        self.compactions_lost = 0
        # heap of (rev, seq, client, data, deadline): replies waiting for the mirror at rev
        self._held: list = []
        self._seq = itertools.count()
        broker._set_store(MirrorStore())
        self._bound: dict[int, tuple[object, int, float]] = {}  # lease -> (client, ttl, next)
        self._next_probe = 0.0  # when to look for a compaction made at etcd directly

    # ------------------------------------------------------------ the loop's hooks

    def saturated(self) -> bool:
        return self.inflight >= MAX_INFLIGHT

    def has_work(self) -> bool:
        return not self.up.items.empty() or not self.up.done.empty()

    def pump(self, now: float) -> bool:
        """Apply what etcd sent, finish forwarded calls, release replies; True if worked."""
        worked = False
        items = self.up.items
        for _ in range(items.maxsize):  # at most a queue's worth per pass: clients too
            if items.empty():
                break
            self._apply(items.get_nowait())
            worked = True
        done = self.up.done
        while not done.empty():
            self._finish(*done.get_nowait())
            worked = True
        if worked:
            self.b._commit_batch()
        if self._held and self._release():
            self.b._commit_batch()
            worked = True
        if self._bound:
            self._keep_alive(now)
        if now >= self._next_probe and self.loaded:
            self._next_probe = float("inf")  # until this probe's answer
            self.up.submit("probe", lambda call, c=self.b.mvcc.compact_rev, h=self.b.mvcc.rev:
                           (self.up.compaction_since(c, h), None))
        return worked

    # ------------------------------------------------------------ etcd -> the mirror

    def _apply(self, item) -> None:
        kind = item[0]
        b = self.b
        store = b.mvcc
        if kind == "rev":
            _, rev, events = item
            if rev <= store.rev:  # never expected: the watch resumes at rev + 1
                log.error("etcd sent revision %d again (mirror at %d): ignored", rev, store.rev)
                return
            store.apply_revision(rev, events)
            b._commit(rev, events)
            self.applied = rev
        elif kind == "progress":
            if self.loaded and item[1] > store.rev:
                store.advance(item[1])
                self._moved(item[1])
        elif kind == "load":
            self._load(item[1], item[2])
            self.head = item[3]
        elif kind == "compacted":
            # etcd compacted history the mirror had not received: the watchers that
            # would need it are cancelled with etcd's compaction revision; the mirror
            # reloads at a fresh revision (next item).
            self.compactions_lost += 1
            b._commit_batch()
            b.core.compact(item[1])
            b.core.cancel_behind(item[1])
            b._settle()

    def _moved(self, rev: int) -> None:
        self.applied = rev
        self.b.core.cur_rev = max(self.b.core.cur_rev, rev)
        self.b.words[L.CTL_REVISION] = rev

    def _load(self, rev: int, kvs: list[KeyValue]) -> None:
        """Start (or, after a lost compaction, start again) from etcd's state at `rev`:
        the mirror's history begins there (older reads go to etcd)."""
        b = self.b
        b._commit_batch()
        if self.loaded:
            # Watchers created while the mirror waited for its reload are behind it:
            # the revisions up to `rev` never came as events (no silent skip).
            b.core.cancel_behind(rev + 1, rev)
            b._settle()
        b.mvcc.load(rev, kvs)
        b.history.truncate(rev + 1)
        b.core.compact(rev)
        b.words[L.CTL_COMPACT_REV] = rev
        self._moved(rev)
        log.info("mirroring etcd from revision %d (%d keys)%s", rev, len(kvs),
                 "" if not self.loaded else " again, after a lost compaction")
        self.loaded = True

    # ------------------------------------------------------------ local -> etcd

    def take(self, c, req) -> bool:
        """Forward `req` if it is etcd's to answer; False: serve it locally."""
        kind = type(req)
        if kind is KvRequest:
            op = req.op
            if _writes(op):
                self._forward(c, req.req_id, ("kv", op))
                return True
            if type(op) is RangeOp and op.revision and op.revision < self.b.mvcc.compact_rev:
                self._forward(c, req.req_id, ("kv", op))  # history before the mirror
                return True
            if self.linearizable:
                self._forward(c, req.req_id, ("confirm", req))
                return True
            return False
        if kind is CompactRequest:
            self._forward(c, req.req_id, ("compact", req.revision))
            return True
        if kind is LeaseGrantRequest:
            self._forward(c, req.req_id, ("grant", req.ttl, req.lease_id, req.bound))
            return True
        if kind is LeaseRequest:
            self._forward(c, req.req_id, ("lease", req.op, req.lease_id, req.keys))
            return True
        return False

    def _forward(self, c, req_id: int, what: tuple) -> None:
        self.inflight += 1
        self.forwarded += 1
        self.up.submit((c, req_id, what), lambda call: forward_call(self.up, call, what))

    def _finish(self, token, result, error) -> None:
        if token == "probe":
            self._next_probe = time.monotonic() + COMPACTION_PROBE_S
            if error is None and result[0]:
                self._compact_local(result[0])
            return
        if token is None:  # a bound lease's keep-alive or revoke: nobody waits for it
            if error is not None:
                log.warning("bound lease call to etcd failed: %s", error)
            return
        c, req_id, what = token
        self.inflight -= 1
        if error is not None:
            self._hold(0, c, encode_error(req_id, error))
            return
        rev, resp = result
        if what[0] == "confirm":
            self._hold(rev, c, ("local", what[1]), CONFIRM_WAIT_S)
            return
        if what[0] == "kv" and not self._touches(what[1], resp):
            rev = 0  # etcd changed nothing mirrored: no revision of ours to wait for
        if what[0] == "compact":
            self._compact_local(what[1])
        if what[0] == "grant" and what[3]:
            self._bound[resp.id] = (c, resp.ttl, time.monotonic() + resp.ttl / 3)
        if what[0] == "lease" and what[1] == OP_LEASE_REVOKE:
            self._bound.pop(what[2], None)
        self._hold(rev, c, encode_reply(req_id, encode_response(resp)))

    def _hold(self, rev: int, c, data, wait: float | None = None) -> None:
        """Send `data` once the mirror applied `rev`. After `wait` (default: the upstream
        timeout) a linearizable read is asked of etcd itself, a reply is sent as it is
        (the mirror lags: logged)."""
        if rev <= self.applied:
            self._send(c, data)
            return
        wait = self.up.timeout if wait is None else wait
        heapq.heappush(self._held, (rev, next(self._seq), c, data, time.monotonic() + wait))

    def _release(self) -> bool:
        held = self._held
        sent = False
        while held and held[0][0] <= self.applied:
            c, data = heapq.heappop(held)[2:4]
            self._send(c, data)
            sent = True
        now = time.monotonic()
        late = [h for h in held if h[4] <= now]
        if late:
            self._held = [h for h in held if h[4] > now]
            heapq.heapify(self._held)
            for rev, _, c, data, _ in late:
                if type(data) is tuple:  # etcd reads it for us, linearizably
                    req = data[1]
                    self._forward(c, req.req_id, ("kv", req.op))
                else:
                    log.warning("mirror still below revision %d after %g s (at %d): "
                                "replying anyway", rev, self.up.timeout, self.applied)
                    self._send(c, data)
                    sent = True
        return sent

    def _in_mirror(self, key: bytes, end: bytes | None) -> bool:
        """Whether [key, end) meets the mirrored range."""
        lo, hi = self.up.prefix, self.up.range_end
        if not lo:
            return True
        if end is None:
            return key >= lo and (hi == b"\0" or key < hi)
        return (end == b"\0" or end > lo) and (hi == b"\0" or key < hi)

    def _touches(self, op, resp) -> bool:
        """Whether a forwarded write changed a mirrored key (then its revision will
        come through the watch; else there is nothing to wait for)."""
        if not self.up.prefix:
            return True
        t = type(op)
        if t is PutOp:
            return self._in_mirror(op.key, None)
        if t is DeleteOp:
            return self._in_mirror(op.key, op.range_end) and bool(
                self.b.mvcc._live_keys_in(op.key, op.range_end))
        if t is TxnOp:
            branch = op.success if resp.succeeded else op.failure
            return any(self._touches(o, r) for o, r in zip(branch, resp.responses))
        return False

    def _send(self, c, data) -> None:
        if type(data) is tuple:  # a linearizable read: etcd's revision is here now
            req = data[1]
            try:
                data = self.b._kv(req)
            except errors.ShmwatchError as exc:
                data = encode_error(req.req_id, exc)
        self.b._reply(c, data)

    def _compact_local(self, rev: int) -> None:
        b = self.b
        if rev > b.mvcc.compact_rev and rev <= b.mvcc.rev:
            b._commit_batch()
            b._do_compact(rev)

    # ------------------------------------------------------------ bound leases

    def _keep_alive(self, now: float) -> None:
        for lease_id, (c, ttl, due) in list(self._bound.items()):
            if now >= due:
                self._bound[lease_id] = (c, ttl, now + max(0.5, ttl / 3))
                self.up.submit(None, lambda call, i=lease_id: keep_alive_once(self.up, i))

    def client_gone(self, c) -> None:
        """A client left: revoke its bound leases upstream now."""
        for lease_id, (owner, _ttl, _due) in list(self._bound.items()):
            if owner is c:
                del self._bound[lease_id]
                self.up.submit(None, lambda call, i=lease_id: forward_call(
                    self.up, call, ("lease", OP_LEASE_REVOKE, i, False)))

    def figures(self) -> dict:
        """What status/top show of the upstream."""
        up = self.up
        return {"endpoints": [f"http://{e}" for e in up.endpoints], "connected":
                f"http://{up.connected}" if up.connected else None,
                "mirror_revision": self.b.mvcc.rev, "etcd_revision": max(up.etcd_rev, self.b.mvcc.rev),
                "lag": max(0, up.etcd_rev - self.b.mvcc.rev), "failovers": up.failovers,
                "forwarded": self.forwarded, "inflight": self.inflight,
                "held_replies": len(self._held), "compactions_lost": self.compactions_lost}


    def close(self) -> None:
        """Stop talking to etcd (the broker is closing)."""
        self.up.close()


def start_mirror(broker) -> Mirror:
    """Connect broker `broker` to its etcd cluster (cfg.upstream) and load the mirrored
    range; returns once the mirror holds etcd's state at one revision. Raises
    BrokerStartError if no endpoint answers within the upstream timeout."""
    from .errors import BrokerStartError
    from .upstream import Upstream

    cfg = broker.cfg
    up = Upstream(cfg.upstream, cfg.upstream_prefix.encode(), cfg.upstream_timeout,
                  broker.bell.ring, replay_max=REPLAY_MAX)
    mirror = Mirror(broker, up, cfg.consistency)
    up.start()
    wait = cfg.upstream_timeout * 2
    # Ready once loaded and (everything mirrored) the replayed history is applied: with a
    # prefix, etcd's newest revision may not touch it, so only the load is awaited.
    while not mirror.loaded or (not up.prefix and mirror.applied < mirror.head):
        try:
            mirror._apply(up.items.get(timeout=wait))  # each item: more time
        except Exception as exc:  # queue.Empty: no endpoint answered in time
            up.close()
            raise BrokerStartError(
                f"shmwatch: no etcd endpoint of --upstream {cfg.upstream} answered within "
                f"{wait:g} s") from exc
    return mirror
