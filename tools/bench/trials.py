"""One trial: writer and reader processes over one transport, measured end to end.

Owns the Trial description, the child processes' loops (a writer sends for `duration`
seconds, synchronously, in batches, pipelined, asynchronously, or paced at a rate with its intended send
times; a reader receives until it has every record sent or nothing came for `idle_s`),
their start order (readers subscribed before any writer starts), the go / resume /
target signals between them, and the CPU accounting of a finished trial. Never decides
which trials a workload runs nor what its figures mean.
"""

from __future__ import annotations

import contextlib
import time
from array import array
from dataclasses import dataclass, field

from .machine import cpu_seconds
from .procs import CTX, REG, Mailbox, Tell, TrialError
from .pyspy import Spies
from .record import BATCH, KEYS_PER_WRITER, PAD, SENT_AT, STAMP, STAMP_AT, clock_ns, make_keys
from .results import pctl
from .transports import CLASSES, Transport

SLEEP_SLACK_NS = 80_000  # time.sleep overshoots ~60-90 us: sleep short, spin the rest
STALL_NS = 5_000_000  # a paced writer this late is stalled (one stall delays many records)
RECV_POLL_S = 0.05  # a reader's wait per recv(): how soon it notices the target was set
GO_WAIT_S = 120.0  # children wait this long for the parent's go
READY_WAIT_S = 60.0  # the parent waits this long for children to subscribe / connect
DRAIN_WAIT_S = 120.0  # after the writers: time for records still in flight
FAST_WAIT_S = 180.0  # the fast readers' results, once the writers are done
STALLED_WAIT_S = 300.0  # a stalled reader's whole backlog, once resumed


@dataclass
class Trial:
    workload: str
    variant: str
    transport: str
    prefix: bytes  # every key of the trial starts with it (readers watch it)
    idle_s: float  # a reader ends after this long without a record once the target is known
    writers: int = 1
    readers: int = 1
    write: str = "sync"  # "sync" | "batched" (send_batch) | "pipelined" (send_many) | "async"
    duration: float = 1.0
    pace: float = 0.0  # records/s per writer (W3); 0 = as fast as it goes
    stalled: int = 0  # the last `stalled` readers read nothing until the writers are done
    broker_opts: dict = field(default_factory=dict)
    broker_stats: bool = False  # read the server's counters after the trial (W4)


class Sync:
    """The signals the processes of one trial share."""

    def __init__(self):
        self.go = CTX.Event()
        self.resume = CTX.Event()
        self.target = CTX.RawValue("q", 0)  # records each reader should get; 0 = not yet

    def release(self) -> None:
        """Let every child run to its end (on success, failure or Ctrl-C alike)."""
        self.go.set()
        self.resume.set()
        self.target.value = max(self.target.value, 1)


# ------------------------------------------------------------------------ child side


def _child(tell: Tell, tname: str, env: dict, trial: Trial, sync: Sync) -> None:
    cls = CLASSES[tname]
    obj = (cls.writer if tell.role == "writer" else cls.reader)(env, trial, tell.idx)
    try:
        tell("ready")
        if tell.role == "writer":
            tell("result", _write(obj, trial, tell.idx, sync))
        else:
            tell("result", _read(obj, trial, tell.idx, sync))
    finally:
        with contextlib.suppress(Exception):  # the result is told: a failing close measures nothing
            obj.close()


def _send_each(send, keys: list[bytes], end_at: int) -> int:
    pack, pad, now, kmask = STAMP.pack, PAD, clock_ns, KEYS_PER_WRITER - 1
    seq = 0
    while True:
        t = now()
        if t >= end_at:
            return seq
        send(keys[seq & kmask], pack(seq, t) + pad, seq)
        seq += 1


def _send_batches(send_b, keys: list[bytes], end_at: int) -> int:
    pack, pad, now, kmask = STAMP.pack, PAD, clock_ns, KEYS_PER_WRITER - 1
    seq = 0
    while True:
        t = now()
        if t >= end_at:
            return seq
        send_b([(keys[(seq + j) & kmask], pack(seq + j, t) + pad, seq + j)
                for j in range(BATCH)])
        seq += BATCH


def _send_paced(w, keys: list[bytes], start: int, end_at: int, rate: float):
    """Record i is due at start + i/rate and stamped with that time, sent then (or at once
    when late): lateness counts against the records, no coordinated omission."""
    send, pack, pad, now, kmask = w.send, STAMP.pack, PAD, clock_ns, KEYS_PER_WRITER - 1
    interval = int(1e9 / rate)
    late = array("q")
    sleep = time.sleep
    seq = 0
    t_next = start
    while t_next < end_at:
        rem = t_next - now()
        if rem > SLEEP_SLACK_NS:
            sleep((rem - SLEEP_SLACK_NS) / 1e9)
        while now() < t_next:
            pass
        late.append(now() - t_next)
        send(keys[seq & kmask], pack(seq, t_next) + pad, seq)
        seq += 1
        t_next = start + seq * interval
    return seq, late


def lateness(late) -> dict:
    """How late a paced writer sent (us), and its stall episodes: runs of records sent more
    than STALL_NS late (one stall delays every record due during it)."""
    ls = sorted(late)
    return {"late_p50_us": pctl(ls, 50) / 1000, "late_p99_us": pctl(ls, 99) / 1000,
            "late_max_us": (ls[-1] if ls else 0) / 1000,
            "stalls": sum(1 for i, x in enumerate(late)
                          if x > STALL_NS and (i == 0 or late[i - 1] <= STALL_NS))}


