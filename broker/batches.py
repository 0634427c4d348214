"""What a revision's events become for the watchers that get them: etcd's
newWatcherBatch (`select`: which watcher gets which events) and the responses built
for them (`RevisionBatch`, `responses`: fragments as etcd's sendFragments). Shared by
the live path (`WatchCore.notify`) and catch-up (`WatchCore.sync_watchers`). Pure.
"""

from __future__ import annotations

from collections.abc import Callable

from shmwatch.wire.events import LoggedEvent, events_blob
from shmwatch.wire.protocol import FILTER_NODELETE, FILTER_NOPUT

from .watcher_group import Watcher


class RevisionBatch:
    """One revision's events for the watchers that get them: each event's encoding is
    cut from the log's pieces (with or without prev_kv), and each distinct response is
    built once however many watchers receive it."""

    __slots__ = ("rev", "events", "_blobs")

    def __init__(self, rev: int, events: list[LoggedEvent]):
        self.rev = rev
        self.events = events
        self._blobs: dict[tuple, bytes] = {}

    def encoded(self, idxs, with_prev: bool) -> list[bytes]:
        events = self.events
        return [events[i].encoded(with_prev) for i in idxs]

    def responses(self, w: Watcher, idxs: tuple[int, ...], fragment_limit: int) -> list[bytes]:
        if w.fragment and len(idxs) > 1:
            return responses(self.rev, self.encoded(idxs, w.prev_kv), True, fragment_limit)
        k = (idxs, w.prev_kv)
        b = self._blobs.get(k)
        if b is None:
            b = self._blobs[k] = events_blob(self.rev, self.encoded(idxs, w.prev_kv))
        return [b]


def responses(rev: int, encoded: list[bytes], fragment: bool, limit: int) -> list[bytes]:
    """The response(s) that carry `encoded` events at header revision `rev`: one, or,
    for a watcher that asked for `fragment`, etcd's sendFragments: a response over
    `limit` cut into responses of whole events, each under the limit (at least one
    event each), all but the last marked `fragment`."""
    if not fragment or len(encoded) < 2 or sum(len(e) for e in encoded) < limit:
        return [events_blob(rev, encoded)]
    out, cur, size = [], [], 0
    for e in encoded:
        if cur and size + len(e) >= limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += len(e)
    out.append(cur)
    return [events_blob(rev, part, fragment=i < len(out) - 1) for i, part in enumerate(out)]


def select(match: Callable[[bytes], list[Watcher]], events: list[LoggedEvent],
           rev: int) -> dict[Watcher, tuple[int, ...]]:
    """etcd's newWatcherBatch: which watchers get which events of revision `rev` (the
    watchers `match` finds for each key, past their filters and their minRev), in the
    events' order. Shared by the live path and catch-up. O(E·log B + M)."""
    if len(events) == 1:
        ev = events[0]
        bit = FILTER_NOPUT if ev.type == "PUT" else FILTER_NODELETE
        return {w: (0,) for w in match(ev.key) if not w.filters & bit and w.min_rev <= rev}
    per: dict[Watcher, list[int]] = {}
    for i, ev in enumerate(events):
        bit = FILTER_NOPUT if ev.type == "PUT" else FILTER_NODELETE
        for w in match(ev.key):
            if not w.filters & bit and w.min_rev <= rev:
                idxs = per.get(w)
                if idxs is None:
                    per[w] = [i]
                elif idxs[-1] != i:
                    idxs.append(i)
    return {w: tuple(idxs) for w, idxs in per.items()}
