"""One BENCHMARKS.md section per workload: what was run, in words, then its tables.

SECTIONS maps a workload's name to a function of the run returning the section's lines
(ending with a blank line); the report calls it only when the workload has figures. The
sizes and options named in the text come from the profile and the workloads' own
constants, so the text says what ran.
"""

from __future__ import annotations

import functools

from ..results import Run, ratios, summary
from ..transports import LABELS, ORDER
from ..transports.etcd_watch import ETCD_IDLE_S, ETCD_PACE
from ..workloads import catchup, lease, light, many_watchers, memory, stall, throughput
from ..workloads.latency import RATE as W3_RATE
from .cells import cell, cpu_table, fmt_num, loss_lines, pct_cell, ratio_cell, ratio_table, table


def _present(run: Run, wl: str, variants) -> list[str]:
    return [v for v in variants if v in run.results.variants(wl)]


def _opts(opts: dict) -> str:
    """broker options as written in code: watch_ring_bytes=16<<10, log_bytes=16<<20."""
    def size(n: int) -> str:
        for shift in (20, 10):
            if n >= 1 << shift and n % (1 << shift) == 0:
                return f"{n >> shift}<<{shift}"
        return str(n)

    return ", ".join(f"{k}={size(v)}" for k, v in opts.items())


def w1(run: Run) -> list[str]:
    R = run.results
    vs = _present(run, "W1", throughput.Unicast.VARIANTS)
    L = ["## W1 unicast put -> watch (records/s delivered to 1 watcher process)", "",
         "`1 writer`, `4 writers`: synchronous writes, one at a time per writer "
         "(shmwatch `put` waits for its reply; etcd `/v3/kv/put`; Redis `PUBLISH`; "
         "Queue `put` and zmq `send` do not wait). `batched`: 64 records per call "
         "(shmwatch `txn` of 64 puts = one revision of 64 events; etcd `/v3/kv/txn` "
         "of 64 puts; Redis a pipeline of 64 publishes). `pipelined`: 64 separate writes "
         "sent in one go, each its own revision (shmwatch `put_many` of 64: one broker "
         "wake-up, 64 replies; Redis the same pipeline of 64 publishes). `async`: one "
         "write per record, not waiting for its reply (shmwatch `put_async`, at most "
         "1,024 in flight, the writer done once every reply came; Queue `put`, which "
         "never has a reply).", ""]
    L += table(R, "W1", vs, "rate")
    L += ratio_table(R, "W1", vs, "rate")
    L += cpu_table(R, "W1", vs, run.machine["cores"])
    acked = R.get("W1", "async", "shmwatch", "acked")
    if acked:
        L += ["", f"shmwatch `put_async`: replies received for {pct_cell(acked)} of the "
              "writes sent (every write acknowledged, none lost)."]
    return L + loss_lines(R, "W1", vs) + [""]


def w2(run: Run) -> list[str]:
    R = run.results
    vs = _present(run, "W2", throughput.FanOut.VARIANTS)
    L = [f"## W2 fan-out: 1 writer -> {run.profile.fanout} watcher processes on one prefix "
         "(total records/s delivered)", ""]
    L += table(R, "W2", vs, "rate")
    L += ratio_table(R, "W2", vs, "rate")
    L += cpu_table(R, "W2", vs, run.machine["cores"])
    rb = ratios(R.get("W2", "batched", "shmwatch", "rate"),
                R.get("W2", "sync writes", "zmq", "rate"))
    if rb:
        L += ["", f"shmwatch batched / pyzmq: {ratio_cell(rb)} (zmq has no separate "
              "batched path: its `send` never waits)."]
    return L + loss_lines(R, "W2", vs) + [""]


