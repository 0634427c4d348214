"""tools/stress: load a broker with writer and watcher processes, then prove every stream.

Starts an embedded broker (or attaches to one with --name), N writer processes doing
puts, deletes and multi-key txns on overlapping keys, and M watcher processes with a mix
of single-key, prefix, range and from-key watches, some with prev_kv or a filter: fast
ones, a slow one, one that stalls briefly (a victim that catches up), one that stalls
past a compaction (a victim cancelled with compact_revision), late ones replaying from
revision 1 or from the compaction point. The run compacts the store periodically (like
etcd's auto-compaction). With --chaos it SIGKILLs writers and watchers at random and
replaces each: a writer by a new one, a watcher by one resuming from its predecessor's
last delivered revision + 1 or by a late one from revision 1.

A reference watch in this process records the whole history; every stream (survivors,
killed ones up to their death, replacements) is checked against it: ordered, no gap, no
duplicate, each revision whole, filters and prev_kv right, or a correct compaction
cancel. Every acknowledged write must be in the history, every write in the history
must have been made, and the final `get` must equal the history replayed.

PASSED needs all of that, at least --min-streams streams verified with events, and the
victims and compaction the run was set up to provoke having happened. The seed is random
unless given (--seed N replays the same choices, not the same timing).

Exit status 0 when it passed, 1 when it failed, 2 on a usage or start error.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import multiprocessing as mp
import os
import random
import re
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgpack

KEYSPACE = "stress/"
START_COMPACT = -1  # a late watcher's start_revision: the compaction point when it starts
CHAOS_ROLES = ("watcher", "writer", "watcher")  # the kinds killed, in turn
STAMP = re.compile(rb"s(\d+)\.(\d+)\Z")  # the value a writer puts: s<writer>.<op number>

# Sizes of the embedded broker. They fit a 64 MB /dev/shm with room to spare: the log,
# plus per client 2 x 256 KiB request/response rings and 2 watch rings (~15 clients).
EMBEDDED = {"request_ring_bytes": 256 << 10, "response_ring_bytes": 256 << 10,
            "rings_per_arena": 2}


def _key(i: int) -> str:
    return f"{KEYSPACE}{i % 4}/{i:03d}"


@dataclass
class WatchSpec:
    """One watcher process: its watch, and how and when it reads."""

    name: str  # its process name, which tools/top shows: watcher-stall-2, ...
    kind: str  # key | prefix | range | fromkey
    key: bytes
    end: bytes | None  # None: one key; b"\0": every key >= key
    behaviour: str  # fast | slow | stall | stall-long | late | resume
    start_revision: int = 0  # 0: from now; START_COMPACT: the compaction point
    start_at: float = 0.0  # seconds into the run before the watch is created
    stall: tuple[float, float] | None = None  # stops reading between these offsets
    prev_kv: bool = False
    filters: tuple[str, ...] = ()
    replaces: str | None = None

    def describe(self) -> str:
        k = self.key.decode()
        rng = {"key": k, "prefix": k + "*", "fromkey": k + "..",
               "range": f"[{k},{(self.end or b'').decode()})"}[self.kind]
        opts = "".join(f" {f}" for f in self.filters) + (" prev_kv" if self.prev_kv else "")
        start = {0: "", START_COMPACT: " from the compaction revision"}.get(
            self.start_revision, f" from rev {self.start_revision}")
        return f"{rng}{opts}{start}"

    def covers(self, k: bytes) -> bool:
        if self.end is None:
            return k == self.key
        return self.key <= k and (self.end == b"\0" or k < self.end)

    def types(self) -> set[str]:
        """The event types this watch receives (its filters drop the others)."""
        return {"PUT", "DELETE"} - {"PUT" if "noput" in self.filters else "",
                                    "DELETE" if "nodelete" in self.filters else ""}


def make_specs(a: argparse.Namespace, rnd: random.Random, interval: float) -> list[WatchSpec]:
    """The initial watchers. Stalls and late starts are placed against the compaction
    schedule (every `interval` seconds, keeping one interval of history): the short stall
    resumes within the history kept, the long one past a compaction of what it missed,
    the first late watcher replays from revision 1 before the first compaction."""
    d = a.duration
    plan = (["slow"] * a.slow + ["stall"] * a.stall + ["stall-long"] * a.stall_long
            + ["late"] * a.late)[:a.watchers]
    plan += ["fast"] * (a.watchers - len(plan))
    specs, lates = [], 0
    for i, beh in enumerate(plan, 1):
        kind, key, end = _range(i, beh, a.keys, rnd)
        s = WatchSpec(f"watcher-{beh}-{i}", kind, key, end, beh, prev_kv=i % 3 == 2,
                      filters=("nodelete",) if i % 5 == 3 else
                      ("noput",) if i % 5 == 0 and kind != "key" else ())
        if beh == "stall":
            s.stall = (0.15 * d, 0.15 * d + interval / 2)
        elif beh == "stall-long":
            s.stall = (0.05 * d, 0.8 * d)
        elif beh == "late":
            s.start_revision, s.start_at = (1, d / 4) if lates % 2 == 0 else \
                (START_COMPACT, 0.6 * d)
            lates += 1
        specs.append(s)
    return specs


def _range(i: int, beh: str, keys: int, rnd: random.Random) -> tuple:
    """A watch's kind, key and end. Stalling and slow watchers watch (nearly) every key,
    so their rings fill while they do not read."""
    if beh == "stall":
        return "prefix", KEYSPACE.encode(), _prefix_end(KEYSPACE.encode())
    if beh == "stall-long":
        return "fromkey", _key(0).encode(), b"\0"
    if beh == "slow":
        return "range", _key(0).encode(), _key(keys - 1).encode()
    kind = ("key", "prefix", "range", "fromkey")[i % 4]
    a = rnd.randrange(keys)
    if kind == "key":
        return kind, _key(a).encode(), None
    if kind == "prefix":
        p = f"{KEYSPACE}{a % 4}/".encode()
        return kind, p, _prefix_end(p)
    if kind == "range":
        lo, hi = sorted((a, min(keys - 1, a + rnd.randrange(2, 12))))
        lo_k, hi_k = _key(lo), _key(hi)
        if lo_k >= hi_k:
            lo_k, hi_k = _key(0), _key(keys - 1)
        return kind, lo_k.encode(), hi_k.encode()
    return kind, _key(a).encode(), b"\0"


def _prefix_end(p: bytes) -> bytes:
    from shmwatch.wire.ops import prefix_range_end

    return prefix_range_end(p)


# ------------------------------------------------------------------ records on disk

def write_record(f, obj) -> None:
    """One msgpack record in one write() to an unbuffered file: a process SIGKILLed
    right after it returns has still written it."""
    f.write(msgpack.packb(obj, use_bin_type=True))


def read_records(path: str) -> list:
    """Every whole record of a file, arrays as tuples (a record cut short is dropped)."""
    try:
        with open(path, "rb") as f:
            return list(msgpack.Unpacker(f, raw=False, use_list=False,
                                         max_buffer_size=1 << 30))
    except FileNotFoundError:
        return []


def _kv(kv) -> tuple | None:
    return None if kv is None else (kv.key, kv.value, kv.create_revision, kv.mod_revision,
                                    kv.version, kv.lease)


# ------------------------------------------------------------------ child processes

def _arrive(ready, go, t0_v, stop_v) -> tuple[float, float]:
    """Report ready, wait for the start signal; the run's start and end (monotonic,
    which is one clock for every process of the machine)."""
    with ready.get_lock():
        ready.value += 1
    go.wait(120)
    return t0_v.value, stop_v.value


def writer_main(name: str, wid: int, keys: int, seed: int, ack_path: str, sync: tuple,
                counter) -> None:
    """Write until the run ends; record every acknowledged write as [op number, revision,
    [[key, value or None (a delete), deleted count], ...]] before making the next."""
    import clientlib
    from clientlib import op_delete, op_put

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    with open(ack_path, "wb", buffering=0) as acks, clientlib.connect(name, timeout=10) as c:
        _, stop_at = _arrive(*sync)
        n = 0
        while time.monotonic() < stop_at:
            r = rnd.random()
            k = _key(rnd.randrange(keys)).encode()
            value = f"s{wid}.{n}".encode()
            if r < 0.75:
                rev, changes = c.put(k, value).revision, [[k, value, 0]]
            elif r < 0.9:
                d = c.delete(k)
                rev, changes = d.revision, [[k, None, d.deleted]]
            else:
                ks = sorted({_key(rnd.randrange(keys)).encode()
                             for _ in range(rnd.randrange(2, 5))})
                puts = [rnd.random() < 0.8 for _ in ks]
                t = c.txn(success=[op_put(x, value) if p else op_delete(x)
                                   for x, p in zip(ks, puts)])
                rev = t.revision
                changes = [[x, value, 0] if p else [x, None, resp.deleted]
                           for x, p, resp in zip(ks, puts, t.responses)]
            write_record(acks, [n, rev, changes])
            n += 1
            if n % 64 == 0:
                with counter.get_lock():
                    counter.value += 64


def watcher_main(name: str, spec: WatchSpec, out_path: str, sync: tuple, delivered) -> None:
    """Watch as `spec` says; record ["start", revision] and then every response as it is
    received, so a killed watcher's file holds exactly what it was delivered."""
    import clientlib
    from broker.admin import broker_info

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with open(out_path, "wb", buffering=0) as out, clientlib.connect(name, timeout=10) as c:
        t0, stop_at = _arrive(*sync)
        time.sleep(max(0.0, min(t0 + spec.start_at, stop_at) - time.monotonic()))
        start = spec.start_revision
        if start == START_COMPACT:
            start = max(1, broker_info(name).get("compact_revision", 0))
        write_record(out, ["start", start])
        w = c.watch(spec.key, spec.end, start_revision=start, prev_kv=spec.prev_kv,
                    filters=spec.filters)
        if not _follow(w, out, spec, t0, stop_at, delivered):
            _drain(c, w, out, spec)


