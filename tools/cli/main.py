"""The `shmwatch` command: etcdctl 3.4's verbs against a shmwatch broker, plus the
broker's own tools (`serve`, `status`, `ls`, `cleanup`, `top`, `stress`, `bench`).

The client commands (`put`, `get`, `del`, `txn`, `compaction`/`compact`, `watch`, and
`lease ...` in lease.py) take etcdctl's flags, print etcdctl's output byte for byte
(simple, `-w json`, `--hex`), and exit with etcdctl's codes and `Error:` lines;
tests/test_cli_etcdctl.py and tests/test_cli_lease.py run the same command lines through
a real etcdctl and compare. Where shmwatch adds something etcdctl
lacks (`get -w table`, `status`), it follows etcdctl's style.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from shmwatch import __version__
from shmwatch.wire import errors
from shmwatch.wire.ops import DeleteOp, PutOp, RangeOp, op_delete, op_put, resolve_range

from .args import (
    EXIT_BAD_ARGS,
    EXIT_BAD_FEATURE,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CliError,
    Flag,
    go_parse_int,
    parse_flags,
    usage,
)
from .output import (
    JSON_WATCH_REFUSED,
    json_bytes,
    json_del,
    json_get,
    json_put,
    json_txn,
    json_watch,
    simple_del,
    simple_get,
    simple_put,
    simple_txn,
    simple_watch,
    table_get,
)
from .common import GLOBAL_FLAGS, broker_name, check_format, cluster_id
from .recipes import RECIPES
from .txn import read_txn
from clientlib import connect

# ------------------------------------------------------------------ requests from arguments


def arg_bytes(s: str) -> bytes:
    """A command-line word back as the bytes that were typed (Python decoded argv with
    surrogateescape): keys and values are bytes, never re-encoded."""
    return s.encode("utf-8", "surrogateescape")


# etcdctl's --sort-by words -> etcd's RangeRequest sort targets
SORT_TARGETS = {"CREATE": "CREATE", "KEY": "KEY", "MODIFY": "MOD", "VALUE": "VALUE",
                "VERSION": "VERSION"}


def build_put(values: dict, args: list[str], read_stdin: Callable[[], bytes]) -> PutOp:
    """etcdctl's getPutOp: `put KEY VALUE`, or `put KEY` with the value on stdin."""
    need = "put command needs 1 argument and input from stdin or 2 arguments"
    if not args:
        raise CliError(EXIT_BAD_ARGS, need)
    if values["ignore-value"] and len(args) > 1:
        raise CliError(EXIT_BAD_ARGS, "put command needs only 1 argument when 'ignore-value' is set")
    value = b""
    if not values["ignore-value"]:
        value = arg_bytes(args[1]) if len(args) > 1 else read_stdin()
        if len(args) < 2 and not value:
            raise CliError(EXIT_BAD_ARGS, need)
    try:
        lease = go_parse_int(values["lease"], 16)
    except ValueError as exc:
        raise CliError(EXIT_BAD_ARGS, f"bad lease ID ({exc}), expecting ID in Hex") from None
    return op_put(arg_bytes(args[0]), value, values["prev-kv"], values["ignore-value"], lease,
                  values["ignore-lease"])


def _range(args: list[str], prefix: bool, from_key: bool) -> tuple[bytes, bytes | None]:
    """etcdctl's key and range end from `KEY [RANGE_END]`: an empty key with --prefix
    or --from-key means every key (it becomes "\\0"); an empty range end, one key."""
    k = arg_bytes(args[0])
    if prefix:
        return resolve_range(k, None, True)
    if from_key:
        return (k or b"\0"), b"\0"
    return k, (arg_bytes(args[1]) or None) if len(args) > 1 else None


