"""Attack: another process of the same user writes into the shared memory it can open.

Every segment of a broker is mode 0600, so any process of the same user can map it and
write anything. README, "Failure model": the broker must stay up and lose nothing it
acknowledged; clients get typed errors (`ShmwatchError`), never `shm.errors.*` or a
bare ValueError, and never wait past their timeout. Each test writes one bad value
where a real process could, then checks exactly that.
"""

from __future__ import annotations

import glob
import mmap
import os
import signal
import threading
import time

import pytest

import broker
import clientlib
from broker.admin import read_stats
from shm import layout as L
from shm.segment import HEADER_SIZE
from tests.mp_workers import wait_for

U64_MAX = (1 << 64) - 1


def segment(name: str, pattern: str) -> str:
    """The /dev/shm file of broker `name` whose part matches `pattern` (a glob)."""
    found = [p for p in glob.glob(f"/dev/shm/shmwatch.{name}.{pattern}")
             if not p.endswith(".bell")]
    assert len(found) == 1, found
    return found[0]


def poke(path: str, offset: int, value: int) -> int:
    """Write the u64 `value` at byte `offset` of the file, as a hostile process would
    (through its own mapping); return the old value."""
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            view = memoryview(mm)[offset:offset + 8].cast("Q")
            old = view[0]
            view[0] = value
            view.release()
    finally:
        os.close(fd)
    return old


def ctl_word(name: str, index: int) -> int:
    """Byte offset in the control segment file of header word `index`."""
    return HEADER_SIZE + index * 8


def test_stats_sequence_word_at_its_maximum_does_not_stop_the_broker(broker_proc):
    """The metrics' sequence word is shared memory; the broker used to increment what
    it read there (`sw[0] += 1`), so 2**64-1 made it raise out of its loop and exit,
    unlinking everything. (Fixed: the broker keeps the sequence itself.)"""
    name = broker_proc.name
    with clientlib.connect(name, timeout=5) as c:
        rev = c.put("k", "before").revision
        poke(segment(name, "stats.*"), HEADER_SIZE, U64_MAX)
        time.sleep(0.5)  # several metrics publications
        assert broker_proc.alive(), "the broker died of a value written into its stats"
        assert c.put("k", "after").revision == rev + 1
        wait_for(lambda: read_stats(name)["revision"] == rev + 1, 5, "fresh metrics")


def test_revision_log_count_word_at_its_maximum_loses_no_event(broker_proc):
    """The revision log's `count` header word is shared memory; appending used to
    increment what it read there, so 2**64-1 failed every later write *after* the
    store had applied it: the writer got "internal error" for a write that stood, and
    its watchers never saw it (a gap). (Fixed: the count is written from the index.)"""
    name = broker_proc.name
    with clientlib.connect(name, timeout=5) as c:
        w = c.watch("k")
        assert w.get(5).created
        c.put("k", "1")
        assert w.get(5).events
        poke(segment(name, "log.*"), HEADER_SIZE + 32, U64_MAX)
        revs = [c.put("k", str(i)).revision for i in range(3)]
        got = []
        while len(got) < 3:
            got += [e.kv.mod_revision for e in w.get(5).events]
        assert got == revs
        assert broker_proc.alive()


@pytest.mark.parametrize("how", ["wrapped", "written_back"])
def test_registration_sequence_written_behind_the_brokers_back_still_lets_clients_connect(
        broker_proc, how):
    """`CTL_REG_SEQ` is bumped by every registering client; at 2**64-1 `connect` raised
    a bare ValueError from memoryview (fixed: the client wraps it). And the broker
    scanned the slots only when the word differed from what it saw last, so a word
    that wrapped back to it (2**64-1, then +1 = 0 on a fresh broker), or that someone
    keeps writing back, hid a registration until the client timed out (fixed: the
    broker also scans every second)."""
    name = broker_proc.name
    path = f"/dev/shm/shmwatch.{name}.ctl"
    offset = ctl_word(name, L.CTL_REG_SEQ)
    stop = threading.Event()
    if how == "wrapped":
        poke(path, offset, U64_MAX)  # the broker saw 0; the client's bump makes it 0
    else:
        seen = poke(path, offset, 0)
        poke(path, offset, seen)

        def write_back() -> None:
            while not stop.is_set():
                poke(path, offset, seen)
                time.sleep(0.0002)

        threading.Thread(target=write_back, daemon=True).start()
    try:
        with clientlib.connect(name, timeout=5) as c:
            assert c.put("k", "v").revision == 2
    finally:
        stop.set()


