"""`tools/stress`: its verifier on made-up histories and streams (each kind of
violation must be caught), then short end-to-end runs.

The runs start the tool's own broker, writers and watchers (with --chaos it SIGKILLs and
replaces some); they check that it verified many streams, exercised what it exists to
prove (victims, a compaction cancel) and that a run with nothing to verify FAILS. No
figure of speed is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shmwatch.tools.stress.records import write_record
from shmwatch.tools.stress.spec import START_COMPACT, WatchSpec
from shmwatch.tools.stress.verify import (
    Compactions, History, Stream, check_writes, stream_report, verify_stream,
)

ROOT = Path(__file__).resolve().parents[1]

# =============================================================================== verifier


def build(ops_by_rev: list[list[tuple]], base: int = 1) -> list[tuple[int, list]]:
    """Reference groups (revision, [(type, kv)]) for revisions base+1.. from ops
    ("put", key, value) / ("del", key), with etcd's versions and create revisions."""
    state: dict[bytes, tuple] = {}
    groups = []
    for rev, ops in enumerate(ops_by_rev, base + 1):
        evs = []
        for op in ops:
            k = op[1]
            if op[0] == "put":
                prev = state.get(k)
                kv = (k, op[2], prev[2] if prev else rev, rev, prev[4] + 1 if prev else 1, 0)
                state[k] = kv
                evs.append(("PUT", kv))
            else:
                state.pop(k)
                evs.append(("DELETE", (k, b"", 0, rev, 0, 0)))
        groups.append((rev, evs))
    return groups


OPS = [
    [("put", b"a", b"s1.0")],                        # 2
    [("put", b"b", b"s1.1")],                        # 3
    [("put", b"a", b"s1.2")],                        # 4
    [("del", b"b")],                                 # 5
    [("put", b"a", b"s1.3"), ("put", b"c", b"s1.3")],  # 6 (a txn)
    [("del", b"a")],                                 # 7
    [("put", b"b", b"s1.5")],                        # 8
]
ACKS = {1: [(0, 2, ((b"a", b"s1.0", 0),)), (1, 3, ((b"b", b"s1.1", 0),)),
            (2, 4, ((b"a", b"s1.2", 0),)), (3, 6, ((b"a", b"s1.3", 0), (b"c", b"s1.3", 0))),
            (4, 7, ((b"a", None, 1),)), (5, 8, ((b"b", b"s1.5", 0),))],
        2: [(0, 5, ((b"b", None, 1),)), (1, 8, ((b"zz", None, 0),))]}


def final_of(groups) -> list[tuple]:
    state = {}
    for _, evs in groups:
        for t, kv in evs:
            if t == "PUT":
                state[kv[0]] = kv
            else:
                state.pop(kv[0])
    return sorted(state.values())


def history(groups=None, acks=None, final=None) -> History:
    groups = build(OPS) if groups is None else groups
    return History(1, [], groups, final_of(groups) if final is None else final,
                   ACKS if acks is None else acks)


def spec(key=b"", end=b"\0", prev_kv=False, filters=(), start=0) -> WatchSpec:
    return WatchSpec("watcher-test-1", "range", key, end, "fast", start_revision=start,
                     prev_kv=prev_kv, filters=filters)


def stream(tmp_path, hist: History, sp: WatchSpec, revs, *, start=None, created=True,
           tail=("progress", 8), split=(), prev_kv=None) -> Stream:
    """A watcher's file as watcher_main writes it: the history's events of `revs` for
    `sp`, one response per revision (or `split`: a revision's events in two), then
    `tail`: a progress response, a cancel ("cancel", compact_revision) or nothing."""
    path = tmp_path / "stream"
    with open(path, "wb", buffering=0) as f:
        write_record(f, ["start", sp.start_revision if start is None else start])
        write_record(f, ["resp", 0, 1, created, False, 0, "", []])
        with_prev = sp.prev_kv if prev_kv is None else prev_kv
        for rev in revs:
            evs = [[t, kv, p if with_prev else None]
                   for t, kv, p in hist.events[hist.revs.index(rev)]
                   if sp.covers(kv[0]) and t in sp.types()]
            parts = [evs[:1], evs[1:]] if rev in split else [evs]
            for part in filter(None, parts):
                write_record(f, ["resp", 0, rev, False, False, 0, "", part])
        if tail and tail[0] == "progress":
            write_record(f, ["resp", -1, tail[1], False, False, 0, "", []])
        elif tail:
            write_record(f, ["resp", 0, 0, False, True, tail[1], "", []])
    return Stream.read(str(path))


