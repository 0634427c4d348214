"""RingWriter: the one way the broker writes messages into a ring it produces into.

A client's response ring (replies) and each watcher's ring (watch responses) are both
written through a `RingWriter`: messages go into the ring in order; what the ring
cannot take yet waits in the writer (`held` bytes) until `flush()`; and the ring's
`producer_blocked` flag is raised whenever something waits, so the consumer signals
when it made room (the space hint). A message that fits one chunk is written whole or
not at all; a longer one streams through in chunks (shm.ring.Ring.write).

It catches nothing: a `RingCorrupt` (the consumer damaged its ring) propagates to the
caller, who disconnects that client. It reads no clock and decides no policy: who may
hold how much is the watch core's business (`WatchCore`, `owner_budget`) and the
shell's (reply backpressure).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol


class Sink(Protocol):
    """An SPSC ring's producer side (shm.ring.Ring; tests use tests.fakes.FakeRing)."""

    producer_blocked: int
    capacity: int
    max_chunk: int

    def write(self, payload: bytes, offset: int = 0) -> int: ...

    def publish(self) -> None: ...

    def free(self) -> int: ...

    def used(self) -> int: ...

    def release(self) -> None: ...


class RingWriter:
    """Ordered writes into one ring, holding what does not fit yet. Costs: O(bytes)
    copied; no allocation beyond the held messages themselves."""

    __slots__ = ("sink", "pending", "held")

    def __init__(self, sink: Sink):
        self.sink = sink
        self.pending: deque[list] = deque()  # [payload, offset] not yet fully written
        self.held = 0  # bytes of `pending` not yet in the ring

    def write(self, payload: bytes) -> bool:
        """Write `payload` after whatever is pending, holding what the ring cannot take.
        True when it went out whole now (not yet published: see `publish`)."""
        if self.pending:
            self._hold(payload, 0)
            return False
        off = self.sink.write(payload, 0)
        if off == len(payload):
            return True
        self._hold(payload, off)
        return False

    def try_write(self, payload: bytes) -> int:
        """Write `payload` if the writer holds nothing: returns the bytes that went in
        now (len(payload): all; 0: none and nothing kept; else the rest is held)."""
        assert not self.pending, "try_write with messages pending"
        off = self.sink.write(payload, 0)
        if off != len(payload):
            if off:
                self._hold(payload, off)
            else:
                self.sink.producer_blocked = 1
        return off

    def hold(self, payload: bytes) -> None:
        """Queue `payload` whole behind what is pending (nothing is written now)."""
        self._hold(payload, 0)

    def _hold(self, payload: bytes, off: int) -> None:
        self.pending.append([payload, off])
        self.held += len(payload) - off
        self.sink.producer_blocked = 1

    def flush(self) -> bool:
        """Write what is pending, in order, as far as the ring allows. True when nothing
        is left. Publishes what it wrote."""
        box = self.pending
        sink = self.sink
        wrote = False
        while box:
            item = box[0]
            off = sink.write(item[0], item[1])
            if off != item[1]:
                wrote = True
                self.held -= off - item[1]
            if off < len(item[0]):
                item[1] = off
                break
            box.popleft()
        if wrote:
            sink.publish()
        if box:
            sink.producer_blocked = 1
            return False
        return True

    def publish(self) -> None:
        """Make what was written visible to the consumer (one store)."""
        self.sink.publish()

    def drop(self) -> int:
        """Forget what is pending (its reader is gone); returns the bytes dropped."""
        dropped = self.held
        self.pending.clear()
        self.held = 0
        return dropped

    def room(self) -> int:
        """Bytes the ring could take now."""
        return self.sink.free()
