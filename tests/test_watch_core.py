"""The pure watch core: life cycle, victims, catch-up, compaction, fairness, matching."""

from __future__ import annotations

import random
import weakref

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker import watch as W
from broker.batches import responses
from broker.outbox import RingWriter
from broker.watch import WatchCore, WatchStream
from broker.watcher_group import IntervalIndex, Watcher, WatcherGroup
from shmwatch.wire.events import log_record
from shmwatch.wire.protocol import FILTER_NODELETE, FILTER_NOPUT, WatchSpec
from shmwatch.wire.types import Event, KeyValue
from tests.fakes import FakeRing


class History:
    """A revision log in a list, plus a tiny store to produce realistic events."""

    def __init__(self):
        self.rev = 1
        self.log: list[tuple[int, list[Event]]] = []
        self.kv: dict[bytes, KeyValue] = {}

    def put(self, *keys: bytes, value: bytes = b"v") -> tuple[int, list[Event]]:
        self.rev += 1
        evs = []
        for k in keys:
            prev = self.kv.get(k)
            kv = KeyValue(k, value, prev.create_revision if prev else self.rev, self.rev,
                          prev.version + 1 if prev else 1, 0)
            self.kv[k] = kv
            evs.append(Event("PUT", kv, prev))
        self.log.append((self.rev, evs))
        return self.rev, evs

    def delete(self, k: bytes) -> tuple[int, list[Event]]:
        self.rev += 1
        prev = self.kv.pop(k)
        evs = [Event("DELETE", KeyValue(k, b"", 0, self.rev, 0, 0), prev)]
        self.log.append((self.rev, evs))
        return self.rev, evs

    def read(self, lo: int, hi: int):
        for rev, evs in self.log:
            if lo <= rev <= hi:
                yield rev, log_record(evs)[1]


_STREAMS: "weakref.WeakKeyDictionary[WatchCore, WatchStream]" = weakref.WeakKeyDictionary()


def stream_of(core: WatchCore) -> WatchStream:
    """The one client stream a test's watchers share (the owner of their held bytes)."""
    stream = _STREAMS.get(core)
    if stream is None:
        stream = _STREAMS[core] = WatchStream("client")
    return stream


def make(core: WatchCore, wid: int, key: bytes, end: bytes | None = None, *, start: int = 0,
         cap: int = 1 << 16, prev_kv: bool = False, filters: int = 0,
         progress_notify: bool = False, fragment: bool = False) -> tuple[Watcher, FakeRing]:
    ring = FakeRing(cap)
    stream = stream_of(core)
    spec = WatchSpec(key, end, start, prev_kv, filters, progress_notify, fragment)
    got, refused, _ = core.create(stream, spec, wid, RingWriter(ring), ("ring", wid))
    assert not refused and got == wid
    core._check()
    return stream.watchers[wid], ring


def revs_of(responses) -> list[int]:
    return [e.kv.mod_revision for r in responses for e in r.events]


def commit(core: WatchCore, hist: History, step) -> None:
    rev, evs = step
    core.notify(rev, log_record(evs)[1])
    core._check()


def test_created_first_then_live_events():
    core, h = WatchCore(), History()
    w, ring = make(core, 0, b"a")
    commit(core, h, h.put(b"a"))
    commit(core, h, h.put(b"b"))
    out = ring.read_all()
    assert out[0].created and out[0].revision == 1 and not out[0].events
    assert [(r.revision, [e.kv.key for e in r.events]) for r in out[1:]] == [(2, [b"a"])]
    assert w.state == W.SYNCED


def test_future_start_revision_skips_earlier_events():
    core, h = WatchCore(), History()
    w, ring = make(core, 0, b"a", start=4)
    for _ in range(4):
        commit(core, h, h.put(b"a"))
    assert revs_of(ring.read_all()) == [4, 5]


