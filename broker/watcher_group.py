"""etcd's watcherGroup: who watches which keys. Data structures only (etcd's
watcher_group.go), no life cycle, no I/O: `broker.watch` moves watchers between groups.

`WatcherGroup` answers "which watchers are interested in this key" with a dict for
single-key watchers and an interval index (sortedcontainers) for ranges, prefixes and
from-key watchers: O(log B + M) for M matches.
"""

from __future__ import annotations

from sortedcontainers import SortedList


class Watcher:
    """One watch: what it watches (key or range, options), where its responses go
    (`out`, a `RingWriter`), its position (`min_rev`: the first revision it still owes
    its reader) and its life-cycle state (`broker.watch.State`, moved only by the core).
    `owner` is its client's watch stream; `tag` the shell's name for its ring."""

    __slots__ = (
        "id", "owner", "key", "end", "min_rev", "prev_kv", "filters", "progress_notify",
        "fragment", "out", "state", "sent_since_tick", "progress_pending", "tag",
    )

    def __init__(self, wid: int, owner, key: bytes, end: bytes | None, out, *,
                 prev_kv: bool = False, filters: int = 0, progress_notify: bool = False,
                 fragment: bool = False, tag=None):
        self.id = wid
        self.owner = owner
        self.key = key
        self.end = end  # None: one key; b"\0": every key >= key; else [key, end)
        self.out = out
        self.prev_kv = prev_kv
        self.filters = filters
        self.progress_notify = progress_notify
        self.fragment = fragment
        self.min_rev = 0
        self.state = None
        self.sent_since_tick = False
        self.progress_pending = False  # a progress response is owed once synced
        self.tag = tag

    @property
    def interval(self) -> tuple[bytes, bytes | None]:
        """[lo, hi) with hi None for unbounded (from-key)."""
        return self.key, (None if self.end == b"\0" else self.end)

    def matches(self, key: bytes) -> bool:
        if self.end is None:
            return key == self.key
        if self.end == b"\0":
            return key >= self.key
        return self.key <= key < self.end

    def __repr__(self) -> str:
        state = getattr(self.state, "value", self.state)
        return f"<Watcher {self.id} {self.key!r}..{self.end!r} {state} min_rev={self.min_rev}>"


class IntervalIndex:
    """Stabbing queries over half-open byte intervals [lo, hi); hi None means unbounded.

    Built on elementary segments: the sorted distinct boundaries cut the key space, and
    each segment keeps the set of intervals covering it. Identical intervals share one
    entry (fan-out to many watchers of one prefix costs one interval).

    Runtime complexity: stab O(log B) returning the covering set (B = boundaries);
    add/remove O(log B + S) where S = segments the interval spans.
    """

    def __init__(self):
        self._bounds = SortedList()
        self._cover: dict[bytes, set] = {}
        self._refs: dict[bytes, int] = {}
        self.members: dict[tuple, set] = {}

    def _acquire(self, b: bytes) -> None:
        if b in self._refs:
            self._refs[b] += 1
            return
        i = self._bounds.bisect_right(b)
        self._cover[b] = set(self._cover[self._bounds[i - 1]]) if i else set()
        self._bounds.add(b)
        self._refs[b] = 1

    def _release(self, b: bytes) -> None:
        self._refs[b] -= 1
        if self._refs[b] == 0:
            del self._refs[b]
            del self._cover[b]
            self._bounds.remove(b)

    def _span(self, lo: bytes, hi: bytes | None):
        if hi is None:
            return self._bounds.irange(minimum=lo)
        return self._bounds.irange(lo, hi, inclusive=(True, False))

    def add(self, interval: tuple, item) -> None:
        group = self.members.get(interval)
        if group is not None:
            group.add(item)
            return
        self.members[interval] = {item}
        lo, hi = interval
        self._acquire(lo)
        if hi is not None:
            self._acquire(hi)
        for b in self._span(lo, hi):
            self._cover[b].add(interval)

    def remove(self, interval: tuple, item) -> None:
        group = self.members[interval]
        group.discard(item)
        if group:
            return
        del self.members[interval]
        lo, hi = interval
        for b in self._span(lo, hi):
            self._cover[b].discard(interval)
        self._release(lo)
        if hi is not None:
            self._release(hi)

    def stab(self, key: bytes) -> set:
        """The intervals containing `key`. O(log B). Do not mutate the result."""
        i = self._bounds.bisect_right(key)
        if not i:
            return _EMPTY
        return self._cover[self._bounds[i - 1]]

    def _check(self) -> None:
        assert set(self._bounds) == set(self._cover) == set(self._refs)
        refs: dict[bytes, int] = {}
        for lo, hi in self.members:
            refs[lo] = refs.get(lo, 0) + 1
            if hi is not None:
                refs[hi] = refs.get(hi, 0) + 1
        assert refs == self._refs, (refs, self._refs)
        for b in self._bounds:
            want = {iv for iv in self.members if iv[0] <= b and (iv[1] is None or b < iv[1])}
            assert self._cover[b] == want, (b, self._cover[b], want)
        for group in self.members.values():
            assert group


_EMPTY: frozenset = frozenset()


class WatcherGroup:
    """etcd's watcherGroup: a dict for single-key watchers plus an interval index.

    Runtime complexity: add/remove O(log B + S); match O(log B + M) for M matches.
    """

    def __init__(self):
        self.keys: dict[bytes, set[Watcher]] = {}
        self.ranges = IntervalIndex()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def add(self, w: Watcher) -> None:
        if w.end is None:
            self.keys.setdefault(w.key, set()).add(w)
        else:
            self.ranges.add(w.interval, w)
        self._n += 1

    def remove(self, w: Watcher) -> None:
        if w.end is None:
            s = self.keys[w.key]
            s.remove(w)
            if not s:
                del self.keys[w.key]
        else:
            self.ranges.remove(w.interval, w)
        self._n -= 1

    def match(self, key: bytes) -> list[Watcher]:
        """Every watcher interested in `key`, as a fresh list (callers may mutate the group)."""
        s = self.keys.get(key)
        out = list(s) if s else []
        ivs = self.ranges.stab(key)
        if ivs:
            members = self.ranges.members
            for iv in ivs:
                out.extend(members[iv])
        return out

    def __iter__(self):
        for s in self.keys.values():
            yield from s
        for s in self.ranges.members.values():
            yield from s

    def _check(self) -> None:
        self.ranges._check()
        assert self._n == sum(len(s) for s in self.keys.values()) + sum(
            len(s) for s in self.ranges.members.values())
        for k, s in self.keys.items():
            assert s and all(w.key == k and w.end is None for w in s)
