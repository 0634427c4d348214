"""`python -m broker [--name NAME] [options]`: run a broker in the foreground.

This is also what `shmwatch serve` runs. Once clients can connect it prints one ready
line on stdout (name, pid, sizes, and what the sizes were sized from); when it cannot
start it prints one error line on stderr, `<command>: error: <reason>`, and exits 1 —
never a traceback for a reason the user can act on (name in use, bad name, bad size, no
space in /dev/shm, data directory busy or corrupt). `broker.spawn()` runs it with
`--ready-fd`, and reads that same line (`ready ...` or `error ...`) from the pipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from shm.errors import ShmPermissionError

from .errors import BrokerStartError
from .config import BrokerConfig
from .server import Broker, run
from .sizing import BUDGET_ENV, parse_size
from .wal import DataDirBusy, WalCorrupt

__all__ = ["add_broker_options", "config_from_args", "main", "parse_size", "serve"]

# Reasons a broker does not start that the user can act on: one line each.
START_ERRORS = (BrokerStartError, DataDirBusy, WalCorrupt, ShmPermissionError)

SIZE_OPTIONS = ("log_bytes", "watch_ring_bytes", "request_ring_bytes", "response_ring_bytes",
                "max_request_bytes", "shm_budget", "max_response_bytes",
                "max_client_backlog_bytes")
# BrokerConfig fields that are command-line options, as spawn() takes them.
CONFIG_OPTIONS = (*SIZE_OPTIONS, "max_clients", "rings_per_arena", "progress_notify_interval",
                  "max_watchers_per_sync", "mode", "group", "data_dir", "fsync",
                  "snapshot_every", "max_watchers_per_client", "min_lease_ttl", "max_leases",
                  "catch_up")


def add_broker_options(p: argparse.ArgumentParser) -> None:
    """The options of `python -m broker` and `shmwatch serve` (one list for both).

    Over 60 lines on purpose: one `add_argument` per option, each with its help text,
    read top to bottom like the README's option table; splitting it would only scatter
    the list."""
    d = {f.name: f.default for f in dataclasses.fields(BrokerConfig)}
    p.add_argument("--name", default=os.environ.get("SHMWATCH_NAME", "default"),
                   help="broker name, 1-64 of [A-Za-z0-9_-] (segments are /shmwatch.NAME.*; "
                        "default: $SHMWATCH_NAME or 'default', as the client commands)")
    p.add_argument("--log-bytes", metavar="SIZE",
                   help="revision-log ring size; the oldest revision it still holds is the "
                        "compaction point (default: a quarter of /dev/shm's free space, at "
                        "most 64M)")
    p.add_argument("--watch-ring-bytes", metavar="SIZE",
                   help="per-watcher ring size; a watcher whose ring is full becomes a victim "
                        "(default 256k, smaller on a small /dev/shm)")
    p.add_argument("--request-ring-bytes", metavar="SIZE",
                   help="per-client request ring (default 1M, smaller on a small /dev/shm)")
    p.add_argument("--response-ring-bytes", metavar="SIZE",
                   help="per-client response ring (default 1M, smaller on a small /dev/shm)")
    p.add_argument("--max-request-bytes", metavar="SIZE",
                   help="largest request accepted (default 1.5M, etcd's)")
    p.add_argument("--shm-budget", metavar="SIZE",
                   help="size the defaults as if /dev/shm had SIZE free (default: "
                        f"${BUDGET_ENV}, else the free space measured)")
    p.add_argument("--max-clients", type=int, default=d["max_clients"])
    p.add_argument("--rings-per-arena", type=int, default=d["rings_per_arena"])
    p.add_argument("--progress-notify-interval", type=float,
                   default=d["progress_notify_interval"],
                   help="seconds between progress notifications (etcd's default 600)")
    p.add_argument("--max-watchers-per-sync", type=int,
                   default=d["max_watchers_per_sync"])
    p.add_argument("--mode", type=lambda s: int(s, 8), default=d["mode"],
                   help="permission bits of segments and semaphores (octal, default 600)")
    p.add_argument("--group", default=None,
                   help="group (name or gid) that may attach; use with --mode 660")
    p.add_argument("--data-dir", default=None,
                   help="keep a write-ahead log and snapshots here; a restarted broker "
                        "recovers every acknowledged write (default: memory only)")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default=d["fsync"],
                   help="with --data-dir: fsync before replying (always, the default, "
                        "as etcd), every ~10-50 ms (batch), or never; all survive a "
                        "killed broker, only 'always' survives a machine crash")
    p.add_argument("--snapshot-every", type=int, default=d["snapshot_every"],
                   help="WAL records between snapshots (default 100000)")
    p.add_argument("--max-response-bytes", metavar="SIZE",
                   help="largest reply (a range) the broker sends (default 64M); a larger "
                        "one is refused with ResponseTooLargeError")
    p.add_argument("--max-client-backlog-bytes", metavar="SIZE",
                   help="watch responses the broker holds for one client whose rings are "
                        "full (default 64M); beyond it its watchers wait in the log")
    p.add_argument("--max-watchers-per-client", type=int,
                   default=d["max_watchers_per_client"],
                   help="watches one client may hold (default 1000; each is a ring of "
                        "--watch-ring-bytes in /dev/shm)")
    p.add_argument("--min-lease-ttl", type=int, default=d["min_lease_ttl"],
                   help="smallest lease TTL granted, in seconds; a smaller one is granted "
                        "as this (default 2, etcd's with its default election timeout)")
    p.add_argument("--max-leases", type=int, default=d["max_leases"],
                   help="leases that may exist at once (default 100000); a grant past it "
                        "is TooManyLeasesError")
    p.add_argument("--catch-up", choices=("client", "broker"), default="client",
                   help="who replays a watcher's history from the revision log: the "
                        "watcher itself, in its own process (client, the default), or the "
                        "broker (as before)")
    p.add_argument("--upstream", metavar="URLS", default=None,
                   help="mirror this etcd cluster (client URLs, comma-separated; needs "
                        "pip install shmwatch[etcd])")
    p.add_argument("--upstream-prefix", metavar="PREFIX", default="",
                   help="mirror only the keys under this prefix")
    p.add_argument("--upstream-timeout", type=float, default=d["upstream_timeout"],
                   help="seconds a request forwarded to etcd may take")
    p.add_argument("--consistency", choices=("l", "s"), default=d["consistency"],
                   help="reads of a mirroring broker: l (linearizable, etcd's default) "
                        "or s (serializable: the mirror as it is)")
    p.add_argument("--detach", action="store_true",
                   help="run in the background: print the ready line once clients can "
                        "connect, then return (stop the broker with kill PID)")
    p.add_argument("-v", "--verbose", action="store_true")


def config_from_args(a: argparse.Namespace) -> BrokerConfig:
    """The BrokerConfig the options ask for. Raises ValueError naming a bad option."""
    sizes = {}
    for dest in SIZE_OPTIONS:
        text = getattr(a, dest)
        if text is not None:
            try:
                sizes[dest] = parse_size(text)
            except ValueError as exc:
                raise ValueError(f"--{dest.replace('_', '-')}: {exc}") from None
    return BrokerConfig(
        name=a.name, max_clients=a.max_clients, rings_per_arena=a.rings_per_arena,
        progress_notify_interval=a.progress_notify_interval,
        max_watchers_per_sync=a.max_watchers_per_sync, mode=a.mode,
        data_dir=a.data_dir, fsync=a.fsync, snapshot_every=a.snapshot_every, group=a.group,
        max_watchers_per_client=a.max_watchers_per_client,
        min_lease_ttl=a.min_lease_ttl, max_leases=a.max_leases,
        client_catch_up=a.catch_up == "client",
        upstream=a.upstream, upstream_prefix=a.upstream_prefix,
        upstream_timeout=a.upstream_timeout, consistency=a.consistency,
        **sizes,
    )


def ready_line(b: Broker) -> str:
    """The one line a started broker prints: who it is and what it reserved."""
    cfg = b.cfg
    return (f"shmwatch: broker {cfg.name!r} ready (pid {os.getpid()}): "
            f"{cfg.sizing.describe()}")


def _die_with_parent(parent_pid: int) -> None:
    """An embedded broker stops (SIGTERM: clean unlink) when the process that spawned it
    dies, even by SIGKILL, so a killed test run leaves no broker behind."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)