def test_range_prefix_fromkey_and_filters():
    core, h = WatchCore(), History()
    _, rng = make(core, 0, b"b", b"d")
    _, fromkey = make(core, 1, b"c", b"\0")
    _, noput = make(core, 2, b"a", b"z", filters=FILTER_NOPUT)
    _, nodel = make(core, 3, b"a", b"z", filters=FILTER_NODELETE)
    for k in (b"a", b"b", b"c", b"d", b"zz"):
        commit(core, h, h.put(k))
    commit(core, h, h.delete(b"c"))
    keys = lambda ring: [(e.type, e.kv.key) for r in ring.read_all() for e in r.events]  # noqa: E731
    assert keys(rng) == [("PUT", b"b"), ("PUT", b"c"), ("DELETE", b"c")]
    assert keys(fromkey) == [("PUT", b"c"), ("PUT", b"d"), ("PUT", b"zz"), ("DELETE", b"c")]
    assert keys(noput) == [("DELETE", b"c")]
    assert keys(nodel) == [("PUT", k) for k in (b"a", b"b", b"c", b"d")]


def test_one_revision_several_events_share_one_response_and_encoding():
    core, h = WatchCore(), History()
    _, r1 = make(core, 0, b"a", b"z")
    _, r2 = make(core, 1, b"a", b"z")
    _, r3 = make(core, 2, b"b")
    commit(core, h, h.put(b"a", b"b", b"c"))
    for ring in (r1, r2):
        out = ring.read_all()[1:]
        assert len(out) == 1 and [e.kv.key for e in out[0].events] == [b"a", b"b", b"c"]
    out = r3.read_all()[1:]
    assert len(out) == 1 and [e.kv.key for e in out[0].events] == [b"b"]


def test_prev_kv_only_for_watchers_that_asked():
    core, h = WatchCore(), History()
    _, plain = make(core, 0, b"a")
    _, withprev = make(core, 1, b"a", prev_kv=True)
    commit(core, h, h.put(b"a", value=b"1"))
    commit(core, h, h.put(b"a", value=b"2"))
    assert [e.prev_kv for r in plain.read_all() for e in r.events] == [None, None]
    prevs = [e.prev_kv for r in withprev.read_all() for e in r.events]
    assert prevs[0] is None and prevs[1].value == b"1"


def test_victim_then_unsynced_then_synced_without_loss():
    core, h = WatchCore(), History()
    slow, ring = make(core, 0, b"k", cap=512)
    fast, fring = make(core, 1, b"k")
    got = ring.read_all()
    for _ in range(30):
        commit(core, h, h.put(b"k", value=b"x" * 20))
    # A victim holds nothing: the revision its ring refused stays in the log.
    assert slow.state == W.VICTIM and not slow.out.pending and stream_of(core).held == 0
    assert core.victims_entered == 1
    victim_at = slow.min_rev
    # While a victim: no work for it, nothing more delivered, fast watcher unaffected.
    assert slow not in core.synced
    assert revs_of(fring.read_all()) == list(range(2, 32))
    core.move_victims()
    assert slow.state == W.VICTIM  # consumer still stalled
    got += ring.read_all()
    core.move_victims()
    core._check()
    assert slow.state == W.UNSYNCED and slow.min_rev == victim_at
    while slow.state != W.SYNCED:
        core.sync_watchers(h.read)
        core._check()
        got += ring.read_all()
        core.move_victims()
    got += ring.read_all()
    assert revs_of(got) == list(range(2, 32))
    # The backlog came back in multi-revision catch-up responses.
    assert max(len(r.events) for r in got) > 1
    commit(core, h, h.put(b"k"))
    assert revs_of(ring.read_all()) == [32]


def test_victim_resumes_only_once_half_its_ring_is_free():
    core, h = WatchCore(), History()
    w, ring = make(core, 0, b"k", cap=1024)
    ring.read_all()
    for _ in range(40):
        commit(core, h, h.put(b"k", value=b"x" * 20))
    assert w.state == W.VICTIM
    # The reader takes one response: not enough room yet, no one-revision catch-up.
    data, more = ring.records.popleft()
    ring.used -= len(data) + 8
    core.move_victims()
    assert w.state == W.VICTIM and w.out.sink.producer_blocked
    ring.read_all()
    core.move_victims()
    assert w.state == W.UNSYNCED
    core.sync_watchers(h.read)
    out = ring.read_all()
    assert len(out) == 1 and len(out[0].events) > 1


