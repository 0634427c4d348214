"""Worker functions for the slow-reader and memory-bound tests (run in 'spawn' children).

Each writes what it saw to a file (msgpack, via tests.mp_workers.report) and exits
non-zero on error."""

from __future__ import annotations

import time


from tests.mp_workers import WORKER_DEADLINE_S, report


def full_speed_writer(name: str, prefix: str, seconds: float, value_size: int,
                      out_path: str, start) -> None:
    """Synchronous puts as fast as they go for `seconds`; reports every revision."""
    import clientlib

    with clientlib.connect(name, timeout=30) as c:
        start.wait(WORKER_DEADLINE_S)
        value = b"v" * value_size
        revs = []
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            revs.append(c.put(f"{prefix}{i % 64:02d}", value).revision)
            i += 1
        report(out_path, {"revs": revs})


def _anon() -> int:
    """This process's RssAnon (private resident memory), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def slow_reader(name: str, prefix: str, sleep_s: float, out_path: str, ready, last_rev) -> None:
    """Watch `prefix` from now, sleeping `sleep_s` after every response, until the event
    of revision `last_rev.value` (set by the test once the writer is done) arrives.
    Reports every event's revision, the events per response, and its private memory
    over time (RssAnon: what it holds of its own; its RSS also counts the pages of the
    broker's shared revision log it read while catching up itself)."""
    import clientlib

    with clientlib.connect(name, timeout=30) as c:
        w = c.watch(prefix, prefix=True)
        created = w.get(10)
        ready.set()
        rss = [_anon()]
        revs: list[int] = []
        sizes: list[int] = []
        deadline = time.monotonic() + WORKER_DEADLINE_S
        while time.monotonic() < deadline:
            try:
                resp = w.get(0.2)
            except clientlib.Timeout:
                if last_rev.value and revs and revs[-1] >= last_rev.value:
                    break
                continue
            if resp.events:
                revs.extend(e.kv.mod_revision for e in resp.events)
                sizes.append(len({e.kv.mod_revision for e in resp.events}))
            if len(sizes) % 50 == 0:
                rss.append(_anon())
            if last_rev.value and revs and revs[-1] >= last_rev.value:
                break
            time.sleep(sleep_s)
        rss.append(_anon())
        report(out_path, {"created": created.revision, "revs": revs, "sizes": sizes,
                          "rss": rss})
