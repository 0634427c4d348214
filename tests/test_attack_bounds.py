"""Attack: slow and silent watchers, and what one client can make the broker hold.

README, "Broker options" and "Failure model": every byte is bounded by an option
(--max-client-backlog-bytes, --max-watchers-per-client, ...), a watcher that reads is
never held back by one that does not, and a slow reader's backlog lives in the log.
"""

from __future__ import annotations

import glob
import os
import time

import pytest

import broker
import clientlib
from shmwatch.wire.protocol import OP_ARENA


@pytest.mark.timeout(60)
@pytest.mark.parametrize("catch_up", ["client", pytest.param("broker", marks=pytest.mark.xfail(
    strict=True, reason="--catch-up broker: a client's unread watch starves its reading "
                        "watch once the client's backlog budget is spent"))])
def test_an_unread_watch_does_not_starve_a_read_one_of_the_same_client(catch_up):
    """Two watches of one client on one key; A is read, B never is. Each revision (600
    KB) is larger than a ring (16 KiB), so it streams through and its unwritten rest is
    held against the client's budget (1 MiB). B's held response fills the budget and is
    never drained (nobody reads B); from then on every response for A "would put the
    owner over its budget" (watch.py `_deliver`: returns None) and A waits as a victim
    whose retry is refused for the same reason (`sync_watchers`: held >= owner_budget):
    A, read as fast as it comes, receives nothing at all, and would be cancelled by the
    next compaction. The watch.py docstring promises that "a client's unread watches
    never starve the ones it reads". (Fixed where watchers catch up themselves, the
    default: A, a victim, gets a W_CATCHUP and reads its history from the log, which
    holds nothing against the budget. With --catch-up broker it still starves.)"""
    with broker.spawn(watch_ring_bytes="16k", max_client_backlog_bytes="1M",
                      log_bytes="64M", catch_up=catch_up) as b:
        with clientlib.connect(b.name, timeout=10) as c, \
                clientlib.connect(b.name, timeout=10) as writer:
            a = c.watch("k")
            assert a.get(5).created
            silent = c.watch("k")  # never read
            revs = [writer.put("k", bytes([65 + i]) * 600_000).revision for i in range(10)]
            got = []
            deadline = time.monotonic() + 10
            while len(got) < len(revs) and time.monotonic() < deadline:
                try:
                    r = a.get(1)
                except clientlib.Timeout:
                    continue
                assert not r.canceled, r
                got += [e.kv.mod_revision for e in r.events]
            assert got == revs
            del silent


def test_arena_requests_are_capped_by_max_watchers_per_client(broker_proc_small):
    """An arena is `--rings-per-arena` watch rings in /dev/shm; the broker created one
    for every OP_ARENA request without looking at --max-watchers-per-client, so one
    client (a buggy or hostile one speaking the protocol) could fill /dev/shm: 50
    requests, 50 arenas, where 4 watches need 2. (Fixed: refused with
    TooManyWatchersError once its arenas hold --max-watchers-per-client rings.)"""
    name = broker_proc_small.name
    with clientlib.connect(name, timeout=5) as c:
        watches = [c.watch(f"k{i}") for i in range(4)]  # the most it may hold: 2 arenas
        with pytest.raises(clientlib.TooManyWatchersError):
            c.watch("k5")
        for _ in range(20):
            try:
                c._call([OP_ARENA, 0])
            except clientlib.TooManyWatchersError:
                pass
        arenas = glob.glob(f"/dev/shm/shmwatch.{name}.c*.a*")
        assert len(arenas) <= 2, f"{len(arenas)} arenas for at most 4 watches"
        # The client stays usable and in step (arena numbering).
        watches[0].cancel()
        w = c.watch("k6")
        assert w.get(5).created
        c.put("k6", "v")
        assert w.get(5).events[0].kv.value == b"v"
    assert os.path.exists(f"/dev/shm/shmwatch.{name}.ctl")


@pytest.fixture
def broker_proc_small():
    with broker.spawn(max_watchers_per_client=4, rings_per_arena=2,
                      watch_ring_bytes="64k") as b:
        yield b
