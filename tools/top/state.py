"""tools/top's view model: what the screen and --json show, and what changed since the
last refresh.

`Monitor` makes each published snapshot a view: uptime, process figures, writes/s and
events/s between two snapshots (on the broker's own clock) and their history, requests/s
and a state per client; a broker back under the same name with another pid or start
time resets all of that. `LiveState` is the live view's state between refreshes: the
sort column and pause the keys chose, a broker gone, back or unreadable. The table
orders live here too. Nothing here draws or touches the terminal."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .sampling import BrokerGone, Processes, StatsUnavailable, read_snapshot

HISTORY = 240  # samples of rate history kept (2 minutes at the default interval)
# the client table's sort columns, cycled by "s": largest first (pid: smallest first)
SORTS = ("lag", "fill", "cpu", "rss", "watchers", "leases", "req/s", "pid")
# How long a one-shot read retries stats that are not readable yet, and how long past
# --interval it waits for the broker to publish a newer snapshot (it publishes ~5 times
# a second, so one second means it is busy).
RETRY_S = 2.0
RETRY_PAUSE_S = 0.05
NEWER_SNAPSHOT_S = 1.0

ClientKey = tuple[int, int, int]  # slot, pid, create_time_us: one connection


def client_state(c: dict) -> str:
    if c.get("victims", 0) > 0:
        return "victim"
    if c.get("max_lag", 0) > 0:
        return "lagging"
    return "ok"


def _client_key(c: dict) -> ClientKey:
    return c["slot"], c["pid"], c["create_time_us"]


class Monitor:
    """Reads one broker's stats and adds what the broker does not publish: process
    figures (psutil), uptime, rates between snapshots and their history.

    `sample()` returns the view of the latest snapshot, or raises BrokerGone /
    StatsUnavailable. A broker with the same name but another pid / start time (a
    restart) resets rates and history."""

    def __init__(self, name: str):
        self.name = name
        self.identity: tuple | None = None
        self.restarts = 0
        self.restarted_at = 0.0
        self._reset()

    def _reset(self) -> None:
        self.prev: dict | None = None  # the previous distinct snapshot
        self.rates: tuple[float, float, float] | None = None  # writes/s, events/s, dt
        self.client_rates: dict[ClientKey, float] = {}
        self.hist_writes: deque[float] = deque(maxlen=HISTORY)
        self.hist_events: deque[float] = deque(maxlen=HISTORY)
        self.procs = Processes()

    def history(self) -> tuple[list[float], list[float]]:
        """Copies of the writes/s and events/s histories, oldest first."""
        return list(self.hist_writes), list(self.hist_events)

    def sample(self) -> dict:
        return self.enrich(read_snapshot(self.name))

    def enrich(self, stats: dict) -> dict:
        """The view of one snapshot: its fields plus broker_state, uptime_s,
        snapshot_age_s, cpu_percent, rss_bytes, writes_per_s, events_per_s,
        rate_interval_s and, per client, process figures, requests_per_s and state."""
        self._track(stats)
        now = time.time()
        view = dict(stats)
        view["broker_state"] = "alive"
        view["uptime_s"] = round(max(0.0, now - stats.get("started", now)), 3)
        view["snapshot_age_s"] = round(max(0.0, now - stats.get("time", now)), 3)
        bp = self.procs.figures(stats.get("pid", 0), None)
        view["cpu_percent"] = bp["cpu_percent"]
        view["rss_bytes"] = bp["rss_bytes"]
        if self.rates is not None:
            view["writes_per_s"] = round(self.rates[0], 2)
            view["events_per_s"] = round(self.rates[1], 2)
            view["rate_interval_s"] = round(self.rates[2], 4)
        else:
            view["writes_per_s"] = view["events_per_s"] = view["rate_interval_s"] = None
        view["clients"] = [self._client_row(c) for c in stats.get("clients", ())]
        self.procs.forget_others({(stats.get("pid", 0), None)} |
                                 {(c["pid"], c.get("create_time_us"))
                                  for c in stats.get("clients", ())})
        return view

    def _client_row(self, c: dict) -> dict:
        row = dict(c)
        row.update(self.procs.figures(c["pid"], c.get("create_time_us")))
        rate = self.client_rates.get(_client_key(c))
        row["requests_per_s"] = None if rate is None else round(rate, 2)
        row["state"] = client_state(c)
        return row

    def _track(self, stats: dict) -> None:
        """What changed since the previous snapshot: a restart (reset everything), and,
        for a newer snapshot, the rates between the two."""
        ident = (stats.get("pid"), stats.get("started"))
        if self.identity is not None and ident != self.identity:
            self.restarts += 1
            self.restarted_at = time.monotonic()
            self._reset()
        self.identity = ident
        prev = self.prev
        if prev is not None and stats.get("time", 0) <= prev.get("time", 0):
            return  # the broker has not published since: nothing to measure
        if prev is not None:
            dt = stats["time"] - prev["time"]
            w = max(0, stats["writes"] - prev["writes"]) / dt
            e = max(0, stats["events_delivered"] - prev["events_delivered"]) / dt
            self.rates = (w, e, dt)
            self.hist_writes.append(w)
            self.hist_events.append(e)
            before = {_client_key(c): c["requests"] for c in prev.get("clients", ())}
            self.client_rates = {
                _client_key(c): max(0, c["requests"] - before[_client_key(c)]) / dt
                for c in stats.get("clients", ()) if _client_key(c) in before}
        self.prev = stats


def _sample_retrying(mon: Monitor, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return mon.sample()
        except StatsUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(RETRY_PAUSE_S)


def snapshot_once(name: str, interval: float) -> dict:
    """One view; with interval > 0, rates and CPU are measured over it (the second read
    waits for the broker to publish a newer snapshot, up to NEWER_SNAPSHOT_S more)."""
    mon = Monitor(name)
    view = _sample_retrying(mon, RETRY_S)
    if interval <= 0:
        return view
    time.sleep(interval)
    deadline = time.monotonic() + NEWER_SNAPSHOT_S
    while True:
        view = _sample_retrying(mon, RETRY_S)
        if view["writes_per_s"] is not None or time.monotonic() > deadline:
            return view
        time.sleep(RETRY_PAUSE_S)


# ------------------------------------------------------------------ table orders


def _sort_key(col: str):
    def num(x):
        return -1.0 if x is None else float(x)

    return {
        "lag": lambda c: (c["max_lag"], c["victims"]),
        "fill": lambda c: c["worst_fill"],
        "cpu": lambda c: num(c.get("cpu_percent")),
        "rss": lambda c: num(c.get("rss_bytes")),
        "watchers": lambda c: c["watchers"],
        "leases": lambda c: len(c.get("leases") or ()),  # the bound leases it holds
        "req/s": lambda c: num(c.get("requests_per_s")),
        "pid": lambda c: -c["pid"],
    }[col]


def sort_clients(clients: list[dict], col: str) -> list[dict]:
    """Largest first by `col` (pid: smallest first). Ties keep pid, then slot, order,
    whatever order the broker listed them in: rows whose figures tie stay in place from
    one refresh to the next (sorted() is stable, also with reverse=True)."""
    by_identity = sorted(clients, key=lambda c: (c["pid"], c["slot"]))
    return sorted(by_identity, key=_sort_key(col), reverse=True)


def sort_watchers(rows: list[dict]) -> list[dict]:
    """The lagging watchers, most lagging first; ties in pid and watch id order (the
    broker also orders by ring fill, which moves at every snapshot)."""
    by_identity = sorted(rows, key=lambda w: (w.get("pid", 0), w.get("watch_id", 0)))
    return sorted(by_identity, key=lambda w: w.get("lag", 0), reverse=True)


def lagging_watchers(view: dict) -> list[dict]:
    """The broker's top watchers that lag or are not synced, most lagging first."""
    return sort_watchers([w for w in view.get("top_watchers", []) if w.get("lag", 0) > 0
                          or w.get("state") not in ("synced", None)])


