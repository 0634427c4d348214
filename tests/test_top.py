"""tools/top: --once --json against a broker with known activity, --list, and the live
view driven in a real terminal (tmux)."""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
from rich.console import Console

import broker
import clientlib
from broker.admin import read_stats
from shmwatch.tools import top
from shmwatch.tools.top import fmt, sampling, screen, state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "top")


def wait_stats(name: str, pred, timeout: float = 10.0) -> dict:
    """Poll the broker's published stats (every ~200 ms) until `pred` holds."""
    deadline = time.monotonic() + timeout
    while True:
        s = read_stats(name)
        if pred(s):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"stats never reached the expected state; last: {s}")
        time.sleep(0.02)


def run_json(capsys, *args: str) -> dict:
    rc = top.main(["--once", "--json", *args])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


# =============================================================================== --json


@pytest.mark.timeout(60)
def test_once_json_reports_known_activity(capsys):
    n_puts = 120
    with broker.spawn(watch_ring_bytes=4096) as b, clientlib.connect(b.name, timeout=10) as c:
        wa = c.watch(b"a")
        wb = c.watch(b"b")
        stalled = c.watch(b"v/", prefix=True)  # never read: its 4 KiB ring fills
        last = None
        for i in range(n_puts):
            last = c.put(b"v/x", b"%d" % i + b"." * 200)
        assert wa.get(5).created and wb.get(5).created and not stalled.canceled
        stats = wait_stats(b.name, lambda s: s["revision"] == last.revision
                           and s["watchers"]["victim"] == 1)

        view = run_json(capsys, "--name", b.name, "--interval", "0.3")

    # every field of read_stats, plus the computed ones
    missing = set(stats) - set(view)
    assert not missing, missing
    for k in ("uptime_s", "cpu_percent", "rss_bytes", "writes_per_s", "events_per_s",
              "rate_interval_s", "broker_state"):
        assert k in view, k
    assert view["name"] == b.name and view["pid"] == b.pid
    assert view["broker_state"] == "alive"
    assert 0 < view["uptime_s"] < 120
    assert view["rss_bytes"] > 1 << 20
    assert isinstance(view["cpu_percent"], float) and view["cpu_percent"] >= 0
    # rates are measured between two snapshots: nothing was written in between
    assert view["rate_interval_s"] > 0
    assert view["writes_per_s"] == 0 and view["events_per_s"] == 0

    assert view["revision"] == last.revision == n_puts + 1
    assert view["compact_revision"] == 0
    assert view["writes"] == n_puts
    log = view["log"]
    assert log["newest_rev"] == last.revision and log["oldest_rev"] == 2
    assert log["count"] == n_puts and 0 < log["used"] <= log["capacity"]
    assert view["watchers"] == {"total": 3, "synced": 2, "unsynced": 0, "victim": 1,
                                "canceling": 0}
    assert view["victims_entered"] >= 1
    # A victim holds nothing in the broker: its backlog stays in the revision log.
    assert view["pending_events"] == 0

    (me,) = [r for r in view["clients"] if r["pid"] == os.getpid()]
    assert len(view["clients"]) == 1
    assert me["alive"] is True
    assert me["name"] == psutil.Process().name()
    assert me["rss_bytes"] > 0 and me["cpu_percent"] is not None
    assert me["watchers"] == 3 and me["victims"] == 1
    assert me["state"] == "victim"
    assert me["max_lag"] > 0 and me["worst_fill"] > 0.5
    assert me["requests"] >= n_puts + 3
    victims = [w for w in view["top_watchers"] if w["state"] == "victim"]
    assert [(w["key"], w["pid"]) for w in victims] == [("v/", os.getpid())]