def _write(w, trial: Trial, idx: int, sync: Sync) -> dict:
    if not sync.go.wait(GO_WAIT_S):
        raise TimeoutError("no go signal")
    keys = make_keys(trial.prefix, idx)
    cpu0 = time.process_time()
    start = clock_ns()
    end_at = start + int(trial.duration * 1e9)
    extra: dict = {}
    if trial.pace:
        seq, late = _send_paced(w, keys, start, end_at, trial.pace)
        extra = lateness(late)
    elif trial.write == "sync":
        seq = _send_each(w.send, keys, end_at)
    elif trial.write == "async":
        seq = _send_each(w.send_async, keys, end_at)
        extra = {"acked": w.flush()}  # the writer is done once every reply came
    else:
        seq = _send_batches(w.send_many if trial.write == "pipelined" else w.send_batch,
                            keys, end_at)
    return {"sent": seq, "start": start, "end": clock_ns(),
            "cpu_s": time.process_time() - cpu0, **extra}


def _read(r, trial: Trial, idx: int, sync: Sync) -> dict:
    stalled = idx >= trial.readers - trial.stalled
    if not sync.go.wait(GO_WAIT_S):
        raise TimeoutError("no go signal")
    if stalled:
        while not sync.resume.wait(0.2):  # read nothing while the writers write
            pass
    now = clock_ns
    cpu0 = time.process_time()
    began = now()
    hard = began + int((trial.duration + DRAIN_WAIT_S) * 1e9)
    idle_ns = int(trial.idle_s * 1e9)
    target = sync.target
    lat = array("q") if trial.pace else None
    unpack, at = STAMP_AT.unpack_from, SENT_AT  # locals: this loop runs per record
    recv = r.recv
    count = first = last = 0
    while True:
        vals = recv(RECV_POLL_S)
        t = now()
        if vals:
            count += len(vals)
            last = t
            if not first:
                first = t
            if lat is not None:
                for v in vals:
                    lat.append(t - unpack(v, at)[0])
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


# ----------------------------------------------------------------------- parent side


def cpu_figures(res: dict) -> dict[str, float]:
    """Where the CPU of a trial went: cores used by the writers, the readers and the
    server in between, and CPU microseconds (all processes) per delivered record."""
    wcpu = sum(w["cpu_s"] for w in res["writers"])
    rcpu = sum(r["cpu_s"] for r in res["readers"])
    scpu = res.get("server_cpu_s", 0.0)
    got = sum(r["count"] for r in res["readers"])
    span = max((r["last"] or r["began"]) for r in res["readers"]) - res["start"]
    span_s = max(span / 1e9, res["write_s"], 1e-9)
    out = {"cpu_writers": wcpu / res["write_s"], "cpu_readers": rcpu / span_s}
    if "server_cpu_s" in res:
        out["cpu_server"] = scpu / max(res["server_span_s"], 1e-9)
    if got:
        out["cpu_us_per_record"] = (wcpu + rcpu + scpu) / got * 1e6
    return out


class Runner:
    """Runs trials over the run's started transports, each in fresh processes."""

    def __init__(self, transports: dict[str, Transport], spies: Spies | None = None):
        self.transports = transports
        self.spies = spies

    def run(self, trial: Trial) -> dict:
        """The trial's figures: what each writer and reader reported, the send span and
        the server's CPU. Raises TrialError; stops every child it started either way."""
        t = self.transports[trial.transport]
        try:
            env = t.prepare(trial)
        except Exception as exc:  # a broker that would not start, a peer refusing: this
            raise TrialError(f"{trial.transport}: could not set up the trial: {exc!r}") from exc
        sync = Sync()
        box = Mailbox(trial.transport)
        t0 = time.monotonic()
        try:
            for role, n in (("reader", trial.readers), ("writer", trial.writers)):
                for i in range(n):
                    REG.spawn(box, role, i, _child, trial.transport, env, trial, sync)
                box.expect("ready", role, n, READY_WAIT_S)
            out = self._measure(trial, t, env, sync, box)
            out["wall_s"] = time.monotonic() - t0
            if trial.broker_stats:
                out["stats"] = t.stats(env)
            return out
        finally:
            sync.release()
            REG.stop_children(box.procs, grace=10)
            box.close()
            t.cleanup(env)

    def _measure(self, trial: Trial, t: Transport, env: dict, sync: Sync,
                 box: Mailbox) -> dict:
        pid = t.server_pid(env)
        spied = self.spies.start(trial, env, box.procs) if self.spies else []
        cpu0 = cpu_seconds(pid) if pid else None
        t_go = clock_ns()
        sync.go.set()
        try:
            wres = box.expect("result", "writer", trial.writers, trial.duration + DRAIN_WAIT_S)
        finally:
            if self.spies:
                self.spies.stop(spied)
        sent = sum(w["sent"] for w in wres)
        sync.target.value = max(sent, 1)
        fast_n = trial.readers - trial.stalled
        rres = box.expect("result", "reader", fast_n, FAST_WAIT_S) if fast_n else []
        cpu1 = cpu_seconds(pid) if pid else None
        t_done = clock_ns()
        sync.resume.set()
        if trial.stalled:
            rres += box.expect("result", "reader", trial.stalled, STALLED_WAIT_S)
        start = min(w["start"] for w in wres)
        out = {"sent": sent, "writers": wres, "readers": rres, "start": start,
               "write_s": (max(w["end"] for w in wres) - start) / 1e9}
        if cpu0 is not None:
            out["server_cpu_s"] = cpu1 - cpu0  # from go until the fast readers finished
            out["server_span_s"] = (t_done - t_go) / 1e9
        return out