@pytest.mark.parametrize("word,value", [
    (L.CTL_REQUEST_RING, 0), (L.CTL_RESPONSE_RING, 7), (L.CTL_WATCH_RING, U64_MAX),
    (L.CTL_WATCH_RING, 1 << 63), (L.CTL_RINGS_PER_ARENA, 0), (L.CTL_RINGS_PER_ARENA, 1 << 62),
])
def test_damaged_config_words_give_a_typed_error_never_a_crash(broker_proc, word, value):
    """A client trusts the sizes in the control segment to lay out its rings: a damaged
    one raised ValueError / IndexError (and 2**62 rings per arena made it try to list
    them all: memory without bound). (Fixed: the client checks them and raises
    ProtocolError.) Other clients and the broker are unaffected."""
    name = broker_proc.name
    path = f"/dev/shm/shmwatch.{name}.ctl"
    with clientlib.connect(name, timeout=5) as healthy:
        old = poke(path, ctl_word(name, word), value)
        try:
            c = clientlib.connect(name, timeout=2)
            try:
                w = c.watch("k")
                w.get(2)
                c.put("k", "v")
            finally:
                c.close()
        except clientlib.ShmwatchError:
            pass  # typed: what a damaged broker may answer
        finally:
            poke(path, ctl_word(name, word), old)
        assert healthy.put("k", "healthy").revision >= 2
        assert broker_proc.alive()


def test_damaged_max_clients_word_with_every_slot_taken_is_too_many_clients():
    """With every slot taken, `connect` walked `max_clients` slots as the (shared) word
    said, past the end of the segment: IndexError. (Fixed: bounded by the segment.)"""
    with broker.spawn(max_clients=2) as b, clientlib.connect(b.name, timeout=5), \
            clientlib.connect(b.name, timeout=5):
        poke(f"/dev/shm/shmwatch.{b.name}.ctl", ctl_word(b.name, L.CTL_MAX_CLIENTS), U64_MAX)
        with pytest.raises(clientlib.TooManyClientsError):
            clientlib.connect(b.name, timeout=2)


def _victim_with_ring(name: str, c: clientlib.Client) -> tuple[clientlib.Watch, str]:
    w = c.watch("k")
    assert w.get(5).created
    with clientlib.connect(name, timeout=5) as writer:
        for _ in range(200):
            writer.put("k", "x" * 50)
    wait_for(lambda: read_stats(name)["watchers"]["victim"] == 1, 10, "a victim")
    return w, segment(name, f"c{c._slot}g*.a0.*")


@pytest.mark.parametrize("tail", [3, 1 << 40])
def test_damaged_tail_of_a_victims_ring_costs_only_its_client(tail):
    """A victim's ring is looked at on the retry timer (`_has_room` -> `free()`), outside
    the write path that turns `RingCorrupt` into "disconnect that client": a tail written
    into its header raised out of `move_victims` and the broker exited.
    (Fixed: watch.py's room check treats it as the client's fault.)"""
    with broker.spawn(watch_ring_bytes="4k") as b:
        with clientlib.connect(b.name, timeout=5) as c, \
                clientlib.connect(b.name, timeout=5) as other:
            w, arena = _victim_with_ring(b.name, c)
            poke(arena, HEADER_SIZE + 64, tail)  # ring 0's tail
            time.sleep(0.3)  # many victim retries
            assert b.alive(), "the broker died of a victim's damaged ring"
            assert other.put("other", "1").revision > 1
            with pytest.raises(clientlib.ShmwatchError):
                for _ in range(300):
                    w.get(1)
                    c.put("k", "again")


