"""The messages that carry events: watch responses (on a watcher's ring) and revision-log
records (in the log's shared memory). Both are built from each event encoded once per
revision: `log_record` stores an event as two pieces (up to its prev_kv, and the
prev_kv), and a watch response is those pieces concatenated (`events_blob`), never
decoded and re-encoded on the way. Encoders and decoders side by side, as in
`shmwatch.wire.protocol` (requests and replies); every decoder bounds and checks what it
accepts: these bytes come from shared memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import msgpack

from .errors import ProtocolError
from .protocol import (
    _EV_TYPES,
    NIL,
    W_CANCELED,
    W_CREATED,
    W_PROGRESS,
    W_PROGRESS_NOTIFY,
    decode_kv,
    packb,
    unpackb,
)
from .types import Event, WatchResponse


# ---------------------------------------------------------------- watch responses

def _event(x) -> Event:
    if not isinstance(x, list) or len(x) != 3 or x[0] not in _EV_TYPES or x[1] is None:
        raise ProtocolError("shmwatch: malformed event")
    return Event(x[0], decode_kv(x[1]), decode_kv(x[2]))


def decode_watch_response(data: bytes, watch_id: int) -> tuple[int, WatchResponse]:
    """(kind, WatchResponse) from a watcher-ring record."""
    msg = unpackb(data)
    try:
        kind, rev, compact_rev, reason, fragment, events = msg
        if (type(kind) is not int or not 0 <= kind <= W_PROGRESS_NOTIFY
                or type(rev) is not int or type(compact_rev) is not int
                or type(reason) is not str or type(fragment) is not bool
                or type(events) is not list):
            raise TypeError
        evs = [_event(e) for e in events]
    except (TypeError, ValueError):
        raise ProtocolError("shmwatch: malformed watch response") from None
    wid = -1 if kind == W_PROGRESS else watch_id
    return kind, WatchResponse(
        watch_id=wid,
        revision=rev,
        events=evs,
        created=kind == W_CREATED,
        canceled=kind == W_CANCELED,
        compact_revision=compact_rev,
        cancel_reason=reason,
        fragment=fragment,
    )


def encode_watch_control(kind: int, rev: int, compact_rev: int = 0, reason: str = "") -> bytes:
    """A watch response without events (created, canceled, progress)."""
    return packb([kind, rev, compact_rev, reason, False, []])


_packer = msgpack.Packer(use_bin_type=True)


def array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def events_blob(rev: int, encoded_events, fragment: bool = False) -> bytes:
    """A W_EVENTS response from events already encoded (each one msgpack document).

    Cost: O(total bytes), one join; no re-encoding of events.
    """
    return b"".join((
        b"\x96\x00",
        _packer.pack(rev),
        b"\x00\xa0",
        b"\xc3" if fragment else b"\xc2",
        array_header(len(encoded_events)),
        *encoded_events,
    ))


def encode_event(ev: Event, with_prev: bool) -> bytes:
    """One event's msgpack encoding, with or without its prev_kv."""
    if with_prev or ev.prev_kv is None:
        return _packer.pack(ev)
    return _packer.pack((ev.type, ev.kv, None))


# ---------------------------------------------------------------- revision-log records


class LoggedEvent(NamedTuple):
    """One event as the revision log keeps it: what matching needs (`type`, `key`) and
    its encoding in two pieces, so that a watch response is built by concatenation:
    `head + prev` with its prev_kv, `head + NIL` without (no decoding, no re-encoding)."""

    type: str  # "PUT" | "DELETE"
    key: bytes
    head: bytes  # the event's encoding up to its prev_kv: array header, type, kv
    prev: bytes  # the prev_kv's encoding (NIL if none)

    def encoded(self, with_prev: bool) -> bytes:
        return self.head + (self.prev if with_prev else NIL)


def log_record(events: Sequence[Event]) -> tuple[bytes, list[LoggedEvent]]:
    """A revision's events as a log record, and as `LoggedEvent`s. O(size): one pack
    per event's kv and prev_kv, one for the record."""
    pack = _packer.pack
    logged = []
    for ev in events:
        head = b"\x93" + pack(ev.type) + pack(ev.kv)
        logged.append(LoggedEvent(ev.type, ev.kv.key, head,
                                  NIL if ev.prev_kv is None else pack(ev.prev_kv)))
    return pack(logged), logged


def read_log_record(payload: bytes, rev: int) -> list[LoggedEvent]:
    """A record of revision `rev` written by `log_record`; ProtocolError if it is not
    one. The log is in shared memory, which anyone of the same user can write (a valid
    CRC proves nothing then), and watchers get these bytes as they are: each event is
    decoded once here and checked to be exactly what its pieces claim. O(size)."""
    try:
        out = [LoggedEvent(*e) for e in msgpack.unpackb(payload, raw=False, use_list=False)]
        if not out:
            raise ValueError("no events")
        for e in out:
            if type(e.head) is not bytes or type(e.prev) is not bytes:
                raise TypeError("pieces are not bytes")
            t, kv, prev = msgpack.unpackb(e.head + e.prev, raw=False, use_list=False)
            kv, prev = decode_kv(kv), decode_kv(prev)
            if t != e.type or t not in _EV_TYPES or kv.key != e.key or kv.mod_revision != rev:
                raise ValueError("event does not match its record")
    except (ProtocolError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"shmwatch: malformed revision-log record for revision {rev}: "
                            f"{exc}") from None
    return out
