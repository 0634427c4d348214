"""The project's performance targets, and whether this run met them.

Each target reads the run's figures and returns one row: what it asks, what was
measured, met (True / False / None when not measured), and an optional note. Ratios are
paired by repetition (same run, same noise), then the median is compared.
"""

from __future__ import annotations

from ..results import Run, ratios, summary
from ..workloads.latency import RATE as W3_RATE
from ..workloads.light import RATES
from ..workloads.light import variant as light_variant
from ..workloads.stall import BESIDE
from .cells import cell, fmt_num, pct_cell, ratio_cell


def _target(name: str, measured: str, met, note: str = "") -> dict:
    return {"target": name, "measured": measured, "met": met, "note": note}


def _at_least(xs: list, floor: float):
    m = summary(xs)["median"]
    return None if m is None else m >= floor


def _w1_sync(run: Run) -> dict:
    R = run.results
    me = R.get("W1", "1 writer", "shmwatch", "rate")
    rr = ratios(me, R.get("W1", "1 writer", "redis", "rate"))
    re = ratios(me, R.get("W1", "1 writer", "etcd", "rate"))
    met = None
    if rr or re:
        met = bool(rr and re and _at_least(rr, 3.0) and _at_least(re, 25.0))
    return _target("W1 synchronous puts, 1 writer: >= 3x Redis and >= 25x etcd",
                   f"{ratio_cell(rr)} Redis, {ratio_cell(re)} etcd", met)


def _w1_async(run: Run) -> dict:
    R = run.results
    r = ratios(R.get("W1", "async", "shmwatch", "rate"), R.get("W1", "async", "queue", "rate"))
    acked = R.get("W1", "async", "shmwatch", "acked")
    got = R.get("W1", "async", "shmwatch", "delivered")
    whole = bool(acked) and all(x == 1.0 for x in acked + got)
    return _target("W1 asynchronous writes (`put_async`), 1 writer: >= 1.0x "
                   "multiprocessing.Queue, zero loss, every reply delivered",
                   f"{ratio_cell(r)}; replies {pct_cell(acked)}, delivered {pct_cell(got)}",
                   None if not r else (_at_least(r, 1.0) and whole))


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
    rb = ratios(R.get("W2", "batched", "shmwatch", "rate"), zmq)
    ra = ratios(R.get("W2", "async", "shmwatch", "rate"), zmq)
    got = R.get("W2", "batched", "shmwatch", "delivered")
    return _target(f"W2 fan-out to {run.profile.fanout}, batched: >= 1.0x pyzmq's delivered "
                   "rate, zero loss",
                   f"batched {ratio_cell(rb)} (delivered {pct_cell(got)}); async {ratio_cell(ra)}",
                   None if not rb else (_at_least(rb, 1.0) and all(x == 1.0 for x in got)),
                   "shmwatch's batched write path (64 puts per txn) against zmq's send(), "
                   "which never waits and drops when a subscriber lags")


def _w3_latency(run: Run) -> dict:
    p50 = run.results.median("W3", "paced", "shmwatch", "p50")
    p99 = run.results.median("W3", "paced", "shmwatch", "p99")
    return _target(f"W3 at {W3_RATE:,.0f}/s: p50 <= 50 us and p99 <= 200 us",
                   f"p50 {fmt_num(p50, 'us')} us, p99 {fmt_num(p99, 'us')} us",
                   None if p50 is None else (p50 <= 50 and p99 <= 200))


def _light(run: Run) -> dict:
    R = run.results
    cells, met = [], None
    for rate in RATES:
        v = light_variant(rate)
        r = ratios(R.get("LIGHT", v, "shmwatch", "cpu_us_per_write"),
                   R.get("LIGHT", v, "queue", "cpu_us_per_write"))
        cells.append(f"{v}: {ratio_cell(r)}")
        if r:
            ok = summary(r)["median"] <= 1.0
            met = ok if met is None else (met and ok)
    idle = R.get("LIGHT", "idle", "shmwatch", "broker_core")
    wmax = R.get("LIGHT", "idle", "shmwatch", "watcher_core_max")
    if idle:
        cells.append(f"idle broker {summary(idle)['median']:.1%} of a core, busiest idle "
                     f"watcher {summary(wmax)['median']:.1%} (medians)")
        ok = summary(idle)["median"] < 0.005 and summary(wmax)["median"] < 0.005
        met = ok if met is None else (met and ok)
    return _target("CPU per write of all processes, paced 1,000/s and 5,000/s to 4 watchers: "
                   "<= 1.0x Queue's; idle broker and idle watchers < 0.5% of a core each",
                   "; ".join(cells), met)


def _catchup(run: Run) -> dict:
    R = run.results
    rg = ratios(R.get("CATCHUP", "catch-up client", "shmwatch", "broker_gross_us_per_event"),
                R.get("CATCHUP", "catch-up broker", "shmwatch", "broker_gross_us_per_event"))
    kept = R.get("CATCHUP", "catch-up client", "shmwatch", "fast_kept")
    exact = R.get("CATCHUP", "catch-up client", "shmwatch", "exact")
    return _target(f"mass catch-up ({run.profile.cu_watchers:,} watchers, "
                   f"{run.profile.cu_events:,} events each): broker CPU per replayed event "
                   "<= 10% of the broker's own replay; fast watchers keep >= 95%; every "
                   "stream exact",
                   f"{ratio_cell(rg)} of it (gross: all the broker's CPU meanwhile); fast kept "
                   + pct_cell(kept) + "; exact "
                   + ("yes" if exact and all(x == 1.0 for x in exact) else "NO" if exact else "-"),
                   None if not rg else (summary(rg)["median"] <= 0.10 and _at_least(kept, 0.95)
                                        and all(x == 1.0 for x in exact)))


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


def _memory(run: Run) -> dict:
    R = run.results
    stalled = next((v for v in R.variants("MEM") if "stalled" in v), None)
    last = max((int(k[5:]) for ts in R.data.get("MEM", {}).values()
                for k in ts.get("shmwatch", {}) if k.startswith("anon@")), default=None)
    if stalled is None or last is None or "0 watchers" not in R.variants("MEM"):
        return _target("Memory: the broker's heap with stalled watchers stays within 25% of "
                       "its heap without them", "-", None)
    a = R.median("MEM", stalled, "shmwatch", f"anon@{last}")
    z = R.median("MEM", "0 watchers", "shmwatch", f"anon@{last}")
    return _target("Memory: the broker's heap with stalled watchers stays within 25% of "
                   "its heap without them",
                   f"RssAnon after {last:,} writes: {fmt_num(a)} MiB with {stalled}, "
                   f"{fmt_num(z)} MiB without", None if a is None or z is None else a <= 1.25 * z)


def compute(run: Run) -> list[dict]:
    """Every target, in the order of the report's table."""
    return [_light(run), _w1_sync(run), _w1_async(run), _w1_batched(run), _w2_fanout(run),
            _w3_latency(run), _catchup(run), _w4_stalled(run), _w5_many(run), _memory(run)]
