"""The start of a stress run: its options, its seed, the broker (embedded with small
explicit sizes, or the one given by --name), a client of it, the store as it was at the
start, and the reference watch from there (reference.py)."""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile

import broker
import clientlib
from broker.admin import read_stats
from broker.sizing import parse_size

from .records import kv_tuple
from .reference import Reference
from .spec import CONNECT_TIMEOUT_S

DESCRIPTION = ("tools/stress: load a broker with writer and watcher processes, then prove "
               "every stream.")
# Sizes of the embedded broker. They fit a 64 MB /dev/shm with room to spare: the log,
# plus per client 2 x 256 KiB request/response rings and 2 watch rings (~15 clients).
EMBEDDED = {"request_ring_bytes": 256 << 10, "response_ring_bytes": 256 << 10,
            "rings_per_arena": 2}
SEED_RANGE = 1 << 31  # seeds short enough to type back as --seed
COMPACTIONS_PER_RUN = 4  # the default --compact-every: a quarter of --duration


class Setup:
    """What a run starts from and keeps until it closes: options `a`, `seed` and the
    random choices drawn from it (`rnd`), the compaction `interval` (0: never), the
    broker `name` (and `handle` if embedded), a `client`, the store at the start (`base`
    revision, `initial` kv tuples, `stats0`), the reference, a folder for the records."""

    def __init__(self, a: argparse.Namespace):
        self.a = a
        self.seed = a.seed if a.seed is not None else random.SystemRandom().randrange(SEED_RANGE)
        self.rnd = random.Random(self.seed)
        self.interval = a.compact_every if a.compact_every is not None else (
            0.0 if a.name else a.duration / COMPACTIONS_PER_RUN)
        self.tmp = tempfile.mkdtemp(prefix="shmwatch-stress-")
        self.name = a.name
        self.handle: broker.BrokerProcess | None = None
        self.client: clientlib.Client | None = None
        self.stats0: dict = {}
        self.base = 0
        self.initial: list = []
        self.ref: Reference | None = None

    def start(self) -> None:
        if not self.name:
            extra = {"upstream": self.a.upstream} if self.a.upstream else {}
            self.handle = broker.spawn(**EMBEDDED, log_bytes=self.a.log_bytes,
                                       watch_ring_bytes=self.a.watch_ring_bytes, **extra)
            self.name = self.handle.name
        self.client = clientlib.connect(self.name, timeout=CONNECT_TIMEOUT_S)
        self.stats0 = self.read_stats() or {}
        init = self.client.get("", prefix=True)
        self.base, self.initial = init.revision, [kv_tuple(kv) for kv in init.kvs]
        self.ref = Reference(self.client, self.base)
        self.ref.start()

    def read_stats(self) -> dict | None:
        """The broker's published stats, or None if they cannot be read just now."""
        try:
            return read_stats(self.name)
        except Exception:  # not published yet, unsettled, or the broker is going away
            return None

    def path(self, worker: str) -> str:
        """Where worker `worker` records what it does."""
        return os.path.join(self.tmp, worker)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.handle is not None:
            self.handle.stop()
        shutil.rmtree(self.tmp)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/stress", description=DESCRIPTION)
    p.add_argument("--name", help="attach to this running broker instead of embedding one")
    p.add_argument("--upstream", metavar="URLS", default=None,
                   help="embed a broker mirroring this etcd cluster (client URLs, "
                        "comma-separated; needs the extra `etcd`) and verify through it")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load (default 8)")
    p.add_argument("--writers", type=int, default=3, help="writer processes (default 3)")
    p.add_argument("--watchers", type=int, default=8,
                   help="watcher processes at the start (default 8)")
    p.add_argument("--keys", type=int, default=48, help="distinct keys written")
    p.add_argument("--slow", type=int, default=1, help="watchers that sleep 1 ms per response")
    p.add_argument("--stall", type=int, default=1,
                   help="watchers that stop reading for half a compaction interval: victims "
                        "that catch up")
    p.add_argument("--stall-long", type=int, default=1,
                   help="watchers that stop reading for most of the run: victims cancelled "
                        "with compact_revision (needs compaction)")
    p.add_argument("--late", type=int, default=2,
                   help="watchers started late: from revision 1, from the compaction point, "
                        "in turn")
    p.add_argument("--chaos", action="store_true",
                   help="SIGKILL writers and watchers in turn (every 0.4-0.9 s) and replace "
                        "each")
    p.add_argument("--compact-every", type=float, default=None, metavar="SECONDS",
                   help="compact the store this often, keeping one interval of history "
                        "(default: duration/4 for the embedded broker, 0 = never with --name)")
    p.add_argument("--min-streams", type=int, default=None,
                   help="streams that must be verified with events to pass, at least 1 "
                        "(default max(4, --watchers))")
    p.add_argument("--log-bytes", type=parse_size, default="16M",
                   help="embedded broker's revision log (default 16M)")
    p.add_argument("--watch-ring-bytes", type=parse_size, default="64k",
                   help="embedded broker's per-watcher ring (default 64k: small, so stalled "
                        "watchers become victims)")
    p.add_argument("--seed", type=int, default=None,
                   help="replay the random choices of a run (default: a random seed, printed)")
    p.add_argument("--scenario", choices=("streams", "lock", "registry"), default="streams",
                   help="streams: writers and watchers, every stream proved (the default); "
                        "lock: lockers contending for one clientlib.concurrency.Lock, "
                        "checked for mutual exclusion; registry: workers registered with "
                        "bound leases, SIGKILLed, their keys proved gone (registry.py)")
    p.add_argument("--registry-workers", type=int, default=6,
                   help="registry: worker processes registered at a time (default 6)")
    p.add_argument("--release-bound", type=float, default=1.0, metavar="SECONDS",
                   help="registry: a killed worker's key must be deleted within this "
                        "(default 1.0)")
    p.add_argument("--json", metavar="FILE", help="write the summary as JSON ('-' = stdout)")
    p.add_argument("--quiet", action="store_true", help="no live display")
    p.add_argument("--lockers", type=int, default=4,
                   help="--scenario lock: locker processes (default 4)")
    p.add_argument("--min-acquisitions", type=int, default=10,
                   help="--scenario lock: acquisitions that must be verified to pass "
                        "(default 10, at least 1)")
    a = p.parse_args(argv)
    if a.min_streams is None:
        a.min_streams = max(4, a.watchers)
    if a.duration <= 0 or min(a.writers, a.watchers, a.slow, a.stall, a.stall_long,
                              a.late) < 0 or a.keys < 4:
        p.error("--duration must be > 0, counts >= 0, --keys >= 4")
    if a.lockers < 2 or a.min_acquisitions < 1:
        p.error("--lockers must be at least 2 and --min-acquisitions at least 1")
    if a.min_streams < 1:
        # A verdict must rest on something: PASSED never means "nothing was verified".
        p.error("--min-streams must be at least 1")
    if a.registry_workers < 1 or a.release_bound <= 0:
        p.error("--registry-workers must be >= 1, --release-bound > 0")
    if a.compact_every is not None and a.compact_every < 0:
        p.error("--compact-every must be >= 0")
    return a