def _record_response(out, r) -> int:
    write_record(out, ["resp", r.watch_id, r.revision, r.created, r.canceled,
                       r.compact_revision, r.cancel_reason,
                       [[e.type, _kv(e.kv), _kv(e.prev_kv)] for e in r.events]])
    return len(r.events)


def _follow(w, out, spec: WatchSpec, t0: float, stop_at: float, delivered) -> bool:
    """Read until the run ends (stalling and sleeping as the behaviour says); True if
    the watch was cancelled."""
    import clientlib

    stall = (t0 + spec.stall[0], t0 + spec.stall[1]) if spec.stall else None
    n = 0
    while True:
        now = time.monotonic()
        if now >= stop_at:
            return False
        if stall and stall[0] <= now < stall[1]:
            time.sleep(max(0.0, min(stall[1], stop_at) - now))
            continue
        try:
            r = w.get(timeout=0.1)
        except clientlib.Timeout:
            continue
        n += _record_response(out, r)
        if r.canceled:
            return True
        if r.events and spec.behaviour == "slow":
            time.sleep(0.001)
        if n >= 256:
            with delivered.get_lock():
                delivered.value += n
            n = 0


def _drain(c, w, out, spec: WatchSpec) -> None:
    """End the stream at a known point: request progress and read up to its answer,
    which the broker sends once this watch has everything up to that revision."""
    import clientlib

    c.request_progress()
    deadline = time.monotonic() + 60
    while True:
        try:
            r = w.get(timeout=max(0.1, deadline - time.monotonic()))
        except clientlib.Timeout:
            raise SystemExit(f"{spec.name}: no progress response within 60 s") from None
        _record_response(out, r)
        if r.canceled or (r.watch_id == -1 and not r.events):
            return


