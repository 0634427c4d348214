"""The worker-registry scenario of tools/stress (`--scenario registry`): worker processes
register under a prefix with leases bound to their process, chaos SIGKILLs them, and a
watcher proves that every killed worker's key went and every live one's stayed.

Each worker connects, takes a bound lease (TTL 0: exactly as long as its process lives;
every other worker a bound lease with a TTL and clientlib's keep-alive) and puts
`registry/workers/<name>` with it. A watch of the prefix (prev_kv) in this process,
read by its own thread, stamps every response as it arrives. Every 0.3-0.7 s a random
registered worker is SIGKILLed and a new one takes its place.

The verdict, from the events alone: every registration's PUT was seen (at the revision
the worker was answered, with its lease); every killed worker's key was deleted (its
DELETE seen, its prev_kv naming the worker's lease) within --release-bound of the kill,
and its lease is gone; every live worker's key is still there with its lease and was
never deleted; after the live workers close, their keys go too. PASSED needs at least
one kill and every registration verified; the summary says how many of each.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import random
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field

import broker
import clientlib

from .spec import CONNECT_TIMEOUT_S, START_TIMEOUT_S
from .start import EMBEDDED, SEED_RANGE

PREFIX = b"registry/workers/"
KILL_EVERY_S = (0.3, 0.7)  # a SIGKILL every so often, drawn between these
FIRST_KILL_S = 0.5
QUIET_END_S = 0.3  # no kill this close to the end
POLL_S = 0.05
REAP_S = 10.0
WORKER_LIFE_S = 600.0
WORKER_TTL_S = 5  # the TTL of the workers that hold a bound lease with a TTL


def registry_worker(broker_name: str, name: str, ttl: int, report) -> None:
    """One worker: a bound lease, its key under PREFIX, then wait until SIGTERM (a
    clean close: the client goes, and its bound lease with it) or SIGKILL. Sends
    (pid, lease id, revision of its put) on its own pipe `report` (nothing shared with
    the other workers that a kill could leave locked)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with clientlib.connect(broker_name, timeout=CONNECT_TIMEOUT_S) as c:
        lease = c.lease(ttl, bound=True)
        r = c.put(PREFIX + name.encode(), b"pid=%d" % os.getpid(), lease=lease)
        report.send((os.getpid(), lease.id, r.revision))
        report.close()
        deadline = time.monotonic() + WORKER_LIFE_S
        while time.monotonic() < deadline:  # a worker never outlives a run gone wrong
            time.sleep(POLL_S * 4)


@dataclass
class Member:
    """One worker process and what it registered."""

    name: str
    ttl: int
    proc: mp.process.BaseProcess
    report: object  # the read end of its pipe
    pid: int = 0
    lease: int = 0
    revision: int = 0
    killed_at: float = 0.0  # monotonic time of its SIGKILL (0: not killed)

    @property
    def key(self) -> bytes:
        return PREFIX + self.name.encode()


@dataclass
class Seen:
    """What the prefix watch delivered: per key its events as (arrival time, type,
    mod_revision, lease of the kv or of prev_kv for a DELETE)."""

    events: dict[bytes, list[tuple]] = field(default_factory=dict)
    problem: str | None = None


