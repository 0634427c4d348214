"""End-to-end checks of broker features that the etcd differential suite cannot time:
progress_notify ticks, fragments, pipelined puts, metrics, and ring reuse."""

from __future__ import annotations

import time

import pytest

import broker
import clientlib
from broker.admin import read_stats


def _wait_for(pred, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(60)
def test_progress_notify_ticks_only_idle_watchers():
    with broker.spawn(progress_notify_interval=0.2) as b, clientlib.connect(b.name) as c:
        idle = c.watch("idle", progress_notify=True)
        plain = c.watch("idle")
        assert idle.get(5).created and plain.get(5).created
        rev = c.put("other", "x").revision
        r = idle.get(5)
        assert r.is_progress_notify and r.watch_id == idle.watch_id and r.revision >= rev
        assert plain.get_nowait() is None  # no progress_notify asked: nothing


@pytest.mark.timeout(60)
def test_fragmented_watch_splits_a_large_revision_and_plain_one_does_not():
    with broker.spawn(max_request_bytes=64 << 10, watch_ring_bytes=64 << 10) as b, \
            clientlib.connect(b.name) as c:
        keys = [f"big/{i:02d}".encode() for i in range(16)]
        for k in keys:
            c.put(k, b"x" * (60 << 10))
        # One revision whose events (with prev_kv) are far over the limit at which etcd
        # fragments: --max-request-bytes + 512 KiB.
        frag = c.watch("big/", prefix=True, fragment=True, prev_kv=True)
        whole = c.watch("big/", prefix=True, prev_kv=True)
        frag.get(5), whole.get(5)
        rev = c.delete("big/", prefix=True).revision
        parts = []
        while True:
            r = frag.get(10)
            parts.append(r)
            if not r.fragment:
                break
        assert len(parts) > 1 and all(p.fragment for p in parts[:-1])
        assert [e.kv.key for p in parts for e in p.events] == keys
        assert all(e.kv.mod_revision == rev for p in parts for e in p.events)
        r = whole.get(10)
        assert not r.fragment and len(r.events) == 16  # larger than the ring: streamed whole


@pytest.mark.timeout(60)
def test_put_many_is_n_puts_in_order(client):
    base = client.get("x").revision
    resps = client.put_many([(f"k{i}", f"v{i}") for i in range(300)])
    assert [r.revision for r in resps] == list(range(base + 1, base + 301))
    with pytest.raises(clientlib.EmptyKeyError):
        client.put_many([("a", "1"), ("", "2"), ("b", "3")])
    assert client.get("b").kvs[0].value == b"3"  # the others still applied, like put()s


@pytest.mark.timeout(60)
def test_ring_and_watch_id_reuse_after_cancel(client):
    for i in range(100):  # more than one arena of rings, each freed and reused
        w = client.watch(f"k{i}")
        assert w.get(5).created and w.watch_id == i
        client.put(f"k{i}", "v")
        assert w.get(5).events[0].kv.key == f"k{i}".encode()
        w.cancel()
        assert w.get(5).canceled
        with pytest.raises(clientlib.WatchClosed):
            w.get(0.1)


@pytest.mark.timeout(60)
def test_metrics_reflect_activity(broker_proc, client):
    w = client.watch("m", prefix=True)
    w.get(5)
    for i in range(10):
        client.put(f"m{i}", "v")
    st = _wait_for(lambda: (s := read_stats(broker_proc.name))["revision"] == 11 and s,
                   what="stats to show revision 11")
    assert st["writes"] == 10 and st["events_delivered"] >= 10
    assert st["watchers"]["total"] == 1 and st["watchers"]["synced"] == 1
    assert st["log"]["count"] == 10 and st["log"]["newest_rev"] == 11
    assert [c["watchers"] for c in st["clients"]] == [1]