# ------------------------------------------------------------------ the reference

class Reference(threading.Thread):
    """A watch of every key from the run's first revision, read by its own thread so a
    busy main loop never makes it a victim. Every revision must arrive, in order, each
    whole: any break makes the reference unusable, and the run FAILS saying so."""

    def __init__(self, client, base: int):
        super().__init__(name="stress-reference", daemon=True)
        self.watch = client.watch(b"\0", b"\0", start_revision=base + 1)
        first = self.watch.get(10)
        self.problem = None if first.created else f"first response not created: {first}"
        self.groups: list[tuple[int, list]] = []  # (revision, [(type, kv)])
        self.last = base
        self.until: int | None = None  # set by finish(): stop once this revision is read

    def run(self) -> None:
        import clientlib

        while not self.problem:
            if self.until is not None and self.last >= self.until:
                return
            try:
                r = self.watch.get(timeout=0.2)
            except clientlib.Timeout:
                continue
            except clientlib.ShmwatchError as exc:
                self.problem = f"reference watch ended: {exc!r}"
                return
            if r.canceled:
                self.problem = (f"reference watch cancelled (compact_revision "
                                f"{r.compact_revision}): it fell behind the compaction")
                return
            first = True
            for rev, evs in _by_revision(r.events, lambda e: e.kv.mod_revision):
                if rev != self.last + 1:
                    self.problem = (f"reference stream: revision {rev} after {self.last}"
                                    + (" (split across responses)" if first and
                                       rev == self.last else ""))
                    return
                self.groups.append((rev, [(e.type, _kv(e.kv)) for e in evs]))
                self.last = rev
                first = False

    def finish(self, until: int, timeout: float) -> None:
        """Read up to revision `until`, then stop."""
        self.until = until
        self.join(timeout)
        if self.is_alive() and not self.problem:
            self.problem = (f"reference stream stopped at revision {self.last}, short of "
                            f"the final revision {until}")


def _by_revision(events, rev_of) -> list[tuple[int, list]]:
    """Consecutive events of one revision (`rev_of(event)`), grouped."""
    out: list[tuple[int, list]] = []
    for e in events:
        rev = rev_of(e)
        if out and out[-1][0] == rev:
            out[-1][1].append(e)
        else:
            out.append((rev, [e]))
    return out


# ------------------------------------------------------------------ verification

class History:
    """The reference history replayed over the state at the run's start: each event
    gets its prev_kv, the MVCC fields are checked, the acknowledged writes are checked
    at their revisions, and the end state must equal the final `get`."""

    def __init__(self, base: int, initial: list, groups: list, final: list, acks: dict):
        self.revs = [rev for rev, _ in groups]
        self.events: list[list] = []  # per revision: [(type, kv, prev_kv)]
        self.problems: list[str] = []
        self.acks_checked = 0
        self.ack_problems: list[str] = []
        self.acks_failed = 0
        self.keys: set[bytes] = set()  # every key the history changed
        state = {kv[0]: kv for kv in initial}
        by_rev: dict[int, list] = {}
        for wid, records in acks.items():
            for n, rev, changes in records:
                by_rev.setdefault(rev, []).append((wid, n, rev, changes))
        at_base = by_rev.pop(base, ())
        self._check_changed(at_base, [], state)  # a change at the run's start: impossible
        self._check_unchanged(at_base, state)
        for rev, evs in groups:
            pending = by_rev.pop(rev, ())
            self._check_changed(pending, evs, state)
            out = []
            for typ, kv in evs:
                prev = state.get(kv[0])
                self._check_mvcc(rev, typ, kv, prev)
                out.append((typ, kv, prev))
                if typ == "PUT":
                    state[kv[0]] = kv
                else:
                    state.pop(kv[0], None)
            self.events.append(out)
            self.keys.update(kv[0] for _, kv in evs)
            self._check_unchanged(pending, state)
        for rev, pending in sorted(by_rev.items()):
            self._ack_failed(f"{len(pending)} acknowledged write(s) at revision {rev}, "
                             f"which the history does not have", len(pending))
        want = {kv[0]: kv for kv in final}
        if state != want:
            diff = sorted(k for k in set(state) | set(want) if state.get(k) != want.get(k))
            self.problems.append(f"the final get differs from the history replayed on "
                                 f"{len(diff)} key(s), first {diff[0]!r}: get "
                                 f"{want.get(diff[0])}, history {state.get(diff[0])}")

    def _check_mvcc(self, rev: int, typ: str, kv: tuple, prev: tuple | None) -> None:
        if kv[3] != rev:
            self.problems.append(f"revision {rev}: event with mod_revision {kv[3]}")
        elif typ == "PUT" and (kv[4], kv[2]) != ((prev[4] + 1, prev[2]) if prev else (1, rev)):
            self.problems.append(f"revision {rev}: PUT {kv[0]!r} version {kv[4]} create "
                                 f"{kv[2]} after {prev}")
        elif typ == "DELETE" and prev is None:
            self.problems.append(f"revision {rev}: DELETE of {kv[0]!r}, which did not exist")

    def _ack_failed(self, problem: str, n: int = 1) -> None:
        self.acks_failed += n
        self.ack_problems.append(problem)

    def _check_changed(self, pending, evs: list, before: dict) -> None:
        """Acknowledged writes that changed something own their revision: its events
        must be exactly their changes (`before`: the state before the revision)."""
        for wid, n, rev, changes in pending:
            if not any(v is not None or d for _, v, d in changes):
                continue
            self.acks_checked += 1
            want = sorted(("PUT", k, v) if v is not None else ("DELETE", k, None)
                          for k, v, d in changes if v is not None or d)
            got = sorted((t, kv[0], kv[1] if t == "PUT" else None) for t, kv in evs)
            absent = [k for k, v, d in changes if v is None and not d and k in before]
            if got != want or absent:
                self._ack_failed(f"writer {wid} op {n}: acknowledged {changes} at revision "
                                 f"{rev}, the history has {got}")

    def _check_unchanged(self, pending, after: dict) -> None:
        """Acknowledged writes that changed nothing (deletes of absent keys) answered
        with the current revision: their keys are absent there (`after`: the state
        once that revision is applied)."""
        for wid, n, rev, changes in pending:
            if any(v is not None or d for _, v, d in changes):
                continue
            self.acks_checked += 1
            if any(k in after for k, _, _ in changes):
                self._ack_failed(f"writer {wid} op {n}: deleted nothing at revision {rev}, "
                                 f"but a key of {changes} existed")

    def stamps(self) -> set[tuple[int, int]]:
        """(writer, op number) of every value the writers put, as the history has them."""
        out = set()
        for evs in self.events:
            for typ, kv, _ in evs:
                m = STAMP.match(kv[1]) if typ == "PUT" else None
                if m:
                    out.add((int(m[1]), int(m[2])))
        return out

    def expected(self, spec: WatchSpec, first: int, last: int) -> list[tuple[int, list]]:
        """The revisions in [first, last] with events for this watch, and those events."""
        keys = {k for k in self.keys if spec.covers(k)}
        types = spec.types()
        out = []
        lo = bisect.bisect_left(self.revs, first)
        hi = bisect.bisect_right(self.revs, last)
        for i in range(lo, hi):
            evs = [e for e in self.events[i] if e[1][0] in keys and e[0] in types]
            if evs:
                out.append((self.revs[i], evs))
        return out


