"""BENCHMARKS.md and the --json document of a run, and a Run read back from that JSON.

The markdown is: the machine and run, how to read the figures, the targets, one
section per workload that has figures (sections.SECTIONS, in workload order), the
analysis of the targets not met (analysis.md, written by people from profiles), the
failed trials. Pure: a Run in, text or a dict out; nothing here measures or writes files.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .. import profiles
from ..results import Results, Run, summary
from ..transports import LABELS
from . import targets as _targets
from .sections import SECTIONS

MET = {True: "**met**", False: "**not met**", None: "not measured"}
# Where the time goes for the targets not met: written by people from profiles (it is
# analysis, not a measurement), kept beside this generator and reproduced in every report.
ANALYSIS = Path(__file__).with_name("analysis.md")
OTHERS_PCT = 10  # other users' share of the machine above which the report warns


def load_line(m: dict) -> str:
    ld = m.get("load")
    if not ld:
        return "- Machine load: not measured"
    ext = m.get("external_at_start") or []
    s = (f"- Machine load during the run: the cores were {ld['busy_pct']:.0f}% busy: "
         f"{ld['ours_pct']:.0f}% this run's processes, {ld['others_pct']:.0f}% other "
         f"processes (steal {ld['steal_pct']:.1f}%); load average "
         f"{ld['loadavg_start'][0]:.1f} at the start, {ld['loadavg_end'][0]:.1f} at the end")
    if ext:
        s += ". Busy at the start, not ours: " + "; ".join(f"`{x}`" for x in ext[:5])
    if ld["others_pct"] > OTHERS_PCT:
        s += (". **Other processes took a sizeable share of the machine: absolute figures "
              "are depressed and noisier than usual; the ratios are still same-run.**")
    return s


def _head(run: Run) -> list[str]:
    m, P = run.machine, run.profile
    L = ["# shmwatch benchmarks", "",
         "Written by `tools/bench`; do not edit by hand. Rerun to refresh.", "",
         "## Machine and run", "",
         f"- CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GiB RAM",
         f"- Python {m['python']} on {m['platform']}",
         "- " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
         f"- Date: {m['date']}",
         f"- Code: {m.get('git') or 'not a git checkout'}",
         load_line(m),
         f"- Command: `{m['command']}` (profile `{P.name}`: {P.reps} repetitions, "
         f"{P.dur:g} s of writing per throughput trial, {P.lat_dur:g} s in W3, "
         f"{P.stall_dur:g} s in W4; whole run {run.elapsed_s / 60:.1f} min)",
         ""]
    if run.skipped:
        L += [f"- Skipped {LABELS[tn]}: {why}" for tn, why in run.skipped.items()] + [""]
    return L + [
        "Figures are the median over repetitions with (min–max). Repetitions are "
        "interleaved (each runs every workload through every transport), so compare "
        "the ratios measured in this run, never absolute figures across runs: this "
        "machine is noisy.", "",
        "A record is ~100 bytes: 16-byte key, 64-byte value carrying the sequence "
        "number and the intended send time. Every watcher process decodes every "
        "record (shmwatch: `Watch.get()` builds the `WatchResponse`/`Event`/`KeyValue` "
        "objects; peers: msgpack `[key, value, seq]`, etcd: JSON + base64). Rates are "
        "records delivered per second from the first send to the last receipt. "
        "shmwatch runs a fresh broker per trial (`broker.spawn()`, default options "
        "unless said otherwise); redis-server and etcd run for the whole run on "
        "127.0.0.1.", ""]


def _targets_table(targets: list[dict]) -> list[str]:
    L = ["## Targets", "", "| target | measured | met |", "|---|---|---|"]
    L += [f"| {t['target']} | {t['measured']} | {MET[t['met']]} |" for t in targets]
    for t in targets:
        if t["note"]:
            L += ["", f"- {t['target'].split(':')[0]}: {t['note']}."]
    return L + [""]


def markdown(run: Run, targets: list[dict] | None = None) -> str:
    """BENCHMARKS.md for this run (targets computed unless given)."""
    L = _head(run) + _targets_table(_targets.compute(run) if targets is None else targets)
    for wl, section in SECTIONS.items():
        if wl in run.results:
            L += section(run)
    if ANALYSIS.exists():
        L += ANALYSIS.read_text().rstrip("\n").splitlines() + [""]
    if run.errors:
        L += ["## Failed trials", ""] + [f"- {e.splitlines()[0]}" for e in run.errors] + [""]
    return "\n".join(L) + "\n"


def as_json(run: Run, targets: list[dict] | None = None) -> dict:
    """Every figure of the run: each metric's values per repetition and their summary."""
    wl = {w: {v: {tn: {k: {"values": xs, **summary(xs)} for k, xs in metrics.items()}
                  for tn, metrics in ts.items()} for v, ts in variants.items()}
          for w, variants in run.results.data.items()}
    return {"machine": run.machine, "profile": asdict(run.profile),
            "skipped": run.skipped, "errors": run.errors, "elapsed_s": run.elapsed_s,
            "targets": _targets.compute(run) if targets is None else targets,
            "workloads": wl}


def run_from_json(doc: dict) -> Run:
    """The Run an --json document was written from (to rewrite its report)."""
    data = {w: {v: {tn: {k: s["values"] for k, s in metrics.items()}
                    for tn, metrics in ts.items()} for v, ts in variants.items()}
            for w, variants in doc["workloads"].items()}
    return Run(profile=profiles.from_dict(doc["profile"]), machine=doc["machine"],
               results=Results(data), skipped=doc["skipped"], errors=doc["errors"],
               elapsed_s=doc["elapsed_s"])