def build_get(values: dict, args: list[str]) -> RangeOp:
    """etcdctl's getGetOp, checks in its order."""
    if not args:
        raise CliError(EXIT_BAD_ARGS,
                       "get command needs one argument as key and an optional argument as range_end")
    if values["prefix"] and values["from-key"]:
        raise CliError(EXIT_BAD_ARGS,
                       "`--prefix` and `--from-key` cannot be set at the same time, choose one")
    if values["consistency"] not in ("l", "s"):  # one broker: every read is linearizable
        raise CliError(EXIT_BAD_FEATURE, f'unknown consistency flag "{values["consistency"]}"')
    if len(args) > 1 and (values["prefix"] or values["from-key"]):
        raise CliError(EXIT_BAD_ARGS, "too many arguments, only accept one argument when "
                       "`--prefix` or `--from-key` is set")
    order = values["order"].upper()
    if order not in ("", "ASCEND", "DESCEND"):
        raise CliError(EXIT_BAD_FEATURE, f"bad sort order {values['order']}")
    target = values["sort-by"].upper() or "KEY"
    if target not in SORT_TARGETS:
        raise CliError(EXIT_BAD_FEATURE, f"bad sort target {values['sort-by']}")
    key, end = _range(args, values["prefix"], values["from-key"])
    # clientv3 drops ASCEND on KEY (the natural order); the broker, as etcd, sorts any
    # other target ascending when no order is given.
    sort_order = order if order and not (target == "KEY" and order == "ASCEND") else "NONE"
    return RangeOp(key, end, max(0, values["rev"]), max(0, values["limit"]),
                   values["keys-only"], values.get("count-only", False), sort_order,
                   SORT_TARGETS[target])


def build_del(values: dict, args: list[str]) -> DeleteOp:
    """etcdctl's getDelOp."""
    if not args or len(args) > 2:
        raise CliError(EXIT_BAD_ARGS,
                       "del command needs one argument as key and an optional argument as range_end")
    if values["prefix"] and values["from-key"]:
        raise CliError(EXIT_BAD_ARGS,
                       "`--prefix` and `--from-key` cannot be set at the same time, choose one")
    if len(args) > 1 and (values["prefix"] or values["from-key"]):
        raise CliError(EXIT_BAD_ARGS, "too many arguments, only accept one argument when "
                       "`--prefix` or `--from-key` is set")
    key, end = _range(args, values["prefix"], values["from-key"])
    return op_delete(key, end, prev_kv=values["prev-kv"])


# ------------------------------------------------------------------ flags

PUT_FLAGS = [
    Flag("prev-kv", bool, False, "return the previous key-value pair before modification"),
    Flag("ignore-value", bool, False, "updates the key using its current value"),
    Flag("lease", str, "0", "lease ID (in hexadecimal) to attach to the key"),
    Flag("ignore-lease", bool, False, "updates the key using its current lease"),
]
GET_FLAGS = [
    Flag("consistency", str, "l", "Linearizable(l) or Serializable(s): both read the one broker"),
    Flag("order", str, "", "Order of results; ASCEND or DESCEND (ASCEND by default)"),
    Flag("sort-by", str, "", "Sort target; CREATE, KEY, MODIFY, VALUE, or VERSION"),
    Flag("limit", int, 0, "Maximum number of results"),
    Flag("prefix", bool, False, "Get keys with matching prefix"),
    Flag("from-key", bool, False, "Get keys that are greater than or equal to the given key"),
    Flag("rev", int, 0, "Specify the kv revision"),
    Flag("keys-only", bool, False, "Get only the keys"),
    Flag("print-value-only", bool, False, 'Only write values when using the "simple" output format'),
]
DEL_FLAGS = [
    Flag("prefix", bool, False, "delete keys with matching prefix"),
    Flag("prev-kv", bool, False, "return deleted key-value pairs"),
    Flag("from-key", bool, False, "delete keys that are greater than or equal to the given key"),
]
WATCH_FLAGS = [
    Flag("prefix", bool, False, "Watch on a prefix if prefix is set"),
    Flag("rev", int, 0, "Revision to start watching"),
    Flag("prev-kv", bool, False, "get the previous key-value pair before the event happens"),
    Flag("from-key", bool, False, "Watch every key >= key (shmwatch only)"),
    Flag("progress-notify", bool, False, "ask for progress notifications (shmwatch only)"),
]
TXN_COMMANDS = {
    "put": (PUT_FLAGS, lambda values, args: build_put(values, args, lambda: b"")),
    "get": (GET_FLAGS, build_get),
    "del": (DEL_FLAGS, build_del),
}


# ------------------------------------------------------------------ client commands


class Invocation:
    """One client command being run: its flags, arguments and output."""

    def __init__(self, values: dict, args: list[str]):
        self.values = values
        self.args = args
        self.fmt: str = values["write-out"]
        self.hex: bool = values["hex"]
        self.out = sys.stdout.buffer
        self.cluster_id = 0

    def write(self, data: bytes) -> None:
        self.out.write(data)
        self.out.flush()



