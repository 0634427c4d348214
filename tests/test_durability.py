"""--data-dir: what survives a killed broker, a torn WAL, a snapshot, and what a restart
without the data means for the clients of the old store; damage that is not a torn tail
(corrupt WAL, snapshot, meta) refuses the start and changes nothing; `shmwatch repair`;
the modes of the files.

The WAL's layout (broker/wal.py) is a 12-byte file header, then frames u32 length |
u32 crc32(body) | u32 crc32(those 8 bytes) | msgpack body, so these tests can cut and
damage it at frame boundaries. tests/test_wal.py covers the same rules without a broker.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pwd
import random
import shutil
import stat
import struct
import subprocess
import sys
import tempfile

import pytest

import broker
import clientlib
from broker.admin import broker_info
from tests import fault_workers as fw

CTX = mp.get_context("spawn")
FILE_HEADER = 12
_FRAME = struct.Struct("<III")


def wal_records(path) -> list[tuple[int, int]]:
    """(start, end) offsets of the whole frames of the WAL file `path`."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], FILE_HEADER
    while pos + _FRAME.size <= len(data):
        n = _FRAME.unpack_from(data, pos)[0]
        if pos + _FRAME.size + n > len(data):
            break
        out.append((pos, pos + _FRAME.size + n))
        pos += _FRAME.size + n
    return out


def parse_acks(path) -> tuple[list[tuple[int, bytes, bytes]], str]:
    acks, end = [], ""
    with open(path) as f:
        for line in f:
            if line.startswith("END"):
                end = line.strip()
                continue
            rev, key, value = line.split()
            acks.append((int(rev), key.encode(), value.encode()))
    return acks, end


# ------------------------------------------------------------------ a broker killed mid-batch


