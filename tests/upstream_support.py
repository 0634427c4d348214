"""Helpers for the mirroring-broker tests: skip rules, etcdctl, a counting writer, and the
comparison of a local watch stream with a direct etcd watch, revision by revision."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from urllib.parse import urlparse

import pytest

import clientlib
from shmwatch.wire import errors as E
from tests.etcd_support import EtcdClient

try:
    import pyetcd  # noqa: F401  (the extra `etcd`)
    HAVE_LIB = True
except ImportError:
    HAVE_LIB = False

needs_upstream = pytest.mark.skipif(
    not HAVE_LIB, reason="the extra `etcd` is not installed (pip install -e '.[etcd]'): "
                         "the mirroring broker needs etcd-sdk-python")
ETCDCTL = shutil.which("etcdctl")


def etcdctl(endpoint: str, *args: str) -> str:
    """Run etcdctl (v3 API) against one endpoint; its stdout."""
    if ETCDCTL is None:
        pytest.skip("etcd-client not installed (apt-get install etcd-client)")
    env = dict(os.environ, ETCDCTL_API="3")
    out = subprocess.run([ETCDCTL, "--endpoints", endpoint, "--command-timeout=5s", *args],
                         env=env, capture_output=True, timeout=20)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


def gateway(url: str) -> EtcdClient:
    u = urlparse(url)
    return EtcdClient(u.hostname, u.port, timeout=5)


def by_revision(events) -> dict[int, list]:
    """{revision: [(type, kv, prev_kv), ...]} of a list of events."""
    out: dict[int, list] = {}
    for ev in events:
        out.setdefault(ev.kv.mod_revision, []).append((ev.type, ev.kv, ev.prev_kv))
    return out


def collect(watch, until_rev: int, timeout: float = 20.0) -> list:
    """Every event of a watch (shmwatch's or EtcdClient's) until revision `until_rev`."""
    events: list = []
    deadline = time.monotonic() + timeout
    while not events or events[-1].kv.mod_revision < until_rev:
        left = deadline - time.monotonic()
        assert left > 0, f"watch stalled at {events[-1].kv.mod_revision if events else None}"
        resp = watch.get(timeout=left)
        events += resp.events
    return events


def direct_events(url: str, prefix: str, start: int, until_rev: int) -> list:
    """etcd's own watch of `prefix` from `start` with prev_kv, up to `until_rev`."""
    with gateway(url) as c:
        w = c.watch(prefix, prefix=True, start_revision=start, prev_kv=True)
        return collect(w, until_rev)


def assert_same_stream(local: list, direct: list) -> int:
    """The two event lists hold the same revisions with the same events; how many."""
    a, b = by_revision(local), by_revision(direct)
    assert sorted(a) == sorted(b), (
        f"revisions differ: local-only {sorted(set(a) - set(b))[:10]}, "
        f"etcd-only {sorted(set(b) - set(a))[:10]}")
    for rev in b:
        assert a[rev] == b[rev], f"revision {rev}: local {a[rev]} != etcd {b[rev]}"
    revs = [ev.kv.mod_revision for ev in local]
    assert revs == sorted(revs), "local stream out of order"
    return len(b)


class Writer(threading.Thread):
    """Puts `<prefix>w<i>` = `<i>` through a broker until stopped; records what was
    acknowledged (key, value, revision) and the errors (typed, never silent)."""

    def __init__(self, name: str, prefix: str, timeout: float = 10.0, pause: float = 0.005):
        super().__init__(daemon=True)
        self.broker_name, self.prefix, self.timeout, self.pause = name, prefix, timeout, pause
        self.acked: list[tuple[bytes, bytes, int]] = []
        self.errors: list[Exception] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with clientlib.connect(self.broker_name, timeout=self.timeout) as c:
            i = 0
            while not self._halt.is_set():
                key, value = f"{self.prefix}w{i % 50}".encode(), str(i).encode()
                try:
                    r = c.put(key, value)
                    self.acked.append((key, value, r.revision))
                except (E.UpstreamUnavailable, E.Timeout) as exc:
                    self.errors.append(exc)
                i += 1
                time.sleep(self.pause)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)


def assert_acked_in(acked, events) -> int:
    """Every acknowledged write is in the stream at its revision; how many."""
    at = {(ev.kv.key, ev.kv.mod_revision): ev.kv.value for ev in events}
    for key, value, rev in acked:
        assert at.get((key, rev)) == value, f"acknowledged put {key!r}={value!r}@{rev} missing"
    return len(acked)
