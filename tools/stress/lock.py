"""The lock scenario (`tools/stress --scenario lock`): locker processes contend for one
`clientlib.concurrency.Lock` (each with a bound session), holding it a few milliseconds
at a time; with --chaos the current holder (sometimes a waiter) is SIGKILLed every so
often and replaced. Each locker records every acquisition and release with revisions
(records.py); a watch of the lock's prefix from the start gives the history, and
lockcheck.py proves the intervals never overlap and every killed process's key vanished.
PASSED needs at least --min-acquisitions verified (and, with --chaos, a holder killed
while holding): it never passes on nothing."""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import asdict, dataclass

import broker
import clientlib
from clientlib.concurrency import Lock, Session

from .records import read_records, write_record
from .spec import CONNECT_TIMEOUT_S, START_TIMEOUT_S
from .start import EMBEDDED, SEED_RANGE
from .workers import _arrive

LOCK_NAME = "stress-lock"
HOLD_S = (0.002, 0.02)  # how long a locker holds the lock, drawn between these
PAUSE_S = (0.0, 0.005)  # between a release and the next acquire
ACQUIRE_SLICE_S = 2.0  # a locker's acquire timeout: it looks at the clock this often
CHAOS_EVERY_S = (0.3, 0.7)
WAITER_KILL_EVERY = 4  # one kill in four is of a waiter, the others of the holder
TICK_S = 0.02
REAP_S = 10.0
END_WAIT_S = 30.0  # lockers finish their cycle and exit within this after the end


