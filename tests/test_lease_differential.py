"""etcd differential tests of the Lease API: the same scenario on a real etcd 3.4 and on
shmwatch, as in `tests/test_etcd_differential.py` (whose transcript builder, checker and
comparison these tests reuse).

Two tests per scenario: `test_etcd_expectations[x]` checks hand-verified values on a
fresh etcd (docs/ETCD-NOTES.md "Leases" records them), `test_differential[x]` runs the
scenario on a fresh shmwatch broker and compares the transcripts field by field.

etcd runs with its default election timing (`etcd_lease_server`): its minimum lease TTL is
then 2 s, the broker's default `min_lease_ttl`.

What the transcripts normalise, and why:
- Fresh lease ids (a grant with lease_id=0) differ between the systems: every field that
  holds a lease id (grant, keep-alive and time-to-live `id`, `leases`, `KeyValue.lease`)
  shows a fresh id as `fresh#n`, numbered by order of grant. Explicit ids stay as they are.
- `leases()` is recorded in the order it came: etcd's, by expiry time, soonest first
  (which the broker keeps too: it does not depend on the fresh ids' values).
- A time-to-live's remaining `ttl` of a live lease depends on time: it is recorded as the
  range "lo..hi" when it lies in the range the scenario states, else as the number.
  etcd truncates the remaining seconds, so right after a grant or keep-alive of TTL G it
  reads G-1; the stated ranges allow 2 s more for a loaded machine (`live_ttl`).
- Expiry needs real time: etcd finds expired leases in a loop every 500 ms and revokes
  them through raft. Scenarios wait for an expiry with a deadline (TTL + `EXPIRY_SLACK`)
  and poll, never sleep a fixed time and then assert; what they record does not depend on
  when inside that window the expiry happened.
"""

from __future__ import annotations

import time

import pytest

from shmwatch.wire import errors as E
from shmwatch.wire.ops import compare_lease, op_get, op_put, op_txn
from shmwatch.wire.types import KeyValue
from tests.etcd_support import (
    SKIP_REASON,
    EtcdTranscripts,
    etcd_binary,
    etcd_lease_server,  # noqa: F401  (fixture)
)
from tests.test_etcd_differential import T, assert_same_transcript, check_expectations

MIN_TTL = 2  # etcd's minimum TTL with its default election timeout; the broker's default
MAX_TTL = 9_000_000_000  # etcd's MaxLeaseTTL
EXPIRY_SLACK = 2.0  # seconds an expired lease may take to be revoked (etcd: <= ~0.5 s seen)
KEEP_ALIVE_EVERY = 0.5  # seconds between keep-alives of a TTL-2 lease (clientv3: TTL/3)

_ID_RESPONSES = ("LeaseGrantResponse", "LeaseKeepAliveResponse", "LeaseTimeToLiveResponse")
_KV_FIELDS = set(KeyValue._fields)


def live_ttl(granted: int) -> tuple[int, int]:
    """The range a time-to-live of a lease granted (or kept alive) with `granted` seconds
    may read shortly after: etcd truncates, so never `granted`; 2 s of slack below."""
    return max(granted - 3, 0), granted - 1


class LT(T):
    """The transcript builder of test_etcd_differential with lease ids normalised."""

    def __init__(self, c):
        super().__init__(c)
        self.fresh: dict[int, str] = {}  # fresh lease id -> "fresh#n"

    def rec(self, label: str, value) -> None:
        super().rec(label, value)
        self.out[-1] = (label, self._ids(self.out[-1][1]))

    def _id(self, lease_id):
        return self.fresh.get(lease_id, lease_id) if isinstance(lease_id, int) else lease_id

    def _ids(self, x):
        if isinstance(x, list):
            return [self._ids(v) for v in x]
        if not isinstance(x, dict):
            return x
        out = {k: self._ids(v) for k, v in x.items()}
        if out.get("_type") in _ID_RESPONSES:
            out["id"] = self._id(out["id"])
        elif out.get("_type") == "LeaseLeasesResponse":
            out["leases"] = [self._id(i) for i in x["leases"]]
        elif set(out) == _KV_FIELDS:
            out["lease"] = self._id(out["lease"])
        return out

    def grant(self, label: str, ttl: int, lease_id: int = 0) -> int:
        """Grant; record the response (a fresh id gets its name first). Returns the id
        (0 if the grant failed)."""
        try:
            resp = self.c.lease_grant(ttl, lease_id)
        except E.ShmwatchError as exc:
            self.rec(label, exc)
            return 0
        if lease_id == 0:
            self.fresh.setdefault(resp.id, f"fresh#{len(self.fresh) + 1}")
        self.rec(label, resp)
        return resp.id

    def ttl(self, label: str, lease_id: int, keys: bool = False,
            within: tuple[int, int] | None = None) -> None:
        """Record a time-to-live; its ttl as "lo..hi" if it lies within the range given."""
        resp = self.do(label, self.c.lease_time_to_live, lease_id, keys=keys)
        if resp is not None and within is not None and within[0] <= resp.ttl <= within[1]:
            self.out[-1][1]["ttl"] = f"{within[0]}..{within[1]}"

    def gone(self, label: str, lease_id: int, deadline: float) -> None:
        """Poll time-to-live until the lease is gone (ttl -1) or the deadline passes;
        record whether it went."""
        while True:
            if self.c.lease_time_to_live(lease_id).ttl == -1:
                self.rec(label, "gone")
                return
            if time.monotonic() >= deadline:
                self.rec(label, "still there at the deadline")
                return
            time.sleep(0.05)


