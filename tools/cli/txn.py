"""etcdctl 3.4's txn grammar: compares and requests read line by line from stdin.

    mod("key1") > "0"            <- compares, one per line, then a blank line

    put key1 "overwrote-key1"    <- success requests (put, get, del), then a blank line

    put key1 "created-key1"      <- failure requests, then a blank line
    put key2 "some extra key"

A compare is `TARGET("key") OP "value"`, read as Go's `fmt.Sscanf(rest, "%q) %s %q")`
reads it: Go string literals (escapes, or `back-quoted`), the operator one token, and a
space required after `)` and around the operator. Targets: `ver`/`version`, `c`/`create`,
`m`/`mod` (decimal integers), `val`/`value` (bytes), `lease` (hex). A request line is
split into words as etcdctl's `argify` does ("double-quoted" Go literals, 'single-quoted'
text, bare words) and parsed with the `put`/`get`/`del` commands' own flags.

Where etcdctl 3.4 has a bug, this module does what etcdctl meant, and
docs/ETCD-NOTES.md says so: 'single-quoted' words keep their whole text (3.4 cuts them
to a length that depends on the number of words); an unknown operator or a `lease`
compare is an error or works (3.4 panics); raw non-UTF-8 bytes inside quotes are kept
(3.4 turns them into U+FFFD).

Pure: lines in, clientlib compares and ops out; errors are `CliError`s with etcdctl's
texts and exit codes.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from shmwatch.wire.ops import (
    Compare,
    compare_create,
    compare_lease,
    compare_mod,
    compare_value,
    compare_version,
)

from .args import EXIT_INVALID_INPUT, CliError, Flag, go_parse_int, parse_flags

# ------------------------------------------------------------------ Go string literals


def go_space(c: str) -> bool:
    """unicode.IsSpace as Go has it (Python's isspace also counts \\x1c-\\x1f)."""
    return c.isspace() and c not in "\x1c\x1d\x1e\x1f"


def go_trim_space(s: str) -> str:
    """strings.TrimSpace."""
    i, j = 0, len(s)
    while i < j and go_space(s[i]):
        i += 1
    while j > i and go_space(s[j - 1]):
        j -= 1
    return s[i:j]


def _go_printable(c: str) -> bool:
    return c == " " or unicodedata.category(c)[0] in "LMNPS"


def go_quote(b: bytes) -> str:
    """Go's %q of a string: a double-quoted literal that escapes what is not printable
    (bytes that are not UTF-8 as \\xHH)."""
    out = ['"']
    text = b.decode("utf-8", "surrogateescape")
    for c in text:
        o = ord(c)
        if 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8
            out.append(f"\\x{o - 0xDC00:02x}")
        elif c in '"\\':
            out.append("\\" + c)
        elif _go_printable(c):
            out.append(c)
        elif c in "\a\b\f\n\r\t\v":
            out.append({"\a": "\\a", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r",
                        "\t": "\\t", "\v": "\\v"}[c])
        elif o < 0x20 or o == 0x7F:
            out.append(f"\\x{o:02x}")
        elif o < 0x10000:
            out.append(f"\\u{o:04x}")
        else:
            out.append(f"\\U{o:08x}")
    out.append('"')
    return "".join(out)


class _ScanError(Exception):
    pass


_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34}


