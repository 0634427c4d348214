"""Many writer and watcher processes on one broker; every stream proved against the log.

4 writer processes x 1,000 puts / deletes / multi-key txns on 24 overlapping keys, and 8
watcher processes (single keys, prefixes, ranges, from-key; half of them started at
revision 1 after the writes began, half with prev_kv). After the writers finish, a watch
from revision 1 on every key, in this process, gives the whole history. Each watcher's
stream must be exactly the history's events matching it from its start revision: in
order, no gap, no duplicate, and all events of one revision in one response. Every
revision a writer had acknowledged must be in the history, with the writer's changes.
No timing assertions: every wait is bounded, nothing is measured.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

import broker
import clientlib
from tests import mp_workers
from tests.mp_workers import check_acks, check_stream, load, mp_key, read_history, reap

N_WRITERS = 4
N_OPS = 1000
N_KEYS = 24

# (key, range_end, prefix, late: start at revision 1 after the writes began, prev_kv)
SPECS = [
    ("mp/0/00", None, False, False, False),          # one key
    ("mp/1/04", None, False, True, True),            # one key, late
    ("mp/1/", None, True, False, True),              # prefix
    ("mp/2/", None, True, True, False),              # prefix, late
    ("mp/0/03", b"mp/1/10", False, False, False),    # range
    ("mp/1/05", b"mp/2/20", False, True, True),      # range, late
    ("mp/1/", b"\0", False, False, False),           # from-key
    ("mp/2/1", b"\0", False, True, True),            # from-key, late
]


@pytest.mark.timeout(180)
def test_writers_and_watchers_streams_match_the_log(tmp_path):
    ctx = mp.get_context("spawn")
    procs = []
    with broker.spawn() as b:
        try:
            start, began, done = ctx.Event(), ctx.Event(), ctx.Event()
            final = ctx.Value("q", 0)
            watchers = []
            for i, spec in enumerate(SPECS):
                key, end, prefix, late, prev_kv = spec
                ready = ctx.Event()
                wspec = {"key": key, "range_end": end, "prefix": prefix,
                         "start_revision": 1 if late else 0, "prev_kv": prev_kv}
                p = ctx.Process(target=mp_workers.watcher,
                                args=(b.name, wspec, str(tmp_path / f"w{i}"), ready, done,
                                      final),
                                kwargs={"go": began if late else None}, daemon=True)
                watchers.append((p, ready, spec))
            writers = [ctx.Process(target=mp_workers.writer,
                                   args=(b.name, i, N_OPS, N_KEYS, 1000 + i,
                                         str(tmp_path / f"p{i}"), start),
                                   kwargs={"began": began if i == 0 else None,
                                           "began_after": 150}, daemon=True)
                       for i in range(N_WRITERS)]
            procs = [w[0] for w in watchers] + writers
            for p in procs:
                p.start()
            for _p, ready, spec in watchers:
                if not spec[3]:
                    assert ready.wait(60), f"watcher {spec} was not created"
            start.set()
            for p in writers:
                p.join(120)
                assert p.exitcode == 0, f"writer exit code {p.exitcode}"
            with clientlib.connect(b.name, timeout=20) as c:
                final_rev = c.get("mp/").revision
                assert final_rev > N_WRITERS * N_OPS // 2
                final.value = final_rev
                done.set()
                for p, _ready, spec in watchers:
                    p.join(120)
                    assert p.exitcode == 0, f"watcher {spec} exit code {p.exitcode}"
                history = read_history(c, final_rev)
        finally:
            reap(procs)

    acks = [a for i in range(N_WRITERS) for a in load(str(tmp_path / f"p{i}"))]
    check_acks(acks, history, final_rev)
    for i, (_p, _ready, spec) in enumerate(watchers):
        check_stream(i, spec, load(str(tmp_path / f"w{i}")), history, final_rev)
    # Sanity of the test itself: it exercised what it claims to.
    assert any(len(ch) > 1 for _rev, kind, ch in acks if kind == "txn")
    assert any(kind == "delete" for _rev, kind, _ch in acks)
    assert len({kv[0] for _t, kv, _p in history}) == N_KEYS
    assert all(kv[0] in {mp_key(i).encode() for i in range(N_KEYS)} for _t, kv, _p in history)