NONE = Compactions(set(), 0, False)


def test_the_reference_history_is_replayed_and_checked():
    h = history()
    assert h.problems == [] and h.ack_problems == [] and h.acks_checked == 8
    # prev_kv comes from the replay: the DELETE of b at 5 carries b's PUT of 3
    (ev,) = h.events[h.revs.index(5)]
    assert ev[0] == "DELETE" and ev[2] == (b"b", b"s1.1", 3, 3, 1, 0)
    assert h.stamps() == {(1, 0), (1, 1), (1, 2), (1, 3), (1, 5)}

    bad = build(OPS)
    bad[2] = (4, [("PUT", (b"a", b"s1.2", 2, 4, 1, 0))])  # version not incremented
    assert any("version 1" in p for p in history(groups=bad).problems)
    final = final_of(build(OPS)) + [(b"x", b"?", 9, 9, 1, 0)]
    assert any("final get differs" in p for p in history(final=final).problems)


def test_acknowledged_writes_must_be_in_the_history():
    lost = {1: ACKS[1] + [(6, 9, ((b"a", b"s1.6", 0),))], 2: ACKS[2]}
    h = history(acks=lost)
    assert h.acks_failed == 1 and "revision 9" in h.ack_problems[0]
    wrong = {1: [(0, 2, ((b"a", b"other", 0),))] + ACKS[1][1:], 2: ACKS[2]}
    assert history(acks=wrong).acks_failed == 1
    # a delete that deleted nothing while the key existed at its revision
    liar = {1: ACKS[1], 2: [ACKS[2][0], (1, 8, ((b"b", None, 0),))]}
    assert "deleted nothing" in history(acks=liar).ack_problems[0]


def test_every_write_in_the_history_was_made():
    h = history()
    # writer 1's op 4 is a delete; ops 0-3 and 5 are put: all acknowledged
    assert check_writes(h, ACKS, killed=set()) == []
    unacked = {1: ACKS[1][:-1], 2: ACKS[2]}  # op 5 applied, never acknowledged
    assert "op 5" in check_writes(h, unacked, killed=set())[0]
    # ...which is fine for a killed writer: it was its op in flight
    assert check_writes(h, unacked, killed={1}) == []
    # but not two ops past its last acknowledgement
    assert check_writes(h, {1: ACKS[1][:-2], 2: ACKS[2]}, killed={1})


def test_an_exact_stream_passes(tmp_path):
    h = history()
    for sp in (spec(), spec(b"a"), spec(b"a", b"c", prev_kv=True),
               spec(filters=("nodelete",)), spec(b"b", None, filters=("noput",))):
        s = stream(tmp_path, h, sp, h.revs)
        assert verify_stream(sp, s, h, NONE) == [], sp
    # from a start revision; killed half-way (no progress response at the end)
    sp = spec(start=4)
    assert verify_stream(sp, stream(tmp_path, h, sp, [4, 5, 6], tail=None), h, NONE) == []


