"""An MVCCStore's whole state as data, and its invariants.

`snapshot(store)` / `restore(data)`: the state, retained history included, as plain
msgpack-able data (what broker/wal.py persists); `check(store)`: every internal
invariant, asserted (tests call it after each operation; `restore` runs it on what it
rebuilt). Pure, and private to the store (it reads the store's fields)."""

from __future__ import annotations

from bisect import bisect_right

from sortedcontainers import SortedList

from shmwatch.wire.types import KeyValue

SNAPSHOT_FORMAT = 1


def _fail(msg: str) -> None:
    raise AssertionError(msg)


class History:
    """The retained versions of one key, oldest first.

    ``revs[i]`` is the main revision of entry i, ``kvs[i]`` its KeyValue or None for a
    tombstone. One txn may write a key twice (delete then put, or put then delete); both
    entries then share the main revision and list order is etcd's sub-revision order.
    """

    __slots__ = ("kvs", "revs")

    def __init__(self) -> None:
        self.revs: list[int] = []
        self.kvs: list[KeyValue | None] = []

    def at(self, rev: int) -> KeyValue | None:
        """The key's KeyValue at revision `rev` (None: absent). O(log h)."""
        i = bisect_right(self.revs, rev) - 1
        return self.kvs[i] if i >= 0 else None


def snapshot(store) -> dict:
    """The whole state, retained history included, as plain msgpack-able data.

    ``{"format": 1, "rev": int, "compact_rev": int (-1: never), "keys": [[key,
    [entry, ...]], ...]}`` with keys sorted and entries oldest first, an entry being
    ``[mod_revision, value, create_revision, version, lease]`` or ``[mod_revision]``
    for a tombstone. O(total retained versions).
    """
    keys = []
    for key in store._keys:
        h = store._hist[key]
        entries = [
            [r] if kv is None else [r, kv.value, kv.create_revision, kv.version, kv.lease]
            for r, kv in zip(h.revs, h.kvs)
        ]
        keys.append([key, entries])
    return {
        "format": SNAPSHOT_FORMAT,
        "rev": store.rev,
        "compact_rev": store._compact_main,
        "keys": keys,
    }

def restore(s, data: dict):
    """Fill the empty store `s` from `snapshot()` data and return it; ValueError if the
    data is inconsistent. O(N log N), N = retained versions."""
    if data.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"unknown MVCC snapshot format {data.get('format')!r}")
    try:
        s.rev = int(data["rev"])
        s._compact_main = int(data["compact_rev"])
        s._log_start = max(2, s._compact_main + 1)
        changed: dict[int, list[bytes]] = {}
        for key, entries in data["keys"]:
            key = bytes(key)
            h = History()
            for e in entries:
                r = int(e[0])
                h.revs.append(r)
                if len(e) == 1:
                    h.kvs.append(None)
                else:
                    h.kvs.append(KeyValue(key, bytes(e[1]), int(e[2]), r, int(e[3]), int(e[4])))
                if r >= s._log_start:
                    changed.setdefault(r, []).append(key)
            if not h.revs:
                raise ValueError(f"key {key!r} without history")
            s._hist[key] = h
            last = h.kvs[-1]
            if last is not None:
                s._live[key] = last
        s._keys = SortedList(s._hist)
        s._live_keys = SortedList(s._live)
        for key, kv in s._live.items():
            if kv.lease:
                s._by_lease.setdefault(kv.lease, set()).add(key)
        for r in range(s._log_start, s.rev + 1):
            keys = changed.pop(r, None)
            if not keys:
                raise ValueError(f"revision {r} has no change")
            s._log.append(keys[0] if len(keys) == 1 else tuple(keys))
        if changed:
            raise ValueError(f"changes beyond revision {s.rev}")
        s._check()
    except (KeyError, IndexError, TypeError, AssertionError) as e:
        raise ValueError(f"inconsistent MVCC snapshot: {e}") from e
    return s


