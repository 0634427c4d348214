"""The reference of a stress run: a watch of every key from the run's first revision,
read by its own thread in the main process, whose revisions (every one, in order, each
whole) are the history every stream and every write is checked against."""

from __future__ import annotations

import threading

import clientlib

from .records import by_revision, kv_tuple

FIRST_RESPONSE_S = 10.0  # the watch's `created` response; the broker answers at once
POLL_S = 0.2  # how often the thread looks whether it has read far enough


class Reference(threading.Thread):
    """A watch of every key from revision `base + 1`, read by its own thread so a busy
    main loop never makes it a victim. Every revision must arrive, in order, each whole:
    any break makes the reference unusable (`problem`), and the run FAILS saying so."""

    def __init__(self, client: clientlib.Client, base: int):
        super().__init__(name="stress-reference", daemon=True)
        self.watch = client.watch(b"\0", b"\0", start_revision=base + 1)
        first = self.watch.get(FIRST_RESPONSE_S)
        self.problem = None if first.created else f"first response not created: {first}"
        self.groups: list[tuple[int, list]] = []  # (revision, [(type, kv)])
        self.last = base
        self.until: int | None = None  # set by finish(): stop once this revision is read

    def run(self) -> None:
        while not self.problem:
            if self.until is not None and self.last >= self.until:
                return
            try:
                r = self.watch.get(timeout=POLL_S)
            except clientlib.Timeout:
                continue
            except clientlib.ShmwatchError as exc:
                self.problem = f"reference watch ended: {exc!r}"
                return
            if r.canceled:
                self.problem = (f"reference watch cancelled (compact_revision "
                                f"{r.compact_revision}): it fell behind the compaction")
                return
            self._add(r.events)

    def _add(self, events) -> None:
        first = True
        for rev, evs in by_revision(events, lambda e: e.kv.mod_revision):
            if rev != self.last + 1:
                self.problem = (f"reference stream: revision {rev} after {self.last}"
                                + (" (split across responses)" if first and
                                   rev == self.last else ""))
                return
            self.groups.append((rev, [(e.type, kv_tuple(e.kv)) for e in evs]))
            self.last = rev
            first = False

    def finish(self, until: int, timeout: float) -> None:
        """Read up to revision `until`, then stop."""
        self.until = until
        self.join(timeout)
        if self.is_alive() and not self.problem:
            self.problem = (f"reference stream stopped at revision {self.last}, short of "
                            f"the final revision {until}")
