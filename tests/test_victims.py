"""A watcher process that stops reading becomes a victim; the others do not notice.

With a small per-watcher ring the broker cannot keep writing to a watcher that does not
read: it becomes a victim (etcd's watchableStore), costs nothing per write, and catches
up from the revision log when it reads again: every event, in order, no gap. If the log
wrapped past it in the meantime (or an explicit compaction passed it), it is cancelled
with `compact_revision`: never a silent gap. No timing assertions: only completeness,
every wait bounded by a deadline.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

import broker
import clientlib
from broker.admin import read_stats
from tests import mp_workers
from tests.mp_workers import (
    check_acks,
    check_stream,
    first_difference,
    load,
    parse_stream,
    read_history,
    reap,
    wait_for,
)

VALUE = "x" * 120
CTX = mp.get_context("spawn")


def brief(events) -> list:
    """(type, key, value, mod_revision) of encoded events."""
    return [(t, kv[0], kv[1], kv[3]) for t, kv, _prev in events]


class Puts:
    """Puts from this process on keys v/0..v/7, remembering each acknowledged revision."""

    def __init__(self, c: clientlib.Client):
        self.c = c
        self.done: list[tuple] = []

    def write(self, n: int, value: str = VALUE) -> int:
        for _ in range(n):
            i = len(self.done)
            k, v = f"v/{i % 8}", f"{i}:{value}"
            r = self.c.put(k, v)
            self.done.append(("PUT", k.encode(), v.encode(), r.revision))
        return self.done[-1][3]

    def since(self, first_rev: int) -> list:
        return [e for e in self.done if e[3] >= first_rev]


class Watchers:
    """Watcher processes (tests/mp_workers.watcher) on one broker, and their records."""

    def __init__(self, name: str, tmp_path):
        self.name = name
        self.tmp = tmp_path
        self.done = CTX.Event()
        self.final = CTX.Value("q", 0)
        self.procs: list = []
        self.ready: list = []
        self.counts: list = []

    def start(self, spec: dict, *, stalled: bool = False):
        """Start one; returns (process, resume event or None, event counter)."""
        resume = CTX.Event() if stalled else None
        ready, count = CTX.Event(), CTX.Value("q", 0)
        i = len(self.procs)
        p = CTX.Process(target=mp_workers.watcher,
                        args=(self.name, spec, str(self.tmp / f"w{i}"), ready, self.done,
                              self.final),
                        kwargs={"count": count, "resume": resume}, daemon=True)
        p.start()
        self.procs.append(p)
        self.ready.append(ready)
        self.counts.append(count)
        return p, resume, count

    def wait_ready(self) -> None:
        for r in self.ready:
            assert r.wait(60), "a watcher process did not create its watch"

    def finish(self, final_rev: int) -> None:
        """Tell every watcher the writes are over at `final_rev`."""
        self.final.value = final_rev
        self.done.set()

    def join(self, p) -> list:
        p.join(60)
        assert p.exitcode == 0, f"watcher process exit code {p.exitcode}"
        return load(str(self.tmp / f"w{self.procs.index(p)}"))


def watcher_state(name: str, pid: int) -> str | None:
    """The broker's view of the (only) watcher of process `pid`, from its metrics."""
    for row in read_stats(name)["top_watchers"]:
        if row["pid"] == pid:
            return row["state"]
    return None


def wait_victim(name: str, pid: int, puts: Puts, batch: int = 10) -> None:
    """Keep writing until the broker reports process `pid`'s watcher as a victim."""
    def victim():
        if watcher_state(name, pid) == "victim":
            return True
        puts.write(batch)
        return False

    wait_for(victim, 60, f"the watcher of pid {pid} to become a victim", interval=0.01)
    assert read_stats(name)["watchers"]["victim"] >= 1


def final_stats(name: str, rev: int) -> dict | None:
    s = read_stats(name)
    return s if s["revision"] == rev else None


def wait_count(count, n: int, what: str) -> None:
    wait_for(lambda: count.value >= n, 60, f"{what} to receive {n} events "
             f"(has {count.value})")
    assert count.value == n, f"{what} received {count.value} events, {n} were written"


def complete_stream(label: str, got: list, puts: Puts, final_rev: int) -> None:
    created, flat, last = parse_stream(label, got)
    assert last[0] == -1 and last[1] >= final_rev and not last[3], \
        f"{label}: the stream does not end at a progress response: {last[:7]}"
    want = puts.since(created[1] + 1)
    assert brief(flat) == want, first_difference(label, brief(flat), want)


