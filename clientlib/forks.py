"""Fork safety for clientlib: which process generation an object belongs to.

`generation` is bumped in every child right after fork() (os.register_at_fork), and
every live `Client` is told (`Client._forked`: drop the child's copy of the parent's
slot lock, renew its locks). Clients and watches remember the generation they were made
in and compare it at each call, which is cheaper than os.getpid().
"""

from __future__ import annotations

import os
import weakref

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