# ------------------------------------------------------------------ the live view


@dataclass
class LiveState:
    """The live view between refreshes: what the keys chose and what became of the
    broker. Times are time.monotonic() values passed in."""

    name: str
    wait_broker: float  # how long a broker that went away is waited for
    sort_i: int = 0  # index into SORTS
    paused: bool = False
    frozen: tuple | None = None  # (view, history) shown while paused
    last: dict | None = None  # the last view read
    ever_seen: bool = False
    gone_since: float | None = None
    gone_reason: str = ""
    unavailable: str | None = None  # why the stats could not be read this time

    @property
    def sort(self) -> str:
        return SORTS[self.sort_i]

    def refresh(self, mon: Monitor, now: float) -> str | None:
        """Sample the broker; the message to exit with once it has been gone for
        `wait_broker` seconds, else None."""
        try:
            self.last = mon.sample()
            self.ever_seen = True
            self.gone_since = self.unavailable = None
        except StatsUnavailable as exc:  # alive, but no settled snapshot just now
            self.gone_since = None
            self.unavailable = str(exc)
        except BrokerGone as exc:
            self.unavailable = None
            if self.gone_since is None:
                self.gone_since = now
                self.gone_reason = (" (killed? it left its segments: `shmwatch cleanup`)"
                                    if exc.args and exc.args[0] == "stale" else "")
            if now - self.gone_since >= self.wait_broker:
                if self.ever_seen:
                    return (f"shmwatch top: broker {self.name!r} exited and no broker of "
                            f"that name came back within {self.wait_broker:g}s")
                return (f"shmwatch top: broker {self.name!r} is not running "
                        f"(waited {self.wait_broker:g}s)")
        return None

    def press(self, typed: str, mon: Monitor) -> bool:
        """Apply the keys typed: s cycles the sort column, p (or space) pauses and
        resumes; True if one of them was q."""
        quit_ = False
        for ch in typed:
            if ch in "qQ":
                quit_ = True
            elif ch in "sS":
                self.sort_i = (self.sort_i + 1) % len(SORTS)
            elif ch in "pP ":
                self.paused = not self.paused
                self.frozen = (self.last, mon.history()) if self.paused and self.last else None
        return quit_