def keep_alive_until(c, lease_id: int, until: float, watch=None) -> tuple[set, object, float]:
    """Keep `lease_id` alive every KEEP_ALIVE_EVERY s until the monotonic time `until`, or
    (with `watch`) until the watch delivers a response. Returns the set of TTLs the
    keep-alives answered, the watch response (None if none came) and when the last
    keep-alive was sent (the lease cannot expire before that + its TTL)."""
    answers: set = set()
    last = next_at = time.monotonic()
    while True:
        now = time.monotonic()
        if now >= next_at:
            last = now
            answers.add(c.lease_keep_alive_once(lease_id).ttl)
            next_at = now + KEEP_ALIVE_EVERY
        if now >= until:
            return answers, None, last
        wait = max(min(next_at, until) - time.monotonic(), 0.01)
        if watch is None:
            time.sleep(wait)
            continue
        try:
            return answers, watch.get(timeout=wait), last
        except E.Timeout:
            pass


# --------------------------------------------------------------------------- scenarios

SCENARIOS: dict = {}
EXPECT: dict = {}


def scenario(expect: dict):
    """Register a scenario with its hand-verified etcd expectations {label: {path: value}}."""

    def deco(fn):
        name = fn.__name__.removeprefix("scenario_")
        SCENARIOS[name] = fn
        EXPECT[name] = expect
        return fn

    return deco


NOT_FOUND = {"error": "LeaseNotFoundError", "message": "etcdserver: requested lease not found"}
EXISTS = {"error": "LeaseExistsError", "message": "etcdserver: lease already exists"}
PROVIDED = {"error": "LeaseProvidedError", "message": "etcdserver: lease is provided"}
TOO_LARGE = {"error": "LeaseTTLTooLargeError", "message": "etcdserver: too large lease TTL"}
KEY_NOT_FOUND = {"error": "KeyNotFoundError", "message": "etcdserver: key not found"}


@scenario({
    "grant 1": {"_type": "LeaseGrantResponse", "revision": 1, "id": 1, "ttl": 10},
    "grant 3": {"id": 3},
    "fresh 1": {"revision": 1, "id": "fresh#1", "ttl": 10},
    "fresh 2": {"id": "fresh#2", "ttl": 10},
    "fresh ids": {"positive": True, "distinct": True},
    "grant -5": {"revision": 1, "id": -5, "ttl": 10},
    "grant 2 again": EXISTS,
    "grant fresh 1 by id": EXISTS,
    "leases": {"revision": 1, "leases": [1, 2, 3, "fresh#1", "fresh#2", -5]},  # by expiry
    "keep-alive fresh 1": {"id": "fresh#1", "ttl": 10},
    "put k lease -5": {"revision": 2},
    "get k": {"kvs.0.lease": -5},
    "put j fresh 2": {"revision": 3},
    "get j": {"kvs.0.lease": "fresh#2"},
    "ttl fresh 2": {"id": "fresh#2", "ttl": "7..9", "granted_ttl": 10, "keys": [b"j"]},
})
def scenario_grant_ids(c):
    """Explicit ids (negative ones too) are taken as given; a fresh id is positive and
    differs from every id in use, explicit ones included."""
    t = LT(c)
    for i in (1, 2, 3):
        t.grant(f"grant {i}", 10, i)
    f1 = t.grant("fresh 1", 10)
    f2 = t.grant("fresh 2", 10)
    t.rec("fresh ids", {"positive": f1 > 0 and f2 > 0,
                        "distinct": len({1, 2, 3, -5, f1, f2}) == 6})
    t.grant("grant -5", 10, -5)
    t.grant("grant 2 again", 10, 2)
    t.grant("grant fresh 1 by id", 10, f1)
    t.do("leases", c.leases)
    t.do("keep-alive fresh 1", c.lease_keep_alive_once, f1)
    t.do("put k lease -5", c.put, "k", "v", lease=-5)
    t.do("get k", c.get, "k")
    t.do("put j fresh 2", c.put, "j", "v", lease=f2)
    t.do("get j", c.get, "j")
    t.ttl("ttl fresh 2", f2, keys=True, within=live_ttl(10))
    return t.out


