"""tools/stress: load a broker with writer and watcher processes, then prove every stream.

Starts an embedded broker (or attaches to one with --name), N writer processes doing
puts, deletes and multi-key txns on overlapping keys, and M watcher processes with a mix
of single-key, prefix, range and from-key watches: fast ones, slow ones that sleep per
event, ones that stall for seconds then resume, ones started late from revision 1.
With --chaos it SIGKILLs random writers and watchers along the way. A reference watcher
in this process records the whole history. At the end every surviving watcher's stream
is checked against it: in order, no gap, no duplicate, each revision's events in one
response, or a correct compaction cancel (a prefix, then compact_revision).

Exit status 0 when every check passed, 1 on any violation, 2 on a usage or start error.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass

import msgpack

KEYSPACE = "stress/"


@dataclass
class WatchSpec:
    idx: int
    kind: str  # key | prefix | range | fromkey
    key: str
    end: str | None
    behaviour: str  # fast | slow | stall | late
    start_revision: int = 0

    def label(self) -> str:
        rng = {"key": self.key, "prefix": self.key + "*", "range": f"[{self.key},{self.end})",
               "fromkey": self.key + ".."}[self.kind]
        return f"w{self.idx} {self.behaviour} {rng}"


def _key(i: int) -> str:
    return f"{KEYSPACE}{i % 4}/{i:03d}"


def make_specs(n: int, keys: int, rnd: random.Random, slow: int, stall: int, late: int
               ) -> list[WatchSpec]:
    behaviours = ["slow"] * slow + ["stall"] * stall + ["late"] * late
    behaviours += ["fast"] * max(0, n - len(behaviours))
    specs = []
    for i in range(n):
        kind = ("key", "prefix", "range", "fromkey")[i % 4]
        a = rnd.randrange(keys)
        if kind == "key":
            key, end = _key(a), None
        elif kind == "prefix":
            key, end = f"{KEYSPACE}{a % 4}/", None
        elif kind == "range":
            b = min(keys - 1, a + rnd.randrange(2, 12))
            lo, hi = sorted((a, b))
            key, end = _key(lo), _key(hi)
            if key >= end:
                key, end = _key(0), _key(keys - 1)
        else:
            key, end = _key(a), None
        beh = behaviours[i]
        specs.append(WatchSpec(i, kind, key, end, beh, 1 if beh == "late" else 0))
    return specs


# ------------------------------------------------------------------ child processes

def _arrive(ready, go, stop_v) -> float:
    """Report ready, wait for the start signal, return the run's end (monotonic)."""
    with ready.get_lock():
        ready.value += 1
    go.wait(120)
    return stop_v.value


def writer_main(name: str, wid: int, keys: int, seed: int, sync: tuple, counter) -> None:
    import clientlib
    from clientlib import op_delete, op_put

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    with clientlib.connect(name, timeout=10) as c:
        stop_at = _arrive(*sync)
        n = 0
        while time.monotonic() < stop_at:
            r = rnd.random()
            k = _key(rnd.randrange(keys))
            if r < 0.75:
                c.put(k, f"w{wid}-{n}")
            elif r < 0.9:
                c.delete(k)
            else:
                ks = sorted({_key(rnd.randrange(keys)) for _ in range(rnd.randrange(2, 5))})
                ops = [op_put(x, f"t{wid}-{n}") if rnd.random() < 0.8 else op_delete(x)
                       for x in ks]
                c.txn(success=ops)
            n += 1
            if n % 64 == 0:
                with counter.get_lock():
                    counter.value += 64


def watcher_main(name: str, spec: WatchSpec, out_path: str, sync: tuple, start_event,
                 delivered) -> None:
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with clientlib.connect(name, timeout=10) as c:
        end = spec.end.encode() if spec.end else None
        if spec.kind == "fromkey":
            end = b"\0"

        def create():
            return c.watch(spec.key, end, prefix=spec.kind == "prefix",
                           start_revision=spec.start_revision)

        w = None if spec.behaviour == "late" else create()
        stop_at = _arrive(*sync)
        if w is None:
            start_event.wait(60)
            w = create()
        got = []
        stalled = False
        n = 0
        started = time.monotonic()
        while True:
            now = time.monotonic()
            if now > stop_at:
                break
            if spec.behaviour == "stall" and not stalled and now - started > 1.0:
                stalled = True
                time.sleep(min(3.0, max(0.0, stop_at - now - 1.0)))
            try:
                r = w.get(timeout=0.2)
            except clientlib.Timeout:
                continue
            got.append([r.revision, r.created, r.canceled, r.compact_revision,
                        [[e.type, e.kv.key, e.kv.mod_revision, e.kv.version] for e in r.events]])
            n += len(r.events)
            if r.events and spec.behaviour == "slow":
                time.sleep(0.001)
            if r.canceled:
                break
            if n >= 256:
                with delivered.get_lock():
                    delivered.value += n
                n = 0
        # Drain what the broker already sent, so the stream ends at a known point.
        c.request_progress()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not (got and got[-1][2]):
            try:
                r = w.get(timeout=1.0)
            except clientlib.Timeout:
                break
            got.append([r.revision, r.created, r.canceled, r.compact_revision,
                        [[e.type, e.kv.key, e.kv.mod_revision, e.kv.version] for e in r.events]])
            if r.watch_id == -1 and not r.events:
                break
        with open(out_path, "wb") as f:
            f.write(msgpack.packb(got, use_bin_type=True))


