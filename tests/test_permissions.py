"""Who may attach: a broker's segments and semaphores are its user's alone (mode 0600)
unless it is started with --mode/--group; another user gets a clear PermissionDenied,
never a hang; another user who creates names in /dev/shm first blocks nobody, and is
named when it holds the broker's own name. The cross-user tests drop a spawned child to
`nobody` (they need root).
"""

from __future__ import annotations

import grp
import multiprocessing as mp
import os
import pwd
import stat
import subprocess
import sys

import pytest

import broker
import clientlib
from tests import fault_workers as fw
from tests import hostile_workers as hw

CTX = mp.get_context("spawn")


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


NOBODY = _nobody()
needs_root_and_nobody = pytest.mark.skipif(
    os.geteuid() != 0 or NOBODY is None,
    reason="needs root (to drop a child to another uid) and a 'nobody' user")


def modes(name: str) -> dict[str, tuple[int, int, int]]:
    """{entry: (permission bits, uid, gid)} of every /dev/shm entry of broker `name`."""
    out = {}
    for e in fw.shm_entries(name):
        st = os.stat(os.path.join("/dev/shm", e))
        out[e] = (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return out


def kinds(entries) -> set[str]:
    """What kinds of objects `entries` covers: ctl, log, stats, bell, client, client
    bell, arena (names as in docs/INTERNALS.md "Names")."""
    out = set()
    for e in entries:
        # shmwatch.<broker>.<part> or sem.shmwatch.<broker>.<part>
        part = e.split(".", 3 if e.startswith("sem.") else 2)[-1].split(".")
        if part[0] in ("ctl", "log", "stats", "bell"):
            out.add(part[0])
        elif part[-1] == "bell":
            out.add("client bell")
        elif len(part) == 4 and part[2].startswith("a"):
            out.add("arena")
        else:
            out.add("client")
    return out


ALL_KINDS = {"ctl", "log", "stats", "bell", "client", "client bell", "arena"}


def attach_as(name: str, uid: int, gid: int, groups=()) -> tuple:
    """In a spawned child dropped to uid/gid: connect, put, get. Its report."""
    parent, child = CTX.Pipe(duplex=False)
    p = CTX.Process(target=fw.attach_as, args=(name, uid, gid, list(groups), child),
                    daemon=True)
    p.start()
    child.close()
    try:
        assert parent.poll(60), "the child reported nothing: hung?"
        return parent.recv()
    finally:
        p.join(30)
        fw.reap([p])
        parent.close()


@pytest.mark.timeout(60)
def test_segments_and_semaphores_are_private_by_default():
    """Every segment and semaphore (control, log, stats, doorbells, a client's rings, an
    arena) is mode 0600 and owned by the broker's user, whatever the umask."""
    old = os.umask(0)  # the broker inherits it: the mode must not depend on it
    try:
        b = broker.spawn()
    finally:
        os.umask(old)
    try:
        with clientlib.connect(b.name, timeout=10) as c:
            assert c.watch("k").get(10).created
            m = modes(b.name)
            assert kinds(m) == ALL_KINDS, sorted(m)
            for e, (bits, uid, _gid) in m.items():
                assert bits == 0o600, f"{e} has mode {oct(bits)}"
                assert uid == os.geteuid(), f"{e} belongs to uid {uid}"
    finally:
        b.stop()


@pytest.mark.timeout(60)
def test_group_mode_and_group_ownership():
    """--mode 660 --group G: every object (also those made later for a client) is
    mode 0660 and group G."""
    gid = NOBODY.pw_gid if NOBODY else os.getegid()
    b = fw.spawn_cli(broker.unique_name(), "--mode", "660", "--group", str(gid))
    try:
        with clientlib.connect(b.name, timeout=10) as c:
            assert c.watch("k").get(10).created
            m = modes(b.name)
            assert kinds(m) == ALL_KINDS, sorted(m)
            for e, (bits, _uid, g) in m.items():
                assert bits == 0o660, f"{e} has mode {oct(bits)}"
                assert g == gid, f"{e} has gid {g}, not {gid}"
    finally:
        b.stop()


@pytest.mark.timeout(60)
def test_spawn_mode_option_is_the_mode_given():
    with broker.spawn(mode=0o660) as b:
        m = modes(b.name)
        assert m and {bits for bits, _u, _g in m.values()} == {0o660}, \
            {e: oct(bits) for e, (bits, _u, _g) in m.items()}


@pytest.mark.timeout(60)
def test_world_writable_broker_is_refused():
    """A control segment anyone could write is refused by clients (PermissionDenied).
    (`--mode 666` is refused at start; here someone widened it afterwards.)"""
    with broker.spawn() as b:
        os.chmod(f"/dev/shm/shmwatch.{b.name}.ctl", 0o666)
        with pytest.raises(clientlib.PermissionDenied, match="world-writable"):
            clientlib.connect(b.name, timeout=5)


@needs_root_and_nobody
@pytest.mark.timeout(90)
def test_other_user_gets_permission_denied():
    """`nobody` cannot attach to a default (0600) broker: PermissionDenied, a
    BrokerUnavailable, with a message that says why; no hang. The broker is unharmed."""
    with broker.spawn() as b:
        res = attach_as(b.name, NOBODY.pw_uid, NOBODY.pw_gid)
        assert res[0] == "PermissionDenied", res
        assert "BrokerUnavailable" in res[2] and "PermissionError" in res[2]
        assert "permission denied" in res[1]
        with clientlib.connect(b.name, timeout=10) as c:
            assert c.put("k", "v").revision == 2


@needs_root_and_nobody
@pytest.mark.timeout(90)
def test_group_member_can_attach_and_others_cannot():
    """With --mode 660 --group G: `nobody` with primary group G attaches (its client
    segments and semaphore are made for the group too) and puts; `nobody` with another
    group is denied."""
    gid = NOBODY.pw_gid
    try:
        grp.getgrgid(gid)
    except KeyError:
        pytest.skip(f"nobody's group {gid} does not exist")
    other_gid = next(g for g in range(gid - 1, 0, -1) if g != os.getegid())
    b = fw.spawn_cli(broker.unique_name(), "--mode", "660", "--group", str(gid))
    try:
        res = attach_as(b.name, NOBODY.pw_uid, gid)
        assert res[0] == "ok", res
        assert res[2] == [b"x"]
        res = attach_as(b.name, NOBODY.pw_uid, other_gid)
        assert res[0] == "PermissionDenied", res
        # ... and a supplementary group is as good as the primary one.
        res = attach_as(b.name, NOBODY.pw_uid, other_gid, groups=[gid])
        assert res[0] == "ok", res
        with clientlib.connect(b.name, timeout=10) as c:
            assert len(c.get("perm/", prefix=True).kvs) == 2
            fw.stats_where(b.name, lambda s: len(s["clients"]) == 1, 30,
                           "the children's slots to be free again")
    finally:
        b.stop()
    assert fw.shm_entries(b.name) == []


# ------------------------------------------------------------------ squatters


def _run_broker(name: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "broker", "--name", name],
                          check=False, capture_output=True, text=True, timeout=60)


