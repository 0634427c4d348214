"""The data directory's files on their own (broker/wal.py), without a broker: which
damage is a torn tail recovery may drop and which is corruption it must refuse, the
snapshot's and meta's checks, the file format header, `repair()`, file modes, and a
hypothesis fuzz of the WAL loader.

The layout is written out here from the module docstring rather than imported, so these
tests also pin the documented format: a 12-byte file header b"shmw" | kind | u32
version, then frames u32 length | u32 crc32(body) | u32 crc32(those 8 bytes) | body.
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.wal import (
    KIND_COMPACT,
    KIND_KV,
    KIND_LEASE_GRANT,
    KIND_LEASE_REVOKE,
    DataDir,
    WalCorrupt,
)
from broker.wal_repair import repair

HEADER = 12
FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def frame(body: bytes) -> bytes:
    head = struct.pack("<II", len(body), zlib.crc32(body))
    return head + struct.pack("<I", zlib.crc32(head)) + body


def record(seq: int, payload, kind: int = KIND_KV) -> bytes:
    return frame(msgpack.packb([seq, kind, payload], use_bin_type=True))


def frames_of(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of every whole frame of an undamaged WAL."""
    out, pos = [], HEADER
    while pos + 12 <= len(data):
        n = struct.unpack_from("<I", data, pos)[0]
        if pos + 12 + n > len(data):
            break
        out.append((pos, pos + 12 + n))
        pos += 12 + n
    return out


def write_wal(d: str, payloads: list) -> bytes:
    """A WAL of one KV record per payload, written by DataDir itself (two batches)."""
    dd = DataDir(d)
    dd.load()
    for i, p in enumerate(payloads):
        dd.append(KIND_KV, p)
        if i == len(payloads) // 2:
            dd.commit(0.0)
    dd.close()
    with open(os.path.join(d, "wal"), "rb") as f:
        return f.read()


def load(d: str) -> list:
    dd = DataDir(d)
    try:
        return [r.payload for r in dd.load()[1]]
    finally:
        dd.close()


def put_file(d: str, name: str, data: bytes) -> None:
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def read_file(d: str, name: str) -> bytes:
    with open(os.path.join(d, name), "rb") as f:
        return f.read()


def refused(d: str, match: str) -> WalCorrupt:
    """Loading `d` raises WalCorrupt matching `match`, and changes no file in it."""
    before = {n: read_file(d, n) for n in os.listdir(d)}
    with pytest.raises(WalCorrupt, match=match) as info:
        load(d)
    assert {n: read_file(d, n) for n in os.listdir(d)} == before, "a refused load changed a file"
    return info.value


PAYLOADS = [f"value {i}".encode() * (1 + i % 3) for i in range(20)]


@pytest.fixture
def wal_dir(tmp_path):
    d = str(tmp_path / "data")
    data = write_wal(d, PAYLOADS)
    return d, data, frames_of(data)


# ------------------------------------------------------------------ torn tails: dropped


@pytest.mark.parametrize("cut", ["in_header", "in_body", "header_only"])
def test_a_frame_cut_short_by_the_end_of_the_file_is_a_torn_tail(wal_dir, cut):
    d, data, frames = wal_dir
    start, end = frames[-1]
    length = {"in_header": start + 5, "in_body": end - 3, "header_only": start + 12}[cut]
    put_file(d, "wal", data[:length])
    assert load(d) == PAYLOADS[:-1]
    assert read_file(d, "wal") == data[:start], "the torn tail was not cut away"
    assert load(d) == PAYLOADS[:-1]


@pytest.mark.parametrize("tail", [b"\0" * 4096, b"\x05\x00\x00", b"\x17\x01\x02\x03\x04\x05" + b"\0" * 700])
def test_zeros_or_a_header_cut_short_after_the_last_frame_are_a_torn_tail(wal_dir, tail):
    """T1/T2: a preallocated or unwritten (zero) tail, a few header bytes, or a header's
    worth of bytes followed by nothing but zeros cannot hold a record."""
    d, data, _frames = wal_dir
    put_file(d, "wal", data + tail)
    assert load(d) == PAYLOADS
    assert read_file(d, "wal") == data


def test_last_frame_with_a_zero_sector_is_a_torn_tail(tmp_path):
    """T4: the last frame's header checks out but a 512-byte sector of its body was never
    written (reads as zeros), and nothing but zeros follows it."""
    d = str(tmp_path / "data")
    data = write_wal(d, PAYLOADS[:3] + [os.urandom(3000)])
    start, end = frames_of(data)[-1]
    sector = (start + 12 + 511) // 512 * 512
    assert sector + 512 <= end
    damaged = data[:sector] + b"\0" * 512 + data[sector + 512:] + b"\0" * 100
    put_file(d, "wal", damaged)
    assert load(d) == PAYLOADS[:3]
    assert read_file(d, "wal") == data[:start]


