"""Watchers that catch up themselves from the shared revision log (clientlib.catchup):
the log reader and its seqlock, the responses against the broker's own catch-up (field
by field, with hypothesis), the log evicted under the reader's feet, a damaged log, and
a broker that hands catch-ups out."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import broker
import clientlib
from broker.admin import read_stats
from broker.history import History
from broker.outbox import RingWriter
from broker.watch import WatchCore, WatchStream
from clientlib.catchup import catch_up
from shm.errors import LogRecordCorrupt, RecordEvicted
from shm.revlog import RevLog, RevLogReader, revlog_bytes
from shmwatch.wire.events import CatchUp, log_record
from shmwatch.wire.protocol import FILTER_NODELETE, FILTER_NOPUT, W_CATCHUP, WatchSpec
from shmwatch.wire.types import Event, KeyValue
from tests.fakes import FakeRing

pytestmark = pytest.mark.timeout(120)


def make_log(capacity: int = 1 << 20) -> tuple[RevLog, RevLogReader]:
    buf = memoryview(bytearray(revlog_bytes(capacity)))
    return RevLog(buf, init=True), RevLogReader(buf)


def history(rnd: random.Random, n: int, keys=(b"a", b"b", b"c", b"d", b"e")):
    """n revisions of realistic events: puts (some of several keys), deletes; with
    prev_kv as the store would give it."""
    kv: dict[bytes, KeyValue] = {}
    out = []
    for rev in range(2, n + 2):
        evs = []
        for k in rnd.sample(keys, rnd.choice([1, 1, 2, 3])):
            prev = kv.get(k)
            if prev is not None and rnd.random() < 0.25:
                del kv[k]
                evs.append(Event("DELETE", KeyValue(k, b"", 0, rev, 0, 0), prev))
            else:
                value = bytes([97 + rnd.randrange(26)]) * rnd.choice([1, 5, 40])
                new = KeyValue(k, value, prev.create_revision if prev else rev, rev,
                               prev.version + 1 if prev else 1, 0)
                kv[k] = new
                evs.append(Event("PUT", new, prev))
        out.append((rev, evs))
    return out


# -- the reader -------------------------------------------------------------------------


def test_reader_reads_a_range_from_the_position_the_log_gives():
    log, reader = make_log()
    for rev in range(2, 50):
        log.append(rev, b"r%d" % rev)
    got = list(reader.read(log.position(10), 10, 20))
    assert got == [(r, b"r%d" % r) for r in range(10, 21)]
    assert list(reader.read(log.position(49), 49, 49)) == [(49, b"r49")]


def test_reader_sees_records_evicted_before_or_while_it_reads():
    log, reader = make_log(4096)
    for rev in range(2, 40):
        log.append(rev, b"x" * 40)
    it = reader.read(log.position(log.oldest_rev), log.oldest_rev, 39)
    first = next(it)
    for rev in range(40, 140):  # the writer goes round the ring meanwhile
        log.append(rev, b"y" * 40)
    with pytest.raises(RecordEvicted) as exc:
        list(it)
    assert exc.value.rev == first[0] + 1
    # A position that is already gone is evicted too, never a wrong record.
    with pytest.raises(RecordEvicted):
        next(reader.read(0, 2, 39))


def test_reader_refuses_a_damaged_record_a_wrong_position_and_a_missing_end():
    log, reader = make_log()
    for rev in range(2, 20):
        log.append(rev, b"payload-%d" % rev)
    pos = log.position(5)
    buf = reader._data
    buf[(pos % reader.capacity) + 16] ^= 0xFF  # a byte of revision 5's payload
    with pytest.raises(LogRecordCorrupt):
        list(reader.read(pos, 5, 10))
    with pytest.raises(LogRecordCorrupt):
        list(reader.read(log.position(6) + 8, 6, 10))  # not a record boundary
    with pytest.raises(LogRecordCorrupt):
        list(reader.read(log.position(6), 6, 25))  # the log ends at 19


# -- the responses, against the broker's own catch-up ------------------------------------


def broker_catch_up(hist, spec: WatchSpec, lo: int, hi: int, compact_rev: int,
                    max_revs: int, max_bytes: int, fragment_limit: int) -> list:
    """What the broker's catch-up (WatchCore.sync_watchers without `locate`) delivers:
    a core at revision `hi`, one watcher from `lo`, read until it is synced."""
    log, _ = make_log()
    for rev, evs in hist:
        log.append(rev, log_record(evs)[0])
    h = History(log)
    core = WatchCore(max_response_bytes=max_bytes, batch_max_revs=max_revs)
    core.fragment_limit = fragment_limit  # etcd's is --max-request-bytes + 512 KiB
    core.cur_rev = hi
    core.compact(compact_rev)
    ring = FakeRing(1 << 24)
    stream = WatchStream("c")
    core.create(stream, spec._replace(start_revision=lo), 7, RingWriter(ring), ("r", 7))
    out = []
    for _ in range(10_000):
        out += ring.read_all(7)
        if not core.unsynced and not core.victims:
            break
        core.move_victims()
        core.sync_watchers(lambda a, b: h.read(a, b, compact_rev))
    out += ring.read_all(7)
    return out[1:]  # after `created`


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_watcher_catching_up_itself_gets_what_the_broker_would_send(data):
    """Field by field: the same responses (events, prev_kv, header revision, how
    revisions are grouped under the revision and byte limits, fragments, the
    compaction revision's own rule) as the broker's catch-up from the same log."""
    rnd = random.Random(data.draw(st.integers(0, 2**32)))
    hist = history(rnd, data.draw(st.integers(1, 60)))
    top = hist[-1][0]
    lo = data.draw(st.integers(2, top))
    hi = data.draw(st.integers(lo, top))
    compact_rev = data.draw(st.sampled_from([0, 1, lo - 1, lo]))
    key = data.draw(st.sampled_from([b"a", b"b", b"c"]))
    end = data.draw(st.sampled_from([None, b"\0", b"d", b"cz"]))
    if end not in (None, b"\0") and key >= end:
        end = None
    spec = WatchSpec(key, end, 0, data.draw(st.booleans()),
                     data.draw(st.sampled_from([0, FILTER_NOPUT, FILTER_NODELETE])),
                     False, data.draw(st.booleans()))
    max_revs = data.draw(st.sampled_from([1, 3, 1000]))
    max_bytes = data.draw(st.sampled_from([60, 400, 1 << 20]))
    fragment_limit = data.draw(st.sampled_from([64, 300, 1 << 30]))
    expected = broker_catch_up(hist, spec, lo, hi, compact_rev, max_revs, max_bytes,
                               fragment_limit)
    log, reader = make_log()
    for rev, evs in hist:
        log.append(rev, log_record(evs)[0])
    cu = CatchUp(lo, hi, compact_rev, log.position(lo), max_revs, max_bytes, fragment_limit)
    got = list(catch_up(reader, cu, spec, 7, lambda rev: rev + 1))
    assert got == expected


def test_the_broker_hands_out_a_catch_up_only_when_the_log_holds_it_whole():
    log, _ = make_log()
    hist = history(random.Random(1), 20)
    for rev, evs in hist:
        log.append(rev, log_record(evs)[0])
    h = History(log)
    assert h.locate(5, 21) == log.position(5)
    assert h.locate(5, 22) is None  # not written yet
    h.truncate(8)
    assert h.locate(5, 21) is None  # compacted away
    big = log_record([Event("PUT", KeyValue(b"k", b"x" * 2_000_000, 22, 22, 1, 0))])[0]
    assert h.append(22, big) == 22  # larger than the log: kept beside it
    assert h.locate(22, 22) is None


def test_the_core_sends_one_small_message_and_the_watcher_is_synced():
    log, _ = make_log()
    hist = history(random.Random(2), 30)
    for rev, evs in hist:
        log.append(rev, log_record(evs)[0])
    h = History(log)
    core = WatchCore()
    core.cur_rev = 31
    ring = FakeRing(1 << 16)
    stream = WatchStream("c")
    spec = WatchSpec(b"a", b"\0", 3)
    core.create(stream, spec, 1, RingWriter(ring), ("r", 1))
    read = []
    core.sync_watchers(lambda a, b: read.append((a, b)) or h.read(a, b, 0), h.locate)
    assert read == []  # the broker read nothing of the history
    w = stream.watchers[1]
    assert w in core.synced and w.min_rev == 32 and core.catchups_delegated == 1
    msgs = [m for m, _ in ring.records]
    assert len(msgs) == 2 and all(len(m) < 64 for m in msgs)  # created, then W_CATCHUP
    from shmwatch.wire.events import decode_watch_response
    kind, cu = decode_watch_response(msgs[1], 1)
    assert kind == W_CATCHUP and (cu.lo, cu.hi, cu.pos) == (3, 31, log.position(3))
    core._check()


# -- through a real broker ----------------------------------------------------------------


def wait_stats(name: str, key: str, timeout: float = 5.0) -> int:
    """A counter of the broker's published stats once it is non-zero (or 0 at the end)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        v = read_stats(name)[key]
        if v or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


def test_a_late_watcher_catches_up_itself_and_the_broker_reads_no_history():
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        revs = [r.revision for r in c.put_many((f"k/{i % 7}", f"v{i}") for i in range(3000))]
        w = c.watch("k/", prefix=True, start_revision=2, prev_kv=True)
        got = []
        while len(got) < len(revs):
            r = w.get(10)
            got += [(e.kv.mod_revision, e.kv.value, e.prev_kv is not None) for e in r.events]
        assert [g[0] for g in got] == revs
        assert got[10][1] == b"v10" and got[10][2]  # prev_kv from the log
        c.put("k/0", "live")
        assert w.get(10).events[0].kv.value == b"live"
        assert wait_stats(b.name, "catchups_delegated") >= 1


def test_the_log_evicted_under_the_readers_feet_ends_in_a_compaction_cancel():
    """A watcher reads its history slowly while a writer makes the log wrap past it:
    everything delivered is exactly history, then etcd's compaction cancel with the
    broker's compaction revision; never a gap, never a wrong event."""
    with broker.spawn(log_bytes="1M", max_response_bytes="64k") as b, \
            clientlib.connect(b.name, timeout=10) as c:
        value = b"v" * 400
        # ~900 bytes a record (the value and its prev_kv): 800 of them fit the log
        revs = [r.revision for r in c.put_many(("k", value) for _ in range(800))]
        w = c.watch("k", start_revision=revs[0])
        first = w.get(10)  # created
        first = w.get(10)  # the first catch-up response: read from the log
        got = [e.kv.mod_revision for e in first.events]
        assert got and got == revs[:len(got)]
        for _ in range(3):  # the log (1 MiB) wraps: the rest of the range is gone
            c.put_many(("other", value) for _ in range(1500))
        with pytest.raises(clientlib.CompactedError) as exc:
            for r in w:
                got += [e.kv.mod_revision for e in r.events]
                last = r
        assert last.canceled and last.compact_revision == exc.value.compact_revision
        assert got == revs[:len(got)]  # a prefix of history, exactly
        assert got[-1] < exc.value.compact_revision
        with pytest.raises(clientlib.CompactedError):  # a real compaction point of the broker
            c.get("k", revision=exc.value.compact_revision - 1)
        # The client goes on: its orphaned watch is cancelled with its next request.
        w2 = c.watch("k")
        assert w2.get(10).created
        c.put("k", "after")
        assert w2.get(10).events[0].kv.value == b"after"


def test_a_damaged_log_record_ends_the_watch_as_compacted_never_with_wrong_events():
    import mmap
    import os

    from shm import layout as L

    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        revs = [r.revision for r in c.put_many((f"k/{i}", b"v" * 100) for i in range(200))]
        token = c._words[L.CTL_LOG_TOKEN]
        path = f"/dev/shm/shmwatch.{b.name}.{L.log_part(token)}"
        fd = os.open(path, os.O_RDWR)
        try:
            mm = mmap.mmap(fd, 0)
            hit = mm.find(b"v" * 100, 4096 + 100 * 150)  # a record near revision 150
            mm[hit + 10] ^= 0xFF
            mm.close()
        finally:
            os.close(fd)
        w = c.watch("k/", prefix=True, start_revision=revs[0])
        got = []
        with pytest.raises(clientlib.CompactedError):
            for r in w:
                got += [(e.kv.mod_revision, e.kv.value) for e in r.events]
        assert [g[0] for g in got] == revs[:len(got)] and len(got) < len(revs)
        assert all(v == b"v" * 100 for _, v in got)
        assert c.put("still", "serving").revision == revs[-1] + 1


@pytest.mark.parametrize("catch_up", ["client", "broker"])
def test_both_ways_give_the_same_stream(catch_up):
    with broker.spawn(catch_up=catch_up, watch_ring_bytes="16k") as b, \
            clientlib.connect(b.name, timeout=10) as c:
        revs = [r.revision for r in c.put_many((f"p/{i % 5}", b"x" * 50) for i in range(500))]
        w = c.watch("p/", prefix=True, start_revision=revs[100], filters=["nodelete"])
        got = []
        while len(got) < len(revs) - 100:
            got += [e.kv.mod_revision for e in w.get(10).events]
        assert got == revs[100:]
        assert wait_stats(b.name, "catchups") >= 1  # published ~5 times a second
        assert (read_stats(b.name)["catchups_delegated"] > 0) == (catch_up == "client")
