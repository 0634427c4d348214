"""`tools/bench --smoke` runs every workload end to end and reports shmwatch figures.

No timing assertions: the figures only have to exist and be positive (a benchmark on a
noisy 2-core machine is not a test). Peers are optional: whichever are installed run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (workload, metric) that must be > 0 for shmwatch in every variant of the workload
REQUIRED = {
    "W1": ["rate"],
    "W2": ["rate"],
    "W3": ["p50", "p99", "p999", "samples"],
    "W4": [],  # checked below: variants differ
    "W5": ["write_rate", "cpu_us_per_write"],
    "MEM": [],  # checked below: metric names carry the checkpoint
    "LIGHT": [],  # checked below: the idle variant has other figures
    "CATCHUP": ["watchers_us_per_event", "replayed", "exact"],  # the broker may use ~0
    "LEASE": ["n", "max_ms"],  # and etcd's below, when it ran
}


@pytest.mark.timeout(180)
def test_bench_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench"), "--smoke", "--json", str(out_json)],
        cwd=tmp_path,  # --smoke must not write BENCHMARKS.md anywhere: check the cwd below
        capture_output=True, text=True, timeout=170,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    problems = [ln for ln in proc.stderr.splitlines()
                if ln.lstrip().startswith(("FAILED", "warning", "Traceback", "RuntimeError"))]
    assert proc.returncode == 0, (f"exit {proc.returncode}; problems: {problems}\n"
                                  f"stderr tail:\n{proc.stderr[-4000:]}")
    assert not (tmp_path / "BENCHMARKS.md").exists(), "--smoke wrote BENCHMARKS.md"
    data = json.loads(out_json.read_text())
    wl = data["workloads"]
    assert set(wl) == set(REQUIRED), sorted(wl)
    for name, metrics in REQUIRED.items():
        assert wl[name], f"{name}: no variant ran"
        for variant, transports in wl[name].items():
            if name == "W4" and variant == "kept":
                assert transports["shmwatch"]["kept"]["median"] > 0
                continue
            assert "shmwatch" in transports, f"{name} {variant}: no shmwatch figures"
            figs = transports["shmwatch"]
            for m in metrics:
                assert figs[m]["median"] > 0, f"{name} {variant} {m}: {figs[m]}"
            if name == "W4":
                assert figs["fast_rate"]["median"] > 0, f"W4 {variant}: {figs}"
                if "stalled_got" in figs:
                    assert figs["stalled_got"]["median"] > 0, f"W4 {variant}: {figs}"
            if name == "LIGHT":
                key = "broker_core" if variant == "idle" else "cpu_us_per_write"
                assert figs[key]["median"] > 0, f"LIGHT {variant}: {figs}"
            if name == "CATCHUP":
                assert figs["exact"]["min"] == 1.0, f"CATCHUP {variant}: a stream was not exact"
            if name == "LEASE" and "etcd" in transports:
                assert transports["etcd"]["n"]["median"] > 0, f"LEASE {variant}: {transports}"
            if name == "MEM":
                anon = [v["median"] for k, v in figs.items() if k.startswith("anon@")]
                assert anon and all(x > 0 for x in anon), f"MEM {variant}: {figs}"
    for variant in ("L3 lock hand-over", "L3 hand-over after SIGKILL"):  # lock hand-over
        for tn, figs in wl["LEASE"][variant].items():
            for m in ("p50_ms", "p99_ms", "max_ms", "n"):
                assert figs[m]["median"] > 0, f"LEASE {variant} {tn} {m}: {figs[m]}"
    assert not [e for e in data["errors"] if "shmwatch" in e], data["errors"]
