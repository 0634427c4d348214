"""The checks of a stress run, on data only: the reference history replayed (`History`),
what one watcher was delivered (`Stream`), each stream against the history
(`verify_stream`), and the writes against the history (`check_writes`).

Pure: no broker, no processes, no clock. The rules are etcd's watch guarantees: in
order, no gap, no duplicate, each revision in one response, filters and prev_kv right,
or a correct compaction cancel; a revision that was a compaction revision may arrive as
etcd sends it then (`at_compaction`)."""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass, field

from .records import by_revision, read_records
from .spec import START_COMPACT, WatchSpec

STAMP = re.compile(rb"s(\d+)\.(\d+)\Z")  # the value a writer puts: s<writer>.<op number>
SHOWN_EVENTS = 3  # events quoted in a mismatch (the rest: "...")


class History:
    """The reference history replayed over the state at the run's start: each event
    gets its prev_kv, the MVCC fields are checked, the acknowledged writes are checked
    at their revisions, and the end state must equal the final `get`.

    `groups`: (revision, [(type, kv)]) as the reference watch read them; `acks`: per
    writer, its records [op number, revision, [[key, value or None, deleted], ...]]."""

    def __init__(self, base: int, initial: list, groups: list, final: list, acks: dict):
        self.revs = [rev for rev, _ in groups]
        self.events: list[list] = []  # per revision: [(type, kv, prev_kv)]
        self.problems: list[str] = []
        self.acks_checked = 0
        self.ack_problems: list[str] = []
        self.acks_failed = 0
        self.keys: set[bytes] = set()  # every key the history changed
        state = {kv[0]: kv for kv in initial}
        by_rev: dict[int, list] = {}
        for wid, records in acks.items():
            for n, rev, changes in records:
                by_rev.setdefault(rev, []).append((wid, n, rev, changes))
        at_base = by_rev.pop(base, ())
        self._check_changed(at_base, [], state)  # a change at the run's start: impossible
        self._check_unchanged(at_base, state)
        for rev, evs in groups:
            pending = by_rev.pop(rev, ())
            self._check_changed(pending, evs, state)
            self.events.append(self._apply(rev, evs, state))
            self.keys.update(kv[0] for _, kv in evs)
            self._check_unchanged(pending, state)
        for rev, pending in sorted(by_rev.items()):
            self._ack_failed(f"{len(pending)} acknowledged write(s) at revision {rev}, "
                             f"which the history does not have", len(pending))
        want = {kv[0]: kv for kv in final}
        if state != want:
            diff = sorted(k for k in set(state) | set(want) if state.get(k) != want.get(k))
            self.problems.append(f"the final get differs from the history replayed on "
                                 f"{len(diff)} key(s), first {diff[0]!r}: get "
                                 f"{want.get(diff[0])}, history {state.get(diff[0])}")

    def _apply(self, rev: int, evs: list, state: dict) -> list:
        """One revision's events applied to `state`, each with its prev_kv."""
        out = []
        for typ, kv in evs:
            prev = state.get(kv[0])
            self._check_mvcc(rev, typ, kv, prev)
            out.append((typ, kv, prev))
            if typ == "PUT":
                state[kv[0]] = kv
            else:
                state.pop(kv[0], None)
        return out

    def _check_mvcc(self, rev: int, typ: str, kv: tuple, prev: tuple | None) -> None:
        if kv[3] != rev:
            self.problems.append(f"revision {rev}: event with mod_revision {kv[3]}")
        elif typ == "PUT" and (kv[4], kv[2]) != ((prev[4] + 1, prev[2]) if prev else (1, rev)):
            self.problems.append(f"revision {rev}: PUT {kv[0]!r} version {kv[4]} create "
                                 f"{kv[2]} after {prev}")
        elif typ == "DELETE" and prev is None:
            self.problems.append(f"revision {rev}: DELETE of {kv[0]!r}, which did not exist")

    def _ack_failed(self, problem: str, n: int = 1) -> None:
        self.acks_failed += n
        self.ack_problems.append(problem)

    def _check_changed(self, pending, evs: list, before: dict) -> None:
        """Acknowledged writes that changed something own their revision: its events
        must be exactly their changes (`before`: the state before the revision)."""
        for wid, n, rev, changes in pending:
            if not any(v is not None or d for _, v, d in changes):
                continue
            self.acks_checked += 1
            want = sorted(("PUT", k, v) if v is not None else ("DELETE", k, None)
                          for k, v, d in changes if v is not None or d)
            got = sorted((t, kv[0], kv[1] if t == "PUT" else None) for t, kv in evs)
            absent = [k for k, v, d in changes if v is None and not d and k in before]
            if got != want or absent:
                self._ack_failed(f"writer {wid} op {n}: acknowledged {changes} at revision "
                                 f"{rev}, the history has {got}")

    def _check_unchanged(self, pending, after: dict) -> None:
        """Acknowledged writes that changed nothing (deletes of absent keys) answered
        with the current revision: their keys are absent there (`after`: the state
        once that revision is applied)."""
        for wid, n, rev, changes in pending:
            if any(v is not None or d for _, v, d in changes):
                continue
            self.acks_checked += 1
            if any(k in after for k, _, _ in changes):
                self._ack_failed(f"writer {wid} op {n}: deleted nothing at revision {rev}, "
                                 f"but a key of {changes} existed")

    def stamps(self) -> set[tuple[int, int]]:
        """(writer, op number) of every value the writers put, as the history has them."""
        out = set()
        for evs in self.events:
            for typ, kv, _ in evs:
                m = STAMP.match(kv[1]) if typ == "PUT" else None
                if m:
                    out.add((int(m[1]), int(m[2])))
        return out

    def expected(self, spec: WatchSpec, first: int, last: int) -> list[tuple[int, list]]:
        """The revisions in [first, last] with events for this watch, and those events."""
        keys = {k for k in self.keys if spec.covers(k)}
        types = spec.types()
        out = []
        lo = bisect.bisect_left(self.revs, first)
        hi = bisect.bisect_right(self.revs, last)
        for i in range(lo, hi):
            evs = [e for e in self.events[i] if e[1][0] in keys and e[0] in types]
            if evs:
                out.append((self.revs[i], evs))
        return out