# ------------------------------------------------------------------ corruption: refused


def test_issue9_flipped_length_high_byte_is_corruption_not_a_torn_tail(tmp_path):
    """The issue's case at unit level: the high byte of record 50's length (of 100)."""
    d = str(tmp_path / "data")
    data = write_wal(d, [f"v{i}".encode() for i in range(100)])
    frames = frames_of(data)
    assert len(frames) == 100
    damaged = bytearray(data)
    damaged[frames[50][0] + 3] ^= 0xFF
    put_file(d, "wal", bytes(damaged))
    exc = refused(d, rf"wal is corrupt at offset {frames[50][0]}: a frame header fails its check; "
                     rf"the {len(data) - frames[50][0]} bytes")
    assert exc.offset == frames[50][0] and exc.path == os.path.join(d, "wal")


@pytest.mark.parametrize("damage", ["zeroed_middle", "flip_middle_body", "garbage_after",
                                    "flip_last_body", "bad_header_then_body"])
def test_damage_with_bytes_after_it_is_refused(wal_dir, damage):
    d, data, frames = wal_dir
    b = bytearray(data)
    start, end = frames[7]
    if damage == "zeroed_middle":
        b[start:end] = bytes(end - start)
    elif damage == "flip_middle_body":
        b[end - 2] ^= 0x40
    elif damage == "garbage_after":
        b += b"\x17" * 7 + bytes(range(1, 101))
        start = len(data)
    elif damage == "flip_last_body":
        # Nothing follows it, but no sector of it is zero: a damaged record, not an
        # unfinished one (it may well have been acknowledged).
        start, end = frames[-1]
        b[end - 2] ^= 0x40
    else:
        b += struct.pack("<III", 0x7FFFFFF0, 0, 0) + b"x" * 20
        start = len(data)
    put_file(d, "wal", bytes(b))
    exc = refused(d, f"corrupt at offset {start}:")
    assert exc.offset == start


def test_crc_valid_frame_that_is_not_a_record_is_refused(wal_dir):
    d, data, _frames = wal_dir
    put_file(d, "wal", data + frame(b"\xc1not msgpack") + record(21, b"x"))
    refused(d, rf"offset {len(data)}: a frame whose checksums pass holds no record")
    put_file(d, "wal", data + frame(msgpack.packb({"seq": 21})))
    refused(d, "not a \\[seq, kind, payload\\] record")
    put_file(d, "wal", data + record(21, "not a revision", KIND_COMPACT))
    refused(d, "compaction or revoke record without its number")
    put_file(d, "wal", data + record(21, "not a lease id", KIND_LEASE_REVOKE))
    refused(d, "compaction or revoke record without its number")
    for bad in ([1, 2], [1, 2, 3], ["1", 2, True], "lease"):
        put_file(d, "wal", data + record(21, bad, KIND_LEASE_GRANT))
        refused(d, "lease grant record that is not")
    put_file(d, "wal", data + record(21, None, 7))
    refused(d, "not a \\[seq, kind, payload\\] record")


def test_sequence_gaps_are_refused(tmp_path):
    """Records out of order, or a WAL that starts after records nobody has (its snapshot
    gone), are missing writes: refused."""
    d = str(tmp_path / "data")
    write_wal(d, [])
    hdr = read_file(d, "wal")
    put_file(d, "wal", hdr + record(1, b"a") + record(2, b"b") + record(4, b"d"))
    refused(d, "record sequence 4 where 3 was expected")
    put_file(d, "wal", hdr + record(5, b"e"))
    refused(d, "first record has sequence 5 where 1 was expected")


@pytest.mark.parametrize("content,match", [
    (b"", "0 bytes, shorter than the 12-byte header"),
    (b"\x05\x00\x00\x00" + b"\x00" * 30, "not a shmwatch WAL"),  # the unversioned format
    (b"shmwsnap" + b"\x01\x00\x00\x00", "not a shmwatch WAL"),
    (b"shmwwal\x00" + b"\x03\x00\x00\x00",
     "format version 3, written by a newer shmwatch; this one reads version 2"),
    (b"shmwwal\x00" + b"\x01\x00\x00\x00",
     "format version 1, written by an older shmwatch; this one reads version 2"),
])
def test_a_wal_of_another_format_is_refused(tmp_path, content, match):
    d = str(tmp_path / "data")
    write_wal(d, [])
    put_file(d, "wal", content)
    assert refused(d, match).offset == 0


