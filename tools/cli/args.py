"""Command-line flags as etcdctl 3.4 parses them, its exit codes, and Go's number syntax.

etcdctl is the reference for shmwatch's client commands, and etcdctl parses flags with
spf13/pflag (through cobra): flags may come before, between or after the positional
arguments; `--flag=value` and `--flag value` both work; a boolean flag takes an optional
`=true`/`=false`; `--` ends the flags; an unknown flag or a bad value is an error with
pflag's own text. Every failure here is a `CliError` carrying etcdctl's exit code, so a
script written against etcdctl sees the same codes and `Error:` lines from shmwatch.

This module is pure: no I/O, no client. The txn grammar (`txn.py` here) parses its
`put`/`get`/`del` lines with the same flag tables as the commands themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

# etcdctl's exit codes (etcdctl/ctlv3/command/error.go)
EXIT_SUCCESS = 0
EXIT_ERROR = 1  # a server error, or a flag cobra could not parse
EXIT_BAD_CONNECTION = 2
EXIT_INVALID_INPUT = 3  # txn input that does not parse
EXIT_BAD_FEATURE = 4  # a valid flag with an unsupported value (-w table for put, ...)
EXIT_INTERRUPTED = 5  # a watch canceled by the server
EXIT_IO = 6
EXIT_BAD_ARGS = 128  # wrong number or combination of arguments


class CliError(Exception):
    """A failure the command reports as `Error: <message>` with etcdctl's exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


FlagValue = Union[bool, int, float, str]


@dataclass(frozen=True)
class Flag:
    """One flag: `kind` is bool, int (Go int64), float or str."""

    name: str
    kind: type
    default: FlagValue
    help: str
    short: str = ""


# ------------------------------------------------------------------ Go number syntax

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_DIGITS = {2: "01", 8: "01234567", 10: "0123456789", 16: "0123456789abcdefABCDEF"}


def _underscores_ok(s: str) -> bool:
    """Go's rule for base-0 literals: `_` only between digits (a base prefix counts as
    a digit), never at the end."""
    if s[:1] in "+-":
        s = s[1:]
    saw, i, hexa = "^", 0, False
    if len(s) >= 2 and s[0] == "0" and s[1].lower() in "box":
        i, saw, hexa = 2, "0", s[1].lower() == "x"
    for c in s[i:]:
        if c.isdigit() and c.isascii() or hexa and c.lower() in "abcdef":
            saw = "0"
        elif c == "_":
            if saw != "0":
                return False
            saw = "_"
        else:
            if saw == "_":
                return False
            saw = "!"
    return saw != "_"


def go_parse_int(s: str, base: int = 10) -> int:
    """Go's strconv.ParseInt(s, base, 64); raises ValueError with Go's error text.

    base 0 reads a 0x/0o/0b prefix (or a leading 0 as octal) and allows `_` between
    digits, as pflag's int flags do; base 10 and 16 take digits only, with a sign."""
    err_syntax = f'strconv.ParseInt: parsing "{s}": invalid syntax'
    body = s[1:] if s[:1] in "+-" else s
    b = base
    if base == 0:
        if not _underscores_ok(s):
            raise ValueError(err_syntax)
        body = body.replace("_", "")
        low = body[:2].lower()
        if low in ("0x", "0o", "0b"):
            b, body = {"0x": 16, "0o": 8, "0b": 2}[low], body[2:]
        elif len(body) > 1 and body[0] == "0":
            b, body = 8, body[1:]
        else:
            b = 10
    if not body or any(c not in _DIGITS[b] for c in body):
        raise ValueError(err_syntax)
    value = int(body, b) * (-1 if s[:1] == "-" else 1)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f'strconv.ParseInt: parsing "{s}": value out of range')
    return value