@scenario({
    "ttl 1": {"revision": 1, "id": 1001, "ttl": MIN_TTL},
    "ttl 0": {"id": 1002, "ttl": MIN_TTL},
    "ttl -7": {"id": 1003, "ttl": MIN_TTL},
    "ttl 2": {"id": 1004, "ttl": 2},
    "ttl 3": {"id": 1005, "ttl": 3},
    "ttl max": {"id": 1010, "ttl": MAX_TTL},
    "ttl max+1": TOO_LARGE,
    "ttl max+1, fresh id": TOO_LARGE,
    "ttl max+1, existing id": TOO_LARGE,
    "ttl 0, existing id": EXISTS,
    "ttl 1, existing id": EXISTS,
    "time-to-live 1001": {"revision": 1, "id": 1001, "ttl": "0..1", "granted_ttl": MIN_TTL,
                          "keys": []},
    "time-to-live max": {"ttl": f"{MAX_TTL - 3}..{MAX_TTL - 1}", "granted_ttl": MAX_TTL},
    "keep-alive max": {"revision": 1, "id": 1010, "ttl": MAX_TTL},
    "keep-alive 1002": {"id": 1002, "ttl": MIN_TTL},
    # by expiry: 1002 was kept alive after 1003 and 1004 were granted
    "leases": {"leases": [1001, 1003, 1004, 1002, 1005, 1010]},
})
def scenario_grant_ttl(c):
    """A TTL under the minimum (0 and negative ones too) is granted as the minimum; over
    MaxLeaseTTL is refused, and that check comes before 'lease already exists'."""
    t = LT(c)
    for lease_id, ttl in ((1001, 1), (1002, 0), (1003, -7), (1004, 2), (1005, 3)):
        t.grant(f"ttl {ttl}", ttl, lease_id)
    t.grant("ttl max", MAX_TTL, 1010)
    t.grant("ttl max+1", MAX_TTL + 1, 1011)
    t.grant("ttl max+1, fresh id", MAX_TTL + 1)
    t.grant("ttl max+1, existing id", MAX_TTL + 1, 1001)
    t.grant("ttl 0, existing id", 0, 1001)
    t.grant("ttl 1, existing id", 1, 1001)
    t.ttl("time-to-live 1001", 1001, keys=True, within=live_ttl(MIN_TTL))
    t.ttl("time-to-live max", 1010, within=live_ttl(MAX_TTL))
    t.do("keep-alive max", c.lease_keep_alive_once, 1010)
    t.do("keep-alive 1002", c.lease_keep_alive_once, 1002)
    t.do("leases", c.leases)
    return t.out


@scenario({
    "put a": {"revision": 2},
    "grant": {"revision": 2, "id": "fresh#1", "ttl": 30},
    "keep-alive": {"_type": "LeaseKeepAliveResponse", "revision": 2, "id": "fresh#1", "ttl": 30},
    "time-to-live": {"_type": "LeaseTimeToLiveResponse", "revision": 2, "id": "fresh#1",
                     "ttl": "27..29", "granted_ttl": 30, "keys": []},
    "leases": {"revision": 2, "leases": [1001, "fresh#1"]},
    "revoke 1001 without keys": {"_type": "LeaseRevokeResponse", "revision": 2},
    "put b with lease": {"revision": 3},
    "put c with lease": {"revision": 4},
    "keep-alive after puts": {"revision": 4, "ttl": 30},
    "time-to-live keys=False": {"revision": 4, "ttl": "27..29", "granted_ttl": 30, "keys": []},
    "time-to-live keys=True": {"revision": 4, "keys": [b"b", b"c"]},
    "keep-alive missing": {"revision": 4, "id": 77, "ttl": 0},
    "keep-alive id 0": {"revision": 4, "id": 0, "ttl": 0},
    "time-to-live missing": {"revision": 4, "id": 77, "ttl": -1, "granted_ttl": 0, "keys": []},
    "time-to-live id 0": {"id": 0, "ttl": -1, "granted_ttl": 0},
    "revoke missing": NOT_FOUND,
    "revoke id 0": NOT_FOUND,
    "leases at the end": {"revision": 4, "leases": ["fresh#1"]},
})
def scenario_keep_alive_and_time_to_live(c):
    """Grants, keep-alives, time-to-lives, listings and a revoke of a lease without keys
    leave the revision alone (headers = current revision); a missing lease is not an
    error for keep-alive (ttl 0) nor time-to-live (ttl -1)."""
    t = LT(c)
    t.do("put a", c.put, "a", "1")  # 2
    g = t.grant("grant", 30)
    t.grant("grant 1001", 30, 1001)
    t.do("keep-alive", c.lease_keep_alive_once, g)
    t.ttl("time-to-live", g, keys=True, within=live_ttl(30))
    t.do("leases", c.leases)
    t.do("revoke 1001 without keys", c.lease_revoke, 1001)
    t.do("put b with lease", c.put, "b", "1", lease=g)  # 3
    t.do("put c with lease", c.put, "c", "1", lease=g)  # 4
    t.do("keep-alive after puts", c.lease_keep_alive_once, g)
    t.ttl("time-to-live keys=False", g, within=live_ttl(30))
    t.ttl("time-to-live keys=True", g, keys=True, within=live_ttl(30))
    t.do("keep-alive missing", c.lease_keep_alive_once, 77)
    t.do("keep-alive id 0", c.lease_keep_alive_once, 0)
    t.ttl("time-to-live missing", 77, keys=True)
    t.ttl("time-to-live id 0", 0)
    t.do("revoke missing", c.lease_revoke, 77)
    t.do("revoke id 0", c.lease_revoke, 0)
    t.do("get", c.get, "a", range_end="z")
    t.do("leases at the end", c.leases)
    return t.out


