"""Attack: what a user's timeouts and cancellations leave behind in a client.

README, "API" and "asyncio": every blocking call has a timeout path and the client
stays usable after it; cancelling a task that awaits a call or a watch "leaves the
client and the watch usable (a reply that arrives later is dropped)". A watch's
creation is two requests whose replies change client state (an arena of rings, a ring
taken by the broker); dropping either reply leaves the client out of step with the
broker for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import threading

import pytest

import clientlib
from broker.admin import broker_info
from clientlib import aio
from tests.mp_workers import wait_for


@contextlib.contextmanager
def _stopped(pid: int):
    """The broker is SIGSTOPped inside (a slow or paused broker)."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)




def _timed_out_watch(name: str, pid: int, arena_exists: bool) -> list:
    with clientlib.connect(name, timeout=5) as c:
        if arena_exists:
            w0 = c.watch("k0")
            assert w0.get(5).created
        with _stopped(pid):
            with pytest.raises(clientlib.Timeout):
                c.watch("k1", timeout=0.3)
        out = []
        for i in range(3):
            w = c.watch(f"k{i + 2}")
            assert w.get(5).created
            rev = c.put(f"k{i + 2}", "v").revision
            out.append(w.get(5).events[0].kv.mod_revision == rev)
        return out


def test_a_watch_timed_out_during_its_arena_request_leaves_watches_working(broker_proc):
    """The client's first watch asks for an arena (OP_ARENA) and times out; the broker
    creates the arena anyway and its reply is dropped as abandoned, so the client's
    arena count (`_arenas`) lags the broker's by one and every later watch() raises
    ProtocolError "arena numbering out of step" (client.py flow_take_ring). Suspected
    fix: an arena reply is applied whenever it arrives (never abandoned), or the
    client names the arena index it asks for."""
    assert _timed_out_watch(broker_proc.name, broker_proc.pid, False) == [True] * 3


def test_a_watch_timed_out_during_its_create_request_leaves_watches_working(broker_proc):
    """The create request times out; flow_create_watch's `except BaseException` puts the
    ring back on the free list although the broker created the watch on it, so the
    next watch() takes the same ring and the broker refuses "watch ring already in use"
    (server.py _watch_create) — and puts it back again, forever. Meanwhile the orphan
    watch fills that ring. Suspected fix: keep the ring out of the free list until the
    abandoned reply arrives, then cancel the watch it names."""
    assert _timed_out_watch(broker_proc.name, broker_proc.pid, True) == [True] * 3


async def _cancelled_watch_creation(name: str, pid: int, arena_exists: bool) -> list:
    async with aio.connect(name, timeout=5) as c:
        if arena_exists:
            w0 = await c.watch("k0")
            assert (await w0.get(5)).created
        with _stopped(pid):
            task = asyncio.create_task(c.watch("k1").get())
            await asyncio.sleep(0.2)  # its request is in the ring, unanswered
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        out = []
        for i in range(3):
            w = await c.watch(f"k{i + 2}")
            assert (await w.get(5)).created
            rev = (await c.put(f"k{i + 2}", "v")).revision
            out.append((await w.get(5)).events[0].kv.mod_revision == rev)
        return out


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_cancelled_async_watch_during_its_arena_request_leaves_watches_working(
        broker_proc):
    """As the blocking case: aio's `_call_many` abandons the arena reply on
    cancellation (aio.py), the README says the client stays usable."""
    assert await _cancelled_watch_creation(broker_proc.name, broker_proc.pid, False) == [True] * 3


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_cancelled_async_watch_during_its_create_request_leaves_watches_working(
        broker_proc):
    assert await _cancelled_watch_creation(broker_proc.name, broker_proc.pid, True) == [True] * 3


def _helpers(name: str) -> int:
    return sum(t.name == f"shmwatch-aio-{name}" for t in threading.enumerate())


@pytest.mark.timeout(60)
def test_an_async_client_left_open_when_its_loop_ends_is_released(broker_proc):
    """`asyncio.run(main())` where main forgets `await c.close()`: the loop is closed,
    nothing can use the client again, yet its helper thread keeps waking every 50 ms
    and the broker keeps its slot (256 such runs in one process exhaust
    --max-clients). The helper thread's target is a bound method, so the client is
    never collected, and `_helper` notices a closed loop only when it has something
    to hand over (aio.py `_hand`). A blocking Client in the same situation is closed
    by its __del__. Suspected fix: the helper checks `loop.is_closed()` each slice and
    closes the client."""
    name = broker_proc.name
    base = broker_info(name)["clients"]

    async def forgetful() -> None:
        c = await aio.connect(name, timeout=5)
        await c.put("k", "v")

    for _ in range(3):
        asyncio.run(forgetful())
    gc.collect()
    wait_for(lambda: _helpers(name) == 0 and broker_info(name)["clients"] == base, 5,
             "the forgotten clients' threads and slots to be released")


BIG = b"o" * 1_200_000  # more than a 1 MiB request ring: it streams in chunks


@pytest.mark.timeout(60)
def test_a_put_timed_out_half_written_leaves_the_next_call_working(broker_proc):
    """`_send` (client.py) times out between chunks of a message larger than the free
    ring: its first chunks are published with MORE set and the rest never comes. Once
    the broker's ring reader appended the next request to that partial message (the
    merged bytes did not decode and the next call waited its whole timeout). Now the
    client writes an abort marker: the broker drops the partial message, the timed-out
    put is never applied, and the next call works."""
    with clientlib.connect(broker_proc.name, timeout=3) as c:
        with _stopped(broker_proc.pid):
            with pytest.raises(clientlib.Timeout, match="not sent"):
                c.put("big", BIG, timeout=0.5)
        assert c.put("next", "1").revision >= 2
        assert c.get("big").kvs == []  # "not sent" holds


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_cancelled_async_put_is_never_applied_after_newer_writes(broker_proc):
    """A put cancelled while its message did not fit the ring (a busy or paused broker):
    aio's `_write` finishes the message (as documented) but `_call_many` published only
    after the write loop, which the cancellation skipped, so the request sat complete
    and unpublished in the ring until the client's next call published it — after
    another client's newer write to the same key, which it silently overwrote.
    (Fixed: a cancelled write is abandoned with an abort marker, and what was written
    is published in a `finally`.)"""
    name = broker_proc.name
    async with aio.connect(name, timeout=5) as c:
        with clientlib.connect(name, timeout=5) as other:
            with _stopped(broker_proc.pid):
                task = asyncio.create_task(c.put("k", BIG))
                await asyncio.sleep(0.3)  # its first chunks fill the ring
                task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)
            newer = other.put("k", "newer").revision
            await c.put("unrelated", "1")  # any later call of the cancelling client
            kv = other.get("k").kvs[0]
            assert (kv.value, kv.mod_revision) == (b"newer", newer)
            assert other.get("k", revision=newer - 1).kvs == []  # never applied at all