@dataclass
class Stream:
    """What one watcher process was delivered, as read back from its file: ["start",
    revision], then ["resp", watch_id, revision, created, canceled, compact_revision,
    cancel_reason, [[type, kv, prev_kv], ...]] per response (workers.py writes them)."""

    start: int | None = None
    created: tuple | None = None  # the first response
    groups: list = field(default_factory=list)  # (revision, [(type, kv, prev)])
    progress: int = 0  # the highest progress response's revision
    cancel: tuple | None = None  # (compact_revision, reason)
    problems: list = field(default_factory=list)

    @classmethod
    def read(cls, path: str) -> Stream:
        return cls.from_records(read_records(path))

    @classmethod
    def from_records(cls, records: list) -> Stream:
        s = cls()
        for rec in records:
            if rec[0] == "start":
                s.start = rec[1]
                continue
            _, wid, rev, created, canceled, compact, reason, events = rec
            if s.created is None:
                s.created = (rev, created, canceled, reason)
                if not created:
                    s.problems.append("first response is not `created`")
                if not canceled:
                    continue
            if s.cancel is not None:
                s.problems.append("a response after the cancel")
            if canceled:
                s.cancel = (compact, reason)
            elif wid == -1 and not events:
                s.progress = max(s.progress, rev)
            s._add(events)
        return s

    def _add(self, events) -> None:
        """A response's events, grouped by revision; a revision not after the last one
        is a problem (delivered twice, split across responses, or out of order)."""
        for grev, evs in by_revision(events, lambda e: e[1][3]):
            if self.groups and grev <= self.groups[-1][0]:
                last_rev, last_evs = self.groups[-1]
                self.problems.append(
                    f"revision {grev} delivered twice" if grev == last_rev and
                    evs == last_evs else
                    f"revision {grev} split across responses" if grev == last_rev else
                    f"revision {grev} after {last_rev} (out of order or duplicate)")
                continue
            self.groups.append((grev, evs))

    @property
    def events(self) -> int:
        return sum(len(evs) for _, evs in self.groups)

    @property
    def last(self) -> int:
        return self.groups[-1][0] if self.groups else 0

    def resume_from(self) -> int:
        """Where a watch taking over from this one starts: after the last revision
        delivered, else where this one started (0: from now)."""
        if self.groups:
            return self.last + 1
        return self.start or (self.created[0] + 1 if self.created else 0)

    def first(self, spec: WatchSpec) -> int:
        """The first revision this stream could deliver."""
        if self.start:
            return self.start
        return self.created[0] + 1 if self.created else max(0, spec.start_revision)


@dataclass
class Compactions:
    """The compaction revisions of a run: those it made and those it saw the broker at.
    If the revision log may have evicted on its own (`wrapped`), the compaction point
    moved with every write then, and any revision up to `final` may have been one."""

    points: set[int]
    final: int
    wrapped: bool

    def at(self, rev: int) -> bool:
        return rev in self.points or (self.wrapped and rev <= self.final)