def test_a_missing_wal_beside_a_meta_is_refused(tmp_path):
    d = str(tmp_path / "data")
    dd = DataDir(d)
    dd.load()
    dd.cluster_id(7)
    dd.close()
    os.unlink(os.path.join(d, "wal"))
    refused(d, "wal is missing but meta exists: the writes it held are lost")


# ------------------------------------------------------------------ snapshot and meta


def snap_dir(tmp_path) -> str:
    return snap_dir_at(str(tmp_path / "data"))


def snap_dir_at(d: str) -> str:
    """A data dir with a snapshot (of a fake state: DataDir does not look inside) and
    two WAL records after it."""
    dd = DataDir(d)
    dd.load()
    dd.append(KIND_KV, b"a")
    dd.snapshot({"mvcc": {"rev": 2, "keys": [[b"k", [[2, b"v" * 3000]]]]}, "log": []})
    dd.append(KIND_KV, b"b")
    dd.append(KIND_KV, b"c")
    dd.close()
    return d


def test_snapshot_round_trip_and_wal_after_it(tmp_path):
    d = snap_dir(tmp_path)
    dd = DataDir(d)
    snap, records = dd.load()
    dd.close()
    assert snap["seq"] == 1 and snap["mvcc"]["rev"] == 2
    assert [(r.seq, r.payload) for r in records] == [(2, b"b"), (3, b"c")]


@pytest.mark.parametrize("damage", ["half_cut", "bit_flip", "length_field", "appended",
                                    "tiny", "no_header"])
