"""`tools/bench` (also `shmwatch bench`): shmwatch beside its peers on the same
workloads. One job per module:

    cli           the command: its options, the run from start to exit code, outputs
    profiles      the sizes of a run: --smoke, --quick, full
    record        what a benchmark record is: key and value layout, the send-time stamp
    results       the figures of a run (what workloads record, what the report reads)
                  and their statistics: medians, min-max, per-repetition ratios
    procs         every process a run starts, its mailbox, and stopping them by pid
    machine       the host: what it is, how busy it was, CPU and memory of a process
    servers       the peers' servers: redis-server and etcd on 127.0.0.1, start/stop
    transports/   shmwatch and each peer: how a writer sends and a reader receives
    trials        one trial: writer and reader processes over a transport, measured
    pyspy         --profile: py-spy attached to a shmwatch trial, and its summary
    session       one run: every chosen workload, repetition by repetition
    workloads/    W1..W5 and MEM: which trials to run and which figures to keep
    report/       BENCHMARKS.md, one section per workload, and the --json document

Progress goes to stderr through `log`; figures go only into `results`.
"""

from __future__ import annotations

import sys


def log(msg: str) -> None:
    """A line of progress on stderr (stdout stays free for whoever runs us)."""
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks (see `cli`)."""
    from .cli import main as run

    return run(argv)
