"""shmwatch benchmarks: the same workloads through shmwatch and its peers, in one run.

    tools/bench [--quick | --smoke] [--reps N] [--only W1,W3] [--peers queue,zmq]
                [--out BENCHMARKS.md] [--json FILE]

Every workload runs end to end in separate processes: writer process(es) -> transport
-> watcher process(es) that decode every record. For shmwatch that is clientlib `put`
(or a 64-put `txn`) -> broker -> a watcher's ring -> `Watch.get()` decoding the events.
The peers run the same writers and readers over multiprocessing.Queue, pyzmq PUB/SUB on
an ipc socket, Redis pub/sub on a loopback redis-server and etcd watch on a loopback etcd
(its v3 JSON gateway, standard library only). Peers whose software is missing are
skipped with a line that says so.

A record is ~100 bytes: a 16-byte key and a 64-byte value whose first 16 bytes are the
sequence number and the INTENDED send time (`time.perf_counter_ns`, CLOCK_MONOTONIC, the
same clock in every process on Linux); peers carry `[key, value, seq]` in msgpack.

Repetitions are interleaved: repetition r runs every workload through every transport
before repetition r+1 starts, so the machine's noise hits everyone alike; the report gives
medians with min-max, and shmwatch/peer ratios as the median of per-repetition ratios.

Workloads (see BENCHMARKS.md for what each figure means):
  W1  unicast put -> watch, 1 and 4 writers with synchronous writes, and the batched
      write path (64 puts per txn / pipeline); records/s delivered to 1 watcher.
  W2  fan-out: 1 writer -> 8 watcher processes on one prefix; total delivered/s.
  W3  one-way latency at a paced 5,000 records/s (etcd: 500/s), stamped with the
      intended send time (no coordinated omission); p50 / p99 / p99.9 in us.
  W4  one stalled watcher beside 3 fast ones: the fast ones' rate with and without it,
      and how many records the stalled one gets once it resumes.
  W5  (shmwatch) 1 .. 10,000 watchers on single keys and on ranges, held by a few
      processes, while one writer writes keys; write rate and broker CPU per write.
  MEM (shmwatch) broker RSS with 1,000 stalled watchers as N writes pile up.

Every process the tool starts is stopped by its pid at the end (also on Ctrl-C or an
error); brokers through their handles; nothing of ours is left in /dev/shm.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as _dt
import functools
import http.client
import json
import math
import multiprocessing as mp
import os
import platform
import queue as _queue
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from array import array
from dataclasses import asdict, dataclass, field

import msgpack
import psutil

HOST = "127.0.0.1"
KEY_LEN = 16
VALUE_LEN = 64
STAMP = struct.Struct("<qq")  # seq, intended send time (ns)
STAMP_AT = struct.Struct("<q")  # the intended send time, at offset 8 of the value
PAD = b"." * (VALUE_LEN - STAMP.size)
KEYS_PER_WRITER = 1024  # keys cycle: the store's key count stays bounded
BATCH = 64
SLEEP_SLACK_NS = 80_000  # time.sleep overshoots ~60-90 us: sleep short, spin the rest
WORKLOADS = ("W1", "W2", "W3", "W4", "W5", "MEM")
PEERS = ("queue", "zmq", "redis", "etcd")
LABELS = {
    "shmwatch": "shmwatch",
    "queue": "multiprocessing.Queue",
    "zmq": "pyzmq PUB/SUB (ipc)",
    "redis": "Redis pub/sub (redis-py)",
    "etcd": "etcd 3.4 watch (JSON gateway)",
}

_ctx = mp.get_context("fork")
_now = time.perf_counter_ns


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# =============================================================================== profiles


@dataclass
class Profile:
    """Sizes of one run (--smoke / --quick / full)."""

    name: str
    reps: int
    dur: float  # seconds of writing per throughput trial
    lat_dur: float  # seconds of paced writing in W3
    stall_dur: float  # seconds of writing in W4
    fanout: int = 8
    w5_counts: tuple = (1, 100, 1000, 10000)
    w5_dur: float = 2.0
    w5_procs: int = 4
    mem_writes: int = 1_000_000
    mem_watchers: int = 1000
    idle_s: float = 1.5  # a lossy peer's reader gives up after this long without a record
    stall_log_bytes: int = 256 << 20  # W4's revision log: the stalled watcher's whole backlog


PROFILES = {
    "smoke": Profile("smoke", reps=1, dur=0.25, lat_dur=0.3, stall_dur=0.3, fanout=3,
                     w5_counts=(1, 100), w5_dur=0.3, w5_procs=2, mem_writes=6400,
                     mem_watchers=50, idle_s=1.0, stall_log_bytes=16 << 20),
    "quick": Profile("quick", reps=2, dur=1.0, lat_dur=2.0, stall_dur=1.5,
                     w5_dur=1.5, mem_writes=200_000),
    "full": Profile("full", reps=3, dur=3.0, lat_dur=6.0, stall_dur=3.0,
                    w5_dur=4.0, mem_writes=1_000_000),
}


# =============================================================================== helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def make_keys(prefix: bytes, writer: int) -> list[bytes]:
    """KEYS_PER_WRITER keys of exactly 16 bytes: prefix(4) + writer digit + '/' + 10 digits."""
    keys = [b"%s%d/%010d" % (prefix, writer % 10, i) for i in range(KEYS_PER_WRITER)]
    assert all(len(k) == KEY_LEN for k in keys), keys[0]
    return keys


def pctl(sorted_xs, q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_xs:
        return float("nan")
    k = max(0, min(len(sorted_xs) - 1, math.ceil(q / 100.0 * len(sorted_xs)) - 1))
    return float(sorted_xs[k])


def summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def machine_info(argv: list[str]) -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    vers = {}
    for mod in ("msgpack", "zmq", "redis", "posix_ipc"):
        try:
            m = __import__(mod)
            vers[mod] = getattr(m, "__version__", getattr(m, "VERSION", "?"))
        except Exception:
            pass
    for prog, args in (("redis-server", ["--version"]), ("etcd", ["--version"])):
        exe = shutil.which(prog)
        if exe:
            try:
                out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=10)
                vers[prog] = out.stdout.splitlines()[0].strip() if out.stdout else "?"
            except Exception:
                pass
    git = ""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, timeout=10,
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, timeout=10, capture_output=True, text=True,
                               check=True).stdout.split("\n")
        dirty = [ln[3:] for ln in dirty if ln.strip()]
        git = sha + (f" + uncommitted changes to {', '.join(dirty[:8])}"
                     + (" ..." if len(dirty) > 8 else "") if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "git": git,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["tools/bench", *argv]),
        "versions": vers,
    }


def _proc_stat() -> list[int]:
    """The aggregate `cpu` line of /proc/stat: user nice system idle iowait irq softirq steal."""
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:9]]


def _own_cpu_s() -> float:
    """CPU seconds of this process plus every descendant it has reaped (all of ours are
    reaped by the end of the run)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def external_busy(sample_s: float = 1.0) -> list[str]:
    """Other users' processes busy right now (>= 10% of a core over `sample_s`)."""
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
        if pc >= 10:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or "?"])
            out.append((pc, f"{pc:.0f}% {cmd[:90]}"))
    return [x for _, x in sorted(out, reverse=True)]


class LoadMeter:
    """How busy the machine was during the run, and how much of that was us."""

    def __init__(self):
        self.stat0 = _proc_stat()
        self.own0 = _own_cpu_s()
        self.load0 = os.getloadavg()
        self.t0 = time.monotonic()

    def finish(self) -> dict:
        st = _proc_stat()
        d = [b - a for a, b in zip(self.stat0, st)]
        hz = os.sysconf("SC_CLK_TCK")
        total = sum(d) or 1
        busy = total - d[3] - d[4]
        own = (_own_cpu_s() - self.own0) * hz
        return {"busy_pct": 100.0 * busy / total, "steal_pct": 100.0 * d[7] / total,
                "ours_pct": 100.0 * own / total,
                "others_pct": max(0.0, 100.0 * (busy - own) / total),
                "loadavg_start": self.load0, "loadavg_end": os.getloadavg(),
                "seconds": time.monotonic() - self.t0}


def _shm_ours() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm")
                if e.startswith("shmwatch.") or e.startswith("sem.shmwatch.")}
    except FileNotFoundError:
        return set()


