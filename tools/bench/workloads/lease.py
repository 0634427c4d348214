"""LEASE: how soon a lease's keys go, and a lock to its next holder, shmwatch beside etcd.

  L1  expiry lag: N leases of the minimum TTL (1 s: the broker with `min_lease_ttl=1`;
      the bench's etcd, whose election timeout of 100 ms makes 1 s its minimum), granted
      one after another over a spread of time (so etcd's 500 ms expiry check is met at
      every phase), each with one key; a watch of their prefix stamps each DELETE as it
      arrives. The lag is that arrival minus the lease's deadline (the grant's request
      midpoint + TTL). On an idle server, and under a background write load (one process
      writing synchronously to other keys as fast as it can).
  L2  release lag after SIGKILL: holder processes each hold a lease with one key, and
      are SIGKILLed one by one; the lag is the DELETE's arrival minus the kill. shmwatch:
      a lease bound to the holder's process (`lease_grant(0, bound=True)`). etcd has no
      bound lease: its holder keeps a lease of the minimum TTL alive as clientv3 does
      (a keep-alive every TTL/3), so the key goes once the TTL runs out after the kill.
  L3  lock hand-over: two processes take turns holding one lock. The holder waits until
      the other has called acquire and its key is in the lock's queue (and SETTLE_S
      more, so it is blocked in it, its watch made and synced), stamps and calls
      release; the figure is the waiter's stamp right after its acquire returns minus
      that release stamp (time.monotonic_ns: CLOCK_MONOTONIC, one clock for every
      process), over N hand-overs. shmwatch: `clientlib.concurrency.Lock` (its default
      bound session: a bound lease per acquisition, revoked on release); etcd: its lock
      service through the JSON gateway (`/v3/lock/lock` with a lease of each process
      from `/v3/lease/grant`, `/v3/lock/unlock` with the lock's key), whose waiter is
      etcd's own Mutex watching its predecessor's key in the server.
  L3K hand-over after SIGKILL: N locks, each held by a process with a waiter process
      blocked behind it; the holders are SIGKILLed one by one; the figure is each
      waiter's acquire return minus its holder's kill. shmwatch: the default bound
      session, released when the broker sees the holder die; etcd: the holder's lock
      lease is of the minimum TTL kept alive every TTL/3, so the lock passes once the
      TTL runs out after the kill.

Figures per trial: p50, p99 and max of the N lags (ms), and N.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import random
import signal
import threading
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .. import log
from ..procs import CTX, REG, Mailbox
from ..servers import HOST
from ..transports.etcd_watch import EtcdReader, prefix_end
from .base import Workload

if TYPE_CHECKING:
    from ..session import Session

TTL = 1  # seconds: the minimum both servers grant here
TRANSPORTS = ("shmwatch", "etcd")
KILL_GAP_S = (0.1, 0.2)  # between two SIGKILLs in L2
WAIT_EXTRA_S = 3.0  # how long past the last deadline (or kill) a DELETE may take
READY_S = 30.0
POLL_S = 0.05
# L3: from the waiter's key in the lock's queue to the holder's release: long enough for
# etcd's waiter watch (begun at an older revision: unsynced) to be synced by its 100 ms
# resync loop; at 50 ms etcd's hand-over measured ~45 ms instead of ~5 (ETCD-NOTES §7)
SETTLE_S = 0.2
LOCK_LEASE_S = 60  # L3: an etcd locker's lease, longer than any trial (revoked at the end)
L1_IDLE, L1_LOAD, L2 = "L1 expiry, idle", "L1 expiry, under writes", "L2 release after SIGKILL"
L3, L3K = "L3 lock hand-over", "L3 hand-over after SIGKILL"
VARIANTS = (L1_IDLE, L1_LOAD, L2, L3, L3K)


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


# ------------------------------------------------------------------ the two servers


class ShmSide:
    """A fresh broker (min_lease_ttl=1) and a client of it."""

    name = "shmwatch"

    def __init__(self, s: Session):
        import broker
        import clientlib

        self.b = broker.spawn(min_lease_ttl=TTL)
        REG.add_broker(self.b)
        self.env = {"name": self.b.name}
        self.c = clientlib.connect(self.b.name, timeout=READY_S)

    def grant_put(self, key: bytes) -> float:
        """Grant a TTL lease, put `key` on it; the lease's deadline (monotonic)."""
        t0 = time.monotonic()
        lease = self.c.lease_grant(TTL)
        t1 = time.monotonic()
        self.c.put(key, b"x", lease=lease.id)
        return (t0 + t1) / 2 + lease.ttl

    def deletes(self, prefix: bytes, out: dict, stop: threading.Event) -> None:
        """Stamp every DELETE under `prefix` into out[key] as it arrives."""
        import clientlib

        w = self.c.watch(prefix, prefix=True)
        while not stop.is_set():
            try:
                r = w.get(timeout=POLL_S)
            except clientlib.Timeout:
                continue
            now = time.monotonic()
            for e in r.events:
                if e.type == "DELETE":
                    out.setdefault(e.kv.key, now)

    def close(self) -> None:
        self.c.close()
        REG.stop_broker(self.b)


