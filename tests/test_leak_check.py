"""The suite's /dev/shm leak check (tests/conftest.py) blames only the session's own
names: other users' brokers and another test session's objects, created while this
session runs, are not leaks of ours."""

from __future__ import annotations

import os

import broker
from tests.conftest import is_session_object


def test_only_the_sessions_own_names_are_checked():
    me = 4242
    ours = [f"shmwatch.b{me}x0a1b.ctl", f"shmwatch.b{me}x0a1b.log.00ff00ff00ff00ff",
            f"sem.shmwatch.b{me}x0a1b.bell.0123456789abcdef",
            f"shmwatch.b{me}x0a1b.c0g1.0123456789abcdef.a0.fedcba9876543210",
            f"shmwatch.t{me}xdeadbeef.seg", f"sem.shmwatch.t{me}xdeadbeef.bell"]
    theirs = ["shmwatch.default.ctl", "sem.shmwatch.default.bell.0123456789abcdef",
              "shmwatch.demo.c0g1.0123456789abcdef",  # somebody's `shmwatch serve --name demo`
              f"shmwatch.b{me}1x0a1b.ctl", f"shmwatch.b{me // 10}x0a1b.ctl",  # other pids
              f"shmwatch.t{me}1xdead.seg", "shmwatch.tdeadbeef0123.seg",
              "shmwatch.etcddiff4242n0.ctl", f"shmwatch.x{me}x.ctl",
              f"b{me}x0a1b.ctl", "sem.mp-1234", "pym-1234-abcd", f"shmwatch.b{me}x0a1b"]
    assert [e for e in ours if not is_session_object(e, me)] == []
    assert [e for e in theirs if is_session_object(e, me)] == []


def test_this_sessions_brokers_are_its_own():
    assert is_session_object(f"shmwatch.{broker.unique_name()}.ctl", os.getpid())
    assert is_session_object(f"sem.shmwatch.{broker.unique_name()}.bell.00", os.getpid())
