"""Failure model: processes that die at arbitrary moments, clients that vanish without a
word, brokers killed under their clients, and what a dead broker leaves in /dev/shm.

Every child is a real process (multiprocessing "spawn") killed with SIGKILL, so the
kernel, not the dying process, releases its locks: exactly the case the broker's
OFD-lock liveness check exists for. No test measures time: every wait polls with a
deadline, and a deadline only turns a hang into a failure.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import subprocess
import sys
import threading

import psutil

import pytest

import broker
import clientlib
from broker.admin import broker_info, cleanup_stale
from shmwatch.wire.protocol import OP_KV, encode_op, packb
from shm import layout as L
from shm.lock import is_locked, unlock
from shm.segment import Segment
from tests import fault_workers as fw

CTX = mp.get_context("spawn")


def wait_reclaimed(name: str, who: dict, what: str) -> dict:
    """Wait until the client `who` ({"pid", "part"}) has nothing left in /dev/shm and
    the broker's metrics no longer list its pid; return those metrics."""
    fw.wait_for(lambda: not fw.client_entries(name, who["part"]), 30,
                f"{what}: its segments and semaphore to be unlinked "
                f"(still {fw.client_entries(name, who['part'])})")
    return fw.stats_where(name, lambda s: who["pid"] not in fw.client_pids(s), 30,
                          f"{what}: its pid {who['pid']} to leave the broker's client list")


def start_child(target, *args):
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def wait_info(path: str, p) -> dict:
    def ready():
        if not p.is_alive():
            raise AssertionError(f"child exited with {p.exitcode} before it was ready")
        return fw.load(path) if os.path.exists(path) else None
    return fw.wait_for(ready, 60, f"child {p.pid} to connect")


# ------------------------------------------------------------------ SIGKILL matrix


@pytest.mark.timeout(180)
def test_writer_killed_mid_request_is_reclaimed_and_nothing_half_applied(tmp_path):
    """A writer SIGKILLed in a tight put loop (every 5th value is 150 kB, streamed through
    a 64 kB request ring in several chunks, so a kill can land mid-message): its
    segments and semaphore are unlinked, it leaves the client list, the other client
    keeps working, and the store holds only whole values the writer wrote, applied
    exactly once and in order (nothing half-written, nothing after the last one sent)."""
    seed = random.randrange(1 << 30)
    rnd = random.Random(seed)
    with broker.spawn(request_ring_bytes=65536) as b, \
            clientlib.connect(b.name, timeout=20) as other:
        live = other.watch("kw/", prefix=True)
        assert live.get(20).created
        seen = []
        acked = {}
        for i in range(3):
            tag = f"r{i}"
            done = CTX.RawValue("q", 0)
            info = str(tmp_path / f"{tag}.info")
            p = start_child(fw.put_loop, b.name, tag, info, done)
            try:
                who = wait_info(info, p)
                target = rnd.randrange(1, 40)
                fw.wait_for(lambda p=p, done=done, target=target:
                            done.value >= target or not p.is_alive(), 60,
                            f"{target} acknowledged puts (seed {seed})")
                assert p.is_alive(), f"the writer died by itself: exit code {p.exitcode}"
                p.kill()
                p.join(10)
            finally:
                fw.reap([p])
            acked[tag] = done.value
            wait_reclaimed(b.name, who, f"killed writer {tag}")
            fw.drain(live, seen)
            assert other.put(f"other/{tag}", "alive").revision > 1
            assert other.get(f"other/{tag}").kvs[0].value == b"alive"
        end = other.put("kw/end", "end").revision

        for kv in other.get("kw/", prefix=True).kvs:
            if kv.key == b"kw/end":
                continue
            n = fw.parse_writer_value(kv.value)  # raises on a damaged value
            tag = kv.key.decode().split("/")[1]
            assert kv.key == fw.writer_key(tag, n).encode(), f"{kv.key!r} holds value #{n}"
        full = fw.history(other, "kw/", end)
        for tag, n_acked in acked.items():
            ns = [fw.parse_writer_value(v) for _rev, t, k, v in full
                  if t == "PUT" and k.startswith(f"kw/{tag}/".encode())]
            assert ns == list(range(len(ns))), \
                f"{tag}: puts applied out of order, twice or with a gap (seed {seed}): {ns}"
            assert len(ns) in (n_acked, n_acked + 1), \
                f"{tag}: {n_acked} acknowledged puts, {len(ns)} applied (seed {seed})"
        # The watch that was open all along saw exactly that history.
        fw.read_until(live, end, seen)
        assert seen == full