@dataclass
class Stream:
    """What one watcher process was delivered, as read back from its file."""

    start: int | None = None
    created: tuple | None = None  # the first response
    groups: list = field(default_factory=list)  # (revision, [(type, kv, prev)])
    progress: int = 0  # the highest progress response's revision
    cancel: tuple | None = None  # (compact_revision, reason)
    problems: list = field(default_factory=list)

    @classmethod
    def read(cls, path: str) -> Stream:
        s = cls()
        for rec in read_records(path):
            if rec[0] == "start":
                s.start = rec[1]
                continue
            _, wid, rev, created, canceled, compact, reason, events = rec
            if s.created is None:
                s.created = (rev, created, canceled, reason)
                if not created:
                    s.problems.append("first response is not `created`")
                if not canceled:
                    continue
            if s.cancel is not None:
                s.problems.append("a response after the cancel")
            if canceled:
                s.cancel = (compact, reason)
            elif wid == -1 and not events:
                s.progress = max(s.progress, rev)
            for grev, evs in _by_revision(events, lambda e: e[1][3]):
                if s.groups and grev <= s.groups[-1][0]:
                    last_rev, last_evs = s.groups[-1]
                    s.problems.append(
                        f"revision {grev} delivered twice" if grev == last_rev and
                        evs == last_evs else
                        f"revision {grev} split across responses" if grev == last_rev else
                        f"revision {grev} after {last_rev} (out of order or duplicate)")
                    continue
                s.groups.append((grev, evs))
        return s

    @property
    def events(self) -> int:
        return sum(len(evs) for _, evs in self.groups)

    @property
    def last(self) -> int:
        return self.groups[-1][0] if self.groups else 0


@dataclass
class Compactions:
    """The compaction revisions of a run: those it made and those it saw the broker at.
    If the revision log may have evicted on its own (`wrapped`), the compaction point
    moved with every write then, and any revision up to `final` may have been one."""

    points: set[int]
    final: int
    wrapped: bool

    def at(self, rev: int) -> bool:
        return rev in self.points or (self.wrapped and rev <= self.final)


def _same(got: list, want: list, prev_kv: bool) -> bool:
    """Events of one revision as delivered vs as the history has them."""
    if not prev_kv:
        want = [(t, kv, None) for t, kv, _ in want]
    return got == want


def at_compaction(evs: list) -> list:
    """A revision's events as a watch replaying from it gets them once it is the
    compaction revision (etcd: the DELETEs are gone, the PUTs come without prev_kv;
    broker.mvcc.events_at_compact_rev)."""
    return [(t, kv, None) for t, kv, _ in evs if t == "PUT"]


def verify_stream(spec: WatchSpec, s: Stream, hist: History, comp: Compactions) -> list[str]:
    """Violations of one stream against the history. A revision that was a compaction
    revision may come in etcd's form for it (`at_compaction`), or not at all if that
    leaves nothing for this watch."""
    problems = list(s.problems)
    if s.created is None:
        return problems
    if s.created[2] and not s.cancel[0]:
        return problems + [f"watch refused: {s.created[3]}"]
    first = s.start or s.created[0] + 1
    next_rev = max(first, s.last + 1, s.progress + 1)  # the watch's minRev is >= this
    if spec.start_revision == START_COMPACT:  # it read the compaction point it started at
        comp = dataclasses.replace(comp, points=comp.points | {first})
    if s.cancel is not None:
        compact, reason = s.cancel
        if not compact:
            problems.append(f"cancelled without compact_revision ({reason})")
        elif not next_rev < compact <= comp.final:
            problems.append(f"cancelled at compact_revision {compact}, but it needed "
                            f"revision {next_rev} on (run compacted to {comp.final})")
    want = hist.expected(spec, first, next_rev - 1)
    got = {rev: evs for rev, evs in s.groups}
    for rev, evs in want:
        have = got.pop(rev, None)
        if have is None:
            if not (comp.at(rev) and not at_compaction(evs)):
                problems.append(f"gap: revision {rev} ({len(evs)} event(s)) missing")
        elif not (_same(have, evs, spec.prev_kv)
                  or (comp.at(rev) and have == at_compaction(evs))):
            problems.append(f"revision {rev}: got {_show(have)}, history has {_show(evs)}")
    for rev in sorted(got):
        problems.append(f"revision {rev}: {len(got[rev])} event(s) the watch must not see")
    return problems


