"""The `shmwatch` command: etcdctl's verbs against a shmwatch broker, plus `serve`.

Output follows etcdctl: the simple format by default, `-w json` for etcdctl's JSON
(Header, Events, base64 keys and values, zero fields omitted as protobuf JSON does).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys

from shmwatch import __version__
from shmwatch.wire import errors

from .client import connect


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _nz(d: dict) -> dict:
    """Drop zero / empty fields, as Go's protobuf JSON (omitempty) does."""
    return {k: v for k, v in d.items() if v not in (0, "", None, False, [], {})}


def _kv_json(kv) -> dict:
    return _nz({"key": _b64(kv.key), "create_revision": kv.create_revision,
                "mod_revision": kv.mod_revision, "version": kv.version,
                "value": _b64(kv.value), "lease": kv.lease})


def _header(c, rev: int) -> dict:
    cid = c._words[11] if c._words is not None else 0
    return _nz({"cluster_id": cid, "member_id": cid ^ 0x5348_4D57, "revision": rev})


def _print_kv(kv) -> None:
    sys.stdout.write(kv.key.decode(errors="replace") + "\n")
    sys.stdout.write(kv.value.decode(errors="replace") + "\n")


def _emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def _range_args(a) -> tuple:
    end = a.range_end.encode() if getattr(a, "range_end", None) else None
    if getattr(a, "from_key", False):
        end = b"\0"
    return end


def cmd_put(c, a) -> int:
    r = c.put(a.key, a.value, prev_kv=a.prev_kv, ignore_value=a.ignore_value)
    if a.write_out == "json":
        out = {"header": _header(c, r.revision)}
        if r.prev_kv:
            out["prev_kv"] = _kv_json(r.prev_kv)
        _emit(out)
    else:
        print("OK")
        if r.prev_kv:
            _print_kv(r.prev_kv)
    return 0


def cmd_get(c, a) -> int:
    r = c.get(a.key, _range_args(a), prefix=a.prefix, revision=a.rev, limit=a.limit,
              keys_only=a.keys_only, count_only=a.count_only)
    if a.write_out == "json":
        _emit(_nz({"header": _header(c, r.revision), "kvs": [_kv_json(k) for k in r.kvs],
                   "more": r.more, "count": r.count}))
    else:
        for kv in r.kvs:
            sys.stdout.write(kv.key.decode(errors="replace") + "\n")
            if not a.keys_only:
                sys.stdout.write(kv.value.decode(errors="replace") + "\n")
    return 0


def cmd_del(c, a) -> int:
    r = c.delete(a.key, _range_args(a), prefix=a.prefix, prev_kv=a.prev_kv)
    if a.write_out == "json":
        _emit(_nz({"header": _header(c, r.revision), "deleted": r.deleted,
                   "prev_kvs": [_kv_json(k) for k in r.prev_kvs]}))
    else:
        print(r.deleted)
        for kv in r.prev_kvs:
            _print_kv(kv)
    return 0


def cmd_compact(c, a) -> int:
    r = c.compact(a.revision)
    if a.write_out == "json":
        _emit({"header": _header(c, r.revision)})
    else:
        print(f"compacted revision {a.revision}")
    return 0


def watch_json(c, resp) -> dict:
    """etcdctl's `watch -w json` shape of one response (clientv3.WatchResponse)."""
    events = []
    for e in resp.events:
        ev = {"kv": _kv_json(e.kv)}
        if e.type == "DELETE":
            ev = {"type": 1, **ev}
        if e.prev_kv is not None:
            ev["prev_kv"] = _kv_json(e.prev_kv)
        events.append(ev)
    return {"Header": _header(c, resp.revision), "Events": events,
            "CompactRevision": resp.compact_revision, "Canceled": resp.canceled,
            "Created": resp.created}


