"""Attack: every watch stream is exact under victims, with tiny rings.

A randomized multi-process run per seed: two writers (small and large values, deletes
of whole groups, multi-key txns), clients holding several watches each (keys, prefixes,
ranges, from-key; prev_kv, filters, fragment; from now or from revision 1) read at
different paces (fast, slow, stalling, reading one response then stalling, not reading
until the end), watch rings of 4-16 KiB so that nearly every watcher becomes a victim,
revisions larger than a ring, and explicit compactions while they lag. Every stream is
checked against the history rebuilt from the writers' acknowledgements: no gap, no
duplicate, no reorder, no split revision (outside fragments), prev_kv and filters
right, or a compaction cancel that was due.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import time

import pytest

import broker
import clientlib
from broker.admin import broker_info, read_stats
from tests import attack_workers as aw
from tests.mp_workers import reap

FORK = mp.get_context("fork")
PACES = ["fast", "slow", "stall", "one_then_stall", "late", "recreate"]


def _spec(rnd: random.Random) -> dict:
    kind = rnd.randrange(5)
    if kind == 0:
        s = {"key": rnd.choice(aw.KEYS)}
    elif kind == 1:
        s = {"key": f"x/{rnd.choice(aw.GROUPS)}/", "prefix": True}
    elif kind == 2:
        s = {"key": "x/a/2", "range_end": b"x/b/3"}
    elif kind == 3:
        s = {"key": "x/b/", "range_end": b"\0"}
    else:
        s = {"key": "x/", "prefix": True}
    s["prev_kv"] = rnd.random() < 0.5
    s["filters"] = rnd.choice([[], [], ["noput"], ["nodelete"]])
    s["fragment"] = rnd.random() < 0.4
    s["start_revision"] = rnd.choice([0, 0, 1])
    s["mid"] = rnd.random() < 0.2  # created during the run, from a recent revision
    s["pace"] = rnd.choice(PACES)
    if s["pace"] == "recreate":
        s["fragment"] = False  # resuming inside a fragmented revision is not modelled
    return s


def run_exactness(seed: int, tmp_path, *, n_clients: int = 3, watches_per_client: int = 3,
                  n_ops: int = 600, log_bytes: str = "64M") -> dict:
    """One run; `log_bytes` small enough to wrap makes the log compact on its own (then
    any revision up to the final compaction point may have been one, which weakens
    only the check of compaction revisions' contents)."""
    rnd = random.Random(seed)
    ring = rnd.choice(["4k", "8k", "16k"])
    # max_request_bytes 96k: large values are up to 90 KB, and a delete of every key
    # with prev_kv (up to ~1 MB) passes the fragment limit of 96k + 512 KiB.
    opts = dict(watch_ring_bytes=ring, log_bytes=log_bytes, max_request_bytes=96 * 1024)
    specs = [[_spec(rnd) for _ in range(watches_per_client)] for _ in range(n_clients)]
    pace = rnd.choice([0.0, 0.001, 0.003])
    lag = rnd.choice([None, 300, 30])  # compactions: none, keeping 300 revisions, or 30
    procs = []
    with broker.spawn(**opts) as b, clientlib.connect(b.name, timeout=20) as c:
        start, done = FORK.Event(), FORK.Event()
        final_rev = FORK.Value("q", 0)
        readies = []
        for i, ss in enumerate(specs):
            ready = FORK.Event()
            readies.append(ready)
            procs.append(FORK.Process(target=aw.watch_client, args=(
                b.name, ss, seed * 100 + i, str(tmp_path / f"w{i}"), ready, done, final_rev)))
        for i in range(2):
            procs.append(FORK.Process(target=aw.writer, args=(
                b.name, i, seed * 10 + i, n_ops, 90_000, str(tmp_path / f"acks{i}"), start,
                pace)))
        try:
            for p in procs:
                p.start()
            for r in readies:
                assert r.wait(30), "a watch client did not start"
            start.set()
            compactions: set[int] = set()
            deadline = time.monotonic() + 60
            writers = procs[-2:]
            while any(p.is_alive() for p in writers) and time.monotonic() < deadline:
                time.sleep(0.05)
                rev = broker_info(b.name)["revision"]
                if lag and rnd.random() < 0.2 and rev > lag + 10:
                    target = rev - rnd.randrange(lag // 2, lag)
                    if target > max(compactions, default=1):
                        try:
                            c.compact(target)
                            compactions.add(target)
                        except clientlib.CompactedError:
                            pass  # the log wrapped past it already
            for p in writers:
                p.join(30)
                assert p.exitcode == 0, "a writer failed (see its stderr)"
            final = c.get("x/", prefix=True, count_only=True).revision
            final_rev.value = final
            done.set()
            for p in procs[:-2]:
                p.join(DEADLINE_JOIN)
                assert p.exitcode == 0, "a watch client failed (see its stderr)"
            final_compact = broker_info(b.name)["compact_revision"]
            if log_bytes == "64M":
                assert final_compact == max(compactions, default=0), \
                    "the revision log wrapped: the run's compaction points are unknown"
            else:
                compactions |= set(range(1, final_compact + 1))
            time.sleep(0.3)  # the metrics are published a few times a second
            victims = read_stats(b.name)["victims_entered"]
        finally:
            reap(procs)
    acks = aw.load(str(tmp_path / "acks0")) + aw.load(str(tmp_path / "acks1"))
    hist = aw.history(acks)
    assert max(hist) == final
    events = streams = cancels = 0
    for i in range(len(specs)):
        ss, got = aw.load(str(tmp_path / f"w{i}"))
        for j, (s, g) in enumerate(zip(ss, got)):
            events += aw.check_stream(f"seed {seed} ring {ring} client {i} watch {j} {s}", s, g,
                                      hist, final, compactions)
            streams += 1
            cancels += bool(g[-1][3])
    return {"ring": ring, "pace": pace, "lag": lag, "events": events, "streams": streams,
            "cancels": cancels, "victims": victims, "revisions": final,
            "compactions": len(compactions)}


DEADLINE_JOIN = 45


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed,log_bytes", [(1, "64M"), (2, "64M"), (4, "64M"), (3, "2M")])
def test_every_stream_is_exact_under_victims_tiny_rings_and_compaction(seed, log_bytes,
                                                                        tmp_path):
    out = run_exactness(seed, tmp_path, log_bytes=log_bytes)
    assert out["streams"] == 9 and out["events"] > 0
    assert out["victims"] > 0, f"no watcher became a victim: the run proved little ({out})"


if __name__ == "__main__":  # a longer hunt: python -m tests.test_attack_exactness N [LOG]
    import pathlib
    import sys
    import tempfile

    for s in range(int(sys.argv[1]) if len(sys.argv) > 1 else 10):
        with tempfile.TemporaryDirectory() as d:
            print(s, run_exactness(s, pathlib.Path(d), log_bytes=sys.argv[2] if len(sys.argv) > 2
                                   else "64M"), flush=True)
    os._exit(0)
