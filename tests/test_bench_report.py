"""The report writer of tools/bench, from a canned run: BENCHMARKS.md and --json are pure
functions of the figures (no process is started here).

The canned run has two repetitions of every workload, shmwatch and two peers, one
skipped peer and one failed trial; the expected cells are worked out by hand from it.
"""

from __future__ import annotations

import json

from shmwatch.tools.bench import report
from shmwatch.tools.bench.profiles import PROFILES
from shmwatch.tools.bench.report.sections import SECTIONS
from shmwatch.tools.bench.results import Results, Run
from shmwatch.tools.bench.workloads import NAMES

MACHINE = {
    "git": "abc1234", "cpu": "Test CPU", "cores": 2, "python": "3.11.7",
    "platform": "Linux-test", "memory_gb": 8.0, "date": "2026-01-01T00:00:00+00:00",
    "command": "tools/bench --json x.json", "versions": {"msgpack": "1.0"},
    "external_at_start": [],
    "load": {"busy_pct": 80.0, "steal_pct": 0.0, "ours_pct": 75.0, "others_pct": 5.0,
             "loadavg_start": [2.0, 2.0, 2.0], "loadavg_end": [2.5, 2.0, 2.0],
             "seconds": 60.0},
}


def canned_run() -> Run:
    R = Results()
    for rep in range(2):
        k = 1.0 + rep / 10  # repetition 2 is 10% faster than repetition 1
        for v in ("1 writer", "4 writers"):
            R.add("W1", v, "shmwatch", {"rate": 20_000 * k, "delivered": 1.0,
                                        "cpu_writers": 0.5, "cpu_readers": 0.4,
                                        "cpu_server": 0.9, "cpu_us_per_record": 90.0})
            R.add("W1", v, "queue", {"rate": 100_000 * k, "delivered": 1.0})
            R.add("W1", v, "zmq", {"rate": 400_000, "delivered": 0.5})
        R.add("W1", "1 writer", "redis", {"rate": 5_000 * k, "delivered": 1.0})
        R.add("W1", "batched", "shmwatch", {"rate": 300_000 * k, "delivered": 1.0})
        R.add("W1", "async", "shmwatch", {"rate": 90_000 * k, "delivered": 1.0, "acked": 1.0})
        R.add("W1", "async", "queue", {"rate": 100_000 * k, "delivered": 1.0})
        for rate, me, q in ((1000, 500.0, 450.0), (5000, 300.0, 320.0)):
            R.add("LIGHT", f"paced {rate:,}/s", "shmwatch", {
                "cpu_us_per_write": me, "writer_us": 100.0, "readers_us": 300.0,
                "server_us": me - 400.0, "delivered": 1.0, "write_rate": rate})
            R.add("LIGHT", f"paced {rate:,}/s", "queue", {
                "cpu_us_per_write": q, "writer_us": 100.0, "readers_us": q - 100.0,
                "server_us": 0.0, "delivered": 1.0, "write_rate": rate})
        R.add("LIGHT", "idle", "shmwatch", {"broker_core": 0.003, "watcher_core_max": 0.002,
                                            "watcher_core_mean": 0.002})
        for mode, us in (("broker", 2.0), ("client", 0.1)):
            R.add("CATCHUP", f"catch-up {mode}", "shmwatch", {
                "broker_us_per_event": us, "broker_gross_us_per_event": us + 0.1,
                "watchers_us_per_event": 3.0, "catchup_s": 4.0,
                "replayed": 20_000_000, "fast_kept": 0.97, "exact": 1.0})
        R.add("W2", "sync writes", "shmwatch", {"rate": 50_000 * k, "delivered": 1.0})
        R.add("W2", "sync writes", "zmq", {"rate": 1_000_000 * k, "delivered": 1.0})
        R.add("W2", "batched", "shmwatch", {"rate": 2_000_000 * k, "delivered": 1.0})
        R.add("W3", "paced", "shmwatch", {"rate": 5000.0, "p50": 50.0, "p99": 250.0,
                                          "p999": 400.0, "samples": 30_000, "late_p99": 5.0,
                                          "late_max": 9000.0, "stalls": rep, "max": 9000.0})
        R.add("W4", "3 fast", "shmwatch", {"fast_rate": 40_000.0, "fast_delivered": 1.0})
        R.add("W4", "3 fast + 1 stalled", "shmwatch", {
            "fast_rate": 38_000.0, "fast_delivered": 1.0, "victims_entered": 2 + rep,
            "stalled_got": 1000 + rep, "sent": 1000 + rep, "stalled_all": 1.0,
            "catchup_s": 0.5})
        R.add("W4", "kept", "shmwatch", {"kept": 0.95})
        for n in (1, 10000):
            R.add("W5", f"keys {n}", "shmwatch", {
                "write_rate": 10_000.0 if n == 1 else 9_000.0, "cpu_us_per_write": 30.0,
                "delivered": 100, "expected": 100, "setup_s": 1.0})
        R.add("LEASE", "L1 expiry, idle", "shmwatch", {"p50_ms": 0.5 + rep, "p99_ms": 2.0,
                                                       "max_ms": 3.0, "n": 40})
        R.add("LEASE", "L2 release after SIGKILL", "etcd", {"p50_ms": 1000.0, "p99_ms": 1200.0,
                                                            "max_ms": 1250.0, "n": 12})
        R.add("LEASE", "L3 lock hand-over", "shmwatch", {"p50_ms": 1.5, "p99_ms": 4.0,
                                                         "max_ms": 4.5, "n": 12})
        R.add("LEASE", "L3 lock hand-over", "etcd", {"p50_ms": 12.0, "p99_ms": 30.0,
                                                     "max_ms": 31.0, "n": 12})
        R.add("LEASE", "L3 hand-over after SIGKILL", "shmwatch", {"p50_ms": 60.0, "p99_ms": 90.0,
                                                                  "max_ms": 95.0, "n": 12})
    R.add("MEM", "0 watchers", "shmwatch", {"anon@0": 15.0, "rss@0": 25.0,
                                            "anon@1000": 16.0, "rss@1000": 27.0,
                                            "write_rate": 50_000.0})
    prof = PROFILES["full"]
    return Run(profile=prof, machine=MACHINE, results=R,
               skipped={"etcd": "etcd is not installed (apt-get install etcd-server)"},
               errors=["W1 1 writer redis: redis writer 0 failed:\nTraceback (most recent)"],
               elapsed_s=600.0)


