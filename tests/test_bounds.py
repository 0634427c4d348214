"""Every byte a client can make the broker hold is bounded by an option (README, "Broker
options"), and bad requests get typed errors that leave the client usable.

The memory tests measure the broker process's RSS while a client misbehaves; each bound
asserted is far below what the same client cost before these bounds existed (the
issue's measurements: +503 MB, +808 MB, +61 MB)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import broker
import clientlib
from shmwatch.wire.ops import op_get
from shmwatch.wire.protocol import OP_KV, encode_op, packb
from shm import layout as L
from shm.segment import Segment
from tests.mp_workers import wait_for

MiB = 1 << 20


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def send_raw(c: clientlib.Client, msg: list) -> None:
    """Write one request straight into the client's ring, never reading the reply."""
    data = packb(msg)
    off = 0
    deadline = time.monotonic() + 10
    while off < len(data):
        off = c._req.write(data, off)
        c._req.publish()
        c._broker_bell.ring()
        if off < len(data):
            assert time.monotonic() < deadline, "the broker stopped reading"
            time.sleep(0.001)


@pytest.mark.timeout(120)
def test_a_client_that_never_reads_its_replies_costs_at_most_its_ring():
    with broker.spawn() as b, clientlib.connect(b.name, timeout=10) as setup, \
            clientlib.connect(b.name, timeout=10) as bad:
        for i in range(2):
            setup.put(f"big/{i}", b"x" * (1024 * 1024))  # a get of big/ replies 2 MB
        before = rss(b.pid)
        get = encode_op(op_get("big/", prefix=True))
        sent = 0
        # Requests go in until the ring is full: the broker stops taking them once the
        # replies it holds fill the (never read) response ring.
        while sent < 300:
            data = packb([OP_KV, 1000 + sent, get])
            if bad._req.free() < len(data) + 64:
                break
            send_raw(bad, [OP_KV, 1000 + sent, get])
            sent += 1
        time.sleep(1.0)  # let the broker do whatever it would do with them
        growth = rss(b.pid) - before
        assert growth < 24 * MiB, f"broker grew by {growth / MiB:.0f} MiB for {sent} requests"
        # The broker serves everyone else meanwhile.
        assert setup.put("other", "1").revision == 4
        # And the misbehaving client still gets every reply once it reads them.
        for i in range(sent):
            reply = wait_for(lambda i=i: bad._pump() or bad._replies.pop(1000 + i, None), 30,
                             f"reply {i}")
            assert len(reply[2]) == 2  # the two 1 MB keys



@pytest.mark.timeout(180)
def test_unread_catch_up_watchers_are_bounded_by_the_client_budget():
    """40 watchers from revision 1 over ~20 MB of history, never read."""
    with broker.spawn(max_client_backlog_bytes=16 * MiB, log_bytes=64 * MiB) as b, \
            clientlib.connect(b.name, timeout=30) as c:
        value = b"h" * 10_000
        c.put_many((f"hist/{i:04d}", value) for i in range(2000))
        before = rss(b.pid)
        watches = [c.watch("hist/", prefix=True, start_revision=1) for _ in range(40)]
        time.sleep(3.0)  # the broker catches up whoever it can
        growth = rss(b.pid) - before
        # Budget 16 MiB plus the one catch-up response in flight (<= 1000 revisions of
        # 10 kB) and allocator slack; without the budget this was ~800 MiB.
        assert growth < 64 * MiB, f"broker grew by {growth / MiB:.0f} MiB"
        # Now read them all: every one gets the whole history, exactly.
        for w in watches[:3]:
            revs = []
            while len(revs) < 2000:
                r = w.get(30)
                revs += [e.kv.mod_revision for e in r.events]
            assert revs == list(range(2, 2002))


@pytest.mark.timeout(120)
def test_a_request_streamed_and_never_finished_is_bounded_by_max_request_bytes():
    with broker.spawn(max_request_bytes=1536 * 1024) as b, \
            clientlib.connect(b.name, timeout=10) as bad, \
            clientlib.connect(b.name, timeout=10) as other:
        before = rss(b.pid)
        big = packb([OP_KV, 7, encode_op(clientlib.op_put("half", b"p" * (60 * MiB)))])
        off = 0
        stop = len(big) - 2 * MiB  # never reach the last chunk
        deadline = time.monotonic() + 60
        while off < stop:
            off = bad._req.write(big, off)
            bad._req.publish()
            bad._broker_bell.ring()
            if off < stop:
                assert time.monotonic() < deadline
                time.sleep(0.0005)
        wait_for(lambda: bad._req.tail == bad._req.head, 30, "the broker to drain the chunks")
        growth = rss(b.pid) - before
        assert growth < 16 * MiB, f"broker grew by {growth / MiB:.0f} MiB"
        assert other.put("still", "serving").revision == 2


@pytest.mark.timeout(60)
def test_request_over_the_limit_streamed_by_a_careless_client_gets_etcds_error():
    """A client that ignores --max-request-bytes streams a whole message: the broker
    drops it as it arrives and answers with etcd's error; the client stays usable."""
    with broker.spawn(max_request_bytes=64 * 1024) as b, \
            clientlib.connect(b.name, timeout=10) as c:
        c.max_request_bytes = 1 << 30
        with pytest.raises(clientlib.RequestTooLargeError,
                           match="etcdserver: request is too large"):
            c.put("k", b"z" * (5 * MiB))
        assert c.put("k", "small").revision == 2
        assert c.get("k").kvs[0].value == b"small"


