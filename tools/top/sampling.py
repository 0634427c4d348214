"""Reading one broker for tools/top: its shared-memory stats segment and the liveness lock
of its control segment (`broker.admin`), and the figures of its processes (psutil).

It never sends the broker a request, so watching costs the broker nothing. What it
returns is raw: rates, history and the view are state.py's."""

from __future__ import annotations

import psutil

from broker.admin import broker_info, read_stats

# A client is matched by pid *and* create time, so a recycled pid is never taken for it.
# The broker's create time (microseconds, from /proc) and psutil's agree to well within
# this; a recycled pid's process started later by far more.
CREATE_TIME_SLACK_S = 1.0


class BrokerGone(Exception):
    """The broker is not running (never was, exited, or was killed)."""


class StatsUnavailable(Exception):
    """The broker is alive but its stats could not be read just now (not published yet,
    or never settled while it was rewriting them): try again at the next refresh."""


def read_snapshot(name: str) -> dict:
    """The broker's latest published stats; BrokerGone if its lock says it is not
    running, StatsUnavailable if it is but the stats could not be read."""
    info = broker_info(name)
    if info.get("state") != "alive":
        raise BrokerGone(info.get("state", "gone"))
    try:
        return read_stats(name)
    except Exception as exc:  # segment vanished mid-read, unsettled, undecodable
        # the broker may have exited between the two reads: ask its lock again
        info = broker_info(name)
        if info.get("state") != "alive":
            raise BrokerGone(info.get("state", "gone")) from exc
        raise StatsUnavailable(f"{type(exc).__name__}: {exc}") from exc


ProcKey = tuple[int, "int | None"]  # (pid, create time in microseconds, if known)


class Processes:
    """psutil's figures of the broker's and its clients' processes, kept per process so
    CPU % is measured between two refreshes and a process's name and command line are
    remembered once it has gone."""

    def __init__(self) -> None:
        self._procs: dict[ProcKey, psutil.Process | None] = {}  # None: gone or not ours
        self._meta: dict[ProcKey, tuple[str | None, str | None]] = {}  # name, cmdline
        self._primed: set[ProcKey] = set()  # CPU % measured once: the next one is real

    def figures(self, pid: int, create_time_us: int | None) -> dict:
        """name, cmdline, alive, cpu_percent (None until measured over an interval),
        rss_bytes (None unless alive and readable)."""
        key = (pid, create_time_us)
        p = self._process(key)
        if p is None:
            return self._remembered(key, alive=False)
        try:
            with p.oneshot():
                if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
                    raise psutil.NoSuchProcess(pid)
                if key not in self._meta:
                    self._meta[key] = (p.name(), _cmdline(p))
                cpu = p.cpu_percent(None)
                rss = p.memory_info().rss
        except psutil.NoSuchProcess:  # gone (or a zombie) since the last refresh
            self._procs[key] = None
            return self._remembered(key, alive=False)
        except psutil.AccessDenied:
            return self._remembered(key, alive=True)
        out = self._remembered(key, alive=True)
        out.update(rss_bytes=rss, cpu_percent=round(cpu, 1) if key in self._primed else None)
        self._primed.add(key)
        return out

    def _remembered(self, key: ProcKey, alive: bool) -> dict:
        """What is known of a process without measuring it: its name and command line
        (as last seen), no CPU or RSS figures."""
        name, cmd = self._meta.get(key, (None, None))
        return {"alive": alive, "name": name, "cmdline": cmd, "cpu_percent": None,
                "rss_bytes": None}

    def _process(self, key: ProcKey) -> psutil.Process | None:
        if key in self._procs:
            return self._procs[key]
        pid, create_time_us = key
        try:
            p = psutil.Process(pid)
            if create_time_us and abs(p.create_time() - create_time_us / 1e6) > \
                    CREATE_TIME_SLACK_S:
                p = None  # the pid was recycled: not our client
        except psutil.Error:
            p = None
        self._procs[key] = p
        return p

    def forget_others(self, keep: set[ProcKey]) -> None:
        """Drop what is known of the processes not in `keep` (departed clients)."""
        for k in [k for k in self._procs if k not in keep]:
            self._procs.pop(k, None)
            self._meta.pop(k, None)
            self._primed.discard(k)


def _cmdline(p: psutil.Process) -> str | None:
    try:
        return " ".join(p.cmdline()) or None
    except psutil.AccessDenied:
        return None