def test_owner_over_budget_waits_instead_of_holding_more():
    """Responses that could only go out in part are not started while the owner holds
    more than its budget: the watcher waits as a victim and holds nothing."""
    core, h = WatchCore(owner_budget=1000), History()
    a, ra = make(core, 0, b"a", b"z", cap=256)
    b, rb = make(core, 1, b"a", b"z", cap=256)
    ra.read_all()
    rb.read_all()
    commit(core, h, h.put(*[bytes([97, i]) for i in range(40)], value=b"y" * 30))
    # The first watcher's ring took the start of the big response, the rest is held;
    # the second would exceed the owner's budget: nothing started, nothing held.
    assert a.state == b.state == W.VICTIM
    holder, waiter = (a, b) if a.out.pending else (b, a)
    assert holder.out.pending and not waiter.out.pending and waiter.min_rev == h.rev
    assert stream_of(core).held == holder.out.held > 0
    outs = {0: [], 1: []}
    for _ in range(400):
        outs[0] += ra.read_all()
        outs[1] += rb.read_all()
        core.move_victims()
        core.sync_watchers(h.read)
        core._check()
        assert stream_of(core).held <= 1000 + 4000
        if a.state == W.SYNCED and b.state == W.SYNCED:
            break
    outs[0] += ra.read_all()
    outs[1] += rb.read_all()
    for i in (0, 1):
        assert revs_of(outs[i]) == [h.rev] * 40


def test_revision_larger_than_ring_free_space_streams_through():
    core, h = WatchCore(), History()
    w, ring = make(core, 0, b"a", b"z", cap=256)
    ring.read_all()
    commit(core, h, h.put(*[bytes([97, i]) for i in range(40)], value=b"y" * 30))
    assert w.state == W.VICTIM
    out = []
    for _ in range(200):
        out += ring.read_all()
        core.move_victims()
        if w.state == W.SYNCED:
            break
    out += ring.read_all()
    assert w.state == W.SYNCED
    assert len(out) == 1 and len(out[0].events) == 40


def test_many_victims_at_once_and_max_watchers_per_sync():
    core, h = WatchCore(max_watchers_per_sync=3), History()
    ws = [make(core, i, b"k", cap=256) for i in range(10)]
    for _, ring in ws:
        ring.read_all()
    for _ in range(20):
        commit(core, h, h.put(b"k", value=b"z" * 10))
    assert len(core.victims) == 10
    got = {w.id: [] for w, _ in ws}
    for w, ring in ws:
        got[w.id] += ring.read_all()
    core.move_victims()
    assert len(core.unsynced) == 10
    passes = 0
    while core.unsynced or core.victims:
        before = len(core.unsynced)
        synced = core.sync_watchers(h.read)
        core._check()
        assert synced <= 3 and before - len(core.unsynced) <= 3
        passes += 1
        for w, ring in ws:
            got[w.id] += ring.read_all()
        core.move_victims()
    assert passes >= 4
    for w, ring in ws:
        got[w.id] += ring.read_all()
        assert revs_of(got[w.id]) == list(range(2, 22)), w


def test_catch_up_batches_whole_revisions_by_size_and_count(monkeypatch):
    core, h = WatchCore(max_response_bytes=300, batch_max_revs=4), History()
    for _ in range(12):
        h.put(b"a", b"b", value=b"q")
    core.cur_rev = h.rev
    w, ring = make(core, 0, b"a", b"c", start=2)
    out = ring.read_all()
    while w.state != W.SYNCED:
        core.sync_watchers(h.read)
        out += ring.read_all()
        core.move_victims()
    responses = [r for r in out if r.events]
    assert len(responses) > 2
    for r in responses:
        revs = [e.kv.mod_revision for e in r.events]
        assert len(revs) % 2 == 0 and len(set(revs)) <= 4  # whole revisions, <= 4 of them
        assert r.revision == h.rev
    assert revs_of(responses) == [r for r in range(2, 14) for _ in (0, 1)]


