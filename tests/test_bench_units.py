"""The pure parts of tools/bench: statistics over repetitions, number formatting, the
writer's lateness and a trial's CPU accounting, etcd's streamed JSON, the record and
W5 key layouts, and the import rule of the tool's modules. No process is started."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from shmwatch.tools.bench import record
from shmwatch.tools.bench.report.cells import cell, fmt_num, pct_cell, ratio_cell
from shmwatch.tools.bench.results import Results, pctl, rate, ratios, summary
from shmwatch.tools.bench.transports import CLASSES, LABELS, PEERS
from shmwatch.tools.bench.transports.etcd_watch import ChunkedJson, prefix_end
from shmwatch.tools.bench.trials import STALL_NS, cpu_figures, lateness
from shmwatch.tools.bench.workloads import many_watchers, memory

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ statistics


def test_summary_is_median_min_max_of_the_values_that_exist():
    assert summary([3.0, 1.0, 2.0, None, math.nan]) == {"median": 2.0, "min": 1.0,
                                                        "max": 3.0, "n": 3}
    assert summary([4, 1]) == {"median": 2.5, "min": 1, "max": 4, "n": 2}
    assert summary([None]) == {"median": None, "min": None, "max": None, "n": 0}


def test_ratios_pair_repetitions_and_skip_missing_or_zero_sides():
    assert ratios([10, 30, 5], [5, 10, 5]) == [2.0, 3.0, 1.0]
    assert ratios([10, 0, None, 8], [5, 10, 4, 0]) == [2.0]
    assert ratios([1, 2, 3], [1]) == [1.0]  # a peer that ran fewer repetitions
    assert ratios([], [1, 2]) == []


def test_pctl_is_nearest_rank():
    xs = list(range(1, 101))
    assert pctl(xs, 50) == 50.0
    assert pctl(xs, 99) == 99.0
    assert pctl(xs, 99.9) == 100.0
    assert pctl(xs, 100) == 100.0
    assert pctl([7], 50) == 7.0
    assert math.isnan(pctl([], 50))


def test_rate_from_first_send_to_last_receipt():
    assert rate(1000, 0, 500_000_000) == 2000.0
    assert rate(0, 0, 10) == 0.0
    assert rate(10, 5, 5) == 0.0  # nothing received after the start


def test_results_keep_one_value_per_repetition_in_recording_order():
    R = Results()
    R.add("W1", "1 writer", "queue", {"rate": 2.0})
    R.add("W1", "1 writer", "shmwatch", {"rate": 1.0, "delivered": 1.0})
    R.add("W1", "1 writer", "shmwatch", {"rate": 3.0})
    assert R.get("W1", "1 writer", "shmwatch", "rate") == [1.0, 3.0]
    assert R.median("W1", "1 writer", "shmwatch", "rate") == 2.0
    assert R.get("W1", "1 writer", "zmq", "rate") == []
    assert R.get("W9", "x", "shmwatch", "rate") == []
    assert R.transports("W1", ("shmwatch", "queue", "zmq")) == ["shmwatch", "queue"]
    assert "W1" in R and "W2" not in R


# ------------------------------------------------------------------ formatting


@pytest.mark.parametrize("x, unit, text", [
    (None, "", "-"), (1_480_000, "", "1.48M"), (21_345, "", "21k"), (1_234, "", "1.2k"),
    (60.8, "", "61"), (0.26, "", "0.26"), (60.84, "us", "60.8"), (195.4, "us", "195"),
    (12_345.0, "us", "12,345")])
def test_fmt_num(x, unit, text):
    assert fmt_num(x, unit) == text


def test_cells_show_the_median_and_the_range_only_with_several_repetitions():
    assert cell([]) == "-"
    assert cell([21_000]) == "21k"
    assert cell([20_000, 22_000, 21_000]) == "21k (20k–22k)"
    assert pct_cell([1.03, 0.79, 1.13]) == "103% (79–113)"
    assert pct_cell([0.9]) == "90%"
    assert ratio_cell([0.26, 0.23, 0.28]) == "0.26x (0.23–0.28)"
    assert ratio_cell([]) == "-"


# ------------------------------------------------------------------ trials


def test_lateness_counts_stall_episodes_not_late_records():
    ms = 1_000_000
    late = [0, 6 * ms, 7 * ms, 0, 6 * ms, 1 * ms, 2 * ms]
    got = lateness(late)
    assert got["stalls"] == 2
    assert got["late_max_us"] == 7000.0
    assert got["late_p50_us"] == 2000.0  # nearest rank: the 4th of 7
    assert STALL_NS == 5 * ms
    assert lateness([])["stalls"] == 0


def test_cpu_figures_split_by_role_and_per_record():
    res = {"start": 0, "write_s": 2.0, "server_cpu_s": 1.5, "server_span_s": 3.0,
           "writers": [{"cpu_s": 1.0}, {"cpu_s": 1.0}],
           "readers": [{"cpu_s": 2.0, "count": 500, "last": 4_000_000_000, "began": 1},
                       {"cpu_s": 1.0, "count": 500, "last": 0, "began": 2_000_000_000}]}
    got = cpu_figures(res)
    assert got == {"cpu_writers": 1.0, "cpu_readers": 0.75, "cpu_server": 0.5,
                   "cpu_us_per_record": pytest.approx(6.5 / 1000 * 1e6)}
    del res["server_cpu_s"], res["server_span_s"]  # no process in between (Queue, zmq)
    for r in res["readers"]:
        r["count"] = 0
    assert set(cpu_figures(res)) == {"cpu_writers", "cpu_readers"}


# ------------------------------------------------------------------ transports


def test_every_transport_is_named_and_labelled_once():
    assert list(CLASSES)[0] == "shmwatch"
    assert PEERS == ("queue", "zmq", "redis", "etcd")
    assert len(set(LABELS.values())) == len(LABELS)
    for name, cls in CLASSES.items():
        assert cls.name == name
        assert "sync" in cls.write_paths
        writer = cls.writer
        assert ("batched" in cls.write_paths) == hasattr(writer, "send_batch"), name
        assert ("pipelined" in cls.write_paths) == hasattr(writer, "send_many"), name


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


def test_etcd_stream_gives_whole_json_objects_across_any_split():
    body = (_chunk(b'{"result":{"created":true}}\n{"result":{"ev')
            + _chunk(b'ents":[]}}\n') + _chunk(b'{"result":{"events":[1]}}'))
    wire = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    for step in (1, 7, len(wire)):
        s = ChunkedJson()
        objs = []
        for i in range(0, len(wire), step):
            objs += s.feed(wire[i:i + step])
        assert objs == [{"result": {"created": True}}, {"result": {"events": []}},
                        {"result": {"events": [1]}}], step


def test_etcd_stream_refusal_and_end_are_errors():
    with pytest.raises(ConnectionError, match="refused"):
        ChunkedJson().feed(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    s = ChunkedJson()
    s.feed(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(ConnectionError, match="ended"):
        s.feed(b"0\r\n\r\n")


def test_prefix_end_is_etcds():
    assert prefix_end(b"001/") == b"0010"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"


# ------------------------------------------------------------------ layouts


def test_records_are_16_byte_keys_and_64_byte_stamped_values():
    keys = record.make_keys(b"00a/", 13)
    assert len(keys) == record.KEYS_PER_WRITER and len(set(keys)) == len(keys)
    assert all(len(k) == record.KEY_LEN and k.startswith(b"00a/3/") for k in keys)
    v = record.value(7, 123_456_789)
    assert len(v) == record.VALUE_LEN
    assert record.STAMP_AT.unpack_from(v, record.SENT_AT)[0] == 123_456_789
    assert record.KEYS_PER_WRITER & (record.KEYS_PER_WRITER - 1) == 0  # seq & mask


@pytest.mark.parametrize("kind", many_watchers.KINDS)
def test_w5_one_write_in_hit_every_reaches_a_watcher(kind):
    n = 7
    watched = [many_watchers.watch_keys(kind, i) for i in range(n)]

    def watchers_of(key: bytes) -> list[int]:
        return [i for i, (k, end) in enumerate(watched)
                if (key == k if end is None else k <= key < end)]

    writes = [many_watchers.write_key(kind, n, seq) for seq in range(n * 300)]
    hits = [seq for seq, key in enumerate(writes) if watchers_of(key)]
    assert hits == list(range(0, n * 300, many_watchers.HIT_EVERY))
    # round robin: each hit reaches one watcher, every watcher in turn
    assert [watchers_of(writes[s]) for s in hits[:n]] == [[i] for i in range(n)]


def test_mem_watchers_are_split_over_the_holder_processes():
    assert memory._split(1) == [1]
    assert memory._split(50) == [25, 25]
    assert memory._split(51) == [26, 25]
    assert sum(memory._split(1000)) == 1000 and len(memory._split(1000)) == memory.HOLDERS


# ------------------------------------------------------------------ imports


def test_upstream_section_is_written_and_kept(tmp_path):
    """`shmwatch bench upstream --out` writes (then replaces) its own section of a
    report, and the main report keeps it (`section_of`)."""
    from shmwatch.tools.bench.upstream import SECTION, put_section, section_of

    path = tmp_path / "B.md"
    path.write_text("# shmwatch benchmarks\n\n## W1 x\n\nbody\n")
    put_section(str(path), "first | figures")
    put_section(str(path), "second | figures")
    text = path.read_text()
    assert text.count(SECTION) == 1 and "second" in text and "first" not in text
    assert text.startswith("# shmwatch benchmarks\n\n## W1 x\n\nbody\n")
    assert section_of(text) == f"{SECTION}\n\nsecond | figures\n"
    assert section_of("# no section\n") == ""


def test_a_trial_whose_set_up_fails_is_a_failed_trial_not_the_end_of_the_run():
    """A transport whose prepare() raises (a broker that would not start, a peer that
    refuses) gives a TrialError, which the session records as a failed trial and goes on."""
    from shmwatch.tools.bench.procs import TrialError
    from shmwatch.tools.bench.trials import Runner, Trial
    from shmwatch.tools.bench.transports.base import Transport

    class Broken(Transport):
        name = "broken"

        def prepare(self, trial):
            raise OSError("no space left on device")

    runner = Runner({"broken": Broken()})
    trial = Trial(workload="W1", variant="1 writer", transport="broken", prefix=b"x/", idle_s=1.0)
    with pytest.raises(TrialError, match="could not set up the trial: OSError"):
        runner.run(trial)
