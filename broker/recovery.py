"""The broker's state rebuilt from its data directory, and the snapshot it writes there.

Part of the broker's shell (broker/server.py), kept apart because it runs once, at
start: `recover` restores the snapshot (store, revision log, leases) and replays the WAL
records after it through the broker's own write path, so a replayed write changes the
store exactly as it did the first time. A record or snapshot that passed its checksums
but cannot be replayed is corruption too: `WalCorrupt`, never a traceback.

Leases: a restart renews every lease to its full TTL (etcd's `Promote` on a new
leader). Bound leases belonged to clients of the broker that stopped: they are revoked
once the replay is done, and that revoke is logged, so a second restart agrees.
"""

from __future__ import annotations

import logging
import os
import time

from shm import layout as L
from shmwatch.wire import errors
from shmwatch.wire.protocol import decode_op

from .history import HistoryDamaged
from .mvcc import MVCCStore
from .wal import KIND_KV, KIND_LEASE_GRANT, KIND_LEASE_REVOKE, Record, WalCorrupt

log = logging.getLogger("shmwatch.broker")

# The owner of bound leases read back from the data directory (their clients are gone).
RESTARTED = "restarted"


def recover(b, snap: dict | None, records: list[Record]) -> None:
    """Rebuild broker `b`'s store, revision log and leases from the data directory's
    snapshot and WAL records (checked by `DataDir.load`)."""
    wal = b.wal
    now = time.monotonic()
    if snap is not None:
        try:
            b._set_store(MVCCStore.restore(snap["mvcc"]))
            b.history.restore(snap["log"])
            for lease_id, ttl, bound in snap.get("leases", ()):
                b.lessor.restore(lease_id, ttl, now, RESTARTED if bound else None)
        except Exception as exc:  # any failure: the snapshot is not one we wrote
            path = os.path.join(wal.path, "snap")
            raise WalCorrupt(f"snapshot {path} passes its checksum but cannot be "
                             f"restored ({exc!r}); refusing to start", path) from exc
    for r in records:
        try:
            replay(b, r)
        except Exception as exc:  # these records replayed once already: not ours
            raise WalCorrupt(
                f"WAL {wal.wal_path} is corrupt at offset {r.offset}: record "
                f"{r.seq} passes its checksums but cannot be replayed ({exc!r}); "
                f"refusing to start; nothing was changed", wal.wal_path, r.offset) from exc
    for lease_id in b.lessor.owned_by(RESTARTED):
        b._revoke(lease_id)
    wal.commit(time.monotonic())
    b._pending.clear()  # nobody watches yet
    b.core.cur_rev = b.mvcc.rev
    b.core.compact(b.mvcc.compact_rev)
    b.words[L.CTL_REVISION] = b.mvcc.rev
    b.words[L.CTL_COMPACT_REV] = b.mvcc.compact_rev
    log.info("recovered revision %d (compacted at %d) from %s: snapshot %s, %d WAL records, "
             "%d leases", b.mvcc.rev, b.mvcc.compact_rev, b.cfg.data_dir,
             "yes" if snap else "no", len(records), len(b.lessor))


def replay(b, r: Record) -> None:
    """Apply one WAL record to broker `b` again (nothing is logged twice)."""
    if r.kind == KIND_KV:
        rev = b.mvcc.rev
        b._apply(decode_op(r.payload), r.payload, durable=False)
        if b.mvcc.rev != rev + 1:  # only changes are logged
            raise ValueError("the write changes nothing")
    elif r.kind == KIND_LEASE_GRANT:
        lease_id, ttl, bound = r.payload
        b.lessor.restore(lease_id, ttl, time.monotonic(), RESTARTED if bound else None)
    elif r.kind == KIND_LEASE_REVOKE:
        b._revoke(r.payload, durable=False)
    else:
        try:
            b._do_compact(r.payload)
        except errors.CompactedError:
            pass  # a smaller --log-bytes than before compacted past it


def snapshot_doc(b) -> dict:
    """What a snapshot of broker `b` holds: the store, the revision log, the leases
    (deadlines are not kept: a restart renews them). The caller committed the batch."""
    while True:
        try:
            entries = b.history.entries()
            break
        except HistoryDamaged as exc:
            b._contain(exc)
    return {"mvcc": b.mvcc.snapshot(), "log": entries, "leases": b.lessor.snapshot()}