def proc_mem(pid: int) -> dict:
    """VmRSS / RssAnon / RssShmem of a process, in MiB (from /proc/<pid>/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssShmem", "VmHWM"):
                out[k] = int(v.split()[0]) / 1024.0
    return out


def cpu_seconds(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


class Registry:
    """Every process this run started; `stop_all` ends each by its pid."""

    def __init__(self):
        self.children: list = []  # multiprocessing.Process
        self.servers: list = []  # subprocess.Popen (redis-server, etcd)
        self.brokers: list = []  # broker.BrokerProcess
        self.broker_names: list[str] = []  # every broker this run started

    def add_broker(self, b) -> None:
        self.brokers.append(b)
        self.broker_names.append(b.name)

    def leftovers(self) -> list[str]:
        """/dev/shm entries of the brokers this run started (other users' are not ours)."""
        mine = tuple(f"shmwatch.{n}." for n in self.broker_names)
        mine += tuple("sem." + m for m in mine)
        return sorted(e for e in _shm_ours() if e.startswith(mine)) if mine else []

    def stop_children(self, procs=None, grace: float = 3.0) -> None:
        procs = self.children if procs is None else procs
        deadline = time.monotonic() + grace
        for p in procs:
            if p.pid is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        for p in procs:
            with contextlib.suppress(Exception):
                p.close()
            if p in self.children:
                self.children.remove(p)

    def stop_broker(self, b) -> None:
        with contextlib.suppress(Exception):
            b.stop()
        if b in self.brokers:
            self.brokers.remove(b)

    def stop_all(self) -> None:
        self.stop_children(list(self.children), grace=0.5)
        for b in list(self.brokers):
            self.stop_broker(b)
        for s in list(self.servers):
            stop_server(s)
            self.servers.remove(s)


REG = Registry()


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL, by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


# =============================================================================== transports
#
# A transport has a main-process side (available / start / prepare / cleanup / stop) and
# a child side: writer(env, trial, idx) and reader(env, trial, idx) build objects with
#   writer: send(key, value, seq), send_batch([(key, value, seq)...]) (one atomic write of
#           all: a txn), send_many([...]) (separate writes sent in one go: pipelined),
#           flush(), close()
#   reader: recv(timeout) -> list of record values (bytes), close()
# A reader's constructor returns only once it is subscribed (created / subscribed).


def _packb(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


class Transport:
    name = "?"
    batch_ok = False  # has a batched write path (one write carrying 64 records)
    pipeline_ok = False  # has a pipelined write path (64 separate writes sent at once)
    lossy = False  # may drop records (a reader then ends on an idle timeout)

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def prepare(self, trial: Trial) -> dict:
        return {}

    def cleanup(self, env: dict) -> None:
        pass

    def pace(self, rate: float) -> float:
        return rate

    def stats(self, env: dict) -> dict | None:
        return None

    def server_pid(self, env: dict) -> int | None:
        """The process between writers and readers (broker, redis-server, etcd), if any."""
        proc = getattr(self, "proc", None)
        return env.get("pid") or (proc.pid if proc is not None else None)


# ------------------------------------------------------------------------------ shmwatch


class ShmWriter:
    def __init__(self, env, trial, idx):
        import clientlib

        self._op_put = clientlib.op_put
        self.c = clientlib.connect(env["name"], timeout=30)

    def send(self, key, value, seq):
        self.c.put(key, value)

    def send_batch(self, items):
        op_put = self._op_put
        self.c.txn(success=[op_put(k, v) for k, v, _ in items])

    def send_many(self, items):
        self.c.put_many([(k, v) for k, v, _ in items])

    def flush(self):
        pass

    def close(self):
        self.c.close()


class ShmReader:
    def __init__(self, env, trial, idx):
        import clientlib

        self._Timeout = clientlib.Timeout
        self.c = clientlib.connect(env["name"], timeout=30)
        self.w = self.c.watch(trial.prefix, prefix=True)
        first = self.w.get(30)
        if not first.created:
            raise RuntimeError(f"first watch response is not `created`: {first}")

    def recv(self, timeout):
        w = self.w
        try:
            resp = w.get(timeout)
        except self._Timeout:
            return []
        if resp.canceled:
            raise RuntimeError(f"watch canceled: {resp.cancel_reason!r}")
        out = [ev.kv.value for ev in resp.events]
        while len(out) < 4096:
            resp = w.get_nowait()
            if resp is None:
                break
            out.extend([ev.kv.value for ev in resp.events])
        return out

    def close(self):
        self.c.close()


class ShmwatchT(Transport):
    name = "shmwatch"
    batch_ok = True

    @property
    def pipeline_ok(self) -> bool:
        import clientlib

        return hasattr(clientlib.Client, "put_many")  # the pipelined write path

    def __init__(self):
        self.handles: dict[str, object] = {}

    def prepare(self, trial):
        import broker

        b = broker.spawn(**trial.broker_opts)
        REG.add_broker(b)
        self.handles[b.name] = b
        return {"name": b.name, "pid": b.pid}

    def stats(self, env):
        """The broker's own counters (published ~5 times a second)."""
        from broker.admin import read_stats

        time.sleep(0.4)
        try:
            st = read_stats(env["name"])
        except Exception as exc:  # an older broker without stats: not fatal
            return {"error": repr(exc)}
        return {k: st.get(k) for k in ("writes", "events_delivered", "victims_entered",
                                       "catchups", "compactions", "pending_events")}

    def cleanup(self, env):
        b = self.handles.pop(env["name"], None)
        if b is not None:
            REG.stop_broker(b)

    writer = ShmWriter
    reader = ShmReader


# ------------------------------------------------------------------- multiprocessing.Queue


class QueueWriter:
    def __init__(self, env, trial, idx):
        self.qs = env["queues"]

    def send(self, key, value, seq):
        data = _packb([key, value, seq])
        for q in self.qs:
            q.put(data)

    def send_batch(self, items):
        for k, v, s in items:
            self.send(k, v, s)

    def flush(self):
        pass

    def close(self):
        for q in self.qs:
            q.close()
        # the Queue's feeder thread is joined at process exit (a stalled reader's queue
        # keeps this process alive until that reader has drained it)


class QueueReader:
    def __init__(self, env, trial, idx):
        self.q = env["queues"][idx]

    def recv(self, timeout):
        q = self.q
        try:
            data = q.get(True, timeout)
        except _queue.Empty:
            return []
        out = [msgpack.unpackb(data)[1]]
        for _ in range(1023):
            try:
                data = q.get_nowait()
            except _queue.Empty:
                break
            out.append(msgpack.unpackb(data)[1])
        return out

    def close(self):
        pass


class QueueT(Transport):
    name = "queue"

    def prepare(self, trial):
        return {"queues": [_ctx.Queue() for _ in range(trial.readers)]}

    def cleanup(self, env):
        for q in env["queues"]:
            with contextlib.suppress(Exception):
                q.close()
                q.cancel_join_thread()

    writer = QueueWriter
    reader = QueueReader


# ------------------------------------------------------------------------------- pyzmq


class ZmqWriter:
    def __init__(self, env, trial, idx):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        s = self.s = self.ctx.socket(zmq.XPUB)
        s.setsockopt(zmq.XPUB_VERBOSE, 1)
        s.setsockopt(zmq.LINGER, 3000)
        s.bind(f"ipc://{env['dir']}/w{idx}.ipc")
        # Wait until every reader's subscription arrived: PUB drops what it sends before.
        subs = 0
        deadline = time.monotonic() + 30
        while subs < trial.readers:
            if not s.poll(100):
                if time.monotonic() > deadline:
                    raise TimeoutError("zmq: readers did not subscribe")
                continue
            if s.recv()[:1] == b"\x01":
                subs += 1

    def send(self, key, value, seq):
        self.s.send(_packb([key, value, seq]))

    def send_batch(self, items):
        send = self.s.send
        for k, v, s in items:
            send(_packb([k, v, s]))

    def flush(self):
        pass

    def close(self):
        self.s.close()
        self.ctx.term()


class ZmqReader:
    def __init__(self, env, trial, idx):
        import zmq

        self.zmq = zmq
        self.ctx = zmq.Context()
        s = self.s = self.ctx.socket(zmq.SUB)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.SUBSCRIBE, b"")
        for w in range(trial.writers):
            s.connect(f"ipc://{env['dir']}/w{w}.ipc")

    def recv(self, timeout):
        s = self.s
        if not s.poll(int(timeout * 1000)):
            return []
        out = []
        recv, again, nb = s.recv, self.zmq.Again, self.zmq.NOBLOCK
        unpackb = msgpack.unpackb
        for _ in range(1024):
            try:
                out.append(unpackb(recv(nb))[1])
            except again:
                break
        return out

    def close(self):
        self.s.close()
        self.ctx.term()


class ZmqT(Transport):
    name = "zmq"
    lossy = True

    def available(self):
        try:
            import zmq  # noqa: F401
        except ImportError:
            return False, "pyzmq is not installed (pip install pyzmq)"
        return True, ""

    def prepare(self, trial):
        return {"dir": tempfile.mkdtemp(prefix="shmwatch-bench-zmq-")}

    def cleanup(self, env):
        shutil.rmtree(env["dir"], ignore_errors=True)

    writer = ZmqWriter
    reader = ZmqReader


# ------------------------------------------------------------------------------- Redis


class RedisWriter:
    def __init__(self, env, trial, idx):
        import redis

        self.r = redis.Redis(host=HOST, port=env["port"])
        self.ch = env["channel"]
        self.r.ping()

    def send(self, key, value, seq):
        self.r.publish(self.ch, _packb([key, value, seq]))

    def send_batch(self, items):
        p = self.r.pipeline(transaction=False)
        ch = self.ch
        for k, v, s in items:
            p.publish(ch, _packb([k, v, s]))
        p.execute()

    send_many = send_batch  # a pipeline of 64 PUBLISH is both

    def flush(self):
        pass

    def close(self):
        self.r.close()


class RedisReader:
    def __init__(self, env, trial, idx):
        import redis

        self.r = redis.Redis(host=HOST, port=env["port"])
        self.p = self.r.pubsub()
        self.p.subscribe(env["channel"])
        deadline = time.monotonic() + 30
        while True:  # wait for the subscription's confirmation
            m = self.p.get_message(timeout=1.0)
            if m and m["type"] == "subscribe":
                break
            if time.monotonic() > deadline:
                raise TimeoutError("redis: no subscribe confirmation")

    def recv(self, timeout):
        get = self.p.get_message
        m = get(ignore_subscribe_messages=True, timeout=timeout)
        if m is None:
            return []
        unpackb = msgpack.unpackb
        out = [unpackb(m["data"])[1]]
        for _ in range(1023):
            m = get(ignore_subscribe_messages=True, timeout=0.0)
            if m is None:
                break
            out.append(unpackb(m["data"])[1])
        return out

    def close(self):
        self.p.close()
        self.r.close()


class RedisT(Transport):
    name = "redis"
    batch_ok = True
    pipeline_ok = True

    def __init__(self):
        self.proc = None
        self.dir = None
        self.port = 0

    def available(self):
        try:
            import redis  # noqa: F401
        except ImportError:
            return False, "redis-py is not installed (pip install redis)"
        if not shutil.which("redis-server"):
            return False, "redis-server is not installed (apt-get install redis-server)"
        return True, ""

    def start(self):
        import redis

        self.dir = tempfile.mkdtemp(prefix="shmwatch-bench-redis-")
        for _attempt in range(3):
            self.port = free_port()
            log = open(os.path.join(self.dir, "redis.log"), "wb")
            self.proc = subprocess.Popen(
                [shutil.which("redis-server"), "--port", str(self.port), "--bind", HOST,
                 "--save", "", "--appendonly", "no", "--dir", self.dir,
                 "--protected-mode", "yes", "--daemonize", "no"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
            log.close()
            REG.servers.append(self.proc)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    redis.Redis(host=HOST, port=self.port, socket_timeout=1).ping()
                    return
                except Exception:
                    time.sleep(0.05)
            stop_server(self.proc)
            REG.servers.remove(self.proc)
        raise RuntimeError("redis-server did not start on 127.0.0.1")

    def stop(self):
        if self.proc is not None:
            stop_server(self.proc)
            if self.proc in REG.servers:
                REG.servers.remove(self.proc)
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def prepare(self, trial):
        return {"port": self.port, "channel": b"bench." + trial.prefix}

    writer = RedisWriter
    reader = RedisReader


# -------------------------------------------------------------------------------- etcd


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def _prefix_end(prefix: bytes) -> bytes:
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdWriter:
    """Puts through etcd's v3 JSON gateway over one keep-alive HTTP/1.1 connection."""

    def __init__(self, env, trial, idx):
        self.conn = http.client.HTTPConnection(HOST, env["port"], timeout=30)
        self.hdr = {"Content-Type": "application/json"}

    def _post(self, path, body):
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers=self.hdr)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {resp.status}: {data[:200]!r}")

    def send(self, key, value, seq):
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def send_batch(self, items):
        self._post("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v, _ in items]})

    def flush(self):
        pass

    def close(self):
        self.conn.close()


class EtcdReader:
    """One /v3/watch stream: a chunked HTTP request (Expect: 100-continue, else etcd's
    HTTP server never starts the response) answered by a chunked stream of
    {"result": WatchResponse} JSON objects."""

    def __init__(self, env, trial, idx):
        self.sock = socket.create_connection((HOST, env["port"]), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw = bytearray()
        self.text = ""
        self.headers_done = False
        self.dec = json.JSONDecoder()
        self.sock.sendall(
            b"POST /v3/watch HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
            % (HOST.encode(), env["port"]))
        req = json.dumps({"create_request": {"key": _b64(trial.prefix),
                                             "range_end": _b64(_prefix_end(trial.prefix))}})
        data = req.encode() + b"\n"
        self.sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
        deadline = time.monotonic() + 30
        self.pending: list[bytes] = []
        while True:
            objs = self._read(1.0)
            if any(o.get("result", {}).get("created") for o in objs):
                for o in objs:
                    self.pending.extend(self._values(o))
                return
            if time.monotonic() > deadline:
                raise TimeoutError("etcd: no created watch response")

    def _values(self, obj) -> list[bytes]:
        res = obj.get("result")
        if res is None:
            if "error" in obj:
                raise RuntimeError(f"etcd watch stream error: {obj['error']}")
            return []
        if res.get("canceled"):
            raise RuntimeError(f"etcd watch canceled: {res}")
        b64d = base64.b64decode
        out = []
        for ev in res.get("events") or ():
            kv = ev["kv"]
            b64d(kv["key"])
            out.append(b64d(kv.get("value", "")))
        return out

    def _read(self, timeout) -> list[dict]:
        """Receive what is there (waiting up to timeout), return the whole JSON objects."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return []
        if not data:
            raise ConnectionError("etcd closed the watch stream")
        raw = self.raw
        raw += data
        if not self.headers_done:
            while True:
                end = raw.find(b"\r\n\r\n")
                if end < 0:
                    return []
                status = raw[:end].split(b"\r\n", 1)[0]
                code = int(status.split()[1])
                del raw[: end + 4]
                if code == 100:
                    continue
                if code != 200:
                    raise ConnectionError(f"etcd watch refused: {status!r}")
                self.headers_done = True
                break
        pos = 0
        text = []
        while True:
            nl = raw.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(bytes(raw[pos:nl]).split(b";")[0] or b"0", 16)
            if size == 0:
                raise ConnectionError("etcd ended the watch stream")
            if len(raw) < nl + 2 + size + 2:
                break
            text.append(bytes(raw[nl + 2: nl + 2 + size]).decode())
            pos = nl + 2 + size + 2
        del raw[:pos]
        self.text += "".join(text)
        out = []
        buf = self.text
        dec = self.dec
        i = 0
        n = len(buf)
        while True:
            while i < n and buf[i] in " \r\n\t":
                i += 1
            if i >= n:
                break
            try:
                obj, j = dec.raw_decode(buf, i)
            except ValueError:
                break
            out.append(obj)
            i = j
        self.text = buf[i:]
        return out

    def recv(self, timeout):
        if self.pending:
            out, self.pending = self.pending, []
            return out
        out = []
        for o in self._read(timeout):
            out.extend(self._values(o))
        return out

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.sendall(b"0\r\n\r\n")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class EtcdT(Transport):
    name = "etcd"
    batch_ok = True

    def __init__(self):
        self.proc = None
        self.dir = None
        self.port = 0

    def available(self):
        exe = "/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK) else shutil.which("etcd")
        if not exe:
            return False, "etcd is not installed (apt-get install etcd-server)"
        self.exe = exe
        return True, ""

    def start(self):
        last = ""
        for _attempt in range(3):
            self.dir = tempfile.mkdtemp(prefix="shmwatch-bench-etcd-")
            port, peer = free_port(), free_port()
            while peer == port:
                peer = free_port()
            curl, purl = f"http://{HOST}:{port}", f"http://{HOST}:{peer}"
            logp = os.path.join(self.dir, "etcd.log")
            with open(logp, "wb") as log:
                self.proc = subprocess.Popen(
                    [self.exe, "--name", "bench", "--data-dir", os.path.join(self.dir, "data"),
                     "--listen-client-urls", curl, "--advertise-client-urls", curl,
                     "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
                     "--initial-cluster", f"bench={purl}", "--initial-cluster-state", "new",
                     "--heartbeat-interval", "10", "--election-timeout", "100",
                     "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True)
            REG.servers.append(self.proc)
            self.port = port
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._healthy():
                    return
                time.sleep(0.05)
            with contextlib.suppress(OSError), open(logp, "rb") as f:
                last = f.read()[-2000:].decode(errors="replace")
            self.stop()
        raise RuntimeError(f"etcd did not start on 127.0.0.1: {last}")

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
            try:
                conn.request("GET", "/health")
                body = conn.getresponse().read()
            finally:
                conn.close()
            return json.loads(body).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def stop(self):
        if self.proc is not None:
            stop_server(self.proc)
            if self.proc in REG.servers:
                REG.servers.remove(self.proc)
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def prepare(self, trial):
        return {"port": self.port}

    def pace(self, rate):
        return min(rate, 500.0)

    writer = EtcdWriter
    reader = EtcdReader


TRANSPORT_CLASSES = {"shmwatch": ShmwatchT, "queue": QueueT, "zmq": ZmqT, "redis": RedisT,
                     "etcd": EtcdT}


# =============================================================================== trials


@dataclass
class Trial:
    workload: str
    variant: str
    transport: str
    prefix: bytes
    writers: int = 1
    readers: int = 1
    batch: int = 1
    pipelined: bool = False  # batch > 1: send_many (separate writes) instead of send_batch
    duration: float = 1.0
    pace: float = 0.0  # records/s per writer (W3); 0 = as fast as it goes
    stalled: int = 0  # the last `stalled` readers read nothing until the writers are done
    idle_s: float = 1.5
    broker_opts: dict = field(default_factory=dict)


class TrialError(RuntimeError):
    pass


class Sync:
    """What the processes of one trial share."""

    def __init__(self):
        self.q = _ctx.Queue()  # ("ready"|"result"|"error", role, idx, payload)
        self.go = _ctx.Event()
        self.resume = _ctx.Event()
        self.target = _ctx.RawValue("q", 0)  # records each reader should get; 0 = not yet


def _child_main(role: str, idx: int, tname: str, env: dict, trial: Trial, sync: Sync):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    obj = None
    try:
        cls = TRANSPORT_CLASSES[tname]
        obj = (cls.writer if role == "writer" else cls.reader)(env, trial, idx)
        sync.q.put(("ready", role, idx, None))
        if role == "writer":
            res = _writer_loop(obj, trial, idx, sync)
        else:
            res = _reader_loop(obj, trial, idx, sync)
        sync.q.put(("result", role, idx, res))
    except BaseException:
        sync.q.put(("error", role, idx, traceback.format_exc()))
    finally:
        if obj is not None:
            with contextlib.suppress(Exception):
                obj.close()


def _writer_loop(w, trial: Trial, idx: int, sync: Sync) -> dict:
    if not sync.go.wait(120):
        raise TimeoutError("no go signal")
    keys = make_keys(trial.prefix, idx)
    kmask = KEYS_PER_WRITER - 1
    pack, pad, now = STAMP.pack, PAD, _now
    cpu0 = time.process_time()
    start = now()
    end_at = start + int(trial.duration * 1e9)
    seq = 0
    late = None
    if trial.pace:
        interval = int(1e9 / trial.pace)
        late = array("q")
        sleep = time.sleep
        t_next = start
        while t_next < end_at:
            rem = t_next - now()
            if rem > SLEEP_SLACK_NS:
                sleep((rem - SLEEP_SLACK_NS) / 1e9)
            while now() < t_next:
                pass
            late.append(now() - t_next)
            w.send(keys[seq & kmask], pack(seq, t_next) + pad, seq)
            seq += 1
            t_next = start + seq * interval
    elif trial.batch > 1:
        b = trial.batch
        send_b = w.send_many if trial.pipelined else w.send_batch
        while True:
            t = now()
            if t >= end_at:
                break
            send_b([(keys[(seq + j) & kmask], pack(seq + j, t) + pad, seq + j)
                    for j in range(b)])
            seq += b
    else:
        send = w.send
        while True:
            t = now()
            if t >= end_at:
                break
            send(keys[seq & kmask], pack(seq, t) + pad, seq)
            seq += 1
    w.flush()
    stop = now()
    res = {"sent": seq, "start": start, "end": stop, "cpu_s": time.process_time() - cpu0}
    if late is not None:
        ls = sorted(late)
        res["late_p50_us"] = pctl(ls, 50) / 1000
        res["late_p99_us"] = pctl(ls, 99) / 1000
        res["late_max_us"] = (ls[-1] if ls else 0) / 1000
        # stall episodes: runs of records sent > 5 ms late (one stall delays many records)
        res["stalls"] = sum(1 for i, x in enumerate(late)
                            if x > 5_000_000 and (i == 0 or late[i - 1] <= 5_000_000))
    return res


def _reader_loop(r, trial: Trial, idx: int, sync: Sync) -> dict:
    stalled = idx >= trial.readers - trial.stalled
    if not sync.go.wait(120):
        raise TimeoutError("no go signal")
    if stalled:
        while not sync.resume.wait(0.2):  # read nothing while the writers write
            pass
    now = _now
    cpu0 = time.process_time()
    began = now()
    hard = began + int((trial.duration + 120) * 1e9)
    idle_ns = int(trial.idle_s * 1e9)
    target = sync.target
    lat = array("q") if trial.pace else None
    unpack = STAMP_AT.unpack_from
    recv = r.recv
    count = first = last = 0
    while True:
        vals = recv(0.05)
        t = now()
        if vals:
            count += len(vals)
            last = t
            if not first:
                first = t
            if lat is not None:
                for v in vals:
                    lat.append(t - unpack(v, 8)[0])
            tv = target.value
            if tv and count >= tv:
                break
        else:
            tv = target.value
            if tv and (count >= tv or t - max(last, began) > idle_ns):
                break
            if t > hard:
                break
    res = {"count": count, "first": first, "last": last, "began": began, "stalled": stalled,
           "cpu_s": time.process_time() - cpu0}
    if lat is not None:
        res["lat"] = lat.tobytes()
    return res


class Runner:
    def __init__(self, prof: Profile, peers: list[str], profile_dir: str | None = None):
        self.prof = prof
        self.profile_dir = profile_dir
        self.profiles: list[dict] = []
        self.transports: dict[str, Transport] = {"shmwatch": ShmwatchT()}
        self.skipped: dict[str, str] = {}
        self.trial_no = 0
        for name in peers:
            t = TRANSPORT_CLASSES[name]()
            ok, why = t.available()
            if not ok:
                self.skipped[name] = why
                _log(f"skipping {LABELS[name]}: {why}")
                continue
            self.transports[name] = t

    def start_servers(self) -> None:
        for name in list(self.transports):
            t = self.transports[name]
            try:
                t.start()
            except Exception as exc:
                self.skipped[name] = f"could not start: {exc}"
                _log(f"skipping {LABELS[name]}: could not start: {exc}")
                with contextlib.suppress(Exception):
                    t.stop()
                del self.transports[name]

    def stop_servers(self) -> None:
        for t in self.transports.values():
            with contextlib.suppress(Exception):
                t.stop()

    def next_prefix(self) -> bytes:
        self.trial_no += 1
        return b"%03x/" % (self.trial_no % 4096)

    def run(self, trial: Trial) -> dict:
        t = self.transports[trial.transport]
        env = t.prepare(trial)
        sync = Sync()
        procs = []
        timeline = time.monotonic()
        try:
            def spawn(role, idx):
                p = _ctx.Process(target=_child_main, args=(role, idx, trial.transport, env,
                                                            trial, sync), daemon=True)
                p.start()
                REG.children.append(p)
                procs.append(p)

            inbox: list = []

            def expect(kind, role, n, timeout):
                got = {}
                deadline = time.monotonic() + timeout
                while len(got) < n:
                    for m in list(inbox):
                        if m[0] == kind and m[1] == role:
                            inbox.remove(m)
                            got[m[2]] = m[3]
                    if len(got) >= n:
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TrialError(f"{trial.transport} {trial.workload}: timed out "
                                         f"waiting for {n - len(got)} {role} {kind}")
                    try:
                        m = sync.q.get(True, min(left, 0.5))
                    except _queue.Empty:
                        dead = [p for p in procs if p.exitcode not in (None, 0)]
                        if dead:
                            raise TrialError(f"{trial.transport}: a child died: "
                                             f"exit {dead[0].exitcode}") from None
                        continue
                    if m[0] == "error":
                        raise TrialError(f"{trial.transport} {m[1]} {m[2]} failed:\n{m[3]}")
                    inbox.append(m)
                return [got[i] for i in sorted(got)]

            for i in range(trial.readers):
                spawn("reader", i)
            expect("ready", "reader", trial.readers, 60)
            for i in range(trial.writers):
                spawn("writer", i)
            expect("ready", "writer", trial.writers, 60)
            pid = t.server_pid(env)
            spies = self._start_spies(trial, env, procs) if self.profile_dir else []
            cpu0 = cpu_seconds(pid) if pid else None
            t_go = _now()
            sync.go.set()
            try:
                wres = expect("result", "writer", trial.writers, trial.duration + 120)
            finally:
                self._stop_spies(spies)
            sent = sum(w["sent"] for w in wres)
            sync.target.value = max(sent, 1)
            fast_n = trial.readers - trial.stalled
            rres = expect("result", "reader", fast_n, 180) if fast_n else []
            cpu1 = cpu_seconds(pid) if pid else None
            t_done = _now()
            sync.resume.set()
            if trial.stalled:
                inbox_fast = rres
                allr = expect("result", "reader", trial.stalled, 300)
                rres = inbox_fast + allr
            start = min(w["start"] for w in wres)
            out = {"sent": sent, "writers": wres, "readers": rres, "start": start,
                   "write_s": (max(w["end"] for w in wres) - start) / 1e9,
                   "wall_s": time.monotonic() - timeline}
            if cpu0 is not None:
                out["server_cpu_s"] = cpu1 - cpu0  # from go until the fast readers finished
                out["server_span_s"] = (t_done - t_go) / 1e9
            if trial.workload == "W4":
                out["stats"] = t.stats(env)
            return out
        finally:
            sync.go.set()
            sync.resume.set()
            sync.target.value = max(sync.target.value, 1)
            REG.stop_children(procs, grace=10)
            with contextlib.suppress(Exception):
                sync.q.close()
                sync.q.cancel_join_thread()
            t.cleanup(env)


    # ------------------------------------------------------------ --profile (py-spy)

    def _start_spies(self, trial: Trial, env: dict, procs) -> list:
        """py-spy on the broker, writer 0 and reader 0 of a shmwatch trial."""
        if trial.transport != "shmwatch" or not shutil.which("py-spy"):
            return []
        os.makedirs(self.profile_dir, exist_ok=True)
        n = sum(1 for p in self.profiles if p["workload"] == trial.workload
                and p["variant"] == trial.variant) // 3 + 1
        slug = f"{trial.workload}-{trial.variant.replace(' ', '_')}-{n}"
        targets = [("broker", env["pid"]), ("writer", procs[trial.readers].pid),
                   ("reader", procs[0].pid)]
        spies = []
        for role, pid in targets:
            path = os.path.join(self.profile_dir, f"{slug}-{role}.txt")
            sp = subprocess.Popen(
                [shutil.which("py-spy"), "record", "--pid", str(pid), "--rate", "200",
                 "--nonblocking", "--nolineno", "--format", "raw", "-o", path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            REG.servers.append(sp)
            spies.append((sp, path, role, time.monotonic()))
            self.profiles.append({"workload": trial.workload, "variant": trial.variant,
                                  "role": role, "path": path})
        time.sleep(1.0)  # py-spy attaches
        now = time.monotonic()
        return [(sp, path, role, now) for sp, path, role, _ in spies]

    def _stop_spies(self, spies) -> None:
        for sp, path, _role, t0 in spies:
            for p in self.profiles:
                if p["path"] == path:
                    p["seconds"] = time.monotonic() - t0
            if sp.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sp.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
        for sp, *_ in spies:
            try:
                sp.wait(20)
            except subprocess.TimeoutExpired:
                stop_server(sp)
            if sp in REG.servers:
                REG.servers.remove(sp)


def summarize_profile(path: str, seconds: float, rate: int = 200, top: int = 12) -> str:
    """Top functions of a py-spy raw (collapsed stacks) file: self and inclusive shares of
    the samples where the process was running Python (idle waits are not sampled)."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    try:
        with open(path) as f:
            for line in f:
                stack, _, n = line.rstrip("\n").rpartition(" ")
                if not stack or not n.isdigit():
                    continue
                n = int(n)
                frames = [fr for fr in stack.split(";") if not fr.startswith(("process ",
                                                                              "thread "))]
                if not frames:
                    continue
                total += n
                self_c[frames[-1]] = self_c.get(frames[-1], 0) + n
                for fr in set(frames):
                    incl[fr] = incl.get(fr, 0) + n
    except OSError as exc:
        return f"(no profile: {exc})"
    if not total:
        return "(no samples)"
    busy = total / max(rate * seconds, 1)
    lines = [f"{total} samples over {seconds:.1f} s: busy ~{busy * 100:.0f}% of one core "
             f"(py-spy samples only running code)", "", "| self % | function |", "|---|---|"]
    for fr, c in sorted(self_c.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {c / total * 100:.1f} | `{fr}` |")
    lines += ["", "| inclusive % | function |", "|---|---|"]
    for fr, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top + 4]:
        lines.append(f"| {c / total * 100:.1f} | `{fr}` |")
    return "\n".join(lines)


def _rate(count: int, start: int, last: int) -> float:
    if count <= 0 or last <= start:
        return 0.0
    return count / ((last - start) / 1e9)


# =============================================================================== workloads


class Bench:
    def __init__(self, prof: Profile, only: list[str], peers: list[str],
                 profile_dir: str | None = None):
        self.prof = prof
        self.only = only
        self.runner = Runner(prof, peers, profile_dir)
        # results[workload][variant][transport][metric] = [value per repetition]
        self.results: dict = {}
        self.errors: list[str] = []
        self.notes: dict[str, list[str]] = {}
        self.rep = 0

    # ------------------------------------------------------------ recording

    def put(self, wl, variant, transport, metric, value) -> None:
        (self.results.setdefault(wl, {}).setdefault(variant, {})
         .setdefault(transport, {}).setdefault(metric, []).append(value))

    def trial(self, **kw) -> dict | None:
        tr = Trial(prefix=self.runner.next_prefix(), idle_s=self.prof.idle_s, **kw)
        if tr.transport == "etcd":
            tr.idle_s = max(tr.idle_s, 3.0)
        try:
            res = self.runner.run(tr)
        except TrialError as exc:
            msg = f"{tr.workload} {tr.variant} {tr.transport}: {exc}"
            self.errors.append(msg)
            _log("  FAILED " + msg)
            return None
        return res

    def _cpu(self, wl, variant, tn, res) -> None:
        """Where the CPU went: cores used by writers, readers and the server in between,
        and CPU microseconds (all processes) per delivered record."""
        wcpu = sum(w["cpu_s"] for w in res["writers"])
        rcpu = sum(r["cpu_s"] for r in res["readers"])
        scpu = res.get("server_cpu_s", 0.0)
        got = sum(r["count"] for r in res["readers"])
        span = max((r["last"] or r["began"]) for r in res["readers"]) - res["start"]
        span_s = max(span / 1e9, res["write_s"], 1e-9)
        self.put(wl, variant, tn, "cpu_writers", wcpu / res["write_s"])
        self.put(wl, variant, tn, "cpu_readers", rcpu / span_s)
        if "server_cpu_s" in res:
            self.put(wl, variant, tn, "cpu_server", scpu / max(res["server_span_s"], 1e-9))
        if got:
            self.put(wl, variant, tn, "cpu_us_per_record", (wcpu + rcpu + scpu) / got * 1e6)

    def transports(self, mode: str | None = None) -> list[str]:
        """Transports with this write path: None (one record per call), "batched",
        "pipelined"."""
        return [n for n, t in self.runner.transports.items()
                if mode is None or (t.batch_ok if mode == "batched" else t.pipeline_ok)]

    # ------------------------------------------------------------ W1 / W2

    def w1(self) -> None:
        d = self.prof.dur
        for variant, writers, mode in (("1 writer", 1, None), ("4 writers", 4, None),
                                       ("batched", 1, "batched"), ("pipelined", 1, "pipelined")):
            for tn in self.transports(mode):
                res = self.trial(workload="W1", variant=variant, transport=tn,
                                 writers=writers, readers=1, batch=BATCH if mode else 1,
                                 pipelined=mode == "pipelined", duration=d)
                if res is None:
                    continue
                r = res["readers"][0]
                rate = _rate(r["count"], res["start"], r["last"])
                self.put("W1", variant, tn, "rate", rate)
                self.put("W1", variant, tn, "delivered", r["count"] / max(res["sent"], 1))
                self.put("W1", variant, tn, "write_rate", res["sent"] / res["write_s"])
                self._cpu("W1", variant, tn, res)
                _log(f"  W1 {variant:9} {tn:9} {rate:12,.0f} /s  "
                     f"(delivered {r['count']}/{res['sent']})")

    def w2(self) -> None:
        d, n = self.prof.dur, self.prof.fanout
        for variant, mode in (("sync writes", None), ("batched", "batched"),
                              ("pipelined", "pipelined")):
            for tn in self.transports(mode):
                res = self.trial(workload="W2", variant=variant, transport=tn, writers=1,
                                 readers=n, batch=BATCH if mode else 1,
                                 pipelined=mode == "pipelined", duration=d)
                if res is None:
                    continue
                total = sum(r["count"] for r in res["readers"])
                last = max(r["last"] for r in res["readers"])
                rate = _rate(total, res["start"], last)
                self.put("W2", variant, tn, "rate", rate)
                self.put("W2", variant, tn, "delivered", total / max(res["sent"] * n, 1))
                self._cpu("W2", variant, tn, res)
                _log(f"  W2 {variant:11} {tn:9} {rate:12,.0f} /s total  "
                     f"(delivered {total}/{res['sent'] * n})")

    # ------------------------------------------------------------ W3

    def w3(self) -> None:
        for tn in self.transports():
            rate = self.runner.transports[tn].pace(5000.0)
            res = self.trial(workload="W3", variant="paced", transport=tn, writers=1,
                             readers=1, pace=rate, duration=self.prof.lat_dur)
            if res is None:
                continue
            lat = array("q")
            lat.frombytes(res["readers"][0]["lat"])
            xs = sorted(lat)
            w = res["writers"][0]
            p50, p99, p999 = (pctl(xs, q) / 1000 for q in (50, 99, 99.9))
            self.put("W3", "paced", tn, "rate", rate)
            self.put("W3", "paced", tn, "p50", p50)
            self.put("W3", "paced", tn, "p99", p99)
            self.put("W3", "paced", tn, "p999", p999)
            self.put("W3", "paced", tn, "samples", len(xs))
            self.put("W3", "paced", tn, "late_p99", w.get("late_p99_us"))
            self.put("W3", "paced", tn, "late_max", w.get("late_max_us"))
            self.put("W3", "paced", tn, "stalls", w.get("stalls"))
            self.put("W3", "paced", tn, "max", pctl(xs, 100) / 1000)
            _log(f"  W3 {tn:9} at {rate:,.0f}/s  p50 {p50:8.1f}  p99 {p99:8.1f}  "
                 f"p99.9 {p999:8.1f}  max {pctl(xs, 100) / 1000:8.0f} us  ({len(xs)} samples; "
                 f"writer late p99 {w.get('late_p99_us', 0):.0f} max "
                 f"{w.get('late_max_us', 0):.0f} us, {w.get('stalls')} stalls > 5 ms)")

    # ------------------------------------------------------------ W4

    def w4(self) -> None:
        opts = {"watch_ring_bytes": 64 << 10, "log_bytes": self.prof.stall_log_bytes}
        for tn in self.transports():
            t = self.runner.transports[tn]
            b = BATCH if t.batch_ok else 1
            fast = {}
            pair = [("3 fast", 0), ("3 fast + 1 stalled", 1)]
            if self.rep % 2:
                pair.reverse()  # ABBA across repetitions: a drift in the machine cancels out
            for variant, stalled in pair:
                res = self.trial(workload="W4", variant=variant, transport=tn, writers=1,
                                 readers=3 + stalled, stalled=stalled, batch=b,
                                 duration=self.prof.stall_dur,
                                 broker_opts=opts if tn == "shmwatch" else {})
                if res is None:
                    continue
                rates = [_rate(r["count"], res["start"], r["last"])
                         for r in res["readers"] if not r["stalled"]]
                fast[variant] = statistics.mean(rates)
                got = [r["count"] for r in res["readers"] if not r["stalled"]]
                self.put("W4", variant, tn, "fast_rate", fast[variant])
                self.put("W4", variant, tn, "fast_delivered",
                         min(got) / max(res["sent"], 1))
                line = (f"  W4 {variant:18} {tn:9} fast {fast[variant]:12,.0f} /s each "
                        f"(got {min(got)}..{max(got)} of {res['sent']})")
                st = res.get("stats") or {}
                if st.get("victims_entered") is not None:
                    self.put("W4", variant, tn, "victims_entered", st["victims_entered"])
                    line += f"; broker: {st['victims_entered']} victim entries"
                if stalled:
                    s = next(r for r in res["readers"] if r["stalled"])
                    self.put("W4", variant, tn, "stalled_got", s["count"])
                    self.put("W4", variant, tn, "sent", res["sent"])
                    self.put("W4", variant, tn, "stalled_all",
                             1.0 if s["count"] == res["sent"] else 0.0)
                    cs = (s["last"] - s["began"]) / 1e9 if s["last"] else 0.0
                    self.put("W4", variant, tn, "catchup_s", cs)
                    line += f"; stalled got {s['count']}/{res['sent']} in {cs:.2f}s after resuming"
                _log(line)
            if len(fast) == 2 and fast["3 fast"] > 0:
                self.put("W4", "kept", tn, "kept", fast["3 fast + 1 stalled"] / fast["3 fast"])

    # ------------------------------------------------------------ W5 (shmwatch only)

    def w5(self) -> None:
        for kind in ("keys", "ranges"):
            try:
                rs = w5_trial(kind, self.prof.w5_counts, self.prof)
            except Exception as exc:
                msg = f"W5 {kind}: {exc!r}"
                self.errors.append(msg)
                _log("  FAILED " + msg + "\n" + traceback.format_exc())
                continue
            for n, r in zip(self.prof.w5_counts, rs):
                v = f"{kind} {n}"
                for k in ("write_rate", "cpu_us_per_write", "delivered", "expected",
                          "setup_s"):
                    self.put("W5", v, "shmwatch", k, r[k])
                _log(f"  W5 {v:13} write {r['write_rate']:9,.0f} /s  broker "
                     f"{r['cpu_us_per_write']:6.1f} us CPU/write  delivered "
                     f"{r['delivered']}/{r['expected']}  (set-up {r['setup_s']:.1f}s)")

    # ------------------------------------------------------------ memory (shmwatch only)

    def mem(self) -> None:
        for variant, n in (("0 watchers", 0), (f"{self.prof.mem_watchers} stalled watchers",
                                                self.prof.mem_watchers)):
            try:
                r = mem_trial(n, self.prof)
            except Exception as exc:
                msg = f"MEM {variant}: {exc!r}"
                self.errors.append(msg)
                _log("  FAILED " + msg + "\n" + traceback.format_exc())
                continue
            for cp in r["checkpoints"]:
                w = cp["writes"]
                self.put("MEM", variant, "shmwatch", f"anon@{w}", cp["RssAnon"])
                self.put("MEM", variant, "shmwatch", f"rss@{w}", cp["VmRSS"])
            self.put("MEM", variant, "shmwatch", "write_rate", r["write_rate"])
            self.notes.setdefault("MEM", []).append(
                f"{variant}: " + ", ".join(f"{cp['writes']:,} writes: RssAnon "
                                           f"{cp['RssAnon']:.1f} MiB / VmRSS {cp['VmRSS']:.1f}"
                                           for cp in r["checkpoints"]))
            _log(f"  MEM {variant}: " + "  ".join(
                f"{cp['writes']}: anon {cp['RssAnon']:.1f} rss {cp['VmRSS']:.1f} MiB"
                for cp in r["checkpoints"]))

    # ------------------------------------------------------------ the whole run

    def run(self) -> None:
        prof = self.prof
        self.runner.start_servers()
        steps = [("W1", self.w1), ("W2", self.w2), ("W3", self.w3), ("W4", self.w4),
                 ("W5", self.w5)]
        for rep in range(prof.reps):
            self.rep = rep
            for name, fn in steps:
                if name in self.only:
                    _log(f"[rep {rep + 1}/{prof.reps}] {name}")
                    fn()
        if "MEM" in self.only:
            _log("[once] MEM")
            self.mem()


# ------------------------------------------------------------------------- W5 / MEM bodies


def _w5_watch_keys(kind: str, i: int) -> tuple[bytes, bytes | None]:
    if kind == "keys":
        return b"w5/k/%011d" % i, None
    return b"w5/r/%011d" % (i * 100), b"w5/r/%011d" % (i * 100 + 10)


def _w5_write_key(kind: str, n: int, seq: int) -> bytes:
    """1 write in 100 hits a watched key (round robin over the n watchers); the rest hit
    keys next to them that nobody watches (for ranges: the gaps between ranges)."""
    i = (seq // 100) % n if seq % 100 == 0 else seq % n
    hit = seq % 100 == 0
    if kind == "keys":
        return b"w5/k/%011d" % (i if hit else 100_000_000 + (seq % 997))
    return b"w5/r/%011d" % (i * 100 + (5 if hit else 50))


def _w5_holder(name: str, kind: str, ids: list[int], q, stop, drain: bool, tag: int):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import clientlib

        with clientlib.connect(name, timeout=60) as c:
            ws = []
            for i in ids:
                key, end = _w5_watch_keys(kind, i)
                w = c.watch(key, range_end=end)
                ws.append(w)
            for w in ws:
                r = w.get(60)
                assert r.created
            q.put(("ready", len(ws)))
            got = 0
            while not stop.wait(0.02 if drain else 0.5):
                if drain:
                    for w in ws:
                        while (r := w.get_nowait()) is not None:
                            got += len(r.events)
            time.sleep(0.2)  # the broker delivers the last writes
            for w in ws:
                while (r := w.get_nowait()) is not None:
                    got += len(r.events)
            q.put(("done", (tag, got)))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _broker_cpu_ns(pid: int) -> int:
    """CPU time of a (single-threaded) broker in ns: /proc/<pid>/schedstat is exact to the
    ns, where psutil's cpu_times counts 10 ms clock ticks."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return int(cpu_seconds(pid) * 1e9)


W5_SLICE_S = 0.1


def _w5_writer(names: list[str], pids: list[int], kind: str, counts: list[int], dur: float,
               q, go):
    """One writer, one client per broker: writes to broker i for a 0.1 s slice, then to
    the next (order rotated every cycle), until each broker had `dur` seconds. Noise then
    hits every watcher count alike: the ratios between them are paired measurements."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import clientlib

        cs = [clientlib.connect(nm, timeout=60) for nm in names]
        try:
            value = STAMP.pack(0, 0) + PAD
            k = len(cs)
            seqs, hits, secs, cpu = [0] * k, [0] * k, [0] * k, [0] * k
            q.put(("ready", 0))
            go.wait(60)
            slice_ns = int(W5_SLICE_S * 1e9)
            cycles = max(1, round(dur / W5_SLICE_S))
            for cyc in range(cycles):
                for j in range(k):
                    i = (j + cyc) % k
                    put, n, seq = cs[i].put, counts[i], seqs[i]
                    c0 = _broker_cpu_ns(pids[i])
                    t0 = _now()
                    end = t0 + slice_ns
                    while _now() < end:
                        put(_w5_write_key(kind, n, seq), value)
                        if seq % 100 == 0:
                            hits[i] += 1
                        seq += 1
                    secs[i] += _now() - t0
                    cpu[i] += _broker_cpu_ns(pids[i]) - c0
                    seqs[i] = seq
            q.put(("done", {"sent": seqs, "hits": hits, "ns": secs, "cpu_ns": cpu}))
        finally:
            for c in cs:
                c.close()
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _collect(q, kind: str, n: int, timeout: float, procs) -> list:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"timed out waiting for {n - len(out)} {kind}")
        try:
            m = q.get(True, min(left, 0.5))
        except _queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a child died: exit {dead[0].exitcode}") from None
            continue
        if m[0] == "error":
            raise RuntimeError(m[1])
        if m[0] != kind:
            raise RuntimeError(f"unexpected message {m!r}")
        out.append(m[1])
    return out


def w5_trial(kind: str, counts, prof: Profile) -> list[dict]:
    """Brokers with 1, 100, ... watchers, all set up at once; one writer alternates."""
    import broker

    brokers = []
    procs = []
    q = _ctx.Queue()
    stop, go = _ctx.Event(), _ctx.Event()
    try:
        holders = []  # (broker index, process)
        setup = []
        for bi, n in enumerate(counts):
            t_setup = time.monotonic()
            b = broker.spawn(watch_ring_bytes=16 << 10, rings_per_arena=256)
            REG.add_broker(b)
            brokers.append(b)
            nproc = max(1, min(prof.w5_procs, n))
            for part in (list(range(p, n, nproc)) for p in range(nproc)):
                p = _ctx.Process(target=_w5_holder, daemon=True,
                                 args=(b.name, kind, part, q, stop, len(part) <= 16, bi))
                p.start()
                REG.children.append(p)
                procs.append(p)
                holders.append(bi)
            _collect(q, "ready", nproc, 600, procs)
            setup.append(time.monotonic() - t_setup)
        wp = _ctx.Process(target=_w5_writer, daemon=True,
                          args=([b.name for b in brokers], [b.pid for b in brokers], kind,
                                list(counts), prof.w5_dur, q, go))
        wp.start()
        REG.children.append(wp)
        procs.append(wp)
        _collect(q, "ready", 1, 60, procs)
        go.set()
        wr = _collect(q, "done", 1, prof.w5_dur * len(counts) + 120, procs)[0]
        stop.set()
        raw = _collect(q, "done", len(holders), 120, procs)  # (broker index, events got)
        out = []
        for i in range(len(counts)):
            out.append({"write_rate": wr["sent"][i] / (wr["ns"][i] / 1e9),
                        "cpu_us_per_write": wr["cpu_ns"][i] / 1e3 / max(wr["sent"][i], 1),
                        "delivered": None, "expected": wr["hits"][i], "setup_s": setup[i]})
        tot = [0] * len(counts)
        for bi, got in raw:
            tot[bi] += got
        for i in range(len(counts)):
            out[i]["delivered"] = tot[i]
        return out
    finally:
        stop.set()
        go.set()
        REG.stop_children(procs, grace=10)
        with contextlib.suppress(Exception):
            q.close()
            q.cancel_join_thread()
        for b in brokers:
            REG.stop_broker(b)


def _mem_holder(name: str, n: int, q, stop):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import clientlib

        with clientlib.connect(name, timeout=60) as c:
            ws = [c.watch(b"mem/", prefix=True) for _ in range(n)]
            for w in ws:
                assert w.get(60).created
            q.put(("ready", n))
            stop.wait(3600)  # stalled: never reads
            q.put(("done", 0))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def _mem_writer(name: str, total: int, quarters: int, q, cont):
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import clientlib

        with clientlib.connect(name, timeout=120) as c:
            keys = [b"mem/%012d" % i for i in range(1000)]
            value = STAMP.pack(0, 0) + PAD
            q.put(("ready", 0))
            done = 0
            t0 = _now()
            for k in range(1, quarters + 1):
                goal = total * k // quarters
                while done < goal:
                    nb = min(BATCH, goal - done)
                    c.txn(success=[clientlib.op_put(keys[(done + j) % 1000], value)
                                   for j in range(nb)])
                    done += nb
                q.put(("checkpoint", {"writes": done, "s": (_now() - t0) / 1e9}))
                cont.acquire()
            q.put(("done", done))
    except BaseException:
        q.put(("error", traceback.format_exc()))


def mem_trial(n_watchers: int, prof: Profile) -> dict:
    import broker

    b = broker.spawn(watch_ring_bytes=16 << 10, rings_per_arena=256, log_bytes=16 << 20)
    REG.add_broker(b)
    procs = []
    q = _ctx.Queue()
    stop = _ctx.Event()
    cont = _ctx.Semaphore(0)
    quarters = 4
    try:
        holders = 0
        if n_watchers:
            per = [n_watchers // 2, n_watchers - n_watchers // 2] if n_watchers > 1 else [1]
            for part in per:
                p = _ctx.Process(target=_mem_holder, args=(b.name, part, q, stop), daemon=True)
                p.start()
                REG.children.append(p)
                procs.append(p)
            holders = len(per)
            _collect(q, "ready", holders, 600, procs)
        wp = _ctx.Process(target=_mem_writer, daemon=True,
                          args=(b.name, prof.mem_writes, quarters, q, cont))
        wp.start()
        REG.children.append(wp)
        procs.append(wp)
        _collect(q, "ready", 1, 60, procs)
        time.sleep(0.2)
        cps = [{"writes": 0, **proc_mem(b.pid)}]
        last_s = 0.0
        for _ in range(quarters):
            cp = _collect(q, "checkpoint", 1, 1800, procs)[0]
            time.sleep(0.1)  # let the broker settle (victim retries)
            cps.append({"writes": cp["writes"], **proc_mem(b.pid)})
            last_s = cp["s"]
            cont.release()
        _collect(q, "done", 1, 60, procs)
        stop.set()
        if holders:
            _collect(q, "done", holders, 60, procs)
        return {"checkpoints": cps, "write_rate": prof.mem_writes / max(last_s, 1e-9)}
    finally:
        stop.set()
        for _ in range(quarters + 1):
            cont.release()
        REG.stop_children(procs, grace=10)
        with contextlib.suppress(Exception):
            q.close()
            q.cancel_join_thread()
        REG.stop_broker(b)


# =============================================================================== report


def fmt_num(x, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit == "us":
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.0f}k"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    if abs(x) >= 10:
        return f"{x:.0f}"
    return f"{x:.2f}"


def cell(xs, unit: str = "") -> str:
    s = summary(xs or [])
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return fmt_num(s["median"], unit)
    return (f"{fmt_num(s['median'], unit)} ({fmt_num(s['min'], unit)}–"
            f"{fmt_num(s['max'], unit)})")


def ratios(a: list, b: list) -> list:
    """Per-repetition ratios a[i]/b[i] (same repetition: same noise)."""
    return [x / y for x, y in zip(a, b) if x and y]


def pct_cell(xs) -> str:
    s = summary(xs)
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median'] * 100:.0f}%"
    return f"{s['median'] * 100:.0f}% ({s['min'] * 100:.0f}–{s['max'] * 100:.0f})"


def ratio_cell(xs) -> str:
    s = summary(xs)
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.2f}x"
    return f"{s['median']:.2f}x ({s['min']:.2f}–{s['max']:.2f})"


class Report:
    def __init__(self, bench: Bench, machine: dict, elapsed: float):
        self.b = bench
        self.R = bench.results
        self.m = machine
        self.elapsed = elapsed
        self.targets: list[dict] = []

    def get(self, wl, variant, tn, metric) -> list:
        return self.R.get(wl, {}).get(variant, {}).get(tn, {}).get(metric, [])

    def med(self, wl, variant, tn, metric):
        return summary(self.get(wl, variant, tn, metric))["median"]

    def order(self, wl) -> list[str]:
        seen = set()
        for v in self.R.get(wl, {}).values():
            seen |= set(v)
        return [t for t in ("shmwatch", *PEERS) if t in seen]

    # ------------------------------------------------------------ targets

    def compute_targets(self) -> list[dict]:
        T = []

        def add(name, measured, met, note=""):
            T.append({"target": name, "measured": measured, "met": met, "note": note})

        r = ratios(self.get("W1", "4 writers", "shmwatch", "rate"),
                   self.get("W1", "4 writers", "queue", "rate"))
        m = summary(r)["median"]
        add("W1, 4 writers, synchronous puts: >= 2x multiprocessing.Queue",
            ratio_cell(r), None if m is None else m >= 2.0)
        r = ratios(self.get("W1", "4 writers", "shmwatch", "rate"),
                   self.get("W1", "4 writers", "etcd", "rate"))
        m = summary(r)["median"]
        add("W1, 4 writers, synchronous puts: >= 50x etcd", ratio_cell(r),
            None if m is None else m >= 50.0)
        m = self.med("W1", "batched", "shmwatch", "rate")
        pipe = self.get("W1", "pipelined", "shmwatch", "rate")
        add("W1 batched write path (txn of 64 puts): >= 250k events/s",
            cell(self.get("W1", "batched", "shmwatch", "rate")) + " events/s"
            + (f" (pipelined `put_many` of 64: {cell(pipe)} events/s)" if pipe else ""),
            None if m is None else m >= 250_000)
        rs = ratios(self.get("W2", "sync writes", "shmwatch", "rate"),
                    self.get("W2", "sync writes", "zmq", "rate"))
        rb = ratios(self.get("W2", "batched", "shmwatch", "rate"),
                    self.get("W2", "sync writes", "zmq", "rate"))
        best = rb if summary(rb)["median"] is not None else rs
        m = summary(best)["median"]
        add(f"W2 fan-out to {self.b.prof.fanout}: >= 1.5x pyzmq total delivered",
            f"batched writes {ratio_cell(rb)}; synchronous puts {ratio_cell(rs)}",
            None if m is None else m >= 1.5,
            "shmwatch's batched write path (64 puts per txn) against zmq's send(), which "
            "never waits either")
        p50 = self.med("W3", "paced", "shmwatch", "p50")
        p99 = self.med("W3", "paced", "shmwatch", "p99")
        add("W3 at 5,000/s: p50 <= 60 us and p99 <= 300 us",
            f"p50 {fmt_num(p50, 'us')} us, p99 {fmt_num(p99, 'us')} us",
            None if p50 is None else (p50 <= 60 and p99 <= 300))
        kept = self.get("W4", "kept", "shmwatch", "kept")
        allg = self.get("W4", "3 fast + 1 stalled", "shmwatch", "stalled_all")
        km = summary(kept)["median"]
        got = self.get("W4", "3 fast + 1 stalled", "shmwatch", "stalled_got")
        sent = self.get("W4", "3 fast + 1 stalled", "shmwatch", "sent")
        add("W4: fast watchers keep >= 90% of their rate beside a stalled one; the stalled "
            "one gets every event",
            f"kept {pct_cell(kept)} of their rate; "
            f"stalled got " + ", ".join(f"{g:,}/{s:,}" for g, s in zip(got, sent)),
            None if km is None or not allg else (km >= 0.9 and all(x == 1.0 for x in allg)))
        one = self.get("W5", "keys 1", "shmwatch", "write_rate")
        many = self.get("W5", "keys 10000", "shmwatch", "write_rate")
        r = ratios(many, one)
        m = summary(r)["median"]
        add("W5: write rate with 10,000 single-key watchers >= 80% of that with 1",
            pct_cell(r),
            None if m is None else m >= 0.8)
        self.targets = T
        return T

    # ------------------------------------------------------------ markdown

    def table(self, wl, variants, metric, unit="", head="") -> list[str]:
        order = self.order(wl)
        lines = ["| transport | " + " | ".join(variants) + " |",
                 "|---|" + "---|" * len(variants)]
        for tn in order:
            row = [cell(self.get(wl, v, tn, metric), unit) for v in variants]
            lines.append(f"| {LABELS[tn]} | " + " | ".join(row) + " |")
        return lines

    def ratio_table(self, wl, variants, metric, base_variant=None) -> list[str]:
        order = [t for t in self.order(wl) if t != "shmwatch"]
        if not order:
            return []
        lines = ["", "shmwatch / peer (median of per-repetition ratios, min–max):", "",
                 "| peer | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for tn in order:
            row = []
            for v in variants:
                r = ratios(self.get(wl, v, "shmwatch", metric), self.get(wl, v, tn, metric))
                row.append(ratio_cell(r))
            lines.append(f"| {LABELS[tn]} | " + " | ".join(row) + " |")
        return lines

    def load_line(self) -> str:
        ld = self.m.get("load")
        if not ld:
            return "- Machine load: not measured"
        ext = self.m.get("external_at_start") or []
        s = (f"- Machine load during the run: the cores were {ld['busy_pct']:.0f}% busy: "
             f"{ld['ours_pct']:.0f}% this run's processes, {ld['others_pct']:.0f}% other "
             f"processes (steal {ld['steal_pct']:.1f}%); load average "
             f"{ld['loadavg_start'][0]:.1f} at the start, {ld['loadavg_end'][0]:.1f} at the end")
        if ext:
            s += ". Busy at the start, not ours: " + "; ".join(f"`{x}`" for x in ext[:5])
        if ld["others_pct"] > 10:
            s += (". **Other processes took a sizeable share of the machine: absolute figures "
                  "are depressed and noisier than usual; the ratios are still same-run.**")
        return s

    def cpu_table(self, wl, variants) -> list[str]:
        """Cores busy per role (median) and CPU us per delivered record, all processes."""
        lines = ["", "Where the CPU went (median over repetitions): cores used by the writer "
                 "process(es) / the watcher process(es) / the process in between (shmwatch "
                 "broker, redis-server, etcd; Queue and zmq have none), and CPU microseconds of "
                 "all of them per delivered record. The machine has "
                 f"{self.m['cores']} cores.", "",
                 "| transport | " + " | ".join(f"{v}: cores W / R / S | {v}: CPU us/record"
                                                for v in variants) + " |",
                 "|---|" + "---|---|" * len(variants)]
        for tn in self.order(wl):
            row = []
            for v in variants:
                m = [summary(self.get(wl, v, tn, k))["median"]
                     for k in ("cpu_writers", "cpu_readers", "cpu_server")]
                if m[0] is None:
                    row += ["-", "-"]
                    continue
                row.append(" / ".join("-" if x is None else f"{x:.2f}" for x in m))
                row.append(fmt_num(summary(self.get(wl, v, tn, "cpu_us_per_record"))["median"],
                                   "us"))
            lines.append(f"| {LABELS[tn]} | " + " | ".join(row) + " |")
        return lines

    def markdown(self) -> str:
        m, b, P = self.m, self.b, self.b.prof
        L = ["# shmwatch benchmarks", "",
             "Written by `tools/bench`; do not edit by hand. Rerun to refresh.", "",
             "## Machine and run", "",
             f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB RAM",
             f"- Python {m['python']} on {m['platform']}",
             "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
             f"- Date: {m['date']}",
             f"- Code: {m.get('git') or 'not a git checkout'}",
             self.load_line(),
             f"- Command: `{m['command']}` (profile `{P.name}`: {P.reps} repetitions, "
             f"{P.dur:g} s of writing per throughput trial, {P.lat_dur:g} s in W3, "
             f"{P.stall_dur:g} s in W4; whole run {self.elapsed / 60:.1f} min)",
             ""]
        if b.runner.skipped:
            for tn, why in b.runner.skipped.items():
                L.append(f"- Skipped {LABELS[tn]}: {why}")
            L.append("")
        L += ["Figures are the median over repetitions with (min–max). Repetitions are "
              "interleaved (each runs every workload through every transport), so compare "
              "the ratios measured in this run, never absolute figures across runs: this "
              "machine is noisy (see /work/shared/PERF-ANCHORS.md).", "",
              "A record is ~100 bytes: 16-byte key, 64-byte value carrying the sequence "
              "number and the intended send time. Every watcher process decodes every "
              "record (shmwatch: `Watch.get()` builds the `WatchResponse`/`Event`/`KeyValue` "
              "objects; peers: msgpack `[key, value, seq]`, etcd: JSON + base64). Rates are "
              "records delivered per second from the first send to the last receipt. "
              "shmwatch runs a fresh broker per trial (`broker.spawn()`, default options "
              "unless said otherwise); redis-server and etcd run for the whole run on "
              "127.0.0.1.", ""]
        # targets
        L += ["## Targets (issue 6)", "", "| target | measured | met |", "|---|---|---|"]
        for t in self.targets:
            met = {True: "**met**", False: "**not met**", None: "not measured"}[t["met"]]
            L.append(f"| {t['target']} | {t['measured']} | {met} |")
        notes = [t for t in self.targets if t["note"]]
        for t in notes:
            L.append("")
            L.append(f"- {t['target'].split(':')[0]}: {t['note']}.")
        L.append("")
        # W1
        if "W1" in self.R:
            vs = [v for v in ("1 writer", "4 writers", "batched", "pipelined")
                  if v in self.R["W1"]]
            L += ["## W1 unicast put -> watch (records/s delivered to 1 watcher process)", "",
                  "`1 writer`, `4 writers`: synchronous writes, one at a time per writer "
                  "(shmwatch `put` waits for its reply; etcd `/v3/kv/put`; Redis `PUBLISH`; "
                  "Queue `put` and zmq `send` do not wait). `batched`: 64 records per call "
                  "(shmwatch `txn` of 64 puts = one revision of 64 events; etcd `/v3/kv/txn` "
                  "of 64 puts; Redis a pipeline of 64 publishes). `pipelined`: 64 separate writes "
                  "sent in one go, each its own revision (shmwatch `put_many` of 64: one broker "
                  "wake-up, 64 replies; Redis the same pipeline of 64 publishes).", ""]
            L += self.table("W1", vs, "rate")
            L += self.ratio_table("W1", vs, "rate")
            L += self.cpu_table("W1", vs)
            lossy = self.loss_lines("W1", vs)
            L += lossy + [""]
        if "W2" in self.R:
            vs = [v for v in ("sync writes", "batched", "pipelined") if v in self.R["W2"]]
            L += [f"## W2 fan-out: 1 writer -> {P.fanout} watcher processes on one prefix "
                  "(total records/s delivered)", ""]
            L += self.table("W2", vs, "rate")
            L += self.ratio_table("W2", vs, "rate")
            L += self.cpu_table("W2", vs)
            rb = ratios(self.get("W2", "batched", "shmwatch", "rate"),
                        self.get("W2", "sync writes", "zmq", "rate"))
            if rb:
                L += ["", f"shmwatch batched / pyzmq: {ratio_cell(rb)} (zmq has no separate "
                      "batched path: its `send` never waits)."]
            L += self.loss_lines("W2", vs) + [""]
        if "W3" in self.R:
            L += ["## W3 one-way latency at a paced rate (us)", "",
                  "The writer stamps the intended send time of record i (start + i/rate) "
                  "into the value and sends it then (or at once if late); the watcher "
                  "computes receive time minus intended time, so a stall of the writer or "
                  "the transport counts against every record it delays (no coordinated "
                  "omission). shmwatch and the peers at 5,000/s, etcd at 500/s. `writer "
                  "late p99` is how late the writer itself sent (sleep granularity, CPU "
                  "contention, a synchronous write that blocked), included in the figures; "
                  "`writer stalls` counts, per repetition, the episodes where the writer fell "
                  "more than 5 ms behind its schedule: one such stall delays every record "
                  "scheduled during it, so a single one can decide p99 and p99.9.", "",
                  "| transport | rate /s | p50 | p99 | p99.9 | max | samples | writer late p99 "
                  "| writer stalls > 5 ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
            for tn in self.order("W3"):
                g = functools.partial(self.get, "W3", "paced", tn)
                L.append(f"| {LABELS[tn]} | {fmt_num(summary(g('rate'))['median'])} | "
                         f"{cell(g('p50'), 'us')} | {cell(g('p99'), 'us')} | "
                         f"{cell(g('p999'), 'us')} | {cell(g('max'), 'us')} | "
                         f"{fmt_num(summary(g('samples'))['median'])}"
                         f" | {cell(g('late_p99'), 'us')} | "
                         f"{', '.join(str(x) for x in g('stalls')) or '-'} |")
            L += [""]
        if "W4" in self.R:
            L += ["## W4 one stalled watcher beside 3 fast ones", "",
                  "Run back to back, in alternating order across repetitions. "
                  "1 writer (its fastest path: shmwatch 64-put txns, Redis pipelines of 64, "
                  "etcd 64-put txns, Queue/zmq one record per call) to 4 watcher processes on "
                  "one prefix; the stalled one reads nothing until the writer is done and the "
                  "fast ones have finished, then reads until it has every record (or nothing "
                  f"came for {P.idle_s:g} s; etcd 3 s). shmwatch here: "
                  "`broker.spawn(watch_ring_bytes=64<<10, log_bytes=256<<20)`, so the stalled "
                  "watcher's ring fills and it becomes a victim that replays from the log.", "",
                  "| transport | fast watcher rate, 3 fast | with 1 stalled | kept | "
                  "stalled one got (per repetition) | its catch-up (s) |",
                  "|---|---|---|---|---|---|"]
            for tn in self.order("W4"):
                def g(v, k, tn=tn):
                    return self.get("W4", v, tn, k)

                got = g("3 fast + 1 stalled", "stalled_got")
                sent = g("3 fast + 1 stalled", "sent")
                gs = ", ".join(f"{x:,}/{y:,}" for x, y in zip(got, sent)) or "-"
                kept = g("kept", "kept")
                kc = pct_cell(kept)
                L.append(f"| {LABELS[tn]} | {cell(g('3 fast', 'fast_rate'))} | "
                         f"{cell(g('3 fast + 1 stalled', 'fast_rate'))} | {kc} | {gs} | "
                         f"{cell(g('3 fast + 1 stalled', 'catchup_s'))} |")
            ve = self.get("W4", "3 fast + 1 stalled", "shmwatch", "victims_entered")
            if ve:
                L += ["", "shmwatch broker counters (`broker.admin.read_stats`), with the "
                      "stalled watcher: victim entries per repetition "
                      + ", ".join(str(x) for x in ve) + " (0 would mean the stalled watcher "
                      "never filled its ring and the test did not exercise victims)."]
            fl = []
            for tn in self.order("W4"):
                for v in ("3 fast", "3 fast + 1 stalled"):
                    d = self.get("W4", v, tn, "fast_delivered")
                    if d and min(d) < 1.0:
                        fl.append(f"{LABELS[tn]} ({v}): the fast watchers got only "
                                  f"{min(d) * 100:.1f}% of the records in the worst repetition")
            if fl:
                L += [""] + ["- " + x for x in fl]
            L += [""]
        if "W5" in self.R:
            L += ["## W5 many watchers (shmwatch)", "",
                  "N watches (single keys, or ranges of 10 keys) held by "
                  f"min(N, {P.w5_procs}) processes (many watches per client), broker "
                  "`watch_ring_bytes=16<<10, rings_per_arena=256`; one writer puts "
                  "synchronously for "
                  f"{P.w5_dur:g} s, 1 write in 100 to a watched key (round robin), the rest to "
                  "keys nobody watches (for ranges: between the ranges). The writer alternates "
                  f"between the brokers of all watcher counts in {W5_SLICE_S:g} s slices (order "
                  "rotated each cycle), so the counts are compared under the same noise. "
                  "Broker CPU is the broker's on-CPU time (/proc/<pid>/schedstat) during its "
                  "slices, per write.",
                  "", "| watchers | write rate /s | broker CPU per write (us) | "
                  "events delivered / expected | set-up (s) |", "|---|---|---|---|---|"]
            for v in self.R["W5"]:
                g = functools.partial(self.get, "W5", v, "shmwatch")
                dl = ", ".join(f"{a}/{e}" for a, e in zip(g("delivered"), g("expected")))
                L.append(f"| {v} | {cell(g('write_rate'))} | {cell(g('cpu_us_per_write'), 'us')}"
                         f" | {dl} | {cell(g('setup_s'))} |")
            for kind in ("keys", "ranges"):
                one = self.get("W5", f"{kind} 1", "shmwatch", "write_rate")
                big = max((n for n in P.w5_counts), default=1)
                many = self.get("W5", f"{kind} {big}", "shmwatch", "write_rate")
                r = ratios(many, one)
                if r:
                    L.append("")
                    L.append(f"- {kind}: write rate with {big:,} watchers / with 1: "
                             f"{ratio_cell(r)}")
            L += [""]
        if "MEM" in self.R:
            L += ["## Memory: broker RSS with stalled watchers (shmwatch)", "",
                  f"{P.mem_watchers:,} watchers on one prefix in 2 processes that never read "
                  "(each becomes a victim once its 16 KiB ring is full: it keeps one pending "
                  "response and replays from the log later), while one writer commits "
                  f"{P.mem_writes:,} puts (txns of 64, 1,000 distinct keys); broker with "
                  "`log_bytes=16<<20` so the log wraps and compacts. Beside it the same writes "
                  "with no watcher. RssAnon is the broker's private memory (heap); VmRSS adds "
                  "the shared-memory pages it touched (log, rings). Measured once per run.",
                  "", "| broker | " + " | ".join(
                      f"after {w:,} writes" for w in self.mem_points()) + " |",
                  "|---|" + "---|" * len(self.mem_points())]
            for v in self.R["MEM"]:
                row = []
                for w in self.mem_points():
                    a = summary(self.get("MEM", v, "shmwatch", f"anon@{w}"))["median"]
                    r = summary(self.get("MEM", v, "shmwatch", f"rss@{w}"))["median"]
                    row.append("-" if a is None else f"{a:.1f} / {r:.1f} MiB")
                L.append(f"| {v} (RssAnon / VmRSS) | " + " | ".join(row) + " |")
            L += [""]
        if b.errors:
            L += ["## Failed trials", ""] + [f"- {e.splitlines()[0]}" for e in b.errors] + [""]
        return "\n".join(L) + "\n"

    def mem_points(self) -> list[int]:
        pts = set()
        for v in self.R.get("MEM", {}).values():
            for k in v.get("shmwatch", {}):
                if k.startswith("anon@"):
                    pts.add(int(k[5:]))
        return sorted(pts)

    def loss_lines(self, wl, variants) -> list[str]:
        out = []
        for tn in self.order(wl):
            for v in variants:
                d = self.get(wl, v, tn, "delivered")
                if d and min(d) < 0.999:
                    out.append(f"- {LABELS[tn]} ({v}) dropped records: it delivered "
                               f"{min(d) * 100:.1f}% of them in the worst repetition.")
        return ([""] + out) if out else []

    def as_json(self) -> dict:
        wl = {}
        for w, variants in self.R.items():
            wl[w] = {v: {tn: {k: {"values": xs, **summary(xs)} for k, xs in metrics.items()}
                         for tn, metrics in ts.items()} for v, ts in variants.items()}
        return {"machine": self.m, "profile": asdict(self.b.prof),
                "skipped": self.b.runner.skipped, "errors": self.b.errors,
                "elapsed_s": self.elapsed, "targets": self.targets, "workloads": wl}


# =============================================================================== main


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/bench", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="short trials (whole run a few minutes)")
    g.add_argument("--smoke", action="store_true",
                   help="every workload tiny (seconds); writes BENCHMARKS.md only with --out")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; smoke 1)")
    p.add_argument("--only", default=None,
                   help="comma-separated workloads: " + ",".join(WORKLOADS))
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers to run (default: all installed): "
                        + ",".join(PEERS) + "; '' for none")
    p.add_argument("--out", default=None, help="markdown report (default BENCHMARKS.md, "
                   "not written by --smoke unless given)")
    p.add_argument("--json", default=None, help="also write every figure as JSON here")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="py-spy the broker, writer 0 and reader 0 of every shmwatch trial "
                        "(raw collapsed stacks + DIR/summary.md); perturbs the figures")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    prof = PROFILES["smoke" if a.smoke else "quick" if a.quick else "full"]
    if a.reps is not None:
        if a.reps < 1:
            _log("--reps must be >= 1")
            return 2
        prof = Profile(**{**asdict(prof), "reps": a.reps})
    only = WORKLOADS if not a.only else [w.strip().upper() for w in a.only.split(",")
                                          if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        _log(f"unknown workload(s) {bad}; choose from {','.join(WORKLOADS)}")
        return 2
    peers = [x.strip().lower() for x in a.peers.split(",") if x.strip()]
    badp = [x for x in peers if x not in PEERS]
    if badp:
        _log(f"unknown peer(s) {badp}; choose from {','.join(PEERS)}")
        return 2
    out = a.out if a.out is not None else (None if a.smoke else "BENCHMARKS.md")

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every process this run started is stopped.
    # (A shell running us in the background may have us ignore SIGINT: then use SIGTERM.)
    old_handlers = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _main(a, argv, prof, only, peers, out)
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)


def _main(a, argv, prof, only, peers, out) -> int:
    machine = machine_info(argv)
    _log(f"shmwatch bench ({prof.name}): {machine['cpu']}, {machine['cores']} cores, "
         f"Python {machine['python']}")
    machine["external_at_start"] = external_busy(0.5 if a.smoke else 1.0)
    if machine["external_at_start"]:
        _log("other processes busy on this machine: " + "; ".join(machine["external_at_start"]))
    meter = LoadMeter()
    t0 = time.monotonic()
    bench = Bench(prof, list(only), peers, a.profile)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        _log("interrupted: stopping every process this run started")
    finally:
        bench.runner.stop_servers()
        REG.stop_all()
    left = REG.leftovers()
    if left:
        _log(f"warning: left in /dev/shm: {left}")
        bench.errors.append(f"left in /dev/shm: {left}")
    if interrupted:
        return 130
    machine["load"] = meter.finish()
    ld = machine["load"]
    _log(f"machine during the run: {ld['busy_pct']:.0f}% busy ({ld['ours_pct']:.0f}% this run, "
         f"{ld['others_pct']:.0f}% other processes, steal {ld['steal_pct']:.1f}%)")
    rep = Report(bench, machine, time.monotonic() - t0)
    rep.compute_targets()
    if out:
        with open(out, "w") as f:
            f.write(rep.markdown())
        _log(f"wrote {out}")
    if a.profile and bench.runner.profiles:
        parts = ["# py-spy profiles of shmwatch trials", "",
                 f"Command: `{machine['command']}`", ""]
        for p in bench.runner.profiles:
            parts += [f"## {p['workload']} {p['variant']}: {p['role']}", "",
                      f"`{p['path']}`", "",
                      summarize_profile(p["path"], p.get("seconds", 1.0)), ""]
        path = os.path.join(a.profile, "summary.md")
        with open(path, "w") as f:
            f.write("\n".join(parts) + "\n")
        _log(f"wrote {path}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep.as_json(), f, indent=1, default=str)
        _log(f"wrote {a.json}")
    for t in rep.targets:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        _log(f"target: {t['target']}: {t['measured']} -> {met}")
    shm_failed = [e for e in bench.errors if "shmwatch" in e or e.startswith(("W5", "MEM"))
                  or "/dev/shm" in e]
    return 1 if shm_failed else 0


if __name__ == "__main__":
    sys.exit(main())
