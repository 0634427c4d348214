"""What a stress run's watchers are: the key space, one watcher's watch and behaviour
(`WatchSpec`), and the plan that places stalls and late starts against the compaction
schedule, and the timeouts all its processes share. Pure: the worker processes
(workers.py) act it out, verify.py checks against it."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass

from shmwatch.wire.ops import prefix_range_end

KEYSPACE = "stress/"
KEY_GROUPS = 4  # keys are stress/<i % 4>/<i>: a prefix watch covers a quarter of them
START_COMPACT = -1  # a late watcher's start_revision: the compaction point when it starts

# Where the plan puts things, as fractions of the run's duration. A short stall starts
# once the load is steady and lasts half a compaction interval (it resumes within the
# history kept); a long one spans most of the run, so the history it missed is
# compacted meanwhile; late watchers start from revision 1 before the first compaction,
# and from the compaction point after a few.
STALL_AT = 0.15
STALL_LONG = (0.05, 0.8)
LATE_FROM_ONE_AT = 0.25
LATE_FROM_COMPACT_AT = 0.6
# A range watch covers this many keys at least, and fewer than the maximum.
RANGE_KEYS = (2, 12)

# Timeouts every process of a run shares. The broker answers a connect at once unless it
# is gone; start-up waits for every process to connect (spawn imports the package in
# each, which on a loaded 2-core machine takes seconds).
CONNECT_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0


def key_name(i: int) -> str:
    return f"{KEYSPACE}{i % KEY_GROUPS}/{i:03d}"


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


def plan_watchers(a: argparse.Namespace, rnd: random.Random,
                  interval: float) -> list[WatchSpec]:
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
                      filters=_filters(i, kind))
        if beh == "stall":
            s.stall = (STALL_AT * d, STALL_AT * d + interval / 2)
        elif beh == "stall-long":
            s.stall = (STALL_LONG[0] * d, STALL_LONG[1] * d)
        elif beh == "late":
            s.start_revision, s.start_at = (1, LATE_FROM_ONE_AT * d) if lates % 2 == 0 else \
                (START_COMPACT, LATE_FROM_COMPACT_AT * d)
            lates += 1
        specs.append(s)
    return specs


def _filters(i: int, kind: str) -> tuple[str, ...]:
    """A fixed mix: one watcher in five drops DELETEs, another in five PUTs (not a
    single-key watch: it would see nothing most runs)."""
    if i % 5 == 3:
        return ("nodelete",)
    if i % 5 == 0 and kind != "key":
        return ("noput",)
    return ()


def _range(i: int, beh: str, keys: int, rnd: random.Random) -> tuple:
    """A watch's kind, key and end. Stalling and slow watchers watch (nearly) every key,
    so their rings fill while they do not read."""
    if beh == "stall":
        return "prefix", KEYSPACE.encode(), prefix_range_end(KEYSPACE.encode())
    if beh == "stall-long":
        return "fromkey", key_name(0).encode(), b"\0"
    if beh == "slow":
        return "range", key_name(0).encode(), key_name(keys - 1).encode()
    kind = ("key", "prefix", "range", "fromkey")[i % 4]
    a = rnd.randrange(keys)
    if kind == "key":
        return kind, key_name(a).encode(), None
    if kind == "prefix":
        p = f"{KEYSPACE}{a % KEY_GROUPS}/".encode()
        return kind, p, prefix_range_end(p)
    if kind == "range":
        lo, hi = sorted((a, min(keys - 1, a + rnd.randrange(*RANGE_KEYS))))
        lo_k, hi_k = key_name(lo), key_name(hi)
        if lo_k >= hi_k:
            lo_k, hi_k = key_name(0), key_name(keys - 1)
        return kind, lo_k.encode(), hi_k.encode()
    return kind, key_name(a).encode(), b"\0"