@pytest.mark.timeout(120)
def test_stalled_watcher_becomes_victim_and_catches_up_without_gap(tmp_path):
    procs = []
    with broker.spawn(watch_ring_bytes=4096) as b, \
            clientlib.connect(b.name, timeout=20) as c:
        ws = Watchers(b.name, tmp_path)
        procs = ws.procs
        try:
            stalled, resume, _ = ws.start({"key": "v/", "prefix": True}, stalled=True)
            fast1, _, n1 = ws.start({"key": "v/", "prefix": True})
            fast2, _, n2 = ws.start({"key": "v/", "range_end": b"\0"})
            ws.wait_ready()
            puts = Puts(c)
            wait_victim(b.name, stalled.pid, puts)
            before = (n1.value, n2.value)
            final_rev = puts.write(300)
            # The others keep receiving, all of it, while it stays stalled.
            wait_count(n1, len(puts.done), "the first fast watcher")
            wait_count(n2, len(puts.done), "the second fast watcher")
            assert n1.value > before[0] and n2.value > before[1]
            assert watcher_state(b.name, stalled.pid) == "victim"
            ws.finish(final_rev)
            resume.set()
            for p in (stalled, fast1, fast2):
                complete_stream(f"pid {p.pid}", ws.join(p), puts, final_rev)
            stats = read_stats(b.name)
            assert stats["victims_entered"] >= 1
            assert stats["compactions"] == 0
        finally:
            reap(procs)


@pytest.mark.timeout(120)
def test_log_wraps_past_victim_cancels_it_with_compact_revision(tmp_path):
    procs = []
    with broker.spawn(watch_ring_bytes=4096, log_bytes=64 << 10) as b, \
            clientlib.connect(b.name, timeout=20) as c:
        ws = Watchers(b.name, tmp_path)
        procs = ws.procs
        try:
            stalled, resume, _ = ws.start({"key": "v/", "prefix": True}, stalled=True)
            fast, _, n_fast = ws.start({"key": "v/", "prefix": True})
            ws.wait_ready()
            puts = Puts(c)
            wait_victim(b.name, stalled.pid, puts)
            victim_rev = puts.done[-1][3]

            # Write until the log's oldest revision is well past the victim's position,
            # in batches the fast watcher keeps up with (it must not be compacted).
            def wrapped():
                puts.write(20)
                wait_count(n_fast, len(puts.done), "the fast watcher")
                return read_stats(b.name)["compact_revision"] > victim_rev + 50

            wait_for(wrapped, 60, "the revision log to wrap past the victim")
            final_rev = puts.write(5)
            wait_count(n_fast, len(puts.done), "the fast watcher")
            stats = wait_for(lambda: final_stats(b.name, final_rev), 10,
                             "the metrics to show the final revision")
            compact_rev = stats["compact_revision"]
            assert compact_rev == stats["log"]["oldest_rev"] > victim_rev
            assert watcher_state(b.name, stalled.pid) == "victim"
            # The compaction point is the same for reads.
            with pytest.raises(clientlib.CompactedError):
                c.get("v/0", revision=compact_rev - 1)
            assert c.get("v/", prefix=True, revision=compact_rev).revision == final_rev

            ws.finish(final_rev)
            resume.set()
            got = ws.join(stalled)
            created, flat, last = parse_stream("stalled", got)
            assert last[3] and last[4] == compact_rev, \
                f"expected a cancel with compact_revision {compact_rev}: {last[:7]}"
            want = puts.since(created[1] + 1)
            assert brief(flat) == want[:len(flat)], \
                first_difference("stalled (must be a prefix)", brief(flat), want[:len(flat)])
            assert len(flat) < len(want) and want[len(flat)][3] < compact_rev, \
                "canceled although the first revision it missed was still retained"
            complete_stream("fast", ws.join(fast), puts, final_rev)
            wait_for(lambda: read_stats(b.name)["compactions"] >= 1, 10,
                     "the metrics to count the compaction cancel")

            # A new watch from the compaction point gets the retained history, in order.
            with c.watch("v/", prefix=True, start_revision=compact_rev) as w:
                assert w.get(10).created
                flat = []
                while not flat or flat[-1][3] < final_rev:
                    r = w.get(20)
                    assert not r.canceled, r
                    flat.extend((e.type, e.kv.key, e.kv.value, e.kv.mod_revision)
                                for e in r.events)
                want = puts.since(compact_rev)
                assert flat == want, first_difference("from compact_rev", flat, want)
            # ... and one from just before it is cancelled at once, with the same point.
            w = c.watch("v/", prefix=True, start_revision=compact_rev - 1)
            assert w.get(10).created
            r = w.get(10)
            assert r.canceled and r.compact_revision == compact_rev and not r.events
            with pytest.raises(clientlib.CompactedError):
                w.get(1)
        finally:
            reap(procs)


@pytest.mark.timeout(120)
def test_explicit_compact_past_victim_cancels_it_at_that_revision(tmp_path):
    procs = []
    with broker.spawn(watch_ring_bytes=4096) as b, \
            clientlib.connect(b.name, timeout=20) as c:
        ws = Watchers(b.name, tmp_path)
        procs = ws.procs
        try:
            stalled, resume, _ = ws.start({"key": "v/", "prefix": True}, stalled=True)
            fast, _, n_fast = ws.start({"key": "v/", "range_end": b"\0"})
            ws.wait_ready()
            puts = Puts(c)
            wait_victim(b.name, stalled.pid, puts)
            rev = puts.write(50)
            wait_count(n_fast, len(puts.done), "the fast watcher")  # synced, past rev
            assert c.compact(rev).revision == rev
            final_rev = puts.write(20)
            wait_count(n_fast, len(puts.done), "the fast watcher")
            ws.finish(final_rev)
            resume.set()
            created, flat, last = parse_stream("stalled", ws.join(stalled))
            assert last[3] and last[4] == rev, \
                f"expected a cancel with compact_revision {rev}: {last[:7]}"
            want = puts.since(created[1] + 1)
            assert brief(flat) == want[:len(flat)], \
                first_difference("stalled (must be a prefix)", brief(flat), want[:len(flat)])
            assert want[len(flat)][3] < rev
            complete_stream("fast", ws.join(fast), puts, final_rev)
        finally:
            reap(procs)


