"""Broker options (`BrokerConfig`) and what they reserve in /dev/shm.

Defaults follow etcd where etcd has one; sizes left as None are chosen from the free
space of /dev/shm (`broker.sizing`). Documented in the README's "Broker options".
"""

from __future__ import annotations

import grp
from dataclasses import dataclass, field

from shm.ring import MIN_CAPACITY, check_capacity
from shm.segment import shm_name

from .sizing import Sizing, budget, plan
from .sizing import start_bytes as start_bytes_for

STATS_BYTES = 1 << 20  # the stats segment tools/top reads


@dataclass
class BrokerConfig:
    """Broker options; defaults follow etcd where etcd has one (documented in README).

    Sizes left as None are chosen from the free space of /dev/shm (`broker.sizing`)
    when the config is made; `sizing` records what they were sized from. Bad values
    raise ValueError naming the command-line option.
    """

    name: str
    log_bytes: int | None = None  # None: a quarter of /dev/shm's free space, <= 64 MiB
    watch_ring_bytes: int | None = None  # None: 256 KiB, less on a small /dev/shm
    request_ring_bytes: int | None = None  # None: 1 MiB, less on a small /dev/shm
    response_ring_bytes: int | None = None  # None: 1 MiB, less on a small /dev/shm
    max_request_bytes: int = 1536 * 1024  # etcd --max-request-bytes
    max_clients: int = 256
    rings_per_arena: int = 32
    progress_notify_interval: float = 600.0  # etcd's default: 10 minutes
    max_watchers_per_sync: int = 512  # etcd's maxWatchersPerSync
    mode: int = 0o600
    data_dir: str | None = None  # durability: WAL + snapshots; None = in memory only
    fsync: str = "always"  # always | batch | never (see broker/wal.py)
    snapshot_every: int = 100_000  # WAL records between snapshots
    group: str | None = None  # share with this group (give --mode 660 too)
    # Memory a client can make the broker hold (README, "Broker options"):
    max_response_bytes: int = 64 << 20  # largest reply (a range); larger -> typed error
    max_client_backlog_bytes: int = 64 << 20  # watch responses held for one client
    max_watchers_per_client: int = 1000  # each watch is a ring in /dev/shm
    min_lease_ttl: int = 2  # etcd's minimum TTL with its default election timeout
    max_leases: int = 100_000  # leases that may exist at once
    client_catch_up: bool = True  # watchers catch up from the shared log themselves
    shm_budget: int | None = None  # assume /dev/shm has this much free (None: measure)
    # Mirror a real etcd cluster (README, "Beyond one host"; needs the extra `etcd`):
    upstream: str | None = None  # etcd client URLs, comma-separated
    upstream_prefix: str = ""  # mirror only the keys under this prefix
    upstream_timeout: float = 5.0  # seconds a forwarded request may take (then an error)
    consistency: str = "l"  # reads: l = linearizable (etcd's default), s = serializable
    sizing: Sizing = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        shm_name(self.name, "ctl")  # ValueError for a bad name, before anything exists
        for opt, value in (("--max-clients", self.max_clients),
                           ("--rings-per-arena", self.rings_per_arena),
                           ("--max-request-bytes", self.max_request_bytes),
                           ("--max-watchers-per-sync", self.max_watchers_per_sync),
                           ("--snapshot-every", self.snapshot_every),
                           ("--max-watchers-per-client", self.max_watchers_per_client),
                           ("--max-response-bytes", self.max_response_bytes),
                           ("--min-lease-ttl", self.min_lease_ttl),
                           ("--max-leases", self.max_leases)):
            if value < 1:
                raise ValueError(f"{opt} must be at least 1, got {value}")
        if not 0 < self.progress_notify_interval < float("inf"):  # also refuses nan
            # 0 or less made an idle broker notify on every pass: a core spinning.
            raise ValueError(f"--progress-notify-interval must be a positive number of "
                             f"seconds, got {self.progress_notify_interval}")
        if self.mode & ~0o777 or self.mode & 0o002:
            raise ValueError(f"--mode {self.mode:o}: clients refuse a broker whose shared "
                             f"memory everyone may write; give permission bits such as 600, "
                             f"or 660 with --group")
        if self.group is not None and not str(self.group).isdigit():
            try:
                grp.getgrnam(self.group)
            except KeyError:
                raise ValueError(f"--group: no group named {self.group!r}") from None
        if isinstance(self.upstream, (list, tuple)):
            self.upstream = ",".join(self.upstream)
        if self.upstream and self.data_dir:
            raise ValueError("--data-dir and --upstream: a mirroring broker keeps nothing "
                             "on disk (etcd is the store)")
        if self.consistency not in ("l", "s"):
            raise ValueError(f"--consistency must be l or s (etcd's), got {self.consistency!r}")
        if not 0 < self.upstream_timeout < float("inf"):
            raise ValueError(f"--upstream-timeout must be positive, got {self.upstream_timeout}")
        if self.shm_budget is not None and self.shm_budget < 0:
            raise ValueError(f"--shm-budget must be a size, got {self.shm_budget}")
        free, source = budget(self.shm_budget)
        self.sizing = sized = plan(
            free, source, rings_per_arena=self.rings_per_arena, log_bytes=self.log_bytes,
            request_ring_bytes=self.request_ring_bytes,
            response_ring_bytes=self.response_ring_bytes,
            watch_ring_bytes=self.watch_ring_bytes)
        for attr in ("log_bytes", "request_ring_bytes", "response_ring_bytes",
                     "watch_ring_bytes"):
            value = getattr(sized, attr)
            option = "--" + attr.replace("_", "-")
            try:
                check_capacity(value, option)
            except ValueError:
                raise ValueError(f"{option} {value}: a size must be a multiple of 8 and at "
                                 f"least {MIN_CAPACITY} bytes") from None
            setattr(self, attr, value)


def start_bytes(cfg: BrokerConfig) -> int:
    """What the broker takes in /dev/shm before any client connects."""
    return start_bytes_for(cfg.log_bytes, cfg.max_clients, STATS_BYTES)
