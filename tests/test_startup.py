"""The first five minutes: sizes that fit /dev/shm, one-line start-up errors, `serve`'s
name and ready line, `broker.spawn()`'s errors, version, py.typed and docstrings.

The sizing policy is tested as pure functions of the free-space figure; brokers are
started "as on a 64 MB /dev/shm" with a budget ($SHMWATCH_SHM_BUDGET / --shm-budget),
and, where this test may mount one (as root, as CI runs), in a real private 64 MB
tmpfs mounted on /dev/shm in a mount namespace of its own.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import broker
import clientlib
from broker import sizing
from broker.admin import broker_info
from broker.server import BrokerConfig
from tests import fault_workers as fw
from tests.mp_workers import wait_for

ROOT = Path(__file__).resolve().parents[1]
MiB, KiB = 1 << 20, 1 << 10
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ENV.pop(sizing.BUDGET_ENV, None)
CLI = {"python -m broker": [sys.executable, "-m", "broker"],
       "shmwatch serve": [sys.executable, "-m", "clientlib.cli", "serve"]}
ERROR_LINE = re.compile(r"^(python -m broker|shmwatch serve): error: \S.*\n$")


# ------------------------------------------------------------------ sizing, pure


def test_sizes_on_a_64_mb_dev_shm_leave_room_for_clients():
    s = sizing.plan(64 * MiB, "/dev/shm", rings_per_arena=32)
    assert (s.log_bytes, s.request_ring_bytes, s.response_ring_bytes, s.watch_ring_bytes) == \
        (16 * MiB, 128 * KiB, 128 * KiB, 32 * KiB)
    assert s.sized == ("log_bytes", "request_ring_bytes", "response_ring_bytes",
                       "watch_ring_bytes")
    start = sizing.start_bytes(s.log_bytes, 256, 1 * MiB)
    per_client = (sizing.client_bytes(s.request_ring_bytes, s.response_ring_bytes)
                  + sizing.arena_bytes(s.watch_ring_bytes, 32))
    # tools/stress's 12 clients, each with an arena, fit with room to spare.
    assert start + 12 * per_client < 40 * MiB
    assert "sized from 64 MiB free in /dev/shm" in s.describe()


def test_sizes_on_a_large_dev_shm_are_the_full_defaults():
    s = sizing.plan(24 << 30, "/dev/shm", rings_per_arena=32)
    assert (s.log_bytes, s.request_ring_bytes, s.response_ring_bytes, s.watch_ring_bytes) == \
        (64 * MiB, 1 * MiB, 1 * MiB, 256 * KiB)
    unknown = sizing.plan(None, "/dev/shm", rings_per_arena=32)
    assert unknown.log_bytes == 64 * MiB and "free space unknown" in unknown.describe()


def test_the_log_is_a_quarter_of_free_space_between_1_and_64_mib():
    for free, log in ((2 * MiB, 1 * MiB), (10 * MiB, 2 * MiB), (100 * MiB, 25 * MiB),
                      (256 * MiB, 64 * MiB), (1 << 40, 64 * MiB)):
        assert sizing.plan(free, "x", rings_per_arena=32).log_bytes == log, free
    rings = sizing.plan(1 * MiB, "x", rings_per_arena=32)
    assert (rings.request_ring_bytes, rings.watch_ring_bytes) == (16 * KiB, 4 * KiB)


def test_given_sizes_are_kept_and_the_ready_line_says_so():
    s = sizing.plan(64 * MiB, "--shm-budget", rings_per_arena=32, log_bytes=8 * MiB,
                    watch_ring_bytes=64 * KiB, request_ring_bytes=4096,
                    response_ring_bytes=4096)
    assert (s.log_bytes, s.watch_ring_bytes, s.sized) == (8 * MiB, 64 * KiB, ())
    assert s.describe().endswith("sizes as given")
    part = sizing.plan(64 * MiB, "$SHMWATCH_SHM_BUDGET", rings_per_arena=32,
                       log_bytes=8 * MiB)
    assert part.sized == ("request_ring_bytes", "response_ring_bytes", "watch_ring_bytes")
    assert "sized from a 64 MiB budget ($SHMWATCH_SHM_BUDGET)" in part.describe()


def test_a_log_that_cannot_fit_is_refused_naming_the_option_and_the_free_space():
    s = sizing.plan(64 * MiB, "/dev/shm", rings_per_arena=32, log_bytes=64 * MiB)
    need = sizing.start_bytes(s.log_bytes, 256, 1 * MiB)
    why = sizing.check_start(s, need)
    assert why and "--log-bytes" in why and f"{64 * MiB:,} bytes free" in why, why
    assert "--log-bytes 16M fits" in why
    assert sizing.check_start(sizing.plan(64 * MiB, "/dev/shm", rings_per_arena=32),
                              sizing.start_bytes(16 * MiB, 256, 1 * MiB)) is None


@pytest.mark.parametrize("text,value", [("64M", 64 * MiB), ("256k", 256 * KiB),
                                        ("1.5M", 1536 * KiB), ("1G", 1 << 30),
                                        ("4096", 4096), ("64MiB", 64 * MiB), ("8kb", 8192)])
def test_parse_size(text, value):
    assert sizing.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "M", "-1M", "nan", "1e30"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError):
        sizing.parse_size(text)


def test_config_sizes_from_the_budget_in_the_environment(monkeypatch):
    monkeypatch.setenv(sizing.BUDGET_ENV, "64M")
    cfg = BrokerConfig(name="x")
    assert (cfg.log_bytes, cfg.watch_ring_bytes) == (16 * MiB, 32 * KiB)
    assert cfg.sizing.source == "$SHMWATCH_SHM_BUDGET"
    assert BrokerConfig(name="x", shm_budget=1 << 40).log_bytes == 64 * MiB


@pytest.mark.parametrize("kwargs,option", [
    ({"name": "bad name"}, "invalid broker name"),
    ({"name": "x", "log_bytes": 100}, "--log-bytes"),
    ({"name": "x", "watch_ring_bytes": 32}, "--watch-ring-bytes"),
    ({"name": "x", "max_clients": 0}, "--max-clients"),
    ({"name": "x", "group": "no-such-group-here"}, "--group"),
])
def test_config_refuses_bad_values_naming_the_option(kwargs, option):
    with pytest.raises(ValueError, match=re.escape(option)):
        BrokerConfig(**kwargs)


# ------------------------------------------------------------------ start-up errors


def _start(cmd: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI[cmd], *args], env=env or ENV, capture_output=True, text=True,
                          timeout=60, check=False)


@pytest.mark.parametrize("cmd", sorted(CLI))
@pytest.mark.parametrize("args,reason", [
    (["--name", "bad/name"], "invalid broker name 'bad/name'"),
    (["--log-bytes", "lots"], "--log-bytes: cannot read 'lots' as a size"),
    (["--log-bytes", "1001"], "--log-bytes 1001: a size must be a multiple of 8"),
    (["--watch-ring-bytes", "16"], "--watch-ring-bytes 16: a size must be a multiple of 8 and "
                                   "at least 64 bytes"),
    (["--shm-budget", "64M", "--log-bytes", "64M"], "give a smaller --log-bytes "
                                                     "(--log-bytes 16M fits)"),
])
def test_start_up_errors_are_one_line(cmd, args, reason):
    name = broker.unique_name()
    r = _start(cmd, "--name", name, *args)
    assert r.returncode == 1, r
    assert ERROR_LINE.match(r.stderr) and reason in r.stderr, r.stderr
    assert r.stdout == "" and fw.shm_entries(name) == []


@pytest.mark.parametrize("cmd", sorted(CLI))
def test_no_space_names_the_option_and_the_free_space(cmd):
    r = _start(cmd, "--name", broker.unique_name(), "--log-bytes", "64M",
               env={**ENV, sizing.BUDGET_ENV: "64M"})
    assert r.returncode == 1 and ERROR_LINE.match(r.stderr), r.stderr
    assert f"$SHMWATCH_SHM_BUDGET allows {64 * MiB:,} bytes" in r.stderr
    assert "needs 68,206,592 bytes" in r.stderr, r.stderr  # 256 slots of 128 bytes


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cmd", sorted(CLI))
def test_name_in_use_is_one_line_with_the_pid(cmd):
    with broker.spawn() as b:
        r = _start(cmd, "--name", b.name)
        assert r.returncode == 1 and ERROR_LINE.match(r.stderr), r.stderr
        assert f"a broker named {b.name!r} is already running (pid {b.pid})" in r.stderr


@pytest.mark.timeout(90)
def test_data_dir_busy_is_one_line(tmp_path):
    with broker.spawn(data_dir=str(tmp_path)):
        r = _start("shmwatch serve", "--name", broker.unique_name(), "--data-dir",
                   str(tmp_path))
    assert r.returncode == 1 and ERROR_LINE.match(r.stderr), r.stderr
    assert "in use by another broker" in r.stderr


@pytest.mark.timeout(90)
def test_spawn_raises_the_brokers_own_reason():
    with broker.spawn() as b:
        with pytest.raises(broker.BrokerStartError,
                           match=re.escape(f"already running (pid {b.pid})")):
            broker.spawn(b.name)
    with pytest.raises(broker.BrokerStartError, match="give a smaller --log-bytes"):
        broker.spawn(log_bytes=64 * MiB, shm_budget="64M")
    with pytest.raises(broker.BrokerStartError, match="invalid broker name"):
        broker.spawn("no good")
    assert issubclass(broker.BrokerStartError, RuntimeError)


@pytest.mark.timeout(90)
def test_spawn_reports_the_sizes_it_chose():
    with broker.spawn(shm_budget="64M") as b, clientlib.connect(b.name, timeout=10) as c:
        assert f"broker {b.name!r} ready (pid {b.pid})" in b.ready_line
        assert "log 16 MiB" in b.ready_line and "64 MiB budget (--shm-budget)" in b.ready_line
        c.put("k", "v")
        from broker.admin import read_stats

        assert read_stats(b.name)["log"]["capacity"] == 16 * MiB


# ------------------------------------------------------------------ serve


@pytest.mark.timeout(90)
def test_serve_defaults_to_shmwatch_name_and_prints_one_ready_line():
    name = broker.unique_name()
    p = subprocess.Popen([*CLI["shmwatch serve"]], env={**ENV, "SHMWATCH_NAME": name},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert re.fullmatch(rf"shmwatch: broker '{name}' ready \(pid {p.pid}\): log \S+ MiB, "
                            r"rings per client .+, per watcher .+; sized from .+ free in "
                            r"/dev/shm\n", line), line
        with clientlib.connect(name, timeout=10) as c:
            assert c.put("k", "v").revision == 2
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and out == "" and err == "", (out, err)
    assert fw.shm_entries(name) == []


@pytest.mark.timeout(90)
def test_serve_detach_returns_once_ready_and_leaves_the_broker_running():
    name = broker.unique_name()
    r = subprocess.run([*CLI["shmwatch serve"], "--detach", "--shm-budget", "64M"],
                       env={**ENV, "SHMWATCH_NAME": name}, capture_output=True, text=True,
                       timeout=60, check=False)
    pid = broker_info(name)["pid"]
    try:
        assert r.returncode == 0 and r.stderr == "", r
        assert r.stdout == f"shmwatch: broker {name!r} ready (pid {pid}): log 16 MiB, rings " \
            "per client 128 KiB + 128 KiB, per watcher 32 KiB; sized from a 64 MiB budget " \
            "(--shm-budget)\n"
        with clientlib.connect(name, timeout=10) as c:
            assert c.put("k", "v").revision == 2
    finally:
        if pid:
            os.kill(pid, signal.SIGTERM)
    wait_for(lambda: fw.shm_entries(name) == [], 30, "the detached broker to stop")


def test_version():
    r = subprocess.run([sys.executable, "-m", "clientlib.cli", "--version"], env=ENV,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0 and r.stdout == f"shmwatch {clientlib.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+", clientlib.__version__)


# ------------------------------------------------------------------ a real 64 MB /dev/shm


# Run inside the private /dev/shm: the quick start's main job, then `serve` as a user
# would start it, then the size that used to be the default. Prints what it saw.
TMPFS_SCENARIO = """
import os, signal, subprocess, sys, time
from broker.admin import broker_info
st = os.statvfs("/dev/shm")
print("free", st.f_bavail * st.f_frsize)
cli = [sys.executable, "-m", "clientlib.cli"]
stress = subprocess.run([*cli, "stress", "--duration", "3", "--quiet"], capture_output=True,
                        text=True)
