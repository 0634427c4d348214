"""`shmwatch lease ...` and `put --lease` against a real etcdctl 3.4, side by side.

Same harness as tests/test_cli_etcdctl.py (a fresh etcd and a fresh broker per test).
A lease id is each store's own: a command line naming a lease gets each tool's id, and
outputs are compared after writing each tool's id (hex and decimal) as `ID`, and the
seconds left (which tick while both run) as `N`, checked separately to be near the TTL.
"""

from __future__ import annotations

import re
import signal
import time

from tests.test_cli_etcdctl import Pair, Result, normalise, pair  # noqa: F401 (fixture)

LEFT = re.compile(rb'remaining\((\d+)s\)|"ttl":(\d+)')


class Leases:
    """Per-tool lease ids, substituted into command lines as "{ID}"."""

    def __init__(self, p: Pair):
        self.p = p
        self.ids = {"etcdctl": 0, "shmwatch": 0}

    def grant(self, ttl: int) -> None:
        for tool in self.ids:
            r = getattr(self.p, tool)("lease", "grant", str(ttl))
            assert r.rc == 0, r
            self.ids[tool] = int(r.out.split()[1], 16)

    def _argv(self, tool: str, args: tuple) -> list:
        return [a.replace("{ID}", "%x" % self.ids[tool]) for a in args]

    def _norm(self, tool: str, out: bytes, ttl: int | None) -> bytes:
        i = self.ids[tool]
        out = normalise(out).replace(b"%016x" % i, b"ID").replace(b"%d" % i, b"ID")
        for m in LEFT.finditer(out):
            left = int(m.group(1) or m.group(2))
            assert ttl is not None and ttl - 3 <= left <= ttl, (tool, out)
        return LEFT.sub(lambda m: m.group(0).replace(m.group(1) or m.group(2), b"N"), out)

    def same(self, *args: str, rc: int = 0, ttl: int | None = None) -> Result:
        """Both tools at once, each with its own id; same normalised output, stderr
        promises and exit code `rc`. Returns shmwatch's result."""
        procs = {tool: self.p._start(tool, tuple(self._argv(tool, args))) for tool in self.ids}
        res = {tool: self.p._finish(proc, b"") for tool, proc in procs.items()}
        want, got = res["etcdctl"], res["shmwatch"]
        what = f"command {args!r}\netcdctl: {want}\nshmwatch: {got}"
        assert self._norm("shmwatch", got.out, ttl) == self._norm("etcdctl", want.out, ttl), what
        said = [self._norm(t, b"\n".join(res[t].said()), None) for t in self.ids]
        assert said[0] == said[1], what
        assert got.rc == want.rc == rc, what
        return got


def test_lease_argument_checks_and_missing_leases(pair):  # noqa: F811 (the fixture imported above)
    p = pair
    for args, rc in ((["grant"], 128), (["grant", "abc"], 128), (["grant", "0x10"], 128),
                     (["grant", "1", "2"], 128), (["grant", "9000000001"], 1),
                     (["grant", "1", "-w", "table"], 4),
                     (["revoke"], 128), (["revoke", "xyz"], 128), (["revoke", "0x10"], 128),
                     (["revoke", "123"], 1), (["revoke", "--", "-1"], 1),
                     (["timetolive"], 128), (["timetolive", "a", "b"], 128),
                     (["timetolive", "8000000000000000"], 128),
                     (["timetolive", "123"], 0), (["timetolive", "123", "-w", "json"], 0),
                     (["timetolive", "0", "--keys"], 0),
                     (["keep-alive"], 128), (["keep-alive", "--once", "123"], 2),
                     (["keep-alive", "123"], 0), (["keep-alive", "123", "-w", "json"], 0),
                     (["list"], 0), (["list", "-w", "json"], 0), (["list", "extra"], 0)):
        p.same("lease", *args, rc=rc)
    p.same("put", "k", "v", "--lease=abc", rc=1)  # a lease etcd does not know
    bad = [p.etcdctl("lease", "grant", "1", "--bogus"), p.shmwatch("lease", "grant", "1", "--bogus")]
    assert [r.rc for r in bad] == [1, 1] and bad[0].said() == bad[1].said(), bad
    assert p.shmwatch("lease").rc == 0 and p.etcdctl("lease").rc == 0  # the group's help
    # a TTL <= 0 is granted as the minimum (this etcd's fast election timing makes it 1 s)
    got = [p.etcdctl("lease", "grant", "--", "-5"), p.shmwatch("lease", "grant", "--", "-5")]
    assert [re.sub(rb"[0-9a-f]{16}", b"ID", r.out) for r in got] == [
        b"lease ID granted with TTL(1s)\n", b"lease ID granted with TTL(2s)\n"], got


