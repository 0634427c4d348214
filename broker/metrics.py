"""The broker's metrics: one msgpack document tools read from the stats segment.

`snapshot(broker)` builds it (O(W) over watchers: called a few times a second, never
per request); `StatsWriter` publishes it under a sequence lock (word 0 is odd while it
writes, word 1 is the length), so a reader (`broker.admin.read_stats`) copies a
consistent snapshot and never sends the broker a request.
"""

from __future__ import annotations

import os
import time

import msgpack

from shm.segment import Segment

from .watch_states import State

TOP_WATCHERS = 100  # per-watcher rows in the metrics: the most lagging ones


EXPIRING_SOON_S = 5.0  # a lease whose deadline is this close counts as "expiring soon"


def _client_row(c, core, lessor, rows: list) -> dict:
    worst_fill = 0.0
    max_lag = 0
    victims = 0
    for w in c.stream.watchers.values():
        if w.state is State.REMOVED or w.out is None:
            continue
        lag = core.lag(w)
        sink = w.out.sink
        fill = sink.used() / sink.capacity
        worst_fill = max(worst_fill, fill)
        max_lag = max(max_lag, lag)
        victims += w.state is State.VICTIM
        rows.append((lag, c.pid, w.id, fill, w.key, w.end, w.state.value, len(w.out.pending)))
    return {"slot": c.slot, "pid": c.pid, "create_time_us": c.create_time_us,
            "label": c.label, "watchers": len(c.stream.watchers), "requests": c.requests,
            "worst_fill": round(worst_fill, 4), "max_lag": max_lag, "victims": victims,
            "leases": lessor.owned_by(c)}


def snapshot(b) -> dict:
    """A snapshot of broker `b`'s state for tools/top and tools/stress."""
    core = b.core
    rows: list = []
    lessor = b.lessor
    clients = [_client_row(c, core, lessor, rows) for c in b.registry.clients.values()]
    # Most lagging first; ties in a stable order (pid, watch id), not by ring fill,
    # which changes at every snapshot.
    rows.sort(key=lambda r: (-r[0], r[1], r[2]))
    states = core.states()
    return {
        "name": b.cfg.name, "pid": os.getpid(), "started": b.started,
        "time": time.time(), "revision": b.mvcc.rev, "compact_revision": b.mvcc.compact_rev,
        "log": b.history.figures(),
        "writes": b.writes, "events_delivered": core.events_delivered,
        "watchers": {"total": sum(len(c.stream.watchers) for c in b.registry.clients.values()),
                     **states},
        "pending_events": core.pending_events(),
        "victims_entered": core.victims_entered, "catchups": core.catchups,
        "catchups_delegated": core.catchups_delegated,
        "compactions": core.compactions,
        "log_damage": b.log_damage,
        "upstream": b.mirror.figures() if b.mirror is not None else None,
        "leases": {"total": len(lessor), "bound": lessor.bound_count(),
                   "expiring_soon": lessor.expiring_within(time.monotonic(), EXPIRING_SOON_S),
                   "expired": lessor.expired_total},
        "clients": clients,
        "top_watchers": [
            {"lag": lag, "fill": round(fill, 4), "pid": pid, "watch_id": wid,
             "key": key.decode(errors="replace"),
             "range_end": None if end is None else end.decode(errors="replace"),
             "state": st, "pending": pend}
            for lag, pid, wid, fill, key, end, st, pend in rows[:TOP_WATCHERS]],
    }


class StatsWriter:
    """Publishes documents into the stats segment under a sequence lock."""

    def __init__(self, seg: Segment):
        self.seg = seg
        self.words = seg.payload[:16].cast("Q")
        # The sequence is ours: never computed from the shared word, which anyone with
        # access can overwrite (2**64-1 + 1 used to raise out of the broker's loop).
        self.seq = 0

    def publish(self, doc: dict) -> bool:
        """Write `doc`; False (nothing written) if it does not fit the segment."""
        data = msgpack.packb(doc, use_bin_type=True)
        buf = self.seg.payload
        if len(data) > len(buf) - 64:
            return False
        sw = self.words
        self.seq += 2
        sw[0] = self.seq - 1
        sw[1] = len(data)
        buf[16:16 + len(data)] = data
        sw[0] = self.seq
        return True

    def release(self) -> None:
        self.words.release()
