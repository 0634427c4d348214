"""`shmwatch status`: etcdctl `endpoint status` for a broker, read from its control
segment and published stats (no request reaches the broker), in simple, json and
table form; besides etcd's fields it counts clients, watchers and leases (all, and
those bound to a client process), and a mirroring broker's etcd upstream."""

from __future__ import annotations

import os
import sys

from shm.errors import ShmError
from shmwatch import __version__

from .args import EXIT_BAD_ARGS, EXIT_ERROR, CliError, parse_flags, usage
from .common import GLOBAL_FLAGS, check_format
from .output import humanize_bytes, json_bytes, json_header, table_bytes


def _shm_bytes(name: str) -> int:
    """Bytes of /dev/shm that broker `name`'s segments hold (its "db size")."""
    prefix = f"shmwatch.{name}."
    total = 0
    for entry in os.listdir("/dev/shm"):
        if entry.startswith(prefix):
            try:
                total += os.stat(os.path.join("/dev/shm", entry)).st_size
            except FileNotFoundError:
                pass
    return total


STATUS_HEADER = ["name", "pid", "version", "revision", "compact revision", "log fill",
                 "clients", "watchers", "leases", "bound leases", "db size"]


def broker_status(name: str) -> dict:
    """etcdctl `endpoint status`'s Status for a broker, read from its control segment and
    published stats: no request reaches the broker."""
    from broker.admin import broker_info, read_stats

    info = broker_info(name)
    if info["state"] != "alive":
        why = "is not running" if info["state"] == "absent" else f"is {info['state']}"
        raise CliError(EXIT_ERROR, f"shmwatch: broker {name!r} {why}"
                       + (f" ({info['error']})" if "error" in info else ""))
    if "error" in info:
        raise CliError(EXIT_ERROR, f"shmwatch: broker {name!r}: {info['error']}")
    try:
        stats = read_stats(name)
    except (ShmError, TimeoutError) as exc:  # a broker still starting, or just gone
        raise CliError(EXIT_ERROR, f"shmwatch: broker {name!r} has no stats to read ({exc})") from None
    log = stats["log"]
    leases = stats.get("leases", {})
    return {"name": name, "pid": info["pid"], "version": __version__,
            "cluster_id": info["cluster_id"],
            "revision": info["revision"], "compact_revision": info["compact_revision"],
            "log_used": log["used"], "log_capacity": log["capacity"],
            "log_revisions": log["count"], "clients": info["clients"],
            "watchers": stats["watchers"]["total"], "leases": leases.get("total", 0),
            "bound_leases": leases.get("bound", 0), "db_size": _shm_bytes(name),
            "upstream": stats.get("upstream")}


def upstream_line(up: dict) -> str:
    """A mirroring broker's etcd, one line (status's simple and table output)."""
    return (f"upstream: {','.join(up['endpoints'])}, connected {up['connected'] or 'to no member'}, "
            f"mirror revision {up['mirror_revision']}, etcd revision {up['etcd_revision']}, "
            f"lag {up['lag']}, failovers {up['failovers']}\n")


def status_row(s: dict) -> list[str]:
    fill = f"{humanize_bytes(s['log_used'])} / {humanize_bytes(s['log_capacity'])}"
    return [s["name"], str(s["pid"]), s["version"], str(s["revision"]),
            str(s["compact_revision"]), fill, str(s["clients"]), str(s["watchers"]),
            str(s["leases"]), str(s["bound_leases"]), humanize_bytes(s["db_size"])]


def status_json(s: dict) -> list:
    """etcdctl's `endpoint status -w json` shape: one {"Endpoint", "Status"} per broker,
    camelCase fields, zero fields omitted."""
    fields = {"header": json_header(s["cluster_id"], s["revision"]), "version": s["version"],
              "dbSize": s["db_size"], "pid": s["pid"], "compactRevision": s["compact_revision"],
              "logUsed": s["log_used"], "logCapacity": s["log_capacity"],
              "logRevisions": s["log_revisions"], "clients": s["clients"],
              "watchers": s["watchers"], "leases": s["leases"], "boundLeases": s["bound_leases"],
              "upstream": s.get("upstream") or {}}
    return [{"Endpoint": s["name"],
             "Status": {k: v for k, v in fields.items() if v not in (0, "", {})}}]


def cmd_status(argv: list[str]) -> int:
    """`shmwatch status [--name NAME] [-w simple|json|table]`."""

    flags = [GLOBAL_FLAGS[0], GLOBAL_FLAGS[1]]
    values, args, want_help = parse_flags(flags, argv)
    if want_help:
        sys.stdout.write(usage("status", "status [--name NAME] [-w simple|json|table]",
                               "Prints a broker's status (etcdctl endpoint status)", flags))
        return 0
    if args:
        raise CliError(EXIT_BAD_ARGS, "status command takes no argument")
    check_format(values["write-out"], ("simple", "json", "table"))
    s = broker_status(values["name"] or os.environ.get("SHMWATCH_NAME") or "default")
    fmt = values["write-out"]
    if fmt == "json":
        data = json_bytes(status_json(s))
    elif fmt == "table":
        data = table_bytes(STATUS_HEADER, [status_row(s)])
    else:
        data = (", ".join(status_row(s)) + "\n").encode()
    if s.get("upstream") and fmt != "json":
        data += upstream_line(s["upstream"]).encode()
    sys.stdout.buffer.write(data)
    return 0
