"""A user's program, as people write them: one module-level client, shared by a Pool.

    SHMWATCH_NAME=broker python -m tests.fork_app METHOD N

With METHOD "fork" every Pool worker inherits the module-level client (the case that
used to lose writes); with "spawn" and "forkserver" each worker imports this module and
so connects its own. Each of N tasks puts a key of its own and reads it back; the
program prints one JSON document for the test to check (tests/test_fork.py).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys

import clientlib

client = clientlib.connect(os.environ["SHMWATCH_NAME"], timeout=30)


def work(i: int) -> list:
    key = f"fork/{i:05d}"
    value = f"{i}:{os.getpid()}"
    put = client.put(key, value)
    got = client.get(key)
    kv = got.kvs[0]
    return [i, os.getpid(), put.revision, kv.value.decode(), kv.mod_revision, got.revision]


def main() -> None:
    method, n = sys.argv[1], int(sys.argv[2])
    before = client.put("fork/parent", "before").revision
    with mp.get_context(method).Pool(4) as pool:
        results = pool.map(work, range(n), chunksize=25)
    after = client.put("fork/parent", "after")
    stored = client.get("fork/", prefix=True)
    print(json.dumps({
        "parent": os.getpid(), "before": before, "after": after.revision,
        "results": results,
        "stored": {kv.key.decode(): [kv.value.decode(), kv.mod_revision] for kv in stored.kvs},
    }))


if __name__ == "__main__":
    main()
