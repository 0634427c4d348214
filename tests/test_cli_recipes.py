"""`shmwatch lock` / `shmwatch elect` against etcdctl 3.4's: the same command lines on a
real etcd and a fresh broker, the same output once the lease ids (which differ by
design: each store grants its own) are replaced by a placeholder, the same `Error:`
lines and exit codes (tests/test_cli_etcdctl.py's Pair runs both)."""

from __future__ import annotations

import base64
import json
import re
import signal
import time

import pytest

from tests import test_cli_etcdctl as cli
from tests.test_cli_etcdctl import Pair, Result, normalise

pair = cli.pair  # the fixture: an etcd with etcdctl beside a broker with shmwatch

pytestmark = pytest.mark.timeout(120)

_SIMPLE_KEY = re.compile(rb"([A-Za-z]+/)[0-9a-f]{1,16}\b")


def unlease(out: bytes) -> bytes:
    """Output with every lease id replaced: `NAME/<hex>` keys in simple output, and in
    JSON lines the (base64) keys and the `lease` fields."""
    lines = []
    for line in normalise(out).splitlines(keepends=True):
        if line.startswith(b"{"):
            doc = json.loads(line)
            for kv in doc.get("kvs", []):
                key = _SIMPLE_KEY.sub(rb"\1LEASE", base64.b64decode(kv["key"]))
                kv["key"], kv["lease"] = key.decode(), "LEASE"
            line = json.dumps(doc).encode() + b"\n"
        lines.append(_SIMPLE_KEY.sub(rb"\1LEASE", line))
    return b"".join(lines)


def both(p: Pair, *args: str) -> dict:
    return {tool: p.spawn(tool, *args) for tool in ("etcdctl", "shmwatch")}


def held(p: Pair, prefix: str, n: int = 1) -> None:
    """Wait until both stores hold `n` keys under `prefix/`."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        counts = [len(getattr(p, t)("get", prefix + "/", "--prefix", "--keys-only").out.split())
                  for t in ("etcdctl", "shmwatch")]
        if counts == [n, n]:
            return
        time.sleep(0.1)
    raise AssertionError(f"{prefix}: {counts} keys, want {n} on both")


def stop(procs: dict, sig=signal.SIGINT) -> dict[str, Result]:
    """Signal both, and their whole output (nothing of it was read before)."""
    for proc in procs.values():
        proc.send_signal(sig)
    out = {}
    for t, proc in procs.items():
        proc.stdin = None  # closed by spawn()
        try:
            o, e = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out[t] = Result(o, e, proc.returncode)
    return out


def assert_same(got: dict[str, Result]) -> None:
    want, ours = got["etcdctl"], got["shmwatch"]
    what = f"etcdctl: {want}\nshmwatch: {ours}"
    assert unlease(ours.out) == unlease(want.out), what
    assert ours.said() == want.said() and ours.rc == want.rc, what


def test_argument_errors(pair):
    for args in (["lock"], ["elect"], ["elect", "e"], ["elect", "-l", "e", "p"],
                 ["elect", "a", "b", "c"]):
        pair.same(*args, rc=128)
    pair.same("lock", "L", "--ttl=abc", "echo", rc=1)


def test_lock_runs_a_command_with_etcdctls_environment(pair):
    for cmd in (["sh", "-c", "echo key=$ETCD_LOCK_KEY rev=$ETCD_LOCK_REV; exit 3"],
                ["sh", "-c", "echo key=$ETCD_LOCK_KEY rev=$ETCD_LOCK_REV"],
                ["no-such-command-here"], ["./no/such/file"]):
        got = {"etcdctl": pair.etcdctl("lock", "L", "--", *cmd),
               "shmwatch": pair.shmwatch("lock", "L", "--", *cmd)}
        assert_same(got)
    pair.same("get", "", "--prefix")  # every key released, at the same revisions
    pair.same("put", "after", "x", "-w", "json")


@pytest.mark.parametrize("fmt", ["simple", "json"])
def test_lock_holds_until_a_signal(pair, fmt):
    procs = both(pair, "lock", "L", "-w", fmt)
    held(pair, "L")
    waiting = both(pair, "lock", "L")  # queued behind: interrupted, it withdraws its key
    held(pair, "L", 2)
    assert_same(stop(waiting))
    held(pair, "L", 1)
    assert_same(stop(procs, signal.SIGTERM))
    pair.same("get", "", "--prefix")
    pair.same("put", "after", "x", "-w", "json")


def test_elect_campaign_and_listen(pair):
    listen = both(pair, "elect", "-l", "E")
    listen_json = both(pair, "elect", "-l", "E", "-w", "json")
    time.sleep(0.5)  # the observers wait for a first leader
    first = both(pair, "elect", "E", "v1")
    held(pair, "E")
    second = both(pair, "elect", "E", "v2", "-w", "json")
    held(pair, "E", 2)
    assert_same(stop(first))  # v1 resigns: v2 leads
    held(pair, "E", 1)
    time.sleep(0.5)
    assert_same(stop(second))
    held(pair, "E", 0)
    time.sleep(0.5)
    got = stop(listen)
    assert_same(got)
    assert unlease(got["shmwatch"].out) == b"E/LEASE\nv1\nE/LEASE\nv2\n"
    got = stop(listen_json)
    assert_same(got)  # etcd's Observe responses: header and kvs, no count
    assert len(got["shmwatch"].out.splitlines()) == 2 and b'"count"' not in got["shmwatch"].out
    pair.same("put", "after", "x", "-w", "json")