# ------------------------------------------------------------------ verification

def expected_events(history: list, spec: WatchSpec, first_rev: int) -> list:
    """The reference events this watcher must see, from `first_rev` on."""
    key = spec.key.encode()
    if spec.kind == "key":
        match = lambda k: k == key  # noqa: E731
    elif spec.kind == "prefix":
        match = lambda k: k.startswith(key)  # noqa: E731
    elif spec.kind == "range":
        end = spec.end.encode()
        match = lambda k: key <= k < end  # noqa: E731
    else:
        match = lambda k: k >= key  # noqa: E731
    return [tuple(e) for e in history if e[2] >= first_rev and match(e[1])]


def verify(spec: WatchSpec, got: list, history: list, history_from: int) -> list[str]:
    """Violations in one watcher's stream (empty list: it passed)."""
    problems = []
    if not got or not got[0][1]:
        return ["first response is not `created`"]
    created_rev = got[0][0]
    first = spec.start_revision or created_rev + 1
    evs, owner = [], {}
    for i, (_rev, _created, _canceled, _compact, events) in enumerate(got[1:], 1):
        for e in events:
            e = (e[0], e[1], e[2], e[3])
            evs.append(e)
            if e[2] in owner and owner[e[2]] != i:
                problems.append(f"revision {e[2]} split across responses")
            owner.setdefault(e[2], i)
    revs = [e[2] for e in evs]
    if revs != sorted(revs):
        problems.append("events out of revision order")
    keyed = [(e[2], e[1]) for e in evs]
    if len(set(keyed)) != len(keyed):
        problems.append("duplicate events")
    if first < history_from:
        # History before the reference began is unknown: check the tail we can see.
        evs = [e for e in evs if e[2] >= history_from]
        first = history_from
    want = expected_events(history, spec, first)
    canceled = got[-1][2]
    if canceled:
        compact = got[-1][3]
        if not compact:
            problems.append("canceled without compact_revision")
        if evs != want[:len(evs)]:
            problems.append("stream before the compaction cancel is not a prefix of history")
        elif len(evs) < len(want) and want[len(evs)][2] >= compact:
            problems.append(f"canceled at compact_revision {compact} but revision "
                            f"{want[len(evs)][2]} was still retained")
    else:
        n = len(evs)
        if evs != want[:n]:
            bad = next(i for i in range(n) if i >= len(want) or evs[i] != want[i])
            problems.append(f"event {bad}: got {evs[bad]}, history has "
                            f"{want[bad] if bad < len(want) else 'nothing'}")
        elif n < len(want):
            # A watcher stops at the final progress response; it must have everything up
            # to the revision that response reported.
            last_rev = max((r[0] for r in got), default=0)
            missing = [e for e in want[n:] if e[2] <= last_rev]
            if missing:
                problems.append(f"gap: {len(missing)} events up to revision {last_rev} "
                                f"missing, first {missing[0]}")
    return problems


# ------------------------------------------------------------------ the run