_REVOKED_KEYS = [b"ka", b"ka\x00", b"kb", b"kc", b"k\xff"]  # byte order


def _deletes(keys, revision, lease):
    """Expectations for one response of DELETE events of `keys` at `revision`, whose
    prev_kv carry `lease` (None: no prev_kv)."""
    out = {"revision": revision, "events#": len(keys)}
    for i, k in enumerate(keys):
        out[f"events.{i}.type"] = "DELETE"
        out[f"events.{i}.kv"] = {"key": k, "value": b"", "create_revision": 0,
                                 "mod_revision": revision, "version": 0, "lease": 0}
        if lease is None:
            out[f"events.{i}.prev_kv"] = None
        else:
            out[f"events.{i}.prev_kv.key"] = k
            out[f"events.{i}.prev_kv.lease"] = lease
    return out


@scenario({
    "w.puts[0]": {"revision": 2, "events.0.kv.key": b"kc", "events.0.kv.lease": 1001},
    "w.puts[8]": {"revision": 10, "events.0.kv.key": b"ke", "events.0.kv.lease": 1003,
                  "events.0.prev_kv.lease": 1001},
    "time-to-live 1001": {"revision": 10, "ttl": "57..59", "granted_ttl": 60,
                          "keys": _REVOKED_KEYS},
    "time-to-live 1003": {"keys": [b"ke"]},
    "revoke 1001": {"_type": "LeaseRevokeResponse", "revision": 11},
    "w.revoke": {"watch_id": 0, **_deletes(_REVOKED_KEYS, 11, 1001),
                 "events.0.prev_kv": {"key": b"ka", "value": b"v", "create_revision": 3,
                                      "mod_revision": 3, "version": 1, "lease": 1001}},
    "plain.revoke": {"watch_id": 1, **_deletes(_REVOKED_KEYS, 11, None)},
    "get k*": {"revision": 11, "count": 1, "kvs.0.key": b"ke", "kvs.0.lease": 1003},
    "revoke again": NOT_FOUND,
    "revoke 1002 without keys": {"revision": 11},
    "time-to-live revoked": {"id": 1001, "ttl": -1, "granted_ttl": 0, "keys": []},
    "keep-alive revoked": {"id": 1001, "ttl": 0},
    "put with revoked lease": NOT_FOUND,
    "grant 1001 again": {"id": 1001, "ttl": 60},
    "leases": {"leases": [1003, 1001]},  # by expiry: 1001 was granted again after 1003
    "catchup.created": {"revision": 11, "created": True},
    "catchup": {"revision": 11, **_deletes(_REVOKED_KEYS, 11, 1001)},
    "revoke 1003": {"revision": 12},
    "w.revoke 1003": _deletes([b"ke"], 12, 1003),
    "catchup.live": _deletes([b"ke"], 12, 1003),
    "quiet.0": "quiet",
    "quiet.1": "quiet",
    "quiet.2": "quiet",
})
def scenario_revoke(c):
    """A revoke deletes every attached key at ONE revision: one watch response, DELETE
    events in byte order of the keys (not attach order), prev_kv carrying the lease.
    A key deleted or moved to another lease before is not touched."""
    t = LT(c)
    t.grant("grant 1001", 60, 1001)
    t.grant("grant 1002", 60, 1002)  # never gets a key
    t.grant("grant 1003", 60, 1003)
    w = t.watch("w.created", "k", prefix=True, prev_kv=True)
    plain = t.watch("plain.created", "k", prefix=True)
    for k in (b"kc", b"ka", b"kb", b"k\xff", b"ka\x00"):  # 2..6, attached out of order
        t.do(f"put {k!r}", c.put, k, "v", lease=1001)
    t.do("put kd", c.put, "kd", "v", lease=1001)  # 7
    t.do("del kd", c.delete, "kd")  # 8: a delete detaches
    t.do("put ke", c.put, "ke", "v", lease=1001)  # 9
    t.do("put ke lease 1003", c.put, "ke", "v", lease=1003)  # 10: moves to 1003
    t.get("w.puts", w, 9)
    t.get("plain.puts", plain, 9)
    t.ttl("time-to-live 1001", 1001, keys=True, within=live_ttl(60))
    t.ttl("time-to-live 1003", 1003, keys=True, within=live_ttl(60))
    t.do("revoke 1001", c.lease_revoke, 1001)  # 11
    t.get("w.revoke", w)
    t.get("plain.revoke", plain)
    t.do("get k*", c.get, "k", prefix=True)
    t.do("revoke again", c.lease_revoke, 1001)
    t.do("revoke 1002 without keys", c.lease_revoke, 1002)
    t.ttl("time-to-live revoked", 1001, keys=True)
    t.do("keep-alive revoked", c.lease_keep_alive_once, 1001)
    t.do("put with revoked lease", c.put, "kz", "v", lease=1001)
    t.grant("grant 1001 again", 60, 1001)  # a revoked id may be granted again
    t.do("leases", c.leases)
    h = t.watch("catchup.created", "k", prefix=True, start_revision=11, prev_kv=True)
    t.get("catchup", h)
    t.do("revoke 1003", c.lease_revoke, 1003)  # 12
    t.get("w.revoke 1003", w)
    t.get("plain.revoke 1003", plain)
    t.get("catchup.live", h)
    t.quiet("quiet", w, plain, h)
    return t.out


