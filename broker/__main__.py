"""`python -m broker --name NAME [options]`: run a broker in the foreground."""

from __future__ import annotations

import argparse
import logging
import sys

from .server import BrokerConfig, BrokerRunning, run
from .wal import DataDirBusy, WalCorrupt


def parse_size(text: str) -> int:
    """'64M', '256k', '1G' or plain bytes."""
    t = text.strip().lower().rstrip("b").rstrip("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def add_broker_options(p: argparse.ArgumentParser) -> None:
    d = BrokerConfig(name="x")
    p.add_argument("--name", required=True, help="broker name (segments are /shmwatch.NAME.*)")
    p.add_argument("--log-bytes", type=parse_size, default=d.log_bytes,
                   help="revision-log ring size (default 64M); the oldest revision it "
                        "still holds is the compaction point")
    p.add_argument("--watch-ring-bytes", type=parse_size, default=d.watch_ring_bytes,
                   help="per-watcher ring size (default 256k); a watcher whose ring is "
                        "full becomes a victim")
    p.add_argument("--request-ring-bytes", type=parse_size, default=d.request_ring_bytes)
    p.add_argument("--response-ring-bytes", type=parse_size, default=d.response_ring_bytes)
    p.add_argument("--max-request-bytes", type=parse_size, default=d.max_request_bytes,
                   help="largest request accepted (etcd's default 1.5 MiB)")
    p.add_argument("--max-clients", type=int, default=d.max_clients)
    p.add_argument("--rings-per-arena", type=int, default=d.rings_per_arena)
    p.add_argument("--progress-notify-interval", type=float,
                   default=d.progress_notify_interval,
                   help="seconds between progress notifications (etcd's default 600)")
    p.add_argument("--max-watchers-per-sync", type=int, default=d.max_watchers_per_sync)
    p.add_argument("--mode", type=lambda s: int(s, 8), default=d.mode,
                   help="permission bits of segments and semaphores (octal, default 600)")
    p.add_argument("--group", default=None,
                   help="group (name or gid) that may attach; use with --mode 660")
    p.add_argument("--data-dir", default=None,
                   help="keep a write-ahead log and snapshots here; a restarted broker "
                        "recovers every acknowledged write (default: memory only)")
    p.add_argument("--fsync", choices=("always", "batch", "never"), default=d.fsync,
                   help="with --data-dir: fsync before replying (always, the default, "
                        "as etcd), every ~10-50 ms (batch), or never; all survive a "
                        "killed broker, only 'always' survives a machine crash")
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="WAL records between snapshots (default 100000)")


def config_from_args(a: argparse.Namespace) -> BrokerConfig:
    return BrokerConfig(
        name=a.name, log_bytes=a.log_bytes, watch_ring_bytes=a.watch_ring_bytes,
        request_ring_bytes=a.request_ring_bytes, response_ring_bytes=a.response_ring_bytes,
        max_request_bytes=a.max_request_bytes, max_clients=a.max_clients,
        rings_per_arena=a.rings_per_arena,
        progress_notify_interval=a.progress_notify_interval,
        max_watchers_per_sync=a.max_watchers_per_sync, mode=a.mode,
        data_dir=a.data_dir, fsync=a.fsync, snapshot_every=a.snapshot_every, group=a.group,
    )


def _die_with_parent(parent_pid: int) -> None:
    """An embedded broker stops (SIGTERM: clean unlink) when the process that spawned it
    dies, even by SIGKILL, so a killed test run leaves no broker behind."""
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        sys.exit(0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m broker", description=__doc__)
    add_broker_options(p)
    p.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING,
                        format="%(asctime)s broker %(levelname)s %(message)s")
    if a.parent_pid:
        _die_with_parent(a.parent_pid)
    return serve(config_from_args(a), ready_fd=a.ready_fd)


def serve(cfg: BrokerConfig, ready_fd: int | None = None) -> int:
    """Run a broker until it is stopped: exit status 0; or 1 after one line
    `broker: <error>` on stderr when it cannot start (its name is taken, its data
    directory is held by another broker, damaged or of an unknown format)."""
    try:
        run(cfg, ready_fd=ready_fd)
    except (BrokerRunning, DataDirBusy, WalCorrupt) as exc:
        print(f"broker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
