"""The shmwatch broker: etcd's MVCC store and watch machinery behind shared-memory rings.

`spawn()` starts a broker in a child process and returns once clients can connect;
`python -m broker --name NAME` (or `shmwatch serve`) runs one in the foreground.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from .admin import cleanup_stale, list_brokers
from .server import Broker, BrokerConfig, run, unique_name

__all__ = ["Broker", "BrokerConfig", "BrokerProcess", "run", "spawn", "unique_name",
           "cleanup_stale", "list_brokers"]


class BrokerProcess:
    """A broker running in a child process; a context manager that stops it on exit."""

    def __init__(self, name: str, proc: subprocess.Popen):
        self.name = name
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
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


def spawn(name: str | None = None, *, timeout: float = 15.0, **options) -> BrokerProcess:
    """Start a broker in a child process and wait until it accepts clients.

    `options` are BrokerConfig fields (log_bytes=..., watch_ring_bytes=..., ...).
    """
    name = name or unique_name()
    args = [sys.executable, "-m", "broker", "--name", name]
    for key, value in options.items():
        text = format(value, "o") if key == "mode" else str(value)  # --mode is octal
        args += ["--" + key.replace("_", "-"), text]
    r, w = os.pipe()
    args += ["--ready-fd", str(w), "--parent-pid", str(os.getpid())]
    proc = subprocess.Popen(args, pass_fds=(w,))
    os.close(w)
    deadline = time.monotonic() + timeout
    try:
        with os.fdopen(r, "rb") as pipe:
            os.set_blocking(pipe.fileno(), False)
            buf = b""
            while b"ready" not in buf:
                if proc.poll() is not None:
                    raise RuntimeError(f"broker {name!r} exited with {proc.returncode} at start")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broker {name!r} did not start in {timeout}s")
                chunk = pipe.read()
                if chunk:
                    buf += chunk
                else:
                    time.sleep(0.005)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        cleanup_stale(name)
        raise
    return BrokerProcess(name, proc)