def run(a: argparse.Namespace) -> dict:
    import broker
    import clientlib
    from broker.admin import read_stats

    rnd = random.Random(a.seed)
    handle = None
    name = a.name
    if not name:
        opts = {}
        if a.log_bytes:
            opts["log_bytes"] = a.log_bytes
        if a.watch_ring_bytes:
            opts["watch_ring_bytes"] = a.watch_ring_bytes
        handle = broker.spawn(**opts)
        name = handle.name
    ctx = mp.get_context("spawn")
    tmp = tempfile.mkdtemp(prefix="shmwatch-stress-")
    procs: dict[str, mp.Process] = {}
    killed: set[str] = set()
    history: list = []
    summary: dict = {}
    try:
        ref_client = clientlib.connect(name, timeout=10)
        base = ref_client.get("x").revision
        ref = ref_client.watch(b"\0", b"\0", start_revision=base + 1)
        ref.get(5)  # created
        written = ctx.Value("q", 0)
        delivered = ctx.Value("q", 0)
        late_go = ctx.Event()
        ready, go, stop_v = ctx.Value("i", 0), ctx.Event(), ctx.Value("d", 0.0)
        sync = (ready, go, stop_v)
        specs = make_specs(a.watchers, a.keys, rnd, a.slow, a.stall, a.late)
        for s in specs:
            procs[f"w{s.idx}"] = ctx.Process(
                target=watcher_main, args=(name, s, os.path.join(tmp, f"w{s.idx}"), sync,
                                           late_go, delivered), daemon=True)
        for i in range(a.writers):
            procs[f"p{i}"] = ctx.Process(target=writer_main,
                                         args=(name, i, a.keys, a.seed * 100 + i, sync,
                                               written), daemon=True)
        for p in procs.values():
            p.start()
        # The clock starts when every process is connected (and its watch created), so
        # stalls, late starts and chaos happen inside the run, not during start-up.
        deadline = time.monotonic() + 120
        while ready.value < len(procs):
            if time.monotonic() > deadline or any(p.exitcode for p in procs.values()):
                raise RuntimeError("worker processes did not start")
            time.sleep(0.01)
        t0 = time.monotonic()
        stop_at = stop_v.value = t0 + a.duration
        go.set()
        progress = _Progress(a.quiet)
        ref_broken = None
        late_sent = False
        next_chaos = t0 + 1.0
        while time.monotonic() < stop_at + 0.5:
            try:
                r = ref.get(timeout=0.1)
                if r.canceled:
                    ref_broken = f"reference watch canceled (compact_revision {r.compact_revision})"
                    break
                history.extend((e.type, e.kv.key, e.kv.mod_revision, e.kv.version)
                               for e in r.events)
            except clientlib.Timeout:
                pass
            now = time.monotonic()
            if not late_sent and now > t0 + a.duration / 3:
                late_go.set()
                late_sent = True
            if a.chaos and now > next_chaos and now < stop_at - 1.0:
                next_chaos = now + rnd.uniform(0.5, 1.5)
                victims = [k for k in procs if k not in killed and procs[k].is_alive()]
                if victims:
                    k = rnd.choice(victims)
                    os.kill(procs[k].pid, signal.SIGKILL)
                    killed.add(k)
            progress.update(now - t0, a.duration, written.value, delivered.value,
                            _safe_stats(read_stats, name), len(killed))
        progress.close()
        for p in procs.values():
            p.join(timeout=max(30.0, a.duration))
        # Everything the writers acknowledged is in the log: read the reference to the end.
        final_rev = ref_client.get("x").revision
        while not ref_broken and (not history or history[-1][2] < final_rev):
            try:
                r = ref.get(timeout=5)
            except clientlib.Timeout:
                ref_broken = "reference watch stopped short of the final revision"
                break
            if r.canceled:
                ref_broken = f"reference watch canceled (compact_revision {r.compact_revision})"
                break
            history.extend((e.type, e.kv.key, e.kv.mod_revision, e.kv.version) for e in r.events)
        stats = _safe_stats(read_stats, name) or {}
        elapsed = time.monotonic() - t0
        results = []
        violations = 0
        for s in specs:
            key = f"w{s.idx}"
            path = os.path.join(tmp, key)
            if key in killed:
                results.append({"watcher": s.label(), "status": "killed", "events": 0})
                continue
            if procs[key].exitcode != 0 or not os.path.exists(path):
                violations += 1
                results.append({"watcher": s.label(), "status": "FAILED",
                                "problems": [f"watcher process exit code {procs[key].exitcode}"],
                                "events": 0})
                continue
            with open(path, "rb") as f:
                got = [tuple(x) for x in msgpack.unpackb(f.read(), raw=False)]
            got = [(r[0], r[1], r[2], r[3], [(e[0], e[1], e[2], e[3]) for e in r[4]]) for r in got]
            problems = verify(s, got, history, base + 1) if not ref_broken else []
            nev = sum(len(r[4]) for r in got)
            status = "ok" if not problems else "FAILED"
            if got and got[-1][2]:
                status = "compacted" if not problems else status
            violations += bool(problems)
            results.append({"watcher": s.label(), "status": status, "events": nev,
                            "problems": problems})
        for i in range(a.writers):
            key = f"p{i}"
            if key not in killed and procs[key].exitcode != 0:
                violations += 1
                results.append({"watcher": f"writer {i}", "status": "FAILED", "events": 0,
                                "problems": [f"writer exit code {procs[key].exitcode}"]})
        if ref_broken:
            violations += 1
        revisions = len({e[2] for e in history})
        delivered_total = sum(r["events"] for r in results)
        summary = {
            "broker": name, "duration_s": round(elapsed, 2), "writers": a.writers,
            "watchers": a.watchers, "revisions_written": revisions,
            "events_written": len(history),
            "writes_per_s": round(revisions / elapsed, 1),
            "events_delivered": delivered_total,
            "delivered_per_s": round(delivered_total / elapsed, 1),
            "victims_entered": stats.get("victims_entered", 0),
            "catchups": stats.get("catchups", 0),
            "compactions": stats.get("compactions", 0),
            "max_lag": max((c.get("max_lag", 0) for c in stats.get("clients", [])), default=0),
            "killed": sorted(killed), "reference_problem": ref_broken,
            "violations": violations, "watchers_detail": results,
            "passed": violations == 0,
        }
        ref_client.close()
        return summary
    finally:
        for p in procs.values():
            if p.is_alive():
                p.kill()
            p.join(5)
        if handle is not None:
            handle.stop()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)