def test_every_workload_has_a_report_section_in_workload_order():
    assert tuple(SECTIONS) == NAMES


def test_markdown_of_a_canned_run():
    md = report.markdown(canned_run())
    lines = md.splitlines()
    assert lines[0] == "# shmwatch benchmarks"
    assert "- Code: abc1234" in lines
    assert "- Skipped etcd 3.4 watch (JSON gateway): etcd is not installed " \
           "(apt-get install etcd-server)" in lines
    assert any(ln.startswith("- Command: `tools/bench --json x.json` (profile `full`: "
                             "3 repetitions, 3 s of writing per throughput trial")
               for ln in lines)
    # no machine path, no issue number: the report stands on its own
    assert "/work/" not in md and "issue" not in md.lower()
    heads = [ln for ln in lines if ln.startswith("## ")]
    assert [h.split()[1] for h in heads] == [
        "Machine", "Targets", "W1", "W2", "W3", "W4", "W5", "Memory:", "LIGHT:", "CATCHUP:",
        "LEASE:", "Where", "Failed"]
    assert "| L1 expiry, idle | shmwatch | 1.0 (0.5–1.5) | 2.0 (2.0–2.0) | 3.0 (3.0–3.0) | 40 |" in lines
    assert ("| L2 release after SIGKILL | etcd 3.4 watch (JSON gateway) | 1,000 (1,000–1,000) | "
            "1,200 (1,200–1,200) | 1,250 (1,250–1,250) | 12 |") in lines
    # L3 after L2, each transport's row in transport order
    l3 = [ln for ln in lines if ln.startswith("| L3 ")]
    assert l3 == [
        "| L3 lock hand-over | shmwatch | 1.5 (1.5–1.5) | 4.0 (4.0–4.0) | 4.5 (4.5–4.5) | 12 |",
        "| L3 lock hand-over | etcd 3.4 watch (JSON gateway) | 12.0 (12.0–12.0) | "
        "30.0 (30.0–30.0) | 31.0 (31.0–31.0) | 12 |",
        "| L3 hand-over after SIGKILL | shmwatch | 60.0 (60.0–60.0) | 90.0 (90.0–90.0) | "
        "95.0 (95.0–95.0) | 12 |"]
    assert lines.index(l3[0]) > lines.index(next(ln for ln in lines if ln.startswith("| L2 ")))
    assert "**L3 lock hand-over**" in md and "`/v3/lock/lock`" in md
    # W1: medians (min–max) over the 2 repetitions, rows in transport order
    assert "| transport | 1 writer | 4 writers | batched | async |" in lines
    assert ("| shmwatch | 21k (20k–22k) | 21k (20k–22k) | 315k (300k–330k) | 94k (90k–99k) |"
            in lines)
    assert ("| multiprocessing.Queue | 105k (100k–110k) | 105k (100k–110k) | - | "
            "105k (100k–110k) |") in lines
    # ratios are paired by repetition: 20k/100k and 22k/110k are both 0.20
    assert ("| multiprocessing.Queue | 0.20x (0.20–0.20) | 0.20x (0.20–0.20) | - | "
            "0.90x (0.90–0.90) |") in lines
    assert "| pyzmq PUB/SUB (ipc) | 0.05x (0.05–0.06) | 0.05x (0.05–0.06) | - | - |" in lines
    assert ("| shmwatch | 0.50 / 0.40 / 0.90 | 90.0 | 0.50 / 0.40 / 0.90 | 90.0 | - | - | - | - |"
            in lines)
    assert ("shmwatch `put_async`: replies received for 100% (100–100) of the writes sent "
            "(every write acknowledged, none lost).") in lines
    assert ("| catch-up client | 0.1 (0.1–0.1) | 0.2 (0.2–0.2) | 3.0 (3.0–3.0) | 4.00 (4.00–4.00) | "
            "97% (97–97) | yes |") in lines
    assert ("- pyzmq PUB/SUB (ipc) (1 writer) dropped records: it delivered 50.0% of them "
            "in the worst repetition.") in lines
    # targets: met, not met, not measured
    assert ("| W1 synchronous puts, 1 writer: >= 3x Redis and >= 25x etcd | "
            "4.00x (4.00–4.00) Redis, - etcd | **not met** |") in lines
    assert ("| W1 asynchronous writes (`put_async`), 1 writer: >= 1.0x multiprocessing.Queue, "
            "zero loss, every reply delivered | 0.90x (0.90–0.90); replies 100% (100–100), "
            "delivered 100% (100–100) | **not met** |") in lines
    assert ("| CPU per write of all processes, paced 1,000/s and 5,000/s to 4 watchers: "
            "<= 1.0x Queue's; idle broker and idle watchers < 0.5% of a core each | "
            "paced 1,000/s: 1.11x (1.11–1.11); paced 5,000/s: 0.94x (0.94–0.94); idle broker "
            "0.3% of a core, busiest idle watcher 0.2% (medians) | **not met** |") in lines
    assert any(ln.startswith("| mass catch-up (1,000 watchers, 10,000 events each)")
               and "0.10x (0.10–0.10) of it (gross: all the broker's CPU meanwhile); fast kept "
               "97% (97–97); exact yes | **met** |" in ln
               for ln in lines)
    assert ("| Memory: the broker's heap with stalled watchers stays within 25% of its heap "
            "without them | - | not measured |") in lines
    assert ("| W1 batched write path (txn of 64 puts): >= 250k events/s | "
            "315k (300k–330k) events/s | **met** |") in lines
    assert ("| W2 fan-out to 8, batched: >= 1.0x pyzmq's delivered rate, zero loss | batched "
            "2.00x (2.00–2.00) (delivered 100% (100–100)); async - | **met** |") in lines
    assert ("| W3 at 5,000/s: p50 <= 50 us and p99 <= 200 us | p50 50.0 us, p99 250 us | "
            "**not met** |") in lines
    assert any(ln.startswith("| W4: fast watchers keep >= 90%") and "kept 95% (95–95)" in ln
               and "1,000/1,000, 1,001/1,001" in ln and ln.endswith("**met** |")
               for ln in lines)
    assert ("| W5: write rate with 10,000 single-key watchers >= 80% of that with 1 | "
            "90% (90–90) | **met** |") in lines
    # W3, W4, W5, MEM rows
    assert ("| shmwatch | 5.0k | 50.0 (50.0–50.0) | 250 (250–250) | 400 (400–400) | "
            "9,000 (9,000–9,000) | 30k | 5.0 (5.0–5.0) | 0, 1 |") in lines
    assert ("| shmwatch | 40k (40k–40k) | 38k (38k–38k) | 95% (95–95) | "
            "1,000/1,000, 1,001/1,001 | 0.50 (0.50–0.50) |") in lines
    assert "victim entries per repetition 2, 3" in md
    assert "`broker.spawn(watch_ring_bytes=64<<10, log_bytes=256<<20)`" in md
    assert ("| keys 10000 | 9.0k (9.0k–9.0k) | 30.0 (30.0–30.0) | 100/100, 100/100 | "
            "1.00 (1.00–1.00) |") in lines
    assert "- keys: write rate with 10,000 watchers / with 1: 0.90x (0.90–0.90)" in lines
    assert "| broker | after 0 writes | after 1,000 writes |" in lines
    assert "| 0 watchers (RssAnon / VmRSS) | 15.0 / 25.0 MiB | 16.0 / 27.0 MiB |" in lines
    # a failed trial: its first line only
    assert lines[-3:] == ["", "- W1 1 writer redis: redis writer 0 failed:", ""]


