"""`shmwatch lease ...`: etcdctl 3.4's lease commands against a broker.

`lease grant TTL`, `lease revoke ID`, `lease timetolive ID [--keys]`, `lease list` and
`lease keep-alive [--once] ID`, with etcdctl's argument checks, output (simple and
`-w json`), `Error:` lines and exit codes; lease ids are hexadecimal on the command
line and in simple output, decimal in JSON, as etcdctl prints them.
tests/test_cli_lease.py runs the same command lines through a real etcdctl.

`keep-alive` without `--once` renews the lease as clientv3's KeepAlive does (at a third
of its TTL, on a 500 ms tick), printing each renewal, until the lease is gone (then, in
simple output, `lease ID expired or revoked.` and exit 0) or Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from shmwatch.wire import errors

from .args import (
    EXIT_BAD_ARGS,
    EXIT_BAD_CONNECTION,
    EXIT_ERROR,
    CliError,
    Flag,
    go_parse_int,
    parse_flags,
    usage,
)
from .common import GLOBAL_FLAGS, broker_name, check_format, cluster_id
from .output import _b64, json_bytes, json_header
from clientlib import connect

KEEPALIVE_TICK_S = 0.5  # clientv3's keep-alive loop looks every 500 ms


def lease_id_arg(arg: str) -> int:
    """etcdctl's leaseFromArgs: a hexadecimal int64."""
    try:
        return go_parse_int(arg, 16)
    except ValueError as exc:
        raise CliError(EXIT_BAD_ARGS, f"bad lease ID arg ({exc}), expecting ID in Hex") from None


def _one_id(args: list[str], need: str) -> int:
    if len(args) != 1:
        raise CliError(EXIT_BAD_ARGS, need)
    return lease_id_arg(args[0])


# ------------------------------------------------------------------ output


def _flat(cluster_id: int, revision: int, **fields) -> bytes:
    """clientv3's lease responses embed the header: its fields come first, flat."""
    return json_bytes({**json_header(cluster_id, revision), **fields})


def out_grant(r, fmt: str, cluster_id: int) -> bytes:
    if fmt == "json":
        return _flat(cluster_id, r.revision, ID=r.id, TTL=r.ttl, Error="")
    return b"lease %016x granted with TTL(%ds)\n" % (r.id, r.ttl)


def out_revoke(lease_id: int, r, fmt: str, cluster_id: int) -> bytes:
    if fmt == "json":  # etcd's own LeaseRevokeResponse: a nested header
        return json_bytes({"header": json_header(cluster_id, r.revision)})
    return b"lease %016x revoked\n" % lease_id


def out_keep_alive(r, fmt: str, cluster_id: int) -> bytes:
    if fmt == "json":
        return _flat(cluster_id, r.revision, ID=r.id, TTL=r.ttl)
    return b"lease %016x keepalived with TTL(%d)\n" % (r.id, r.ttl)


def out_time_to_live(r, keys: bool, fmt: str, cluster_id: int) -> bytes:
    if fmt == "json":
        return _flat(cluster_id, r.revision, id=r.id, ttl=r.ttl, **{"granted-ttl": r.granted_ttl},
                     keys=[_b64(k) for k in r.keys] if r.keys else None)
    if r.granted_ttl == 0 and r.ttl == -1:
        return b"lease %016x already expired\n" % r.id
    line = b"lease %016x granted with TTL(%ds), remaining(%ds)" % (r.id, r.granted_ttl, r.ttl)
    if keys:
        line += b", attached keys([" + b" ".join(r.keys) + b"])"
    return line + b"\n"


def out_leases(r, fmt: str, cluster_id: int) -> bytes:
    if fmt == "json":
        return _flat(cluster_id, r.revision, leases=[{"id": i} for i in r.leases])
    return b"found %d leases\n" % len(r.leases) + b"".join(b"%016x\n" % i for i in r.leases)


# ------------------------------------------------------------------ subcommands


class LeaseRun:
    """One lease subcommand being run: its client, output format and arguments."""

    def __init__(self, client, values: dict, args: list[str], cluster_id: int):
        self.c = client
        self.values = values
        self.args = args
        self.fmt: str = values["write-out"]
        self.cluster_id = cluster_id
        self.timeout: float = values["timeout"]

    def write(self, data: bytes) -> None:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def _prepare_grant(args: list[str]) -> int:
    if len(args) != 1:
        raise CliError(EXIT_BAD_ARGS, "lease grant command needs TTL argument")
    try:
        return go_parse_int(args[0], 10)
    except ValueError as exc:
        raise CliError(EXIT_BAD_ARGS, f"bad TTL ({exc})") from None


def run_grant(run: LeaseRun, ttl: int) -> None:
    try:
        r = run.c.lease_grant(max(ttl, 0), timeout=run.timeout)  # etcd grants <= 0 as the minimum
    except errors.ShmwatchError as exc:
        raise CliError(EXIT_ERROR, f"failed to grant lease ({exc})") from None
    run.write(out_grant(r, run.fmt, run.cluster_id))


def run_revoke(run: LeaseRun, lease_id: int) -> None:
    try:
        r = run.c.lease_revoke(lease_id, timeout=run.timeout)
    except errors.ShmwatchError as exc:
        raise CliError(EXIT_ERROR, f"failed to revoke lease ({exc})") from None
    run.write(out_revoke(lease_id, r, run.fmt, run.cluster_id))


