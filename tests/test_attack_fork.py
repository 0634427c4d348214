"""Attack: a client forked while in use, every way a child may treat it.

README, "API": "A Client is thread-safe and fork-safe: a client inherited through
fork() ... attaches again as a new client of its own on its first call in the child,
and the parent's client is untouched"; an inherited Watch raises InheritedWatchError.
Here two parent threads write through the client and a third reads a watch of every
key while the parent forks children one after another (each fork lands at a random
point of those threads' calls). Each child does one thing with its copy: uses it,
closes it then uses it, forks a grandchild that uses it, reconnect()s it, touches the
inherited watch, opens an AsyncClient, or ignores it. Every acknowledged write must
be stored once at its own revision, and the parent's watch must see every revision
exactly once, in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time

import pytest

import clientlib
from clientlib import aio

ACTIONS = ["use", "close_then_use", "grandchild", "reconnect", "watch", "aio", "ignore"]


def _child(c: clientlib.Client, w: clientlib.Watch, action: str, out_fd: int) -> None:
    me = os.getpid()
    out = {"action": action, "acks": [], "problem": None}
    try:
        if action == "use":
            for i in range(30):
                k = f"f/{me}/{i}"
                r = c.put(k, str(i))
                out["acks"].append([k, str(i), r.revision])
                got = c.get(k).kvs
                if [(kv.value, kv.mod_revision) for kv in got] != [(str(i).encode(), r.revision)]:
                    out["problem"] = f"get after put {i}: {got}"
        elif action == "close_then_use":
            c.close()
            try:
                c.put("x", "y")
                out["problem"] = "a closed client wrote"
            except clientlib.ClientClosed:
                pass
        elif action == "grandchild":
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    for i in range(10):
                        r = c.put(f"g/{os.getpid()}/{i}", "g")
                        assert c.get(f"g/{os.getpid()}/{i}").kvs[0].mod_revision == r.revision
                except BaseException as exc:  # noqa: BLE001 - reported by exit status
                    sys.stderr.write(f"grandchild: {exc!r}\n")
                    code = 3
                os._exit(code)
            _, status = os.waitpid(pid, 0)
            if status:
                out["problem"] = f"grandchild exit status {status}"
            k = f"f/{me}/after-grandchild"
            out["acks"].append([k, "m", c.put(k, "m").revision])
        elif action == "reconnect":
            c.reconnect()
            k = f"f/{me}/rc"
            r = c.put(k, "r")
            out["acks"].append([k, "r", r.revision])
            w2 = c.watch(k, start_revision=r.revision)
            w2.get(5)
            if w2.get(5).events[0].kv.mod_revision != r.revision:
                out["problem"] = "a watch after reconnect() missed its own write"
        elif action == "watch":
            try:
                w.get(0.5)
                out["problem"] = "the inherited watch was readable"
            except clientlib.InheritedWatchError:
                pass
        elif action == "aio":
            async def main() -> int:
                async with aio.connect(c.name, timeout=10) as ac:
                    return (await ac.put(f"f/{me}/aio", "a")).revision
            out["acks"].append([f"f/{me}/aio", "a", asyncio.run(main())])
    except BaseException as exc:  # noqa: BLE001 - reported to the test
        out["problem"] = repr(exc)
    os.write(out_fd, (json.dumps(out) + "\n").encode())
    os._exit(0)


@pytest.mark.timeout(90)
def test_forks_under_load_every_child_behaviour_leaves_every_stream_exact(broker_proc):
    rnd = random.Random(7)
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        w = c.watch(b"\0", range_end=b"\0")
        assert w.get(5).created
        stop = threading.Event()
        parent_acks: list = []
        seen: list[int] = []

        def write(t: int) -> None:
            i = 0
            while not stop.is_set():
                k = f"p/{t}/{i}"
                parent_acks.append([k, str(i), c.put(k, str(i)).revision])
                i += 1

        final: list[int] = []

        def read() -> None:  # until it has seen the final write
            deadline = time.monotonic() + 80
            while not (final and seen and seen[-1] >= final[0]) and time.monotonic() < deadline:
                try:
                    r = w.get(0.5)
                except clientlib.Timeout:
                    continue
                seen.extend(e.kv.mod_revision for e in r.events)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(2)]
        threads.append(threading.Thread(target=read))
        for t in threads:
            t.start()
        rfd, wfd = os.pipe()
        kids = []
        try:
            for n in range(2 * len(ACTIONS)):
                pid = os.fork()
                if pid == 0:
                    os.close(rfd)
                    _child(c, w, ACTIONS[n % len(ACTIONS)], wfd)
                kids.append(pid)
                time.sleep(rnd.random() * 0.05)
            statuses = [os.waitpid(pid, 0)[1] for pid in kids]
        finally:
            os.close(wfd)
            time.sleep(0.2)
            stop.set()
            for t in threads[:2]:
                t.join(30)
        with os.fdopen(rfd) as f:
            outs = [json.loads(line) for line in f.read().splitlines()]
        final.append(c.put("end", "1").revision)
        threads[2].join(30)
        assert statuses == [0] * len(kids)
        assert len(outs) == len(kids) and not [o for o in outs if o["problem"]], outs
        acks = parent_acks + [a for o in outs for a in o["acks"]]
        assert len({a[2] for a in acks}) == len(acks), "two writes acknowledged at one revision"
        stored = {kv.key.decode(): (kv.value.decode(), kv.mod_revision)
                  for kv in c.get(b"\0", range_end=b"\0").kvs}
        assert [a for a in acks if stored.get(a[0]) != (a[1], a[2])] == []
        # The parent's watch saw every revision once, in order (grandchildren's too).
        assert seen == list(range(seen[0], final[0] + 1)), \
            "the parent's watch has a gap or a duplicate"
