"""--data-dir: what survives a killed broker, a torn WAL, a snapshot, and what a restart
without the data means for the clients of the old store.

The WAL's record layout (broker/wal.py) is u32 length | u32 crc32 | msgpack body, so
these tests can cut and damage it at record boundaries.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import struct
import subprocess
import sys

import pytest

import broker
import clientlib
from broker.admin import broker_info
from tests import fault_workers as fw

CTX = mp.get_context("spawn")
_HDR = struct.Struct("<II")


def wal_records(path) -> list[tuple[int, int]]:
    """(start, end) offsets of the whole records of the WAL file `path`."""
    with open(path, "rb") as f:
        data = f.read()
    out, pos = [], 0
    while pos + 8 <= len(data):
        n, _crc = _HDR.unpack_from(data, pos)
        if pos + 8 + n > len(data):
            break
        out.append((pos, pos + 8 + n))
        pos += 8 + n
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


@pytest.mark.timeout(90)
@pytest.mark.parametrize("damage", ["garbage", "cut", "flip", "huge_length", "short_header"])
def test_torn_wal_tail_is_dropped_and_earlier_writes_survive(tmp_path, damage):
    """After a stop, the WAL's tail is damaged as a crash mid-write would (or worse):
    the broker starts, drops the tail, keeps every write before it, continues the
    revisions from there, and what it writes next survives the next restart (the torn
    bytes were cut away, not left in front of new records)."""
    data = tmp_path / "data"
    wal = data / "wal"
    name = broker.unique_name()
    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        revs = [c.put(f"t/{i}", f"v{i}").revision for i in range(10)]
    recs = wal_records(wal)
    assert len(recs) == 10 and recs[-1][1] == wal.stat().st_size
    survivors = 10
    with open(wal, "r+b") as f:
        if damage == "garbage":
            f.seek(0, os.SEEK_END)
            f.write(b"\x17" * 7 + os.urandom(100))
        elif damage == "cut":
            f.truncate(recs[-1][0] + 8 + 3)  # header and 3 bytes of the last record
            survivors = 9
        elif damage == "flip":
            f.seek(recs[-1][1] - 2)
            byte = f.read(1)
            f.seek(recs[-1][1] - 2)
            f.write(bytes([byte[0] ^ 0x40]))
            survivors = 9
        elif damage == "huge_length":
            f.seek(0, os.SEEK_END)
            f.write(_HDR.pack(0x7FFFFFF0, 0) + b"x" * 20)
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\x05\x00\x00")
    good_end = recs[survivors - 1][1]

    with broker.spawn(name, data_dir=str(data)) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        assert wal.stat().st_size == good_end, "the torn tail was not cut away"
        for i in range(10):
            kvs = c.get(f"t/{i}").kvs
            if i < survivors:
                assert kvs and kvs[0].value == f"v{i}".encode()
                assert kvs[0].mod_revision == revs[i]
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