def w3(run: Run) -> list[str]:
    L = ["## W3 one-way latency at a paced rate (us)", "",
         "The writer stamps the intended send time of record i (start + i/rate) "
         "into the value and sends it then (or at once if late); the watcher "
         "computes receive time minus intended time, so a stall of the writer or "
         "the transport counts against every record it delays (no coordinated "
         f"omission). shmwatch and the peers at {W3_RATE:,.0f}/s, etcd at {ETCD_PACE:,.0f}/s. "
         "`writer late p99` is how late the writer itself sent (sleep granularity, CPU "
         "contention, a synchronous write that blocked), included in the figures; "
         "`writer stalls` counts, per repetition, the episodes where the writer fell "
         "more than 5 ms behind its schedule: one such stall delays every record "
         "scheduled during it, so a single one can decide p99 and p99.9.", "",
         "| transport | rate /s | p50 | p99 | p99.9 | max | samples | writer late p99 "
         "| writer stalls > 5 ms |",
         "|---|---|---|---|---|---|---|---|---|"]
    for tn in run.results.transports("W3", ORDER):
        g = functools.partial(run.results.get, "W3", "paced", tn)
        L.append(f"| {LABELS[tn]} | {fmt_num(summary(g('rate'))['median'])} | "
                 f"{cell(g('p50'), 'us')} | {cell(g('p99'), 'us')} | "
                 f"{cell(g('p999'), 'us')} | {cell(g('max'), 'us')} | "
                 f"{fmt_num(summary(g('samples'))['median'])}"
                 f" | {cell(g('late_p99'), 'us')} | "
                 f"{', '.join(str(x) for x in g('stalls')) or '-'} |")
    return L + [""]


def w4(run: Run) -> list[str]:
    R, P = run.results, run.profile
    alone, beside = stall.ALONE, stall.BESIDE
    opts = {"watch_ring_bytes": stall.RING_BYTES, "log_bytes": P.stall_log_bytes}
    L = ["## W4 one stalled watcher beside 3 fast ones", "",
         "Run back to back, in alternating order across repetitions. "
         "1 writer (its fastest path: shmwatch 64-put txns, Redis pipelines of 64, "
         "etcd 64-put txns, Queue/zmq one record per call) to 4 watcher processes on "
         "one prefix; the stalled one reads nothing until the writer is done and the "
         "fast ones have finished, then reads until it has every record (or nothing "
         f"came for {P.idle_s:g} s; etcd {ETCD_IDLE_S:g} s). shmwatch here: "
         f"`broker.spawn({_opts(opts)})`, so the stalled "
         "watcher's ring fills and it becomes a victim that replays from the log.", "",
         "| transport | fast watcher rate, 3 fast | with 1 stalled | kept | "
         "stalled one got (per repetition) | its catch-up (s) |",
         "|---|---|---|---|---|---|"]
    for tn in R.transports("W4", ORDER):
        g = functools.partial(R.get, "W4", transport=tn)
        got, sent = g(beside, metric="stalled_got"), g(beside, metric="sent")
        gs = ", ".join(f"{x:,}/{y:,}" for x, y in zip(got, sent)) or "-"
        L.append(f"| {LABELS[tn]} | {cell(g(alone, metric='fast_rate'))} | "
                 f"{cell(g(beside, metric='fast_rate'))} | "
                 f"{pct_cell(g('kept', metric='kept'))} | {gs} | "
                 f"{cell(g(beside, metric='catchup_s'))} |")
    ve = R.get("W4", beside, "shmwatch", "victims_entered")
    if ve:
        L += ["", "shmwatch broker counters (`broker.admin.read_stats`), with the "
              "stalled watcher: victim entries per repetition "
              + ", ".join(str(x) for x in ve) + " (0 would mean the stalled watcher "
              "never filled its ring and the test did not exercise victims)."]
    fl = []
    for tn in R.transports("W4", ORDER):
        for v in (alone, beside):
            d = R.get("W4", v, tn, "fast_delivered")
            if d and min(d) < 1.0:
                fl.append(f"{LABELS[tn]} ({v}): the fast watchers got only "
                          f"{min(d) * 100:.1f}% of the records in the worst repetition")
    if fl:
        L += [""] + ["- " + x for x in fl]
    return L + [""]


