"""A watcher that reads slower than the writers write becomes a victim and catches up
from the log: its backlog never lives in client (or broker) memory.

This used to fail: Watch.get() drained the whole ring into a client-side deque, so the
broker kept the watcher synced while the client buffered tens of MB, and the backlog
came back one revision per response."""

from __future__ import annotations

import multiprocessing as mp

import pytest

import broker
from broker.admin import read_stats
from tests.mp_workers import load, reap
from tests.slow_workers import full_speed_writer, slow_reader

MiB = 1 << 20


@pytest.mark.timeout(240)
def test_slow_reader_becomes_a_victim_and_catches_up_in_batches(tmp_path):
    ctx = mp.get_context("spawn")
    rpath, wpath = str(tmp_path / "reader"), str(tmp_path / "writer")
    value_size = 4096
    with broker.spawn(log_bytes=256 * MiB) as b:
        ready, start = ctx.Event(), ctx.Event()
        last = ctx.Value("q", 0)
        reader = ctx.Process(target=slow_reader,
                             args=(b.name, "slow/", 0.001, rpath, ready, last), daemon=True)
        writer = ctx.Process(target=full_speed_writer,
                             args=(b.name, "slow/", 4.0, value_size, wpath, start), daemon=True)
        reader.start()
        writer.start()
        try:
            assert ready.wait(60), "the reader did not start"
            start.set()
            writer.join(120)
            assert writer.exitcode == 0
            written = load(wpath)["revs"]
            last.value = written[-1]
            reader.join(150)
            assert reader.exitcode == 0
            stats = read_stats(b.name)
        finally:
            reap([reader, writer])
    got = load(rpath)
    # Exact: every write, in order, once (the watch began before the first write).
    assert got["revs"] == written
    # The broker saw a slow reader: its ring filled and it became a victim.
    assert stats["victims_entered"] >= 1
    # The backlog came back in catch-up responses of many revisions, not one by one.
    sizes = got["sizes"]
    assert max(sizes) >= 50, max(sizes)
    assert len(sizes) < len(written) / 2, (len(sizes), len(written))
    # Client memory (private: RssAnon) stayed flat while the writer produced far more
    # than the bound; catching up itself, it reads the broker's log where it is.
    data = len(written) * value_size
    growth = max(got["rss"]) - got["rss"][0]
    assert data > 3 * 16 * MiB, f"the writer wrote only {data} bytes: nothing to prove"
    assert growth < 16 * MiB, f"the slow reader's private memory grew by {growth} bytes"