@pytest.mark.timeout(60)
def test_a_reply_over_max_response_bytes_is_a_typed_error_and_the_client_stays_usable():
    with broker.spawn(max_response_bytes=MiB) as b, clientlib.connect(b.name, timeout=10) as c:
        for i in range(3):
            c.put(f"r/{i}", b"y" * 600_000)
        with pytest.raises(clientlib.ResponseTooLargeError, match="--max-response-bytes") as exc:
            c.get("r/", prefix=True)
        assert exc.value.revision == 0  # a read: nothing was applied
        assert c.get("r/0").kvs[0].value == b"y" * 600_000
        assert c.get("r/", prefix=True, keys_only=True).count == 3
        # A txn that writes and reads too much: applied, and the error says where.
        with pytest.raises(clientlib.ResponseTooLargeError, match="applied at revision 5") as exc:
            c.txn(success=[clientlib.op_put("r/w", "1"), clientlib.op_get("r/", prefix=True)])
        assert exc.value.revision == 5
        assert c.get("r/w").kvs[0].mod_revision == 5


@pytest.mark.timeout(60)
def test_max_watchers_per_client():
    with broker.spawn(max_watchers_per_client=3) as b, clientlib.connect(b.name, timeout=10) as c:
        ws = [c.watch(f"w{i}") for i in range(3)]
        for w in ws:
            assert w.get(5).created
        with pytest.raises(clientlib.TooManyWatchersError, match="max-watchers-per-client"):
            c.watch("w3")
        ws[0].cancel()
        w = c.watch("w3")
        assert w.get(5).created
        rev = c.put("w3", "v").revision
        assert w.get(5).events[0].kv.mod_revision == rev
        with clientlib.connect(b.name, timeout=10) as other:  # the cap is per client
            assert other.watch("x").get(5).created


@pytest.mark.timeout(60)
def test_the_client_learns_the_limits_from_the_broker():
    with broker.spawn(max_response_bytes=3 * MiB, max_watchers_per_client=7) as b:
        with Segment.open(f"/shmwatch.{b.name}.ctl", kind=L.KIND_CTL) as ctl:
            words = ctl.payload.cast("Q")
            try:
                assert words[L.CTL_MAX_RESPONSE_BYTES] == 3 * MiB
                assert words[L.CTL_MAX_WATCHERS] == 7
            finally:
                words.release()


@pytest.mark.timeout(60)
def test_put_many_tries_every_item_and_names_the_one_that_failed(broker_proc, client):
    items = [("pm/a", "1"), ("pm/big", b"x" * (10 * MiB)), ("pm/c", "3")]
    with pytest.raises(clientlib.RequestTooLargeError, match="item 1 of 3") as exc:
        client.put_many(items)
    err = exc.value
    assert err.index == 1
    ok_a, failed, ok_c = err.results
    assert isinstance(failed, clientlib.RequestTooLargeError)
    assert ok_c.revision == ok_a.revision + 1
    assert client.get("pm/a").kvs[0].value == b"1" and client.get("pm/c").kvs[0].value == b"3"
    assert client.get("pm/big").count == 0


@pytest.mark.timeout(60)
def test_negative_watch_ids_are_ids_as_in_etcd(broker_proc, client):
    """etcd takes any non-zero int64 as the watch id asked for (0 asks for one)."""
    w = client.watch("neg", watch_id=-7)
    r = w.get(5)
    assert r.created and not r.canceled and r.watch_id == -7
    dup = client.watch("neg2", watch_id=-7)
    r = dup.get(5)
    assert r.canceled and r.cancel_reason == "mvcc: duplicate watch ID provided on the WatchStream"
    with pytest.raises(clientlib.DuplicateWatchIdError):
        dup.get(1)
    # Later watches of the client still work (the ring was not given back twice).
    auto = [client.watch(f"a{i}") for i in range(3)]
    assert [a.get(5).watch_id for a in auto] == [0, 1, 2]
    rev = client.put("neg", "v").revision
    assert w.get(5).events[0].kv.mod_revision == rev
    with pytest.raises(ValueError, match="int64"):
        client.watch("x", watch_id=1 << 63)


@pytest.mark.timeout(60)
def test_damaged_response_ring_is_a_typed_error_and_reconnect_recovers(broker_proc):
    """Nothing of shm.errors reaches a user: a response ring someone damaged makes the
    calls raise ProtocolError (saying to reconnect), and reconnect() attaches anew."""
    from shm.errors import ShmError

    with clientlib.connect(broker_proc.name, timeout=10) as c:
        c.put("k", "1")
        # The broker is stopped so that its next reply cannot publish a good head over
        # the damage before the client reads it (it did, now and then).
        os.kill(broker_proc.pid, signal.SIGSTOP)
        try:
            c._resp._hq[0] = c._resp._hq[0] + 12  # a misaligned head, as garbage would be
            for _ in range(2):
                with pytest.raises(clientlib.ProtocolError, match="reconnect") as exc:
                    c.put("k", "2")
                assert not isinstance(exc.value, ShmError)
        finally:
            os.kill(broker_proc.pid, signal.SIGCONT)
        c.reconnect()
        assert c.get("k").kvs[0].value in (b"1", b"2")


@pytest.mark.timeout(60)
def test_shared_memory_vanishing_under_a_call_is_broker_unavailable(broker_proc, monkeypatch):
    from clientlib import client as client_mod
    from shm.errors import SegmentNotFound

    with clientlib.connect(broker_proc.name, timeout=10) as c:
        def gone(*_a, **_k):
            raise SegmentNotFound("shared-memory segment /shmwatch.x does not exist")

        monkeypatch.setattr(client_mod.Segment, "open", gone)
        with pytest.raises(clientlib.BrokerUnavailable, match="changed under this client"):
            c.watch("w")  # needs a new arena of rings: its segment is gone
        monkeypatch.undo()
        assert c.watch("w").get(5).created
