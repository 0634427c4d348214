"""The `shmwatch` command (tools/cli/) as a user runs it, against a spawned broker.

Output shapes follow etcdctl 3.4: `put` prints OK; `get` prints key and value lines;
`del` prints the count; `watch` prints event type, key and value lines; `-w json` is
protobuf JSON with base64 keys and values and zero fields omitted, and a watch response
is clientv3.WatchResponse (Header, Events, CompactRevision, Canceled, Created).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import broker
import clientlib
from broker.admin import cleanup_stale, read_stats
from shmwatch.tools.cli.common import cluster_id
from shmwatch.tools.cli.output import MEMBER_ID_SALT, humanize_bytes
from tests.mp_workers import wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def shm_entries(name: str) -> set[str]:
    return {e for e in os.listdir("/dev/shm")
            if e.startswith((f"shmwatch.{name}.", f"sem.shmwatch.{name}."))}


def run(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", *args], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=ENV, check=False)
    assert p.returncode == rc, f"shmwatch {' '.join(args)}: exit {p.returncode}\n" \
        f"stdout: {p.stdout}\nstderr: {p.stderr}"
    return p


class Lines:
    """A long-running `shmwatch` subprocess whose stdout lines are read with a timeout."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "shmwatch.tools.cli", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=ENV)
        self.q: queue.Queue = queue.Queue()
        self.t = threading.Thread(target=self._pump, daemon=True)
        self.t.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line.rstrip("\n"))
        self.q.put(None)

    def take(self, n: int, timeout: float = 20.0) -> list[str]:
        out = []
        for _ in range(n):
            try:
                line = self.q.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no output line within {timeout}s; got {out}; "
                                     f"exit {self.proc.poll()}") from None
            assert line is not None, f"the command ended after {out}: {self.stderr()}"
            out.append(line)
        return out

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return ""
        return self.proc.stderr.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.t.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


def n_clients(name: str) -> int:
    return len(read_stats(name)["clients"])


def test_put_get_del_compact_simple(broker_proc):
    n = ["--name", broker_proc.name]
    assert run("put", *n, "foo", "bar").stdout == "OK\n"
    assert run("put", *n, "foo", "baz", "--prev-kv").stdout == "OK\nfoo\nbar\n"
    assert run("put", *n, "fop", "1").stdout == "OK\n"
    assert run("get", *n, "foo").stdout == "foo\nbaz\n"
    assert run("get", *n, "fo", "--prefix").stdout == "foo\nbaz\nfop\n1\n"
    assert run("get", *n, "foo", "fop").stdout == "foo\nbaz\n"  # [foo, fop)
    # --keys-only: each key, then the (empty) value line, as etcdctl prints it
    assert run("get", *n, "fo", "--from-key", "--keys-only").stdout == "foo\n\nfop\n\n"
    assert run("get", *n, "foo", "--rev", "2").stdout == "foo\nbar\n"
    assert run("get", *n, "nothing").stdout == ""
    assert run("del", *n, "foo").stdout == "1\n"
    assert run("del", *n, "foo").stdout == "0\n"
    assert run("del", *n, "fo", "--prefix", "--prev-kv").stdout == "1\nfop\n1\n"
    assert run("compact", *n, "3").stdout == "compacted revision 3\n"
    p = run("get", *n, "foo", "--rev", "2", rc=1)
    assert p.stderr == "Error: etcdserver: mvcc: required revision has been compacted\n"
    p = run("put", *n, "", "v", rc=1)
    assert "etcdserver: key is not provided" in p.stderr


def test_put_get_del_compact_json(broker_proc):
    n = ["--name", broker_proc.name, "-w", "json"]
    out = json.loads(run("put", *n, "foo", "bar").stdout)
    assert out["header"]["revision"] == 2 and out["header"]["cluster_id"] > 0
    out = json.loads(run("put", *n, "foo", "baz", "--prev-kv").stdout)
    assert out["header"]["revision"] == 3
    assert out["prev_kv"] == {"key": b64("foo"), "create_revision": 2, "mod_revision": 2,
                              "version": 1, "value": b64("bar")}
    out = json.loads(run("get", *n, "foo").stdout)
    assert out["header"]["revision"] == 3 and out["count"] == 1 and "more" not in out
    assert out["kvs"] == [{"key": b64("foo"), "create_revision": 2, "mod_revision": 3,
                           "version": 2, "value": b64("baz")}]
    out = json.loads(run("get", *n, "nothing").stdout)
    assert "kvs" not in out and "count" not in out  # zero fields are omitted
    out = json.loads(run("del", *n, "foo", "--prev-kv").stdout)
    assert out["header"]["revision"] == 4 and out["deleted"] == 1
    assert out["prev_kvs"][0]["value"] == b64("baz")
    # etcdctl's compaction prints its line whatever -w says
    assert run("compact", *n, "4").stdout == "compacted revision 4\n"