@pytest.mark.timeout(60)
def test_once_json_measures_rates_over_the_interval(broker_proc, client, capsys):
    w = client.watch(b"k")
    assert w.get(5).created
    stop = threading.Event()

    def writer():
        with clientlib.connect(broker_proc.name, timeout=10) as c2:
            while not stop.is_set():
                c2.put(b"k", b"v")
                # Read as we write: a watcher that never reads fills its ring and, as a
                # victim, gets no events (within the interval on a small /dev/shm's rings).
                while w.get_nowait() is not None:
                    pass

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_stats(broker_proc.name, lambda s: s["writes"] > 10)
        view = run_json(capsys, "--name", broker_proc.name, "--interval", "0.4")
    finally:
        stop.set()
        t.join(10)
    assert view["writes_per_s"] > 0
    assert view["events_per_s"] > 0  # the watcher on "k" gets every put
    assert 0.1 < view["rate_interval_s"] < 5
    states = {r["pid"]: r["state"] for r in view["clients"]}
    assert set(states.values()) <= {"ok", "lagging"}
    writer_rows = [r for r in view["clients"] if r["requests_per_s"]]
    assert writer_rows, view["clients"]


@pytest.mark.timeout(60)
def test_leases_in_the_header_and_per_client(broker_proc, client, capsys):
    """Leases: all, bound, expiring within 5 s in the header; per client row the bound
    leases it holds (a lease granted without `bound` belongs to no client)."""
    client.lease_grant(60, bound=True)
    client.lease_grant(0, bound=True)
    client.lease_grant(3)  # expiring soon
    wait_stats(broker_proc.name, lambda s: s["leases"]["total"] == 3)
    view = run_json(capsys, "--name", broker_proc.name, "--interval", "0")
    assert view["leases"] == {"total": 3, "bound": 2, "expiring_soon": 1, "expired": 0}
    (me,) = [r for r in view["clients"] if r["pid"] == os.getpid()]
    assert len(me["leases"]) == 2
    console = Console(width=160, record=True, file=io.StringIO())
    console.print(screen.render(view, width=160))
    text = console.export_text()
    assert "leases   3 total · 2 bound · 1 expiring soon (<5s) · 0 expired" in text, text
    (head,) = [ln.split() for ln in text.splitlines() if "LEASES" in ln]
    (row,) = _rows(view)  # ... WATCH LEASES REQ/S, the fill bar and %, LAG VICT STATE
    assert "WATCH LEASES REQ/S" in " ".join(head) and row.split()[-8:-6] == ["0", "2"], (head, row)
    assert [c["pid"] for c in state.sort_clients(view["clients"], "leases")] == [os.getpid()]


@pytest.mark.timeout(60)
def test_a_client_that_died_between_refreshes(broker_proc):
    """The snapshot still lists a client whose process has gone: its row says so."""
    code = ("import sys, clientlib; c = clientlib.connect(sys.argv[1]); w = c.watch(b'x'); "
            "print('ready', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, broker_proc.name], cwd=ROOT,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        stats = wait_stats(broker_proc.name,
                           lambda s: any(c["pid"] == p.pid for c in s["clients"]))
        mon = state.Monitor(broker_proc.name)
        before = mon.enrich(stats)
        (row,) = [c for c in before["clients"] if c["pid"] == p.pid]
        assert row["alive"] and row["rss_bytes"] > 0
    finally:
        p.kill()
        p.wait()
    after = mon.enrich(stats)  # the same (now stale) snapshot: the process is gone
    (row,) = [c for c in after["clients"] if c["pid"] == p.pid]
    assert row["alive"] is False
    assert row["cpu_percent"] is None and row["rss_bytes"] is None
    assert row["name"]  # remembered from when it was alive
    assert row["state"] == "ok"
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(screen.render(after, width=120))
    (line,) = [ln for ln in console.export_text().splitlines() if str(p.pid) in ln]
    assert line.split()[-1] == "exited"
    # and the broker drops it: the next snapshots no longer list it
    wait_stats(broker_proc.name, lambda s: all(c["pid"] != p.pid for c in s["clients"]))
    assert all(c["pid"] != p.pid for c in mon.sample()["clients"])