@pytest.mark.timeout(120)
def test_watcher_killed_mid_read_is_reclaimed(tmp_path):
    """A process reading three watches is SIGKILLed while events stream to it: its rings,
    arena and semaphore go, the broker's watcher count drops by three, and another watch
    still gets every revision exactly once."""
    rnd = random.Random()
    with broker.spawn() as b, clientlib.connect(b.name, timeout=20) as c:
        mine = c.watch("kw/", prefix=True)
        assert mine.get(20).created
        seen = CTX.RawValue("q", 0)
        info = str(tmp_path / "reader.info")
        p = start_child(fw.watch_reader, b.name, info, 3, seen)
        revs, got = [], []
        try:
            who = wait_info(info, p)
            assert any(e.startswith(f"shmwatch.{b.name}.{who['part']}.a")
                       for e in fw.client_entries(b.name, who["part"])), "no arena?"
            fw.stats_where(b.name, lambda s: s["watchers"]["total"] == 4, 30, "4 watchers")
            target = rnd.randrange(10, 200)

            def write_some():
                for _ in range(5):
                    revs.append(c.put(f"kw/x/{len(revs) % 5}", str(len(revs))).revision)
                fw.drain(mine, got)
                return seen.value >= target or not p.is_alive()

            fw.wait_for(write_some, 60, f"the reader to receive {target} events", interval=0)
            assert p.is_alive(), f"the reader died by itself: exit code {p.exitcode}"
            p.kill()  # while events keep coming
            for _ in range(10):
                write_some()
            p.join(10)
        finally:
            fw.reap([p])
        s = wait_reclaimed(b.name, who, "killed reader")
        s = fw.stats_where(b.name, lambda s: s["watchers"]["total"] == 1, 30,
                           "the watcher count to drop to 1")
        assert s["watchers"]["total"] == 1
        fw.read_until(mine, revs[-1], got)
        assert [rev for rev, *_ in got] == revs
        assert c.put("kw/x/after", "1").revision == revs[-1] + 1


@pytest.mark.timeout(120)
def test_victim_watcher_killed_is_reclaimed(tmp_path):
    """A stalled watcher whose 4 KiB ring filled (the broker made it a victim, holding
    its pending events) is SIGKILLed: it is reclaimed, the victim and watcher counts
    drop, and another watcher on the same keys gets every revision exactly once."""
    with broker.spawn(watch_ring_bytes=4096) as b, clientlib.connect(b.name, timeout=20) as c:
        info = str(tmp_path / "stalled.info")
        p = start_child(fw.stalled_watcher, b.name, info)
        revs, got = [], []
        try:
            who = wait_info(info, p)
            mine = c.watch("kw/", prefix=True)
            assert mine.get(20).created

            def victim():
                for _ in range(10):
                    revs.append(c.put(f"kw/v/{len(revs) % 3}", "x" * 300).revision)
                    fw.drain(mine, got)
                s = fw.stats(b.name)
                return s is not None and any(
                    cl["pid"] == who["pid"] and cl["victims"] >= 1 for cl in s["clients"])

            fw.wait_for(victim, 60, "the stalled watcher to become a victim", interval=0)
            assert p.is_alive()
            p.kill()
            p.join(10)
        finally:
            fw.reap([p])
        wait_reclaimed(b.name, who, "killed victim")
        fw.read_until(mine, revs[-1], got)
        assert [rev for rev, *_ in got] == revs
        s = fw.stats_where(b.name, lambda s: s["watchers"]["total"] == 1
                           and s["watchers"]["victim"] == 0, 30,
                           "one watcher left and no victim")
        assert s["watchers"]["total"] == 1


