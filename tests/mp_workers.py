"""Worker functions for the multi-process tests, run in children of a 'spawn' context.

They live at module level in an importable module so that `multiprocessing`'s spawn
start method can find them. Every worker bounds every wait, writes what it saw to a
file (msgpack) for the test process to check, and exits non-zero on any error (the
traceback goes to stderr, where pytest shows it).
"""

from __future__ import annotations

import os
import random
import signal
import time

import msgpack

WORKER_DEADLINE_S = 90.0  # no worker lives longer than this, whatever happens


def _enc_kv(kv):
    if kv is None:
        return None
    return [kv.key, kv.value, kv.create_revision, kv.mod_revision, kv.version, kv.lease]


def enc_event(e) -> list:
    """An Event as a plain list: [type, kv, prev_kv] with kv lists as on the wire."""
    return [e.type, _enc_kv(e.kv), _enc_kv(e.prev_kv)]


def enc_response(r) -> list:
    return [r.watch_id, r.revision, r.created, r.canceled, r.compact_revision,
            r.cancel_reason, r.fragment, [enc_event(e) for e in r.events]]


def report(path: str, obj) -> None:
    """Write `obj` (msgpack) to `path` atomically: a reader sees all of it or nothing."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(obj, use_bin_type=True))
    os.replace(tmp, path)


def load(path: str):
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False)


# ------------------------------------------------------------------ writers

def mp_key(i: int) -> str:
    """The overlapping key space of test_multiprocess: mp/<i % 3>/<i:02d>."""
    return f"mp/{i % 3}/{i:02d}"


def writer(name: str, wid: int, n_ops: int, n_keys: int, seed: int, out_path: str,
           start, began=None, began_after: int = 0) -> None:
    """`n_ops` puts, deletes and multi-key txns on keys mp_key(0..n_keys-1).

    Records every acknowledged write: [rev, kind, [[type, key, value], ...]] where the
    changes are what the write did (a delete of nothing changes nothing: no revision).
    Sets `began` after `began_after` operations, if given."""
    import clientlib
    from clientlib import op_delete, op_put

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    acks = []
    with clientlib.connect(name, timeout=20) as c:
        if not start.wait(60):
            raise RuntimeError("writer: start was never signalled")
        for n in range(n_ops):
            if began is not None and n == began_after:
                began.set()
            r = rnd.random()
            k = mp_key(rnd.randrange(n_keys))
            if r < 0.70:
                v = f"w{wid}-{n}"
                resp = c.put(k, v)
                acks.append([resp.revision, "put", [["PUT", k.encode(), v.encode()]]])
            elif r < 0.88:
                resp = c.delete(k)
                if resp.deleted:
                    acks.append([resp.revision, "delete", [["DELETE", k.encode(), b""]]])
            else:
                ks = sorted({mp_key(rnd.randrange(n_keys)) for _ in range(rnd.randrange(2, 6))})
                ops, changes = [], []
                for i, x in enumerate(ks):
                    if i == 0 or rnd.random() < 0.75:
                        v = f"t{wid}-{n}-{i}"
                        ops.append(op_put(x, v))
                        changes.append(["PUT", x.encode(), v.encode()])
                    else:
                        ops.append(op_delete(x))
                        changes.append(["DELETE?", x.encode(), b""])  # only if it existed
                resp = c.txn(success=ops)
                if not resp.succeeded:
                    raise RuntimeError("writer: a txn without compares did not succeed")
                acks.append([resp.revision, "txn", changes])
        if began is not None and n_ops <= began_after:
            began.set()
    report(out_path, acks)


# ------------------------------------------------------------------ watchers

def watcher(name: str, spec: dict, out_path: str, ready, done, final_rev, count=None,
            go=None, resume=None) -> None:
    """One watch, recorded response by response until the stream is provably complete.

    spec: key, range_end (None / bytes / b"\\0"), prefix, start_revision, prev_kv.
    `go`: wait for it before creating the watch (a watcher started late).
    `resume`: after the `created` response, read nothing until it is set (a stalled
    watcher whose ring fills, so the broker makes it a victim).
    Once `done` is set (the writers finished; `final_rev` holds the last revision),
    asks for progress and stops at the progress response (watch_id -1) whose revision
    is >= final_rev: the broker sends it only when everything up to it was delivered.
    Stops at a `canceled` response too. `count` (a shared int) counts events received.
    """
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    deadline = time.monotonic() + WORKER_DEADLINE_S
    got = []
    with clientlib.connect(name, timeout=20) as c:
        if go is not None and not go.wait(60):
            raise RuntimeError("watcher: go was never signalled")
        w = c.watch(spec["key"], spec.get("range_end"), prefix=spec.get("prefix", False),
                    start_revision=spec.get("start_revision", 0),
                    prev_kv=spec.get("prev_kv", False))
        first = w.get(20)
        got.append(enc_response(first))
        ready.set()
        if resume is not None and not resume.wait(WORKER_DEADLINE_S - 10):
            raise RuntimeError("watcher: resume was never signalled")
        asked = False
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError(f"watcher {spec}: stream not complete before the deadline "
                                   f"({len(got)} responses)")
            if done.is_set() and not asked:
                c.request_progress(timeout=20)
                asked = True
            try:
                r = w.get(timeout=0.2)
            except clientlib.Timeout:
                continue
            got.append(enc_response(r))
            if count is not None and r.events:
                with count.get_lock():
                    count.value += len(r.events)
            if r.canceled:
                break
            if r.watch_id == -1 and asked:
                if r.revision >= final_rev.value:
                    break
                asked = False  # an older progress answer: ask again
    report(out_path, got)


# ------------------------------------------------------------------ other children

def idle_client(name: str, n_watches: int, ready, info_path: str) -> None:
    """Connect, create a few watches and write a key, report, then wait to be killed."""
    import clientlib

    c = clientlib.connect(name, timeout=20)
    watches = [c.watch(f"idle/{i}") for i in range(n_watches)]
    for w in watches:
        w.get(20)
    c.put("idle/0", "x")
    watches[0].get(20)
    report(info_path, {"pid": os.getpid(), "part": c._part})
    ready.set()
    time.sleep(WORKER_DEADLINE_S)  # the test SIGKILLs us long before this


def close_while_blocked(name: str, n_threads: int, out_path: str) -> None:
    """Threads block in watch.get(); the main thread closes the shared client.

    Records what each get() ended with. (Run in a child: a crash must not take the
    test process down.)"""
    import threading

    import clientlib

    c = clientlib.connect(name, timeout=20)
    watches = [c.watch(f"blocked/{i}") for i in range(n_threads)]
    for w in watches:
        w.get(20)
    outcome: list = []
    started = threading.Barrier(n_threads + 1, timeout=20)

    def reader(w) -> None:
        started.wait()
        try:
            r = w.get(timeout=30)
            outcome.append(f"response {r}")
        except Exception as exc:  # noqa: BLE001 (recorded for the test)
            outcome.append(type(exc).__name__)

    threads = [threading.Thread(target=reader, args=(w,), daemon=True) for w in watches]
    for t in threads:
        t.start()
    started.wait()
    time.sleep(0.3)  # let them reach the doorbell wait (no timing is asserted)
    c.close()
    for t in threads:
        t.join(40)
    report(out_path, {"outcome": outcome, "stuck": sum(t.is_alive() for t in threads)})


# ------------------------------------------------------------------ helpers for the tests

def wait_for(pred, timeout: float, what: str, interval: float = 0.02):
    """Poll `pred()` until it returns something truthy; AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def reap(procs, grace: float = 5.0) -> None:
    """Stop the processes this test started: wait up to `grace` seconds in all, then
    SIGKILL (by its own pid) each one still alive."""
    deadline = time.monotonic() + grace
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.pid is not None and p.is_alive():
            p.kill()
            p.join(10)



