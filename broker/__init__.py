"""The shmwatch broker: etcd's MVCC store and watch machinery behind shared-memory rings.

`spawn()` starts a broker in a child process and returns once clients can connect;
`python -m broker --name NAME` (or `shmwatch serve`) runs one in the foreground.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

from .admin import cleanup_stale, list_brokers
from .errors import BrokerStartError
from .config import BrokerConfig
from .server import Broker, run, unique_name

__all__ = ["Broker", "BrokerConfig", "BrokerProcess", "BrokerStartError", "run", "spawn",
           "unique_name", "cleanup_stale", "list_brokers"]


class BrokerProcess:
    """A broker running in a child process; a context manager that stops it on exit.

    `name` is what clients connect to; `ready_line` is the line the broker reported
    when it became ready (its pid and the sizes it chose)."""

    def __init__(self, name: str, proc: subprocess.Popen, ready_line: str = ""):
        self.name = name
        self.proc = proc
        self.ready_line = ready_line

    @property
    def pid(self) -> int:
        """The broker's process id."""
        return self.proc.pid

    def alive(self) -> bool:
        """True while the broker process runs."""
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, then SIGKILL if needed; removes leftovers of a killed broker."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        cleanup_stale(self.name)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL, leaving its segments behind (as a crash would)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> "BrokerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def spawn(name: str | None = None, *, timeout: float = 15.0, detach: bool = False,
          **options) -> BrokerProcess:
    """Start a broker in a child process and return once it accepts clients.

    `name` defaults to a fresh `unique_name()`. `options` are BrokerConfig fields
    (log_bytes=..., watch_ring_bytes=..., shm_budget=..., ...); sizes not given are
    sized from /dev/shm's free space (see `broker.sizing`), and the handle's
    `ready_line` says what was chosen. The child stops (SIGTERM) when this process dies,
    unless `detach=True`: then it runs in a session of its own with its output to
    /dev/null, outliving this process (stop it with `.stop()` or SIGTERM to `.pid`).

    Raises `BrokerStartError` with the broker's own reason when it cannot start (name in
    use, bad option, no space in /dev/shm, data directory busy), `TimeoutError` if it is
    not ready within `timeout` seconds; nothing of it is left behind either way.
    """
    name = name or unique_name()
    args = [sys.executable, "-m", "broker", "--name", name]
    for key, value in options.items():
        if key == "mode" and isinstance(value, int):
            text = format(value, "o")
        elif isinstance(value, (list, tuple)):  # upstream=[url, ...]
            text = ",".join(map(str, value))
        else:
            text = str(value)
        args += ["--" + key.replace("_", "-"), text]
    r, w = os.pipe()
    args += ["--ready-fd", str(w)]
    if detach:
        proc = subprocess.Popen(args, pass_fds=(w,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    else:
        args += ["--parent-pid", str(os.getpid())]
        proc = subprocess.Popen(args, pass_fds=(w,))
    os.close(w)
    try:
        line = _read_ready(proc, r, name, timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_stale(name)
        raise
    return BrokerProcess(name, proc, line)


def _read_ready(proc: subprocess.Popen, fd: int, name: str, timeout: float) -> str:
    """The child's ready line from the pipe; its own reason as BrokerStartError if it
    reports one or exits first."""
    deadline = time.monotonic() + timeout
    buf = b""
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"broker {name!r} did not start in {timeout}s")
            if select.select([pipe], [], [], min(left, 0.5))[0]:
                chunk = pipe.read(4096)
                if not chunk:  # the child closed the pipe without a line: it died
                    break
                buf += chunk
    kind, _, text = buf.split(b"\n", 1)[0].decode(errors="replace").partition(" ")
    if kind == "ready":
        return text
    if kind == "error":
        raise BrokerStartError(text)
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        rc = None
    raise BrokerStartError(f"broker {name!r} exited with {rc} at start, without saying why "
                           f"(see its stderr)")
