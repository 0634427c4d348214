"""Registering a client: what it costs in /dev/shm, what happens when that cannot be
paid or a name is taken, and the label a client shows in the broker's metrics.

A registration that fails is reported in the client's slot (SLOT_FAILED + an error code),
so `connect` raises the matching typed error at once: never a Timeout after waiting for
a registration that will not come. Most cases run a broker in a thread of the test
process (tests/hostile_workers.broker_in_thread) so that /dev/shm can be made "full"
by patching os.posix_fallocate, or names made to clash by patching the broker's token
source; one test fills a real private tmpfs.
"""

from __future__ import annotations

import errno
import json
import logging
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

import clientlib
from broker import registry
from clientlib.attach import _label_bytes, default_label
from shm import layout as L
from shm.lock import try_lock, unlock
from shm.segment import HEADER_SIZE, Segment
from shm.ring import ring_bytes
from tests import fault_workers as fw
from tests import hostile_workers as hw

pytestmark = pytest.mark.timeout(120)
CTX = mp.get_context("spawn")


def fail_fallocate_above(monkeypatch, limit: int) -> None:
    """From now on, reserving more than `limit` bytes fails as a full /dev/shm does."""
    real = os.posix_fallocate

    def fallocate(fd: int, offset: int, length: int) -> None:
        if length > limit:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)


# ------------------------------------------------------------------ /dev/shm is full


def test_client_that_does_not_fit_gets_no_space_error_at_once(monkeypatch):
    """Its rings cannot be reserved: connect raises NoSpaceError (not a Timeout, though
    its timeout is long) saying how many bytes and which options to shrink; nothing of
    the attempt is left in /dev/shm, its slot is free again, and once there is room a
    client registers."""
    with hw.broker_in_thread(log_bytes=1 << 20) as b:
        before = fw.shm_entries(b.cfg.name)
        fail_fallocate_above(monkeypatch, 1 << 20)
        with pytest.raises(clientlib.NoSpaceError) as info:
            clientlib.connect(b.cfg.name, timeout=60)
        need = HEADER_SIZE + L.CLIENT_HEADER + 2 * ring_bytes(1 << 20)
        msg = str(info.value)
        assert "/dev/shm is full" in msg and f"needs {need} bytes" in msg, msg
        assert "--request-ring-bytes" in msg and "--response-ring-bytes" in msg, msg
        assert fw.shm_entries(b.cfg.name) == before
        assert b.words[L.slot_word(0, L.SLOT_STATE)] == L.SLOT_FREE
        monkeypatch.undo()
        with clientlib.connect(b.cfg.name, timeout=10) as c:
            assert c._slot == 0
            assert c.put("k", "v").revision == 2


def test_arena_that_does_not_fit_gets_no_space_error_and_the_client_goes_on(monkeypatch):
    """A watch whose arena of rings cannot be reserved raises NoSpaceError naming
    --watch-ring-bytes and --rings-per-arena (was: "internal error: ShmNoSpace(...)");
    the client keeps working, and watches once there is room."""
    with hw.broker_in_thread(log_bytes=1 << 20) as b, \
            clientlib.connect(b.cfg.name, timeout=10) as c:
        fail_fallocate_above(monkeypatch, 4 << 20)  # an arena is 32 x 256 KiB rings
        with pytest.raises(clientlib.NoSpaceError) as info:
            c.watch("k")
        msg = str(info.value)
        assert "/dev/shm is full" in msg and str(32 * ring_bytes(256 << 10)) in msg, msg
        assert "--watch-ring-bytes" in msg and "--rings-per-arena" in msg, msg
        assert not [e for e in fw.shm_entries(b.cfg.name) if ".a0." in e]
        assert c.put("k", "v").revision == 2
        monkeypatch.undo()
        with c.watch("k", start_revision=1) as w:
            assert w.get(10).created
            assert [e.kv.value for e in w.get(10).events] == [b"v"]


def _private_shm_available() -> bool:
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs none /dev/shm"],
                           check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def test_a_really_full_dev_shm():
    """The same two failures with a real ENOSPC: in a private 48 MiB /dev/shm (its own
    mount namespace), a client needing 64 MiB of rings, and a watch needing a 64 MiB
    arena. Both raise NoSpaceError at once; nothing is left behind."""
    if not _private_shm_available():
        pytest.skip("cannot mount a private /dev/shm (needs unshare -m and CAP_SYS_ADMIN)")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = "from tests import hostile_workers as hw; hw.full_shm_scenario()"
    r = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         'mount -t tmpfs -o size=48m none /dev/shm && exec "$0" -c "$1"',
         sys.executable, script],
        check=False, capture_output=True, text=True, timeout=100, cwd=root)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    kind, msg = out["register"]
    assert kind == "NoSpaceError" and "--request-ring-bytes" in msg, out
    assert not [e for e in out["left_after_register"] if ".c0g" in e], out
    kind, msg = out["arena"]
    assert kind == "NoSpaceError" and "--watch-ring-bytes" in msg, out
    assert out["put_after"] == 2
    assert out["end"] == []


# ------------------------------------------------------------------ names that clash