def _unquote_body(body: str) -> bytes:
    """strconv.Unquote of the text between double quotes; the text is str decoded with
    surrogateescape, so raw bytes come back as they were."""
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == '"' or c == "\n":
            raise _ScanError("invalid syntax")
        if c != "\\":
            out += c.encode("utf-8", "surrogateescape")
            i += 1
            continue
        if i + 1 >= len(body):
            raise _ScanError("invalid syntax")
        e = body[i + 1]
        i += 2
        if e in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[e])
        elif e in "xuU":
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = body[i:i + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise _ScanError("invalid syntax")
            v = int(digits, 16)
            i += n
            if e == "x":
                out.append(v)
            elif v > 0x10FFFF or 0xD800 <= v <= 0xDFFF:
                raise _ScanError("invalid syntax")
            else:
                out += chr(v).encode()
        elif e in "01234567":
            digits = body[i - 1:i + 2]
            if len(digits) != 3 or any(d not in "01234567" for d in digits) or int(digits, 8) > 255:
                raise _ScanError("invalid syntax")
            out.append(int(digits, 8))
            i += 2
        else:
            raise _ScanError("invalid syntax")
    return bytes(out)


def scan_quoted(s: str, pos: int) -> tuple[bytes, int]:
    """fmt's %q verb at `pos`: skip spaces, then a "double-quoted" Go literal or a
    `back-quoted` one. Returns (bytes, position after it)."""
    while pos < len(s) and go_space(s[pos]):
        pos += 1
    if pos >= len(s):
        raise _ScanError("unexpected EOF")
    quote = s[pos]
    if quote == "`":
        end = s.find("`", pos + 1)
        if end < 0:
            raise _ScanError("unexpected EOF")
        return s[pos + 1:end].encode("utf-8", "surrogateescape"), end + 1
    if quote != '"':
        raise _ScanError("expected quoted string")
    i = pos + 1
    while True:
        if i >= len(s):
            raise _ScanError("unexpected EOF")
        if s[i] == "\\":
            i += 2  # only the character right after a backslash can be a quote
            continue
        if s[i] == '"':
            return _unquote_body(s[pos + 1:i]), i + 1
        i += 1


# ------------------------------------------------------------------ compares

_COMPARE_OPS = ("=", "!=", ">", "<")  # clientv3.Compare's operators
_INT_TARGETS: dict[str, tuple[Callable[..., Compare], int]] = {
    "ver": (compare_version, 10), "version": (compare_version, 10),
    "c": (compare_create, 10), "create": (compare_create, 10),
    "m": (compare_mod, 10), "mod": (compare_mod, 10),
    "lease": (compare_lease, 16),
}


def _scan_compare(rest: str) -> tuple[list, int]:
    """fmt.Sscanf(rest, "%q) %s %q"): the values assigned (key, op, value) and how many."""
    got: list = []
    try:
        key, pos = scan_quoted(rest, 0)
        got.append(key)
        if pos >= len(rest) or rest[pos] != ")":
            raise _ScanError("input does not match format")
        pos += 1
        # a space in the format needs one or more spaces in the input (or its end)
        if pos < len(rest) and not go_space(rest[pos]):
            raise _ScanError("input does not match format")
        while pos < len(rest) and go_space(rest[pos]):
            pos += 1
        start = pos
        while pos < len(rest) and not go_space(rest[pos]):
            pos += 1
        if pos == start:
            raise _ScanError("unexpected EOF")
        got.append(rest[start:pos])
        if pos < len(rest) and not go_space(rest[pos]):
            raise _ScanError("input does not match format")
        value, pos = scan_quoted(rest, pos)
        got.append(value)
    except _ScanError:
        pass
    return got, len(got)


def parse_compare(line: str) -> Compare:
    """One compare line (already trimmed), as etcdctl's parseCompare reads it."""
    target, paren, rest = line.partition("(")
    if not paren:
        raise CliError(EXIT_INVALID_INPUT, f"malformed comparison: {line}")
    got, n = _scan_compare(rest)
    if n != 3:
        key, op, val = (got + [b"", "", b""][len(got):])
        raise CliError(EXIT_INVALID_INPUT, f"malformed comparison: {line}; got "
                       f"{target}({go_quote(key)}) {op} {go_quote(val)}")
    key, op, val = got
    if target not in _INT_TARGETS and target not in ("val", "value"):
        raise CliError(EXIT_INVALID_INPUT, f"malformed comparison: {line} (unknown target {target})")
    if op not in _COMPARE_OPS:
        raise CliError(EXIT_INVALID_INPUT, f"malformed comparison: {line} (unknown operator {op}: "
                       f"one of {', '.join(_COMPARE_OPS)})")
    if target in ("val", "value"):
        return compare_value(key, op, val)
    build, base = _INT_TARGETS[target]
    try:
        number = go_parse_int(val.decode("utf-8", "surrogateescape"), base)
    except ValueError:
        raise CliError(EXIT_INVALID_INPUT, f"invalid txn compare request: {line}") from None
    return build(key, op, number)


# ------------------------------------------------------------------ request lines

# etcdctl's argify: "double-quoted" Go literals, 'single-quoted' text, or a bare word
_WORD = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'|[^'\"\t\n\f\r ]\S*[^'\"\t\n\f\r ]?")


def argify(line: str) -> list[str]:
    """A request line split into words, as etcdctl's argify splits it. Words are str
    (surrogateescape), so they turn back into the bytes that were typed."""
    words = []
    for w in _WORD.findall(line):
        if w[0] == "'":
            w = w[1:-1]
        elif w[0] == '"':
            try:
                w = _unquote_body(w[1:-1]).decode("utf-8", "surrogateescape")
            except _ScanError as exc:
                raise CliError(EXIT_INVALID_INPUT, str(exc)) from None
        words.append(w)
    return words


# A request command of the txn grammar: its flags, and what builds the op from the
# parsed flag values and positional arguments (raising CliError for its own checks).
RequestCommand = tuple[list[Flag], Callable[[dict, list[str]], object]]


def parse_request(line: str, commands: dict[str, RequestCommand]) -> object:
    """One request line: its first word picks the command (a unique prefix of put, get
    or del will do, as cobra's prefix matching allows), the rest is parsed with that
    command's flags. A word or flag that does not parse is "invalid txn request" (exit
    3); the command's own argument checks keep their texts and codes, as in etcdctl."""
    args = argify(line)
    if len(args) < 2:
        raise CliError(EXIT_INVALID_INPUT, f"invalid txn compare request: {line}")
    names = [n for n in commands if n == args[0]] or [n for n in commands if n.startswith(args[0])]
    if len(names) != 1:
        raise CliError(EXIT_INVALID_INPUT, f"invalid txn request: {line}")
    flags, build = commands[names[0]]
    try:
        values, rest, want_help = parse_flags(flags, args[1:])
    except CliError:
        raise CliError(EXIT_INVALID_INPUT, f"invalid txn request: {line}") from None
    if want_help:
        raise CliError(EXIT_INVALID_INPUT, f"invalid txn request: {line}")
    return build(values, rest)


@dataclass
class TxnInput:
    compares: list[Compare]
    success: list
    failure: list


def read_txn(readline: Callable[[], bytes], commands: dict[str, RequestCommand],
             prompt: Callable[[str], None] | None = None) -> TxnInput:
    """Read compares, success requests and failure requests, each section ended by a
    blank line, as etcdctl's txn command reads stdin. End of input before the third
    blank line is an error ("EOF", exit 3), as in etcdctl."""

    def lines():
        while True:
            raw = readline()
            if not raw.endswith(b"\n"):  # Go's ReadString('\n') fails on a last unended line
                raise CliError(EXIT_INVALID_INPUT, "EOF")
            line = go_trim_space(raw.decode("utf-8", "surrogateescape"))
            if not line:
                return
            yield line

    if prompt:
        prompt("compares:")
    compares = [parse_compare(line) for line in lines()]
    if prompt:
        prompt("success requests (get, put, del):")
    success = [parse_request(line, commands) for line in lines()]
    if prompt:
        prompt("failure requests (get, put, del):")
    failure = [parse_request(line, commands) for line in lines()]
    return TxnInput(compares, success, failure)
