"""shmwatch benchmarks: the same workloads through shmwatch and its peers, in one run.

    tools/bench [--quick | --smoke] [--reps N] [--only W1,W3] [--peers queue,zmq]
                [--out BENCHMARKS.md] [--json FILE] [--profile DIR]

Every workload runs end to end in separate processes: writer process(es) -> transport
-> watcher process(es) that decode every record. For shmwatch that is clientlib `put`
(or a 64-put `txn`) -> broker -> a watcher's ring -> `Watch.get()` decoding the events.
The peers run the same writers and readers over multiprocessing.Queue, pyzmq PUB/SUB on
an ipc socket, Redis pub/sub on a loopback redis-server and etcd watch on a loopback etcd
(its v3 JSON gateway, standard library only). Peers whose software is missing are
skipped with a line that says so. The workloads (W1..W5, MEM) are described in
tools/bench/workloads/__init__.py and in BENCHMARKS.md.

Repetitions are interleaved: repetition r runs every workload through every transport
before repetition r+1 starts, so the machine's noise hits everyone alike; the report gives
medians with min-max, and shmwatch/peer ratios as the median of per-repetition ratios.

This module is the command: its options, the run from start to exit code, and where the
outputs go. How anything is measured lives in the other modules of tools/bench/ (see its __init__).
Every process the tool starts is stopped by its pid at the end (also on Ctrl-C, SIGTERM
or an error); brokers through their handles; nothing of ours is left in /dev/shm.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import replace

from . import log, report
from .machine import LoadMeter, external_busy, machine_info
from .procs import REG
from .profiles import PROFILES, Profile
from .session import Session
from .transports import PEERS
from .workloads import NAMES, WORKLOADS

USAGE_ERROR = 2
INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/bench", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="short trials (whole run a few minutes)")
    g.add_argument("--smoke", action="store_true",
                   help="every workload tiny (seconds); writes BENCHMARKS.md only with --out")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default 3; smoke 1)")
    p.add_argument("--only", default=None,
                   help="comma-separated workloads: " + ",".join(NAMES))
    p.add_argument("--peers", default=",".join(PEERS),
                   help="comma-separated peers to run (default: all installed): "
                        + ",".join(PEERS) + "; '' for none")
    p.add_argument("--out", default=None, help="markdown report (default BENCHMARKS.md, "
                   "not written by --smoke unless given)")
    p.add_argument("--json", default=None, help="also write every figure as JSON here")
    p.add_argument("--from-json", default=None, metavar="FILE",
                   help="measure nothing: rewrite the report (--out, default BENCHMARKS.md) "
                        "from a run's --json document, with this version's report code")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="py-spy the broker, writer 0 and reader 0 of every shmwatch trial "
                        "(raw collapsed stacks + DIR/summary.md); perturbs the figures")
    return p.parse_args(argv)


def _choices(a: argparse.Namespace) -> tuple[Profile, list, list[str]] | str:
    """The profile, workloads and peers the options ask for, or what is wrong with them."""
    prof = PROFILES["smoke" if a.smoke else "quick" if a.quick else "full"]
    if a.reps is not None:
        if a.reps < 1:
            return "--reps must be >= 1"
        prof = replace(prof, reps=a.reps)
    only = NAMES if not a.only else [w.strip().upper() for w in a.only.split(",") if w.strip()]
    bad = [w for w in only if w not in NAMES]
    if bad:
        return f"unknown workload(s) {bad}; choose from {','.join(NAMES)}"
    peers = [x.strip().lower() for x in a.peers.split(",") if x.strip()]
    badp = [x for x in peers if x not in PEERS]
    if badp:
        return f"unknown peer(s) {badp}; choose from {','.join(PEERS)}"
    return prof, [w for w in WORKLOADS if w.name in only], peers


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["upstream"]:  # `shmwatch bench upstream ...`: tools/bench/upstream
        from .upstream import main as upstream

        return upstream(argv[1:])
    a = parse_args(argv)
    if a.from_json:
        with open(a.from_json) as f:
            run = report.run_from_json(json.load(f))
        _write(a, run, None)
        return 0
    chosen = _choices(a)
    if isinstance(chosen, str):
        log(chosen)
        return USAGE_ERROR

    def _terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    # SIGTERM (and SIGHUP) unwind like Ctrl-C, so every process this run started is stopped.
    # (A shell running us in the background may have us ignore SIGINT: then use SIGTERM.)
    old = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(a, argv, *chosen)
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def _run(a: argparse.Namespace, argv: list[str], prof: Profile, workloads: list,
         peers: list[str]) -> int:
    machine = machine_info(argv)
    log(f"shmwatch bench ({prof.name}): {machine['cpu']}, {machine['cores']} cores, "
        f"Python {machine['python']}")
    machine["external_at_start"] = external_busy(0.5 if a.smoke else 1.0)
    if machine["external_at_start"]:
        log("other processes busy on this machine: " + "; ".join(machine["external_at_start"]))
    meter = LoadMeter()
    t0 = time.monotonic()
    session = Session(prof, workloads, peers, a.profile)
    try:
        session.run()
    except KeyboardInterrupt:
        log("interrupted: stopping every process this run started")
        return INTERRUPTED
    finally:
        session.stop()
        REG.stop_all()
        left = REG.leftovers()
        if left:
            log(f"warning: left in /dev/shm: {left}")
            session.errors.append(f"left in /dev/shm: {left}")
    machine["load"] = ld = meter.finish()
    log(f"machine during the run: {ld['busy_pct']:.0f}% busy ({ld['ours_pct']:.0f}% this run, "
        f"{ld['others_pct']:.0f}% other processes, steal {ld['steal_pct']:.1f}%)")
    run = session.as_run(machine, time.monotonic() - t0)
    _write(a, run, session)
    shm_failed = [e for e in run.errors if "shmwatch" in e or e.startswith(("W5", "MEM"))
                  or "/dev/shm" in e]
    return 1 if shm_failed else 0


def _write(a: argparse.Namespace, run, session: Session | None) -> None:
    """BENCHMARKS.md (not by --smoke unless --out), the py-spy summary, --json, and the
    targets on stderr."""
    targets = report.compute_targets(run)
    out = a.out if a.out is not None else (None if a.smoke else "BENCHMARKS.md")
    if out:
        from .upstream import section_of

        try:
            with open(out) as f:
                kept = section_of(f.read())  # written by `shmwatch bench upstream`
        except FileNotFoundError:
            kept = ""
        with open(out, "w") as f:
            f.write(report.markdown(run, targets) + ("\n" + kept if kept else ""))
        log(f"wrote {out}")
    if session is not None and session.spies and session.spies.profiles:
        log(f"wrote {session.spies.write_summary(run.machine['command'])}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report.as_json(run, targets), f, indent=1, default=str)
        log(f"wrote {a.json}")
    for t in targets:
        met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        log(f"target: {t['target']}: {t['measured']} -> {met}")


if __name__ == "__main__":
    sys.exit(main())