@pytest.mark.timeout(90)
def test_clients_of_a_killed_broker_get_broker_unavailable():
    """SIGKILL the broker under blocked watch.get(timeout=30) calls (a plain watch and a
    resume=True one, whose reconnect finds no broker) in threads: both raise
    BrokerUnavailable (not Timeout); later calls and connects raise it too."""
    b = broker.spawn()
    try:
        c = clientlib.connect(b.name, timeout=3)
        plain = c.watch("k")
        resumable = c.watch("r", resume=True)
        assert plain.get(10).created and resumable.get(10).created
        results: dict[str, BaseException | str] = {}

        def block(key, w):
            try:
                w.get(timeout=30)
                results[key] = "returned a response"
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                results[key] = exc

        threads = [threading.Thread(target=block, args=(k, w), daemon=True)
                   for k, w in (("plain", plain), ("resume", resumable))]
        for t in threads:
            t.start()
        b.kill()
        for t in threads:
            t.join(45)  # a bound, not a measurement: a get that ran into its timeout
            assert not t.is_alive()  # raised Timeout, which the checks below reject
        for key in ("plain", "resume"):
            assert isinstance(results[key], clientlib.BrokerUnavailable), (key, results[key])
            assert not isinstance(results[key], clientlib.Timeout), (key, results[key])
        with pytest.raises(clientlib.BrokerUnavailable):
            plain.get(timeout=5)
        with pytest.raises(clientlib.BrokerUnavailable):
            c.put("k", "v")
        with pytest.raises(clientlib.BrokerUnavailable):
            clientlib.connect(b.name, timeout=3)
        c.close()
    finally:
        b.stop()
    assert fw.shm_entries(b.name) == []


# ------------------------------------------------------------------ abandoned clients


def _slot_locked(name: str, slot: int) -> bool:
    with Segment.open(f"/shmwatch.{name}.ctl", kind=L.KIND_CTL) as probe:
        return is_locked(probe.fd, L.slot_lock_byte(slot))


@pytest.mark.timeout(60)
def test_abandoned_client_is_reclaimed_and_cannot_disturb_the_next():
    """A Client whose process lives on but whose slot lock is gone (what the kernel does
    when its descriptor is closed), with no goodbye: the broker reclaims it, its slot
    is reused by a new client, and the abandoned object's calls fail (they reach nobody,
    least of all the slot's next owner) instead of hanging."""
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as other:
        c = clientlib.connect(b.name, timeout=2)
        w = c.watch("ab/")
        assert w.get(10).created
        who = {"pid": os.getpid(), "part": c._part}
        slot = c._slot
        other_watch = other.watch("ab/", prefix=True)
        assert other_watch.get(10).created
        unlock(c._lock_fd, L.slot_lock_byte(slot))
        fw.wait_for(lambda: not fw.client_entries(b.name, who["part"]), 30,
                    "the abandoned client's segments to be unlinked")
        fw.stats_where(b.name, lambda s: s["watchers"]["total"] == 1, 30,
                       "the abandoned client's watcher to be dropped")
        with clientlib.connect(b.name, timeout=10) as nxt:
            assert nxt._slot == slot and nxt._part != who["part"]
            with pytest.raises(clientlib.ShmwatchError):
                c.put("ab/zombie", "x", timeout=1)
            assert nxt.put("ab/next", "1").revision == 2
            assert [kv.key for kv in nxt.get("ab/", prefix=True).kvs] == [b"ab/next"]
        r = other_watch.get(10)
        assert [e.kv.key for e in r.events] == [b"ab/next"]
        c.close()  # no hang, no error
    assert fw.shm_entries(b.name) == []


@pytest.mark.timeout(60)
def test_client_dropped_without_close_is_reclaimed():
    """A Client torn down without close() (no goodbye message: its mappings and
    descriptors are released as a dropped object's would be): reclaimed."""
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as other:
        c = clientlib.connect(b.name, timeout=5)
        assert c.watch("x").get(10).created
        part = c._part
        c._release()  # what close() does, minus the goodbye
        fw.wait_for(lambda: not fw.client_entries(b.name, part), 30, "reclaim")
        fw.stats_where(b.name, lambda s: len(s["clients"]) == 1
                       and s["watchers"]["total"] == 0, 30, "one client, no watcher")
        assert other.put("x", "y").revision == 2