class Watcher(threading.Thread):
    """The prefix watch, read by its own thread; every event stamped on arrival."""

    def __init__(self, client: clientlib.Client, start_revision: int):
        super().__init__(name="registry-watch", daemon=True)
        self.w = client.watch(PREFIX, prefix=True, prev_kv=True, start_revision=start_revision)
        self.seen = Seen()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                r = self.w.get(timeout=POLL_S)
            except clientlib.Timeout:
                continue
            except clientlib.ShmwatchError as exc:
                self.seen.problem = f"the watch ended: {exc!r}"
                return
            now = time.monotonic()
            for e in r.events:
                lease = e.kv.lease if e.type == "PUT" else (e.prev_kv.lease if e.prev_kv else -1)
                self.seen.events.setdefault(e.kv.key, []).append(
                    (now, e.type, e.kv.mod_revision, lease))

    def wait_for(self, pred, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not pred():
            if time.monotonic() > deadline:
                return False
            time.sleep(POLL_S / 5)
        return True


class Registry:
    """One run of the scenario: the broker, the workers, the kills, the checks."""

    def __init__(self, a):
        self.a = a
        self.seed = a.seed if a.seed is not None else random.SystemRandom().randrange(SEED_RANGE)
        self.rnd = random.Random(self.seed)
        self.ctx = mp.get_context("spawn")
        self.members: list[Member] = []
        self.handle = None
        self.name = a.name
        self.client: clientlib.Client | None = None
        self.watcher: Watcher | None = None

    # ------------------------------------------------------------ the run

    def run(self) -> dict:
        try:
            self._start()
            self._chaos()
            return self._verify()
        finally:
            self._close()

    def _start(self) -> None:
        if not self.name:
            self.handle = broker.spawn(**EMBEDDED, log_bytes=self.a.log_bytes,
                                       watch_ring_bytes=self.a.watch_ring_bytes)
            self.name = self.handle.name
        self.client = clientlib.connect(self.name, timeout=CONNECT_TIMEOUT_S)
        base = self.client.get(PREFIX, prefix=True, count_only=True).revision
        self.watcher = Watcher(self.client, base + 1)
        self.watcher.start()
        for _ in range(self.a.registry_workers):
            self._spawn()
        self._collect(START_TIMEOUT_S)

    def _spawn(self) -> Member:
        n = len(self.members) + 1
        ttl = 0 if n % 2 else WORKER_TTL_S
        name = f"worker-{n}"
        r, w = self.ctx.Pipe(duplex=False)
        p = self.ctx.Process(target=registry_worker, name=name, daemon=True,
                             args=(self.name, name, ttl, w))
        p.start()
        w.close()
        m = Member(name, ttl, p, r)
        self.members.append(m)
        return m

    def _collect(self, timeout: float) -> None:
        """Wait until every worker started has reported its registration."""
        deadline = time.monotonic() + timeout
        while waiting := {m.report: m for m in self.members if not m.lease}:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{len(waiting)} worker(s) did not register in time")
            for conn in mp_connection.wait(list(waiting), timeout=min(left, 1.0)):
                m = waiting[conn]
                try:
                    m.pid, m.lease, m.revision = conn.recv()
                except EOFError:
                    raise RuntimeError(f"{m.name} ended before registering "
                                       f"(exit code {m.proc.exitcode})") from None
                conn.close()

    def _chaos(self) -> None:
        t0 = time.monotonic()
        stop_at = t0 + self.a.duration
        next_kill = t0 + min(FIRST_KILL_S, self.a.duration / 4)
        while (now := time.monotonic()) < stop_at:
            if next_kill <= now < stop_at - QUIET_END_S:
                self._kill_one()
                next_kill = now + self.rnd.uniform(*KILL_EVERY_S)
            time.sleep(POLL_S)
        self._collect(START_TIMEOUT_S)

    def _kill_one(self) -> None:
        alive = [m for m in self.members if m.lease and not m.killed_at]
        if not alive:
            return
        m = self.rnd.choice(alive)
        os.kill(m.pid, signal.SIGKILL)
        m.killed_at = time.monotonic()
        m.proc.join(REAP_S)
        self._spawn()

    # ------------------------------------------------------------ the checks

    def _verify(self) -> dict:
        bound = self.a.release_bound
        seen = self.watcher.seen
        killed = [m for m in self.members if m.killed_at]
        live = [m for m in self.members if not m.killed_at]
        self.watcher.wait_for(lambda: all(self._delete_of(m) for m in killed), bound + 1.0)
        problems: list[str] = []
        registered = sum(self._check_put(m, problems) for m in self.members)
        lags = [lag for m in killed if (lag := self._check_killed(m, bound, problems)) is not None]
        final = {kv.key: kv for kv in self.client.get(PREFIX, prefix=True).kvs}
        kept = sum(self._check_live(m, final, problems) for m in live)
        closed = self._close_live(live, bound, problems)
        if seen.problem:
            problems.append(seen.problem)
        if not killed:
            problems.append("no worker was killed: nothing about release was verified")
        if registered < len(self.members):
            problems.append(f"only {registered} of {len(self.members)} registrations verified")
        return {
            "scenario": "registry", "broker": self.name, "seed": self.seed,
            "duration_s": self.a.duration, "workers": self.a.registry_workers,
            "registrations": len(self.members), "registrations_verified": registered,
            "kills": len(killed), "kills_verified": len(lags), "live": len(live),
            "live_verified": kept, "closed_verified": closed, "release_bound_s": bound,
            "release_lag_ms": _figures(lags), "problems": problems, "passed": not problems,
        }

    def _events(self, m: Member) -> list[tuple]:
        return self.watcher.seen.events.get(m.key, [])

    def _delete_of(self, m: Member) -> tuple | None:
        return next((e for e in self._events(m) if e[1] == "DELETE" and e[2] > m.revision), None)

    def _check_put(self, m: Member, problems: list) -> bool:
        if any(e[1] == "PUT" and e[2] == m.revision and e[3] == m.lease for e in self._events(m)):
            return True
        problems.append(f"{m.name}: its registration (PUT at revision {m.revision} with lease "
                        f"{m.lease:x}) was not seen")
        return False

    def _check_killed(self, m: Member, bound: float, problems: list) -> float | None:
        """The release lag of killed `m` (seconds), or None with the problem said."""
        d = self._delete_of(m)
        if d is None:
            problems.append(f"{m.name}: killed, but its key was never deleted")
            return None
        if d[3] != m.lease:
            problems.append(f"{m.name}: deleted with prev_kv lease {d[3]:x}, not {m.lease:x}")
            return None
        lag = d[0] - m.killed_at
        if lag > bound:
            problems.append(f"{m.name}: key deleted {lag * 1000:.0f} ms after the kill "
                            f"(bound {bound * 1000:.0f} ms)")
            return None
        if self.client.lease_time_to_live(m.lease, timeout=5).ttl != -1:
            problems.append(f"{m.name}: killed, but its lease {m.lease:x} still exists")
            return None
        return lag

    def _check_live(self, m: Member, final: dict, problems: list) -> bool:
        kv = final.get(m.key)
        if kv is None or kv.lease != m.lease:
            where = "gone" if kv is None else f"on lease {kv.lease:x}"
            problems.append(f"{m.name}: alive, but its key is {where}")
            return False
        if any(e[1] == "DELETE" for e in self._events(m)):
            problems.append(f"{m.name}: alive, but its key was deleted during the run")
            return False
        return True

    def _close_live(self, live: list[Member], bound: float, problems: list) -> int:
        """Tell the live workers to stop (SIGTERM: their clients close): their keys go too."""
        for m in live:
            m.proc.terminate()
        for m in live:
            m.proc.join(REAP_S)
        self.watcher.wait_for(lambda: all(self._delete_of(m) for m in live), bound + 1.0)
        gone = [m for m in live if self._delete_of(m)]
        for m in live:
            if not self._delete_of(m):
                problems.append(f"{m.name}: closed, but its key was not deleted")
        return len(gone)

    def _close(self) -> None:
        for m in self.members:
            if m.proc.is_alive():
                m.proc.kill()
            m.proc.join(REAP_S)
        if self.watcher is not None:
            self.watcher.stopping.set()
            self.watcher.join(5)
        if self.client is not None:
            self.client.close()
        if self.handle is not None:
            self.handle.stop()


def _figures(lags: list[float]) -> dict:
    if not lags:
        return {}
    ms = sorted(x * 1000 for x in lags)
    return {"n": len(ms), "p50": round(statistics.median(ms), 1),
            "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1), "max": round(ms[-1], 1)}


def print_registry(s: dict) -> None:
    """The scenario's summary and verdict, as text."""
    lag = s["release_lag_ms"]
    print(f"shmwatch stress --scenario registry on broker {s['broker']} (seed {s['seed']})")
    print(f"  registrations: {s['registrations']} ({s['workers']} at start), "
          f"verified {s['registrations_verified']}")
    print(f"  killed: {s['kills']}, released within {s['release_bound_s'] * 1000:.0f} ms: "
          f"{s['kills_verified']}" + (f" (lag p50 {lag['p50']} ms, p99 {lag['p99']} ms, "
                                      f"max {lag['max']} ms)" if lag else ""))
    print(f"  live at the end: {s['live']}, key kept {s['live_verified']}, "
          f"released on close {s['closed_verified']}")
    for p in s["problems"]:
        print(f"  - {p}")
    if s["passed"]:
        print(f"PASSED: {s['kills_verified']} killed workers' keys deleted within "
              f"{s['release_bound_s'] * 1000:.0f} ms of the SIGKILL, {s['live_verified']} live "
              f"workers' keys kept, {s['registrations_verified']} registrations seen. "
              f"Replay the choices with --seed {s['seed']}.")
    else:
        print(f"FAILED (seed {s['seed']})")