def test_recycled_pid_is_not_taken_for_the_client():
    mon = state.Monitor("nobody")
    me = psutil.Process()
    stats = {"pid": os.getpid(), "started": time.time() - 5, "time": time.time(),
             "writes": 0, "events_delivered": 0, "clients": [
                 {"slot": 0, "pid": os.getpid(), "watchers": 1, "requests": 1,
                  "create_time_us": int(me.create_time() * 1e6) - 3_600_000_000,
                  "worst_fill": 0.0, "max_lag": 4, "victims": 0}]}
    (row,) = mon.enrich(stats)["clients"]
    assert row["alive"] is False and row["rss_bytes"] is None
    assert row["state"] == "lagging"


def test_unreadable_stats_of_a_live_broker_are_not_an_exit(monkeypatch):
    """A snapshot that never settles (or is not published yet) is a transient failure;
    only the broker's lock says whether it has exited."""
    lock = {"state": "alive"}

    def no_stats(name):
        raise TimeoutError("did not publish a settled snapshot")

    monkeypatch.setattr(sampling, "broker_info", lambda name: dict(lock, name=name))
    monkeypatch.setattr(sampling, "read_stats", no_stats)
    mon = state.Monitor("x")
    with pytest.raises(sampling.StatsUnavailable):
        mon.sample()
    lock["state"] = "stale"
    with pytest.raises(sampling.BrokerGone):
        mon.sample()