def test_catch_up_response_header_is_current_revision_and_one_response():
    core, h = WatchCore(), History()
    for k in (b"a", b"b", b"a"):
        h.put(k)
    core.cur_rev = h.rev
    w, ring = make(core, 0, b"a", b"c", start=1)
    core.sync_watchers(h.read)
    out = ring.read_all()
    assert [r.created for r in out] == [True, False]
    assert out[1].revision == 4 and revs_of(out[1:]) == [2, 3, 4]
    assert w.state == W.SYNCED


def test_compacted_watcher_is_cancelled_with_compact_revision():
    core, h = WatchCore(), History()
    for _ in range(5):
        h.put(b"a")
    core.cur_rev = h.rev
    core.compact_rev = 4
    w, ring = make(core, 0, b"a", start=2)
    core.sync_watchers(h.read)
    out = ring.read_all()
    assert out[0].created
    assert out[1].canceled and out[1].compact_revision == 4 and out[1].revision == 0
    assert w.state == W.REMOVED and core.compactions == 1
    core._check()


def test_victim_left_behind_by_compaction_is_cancelled_when_it_recovers():
    core, h = WatchCore(), History()
    w, ring = make(core, 0, b"k", cap=256)
    ring.read_all()
    for _ in range(20):
        commit(core, h, h.put(b"k"))
    assert w.state == W.VICTIM
    core.compact_rev = h.rev  # the log wrapped past what it still needs
    first = ring.read_all()
    core.move_victims()
    core.sync_watchers(h.read)
    out = first + ring.read_all()
    assert out[-1].canceled and out[-1].compact_revision == h.rev
    seen = revs_of(out)
    assert seen == list(range(2, 2 + len(seen)))  # a prefix, no gap, then the cancel


def test_cancel_sends_final_response_after_pending():
    core, h = WatchCore(), History()
    w, ring = make(core, 7, b"k", cap=256)
    ring.read_all()
    for _ in range(10):
        commit(core, h, h.put(b"k"))
    assert w.state == W.VICTIM
    core.cancel(w)
    assert w.state == W.CANCELING
    out = ring.read_all()
    core.move_victims()
    out += ring.read_all()
    assert w.state == W.REMOVED
    assert out[-1].canceled and out[-1].revision == h.rev and out[-1].compact_revision == 0


def test_progress_request_waits_for_catch_up():
    core, h = WatchCore(), History()
    for _ in range(3):
        h.put(b"a")
    core.cur_rev = h.rev
    synced, sring = make(core, 0, b"a")
    behind, bring = make(core, 1, b"a", start=1)
    core.request_progress(stream_of(core))
    s = sring.read_all()
    assert s[-1].watch_id == -1 and s[-1].revision == 4 and s[-1].is_progress_notify
    assert [r.created for r in bring.read_all()] == [True]
    core.sync_watchers(h.read)
    out = bring.read_all()
    assert revs_of(out) == [2, 3, 4] and out[-1].watch_id == -1 and out[-1].revision == 4


def test_progress_notify_tick_only_without_events():
    core, h = WatchCore(), History()
    a, ra = make(core, 0, b"a", progress_notify=True)
    b, rb = make(core, 1, b"b", progress_notify=True)
    commit(core, h, h.put(b"a"))
    core.progress_tick([stream_of(core)])
    assert [r.is_progress_notify for r in ra.read_all()[1:]] == [False]
    out = rb.read_all(1)[1:]
    assert len(out) == 1 and out[0].watch_id == 1 and out[0].revision == 2
    core.progress_tick([stream_of(core)])
    assert len(ra.read_all()) == 1


