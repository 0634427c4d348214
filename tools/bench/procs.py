"""Every process a run starts, how they talk back to the parent, and how they end.

Owns: the fork context every child is made with, the `REG` registry (children, server
processes, brokers) from which `stop_all` ends each one by its pid (also on Ctrl-C or an
error), the mailbox a trial's children report through (`Tell` in the child, `Mailbox`
in the parent), and the /dev/shm entries our brokers left behind. Never decides what a
child does or measures.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import time
import traceback
from typing import Callable

CTX = mp.get_context("fork")
POLL_S = 0.5  # how often a waiting parent checks whether a child died


class TrialError(RuntimeError):
    """A trial could not finish: a child failed, died or did not answer in time."""


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM then SIGKILL, by pid."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Tell:
    """A child's side of the mailbox: `tell(kind, payload)` sends (kind, role, idx,
    payload) to the parent."""

    def __init__(self, q, role: str, idx: int):
        self.q, self.role, self.idx = q, role, idx

    def __call__(self, kind: str, payload=None) -> None:
        self.q.put((kind, self.role, self.idx, payload))


class Mailbox:
    """The parent's side: one queue for all children of a trial, and those children.

    `expect` waits for one kind of message from n children of one role, keeping the
    messages that arrive early for a later `expect`; a child's "error" message, a child
    that died and the timeout each raise TrialError."""

    def __init__(self, label: str):
        self.label = label
        self.q = CTX.Queue()
        self.procs: list = []  # multiprocessing.Process, in the order they were started
        self.kept: list[tuple] = []

    def expect(self, kind: str, role: str, n: int, timeout: float) -> list:
        """The payloads of n (kind, role) messages, in the order of the senders' idx."""
        got: dict[int, object] = {}
        deadline = time.monotonic() + timeout
        while True:
            for m in [m for m in self.kept if m[0] == kind and m[1] == role]:
                self.kept.remove(m)
                got[m[2]] = m[3]
            if len(got) >= n:
                return [got[i] for i in sorted(got)]
            self.kept.append(self._next(deadline, f"{n - len(got)} {role} {kind}"))

    def _next(self, deadline: float, waiting_for: str) -> tuple:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TrialError(f"{self.label}: timed out waiting for {waiting_for}")
            try:
                m = self.q.get(True, min(left, POLL_S))
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    raise TrialError(f"{self.label}: a child died: "
                                     f"exit {dead[0].exitcode}") from None
                continue
            if m[0] == "error":
                raise TrialError(f"{self.label} {m[1]} {m[2]} failed:\n{m[3]}")
            return m

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.q.close()
            self.q.cancel_join_thread()


def _child_entry(q, role: str, idx: int, body: Callable, args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    tell = Tell(q, role, idx)
    try:
        body(tell, *args)
    except BaseException:
        tell("error", traceback.format_exc())


def _shm_entries() -> set[str]:
    try:
        return {e for e in os.listdir("/dev/shm")
                if e.startswith("shmwatch.") or e.startswith("sem.shmwatch.")}
    except FileNotFoundError:
        return set()


class Registry:
    """Every process this run started; `stop_all` ends each by its pid."""

    def __init__(self):
        self.children: list = []  # multiprocessing.Process
        self.servers: list = []  # subprocess.Popen (redis-server, etcd, py-spy)
        self.brokers: list = []  # broker.BrokerProcess
        self.broker_names: list[str] = []  # every broker this run started

    def spawn(self, box: Mailbox, role: str, idx: int, body: Callable, *args):
        """Start `body(tell, *args)` in a forked child that reports to `box`; an exception
        in it reaches the parent as an "error" message with its traceback."""
        p = CTX.Process(target=_child_entry, args=(box.q, role, idx, body, args), daemon=True)
        p.start()
        self.children.append(p)
        box.procs.append(p)
        return p

    def add_broker(self, b) -> None:
        self.brokers.append(b)
        self.broker_names.append(b.name)

    def add_server(self, proc: subprocess.Popen) -> None:
        self.servers.append(proc)

    def stop_server(self, proc: subprocess.Popen) -> None:
        stop_process(proc)
        if proc in self.servers:
            self.servers.remove(proc)

    def leftovers(self) -> list[str]:
        """/dev/shm entries of the brokers this run started (other users' are not ours)."""
        mine = tuple(f"shmwatch.{n}." for n in self.broker_names)
        mine += tuple("sem." + m for m in mine)
        return sorted(e for e in _shm_entries() if e.startswith(mine)) if mine else []

    def stop_children(self, procs=None, grace: float = 3.0) -> None:
        """Join each child until `grace` runs out, SIGKILL the rest, by pid."""
        procs = self.children if procs is None else procs
        deadline = time.monotonic() + grace
        for p in procs:
            if p.pid is None:
                continue
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)
                p.join(5)
        for p in procs:
            with contextlib.suppress(Exception):
                p.close()
            if p in self.children:
                self.children.remove(p)

    def stop_broker(self, b) -> None:
        with contextlib.suppress(Exception):
            b.stop()
        if b in self.brokers:
            self.brokers.remove(b)

    def stop_all(self) -> None:
        self.stop_children(list(self.children), grace=0.5)
        for b in list(self.brokers):
            self.stop_broker(b)
        for s in list(self.servers):
            self.stop_server(s)


REG = Registry()