@scenario({
    "put missing lease": NOT_FOUND,
    "ignore_value on a missing key, missing lease": NOT_FOUND,
    "ignore_lease on a missing key": KEY_NOT_FOUND,
    "ignore_lease with a lease": PROVIDED,
    "ignore_lease with a missing lease": PROVIDED,
    "empty key, ignore_lease with a lease": {"error": "EmptyKeyError"},
    "value provided, ignore_lease with a lease": {"error": "ValueProvidedError"},
    "put a 1001": {"revision": 2},
    "w.a 1001": {"revision": 2, "events.0.kv.lease": 1001, "events.0.prev_kv": None},
    "put a ignore_lease": {"revision": 3, "prev_kv.lease": 1001, "prev_kv.value": b"1"},
    "w.a ignore_lease": {"events.0.kv": {"key": b"a", "value": b"2", "create_revision": 2,
                                         "mod_revision": 3, "version": 2, "lease": 1001}},
    "put a ignore_lease ignore_value": {"revision": 4},
    "get a kept": {"kvs.0.value": b"2", "kvs.0.version": 3, "kvs.0.lease": 1001},
    "put a 1002": {"revision": 5, "prev_kv.lease": 1001},
    "w.a 1002": {"events.0.kv.lease": 1002, "events.0.prev_kv.lease": 1001},
    "time-to-live 1001 after the move": {"ttl": "57..59", "granted_ttl": 60, "keys": []},
    "time-to-live 1002 after the move": {"keys": [b"a"]},
    "put a without lease": {"revision": 6, "prev_kv.lease": 1002},
    "w.a detached": {"events.0.kv.lease": 0, "events.0.prev_kv.lease": 1002},
    "time-to-live 1002 after detach": {"keys": []},
    "put b ignore_lease, no lease": {"revision": 8},
    "get b": {"kvs.0.lease": 0, "kvs.0.version": 2},
    "del c": {"revision": 10, "deleted": 1, "prev_kvs.0.lease": 1001},
    "w.c deleted": {"revision": 10, "events.0.type": "DELETE", "events.0.kv.lease": 0,
                    "events.0.prev_kv.lease": 1001},
    "time-to-live 1001 after delete": {"keys": []},
    "revision after errors": {"revision": 10},
})
def scenario_put_with_lease(c):
    """put's lease and ignore_lease, and the order of its checks."""
    t = LT(c)
    t.grant("grant 1001", 60, 1001)
    t.grant("grant 1002", 60, 1002)
    w = t.watch("w.created", b"\0", range_end=b"\0", prev_kv=True)
    t.do("put missing lease", c.put, "a", "1", lease=77)
    # a standalone put checks the lease before the key (a txn does it the other way)
    t.do("ignore_value on a missing key, missing lease", c.put, "zz", "", ignore_value=True,
         lease=77)
    t.do("ignore_lease on a missing key", c.put, "zz", "1", ignore_lease=True)
    t.do("ignore_lease with a lease", c.put, "zz", "1", ignore_lease=True, lease=1001)
    t.do("ignore_lease with a missing lease", c.put, "zz", "1", ignore_lease=True, lease=77)
    t.do("empty key, ignore_lease with a lease", c.put, "", "1", ignore_lease=True,
         lease=1001)
    t.do("value provided, ignore_lease with a lease", c.put, "zz", "1", ignore_value=True,
         ignore_lease=True, lease=1001)
    t.do("put a 1001", c.put, "a", "1", lease=1001)  # 2
    t.get("w.a 1001", w)
    t.do("put a ignore_lease", c.put, "a", "2", prev_kv=True, ignore_lease=True)  # 3
    t.get("w.a ignore_lease", w)
    t.do("put a ignore_lease ignore_value", c.put, "a", "", ignore_value=True,
         ignore_lease=True)  # 4
    t.get("w.a ignore both", w)
    t.do("get a kept", c.get, "a")
    t.do("put a 1002", c.put, "a", "3", prev_kv=True, lease=1002)  # 5
    t.get("w.a 1002", w)
    t.ttl("time-to-live 1001 after the move", 1001, keys=True, within=live_ttl(60))
    t.ttl("time-to-live 1002 after the move", 1002, keys=True, within=live_ttl(60))
    t.do("put a without lease", c.put, "a", "4", prev_kv=True)  # 6
    t.get("w.a detached", w)
    t.ttl("time-to-live 1002 after detach", 1002, keys=True, within=live_ttl(60))
    t.do("put b", c.put, "b", "1")  # 7
    t.do("put b ignore_lease, no lease", c.put, "b", "2", ignore_lease=True)  # 8
    t.get("w.b", w, 2)
    t.do("get b", c.get, "b")
    t.do("put c 1001", c.put, "c", "1", lease=1001)  # 9
    t.get("w.c", w)
    t.do("del c", c.delete, "c", prev_kv=True)  # 10
    t.get("w.c deleted", w)
    t.ttl("time-to-live 1001 after delete", 1001, keys=True, within=live_ttl(60))
    t.do("revision after errors", c.get, "a", range_end="z", count_only=True)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "missing lease": NOT_FOUND,
    "ignore_value on a missing key, missing lease": KEY_NOT_FOUND,
    "ignore_lease on a missing key": KEY_NOT_FOUND,
    "missing lease, then ignore_value on a missing key": NOT_FOUND,
    "ignore_value on a missing key, then missing lease": KEY_NOT_FOUND,
    "ignore_lease with a lease": PROVIDED,
    "ignore_lease with a lease, in the branch not taken": PROVIDED,
    "missing lease first, lease provided second": PROVIDED,
    "missing lease in the branch not taken": {"revision": 2, "succeeded": True},
    "missing lease in a nested txn": NOT_FOUND,
    "missing lease in a nested branch not taken": {"revision": 3, "succeeded": True},
    "puts with leases": {"revision": 4, "succeeded": True, "responses.0.revision": 4,
                         "responses.3.kvs.0.lease": 1001},
    "w.puts": {"revision": 4, "events#": 3, "events.0.kv.lease": 1001,
               "events.1.kv.lease": 1002, "events.2.kv.lease": 0},
    "compare lease = 1001": {"revision": 5, "succeeded": True},
    "w.ignore_lease in txn": {"events.0.kv.lease": 1001, "events.0.kv.value": b"2"},
    "compare lease != 1001": {"revision": 5, "succeeded": False,
                              "responses.0.kvs.0.lease": 1001},
    "compare lease > 1000": {"succeeded": True},
    "compare lease < 1000": {"succeeded": False},
    "compare lease of a missing key = 0": {"succeeded": True},
    "compare lease of a key without lease = 0": {"succeeded": True},
    "compare lease range = 1001": {"succeeded": False},
    "time-to-live 1001": {"ttl": "57..59", "granted_ttl": 60, "keys": [b"x"]},
    "time-to-live 1002": {"keys": [b"y"]},
    "revision": {"revision": 5},
})
def scenario_txn_with_lease(c):
    """op_put's lease and ignore_lease in a txn: a txn checks the key before the lease,
    op by op, in the branch the compares chose only; 'lease is provided' is checked
    first, over both branches. compare_lease compares the key's lease id."""
    t = LT(c)
    t.grant("grant 1001", 60, 1001)
    t.grant("grant 1002", 60, 1002)
    w = t.watch("w.created", b"\0", range_end=b"\0")
    t.do("missing lease", c.txn, [], [op_put("t", "1", lease=77)], [])
    t.do("ignore_value on a missing key, missing lease", c.txn, [],
         [op_put("zz", ignore_value=True, lease=77)], [])
    t.do("ignore_lease on a missing key", c.txn, [], [op_put("zz", "1", ignore_lease=True)], [])
    t.do("missing lease, then ignore_value on a missing key", c.txn, [],
         [op_put("t", "1", lease=77), op_put("zz", ignore_value=True)], [])
    t.do("ignore_value on a missing key, then missing lease", c.txn, [],
         [op_put("zz", ignore_value=True), op_put("t", "1", lease=77)], [])
    t.do("ignore_lease with a lease", c.txn, [],
         [op_put("zz", "1", ignore_lease=True, lease=1001)], [])
    t.do("ignore_lease with a lease, in the branch not taken", c.txn, [],
         [op_put("t", "1")], [op_put("zz", "1", ignore_lease=True, lease=1001)])
    t.do("missing lease first, lease provided second", c.txn, [],
         [op_put("t", "1", lease=77), op_put("zz", "1", ignore_lease=True, lease=5)], [])
    t.do("missing lease in the branch not taken", c.txn, [],
         [op_put("t", "1")], [op_put("u", "1", lease=77)])  # 2
    t.get("w.t", w)
    t.do("missing lease in a nested txn", c.txn, [],
         [op_txn([], [op_put("n", "1", lease=77)], [])], [])
    t.do("missing lease in a nested branch not taken", c.txn, [],
         [op_txn([], [op_put("n", "1")], [op_put("n", "1", lease=77)])], [])  # 3
    t.get("w.n", w)
    t.do("puts with leases", c.txn, [],
         [op_put("x", "1", lease=1001), op_put("y", "1", lease=1002), op_put("z", "1"),
          op_get("x")], [])  # 4
    t.get("w.puts", w)
    t.do("compare lease = 1001", c.txn, [compare_lease("x", "=", 1001)],
         [op_put("x", "2", ignore_lease=True)], [])  # 5
    t.get("w.ignore_lease in txn", w)
    t.do("compare lease != 1001", c.txn, [compare_lease("x", "!=", 1001)],
         [op_put("x", "3")], [op_get("x")])
    t.do("compare lease > 1000", c.txn, [compare_lease("x", ">", 1000)], [], [])
    t.do("compare lease < 1000", c.txn, [compare_lease("x", "<", 1000)], [], [])
    t.do("compare lease of a missing key = 0", c.txn, [compare_lease("nokey", "=", 0)], [], [])
    t.do("compare lease of a key without lease = 0", c.txn, [compare_lease("z", "=", 0)],
         [], [])
    t.do("compare lease range = 1001", c.txn,
         [compare_lease("x", "=", 1001, range_end="zz")], [], [])
    t.ttl("time-to-live 1001", 1001, keys=True, within=live_ttl(60))
    t.ttl("time-to-live 1002", 1002, keys=True, within=live_ttl(60))
    t.do("revision", c.get, "x")
    t.quiet("quiet", w)
    return t.out


