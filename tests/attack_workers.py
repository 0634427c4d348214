"""Workers and checks of the attack tests (tests/test_attack_*.py): a randomized
writer, a client process holding several watches read at different paces, and the
verification of every watch stream against the history rebuilt from the writers'
acknowledgements (replayed through the pure MVCC core, so every revision's events,
prev_kv included, are known exactly).

Workers run in forked children; each bounds every wait, reports what it saw to a file
(msgpack) and exits non-zero on an error (its traceback goes to stderr).
"""

from __future__ import annotations

import os
import random
import signal
import time

import msgpack

DEADLINE_S = 60.0  # no worker lives longer than this
GROUPS = "abc"
KEYS = [f"x/{g}/{i}" for g in GROUPS for i in range(4)]


def report(path: str, obj) -> None:
    """Write `obj` (msgpack) to `path` atomically."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(obj, use_bin_type=True))
    os.replace(tmp, path)


def load(path: str):
    with open(path, "rb") as f:
        return msgpack.unpackb(f.read(), raw=False)


def _kv(kv):
    return None if kv is None else [kv.key, kv.value, kv.create_revision, kv.mod_revision,
                                    kv.version, kv.lease]


def enc_response(r) -> list:
    return [r.watch_id, r.revision, r.created, r.canceled, r.compact_revision,
            r.cancel_reason, r.fragment,
            [[e.type, _kv(e.kv), _kv(e.prev_kv)] for e in r.events]]


# ------------------------------------------------------------------ writer

def writer(name: str, wid: int, seed: int, n_ops: int, big: int, out_path: str, start,
           pace: float = 0.0) -> None:
    """`n_ops` random writes on KEYS: small and large puts (large: up to `big` bytes,
    more than a small watch ring holds), deletes, deletes of a whole group or of every
    key (one revision of many events, with large prev_kvs), multi-key txns.
    Pauses up to 2 x `pace` seconds between writes.
    Reports `[revision, wire op]` for every write that made a revision."""
    import clientlib
    from clientlib import op_delete, op_put, op_txn
    from shmwatch.wire.ops import PutOp
    from shmwatch.wire.protocol import encode_op

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    acks = []
    with clientlib.connect(name, timeout=20) as c:
        if not start.wait(30):
            raise RuntimeError("writer: never started")
        for n in range(n_ops):
            if pace:
                time.sleep(rnd.uniform(0, 2 * pace))
            r = rnd.random()
            k = rnd.choice(KEYS)
            if r < 0.55:
                size = rnd.randrange(big // 2, big) if rnd.random() < 0.08 else rnd.randrange(1, 200)
                op = op_put(k, bytes([97 + n % 26]) * size)
            elif r < 0.72:
                op = op_delete(k)
            elif r < 0.76:
                op = op_delete("x/" if rnd.random() < 0.3 else f"x/{rnd.choice(GROUPS)}/",
                               prefix=True)
            else:
                ks = rnd.sample(KEYS, rnd.randrange(2, 6))
                ops = [op_put(ks[0], f"t{wid}.{n}")]
                ops += [op_put(x, f"t{wid}.{n}.{i}") if rnd.random() < 0.7 else op_delete(x)
                        for i, x in enumerate(ks[1:])]
                resp = c.txn(success=ops)
                assert resp.succeeded
                acks.append([resp.revision, encode_op(op_txn((), ops, ()))])
                continue
            if isinstance(op, PutOp):
                resp = c.put(op.key, op.value)
            else:
                resp = c.delete(op.key, op.range_end)
                if not resp.deleted:
                    continue
            acks.append([resp.revision, encode_op(op)])
    report(out_path, acks)


# ------------------------------------------------------------------ watchers

def watch_client(name: str, specs: list[dict], seed: int, out_path: str, ready, done,
                 final_rev) -> None:
    """One client holding several watches, read in one loop at each watch's own pace:
    `fast`; `slow` (a pause after each response); `stall` (stops reading for a while
    after a few responses, then reads fast); `one_then_stall` (reads one response, then
    nothing until the writers are done); `late` (reads nothing until then); `recreate`
    (after a few responses, cancels the watch and resumes it from the revision after
    the last one delivered, as etcd's clients do). A spec with `"mid": True` is created
    only during the run, from a recent revision. The client also asks for progress now
    and then (each answer must come after every event up to its revision).
    Each stream ends at a progress response at or past the final revision (the broker
    sends it only once everything before it was delivered), or at a cancel.
    Reports [specs with their actual start_revision, streams]."""
    import clientlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rnd = random.Random(seed)
    deadline = time.monotonic() + DEADLINE_S
    specs = [dict(s) for s in specs]

    def open_watch(c, s: dict):
        return c.watch(s["key"], s.get("range_end"), prefix=s.get("prefix", False),
                       start_revision=s.get("start_revision", 0), prev_kv=s["prev_kv"],
                       filters=s["filters"], fragment=s["fragment"])

    with clientlib.connect(name, timeout=20) as c:
        ws: list = [None if s.get("mid") else open_watch(c, s) for s in specs]
        got: list[list] = [[] for _ in ws]
        for w, g in zip(ws, got):
            if w is not None:
                g.append(enc_response(w.get(20)))
        ready.set()
        t0 = time.monotonic()
        mid_at = [t0 + rnd.uniform(0.1, 0.6) for _ in ws]
        stall_until = [0.0] * len(ws)
        recreated = [False] * len(ws)
        finished = [False] * len(ws)
        asked_at = 0.0
        while not all(finished):
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"streams not complete before the deadline: {finished}")
            over = done.is_set()
            if now - asked_at > (0.3 if over else 0.05):
                c.request_progress(timeout=20)
                asked_at = now
            idle = True
            for i, s in enumerate(specs):
                if finished[i]:
                    continue
                if ws[i] is None:
                    if now < mid_at[i] and not over:
                        continue
                    cur = c.get("x/", prefix=True, count_only=True).revision
                    s["start_revision"] = max(1, cur - rnd.randrange(0, 30))
                    ws[i] = open_watch(c, s)
                    got[i].append(enc_response(ws[i].get(20)))
                w = ws[i]
                pace = s["pace"]
                n = len(got[i])
                if not over:
                    if pace == "late" or (pace == "one_then_stall" and n >= 2):
                        continue
                    if now < stall_until[i]:
                        continue
                    if pace == "stall" and n == 3:
                        stall_until[i] = now + rnd.uniform(0.3, 1.5)
                if pace == "recreate" and n >= 4 and not recreated[i]:
                    recreated[i] = True
                    ws[i] = _resume(c, w, s, got[i], open_watch)
                    continue
                r = w.get_nowait()
                if r is None:
                    continue
                idle = False
                got[i].append(enc_response(r))
                if r.canceled:
                    finished[i] = True
                elif r.watch_id == -1 and over and r.revision >= final_rev.value > 0:
                    finished[i] = True
                if pace == "slow" and not over:
                    time.sleep(rnd.uniform(0.0005, 0.003))
            if idle:
                time.sleep(0.001)
    report(out_path, [specs, got])


def _resume(c, w, spec: dict, got: list, open_watch):
    """Cancel `w`, keep what it delivered before its final response, and open it again
    from the revision after the last one delivered (its `created` is not recorded)."""
    w.cancel(timeout=20)
    for r in w:
        if r.canceled:
            if r.compact_revision:  # compacted meanwhile: that is how it ends
                got.append(enc_response(r))
                return w
            break
        got.append(enc_response(r))
    revs = [e[1][3] for resp in got[1:] for e in resp[7]]
    nxt = revs[-1] + 1 if revs else (spec.get("start_revision") or got[0][1] + 1)
    again = dict(spec, start_revision=nxt)
    w2 = open_watch(c, again)
    assert w2.get(20).created
    return w2


# ------------------------------------------------------------------ the history

def history(acks: list) -> dict[int, list]:
    """revision -> events (as lists, prev_kv included) of every acknowledged write,
    replayed in revision order through a fresh MVCC core. The revisions must be
    exactly 2..n (every revision of the run was made by these writers)."""
    from broker.mvcc import MVCCStore
    from shmwatch.wire.protocol import decode_op

    acks = sorted(acks)
    revs = [a[0] for a in acks]
    assert revs == list(range(2, 2 + len(acks))), "acknowledged revisions are not 2..n"
    store = MVCCStore()
    out = {}
    for rev, op in acks:
        _, events = store.apply(decode_op(op))
        assert store.rev == rev, f"replay reached revision {store.rev}, the write was {rev}"
        out[rev] = [[e.type, _kv(e.kv), _kv(e.prev_kv)] for e in events]
    return out


def matches(spec: dict, key: bytes) -> bool:
    k = spec["key"].encode()
    if spec.get("prefix"):
        return key.startswith(k)
    end = spec.get("range_end")
    if end is None:
        return key == k
    if end == b"\0":
        return key >= k
    return k <= key < end


def expected(spec: dict, events: list) -> list:
    out = []
    for t, kv, prev in events:
        if not matches(spec, kv[0]):
            continue
        if ("noput" in spec["filters"] and t == "PUT") or (
                "nodelete" in spec["filters"] and t == "DELETE"):
            continue
        out.append([t, kv, prev if spec["prev_kv"] else None])
    return out


def at_compaction(evs: list) -> list:
    """etcd's form of a compaction revision replayed by a watch (mvcc.events_at_compact_rev)."""
    last = {e[1][0]: i for i, e in enumerate(evs)}
    return [[t, kv, None] for i, (t, kv, _p) in enumerate(evs)
            if t == "PUT" and last[kv[0]] == i]


def check_stream(label: str, spec: dict, got: list, hist: dict[int, list], final: int,
                 compactions: set[int]) -> int:
    """Violations raise AssertionError naming the watcher; returns the events checked.

    The stream must be: `created`, then for every revision from its first one on that
    has events for it, exactly those events (a revision that was a compaction point may
    come in etcd's form for it), in order, each revision in one response (or in
    consecutive fragments, all but the last marked), then either a progress response
    at or past `final`, or a compaction cancel whose compact_revision it needed."""
    assert got and got[0][2] and not got[0][3], f"{label}: first response {got[0][:7]}"
    first = spec.get("start_revision") or got[0][1] + 1
    per_rev: dict[int, list] = {}
    order: list[int] = []
    cancel = None
    logical: list = []  # events of the response being assembled from fragments
    open_fragment = False
    progress: list[tuple[int, int]] = []  # (revision claimed, revisions delivered before)
    for n, (wid, rrev, created, canceled, compact, reason, fragment, events) in enumerate(got[1:], 1):
        assert not created, f"{label}: a second created response #{n}"
        if canceled:
            assert n == len(got) - 1, f"{label}: responses after the cancel"
            assert not open_fragment, f"{label}: cancelled inside a fragmented response"
            cancel = (compact, reason)
            continue
        if wid == -1 or not events:
            assert not events and not open_fragment, \
                f"{label}: response #{n} {got[n][:7]} inside a fragmented response"
            if wid == -1:
                progress.append((rrev, len(order)))
            continue
        for e in events:
            assert e[1][3] <= rrev, f"{label}: event of revision {e[1][3]} under header {rrev}"
        logical.extend(events)
        if fragment:
            assert spec["fragment"], f"{label}: a fragment it did not ask for"
            open_fragment = True
            continue
        open_fragment = False
        # One whole (possibly reassembled) response: its revisions are new, in order.
        seen_here: set[int] = set()
        for e in logical:
            rev = e[1][3]
            if rev in per_rev and rev not in seen_here:
                raise AssertionError(f"{label}: revision {rev} arrives again in response #{n}")
            if order and rev < order[-1]:
                raise AssertionError(f"{label}: revision {rev} after {order[-1]}")
            if rev not in per_rev:
                per_rev[rev] = []
                order.append(rev)
                seen_here.add(rev)
            per_rev[rev].append(e)
        logical = []
    assert not open_fragment, f"{label}: stream ends inside a fragmented response"
    last_needed = final
    if cancel is not None:
        compact, reason = cancel
        assert compact, f"{label}: cancelled without compact_revision ({reason})"
        nxt = (order[-1] + 1) if order else first
        assert nxt < compact, f"{label}: cancelled at compact_revision {compact} but it " \
                              f"only needed revision {nxt} on"
        assert compact <= max(compactions, default=0), \
            f"{label}: compact_revision {compact} past every compaction {sorted(compactions)}"
        last_needed = nxt - 1
    else:
        assert got[-1][0] == -1 and got[-1][1] >= final, \
            f"{label}: the stream does not end at a progress response >= {final}: {got[-1][:7]}"
    checked = 0
    for rev in range(first, last_needed + 1):
        want = expected(spec, hist.get(rev, []))
        have = per_rev.get(rev, [])
        if have == want:
            checked += len(have)
            continue
        if rev in compactions and have == at_compaction(want):
            checked += len(have)
            continue
        raise AssertionError(f"{label}: revision {rev}: got {_show(have)}, expected {_show(want)}")
    for claimed, k in progress:
        before = set(order[:k])
        owed = [r for r in range(first, min(claimed, last_needed) + 1)
                if (expected(spec, hist.get(r, [])) and not (
                    r in compactions and not at_compaction(expected(spec, hist.get(r, [])))))
                and r not in before]
        assert not owed, (f"{label}: a progress response at revision {claimed} came before "
                          f"the events of revisions {owed[:5]}")
    extra = [r for r in per_rev if r < first or r > last_needed]
    assert not extra, f"{label}: events of revisions {extra[:5]} it should not have"
    return checked


def _show(evs: list) -> str:
    return "[" + ", ".join(f"{t} {kv[0]!r}@{kv[3]} v{len(kv[1])}b prev={'-' if p is None else p[3]}"
                           for t, kv, p in evs) + "]"