def test_fragments_split_like_etcd():
    enc = [b"x" * 100] * 5
    blobs = responses(9, enc, True, 250)
    assert len(blobs) == 3  # 2 + 2 + 1 events, each under the limit
    assert len(responses(9, enc, True, 10_000)) == 1
    assert len(responses(9, [b"x" * 1000], True, 10)) == 1  # one event is never split
    assert len(responses(9, enc, False, 250)) == 1  # no fragment asked: never split


def test_fragments_start_above_max_request_bytes_plus_grpc_overhead():
    """etcd's watch server splits at --max-request-bytes + 512 KiB, not at the limit."""
    core, h = WatchCore(max_request_bytes=200), History()
    assert core.fragment_limit == 200 + 512 * 1024
    _, ring = make(core, 0, b"a", b"z", fragment=True)
    commit(core, h, h.put(*[bytes([97, i]) for i in range(6)], value=b"v" * 40))
    assert [r.fragment for r in ring.read_all()[1:]] == [False]


def test_fragmenting_watcher_gets_fragments(monkeypatch):
    monkeypatch.setattr(W, "GRPC_OVERHEAD_BYTES", 0)
    core, h = WatchCore(max_request_bytes=200), History()
    _, ring = make(core, 0, b"a", b"z", fragment=True)
    _, whole = make(core, 1, b"a", b"z")
    commit(core, h, h.put(*[bytes([97, i]) for i in range(6)], value=b"v" * 40))
    out = ring.read_all()[1:]
    assert len(out) > 1 and all(r.fragment for r in out[:-1]) and not out[-1].fragment
    assert sum(len(r.events) for r in out) == 6
    assert len(whole.read_all()[1:]) == 1


def test_transitions_table_rejects_unknown_moves():
    core = WatchCore()
    w, _ = make(core, 0, b"a")
    with pytest.raises(AssertionError):
        core._move(w, "caught_up")


def test_every_state_change_goes_through_the_table(monkeypatch):
    """Created, victim, caught up, cancelled, dropped: each change of `state` is a row of
    TRANSITIONS (the table is the whole life cycle)."""
    seen = []
    real = WatchCore._move

    def spy(self, w, event):
        seen.append((w.state, event))
        real(self, w, event)

    monkeypatch.setattr(WatchCore, "_move", spy)
    core, h = WatchCore(), History()
    live, ring = make(core, 0, b"k", cap=256)
    for _ in range(30):
        commit(core, h, h.put(b"k"))
    ring.read_all()
    core.move_victims()
    core.sync_watchers(h.read)
    past, _ = make(core, 1, b"k", start=2)
    core.cancel(live)
    core.drop_stream(stream_of(core))
    assert all(key in W.TRANSITIONS for key in seen), seen
    assert {e for _, e in seen} >= {"created_live", "created_past", "ring_full", "room_behind",
                                     "cancel", "dropped"}
    assert live.state == past.state == W.REMOVED


# ------------------------------------------------------------------ matching structures

intervals = st.tuples(st.binary(max_size=2), st.one_of(st.none(), st.binary(min_size=1, max_size=2)))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.booleans(), intervals, st.integers(0, 3)), max_size=40),
       st.lists(st.binary(max_size=3), max_size=20))
def test_interval_index_matches_brute_force(ops, probes):
    idx = IntervalIndex()
    live: dict[tuple, set] = {}
    for add, (lo, hi), item in ops:
        if hi is not None and lo >= hi:
            continue
        iv = (lo, hi)
        if add:
            idx.add(iv, item)
            live.setdefault(iv, set()).add(item)
        elif item in live.get(iv, ()):
            idx.remove(iv, item)
            live[iv].discard(item)
            if not live[iv]:
                del live[iv]
        idx._check()
    for k in probes:
        want = {iv for iv in live if iv[0] <= k and (iv[1] is None or k < iv[1])}
        assert set(idx.stab(k)) == want