print("stress", stress.returncode, "PASSED" in stress.stdout)
serve = subprocess.run([*cli, "serve", "--detach"], capture_output=True, text=True)
print("serve", serve.returncode, serve.stdout.strip())
put = subprocess.run([*cli, "put", "k", "v"], capture_output=True, text=True)
print("put", put.returncode, put.stdout.strip())
big = subprocess.run([*cli, "serve", "--name", "other", "--log-bytes", "64M"],
                     capture_output=True, text=True)
print("big", big.returncode, big.stderr.strip())
os.kill(broker_info("default")["pid"], signal.SIGTERM)
deadline = time.monotonic() + 30
while os.listdir("/dev/shm") and time.monotonic() < deadline:
    time.sleep(0.05)
print("left", sorted(os.listdir("/dev/shm")))
"""


def _in_private_shm(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=64m none /dev/shm && exec "$@"',
         "sh", *args], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        check=False)


def _private_shm_available() -> bool:
    try:
        return _in_private_shm(["true"], 30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.timeout(240)
def test_quick_start_stress_and_serve_on_a_64_mb_dev_shm():
    """The quick start's main job passes on Docker's /dev/shm size, `serve` sizes itself
    from it, and the size that used to be the default is refused in one line."""
    if not _private_shm_available():
        pytest.skip("cannot mount a private /dev/shm (needs unshare -m and CAP_SYS_ADMIN)")
    r = _in_private_shm([sys.executable, "-c", TMPFS_SCENARIO], 200)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert seen["free"] == str(64 * MiB), seen  # the tmpfs really is 64 MiB
    assert seen["stress"] == "0 True", seen
    assert re.fullmatch(r"0 shmwatch: broker 'default' ready \(pid \d+\): log 16 MiB, "
                        r"rings per client 128 KiB \+ 128 KiB, per watcher 32 KiB; sized from "
                        r"64 MiB free in /dev/shm", seen["serve"]), seen
    assert seen["put"] == "0 OK", seen
    assert re.fullmatch(r"1 shmwatch serve: error: no space in /dev/shm: .* /dev/shm has "
                        r"[\d,]+ bytes free; give a smaller --log-bytes \(--log-bytes \d+M "
                        r"fits\)", seen["big"]), seen
    assert seen["left"] == "[]", seen


# ------------------------------------------------------------------ package


def test_py_typed_and_the_version_ship_with_the_package(tmp_path):
    """setuptools, from pyproject.toml alone, puts py.typed in clientlib, broker and
    shmwatch, installs tools/ as shmwatch.tools (no top-level `tools`), and reads the
    version from shmwatch.__version__ (which clientlib.__version__ is)."""
    for entry in ("pyproject.toml", "README.md", "shm", "broker", "clientlib", "shmwatch",
                  "tools"):
        src = ROOT / entry
        if src.is_dir():
            shutil.copytree(src, tmp_path / entry, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / entry)
    r = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q",
                        "egg_info", "build_py", "-d", str(tmp_path / "out")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    for pkg in ("clientlib", "broker", "shmwatch"):
        assert (tmp_path / "out" / pkg / "py.typed").is_file(), pkg
    for module in ("stress/__main__.py", "stress/workers.py", "top/__main__.py", "top/live.py"):
        assert (tmp_path / "out" / "shmwatch" / "tools" / module).is_file(), module
    assert (tmp_path / "out" / "shmwatch" / "wire" / "protocol.py").is_file()
    assert not (tmp_path / "out" / "tools").exists()
    info = (tmp_path / "shmwatch.egg-info" / "PKG-INFO").read_text()
    assert f"\nVersion: {clientlib.__version__}\n" in info


# ------------------------------------------------------------------ docstrings


def _own_doc(obj) -> str:
    doc = obj.fget.__doc__ if isinstance(obj, property) else obj.__doc__
    doc = (doc or "").strip()
    if inspect.isclass(obj) and doc.startswith(obj.__name__ + "("):
        return ""  # the signature dataclass / NamedTuple write when there is no docstring
    return doc


def _public_calls():
    names = [(f"clientlib.{n}", getattr(clientlib, n)) for n in clientlib.__all__]
    names += [(f"broker.{n}", getattr(broker, n))
              for n in ("spawn", "BrokerProcess", "BrokerStartError", "unique_name")]
    for qual, obj in list(names):
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if not attr.startswith("_") and (callable(member)
                                                 or isinstance(member, property)):
                    names.append((f"{qual}.{attr}", member))
    return [(q, o) for q, o in names if callable(o) or isinstance(o, property)]


def test_every_public_call_has_a_docstring_help_shows():
    calls = _public_calls()
    assert len(calls) > 50
    missing = [q for q, o in calls if not _own_doc(o)]
    assert not missing, f"no docstring: {missing}"