@needs_root_and_nobody
@pytest.mark.timeout(90)
def test_control_name_squatted_by_another_user_is_refused_naming_the_owner():
    """`nobody` creates /dev/shm/shmwatch.N.ctl before N starts: the start fails at once
    with an error naming the path and its owner (was: "already running (pid 0)"); the
    squatted file is another user's, so neither the start nor `cleanup` removes it;
    a client is told the object is not a broker."""
    from broker.admin import broker_info, cleanup_stale

    name = broker.unique_name()
    ctl = f"shmwatch.{name}.ctl"
    hw.squat([ctl], NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        r = _run_broker(name)
        assert r.returncode == 1, r
        assert f"/dev/shm/{ctl}" in r.stderr, r.stderr
        assert f"nobody (uid {NOBODY.pw_uid})" in r.stderr, r.stderr
        assert "already running" not in r.stderr
        assert cleanup_stale(name) == []
        info = broker_info(name)
        assert info["state"] == "stale" and info["owner"] == f"nobody (uid {NOBODY.pw_uid})"
        with pytest.raises(clientlib.BrokerUnavailable, match=f"uid {NOBODY.pw_uid}"):
            clientlib.connect(name, timeout=5)
        assert fw.shm_entries(name) == [ctl]
    finally:
        hw.unsquat([ctl])


@needs_root_and_nobody
@pytest.mark.timeout(90)
def test_squatted_object_names_block_neither_a_broker_nor_its_clients():
    """`nobody` pre-creates every name a broker and its first clients used to get
    (doorbell, log, stats, c<slot>g1 rings, doorbells and arenas): the broker starts,
    clients register, write and watch (was: the start failed, or every registration
    timed out), the squatted files are left alone, and the broker leaves nothing of
    its own behind."""
    name = broker.unique_name()
    entries = [f"shmwatch.{name}.{p}" for p in ("log", "stats")]
    entries.append(f"sem.shmwatch.{name}.bell")
    for slot in range(4):
        entries += [f"shmwatch.{name}.c{slot}g1", f"shmwatch.{name}.c{slot}g1.a0",
                    f"sem.shmwatch.{name}.c{slot}g1.bell"]
    hw.squat(entries, NOBODY.pw_uid, NOBODY.pw_gid)
    try:
        with broker.spawn(name) as b:
            with clientlib.connect(b.name, timeout=10) as c1, \
                    clientlib.connect(b.name, timeout=10) as c2:
                w = c2.watch("sq/", prefix=True)
                assert w.get(10).created
                rev = c1.put("sq/k", "v").revision
                assert [(e.kv.key, e.kv.mod_revision) for e in w.get(10).events] == \
                    [(b"sq/k", rev)]
        assert fw.shm_entries(name) == sorted(entries)
        for e in entries:
            assert os.stat(os.path.join("/dev/shm", e)).st_uid == NOBODY.pw_uid
    finally:
        hw.unsquat(entries)
    assert fw.shm_entries(name) == []
