"""Fork safety for clientlib: which process generation an object belongs to.

`generation` is bumped in every child right after fork() (os.register_at_fork), and
every live `Client` is told (`ForkSafety._forked`: drop the child's copy of the parent's
slot lock, renew its locks). Clients and watches remember the generation they were made
in and compare it at each call, which is cheaper than os.getpid().
"""

from __future__ import annotations

import os
import threading
import time
import weakref

from shm.errors import ShmError
from shmwatch.wire import errors

from .attach import from_shm

generation = 0
_live: weakref.WeakSet = weakref.WeakSet()


def track(client) -> None:
    """Tell `client._forked()` in every future child."""
    _live.add(client)


def _after_fork_in_child() -> None:
    global generation
    generation += 1
    for c in list(_live):
        c._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class ForkSafety:
    """The client's side of fork safety (a mixin of `Client`): in a forked child, forget
    the parent's client and attach as a new one on first use."""

    def _forked(self) -> None:
        """In a child right after fork() (one thread): drop the child's copy of the
        parent's slot lock, and replace every lock (another thread of the parent may
        have held one mid-call). Touches no shared memory."""
        if self._lock_fd >= 0:
            try:
                os.close(self._lock_fd)
            except OSError:
                pass
            self._lock_fd = -1
        self._cond = threading.Condition(threading.RLock())
        self._send_lock = threading.Lock()
        self._watch_lock = threading.Lock()
        self._sleeper = False

    def _drop_inherited(self) -> None:
        """Forget the parent's client in this child: unmap our copies of its segments
        and close our semaphore handles; send nothing, unlock nothing, unlink nothing."""
        for w in self._watches.values():
            if w._ring is not None:
                w._ring.release()
                w._ring = None
        self._watches.clear()
        self._replies.clear()
        self._abandoned.clear()
        self._fail_futures(errors.InheritedWatchError(
            "shmwatch: this write was sent by the parent process before fork(); "
            "its reply belongs to the parent"))
        self._inflight.clear()
        self._to_cancel.clear()
        self._orphans.clear()
        self._free_rings.clear()
        self._slot = None  # the slot (and its lock) is the parent's
        self._release()
        self._seg = self._bell = self._ctl = None
        self._broker_bell = None
        self._fork_gen = generation

    def _own(self) -> None:
        """Make sure this client belongs to this process: in a forked child, attach as
        a new client on first use (the parent's stays as it was)."""
        if self._fork_gen == generation:
            return
        with self._send_lock, self._cond:
            if self._fork_gen == generation:
                return  # another thread of this child did it
            user_closed = self._user_closed
            self._drop_inherited()
            if user_closed:
                return  # closed in the parent: stays closed (ClientClosed)
            self._closed = False
            self._broken = None
            try:
                self._attach(time.monotonic() + self.timeout)
            except BaseException as exc:
                self._release()
                self._seg = self._bell = self._ctl = None
                self._broker_bell = None
                if isinstance(exc, ShmError):
                    raise from_shm(exc, self.name) from None
                raise
            self.generation += 1
