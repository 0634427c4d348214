"""What a benchmark record is: the same ~100 bytes through shmwatch and every peer.

A record is a 16-byte key and a 64-byte value whose first 16 bytes are the sequence
number and the INTENDED send time (`clock_ns`: time.perf_counter_ns, CLOCK_MONOTONIC,
the same clock in every process on Linux). Owns that layout and the keys a writer
cycles through; never how a record travels (transports/) or what is measured (trials).
"""

from __future__ import annotations

import struct
import time

KEY_LEN = 16
VALUE_LEN = 64
STAMP = struct.Struct("<qq")  # seq, intended send time (ns)
STAMP_AT = struct.Struct("<q")  # the intended send time, at offset SENT_AT of the value
SENT_AT = 8
PAD = b"." * (VALUE_LEN - STAMP.size)
KEYS_PER_WRITER = 1024  # keys cycle (a power of two: seq & mask): the key count stays bounded
BATCH = 64  # records per batched or pipelined write

clock_ns = time.perf_counter_ns


def value(seq: int, sent_ns: int) -> bytes:
    """The 64-byte value of record `seq`, stamped with its intended send time. (The
    writer and reader loops inline STAMP and STAMP_AT: a call per record would show.)"""
    return STAMP.pack(seq, sent_ns) + PAD


def make_keys(prefix: bytes, writer: int) -> list[bytes]:
    """KEYS_PER_WRITER keys of exactly 16 bytes: prefix(4) + writer digit + '/' + 10 digits."""
    keys = [b"%s%d/%010d" % (prefix, writer % 10, i) for i in range(KEYS_PER_WRITER)]
    assert all(len(k) == KEY_LEN for k in keys), keys[0]
    return keys
