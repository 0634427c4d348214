"""clientlib.aio: the asyncio client. Same semantics and errors as the blocking client;
awaitable calls, `async for` watches, task cancellation and timeouts as asyncio users
expect, one helper thread per client and no busy loop."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import psutil
import pytest

import broker
import clientlib
from clientlib import aio, compare_value, op_get, op_put

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


def helper_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"shmwatch-aio-{name}"]


async def test_connect_both_ways_and_kv_calls(broker_proc):
    c = await aio.connect(broker_proc.name, timeout=10)
    try:
        assert (await c.put("a", "1")).revision == 2
        assert (await c.put("a", "2", prev_kv=True)).prev_kv.value == b"1"
        r = await c.get("a")
        assert [kv.value for kv in r.kvs] == [b"2"] and r.revision == 3
        t = await c.txn(compare=[compare_value("a", "=", "2")],
                        success=[op_put("b", "x"), op_get("a")])
        assert t.succeeded and t.revision == 4
        assert [r.revision for r in await c.put_many([("m/1", "1"), ("m/2", "2")])] == [5, 6]
        assert (await c.delete("m/", prefix=True)).deleted == 2
        await c.compact(5)
        with pytest.raises(clientlib.CompactedError):
            await c.get("a", revision=3)
        with pytest.raises(clientlib.DuplicateKeyError):
            await c.txn(success=[op_put("k", "1"), op_put("k", "2")])
    finally:
        await c.close()
    with pytest.raises(clientlib.ClientClosed):
        await c.put("a", "3")
    async with aio.connect(broker_proc.name, timeout=10) as c2:
        assert (await c2.get("b")).kvs[0].value == b"x"


async def test_several_concurrent_watches_each_get_their_exact_stream(broker_proc):
    async with aio.connect(broker_proc.name, timeout=10) as c:
        prefixes = [f"p{i}/" for i in range(6)]
        n = 60
        got: dict[str, list[int]] = {p: [] for p in prefixes}
        created = asyncio.Event()
        ready = []

        async def consume(p: str) -> None:
            async with c.watch(p, prefix=True) as w:
                first = await w.get(10)
                assert first.created
                ready.append(p)
                if len(ready) == len(prefixes):
                    created.set()
                async for resp in w:
                    got[p] += [e.kv.mod_revision for e in resp.events]
                    if len(got[p]) == n:
                        return

        tasks = [asyncio.create_task(consume(p)) for p in prefixes]
        await asyncio.wait_for(created.wait(), 10)
        want: dict[str, list[int]] = {p: [] for p in prefixes}
        for i in range(n * len(prefixes)):
            p = prefixes[i % len(prefixes)]
            want[p].append((await c.put(f"{p}{i}", "v")).revision)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert got == want
        assert len(helper_threads(broker_proc.name)) == 1  # one thread, six watches


async def test_cancelling_a_task_leaves_the_watch_usable(broker_proc):
    async with aio.connect(broker_proc.name, timeout=10) as c:
        w = await c.watch("k")
        assert (await w.get(5)).created
        waiting = asyncio.create_task(w.get())
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(w.get(), 0.2)  # asyncio's own timeout: cancellation
        rev = (await c.put("k", "v")).revision
        assert [e.kv.mod_revision for e in (await w.get(5)).events] == [rev]
        with pytest.raises(clientlib.Timeout):
            await w.get(timeout=0.2)  # our timeout argument: clientlib.Timeout
        # A call whose task is cancelled while it waits for its reply (the broker is
        # paused, so the request is in the ring and unanswered): the late reply is
        # dropped, and the next call gets its own.
        os.kill(broker_proc.pid, signal.SIGSTOP)
        try:
            t = asyncio.create_task(c.put("k", "w"))
            await asyncio.sleep(0.2)
            assert not t.done()
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
        finally:
            os.kill(broker_proc.pid, signal.SIGCONT)
        r = await c.get("k")
        assert r.kvs[0].value == b"w" and r.kvs[0].mod_revision == rev + 1  # it was applied
        assert (await c.put("k", "x")).revision == rev + 2


async def test_refused_and_cancelled_watches_end_as_the_blocking_ones(broker_proc):
    async with aio.connect(broker_proc.name, timeout=10) as c:
        seen = []
        with pytest.raises(clientlib.InvalidRangeError):
            async for resp in c.watch("b", "a"):
                seen.append((resp.created, resp.canceled))
        assert seen == [(True, True)]
        w = await c.watch("x")
        await w.get(5)
        await c.put("x", "1")
        await w.cancel()
        rest = [r async for r in w]  # what was sent, then the canceled response, then end
        assert [len(r.events) for r in rest] == [1, 0] and rest[-1].canceled
        assert w.canceled


async def test_compacted_watch_raises_with_compact_revision(broker_proc):
    async with aio.connect(broker_proc.name, timeout=10) as c:
        for i in range(5):
            await c.put("c", str(i))
        await c.compact(4)
        got = []
        with pytest.raises(clientlib.CompactedError) as exc:
            async for resp in c.watch("c", start_revision=2):
                got.append(resp)
        assert exc.value.compact_revision == 4
        assert got[-1].canceled and got[-1].compact_revision == 4


async def test_an_idle_client_with_waiting_watches_does_not_spin(broker_proc):
    async with aio.connect(broker_proc.name, timeout=10) as c:
        watches = [await c.watch(f"idle/{i}") for i in range(10)]
        for w in watches:
            await w.get(5)
        tasks = [asyncio.create_task(w.get()) for w in watches]
        me = psutil.Process()
        before = me.cpu_times()
        await asyncio.sleep(1.5)
        after = me.cpu_times()
        used = (after.user - before.user) + (after.system - before.system)
        # A busy loop would burn the whole 1.5 s; sleeping costs a few ms of checks.
        assert used < 0.5, f"idle async client used {used:.2f} s of CPU in 1.5 s"
        assert len(helper_threads(broker_proc.name)) == 1
        rev = (await c.put("idle/3", "v")).revision
        done = await asyncio.wait_for(tasks[3], 5)
        assert done.events[0].kv.mod_revision == rev
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_broker_death_ends_waits_with_broker_unavailable():
    b = broker.spawn()
    try:
        c = await aio.connect(b.name, timeout=10)
        w = await c.watch("d")
        await w.get(5)
        waiting = asyncio.create_task(w.get())
        await asyncio.sleep(0.1)
        b.kill()
        start = time.monotonic()
        with pytest.raises(clientlib.BrokerUnavailable):
            await asyncio.wait_for(waiting, 10)
        assert time.monotonic() - start < 5
        with pytest.raises(clientlib.BrokerUnavailable):
            await c.put("d", "1")
        await c.close()
    finally:
        b.stop()
