"""Byte layouts of the broker's segments, shared by the broker and its clients.

Only offsets and sizes live here: what the fields mean is the broker's and clientlib's
business. Every field is naturally aligned; u64 fields are read and written through
`memoryview.cast("Q")` views, which CPython does as single aligned stores.
"""

from __future__ import annotations

# Segment kinds (stored in the segment header, checked on open).
KIND_CTL = 1
KIND_CLIENT = 2
KIND_ARENA = 3
KIND_LOG = 4
KIND_STATS = 5

# ---- control segment payload ------------------------------------------------
# u64 words at these indexes of payload.cast("Q"):
CTL_PID = 0
CTL_CREATE_TIME_US = 1  # psutil create_time of the broker, in microseconds
CTL_HEARTBEAT_NS = 2  # time.time_ns() of the broker's last housekeeping pass
CTL_MAX_CLIENTS = 3
CTL_STATE = 4  # CTL_STATE_* below
CTL_MAX_REQUEST_BYTES = 5
CTL_REQUEST_RING = 6  # capacity in bytes
CTL_RESPONSE_RING = 7
CTL_WATCH_RING = 8
CTL_RINGS_PER_ARENA = 9
CTL_REG_SEQ = 10  # bumped by a client that registered or left: "scan the slots"
CTL_CLUSTER_ID = 11  # random per broker instance (etcd's cluster id)
CTL_BROKER_SLEEPING = 12  # u32 flag word of the broker's doorbell (low half)
CTL_SPACE_HINT = 13  # a consumer freed space in a ring the broker was blocked on
CTL_REVISION = 14  # the store's current revision (for tools)
CTL_COMPACT_REV = 15  # the store's compaction revision (for tools)
CTL_MAX_RESPONSE_BYTES = 16  # the largest reply the broker sends (clients bound reads by it)
CTL_MAX_WATCHERS = 17  # watches one client may hold
CTL_WORDS = 24  # words 18..23 reserved
CTL_SLOTS_OFFSET = CTL_WORDS * 8

CTL_STATE_STARTING = 0
CTL_STATE_RUNNING = 1
CTL_STATE_STOPPING = 2

# Client slots: SLOT_WORDS u64 words each, after the header words.
SLOT_WORDS = 8
SLOT_STATE = 0
SLOT_GEN = 1
SLOT_PID = 2
SLOT_CREATE_TIME_US = 3

SLOT_FREE = 0
SLOT_REQUESTED = 1
SLOT_READY = 2

# OFD lock bytes in the control segment's file: the broker holds byte 0, the client
# in slot i holds byte 1 + i.
BROKER_LOCK_BYTE = 0


def slot_lock_byte(slot: int) -> int:
    return 1 + slot


def ctl_payload_size(max_clients: int) -> int:
    return CTL_SLOTS_OFFSET + max_clients * SLOT_WORDS * 8


def slot_word(slot: int, field: int) -> int:
    """Index into payload.cast("Q") of a slot's field."""
    return CTL_WORDS + slot * SLOT_WORDS + field


# ---- client segment payload ---------------------------------------------------
# 64 bytes of header (u32 sleeping flag of the client's doorbell at 0), then the
# request ring, then the response ring.
CLIENT_HEADER = 64
CLIENT_SLEEPING = 0  # byte offset of the u32 flag

# ---- names ----------------------------------------------------------------------


def client_part(slot: int, gen: int) -> str:
    return f"c{slot}g{gen}"


def arena_part(slot: int, gen: int, arena: int) -> str:
    return f"c{slot}g{gen}.a{arena}"