def run_put(c, inv: Invocation, op: PutOp) -> None:
    r = c.put(op.key, op.value, prev_kv=op.prev_kv, ignore_value=op.ignore_value, lease=op.lease,
              ignore_lease=op.ignore_lease)
    inv.write(json_put(r, inv.cluster_id) if inv.fmt == "json" else simple_put(r, inv.hex))


def run_get(c, inv: Invocation, op: RangeOp) -> None:
    r = c.get(op.key, op.range_end, revision=op.revision, limit=op.limit,
              keys_only=op.keys_only, count_only=op.count_only, sort_order=op.sort_order,
              sort_target=op.sort_target)
    if inv.fmt == "json":
        inv.write(json_get(r, inv.cluster_id))
    elif inv.fmt == "table":
        inv.write(table_get(r, inv.hex))
    else:
        inv.write(simple_get(r, inv.hex, inv.values["print-value-only"]))


def run_del(c, inv: Invocation, op: DeleteOp) -> None:
    r = c.delete(op.key, op.range_end, prev_kv=op.prev_kv)
    inv.write(json_del(r, inv.cluster_id) if inv.fmt == "json" else simple_del(r, inv.hex))


def run_txn(c, inv: Invocation, txn) -> None:
    r = c.txn(txn.compares, txn.success, txn.failure)
    inv.write(json_txn(r, inv.cluster_id) if inv.fmt == "json" else simple_txn(r, inv.hex))


def run_compaction(c, inv: Invocation, revision: int) -> None:
    c.compact(revision)  # applied before the reply: --physical changes nothing here
    inv.write(b"compacted revision %d\n" % revision)  # in every format, as etcdctl


def _canceled_reason(resp) -> str:
    if resp.compact_revision:
        return errors.CompactedError.default_message
    return resp.cancel_reason or "canceled"


def run_watch(c, inv: Invocation, spec: tuple) -> None:
    key, end, prefix = spec
    v = inv.values
    w = c.watch(key, end, prefix=prefix, start_revision=max(0, v["rev"]), prev_kv=v["prev-kv"],
                progress_notify=v["progress-notify"])
    for resp in w:
        if resp.created and not resp.canceled:
            continue
        if resp.canceled:
            sys.stderr.write(f"watch was canceled ({_canceled_reason(resp)})\n")
            if inv.fmt == "json":
                inv.write(JSON_WATCH_REFUSED if resp.created else json_watch(resp, inv.cluster_id))
            break
        if resp.is_progress_notify:
            inv.write(b"progress notify: %d\n" % resp.revision)
        inv.write(json_watch(resp, inv.cluster_id) if inv.fmt == "json"
                  else simple_watch(resp, inv.hex))
    raise CliError(EXIT_INTERRUPTED, "watch is canceled by the server")


@dataclass(frozen=True)
class ClientCommand:
    synopsis: str
    summary: str
    flags: list[Flag]
    formats: tuple[str, ...]
    prepare: Callable[[Invocation], object]  # arguments -> request (etcdctl's checks)
    run: Callable[..., None]  # (client, invocation, request)


def _prepare_put(inv: Invocation) -> PutOp:
    return build_put(inv.values, inv.args, lambda: sys.stdin.buffer.read())


def _prepare_get(inv: Invocation) -> RangeOp:
    req = build_get(inv.values, inv.args)
    if inv.values["print-value-only"] and inv.fmt != "simple":
        raise CliError(EXIT_BAD_ARGS, "print-value-only is only for `--write-out=simple`")
    return req


def _prepare_del(inv: Invocation) -> DeleteOp:
    return build_del(inv.values, inv.args)


def _prepare_txn(inv: Invocation):
    if inv.args:
        raise CliError(EXIT_BAD_ARGS, "txn command does not accept argument")

    def prompt(text: str) -> None:
        inv.write(text.encode() + b"\n")

    return read_txn(sys.stdin.buffer.readline, TXN_COMMANDS,
                    prompt if inv.values["interactive"] else None)