@pytest.mark.xfail(strict=True, reason="ftruncate of a mapped segment kills the broker (SIGBUS)")
@pytest.mark.parametrize("pattern", ["log.*", "stats.*"])
def test_truncating_a_segment_does_not_kill_the_broker(pattern):
    """A same-user process may ftruncate any segment file in /dev/shm (tmpfs): the
    broker's next access to its mapping past the new end is SIGBUS, which kills it
    (exit -7) whatever Python code surrounds it. posix_fallocate reserves space but
    does not stop a shrink; only a sealed memfd (F_SEAL_SHRINK) would."""
    # (Only the broker maps these two: a client's own segment would take this
    # process down with it.)
    with broker.spawn() as b, clientlib.connect(b.name, timeout=3) as c:
        c.put("k", "1")
        fd = os.open(segment(b.name, pattern), os.O_RDWR)
        os.ftruncate(fd, 0)
        os.close(fd)
        try:
            c.put("k", "2")
        except clientlib.ShmwatchError:
            pass
        time.sleep(0.3)
        assert b.alive(), f"broker exited with {b.proc.returncode}"


def test_stopped_broker_gives_timeouts_then_the_client_resumes_in_step(broker_proc):
    """SIGSTOP of the broker (a debugger, a stopped container): calls raise Timeout at
    their timeout, never hang; after SIGCONT the replies to those abandoned calls are
    dropped and every later call gets its own reply."""
    name = broker_proc.name
    with clientlib.connect(name, timeout=5) as c:
        c.put("s/0", "0")
        os.kill(broker_proc.pid, signal.SIGSTOP)
        try:
            for i in range(1, 4):
                t0 = time.monotonic()
                with pytest.raises(clientlib.Timeout):
                    c.put(f"s/{i}", str(i), timeout=0.3)
                assert time.monotonic() - t0 < 3, "a call outlived its timeout by far"
        finally:
            os.kill(broker_proc.pid, signal.SIGCONT)
        r = c.put("s/9", "9")
        g = c.get("s/", prefix=True)
        # The abandoned puts were applied (as etcd may after a client timeout), in order;
        # the replies each call got belong to it.
        assert [kv.key for kv in g.kvs] == [b"s/0", b"s/1", b"s/2", b"s/3", b"s/9"]
        assert g.kvs[-1].mod_revision == r.revision == g.revision


FORGED = {
    "str_key": [["PUT", ["k", b"v", 2, 2, 1, 0], None]],
    "str_revision": [["PUT", [b"k", b"v", 2, "2", 1, 0], None]],
    "int_type": [[7, [b"k", b"v", 2, 2, 1, 0], None]],
    "no_events": [],
}


@pytest.mark.parametrize("forged", sorted(FORGED))
def test_a_forged_log_record_with_a_valid_crc_is_contained(broker_proc, forged):
    """A CRC only catches accidents: a process that rewrites a revision-log record
    computes a matching one. `_read_history` checked the outer shape only, so a key of
    the wrong type reached the watch core's interval index (TypeError comparing str and
    bytes) and a string mod_revision its prev_kv arithmetic: out of sync_watchers, and
    the broker exited; a record of no events was a silent gap in the stream, and an
    event type the client cannot decode ended the watch in ProtocolError. (Fixed: each
    event is checked as it is decoded; the record counts as damage: history up to it is
    compacted, and the catching-up watcher gets etcd's compaction cancel.)"""
    import struct
    import zlib

    import msgpack

    name = broker_proc.name
    with clientlib.connect(name, timeout=5) as c:
        c.put("k", "v" * 100)
        c.put("k", "w")
        path = segment(name, "log.*")
        payload = msgpack.packb(FORGED[forged], use_bin_type=True)
        fd = os.open(path, os.O_RDWR)
        try:
            with mmap.mmap(fd, 0) as mm:
                base = HEADER_SIZE + 64  # the first record: revision 2
                rev, word = struct.unpack_from("=QQ", mm, base)
                assert rev == 2 and len(payload) <= word & 0xFFFFFFFF
                struct.pack_into("=QII", mm, base, rev, len(payload), zlib.crc32(payload))
                mm[base + 16:base + 16 + len(payload)] = payload
        finally:
            os.close(fd)
        w = c.watch("k", prefix=True, prev_kv=True, start_revision=1)
        assert w.get(5).created
        r = w.get(5)
        assert r.canceled and r.compact_revision == 3, r
        assert broker_proc.alive()
        assert c.put("k", "after").revision == 4