def run_time_to_live(run: LeaseRun, lease_id: int) -> None:
    keys = run.values["keys"]
    try:
        r = run.c.lease_time_to_live(lease_id, keys=keys, timeout=run.timeout)
    except errors.ShmwatchError as exc:
        raise CliError(EXIT_BAD_CONNECTION, str(exc)) from None
    run.write(out_time_to_live(r, keys, run.fmt, run.cluster_id))


def run_list(run: LeaseRun, _request: None) -> None:
    try:
        r = run.c.leases(timeout=run.timeout)
    except errors.ShmwatchError as exc:
        raise CliError(EXIT_BAD_CONNECTION, str(exc)) from None
    run.write(out_leases(r, run.fmt, run.cluster_id))


def next_keep_alive_s(ttl: int) -> float:
    """clientv3 sends the next keep-alive a third of the TTL after an answer, on its
    500 ms tick."""
    return max(KEEPALIVE_TICK_S, math.ceil(ttl / 3.0 / KEEPALIVE_TICK_S) * KEEPALIVE_TICK_S)


def keep_alive_forever(c, lease_id: int, timeout: float, emit: Callable[[object], None]) -> None:
    """Renew `lease_id` until it is gone (the broker answers TTL 0) or, the broker not
    answering, until its last known deadline passes; `emit` gets every renewal."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = c.lease_keep_alive_once(lease_id, timeout=max(0.1, min(timeout, deadline - time.monotonic())))
        except (errors.Timeout, errors.BrokerUnavailable):
            if time.monotonic() >= deadline:
                return
            time.sleep(KEEPALIVE_TICK_S)
            _try_reconnect(c)
            continue
        if r.ttl <= 0:
            return
        emit(r)
        deadline = time.monotonic() + r.ttl
        time.sleep(next_keep_alive_s(r.ttl))


def _try_reconnect(c) -> None:
    try:
        c.reconnect()
    except errors.ShmwatchError:
        pass  # not back yet: the next round tries again


def run_keep_alive(run: LeaseRun, lease_id: int) -> None:
    if run.values["once"]:
        try:
            r = run.c.lease_keep_alive_once(lease_id, timeout=run.timeout)
        except errors.ShmwatchError as exc:
            raise CliError(EXIT_BAD_CONNECTION, str(exc)) from None
        if r.ttl <= 0:  # clientv3's KeepAliveOnce turns TTL 0 into ErrLeaseNotFound
            raise CliError(EXIT_BAD_CONNECTION, errors.LeaseNotFoundError.default_message)
        run.write(out_keep_alive(r, run.fmt, run.cluster_id))
        return
    keep_alive_forever(run.c, lease_id, run.timeout,
                       lambda r: run.write(out_keep_alive(r, run.fmt, run.cluster_id)))
    if run.fmt == "simple":
        run.write(b"lease %016x expired or revoked.\n" % lease_id)


def _no_args(args: list[str]) -> None:
    return None  # etcdctl's `lease list` ignores extra arguments


@dataclass(frozen=True)
class LeaseCommand:
    synopsis: str
    summary: str
    flags: list[Flag]
    prepare: Callable[[list[str]], object]  # arguments -> request (etcdctl's checks)
    run: Callable[[LeaseRun, object], None]


LEASE_COMMANDS: dict[str, LeaseCommand] = {
    "grant": LeaseCommand("lease grant <ttl>", "Creates leases", [], _prepare_grant, run_grant),
    "revoke": LeaseCommand("lease revoke <leaseID>", "Revokes leases", [],
                           lambda a: _one_id(a, "lease revoke command needs 1 argument"), run_revoke),
    "timetolive": LeaseCommand(
        "lease timetolive <leaseID> [options]", "Get lease information",
        [Flag("keys", bool, False, "Get keys attached to this lease")],
        lambda a: _one_id(a, "lease timetolive command needs lease ID as argument"), run_time_to_live),
    "list": LeaseCommand("lease list", "List all active leases", [], _no_args, run_list),
    "keep-alive": LeaseCommand(
        "lease keep-alive [options] <leaseID>", "Keeps leases alive (renew)",
        [Flag("once", bool, False, "Resets the keep-alive time to its original value and exits immediately")],
        lambda a: _one_id(a, "lease keep-alive command needs lease ID as argument"), run_keep_alive),
}


def lease_usage() -> str:
    lines = ["lease - Lease related commands", "", "USAGE:", "  shmwatch lease <subcommand> [flags]",
             "", "COMMANDS:"]
    lines += [f"  {name:12} {cmd.summary}" for name, cmd in LEASE_COMMANDS.items()]
    return "\n".join(lines) + "\n"


def run_lease_command(argv: list[str]) -> int:
    """`shmwatch lease SUBCOMMAND ...`: parse, check, connect, request, print, in
    etcdctl's order of checks (a format a command cannot print is refused first)."""

    if not argv or argv[0] not in LEASE_COMMANDS:  # cobra prints the group's help, exit 0
        sys.stdout.write(lease_usage())
        return 0
    cmd = LEASE_COMMANDS[argv[0]]
    flags = GLOBAL_FLAGS + cmd.flags
    text = usage(f"lease {argv[0]}", cmd.synopsis, cmd.summary, flags)
    try:
        values, args, want_help = parse_flags(flags, argv[1:])
    except CliError:
        sys.stdout.write(text)
        raise
    if want_help:
        sys.stdout.write(text)
        return 0
    request = cmd.prepare(args)
    check_format(values["write-out"], ("simple", "json"))
    with connect(broker_name(values), timeout=values["timeout"]) as c:
        cmd.run(LeaseRun(c, values, args, cluster_id(c)), request)
    return 0