def check_writes(hist: History, acks: dict, killed: set[int]) -> list[str]:
    """Every acknowledged write is in the history (`History` checked them), and every
    write in the history was made: acknowledged, or the op a killed writer had in
    flight (applied, but the writer died before it recorded the acknowledgement)."""
    problems = list(hist.ack_problems)
    made = {(wid, rec[0]) for wid, recs in acks.items() for rec in recs}
    for wid, n in sorted(hist.stamps() - made):
        if not (wid in killed and n == len(acks.get(wid, ()))):
            problems.append(f"the history has writer {wid}'s op {n}, which it never made "
                            f"or had acknowledged")
    return problems


def _show(evs: list) -> str:
    return "; ".join(f"{t} {kv[0].decode(errors='replace')}@{kv[3]} v{kv[4]}"
                     + (" +prev" if p else "") for t, kv, p in evs[:3]) + \
        (" ..." if len(evs) > 3 else "")


# ------------------------------------------------------------------ the run

@dataclass
class Worker:
    """A writer or watcher process of the run, and where it records what it did."""

    name: str
    role: str  # writer | watcher
    proc: object
    path: str
    spec: WatchSpec | None = None
    wid: int = 0
    killed: bool = False


class Run:
    """One stress run: start everything, drive the schedule (late starts are in the
    watchers; chaos, compaction and sampling are here), stop, verify."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 31)
        self.rnd = random.Random(self.seed)
        self.ctx = mp.get_context("spawn")
        self.tmp = tempfile.mkdtemp(prefix="shmwatch-stress-")
        self.handle = None
        self.name = a.name
        self.workers: list[Worker] = []
        self.interval = a.compact_every if a.compact_every is not None else (
            0.0 if a.name else a.duration / 4)
        self.kills = {"writer": 0, "watcher": 0}
        self.replacements = 0
        self.store_compactions = 0
        self.max_lag = 0
        self.max_log_fill = 0.0
        self.compacted_to: set[int] = set()  # the revisions this run compacted to
        self.seen_compact: set[int] = set()  # compaction revisions seen in the metrics
        self.lag_samples = 0
        self.rev_samples: deque[tuple[float, int]] = deque()
        self.stats0: dict = {}
        self.last_stats: dict = {}

    # ------------------------------------------------------------ start

    def start(self) -> None:
        import broker
        import clientlib
        from broker.admin import read_stats

        if not self.name:
            opts = dict(EMBEDDED, log_bytes=self.a.log_bytes,
                        watch_ring_bytes=self.a.watch_ring_bytes)
            self.handle = broker.spawn(**opts)
            self.name = self.handle.name
        self.client = clientlib.connect(self.name, timeout=10)
        self.stats0 = _safe(read_stats, self.name) or {}
        self.seen_compact.add(self.stats0.get("compact_revision", 0))
        init = self.client.get("", prefix=True)
        self.base, self.initial = init.revision, [_kv(kv) for kv in init.kvs]
        self.ref = Reference(self.client, self.base)
        self.ref.start()
        self.written = self.ctx.Value("q", 0)
        self.delivered = self.ctx.Value("q", 0)
        self.sync = (self.ctx.Value("i", 0), self.ctx.Event(), self.ctx.Value("d", 0.0),
                     self.ctx.Value("d", 0.0))
        self.specs = make_specs(self.a, self.rnd, self.interval or self.a.duration / 4)
        for s in self.specs:
            self._start_watcher(s)
        for _ in range(self.a.writers):
            self._start_writer(None)
        self._go()

    def _go(self) -> None:
        """Start the clock once every process is connected, so stalls, late starts and
        chaos happen inside the run, not during start-up."""
        ready, go, t0_v, stop_v = self.sync
        deadline = time.monotonic() + 120
        while ready.value < len(self.workers):
            if time.monotonic() > deadline or any(w.proc.exitcode for w in self.workers):
                raise RuntimeError("worker processes did not start")
            time.sleep(0.01)
        self.t0 = t0_v.value = time.monotonic()
        self.stop_at = stop_v.value = self.t0 + self.a.duration
        self.rev_samples.append((self.t0, self.base))
        self.next_chaos = self.t0 + min(1.0, 0.15 * self.a.duration)
        self.next_compact = self.t0 + self.interval
        go.set()

    def _start_watcher(self, spec: WatchSpec) -> Worker:
        path = os.path.join(self.tmp, spec.name.split()[0])
        p = self.ctx.Process(target=watcher_main, name=spec.name, daemon=True,
                             args=(self.name, spec, path, self.sync, self.delivered))
        p.start()
        w = Worker(spec.name, "watcher", p, path, spec=spec)
        self.workers.append(w)
        return w

    def _start_writer(self, replaces: str | None) -> Worker:
        wid = sum(w.role == "writer" for w in self.workers) + 1
        name = f"writer-{wid}" + (f" (replacement of {replaces})" if replaces else "")
        path = os.path.join(self.tmp, f"writer-{wid}")
        p = self.ctx.Process(target=writer_main, name=name, daemon=True,
                             args=(self.name, wid, self.a.keys, self.rnd.randrange(1 << 31),
                                   path, self.sync, self.written))
        p.start()
        w = Worker(name, "writer", p, path, wid=wid)
        self.workers.append(w)
        return w

    # ------------------------------------------------------------ during the run

    def drive(self) -> None:
        from broker.admin import read_stats

        progress = _Progress(self.a.quiet)
        try:
            while (now := time.monotonic()) < self.stop_at:
                stats = _safe(read_stats, self.name)
                if stats:
                    self._sample(now, stats)
                if self.a.chaos and now >= self.next_chaos and now < self.stop_at - 0.5:
                    self._chaos()
                    self.next_chaos = now + self.rnd.uniform(0.4, 0.9)
                if self.interval and now >= self.next_compact:
                    self._compact(now)
                    self.next_compact += self.interval
                progress.update(self, now)
                time.sleep(0.1)
        finally:
            progress.close()

    def _sample(self, now: float, stats: dict) -> None:
        """The lag of the worst watcher right now (metrics are a snapshot: the maximum
        over the run is the maximum of samples taken during it)."""
        self.last_stats = stats
        self.lag_samples += 1
        lags = [c.get("max_lag", 0) for c in stats.get("clients", ())]
        self.max_lag = max([self.max_lag, *lags])
        log = stats.get("log", {})
        self.max_log_fill = max(self.max_log_fill, log.get("used", 0) / (log.get("capacity") or 1))
        self.seen_compact.add(stats.get("compact_revision", 0))
        self.rev_samples.append((now, stats.get("revision", 0)))

    def _compact(self, now: float) -> None:
        """etcd-style periodic compaction: to the revision of one interval ago, and
        never past what the reference has read."""
        import clientlib

        while len(self.rev_samples) > 1 and self.rev_samples[1][0] <= now - self.interval:
            self.rev_samples.popleft()
        target = min(self.rev_samples[0][1], self.ref.last)
        if target <= max(self.base, self.last_stats.get("compact_revision", 0)):
            return
        try:
            self.client.compact(target)
            self.store_compactions += 1
            self.compacted_to.add(target)
        except clientlib.CompactedError:
            pass  # the log wrapped past it meanwhile: compacted anyway

    def _chaos(self) -> None:
        """SIGKILL a writer or a watcher (in turn) and replace it. The long-stalling
        watchers are spared: they are the run's compaction probes."""
        role = CHAOS_ROLES[sum(self.kills.values()) % len(CHAOS_ROLES)]
        alive = [w for w in self.workers if w.role == role and not w.killed
                 and w.proc.is_alive() and not (w.spec and w.spec.behaviour == "stall-long")]
        if not alive:
            return
        w = self.rnd.choice(alive)
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.join(10)
        w.killed = True
        self.kills[role] += 1
        self.replacements += 1
        if role == "writer":
            self._start_writer(w.name.split()[0])
            return
        n = sum(1 for x in self.workers if x.spec and x.spec.replaces)
        if n % 3 == 1:  # a late one, from revision 1 (compacted by now: a cancel)
            kind, start = "late", 1
        else:  # resume from the predecessor's last delivered revision + 1
            s = Stream.read(w.path)
            kind = "resume"
            start = (s.last + 1 if s.groups else s.start or
                     (s.created[0] + 1 if s.created else 0))
        spec = dataclasses.replace(
            w.spec, name=f"watcher-{kind}-{len(self.specs) + n + 1} (replacement of "
            f"{w.name.split()[0]})", behaviour=kind, start_revision=start, start_at=0.0,
            stall=None, replaces=w.name.split()[0])
        self._start_watcher(spec)

    # ------------------------------------------------------------ the end

    def finish(self) -> None:
        deadline = time.monotonic() + max(60.0, self.a.duration)
        for w in self.workers:
            w.proc.join(max(0.1, deadline - time.monotonic()))
        final = self.client.get("", prefix=True)
        self.final_rev, self.final = final.revision, [_kv(kv) for kv in final.kvs]
        self.ref.finish(self.final_rev, timeout=60)
        from broker.admin import broker_info, read_stats

        self.last_stats = _safe(read_stats, self.name) or self.last_stats
        final_compact = broker_info(self.name).get("compact_revision", 0)
        self.seen_compact.add(final_compact)
        # A compaction point this run did not make, or a log near full: the log evicted
        # on its own, at points not all seen.
        wrapped = bool(self.seen_compact - self.compacted_to - {0, self.stats0.get(
            "compact_revision", 0)}) or self.max_log_fill >= 0.9
        self.compactions = Compactions(self.compacted_to | self.seen_compact,
                                       final_compact, wrapped)
        self.elapsed = time.monotonic() - self.t0

    def close(self) -> None:
        for w in self.workers:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(5)
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
        if self.handle is not None:
            self.handle.stop()
        for f in os.listdir(self.tmp):
            os.unlink(os.path.join(self.tmp, f))
        os.rmdir(self.tmp)

    # ------------------------------------------------------------ verdict

    def verify(self) -> dict:
        acks = {w.wid: read_records(w.path) for w in self.workers if w.role == "writer"}
        hist = History(self.base, self.initial, self.ref.groups, self.final, acks)
        streams = [self._verify_stream(w, hist, self.compactions)
                   for w in self.workers if w.role == "watcher"]
        writer_problems = self._verify_writers(hist, acks)
        return self._summary(hist, streams, writer_problems, sum(map(len, acks.values())))

    def _verify_stream(self, w: Worker, hist: History, comp: Compactions) -> dict:
        s = Stream.read(w.path)
        problems = [] if self.ref.problem else verify_stream(w.spec, s, hist, comp)
        if not w.killed and w.proc.exitcode != 0:
            problems.append(f"watcher process exit code {w.proc.exitcode}")
        elif not w.killed and s.created is None:
            problems.append("no watch response recorded")
        status = ("FAILED" if problems else "killed" if w.killed else
                  "compacted" if s.cancel else "ok")
        first = s.start or (s.created[0] + 1 if s.created else max(0, w.spec.start_revision))
        return {"stream": w.name, "watch": w.spec.describe(), "status": status,
                "events": s.events, "first": first, "last": s.last,
                "compact_revision": s.cancel[0] if s.cancel else 0,
                "checked": s.created is not None and not self.ref.problem,
                "problems": problems}

    def _verify_writers(self, hist: History, acks: dict) -> list[str]:
        killed = {w.wid for w in self.workers if w.role == "writer" and w.killed}
        problems = check_writes(hist, acks, killed)
        for w in self.workers:
            if w.role == "writer" and not w.killed and w.proc.exitcode != 0:
                problems.append(f"{w.name}: exit code {w.proc.exitcode}")
        return problems

    def _summary(self, hist: History, streams: list, writer_problems: list,
                 acked: int) -> dict:
        st0, st1 = self.stats0, self.last_stats
        delta = {k: st1.get(k, 0) - st0.get(k, 0)
                 for k in ("victims_entered", "catchups", "compactions")}
        checked = [s for s in streams if s["checked"] and s["status"] != "FAILED"]
        with_events = [s for s in checked if s["events"]]
        cancels = [s for s in checked if s["compact_revision"]]
        exercised = {
            "victims": (delta["victims_entered"] > 0,
                        any(s.behaviour.startswith("stall") for s in self.specs)),
            "compaction": (bool(cancels),
                           bool(self.interval) and any(s.behaviour == "stall-long"
                                                       for s in self.specs)),
        }
        reasons = []
        if self.ref.problem:
            reasons.append(f"reference history: {self.ref.problem}")
        reasons += [f"history: {p}" for p in hist.problems[:5]]
        reasons += [f"writes: {p}" for p in writer_problems[:5]]
        bad = [s for s in streams if s["status"] == "FAILED"]
        reasons += [f"{s['stream']}: {'; '.join(s['problems'][:2])}" for s in bad[:8]]
        if len(with_events) < self.a.min_streams:
            reasons.append(f"only {len(with_events)} stream(s) verified with events; "
                           f"--min-streams is {self.a.min_streams}")
        for what, (done, meant) in exercised.items():
            if meant and not done:
                reasons.append(f"{what} not exercised although the run was set up to "
                               f"provoke it")
        writes_found = acked - hist.acks_failed
        return {
            "broker": self.name, "seed": self.seed, "duration_s": round(self.elapsed, 2),
            "writers": self.a.writers, "watchers": self.a.watchers,
            "revisions_written": self.final_rev - self.base,
            "events_written": sum(len(e) for e in hist.events),
            "writes_per_s": round((self.final_rev - self.base) / self.elapsed, 1),
            "writes_acknowledged": acked, "writes_found": writes_found,
            "streams_total": len(streams), "streams_verified": len(checked),
            "streams_with_events": len(with_events), "min_streams": self.a.min_streams,
            "streams_compacted": len(cancels),
            "events_verified": sum(s["events"] for s in checked),
            "kills": dict(self.kills), "replacements": self.replacements,
            "killed": [w.name for w in self.workers if w.killed],
            **delta,
            "store_compactions": self.store_compactions,
            "compact_revision": self.compactions.final,
            "log_wrapped": self.compactions.wrapped, "max_log_fill": round(self.max_log_fill, 3),
            "max_lag": self.max_lag, "lag_samples": self.lag_samples,
            "exercised": {k: {"done": d, "required": m} for k, (d, m) in exercised.items()},
            "reference_problem": self.ref.problem,
            "violations": len(hist.problems) + len(writer_problems) + len(bad)
            + bool(self.ref.problem),
            "reasons": reasons, "streams": streams, "passed": not reasons,
        }