def _prepare_compaction(inv: Invocation) -> int:
    if len(inv.args) != 1:
        raise CliError(EXIT_BAD_ARGS, "compaction command needs 1 argument")
    try:
        return go_parse_int(inv.args[0], 10)
    except ValueError as exc:
        raise CliError(EXIT_ERROR, str(exc)) from None


def _prepare_watch(inv: Invocation) -> tuple:
    args, v = inv.args, inv.values
    if not args:
        raise CliError(EXIT_BAD_ARGS, "bad number of arguments")
    if len(args) == 2 and v["prefix"]:
        raise CliError(EXIT_BAD_ARGS, "`range_end` and `--prefix` are mutually exclusive")
    key = arg_bytes(args[0])
    end = arg_bytes(args[1]) if len(args) == 2 else None
    if v["from-key"]:
        end = b"\0"
    return key, end, v["prefix"]


CLIENT_COMMANDS: dict[str, ClientCommand] = {
    "put": ClientCommand("put [options] <key> [value] (the value is read from stdin if not given)",
                         "Puts the given key into the store", PUT_FLAGS, ("simple", "json"),
                         _prepare_put, run_put),
    "get": ClientCommand("get [options] <key> [range_end]", "Gets the key or a range of keys",
                         GET_FLAGS + [Flag("count-only", bool, False, "Get only the count")],
                         ("simple", "json", "table"), _prepare_get, run_get),
    "del": ClientCommand("del [options] <key> [range_end]",
                         "Removes the specified key or range of keys [key, range_end)",
                         DEL_FLAGS, ("simple", "json"), _prepare_del, run_del),
    "txn": ClientCommand("txn [options] < compares, success and failure requests",
                         "Txn processes all the requests in one transaction",
                         [Flag("interactive", bool, False, "Input transaction in interactive mode", "i")],
                         ("simple", "json"), _prepare_txn, run_txn),
    "compaction": ClientCommand("compaction [options] <revision>",
                                "Compacts the event history (also: compact)",
                                [Flag("physical", bool, False,
                                      "accepted; compaction is always complete when it returns")],
                                ("simple", "json", "table"), _prepare_compaction, run_compaction),
    "watch": ClientCommand("watch [options] <key> [range_end]",
                           "Watches events stream on keys or prefixes",
                           WATCH_FLAGS,
                           ("simple", "json"), _prepare_watch, run_watch),
}
CLIENT_COMMANDS["compact"] = CLIENT_COMMANDS["compaction"]
CLIENT_COMMANDS.update({name: ClientCommand(*spec) for name, spec in RECIPES.items()})  # lock, elect



def _flags_for(name: str) -> list[Flag]:
    return GLOBAL_FLAGS + CLIENT_COMMANDS[name].flags


def run_client_command(name: str, argv: list[str]) -> int:
    """Parse, check, connect, request, print: etcdctl's order of checks, except that a
    format a command cannot print is refused before anything is sent (etcdctl applies a
    `put -w table` and then fails to print it)."""
    cmd = CLIENT_COMMANDS[name]
    if name == "watch" and "--" in argv:
        raise CliError(EXIT_BAD_ARGS, "shmwatch watch runs no command per event (etcdctl's `-- command`)")
    text = usage(name, cmd.synopsis, cmd.summary, _flags_for(name))
    try:
        values, args, want_help = parse_flags(_flags_for(name), argv)
    except CliError:
        sys.stdout.write(text)  # with the error, as cobra does
        raise
    if want_help:
        sys.stdout.write(text)
        return 0
    inv = Invocation(values, args)
    request = cmd.prepare(inv)
    check_format(inv.fmt, cmd.formats)
    with connect(broker_name(values), timeout=values["timeout"]) as c:
        inv.cluster_id = cluster_id(c)
        cmd.run(c, inv, request)
    return 0


# ------------------------------------------------------------------ broker tools


def cmd_serve(a) -> int:
    """`shmwatch serve`: run a broker (see `python -m broker --help`)."""
    from broker.__main__ import serve

    return serve(a, "shmwatch serve")


def cmd_repair(a) -> int:
    """Check a --data-dir; with --yes cut a damaged WAL back (broker.wal_repair.repair)."""
    from broker.wal_repair import repair

    status, lines = repair(a.data_dir, apply=a.yes)
    print("\n".join(lines))
    return status