class EtcdSide:
    """The run's etcd, through its JSON gateway."""

    name = "etcd"

    def __init__(self, s: Session):
        self.port = s.transport("etcd").server.port
        self.env = {"port": self.port}
        self.conn = http.client.HTTPConnection(HOST, self.port, timeout=READY_S)

    def grant_put(self, key: bytes) -> float:
        t0 = time.monotonic()
        g = _post(self.conn, "/v3/lease/grant", {"TTL": TTL})
        t1 = time.monotonic()
        _post(self.conn, "/v3/kv/put", {"key": _b64(key), "value": _b64(b"x"), "lease": g["ID"]})
        return (t0 + t1) / 2 + int(g["TTL"])

    def deletes(self, prefix: bytes, out: dict, stop: threading.Event) -> None:
        r = EtcdReader(self.env, SimpleNamespace(prefix=prefix), 0)
        try:
            while not stop.is_set():
                objs = r._read(POLL_S)
                now = time.monotonic()
                for o in objs:
                    for e in (o.get("result") or {}).get("events") or ():
                        if e.get("type") == "DELETE":
                            out.setdefault(base64.b64decode(e["kv"]["key"]), now)
        finally:
            r.close()

    def close(self) -> None:
        self.conn.close()


def _post(conn: http.client.HTTPConnection, path: str, body: dict) -> dict:
    conn.request("POST", path, body=json.dumps(body).encode(),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    if resp.status != 200:
        raise RuntimeError(f"etcd {path}: HTTP {resp.status}: {data[:200]!r}")
    return json.loads(data)


SIDES = {"shmwatch": ShmSide, "etcd": EtcdSide}


# ------------------------------------------------------------------ child processes


def _load_writer(tell, tn: str, env: dict, stop) -> None:
    """Synchronous puts to keys nobody watches, as fast as they go, until `stop`."""
    tell("ready")
    n = 0
    if tn == "shmwatch":
        import clientlib

        with clientlib.connect(env["name"], timeout=READY_S) as c:
            while not stop.is_set():
                c.put(b"load/%d" % (n % 100), b"v" * 64)
                n += 1
    else:
        conn = http.client.HTTPConnection(HOST, env["port"], timeout=READY_S)
        while not stop.is_set():
            _post(conn, "/v3/kv/put", {"key": _b64(b"load/%d" % (n % 100)), "value": _b64(b"v" * 64)})
            n += 1
    tell("done", n)


def _holder(tell, tn: str, env: dict, key: bytes) -> None:
    """Hold a lease with `key` until SIGKILLed: bound to this process (shmwatch), or of
    the minimum TTL kept alive every TTL/3 as clientv3 does (etcd)."""
    deadline = time.monotonic() + READY_S * 4  # never outlive a run gone wrong
    if tn == "shmwatch":
        import clientlib

        c = clientlib.connect(env["name"], timeout=READY_S)
        lease = c.lease_grant(0, bound=True)
        c.put(key, b"x", lease=lease.id)
        tell("ready")
        while time.monotonic() < deadline:
            time.sleep(0.5)
        return
    conn = http.client.HTTPConnection(HOST, env["port"], timeout=READY_S)
    g = _post(conn, "/v3/lease/grant", {"TTL": TTL})
    _post(conn, "/v3/kv/put", {"key": _b64(key), "value": _b64(b"x"), "lease": g["ID"]})
    tell("ready")
    while time.monotonic() < deadline:
        time.sleep(TTL / 3)
        _post(conn, "/v3/lease/keepalive", {"ID": g["ID"]})


class ShmLocker:
    """One process's `clientlib.concurrency.Lock` (its default bound session)."""

    def __init__(self, env: dict, name: bytes):
        import clientlib
        from clientlib.concurrency import Lock

        self.c = clientlib.connect(env["name"], timeout=READY_S)
        self.lock = Lock(self.c, name)
        self.prefix = name + b"/"

    def queued(self) -> int:
        """How many keys the lock's queue holds (the holder's and the waiters')."""
        return self.c.get(self.prefix, prefix=True, count_only=True).count

    def acquire(self) -> None:
        self.lock.acquire(timeout=READY_S)

    def release(self) -> None:
        self.lock.release()

    def keep_alive(self) -> None:
        """A bound session needs none."""

    def close(self) -> None:
        self.c.close()


class EtcdLocker:
    """One process's lock through etcd's gateway: `/v3/lock/lock` with this process's
    lease (granted for `ttl` s), `/v3/lock/unlock` with the key it answered."""

    def __init__(self, env: dict, name: bytes, ttl: int = LOCK_LEASE_S):
        self.conn = http.client.HTTPConnection(HOST, env["port"], timeout=READY_S)
        self.name = _b64(name)
        self.range = {"key": _b64(name + b"/"), "range_end": _b64(prefix_end(name + b"/")),
                      "count_only": True}
        self.lease = _post(self.conn, "/v3/lease/grant", {"TTL": ttl})["ID"]
        self.key = ""

    def queued(self) -> int:
        return int(_post(self.conn, "/v3/kv/range", self.range).get("count", 0))

    def acquire(self) -> None:
        self.key = _post(self.conn, "/v3/lock/lock", {"name": self.name, "lease": self.lease})["key"]

    def release(self) -> None:
        _post(self.conn, "/v3/lock/unlock", {"key": self.key})

    def keep_alive(self) -> None:
        _post(self.conn, "/v3/lease/keepalive", {"ID": self.lease})

    def close(self) -> None:
        try:
            _post(self.conn, "/v3/lease/revoke", {"ID": self.lease})
        finally:
            self.conn.close()


LOCKERS = {"shmwatch": ShmLocker, "etcd": EtcdLocker}


def _until(cond, what: str, nap: float = 0.0002) -> None:
    """Poll cond() every `nap` s until it holds; READY_S at most."""
    deadline = time.monotonic() + READY_S
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {READY_S:g} s")
        time.sleep(nap)


def _lock_turns(tell, tn: str, env: dict, name: bytes, role: int, total: int, done, waiting) -> None:
    """L3: take acquisitions role, role+2, ... of `total`, in turn with the other process.
    `done` counts the acquisitions so far, `waiting` is the number of the acquisition
    whose acquire was last called (shared Values). Tells ("stamps", [(k, acquired_ns,
    release_ns)])."""
    lk = LOCKERS[tn](env, name)
    stamps = []
    try:
        for k in range(role, total, 2):
            _until(lambda k=k: done.value >= k, f"acquisition {k - 1}")
            waiting.value = k
            lk.acquire()
            acquired = time.monotonic_ns()
            done.value = k + 1
            if k + 1 < total:
                _until(lambda k=k: waiting.value >= k + 1, f"a waiter for acquisition {k + 1}")
                _until(lambda: lk.queued() >= 2, "the waiter's key", nap=0.005)
                time.sleep(SETTLE_S)  # its watch of our key is made by now: it is blocked
            release = time.monotonic_ns()
            lk.release()
            stamps.append((k, acquired, release))
    finally:
        lk.close()
    tell("stamps", stamps)


def _lock_holder(tell, tn: str, env: dict, name: bytes) -> None:
    """L3K: hold the lock until SIGKILLed (etcd: on a lease of the minimum TTL, kept
    alive every TTL/3)."""
    deadline = time.monotonic() + READY_S * 4  # never outlive a run gone wrong
    lk = ShmLocker(env, name) if tn == "shmwatch" else EtcdLocker(env, name, TTL)
    lk.acquire()
    tell("held")
    while time.monotonic() < deadline:
        time.sleep(TTL / 3)
        lk.keep_alive()


def _lock_waiter(tell, tn: str, env: dict, name: bytes) -> None:
    """L3K: block in acquire behind the holder; tell ("acquired", its return in ns)."""
    lk = LOCKERS[tn](env, name)
    try:
        tell("waiting")
        lk.acquire()
        tell("acquired", time.monotonic_ns())
        lk.release()
    finally:
        lk.close()


# ------------------------------------------------------------------ measurements


class Deletes:
    """A thread stamping the DELETEs under a prefix (side.deletes) as they arrive."""

    def __init__(self, side, prefix: bytes):
        self.seen: dict[bytes, float] = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.t = threading.Thread(target=self._run, args=(side, prefix), daemon=True)
        self.t.start()
        time.sleep(0.2)  # the watch is created before anything it must see

    def _run(self, side, prefix: bytes) -> None:
        try:
            side.deletes(prefix, self.seen, self.stop)
        except BaseException as exc:  # noqa: BLE001 - reported by wait()
            self.error = exc

    def wait(self, keys, until: float) -> None:
        while not all(k in self.seen for k in keys) and time.monotonic() < until:
            if self.error is not None:
                raise RuntimeError(f"the watch failed: {self.error!r}")
            time.sleep(POLL_S / 5)
        self.stop.set()
        self.t.join(5)


def expiry_lags(side, n: int, spread: float, rnd: random.Random) -> list[float]:
    """L1: the lags (s) of n leases granted over `spread` seconds."""
    prefix = b"l1/%d/" % rnd.randrange(1 << 30)
    d = Deletes(side, prefix)
    deadlines = {}
    start = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, start + (i + rnd.random()) * spread / n - time.monotonic()))
        key = prefix + b"%04d" % i
        deadlines[key] = side.grant_put(key)
    d.wait(list(deadlines), max(deadlines.values()) + WAIT_EXTRA_S)
    missing = [k for k in deadlines if k not in d.seen]
    if missing:
        raise RuntimeError(f"{len(missing)} of {n} expired leases' keys never deleted")
    return [d.seen[k] - deadlines[k] for k in deadlines]