def go_parse_bool(s: str) -> bool:
    """Go's strconv.ParseBool."""
    if s in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if s in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(f'strconv.ParseBool: parsing "{s}": invalid syntax')


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _convert(flag: Flag, text: str, spelled: str) -> FlagValue:
    try:
        if flag.kind is bool:
            return go_parse_bool(text)
        if flag.kind is int:
            return go_parse_int(text, 0)
        if flag.kind is float:
            if not _FLOAT.fullmatch(text):
                raise ValueError(f'strconv.ParseFloat: parsing "{text}": invalid syntax')
            return float(text)
    except ValueError as exc:
        raise CliError(EXIT_ERROR, f'invalid argument "{text}" for "{spelled}" flag: {exc}') from None
    return text


# ------------------------------------------------------------------ parsing


def parse_flags(flags: list[Flag], argv: list[str]) -> tuple[dict[str, FlagValue], list[str], bool]:
    """(values by flag name, positional arguments, help asked) from `argv`, as pflag
    parses a cobra command's arguments. O(len(argv)).

    Raises CliError(EXIT_ERROR, pflag's message) for an unknown flag, a missing or
    bad value.

    Over 60 lines on purpose: one loop over the arguments whose branches are pflag's
    cases in pflag's order (`--`, `--flag=v`, `--flag v`, `--bool`, `-abc` shorthands,
    `-fv`), each with its own error text; split, the order of the cases, which is
    pflag's behaviour, would no longer be visible in one place."""
    by_name = {f.name: f for f in flags}
    by_short = {f.short: f for f in flags if f.short}
    values: dict[str, FlagValue] = {f.name: f.default for f in flags}
    args: list[str] = []
    want_help = False
    i = 0
    while i < len(argv):
        tok = argv[i]
        i += 1
        if tok == "--":
            args.extend(argv[i:])
            break
        if not tok.startswith("-") or tok == "-":
            args.append(tok)
            continue
        if tok.startswith("--"):
            name, eq, text = tok[2:].partition("=")
            if name == "help":
                want_help = True
                continue
            flag = by_name.get(name)
            if flag is None:
                raise CliError(EXIT_ERROR, f"unknown flag: --{name}")
            spelled = f"--{name}"
            if flag.short:
                spelled = f"-{flag.short}, --{name}"
            if eq:
                values[name] = _convert(flag, text, spelled)
            elif flag.kind is bool:
                values[name] = True
            elif i < len(argv):
                values[name] = _convert(flag, argv[i], spelled)
                i += 1
            else:
                raise CliError(EXIT_ERROR, f"flag needs an argument: --{name}")
            continue
        # one or more shorthand flags: -i, -w json, -wjson, -w=json
        shorts = tok[1:]
        while shorts:
            c, shorts = shorts[0], shorts[1:]
            if c == "h":
                want_help = True
                continue
            flag = by_short.get(c)
            if flag is None:
                raise CliError(EXIT_ERROR, f"unknown shorthand flag: '{c}' in {tok}")
            spelled = f"-{c}, --{flag.name}"
            if shorts.startswith("="):
                values[flag.name] = _convert(flag, shorts[1:], spelled)
                shorts = ""
            elif flag.kind is bool:
                values[flag.name] = True
            elif shorts:
                values[flag.name] = _convert(flag, shorts, spelled)
                shorts = ""
            elif i < len(argv):
                values[flag.name] = _convert(flag, argv[i], spelled)
                i += 1
            else:
                raise CliError(EXIT_ERROR, f"flag needs an argument: '{c}' in -{c}")
    return values, args, want_help


def usage(command: str, synopsis: str, summary: str, flags: list[Flag]) -> str:
    """The text `shmwatch COMMAND --help` prints."""
    lines = [f"{command} - {summary}", "", "USAGE:", f"  shmwatch {synopsis}", "", "OPTIONS:"]
    for f in flags:
        short = f"-{f.short}, " if f.short else "    "
        default = "" if f.kind is bool else f"={f.default!r}".replace("'", '"')
        lines.append(f"  {short}--{f.name}{default}".ljust(34) + f"  {f.help}")
    return "\n".join(lines) + "\n"
