"""What the `shmwatch` client commands print, byte for byte as etcdctl 3.4 prints it.

- simple: keys and values as raw bytes, one per line (`--hex` writes every byte as
  `\\xHH`), never re-encoded: a value that is not UTF-8 comes out as the bytes stored.
- json: Go's encoding/json of etcd's protobuf messages, as etcdctl prints them: keys and
  values base64, int64 fields as numbers, zero fields omitted, watch responses as
  clientv3.WatchResponse (`Header`, `Events`, `CompactRevision`, `Canceled`, `Created`).
- table: the layout of etcdctl's tables (olekukonko/tablewriter as etcdctl 3.4 vendors
  it, right-aligned cells): borders of `+`, `-` and `|`, headers upper-cased and
  centred, cells wider than 30 columns wrapped at spaces with minimal raggedness.

Pure functions from clientlib's response types to bytes; the commands write them.
"""

from __future__ import annotations

import base64
import json
import unicodedata

from shmwatch.wire.types import DELETE, KeyValue, PutResponse, RangeResponse, TxnResponse, WatchResponse

MEMBER_ID_SALT = 0x5348_4D57  # member_id = cluster_id ^ this: one member per broker


# ------------------------------------------------------------------ simple


def hex_escape(b: bytes) -> bytes:
    """etcdctl --hex: every byte as `\\xHH`."""
    return b"".join(b"\\x%02x" % c for c in b)


def kv_lines(kv: KeyValue, hex_: bool = False, value_only: bool = False) -> bytes:
    """etcdctl's printKV: the key line (unless value_only), then the value line."""
    key, value = (hex_escape(kv.key), hex_escape(kv.value)) if hex_ else (kv.key, kv.value)
    return (b"" if value_only else key + b"\n") + value + b"\n"


def simple_put(r: PutResponse, hex_: bool = False) -> bytes:
    return b"OK\n" + (kv_lines(r.prev_kv, hex_) if r.prev_kv is not None else b"")


def simple_get(r: RangeResponse, hex_: bool = False, value_only: bool = False) -> bytes:
    return b"".join(kv_lines(kv, hex_, value_only) for kv in r.kvs)


def simple_del(r, hex_: bool = False) -> bytes:
    return b"%d\n" % r.deleted + b"".join(kv_lines(kv, hex_) for kv in r.prev_kvs)


def simple_txn(r: TxnResponse, hex_: bool = False) -> bytes:
    out = [b"SUCCESS\n" if r.succeeded else b"FAILURE\n"]
    for sub in r.responses:
        out.append(b"\n")
        if isinstance(sub, PutResponse):
            out.append(simple_put(sub, hex_))
        elif isinstance(sub, RangeResponse):
            out.append(simple_get(sub, hex_))
        else:
            out.append(simple_del(sub, hex_))
    return b"".join(out)


def simple_watch(r: WatchResponse, hex_: bool = False) -> bytes:
    out = []
    for e in r.events:
        out.append(e.type.encode() + b"\n")
        if e.prev_kv is not None:
            out.append(kv_lines(e.prev_kv, hex_))
        out.append(kv_lines(e.kv, hex_))
    return b"".join(out)


# ------------------------------------------------------------------ json


def _nz(d: dict) -> dict:
    """Drop zero / empty fields, as Go's encoding/json does with protobuf's omitempty."""
    return {k: v for k, v in d.items() if v not in (0, "", None, False, [], {})}


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def json_kv(kv: KeyValue) -> dict:
    return _nz({"key": _b64(kv.key), "create_revision": kv.create_revision,
                "mod_revision": kv.mod_revision, "version": kv.version,
                "value": _b64(kv.value), "lease": kv.lease})


def json_header(cluster_id: int, revision: int) -> dict:
    """A top-level response header: etcd's has cluster_id, member_id, revision (and
    raft_term, which a broker has no use for)."""
    return _nz({"cluster_id": cluster_id, "member_id": cluster_id ^ MEMBER_ID_SALT,
                "revision": revision})


def _put_body(r: PutResponse, header: dict) -> dict:
    out = {"header": header}
    if r.prev_kv is not None:
        out["prev_kv"] = json_kv(r.prev_kv)
    return out