def release_lags(side, holders: int, rnd: random.Random) -> list[float]:
    """L2: the lags (s) from each holder's SIGKILL to its key's DELETE."""
    prefix = b"l2/%d/" % rnd.randrange(1 << 30)
    box = Mailbox(f"LEASE L2 {side.name}")
    keys = [prefix + b"%03d" % i for i in range(holders)]
    # forked before the watch thread starts (a fork copies no other thread's locks)
    procs = [REG.spawn(box, "holder", i, _holder, side.name, side.env, k) for i, k in enumerate(keys)]
    try:
        box.expect("ready", "holder", holders, READY_S)
        d = Deletes(side, prefix)
        time.sleep(0.3)  # etcd: a keep-alive or two; either: settled
        killed = {}
        for k, p in zip(keys, procs):
            time.sleep(rnd.uniform(*KILL_GAP_S))
            os.kill(p.pid, signal.SIGKILL)
            killed[k] = time.monotonic()
        d.wait(keys, max(killed.values()) + TTL + WAIT_EXTRA_S)
    finally:
        REG.stop_children(procs, grace=0.0)
        box.close()
    missing = [k for k in keys if k not in d.seen]
    if missing:
        raise RuntimeError(f"{len(missing)} of {holders} killed holders' keys never deleted")
    return [d.seen[k] - killed[k] for k in keys]


