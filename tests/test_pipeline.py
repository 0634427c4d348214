"""Async writes (`Client.put_async`, `Client.pipeline()`): every write applied once, in
call order, each future completed with its own reply (or its own typed error), a bounded
window, and no future left pending when the broker dies, the client closes or the
process forks."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading

import pytest

import broker
import clientlib
from clientlib.pipeline import DEFAULT_WINDOW


def test_put_async_applies_in_call_order_and_answers_each(client):
    n = 10_000
    first = client.put("start", "x").revision
    futs = [client.put_async(f"a/{i:05d}", str(i)) for i in range(n)]
    revisions = [f.result(10).revision for f in futs]
    # Applied in call order, each at a revision of its own, with no gap.
    assert revisions == list(range(first + 1, first + 1 + n))
    got = client.get("a/", prefix=True)
    assert got.count == n
    assert [(kv.key, kv.value, kv.mod_revision) for kv in got.kvs] == [
        (f"a/{i:05d}".encode(), str(i).encode(), first + 1 + i) for i in range(n)]


def test_a_blocking_call_after_async_writes_sees_them(client):
    futs = [client.put_async("k", str(i)) for i in range(100)]
    # Requests are applied in the order sent: the get is behind every put.
    assert client.get("k").kvs[0].value == b"99"
    assert all(f.done() for f in futs)  # their replies came before the get's


def test_prev_kv_and_lease_reach_the_broker(client):
    lease = client.lease_grant(60)
    client.put("p", "old")
    resp = client.put_async("p", "new", prev_kv=True, lease=lease.id).result(5)
    assert resp.prev_kv.value == b"old"
    assert client.get("p").kvs[0].lease == lease.id


def test_the_window_bounds_writes_in_flight(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        os.kill(broker_proc.pid, signal.SIGSTOP)  # nothing is answered meanwhile
        try:
            p = c.pipeline(window=8, timeout=0.5)
            futs = [p.put(f"w/{i}", "v") for i in range(8)]
            assert not any(f.done() for f in futs)
            # The 9th waits for the oldest reply, which cannot come: its timeout path.
            with pytest.raises(clientlib.Timeout):
                p.put("w/8", "v")
        finally:
            os.kill(broker_proc.pid, signal.SIGCONT)
        assert [f.result(10).revision for f in futs] == sorted(f.result().revision for f in futs)
        p.put("w/8", "v")
        assert p.flush(10)[-1].revision == futs[-1].result().revision + 1
        assert c.get("w/", prefix=True).count == 9


def test_result_timeout_then_the_reply_still_comes(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        os.kill(broker_proc.pid, signal.SIGSTOP)
        try:
            fut = c.put_async("t", "v")
            with pytest.raises(clientlib.Timeout):
                fut.result(0.3)
            assert not fut.done()
        finally:
            os.kill(broker_proc.pid, signal.SIGCONT)
        assert fut.result(10).revision == c.get("t").kvs[0].mod_revision


def test_errors_belong_to_their_writes_and_the_others_apply(client):
    with pytest.raises(clientlib.EmptyKeyError) as info:
        with client.pipeline() as p:
            ok1 = p.put("e/1", "1")
            bad = p.put("", "nope")
            dup = p.txn([], [clientlib.op_put("e/x", "1"), clientlib.op_put("e/x", "2")])
            ok2 = p.delete("e/1")
            ok3 = p.put("e/2", "2")
    err = info.value
    assert err.index == 1 and "write 1 of 5 failed (2 failed in all" in str(err)
    assert isinstance(err.results[2], clientlib.DuplicateKeyError)
    assert isinstance(bad.exception(), clientlib.EmptyKeyError)
    assert isinstance(dup.exception(), clientlib.DuplicateKeyError)
    assert ok1.result().revision + 1 == ok2.result().revision
    assert ok2.result().deleted == 1 and ok3.result().revision == ok2.result().revision + 1
    assert [kv.key for kv in client.get("e/", prefix=True).kvs] == [b"e/2"]


def test_a_request_too_large_fails_alone(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        big = c.put_async("big", b"x" * (c.max_request_bytes + 1))
        after = c.put_async("after", "1")
        assert isinstance(big.exception(5), clientlib.RequestTooLargeError)
        assert after.result(5).revision == c.get("after").kvs[0].mod_revision
        assert c.get("big").count == 0


def test_threads_share_one_client(client):
    per, threads_n = 2_000, 4
    out: dict[int, list] = {}

    def work(t: int) -> None:
        futs = [client.put_async(f"th/{t}/{i:04d}", str(i)) for i in range(per)]
        out[t] = [f.result(30).revision for f in futs]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    revisions = [r for t in range(threads_n) for r in out[t]]
    assert len(set(revisions)) == per * threads_n
    for t in range(threads_n):
        assert out[t] == sorted(out[t])  # one thread's writes apply in its order
        kvs = client.get(f"th/{t}/", prefix=True).kvs
        assert [kv.mod_revision for kv in kvs] == out[t]


def test_done_callbacks_run_with_the_reply(client):
    seen: list = []
    futs = [client.put_async(f"cb/{i}", "v") for i in range(50)]
    for f in futs:
        f.add_done_callback(lambda fut: seen.append(fut.result(0).revision))
    client.get("cb/0")  # any call reads the replies
    assert sorted(seen) == [f.result().revision for f in futs]


def test_a_killed_broker_fails_every_pending_write():
    b = broker.spawn()
    try:
        c = clientlib.connect(b.name, timeout=3)
        os.kill(b.pid, signal.SIGSTOP)
        futs = [c.put_async(f"k/{i}", "v") for i in range(100)]
        b.kill()
        for f in futs:  # never a hang, never a success the broker did not send
            assert isinstance(f.exception(10), clientlib.BrokerUnavailable)
        with pytest.raises(clientlib.BrokerUnavailable):
            c.put_async("k", "v").result(5)
        c.close()
    finally:
        b.stop()


def test_close_fails_pending_writes(broker_proc):
    c = clientlib.connect(broker_proc.name, timeout=10)
    os.kill(broker_proc.pid, signal.SIGSTOP)
    try:
        fut = c.put_async("c", "v")
        c.close()
    finally:
        os.kill(broker_proc.pid, signal.SIGCONT)
    assert isinstance(fut.exception(5), clientlib.ClientClosed)
    with pytest.raises(clientlib.ClientClosed):
        c.put_async("c", "v")


def _child_uses_inherited(c, fut, q) -> None:
    try:
        q.put(("inherited", type(fut.exception(5)).__name__))
        q.put(("own", c.put_async("child", "1").result(10).revision))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put(("error", repr(exc)))


def test_a_forked_child_owns_none_of_the_parents_writes(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        os.kill(broker_proc.pid, signal.SIGSTOP)  # so the reply is not already read
        try:
            fut = c.put_async("parent", "1")  # pending until the parent reads its replies
        finally:
            os.kill(broker_proc.pid, signal.SIGCONT)
        assert not fut.done()
        ctx = mp.get_context("fork")
        q = ctx.Queue()
        child = ctx.Process(target=_child_uses_inherited, args=(c, fut, q))
        child.start()
        assert q.get(timeout=20) == ("inherited", "InheritedWatchError")
        kind, rev = q.get(timeout=20)
        child.join(20)
        assert kind == "own" and child.exitcode == 0
        parent_rev = fut.result(10).revision  # the parent's reply reached the parent
        assert c.get("parent").kvs[0].mod_revision == parent_rev
        assert c.get("child").kvs[0].mod_revision == rev != parent_rev


def test_window_argument_is_checked(client):
    with pytest.raises(ValueError):
        client.pipeline(window=0)
    assert DEFAULT_WINDOW == 1024


# ------------------------------------------------------------------ wait_any

def test_wait_any_returns_the_watches_with_a_response(client):
    ws = [client.watch(f"w/{i}") for i in range(200)]
    for w in ws:
        assert w.get(5).created
    assert clientlib.wait_any(ws, timeout=0.2) == []  # nothing yet: the timeout path
    client.put("w/7", "a")
    client.put("w/150", "b")
    ready = clientlib.wait_any(ws, timeout=5)
    assert ready and set(ready) <= {ws[7], ws[150]}
    got = {}
    while len(got) < 2:
        for w in clientlib.wait_any(ws, timeout=5):
            resp = w.get_nowait()
            got[w.watch_id] = resp.events[0].kv.value
    assert sorted(got.values()) == [b"a", b"b"]
    assert clientlib.wait_any(ws, timeout=0.1) == []


def test_wait_any_wakes_on_a_write_from_another_thread(client):
    w = client.watch("x")
    assert w.get(5).created
    threading.Timer(0.2, lambda: client.put("x", "1")).start()
    assert clientlib.wait_any([w], timeout=10) == [w]
    assert w.get_nowait().events[0].kv.value == b"1"


def test_wait_any_counts_an_ended_watch_as_ready(client):
    w = client.watch("e")
    other = client.watch("o")
    assert w.get(5).created and other.get(5).created
    w.cancel()
    assert clientlib.wait_any([other, w], timeout=5) == [w]
    assert w.get_nowait().canceled


def test_wait_any_refuses_watches_of_two_clients(broker_proc, client):
    with clientlib.connect(broker_proc.name) as other:
        with pytest.raises(ValueError, match="same client"):
            clientlib.wait_any([client.watch("a"), other.watch("b")])
    with pytest.raises(ValueError):
        clientlib.wait_any([])


def test_an_async_write_cannot_be_cancelled_once_sent(client):
    fut = client.put_async("nc", "v")
    assert fut.cancel() is False  # already sent: like a running future
    assert fut.result(5).revision == client.get("nc").kvs[0].mod_revision
    assert fut.done() and not fut.cancelled()