def w5(run: Run) -> list[str]:
    R, P = run.results, run.profile
    L = ["## W5 many watchers (shmwatch)", "",
         f"N watches (single keys, or ranges of {many_watchers.RANGE_KEYS} keys) held by "
         f"min(N, {P.w5_procs}) processes (many watches per client), broker "
         f"`{_opts(many_watchers.BROKER_OPTS)}`; one writer puts synchronously for "
         f"{P.w5_dur:g} s, 1 write in {many_watchers.HIT_EVERY} to a watched key (round "
         "robin), the rest to keys nobody watches (for ranges: between the ranges). The "
         "writer alternates between the brokers of all watcher counts in "
         f"{many_watchers.SLICE_S:g} s slices (order rotated each cycle), so the counts are "
         "compared under the same noise. Broker CPU is the broker's on-CPU time "
         "(/proc/<pid>/schedstat) during its slices, per write.",
         "", "| watchers | write rate /s | broker CPU per write (us) | "
         "events delivered / expected | set-up (s) |", "|---|---|---|---|---|"]
    for v in R.variants("W5"):
        g = functools.partial(R.get, "W5", v, "shmwatch")
        dl = ", ".join(f"{a}/{e}" for a, e in zip(g("delivered"), g("expected")))
        L.append(f"| {v} | {cell(g('write_rate'))} | {cell(g('cpu_us_per_write'), 'us')}"
                 f" | {dl} | {cell(g('setup_s'))} |")
    big = max(P.w5_counts, default=1)
    for kind in many_watchers.KINDS:
        r = ratios(R.get("W5", f"{kind} {big}", "shmwatch", "write_rate"),
                   R.get("W5", f"{kind} 1", "shmwatch", "write_rate"))
        if r:
            L += ["", f"- {kind}: write rate with {big:,} watchers / with 1: {ratio_cell(r)}"]
    return L + [""]


def _mem_points(run: Run) -> list[int]:
    """The write counts at which the broker's memory was read."""
    pts = set()
    for ts in run.results.data.get("MEM", {}).values():
        pts |= {int(k[5:]) for k in ts.get("shmwatch", {}) if k.startswith("anon@")}
    return sorted(pts)


def mem(run: Run) -> list[str]:
    R, P = run.results, run.profile
    pts = _mem_points(run)
    opts = memory.BROKER_OPTS
    L = ["## Memory: broker RSS with stalled watchers (shmwatch)", "",
         f"{P.mem_watchers:,} watchers on one prefix in {memory.HOLDERS} processes that "
         f"never read (each becomes a victim once its {opts['watch_ring_bytes'] >> 10} KiB "
         "ring is full: it keeps one pending response and replays from the log later), "
         f"while one writer commits {P.mem_writes:,} puts (txns of 64, {memory.KEYS:,} "
         f"distinct keys); broker with `{_opts({'log_bytes': opts['log_bytes']})}` so the "
         "log wraps and compacts. Beside it the same writes with no watcher. RssAnon is "
         "the broker's private memory (heap); VmRSS adds the shared-memory pages it "
         "touched (log, rings). Measured once per run.",
         "", "| broker | " + " | ".join(f"after {w:,} writes" for w in pts) + " |",
         "|---|" + "---|" * len(pts)]
    for v in R.variants("MEM"):
        cells = []
        for w in pts:
            a = R.median("MEM", v, "shmwatch", f"anon@{w}")
            r = R.median("MEM", v, "shmwatch", f"rss@{w}")
            cells.append("-" if a is None else f"{a:.1f} / {r:.1f} MiB")
        L.append(f"| {v} (RssAnon / VmRSS) | " + " | ".join(cells) + " |")
    return L + [""]