def handover_lags(side, n: int, rnd: random.Random) -> list[float]:
    """L3: the lags (s) of n hand-overs of one lock between two processes taking turns."""
    name = b"l3/%d" % rnd.randrange(1 << 30)
    box = Mailbox(f"LEASE L3 {side.name}")
    done, waiting = CTX.RawValue("q", 0), CTX.RawValue("q", -1)  # one writer at a time
    procs = [REG.spawn(box, "locker", r, _lock_turns, side.name, side.env, name, r, n + 1,
                       done, waiting) for r in (0, 1)]
    try:
        got = box.expect("stamps", "locker", 2, READY_S + n * (SETTLE_S + 2 * TTL))
    finally:
        REG.stop_children(procs)
        box.close()
    turns = sorted(t for stamps in got for t in stamps)
    if [k for k, _, _ in turns] != list(range(n + 1)):
        raise RuntimeError(f"L3: acquisitions {[k for k, _, _ in turns]}, not 0..{n}")
    lags = [(b[1] - a[2]) / 1e9 for a, b in zip(turns, turns[1:])]
    if min(lags) <= 0:
        raise RuntimeError(f"L3: a lock acquired before its holder released it: {lags}")
    return lags


def killed_handover_lags(side, n: int, rnd: random.Random) -> list[float]:
    """L3K: the lags (s) from each lock holder's SIGKILL to its waiter's acquire."""
    names = [b"l3k/%d/%03d" % (rnd.randrange(1 << 30), i) for i in range(n)]
    # two mailboxes: the waiters' must not take a killed holder for a failed child
    hbox, wbox = Mailbox(f"LEASE L3K {side.name} holders"), Mailbox(f"LEASE L3K {side.name}")
    holders = [REG.spawn(hbox, "holder", i, _lock_holder, side.name, side.env, k)
               for i, k in enumerate(names)]
    waiters = []
    try:
        hbox.expect("held", "holder", n, READY_S)
        waiters = [REG.spawn(wbox, "waiter", i, _lock_waiter, side.name, side.env, k)
                   for i, k in enumerate(names)]
        wbox.expect("waiting", "waiter", n, READY_S)
        time.sleep(0.3 + SETTLE_S)  # etcd: a keep-alive or two; every waiter blocked
        killed = []
        for p in holders:
            time.sleep(rnd.uniform(*KILL_GAP_S))
            os.kill(p.pid, signal.SIGKILL)
            killed.append(time.monotonic_ns())
        got = wbox.expect("acquired", "waiter", n, TTL + WAIT_EXTRA_S + READY_S)
    finally:
        REG.stop_children(holders, grace=0.0)
        REG.stop_children(waiters)
        hbox.close()
        wbox.close()
    return [(a - k) / 1e9 for a, k in zip(got, killed)]