@pytest.mark.timeout(60)
def test_closing_the_lock_descriptor_releases_the_slot_lock():
    """A dropped client: closing only the descriptor that holds its slot lock (its
    mappings of the control segment live on) frees the slot, and the broker reclaims
    it. The lock lives on a descriptor of its own, never mapped, so no mmap keeps it."""
    with broker.spawn() as b:
        c = clientlib.connect(b.name, timeout=5)
        try:
            slot, part = c._slot, c._part
            os.close(c._lock_fd)
            c._lock_fd = -1
            assert not _slot_locked(b.name, slot), "slot lock still held after its fd closed"
            fw.wait_for(lambda: not fw.client_entries(b.name, part), 10, "reclaim")
        finally:
            c._release()  # its views go: the mapping, its descriptor and the lock with it


@pytest.mark.timeout(60)
def test_unpublished_and_partial_requests_of_an_abandoned_client_are_never_applied():
    """A request ring left holding (a) a complete record whose head was never published
    and (b) the first chunks of a streamed message that never got its last chunk: the
    broker reads neither as a request, reclaims the client, and keeps serving."""
    with broker.spawn(request_ring_bytes=65536) as b, \
            clientlib.connect(b.name, timeout=10) as other:
        watch = other.watch("half/", prefix=True)
        assert watch.get(10).created

        # (b) first chunks of a 200 kB put published, the rest never written.
        c1 = clientlib.connect(b.name, timeout=5)
        big = packb([OP_KV, 10**9, encode_op(clientlib.op_put("half/partial", "p" * 200_000))])
        off = c1._req.write(big, 0)
        assert 0 < off < len(big), "the message should need more than one ring's worth"
        c1._req.publish()
        c1._broker_bell.ring()
        fw.wait_for(lambda: c1._req.tail == c1._req.head, 30,
                    "the broker to consume the published chunks")
        # (a) a whole, valid record written but never published.
        c2 = clientlib.connect(b.name, timeout=5)
        rec = packb([OP_KV, 10**9, encode_op(clientlib.op_put("half/unpublished", "u"))])
        assert c2._req.write(rec, 0) == len(rec) and c2._req.pending()
        c2._broker_bell.ring()
        # Both still registered: a round trip of `other` proves the broker ran a pass.
        assert other.get("half/", prefix=True).kvs == []

        parts = [c1._part, c2._part]
        for c in (c1, c2):
            unlock(c._lock_fd, L.slot_lock_byte(c._slot))
        for part in parts:
            fw.wait_for(lambda part=part: not fw.client_entries(b.name, part), 30,
                        f"client {part} to be reclaimed")
        end = other.put("half/end", "e").revision
        assert [kv.key for kv in other.get("half/", prefix=True).kvs] == [b"half/end"]
        assert [e.kv.key for e in watch.get(10).events] == [b"half/end"]
        assert end == 2, "something else was applied"
        for c in (c1, c2):
            c.close()


# ------------------------------------------------------------------ stale segments


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(90)
def test_killed_broker_is_stale_and_a_new_one_replaces_its_leftovers():
    """kill -9 a broker with a client: `shmwatch ls` and broker_info say stale (with its
    pid), its objects stay in /dev/shm; a new broker under the same name starts, removes
    them all, and leaves nothing stale; the old client is refused (BrokerUnavailable),
    also by reconnect() (new cluster id)."""
    b = broker.spawn()
    b2 = None
    try:
        c = clientlib.connect(b.name, timeout=3)
        assert c.watch("s").get(10).created
        c.put("s", "1")
        old_part = c._part
        b.kill()
        info = broker_info(b.name)
        assert info["state"] == "stale" and info["pid"] == b.pid
        listed = json.loads(_cli("ls", "-w", "json").stdout)
        mine = [r for r in listed if r["name"] == b.name]
        assert mine and mine[0]["state"] == "stale" and mine[0]["pid"] == b.pid
        left = fw.shm_entries(b.name)
        assert f"shmwatch.{b.name}.ctl" in left and fw.client_entries(b.name, old_part)
        with pytest.raises(clientlib.BrokerUnavailable):
            c.put("s", "2")

        b2 = broker.spawn(b.name)
        assert broker_info(b.name)["state"] == "alive"
        assert broker_info(b.name)["pid"] == b2.pid
        assert not fw.client_entries(b.name, old_part)
        with Segment.open(f"/shmwatch.{b.name}.ctl") as ctl:
            boot = ctl.boot_id
        for e in fw.shm_entries(b.name):
            if not e.startswith("sem."):
                with Segment.open("/" + e) as seg:
                    assert seg.boot_id == boot, f"{e} is a leftover of the killed broker"
        assert cleanup_stale(b.name) == []
        with pytest.raises(clientlib.BrokerUnavailable):
            c.put("s", "3")
        with pytest.raises(clientlib.BrokerUnavailable, match="cluster id"):
            c.reconnect(timeout=5)
        with clientlib.connect(b.name, timeout=10) as fresh:
            assert fresh.get("s").kvs == []  # a new, empty store
        c.close()
    finally:
        if b2 is not None:
            b2.stop()
        b.stop()
    assert fw.shm_entries(b.name) == []


