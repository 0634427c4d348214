"""The lock scenario's verifier (pure): every acquisition the locker processes recorded,
against the history of the lock's prefix as a watch delivered it.

Each contender's key lives from its create revision to the revision that deleted it
(a release, or the broker revoking a killed holder's bound lease). An acquisition
recorded at revision `acq` with the key created at `create` holds the lock over
[acq, delete of that key). The checks: the key existed and was the oldest alive at
`acq` (etcd's ownership rule, recomputed from the history); a release happened at the
revision its holder recorded; no two acquisitions' intervals overlap; every key a
killed process held (or waited with) was deleted; nothing is left under the prefix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SHOWN = 5  # problems quoted per kind


@dataclass
class Life:
    """One lifetime of a contender's key: created at `create`, deleted at `delete`
    (0: never deleted within the history)."""

    key: bytes
    create: int
    delete: int = 0


@dataclass
class Acquisition:
    """What a locker recorded: ["acq", n, key, create_rev, acq_rev, monotonic time] and,
    unless it was killed first, ["rel", n, rel_rev]."""

    worker: str
    n: int
    key: bytes
    create: int
    acq: int
    rel: int = 0  # 0: not released by the worker (killed while holding)
    t: float = 0.0  # when it was acquired (time.monotonic(): one clock on the machine)


@dataclass
class LockVerdict:
    acquisitions: int = 0
    killed_holding: int = 0  # acquisitions whose holder was SIGKILLed before releasing
    keys_checked: int = 0  # key lifetimes seen in the history
    problems: list[str] = field(default_factory=list)


def lifetimes(events: list[tuple[str, bytes, int, int]]) -> dict[tuple[bytes, int], Life]:
    """Key lifetimes from (type, key, create_revision, mod_revision) events in order."""
    out: dict[tuple[bytes, int], Life] = {}
    alive: dict[bytes, Life] = {}
    for typ, key, create, mod in events:
        if typ == "PUT":
            if key not in alive:
                alive[key] = out[(key, create)] = Life(key, create)
        elif key in alive:
            alive.pop(key).delete = mod
    return out


def acquisitions(worker: str, records: list) -> list[Acquisition]:
    """A locker's records, paired."""
    out: dict[int, Acquisition] = {}
    for r in records:
        if r[0] == "acq":
            out[r[1]] = Acquisition(worker, r[1], r[2], r[3], r[4], t=r[5] if len(r) > 5 else 0.0)
        elif r[0] == "rel" and r[1] in out:
            out[r[1]].rel = r[2]
    return list(out.values())


def _owner_at(lives: list[Life], rev: int) -> Life | None:
    alive = [x for x in lives if x.create <= rev and (x.delete == 0 or x.delete > rev)]
    return min(alive, key=lambda x: x.create) if alive else None


def handovers(acqs: list[Acquisition], kill_times: list[float]) -> list[float]:
    """Seconds from each SIGKILL of a holder to the next acquisition by anyone."""
    times = sorted(a.t for a in acqs)
    out = []
    for tk in kill_times:
        after = [t for t in times if t > tk]
        if after:
            out.append(after[0] - tk)
    return out


def verify_lock(acqs: list[Acquisition], events: list, final_keys: list[bytes],
                killed_keys: list[bytes]) -> LockVerdict:
    """Check the acquisitions against the history (see the module docstring)."""
    v = LockVerdict(acquisitions=len(acqs))
    lives = lifetimes(events)
    v.keys_checked = len(lives)
    all_lives = list(lives.values())
    spans = []
    for a in acqs:
        life = lives.get((a.key, a.create))
        who = f"{a.worker} #{a.n} ({a.key.decode(errors='replace')}@{a.create})"
        if life is None:
            v.problems.append(f"{who}: its key was never created in the history")
            continue
        owner = _owner_at(all_lives, a.acq)
        if owner is not life:
            v.problems.append(f"{who}: acquired at revision {a.acq} but the oldest key then "
                              f"was {owner.key if owner else None!r}")
        if life.delete == 0:
            v.problems.append(f"{who}: its key was never deleted")
            continue
        if a.rel and a.rel != life.delete:
            v.problems.append(f"{who}: released at {a.rel} but the key was deleted at "
                              f"{life.delete}")
        v.killed_holding += a.rel == 0
        spans.append((a.acq, life.delete, who))
    spans.sort()
    held = None  # the interval reaching furthest so far
    for span in spans:
        if held is not None and span[0] < held[1]:
            v.problems.append(f"overlap: {held[2]} held [{held[0]}, {held[1]}) and {span[2]} "
                              f"acquired at {span[0]}")
        if held is None or span[1] > held[1]:
            held = span
    for k in killed_keys:
        if any(x.key == k and x.delete == 0 for x in all_lives):
            v.problems.append(f"a killed process's key {k!r} was never deleted")
    if final_keys:
        v.problems.append(f"keys left under the lock's prefix at the end: {final_keys[:SHOWN]}")
    return v
