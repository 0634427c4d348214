"""tools/stress: load a broker with writer and watcher processes, then prove every stream.

Starts an embedded broker (or attaches to one with --name), N writer processes doing
puts, deletes and multi-key txns on overlapping keys, and M watcher processes with a mix
of single-key, prefix, range and from-key watches, some with prev_kv or a filter: fast
ones, a slow one, one that stalls briefly (a victim that catches up), one that stalls
past a compaction (a victim cancelled with compact_revision), late ones replaying from
revision 1 or from the compaction point. The run compacts the store periodically (like
etcd's auto-compaction). With --chaos it SIGKILLs writers and watchers at random and
replaces each: a writer by a new one, a watcher by one resuming from its predecessor's
last delivered revision + 1 or by a late one from revision 1.

A reference watch in this process records the whole history; every stream (survivors,
killed ones up to their death, replacements) is checked against it: ordered, no gap, no
duplicate, each revision whole, filters and prev_kv right, or a correct compaction
cancel. Every acknowledged write must be in the history, every write in the history
must have been made, and the final `get` must equal the history replayed.

PASSED needs all of that, at least --min-streams streams verified with events, and the
victims and compaction the run was set up to provoke having happened. The seed is random
unless given (--seed N replays the same choices, not the same timing).

Exit status 0 when it passed, 1 when it failed, 2 on a usage or start error.

Modules, one job each, in the order of a run (run.py strings them together): start
(options, seed, broker, the reference watch: reference.py), load (the processes and the
schedule: workers.py is what the processes run, spec.py what each watcher is), drain
(every stream to a known point, the final state), verify (the checks, pure), summarize
(progress line, summary, verdict, JSON). records.py owns the files the processes leave.
"""

from .run import main

__all__ = ["main"]