def test_lease_lifecycle_and_put_lease(pair):  # noqa: F811 (the fixture imported above)
    p = pair
    ls = Leases(p)
    ls.grant(100)
    ls.same("put", "k", "v", "--lease", "{ID}")
    ls.same("put", "k", "v2", "--ignore-lease", "-w", "json")
    ls.same("get", "k", "-w", "json")  # still on the lease
    ls.same("put", "nothing", "v", "--ignore-lease", rc=1)  # etcdserver: key not found
    ls.same("put", "k", "v", "--lease", "{ID}", "--ignore-lease", rc=1)  # lease is provided
    for fmt in ("simple", "json"):
        ls.same("lease", "timetolive", "{ID}", "-w", fmt, ttl=100)
        ls.same("lease", "timetolive", "--keys", "{ID}", "-w", fmt, ttl=100)
        ls.same("lease", "keep-alive", "--once", "{ID}", "-w", fmt, ttl=100)
        ls.same("lease", "list", "-w", fmt)
    ls.same("lease", "revoke", "{ID}", "-w", "json")
    ls.same("get", "k")  # deleted with its lease
    ls.same("lease", "revoke", "{ID}", rc=1)
    ls.same("lease", "timetolive", "{ID}")  # already expired
    ls.grant(50)
    ls.same("lease", "revoke", "{ID}")
    ls.same("lease", "list")


def _spawn_keep_alive(p: Pair, ls: Leases, *fmt: str) -> dict:
    return {tool: p.spawn(tool, *ls._argv(tool, ("lease", "keep-alive", "{ID}", *fmt)))
            for tool in ls.ids}


def _collect(proc) -> bytes:
    try:
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    proc.stdout.close()
    proc.stderr.close()
    return out


def test_keep_alive_until_revoked_and_until_interrupted(pair):  # noqa: F811 (the fixture imported above)
    p = pair
    ls = Leases(p)
    ls.grant(3)
    procs = _spawn_keep_alive(p, ls)
    time.sleep(2.5)
    for tool in ls.ids:
        assert getattr(p, tool)(*ls._argv(tool, ("lease", "revoke", "{ID}"))).rc == 0
    outs = {}
    for tool, proc in procs.items():
        out = _collect(proc)
        assert proc.returncode == 0, (tool, out)
        outs[tool] = ls._norm(tool, out, 3).splitlines()
    for lines in outs.values():  # renewed every second while it lived, then the end
        assert 2 <= len(lines) - 1 <= 4, outs
        assert set(lines[:-1]) == {b"lease ID keepalived with TTL(3)"}, outs
        assert lines[-1] == b"lease ID expired or revoked.", outs
    # Ctrl-C ends both by SIGINT, after what they printed
    ls.grant(6)
    procs = _spawn_keep_alive(p, ls, "-w", "json")
    time.sleep(1.5)
    for proc in procs.values():
        proc.send_signal(signal.SIGINT)
    outs = {tool: ls._norm(tool, _collect(proc), 6).splitlines()
            for tool, proc in procs.items()}
    assert [proc.returncode for proc in procs.values()] == [-signal.SIGINT] * 2, outs
    assert outs["etcdctl"][0] == outs["shmwatch"][0], outs
    assert all(len(lines) >= 1 for lines in outs.values()), outs