@scenario({
    "grant a": {"id": 1001, "ttl": 2},
    "grant b ttl 1": {"id": "fresh#1", "ttl": MIN_TTL},
    "grant k": {"id": 1003, "ttl": 2},
    "w.puts[2]": {"revision": 4, "events#": 2},
    "b alive before the minimum TTL": True,
    "w.a expired": {"watch_id": 0, **_deletes([b"x/k1", b"x/k2", b"x/k3"], 5, 1001)},
    "a not before its TTL": True,
    "b gone": "gone",
    "time-to-live a": {"id": 1001, "ttl": -1, "granted_ttl": 0, "keys": []},
    "keep-alive a": {"id": 1001, "ttl": 0},
    "put with a": NOT_FOUND,
    "revoke a": NOT_FOUND,
    "leases after a": {"revision": 5, "leases": [1003]},
    "get after a": {"revision": 5, "count": 1, "kvs.0.key": b"x/kept", "kvs.0.lease": 1003},
    "keep-alives of k": [2],
    "time-to-live k past its first TTL": {"id": 1003, "ttl": "0..1", "granted_ttl": 2,
                                          "keys": [b"x/kept"]},
    "w.k expired": _deletes([b"x/kept"], 6, 1003),
    "k not before its TTL": True,
    "k gone": "gone",
    "keep-alive k": {"id": 1003, "ttl": 0},
    "grant a again": {"id": 1001, "ttl": 10},
    "leases at the end": {"revision": 6, "leases": [1001]},
    "catchup": {"revision": 6, "events#": 4, "events.2.kv.key": b"x/k3",
                "events.3.kv.key": b"x/kept", "events.3.kv.mod_revision": 6},
    "quiet.0": "quiet",
})
def scenario_expiry_and_keep_alive(c):
    """Expiry deletes the keys as a revoke does (one revision, one watch response, key
    order, prev_kv with the lease); a keep-alive makes a lease outlive its first TTL; a
    TTL under the minimum lives the minimum; an expired lease is gone for every call."""
    t = LT(c)
    w = t.watch("w.created", "x/", prefix=True, prev_kv=True)
    t0 = time.monotonic()  # before the grants: no lease may expire before t0 + TTL
    t.grant("grant a", 2, 1001)
    b = t.grant("grant b ttl 1", 1)  # granted the minimum; no keys
    t.grant("grant k", 2, 1003)
    t.do("put x/k3", c.put, "x/k3", "v", lease=1001)  # 2
    t.do("put x/k1", c.put, "x/k1", "v", lease=1001)  # 3
    t.do("txn x/k2, x/kept", c.txn, [],
         [op_put("x/k2", "v", lease=1001), op_put("x/kept", "v", lease=1003)], [])  # 4
    t.get("w.puts", w, 3)
    # b was asked for 1 s: past 1.1 s it must still exist (unless this check came late)
    answers, _, _ = keep_alive_until(c, 1003, t0 + 1.1)
    alive = c.lease_time_to_live(b).ttl >= 0
    t.rec("b alive before the minimum TTL", alive or time.monotonic() - t0 >= MIN_TTL - 0.1)
    # keep k alive while waiting for a's expiry
    more, resp, _ = keep_alive_until(c, 1003, t0 + 2 + EXPIRY_SLACK, watch=w)
    answers |= more
    t.rec("w.a expired", resp if resp is not None else {"error": "Timeout"})
    t.rec("a not before its TTL", time.monotonic() - t0 >= 2)
    t.gone("b gone", b, t0 + MIN_TTL + EXPIRY_SLACK)
    t.ttl("time-to-live a", 1001, keys=True)
    t.do("keep-alive a", c.lease_keep_alive_once, 1001)
    t.do("put with a", c.put, "x/new", "v", lease=1001)
    t.do("revoke a", c.lease_revoke, 1001)
    t.do("leases after a", c.leases)
    t.do("get after a", c.get, "x/", prefix=True)
    # k outlives its first TTL (and etcd's expiry lag) by its keep-alives
    more, _, t1 = keep_alive_until(c, 1003, t0 + 3.5)
    answers |= more
    t.rec("keep-alives of k", sorted(answers))
    t.ttl("time-to-live k past its first TTL", 1003, keys=True, within=live_ttl(2))
    try:
        resp = w.get(timeout=2 + EXPIRY_SLACK)
    except E.Timeout:
        resp = {"error": "Timeout"}
    t.rec("w.k expired", resp)
    t.rec("k not before its TTL", time.monotonic() - t1 >= 2)
    t.gone("k gone", 1003, t1 + 2 + EXPIRY_SLACK)
    t.do("keep-alive k", c.lease_keep_alive_once, 1003)
    t.grant("grant a again", 10, 1001)  # an expired id may be granted again
    t.do("leases at the end", c.leases)
    h = t.watch("catchup.created", "x/", prefix=True, start_revision=5)
    t.get("catchup", h)
    t.do("revoke a again", c.lease_revoke, 1001)  # no keys: no revision, no event
    t.quiet("quiet", w, h)
    return t.out


