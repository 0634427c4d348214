"""The transports a run can compare, by name: shmwatch first, then the peers.

Adding a peer is one module here (a Transport with its writer and reader, see base) and
one line in CLASSES; nothing else in the tool names a transport.
"""

from __future__ import annotations

from .base import Transport
from .clientlib_watch import ShmwatchT
from .etcd_watch import EtcdT
from .mp_queue import QueueT
from .redis_pubsub import RedisT
from .zmq_pubsub import ZmqT

CLASSES: dict[str, type[Transport]] = {
    "shmwatch": ShmwatchT, "queue": QueueT, "zmq": ZmqT, "redis": RedisT, "etcd": EtcdT}
PEERS = tuple(n for n in CLASSES if n != "shmwatch")
ORDER = tuple(CLASSES)  # the order of rows in every table
LABELS = {n: cls.label for n, cls in CLASSES.items()}

__all__ = ["CLASSES", "LABELS", "ORDER", "PEERS", "Transport"]
