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
    W_CATCHUP,
    W_CREATED,
    W_PROGRESS,
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


class CatchUp(NamedTuple):
    """A catch-up the watcher makes itself (a W_CATCHUP message): its events of
    revisions lo..hi, read from the revision log starting at absolute position `pos`,
    in responses whose header revision is `hi`; `compact_rev` is the compaction point
    when the broker sent it (etcd's rule for that revision's events). A response holds
    at most `max_revs` revisions and `max_bytes` of encoded events, and a watcher that
    asked for fragments gets them above `fragment_limit` (the broker's own limits)."""

    lo: int
    hi: int
    compact_rev: int
    pos: int
    max_revs: int
    max_bytes: int
    fragment_limit: int


def encode_watch_catchup(cu: CatchUp) -> bytes:
    """The broker hands a watcher its catch-up (see `CatchUp`)."""
    return packb([W_CATCHUP, cu.hi, cu.compact_rev, "", False,
                  [cu.lo, cu.pos, cu.max_revs, cu.max_bytes, cu.fragment_limit]])


def decode_watch_response(data: bytes, watch_id: int) -> tuple[int, WatchResponse | CatchUp]:
    """(kind, WatchResponse) from a watcher-ring record; (W_CATCHUP, CatchUp) for a
    catch-up the watcher makes itself."""
    msg = unpackb(data)
    try:
        kind, rev, compact_rev, reason, fragment, events = msg
        if (type(kind) is not int or not 0 <= kind <= W_CATCHUP
                or type(rev) is not int or type(compact_rev) is not int
                or type(reason) is not str or type(fragment) is not bool
                or type(events) is not list):
            raise TypeError
        if kind == W_CATCHUP:
            lo, pos, max_revs, max_bytes, fragment_limit = events
            if (any(type(x) is not int for x in events) or not 0 < lo <= rev or pos < 0
                    or max_revs < 1 or max_bytes < 1 or fragment_limit < 1):
                raise TypeError
            return kind, CatchUp(lo, rev, compact_rev, pos, max_revs, max_bytes, fragment_limit)
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
    return [logged for logged, _ev in read_log_events(payload, rev)]


def read_log_events(payload: bytes, rev: int) -> list[tuple[LoggedEvent, Event]]:
    """`read_log_record`, each event with its decoded `Event` too (what a watcher that
    catches up itself delivers). ProtocolError if the record is not one of ours."""
    try:
        out = []
        for e in msgpack.unpackb(payload, raw=False, use_list=False):
            e = LoggedEvent(*e)
            if type(e.head) is not bytes or type(e.prev) is not bytes:
                raise TypeError("pieces are not bytes")
            t, kv, prev = msgpack.unpackb(e.head + e.prev, raw=False, use_list=False)
            kv, prev = decode_kv(kv), decode_kv(prev)
            if t != e.type or t not in _EV_TYPES or kv.key != e.key or kv.mod_revision != rev:
                raise ValueError("event does not match its record")
            out.append((e, Event(t, kv, prev)))
        if not out:
            raise ValueError("no events")
    except (ProtocolError, ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"shmwatch: malformed revision-log record for revision {rev}: "
                            f"{exc}") from None
    return out


def kept_at_compact_rev(events: Sequence[LoggedEvent]) -> list[int]:
    """Which of a revision's events etcd 3.4 still delivers once it is the compaction
    revision (broker.mvcc.events_at_compact_rev is the same rule on Event objects):
    only the PUTs that are still the newest change of their key in that revision, and
    (the caller's part) without prev_kv, which etcd looks up below the compaction and
    fails to find. Their indices, in order. O(len)."""
    last = {e.key: i for i, e in enumerate(events)}
    return [i for i, e in enumerate(events) if e.type == "PUT" and last[e.key] == i]


def at_compact_rev(events: list[LoggedEvent]) -> list[LoggedEvent]:
    """The events of the compaction revision as a watch still gets them (see
    `kept_at_compact_rev`), without prev_kv."""
    return [events[i]._replace(prev=NIL) for i in kept_at_compact_rev(events)]
