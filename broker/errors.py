"""Why a broker could not start (one error type whose message is the whole reason),
and the broker's own internal errors.

`python -m broker` and `shmwatch serve` print it as one line (never a traceback), and
`broker.spawn()` raises it in the parent with the child's own words.
"""

from __future__ import annotations


class BrokerStartError(RuntimeError):
    """The broker did not start; the message says why and what to change."""


class BrokerRunning(BrokerStartError):
    """A live broker already holds this name."""


class NameTaken(BrokerRunning):
    """The broker's name is taken by an object another user owns."""


class NameClash(Exception):
    """Every fresh random name tried for an object already existed."""
