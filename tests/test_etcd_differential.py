"""etcd differential tests: the same scenario on a real etcd 3.4 and on shmwatch.

A scenario is a plain function `scenario_x(c) -> list` that drives a client `c` (either
`tests.etcd_support.EtcdClient` or shmwatch's `clientlib` client: same API) and returns a
transcript: `(label, record)` pairs, where a record is a normalized response, error or
watch response (plain dicts and lists, comparable with ==).

Two tests per scenario:
- `test_etcd_expectations[x]`: runs it on a fresh etcd and checks hand-verified values of
  the fields that matter (so the scenarios themselves are known to show etcd's behaviour).
- `test_differential[x]`: runs it on a fresh shmwatch broker and asserts the transcript
  equals etcd's, field by field (the etcd transcript is taken on a fresh etcd, once per
  scenario per session).

Determinism: watch responses are read after each batch of writes with `get(timeout=5)`;
no scenario lets timing decide how events group into responses (a catch-up watch is
created after all its writes, and its created and catch-up responses are read before the
next write). "No more responses" is checked by a later write whose event must be the
very next response, or at the end by a short quiet period.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import pprint
import time

import pytest

from shmwatch.wire import errors as E
from shmwatch.wire.ops import (
    compare_create,
    compare_lease,
    compare_mod,
    compare_value,
    compare_version,
    op_delete,
    op_get,
    op_put,
    op_txn,
)
from shmwatch.wire.types import Event, KeyValue
from tests.etcd_support import (
    SKIP_REASON,
    EtcdTranscripts,
    etcd_binary,
    etcd_server,  # noqa: F401  (fixture)
)

WAIT = 5.0  # seconds to wait for an expected watch response
QUIET = 0.3  # seconds of silence that count as "no further response"

# --------------------------------------------------------------------------- records


def norm(x):
    """A comparable, printable form of a response, an error, or a value inside them."""
    if isinstance(x, BaseException):
        return {"error": type(x).__name__, "message": str(x)}
    if isinstance(x, KeyValue):
        return {f: getattr(x, f) for f in KeyValue._fields}
    if isinstance(x, Event):
        return {"type": x.type, "kv": norm(x.kv), "prev_kv": norm(x.prev_kv)}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        out = {"_type": type(x).__name__}
        for f in dataclasses.fields(x):
            out[f.name] = norm(getattr(x, f.name))
        return out
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return {f: norm(getattr(x, f)) for f in x._fields}
    if isinstance(x, (list, tuple)):
        return [norm(v) for v in x]
    if isinstance(x, bytearray):
        return bytes(x)
    return x


class T:
    """Transcript builder: records every response, error and watch response in order."""

    def __init__(self, c):
        self.c = c
        self.out: list[tuple[str, object]] = []

    def rec(self, label: str, value) -> None:
        self.out.append((label, norm(value)))

    def do(self, label: str, fn, *args, **kwargs):
        """Call fn; record its response or the typed error it raised."""
        try:
            resp = fn(*args, **kwargs)
        except E.ShmwatchError as exc:
            self.rec(label, exc)
            return None
        self.rec(label, resp)
        return resp

    def watch(self, label: str, *args, **kwargs):
        """Create a watch and record its created response (or the error watch() raised)."""
        try:
            w = self.c.watch(*args, **kwargs)
        except E.ShmwatchError as exc:
            self.rec(label, exc)
            return _FailedWatch(exc)
        self.get(label, w)
        return w

    def get(self, label: str, w, n: int = 1) -> None:
        """Record the next n responses of watch w (a missing one is recorded as Timeout)."""
        for i in range(n):
            try:
                resp = w.get(timeout=WAIT)
            except E.ShmwatchError as exc:  # Timeout, or the watch is over
                self.rec(label if n == 1 else f"{label}[{i}]", {"error": type(exc).__name__})
                return
            self.rec(label if n == 1 else f"{label}[{i}]", resp)

    def quiet(self, label: str, *watches) -> None:
        """Record whether each watch stays silent (it should: every expected response was read)."""
        time.sleep(QUIET)  # once for all of them
        for k, w in enumerate(watches):
            try:
                resp = w.get_nowait()
            except E.ShmwatchError as exc:  # the watch is over: which error says why
                resp = f"over: {type(exc).__name__}"
            if resp is None:
                resp = "quiet"
            self.rec(f"{label}.{k}" if len(watches) > 1 else label, resp)


class _FailedWatch:
    """Stands in for a watch whose creation raised, so the scenario can go on."""

    watch_id = None

    def __init__(self, exc):
        self.exc = exc

    def get(self, timeout=None):
        raise self.exc

    get_nowait = get

    def cancel(self):
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


@scenario({
    "w.created": {"watch_id": 0, "revision": 1, "created": True, "canceled": False, "events": []},
    "put a=1": {"revision": 2, "prev_kv": None},
    "w.put1": {"revision": 2, "events#": 1, "events.0.type": "PUT",
               "events.0.kv": {"key": b"a", "value": b"1", "create_revision": 2,
                               "mod_revision": 2, "version": 1, "lease": 0}},
    "put b": {"revision": 3},
    "w.put2": {"revision": 4, "events.0.kv.version": 2, "events.0.kv.create_revision": 2},
    "w.del": {"revision": 5, "events.0.type": "DELETE",
              "events.0.kv": {"key": b"a", "value": b"", "create_revision": 0,
                              "mod_revision": 5, "version": 0, "lease": 0},
              "events.0.prev_kv": None},
    "get a": {"revision": 5, "count": 0, "kvs": []},
    "quiet": "quiet",
})
def scenario_single_key(c):
    t = T(c)
    w = t.watch("w.created", "a")
    t.do("put a=1", c.put, "a", "1")
    t.get("w.put1", w)
    t.do("put b", c.put, "b", "x")
    t.do("put a=2", c.put, "a", "2")
    t.get("w.put2", w)  # the very next response: put b made none
    t.do("del a", c.delete, "a")
    t.get("w.del", w)
    t.do("get a", c.get, "a")
    t.quiet("quiet", w)
    return t.out


@scenario({
    "w.created": {"watch_id": 0, "revision": 1},
    "w.b": {"revision": 3, "events.0.kv.key": b"b"},
    "w.bb": {"revision": 4, "events.0.kv.key": b"bb"},
    "w.c": {"revision": 5, "events.0.kv.key": b"c"},
    "del a..z": {"revision": 7, "deleted": 5},
    "w.del": {"revision": 7, "events#": 3, "events.0.kv.key": b"b", "events.1.kv.key": b"bb",
              "events.2.kv.key": b"c", "events.2.type": "DELETE"},
    "get b..d": {"revision": 6, "count": 3, "kvs.1.key": b"bb"},
    "get b..d after": {"revision": 7, "count": 0},
})
def scenario_range(c):
    t = T(c)
    w = t.watch("w.created", "b", range_end="d")
    for k in ("a", "b", "bb", "c", "d"):  # revisions 2..6
        t.do(f"put {k}", c.put, k, k)
        if k in ("b", "bb", "c"):
            t.get(f"w.{k}", w)
    t.do("get b..d", c.get, "b", range_end="d")
    t.do("del a..z", c.delete, "a", range_end="z")
    t.get("w.del", w)
    t.do("get b..d after", c.get, "b", range_end="d")
    t.quiet("quiet", w)
    return t.out


@scenario({
    "w.created": {"watch_id": 0, "revision": 1},
    "w.app/": {"revision": 2, "events.0.kv.key": b"app/"},
    "w.app/x": {"revision": 5, "events.0.kv.key": b"app/x"},
    "get prefix": {"count": 2, "kvs.0.key": b"app/", "kvs.1.key": b"app/x"},
    "del prefix": {"revision": 7, "deleted": 2, "prev_kvs.1.key": b"app/x",
                   "prev_kvs.1.mod_revision": 5},
    "w.del": {"revision": 7, "events#": 2, "events.1.prev_kv": None},
    "w.ff.created": {"watch_id": 1},
    "w.ff": {"revision": 8, "events.0.kv.key": b"\xff\xff"},
})
def scenario_prefix(c):
    t = T(c)
    w = t.watch("w.created", "app/", prefix=True)
    t.do("put app/", c.put, "app/", "1")  # 2
    t.get("w.app/", w)
    t.do("put app", c.put, "app", "1")  # 3: not in the prefix
    t.do("put apq", c.put, "app0", "1")  # 4: '0' > '/': not in the prefix
    t.do("put app/x", c.put, "app/x", "1")  # 5
    t.get("w.app/x", w)
    t.do("put aq", c.put, "aq", "1")  # 6
    t.do("get prefix", c.get, "app/", prefix=True)
    t.do("del prefix", c.delete, "app/", prefix=True, prev_kv=True)  # 7
    t.get("w.del", w)
    # a prefix of only 0xff bytes means every key >= it
    wff = t.watch("w.ff.created", b"\xff", prefix=True)
    t.do("put ff ff", c.put, b"\xff\xff", "1")  # 8
    t.get("w.ff", wff)
    t.do("get ff prefix", c.get, b"\xff", prefix=True)
    t.quiet("quiet", w, wff)
    return t.out


@scenario({
    "w.created": {"watch_id": 0, "revision": 1},
    "w.m": {"revision": 3, "events.0.kv.key": b"m"},
    "w.z": {"revision": 4, "events.0.kv.key": b"z"},
    "w.ff": {"revision": 5, "events.0.kv.key": b"\xff"},
    "get >= m": {"count": 3, "kvs#": 3},
    "get all": {"count": 4},
    "del >= m": {"deleted": 3, "revision": 6},
    "w.del": {"events#": 3, "revision": 6},
})
def scenario_from_key(c):
    t = T(c)
    w = t.watch("w.created", "m", range_end=b"\0")
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put m", c.put, "m", "1")  # 3
    t.get("w.m", w)
    t.do("put z", c.put, "z", "1")  # 4
    t.get("w.z", w)
    t.do("put ff", c.put, b"\xff", "1")  # 5
    t.get("w.ff", w)
    t.do("get >= m", c.get, "m", range_end=b"\0")
    t.do("get all", c.get, b"\0", range_end=b"\0")
    t.do("get all prefix ''", c.get, "", prefix=True)
    t.do("del >= m", c.delete, "m", range_end=b"\0")  # 6
    t.get("w.del", w)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "w.created": {"watch_id": 0, "revision": 6, "created": True, "events": []},
    "w.catchup": {"watch_id": 0, "revision": 6, "created": False, "events#": 4,
                  "events.0.kv.mod_revision": 3, "events.0.kv.key": b"b",
                  "events.1.kv.mod_revision": 4, "events.2.type": "DELETE",
                  "events.3.kv.mod_revision": 6, "events.3.kv.version": 1},
    "w.live": {"revision": 7, "events#": 1},
    "w1.catchup": {"revision": 7, "events#": 6, "events.0.kv.mod_revision": 2},
    "w7.created": {"watch_id": 2, "revision": 7},
    "w7.catchup": {"revision": 7, "events#": 1, "events.0.kv.mod_revision": 7},
})
def scenario_start_revision_past(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put b", c.put, "b", "1")  # 3
    t.do("put a", c.put, "a", "2")  # 4
    t.do("del a", c.delete, "a")  # 5
    t.do("put a", c.put, "a", "3")  # 6
    # every history event from revision 3 arrives in ONE response, header = current revision
    w = t.watch("w.created", "a", range_end="c", start_revision=3)
    t.get("w.catchup", w)
    t.do("put b", c.put, "b", "2")  # 7
    t.get("w.live", w)
    w1 = t.watch("w1.created", "a", range_end="c", start_revision=1)
    t.get("w1.catchup", w1)
    # start_revision == current revision: the last revision is replayed
    w7 = t.watch("w7.created", "b", start_revision=7)
    t.get("w7.catchup", w7)
    # a past start with no matching history: created, then nothing
    wn = t.watch("wn.created", "nothing", start_revision=2)
    t.do("put nothing", c.put, "nothing", "1")  # 8
    t.get("wn.live", wn)
    t.quiet("quiet", w, w1, w7, wn)
    return t.out


@scenario({
    "w0.created": {"watch_id": 0, "revision": 3},
    "wnext.created": {"watch_id": 1, "revision": 3},
    "w0.ev": {"revision": 4, "events.0.kv.mod_revision": 4},
    "wnext.ev": {"revision": 4, "events.0.kv.mod_revision": 4},
})
def scenario_start_revision_now(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put a", c.put, "a", "2")  # 3
    w0 = t.watch("w0.created", "a", start_revision=0)
    wnext = t.watch("wnext.created", "a", start_revision=4)  # current + 1 == "now"
    t.do("put a", c.put, "a", "3")  # 4
    t.get("w0.ev", w0)
    t.get("wnext.ev", wnext)
    t.quiet("quiet", w0, wnext)
    return t.out


@scenario({
    "w.created": {"watch_id": 0, "revision": 2, "events": []},
    "w.r5": {"revision": 5, "events#": 1, "events.0.kv.mod_revision": 5},
    "w.r6": {"revision": 6, "events.0.type": "DELETE"},
})
def scenario_start_revision_future(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    w = t.watch("w.created", "a", start_revision=5)  # header: current revision (2)
    t.do("put a", c.put, "a", "2")  # 3
    t.do("put a", c.put, "a", "3")  # 4
    t.do("put a", c.put, "a", "4")  # 5
    t.get("w.r5", w)
    t.do("del a", c.delete, "a")  # 6
    t.get("w.r6", w)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "w.create": {"events.0.prev_kv": None, "events.0.kv.version": 1},
    "w.update": {"events.0.prev_kv": {"key": b"k", "value": b"1", "create_revision": 2,
                                      "mod_revision": 2, "version": 1, "lease": 0},
                 "events.0.kv.value": b"2"},
    "w.delete": {"events.0.type": "DELETE", "events.0.prev_kv.value": b"2",
                 "events.0.prev_kv.mod_revision": 3, "events.0.kv.mod_revision": 4},
    "w.recreate": {"events.0.prev_kv": None, "events.0.kv.create_revision": 5,
                   "events.0.kv.version": 1},
    "plain.update": {"events.0.prev_kv": None},
    "put prev": {"revision": 3, "prev_kv.value": b"1"},
    "catchup": {"events#": 4, "events.1.prev_kv.value": b"1", "events.2.prev_kv.value": b"2",
                "events.3.prev_kv": None},
})
def scenario_prev_kv(c):
    t = T(c)
    w = t.watch("w.created", "k", prev_kv=True)
    plain = t.watch("plain.created", "k")  # same key, no prev_kv: shaped per watcher
    t.do("put new", c.put, "k", "1", prev_kv=True)  # 2
    t.get("w.create", w)
    t.get("plain.create", plain)
    t.do("put prev", c.put, "k", "2", prev_kv=True)  # 3
    t.get("w.update", w)
    t.get("plain.update", plain)
    t.do("del prev", c.delete, "k", prev_kv=True)  # 4
    t.get("w.delete", w)
    t.get("plain.delete", plain)
    t.do("recreate", c.put, "k", "3", prev_kv=True)  # 5
    t.get("w.recreate", w)
    t.get("plain.recreate", plain)
    # history replay fills prev_kv too
    h = t.watch("catchup.created", "k", start_revision=2, prev_kv=True)
    t.get("catchup", h)
    t.quiet("quiet", w, plain, h)
    return t.out


@scenario({
    "noput.ev": {"revision": 3, "events#": 1, "events.0.type": "DELETE"},
    "nodel.ev": {"revision": 2, "events#": 1, "events.0.type": "PUT"},
    "noput.txn": {"revision": 5, "events#": 1, "events.0.kv.key": b"b"},
    "nodel.b": {"revision": 4, "events#": 1, "events.0.kv.key": b"b"},
    "nodel.txn": {"revision": 5, "events#": 2, "events.0.kv.key": b"a",
                  "events.1.kv.key": b"c"},
    "noput.last": {"revision": 6},
    "nodel.last": {"revision": 7},
    "both.quiet": "quiet",
})
def scenario_filters(c):
    t = T(c)
    noput = t.watch("noput.created", "a", range_end="z", filters=("noput",))
    nodel = t.watch("nodel.created", "a", range_end="z", filters=("nodelete",))
    both = t.watch("both.created", "a", range_end="z", filters=("noput", "nodelete"))
    t.do("put a", c.put, "a", "1")  # 2
    t.get("nodel.ev", nodel)
    t.do("del a", c.delete, "a")  # 3
    t.get("noput.ev", noput)
    t.do("put b", c.put, "b", "1")  # 4
    t.do("txn", c.txn, [], [op_put("a", "2"), op_delete("b"), op_put("c", "1")], [])  # 5
    t.get("noput.txn", noput)  # only the delete: no response for put b at 4
    t.get("nodel.b", nodel)
    t.get("nodel.txn", nodel)
    t.do("del c", c.delete, "c")  # 6
    t.get("noput.last", noput)
    t.do("put d", c.put, "d", "1")  # 7
    t.get("nodel.last", nodel)
    t.quiet("both.quiet", both)
    t.quiet("quiet", noput, nodel)
    return t.out


@scenario({
    "del": {"revision": 5, "deleted": 3, "prev_kvs#": 3, "prev_kvs.0.key": b"a",
            "prev_kvs.2.key": b"c"},
    "w.del": {"revision": 5, "events#": 3, "events.0.type": "DELETE",
              "events.0.kv.mod_revision": 5, "events.2.kv.mod_revision": 5,
              "events.1.prev_kv.value": b"2"},
    "w2.del": {"revision": 5, "events#": 2},
})
def scenario_range_delete_one_response(c):
    t = T(c)
    for k in ("a", "b", "c"):  # 2, 3, 4
        t.do(f"put {k}", c.put, k, {"a": "1", "b": "2", "c": "3"}[k])
    w = t.watch("w.created", "a", range_end=b"\0", prev_kv=True)
    w2 = t.watch("w2.created", "b", range_end="d")
    t.do("del", c.delete, "a", range_end="d", prev_kv=True)  # 5: three events, one response
    t.get("w.del", w)
    t.get("w2.del", w2)
    t.quiet("quiet", w, w2)
    return t.out


@scenario({
    "txn": {"revision": 4, "succeeded": True, "responses#": 5, "responses.2.revision": 4,
            "responses.2.kvs.0.value": b"1"},
    "w.txn": {"revision": 4, "events#": 4,
              "events.0.kv.key": b"z", "events.0.type": "PUT",
              "events.1.kv.key": b"b", "events.1.type": "DELETE",
              "events.2.kv.key": b"a", "events.2.kv.version": 2,
              "events.3.kv.key": b"m", "events.3.kv.create_revision": 4},
    "catchup": {"revision": 4, "events#": 4, "events.0.kv.key": b"z",
                "events.1.kv.key": b"b", "events.3.kv.key": b"m"},
})
def scenario_txn_events_one_response(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put b", c.put, "b", "1")  # 3
    w = t.watch("w.created", "a", range_end=b"\0")
    # events keep the txn's operation order (not key order)
    t.do("txn", c.txn, [], [op_put("z", "1"), op_delete("b"), op_get("a"), op_put("a", "2"),
                            op_put("m", "1")], [])  # 4
    t.get("w.txn", w)
    h = t.watch("catchup.created", "a", range_end=b"\0", start_revision=4)
    t.get("catchup", h)
    t.quiet("quiet", w, h)
    return t.out


@scenario({
    "get 1": {"kvs.0.version": 2, "kvs.0.create_revision": 2, "kvs.0.mod_revision": 3},
    "del": {"revision": 4, "deleted": 1},
    "recreate": {"revision": 5},
    "get 2": {"kvs.0.version": 1, "kvs.0.create_revision": 5, "kvs.0.mod_revision": 5},
    "w.recreate": {"events.0.kv.version": 1, "events.0.kv.create_revision": 5},
    "get old": {"kvs.0.version": 2, "kvs.0.create_revision": 2, "revision": 6},
    "get deleted": {"count": 0, "revision": 6},
})
def scenario_delete_recreate(c):
    t = T(c)
    w = t.watch("w.created", "k")
    t.do("put", c.put, "k", "1")  # 2
    t.get("w.put", w)
    t.do("put", c.put, "k", "2")  # 3
    t.get("w.put2", w)
    t.do("get 1", c.get, "k")
    t.do("del", c.delete, "k")  # 4
    t.get("w.del", w)
    t.do("recreate", c.put, "k", "3")  # 5
    t.get("w.recreate", w)
    t.do("get 2", c.get, "k")
    t.do("put again", c.put, "k", "4")  # 6
    t.get("w.again", w)
    t.do("get old", c.get, "k", revision=3)
    t.do("get deleted", c.get, "k", revision=4)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "del missing": {"revision": 2, "deleted": 0, "prev_kvs": []},
    "del empty range": {"revision": 2, "deleted": 0},
    "del reversed range": {"revision": 2, "deleted": 0},
    "txn del missing": {"revision": 2, "succeeded": True, "responses.0.revision": 2},
    "get": {"revision": 2},
    "w.next": {"revision": 3, "events#": 1, "events.0.kv.key": b"b"},
})
def scenario_delete_missing(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    w = t.watch("w.created", "a", range_end=b"\0")
    t.do("del missing", c.delete, "nope", prev_kv=True)
    t.do("del empty range", c.delete, "b", range_end="c")
    t.do("del reversed range", c.delete, "z", range_end="a")
    t.do("txn del missing", c.txn, [], [op_delete("nope")], [])
    t.do("get", c.get, "a")
    t.do("put b", c.put, "b", "1")  # 3: the very next watch response
    t.get("w.next", w)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "compact": {"revision": 5},
    "w.created": {"watch_id": 0, "revision": 5, "created": True, "canceled": False},
    "w.compacted": {"watch_id": 0, "revision": 0, "canceled": True, "created": False,
                    "compact_revision": 4, "cancel_reason": "", "events": []},
    "w9.created": {"watch_id": 9, "revision": 5},
    "w9.compacted": {"watch_id": 9, "revision": 0, "canceled": True, "compact_revision": 4},
    "wr.compacted": {"compact_revision": 4, "canceled": True},
    "wr.created": {"watch_id": 1},
    "ok.created": {"watch_id": 2},
    "ok.catchup": {"revision": 5, "events#": 1, "events.0.kv.key": b"b"},
    "w.after": "over: CompactedError",
})
def scenario_watch_compacted(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put a", c.put, "a", "2")  # 3
    t.do("put b", c.put, "b", "1")  # 4
    t.do("put b", c.put, "b", "2")  # 5
    t.do("compact", c.compact, 4)
    w = t.watch("w.created", "a", start_revision=3)
    t.get("w.compacted", w)
    w9 = t.watch("w9.created", "a", start_revision=1, watch_id=9)
    t.get("w9.compacted", w9)
    # a range with no event at all in the compacted part is cancelled just the same
    wr = t.watch("wr.created", "x", range_end="y", start_revision=2)
    t.get("wr.compacted", wr)
    ok = t.watch("ok.created", "b", start_revision=5)
    t.get("ok.catchup", ok)
    t.quiet("w.after", w)
    t.quiet("quiet", ok)
    return t.out


@scenario({
    "compact": {"revision": 4},
    "w.after": {"revision": 5, "events.0.kv.mod_revision": 5, "events.0.prev_kv.mod_revision": 4},
    "h.after": {"revision": 5, "events.0.kv.mod_revision": 5},
    "get compacted": {"error": "CompactedError",
                      "message": "etcdserver: mvcc: required revision has been compacted"},
    "get at compact rev": {"kvs.0.mod_revision": 4, "revision": 5},
    "w.after2": {"revision": 7},
})
def scenario_compaction_live_watch(c):
    t = T(c)
    w = t.watch("w.created", "k", prev_kv=True)
    t.do("put", c.put, "k", "1")  # 2
    t.get("w.1", w)
    t.do("put", c.put, "k", "2")  # 3
    t.get("w.2", w)
    h = t.watch("h.created", "k", start_revision=2)
    t.get("h.catchup", h)
    t.do("put", c.put, "k", "3")  # 4
    t.get("w.3", w)
    t.get("h.3", h)
    t.do("compact", c.compact, 4)  # live watches are not affected
    t.do("put", c.put, "k", "4")  # 5
    t.get("w.after", w)
    t.get("h.after", h)
    t.do("get compacted", c.get, "k", revision=3)
    t.do("get at compact rev", c.get, "k", revision=4)
    t.do("compact current", c.compact, 5)
    t.do("put other", c.put, "other", "1")  # 6
    t.do("put", c.put, "k", "5")  # 7
    t.get("w.after2", w)
    t.get("h.after2", h)
    t.quiet("quiet", w, h)
    return t.out


@scenario({
    "txn": {"revision": 5, "responses.0.revision": 5},
    "compact": {"revision": 5},
    "w.created": {"revision": 5, "watch_id": 0, "canceled": False},
    # the DELETE of b at the compact revision is gone; the puts remain, without prev_kv
    "w.catchup": {"revision": 5, "events#": 2, "events.0.kv.key": b"c",
                  "events.0.prev_kv": None, "events.1.kv.key": b"a",
                  "events.1.kv.version": 3, "events.1.prev_kv": None},
    "w.live": {"revision": 6, "events.0.prev_kv.mod_revision": 5},
    "before.compacted": {"canceled": True, "compact_revision": 5, "revision": 0},
    "b.created": {"watch_id": 2},
    "b.live": {"revision": 7, "events#": 1, "events.0.kv.key": b"b"},
})
def scenario_watch_at_compact_revision(c):
    t = T(c)
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put a", c.put, "a", "2")  # 3
    t.do("put b", c.put, "b", "1")  # 4
    t.do("txn", c.txn, [], [op_delete("b"), op_put("c", "1"), op_put("a", "3")], [])  # 5
    t.do("compact", c.compact, 5)
    w = t.watch("w.created", "a", range_end="z", start_revision=5, prev_kv=True)
    t.get("w.catchup", w)
    t.do("put a", c.put, "a", "4")  # 6
    t.get("w.live", w)
    before = t.watch("before.created", "a", range_end="z", start_revision=4)
    t.get("before.compacted", before)
    # a watch on the deleted key alone from the compact revision: nothing until a new write
    b = t.watch("b.created", "b", start_revision=5)
    t.do("put b", c.put, "b", "2")  # 7
    t.get("b.live", b)
    t.get("w.b", w)
    t.quiet("quiet", w, b)
    return t.out


@scenario({
    "progress": {"watch_id": -1, "revision": 2, "created": False, "canceled": False,
                 "events": [], "compact_revision": 0},
    "progress.wb": {"watch_id": -1, "revision": 2},
    "progress.wr": {"watch_id": -1, "revision": 2},
    "progress2.wa": {"watch_id": -1, "revision": 3},
})
def scenario_progress_request(c):
    t = T(c)
    t.do("put z", c.put, "z", "1")  # 2
    wa = t.watch("wa.created", "a")
    wb = t.watch("wb.created", "b", start_revision=10)  # a future watch gets it too
    wr = t.watch("wr.created", "c", range_end="e", prev_kv=True)
    c.request_progress()
    t.get("progress", wa)
    t.get("progress.wb", wb)
    t.get("progress.wr", wr)
    t.do("put y", c.put, "y", "1")  # 3: matches no watch
    c.request_progress()
    t.get("progress2.wa", wa)
    t.get("progress2.wb", wb)
    t.get("progress2.wr", wr)
    t.quiet("quiet", wa, wb, wr)
    return t.out


@scenario({
    "w.ev": {"watch_id": 0, "revision": 3, "events#": 1},
    "progress.w": {"watch_id": -1, "revision": 4, "events": []},
    "progress.x": {"watch_id": -1, "revision": 4},
    "w.ev2": {"watch_id": 0, "revision": 5},
})
def scenario_progress_with_events(c):
    t = T(c)
    w = t.watch("w.created", "k")
    x = t.watch("x.created", "x")
    t.do("put k", c.put, "k", "1")  # 2
    t.get("w.ev1", w)
    t.do("put k", c.put, "k", "2")  # 3
    t.get("w.ev", w)
    t.do("put other", c.put, "other", "1")  # 4
    c.request_progress()
    t.get("progress.w", w)
    t.get("progress.x", x)
    t.do("put k", c.put, "k", "3")  # 5
    t.get("w.ev2", w)
    t.quiet("quiet", w, x)
    return t.out


@scenario({
    "a.cancel": {"watch_id": 0, "revision": 2, "canceled": True, "created": False,
                 "cancel_reason": "", "compact_revision": 0, "events": []},
    "b.ev": {"watch_id": 1, "revision": 3},
    "a.after": "over: WatchClosed",
    "b.cancel": {"watch_id": 1, "revision": 4, "canceled": True},
    "c.created": {"watch_id": 2},
})
def scenario_cancel(c):
    t = T(c)
    a = t.watch("a.created", "k")
    b = t.watch("b.created", "k")
    t.do("put", c.put, "k", "1")  # 2
    t.get("a.ev", a)
    t.get("b.ev1", b)
    a.cancel()
    t.get("a.cancel", a)
    t.do("put", c.put, "k", "2")  # 3
    t.get("b.ev", b)
    t.quiet("a.after", a)
    t.do("put", c.put, "k", "3")  # 4
    t.get("b.ev3", b)
    b.cancel()
    t.get("b.cancel", b)
    cw = t.watch("c.created", "k")  # ids are not reused automatically
    t.do("put", c.put, "k", "4")  # 5
    t.get("c.ev", cw)
    t.quiet("quiet", cw)
    return t.out


@scenario({
    "w5.created": {"watch_id": 5, "created": True, "canceled": False},
    "dup.created": {"watch_id": -1, "created": True, "canceled": True, "revision": 1,
                    "cancel_reason": "mvcc: duplicate watch ID provided on the WatchStream"},
    "auto.created": {"watch_id": 0},
    "auto2.created": {"watch_id": 1},
    "dup1.created": {"watch_id": -1, "canceled": True,
                     "cancel_reason": "mvcc: duplicate watch ID provided on the WatchStream"},
    "x0.created": {"watch_id": 2, "canceled": False},
    "w5.ev": {"watch_id": 5, "revision": 2},
    "auto.ev": {"watch_id": 0, "revision": 2},
    "dup.after": "over: DuplicateWatchIdError",
    "w5.cancel": {"watch_id": 5, "canceled": True},
    "reuse5.created": {"watch_id": 5, "canceled": False},
})
def scenario_duplicate_watch_id(c):
    t = T(c)
    w5 = t.watch("w5.created", "k", watch_id=5)
    dup = t.watch("dup.created", "k", watch_id=5)
    auto = t.watch("auto.created", "k")
    auto2 = t.watch("auto2.created", "other")
    dup1 = t.watch("dup1.created", "other", watch_id=auto2.watch_id)
    x0 = t.watch("x0.created", "other", watch_id=0)  # 0 is "choose one", never a duplicate
    t.do("put", c.put, "k", "1")  # 2
    t.get("w5.ev", w5)
    t.get("auto.ev", auto)
    t.quiet("dup.after", dup)
    t.quiet("dup1.after", dup1)
    w5.cancel()
    t.get("w5.cancel", w5)
    reuse = t.watch("reuse5.created", "k", watch_id=5)  # a cancelled id may be chosen again
    t.do("put", c.put, "k", "2")  # 3
    t.get("reuse5.ev", reuse)
    t.get("auto.ev2", auto)
    t.quiet("quiet", reuse, auto, auto2, x0)
    return t.out


@scenario({
    "gt.created": {"watch_id": -1, "created": True, "canceled": True, "revision": 1,
                   "cancel_reason": "mvcc: watcher range is empty"},
    "eq.created": {"watch_id": -1, "canceled": True,
                   "cancel_reason": "mvcc: watcher range is empty"},
    "empty.created": {"watch_id": 0, "canceled": False},
    "ok.created": {"watch_id": 1, "canceled": False},
    "ok.ev": {"watch_id": 1, "revision": 2},
    "quiet.0": "over: InvalidRangeError",
    "quiet.1": "over: InvalidRangeError",
    "quiet.2": "quiet",
    "quiet.3": "quiet",
})
def scenario_invalid_range(c):
    t = T(c)
    gt = t.watch("gt.created", "b", range_end="a")
    eq = t.watch("eq.created", "b", range_end="b")
    empty = t.watch("empty.created", "")  # etcd accepts a watch on the empty key
    ok = t.watch("ok.created", "a", range_end="c")
    t.do("put b", c.put, "b", "1")  # 2
    t.get("ok.ev", ok)
    t.quiet("quiet", gt, eq, empty, ok)
    return t.out


@scenario({
    "w0": {"watch_id": 0}, "w1": {"watch_id": 1}, "x5": {"watch_id": 5},
    "w2": {"watch_id": 2}, "x0": {"watch_id": 3}, "w1.cancel": {"watch_id": 1},
    "w4": {"watch_id": 4}, "x1": {"watch_id": 1}, "w6": {"watch_id": 6},
    "progress.x1": {"watch_id": -1},
})
def scenario_watch_id_assignment(c):
    t = T(c)
    t.watch("w0", "k")
    w1 = t.watch("w1", "k")
    t.watch("x5", "k", watch_id=5)
    t.watch("w2", "k")
    t.watch("x0", "k", watch_id=0)  # 0 means "choose one"
    w1.cancel()
    t.get("w1.cancel", w1)
    t.watch("w4", "k")
    x1 = t.watch("x1", "k", watch_id=1)  # the cancelled id, chosen explicitly
    t.watch("w6", "k")  # 5 is taken
    c.request_progress()
    t.get("progress.x1", x1)
    return t.out


@scenario({
    "get now": {"revision": 4, "kvs.0.value": b"3"},
    "get rev 2": {"revision": 4, "kvs.0.value": b"1", "kvs.0.mod_revision": 2},
    "get rev 3": {"kvs.0.value": b"2"},
    "get rev 1": {"revision": 4, "count": 0},
    "get future": {"error": "FutureRevisionError",
                   "message": "etcdserver: mvcc: required revision is a future revision"},
    "get compacted": {"error": "CompactedError",
                      "message": "etcdserver: mvcc: required revision has been compacted"},
    "get at compact rev": {"kvs.0.value": b"2"},
    "get compacted range": {"error": "CompactedError"},
    "get compacted after": {"error": "CompactedError"},
})
def scenario_get_revisions(c):
    t = T(c)
    t.do("put", c.put, "k", "1")  # 2
    t.do("put", c.put, "k", "2")  # 3
    t.do("put", c.put, "k", "3")  # 4
    t.do("get now", c.get, "k")
    t.do("get rev 2", c.get, "k", revision=2)
    t.do("get rev 3", c.get, "k", revision=3)
    t.do("get rev 1", c.get, "k", revision=1)
    t.do("get rev current", c.get, "k", revision=4)
    t.do("get future", c.get, "k", revision=5)
    t.do("compact", c.compact, 3)
    t.do("get compacted", c.get, "k", revision=2)
    t.do("get at compact rev", c.get, "k", revision=3)
    t.do("get compacted range", c.get, "a", range_end="z", revision=1)
    t.do("get compacted count", c.get, "a", range_end="z", revision=2, count_only=True)
    t.do("get future after", c.get, "k", revision=100)
    t.do("compact more", c.compact, 4)
    t.do("get compacted after", c.get, "k", revision=3)
    return t.out


@scenario({
    "limit 2": {"count": 5, "more": True, "kvs#": 2, "kvs.0.key": b"a", "kvs.1.key": b"b"},
    "limit 5": {"count": 5, "more": False, "kvs#": 5},
    "limit 9": {"count": 5, "more": False},
    "count_only": {"count": 5, "kvs": [], "more": False},
    "count_only limit": {"count": 5, "kvs": [], "more": False},
    "keys_only": {"kvs.0": {"key": b"a", "value": b"", "create_revision": 2,
                            "mod_revision": 2, "version": 1, "lease": 0}},
    "keys_only limit": {"more": True, "kvs#": 1, "count": 5},
    "limit past": {"revision": 7, "count": 4, "more": True, "kvs#": 1},
    "limit range": {"count": 2, "more": True, "kvs.0.key": b"b"},
})
def scenario_range_options(c):
    t = T(c)
    for k in ("a", "b", "c", "d", "e"):  # 2..6
        t.do(f"put {k}", c.put, k, k * 3)
    t.do("put a again", c.put, "a", "again")  # 7
    t.do("limit 2", c.get, "a", range_end=b"\0", limit=2)
    t.do("limit 5", c.get, "a", range_end=b"\0", limit=5)
    t.do("limit 9", c.get, "a", range_end=b"\0", limit=9)
    t.do("count_only", c.get, "a", range_end=b"\0", count_only=True)
    t.do("count_only limit", c.get, "a", range_end=b"\0", count_only=True, limit=1)
    t.do("keys_only", c.get, "a", range_end="c", keys_only=True, revision=2)
    t.do("keys_only limit", c.get, "a", range_end=b"\0", keys_only=True, limit=1)
    t.do("keys_only count_only", c.get, "a", range_end="c", keys_only=True, count_only=True)
    t.do("limit past", c.get, "a", range_end=b"\0", limit=1, revision=5)
    t.do("limit range", c.get, "b", range_end="d", limit=1)
    t.do("limit single", c.get, "a", limit=1)
    return t.out


@scenario({
    "value eq": {"succeeded": True, "revision": 4, "responses.0.revision": 4},
    "value ne": {"succeeded": False, "revision": 5, "responses.0.revision": 5},
    "version": {"succeeded": True},
    "create": {"succeeded": True},
    "mod": {"succeeded": False},
    "missing version 0": {"succeeded": True},
    "missing value ne": {"succeeded": False},
    "missing value empty": {"succeeded": False},
    "missing create/mod 0": {"succeeded": True},
    "value lt": {"succeeded": True},
    "value gt bytes": {"succeeded": True},
    "range version": {"succeeded": True},
    "range version fails": {"succeeded": False},
    "lease": {"succeeded": True},
    "empty": {"succeeded": True, "responses": [], "revision": 5},
    "w.success": {"revision": 4, "events.0.kv.key": b"x"},
    "w.failure": {"revision": 5, "events.0.kv.key": b"y"},
})
def scenario_txn_compares(c):
    t = T(c)
    w = t.watch("w.created", "x", range_end="z")
    t.do("put a", c.put, "a", "5")  # 2
    t.do("put b", c.put, "b", "1")  # 3
    t.do("value eq", c.txn, [compare_value("a", "=", "5")], [op_put("x", "1")],
         [op_put("y", "1")])  # 4
    t.get("w.success", w)
    t.do("value ne", c.txn, [compare_value("a", "!=", "5")], [op_put("x", "2")],
         [op_put("y", "2"), op_get("a")])  # 5
    t.get("w.failure", w)
    t.do("version", c.txn, [compare_version("a", "=", 1), compare_version("b", ">", 0)],
         [op_get("a")], [])
    t.do("create", c.txn, [compare_create("b", "=", 3), compare_create("a", "<", 3)],
         [op_get("b")], [])
    t.do("mod", c.txn, [compare_mod("x", ">", 4)], [op_get("x")], [op_get("y")])
    t.do("missing version 0", c.txn, [compare_version("nokey", "=", 0)], [], [])
    t.do("missing value ne", c.txn, [compare_value("nokey", "!=", "x")], [], [])
    t.do("missing value empty", c.txn, [compare_value("nokey", "=", "")], [], [])
    t.do("missing create/mod 0", c.txn,
         [compare_create("nokey", "=", 0), compare_mod("nokey", "<", 1)], [], [])
    t.do("value lt", c.txn, [compare_value("a", "<", "6")], [], [])
    t.do("value gt bytes", c.txn, [compare_value("a", ">", "40")], [], [])
    t.do("range version", c.txn, [compare_version("a", "=", 1, range_end="c")], [], [])
    t.do("range version fails", c.txn, [compare_version("a", ">", 1, range_end="z")], [], [])
    t.do("lease", c.txn, [compare_lease("a", "=", 0)], [], [])
    t.do("empty", c.txn, [], [], [])
    t.quiet("quiet", w)
    return t.out


@scenario({
    "txn1": {"revision": 4, "succeeded": True, "responses#": 6,
             "responses.0.revision": 4, "responses.0.prev_kv.value": b"1",
             "responses.1.revision": 4,
             "responses.2.revision": 4, "responses.2.kvs.0.value": b"2",
             "responses.3.revision": 4, "responses.3.deleted": 1,
             "responses.4.revision": 4, "responses.4.kvs.0.value": b"1",
             "responses.5._type": "TxnResponse", "responses.5.revision": 0,
             "responses.5.succeeded": False, "responses.5.responses": []},
    "txn2": {"revision": 5, "succeeded": False,
             "responses.0.revision": 4, "responses.1.revision": 5,
             "responses.2.revision": 0, "responses.2.succeeded": True,
             "responses.2.responses.0.revision": 5,
             "responses.2.responses.0.kvs.0.value": b"1"},
    "txn read only": {"revision": 5, "responses.0.revision": 5, "responses.1.revision": 5},
    "txn del first": {"revision": 6, "responses.0.revision": 5, "responses.1.revision": 6,
                      "responses.2.revision": 6},
    "w.txn1": {"revision": 4, "events#": 3},
    "w.txn2": {"revision": 5, "events#": 1, "events.0.kv.key": b"e"},
})
def scenario_txn_nested_revisions(c):
    t = T(c)
    w = t.watch("w.created", "a", range_end=b"\0")
    t.do("put a", c.put, "a", "1")  # 2
    t.do("put b", c.put, "b", "1")  # 3
    t.get("w.a", w)
    t.get("w.b", w)
    # nested compares are evaluated before the txn runs: c does not exist yet
    t.do("txn1", c.txn,
         [compare_value("a", "=", "1")],
         [op_put("a", "2", prev_kv=True), op_put("c", "1"), op_get("a"),
          op_delete("b", prev_kv=True), op_get("a", revision=3),
          op_txn([compare_value("c", "=", "1")], [op_put("d", "1")], [])],
         [op_get("zz")])  # 4
    t.get("w.txn1", w)
    t.do("txn2", c.txn,
         [compare_value("a", "=", "1")],
         [op_put("x", "1")],
         [op_get("a"), op_put("e", "1"), op_txn([], [op_get("e")], [])])  # 5
    t.get("w.txn2", w)
    t.do("txn read only", c.txn, [], [op_get("a"), op_delete("nothing")], [])
    t.do("txn del first", c.txn, [], [op_delete("nothing"), op_put("f", "1"),
                                      op_delete("nothing2")], [])  # 6
    t.get("w.txn3", w)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "ignore missing": {"error": "KeyNotFoundError", "message": "etcdserver: key not found"},
    "ignore with value": {"error": "ValueProvidedError",
                          "message": "etcdserver: value is provided"},
    "ignore ok": {"revision": 3, "prev_kv.value": b"v"},
    "get after ignore": {"kvs.0.value": b"v", "kvs.0.version": 2, "kvs.0.mod_revision": 3},
    "w.ignore": {"revision": 3, "events.0.kv.value": b"v", "events.0.kv.version": 2},
    "put empty key": {"error": "EmptyKeyError", "message": "etcdserver: key is not provided"},
    "get empty key": {"error": "EmptyKeyError"},
    "delete empty key": {"error": "EmptyKeyError"},
    "put empty value": {"revision": 4},
    "get empty value": {"kvs.0.value": b"", "kvs.0.version": 1},
})
def scenario_put_errors(c):
    t = T(c)
    w = t.watch("w.created", "k")
    t.do("ignore missing", c.put, "k", "", ignore_value=True)
    t.do("put", c.put, "k", "v")  # 2
    t.get("w.put", w)
    t.do("ignore with value", c.put, "k", "other", ignore_value=True)
    t.do("ignore ok", c.put, "k", "", ignore_value=True, prev_kv=True)  # 3
    t.get("w.ignore", w)
    t.do("get after ignore", c.get, "k")
    t.do("put empty key", c.put, "", "v")
    t.do("get empty key", c.get, "")
    t.do("delete empty key", c.delete, "")
    t.do("put empty value", c.put, "e", "")  # 4
    t.do("get empty value", c.get, "e")
    t.do("get rev", c.get, "k", count_only=True)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "dup put": {"error": "DuplicateKeyError",
                "message": "etcdserver: duplicate key given in txn request"},
    "dup put+delete range": {"error": "DuplicateKeyError"},
    "dup put+nested": {"error": "DuplicateKeyError"},
    "delete twice": {"revision": 2, "succeeded": True, "responses.0.revision": 2,
                     "responses.1.revision": 2},
    "put both branches": {"revision": 3, "succeeded": False, "responses#": 2},
    "put then get": {"revision": 4, "responses.0.revision": 4, "responses.1.revision": 4,
                     "responses.1.kvs.0.value": b"1"},
    "too many ops": {"error": "TooManyOpsError",
                     "message": "etcdserver: too many operations in txn request"},
    "128 ops": {"revision": 5},
    "inner empty key": {"error": "EmptyKeyError"},
    "inner ignore missing": {"error": "KeyNotFoundError"},
    "inner future": {"error": "FutureRevisionError"},
    "after errors": {"revision": 5, "count": 1},
    "w.128": {"revision": 5, "events#": 128, "events.127.kv.key": b"n127"},
})
def scenario_txn_errors(c):
    t = T(c)
    t.do("put q", c.put, "q", "0")  # 2
    w = t.watch("w.created", "n", prefix=True)
    t.do("dup put", c.txn, [], [op_put("q", "1"), op_put("q", "2")], [])
    t.do("dup put+delete range", c.txn, [], [op_put("q", "1"), op_delete("p", range_end="r")], [])
    t.do("dup put+nested", c.txn, [], [op_put("q", "1"), op_txn([], [op_put("q", "2")], [])], [])
    t.do("delete twice", c.txn, [], [op_delete("zz"), op_delete("zz")], [])
    t.do("put both branches", c.txn, [compare_value("q", "=", "nope")], [op_put("q", "1")],
         [op_put("q", "2"), op_put("r", "1")])  # 3: the failure branch runs
    t.do("put then get", c.txn, [], [op_put("q", "1"), op_get("q")], [])  # 4
    t.do("too many ops", c.txn, [], [op_put(f"n{i:03}", "v") for i in range(129)], [])
    t.do("128 ops", c.txn, [], [op_put(f"n{i:03}", "v") for i in range(128)], [])
    t.get("w.128", w)
    t.do("inner empty key", c.txn, [], [op_put("", "1")], [])
    t.do("inner ignore missing", c.txn, [], [op_put("missing", ignore_value=True)], [])
    t.do("inner future", c.txn, [], [op_get("q", revision=99)], [])
    t.do("after errors", c.get, "q", count_only=True)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "compact future": {"error": "FutureRevisionError",
                       "message": "etcdserver: mvcc: required revision is a future revision"},
    "compact 2": {"revision": 4},
    "compact 2 again": {"error": "CompactedError",
                        "message": "etcdserver: mvcc: required revision has been compacted"},
    "compact 1": {"error": "CompactedError"},
    "compact current": {"revision": 4},
    "compact current again": {"error": "CompactedError"},
    "get": {"revision": 4, "kvs.0.version": 3},
})
def scenario_compact_errors(c):
    t = T(c)
    t.do("put", c.put, "k", "1")  # 2
    t.do("put", c.put, "k", "2")  # 3
    t.do("put", c.put, "k", "3")  # 4
    t.do("compact future", c.compact, 5)
    t.do("compact 2", c.compact, 2)
    t.do("compact 2 again", c.compact, 2)
    t.do("compact 1", c.compact, 1)
    t.do("compact current", c.compact, 4)
    t.do("compact current again", c.compact, 4)
    t.do("get", c.get, "k")
    return t.out


@scenario({
    "w.created": {"revision": 1101, "watch_id": 0},
    "w.batch1": {"revision": 1101, "events#": 1000, "events.0.kv.mod_revision": 2,
                 "events.999.kv.mod_revision": 1001},
    "w.batch2": {"revision": 1101, "events#": 100, "events.0.kv.mod_revision": 1002,
                 "events.99.kv.mod_revision": 1101},
    "w.live": {"revision": 1102, "events#": 1},
})
def scenario_catchup_batches_of_1000_revisions(c):
    t = T(c)
    for i in range(1100):  # revisions 2..1101
        c.put("k", str(i))
    t.do("get", c.get, "k")
    w = t.watch("w.created", "k", start_revision=1)
    # etcd sends at most 1000 revisions per catch-up response
    t.get("w.batch1", w)
    t.get("w.batch2", w)
    t.do("put", c.put, "k", "live")  # 1102
    t.get("w.live", w)
    t.quiet("quiet", w)
    return t.out


@scenario({
    "a.ev": {"watch_id": 0, "revision": 4, "events#": 3, "events.0.prev_kv": None,
             "events.2.type": "DELETE"},
    "b.ev": {"watch_id": 1, "events#": 2, "events.1.prev_kv.value": b"old"},
    "c.ev": {"watch_id": 2, "events#": 1, "events.0.kv.key": b"k2"},
    "d.ev": {"watch_id": 3, "events#": 1, "events.0.type": "DELETE"},
})
def scenario_overlapping_watches(c):
    t = T(c)
    t.do("put k2", c.put, "k2", "old")  # 2
    t.do("put k3", c.put, "k3", "x")  # 3
    a = t.watch("a.created", "k", prefix=True)
    b = t.watch("b.created", "k1", range_end="k3", prev_kv=True)
    cw = t.watch("c.created", "k2", filters=("nodelete",))
    d = t.watch("d.created", "k", range_end=b"\0", filters=("noput",))
    t.do("txn", c.txn, [], [op_put("k1", "new"), op_put("k2", "new"), op_delete("k3")], [])  # 4
    t.get("a.ev", a)
    t.get("b.ev", b)
    t.get("c.ev", cw)
    t.get("d.ev", d)
    t.quiet("quiet", a, b, cw, d)
    return t.out


BIG = bytes(range(256)) * 1200  # 300 KiB, every byte value


@scenario({
    "put big": {"revision": 2},
    "w.big": {"revision": 2, "events.0.kv.value": BIG, "events.0.kv.version": 1},
    "w.big2": {"revision": 3, "events.0.kv.value": BIG[::-1], "events.0.prev_kv.value": BIG},
    "get big": {"kvs.0.value": BIG[::-1]},
    "catchup": {"revision": 4, "events#": 3, "events.0.kv.value": BIG,
                "events.2.kv.value": b"small"},
})
def scenario_large_values(c):
    t = T(c)
    w = t.watch("w.created", "big", prefix=True, prev_kv=True)
    t.do("put big", c.put, "big", BIG)  # 2
    t.get("w.big", w)
    t.do("put big2", c.put, "big", BIG[::-1], prev_kv=True)  # 3
    t.get("w.big2", w)
    t.do("put small", c.put, "big/small", "small")  # 4
    t.get("w.small", w)
    t.do("get big", c.get, "big")
    h = t.watch("catchup.created", "big", prefix=True, start_revision=2)
    t.get("catchup", h)
    t.quiet("quiet", w, h)
    return t.out


@scenario({
    "by mod desc": {"count": 5, "kvs.0.key": b"s/c", "kvs.4.key": b"s/d"},
    "by create asc limit 2": {"count": 5, "more": True, "kvs#": 2, "kvs.0.key": b"s/c"},
    "by version (asc by default)": {"kvs.0.key": b"s/b", "kvs.4.key": b"s/c"},
    "by value desc": {"kvs.0.value": b"z"},
    "max create 4": {"count": 5, "kvs#": 2, "kvs.0.key": b"s/c", "kvs.1.key": b"s/d"},
    "min mod 6 limit 1": {"count": 5, "more": True, "kvs#": 1},
    "mod 5..6 keys_only": {"count": 5, "kvs#": 1, "kvs.0.key": b"s/e", "kvs.0.value": b""},
    "filters and count_only": {"count": 5, "kvs": []},
    "txn get by create desc": {"responses.0.kvs.0.key": b"s/a", "responses.0.more": True},
})
def scenario_range_sort_and_filters(c):
    """etcd's RangeRequest sort_order / sort_target and min/max mod/create revision: the
    count is the whole range, filters apply first, then the sort, then the limit."""
    t = T(c)
    for k, v in (("s/c", "m"), ("s/d", "z"), ("s/b", "a"), ("s/e", "b"), ("s/a", "m")):
        t.do(f"put {k}", c.put, k, v)  # revisions 2..6: c=2 d=3 b=4 e=5 a=6
    t.do("put a again", c.put, "s/a", "n")  # 7: a has version 2
    t.do("put c again", c.put, "s/c", "o")  # 8: c has version 2
    t.do("by mod desc", c.get, "s/", prefix=True, sort_order="descend", sort_target="mod")
    t.do("by create asc limit 2", c.get, "s/", prefix=True, sort_order="ascend",
         sort_target="create", limit=2)
    t.do("by version (asc by default)", c.get, "s/", prefix=True, sort_target="version")
    t.do("by value desc", c.get, "s/", prefix=True, sort_order="descend", sort_target="value")
    t.do("by key desc", c.get, "s/", prefix=True, sort_order="descend")
    t.do("max create 4", c.get, "s/", prefix=True, max_create_revision=3)
    t.do("min mod 6 limit 1", c.get, "s/", prefix=True, min_mod_revision=6, limit=1)
    t.do("mod 5..6 keys_only", c.get, "s/", prefix=True, min_mod_revision=5,
         max_mod_revision=6, keys_only=True)
    t.do("filters and count_only", c.get, "s/", prefix=True, min_create_revision=4,
         count_only=True)
    t.do("past revision, by create desc", c.get, "s/", prefix=True, revision=6,
         sort_order="descend", sort_target="create")
    t.do("txn get by create desc", c.txn, success=[
        op_get("s/", prefix=True, sort_order="descend", sort_target="create", limit=1)])
    return t.out


@scenario({
    "w0.ev": {"revision": 2, "events.0.kv.key": b"\x00"},
    "wp.ev": {"revision": 3, "events.0.kv.key": b"a\x00b"},
    "get from \\0": {"count": 4},
    "get prefix a\\0": {"count": 1, "kvs.0.key": b"a\x00b"},
    "get prefix ff": {"count": 1, "kvs.0.key": b"\xff\xfe"},
    "del prefix a": {"deleted": 2, "prev_kvs.0.key": b"a\x00b", "prev_kvs.1.key": b"a\xff"},
})
def scenario_binary_keys(c):
    t = T(c)
    w0 = t.watch("w0.created", b"\x00", range_end=b"\x00\x01")
    wp = t.watch("wp.created", b"a\x00", prefix=True)
    t.do("put \\0", c.put, b"\x00", b"\x00\x01\x02")  # 2
    t.get("w0.ev", w0)
    t.do("put a\\0b", c.put, b"a\x00b", b"\xff")  # 3
    t.get("wp.ev", wp)
    t.do("put a\\xff", c.put, b"a\xff", b"")  # 4
    t.do("put \\xff\\xfe", c.put, b"\xff\xfe", b"v")  # 5
    t.do("get from \\0", c.get, b"\x00", range_end=b"\x00")
    t.do("get prefix a\\0", c.get, b"a\x00", prefix=True)
    t.do("get prefix ff", c.get, b"\xff", prefix=True)
    t.do("del prefix a", c.delete, "a", prefix=True, prev_kv=True)  # 6
    t.get("wp.del", wp)
    t.quiet("quiet", w0, wp)
    return t.out


@scenario({
    "frag.created": {"watch_id": 0, "canceled": False},
    "pn.created": {"watch_id": 1, "canceled": False},
    "frag.ev": {"revision": 2, "fragment": False, "events#": 1},
    "pn.ev": {"revision": 2, "events#": 1},
    "progress.pn": {"watch_id": -1, "revision": 2},
})
def scenario_watch_options_accepted(c):
    t = T(c)
    frag = t.watch("frag.created", "k", fragment=True)  # small responses are never split
    pn = t.watch("pn.created", "k", progress_notify=True)  # etcd's interval is 10 minutes
    t.do("put", c.put, "k", "1")  # 2
    t.get("frag.ev", frag)
    t.get("pn.ev", pn)
    c.request_progress()
    t.get("progress.frag", frag)
    t.get("progress.pn", pn)
    t.quiet("quiet", frag, pn)
    return t.out


# --------------------------------------------------------------------------- checking

_MISSING = object()


def _lookup(record, path: str):
    if path.endswith("#"):
        value = _lookup(record, path[:-1])
        return len(value) if isinstance(value, (list, tuple)) else _MISSING
    cur = record
    for part in path.split("."):
        if isinstance(cur, dict) and part in cur:
            cur = cur[part]
        elif isinstance(cur, list) and part.lstrip("-").isdigit() and -len(cur) <= int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return _MISSING
    return cur


def check_expectations(transcript, expect: dict) -> list[str]:
    problems = []
    records = {}
    for label, rec in transcript:
        records.setdefault(label, rec)
    for label, fields in expect.items():
        if label not in records:
            problems.append(f"no record labelled {label!r}")
            continue
        rec = records[label]
        if not isinstance(fields, dict):
            if rec != fields:
                problems.append(f"{label}: expected {fields!r}, got {rec!r}")
            continue
        for path, want in fields.items():
            got = _lookup(rec, path)
            if got is _MISSING:
                problems.append(f"{label}.{path}: missing in {_short(rec)}")
            elif got != want:
                problems.append(f"{label}.{path}: expected {want!r}, got {got!r}")
    return problems


def _short(value, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _field_diffs(a, b, path: str, out: list) -> None:
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))):
        out.append((path, a, b))
    elif isinstance(a, dict):
        kinds = [(d.get("_type"), "error" in d) for d in (a, b)]
        if kinds[0] != kinds[1]:  # a response against an error, or two response types
            out.append((path or " (whole record)", a, b))
            return
        for k in list(a) + [k for k in b if k not in a]:
            _field_diffs(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}", out)
    elif isinstance(a, list):
        if len(a) != len(b):
            out.append((f"{path} (length)", len(a), len(b)))
        for i, (x, y) in enumerate(zip(a, b)):
            _field_diffs(x, y, f"{path}.{i}", out)
    elif a != b:
        out.append((path, a, b))


def transcript_mismatches(etcd, shm) -> list[str]:
    """Every field that differs, as 'record #i label: field: etcd=... shmwatch=...'."""
    lines = []
    for i in range(max(len(etcd), len(shm))):
        if i >= len(etcd):
            lines.append(f"#{i} {shm[i][0]!r}: only shmwatch has it: {_short(shm[i][1])}")
            continue
        if i >= len(shm):
            lines.append(f"#{i} {etcd[i][0]!r}: only etcd has it: {_short(etcd[i][1])}")
            continue
        (la, ra), (lb, rb) = etcd[i], shm[i]
        if la != lb:
            lines.append(f"#{i}: transcripts diverge: etcd step {la!r}, shmwatch step {lb!r}")
            break
        diffs: list = []
        _field_diffs(ra, rb, "", diffs)
        for path, x, y in diffs:
            x = "<absent>" if x is _MISSING else _short(x, 200)
            y = "<absent>" if y is _MISSING else _short(y, 200)
            lines.append(f"#{i} {la!r}{path or ' (whole record)'}: etcd={x} shmwatch={y}")
    if any("transcripts diverge" in line for line in lines):
        return lines
    return lines


def assert_same_transcript(etcd, shm) -> None:
    lines = transcript_mismatches(etcd, shm)
    if not lines:
        return
    diff = difflib.unified_diff(
        pprint.pformat(etcd, width=110).splitlines(),
        pprint.pformat(shm, width=110).splitlines(),
        "etcd", "shmwatch", lineterm="", n=2,
    )
    text = "\n".join(lines[:40])
    if len(lines) > 40:
        text += f"\n... and {len(lines) - 40} more"
    pytest.fail(f"shmwatch differs from etcd:\n{text}\n\n" + "\n".join(itertools.islice(diff, 200)),
                pytrace=False)


# --------------------------------------------------------------------------- fixtures

ETCD = EtcdTranscripts(SCENARIOS, "etcd_server")


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
    # conftest's fresh broker and client; an import error in them fails, never skips
    client = request.getfixturevalue("shmwatch_client")
    shm = SCENARIOS[name](client)
    etcd = ETCD.get(name, request)
    assert_same_transcript(etcd, shm)


def test_scenario_count():
    assert len(SCENARIOS) >= 24