@pytest.mark.timeout(90)
def test_second_broker_under_a_live_name_fails_naming_the_pid():
    """`python -m broker --name X` under a live X exits 1 with "already running (pid N)";
    broker.spawn raises; the live broker's clients are unaffected."""
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        c.put("k", "v")
        r = subprocess.run([sys.executable, "-m", "broker", "--name", b.name],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r
        assert f"already running (pid {b.pid})" in r.stderr
        with pytest.raises(RuntimeError):
            broker.spawn(b.name)
        assert broker_info(b.name)["pid"] == b.pid
        assert c.get("k").kvs[0].value == b"v"
        assert c.put("k", "w").revision == 3


@pytest.mark.timeout(90)
def test_refused_second_broker_leaves_the_live_one_intact():
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        c.put("k", "v")
        before = fw.shm_entries(b.name)
        r = subprocess.run([sys.executable, "-m", "broker", "--name", b.name],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1, r
        assert fw.shm_entries(b.name) == before
        with clientlib.connect(b.name, timeout=10) as late:
            assert late.get("k").kvs[0].value == b"v"


@pytest.mark.timeout(90)
def test_cleanup_removes_a_dead_brokers_leftovers_never_a_live_ones():
    """`shmwatch cleanup --name X`: removes everything a killed X left (its clients'
    segments too); for a live X it removes nothing, and X keeps serving."""
    dead = broker.spawn()
    live = broker.spawn()
    try:
        c = clientlib.connect(dead.name, timeout=5)
        assert c.watch("x").get(10).created
        dead.kill()
        c.close()
        with clientlib.connect(live.name, timeout=10) as lc:
            assert lc.watch("x").get(10).created
            live_before = fw.shm_entries(live.name)
            dead_before = fw.shm_entries(dead.name)
            assert len(dead_before) >= 7  # ctl log stats bell, client ring, bell, arena

            r = _cli("cleanup", "--name", live.name)
            assert r.returncode == 0 and "nothing to clean up" in r.stdout
            assert fw.shm_entries(live.name) == live_before
            r = _cli("cleanup", "--name", dead.name)
            assert r.returncode == 0, r.stderr
            assert sorted(r.stdout.split()) == sorted(
                ["removed"] * len(dead_before) + [f"/dev/shm/{e}" for e in dead_before])
            assert fw.shm_entries(dead.name) == []
            assert broker_info(dead.name)["state"] == "absent"
            assert fw.shm_entries(live.name) == live_before
            assert lc.put("x", "1").revision == 2
            assert lc.get("x").kvs[0].value == b"1"
    finally:
        live.stop()
        dead.stop()
    assert fw.shm_entries(dead.name) == [] and fw.shm_entries(live.name) == []


def _private_shm_available() -> bool:
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /dev/shm"],
                           check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


@pytest.mark.timeout(120)
def test_cleanup_without_name_spares_live_brokers():
    """`shmwatch cleanup` (every broker): removes a killed broker's objects, leaves a live
    broker's alone. Run in a private /dev/shm (its own mount namespace), so that it can
    only see this test's brokers, never another run's."""
    if not _private_shm_available():
        pytest.skip("cannot mount a private /dev/shm (needs unshare -m and CAP_SYS_ADMIN)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = "from tests import fault_workers as fw; fw.global_cleanup_scenario()"
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         'mount -t tmpfs none /dev/shm && exec "$0" -c "$1"', sys.executable, script],
        check=False, capture_output=True, text=True, timeout=100, cwd=root)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0, out["stderr"]
    assert len(out["before"]["dead"]) >= 7 and out["after"]["dead"] == []
    assert out["after"]["live"] == out["before"]["live"]
    assert sorted(out["stdout"].split()[1::2]) == sorted(
        f"/dev/shm/{e}" for e in out["before"]["dead"])
    assert out["rev"] == 2
    assert out["end"] == []


@pytest.mark.timeout(60)
def test_two_brokers_starting_at_once_leave_one_serving(monkeypatch):
    """Two brokers starting under one name at once: exactly one serves, and its objects
    are intact. The rival is started from inside the first one's try_lock (between
    creating its control segment and publishing it). Once, a control segment was
    visible before its lock was taken: the rival removed the first one's ctl as stale
    and started, then the first one failed on the doorbell name and its _unlink_all()
    unlinked the rival's ctl and bell: a broker no client could find."""
    from broker import registry, server

    name = broker.unique_name()
    real_try_lock = registry.try_lock
    second: list = []

    def try_lock_after_a_rival_started(fd, byte):
        if byte == L.BROKER_LOCK_BYTE and not second:
            try:
                second.append(broker.spawn(name))
            except Exception as exc:  # noqa: BLE001 - losing the race cleanly is fine
                second.append(exc)
        return real_try_lock(fd, byte)

    monkeypatch.setattr(registry, "try_lock", try_lock_after_a_rival_started)
    first = serving = None
    try:
        try:
            first = server.Broker(broker.BrokerConfig(name=name, log_bytes=1 << 20))
        except Exception:  # noqa: BLE001 - losing the race cleanly is fine
            first = None
        monkeypatch.undo()
        winners = [x for x in (first, *second) if x is not None and not isinstance(x, Exception)]
        assert len(winners) == 1, f"{len(winners)} brokers think they own {name!r}"
        if first is not None:
            serving = threading.Thread(target=first.serve_forever, daemon=True)
            serving.start()
        with clientlib.connect(name, timeout=5) as c:
            assert c.put("k", "v").revision == 2
    finally:
        if first is not None:
            first.stop()
            if serving is not None:
                serving.join(10)
            first.close()
        for x in second:
            if not isinstance(x, Exception):
                x.stop()
        cleanup_stale(name)
    assert fw.shm_entries(name) == []


# ------------------------------------------------------------------ liveness is the lock


@pytest.mark.timeout(90)
def test_zombie_broker_does_not_block_a_restart_or_cleanup():
    """A SIGKILLed broker its parent has not reaped (a zombie: psutil still sees its pid
    and start time) is dead: broker_info says stale, cleanup removes its objects, and a
    new broker takes its name. (Was: "already running", and "nothing to clean up".)"""
    b = broker.spawn()
    b2 = None
    try:
        c = clientlib.connect(b.name, timeout=10)
        assert c.watch("z").get(10).created
        c.close()
        os.kill(b.pid, signal.SIGKILL)  # and no wait(): it stays a zombie
        fw.wait_for(lambda: psutil.Process(b.pid).status() == psutil.STATUS_ZOMBIE, 30,
                    "the broker to become a zombie")
        fw.wait_for(lambda: broker_info(b.name)["state"] == "stale", 30,
                    f"broker_info to say stale (says {broker_info(b.name)})")
        left = fw.shm_entries(b.name)
        assert sorted(cleanup_stale(b.name)) == left and fw.shm_entries(b.name) == []
        assert psutil.Process(b.pid).status() == psutil.STATUS_ZOMBIE
        b2 = broker.spawn(b.name)
        with clientlib.connect(b.name, timeout=10) as c2:
            assert c2.put("z", "1").revision == 2
    finally:
        if b2 is not None:
            b2.stop()
        b.stop()  # reaps the zombie
    assert fw.shm_entries(b.name) == []


@pytest.mark.timeout(90)
@pytest.mark.parametrize("damage", ["magic", "version"])
def test_live_broker_with_an_unreadable_header_is_alive_and_never_cleaned(damage, monkeypatch):
    """A live broker whose control header does not parse (damaged magic, another layout
    version) holds its lock, so it is alive: broker_info says so (and why the header is
    unreadable), `cleanup` removes nothing of it even with no grace period at all, a
    second broker is refused; once the header is restored it serves as before.
    (Was: `shmwatch cleanup` deleted the live broker.)"""
    from broker import admin

    monkeypatch.setattr(admin, "STARTING_GRACE_S", 0.0)
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as c:
        assert c.watch("h").get(10).created
        before = fw.shm_entries(b.name)
        path = f"/dev/shm/shmwatch.{b.name}.ctl"
        offset, bad = (0, b"NOTOURS!") if damage == "magic" else (8, b"\x63\x00\x00\x00")
        with open(path, "r+b") as f:
            f.seek(offset)
            good = f.read(len(bad))
            f.seek(offset)
            f.write(bad)
        try:
            info = broker_info(b.name)
            assert info["state"] == "alive", info
            assert "unreadable control header" in info["error"], info
            assert cleanup_stale(b.name) == []
            r = _cli("cleanup", "--name", b.name)
            assert r.returncode == 0 and "nothing to clean up" in r.stdout, r
            r = subprocess.run([sys.executable, "-m", "broker", "--name", b.name],
                               check=False, capture_output=True, text=True, timeout=60)
            assert r.returncode == 1 and "already running (pid unknown" in r.stderr, r.stderr
            assert fw.shm_entries(b.name) == before
        finally:
            with open(path, "r+b") as f:
                f.seek(offset)
                f.write(good)
        assert c.put("h", "1").revision == 2
        with clientlib.connect(b.name, timeout=10) as late:
            assert late.get("h").kvs[0].value == b"1"
    assert fw.shm_entries(b.name) == []


@pytest.mark.timeout(90)
def test_requested_written_into_a_live_slot_is_refused_and_leaks_nothing():
    """Writing REQUESTED into a registered client's slot (any process that can write
    the control segment can) 20 times: the broker keeps the registration it has (no
    second set of rings: the broker's objects stay as they were), the client keeps
    working, and a clean stop leaves nothing. (Was: 41 objects, 50 MB, leaked.)"""
    with broker.spawn() as b:
        with clientlib.connect(b.name, timeout=10) as c:
            w = c.watch("r/", prefix=True)
            assert w.get(10).created
            before = fw.shm_entries(b.name)
            slot, gen = c._slot, c._gen
            with Segment.open(f"/shmwatch.{b.name}.ctl", kind=L.KIND_CTL) as ctl:
                words = ctl.payload.cast("Q")
                try:
                    for i in range(20):
                        words[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_REQUESTED
                        words[L.CTL_REG_SEQ] += 1
                        fw.wait_for(lambda: words[L.slot_word(slot, L.SLOT_STATE)]
                                    == L.SLOT_READY, 30, f"round {i}: the broker's answer")
                        assert fw.shm_entries(b.name) == before, f"round {i}"
                        assert words[L.slot_word(slot, L.SLOT_GEN)] == gen
                finally:
                    words.release()
            s = fw.stats_where(b.name, lambda s: len(s["clients"]) == 1, 30, "one client")
            assert s["clients"][0]["watchers"] == 1
            rev = c.put("r/k", "v").revision
            assert [(e.kv.key, e.kv.mod_revision) for e in w.get(10).events] == [(b"r/k", rev)]
    assert fw.shm_entries(b.name) == []


@pytest.mark.timeout(90)
def test_a_fifo_under_a_control_segment_name_blocks_nothing():
    """Anyone can make a FIFO in /dev/shm, and opening one for reading waits for a
    writer: `ls`, broker_info, cleanup, a client and a starting broker must not wait on
    it. They report it (not a control segment) and leave it alone."""
    from broker.admin import list_brokers

    name = broker.unique_name()
    path = f"/dev/shm/shmwatch.{name}.ctl"
    os.mkfifo(path, 0o600)
    try:
        info = broker_info(name)
        assert info["state"] == "unknown" and "not a regular file" in info["error"], info
        assert name in {r["name"] for r in list_brokers()}
        assert cleanup_stale(name) == []
        r = _cli("ls")
        assert r.returncode == 0 and name in r.stdout, r
        with pytest.raises(clientlib.BrokerUnavailable):
            clientlib.connect(name, timeout=5)
        r = subprocess.run([sys.executable, "-m", "broker", "--name", name],
                           check=False, capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and "is not a control segment" in r.stderr, r.stderr
        assert path in r.stderr
        assert fw.shm_entries(name) == [f"shmwatch.{name}.ctl"]
    finally:
        os.unlink(path)
