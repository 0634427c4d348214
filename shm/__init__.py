"""Shared-memory primitives of shmwatch: segments, SPSC byte rings, doorbells and the
revision-log ring. This package knows nothing of keys, watches or msgpack."""

from .doorbell import Doorbell
from .errors import (
    LayoutMismatch,
    LogRecordCorrupt,
    MessageTooLarge,
    RecordEvicted,
    RingCorrupt,
    RingFull,
    SegmentExists,
    SegmentNotFound,
    ShmError,
    ShmNoSpace,
    ShmPermissionError,
)
from .revlog import REVLOG_HEADER, RevLog, RevLogReader, revlog_bytes
from .ring import (
    CONSUMER_SLEEPING_OFFSET,
    PRODUCER_BLOCKED_OFFSET,
    RING_HEADER,
    Ring,
    max_chunk_for,
    ring_bytes,
)
from .segment import (
    HEADER_SIZE,
    LAYOUT_VERSION,
    MAGIC,
    Segment,
    list_segments,
    list_semaphores,
    new_boot_id,
    shm_name,
)

__all__ = [
    "CONSUMER_SLEEPING_OFFSET",
    "HEADER_SIZE",
    "LAYOUT_VERSION",
    "MAGIC",
    "PRODUCER_BLOCKED_OFFSET",
    "REVLOG_HEADER",
    "RING_HEADER",
    "Doorbell",
    "LayoutMismatch",
    "LogRecordCorrupt",
    "MessageTooLarge",
    "RecordEvicted",
    "RevLog",
    "RevLogReader",
    "Ring",
    "RingCorrupt",
    "RingFull",
    "Segment",
    "SegmentExists",
    "SegmentNotFound",
    "ShmError",
    "ShmNoSpace",
    "ShmPermissionError",
    "list_segments",
    "list_semaphores",
    "max_chunk_for",
    "new_boot_id",
    "revlog_bytes",
    "ring_bytes",
    "shm_name",
]