class FakeMonitor:
    """Answers `sample()` from a script: a view, or an exception to raise."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def sample(self) -> dict:
        a = self.answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    def history(self):
        return [1.0], [2.0]


def test_live_state_follows_a_broker_that_goes_and_comes_back():
    """The live view's state without a terminal: unreadable stats keep the last view; a
    broker gone is waited for `wait_broker` seconds, then the exit message."""
    mon = FakeMonitor({"pid": 1}, sampling.StatsUnavailable("unsettled"),
                      sampling.BrokerGone("stale"), {"pid": 2}, sampling.BrokerGone("absent"),
                      sampling.BrokerGone("absent"), sampling.BrokerGone("absent"))
    ls = state.LiveState("demo", wait_broker=4)
    assert ls.refresh(mon, 0) is None and ls.last == {"pid": 1}
    assert ls.refresh(mon, 1) is None
    assert ls.unavailable == "unsettled" and ls.last == {"pid": 1}
    assert ls.refresh(mon, 2) is None and ls.gone_since == 2
    assert "shmwatch cleanup" in ls.gone_reason and ls.unavailable is None
    assert ls.refresh(mon, 3) is None and ls.gone_since is None and ls.last == {"pid": 2}
    assert ls.refresh(mon, 10) is None and ls.gone_reason == ""
    assert ls.refresh(mon, 13.9) is None  # not yet waited out
    assert "exited and no broker of that name came back within 4s" in ls.refresh(mon, 14)
    never = state.LiveState("demo", wait_broker=0)
    assert "is not running (waited 0s)" in never.refresh(FakeMonitor(
        sampling.BrokerGone("absent")), 0)


def test_live_state_keys():
    ls = state.LiveState("demo", wait_broker=1, last={"pid": 1})
    mon = FakeMonitor()
    assert ls.press("ss", mon) is False and ls.sort == state.SORTS[2]
    assert ls.press("p", mon) is False and ls.paused
    assert ls.frozen == ({"pid": 1}, ([1.0], [2.0]))  # the screen frozen as it was
    assert ls.press(" ", mon) is False and not ls.paused and ls.frozen is None
    assert ls.press("S" * (len(state.SORTS) - 2), mon) is False and ls.sort == "lag"
    assert ls.press("xq", mon) is True


def test_formatting_helpers():
    assert fmt.sparkline([], 4) == "    "
    assert fmt.sparkline([0, 1, 2, 4], 6) == "  ▁▃▅█"
    assert fmt.sparkline(range(100), 3) == "███"  # the last 3, scaled to their own max
    assert fmt.key_range("a", None) == "a"
    assert fmt.key_range("k/", "k0") == "k/ (prefix)"
    assert fmt.key_range("a", "\0") == "a (from key)"
    assert fmt.key_range("a", "c") == "[a, c)"
    assert fmt.fmt_bytes(3 << 20) == "3.0 MiB"
    assert fmt.fmt_dur(3725) == "1h 02m 05s"
    assert [state.client_state(c) for c in (
        {"victims": 1, "max_lag": 5}, {"victims": 0, "max_lag": 5},
        {"victims": 0, "max_lag": 0})] == ["victim", "lagging", "ok"]


# =============================================================================== rows


def _client(slot, pid, *, lag=0, fill=0.0, victims=0, requests=0, label=None, cmd=None):
    row = {"slot": slot, "pid": pid, "create_time_us": 0, "watchers": 1,
           "requests": requests, "worst_fill": fill, "max_lag": lag, "victims": victims,
           "alive": True, "name": "python3", "cmdline": cmd, "cpu_percent": 1.0,
           "rss_bytes": 1 << 20, "requests_per_s": 0.0}
    if label is not None:
        row["label"] = label
    row["state"] = state.client_state(row)
    return row


def _rows(view: dict, width: int = 160) -> list[str]:
    """The client rows of the rendered screen, as text, without the victim marker."""
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(screen.render(view, width=width))
    pids = {str(c["pid"]) for c in view["clients"]}
    lines = [ln.strip().removeprefix("!") for ln in console.export_text().splitlines()]
    return [ln for ln in lines if len(ln.split()) > 1 and ln.split()[0] in pids]


def test_rows_show_the_label_else_the_command_line():
    view = {"name": "x", "pid": 1, "clients": [
        _client(0, 101, label="writer-1", cmd="/usr/bin/python3 -B -c from multiprocessing"),
        _client(1, 102, label="watcher-late-3 (replacement of watcher-fast-2)"),
        _client(2, 103, cmd="/usr/bin/python3 worker.py --fast"),
        _client(3, 104, label=""),  # an empty label names nothing: the command line does
    ]}
    view["clients"][3]["cmdline"] = "/opt/bin/tool --x"
    rows = {ln.split()[0]: ln for ln in _rows(view)}
    assert rows["101"].split()[1] == "writer-1" and "multiprocessing" not in rows["101"]
    assert "watcher-late-3 (replacement of watcher-fast-2)" in rows["102"]
    assert "python3 worker.py --fast" in rows["103"] and "/usr/bin" not in rows["103"]
    assert "tool --x" in rows["104"]


def test_rows_whose_sort_figures_tie_keep_their_order():
    """Between refreshes the broker may list clients in another order and their fill,
    CPU and request figures move: rows tied on the sort column stay in pid order."""
    def clients(fills, order):
        rows = [_client(slot, pid, fill=f, requests=f * 100)
                for slot, (pid, f) in enumerate(zip((30, 10, 20, 40), fills))]
        rows.append(_client(9, 50, lag=7, victims=1))  # the one lagging: always first
        return [rows[i] for i in order]

    first = clients((0.1, 0.5, 0.3, 0.0), (0, 1, 2, 3, 4))
    second = clients((0.4, 0.0, 0.2, 0.6), (4, 3, 2, 1, 0))
    for snapshot in (first, second):
        assert [c["pid"] for c in state.sort_clients(snapshot, "lag")] == [50, 10, 20, 30, 40]
        assert [ln.split()[0] for ln in _rows({"clients": snapshot})] == \
            ["50", "10", "20", "30", "40"]
        # every column: equal figures fall back to pid order
        for col in state.SORTS:
            tied = [dict(c, cpu_percent=2.0, rss_bytes=1, worst_fill=0.0, max_lag=0,
                         victims=0, watchers=3, requests_per_s=5.0) for c in snapshot]
            assert [c["pid"] for c in state.sort_clients(tied, col)] == [10, 20, 30, 40, 50]
    # and a real difference still sorts: the fullest ring first
    assert [c["pid"] for c in state.sort_clients(second, "fill")][:2] == [40, 30]
    watchers = [{"pid": p, "watch_id": w, "lag": lag, "fill": f}
                for p, w, lag, f in ((9, 2, 5, 0.1), (3, 1, 5, 0.9), (9, 1, 5, 0.5),
                                     (4, 0, 8, 0.0))]
    assert [(w["pid"], w["watch_id"]) for w in state.sort_watchers(watchers)] == \
        [(4, 0), (3, 1), (9, 1), (9, 2)]


def test_the_header_of_a_broker_that_exited_shows_no_figures():
    last = {"name": "demo", "pid": 4321, "broker_state": "alive", "revision": 98765,
            "compact_revision": 4567, "writes": 55555, "events_delivered": 66666,
            "writes_per_s": 1234.0, "events_per_s": 2345.0, "uptime_s": 99,
            "cpu_percent": 12.5, "rss_bytes": 3 << 20,
            "log": {"used": 100, "capacity": 1000, "count": 5, "oldest_rev": 98761,
                    "newest_rev": 98765},
            "watchers": {"total": 77, "synced": 70, "unsynced": 5, "victim": 2},
            "clients": [_client(0, 101, label="writer-1")]}
    console = Console(width=120, record=True, file=io.StringIO())
    console.print(screen.render_waiting("demo", "broker demo (pid 4321) has exited", last=last,
                                     width=120, height=40, sort="lag"))
    text = console.export_text()
    assert "has exited" in text and "4321" in text
    for figure in ("98,765", "4,567", "55,555", "66,666", "1.2k", "2.3k", "77", "writer-1",
                   "12.5"):
        assert figure not in text, figure
    assert "revision —" in text and "compact —" in text
    lines = [ln.split()[1:3] for ln in text.splitlines()]
    assert ["writes/s", "—"] in lines and ["events/s", "—"] in lines
    assert "the broker has exited" in text


def _hold_client(name: str, ready, done) -> None:
    """A multiprocessing worker holding a client until told to go."""
    with clientlib.connect(name, timeout=10):
        ready.set()
        done.wait(30)


@pytest.mark.timeout(60)
def test_a_multiprocessing_worker_is_told_apart(broker_proc):
    """A spawned worker named `writer-7` shows as such where the broker publishes
    labels (their default is the process name), else by its command line."""
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_client, name="writer-7", args=(broker_proc.name, ready, done))
    p.start()
    try:
        assert ready.wait(30)
        stats = wait_stats(broker_proc.name,
                           lambda s: any(c["pid"] == p.pid for c in s["clients"]))
        view = state.Monitor(broker_proc.name).enrich(stats)
        (row,) = [c for c in view["clients"] if c["pid"] == p.pid]
        (line,) = [ln for ln in _rows(view, width=160) if ln.split()[0] == str(p.pid)]
        if "label" in row:
            assert row["label"] == "writer-7" and "writer-7" in line
        else:
            assert "multiprocessing" in row["cmdline"] and "multiprocessing" in line
    finally:
        done.set()
        p.join(10)


# =============================================================================== CLI


@pytest.mark.timeout(60)
def test_list_shows_the_broker_alive(broker_proc, client, capsys):
    assert top.main(["--list"]) == 0
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if broker_proc.name in ln]
    assert "alive" in line.split() and str(broker_proc.pid) in line.split()

    assert top.main(["--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    (row,) = [r for r in rows if r["name"] == broker_proc.name]
    assert row["state"] == "alive" and row["pid"] == broker_proc.pid
    assert row["clients"] == 1

    # the checkout's script, as users run it (`python3 tools/top`: the package's folder)
    r = subprocess.run([sys.executable, SCRIPT, "--list"], capture_output=True, text=True,
                       timeout=30, cwd="/", check=False)
    assert r.returncode == 0, r.stderr
    assert any(broker_proc.name in ln and "alive" in ln for ln in r.stdout.splitlines())


@pytest.mark.timeout(60)
def test_once_plain_text_when_not_a_tty(broker_proc, client, capsys):
    client.put(b"x", b"y")
    wait_stats(broker_proc.name, lambda s: s["revision"] == 2 and s["clients"])
    assert top.main(["--name", broker_proc.name, "--once", "--interval", "0"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out
    assert broker_proc.name in out and f"pid {broker_proc.pid}" in out
    assert "revision 2 " in out
    assert any(str(os.getpid()) in ln for ln in out.splitlines())
    # the live view needs a terminal
    assert top.main(["--name", broker_proc.name]) == 2
    assert "not a terminal" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_several_brokers_without_a_name_is_a_usage_error(capsys):
    with broker.spawn() as b1, broker.spawn() as b2:
        assert top.main(["--once"]) == 2
        err = capsys.readouterr().err
        assert "--name" in err and b1.name in err and b2.name in err


def test_a_broker_that_is_not_running(capsys):
    assert top.main(["--name", f"nosuch{uuid.uuid4().hex[:8]}", "--once", "--json"]) == 1
    assert "not running" in capsys.readouterr().err


# =============================================================================== tmux


class Tmux:
    """tools/top in a detached tmux server on its own socket, killed by `close()`.

    The pane runs `python3 tools/top ARGS; stty -a > STTY; echo $? > RC`: the RC file appears
    when tools/top has ended (tmux's own #{pane_dead_status} races with its reaping of
    the pane's process), STTY shows the terminal modes it left behind."""

    def __init__(self, tmp_path, *args: str, width: int = 120, height: int = 40):
        self.sock = f"shmwatch-top-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.env = {k: v for k, v in os.environ.items() if k != "TMUX"}
        self.rc_file = tmp_path / "rc"
        self.stty_file = tmp_path / "stty"
        q = shlex.quote
        cmd = (f"cd {q(ROOT)} && {' '.join(q(a) for a in (sys.executable, SCRIPT, *args))}; "
               f"rc=$?; stty -a > {q(str(self.stty_file))}; echo $rc > {q(str(self.rc_file))}")
        self.tmux("new-session", "-d", "-x", str(width), "-y", str(height), "-s", "top", cmd,
                  ";", "set-option", "-t", "top", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.sock, "-f", "/dev/null", *args],
                           capture_output=True, text=True, timeout=10, env=self.env,
                           check=False)
        if r.returncode:
            raise RuntimeError(f"tmux {args}: {r.stderr}")
        return r.stdout

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "top", *keys)

    def screen(self, history: bool = False) -> str:
        """The visible pane; with `history`, the scrollback too (what the program printed
        on the normal screen after leaving its full-screen view)."""
        return self.tmux("capture-pane", "-p", "-t", "top", *(("-S", "-") if history else ()))

    def wait_for(self, pred, what: str, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            scr = self.screen()
            if pred(scr):
                return scr
            if time.monotonic() > deadline:
                raise AssertionError(f"the screen never showed {what}:\n{scr}")
            time.sleep(0.1)

    def wait_exit(self, timeout: float = 15.0) -> int:
        """tools/top's exit status, once it has ended."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.rc_file.read_text() if self.rc_file.exists() else ""
            if text.endswith("\n"):
                return int(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"tools/top did not exit:\n{self.screen(history=True)}")
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.sock, "kill-server"], capture_output=True,
                       timeout=10, env=self.env, check=False)


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux is not installed: the live view needs a terminal")


@needs_tmux
@pytest.mark.timeout(90)
def test_live_view_in_a_terminal(broker_proc, client, tmp_path):
    """Header and client row, the s / p / q keys, a resize; the terminal restored."""
    w = client.watch(b"k/", prefix=True)
    assert w.get(5).created
    for i in range(25):
        last = client.put(b"k/%d" % i, b"v")
    wait_stats(broker_proc.name, lambda s: s["revision"] == last.revision)
    t = Tmux(tmp_path, "--name", broker_proc.name)
    try:
        me = str(os.getpid())
        scr = t.wait_for(lambda s: broker_proc.name in s and f"revision {last.revision:,}" in s
                         and any(ln.split()[:1] == [me] for ln in s.splitlines()),
                         "the header and our client row")
        assert f"pid {broker_proc.pid}" in scr
        assert "sorted by lag" in scr and "q  quit" in scr
        row = next(ln for ln in scr.splitlines() if ln.split()[:1] == [me])
        assert row.split()[-1] == "ok"

        t.keys("s")
        t.wait_for(lambda s: "sorted by fill" in s, "the next sort column")
        t.keys("p")
        t.wait_for(lambda s: "PAUSED" in s, "the paused marker")
        t.keys("p")
        t.wait_for(lambda s: "PAUSED" not in s, "the view resumed")

        t.tmux("resize-window", "-t", "top", "-x", "80", "-y", "24")
        t.wait_for(lambda s: "RING FILL" not in s and " FILL" in s and "REQ/S" not in s
                   and "revision" in s, "the view redrawn for 80 columns")

        t.keys("q")
        assert t.wait_exit() == 0
        # the terminal is back in canonical mode with echo
        flags = t.stty_file.read_text().split()
        assert "icanon" in flags and "echo" in flags
    finally:
        t.close()


@needs_tmux
@pytest.mark.timeout(90)
def test_live_view_reports_a_broker_that_exits(broker_proc, tmp_path):
    """Exited, back (a new broker of the same name), exited for good: exit status 1."""
    name = broker_proc.name
    with clientlib.connect(name, timeout=10) as c:
        for i in range(6):
            c.put(b"k%d" % i, b"v")
    t = Tmux(tmp_path, "--name", name, "--wait-broker", "4")
    try:
        t.wait_for(lambda s: name in s and "revision 7 " in s and "6 writes" in s,
                   "the header")
        broker_proc.stop()
        scr = t.wait_for(lambda s: "has exited" in s, "the broker exited message")
        assert f"broker {name} (pid {broker_proc.pid}) has exited" in " ".join(scr.split())
        # the header keeps none of the exited broker's figures
        assert "revision —" in scr and "revision 7" not in scr and "6 writes" not in scr
        assert any(ln.split()[1:3] == ["writes/s", "—"] for ln in scr.splitlines()
                   if len(ln.split()) > 2), scr

        with broker.spawn(name) as again:  # a new broker with the same name
            scr = t.wait_for(lambda s: f"pid {again.pid}" in s and "is back" in s,
                             "the new broker")
            assert "revision 1 " in scr and "revision —" not in scr
        # it exits too, and nobody comes back within --wait-broker
        assert t.wait_exit(timeout=20) == 1
        scr = " ".join(t.screen(history=True).split())
        assert f"broker '{name}' exited and no broker of that name came back" in scr
    finally:
        t.close()


def test_header_shows_a_mirroring_brokers_upstream():
    """A mirroring broker's stats carry `upstream`: top's header shows its endpoints, the
    member its watch is on, the mirror's revision against etcd's and the lag."""
    from shmwatch.tools.top.header import header_lines

    up = {"endpoints": ["http://127.0.0.1:2379", "http://127.0.0.1:22379"],
          "connected": "http://127.0.0.1:22379", "mirror_revision": 1200, "etcd_revision": 1234,
          "lag": 34, "failovers": 1, "forwarded": 99}
    text = " ".join(ln.plain for ln in header_lines({"upstream": up}, ([], []), 300))
    for part in ("etcd http://127.0.0.1:2379,http://127.0.0.1:22379", "on http://127.0.0.1:22379",
                 "mirror 1,200 / etcd 1,234", "lag 34", "failovers 1", "forwarded 99"):
        assert part in text, (part, text)
    standalone = " ".join(ln.plain for ln in header_lines({}, ([], []), 300))
    assert "mirror" not in standalone