def _report(ready_fd: int | None, kind: str, text: str) -> None:
    """Hand spawn() its line (`ready ...` / `error ...`) and close the pipe."""
    if ready_fd is not None:
        os.write(ready_fd, f"{kind} {text}\n".encode())
        os.close(ready_fd)


def _fail(prog: str, reason: str, ready_fd: int | None) -> int:
    if ready_fd is not None:
        _report(ready_fd, "error", reason)
    else:
        print(f"{prog}: error: {reason}", file=sys.stderr)
    return 1


def _detach(a: argparse.Namespace, prog: str) -> int:
    """Start the broker as its own background process and print its ready line."""
    from . import spawn

    opts = {dest: getattr(a, dest) for dest in CONFIG_OPTIONS if getattr(a, dest) is not None}
    try:
        b = spawn(a.name, detach=True, **opts)
    except (BrokerStartError, TimeoutError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    print(b.ready_line, flush=True)
    return 0


def serve(a: argparse.Namespace, prog: str) -> int:
    """Run the broker `a` describes until SIGINT/SIGTERM; 0 after a clean stop, 1 (and
    one line saying why) if it could not start."""
    ready_fd = getattr(a, "ready_fd", None)
    try:
        cfg = config_from_args(a)
    except ValueError as exc:
        return _fail(prog, str(exc), ready_fd)
    if a.detach:
        return _detach(a, prog)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s broker %(levelname)s %(message)s")
    if getattr(a, "parent_pid", None):
        _die_with_parent(a.parent_pid)

    def ready(b: Broker) -> None:
        if ready_fd is not None:
            _report(ready_fd, "ready", ready_line(b))
            return
        try:
            print(ready_line(b), flush=True)
        except OSError:
            pass  # nobody reads stdout (`serve | head -1` has exited): keep serving

    try:
        run(cfg, on_ready=ready)
    except START_ERRORS as exc:
        return _fail(prog, str(exc), ready_fd)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m broker`: parse the options and serve."""
    p = argparse.ArgumentParser(prog="python -m broker", description=__doc__.split("\n\n")[0])
    add_broker_options(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    return serve(p.parse_args(argv), p.prog)


if __name__ == "__main__":
    sys.exit(main())