def _range_body(r: RangeResponse, header: dict) -> dict:
    return _nz({"header": header, "kvs": [json_kv(kv) for kv in r.kvs], "more": r.more,
                "count": r.count}) or {"header": header}


def _del_body(r, header: dict) -> dict:
    return _nz({"header": header, "deleted": r.deleted,
                "prev_kvs": [json_kv(kv) for kv in r.prev_kvs]}) or {"header": header}


def json_bytes(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def json_put(r: PutResponse, cluster_id: int) -> bytes:
    return json_bytes(_put_body(r, json_header(cluster_id, r.revision)))


def json_get(r: RangeResponse, cluster_id: int) -> bytes:
    return json_bytes(_range_body(r, json_header(cluster_id, r.revision)))


def json_del(r, cluster_id: int) -> bytes:
    return json_bytes(_del_body(r, json_header(cluster_id, r.revision)))


def json_txn(r: TxnResponse, cluster_id: int) -> bytes:
    """Inner responses carry only their header revision, as etcd fills them; the oneof
    shows as Go's encoding/json writes it: {"Response": {"ResponsePut": {...}}}."""
    subs = []
    for sub in r.responses:
        header = _nz({"revision": sub.revision})
        if isinstance(sub, PutResponse):
            subs.append({"Response": {"ResponsePut": _put_body(sub, header)}})
        elif isinstance(sub, RangeResponse):
            subs.append({"Response": {"ResponseRange": _range_body(sub, header)}})
        else:
            subs.append({"Response": {"ResponseDeleteRange": _del_body(sub, header)}})
    return json_bytes(_nz({"header": json_header(cluster_id, r.revision),
                           "succeeded": r.succeeded, "responses": subs}))


# clientv3's answer to a refused watch create (its stream closes with the reason): a
# response that is nothing but `Canceled`, with a zero header and no event list.
JSON_WATCH_REFUSED = b'{"Header":{},"Events":null,"CompactRevision":0,"Canceled":true,"Created":false}\n'


def json_watch(r: WatchResponse, cluster_id: int) -> bytes:
    """etcdctl's `watch -w json` line: clientv3.WatchResponse, whose own fields are
    never omitted; an event's `type` is 1 for DELETE and omitted for PUT (0)."""
    events = []
    for e in r.events:
        ev = {"kv": json_kv(e.kv)}
        if e.type == DELETE:
            ev = {"type": 1, **ev}
        if e.prev_kv is not None:
            ev["prev_kv"] = json_kv(e.prev_kv)
        events.append(ev)
    return json_bytes({"Header": json_header(cluster_id, r.revision), "Events": events,
                       "CompactRevision": r.compact_revision, "Canceled": r.canceled,
                       "Created": r.created})


# ------------------------------------------------------------------ table

MAX_CELL_WIDTH = 30  # tablewriter's MAX_ROW_WIDTH: wider cells wrap at spaces


def _rune_width(c: str) -> int:
    """go-runewidth's width of one rune (East Asian ambiguous counted narrow)."""
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8 reads as U+FFFD: width 1
        return 1
    cat = unicodedata.category(c)
    if cat in ("Cc", "Mn", "Me", "Cn"):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def display_width(s: str) -> int:
    return sum(_rune_width(c) for c in s)


def _wrap_words(words: list[str], lim: int, penalty: int = 100_000) -> list[list[str]]:
    """tablewriter's WrapWords: break a list of words into lines of at most `lim`
    runes with minimal raggedness (sum of squared slack; over-long lines penalised).
    O(n^2) in the number of words of one cell."""
    n = len(words)
    length = [[0] * n for _ in range(n)]
    for i in range(n):
        length[i][i] = len(words[i])
        for j in range(i + 1, n):
            length[i][j] = length[i][j - 1] + 1 + len(words[j])
    nbrk = [0] * n
    cost = [2**31 - 1] * n
    for i in range(n - 1, -1, -1):
        if length[i][n - 1] <= lim:
            cost[i], nbrk[i] = 0, n
            continue
        for j in range(i + 1, n):
            d = lim - length[i][j - 1]
            c = d * d + cost[j] + (penalty if length[i][j - 1] > lim else 0)
            if c < cost[i]:
                cost[i], nbrk[i] = c, j
    lines, i = [], 0
    while i < n:
        lines.append(words[i:nbrk[i]])
        i = nbrk[i]
    return lines


def _wrap_cell(s: str, lim: int) -> list[str]:
    words = s.replace("\n", " ").split(" ")
    for w in words:  # a word longer than the limit widens it (measured in bytes, as Go's len)
        lim = max(lim, len(w.encode("utf-8", "surrogateescape")))
    return [" ".join(line) for line in _wrap_words(words, lim)]


def _title(h: str) -> str:
    return h.replace("_", " ").replace(".", " ").strip().upper()


def _centre(s: str, width: int) -> str:
    gap = width - display_width(s)
    if gap <= 0:
        return s
    return " " * (gap // 2) + s + " " * (gap - gap // 2)


def _right(s: str, width: int) -> str:
    return " " * max(0, width - display_width(s)) + s


def render_table(header: list[str], rows: list[list[str]]) -> str:
    """A table as etcdctl draws one (tablewriter, ALIGN_RIGHT). Cells are str; raw
    bytes may ride in them as surrogateescape characters.

    Column widths grow as rows are added, and each cell wraps at the width known when
    its row was added, exactly as tablewriter measures them."""
    widths: dict[int, int] = {}
    heights: dict[int, int] = {}

    def measure(s: str, col: int, row: int) -> list[str]:
        w = min(display_width(s), MAX_CELL_WIDTH)
        if widths.get(col, 0) < w or widths.get(col, 0) == 0:
            widths[col] = w
        if row < 0:
            return []
        lines = _wrap_cell(s, widths[col])
        widths[col] = max(widths[col], max(display_width(line) for line in lines))
        heights[row] = max(heights.get(row, 0), len(lines))
        return lines

    for i, h in enumerate(header):
        measure(h, i, -1)
    cells = [[measure(v, i, n) for i, v in enumerate(row)] for n, row in enumerate(rows)]
    ncols = len(widths)
    rule = "+" + "".join("-" * (widths[i] + 2) + "+" for i in range(ncols)) + "\n"
    out = [rule, "|" + "".join(f" {_centre(_title(h), widths[i])} |"
                               for i, h in enumerate(header)) + "\n", rule]
    for n, row in enumerate(cells):
        for x in range(heights[n]):
            line = "".join(f"| {_right(col[x] if x < len(col) else '  ', widths[y])} "
                           for y, col in enumerate(row))
            out.append(line + "|\n")
    out.append(rule)
    return "".join(out)


def table_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    return render_table(header, rows).encode("utf-8", "surrogateescape")


def _cell(b: bytes, hex_: bool) -> str:
    return (hex_escape(b) if hex_ else b).decode("utf-8", "surrogateescape")


GET_TABLE_HEADER = ["key", "value", "create_revision", "mod_revision", "version", "lease"]


def table_get(r: RangeResponse, hex_: bool = False) -> bytes:
    """`get -w table` (etcdctl 3.4 has no table for get; this is its table style)."""
    rows = [[_cell(kv.key, hex_), _cell(kv.value, hex_), str(kv.create_revision),
             str(kv.mod_revision), str(kv.version), f"{kv.lease:x}"] for kv in r.kvs]
    return table_bytes(GET_TABLE_HEADER, rows)


def humanize_bytes(n: int) -> str:
    """go-humanize's Bytes (SI units), as etcdctl prints DB SIZE: `20 kB`, `1.2 MB`."""
    if n < 10:
        return f"{n} B"
    units = ["B", "kB", "MB", "GB", "TB", "PB", "EB"]
    e = 0
    while e + 1 < len(units) and 1000 ** (e + 1) <= n:
        e += 1
    val = int(n / 1000 ** e * 10 + 0.5) / 10
    return f"{val:.1f} {units[e]}" if val < 10 else f"{val:.0f} {units[e]}"
