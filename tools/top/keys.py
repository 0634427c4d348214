"""The terminal side of tools/top's live view: stdin in cbreak mode (its modes restored
on exit, however the view ends) so keys arrive one by one, and a self-pipe woken by
SIGWINCH so a resize redraws at once instead of at the next refresh."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import tty

READ_BYTES = 1024  # more than anyone types between two refreshes


class Keys:
    """`with Keys() as keys: keys.wait(timeout)` -> the keys typed meanwhile."""

    def __init__(self) -> None:
        self.fd: int | None = None  # stdin, while it is a terminal that can still be read
        self._saved: list | None = None  # its modes before cbreak
        self._old_winch = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    def __enter__(self) -> Keys:
        try:
            fd = sys.stdin.fileno()
            if os.isatty(fd):
                self._saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
                self.fd = fd
        except (OSError, ValueError, termios.error):
            self.fd = None

        def on_winch(*_) -> None:
            with contextlib.suppress(OSError):  # the pipe is full: a wake-up is pending
                os.write(self.wake_w, b"w")

        with contextlib.suppress(ValueError):  # not the main thread: no resize wake-up
            self._old_winch = signal.signal(signal.SIGWINCH, on_winch)
        return self

    def __exit__(self, *exc) -> None:
        if self._old_winch is not None:
            signal.signal(signal.SIGWINCH, self._old_winch)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        os.close(self.wake_r)
        os.close(self.wake_w)

    def wait(self, timeout: float | None) -> str:
        """The keys typed (possibly ""), waiting at most `timeout` seconds for a key or
        a resize."""
        fds = [self.wake_r] + ([self.fd] if self.fd is not None else [])
        r, _, _ = select.select(fds, [], [], timeout)
        if self.wake_r in r:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.wake_r, READ_BYTES):  # every pending wake-up at once
                    pass
        if self.fd is None or self.fd not in r:
            return ""
        data = os.read(self.fd, READ_BYTES)
        if not data:  # stdin closed: no more keys
            self.fd = None
        return data.decode(errors="ignore")