def test_damaged_snapshot_is_refused(tmp_path, damage):
    d = snap_dir(tmp_path)
    data = bytearray(read_file(d, "snap"))
    if damage == "half_cut":
        data = data[:len(data) // 2]
    elif damage == "bit_flip":
        data[len(data) // 2] ^= 0x01
    elif damage == "length_field":
        data[HEADER] ^= 0x01
    elif damage == "appended":
        data += b"\0"
    elif damage == "tiny":
        data = data[:15]
    else:
        data = data[HEADER:]
    put_file(d, "snap", bytes(data))
    exc = refused(d, "snapshot .*snap (is damaged|is cut short|is not a shmwatch snapshot)")
    assert exc.path == os.path.join(d, "snap")


def test_snapshot_that_passes_its_checksum_but_is_not_a_snapshot_is_refused(tmp_path):
    d = snap_dir(tmp_path)
    body = msgpack.packb({"seq": "x"})
    length = struct.pack("<Q", len(body))
    put_file(d, "snap", b"shmwsnap\x02\0\0\0" + length
             + struct.pack("<I", zlib.crc32(body, zlib.crc32(length))) + body)
    refused(d, "passes its checksum but does not hold a snapshot")


def test_damaged_meta_is_refused(tmp_path):
    d = str(tmp_path / "data")
    dd = DataDir(d)
    dd.load()
    assert dd.cluster_id(42) == 42
    assert dd.cluster_id(43) == 42
    dd.close()
    data = bytearray(read_file(d, "meta"))
    data[-1] ^= 0x10
    put_file(d, "meta", bytes(data))
    dd = DataDir(d)
    try:
        with pytest.raises(WalCorrupt, match="meta file .*meta is damaged"):
            dd.cluster_id(44)
    finally:
        dd.close()


# ------------------------------------------------------------------ repair()


def listing(d: str) -> dict[str, bytes]:
    return {n: read_file(d, n) for n in sorted(os.listdir(d))}


def test_repair_dry_run_changes_nothing_and_yes_cuts_at_the_damage(tmp_path):
    d = str(tmp_path / "data")
    data = write_wal(d, [f"v{i}".encode() for i in range(100)])
    frames = frames_of(data)
    damaged = bytearray(data)
    damaged[frames[50][0] + 3] ^= 0xFF
    put_file(d, "wal", bytes(damaged))
    before = listing(d)
    status, lines = repair(d)
    text = "\n".join(lines)
    assert status == 1
    assert listing(d) == before, "a dry run changed the directory"
    assert f"wal: DAMAGED at offset {frames[50][0]} of {len(data)}" in text
    assert "keeps 50 records" in text and "at revision 51" in text
    assert f"drops {len(data) - frames[50][0]} bytes" in text
    assert "49 intact records after it (sequence 52-100)" in text
    assert "dry run: nothing was changed" in text

    status, lines = repair(d, apply=True)
    assert status == 0, lines
    kept = [n for n in os.listdir(d) if n.startswith("wal.corrupt-")]
    assert len(kept) == 1 and read_file(d, kept[0]) == bytes(damaged)
    assert read_file(d, "wal") == data[:frames[50][0]]
    assert load(d) == [f"v{i}".encode() for i in range(50)]
    assert repair(d) == (0, [f"data directory {d}", "  meta: none", "  snap: none",
                             "  wal: ok, 50 records, the store is at revision 51",
                             "nothing to repair"])


def test_repair_refuses_a_held_directory_and_a_damaged_snapshot(tmp_path):
    d = snap_dir(tmp_path)
    dd = DataDir(d)  # holds the lock, as a live broker does
    try:
        status, lines = repair(d, apply=True)
        assert status == 1 and "in use by another broker" in lines[0]
    finally:
        dd.close()
    data = read_file(d, "snap")
    put_file(d, "snap", data[:-10])
    before = listing(d)
    status, lines = repair(d, apply=True)
    assert status == 1 and "snap: DAMAGED" in "\n".join(lines)
    assert "cannot repair this directory; nothing was changed" in lines[-1]
    assert listing(d) == before
    assert repair(str(tmp_path / "nope"))[0] == 1


def test_repair_moves_a_damaged_meta_aside_and_starts_a_missing_wal(tmp_path):
    d = snap_dir(tmp_path)
    dd = DataDir(d)
    dd.load()
    dd.cluster_id(5)
    dd.close()
    put_file(d, "meta", read_file(d, "meta")[:-1])
    os.unlink(os.path.join(d, "wal"))
    status, lines = repair(d, apply=True)
    assert status == 0, lines
    assert any(n.startswith("meta.corrupt-") for n in os.listdir(d))
    assert not os.path.exists(os.path.join(d, "meta"))
    dd = DataDir(d)
    try:
        snap, records = dd.load()
        assert snap["seq"] == 1 and records == []
        assert dd.cluster_id(6) == 6
    finally:
        dd.close()


# ------------------------------------------------------------------ file modes


def test_files_are_0600_and_a_created_dir_0700_whatever_the_umask(tmp_path):
    """umask 0 and wide leftovers (a 0644 snap.tmp of a crash, a 0644 wal): every file
    the broker writes ends up 0600; the directory it creates is 0700."""
    old = os.umask(0)
    try:
        d = str(tmp_path / "new" / "data")
        dd = DataDir(d)
        dd.load()
        dd.cluster_id(1)
        dd.close()
        for name in ("snap.tmp", "meta.tmp"):
            with open(os.path.join(d, name), "w") as f:
                f.write("leftover")
            os.chmod(os.path.join(d, name), 0o644)
        os.chmod(os.path.join(d, "wal"), 0o644)
        dd = DataDir(d)
        dd.load()
        dd.append(KIND_KV, b"x")
        dd.snapshot({"mvcc": {"rev": 2}, "log": []})
        dd.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    modes = {n: stat.S_IMODE(os.stat(os.path.join(d, n)).st_mode) for n in os.listdir(d)}
    assert set(modes) == {"lock", "wal", "meta", "snap"}, "leftover temporaries stay"
    assert all(m == 0o600 for m in modes.values()), modes


def test_an_existing_dir_keeps_its_mode(tmp_path, caplog):
    d = tmp_path / "data"
    d.mkdir()
    d.chmod(0o755)
    DataDir(str(d)).close()
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert "is mode 0755: other users can see the names in it" in caplog.text


# ------------------------------------------------------------------ fuzz


def _mutations(size: int):
    pos = st.integers(0, size - 1)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, size - 1)),
        st.tuples(st.just("zero_tail"), pos),
        st.tuples(st.just("zero_range"), pos, st.integers(1, 700)),
        st.tuples(st.just("append"), st.binary(min_size=1, max_size=40)
                  | st.binary(max_size=12).map(lambda b: b + bytes(600))),
        st.tuples(st.just("append_torn_frame"), st.integers(1, 200)),
    )


def _mutate(data: bytes, m) -> bytes:
    b = bytearray(data)
    kind = m[0]
    if kind == "flip":
        b[m[1]] ^= m[2]
    elif kind == "truncate":
        del b[m[1]:]
    elif kind == "zero_tail":
        b[m[1]:] = bytes(len(b) - m[1])
    elif kind == "zero_range":
        end = min(len(b), m[1] + m[2])
        b[m[1]:end] = bytes(end - m[1])
    elif kind == "append":
        b += m[1]
    else:  # a frame whose header made it to disk and whose body did not, all of it
        body = msgpack.packb([10_000, KIND_KV, b"y" * 300])
        b += frame(body)[:12 + m[1]]
    return bytes(b)


