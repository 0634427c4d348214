"""`shmwatch lock` and `shmwatch elect`: etcdctl 3.4's commands of the same names over
clientlib.concurrency, with etcdctl's arguments, output, `Error:` texts and exit codes.

    shmwatch lock NAME              print the lock's key (and value) once held; hold it
                                    until SIGINT/SIGTERM, then release it (exit 0)
    shmwatch lock NAME CMD ARGS...  run CMD while holding it, with ETCD_LOCK_KEY and
                                    ETCD_LOCK_REV set; `Error: exit status N` (exit 1)
                                    if it fails, as etcdctl
    shmwatch elect NAME PROPOSAL    campaign; print the leader key and value once elected;
                                    lead until SIGINT/SIGTERM, then resign
    shmwatch elect -l NAME          print every leader (and proclaimed value) as it comes

The session is a bound lease (it ends the moment this process dies), with `--ttl`'s TTL
(etcdctl's default 10 s for lock) kept alive meanwhile. Interrupted while waiting, the
command withdraws its key and fails with etcdctl's `Error: context canceled`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from clientlib.concurrency import DEFAULT_SESSION_TTL, Election, Lock, Session
from shmwatch.wire.errors import RecipeCancelled

from .args import EXIT_BAD_ARGS, EXIT_ERROR, CliError, Flag
from .output import json_get, simple_get

LOCK_TTL = 10  # etcdctl lock's --ttl default
WAIT_SLICE_S = 0.2  # how often a holder looks at its session
# Go's names of the signals a command may die of (os/exec's "signal: ..." errors)
GO_SIGNAL_NAMES = {signal.SIGINT: "interrupt", signal.SIGTERM: "terminated",
                   signal.SIGKILL: "killed", signal.SIGHUP: "hangup", signal.SIGQUIT: "quit",
                   signal.SIGABRT: "aborted", signal.SIGSEGV: "segmentation fault",
                   signal.SIGPIPE: "broken pipe"}


@contextmanager
def interruptible() -> Iterator[threading.Event]:
    """An event that SIGINT or SIGTERM sets meanwhile (etcdctl cancels its context):
    the waits below take it as their `cancel`."""
    stop = threading.Event()
    old = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _show(c, inv, key: bytes) -> bool:
    """etcdctl's display.Get of `key`; False if it is gone."""
    r = c.get(key)
    if r.kvs:
        inv.write(json_get(r, inv.cluster_id) if inv.fmt == "json"
                  else simple_get(r, inv.hex))
    return bool(r.kvs)


def _hold(session: Session, stop: threading.Event) -> bool:
    """Wait for a signal (True) or the end of the session (False)."""
    while not stop.wait(WAIT_SLICE_S):
        if session.done:
            return False
    return True


# ------------------------------------------------------------------ lock


def prepare_lock(inv) -> tuple[str, list[str]]:
    if not inv.args:
        raise CliError(EXIT_BAD_ARGS,
                       "lock takes a lock name argument and an optional command to execute")
    return inv.args[0], inv.args[1:]


def _exec_error(argv0: str) -> str | None:
    """Go's os/exec error for a command that cannot be started, or None."""
    if "/" not in argv0:
        return None if shutil.which(argv0) else \
            f'exec: "{argv0}": executable file not found in $PATH'
    if not os.path.exists(argv0):
        return f"fork/exec {argv0}: no such file or directory"
    return None


def _run_command(cmd: list[str], lock: Lock) -> int:
    """Run `cmd` with etcdctl's ETCD_LOCK_* variables (the environment's own win, as in
    Go's exec); its exit status (negative: killed by that signal)."""
    env = {"ETCD_LOCK_KEY": lock.key.decode(errors="surrogateescape"),
           "ETCD_LOCK_REV": str(lock.revision), **os.environ}
    # A signal meanwhile reaches the command too (one process group): wait for it.
    return subprocess.Popen(cmd, env=env).wait()


def run_lock(c, inv, req: tuple[str, list[str]]) -> None:
    name, cmd = req
    ttl = inv.values["ttl"] if inv.values["ttl"] > 0 else DEFAULT_SESSION_TTL
    with interruptible() as stop:
        session = Session(c, ttl=ttl)
        lock = Lock(c, name, session=session)
        try:
            lock.acquire(cancel=stop)
        except RecipeCancelled as exc:
            raise CliError(EXIT_ERROR, str(exc)) from None
        if cmd:
            err = _exec_error(cmd[0])
            rc = 1 if err else _run_command(cmd, lock)
            lock.release()
            if err:
                raise CliError(EXIT_ERROR, err)
            if rc:
                raise CliError(EXIT_ERROR, f"exit status {rc}" if rc > 0 else
                               f"signal: {GO_SIGNAL_NAMES.get(-rc, str(-rc))}")
            return
        if not _show(c, inv, lock.key):
            raise CliError(EXIT_ERROR, "lock lost on init")
        if not _hold(session, stop):
            raise CliError(EXIT_ERROR, "session expired")
        lock.release()


# ------------------------------------------------------------------ elect


def prepare_elect(inv) -> tuple[str, str | None]:
    args, listen = inv.args, inv.values["listen"]
    if len(args) not in (1, 2):
        raise CliError(EXIT_BAD_ARGS, "elect takes one election name argument and an optional "
                                      "proposal argument")
    if len(args) == 1 and not listen:
        raise CliError(EXIT_BAD_ARGS, "no proposal argument but -l not set")
    if len(args) == 2 and listen:
        raise CliError(EXIT_BAD_ARGS, "proposal given but -l is set")
    return args[0], args[1] if len(args) == 2 else None


def run_elect(c, inv, req: tuple[str, str | None]) -> None:
    name, proposal = req
    with interruptible() as stop:
        if proposal is None:
            _observe(c, inv, name, stop)
            return
        session = Session(c)
        e = Election(c, name, session=session)
        try:
            e.campaign(proposal.encode("utf-8", "surrogateescape"), cancel=stop)
        except RecipeCancelled as exc:
            raise CliError(EXIT_ERROR, str(exc)) from None
        _show(c, inv, e.key)
        if not _hold(session, stop):
            raise CliError(EXIT_ERROR, "elect: session expired")
        e.resign()


def _observe(c, inv, name: str, stop: threading.Event) -> None:
    """Print every leader until a signal (then exit 0, as etcdctl)."""
    obs = Election(c, name).observe(cancel=stop)
    try:
        for resp in obs:
            inv.write(json_get(resp, inv.cluster_id) if inv.fmt == "json"
                      else simple_get(resp, inv.hex))
    except RecipeCancelled:
        pass
    finally:
        obs.close()


# (synopsis, summary, flags, formats, prepare, run) as main.ClientCommand takes them
RECIPES = {
    "lock": ("lock <lockname> [exec-command arg1 arg2 ...]", "Acquires a named lock",
             [Flag("ttl", int, LOCK_TTL, "timeout for session")], ("simple", "json"),
             prepare_lock, run_lock),
    "elect": ("elect <election-name> [proposal]",
              "Observes and participates in leader election",
              [Flag("listen", bool, False, "observation mode", "l")], ("simple", "json"),
              prepare_elect, run_elect),
}
