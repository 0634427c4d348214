"""The host a run measures on: what it is, how busy it was, what one process uses.

Owns reading /proc and psutil for the machine description at the top of BENCHMARKS.md
(CPU, versions, git revision), the load during the run (ours and other users'), and a
process's CPU time and memory. Never starts or stops anything.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import psutil

CHECKOUT = Path(__file__).resolve().parents[2]  # tools/bench/machine.py -> the checkout
BUSY_PCT = 10  # another process using this share of a core counts as busy
VERSIONS_OF = ("msgpack", "zmq", "redis", "posix_ipc")
SERVERS = ("redis-server", "etcd")  # each answers --version


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _versions() -> dict[str, str]:
    vers = {}
    for mod in VERSIONS_OF:
        try:
            m = importlib.import_module(mod)
        except ImportError:  # an optional peer's library: its absence is reported elsewhere
            continue
        vers[mod] = getattr(m, "__version__", getattr(m, "VERSION", "?"))
    for prog in SERVERS:
        exe = shutil.which(prog)
        if exe:
            try:
                out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                     timeout=10)
            except (OSError, subprocess.SubprocessError):
                continue
            vers[prog] = out.stdout.splitlines()[0].strip() if out.stdout else "?"
    return vers


def _git() -> str:
    """The checkout's revision, and the tracked files changed since (a dirty tree's figures
    belong to no commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=CHECKOUT, timeout=10, capture_output=True,
                              text=True, check=True).stdout

    try:
        sha = git("rev-parse", "--short", "HEAD").strip()
        dirty = [ln[3:] for ln in git("status", "--porcelain", "--untracked-files=no")
                 .split("\n") if ln.strip()]
    except (OSError, subprocess.SubprocessError):
        return ""
    if not dirty:
        return sha
    return (sha + f" + uncommitted changes to {', '.join(dirty[:8])}"
            + (" ..." if len(dirty) > 8 else ""))


def machine_info(argv: list[str]) -> dict:
    """The machine and run description (the "Machine and run" section, --json "machine")."""
    return {
        "git": _git(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["tools/bench", *argv]),
        "versions": _versions(),
    }


def external_busy(sample_s: float = 1.0) -> list[str]:
    """Other users' processes busy right now (>= BUSY_PCT of a core over `sample_s`)."""
    me = os.getpid()
    ours = {me} | {p.pid for p in psutil.Process(me).children(recursive=True)}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.info["pid"] in ours:
            continue
        try:
            p.cpu_percent(None)
            procs.append(p)
        except psutil.Error:
            pass
    time.sleep(sample_s)
    out = []
    for p in procs:
        try:
            pc = p.cpu_percent(None)
        except psutil.Error:
            continue
        if pc >= BUSY_PCT:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            out.append((pc, f"{pc:.0f}% {cmd[:90]}"))
    return [x for _, x in sorted(out, reverse=True)]


def _proc_stat() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def _own_cpu_s() -> float:
    """CPU seconds of this process plus every descendant it has reaped (all of ours are
    reaped by the end of the run)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class LoadMeter:
    """How busy the machine was during the run, and how much of that was us."""

    def __init__(self):
        self.stat0 = _proc_stat()
        self.own0 = _own_cpu_s()
        self.load0 = os.getloadavg()
        self.t0 = time.monotonic()

    def finish(self) -> dict:
        d = [b - a for a, b in zip(self.stat0, _proc_stat())]
        hz = os.sysconf("SC_CLK_TCK")
        total = sum(d) or 1
        busy = total - d[3] - d[4]  # all but idle and iowait
        own = (_own_cpu_s() - self.own0) * hz
        return {"busy_pct": 100.0 * busy / total, "steal_pct": 100.0 * d[7] / total,
                "ours_pct": 100.0 * own / total,
                "others_pct": max(0.0, 100.0 * (busy - own) / total),
                "loadavg_start": self.load0, "loadavg_end": os.getloadavg(),
                "seconds": time.monotonic() - self.t0}


def proc_mem(pid: int) -> dict:
    """VmRSS / RssAnon / RssShmem / VmHWM of a process, in MiB (from /proc/<pid>/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process (psutil: 10 ms clock ticks)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def cpu_ns(pid: int) -> int:
    """On-CPU time of a (single-threaded) process in ns: /proc/<pid>/schedstat is exact to
    the ns, where psutil's cpu_times counts 10 ms clock ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return int(cpu_seconds(pid) * 1e9)