def locker_main(name: str, path: str, seed: int, sync: tuple) -> None:
    """Contend for the lock until the run ends; record ["key", key] once, then
    ["acq", n, key, create_rev, acq_rev] when acquired and ["rel", n, rel_rev] when
    released, each before going on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    with open(path, "wb", buffering=0) as out, \
            clientlib.connect(name, timeout=CONNECT_TIMEOUT_S) as c:
        lock = Lock(c, LOCK_NAME, session=Session(c))
        write_record(out, ["key", LOCK_NAME.encode() + b"/" + f"{lock.session.lease_id:x}".encode()])
        _, stop_at = _arrive(*sync)
        n = 0
        while time.monotonic() < stop_at:
            try:
                rev = lock.acquire(timeout=ACQUIRE_SLICE_S)
            except clientlib.RecipeTimeout:
                continue
            write_record(out, ["acq", n, lock.key, lock.create_revision, rev, time.monotonic()])
            time.sleep(rnd.uniform(*HOLD_S))
            write_record(out, ["rel", n, lock.release()])
            n += 1
            time.sleep(rnd.uniform(*PAUSE_S))


@dataclass
class Locker:
    name: str
    proc: mp.process.BaseProcess
    path: str
    killed: bool = False
    killed_at: float = 0.0  # time.monotonic() of the SIGKILL
    key: bytes | None = None  # its lock key (its session's), once read from its records

    def lock_key(self) -> bytes | None:
        if self.key is None:
            recs = read_records(self.path)
            self.key = recs[0][1] if recs else None
        return self.key


class LockRun:
    """One run of the scenario: its broker, lockers, chaos and the history."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.seed = a.seed if a.seed is not None else random.SystemRandom().randrange(SEED_RANGE)
        self.rnd = random.Random(self.seed)
        self.tmp = tempfile.mkdtemp(prefix="shmwatch-stress-lock-")
        self.ctx = mp.get_context("spawn")
        self.sync = (self.ctx.Value("i", 0), self.ctx.Event(), self.ctx.Value("d", 0.0),
                     self.ctx.Value("d", 0.0))
        self.lockers: list[Locker] = []
        self.kills = 0
        self.handle = None
        self.name = a.name
        self.client = None
        self.watch = None
        self.base = 0

    def _start_locker(self) -> None:
        i = len(self.lockers) + 1
        path = os.path.join(self.tmp, f"locker-{i}")
        p = self.ctx.Process(target=locker_main, name=f"locker-{i}", daemon=True,
                             args=(self.name, path, self.rnd.randrange(SEED_RANGE), self.sync))
        p.start()
        self.lockers.append(Locker(f"locker-{i}", p, path))

    def start(self) -> None:
        if not self.name:
            self.handle = broker.spawn(**EMBEDDED)
            self.name = self.handle.name
        self.client = clientlib.connect(self.name, timeout=CONNECT_TIMEOUT_S)
        self.base = self.client.get(LOCK_NAME + "/", prefix=True).revision
        self.watch = self.client.watch(LOCK_NAME + "/", prefix=True, start_revision=self.base + 1)
        for _ in range(self.a.lockers):
            self._start_locker()
        ready, go, t0_v, stop_v = self.sync
        deadline = time.monotonic() + START_TIMEOUT_S
        while ready.value < len(self.lockers):
            if time.monotonic() > deadline or any(x.proc.exitcode for x in self.lockers):
                raise RuntimeError("locker processes did not start")
            time.sleep(TICK_S)
        t0_v.value = time.monotonic()
        stop_v.value = t0_v.value + self.a.duration
        go.set()

    def drive(self) -> None:
        stop_at = self.sync[3].value
        next_kill = time.monotonic() + self.rnd.uniform(*CHAOS_EVERY_S)
        while (now := time.monotonic()) < stop_at:
            if self.a.chaos and next_kill <= now < stop_at - 2 * CHAOS_EVERY_S[0]:
                self._chaos()
                next_kill = now + self.rnd.uniform(*CHAOS_EVERY_S)
            time.sleep(TICK_S)

    def _chaos(self) -> None:
        """SIGKILL the holder (one kill in WAITER_KILL_EVERY: a waiter) and replace it."""
        got = self.client.get(LOCK_NAME + "/", prefix=True, sort_order="ascend",
                              sort_target="create")
        if not got.kvs:
            return
        keys = [kv.key for kv in got.kvs]
        pick = keys[-1] if self.kills % WAITER_KILL_EVERY == WAITER_KILL_EVERY - 1 \
            and len(keys) > 1 else keys[0]
        for x in self.lockers:
            if not x.killed and x.lock_key() == pick and x.proc.is_alive():
                x.killed_at = time.monotonic()
                os.kill(x.proc.pid, signal.SIGKILL)
                x.proc.join(REAP_S)
                x.killed = True
                self.kills += 1
                self._start_locker()
                return

    def finish(self) -> dict:
        for x in self.lockers:
            x.proc.join(END_WAIT_S)
        final = self.client.get(LOCK_NAME + "/", prefix=True)
        self.client.request_progress()  # the history is whole once a response reaches it
        events = []
        while True:
            r = self.watch.get(CONNECT_TIMEOUT_S)
            events += [(e.type, e.kv.key, e.kv.create_revision, e.kv.mod_revision)
                       for e in r.events]
            if r.revision >= final.revision and not r.created:
                break
        return self._verdict(events, final)

    def _verdict(self, events: list, final) -> dict:
        from .lockcheck import acquisitions, handovers, verify_lock

        acqs, killed_keys, holder_kills = [], [], []
        for x in self.lockers:
            recs = read_records(x.path)
            mine = acquisitions(x.name, recs)
            acqs += mine
            if x.killed and recs:
                killed_keys.append(recs[0][1])
                if mine and mine[-1].rel == 0:  # it held the lock when it was killed
                    holder_kills.append(x.killed_at)
        v = verify_lock(acqs, events, [kv.key for kv in final.kvs], killed_keys)
        problems = list(v.problems)
        problems += [f"{x.name}: exit code {x.proc.exitcode}" for x in self.lockers
                     if not x.killed and x.proc.exitcode != 0]
        if v.acquisitions < self.a.min_acquisitions:
            problems.append(f"only {v.acquisitions} acquisitions verified (need "
                            f"{self.a.min_acquisitions})")
        if self.a.chaos and not v.killed_holding:
            problems.append("--chaos killed no holder while it held the lock")
        hand = sorted(handovers(acqs, holder_kills))
        return {"scenario": "lock", "broker": self.name, "seed": self.seed,
                "handover_ms": [round(h * 1000, 1) for h in hand],
                "duration_s": self.a.duration, "lockers": self.a.lockers, "kills": self.kills,
                "min_acquisitions": self.a.min_acquisitions,
                "history_events": len(events), **asdict(v), "problems": problems,
                "passed": not problems}

    def close(self) -> None:
        for x in self.lockers:
            if x.proc.is_alive():
                x.proc.kill()
            x.proc.join(REAP_S)
        if self.client is not None:
            self.client.close()
        if self.handle is not None:
            self.handle.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_lock(a: argparse.Namespace) -> int:
    """The lock scenario from its options to its exit status (0 passed, 1 failed)."""
    r = LockRun(a)
    try:
        r.start()
        r.drive()
        s = r.finish()
    finally:
        r.close()
    if a.json:
        text = json.dumps(s, indent=2, default=repr)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text)
    if a.json != "-":
        print_lock_summary(s)
    return 0 if s["passed"] else 1


def print_lock_summary(s: dict) -> None:
    print(f"shmwatch stress --scenario lock on broker {s['broker']} (seed {s['seed']}): "
          f"{s['lockers']} lockers, {s['duration_s']} s, {s['kills']} killed (chaos)")
    print(f"  acquisitions verified: {s['acquisitions']} ({s['killed_holding']} holders killed "
          f"while holding); key lifetimes in the history: {s['keys_checked']}")
    if s["handover_ms"]:
        h = s["handover_ms"]
        print(f"  SIGKILL of the holder -> next acquisition: median {h[len(h) // 2]} ms, "
              f"max {h[-1]} ms ({len(h)} kills)")
    if s["passed"]:
        print(f"PASSED: {s['acquisitions']} acquisitions verified: each by the oldest key then "
              f"alive, no two holding intervals overlap, every killed process's key deleted, "
              f"nothing left under the prefix. Replay the choices with --seed {s['seed']}.")
    else:
        print(f"FAILED (seed {s['seed']}):")
        for p in s["problems"]:
            print(f"  - {p}")