@pytest.mark.timeout(60)
def test_watch_simple_live_and_from_rev_1(broker_proc):
    name = broker_proc.name
    with clientlib.connect(name, timeout=10) as c:
        c.put("wk", "v1")
        c.put("wk", "v2")
        c.delete("wk")
        hist = Lines("watch", "--name", name, "wk", "--rev", "1")
        live = Lines("watch", "--name", name, "wk", "--prev-kv")
        try:
            assert hist.take(7) == ["PUT", "wk", "v1", "PUT", "wk", "v2", "DELETE"]
            assert hist.take(2) == ["wk", ""]
            # The live one prints only what comes after it started.
            wait_for(lambda: read_stats(name)["watchers"]["total"] == 2, 20,
                     "both watch commands to have created their watch")
            c.put("wk", "v3")
            c.put("wk", "v4")
            assert live.take(3) == ["PUT", "wk", "v3"]
            assert live.take(5) == ["PUT", "wk", "v3", "wk", "v4"]  # prev_kv, then kv
            assert hist.take(6) == ["PUT", "wk", "v3", "PUT", "wk", "v4"]
            for w in (hist, live):
                w.proc.send_signal(signal.SIGINT)  # ^C: killed by SIGINT, as etcdctl is
                assert w.proc.wait(20) == -signal.SIGINT, w.stderr()
        finally:
            hist.close()
            live.close()
        wait_for(lambda: n_clients(name) == 1, 20, "the watch commands to leave")


@pytest.mark.timeout(60)
def test_watch_json_from_rev_1_then_terminated(broker_proc):
    name = broker_proc.name
    with clientlib.connect(name, timeout=10) as c:
        r1 = c.put("jk", "a").revision
        r2 = c.delete("jk").revision
        w = Lines("watch", "--name", name, "-w", "json", "jk", "--rev", "1")
        try:
            got = [json.loads(line) for line in w.take(1)]
            r3 = c.put("jk", "b").revision
            got += [json.loads(line) for line in w.take(1)]
            w.proc.terminate()
            assert w.proc.wait(20) == -signal.SIGTERM
        finally:
            w.close()
        # The catch-up (revisions r1, r2) comes as one response, the live put as another.
        assert [sorted(g) for g in got] == [
            ["Canceled", "CompactRevision", "Created", "Events", "Header"]] * 2
        first, second = got
        assert first["Header"]["revision"] >= r2 and first["Header"]["cluster_id"] > 0
        assert first["CompactRevision"] == 0 and first["Canceled"] is False
        assert first["Created"] is False
        assert first["Events"] == [
            {"kv": {"key": b64("jk"), "create_revision": r1, "mod_revision": r1,
                    "version": 1, "value": b64("a")}},
            {"type": 1, "kv": {"key": b64("jk"), "mod_revision": r2}},
        ]
        assert second["Header"]["revision"] == r3
        assert second["Events"] == [{"kv": {"key": b64("jk"), "create_revision": r3,
                                            "mod_revision": r3, "version": 1,
                                            "value": b64("b")}}]
        # The terminated command's client is reclaimed by the broker.
        wait_for(lambda: n_clients(name) == 1, 20, "the terminated watch to be reclaimed")
        assert c.put("jk", "c").revision == r3 + 1


def test_watch_refused_and_no_broker_errors(broker_proc):
    p = run("watch", "--name", broker_proc.name, "b", "a", rc=5)  # etcdctl: ExitInterrupted
    assert p.stderr == ("watch was canceled (mvcc: watcher range is empty)\n"
                        "Error: watch is canceled by the server\n")
    p = run("put", "--name", "nosuchbroker-" + os.urandom(4).hex(), "k", "v", rc=1)
    assert p.stderr.startswith("Error: shmwatch: no broker named")