@pytest.mark.parametrize("fault, expect", [
    ("gap", "gap: revision 5"),
    ("duplicate", "revision 4 delivered twice"),
    ("order", "revision 4 after 5"),
    ("split", "revision 6 split across responses"),
    ("short", "gap: revision 8"),
    ("prev_kv", "revision 4: got"),
    ("no prev_kv", "revision 4: got"),
    ("filter", "revision 5: 1 event(s) the watch must not see"),
    ("foreign", "revision 3: 1 event(s) the watch must not see"),
    ("not created", "first response is not `created`"),
])
def test_each_kind_of_violation_is_caught(tmp_path, fault, expect):
    h = history()
    sp, kw, revs = spec(), {}, list(h.revs)
    if fault == "gap":
        revs.remove(5)
    elif fault == "duplicate":
        revs.insert(revs.index(4), 4)
    elif fault == "order":
        revs[2], revs[3] = revs[3], revs[2]
    elif fault == "split":
        kw["split"] = (6,)
    elif fault == "short":  # stops before the revision its progress response claims
        revs = revs[:-1]
    elif fault == "prev_kv":  # prev_kv sent to a watch that did not ask for it
        kw["prev_kv"] = True
    elif fault == "no prev_kv":
        sp, kw["prev_kv"] = spec(prev_kv=True), False
    elif fault == "filter":  # a nodelete watch given a DELETE
        sp = spec(filters=("nodelete",))
        s = stream(tmp_path, h, spec(), revs)
        assert any(expect in p for p in verify_stream(sp, s, h, NONE))
        return
    elif fault == "foreign":  # a watch of `a` given b's event
        sp = spec(b"a", None)
        s = stream(tmp_path, h, spec(b"a", b"c"), revs)
        assert any(expect in p for p in verify_stream(sp, s, h, NONE))
        return
    elif fault == "not created":
        kw["created"] = False
    s = stream(tmp_path, h, sp, revs, **kw)
    problems = verify_stream(sp, s, h, NONE)
    assert any(expect in p for p in problems), problems


def test_compaction_cancels_are_checked(tmp_path):
    h = history()
    sp = spec(start=1)
    # delivered 2..4, then cancelled at 6: revision 5 on was compacted away
    s = stream(tmp_path, h, sp, [2, 3, 4], tail=("cancel", 6))
    assert verify_stream(sp, s, h, Compactions({6}, 6, False)) == []
    # a compaction that did not reach what it still needed: not a reason to cancel
    s = stream(tmp_path, h, sp, [2, 3, 4], tail=("cancel", 5))
    assert "needed revision 5" in verify_stream(sp, s, h, Compactions({5}, 5, False))[0]
    # a compact_revision the broker never had
    s = stream(tmp_path, h, sp, [2, 3, 4], tail=("cancel", 7))
    assert verify_stream(sp, s, h, Compactions({6}, 6, False))
    # a gap before the cancel is still a gap
    s = stream(tmp_path, h, sp, [2, 4], tail=("cancel", 6))
    assert any("gap: revision 3" in p for p in verify_stream(sp, s, h, Compactions({6}, 6, False)))
    s = stream(tmp_path, h, sp, [2], tail=("cancel", 0))
    assert any("without compact_revision" in p for p in verify_stream(sp, s, h, NONE))


def test_the_compaction_revision_may_come_in_etcds_compacted_form(tmp_path):
    """A watch replaying from the compaction revision gets it without DELETEs and
    prev_kv (as etcd); accepted there, and only there."""
    h = history()
    sp = spec(start=7, prev_kv=True)
    # revision 7 is a lone DELETE: from the compaction revision 7 it is not delivered
    s = stream(tmp_path, h, sp, [8])
    assert verify_stream(sp, s, h, Compactions({7}, 7, False)) == []
    assert "gap: revision 7" in verify_stream(sp, s, h, Compactions({6}, 7, False))[0]
    # a watcher that started at the compaction point it read: its first revision
    late = spec(start=START_COMPACT, prev_kv=True)
    s = stream(tmp_path, h, late, [8], start=7)
    assert verify_stream(late, s, h, NONE) == []
    # a log that wrapped on its own: any revision up to the last compaction
    assert verify_stream(sp, stream(tmp_path, h, sp, [8]), h, Compactions(set(), 7, True)) == []


