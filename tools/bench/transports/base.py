"""The contract between a trial and a transport (shmwatch or a peer).

A transport has a main-process side (`missing` / `start` / `prepare` / `cleanup` /
`stop`) and a child side: `writer(env, trial, idx)` and `reader(env, trial, idx)` build,
inside a writer or reader process, objects with

    writer: send(key, value, seq)       one record, one write
            send_batch([(key, value, seq)...])  one atomic write of all: a txn
                                        (only if "batched" is in `write_paths`)
            send_many([(key, value, seq)...])   separate writes sent in one go:
                                        pipelined (only if "pipelined" is in `write_paths`)
            send_async(key, value, seq)  one write not waiting for its reply, and
            flush() -> int | None       wait for every reply: how many were
                                        acknowledged (None: the peer has no replies)
                                        (only if "async" is in `write_paths`)
            close()
    reader: recv(timeout) -> [value, ...]   the values of the records that arrived,
                                        each decoded as a real consumer would; [] if none
            close()

A reader's constructor returns only once it is subscribed (watch created, subscription
confirmed), so no record sent after every reader is ready can be missed for that reason.
`env` is what `prepare` returned for the trial (names, ports, queues): it is inherited
by the forked children. Owns the contract only; each transport is its own module.
"""

from __future__ import annotations

import msgpack


def packb(key: bytes, value: bytes, seq: int) -> bytes:
    """A peer's frame for a record: msgpack [key, value, seq]."""
    return msgpack.packb([key, value, seq], use_bin_type=True)


class Transport:
    """What every transport has; the defaults describe a peer that needs no server."""

    name = "?"
    label = "?"  # how BENCHMARKS.md names it
    write_paths: tuple[str, ...] = ("sync",)  # and "batched", "pipelined", "async"
    max_pace: float | None = None  # records/s a paced writer is held to (W3)
    min_idle_s = 0.0  # a reader waits at least this long for a record that may be lost

    writer: type
    reader: type

    @staticmethod
    def missing() -> str:
        """Why this transport cannot run here ("" when it can)."""
        return ""

    def start(self) -> None:
        """Start what the whole run shares (a server), before any trial."""

    def stop(self) -> None:
        """Stop what `start` started."""

    def prepare(self, trial) -> dict:
        """Set up one trial; returns the env its children get."""
        return {}

    def cleanup(self, env: dict) -> None:
        """Undo `prepare`."""

    def pace(self, rate: float) -> float:
        return rate if self.max_pace is None else min(rate, self.max_pace)

    def stats(self, env: dict) -> dict | None:
        """The server's own counters after a trial, if it keeps any."""
        return None

    def server_pid(self, env: dict) -> int | None:
        """The process between writers and readers (broker, redis-server, etcd), if any."""
        return None
