"""In-memory stand-ins for shared-memory pieces, so the pure cores run in microseconds."""

from __future__ import annotations

from collections import deque

from shmwatch.wire.events import decode_watch_response


class FakeRing:
    """A Sink with the real ring's contract: a message that fits in one record is written
    whole or not at all; a larger one streams in records of at most capacity // 4; the
    consumer sees records only after publish(), and each record it consumes frees its
    space (so a message larger than the ring flows through while being read)."""

    def __init__(self, capacity: int = 1 << 16):
        self.capacity = capacity
        self.chunk = max(16, capacity // 4)
        self.max_chunk = self.chunk - 8
        self.used = 0
        self.records: deque[tuple[bytes, bool]] = deque()  # (data, more), published
        self.unpublished: list[tuple[bytes, bool]] = []
        self.assembling = bytearray()
        self.producer_blocked = 0

    def write(self, payload: bytes, offset: int = 0) -> int:
        n = len(payload)
        room = self.chunk - 8
        if offset == 0 and n <= room:
            if self.capacity - self.used < n + 8:
                return 0
            self.used += n + 8
            self.unpublished.append((bytes(payload), False))
            return n
        while offset < n:
            part = min(room, n - offset)
            if self.capacity - self.used < part + 8:
                break
            self.used += part + 8
            self.unpublished.append((bytes(payload[offset:offset + part]), offset + part < n))
            offset += part
        return offset

    def free(self) -> int:
        return self.capacity - self.used

    def release(self) -> None:
        """Nothing to release (a real ring releases its views of shared memory)."""

    def publish(self) -> None:
        self.records.extend(self.unpublished)
        self.unpublished.clear()

    def read_all(self, watch_id: int = 0) -> list:
        """Consume every published record; return the whole messages decoded."""
        out = []
        while self.records:
            data, more = self.records.popleft()
            self.used -= len(data) + 8
            self.assembling += data
            if not more:
                out.append(decode_watch_response(bytes(self.assembling), watch_id)[1])
                self.assembling.clear()
        return out