def test_a_stream_row_says_how_its_process_ended(tmp_path):
    h = history()
    sp = spec()
    s = stream(tmp_path, h, sp, h.revs)
    row = stream_report("watcher-fast-1", sp, s, h, NONE, reference_ok=True, killed=False,
                        exitcode=0)
    assert (row["status"], row["checked"], row["problems"]) == ("ok", True, [])
    # from now: the revision after the one its `created` response carried
    assert (row["first"], row["last"], row["events"]) == (2, 8, s.events)
    # a killed one is judged by what it recorded until it died
    killed = stream_report("w", sp, stream(tmp_path, h, sp, [2, 3], tail=None), h, NONE,
                           reference_ok=True, killed=True, exitcode=-9)
    assert killed["status"] == "killed" and killed["problems"] == []
    crashed = stream_report("w", sp, s, h, NONE, reference_ok=True, killed=False, exitcode=1)
    assert crashed["status"] == "FAILED" and "exit code 1" in crashed["problems"][0]
    silent = stream_report("w", sp, Stream(), h, NONE, reference_ok=True, killed=False,
                           exitcode=0)
    assert silent["problems"] == ["no watch response recorded"]
    # without a usable reference nothing is checked, and the row says so
    gap = stream(tmp_path, h, sp, [2, 4])
    unchecked = stream_report("w", sp, gap, h, NONE, reference_ok=False, killed=False,
                              exitcode=0)
    assert unchecked["checked"] is False and unchecked["problems"] == []
    cancelled = stream(tmp_path, h, spec(start=1), [2, 3, 4], tail=("cancel", 6))
    assert stream_report("w", spec(start=1), cancelled, h, Compactions({6}, 6, False),
                         reference_ok=True, killed=False, exitcode=0)["status"] == "compacted"


def test_a_replacement_resumes_after_the_last_revision_delivered(tmp_path):
    h = history()
    sp = spec(start=3)
    assert stream(tmp_path, h, sp, [3, 4, 5], tail=None).resume_from() == 6
    assert stream(tmp_path, h, sp, [], tail=None).resume_from() == 3  # nothing yet
    assert Stream.from_records([]).resume_from() == 0  # died before its watch: from now
    assert Stream.from_records([("resp", 0, 7, True, False, 0, "", ())]).resume_from() == 8


# =============================================================================== runs


