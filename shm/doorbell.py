"""Doorbell: wake a sleeping consumer without a system call per record.

A doorbell is a named POSIX semaphore plus a u32 "sleeping" flag word in shared memory
(a ring's `consumer_sleeping` word, or a field of a control segment). The consumer spins
briefly, then announces it is about to sleep (flag = 1), re-checks for work (the
lost-wake-up guard), and sleeps on the semaphore in slices; the producer, after
publishing, posts only when it sees the flag set. A busy consumer therefore costs the
producer one memory read per batch, and no system call.

Lost wake-ups: the handshake is "consumer: store flag, load ready; producer: store
head, load flag". x86 may let a load pass an earlier store (store buffer), so the
consumer issues a full fence (a locked instruction) between its store and its check.
The producer's `ring()` does not fence, to stay one plain load on the hot path; the
remaining window is the few nanoseconds a store spends in the store buffer, against the
hundreds of nanoseconds of interpreter work between publishing and ringing. Should it
ever hit, the wait's time slice bounds the cost: a lost wake-up costs at most one slice,
never a hang. This module owns nothing else: it does not know what "ready" means.

Spinning adapts (as adaptive mutexes do): a spin only pays when work arrives within it,
which depends on the traffic, so each doorbell keeps a spin budget between 0 and the
caller's `spin`. Work found while spinning keeps (or raises) the budget; a sleep that
was woken soon after it began (within `SPIN_PAYS_S`: a spin would have caught it) doubles
it; a longer sleep halves it. A busy peer (a reply within tens of microseconds) keeps a
consumer spinning; at a modest rate (a record a millisecond) the budget falls to 0 within
a few waits and the consumer goes straight to sleep, costing one system call instead of
hundreds of microseconds of CPU per record.
"""

from __future__ import annotations

import os
import threading
import time
from os import sched_yield as _sched_yield
from collections.abc import Callable
from typing import TYPE_CHECKING

import posix_ipc

from .errors import SegmentExists, SegmentNotFound, ShmPermissionError

if TYPE_CHECKING:
    from typing_extensions import Self

_fence_lock = threading.Lock()


def _renew_fence_lock() -> None:
    # A thread of the parent may hold the lock at the instant of fork(): the child's
    # copy would stay locked forever. It guards nothing shared, so a fresh one is right.
    global _fence_lock
    _fence_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_fence_lock)


def _fence() -> None:
    # An uncontended lock acquire/release runs locked read-modify-write instructions
    # (sem_trywait / sem_post in CPython's lock), a full memory barrier on x86.
    _fence_lock.acquire()
    _fence_lock.release()


SPIN_PAYS_S = 60e-6  # a sleep woken sooner than this would have been caught by spinning
SPIN_FLOOR = 8  # the budget a doubling starts from


def _sem_path(name: str) -> str:
    return "/dev/shm/sem." + name[1:]


