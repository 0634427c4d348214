"""The files a stress run's processes leave: one msgpack record per acknowledged write
(workers.writer_main) or per watch response (`record_response`, after a ["start",
revision] record), each written whole by one write(), so what a SIGKILLed process left
is exactly what it had done. Also the tuple form of a KeyValue the records and the
verifier share, and the grouping of events by revision."""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

import msgpack

# The reader's buffer bounds one record; a txn's changes or a response's events stay far
# below this.
MAX_RECORD_BYTES = 1 << 30


def write_record(f: BinaryIO, obj) -> None:
    """One msgpack record in one write() to an unbuffered file: a process SIGKILLed
    right after it returns has still written it."""
    f.write(msgpack.packb(obj, use_bin_type=True))


def read_records(path: str) -> list:
    """Every whole record of a file, arrays as tuples (a record cut short is dropped)."""
    try:
        with open(path, "rb") as f:
            return list(msgpack.Unpacker(f, raw=False, use_list=False,
                                         max_buffer_size=MAX_RECORD_BYTES))
    except FileNotFoundError:
        return []


def record_response(out: BinaryIO, r) -> int:
    """Record one watch response as ["resp", watch_id, revision, created, canceled,
    compact_revision, cancel_reason, [[type, kv, prev_kv], ...]]; its number of events."""
    write_record(out, ["resp", r.watch_id, r.revision, r.created, r.canceled,
                       r.compact_revision, r.cancel_reason,
                       [[e.type, kv_tuple(e.kv), kv_tuple(e.prev_kv)] for e in r.events]])
    return len(r.events)


def kv_tuple(kv) -> tuple | None:
    """A KeyValue as (key, value, create_revision, mod_revision, version, lease)."""
    return None if kv is None else (kv.key, kv.value, kv.create_revision, kv.mod_revision,
                                    kv.version, kv.lease)


def by_revision(events, rev_of: Callable) -> list[tuple[int, list]]:
    """Consecutive events of one revision (`rev_of(event)`), grouped."""
    out: list[tuple[int, list]] = []
    for e in events:
        rev = rev_of(e)
        if out and out[-1][0] == rev:
            out[-1][1].append(e)
        else:
            out.append((rev, [e]))
    return out
