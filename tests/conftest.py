"""Shared fixtures: a fresh embedded broker per test, and a check that the whole suite
leaves nothing of ours in /dev/shm and no process of ours behind."""

from __future__ import annotations

import os

import psutil
import pytest

import broker
import clientlib
from tests.etcd_cluster import etcd_cluster  # noqa: F401  (fixture: a 3-member etcd cluster)


def _shm_entries() -> list[str]:
    try:
        return sorted(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return []


def session_prefixes(pid: int) -> tuple[str, str]:
    """The name prefixes of this test session's objects: brokers from
    `broker.unique_name()` ("b<pid>x...") and the shm unit tests' own names
    ("t<pid>x..."), where pid is the test process's."""
    return f"b{pid}x", f"t{pid}x"


def is_session_object(entry: str, pid: int) -> bool:
    """Whether /dev/shm `entry` is an object of the test session running as `pid`: a
    segment `shmwatch.<name>.<part>` or semaphore `sem.shmwatch.<name>.<part>` whose
    name starts with one of `session_prefixes(pid)`. Everything else in /dev/shm
    (other users' brokers, another test session beside this one) is not ours to blame."""
    parts = entry.split(".")
    if parts[0] == "sem":
        parts = parts[1:]
    if len(parts) < 3 or parts[0] != "shmwatch":
        return False
    return parts[1].startswith(session_prefixes(pid))


def _is_leftover(p: psutil.Process) -> bool:
    """A live child that is not multiprocessing's own helper (its resource tracker and
    forkserver live as long as the test process by design)."""
    try:
        if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
            return False
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return False
    return "resource_tracker" not in cmd and "forkserver" not in cmd


@pytest.fixture(scope="session", autouse=True)
def no_leftovers():
    """After the suite: no segment, no semaphore, no child process of ours remains.
    Only this session's own names are checked (`is_session_object`)."""
    yield
    left = [e for e in _shm_entries() if is_session_object(e, os.getpid())]
    children = [p for p in psutil.Process().children(recursive=True)
                if _is_leftover(p)]
    assert not left, f"the test suite left shared memory behind: {left}"
    assert not children, f"the test suite left processes behind: {children}"


@pytest.fixture
def broker_proc():
    """A broker in a child process with a unique name, stopped (and cleaned) after."""
    with broker.spawn() as b:
        yield b


@pytest.fixture
def client(broker_proc):
    with clientlib.connect(broker_proc.name, timeout=10) as c:
        yield c


@pytest.fixture
def shmwatch_client(client):
    """The etcd differential tests' name for a client of a fresh broker."""
    return client