def test_ls(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        rev = c.put("k", "v").revision
        rows = {r["name"]: r for r in json.loads(run("ls", "-w", "json").stdout)}
        mine = rows[broker_proc.name]
        assert mine["pid"] == broker_proc.pid and mine["state"] == "alive"
        assert mine["revision"] == rev and mine["clients"] == 1
        lines = run("ls").stdout.splitlines()
        assert lines[0].split() == ["NAME", "PID", "STATE", "REVISION", "CLIENTS"]
        row = next(line.split() for line in lines if line.startswith(broker_proc.name + " "))
        assert row == [broker_proc.name, str(broker_proc.pid), "alive", str(rev), "1"]


@pytest.mark.timeout(60)
def test_cleanup_removes_a_killed_brokers_leftovers_only(broker_proc):
    live = broker_proc.name
    dead = broker.spawn()
    try:
        c = clientlib.connect(dead.name, timeout=10)
        w = c.watch("k")
        w.get(10)
        c.put("k", "v")
        dead.kill()
        c.close()
        left = shm_entries(dead.name)
        # ctl, log, stats, the broker's doorbell; the client's rings, doorbell, arena
        assert f"shmwatch.{dead.name}.ctl" in left
        assert any(e.startswith(f"sem.shmwatch.{dead.name}.bell.") for e in left)
        assert len(left) >= 7, left
        rows = {r["name"]: r for r in json.loads(run("ls", "-w", "json").stdout)}
        assert rows[dead.name]["state"] == "stale" and rows[live]["state"] == "alive"
        live_before = shm_entries(live)

        assert run("cleanup", "--name", live).stdout == "nothing to clean up\n"
        out = run("cleanup", "--name", dead.name).stdout.splitlines()
        assert sorted(out) == sorted(f"removed /dev/shm/{e}" for e in left)
        assert not shm_entries(dead.name)
        assert run("cleanup", "--name", dead.name).stdout == "nothing to clean up\n"
        assert dead.name not in {r["name"] for r in json.loads(run("ls", "-w", "json").stdout)}
        # The live broker was never touched and still serves.
        assert shm_entries(live) == live_before
        assert run("put", "--name", live, "still", "here").stdout == "OK\n"
        assert run("get", "--name", live, "still").stdout == "still\nhere\n"
    finally:
        dead.stop()
    assert not shm_entries(dead.name)


def compacted_history(c) -> None:
    c.put("ck", "a")
    c.put("ck", "b")
    c.delete("ck")
    c.compact(3)


def test_watch_of_a_compacted_revision_json(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        compacted_history(c)
    p = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", "watch", "--name",
                        broker_proc.name, "-w", "json", "ck", "--rev", "1"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV,
                       check=False)
    # etcdctl 3.4: {"Header":{"cluster_id":..,"member_id":..,"raft_term":2},"Events":[],
    #               "CompactRevision":3,"Canceled":true,"Created":false}
    out = json.loads(p.stdout)
    assert sorted(out) == ["Canceled", "CompactRevision", "Created", "Events", "Header"]
    assert out["Events"] == [] and out["CompactRevision"] == 3
    assert out["Canceled"] is True and out["Created"] is False
    assert "revision" not in out["Header"] and out["Header"]["cluster_id"] > 0


def test_watch_of_a_compacted_revision_fails_with_etcds_message(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        compacted_history(c)
    want = "watch was canceled (etcdserver: mvcc: required revision has been compacted)"
    for fmt in ("simple", "json"):
        p = subprocess.run([sys.executable, "-m", "shmwatch.tools.cli", "watch", "--name",
                            broker_proc.name, "-w", fmt, "ck", "--rev", "1"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV,
                           check=False)
        assert p.returncode != 0, f"-w {fmt}: exit 0 for a watch cancelled by compaction"
        assert want in p.stderr, f"-w {fmt}: stderr {p.stderr!r}"


@pytest.mark.timeout(120)
def test_cleanup_never_removes_a_starting_broker():
    for attempt in range(20):
        name = broker.unique_name()
        removed: list = []
        stop = threading.Event()

        def hammer(name=name, removed=removed, stop=stop) -> None:
            while not stop.is_set():
                removed.extend(cleanup_stale(name))

        t = threading.Thread(target=hammer, daemon=True)
        t.start()
        b = None
        try:
            b = broker.spawn(name)
        finally:
            stop.set()
            t.join(10)
            try:
                assert not removed, \
                    f"attempt {attempt}: cleanup removed {removed} of a starting broker"
                with clientlib.connect(name, timeout=5) as c:
                    c.put("k", "v")
            finally:
                if b is not None:
                    b.stop()
        assert not shm_entries(name)


def test_get_table(broker_proc):
    """`get -w table` (etcdctl 3.4 has none): etcdctl's table style, long cells wrapped
    at spaces, keys and values raw (or \\xHH with --hex)."""
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        c.put("a", "1")
        c.put("key with spaces", "the quick brown fox jumps over the lazy dog, again and again")
        c.put("a", "22")
    n = ["--name", broker_proc.name, "-w", "table"]
    assert run("get", *n, "", "--from-key").stdout == """\
+-----------------+--------------------------------+-----------------+--------------+---------+-------+
|       KEY       |             VALUE              | CREATE REVISION | MOD REVISION | VERSION | LEASE |
+-----------------+--------------------------------+-----------------+--------------+---------+-------+
|               a |                             22 |               2 |            4 |       2 |     0 |
| key with spaces | the quick brown fox jumps over |               3 |            3 |       1 |     0 |
|                 |  the lazy dog, again and again |                 |              |         |       |
+-----------------+--------------------------------+-----------------+--------------+---------+-------+
"""
    assert run("get", *n, "a", "--hex", "--keys-only").stdout == """\
+------+-------+-----------------+--------------+---------+-------+
| KEY  | VALUE | CREATE REVISION | MOD REVISION | VERSION | LEASE |
+------+-------+-----------------+--------------+---------+-------+
| \\x61 |       |               2 |            4 |       2 |     0 |
+------+-------+-----------------+--------------+---------+-------+
"""
    assert run("get", *n, "nothing").stdout.count("\n") == 4  # rule, header, rule, rule
    p = run("get", *n, "a", "--print-value-only", rc=128)
    assert p.stderr == "Error: print-value-only is only for `--write-out=simple`\n"


def test_status(broker_proc):
    """`status` (etcdctl endpoint status): from the control segment and the published
    stats, in simple (one comma-separated line), json and table form."""
    name = broker_proc.name
    with clientlib.connect(name, timeout=10) as c:
        for i in range(3):
            c.put(f"k{i}", "v" * 100)
        c.compact(3)
        w = c.watch("k", prefix=True)
        w.get(10)
        c.lease_grant(60)
        c.lease_grant(0, bound=True)
        c.lease_grant(30, bound=True)
        # compact(3) leaves revisions 3 and 4 in the log
        wait_for(lambda: read_stats(name)["watchers"]["total"] == 1
                 and read_stats(name)["log"]["count"] == 2
                 and read_stats(name)["leases"]["total"] == 3, 20, "the stats to show the watch")
        stats = read_stats(name)
        shm = sum(os.stat(f"/dev/shm/{e}").st_size for e in shm_entries(name)
                  if not e.startswith("sem."))
        out = json.loads(run("status", "--name", name, "-w", "json").stdout)
        cluster = cluster_id(c)
        assert out == [{"Endpoint": name, "Status": {
            "header": {"cluster_id": cluster, "member_id": cluster ^ MEMBER_ID_SALT,
                       "revision": 4},
            "version": clientlib.__version__, "dbSize": shm, "pid": broker_proc.pid, "compactRevision": 3,
            "logUsed": stats["log"]["used"], "logCapacity": stats["log"]["capacity"],
            "logRevisions": 2, "clients": 1, "watchers": 1, "leases": 3, "boundLeases": 2}}]
        fill = f"{humanize_bytes(stats['log']['used'])} / {humanize_bytes(stats['log']['capacity'])}"
        row = [name, str(broker_proc.pid), clientlib.__version__, "4", "3", fill, "1", "1", "3",
               "2", humanize_bytes(shm)]
        assert run("status", "--name", name).stdout == ", ".join(row) + "\n"
        table = run("status", "--name", name, "-w", "table").stdout.splitlines()
        assert [c.strip() for c in table[1].strip("|").split("|")] == [
            "NAME", "PID", "VERSION", "REVISION", "COMPACT REVISION", "LOG FILL", "CLIENTS",
            "WATCHERS", "LEASES", "BOUND LEASES", "DB SIZE"]
        assert [c.strip() for c in table[3].strip("|").split("|")] == row
        assert len(table) == 5 and table[0] == table[2] == table[4]
        w.cancel()
    p = run("status", "--name", "nosuchbroker-" + os.urandom(4).hex(), rc=1)
    assert p.stderr.startswith("Error: shmwatch: broker 'nosuchbroker-") and "is not running" in p.stderr
    assert run("status", "--name", name, "-w", "fields", rc=4).stderr == \
        "Error: fields not supported as output format\n"
    assert run("status", "--name", name, "extra", rc=128).stderr == \
        "Error: status command takes no argument\n"


def test_refusals_that_send_nothing(broker_proc):
    """A format a command cannot print, or a bad argument, is refused before anything
    reaches the broker (etcdctl applies a `put -w table` and then fails to print it;
    its `watch -w table` waits for the first event to fail)."""
    n = ["--name", broker_proc.name]
    p = run("put", *n, "k", "v", "-w", "table", rc=4)
    assert p.stderr == "Error: table not supported as output format\n"
    assert run("watch", *n, "k", "-w", "table", rc=4).stdout == ""
    assert run("watch", *n, "k", "--", "echo", rc=128).stderr.startswith("Error: shmwatch watch runs")
    assert run("get", *n, "k").stdout == ""
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        assert c.get("k").revision == 1  # nothing was ever written


def test_help_lists_flags():
    out = run("get", "--help").stdout
    assert out.startswith("get - Gets the key or a range of keys\n")
    for flag in ("--sort-by", "--order", "--print-value-only", "--hex", "--consistency",
                 "--keys-only", "--count-only", "-w, --write-out"):
        assert flag in out
    assert "status" in run("--help").stdout
