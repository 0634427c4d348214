"""UP (needs the extra `etcd`): N local watcher processes through one mirroring broker
beside N direct etcd watches, on one real etcd (a single member on 127.0.0.1, so its
CPU is one process's).

    shmwatch bench upstream [--watchers 100] [--rate 200] [--seconds 8]
    (or python -m shmwatch.tools.bench.upstream ...)

One writer puts `--rate` times a second straight to etcd over gRPC (the same writes in
both cases), each value its send time. Direct: N gRPC watch streams (one channel each,
as N etcd clients would have), held by N/10 processes. Mirrored: one broker mirrors
etcd and N processes watch it with clientlib. Figures: etcd's CPU while writing, the
events delivered per second (all watchers), the watch latency from the put's send time
to the watcher's receipt (p50/p99), the broker's CPU; then the write throughput of
sequential puts through the broker against direct gRPC puts.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time

import psutil

PREFIX = b"/bench/"
SECTION = "## UP: beyond one host (`shmwatch bench upstream`)"
DIRECT_PER_PROC = 10  # direct watch streams per process
READY_S = 300.0  # 100 processes starting on a busy 2-core machine


def _pct(xs: list[int], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] / 1e6


def _local_watcher(name: str, ready, go, stop, out) -> None:
    import clientlib
    from shmwatch.wire.errors import Timeout

    lat: list[int] = []
    with clientlib.connect(name, timeout=60) as c:
        w = c.watch(PREFIX, prefix=True)
        w.get(60)
        ready.release()
        go.wait()
        while not stop.is_set():
            try:
                r = w.get(timeout=0.2)
            except Timeout:
                continue
            now = time.time_ns()
            lat += [now - int(ev.kv.value) for ev in r.events]
    out.put(lat)


def _direct_stream(target: str, ready, stop, lat: list) -> None:
    import grpc
    from pyetcd import etcdrpc

    ch = grpc.insecure_channel(target)
    req = etcdrpc.WatchRequest(create_request=etcdrpc.WatchCreateRequest(
        key=PREFIX, range_end=PREFIX[:-1] + b"0"))

    def reqs():
        yield req
        stop.wait()

    stream = etcdrpc.WatchStub(ch).Watch(reqs())
    for resp in stream:
        if resp.created:
            ready.release()
            continue
        now = time.time_ns()
        lat += [now - int(ev.kv.value) for ev in resp.events]
        if stop.is_set():
            break
    stream.cancel()
    ch.close()


def _direct_watchers(target: str, n: int, created, go, stop, out) -> None:
    ready = threading.Semaphore(0)
    tstop = threading.Event()
    lats: list[list] = [[] for _ in range(n)]
    ts = [threading.Thread(target=_direct_stream, args=(target, ready, tstop, lats[i]),
                           daemon=True) for i in range(n)]
    for t in ts:
        t.start()
    for _ in range(n):
        ready.acquire(timeout=60)
        created.release()
    go.wait()
    stop.wait()
    tstop.set()
    time.sleep(0.3)
    for lat in lats:
        out.put(list(lat))


def _write(target: str, rate: float, seconds: float) -> int:
    import grpc
    from pyetcd import etcdrpc

    kv = etcdrpc.KVStub(grpc.insecure_channel(target))
    n = 0
    t0 = time.monotonic()
    while (now := time.monotonic()) < t0 + seconds:
        due = t0 + n / rate
        if now < due:
            time.sleep(due - now)
        kv.Put(etcdrpc.PutRequest(key=PREFIX + b"k%d" % (n % 100),
                                  value=str(time.time_ns()).encode()))
        n += 1
    return n


def _trial(kind: str, a, target: str, etcd_pid: int, broker_name: str | None,
           broker_pid: int | None) -> dict:
    ctx = mp.get_context("spawn")
    go, stop, out, ready = ctx.Event(), ctx.Event(), ctx.Queue(), ctx.Semaphore(0)
    procs = []
    if kind == "mirror":
        for _ in range(a.watchers):
            procs.append(ctx.Process(target=_local_watcher, args=(broker_name, ready, go, stop, out)))
    else:
        for i in range(0, a.watchers, DIRECT_PER_PROC):
            procs.append(ctx.Process(target=_direct_watchers, args=(
                target, min(DIRECT_PER_PROC, a.watchers - i), ready, go, stop, out)))
    for p in procs:
        p.start()
    for _ in range(a.watchers):  # every watch created (processes start slowly)
        if not ready.acquire(timeout=READY_S):
            raise RuntimeError("a watcher did not start in time")
    time.sleep(1.0)  # the start-up CPU settles
    etcd = psutil.Process(etcd_pid)
    brk = psutil.Process(broker_pid) if broker_pid else None
    cpu0 = sum(etcd.cpu_times()[:2])
    bcpu0 = sum(brk.cpu_times()[:2]) if brk else 0.0
    go.set()
    t0 = time.monotonic()
    writes = _write(target, a.rate, a.seconds)
    elapsed = time.monotonic() - t0
    time.sleep(0.5)
    cpu = sum(etcd.cpu_times()[:2]) - cpu0
    bcpu = (sum(brk.cpu_times()[:2]) - bcpu0) if brk else 0.0
    stop.set()
    lat: list[int] = []
    streams = a.watchers
    for _ in range(streams):
        lat += out.get(timeout=60)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    return {"kind": kind, "writes": writes, "seconds": elapsed, "events": len(lat),
            "delivered_per_s": len(lat) / elapsed, "expected": writes * a.watchers,
            "etcd_cpu_pct": 100 * cpu / elapsed, "broker_cpu_pct": 100 * bcpu / elapsed,
            "p50_ms": _pct(lat, 0.5), "p99_ms": _pct(lat, 0.99)}


def _put_rate(put, seconds: float) -> float:
    n = 0
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds:
        put(PREFIX + b"tp%d" % (n % 100), b"x")
        n += 1
    return n / (time.monotonic() - t0)


def run(a) -> list[dict]:
    import grpc
    from pyetcd import etcdrpc

    import broker
    import clientlib

    from .servers import EtcdServer

    server = EtcdServer()
    server.start()
    target = f"127.0.0.1:{server.port}"
    rows = []
    try:
        rows.append(_trial("direct", a, target, server.pid, None, None))
        with broker.spawn(upstream=[f"http://{target}"]) as b:
            rows.append(_trial("mirror", a, target, server.pid, b.name, b.pid))
            kv = etcdrpc.KVStub(grpc.insecure_channel(target))
            direct = _put_rate(lambda k, v: kv.Put(etcdrpc.PutRequest(key=k, value=v)), 3)
            with clientlib.connect(b.name) as c:
                via = _put_rate(c.put, 3)
            rows.append({"kind": "puts", "direct_per_s": direct, "broker_per_s": via})
    finally:
        server.stop()
    return rows


def report(rows: list[dict], a) -> str:
    lines = [f"{a.watchers} watchers of one prefix, {a.rate:g} puts/s to etcd for "
             f"{a.seconds:g} s (etcd 3.4, one member, 127.0.0.1; `shmwatch bench "
             f"upstream --watchers {a.watchers} --rate {a.rate:g} "
             f"--seconds {a.seconds:g}`)", "",
             "| path | writes/s done | events delivered/s | of expected | watch latency p50 / p99 "
             "| etcd CPU | etcd CPU per write | broker CPU |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "puts":
            continue
        name = (f"{a.watchers} direct etcd watches" if r["kind"] == "direct"
                else f"{a.watchers} local watchers via one mirroring broker")
        per_write = 10 * r["etcd_cpu_pct"] * r["seconds"] / max(1, r["writes"])
        lines.append(f"| {name} | {r['writes'] / r['seconds']:,.0f} | {r['delivered_per_s']:,.0f} | "
                     f"{100 * r['events'] / max(1, r['expected']):.1f}% | "
                     f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f} ms | {r['etcd_cpu_pct']:.1f}% | "
                     f"{per_write:.2f} ms | "
                     + (f"{r['broker_cpu_pct']:.1f}% |" if r["kind"] == "mirror" else "- |"))
    puts = next(r for r in rows if r["kind"] == "puts")
    lines += ["", f"Sequential puts (one client, 3 s): direct gRPC {puts['direct_per_s']:,.0f}/s, "
                  f"through the mirroring broker {puts['broker_per_s']:,.0f}/s."]
    return "\n".join(lines)


def section_of(text: str) -> str:
    """The UP section of a BENCHMARKS.md text ('' if none), to keep it when the main
    report is rewritten (it comes from this tool, not from `shmwatch bench`)."""
    start = text.find(SECTION)
    if start < 0:
        return ""
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)].rstrip() + "\n"


def put_section(path: str, body: str) -> None:
    """Write (or replace) the UP section of the markdown file at `path`."""
    try:
        with open(path) as f:
            old = f.read()
    except FileNotFoundError:
        old = ""
    new = f"{SECTION}\n\n{body.rstrip()}\n"
    kept = section_of(old)
    text = old.replace(kept, new) if kept else (old.rstrip() + "\n\n" + new if old else new)
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m shmwatch.tools.bench.upstream",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--watchers", type=int, default=100)
    p.add_argument("--rate", type=float, default=200.0)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--out", default=None, metavar="FILE",
                   help="also write the figures as the UP section of this markdown file "
                        "(e.g. BENCHMARKS.md; `shmwatch bench` keeps the section)")
    a = p.parse_args(argv)
    load0 = os.getloadavg()[0]
    rows = run(a)
    text = report(rows, a) + (f"\n\nMachine load average {load0:.1f} at the start, "
                              f"{os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores).")
    print(text)
    if a.out:
        put_section(a.out, text)
    for r in rows:
        print(r, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