def _safe_stats(read_stats, name):
    try:
        return read_stats(name)
    except Exception:
        return None


class _Progress:
    """A live line of progress (rich), or nothing when quiet or not a terminal."""

    def __init__(self, quiet: bool):
        self.live = None
        self._last = 0.0
        if quiet:
            return
        from rich.console import Console
        from rich.live import Live

        console = Console(stderr=True)
        self.live = Live(console=console, refresh_per_second=4, transient=True)
        self.live.start()

    def update(self, t, total, written, delivered, stats, killed) -> None:
        if self.live is None or t - self._last < 0.25:
            return
        self._last = t
        from rich.table import Table

        tab = Table.grid(padding=(0, 2))
        st = stats or {}
        wat = st.get("watchers", {})
        tab.add_row(f"[bold]stress[/] {t:5.1f}/{total:.0f}s",
                    f"rev {st.get('revision', 0)}", f"writes~{written}",
                    f"delivered~{delivered}",
                    f"watchers {wat.get('synced', 0)} synced / {wat.get('unsynced', 0)} unsynced"
                    f" / [red]{wat.get('victim', 0)} victims[/]",
                    f"victims entered {st.get('victims_entered', 0)}", f"killed {killed}")
        self.live.update(tab)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"shmwatch stress on broker {s['broker']}")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for k in ("duration_s", "writers", "watchers", "revisions_written", "events_written",
              "writes_per_s", "events_delivered", "delivered_per_s", "victims_entered",
              "catchups", "compactions", "max_lag"):
        t.add_row(k.replace("_", " "), str(s[k]))
    t.add_row("killed (chaos)", ", ".join(s["killed"]) or "-")
    console.print(t)
    w = Table(title="watchers, verified against the revision log")
    for col in ("watcher", "status", "events", "problems"):
        w.add_column(col)
    for r in s["watchers_detail"]:
        style = {"ok": "green", "compacted": "yellow", "killed": "dim"}.get(r["status"], "red")
        w.add_row(r["watcher"], f"[{style}]{r['status']}[/]", str(r["events"]),
                  "; ".join(r.get("problems", []))[:120])
    console.print(w)
    if s["reference_problem"]:
        console.print(f"[red]reference history: {s['reference_problem']}[/]")
    verdict = ("[bold green]PASSED[/]: every surviving watcher saw every event of its range, "
               "in order, once, each revision whole" if s["passed"]
               else f"[bold red]FAILED[/]: {s['violations']} violation(s)")
    console.print(verdict)


def parse_args(argv):
    from broker.__main__ import parse_size

    p = argparse.ArgumentParser(prog="tools/stress", description=__doc__.split("\n\n")[0])
    p.add_argument("--name", help="attach to this running broker instead of embedding one")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load (default 8)")
    p.add_argument("--writers", type=int, default=3)
    p.add_argument("--watchers", type=int, default=8)
    p.add_argument("--keys", type=int, default=48, help="distinct keys written")
    p.add_argument("--slow", type=int, default=1, help="watchers that sleep 1 ms per response")
    p.add_argument("--stall", type=int, default=1, help="watchers that stop reading for ~3 s")
    p.add_argument("--late", type=int, default=2, help="watchers started late from revision 1")
    p.add_argument("--chaos", action="store_true", help="SIGKILL random writers and watchers")
    p.add_argument("--log-bytes", type=parse_size, default=None,
                   help="embedded broker's log size (small values force compaction)")
    p.add_argument("--watch-ring-bytes", type=parse_size, default="64k",
                   help="embedded broker's per-watcher ring (default 64k: small, so slow "
                        "watchers become victims)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-' = stdout)")
    p.add_argument("--quiet", action="store_true", help="no live display")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if not sys.stderr.isatty():
        a.quiet = True
    try:
        s = run(a)
    except Exception as exc:
        print(f"stress: could not run: {exc!r}", file=sys.stderr)
        return 2
    if a.json:
        text = json.dumps(s, indent=2)
        if a.json == "-":
            print(text)
        else:
            with open(a.json, "w") as f:
                f.write(text)
    if a.json != "-":
        print_summary(s)
    return 0 if s["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