def run(a: argparse.Namespace) -> dict:
    r = Run(a)
    try:
        r.start()
        r.drive()
        r.finish()
        return r.verify()
    finally:
        r.close()


def _safe(read_stats, name):
    try:
        return read_stats(name)
    except Exception:
        return None


# ------------------------------------------------------------------ display

class _Progress:
    """A live line of progress (rich), or nothing when quiet or not a terminal."""

    def __init__(self, quiet: bool):
        self.live = None
        self._last = 0.0
        if quiet:
            return
        from rich.console import Console
        from rich.live import Live

        self.live = Live(console=Console(stderr=True), refresh_per_second=4, transient=True)
        self.live.start()

    def update(self, r: Run, now: float) -> None:
        if self.live is None or now - self._last < 0.25:
            return
        self._last = now
        from rich.table import Table

        st = r.last_stats
        wat = st.get("watchers", {})
        tab = Table.grid(padding=(0, 2))
        tab.add_row(f"[bold]stress[/] {now - r.t0:5.1f}/{r.a.duration:.0f}s",
                    f"rev {st.get('revision', 0)}", f"writes~{r.written.value}",
                    f"delivered~{r.delivered.value}",
                    f"watchers {wat.get('synced', 0)} synced / {wat.get('unsynced', 0)} "
                    f"unsynced / [red]{wat.get('victim', 0)} victims[/]",
                    f"lag max {r.max_lag}", f"compact {st.get('compact_revision', 0)}",
                    f"killed {sum(r.kills.values())}")
        self.live.update(tab)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    t = Table(title=f"shmwatch stress on broker {s['broker']} (seed {s['seed']})")
    t.add_column("metric")
    t.add_column("value", justify="right")
    rows = [
        ("duration", f"{s['duration_s']} s"),
        ("writers / watchers at start", f"{s['writers']} / {s['watchers']}"),
        ("revisions written", f"{s['revisions_written']:,} ({s['writes_per_s']:,}/s)"),
        ("events written", f"{s['events_written']:,}"),
        ("writes acknowledged / found", f"{s['writes_acknowledged']:,} / "
                                        f"{s['writes_found']:,}"),
        ("streams verified with events / total",
         f"{s['streams_with_events']} / {s['streams_total']} (need {s['min_streams']})"),
        ("events verified", f"{s['events_verified']:,}"),
        ("victims entered", str(s["victims_entered"])),
        ("catch-ups", str(s["catchups"])),
        ("compactions (watches cancelled)", f"{s['compactions']} ({s['streams_compacted']}"
                                            " streams checked)"),
        ("store compacted", f"{s['store_compactions']} times, to revision "
                            f"{s['compact_revision']:,}"),
        ("max lag during the run", f"{s['max_lag']:,} revisions ({s['lag_samples']} "
                                   "samples)"),
        ("killed (chaos)", f"{s['kills']['writer']} writers, {s['kills']['watcher']} "
                           f"watchers; {s['replacements']} replaced"),
    ]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    w = Table(title="streams, verified against the revision log")
    w.add_column("stream", no_wrap=True)
    w.add_column("status", no_wrap=True)
    w.add_column("events", justify="right", no_wrap=True)
    w.add_column("revisions", no_wrap=True)
    w.add_column("watch", overflow="fold")
    for r in s["streams"]:
        style = {"ok": "green", "compacted": "yellow", "killed": "cyan"}.get(r["status"], "red")
        span = f"{r['first']}..{r['last']}" if r["events"] else f"{r['first']}.."
        if r["compact_revision"]:
            span += f" cancel@{r['compact_revision']}"
        name, _, was = r["stream"].partition(" (replacement of ")
        w.add_row(name, f"[{style}]{r['status']}[/]", f"{r['events']:,}", span,
                  r["watch"] + (f" (replaces {was[:-1]})" if was else ""))
    console.print(w)
    for r in s["streams"]:
        for p in r["problems"][:5]:
            console.print(f"[red]{r['stream']}[/]: {p}", highlight=False)
    for what, e in s["exercised"].items():
        if e["done"]:
            console.print(f"[green]exercised[/]: {what}")
        elif e["required"]:
            console.print(f"[bold red]NOT EXERCISED[/]: {what}")
        else:
            console.print(f"[bold yellow]not exercised[/]: {what} (not set up to provoke "
                          "it; see --stall / --stall-long / --compact-every)")
    if s["passed"]:
        console.print(f"[bold green]PASSED[/]: {s['streams_with_events']} streams verified "
                      f"with events ({s['events_verified']:,} events): every one in order, "
                      "once, each revision whole, or correctly cancelled; every acknowledged "
                      f"write found. Replay the choices with --seed {s['seed']}.")
    else:
        console.print(f"[bold red]FAILED[/] (seed {s['seed']}):")
        for r in s["reasons"]:
            console.print(f"  - {r}", markup=False)


