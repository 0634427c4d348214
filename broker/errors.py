"""Why a broker could not start: one error type whose message is the whole reason.

`python -m broker` and `shmwatch serve` print it as one line (never a traceback), and
`broker.spawn()` raises it in the parent with the child's own words.
"""

from __future__ import annotations


class BrokerStartError(RuntimeError):
    """The broker did not start; the message says why and what to change."""