def test_watcher_group_match_equals_brute_force():
    rnd = random.Random(7)
    g = WatcherGroup()
    ws = []
    for i in range(300):
        lo = bytes([rnd.randrange(97, 110)])
        kind = rnd.randrange(3)
        end = None if kind == 0 else b"\0" if kind == 1 else lo + bytes([rnd.randrange(97, 110)])
        w = Watcher(i, None, lo, end, FakeRing())
        g.add(w)
        ws.append(w)
    for w in ws[::3]:
        g.remove(w)
    g._check()
    alive = [w for i, w in enumerate(ws) if i % 3]
    for k in [bytes([c]) for c in range(95, 112)] + [b"ab", b"m\x00"]:
        assert set(g.match(k)) == {w for w in alive if w.matches(k)}


# ------------------------------------------------------------------ model-based

@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_watch_stream_equals_the_model(data):
    """Random writes, random watchers (keys, ranges, from-key, past starts, small rings,
    stalled consumers, compaction): each stream is exactly the model's list of events."""
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    core = WatchCore(max_watchers_per_sync=rnd.choice([1, 2, 512]),
                     max_response_bytes=rnd.choice([200, 1 << 20]))
    h = History()
    keys = [b"a", b"b", b"c", b"d"]
    watchers: list[tuple[Watcher, FakeRing, list]] = []
    for _step in range(data.draw(st.integers(5, 60))):
        r = rnd.random()
        if r < 0.15 and len(watchers) < 8:
            lo = rnd.choice(keys)
            end = rnd.choice([None, b"\0", b"c", b"e"])
            if end not in (None, b"\0") and lo >= end:
                end = None
            start = rnd.choice([0, 0, max(1, h.rev - rnd.randrange(4)), h.rev + 2])
            w, ring = make(core, len(watchers), lo, end, start=start,
                           cap=rnd.choice([160, 512, 1 << 16]))
            watchers.append((w, ring, [], start))
        elif r < 0.2:
            core.compact_rev = max(core.compact_rev, rnd.randrange(1, h.rev + 1))
        elif r < 0.25:
            core.request_progress(stream_of(core))
        else:
            if rnd.random() < 0.2 and h.kv:
                commit(core, h, h.delete(rnd.choice(sorted(h.kv))))
            else:
                commit(core, h, h.put(*rnd.sample(keys, rnd.randrange(1, 3))))
        for w, ring, got, _ in watchers:
            if rnd.random() < 0.5:
                got += ring.read_all(w.id)
        core.move_victims()
        core.sync_watchers(h.read)
        core._check()
    # Drain: every consumer reads until the core has nothing left.
    for _ in range(500):
        for w, ring, got, _ in watchers:
            got += ring.read_all(w.id)
        core.move_victims()
        core.sync_watchers(h.read)
        if not core.unsynced and not core.victims and not core.canceling:
            break
    for w, ring, got, start in watchers:
        got += ring.read_all(w.id)
        assert got[0].created
        # A live watcher (start 0) starts after the revision it was created at; one
        # from the future at its start; one from the past at its start.
        first = start if start else got[0].revision + 1
        evs = [(e.type, e.kv.key, e.kv.mod_revision) for r in got for e in r.events]
        # Model: every event in history matching the watcher, from its first revision.
        model = [(e.type, e.kv.key, rev) for rev, es in h.log for e in es
                 if w.matches(e.kv.key) and rev >= first]
        if got[-1].canceled:
            assert got[-1].compact_revision > 0
            assert evs == model[:len(evs)]  # a prefix, then the compaction cancel
        else:
            assert evs == model
        revs = [r for _, _, r in evs]
        assert revs == sorted(revs)
        # A progress response at R: every event up to R came before it, none after.
        for i, r in enumerate(got):
            if r.watch_id == -1:
                later = [e.kv.mod_revision for x in got[i + 1:] for e in x.events]
                assert all(rev > r.revision for rev in later), (r.revision, later)
        # Atomic: one revision is never split across responses (no fragment asked).
        seen: dict[int, int] = {}
        for i, r in enumerate(got):
            for e in r.events:
                seen.setdefault(e.kv.mod_revision, i)
                assert seen[e.kv.mod_revision] == i
