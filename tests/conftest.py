"""Shared fixtures: a fresh embedded broker per test, and a check that the whole suite
leaves nothing of ours in /dev/shm and no process of ours behind."""

from __future__ import annotations

import os
import re

import psutil
import pytest

import broker
import clientlib


def _ours() -> list[str]:
    try:
        return sorted(e for e in os.listdir("/dev/shm")
                      if e.startswith("shmwatch.") or e.startswith("sem.shmwatch."))
    except FileNotFoundError:
        return []


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
    """After the suite: no segment, no semaphore, no child process of ours remains."""
    before = set(_ours())
    yield
    mine = f"b{os.getpid()}x"  # broker.spawn() names brokers after the spawning pid

    def ours(entry: str) -> bool:
        # Spawned brokers are named b<spawning pid>x...: those of another test session
        # running beside this one (alive or not) are not ours; ours, and objects the
        # unit tests name themselves, are.
        name = entry.split(".")[2 if entry.startswith("sem.") else 1]
        if re.match(r"b\d+x", name):
            return name.startswith(mine)
        return True

    left = [e for e in _ours() if e not in before and ours(e)]
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
