"""clientlib's API against a real broker process: typed errors with etcd's texts, str
keys, context managers, threads sharing a client, dead clients and a dead broker.

No timing assertions: where the design promises "within ~1 s", the test bounds the wait
generously and asserts only the outcome.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading

import pytest

import broker
import clientlib
from broker.admin import read_stats
from clientlib import op_delete, op_put
from tests import mp_workers
from tests.mp_workers import load, reap, wait_for

MAX_REQUEST = 1536 * 1024


def shm_entries(name: str) -> set[str]:
    return {e for e in os.listdir("/dev/shm")
            if e.startswith((f"shmwatch.{name}.", f"sem.shmwatch.{name}."))}


def client_pids(name: str) -> list[int]:
    return [c["pid"] for c in read_stats(name)["clients"]]


# ------------------------------------------------------------------ typed errors

def test_no_broker_is_broker_unavailable():
    with pytest.raises(clientlib.BrokerUnavailable, match="no broker named"):
        clientlib.connect("nosuchbroker-" + os.urandom(4).hex(), timeout=2)


def test_compacted_and_future_revision_on_get(client):
    for i in range(5):
        client.put("k", str(i))
    cur = client.get("k").revision
    assert cur == 6
    assert client.compact(4).revision == cur
    with pytest.raises(clientlib.CompactedError) as exc:
        client.get("k", revision=3)
    assert str(exc.value) == "etcdserver: mvcc: required revision has been compacted"
    assert client.get("k", revision=4).kvs[0].value == b"2"  # the compaction point stays
    with pytest.raises(clientlib.FutureRevisionError) as exc:
        client.get("k", revision=cur + 1)
    assert str(exc.value) == "etcdserver: mvcc: required revision is a future revision"
    with pytest.raises(clientlib.CompactedError):
        client.compact(3)  # etcd: compacting an already compacted revision
    with pytest.raises(clientlib.FutureRevisionError):
        client.compact(cur + 1)


def test_a_compacted_watch_ends_with_compacted_error_and_its_revision(client):
    """Iterating a watch that needs compacted history: its `canceled` response (with
    `compact_revision`), then CompactedError carrying the same revision."""
    for i in range(5):
        client.put("c", str(i))
    client.compact(4)
    got = []
    with pytest.raises(clientlib.CompactedError) as exc:
        for resp in client.watch("c", start_revision=2):
            got.append(resp)
    assert exc.value.compact_revision == 4
    assert got[-1].canceled and got[-1].compact_revision == 4


def test_empty_key(client):
    for call in (lambda: client.put("", "v"), lambda: client.get(b""),
                 lambda: client.delete("")):
        with pytest.raises(clientlib.EmptyKeyError) as exc:
            call()
        assert str(exc.value) == "etcdserver: key is not provided"


def test_ignore_value_errors(client):
    with pytest.raises(clientlib.KeyNotFoundError) as exc:
        client.put("absent", "", ignore_value=True)
    assert str(exc.value) == "etcdserver: key not found"
    client.put("present", "v1")
    with pytest.raises(clientlib.ValueProvidedError) as exc:
        client.put("present", "v2", ignore_value=True)
    assert str(exc.value) == "etcdserver: value is provided"
    r = client.put("present", "", ignore_value=True, prev_kv=True)
    assert r.prev_kv.value == b"v1"
    kv = client.get("present").kvs[0]
    assert (kv.value, kv.version, kv.mod_revision) == (b"v1", 2, r.revision)


def test_request_too_large(client):
    with pytest.raises(clientlib.RequestTooLargeError) as exc:
        client.put("big", b"x" * (2 << 20))
    assert str(exc.value) == "etcdserver: request is too large"
    # The client stays usable, and a value under the limit goes through.
    r = client.put("big", b"y" * (MAX_REQUEST - 4096))
    assert len(client.get("big").kvs[0].value) == MAX_REQUEST - 4096
    assert client.get("big", keys_only=True).revision == r.revision


def test_request_just_over_the_limit_is_too_large(client):
    with pytest.raises(clientlib.RequestTooLargeError):
        client.put("big", b"x" * (MAX_REQUEST + 1))


def test_duplicate_key_in_txn(client):
    with pytest.raises(clientlib.DuplicateKeyError) as exc:
        client.txn(success=[op_put("a", "1"), op_put("a", "2")])
    assert str(exc.value) == "etcdserver: duplicate key given in txn request"
    with pytest.raises(clientlib.DuplicateKeyError):
        client.txn(success=[op_put("b", "1"), op_delete("a", "c")])
    assert client.get("a").count == 0 and client.get("b").count == 0


def test_invalid_range_watch_is_refused_then_raises(client):
    w = client.watch("b", "a")
    r = w.get(5)
    assert r.created and r.canceled and r.watch_id == -1
    assert r.cancel_reason == "mvcc: watcher range is empty"
    with pytest.raises(clientlib.InvalidRangeError) as exc:
        w.get(1)
    assert str(exc.value) == "mvcc: watcher range is empty"
    assert w.canceled
    # Iterating a refused watch yields the refusal response, then raises the refusal
    # (never a silent end).
    seen = []
    with pytest.raises(clientlib.InvalidRangeError):
        for x in client.watch("z", "z"):
            seen.append(x.canceled)
    assert seen == [True]


def test_duplicate_watch_id_is_refused_then_raises(client):
    w1 = client.watch("k", watch_id=7)
    assert w1.get(5).watch_id == 7
    w2 = client.watch("j", watch_id=7)
    r = w2.get(5)
    assert r.created and r.canceled and r.watch_id == -1
    assert r.cancel_reason == "mvcc: duplicate watch ID provided on the WatchStream"
    with pytest.raises(clientlib.DuplicateWatchIdError):
        w2.get(1)
    # The first watch with that id is unharmed.
    rev = client.put("k", "v").revision
    e = w1.get(5).events[0]
    assert (e.kv.key, e.kv.mod_revision) == (b"k", rev)
    w1.cancel()
    # Once cancelled, the id may be used again.
    w3 = client.watch("j", watch_id=7)
    assert w3.get(5).watch_id == 7 and not w3.canceled


# ------------------------------------------------------------------ keys, context managers

def test_str_and_bytes_keys_are_the_same_key(client):
    w = client.watch("sk", prefix=True)
    w.get(5)
    client.put("sk/é", "välue")
    assert client.get(b"sk/\xc3\xa9").kvs[0].value == "välue".encode()
    client.put(b"sk/b", b"\xff")
    assert [kv.key for kv in client.get("sk/", prefix=True).kvs] == [b"sk/b", "sk/é".encode()]
    assert client.delete("sk/", prefix=True).deleted == 2
    keys = []
    while len(keys) < 4:
        keys += [(e.type, e.kv.key) for e in w.get(5).events]
    assert keys == [("PUT", "sk/é".encode()), ("PUT", b"sk/b"),
                    ("DELETE", b"sk/b"), ("DELETE", "sk/é".encode())]
    with pytest.raises(TypeError):
        client.put(1, "v")


def test_context_managers_release_everything(broker_proc):
    name = broker_proc.name
    with clientlib.connect(name, timeout=10) as keep:
        base = shm_entries(name)
        with clientlib.connect(name, timeout=10) as c:
            assert len(client_pids_settled(name, 2)) == 2
            with c.watch("cm") as w:
                assert w.get(5).created
                c.put("cm", "1")
                assert w.get(5).events[0].kv.value == b"1"
            assert w.canceled
            assert [r.canceled for r in w] == [True]  # the cancel confirmation, then end
            with pytest.raises(clientlib.WatchClosed):
                w.get(1)
            assert shm_entries(name) > base  # its rings and arena exist while connected
        with pytest.raises(clientlib.ClientClosed):
            c.put("cm", "2")
        c.close()  # idempotent
        wait_for(lambda: shm_entries(name) == base, 10, "the closed client's rings to go")
        assert len(client_pids_settled(name, 1)) == 1
        assert keep.get("cm").kvs[0].value == b"1"


def client_pids_settled(name: str, n: int) -> list[int]:
    def settled():
        pids = client_pids(name)
        return pids if len(pids) == n else None

    return wait_for(settled, 10, f"the broker to report {n} clients")


@pytest.mark.timeout(60)
def test_broker_handle_is_a_context_manager():
    with broker.spawn() as b:
        name = b.name
        assert b.alive() and shm_entries(name)
        with clientlib.connect(name, timeout=10) as c:
            c.put("x", "y")
    assert not b.alive()
    assert not shm_entries(name)
    with pytest.raises(clientlib.BrokerUnavailable):
        clientlib.connect(name, timeout=2)


@pytest.mark.timeout(60)
def test_too_many_clients_and_a_freed_slot_is_reused():
    from shmwatch.wire.errors import TooManyClientsError

    with broker.spawn(max_clients=2) as b, clientlib.connect(b.name, timeout=10) as c1:
        c2 = clientlib.connect(b.name, timeout=10)
        with pytest.raises(TooManyClientsError):
            clientlib.connect(b.name, timeout=5)
        c2.close()

        def third():
            try:
                return clientlib.connect(b.name, timeout=5)
            except TooManyClientsError:
                return None  # the broker has not processed the goodbye yet

        with wait_for(third, 10, "the closed client's slot to be free"):
            assert c1.put("k", "v").revision == 2


# ------------------------------------------------------------------ threads

@pytest.mark.timeout(60)
def test_one_client_shared_by_four_threads(client):
    n = 150
    errors: list = []
    results: dict[int, tuple] = {}

    def worker(t: int) -> None:
        try:
            w = client.watch(f"t{t}/", prefix=True, prev_kv=True)
            assert w.get(10).created
            revs = []
            for i in range(n):
                if i % 10 == 9:
                    r = client.delete(f"t{t}/{i - 1:03d}")
                    assert r.deleted == 1
                    revs.append(("DELETE", f"t{t}/{i - 1:03d}".encode(), b"", r.revision))
                else:
                    r = client.put(f"t{t}/{i:03d}", f"{t}.{i}")
                    revs.append(("PUT", f"t{t}/{i:03d}".encode(), f"{t}.{i}".encode(),
                                 r.revision))
                got = client.get(f"t{t}/", prefix=True, count_only=True)
                assert got.revision >= r.revision
            evs = []
            while len(evs) < n:
                resp = w.get(10) if t % 2 else w.get_nowait()
                if resp is None:
                    resp = w.get(10)
                evs += [(e.type, e.kv.key, e.kv.value, e.kv.mod_revision) for e in resp.events]
            w.cancel()
            results[t] = (revs, evs, client.get(f"t{t}/", prefix=True))
        except BaseException as exc:  # noqa: BLE001 (the main thread reports it)
            errors.append((t, exc))

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(50)
    assert not any(th.is_alive() for th in threads), "a thread is stuck"
    assert not errors, errors
    all_revs = []
    for t, (revs, evs, final) in results.items():
        assert evs == revs, f"thread {t}: its watch saw {evs[:3]}..., it wrote {revs[:3]}..."
        all_revs += [r[3] for r in revs]
        live = {k for typ, k, _v, _r in revs if typ == "PUT"} - {
            k for typ, k, _v, _r in revs if typ == "DELETE"}
        assert {kv.key for kv in final.kvs} == live
    assert len(set(all_revs)) == len(all_revs) == 4 * n  # one revision per write


# ------------------------------------------------------------------ dead peers

@pytest.mark.timeout(60)
def test_sigkilled_client_process_is_reclaimed(broker_proc, client, tmp_path):
    name = broker_proc.name
    w = client.watch("idle/", prefix=True)
    assert w.get(5).created
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    info = str(tmp_path / "info")
    p = ctx.Process(target=mp_workers.idle_client, args=(name, 3, ready, info), daemon=True)
    p.start()
    try:
        assert ready.wait(60), "the client process did not get going"
        part = load(info)["part"]
        theirs = {e for e in shm_entries(name) if f".{part}." in e + "."}
        assert len(theirs) >= 3, theirs  # rings, doorbell, an arena of watch rings
        wait_for(lambda: p.pid in client_pids(name), 10, "the broker to list the client")
        p.kill()
        p.join(10)
        assert p.exitcode == -9
        wait_for(lambda: p.pid not in client_pids(name), 10, "the dead client to be reclaimed")
        wait_for(lambda: not (theirs & shm_entries(name)), 10,
                 "the dead client's segments to be unlinked")
        wait_for(lambda: read_stats(name)["watchers"]["total"] == 1, 10,
                 "the dead client's watchers to be dropped")
    finally:
        reap([p])
    # Nobody else noticed: this client still works, its watch too.
    rev = client.put("idle/x", "after").revision
    evs = []
    while not evs or evs[-1].kv.mod_revision < rev:
        evs += w.get(5).events
    assert evs[-1].kv.key == b"idle/x"


@pytest.mark.timeout(60)
def test_broker_stop_wakes_a_blocked_watch_get_with_broker_unavailable():
    b = broker.spawn()
    try:
        c = clientlib.connect(b.name, timeout=10)
        w = c.watch("k")
        assert w.get(5).created
        outcome: list = []
        blocked = threading.Event()

        def reader() -> None:
            blocked.set()
            try:
                outcome.append(w.get(timeout=30))
            except BaseException as exc:  # noqa: BLE001 (the main thread reports it)
                outcome.append(exc)

        th = threading.Thread(target=reader, daemon=True)
        th.start()
        assert blocked.wait(10)
        b.stop()
        th.join(20)
        assert not th.is_alive(), "watch.get() still blocked after the broker stopped"
        assert len(outcome) == 1 and isinstance(outcome[0], clientlib.BrokerUnavailable), \
            outcome
        with pytest.raises(clientlib.BrokerUnavailable):
            c.put("k", "v")
        with pytest.raises(clientlib.BrokerUnavailable):
            w.get(1)
        c.close()
    finally:
        b.stop()
    assert not shm_entries(b.name)


# ------------------------------------------------------------------ watch life cycle

@pytest.mark.timeout(60)
def test_watch_iterator_ends_after_cancel(client):
    w = client.watch("it", prefix=True)
    seen: list = []
    errors: list = []

    def iterate() -> None:
        try:
            for r in w:
                seen.append(r)  # noqa: PERF402 (the main thread watches it grow)
        except BaseException as exc:  # noqa: BLE001 (the main thread reports it)
            errors.append(exc)

    th = threading.Thread(target=iterate, daemon=True)
    th.start()
    revs = [client.put(f"it/{i}", "v").revision for i in range(3)]
    wait_for(lambda: sum(len(r.events) for r in seen) == 3, 10, "the iterator to see 3 events")
    w.cancel(timeout=10)
    th.join(10)
    assert not th.is_alive(), "iteration did not end after cancel()"
    assert not errors, errors
    assert seen[0].created and seen[-1].canceled and not seen[-1].compact_revision
    assert [e.kv.mod_revision for r in seen for e in r.events] == revs
    assert list(w) == []
    w.cancel()  # cancelling again is a no-op
    # Same thread: responses sent before the cancel stay readable, then it ends.
    w2 = client.watch("it2")
    rev = client.put("it2", "a").revision
    w2.cancel(timeout=10)
    got = list(w2)
    assert got[0].created and got[-1].canceled
    assert [e.kv.mod_revision for r in got for e in r.events] == [rev]


def test_request_progress_is_a_watch_id_minus_1_response_at_the_current_revision(client):
    w1 = client.watch("p1")
    w2 = client.watch("p", prefix=True)
    assert w1.get(5).created and w2.get(5).created
    client.put("p1", "x")
    client.put("other", "y")
    rev = client.put("p2", "z").revision
    assert client.request_progress() is None
    for w, n_events in ((w1, 1), (w2, 2)):
        evs, r = [], w.get(5)
        while r.events:
            evs += r.events
            r = w.get(5)
        assert len(evs) == n_events
        assert r.watch_id == -1 and r.revision == rev and r.is_progress_notify
        assert not (r.created or r.canceled or r.compact_revision)
        assert w.get_nowait() is None


@pytest.mark.timeout(90)
def test_close_while_other_threads_are_blocked_in_get(broker_proc, tmp_path):
    ctx = mp.get_context("spawn")
    out = str(tmp_path / "out")
    p = ctx.Process(target=mp_workers.close_while_blocked, args=(broker_proc.name, 2, out),
                    daemon=True)
    p.start()
    try:
        p.join(60)
        assert p.exitcode == 0, f"the process sharing the client died: exit code {p.exitcode}"
    finally:
        reap([p])
    res = load(out)
    assert res["stuck"] == 0, "a get() stayed blocked after close()"
    # A closed client ends every blocked call with a clear error, never a crash or hang.
    assert sorted(res["outcome"]) == ["ClientClosed"] * 2, res
    wait_for(lambda: p.pid not in client_pids(broker_proc.name), 10,
             "the broker to forget the client")