def _header_ok(b: bytes) -> bool:
    return len(b) >= 12 and zlib.crc32(b[:8]) == struct.unpack_from("<I", b, 8)[0]


payload = st.one_of(st.binary(max_size=40),
                    st.binary(max_size=100).map(lambda b: b + bytes(1100)),
                    st.text(max_size=20))


@FUZZ
@given(payloads=st.lists(payload, min_size=1, max_size=12), data=st.data())
def test_fuzz_wal_loader_recovers_a_prefix_only_from_torn_tails(payloads, data):
    """Random flips, truncations, zeroed ranges and appended bytes: loading raises
    nothing but WalCorrupt, and a refusal changes nothing; a success returns a prefix
    of the records, cut only where the damage is a torn tail (module docstring T1-T4):
    damage followed by non-zero bytes, or in the file header, is always refused; a cut
    or a zero-filled tail from a frame or sector boundary always recovers."""
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "data")
        good = write_wal(d, payloads)
        frames = frames_of(good)
        assert len(frames) == len(payloads)
        m = data.draw(_mutations(len(good)), label="mutation")
        bad = _mutate(good, m)
        put_file(d, "wal", bad)
        ends = [e for _s, e in frames]
        try:
            got = load(d)
        except WalCorrupt:
            assert read_file(d, "wal") == bad, "a refused load changed the WAL"
            got = None
        if got is None and bad[:HEADER] == good[:HEADER]:
            # The explicit way out always leads to a directory that loads, keeping a
            # prefix of the records and the damaged original byte for byte.
            status, lines = repair(d, apply=True)
            assert status == 0, lines
            kept = [n for n in os.listdir(d) if n.startswith("wal.corrupt-")]
            assert len(kept) == 1 and read_file(d, kept[0]) == bad
            repaired = load(d)
            assert repaired == payloads[:len(repaired)]
            put_file(d, "wal", bad)
        if got is not None:
            assert got == payloads[:len(got)], "recovered records that are not a prefix"
            cut = HEADER if not got else ends[len(got) - 1]
            assert read_file(d, "wal") == bad[:cut], "not cut back to the last good frame"
        changed = [i for i in range(min(len(bad), len(good))) if bad[i] != good[i]]
        first = changed[0] if changed else None
        kind = m[0]
        if kind == "truncate":
            if m[1] < HEADER:
                assert got is None
            else:
                assert got == payloads[:sum(1 for e in ends if e <= m[1])], m
        elif kind in ("flip", "zero_range", "zero_tail") and first is not None:
            if first < HEADER:
                assert got is None, "a damaged file header was accepted"
                return
            i = next(j for j, (s, e) in enumerate(frames) if s <= first < e)
            if got is not None:
                assert len(got) >= i, "records before the damage were lost"
            if any(bad[ends[i]:]):
                assert got is None, f"damage in frame {i} with non-zero bytes after it accepted"
            if kind == "zero_tail" and (m[1] == frames[i][0] or m[1] % 512 == 0):
                assert got is not None and len(got) >= i, "a zero-filled tail was refused"
        elif kind in ("append", "append_torn_frame"):
            tail = bad[len(good):]
            if len(tail) < 12 or not any(tail[12:]) or kind == "append_torn_frame":
                assert got == payloads, f"a torn tail {tail[:20]!r} was refused or cut into records"
            elif not _header_ok(tail):
                assert got is None, "garbage after the last frame was accepted"


@FUZZ
@given(data=st.data())
def test_fuzz_any_change_to_a_snapshot_or_meta_is_refused(data):
    """A flipped byte, a cut or appended bytes anywhere in snap or meta: WalCorrupt
    (never another exception, never a misread snapshot), and nothing changes."""
    with tempfile.TemporaryDirectory() as tmp:
        d = snap_dir_at(os.path.join(tmp, "data"))
        dd = DataDir(d)
        dd.load()
        dd.cluster_id(99)
        dd.close()
        name = data.draw(st.sampled_from(["snap", "meta"]), label="file")
        good = read_file(d, name)
        m = data.draw(_mutations(len(good)).filter(lambda m: m[0] != "zero_range"
                                                   or any(good[m[1]:m[1] + m[2]])),
                      label="mutation")
        bad = _mutate(good, m)
        if bad == good:
            return
        put_file(d, name, bad)
        before = listing(d)
        dd = DataDir(d)
        try:
            with pytest.raises(WalCorrupt, match=f"{name} "):
                dd.load()
                dd.cluster_id(100)
        finally:
            dd.close()
        assert listing(d) == before