def figures(lags: list[float]) -> dict:
    ms = sorted(x * 1000 for x in lags)
    return {"p50_ms": ms[len(ms) // 2], "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
            "max_ms": ms[-1], "n": len(ms)}


class Leases(Workload):
    name = "LEASE"

    def run(self, s: Session) -> None:
        rnd = random.Random(s.rep)
        for tn in s.transports():
            if tn in TRANSPORTS:
                s.guarded(f"LEASE {tn}", self._one, s, tn, rnd)

    def _one(self, s: Session, tn: str, rnd: random.Random) -> None:
        P = s.prof
        side = SIDES[tn](s)
        try:
            self._add(s, L1_IDLE, tn, expiry_lags(side, P.lease_n, P.lease_spread_s, rnd))
            stop = CTX.Event()
            box = Mailbox(f"LEASE load {tn}")
            (p,) = [REG.spawn(box, "writer", 0, _load_writer, tn, side.env, stop)]
            try:
                box.expect("ready", "writer", 1, READY_S)
                lags = expiry_lags(side, P.lease_n, P.lease_spread_s, rnd)
                stop.set()
                (writes,) = box.expect("done", "writer", 1, READY_S)
            finally:
                stop.set()
                REG.stop_children([p])
                box.close()
            self._add(s, L1_LOAD, tn, lags, f"; {writes:,} background writes")
            self._add(s, L2, tn, release_lags(side, P.lease_holders, rnd))
            self._add(s, L3, tn, handover_lags(side, P.lease_holders, rnd))
            self._add(s, L3K, tn, killed_handover_lags(side, P.lease_holders, rnd))
        finally:
            side.close()

    def _add(self, s: Session, variant: str, tn: str, lags: list[float], extra: str = "") -> None:
        f = figures(lags)
        s.add(self.name, variant, tn, f)
        log(f"  LEASE {variant:26} {tn:9} p50 {f['p50_ms']:7.1f} ms  p99 {f['p99_ms']:7.1f} ms  "
            f"max {f['max_ms']:7.1f} ms (n={f['n']}){extra}")
