"""The project's performance targets, and whether this run met them.

Each target reads the run's figures and returns one row: what it asks, what was
measured, met (True / False / None when not measured), and an optional note. Ratios are
paired by repetition (same run, same noise), then the median is compared.
"""

from __future__ import annotations

from ..results import Run, ratios, summary
from ..workloads.latency import RATE as W3_RATE
from ..workloads.stall import BESIDE
from .cells import cell, fmt_num, pct_cell, ratio_cell


def _target(name: str, measured: str, met, note: str = "") -> dict:
    return {"target": name, "measured": measured, "met": met, "note": note}


def _at_least(xs: list, floor: float):
    m = summary(xs)["median"]
    return None if m is None else m >= floor


def _w1_against(run: Run, peer: str, label: str, floor: float) -> dict:
    R = run.results
    r = ratios(R.get("W1", "4 writers", "shmwatch", "rate"), R.get("W1", "4 writers", peer, "rate"))
    return _target(f"W1, 4 writers, synchronous puts: >= {floor:g}x {label}", ratio_cell(r),
                   _at_least(r, floor))


def _w1_batched(run: Run) -> dict:
    R = run.results
    pipe = R.get("W1", "pipelined", "shmwatch", "rate")
    m = R.median("W1", "batched", "shmwatch", "rate")
    return _target("W1 batched write path (txn of 64 puts): >= 250k events/s",
                   cell(R.get("W1", "batched", "shmwatch", "rate")) + " events/s"
                   + (f" (pipelined `put_many` of 64: {cell(pipe)} events/s)" if pipe else ""),
                   None if m is None else m >= 250_000)


def _w2_fanout(run: Run) -> dict:
    R = run.results
    zmq = R.get("W2", "sync writes", "zmq", "rate")
    rs = ratios(R.get("W2", "sync writes", "shmwatch", "rate"), zmq)
    rb = ratios(R.get("W2", "batched", "shmwatch", "rate"), zmq)
    best = rb if summary(rb)["median"] is not None else rs
    return _target(f"W2 fan-out to {run.profile.fanout}: >= 1.5x pyzmq total delivered",
                   f"batched writes {ratio_cell(rb)}; synchronous puts {ratio_cell(rs)}",
                   _at_least(best, 1.5),
                   "shmwatch's batched write path (64 puts per txn) against zmq's send(), "
                   "which never waits either")


def _w3_latency(run: Run) -> dict:
    p50 = run.results.median("W3", "paced", "shmwatch", "p50")
    p99 = run.results.median("W3", "paced", "shmwatch", "p99")
    return _target(f"W3 at {W3_RATE:,.0f}/s: p50 <= 60 us and p99 <= 300 us",
                   f"p50 {fmt_num(p50, 'us')} us, p99 {fmt_num(p99, 'us')} us",
                   None if p50 is None else (p50 <= 60 and p99 <= 300))


def _w4_stalled(run: Run) -> dict:
    R = run.results
    kept = R.get("W4", "kept", "shmwatch", "kept")
    allg = R.get("W4", BESIDE, "shmwatch", "stalled_all")
    km = summary(kept)["median"]
    got = R.get("W4", BESIDE, "shmwatch", "stalled_got")
    sent = R.get("W4", BESIDE, "shmwatch", "sent")
    return _target("W4: fast watchers keep >= 90% of their rate beside a stalled one; the "
                   "stalled one gets every event",
                   f"kept {pct_cell(kept)} of their rate; stalled got "
                   + ", ".join(f"{g:,}/{s:,}" for g, s in zip(got, sent)),
                   None if km is None or not allg
                   else (km >= 0.9 and all(x == 1.0 for x in allg)))


def _w5_many(run: Run) -> dict:
    r = ratios(run.results.get("W5", "keys 10000", "shmwatch", "write_rate"),
               run.results.get("W5", "keys 1", "shmwatch", "write_rate"))
    return _target("W5: write rate with 10,000 single-key watchers >= 80% of that with 1",
                   pct_cell(r), _at_least(r, 0.8))


def compute(run: Run) -> list[dict]:
    """Every target, in the order of the report's table."""
    return [_w1_against(run, "queue", "multiprocessing.Queue", 2.0),
            _w1_against(run, "etcd", "etcd", 50.0),
            _w1_batched(run), _w2_fanout(run), _w3_latency(run), _w4_stalled(run),
            _w5_many(run)]