def cmd_watch(c, a) -> int:
    w = c.watch(a.key, _range_args(a), prefix=a.prefix, start_revision=a.rev,
                prev_kv=a.prev_kv, progress_notify=a.progress_notify)
    try:
        for resp in w:
            if resp.created and not resp.canceled:
                continue
            if a.write_out == "json":
                _emit(watch_json(c, resp))
            if resp.canceled:
                # etcdctl: the watch's error on stderr, exit code 5 (ExitInterrupted).
                reason = (errors.CompactedError.default_message if resp.compact_revision
                          else resp.cancel_reason or "canceled")
                print(f"watch was canceled ({reason})", file=sys.stderr)
                return 5
            if a.write_out == "json":
                continue
            if resp.is_progress_notify:
                print(f"progress notify: {resp.revision}")
            for e in resp.events:
                print(e.type)
                if e.prev_kv is not None:
                    _print_kv(e.prev_kv)
                _print_kv(e.kv)
            sys.stdout.flush()
    except KeyboardInterrupt:
        return 0
    return 0


def cmd_serve(a) -> int:
    """`shmwatch serve`: run a broker (see `python -m broker --help`)."""
    from broker.__main__ import serve

    return serve(a, "shmwatch serve")


def cmd_repair(a) -> int:
    """Check a --data-dir; with --yes cut a damaged WAL back (broker.wal.repair)."""
    from broker.wal import repair

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
        _emit(rows)
        return 0
    if not rows:
        print("no brokers")
        return 0
    print(f"{'NAME':24} {'PID':>8} {'STATE':7} {'REVISION':>9} {'CLIENTS':>7}")
    for r in rows:
        print(f"{r['name']:24} {r['pid']:>8} {r['state']:7} {r['revision']:>9} {r['clients']:>7}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from broker.__main__ import add_broker_options

    p = argparse.ArgumentParser(prog="shmwatch", description="etcd v3 watch over shared memory")
    p.add_argument("--version", action="version", version=f"shmwatch {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def client_cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--name", default=os.environ.get("SHMWATCH_NAME", "default"),
                        help="broker name (default: $SHMWATCH_NAME or 'default')")
        sp.add_argument("-w", "--write-out", choices=("simple", "json"), default="simple")
        sp.add_argument("--timeout", type=float, default=5.0)
        return sp

    s = sub.add_parser("serve", help="run a broker (in the foreground unless --detach)")
    add_broker_options(s)

    sp = client_cmd("put", "put a key")
    sp.add_argument("key")
    sp.add_argument("value", nargs="?", default="")
    sp.add_argument("--prev-kv", action="store_true")
    sp.add_argument("--ignore-value", action="store_true")

    for verb, help_ in (("get", "read keys"), ("del", "delete keys")):
        sp = client_cmd(verb, help_)
        sp.add_argument("key")
        sp.add_argument("range_end", nargs="?")
        sp.add_argument("--prefix", action="store_true")
        sp.add_argument("--from-key", action="store_true")
        if verb == "get":
            sp.add_argument("--rev", type=int, default=0)
            sp.add_argument("--limit", type=int, default=0)
            sp.add_argument("--keys-only", action="store_true")
            sp.add_argument("--count-only", action="store_true")
        else:
            sp.add_argument("--prev-kv", action="store_true")

    sp = client_cmd("watch", "watch a key, range or prefix")
    sp.add_argument("key")
    sp.add_argument("range_end", nargs="?")
    sp.add_argument("--prefix", action="store_true")
    sp.add_argument("--from-key", action="store_true")
    sp.add_argument("--rev", type=int, default=0)
    sp.add_argument("--prev-kv", action="store_true")
    sp.add_argument("--progress-notify", action="store_true")

    sp = client_cmd("compact", "compact the history")
    sp.add_argument("revision", type=int)

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


TOOLS = {"stress": "shmwatch.tools.stress", "top": "shmwatch.tools.top", "bench": "shmwatch.tools.bench"}

CLIENT_COMMANDS = {"put": cmd_put, "get": cmd_get, "del": cmd_del, "watch": cmd_watch,
                   "compact": cmd_compact}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    a = build_parser().parse_args(argv)
    if a.cmd == "serve":
        return cmd_serve(a)
    if a.cmd == "cleanup":
        return cmd_cleanup(a)
    if a.cmd == "ls":
        return cmd_ls(a)
    if a.cmd == "repair":
        return cmd_repair(a)
    try:
        with connect(a.name, timeout=a.timeout) as c:
            return CLIENT_COMMANDS[a.cmd](c, a)
    except errors.ShmwatchError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
