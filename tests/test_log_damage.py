"""Another process writes into the revision log's shared memory (any process of the same
user can): the broker contains the damage and keeps serving.

This used to kill the broker: `RingCorrupt` escaped `serve_forever`, the broker exited
and unlinked everything."""

from __future__ import annotations

import os
import struct
import zlib

import pytest

import broker
import clientlib
from broker.admin import read_stats
from shm import layout as L
from shm.revlog import REVLOG_HEADER, RevLog
from shm.segment import Segment
from tests.mp_workers import wait_for


def log_segment(name: str) -> Segment:
    prefix = f"shmwatch.{name}.log"
    (entry,) = [e for e in os.listdir("/dev/shm") if e.startswith(prefix)]
    return Segment.open("/" + entry, kind=L.KIND_LOG)


def record_offset(seg: Segment, rev: int) -> tuple[int, int]:
    """(offset in the segment payload of revision `rev`'s record, payload length)."""
    view = RevLog(seg.payload, init=False)  # walks and checks every record
    try:
        i = view._revs.index(rev)
        pos = view._pos[i] % view.capacity
        n = view._dq[(pos >> 3) + 1] & 0xFFFFFFFF
        return REVLOG_HEADER + pos, n
    finally:
        view.release()


def flip_payload_byte(name: str, rev: int) -> None:
    with log_segment(name) as seg:
        off, n = record_offset(seg, rev)
        seg.payload[off + 16 + n // 2] ^= 0xFF


def rewrite_with_valid_crc(name: str, rev: int) -> None:
    """Garbage that passes the CRC: only the decoding can tell."""
    with log_segment(name) as seg:
        off, n = record_offset(seg, rev)
        junk = b"\xc1" * n  # 0xc1 is never used by msgpack
        seg.payload[off + 16:off + 16 + n] = junk
        struct.pack_into("=Q", seg.payload, off + 8, n | (zlib.crc32(junk) << 32))


def catch_up(c: clientlib.Client, start: int) -> list:
    w = c.watch("d/", prefix=True, start_revision=start)
    out = [w.get(10)]
    while not out[-1].canceled:
        try:
            out.append(w.get(2))
        except clientlib.Timeout:
            break
    return out


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", [flip_payload_byte, rewrite_with_valid_crc])
def test_damaged_record_becomes_compaction_and_the_broker_keeps_serving(damage):
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        live = c.watch("d/", prefix=True)
        assert live.get(5).created
        revs = [c.put(f"d/{i % 7}", f"v{i}").revision for i in range(100)]  # 2..101
        damage(b.name, 50)
        got = catch_up(c, 1)
        assert got[0].created
        assert got[-1].canceled and got[-1].compact_revision == 51 and got[-1].revision == 0
        assert not [e for r in got for e in r.events]  # nothing from below the damage
        assert b.alive()
        stats = wait_for(lambda: (s := read_stats(b.name))["log_damage"] == 1 and s, 10,
                         "the damage to show in the stats")
        assert stats["compact_revision"] == 51
        # History after the damage is intact and exact.
        after = catch_up(c, 51)
        assert [e.kv.mod_revision for r in after for e in r.events] == revs[49:]
        with pytest.raises(clientlib.CompactedError):
            c.get("d/1", revision=10)
        assert c.get("d/", prefix=True, revision=60).count == 7
        # Writes and live watchers go on.
        rev = c.put("d/x", "after").revision
        assert rev == 102
        seen = []
        while not seen or seen[-1] < rev:
            seen += [e.kv.mod_revision for e in live.get(5).events]
        assert seen == revs + [rev]


@pytest.mark.timeout(60)
def test_damage_in_the_newest_record_cancels_a_watcher_that_needs_it():
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        for i in range(10):
            last = c.put("d/k", f"v{i}").revision
        flip_payload_byte(b.name, last)
        got = catch_up(c, last)
        # The revision cannot be delivered: a compaction cancel, never a silent skip.
        assert got[-1].canceled and got[-1].compact_revision == last + 1
        nxt = c.put("d/k", "new").revision
        assert [e.kv.mod_revision for r in catch_up(c, nxt) for e in r.events] == [nxt]
