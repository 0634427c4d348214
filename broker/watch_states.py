"""The watcher life cycle of the watch core (broker/watch.py): its states, the whole
transition table, and what triggers each transition. Pure data.

Life cycle: `TRANSITIONS` is the whole table, and every change of state goes through it.

    NEW       --created_live-->  SYNCED     start_revision 0 or in the future
    NEW       --created_past-->  UNSYNCED   start_revision in the past
    SYNCED    --ring_full-->     VICTIM     minRev = the revision its ring refused
    VICTIM    --room_behind-->   UNSYNCED   its ring has room again; history to catch up
    VICTIM    --room_current-->  SYNCED     ... and nothing happened meanwhile
    UNSYNCED  --caught_up-->     SYNCED
    UNSYNCED  --more-->          UNSYNCED   etcd's moreRev: more history remains
    UNSYNCED  --ring_full-->     VICTIM     its ring is too full for a catch-up
    UNSYNCED  --compacted-->     CANCELING  minRev below the compaction point
    any live  --cancel-->        CANCELING  its final `canceled` response is pending
    CANCELING --delivered-->     REMOVED
    any       --dropped-->       REMOVED    its client is gone: nothing more is sent

Triggers, all in one place:
- created_*: `create()` (the client's watch-create request).
- ring_full: `notify()` (a live revision its ring could not take at all, or only in
  part) and `sync_watchers()` (a ring less than `VICTIM_RESUME_FREE` free, or its
  owner over budget, or a catch-up its ring could not take whole).
- room_*: `move_victims()`, which the shell calls when a client hints that it made
  room in a ring (`producer_blocked` + the control segment's space hint) and on a
  timer (etcd's syncVictimsLoop period) as the safety net.
- caught_up / more / compacted: `sync_watchers()`, each shell pass while any watcher
  is unsynced (caught_up also when it hands a watcher its catch-up to make itself).
- cancel: `cancel()` (the client's cancel request).
- delivered: the final response written (`cancel()`, `move_victims()`).
- dropped: `drop_stream()` (the client left or died).
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    NEW = "new"
    SYNCED = "synced"
    UNSYNCED = "unsynced"
    VICTIM = "victim"
    CANCELING = "canceling"
    REMOVED = "removed"


S = State
# etcd's words for the states, as module names.
SYNCED, UNSYNCED, VICTIM, CANCELING, REMOVED = (S.SYNCED, S.UNSYNCED, S.VICTIM, S.CANCELING,
                                                S.REMOVED)
TRANSITIONS: dict[tuple[State, str], State] = {
    (S.NEW, "created_live"): S.SYNCED,
    (S.NEW, "created_past"): S.UNSYNCED,
    (S.SYNCED, "ring_full"): S.VICTIM,
    (S.SYNCED, "cancel"): S.CANCELING,
    (S.SYNCED, "behind"): S.UNSYNCED,  # a mirror lost revisions it had not delivered
    (S.VICTIM, "room_behind"): S.UNSYNCED,
    (S.VICTIM, "room_current"): S.SYNCED,
    (S.VICTIM, "cancel"): S.CANCELING,
    (S.UNSYNCED, "caught_up"): S.SYNCED,
    (S.UNSYNCED, "more"): S.UNSYNCED,
    (S.UNSYNCED, "ring_full"): S.VICTIM,
    (S.UNSYNCED, "compacted"): S.CANCELING,
    (S.UNSYNCED, "cancel"): S.CANCELING,
    (S.CANCELING, "cancel"): S.CANCELING,
    (S.CANCELING, "delivered"): S.REMOVED,
    **{(s, "dropped"): S.REMOVED
       for s in (S.NEW, S.SYNCED, S.UNSYNCED, S.VICTIM, S.CANCELING)},
}