def test_taken_client_name_is_retried_under_a_fresh_one(monkeypatch, caplog):
    """The first token the broker draws for a client names an object that exists
    (another user's, when we can make one): the broker logs it with its owner and
    registers the client under a fresh name; the squatted object is left alone."""
    with hw.broker_in_thread(log_bytes=1 << 20) as b:
        name = b.cfg.name
        taken = 0x5EED
        squatted = [f"shmwatch.{name}.{L.client_part(0, 1, taken)}"]
        nobody = _nobody()
        if os.geteuid() == 0 and nobody is not None:
            hw.squat(squatted, nobody.pw_uid, nobody.pw_gid)
            whose = f"owner nobody (uid {nobody.pw_uid})"
        else:
            os.close(os.open(os.path.join("/dev/shm", squatted[0]), os.O_CREAT | os.O_EXCL))
            whose = "owner "
        tokens = iter([taken])
        real = registry.new_token
        monkeypatch.setattr(registry, "new_token", lambda: next(tokens, None) or real())
        try:
            with caplog.at_level(logging.WARNING, logger="shmwatch.broker"):
                with clientlib.connect(name, timeout=10) as c:
                    assert c._part != L.client_part(0, 1, taken)
                    assert c.put("k", "v").revision == 2
            text = caplog.text
            assert f"/dev/shm/{squatted[0]}" in text and "already exists" in text, text
            assert whose in text, text
            assert os.path.exists(os.path.join("/dev/shm", squatted[0]))
        finally:
            hw.unsquat(squatted)


def test_names_that_always_clash_fail_the_registration_at_once(monkeypatch):
    """Every fresh name taken (a token source that always repeats itself): connect
    raises a ShmwatchError naming the broker at once, not a Timeout; the slot is free
    again and a later client registers."""
    with hw.broker_in_thread(log_bytes=1 << 20) as b:
        name = b.cfg.name
        entry = f"shmwatch.{name}.{L.client_part(0, 1, 7)}"
        os.close(os.open(os.path.join("/dev/shm", entry), os.O_CREAT | os.O_EXCL, 0o600))
        try:
            monkeypatch.setattr(registry, "new_token", lambda: 7)
            with pytest.raises(clientlib.ShmwatchError) as info:
                clientlib.connect(name, timeout=60)
            assert type(info.value) is clientlib.ShmwatchError, repr(info.value)
            assert "could not register this client" in str(info.value)
            monkeypatch.undo()
            with clientlib.connect(name, timeout=10) as c:
                assert c._slot == 0 and c.put("k", "v").revision == 2
        finally:
            hw.unsquat([entry])


def _nobody():
    import pwd

    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


# ------------------------------------------------------------------ labels


def label_child(name: str, conn) -> None:
    import clientlib

    with clientlib.connect(name, timeout=20) as c:
        conn.send(c._slot)
        conn.recv()  # stay connected until the parent has looked


def test_labels_shown_in_metrics(broker_proc):
    """An explicit label, the default in a main process (script:pid) and in a
    multiprocessing child (its process name) appear as "label" in metrics rows."""
    name = broker_proc.name
    parent, child = CTX.Pipe()
    p = CTX.Process(target=label_child, args=(name, child), name="indexer-3", daemon=True)
    with clientlib.connect(name, timeout=10, label="web worker") as a, \
            clientlib.connect(name, timeout=10) as d:
        p.start()
        try:
            assert parent.poll(60)
            child_slot = parent.recv()
            s = fw.stats_where(name, lambda s: len(s["clients"]) == 3, 30, "three clients")
            labels = {r["slot"]: r["label"] for r in s["clients"]}
            assert labels[a._slot] == "web worker"
            assert labels[d._slot] == default_label() == \
                f"{os.path.basename(sys.argv[0])}:{os.getpid()}"
            assert labels[child_slot] == "indexer-3"
        finally:
            parent.send("done")
            p.join(30)
            fw.reap([p])


def test_label_is_bounded_and_cut_at_a_character():
    assert _label_bytes("x" * 100) == b"x" * L.SLOT_LABEL_BYTES
    cut = _label_bytes("é" * 40)  # 2 bytes each: 64 bytes hold 32
    assert cut == "é".encode() * 32
    cut = _label_bytes("a" + "€" * 30)  # 1 + 3 * 21 = 64
    assert cut.decode() == "a" + "€" * 21
    cut = _label_bytes("ab" + "€" * 30)  # 2 + 3 * 20 = 62: the 21st euro does not fit
    assert cut.decode() == "ab" + "€" * 20
    assert _label_bytes("\udcff") == b"?"  # a lone surrogate is replaced, not an error


def test_undecodable_label_written_into_a_slot_is_shown_replaced(broker_proc):
    """The label is the client's to write and the broker's to show, never to trust:
    bytes that are not UTF-8 are shown with replacement characters; the broker serves
    on. (A raw registration: lock a slot, write the label and REQUESTED by hand.)"""
    name = broker_proc.name
    with Segment.open(f"/shmwatch.{name}.ctl", kind=L.KIND_CTL) as ctl:
        words = ctl.payload.cast("Q")
        try:
            slot = 5
            assert try_lock(ctl.fd, L.slot_lock_byte(slot))
            off = L.slot_label_offset(slot)
            ctl.payload[off:off + L.SLOT_LABEL_BYTES] = (b"ok\xff\xfe" * 16)
            words[L.slot_word(slot, L.SLOT_PID)] = os.getpid()
            words[L.slot_word(slot, L.SLOT_STATE)] = L.SLOT_REQUESTED
            words[L.CTL_REG_SEQ] += 1
            fw.wait_for(lambda: words[L.slot_word(slot, L.SLOT_STATE)] == L.SLOT_READY, 30,
                        "the raw registration")
            s = fw.stats_where(name, lambda s: any(r["slot"] == slot for r in s["clients"]),
                               30, "the raw client in the metrics")
            label = next(r["label"] for r in s["clients"] if r["slot"] == slot)
            assert label == "ok\ufffd\ufffd" * 16
            unlock(ctl.fd, L.slot_lock_byte(slot))
            fw.stats_where(name, lambda s: not s["clients"], 30, "the raw client reclaimed")
        finally:
            words.release()
    with clientlib.connect(name, timeout=10) as c:
        assert c.put("k", "v").revision == 2