# Over 60 lines on purpose: one assertion per invariant, in one list a reader can
# check against the store's fields; split, the list of invariants would scatter.
def check(store) -> None:
    """Assert every internal invariant (raises AssertionError, also under -O). O(N)."""
    if store.rev < 1:
        _fail(f"rev {store.rev} < 1")
    if not -1 <= store._compact_main <= store.rev:
        _fail(f"compact_main {store._compact_main} outside [-1, {store.rev}]")
    if list(store._keys) != sorted(store._hist):
        _fail("_keys differs from the keys of _hist")
    if list(store._live_keys) != sorted(store._live):
        _fail("_live_keys differs from the keys of _live")
    if store._log_start != max(2, store._compact_main + 1):
        _fail(f"log start {store._log_start}, compact_main {store._compact_main}")
    if len(store._log) != max(0, store.rev - store._log_start + 1):
        _fail(f"log has {len(store._log)} entries for revisions {store._log_start}..{store.rev}")
    logged: set[tuple[int, bytes]] = set()
    for i, entry in enumerate(store._log):
        r = store._log_start + i
        for k in (entry,) if type(entry) is bytes else entry:
            logged.add((r, k))
    seen: set[tuple[int, bytes]] = set()
    for key, h in store._hist.items():
        revs, kvs = h.revs, h.kvs
        if not revs or len(revs) != len(kvs):
            _fail(f"{key!r}: empty or ragged history")
        if kvs[0] is None:
            _fail(f"{key!r}: history starts with a tombstone")
        below = 0
        prev: KeyValue | None = None
        for i, (r, kv) in enumerate(zip(revs, kvs)):
            if r > store.rev or r < 2:
                _fail(f"{key!r}: revision {r} outside [2, {store.rev}]")
            if i and r < revs[i - 1]:
                _fail(f"{key!r}: revisions not ascending")
            if i and r == revs[i - 1] and (kv is None) == (kvs[i - 1] is None):
                _fail(f"{key!r}: two entries of one kind at revision {r}")
            if r <= store._compact_main:
                below += 1
                if kv is None:
                    _fail(f"{key!r}: tombstone {r} kept at or below compaction")
            if r >= store._log_start:
                seen.add((r, key))
                if (r, key) not in logged:
                    _fail(f"{key!r}: change at {r} missing from the log")
            if kv is None:
                if i and kvs[i - 1] is None:
                    _fail(f"{key!r}: tombstone of a dead key at {r}")
            else:
                if kv.key != key or kv.mod_revision != r:
                    _fail(f"{key!r}: bad KeyValue {kv!r} at {r}")
                if i == 0:
                    if kv.version < 1 or not 1 < kv.create_revision <= r:
                        _fail(f"{key!r}: bad first KeyValue {kv!r}")
                    if kv.version == 1 and kv.create_revision != r:
                        _fail(f"{key!r}: version 1 not created at {r}")
                elif prev is None:
                    if kv.version != 1 or kv.create_revision != r:
                        _fail(f"{key!r}: re-creation {kv!r} not version 1 at {r}")
                elif (
                    kv.version != prev.version + 1
                    or kv.create_revision != prev.create_revision
                    or r == prev.mod_revision
                ):
                    _fail(f"{key!r}: {kv!r} does not follow {prev!r}")
            prev = kv
        if below > 1:
            _fail(f"{key!r}: {below} versions kept at or below compaction")
        last = kvs[-1]
        if last is None:
            if key in store._live:
                _fail(f"{key!r}: deleted but live")
        elif store._live.get(key) is not last:
            _fail(f"{key!r}: live entry differs from its newest version")
    if len(store._live) > len(store._hist) or any(k not in store._hist for k in store._live):
        _fail("live key without history")
    if seen != logged:
        _fail(f"log entries without a change: {sorted(logged - seen)[:5]}")
    by_lease: dict[int, set[bytes]] = {}
    for key, kv in store._live.items():
        if kv.lease:
            by_lease.setdefault(kv.lease, set()).add(key)
    if by_lease != store._by_lease:
        _fail("the lease index differs from the live keys' leases")