def same_events(got: list, want: list, prev_kv: bool) -> bool:
    """Events of one revision as delivered vs as the history has them."""
    if not prev_kv:
        want = [(t, kv, None) for t, kv, _ in want]
    return got == want


def at_compaction(evs: list) -> list:
    """A revision's events as a watch replaying from it gets them once it is the
    compaction revision (etcd: the DELETEs are gone, the PUTs come without prev_kv;
    broker.mvcc.events_at_compact_rev)."""
    return [(t, kv, None) for t, kv, _ in evs if t == "PUT"]


def verify_stream(spec: WatchSpec, s: Stream, hist: History, comp: Compactions) -> list[str]:
    """Violations of one stream against the history. A revision that was a compaction
    revision may come in etcd's form for it (`at_compaction`), or not at all if that
    leaves nothing for this watch."""
    problems = list(s.problems)
    if s.created is None:
        return problems
    if s.created[2] and not s.cancel[0]:
        return problems + [f"watch refused: {s.created[3]}"]
    first = s.start or s.created[0] + 1
    next_rev = max(first, s.last + 1, s.progress + 1)  # the watch's minRev is >= this
    if spec.start_revision == START_COMPACT:  # it read the compaction point it started at
        comp = dataclasses.replace(comp, points=comp.points | {first})
    if s.cancel is not None:
        compact, reason = s.cancel
        if not compact:
            problems.append(f"cancelled without compact_revision ({reason})")
        elif not next_rev < compact <= comp.final:
            problems.append(f"cancelled at compact_revision {compact}, but it needed "
                            f"revision {next_rev} on (run compacted to {comp.final})")
    want = hist.expected(spec, first, next_rev - 1)
    got = {rev: evs for rev, evs in s.groups}
    for rev, evs in want:
        have = got.pop(rev, None)
        if have is None:
            if not (comp.at(rev) and not at_compaction(evs)):
                problems.append(f"gap: revision {rev} ({len(evs)} event(s)) missing")
        elif not (same_events(have, evs, spec.prev_kv)
                  or (comp.at(rev) and have == at_compaction(evs))):
            problems.append(f"revision {rev}: got {_show(have)}, history has {_show(evs)}")
    for rev in sorted(got):
        problems.append(f"revision {rev}: {len(got[rev])} event(s) the watch must not see")
    return problems


def check_writes(hist: History, acks: dict, killed: set[int]) -> list[str]:
    """Every acknowledged write is in the history (`History` checked them), and every
    write in the history was made: acknowledged, or the op a killed writer had in
    flight (applied, but the writer died before it recorded the acknowledgement)."""
    problems = list(hist.ack_problems)
    made = {(wid, rec[0]) for wid, recs in acks.items() for rec in recs}
    for wid, n in sorted(hist.stamps() - made):
        if not (wid in killed and n == len(acks.get(wid, ()))):
            problems.append(f"the history has writer {wid}'s op {n}, which it never made "
                            f"or had acknowledged")
    return problems


@dataclass
class Checked:
    """What the checks of one run found."""

    hist: History
    streams: list[dict]  # a stream_report per watcher process
    writer_problems: list[str]
    acked: int  # writes acknowledged


def stream_report(name: str, spec: WatchSpec, s: Stream, hist: History, comp: Compactions,
                  *, reference_ok: bool, killed: bool, exitcode: int | None) -> dict:
    """One stream's row of the summary: its violations (unchecked when the reference
    history is unusable) and what its process's end says."""
    problems = verify_stream(spec, s, hist, comp) if reference_ok else []
    if not killed and exitcode != 0:
        problems.append(f"watcher process exit code {exitcode}")
    elif not killed and s.created is None:
        problems.append("no watch response recorded")
    status = ("FAILED" if problems else "killed" if killed else
              "compacted" if s.cancel else "ok")
    return {"stream": name, "watch": spec.describe(), "status": status,
            "events": s.events, "first": s.first(spec), "last": s.last,
            "compact_revision": s.cancel[0] if s.cancel else 0,
            "checked": s.created is not None and reference_ok, "problems": problems}


def _show(evs: list) -> str:
    return "; ".join(f"{t} {kv[0].decode(errors='replace')}@{kv[3]} v{kv[4]}"
                     + (" +prev" if p else "") for t, kv, p in evs[:SHOWN_EVENTS]) + \
        (" ..." if len(evs) > SHOWN_EVENTS else "")