# --------------------------------------------------------------------------- tests

ETCD = EtcdTranscripts(SCENARIOS, "etcd_lease_server")


NAMES = list(SCENARIOS)


@pytest.mark.parametrize("name", NAMES)
def test_etcd_expectations(name, request):
    transcript = ETCD.get(name, request)
    problems = check_expectations(transcript, EXPECT[name])
    assert not problems, "etcd did not behave as the notes say:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", NAMES)
def test_differential(name, request):
    if not ETCD.taken(name) and etcd_binary() is None:
        pytest.skip(SKIP_REASON)
    # conftest's fresh broker (default min_lease_ttl 2) and client; an import error fails
    client = request.getfixturevalue("shmwatch_client")
    shm = SCENARIOS[name](client)
    etcd = ETCD.get(name, request)
    assert_same_transcript(etcd, shm)


def test_etcd_lease_wire_facts(request):
    """What EtcdClient hides, checked on etcd so that the notes stay true: gRPC codes of
    the lease errors, the order of etcd's own lists, the shape of its fresh ids."""
    with request.getfixturevalue("etcd_lease_server").client() as c:
        c.raw_log = []
        c.lease_grant(30, 1)
        codes = {}
        for name, fn, args, kwargs in (
            ("exists", c.lease_grant, (30, 1), {}),
            ("too large", c.lease_grant, (MAX_TTL + 1,), {}),
            ("not found (revoke)", c.lease_revoke, (77,), {}),
            ("not found (put)", c.put, ("k", "v"), {"lease": 77}),
            ("provided", c.put, ("k", "v"), {"lease": 1, "ignore_lease": True}),
        ):
            try:
                fn(*args, **kwargs)
            except E.ShmwatchError as exc:
                codes[name] = exc.grpc_code
        assert codes == {"exists": 9, "too large": 11, "not found (revoke)": 5,
                         "not found (put)": 5, "provided": 3}
        # etcd lists leases by expiry, soonest first (EtcdClient sorts them by id)
        c.lease_grant(5, 2)
        c.lease_grant(10, 3)
        for k in (b"b", b"c", b"a"):
            c.put(k, "v", lease=3)
        c.lease_time_to_live(3, keys=True)
        c.leases()
        raw_keys = c.raw_log[-2][2]["keys"]
        raw_leases = [int(x["ID"]) for x in c.raw_log[-1][2]["leases"]]
        assert raw_leases == [2, 3, 1]
        assert sorted(raw_keys) == sorted(["YQ==", "Yg==", "Yw=="])  # any order
        # fresh ids: member id's low 15 bits, then a counter that every request moves
        f1, f2 = c.lease_grant(5).id, c.lease_grant(5).id
        member = int(c.raw_log[-1][2]["header"]["member_id"])
        assert 0 < f1 < f2 < 2**63
        assert f2 - f1 == 2  # one id for the lease, one for the raft request
        assert f1 >> 48 == member & 0x7FFF
