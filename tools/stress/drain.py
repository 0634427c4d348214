"""The end of a stress run: every stream brought to a known point, then the final state.

In each watcher process, `drain_watch` requests progress and reads up to its answer,
which the broker sends once the watch has everything up to that revision. In the main
process, `drain` waits for the workers, reads the final `get`, lets the reference read
up to that revision, and settles which revisions were compaction points."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

import clientlib
from broker.admin import broker_info

from .records import kv_tuple, record_response
from .verify import Compactions

if TYPE_CHECKING:
    from .load import Load
    from .start import Setup

DRAIN_S = 60.0  # a watcher's wait for its progress answer, behind everything it missed
REFERENCE_S = 60.0  # the reference's catching up with the final revision
MIN_JOIN_S = 60.0  # the workers' end: their drain, at least, or the run's length
# A log this full may have evicted revisions on its own between two samples.
WRAP_FILL = 0.9


def drain_watch(c: clientlib.Client, w: clientlib.Watch, out: BinaryIO, name: str) -> None:
    """End watcher `name`'s stream at a known point, recording every response read."""
    c.request_progress()
    deadline = time.monotonic() + DRAIN_S
    while True:
        try:
            r = w.get(timeout=max(0.1, deadline - time.monotonic()))
        except clientlib.Timeout:
            raise SystemExit(f"{name}: no progress response within {DRAIN_S:g} s") from None
        record_response(out, r)
        if r.canceled or (r.watch_id == -1 and not r.events):
            return


@dataclass
class End:
    """Where the run ended."""

    final_rev: int
    final: list  # the final get: kv tuples
    compactions: Compactions
    last_stats: dict  # the broker's last stats read
    elapsed: float  # seconds from the start signal to the end of the drain


def drain(setup: Setup, load: Load) -> End:
    deadline = time.monotonic() + max(MIN_JOIN_S, setup.a.duration)
    for w in load.workers:
        w.proc.join(max(0.1, deadline - time.monotonic()))
    final = setup.client.get("", prefix=True)
    setup.ref.finish(final.revision, timeout=REFERENCE_S)
    last_stats = setup.read_stats() or load.last_stats
    final_compact = broker_info(setup.name).get("compact_revision", 0)
    seen = load.seen_compact | {final_compact}
    # A compaction point this run did not make, or a log near full: the log evicted
    # on its own, at points not all seen.
    wrapped = bool(seen - load.compacted_to - {0, setup.stats0.get("compact_revision", 0)}) \
        or load.max_log_fill >= WRAP_FILL
    return End(final.revision, [kv_tuple(kv) for kv in final.kvs],
               Compactions(load.compacted_to | seen, final_compact, wrapped), last_stats,
               time.monotonic() - load.t0)