# ------------------------------------------------------------------ verification

def matcher(key: str, end: bytes | None, prefix: bool):
    k = key.encode()
    if prefix:
        return lambda x: x.startswith(k)
    if end is None:
        return lambda x: x == k
    if end == b"\0":
        return lambda x: x >= k
    return lambda x: k <= x < end


def read_history(c, final_rev: int) -> list:
    """Every event from revision 1 to final_rev, with prev_kv, as encoded lists."""
    events = []
    last = 0
    with c.watch(b"\0", b"\0", start_revision=1, prev_kv=True, timeout=20) as w:
        created = w.get(20)
        assert created.created and not created.canceled
        while last < final_rev:
            r = w.get(30)
            assert not r.canceled, f"reference watch canceled: {r}"
            for e in r.events:
                assert e.kv.mod_revision >= last, "reference history out of order"
                last = e.kv.mod_revision
                events.append(enc_event(e))
    return events


def parse_stream(label: str, got: list) -> tuple[list, list, list]:
    """(created response, events in arrival order, last response) of a recorded stream.

    Checks the shape: `created` first; then responses in revision order, no duplicate
    revision, the events of one revision in one response, event revisions <= the
    response's header revision; progress responses (watch_id -1) without events; a
    `canceled` response only as the last one."""
    assert got, f"{label}: no responses"
    wid, created, canceled = got[0][0], got[0][2], got[0][3]
    assert created and not canceled and wid >= 0, f"{label}: first response {got[0][:7]}"
    flat: list = []
    owner: dict[int, int] = {}
    prev_rev = 0
    for n, (rwid, rrev, rcreated, rcanceled, compact, _reason, fragment, events) in \
            enumerate(got[1:], 1):
        assert not rcreated and not fragment, f"{label}: unexpected response {got[n][:7]}"
        if rcanceled or compact:
            assert n == len(got) - 1, f"{label}: a response after the cancel {got[n][:7]}"
            assert not events, f"{label}: canceled response with events"
            continue
        assert rwid in (wid, -1), f"{label}: response for watch id {rwid}"
        if rwid == -1:
            assert not events, f"{label}: progress response with events"
            continue
        assert events, f"{label}: empty non-progress response {got[n][:7]}"
        for e in events:
            rev = e[1][3]
            assert rev <= rrev, f"{label}: event at {rev} in a response of revision {rrev}"
            assert rev >= prev_rev, f"{label}: revision {rev} after {prev_rev}: out of order"
            if rev in owner:
                assert owner[rev] == n, \
                    f"{label}: revision {rev} split across responses {owner[rev]} and {n}"
            owner[rev] = n
            prev_rev = rev
            flat.append(e)
    return got[0], flat, got[-1]