def light_load(run: Run) -> list[str]:
    R, P = run.results, run.profile
    L = ["## LIGHT: CPU at a modest load, and idle", "",
         f"A writer paced at each rate for {P.light_dur:g} s (sent at its intended times, "
         f"as in W3) to {light.READERS} watcher processes that each get every record "
         "(shmwatch: one prefix watch each; Queue: the writer puts each record into "
         f"{light.READERS} queues, its feeder thread included; zmq: PUB to "
         f"{light.READERS} SUBs; Redis: PUBLISH to {light.READERS} subscribers). CPU "
         "microseconds of every process involved (writer, readers, and the server: "
         "the shmwatch broker, redis-server), per record written, and shmwatch's ratio "
         "to multiprocessing.Queue's, paired by repetition.", "",
         "| rate | transport | CPU us per write | writer / readers / server | "
         "x Queue's | delivered |", "|---|---|---|---|---|---|"]
    for rate in light.RATES:
        v = light.variant(rate)
        for tn in R.transports("LIGHT", ORDER):
            g = functools.partial(R.get, "LIGHT", v, tn)
            if not g("cpu_us_per_write"):
                continue
            r = ratios(g("cpu_us_per_write"), R.get("LIGHT", v, "queue", "cpu_us_per_write"))
            parts = " / ".join(fmt_num(summary(g(m))["median"], "us")
                               for m in ("writer_us", "readers_us", "server_us"))
            L.append(f"| {v} | {LABELS[tn]} | {cell(g('cpu_us_per_write'), 'us')} | {parts} "
                     f"| {ratio_cell(r) if tn != 'queue' else '-'} "
                     f"| {pct_cell(g('delivered'))} |")
    idle = R.get("LIGHT", "idle", "shmwatch", "broker_core")
    if idle:
        wmax = R.get("LIGHT", "idle", "shmwatch", "watcher_core_max")
        L += ["", f"Idle (shmwatch, nothing written for {light.IDLE_S:g} s, "
              f"{light.READERS} watchers waiting in `Watch.get`): broker "
              f"{pct_cell(idle)} of a core, busiest watcher {pct_cell(wmax)}."]
    return L + [""]


def mass_catchup(run: Run) -> list[str]:
    R, P = run.results, run.profile
    L = ["## CATCHUP: mass catch-up (shmwatch)", "",
         f"{P.cu_watchers:,} watchers of one prefix, in {P.w5_procs} processes, read "
         f"nothing while {P.cu_events:,} events are written to it (txns of "
         f"{catchup.BATCH}); their 16 KiB rings fill and they become victims. Then all "
         "resume at once and read their whole backlog (each process waits on its watches "
         "with `clientlib.wait_any`), while a writer paced at "
         f"{catchup.PACE:,.0f}/s writes beside that prefix to {catchup.FAST} fast watcher "
         "processes reading everything live. `--catch-up broker`: the broker replays "
         "every victim's backlog; `--catch-up client` (the default): each watcher reads "
         "its backlog from the shared revision log itself. Broker CPU from the resume "
         "until every stalled watcher has its backlog, per replayed event (watchers x "
         "events): `gross` as measured, `net` less the broker's CPU for the paced live "
         f"load alone (measured for {catchup.BASELINE_S:g} s just before the resume, same "
         "rate). `fast kept`: the share of the paced records written during the "
         "catch-up that the fast watchers received during it; `exact`: every stream "
         "(stalled and fast) held every event once, in order.",
         "", "| catch-up by | broker CPU us per replayed event, net | gross | watchers' CPU "
         "us per event | catch-up (s) | fast kept | exact |",
         "|---|---|---|---|---|---|---|"]
    for v in R.variants("CATCHUP"):
        g = functools.partial(R.get, "CATCHUP", v, "shmwatch")
        ex = g("exact")
        L.append(f"| {v} | {cell(g('broker_us_per_event'), 'us')} | "
                 f"{cell(g('broker_gross_us_per_event'), 'us')} | "
                 f"{cell(g('watchers_us_per_event'), 'us')} | {cell(g('catchup_s'))} | "
                 f"{pct_cell(g('fast_kept'))} | "
                 f"{'yes' if ex and all(x == 1.0 for x in ex) else 'NO'} |")
    for fig, what in (("broker_us_per_event", "net"), ("broker_gross_us_per_event", "gross")):
        r = ratios(R.get("CATCHUP", "catch-up client", "shmwatch", fig),
                   R.get("CATCHUP", "catch-up broker", "shmwatch", fig))
        if r:
            L += ["", f"Broker CPU per replayed event ({what}), watchers' own catch-up / "
                  f"the broker's: {ratio_cell(r)}."]
    return L + [""]