def test_json_round_trip_rewrites_the_same_report():
    run = canned_run()
    doc = json.loads(json.dumps(report.as_json(run), default=str))
    assert list(doc) == ["machine", "profile", "skipped", "errors", "elapsed_s", "targets",
                         "workloads"]
    figs = doc["workloads"]["W1"]["1 writer"]["shmwatch"]["rate"]
    assert figs == {"values": [20_000.0, 22_000.0], "median": 21_000.0, "min": 20_000.0,
                    "max": 22_000.0, "n": 2}
    again = report.run_from_json(doc)
    assert report.markdown(again) == report.markdown(run)
    assert json.loads(json.dumps(report.as_json(again), default=str)) == doc


def test_a_workload_without_figures_has_no_section():
    run = canned_run()
    del run.results.data["W3"], run.results.data["MEM"]
    md = report.markdown(run)
    assert "## W3" not in md and "## Memory" not in md
    assert "| W3 at 5,000/s: p50 <= 50 us and p99 <= 200 us | p50 - us, p99 - us | " \
           "not measured |" in md.splitlines()


def test_the_report_is_rewritten_from_a_json_document(tmp_path):
    """`tools/bench --from-json FILE` measures nothing and writes the report of that run
    (as this version of the report code writes it), the analysis of unmet targets in it."""
    from shmwatch.tools.bench.cli import main

    run = canned_run()
    src = tmp_path / "run.json"
    src.write_text(json.dumps(report.as_json(run), default=str))
    out = tmp_path / "B.md"
    assert main(["--from-json", str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert text == report.markdown(report.run_from_json(json.loads(src.read_text()))) + ""
    assert "## Where the time goes (targets not met)" in text