def first_difference(label: str, got: list, want: list) -> str:
    n = next((j for j in range(min(len(got), len(want))) if got[j] != want[j]),
             min(len(got), len(want)))
    return (f"{label}: got {len(got)} events, expected {len(want)}; first difference at "
            f"#{n}: got {got[n] if n < len(got) else 'nothing'}, "
            f"expected {want[n] if n < len(want) else 'nothing'}")


def expected_for(spec, history: list, first: int) -> list:
    """The history's events a watcher of `spec` must see from revision `first` on."""
    key, end, prefix, _late, prev_kv = spec
    match = matcher(key, end, prefix)
    return [[t, kv, prev if prev_kv else None] for t, kv, prev in history
            if kv[3] >= first and match(kv[0])]


def check_stream(i: int, spec, got: list, history: list, final_rev: int) -> None:
    """A watcher's whole stream is exactly its share of the history, ending complete."""
    label = f"watcher {i} {spec}"
    created, flat, last = parse_stream(label, got)
    if spec[3]:  # started late, from revision 1
        assert created[1] > 1, f"{label}: started before the writes began"
        first = 1
    else:
        first = created[1] + 1
    assert last[0] == -1 and not last[3] and last[1] >= final_rev, \
        f"{label}: the stream does not end at a progress response >= {final_rev}: {last[:7]}"
    want = expected_for(spec, history, first)
    assert want, f"{label}: the history has nothing for it: a useless watcher"
    assert flat == want, first_difference(label, flat, want)


def check_acks(acks: list, history: list, final_rev: int) -> None:
    by_rev: dict[int, list] = {}
    for t, kv, _prev in history:
        by_rev.setdefault(kv[3], []).append((t, kv[0], kv[1]))
    assert sorted(by_rev) == list(range(2, final_rev + 1)), \
        "the history is not one revision per write from 2 to the final revision"
    revs = sorted(a[0] for a in acks)
    assert revs == list(range(2, final_rev + 1)), \
        "acknowledged revisions are not exactly the revisions of the history"
    for rev, kind, changes in acks:
        have = by_rev[rev]
        want = []
        for t, k, v in changes:
            if t == "DELETE?":  # a txn's delete of a key that may not have existed
                if ("DELETE", k, b"") in have:
                    want.append(("DELETE", k, b""))
            else:
                want.append((t, k, v))
        assert have == want, f"revision {rev} ({kind}): history has {have}, writer did {want}"