def leases(run: Run) -> list[str]:
    R, P = run.results, run.profile
    L = ["## LEASE: how soon a lease's keys go, and a lock to its next holder (ms)", "",
         f"**L1 expiry lag**: {P.lease_n} leases of TTL {lease.TTL} s (the minimum of both: "
         "the broker with `min_lease_ttl=1`, etcd with its 100 ms election timeout) "
         f"granted one after another over {P.lease_spread_s:g} s, each with one key; a "
         "watch of their prefix stamps each DELETE on arrival; the lag is that arrival "
         "minus the lease's deadline (grant request midpoint + TTL). etcd looks for "
         "expired leases every 500 ms and revokes them through raft; the broker sleeps "
         "no later than the next deadline. Idle, and with one process writing "
         "synchronously to other keys as fast as it can. "
         f"**L2 release lag after SIGKILL**: {P.lease_holders} holder processes each hold "
         "a lease with one key and are SIGKILLed one by one; the lag is the DELETE's "
         "arrival minus the kill. shmwatch: a lease bound to the holder's process "
         "(`lease_grant(0, bound=True)`), released when the broker sees the process die. "
         f"etcd has no bound lease: its holder keeps a {lease.TTL} s lease alive every "
         "TTL/3 as clientv3 does, so the key goes when the TTL runs out after the kill "
         "(what an etcd user gets at the shortest TTL). "
         "**L3 lock hand-over**: two processes take turns holding one lock, "
         f"{P.lease_holders} hand-overs; the holder waits until the other's key is in the "
         f"lock's queue (and {lease.SETTLE_S * 1000:.0f} ms more: the waiter is blocked in "
         "acquire, and etcd's waiter watch, begun unsynced at an older revision, synced by "
         "etcd's 100 ms resync loop), stamps and calls release; the figure is from that stamp to the "
         "waiter's acquire returning (CLOCK_MONOTONIC in both processes). shmwatch: "
         "`clientlib.concurrency.Lock` with its default bound session (a bound lease per "
         "acquisition, revoked by release); etcd: its lock service through the JSON gateway "
         "(`/v3/lock/lock` with each process's lease, `/v3/lock/unlock`), whose waiter is "
         "etcd's Mutex in the server watching its predecessor's key. "
         f"**L3 hand-over after SIGKILL**: {P.lease_holders} locks, each held by one process "
         "with another blocked in acquire behind it; the holders are SIGKILLed one by one; "
         "the figure is from the kill to the waiter's acquire returning. shmwatch: the bound "
         "session goes when the broker sees the holder die; etcd: the holder's lock lease "
         f"is a {lease.TTL} s lease kept alive every TTL/3, so the lock passes when it runs "
         "out.", "",
         "| figure | transport | p50 | p99 | max | leases (hand-overs) per trial |",
         "|---|---|---|---|---|---|"]
    for v in lease.VARIANTS:
        for tn in R.transports("LEASE", ORDER):
            g = functools.partial(R.get, "LEASE", v, tn)
            if not g("n"):
                continue
            L.append(f"| {v} | {LABELS[tn]} | {cell(g('p50_ms'), 'us')} | "
                     f"{cell(g('p99_ms'), 'us')} | {cell(g('max_ms'), 'us')} | "
                     f"{summary(g('n'))['median']:.0f} |")
    return L + [""]


SECTIONS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4, "W5": w5, "MEM": mem,
            "LIGHT": light_load, "CATCHUP": mass_catchup, "LEASE": leases}