def parse_args(argv):
    from broker.__main__ import parse_size

    p = argparse.ArgumentParser(prog="tools/stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="attach to this running broker instead of embedding one")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load (default 8)")
    p.add_argument("--writers", type=int, default=3, help="writer processes (default 3)")
    p.add_argument("--watchers", type=int, default=8,
                   help="watcher processes at the start (default 8)")
    p.add_argument("--keys", type=int, default=48, help="distinct keys written")
    p.add_argument("--slow", type=int, default=1, help="watchers that sleep 1 ms per response")
    p.add_argument("--stall", type=int, default=1,
                   help="watchers that stop reading for half a compaction interval: victims "
                        "that catch up")
    p.add_argument("--stall-long", type=int, default=1,
                   help="watchers that stop reading for most of the run: victims cancelled "
                        "with compact_revision (needs compaction)")
    p.add_argument("--late", type=int, default=2,
                   help="watchers started late: from revision 1, from the compaction point, "
                        "in turn")
    p.add_argument("--chaos", action="store_true",
                   help="SIGKILL writers and watchers in turn (every 0.4-0.9 s) and replace "
                        "each")
    p.add_argument("--compact-every", type=float, default=None, metavar="SECONDS",
                   help="compact the store this often, keeping one interval of history "
                        "(default: duration/4 for the embedded broker, 0 = never with --name)")
    p.add_argument("--min-streams", type=int, default=None,
                   help="streams that must be verified with events to pass "
                        "(default max(4, --watchers))")
    p.add_argument("--log-bytes", type=parse_size, default="16M",
                   help="embedded broker's revision log (default 16M)")
    p.add_argument("--watch-ring-bytes", type=parse_size, default="64k",
                   help="embedded broker's per-watcher ring (default 64k: small, so stalled "
                        "watchers become victims)")
    p.add_argument("--seed", type=int, default=None,
                   help="replay the random choices of a run (default: a random seed, printed)")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-' = stdout)")
    p.add_argument("--quiet", action="store_true", help="no live display")
    a = p.parse_args(argv)
    if a.min_streams is None:
        a.min_streams = max(4, a.watchers)
    if a.duration <= 0 or min(a.writers, a.watchers, a.slow, a.stall, a.stall_long,
                              a.late, a.min_streams) < 0 or a.keys < 4:
        p.error("--duration must be > 0, counts >= 0, --keys >= 4")
    if a.compact_every is not None and a.compact_every < 0:
        p.error("--compact-every must be >= 0")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():
        a.quiet = True
    try:
        s = run(a)
    except Exception as exc:
        print(f"stress: could not run: {exc!r}", file=sys.stderr)
        return 2
    if a.json:
        text = json.dumps(s, indent=2)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text)
    if a.json != "-":
        print_summary(s)
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