@pytest.mark.timeout(180)
@pytest.mark.parametrize("fsync,snapshot_every", [("always", 100_000), ("batch", 40)])
def test_broker_killed_mid_batch_loses_no_acknowledged_write(tmp_path, fsync, snapshot_every):
    """Two writer processes put in a tight loop, each logging every acknowledged revision
    to a file; SIGKILL the broker mid-stream (with snapshot_every=40 also mid-snapshot,
    sometimes). Restarted on the same data dir: every acknowledged write is there at its
    revision, the revision sequence continues, and a resume=True watch created before the
    kill delivers, across the restart, every revision exactly once: the same events as
    a fresh watch from revision 1."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    data = str(tmp_path / "data")
    opts = {"data_dir": data, "fsync": fsync, "snapshot_every": snapshot_every}
    b = broker.spawn(**opts)
    b2 = None
    procs = []
    try:
        c = clientlib.connect(b.name, timeout=10)
        w = c.watch("d/", prefix=True, resume=True)
        assert w.get(10).created
        seen: list[tuple] = []
        counters = {tag: CTX.RawValue("q", 0) for tag in "ab"}
        for tag, done in counters.items():
            procs.append(CTX.Process(target=fw.acked_writer,
                                     args=(b.name, tag, str(tmp_path / f"acks.{tag}"), done),
                                     daemon=True))
        for p in procs:
            p.start()
        target = rnd.randrange(50, 400)

        def enough():
            fw.drain(w, seen)
            if not all(p.is_alive() for p in procs):
                raise AssertionError(f"a writer exited early: {[p.exitcode for p in procs]}")
            if snapshot_every < 100 and not os.path.exists(os.path.join(data, "snap")):
                return False  # kill only once snapshots are being taken
            return min(d.value for d in counters.values()) >= target

        fw.wait_for(enough, 90, f"{target} acknowledged puts per writer (seed {seed})")
        b.kill()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0, f"writer exit code {p.exitcode}"
        fw.drain(w, seen)  # what was delivered before the kill
        assert seen, "the resumed watch saw nothing before the kill: the test proves little"

        b2 = broker.spawn(b.name, **opts)
        acks = []
        for tag in counters:
            got, end = parse_acks(tmp_path / f"acks.{tag}")
            assert end == "END BrokerUnavailable", end
            assert len(got) >= target
            acks += got
        with clientlib.connect(b.name, timeout=10) as fresh:
            recovered = fresh.get("d/", prefix=True).revision
            assert recovered >= max(rev for rev, _k, _v in acks), \
                f"revision went back to {recovered} (seed {seed})"
            assert broker_info(b.name)["revision"] == recovered
            c.reconnect(timeout=20)
            after = fresh.put("d/after", "1").revision
            assert after == recovered + 1, "the revision sequence does not continue"
            fw.read_until(w, after, seen)
            full = fw.history(fresh, "d/", after)
            assert [e[0] for e in full] == sorted({e[0] for e in full}), "duplicate revision"
            assert seen == full, \
                f"resumed watch: {len(seen)} events, fresh watch {len(full)} (seed {seed})"
            events = {(rev, key, value) for rev, t, key, value in full if t == "PUT"}
            for rev, key, value in acks:
                assert (rev, key, value) in events, \
                    f"acknowledged put {key!r}={value!r} at {rev} is lost (seed {seed})"
            for rev, key, value in rnd.sample(acks, min(100, len(acks))):
                kv = fresh.get(key, revision=rev).kvs[0]
                assert (kv.value, kv.mod_revision) == (value, rev)
                assert fresh.get(key).kvs[0].mod_revision >= rev
        c.close()
    finally:
        fw.reap(procs)
        if b2 is not None:
            b2.stop()
        b.stop()
    assert fw.shm_entries(b.name) == []


# ------------------------------------------------------------------ torn WAL tail


def put_values(data, n: int, **opts) -> tuple[str, list[int]]:
    """A broker on `data` takes n acknowledged puts t/0..t/n-1 and is stopped: (its
    name, the revisions)."""
    name = broker.unique_name()
    with broker.spawn(name, data_dir=str(data), **opts) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        revs = [c.put(f"t/{i}", f"v{i}" if i != n - 1 else "z" * 3000).revision
                for i in range(n)]
    return name, revs


@pytest.mark.timeout(90)
@pytest.mark.parametrize("damage", ["cut_header", "cut_body", "short_header", "zero_tail",
                                    "zero_sector"])
def test_torn_wal_tail_is_dropped_and_earlier_writes_survive(tmp_path, damage):
    """After a stop, the WAL's tail is damaged as a crash mid-write leaves it: the last
    frame cut short by the end of the file, a few bytes of a header, a zero-filled
    (preallocated or unwritten) tail, or a last frame with a sector that was never
    written. The broker starts, drops the tail, keeps every write before it, continues
    the revisions from there, and what it writes next survives the next restart (the
    torn bytes were cut away, not left in front of new records)."""
    data = tmp_path / "data"
    wal = data / "wal"
    name, revs = put_values(data, 10)
    recs = wal_records(wal)
    assert len(recs) == 10 and recs[-1][1] == wal.stat().st_size
    survivors = 9
    last_start, last_end = recs[-1]
    with open(wal, "r+b") as f:
        if damage == "cut_header":
            f.truncate(last_start + 7)
        elif damage == "cut_body":
            f.truncate(last_end - 100)
        elif damage == "short_header":
            f.seek(0, os.SEEK_END)
            f.write(b"\x05\x00\x00")
            survivors = 10
        elif damage == "zero_tail":
            f.seek(0, os.SEEK_END)
            f.write(bytes(8192))
            survivors = 10
        else:
            sector = (last_start + _FRAME.size + 511) // 512 * 512
            assert sector + 512 < last_end
            f.seek(sector)
            f.write(bytes(512))
    good_end = recs[survivors - 1][1]

    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        assert wal.stat().st_size == good_end, "the torn tail was not cut away"
        for i in range(10):
            kvs = c.get(f"t/{i}").kvs
            if i < survivors:
                assert kvs and kvs[0].mod_revision == revs[i]
            else:
                assert kvs == []
        assert c.get("t/", prefix=True).revision == revs[survivors - 1]
        more = [c.put(f"u/{i}", f"w{i}").revision for i in range(3)]
        assert more[0] == revs[survivors - 1] + 1
    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        assert len(c.get("t/", prefix=True).kvs) == survivors
        assert [kv.mod_revision for kv in c.get("u/", prefix=True).kvs] == more
        assert c.put("u/next", "x").revision == more[-1] + 1


# ------------------------------------------------------------------ corruption is refused


def start_refused(name: str, data, *cmd: str) -> str:
    """Start a broker on `data` (`python -m broker`, or `cmd`): it must exit 1 within a
    minute, printing one line `<command>: error: WAL ... corrupt ...` (or the snapshot's,
    meta's), and leave nothing in /dev/shm.
    Returns that line."""
    cmd = cmd or (sys.executable, "-m", "broker")
    proc = subprocess.Popen([*cmd, "--name", name, "--data-dir", str(data)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        broker.BrokerProcess(name, proc).stop()
        proc.communicate()
        raise AssertionError("the broker started on a damaged data directory") from None
    assert proc.returncode == 1, (proc.returncode, err[-3000:])
    lines = err.splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err[-3000:]
    assert fw.shm_entries(name) == []
    return lines[0]


def dir_bytes(data) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())}


@pytest.mark.timeout(120)
def test_issue9_flipped_length_byte_refuses_the_start_and_keeps_every_byte(tmp_path):
    """Issue 9.3's reproduction: 100 acknowledged puts, the broker stopped, the high byte
    of record 50's length flipped. Before: the broker treated it as a torn tail, started
    at revision 51 and truncated 50 acknowledged writes away. Now: refused with
    WalCorrupt naming the file and the offset, the WAL byte for byte as it was; and once
    the byte is put back, all 100 writes are there."""
    data = tmp_path / "data"
    name, revs = put_values(data, 100)
    wal = data / "wal"
    recs = wal_records(wal)
    assert len(recs) == 100
    raw = bytearray(wal.read_bytes())
    raw[recs[50][0] + 3] ^= 0xFF
    wal.write_bytes(bytes(raw))
    before = dir_bytes(data)
    line = start_refused(name, data)
    assert f"WAL {wal} is corrupt at offset {recs[50][0]}" in line, line
    assert f"the {len(raw) - recs[50][0]} bytes from there" in line
    assert dir_bytes(data) == before, "a refused start changed the data directory"
    raw[recs[50][0] + 3] ^= 0xFF
    wal.write_bytes(bytes(raw))
    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        r = c.get("t/", prefix=True)
        assert (r.revision, len(r.kvs)) == (revs[-1], 100)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["zeroed_middle", "garbage_after", "flip_last_body",
                                    "header_garbage_after", "old_format"])
def test_corrupt_wal_refuses_the_start(tmp_path, damage):
    """Damage that is not a torn tail: a record zeroed in the middle (was: a ValueError
    traceback), garbage after the last good frame, a bit flip in the last record (not
    cut short, no unwritten sector: it may have been acknowledged), a frame header that
    fails its check with bytes after it, a WAL without the format header. Each is
    refused with WalCorrupt naming the file (and offset), changing nothing; also through
    `shmwatch serve`."""
    data = tmp_path / "data"
    name, _revs = put_values(data, 20)
    wal = data / "wal"
    recs = wal_records(wal)
    raw = bytearray(wal.read_bytes())
    offset = len(raw)
    if damage == "zeroed_middle":
        offset, end = recs[10]
        raw[offset:end] = bytes(end - offset)
    elif damage == "garbage_after":
        raw += b"\x17" * 7 + os.urandom(100).replace(b"\0", b"\1")
    elif damage == "flip_last_body":
        offset = recs[-1][0]
        raw[recs[-1][1] - 2] ^= 0x40
    elif damage == "header_garbage_after":
        raw += _FRAME.pack(0x7FFFFFF0, 0, 0) + b"x" * 20
    else:
        raw = raw[FILE_HEADER:]  # frames as the unversioned format wrote them
        offset = 0
    wal.write_bytes(bytes(raw))
    before = dir_bytes(data)
    line = start_refused(name, data)
    if damage == "old_format":
        assert f"WAL {wal} is not a shmwatch WAL" in line, line
    else:
        assert f"WAL {wal} is corrupt at offset {offset}:" in line, line
    cli = (sys.executable, "-m", "shmwatch.tools.cli", "serve")
    # The same reason, after the command's own name.
    assert start_refused(name, data, *cli).split(": error: ")[1] == line.split(": error: ")[1]
    assert dir_bytes(data) == before


def snapshotted(data) -> str:
    """A broker that took a snapshot (snapshot_every=20) and wrote WAL records after it,
    stopped. Its name."""
    name = broker.unique_name()
    with broker.spawn(name, data_dir=str(data), snapshot_every=20) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        for i in range(40):
            c.put(f"s/{i}", "x" * 100)
        fw.wait_for(lambda: (data / "snap").exists(), 30, "a snapshot")
        c.put("s/after", "y")
    assert wal_records(data / "wal"), "no WAL record after the snapshot"
    return name


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["half_cut", "bit_flip", "meta_flip"])
def test_damaged_snapshot_or_meta_refuses_the_start(tmp_path, damage):
    """A half-cut or bit-flipped snapshot (was: a ValueError traceback, or a misread
    one) and a damaged meta are refused with WalCorrupt naming the file; nothing
    changes."""
    data = tmp_path / "data"
    name = snapshotted(data)
    target = data / ("meta" if damage == "meta_flip" else "snap")
    raw = bytearray(target.read_bytes())
    if damage == "half_cut":
        raw = raw[:len(raw) // 2]
    else:
        raw[len(raw) * 2 // 3] ^= 0x08
    target.write_bytes(bytes(raw))
    before = dir_bytes(data)
    line = start_refused(name, data)
    assert f"{target} is damaged" in line, line
    assert dir_bytes(data) == before


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["undecodable_op", "op_changing_nothing", "bad_snapshot"])
def test_checksummed_data_that_cannot_be_replayed_refuses_the_start(tmp_path, damage):
    """A WAL record or snapshot whose checksums pass but which the MVCC core cannot
    replay (an op that does not decode; a read, which no write-ahead log holds; a store
    that is not consistent) is corruption too: WalCorrupt naming the file (and the
    record's offset), not a traceback."""
    from broker.wal import KIND_KV, DataDir
    from shmwatch.wire.ops import RangeOp
    from shmwatch.wire.protocol import encode_op

    data = tmp_path / "data"
    name, _revs = put_values(data, 5)
    offset = (data / "wal").stat().st_size
    dd = DataDir(str(data))
    try:
        dd.load()
        if damage == "undecodable_op":
            dd.append(KIND_KV, ["nonsense"])
        elif damage == "op_changing_nothing":
            dd.append(KIND_KV, encode_op(RangeOp(b"t/0")))
        else:
            dd.snapshot({"mvcc": {"format": 1, "rev": 9, "compact_rev": -1, "keys": []},
                         "log": []})
    finally:
        dd.close()
    line = start_refused(name, data)
    if damage == "bad_snapshot":
        assert f"snapshot {data / 'snap'} passes its checksum but cannot be restored" in line, line
    else:
        assert (f"WAL {data / 'wal'} is corrupt at offset {offset}: record 6 passes its "
                f"checksums but cannot be replayed") in line, line


@pytest.mark.timeout(120)
def test_restart_with_a_smaller_log_replays_an_explicit_compaction_it_wrapped_past(tmp_path):
    """The WAL holds 100 puts, compact(50), 20 puts. Replayed with a revision log too
    small for 50 revisions, the ring's wrap compacts past 50 before the compaction
    record comes: that record is then a no-op (was: CompactedError at start). Every
    write is there."""
    data = tmp_path / "data"
    name = broker.unique_name()
    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        revs = [c.put(f"k/{i}", "v" * 1000).revision for i in range(100)]
        c.compact(revs[48])
        revs += [c.put(f"k/{i}", "w" * 1000).revision for i in range(100, 120)]
    with broker.spawn(name, data_dir=str(data), log_bytes=32 << 10) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        r = c.get("k/", prefix=True)
        assert (r.revision, len(r.kvs)) == (revs[-1], 120)
        assert broker_info(b.name)["compact_revision"] > revs[48]
        assert c.put("k/new", "x").revision == revs[-1] + 1


# ------------------------------------------------------------------ shmwatch repair


def shmwatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", *args], check=False,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(150)
def test_repair_dry_run_changes_nothing_and_yes_restores_the_records_before_the_damage(tmp_path):
    """The issue's damage, repaired explicitly. `shmwatch repair` (dry run) names the
    damage, its offset, what is dropped and the revision the store will be at, exits 1
    and changes nothing; it refuses to touch a directory a live broker holds;
    `--yes` keeps the damaged WAL byte for byte, and the broker then starts with exactly
    the 50 writes before the damage and continues from revision 51."""
    data = tmp_path / "data"
    name, revs = put_values(data, 100)
    wal = data / "wal"
    recs = wal_records(wal)
    raw = bytearray(wal.read_bytes())
    raw[recs[50][0] + 3] ^= 0xFF
    wal.write_bytes(bytes(raw))
    before = dir_bytes(data)

    r = shmwatch("repair", "--data-dir", str(data))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"wal: DAMAGED at offset {recs[50][0]} of {len(raw)}" in r.stdout, r.stdout
    assert "keeps 50 records" in r.stdout and f"at revision {revs[49]}" in r.stdout
    assert f"drops {len(raw) - recs[50][0]} bytes" in r.stdout
    assert "49 intact records after it (sequence 52-100)" in r.stdout
    assert dir_bytes(data) == before, "the dry run changed the data directory"

    with broker.spawn(data_dir=str(tmp_path / "other")) as live:
        r = shmwatch("repair", "--data-dir", str(tmp_path / "other"), "--yes")
        assert r.returncode == 1 and "in use by another broker" in r.stdout, r.stdout
        assert live.alive()

    r = shmwatch("repair", "--data-dir", str(data), "--yes")
    assert r.returncode == 0, r.stdout + r.stderr
    kept = [p for p in data.iterdir() if p.name.startswith("wal.corrupt-")]
    assert len(kept) == 1 and kept[0].read_bytes() == bytes(raw)
    assert f"kept the original wal as {kept[0]}" in r.stdout
    assert wal.read_bytes() == bytes(raw[:recs[50][0]])
    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        got = c.get("t/", prefix=True)
        assert got.revision == revs[49]
        assert sorted(kv.key for kv in got.kvs) == sorted(f"t/{i}".encode() for i in range(50))
        assert [c.get(f"t/{i}").kvs[0].mod_revision for i in range(50)] == revs[:50]
        assert c.put("t/new", "x").revision == revs[49] + 1
    assert shmwatch("repair", "--data-dir", str(data)).returncode == 0


# ------------------------------------------------------------------ file modes


def file_modes(data) -> dict[str, int]:
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in data.iterdir()}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("existing", [True, False])
def test_data_dir_files_are_0600_and_a_created_dir_0700(tmp_path, existing):
    """Under umask 0 (inherited by the broker), with --mode 660 for the segments: every
    file the broker writes (wal, snap, meta, lock) is 0600; a pre-existing 0755
    directory keeps its mode, one the broker creates is 0700. Was: snap and meta 0644."""
    data = tmp_path / "data"
    if existing:
        data.mkdir()
        data.chmod(0o755)
    old = os.umask(0)
    try:
        name = broker.unique_name()
        with broker.spawn(name, data_dir=str(data), snapshot_every=5, mode=0o660) as b, \
                clientlib.connect(b.name, timeout=10) as c:
            for i in range(12):
                c.put(f"p/{i}", "secret")
            fw.wait_for(lambda: (data / "snap").exists(), 30, "a snapshot")
    finally:
        os.umask(old)
    modes = file_modes(data)
    assert set(modes) == {"lock", "wal", "meta", "snap"}, modes
    assert all(m == 0o600 for m in modes.values()), {n: oct(m) for n, m in modes.items()}
    assert stat.S_IMODE(data.stat().st_mode) == (0o755 if existing else 0o700)


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


NOBODY = _nobody()


@pytest.mark.skipif(os.geteuid() != 0 or NOBODY is None,
                    reason="needs root (to run a child as another uid) and a 'nobody' user")
@pytest.mark.timeout(120)
def test_another_user_cannot_read_the_data_dir_files(tmp_path):
    """Issue 9.3's second finding: in a pre-existing 0755 directory that `nobody` can
    enter, `nobody` read every value from `snap`. Now a child running as nobody gets
    EACCES on every file, while a 0644 file beside them shows it could have read one."""
    base = tempfile.mkdtemp(prefix="shmwatch-perm-")
    try:
        os.chmod(base, 0o755)
        data = os.path.join(base, "data")
        os.mkdir(data, 0o755)
        os.chmod(data, 0o755)
        with broker.spawn(data_dir=data, snapshot_every=5) as b, \
                clientlib.connect(b.name, timeout=10) as c:
            for i in range(12):
                c.put(f"p/{i}", "secret")
            fw.wait_for(lambda: os.path.exists(os.path.join(data, "snap")), 30, "a snapshot")
        control = os.path.join(data, "control")
        with open(control, "w") as f:
            f.write("readable")
        os.chmod(control, 0o644)
        # /bin/sh, not this interpreter: it may live where nobody cannot execute it.
        script = ('for p; do if cat "$p" >/dev/null 2>&1; then echo "$p read"; '
                  'else echo "$p denied"; fi; done')
        names = ["snap", "meta", "wal", "lock", "control"]
        r = subprocess.run(["/bin/sh", "-c", script, "sh", *(os.path.join(data, n) for n in names)],
                           user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[],
                           capture_output=True, text=True, timeout=60, check=False)
        got = dict(line.rsplit(" ", 1) for line in r.stdout.splitlines())
        assert got == {os.path.join(data, n): "denied" if n != "control" else "read"
                       for n in names}, r.stdout + r.stderr
    finally:
        shutil.rmtree(base)


# ------------------------------------------------------------------ snapshots


def _workload(c: clientlib.Client, seed: int, n: int = 230) -> None:
    """A deterministic mix of puts, deletes, range deletes, txns and one compaction."""
    rnd = random.Random(seed)
    keys = [f"s/{i:02d}" for i in range(15)]
    for i in range(n):
        r = rnd.random()
        k = rnd.choice(keys)
        if i == n // 2:
            c.compact(c.get("s/", prefix=True).revision - 20)
        elif r < 0.6:
            c.put(k, f"{i}:{rnd.random()}")
        elif r < 0.75:
            c.delete(k)
        elif r < 0.8:
            c.delete(k, rnd.choice(keys) + "~")
        else:
            ks = rnd.sample(keys, 3)
            c.txn(compare=[clientlib.compare_version(ks[0], ">", 0)],
                  success=[clientlib.op_put(ks[1], f"t{i}"), clientlib.op_delete(ks[2])],
                  failure=[clientlib.op_put(ks[0], f"f{i}")])


def _state(c: clientlib.Client, name: str) -> dict:
    """Everything a client can see of the store: revision, compaction point, every key
    at every retained revision, and the event history from the compaction point."""
    rev = c.get("", prefix=True).revision
    compact = broker_info(name)["compact_revision"]
    assert compact > 1
    with pytest.raises(clientlib.CompactedError):
        c.get("", prefix=True, revision=compact - 1)
    at = {r: [tuple(kv) for kv in c.get("", prefix=True, revision=r).kvs]
          for r in range(compact, rev + 1)}
    with c.watch("", prefix=True, start_revision=compact) as w:
        assert w.get(10).created
        events = fw.read_until(w, rev)
    return {"rev": rev, "compact": compact, "at": at, "events": events}


@pytest.mark.timeout(120)
def test_snapshot_plus_wal_replay_gives_the_same_store(tmp_path):
    """The same workload on a broker that snapshots every 50 WAL records and on one that
    never does: both restarted (one stopped, one SIGKILLed) give the store they had, and
    the same one: keys at every retained revision, compaction point, history."""
    seed = random.randrange(1 << 30)
    snap_dir, plain_dir = tmp_path / "snap", tmp_path / "plain"
    states = {}
    names = {}
    for label, d, every in (("snap", snap_dir, 50), ("plain", plain_dir, 10**6)):
        with broker.spawn(data_dir=str(d), snapshot_every=every) as b, \
                clientlib.connect(b.name, timeout=10) as c:
            names[label] = b.name
            _workload(c, seed)
            states[label] = _state(c, b.name)
            if label == "plain":
                b.kill()
    assert states["snap"] == states["plain"], f"the workload is not deterministic? ({seed})"
    assert (snap_dir / "snap").exists() and not (plain_dir / "snap").exists()
    # The snapshot covers a prefix of the history (when exactly depends on when the
    # housekeeping pass saw 50 records): the restart replays the rest from the WAL.
    assert len(wal_records(plain_dir / "wal")) >= states["plain"]["rev"] - 1  # + compact
    assert len(wal_records(snap_dir / "wal")) < len(wal_records(plain_dir / "wal"))
    for label, d in (("snap", snap_dir), ("plain", plain_dir)):
        with broker.spawn(names[label], data_dir=str(d)) as b, \
                clientlib.connect(b.name, timeout=10) as c:
            assert _state(c, b.name) == states[label], f"{label}: restored store differs"
            assert c.put("s/new", "x").revision == states[label]["rev"] + 1


# ------------------------------------------------------------------ restarts and clients


@pytest.mark.timeout(90)
def test_restart_without_data_dir_is_a_new_store_and_old_clients_are_refused(tmp_path):
    """A broker restarted under the same name but without its --data-dir is a new, empty
    store (revisions start over): its old clients' calls raise BrokerUnavailable,
    reconnect() refuses (new cluster id), a resume=True watch ends with
    BrokerUnavailable instead of resuming into other revisions. The data dir is
    untouched: a broker started on it again has the data back."""
    data = str(tmp_path / "data")
    b = broker.spawn(data_dir=data)
    b2 = b3 = None
    try:
        c = clientlib.connect(b.name, timeout=3)
        for i in range(3):
            c.put("k", str(i))
        w = c.watch("k", resume=True)
        assert w.get(10).created
        b.kill()
        b2 = broker.spawn(b.name)
        with pytest.raises(clientlib.BrokerUnavailable):
            c.put("k", "x")
        with pytest.raises(clientlib.BrokerUnavailable, match="cluster id"):
            c.reconnect(timeout=10)
        with pytest.raises(clientlib.BrokerUnavailable):
            w.get(timeout=5)
        with clientlib.connect(b.name, timeout=10) as fresh:
            r = fresh.get("k")
            assert r.kvs == [] and r.revision == 1
        c.close()
        b2.stop()
        b3 = broker.spawn(b.name, data_dir=data)
        with clientlib.connect(b.name, timeout=10) as again:
            kv = again.get("k").kvs[0]
            assert (kv.value, kv.mod_revision, kv.version) == (b"2", 4, 3)
    finally:
        for x in (b3, b2, b):
            if x is not None:
                x.stop()
    assert fw.shm_entries(b.name) == []


@pytest.mark.timeout(90)
def test_restart_with_data_dir_resumes_watches(tmp_path):
    """A clean stop and restart on the same data dir: reconnect() succeeds (same cluster
    id), a resume=True watch continues from the revision after the last it delivered,
    a plain watch ends with BrokerUnavailable."""
    data = str(tmp_path / "data")
    b = broker.spawn(data_dir=data)
    b2 = None
    try:
        c = clientlib.connect(b.name, timeout=10)
        resumed = c.watch("r/", prefix=True, resume=True)
        plain = c.watch("r/", prefix=True)
        assert resumed.get(10).created and plain.get(10).created
        revs = [c.put(f"r/{i}", "x").revision for i in range(5)]
        got = fw.read_until(resumed, revs[1])  # read some, leave the rest in the ring
        b.stop()
        b2 = broker.spawn(b.name, data_dir=data)
        with clientlib.connect(b.name, timeout=10) as other:
            revs += [other.put(f"r/{i}", "y").revision for i in range(5, 8)]
        fw.read_until(resumed, revs[-1], got)
        assert [e[0] for e in got] == revs
        with pytest.raises(clientlib.BrokerUnavailable):
            while True:
                plain.get(timeout=10)
        assert c.put("r/last", "z").revision == revs[-1] + 1
        c.close()
    finally:
        if b2 is not None:
            b2.stop()
        b.stop()


@pytest.mark.timeout(90)
def test_two_brokers_cannot_share_a_data_dir(tmp_path):
    data = str(tmp_path / "data")
    with broker.spawn(data_dir=data) as a, clientlib.connect(a.name, timeout=10) as c:
        c.put("k", "v")
        other = broker.unique_name()
        r = subprocess.run([sys.executable, "-m", "broker", "--name", other, "--data-dir", data],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        assert "in use by another broker" in r.stderr, r.stderr[-2000:]
        assert fw.shm_entries(other) == []
        with pytest.raises(RuntimeError):
            broker.spawn(data_dir=data)
        assert c.put("k", "w").revision == 3
    with broker.spawn(data_dir=data) as a, clientlib.connect(a.name, timeout=10) as c:
        assert c.get("k").kvs[0].value == b"w"
