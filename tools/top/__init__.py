"""tools/top: a live monitor of a running shmwatch broker, like htop or `redis-cli --stat`.

    shmwatch top [--name NAME] [--interval 0.5] [--wait-broker 30]
    shmwatch top [--name NAME] --once [--json]
    shmwatch top --list [--json]

(or `python3 tools/top ...` from a checkout, `python3 -m shmwatch.tools.top ...`).

It reads the broker's shared-memory stats segment (`broker.admin.read_stats`: a seqlock
snapshot the broker publishes ~5 times a second) and its control segment's liveness lock
(`broker_info`); it never sends the broker a request, so watching costs the broker nothing.
Process figures (CPU %, RSS, command) come from psutil; a process is matched by pid *and*
create time, so a recycled pid is never mistaken for a client.

Shown: the broker's pid, uptime, CPU and RSS; revision and compact revision; the revision
log's fill and the revisions it holds; writes/s and events delivered/s (rates between two
published snapshots, on the broker's own clock) with their recent history as sparklines;
watchers by state and pending events; one row per client (pid, the client's label --
by default its multiprocessing process name, or its script and pid -- or, from a broker
that publishes no labels, its command line; CPU, RSS, watchers, requests/s, worst
watch-ring fill, lag in revisions, state), sorted by lag with victims marked; and the
most lagging watchers. Rows whose sort figures tie stay in pid order, so they do not
move between refreshes.

Keys: q quits, s cycles the sort column, p pauses (the screen freezes; sampling goes on,
so the rates and history stay whole). A broker that exits is reported, its figures
replaced by dashes; the monitor waits --wait-broker seconds for a broker of the same name
to come back (then shows it), else exits with 1.

--once prints one snapshot (rich when stdout is a terminal, plain text otherwise), with
rates and CPU measured over one --interval; --json prints it as JSON: the read_stats fields
plus broker_state, uptime_s, snapshot_age_s, cpu_percent, rss_bytes, writes_per_s,
events_per_s, rate_interval_s (null when not measurable) and, per client, the broker's
fields (with `label` from a broker that publishes it) plus name, cmdline, alive,
cpu_percent, rss_bytes, requests_per_s and state ("victim" if it has victims, "lagging"
if max_lag > 0, else "ok").

Exit status: 0 normally, 1 when the broker is not running or went away for good, 2 on a
usage error (e.g. several brokers are running and no --name was given).

Modules, one job each: sampling (the stats segment, psutil), state (the view model:
rates, history, table orders, what changed), header / clients / watchers (the screen's
sections), screen (the sections put together for a height), keys and live (the live
view's terminal and loop), cli (options, --list, --once, --json), fmt (how a figure is
written).
"""

from .cli import main

__all__ = ["main"]