@pytest.mark.timeout(120)
def test_dead_slow_watcher_does_not_hold_back_the_others(tmp_path):
    procs = []
    with broker.spawn(watch_ring_bytes=4096) as b:
        ws = Watchers(b.name, tmp_path)
        procs = ws.procs
        try:
            specs = [  # (key, range_end, prefix, late, prev_kv) as tests.mp_workers takes
                ("mp/", None, True, False, False),          # the stalled one
                ("mp/1/", None, True, False, True),
                ("mp/0/03", b"mp/2/11", False, False, False),
                ("mp/", b"\0", False, False, True),
            ]
            started = [ws.start({"key": k, "range_end": e, "prefix": p, "prev_kv": pk},
                                stalled=i == 0)
                       for i, (k, e, p, _late, pk) in enumerate(specs)]
            stalled, resume = started[0][0], started[0][1]
            ws.wait_ready()
            start = CTX.Event()
            writer = CTX.Process(target=mp_workers.writer,
                                 args=(b.name, 0, 1000, 24, 7, str(tmp_path / "p0"), start),
                                 daemon=True)
            procs.append(writer)
            writer.start()
            start.set()
            writer.join(90)
            assert writer.exitcode == 0
            with clientlib.connect(b.name, timeout=20) as c:
                final_rev = c.get("mp/").revision
                ws.finish(final_rev)
                # Every fast watcher completes while the stalled one is still a victim.
                outs = [ws.join(p) for p, _, _ in started[1:]]
                assert watcher_state(b.name, stalled.pid) == "victim"
                resume.set()
                outs.insert(0, ws.join(stalled))
                history = read_history(c, final_rev)
            check_acks(load(str(tmp_path / "p0")), history, final_rev)
            for i, (spec, got) in enumerate(zip(specs, outs)):
                check_stream(i, spec, got, history, final_rev)
        finally:
            reap(procs)


@pytest.mark.timeout(120)
def test_killed_victim_is_dropped_and_the_others_go_on(tmp_path):
    procs = []
    with broker.spawn(watch_ring_bytes=4096) as b, \
            clientlib.connect(b.name, timeout=20) as c:
        ws = Watchers(b.name, tmp_path)
        procs = ws.procs
        try:
            stalled, _resume, _ = ws.start({"key": "v/", "prefix": True}, stalled=True)
            fast, _, n_fast = ws.start({"key": "v/", "prefix": True})
            ws.wait_ready()
            puts = Puts(c)
            wait_victim(b.name, stalled.pid, puts)
            stalled.kill()
            stalled.join(10)
            wait_for(lambda: all(x["pid"] != stalled.pid
                                 for x in read_stats(b.name)["clients"]), 10,
                     "the killed victim's client to be reclaimed")
            wait_for(lambda: read_stats(b.name)["watchers"]["victim"] == 0, 10,
                     "the victim count to drop to 0")
            final_rev = puts.write(200)
            wait_count(n_fast, len(puts.done), "the fast watcher")
            ws.finish(final_rev)
            complete_stream("fast", ws.join(fast), puts, final_rev)
            wait_for(lambda: read_stats(b.name)["watchers"]["total"] == 0, 10,
                     "the watchers to be gone")
            assert read_stats(b.name)["pending_events"] == 0
        finally:
            reap(procs)

@pytest.mark.timeout(60)
def test_revision_larger_than_the_log_keeps_one_compaction_point():
    with broker.spawn(log_bytes=64 << 10) as b, clientlib.connect(b.name, timeout=20) as c:
        c.put("h", "small")
        rev = c.put("h", "B" * 100_000).revision  # cannot fit a 64k log
        stats = wait_for(lambda: final_stats(b.name, rev), 10, "the metrics to show it")
        reported = stats["compact_revision"]
        assert c.get("h", revision=reported).revision == rev  # readable at that point
        w = c.watch("h", start_revision=rev - 1)  # before the compaction point
        assert w.get(10).created
        r = w.get(10)
        assert r.canceled and r.compact_revision, r
        assert r.compact_revision <= rev, \
            f"compact_revision {r.compact_revision} is above the current revision {rev}"
        assert r.compact_revision == reported, \
            f"cancelled at {r.compact_revision}, the broker reports {reported}"
        w = c.watch("h", start_revision=reported)  # etcd: a watch from compact_rev works
        assert w.get(10).created
        r = w.get(10)
        assert not r.canceled, f"a watch from the reported compact_revision was cancelled: {r}"