def cmd_cleanup(a) -> int:
    from broker.admin import cleanup_stale

    removed = cleanup_stale(a.name)
    for entry in removed:
        print(f"removed /dev/shm/{entry}")
    if not removed:
        print("nothing to clean up")
    return 0


def cmd_ls(a) -> int:
    from broker.admin import list_brokers

    rows = list_brokers()
    if a.write_out == "json":
        sys.stdout.buffer.write(json_bytes(rows))
        return 0
    if not rows:
        print("no brokers")
        return 0
    print(f"{'NAME':24} {'PID':>8} {'STATE':7} {'REVISION':>9} {'CLIENTS':>7}")
    for r in rows:
        print(f"{r['name']:24} {r['pid']:>8} {r['state']:7} {r['revision']:>9} {r['clients']:>7}")
    return 0


def build_parser():
    """The parser of the broker tools; it also lists the client commands for --help
    (those parse their own flags, as etcdctl does: see run_client_command)."""
    import argparse

    from broker.__main__ import add_broker_options

    p = argparse.ArgumentParser(prog="shmwatch", description="etcd v3 watch over shared memory")
    p.add_argument("--version", action="version", version=f"shmwatch {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("serve", help="run a broker (in the foreground unless --detach)")
    add_broker_options(s)

    for name, cmd in CLIENT_COMMANDS.items():
        if name != "compact":
            sub.add_parser(name, help=cmd.summary, add_help=False)
    sub.add_parser("status", help="a broker's status, from its published stats", add_help=False)
    sub.add_parser("lease", help="lease grant|revoke|timetolive|list|keep-alive (etcdctl's)",
                   add_help=False)

    sp = sub.add_parser("cleanup", help="remove what dead brokers left in /dev/shm")
    sp.add_argument("--name", default=None, help="only this broker's leftovers")

    sp = sub.add_parser("repair", help="check a --data-dir; --yes cuts a damaged WAL back "
                                       "to its last good record, keeping the original")
    sp.add_argument("--data-dir", required=True)
    sp.add_argument("--yes", action="store_true",
                    help="do the repair (default: a dry run that only reports; exit status 1 "
                         "while something is damaged)")

    sp = sub.add_parser("ls", help="list the brokers on this machine")
    sp.add_argument("-w", "--write-out", choices=("simple", "json"), default="simple")

    for tool, help_ in (("stress", "load + verification run (tools/stress)"),
                        ("top", "live monitor of a broker (tools/top)"),
                        ("bench", "benchmarks against real peers (tools/bench)")):
        sp = sub.add_parser(tool, help=help_, add_help=False)
        sp.add_argument("args", nargs=argparse.REMAINDER)
    return p


# The tools beside this one, imported only when asked for (they pull in rich, psutil
# sampling, peers' clients): `shmwatch stress ...` is `shmwatch.tools.stress.main(...)`.
TOOLS = ("stress", "top", "bench")


def _die_of_sigint() -> None:
    """End as etcdctl does on Ctrl-C: killed by SIGINT (exit status 130 in a shell),
    after everything printed so far is out."""
    sys.stdout.flush()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        from importlib import import_module

        return import_module(f"..{argv[0]}", __package__).main(argv[1:])
    if argv and (argv[0] in CLIENT_COMMANDS or argv[0] in ("status", "lease")):
        # A closed pipe ends us as it ends etcdctl (`shmwatch get ... | head`).
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        try:
            if argv[0] == "status":
                from .status import cmd_status

                return cmd_status(argv[1:])
            if argv[0] == "lease":
                from .lease import run_lease_command

                return run_lease_command(argv[1:])
            return run_client_command(argv[0], argv[1:])
        except CliError as exc:
            sys.stdout.flush()
            sys.stderr.write(f"Error: {exc.message}\n")
            return exc.code
        except errors.ShmwatchError as exc:
            sys.stdout.flush()
            sys.stderr.write(f"Error: {exc}\n")
            return EXIT_ERROR
        except KeyboardInterrupt:
            _die_of_sigint()
            raise
    a = build_parser().parse_args(argv)
    if a.cmd == "serve":
        return cmd_serve(a)
    if a.cmd == "cleanup":
        return cmd_cleanup(a)
    if a.cmd == "repair":
        return cmd_repair(a)
    return cmd_ls(a)


if __name__ == "__main__":
    sys.exit(main())