class Doorbell:
    """posix_ipc semaphore + a u32 'sleeping' flag word living in shared memory (given
    as a 4-byte memoryview, e.g. a ring's consumer_sleeping word or a field in a
    control segment).

    Any number of producers may `ring()`; one consumer `wait()`s.
    """

    __slots__ = ("_budget", "_flag", "_sem", "name")

    def __init__(self, name: str, sem: posix_ipc.Semaphore, flag: memoryview) -> None:
        flag = memoryview(flag)
        if flag.nbytes != 4:
            raise ValueError(f"doorbell flag must be a 4-byte memoryview, got {flag.nbytes}")
        if flag.format != "I":
            flag = flag.cast("B").cast("I")
        self.name = name
        self._sem: posix_ipc.Semaphore | None = sem
        self._flag = flag
        self._budget = 1 << 30  # adaptive spin budget (see the module docstring); capped by `spin`

    @classmethod
    def create(cls, name: str, flag: memoryview, *, mode: int = 0o600) -> Doorbell:
        """Create the semaphore exclusively (initial value 0); clears the flag.

        The mode is re-applied after creation so the umask cannot strip it.
        """
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=mode, initial_value=0)
        except posix_ipc.ExistentialError:
            raise SegmentExists(f"semaphore {name} already exists") from None
        except posix_ipc.PermissionsError as e:
            raise ShmPermissionError(f"cannot create semaphore {name}: {e}") from None
        try:
            try:
                os.chmod(_sem_path(name), mode)  # Linux keeps semaphores in /dev/shm
            except FileNotFoundError:
                pass
            bell = cls(name, sem, flag)
        except BaseException:
            sem.unlink()
            sem.close()
            raise
        bell._flag[0] = 0
        return bell

    @classmethod
    def open(cls, name: str, flag: memoryview) -> Doorbell:
        """Open an existing doorbell semaphore."""
        try:
            sem = posix_ipc.Semaphore(name, 0)
        except posix_ipc.ExistentialError:
            raise SegmentNotFound(f"semaphore {name} does not exist") from None
        except posix_ipc.PermissionsError as e:
            raise ShmPermissionError(f"cannot open semaphore {name}: {e}") from None
        try:
            return cls(name, sem, flag)
        except BaseException:
            sem.close()
            raise

    def ring(self) -> bool:
        """Producer, after publishing: if the consumer sleeps, clear its flag and post.

        Returns whether it posted. Costs one memory read when the consumer is awake.
        """
        flag = self._flag
        if flag[0]:
            flag[0] = 0
            self._sem.release()
            return True
        return False

    def wait(self, ready: Callable[[], bool], timeout: float | None, *, spin: int = 200,
             slice: float = 0.05, alive: Callable[[], None] | None = None) -> bool:
        """Consumer: return True as soon as `ready()` is true, False on timeout.

        `timeout` None waits forever. Spins at most `spin` times on `ready()` (fewer when
        spinning has not been paying: the adaptive budget), then sleeps on the semaphore
        in slices of at most `slice` seconds, setting the flag before and re-checking
        `ready()` after setting it. `alive()` runs between slices and raises to abort
        the wait (e.g. the peer died); its exception propagates.
        """
        n = min(spin, self._budget)
        for i in range(n):
            if ready():
                if i * 2 >= self._budget:  # it paid, late in the budget: allow more
                    self._budget = min(max(self._budget, SPIN_FLOOR) * 2, spin)
                return True
            # On a machine with more runnable processes than cores (2 cores: writer,
            # broker, watcher), a spinner must give its core to the peer it waits for;
            # when a core is free this returns at once (~0.3 us). Measured with
            # /tmp-style W1 runs: yielding on every check beat every 8th and never.
            _sched_yield()
        if slice <= 0:
            raise ValueError(f"slice must be > 0, got {slice}")
        deadline = None if timeout is None else time.monotonic() + timeout
        flag = self._flag
        sem = self._sem
        first = True
        while True:
            wait_for = slice
            now = time.monotonic()
            if deadline is not None:
                remaining = deadline - now
                if remaining <= 0:
                    return ready()
                wait_for = min(wait_for, remaining)
            flag[0] = 1
            _fence()
            try:
                if ready():
                    return True
                try:
                    sem.acquire(wait_for)
                except posix_ipc.BusyError:  # the slice expired
                    pass
                except posix_ipc.SignalError:  # EINTR: Python handlers run on return
                    pass
            finally:
                flag[0] = 0
            if ready():
                if first:
                    self._adapt(time.monotonic() - now, spin)
                return True
            if first:
                self._budget //= 2  # a whole slice without work: spinning does not pay
                first = False
            if alive is not None:
                alive()

    def _adapt(self, slept: float, spin: int) -> None:
        """A sleep ended with work: had it come within a spin, spinning pays."""
        if slept < SPIN_PAYS_S:
            self._budget = min(max(self._budget, SPIN_FLOOR) * 2, spin)
        else:
            self._budget //= 2

    def post(self) -> None:
        """Post unconditionally (e.g. to make a waiter re-check at shutdown)."""
        self._sem.release()

    @property
    def sleeping(self) -> int:
        """The flag word (1 while the consumer sleeps or is about to)."""
        return self._flag[0]

    def close(self) -> None:
        """Close the semaphore handle and release the flag view. Idempotent."""
        sem, self._sem = self._sem, None
        if sem is not None:
            sem.close()
            self._flag.release()

    def unlink(self) -> None:
        """Remove the semaphore's name; ignore a missing one. Idempotent."""
        Doorbell.unlink_name(self.name)

    @staticmethod
    def unlink_name(name: str) -> bool:
        """Unlink the semaphore `name` if present; return whether it existed."""
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            return False
        except posix_ipc.PermissionsError as e:
            raise ShmPermissionError(f"cannot unlink semaphore {name}: {e}") from None
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Doorbell {self.name}{' closed' if self._sem is None else ''}>"


__all__ = ["Doorbell"]