def stress(tmp_path, *args: str, rc: int = 0) -> dict:
    out = tmp_path / "stress.json"
    p = subprocess.run([sys.executable, "tools/stress", "--quiet", "--json", str(out), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=150, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == rc, f"stress {args}: exit {p.returncode}\nstdout:\n" \
        f"{p.stdout[-4000:]}\nstderr:\n{p.stderr[-4000:]}"
    s = json.loads(out.read_text())
    assert f"seed {s['seed']}" in p.stdout
    s["stdout"] = p.stdout
    return s


def assert_passed(s: dict) -> None:
    assert s["passed"] is True and s["reasons"] == [] and s["violations"] == 0, s["reasons"]
    assert not s["reference_problem"]
    for st in s["streams"]:
        assert st["status"] in ("ok", "compacted", "killed") and not st["problems"], st
    assert s["writes_acknowledged"] > 0 and s["writes_found"] == s["writes_acknowledged"]
    assert s["streams_with_events"] >= s["min_streams"] == 8
    assert s["events_verified"] > 0
    assert "PASSED" in s["stdout"]


@pytest.mark.timeout(180)
def test_a_default_run_exercises_victims_and_a_compaction(tmp_path):
    s = stress(tmp_path, "--duration", "4")
    assert_passed(s)
    assert s["streams_total"] == 8 and s["kills"] == {"writer": 0, "watcher": 0}
    assert s["victims_entered"] > 0 and s["catchups"] > 0
    assert s["store_compactions"] > 0 and s["compactions"] > 0
    (probe,) = [st for st in s["streams"] if st["stream"].startswith("watcher-stall-long")]
    assert probe["status"] == "compacted" and probe["events"] > 0
    assert s["exercised"] == {"victims": {"done": True, "required": True},
                              "compaction": {"done": True, "required": True}}
    assert s["max_lag"] > 0 and s["lag_samples"] > 0  # the stalled watcher lagged
    assert "exercised: victims" in s["stdout"] and "exercised: compaction" in s["stdout"]


@pytest.mark.timeout(180)
def test_chaos_kills_and_replaces_writers_and_watchers(tmp_path):
    s = stress(tmp_path, "--duration", "4", "--chaos")
    assert_passed(s)
    assert s["kills"]["writer"] >= 1 and s["kills"]["watcher"] >= 1
    assert s["replacements"] == len(s["killed"]) >= 2
    assert s["streams_total"] == 8 + s["kills"]["watcher"]
    replacements = [st for st in s["streams"] if "(replacement of " in st["stream"]]
    assert len(replacements) == s["kills"]["watcher"]
    killed = [st for st in s["streams"] if st["status"] == "killed"]
    assert killed and all(st["stream"] in s["killed"] for st in killed)
    # a watcher resumes from its predecessor's last delivered revision + 1
    names = {st["stream"].split()[0]: st for st in s["streams"]}
    resumed = [st for st in replacements if st["stream"].startswith("watcher-resume-")]
    assert resumed
    for st in resumed:
        pred = names[st["stream"].split("(replacement of ")[1][:-1]]
        if pred["events"]:
            assert st["first"] == pred["last"] + 1, (st, pred)


@pytest.mark.timeout(120)
def test_a_run_with_nothing_to_verify_fails(tmp_path):
    s = stress(tmp_path, "--duration", "1.5", "--watchers", "0", "--seed", "7", rc=1)
    assert s["passed"] is False and s["seed"] == 7
    assert s["streams_total"] == 0 and s["events_verified"] == 0
    assert any("only 0 stream(s) verified with events; --min-streams is 4" in r
               for r in s["reasons"]), s["reasons"]
    assert "FAILED" in s["stdout"] and "PASSED" not in s["stdout"]


@pytest.mark.timeout(120)
def test_a_run_that_did_not_provoke_what_it_was_set_up_for_fails(tmp_path):
    """A long-stalling watcher but no compaction within the run: said, and FAILED."""
    s = stress(tmp_path, "--duration", "1.5", "--watchers", "4", "--writers", "1",
               "--compact-every", "100", rc=1)
    assert not s["exercised"]["compaction"]["done"] and \
        s["exercised"]["compaction"]["required"]
    assert any("compaction not exercised" in r for r in s["reasons"]), s["reasons"]
    assert "NOT EXERCISED" in s["stdout"]


# =============================================================================== lock scenario


def lock_events(*lives: tuple) -> list[tuple]:
    """History events from (key, create, delete or 0) lifetimes, in revision order."""
    evs = [("PUT", k, c, c) for k, c, _ in lives] + [("DELETE", k, 0, d) for k, _, d in lives if d]
    return sorted(evs, key=lambda e: e[3])


def test_the_lock_verifier_accepts_a_clean_hand_over():
    from shmwatch.tools.stress.lockcheck import Acquisition, verify_lock

    events = lock_events((b"L/a", 2, 4), (b"L/b", 3, 6))
    acqs = [Acquisition("x", 0, b"L/a", 2, 2, rel=4), Acquisition("y", 0, b"L/b", 3, 4, rel=6)]
    v = verify_lock(acqs, events, [], [])
    assert v.problems == [] and v.acquisitions == 2 and v.keys_checked == 2


@pytest.mark.parametrize("acqs, final, killed, expect", [
    # y says it acquired while a's key (older) was still alive: not the owner, overlap
    ([("x", b"L/a", 2, 2, 5), ("y", b"L/b", 3, 4, 6)], [], [], "the oldest key then was"),
    # a release at a revision other than the key's delete
    ([("x", b"L/a", 2, 2, 3)], [], [], "released at 3 but the key was deleted at 5"),
    # a killed process's key that stayed
    ([("x", b"L/a", 2, 2, 5)], [], [b"L/c"], "was never deleted"),
    ([("x", b"L/a", 2, 2, 5)], [b"L/c"], [], "keys left under the lock's prefix"),
    ([("x", b"L/z", 9, 9, 0)], [], [], "never created in the history"),
])
def test_the_lock_verifier_catches_each_violation(acqs, final, killed, expect):
    from shmwatch.tools.stress.lockcheck import Acquisition, verify_lock

    events = lock_events((b"L/a", 2, 5), (b"L/b", 3, 6), (b"L/c", 7, 0))
    recs = [Acquisition(w, 0, k, c, a, rel=r) for w, k, c, a, r in acqs]
    v = verify_lock(recs, events, final, killed)
    assert any(expect in p for p in v.problems), v.problems


def test_the_lock_verifier_finds_an_overlap_hidden_behind_a_short_interval():
    from shmwatch.tools.stress.lockcheck import verify_lock

    # three "holders" by their own account: a [2, 9), b [4, 5), c [6, 7); comparing
    # neighbours only would miss c (b's interval ended before it)
    from shmwatch.tools.stress.lockcheck import Acquisition

    events = lock_events((b"L/a", 2, 9), (b"L/b", 4, 5), (b"L/c", 6, 7))
    recs = [Acquisition("a", 0, b"L/a", 2, 2), Acquisition("b", 0, b"L/b", 4, 4),
            Acquisition("c", 0, b"L/c", 6, 6)]
    v = verify_lock(recs, events, [], [])
    overlaps = [p for p in v.problems if p.startswith("overlap")]
    assert len(overlaps) == 2, v.problems  # b and c both inside a's interval


@pytest.mark.timeout(180)
def test_the_lock_scenario_with_chaos_kills_holders_and_proves_exclusion(tmp_path):
    s = stress(tmp_path, "--scenario", "lock", "--duration", "5", "--chaos", "--lockers", "4")
    assert s["passed"] is True and s["problems"] == [], s["problems"]
    assert s["acquisitions"] >= s["min_acquisitions"] == 10
    assert s["kills"] >= 1 and s["killed_holding"] >= 1
    assert s["keys_checked"] >= s["acquisitions"]
    assert f"PASSED: {s['acquisitions']} acquisitions verified" in s["stdout"]


@pytest.mark.timeout(120)
def test_a_lock_run_with_too_few_acquisitions_fails(tmp_path):
    s = stress(tmp_path, "--scenario", "lock", "--duration", "1", "--lockers", "2",
               "--min-acquisitions", "1000000", "--seed", "3", rc=1)
    assert s["passed"] is False and s["seed"] == 3
    assert any("acquisitions verified (need 1000000)" in p for p in s["problems"])
    assert "FAILED" in s["stdout"] and "PASSED" not in s["stdout"]


# =============================================================================== registry


@pytest.mark.timeout(120)
def test_registry_scenario_proves_killed_workers_keys_vanish(tmp_path):
    """Workers registered with bound leases, SIGKILLed in turn: each killed one's key is
    deleted (seen by the watch, prev_kv naming its lease) within the bound; live ones'
    keys stay, then go when they close; and a run that killed nobody FAILS."""
    out = tmp_path / "registry.json"
    p = subprocess.run([sys.executable, "tools/stress", "--scenario", "registry", "--quiet",
                        "--duration", "2.5", "--registry-workers", "4", "--json", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stdout + p.stderr
    s = json.loads(out.read_text())
    assert s["passed"] and s["problems"] == []
    assert s["kills"] >= 2 and s["kills_verified"] == s["kills"]
    assert s["registrations"] == 4 + s["kills"] == s["registrations_verified"]
    assert s["live"] == 4 and s["live_verified"] == s["closed_verified"] == 4
    assert 0 < s["release_lag_ms"]["max"] <= 1000
    assert f"PASSED: {s['kills']} killed workers' keys deleted" in p.stdout
    p = subprocess.run([sys.executable, "tools/stress", "--scenario", "registry", "--quiet",
                        "--duration", "0.2", "--registry-workers", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=100, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 1 and "no worker was killed" in p.stdout and "FAILED" in p.stdout
