"""The CLI's pure parts (tools/cli/args.py, txn.py, output.py) without a
broker or an etcd: Go's number and string syntax, pflag's parsing, the txn grammar.
The expected values are Go's and etcdctl's (the same cases run against a real etcdctl
in tests/test_cli_etcdctl.py where etcdctl can show them)."""

from __future__ import annotations

import io

import pytest

from shmwatch.tools.cli.args import EXIT_ERROR, EXIT_INVALID_INPUT, CliError, Flag, go_parse_int, parse_flags
from shmwatch.tools.cli.output import humanize_bytes, render_table
from shmwatch.tools.cli.txn import argify, go_quote, parse_compare, read_txn
from shmwatch.wire.ops import Compare


@pytest.mark.parametrize("text,base,value", [
    ("0x10", 0, 16), ("010", 0, 8), ("0o10", 0, 8), ("0b11", 0, 3), ("1_000", 0, 1000),
    ("0x_1f", 0, 31), ("-7", 0, -7), ("+5", 10, 5), ("-0", 10, 0), ("ff", 16, 255),
    ("9223372036854775807", 10, 2**63 - 1), ("-9223372036854775808", 10, -2**63),
])
def test_go_parse_int(text, base, value):
    assert go_parse_int(text, base) == value


@pytest.mark.parametrize("text,base", [
    ("_1", 0), ("1__0", 0), ("1_", 0), ("0x", 0), ("", 10), (" 1", 10), ("1_0", 10),
    ("0x1", 10), ("1.5", 10), ("g", 16), ("١", 10),
])
def test_go_parse_int_refuses(text, base):
    with pytest.raises(ValueError, match=f'parsing "{text}": invalid syntax'):
        go_parse_int(text, base)


def test_go_parse_int_range():
    with pytest.raises(ValueError, match="value out of range"):
        go_parse_int("9223372036854775808", 10)


FLAGS = [Flag("write-out", str, "simple", "", "w"), Flag("limit", int, 0, ""),
         Flag("prefix", bool, False, ""), Flag("interactive", bool, False, "", "i")]


def test_parse_flags_as_pflag():
    values, args, want_help = parse_flags(FLAGS, ["a", "--limit", "-3", "b", "-wjson", "-i",
                                                  "--prefix=false", "--", "--limit"])
    assert values == {"write-out": "json", "limit": -3, "prefix": False, "interactive": True}
    assert args == ["a", "b", "--limit"] and not want_help
    assert parse_flags(FLAGS, ["-w=table", "-iw", "x"])[0]["write-out"] == "x"
    assert parse_flags(FLAGS, ["-h"])[2] and parse_flags(FLAGS, ["--help"])[2]


@pytest.mark.parametrize("argv,message", [
    (["--bogus"], "unknown flag: --bogus"),
    (["-x"], "unknown shorthand flag: 'x' in -x"),
    (["--limit"], "flag needs an argument: --limit"),
    (["-w"], "flag needs an argument: 'w' in -w"),
    (["--limit=abc"], 'invalid argument "abc" for "--limit" flag: strconv.ParseInt: '
                      'parsing "abc": invalid syntax'),
    (["--prefix=nope"], 'invalid argument "nope" for "--prefix" flag: strconv.ParseBool: '
                        'parsing "nope": invalid syntax'),
])
def test_parse_flags_errors(argv, message):
    with pytest.raises(CliError) as e:
        parse_flags(FLAGS, argv)
    assert (e.value.code, e.value.message) == (EXIT_ERROR, message)


def test_go_quote():
    assert go_quote(b'\x00\xff\xc3\xa9\n\x7f\xe2\x80\xa8"\\ ~') == '"\\x00\\xffé\\n\\x7f\\u2028\\"\\\\ ~"'
    assert go_quote("\U0001F600".encode() + b"\xc3") == '"\U0001F600\\xc3"'


def test_parse_compare():
    assert parse_compare('mod("a") > "0"') == Compare(b"a", "MOD", "GREATER", 0)
    assert parse_compare('val(`a\\x`)  !=  "\\x00\\u00e9" tail') == \
        Compare(b"a\\x", "VALUE", "NOT_EQUAL", b"\x00\xc3\xa9")
    assert parse_compare('lease("k") = "ff"') == Compare(b"k", "LEASE", "EQUAL", 255)
    for line, message in [
        ('mod("a")>"0"', 'malformed comparison: mod("a")>"0"; got mod("a")  ""'),
        ('val("\\xff\\n")', 'malformed comparison: val("\\xff\\n"); got val("\\xff\\n")  ""'),
        ('mod "a"', 'malformed comparison: mod "a"'),
        ('x("a") = "1"', 'malformed comparison: x("a") = "1" (unknown target x)'),
        ('m("a") = "0x1"', 'invalid txn compare request: m("a") = "0x1"'),
        ('m("a") >= "1"', 'malformed comparison: m("a") >= "1" (unknown operator >=: one of =, !=, >, <)'),
    ]:
        with pytest.raises(CliError) as e:
            parse_compare(line)
        assert (e.value.code, e.value.message) == (EXIT_INVALID_INPUT, message)


def test_argify():
    assert argify('put "a b" \'c d\' e"f g" "\\x41\\101"') == ["put", "a b", "c d", 'e"f', 'g"', "AA"]
    assert argify('put k "a') == ["put", "k", "a"]
    with pytest.raises(CliError, match="invalid syntax"):
        argify('put k "\\q"')


def test_read_txn_sections_and_eof():
    commands = {"put": ([], lambda values, args: ("put", *args))}
    prompts: list[str] = []
    txn = read_txn(io.BytesIO(b'ver("k") = "1"\r\n \t\nput a 1\nput b 2\n\n\n').readline, commands,
                   prompts.append)
    assert txn.compares == [Compare(b"k", "VERSION", "EQUAL", 1)]
    assert txn.success == [("put", "a", "1"), ("put", "b", "2")] and txn.failure == []
    assert prompts == ["compares:", "success requests (get, put, del):",
                       "failure requests (get, put, del):"]
    for stdin in (b"", b"\n\n", b"\n\nput a 1"):
        with pytest.raises(CliError, match="^EOF$"):
            read_txn(io.BytesIO(stdin).readline, commands)


def test_humanize_bytes():
    assert [humanize_bytes(n) for n in (0, 9, 10, 999, 1000, 20480, 1_234_567, 67_108_864)] == \
        ["0 B", "9 B", "10 B", "999 B", "1.0 kB", "20 kB", "1.2 MB", "67 MB"]


def test_table_wraps_long_words_and_cells():
    # a word longer than 30 widens its column; a long cell wraps at spaces
    table = render_table(["k", "v"], [["x" * 35, "one two three four five six seven"]])
    assert table == (
        "+-------------------------------------+--------------------------------+\n"
        "|                  K                  |               V                |\n"
        "+-------------------------------------+--------------------------------+\n"
        "| xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx |    one two three four five six |\n"
        "|                                     |                          seven |\n"
        "+-------------------------------------+--------------------------------+\n")
