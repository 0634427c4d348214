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
# Random tokens in the names of the broker's doorbell, revision log and stats segment
# (see "Names" in docs/INTERNALS.md); 0 until the object exists.
CTL_BELL_TOKEN = 18
CTL_LOG_TOKEN = 19
CTL_STATS_TOKEN = 20
CTL_WORDS = 24  # words 21..23 reserved
CTL_SLOTS_OFFSET = CTL_WORDS * 8

CTL_STATE_STARTING = 0
CTL_STATE_RUNNING = 1
CTL_STATE_STOPPING = 2

# Client slots: SLOT_WORDS u64 words each, after the header words.
SLOT_WORDS = 16
SLOT_STATE = 0
SLOT_GEN = 1
SLOT_PID = 2
SLOT_CREATE_TIME_US = 3
SLOT_TOKEN = 4  # broker: the random token in this registration's object names
SLOT_ERROR = 5  # broker, with SLOT_FAILED: the clientlib error code of the failure
SLOT_ERROR_ARG = 6  # broker, with SLOT_FAILED: a number for the message (bytes needed)
SLOT_LABEL = 8  # client: its label, SLOT_LABEL_BYTES of UTF-8, NUL-padded (words 8-15)
SLOT_LABEL_BYTES = 64

SLOT_FREE = 0
SLOT_REQUESTED = 1
SLOT_READY = 2
SLOT_FAILED = 3  # the broker could not register the requester: see SLOT_ERROR

# OFD lock bytes in the control segment's file: the broker holds byte 0, the client
# in slot i holds byte 1 + i. Whoever removes a dead broker's objects holds
# REAPER_LOCK_BYTE meanwhile, so two cleaners never remove the same name twice (a lock
# may lie beyond the end of the file).
BROKER_LOCK_BYTE = 0
REAPER_LOCK_BYTE = 1 << 62


def slot_lock_byte(slot: int) -> int:
    return 1 + slot


def ctl_payload_size(max_clients: int) -> int:
    return CTL_SLOTS_OFFSET + max_clients * SLOT_WORDS * 8


def slot_word(slot: int, field: int) -> int:
    """Index into payload.cast("Q") of a slot's field."""
    return CTL_WORDS + slot * SLOT_WORDS + field


def slot_label_offset(slot: int) -> int:
    """Byte offset in the control payload of a slot's label."""
    return slot_word(slot, SLOT_LABEL) * 8


# ---- client segment payload ---------------------------------------------------
# 64 bytes of header (u32 sleeping flag of the client's doorbell at 0), then the
# request ring, then the response ring.
CLIENT_HEADER = 64
CLIENT_SLEEPING = 0  # byte offset of the u32 flag

# ---- names ----------------------------------------------------------------------
# Every name but `ctl` carries a random 64-bit token (written in hex), so nobody can
# create an object under a name the broker will use before it does.

CTL_PART = "ctl"
CTL_TEMP_PREFIX = "ctl.new."  # a control segment before it is published as `ctl`


def token_hex(token: int) -> str:
    return f"{token:016x}"


def ctl_temp_part(token: int) -> str:
    return CTL_TEMP_PREFIX + token_hex(token)


def bell_part(token: int) -> str:
    return "bell." + token_hex(token)


def log_part(token: int) -> str:
    return "log." + token_hex(token)


def stats_part(token: int) -> str:
    return "stats." + token_hex(token)


def client_part(slot: int, gen: int, token: int) -> str:
    """A registration's rings; its doorbell is `<client part>.bell`."""
    return f"c{slot}g{gen}.{token_hex(token)}"


def client_bell_part(client: str) -> str:
    return client + ".bell"


def arena_part(client: str, arena: int, token: int) -> str:
    return f"{client}.a{arena}.{token_hex(token)}"

