"""`tools/stress` end to end: short runs that must pass their own verification.

The tool starts its own broker, writer and watcher processes (and with --chaos SIGKILLs
some of them), then proves every surviving watcher's stream against the revision log.
These runs only check that it passes and reports what it did; no figure is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stress(tmp_path, *args: str) -> dict:
    out = tmp_path / "stress.json"
    p = subprocess.run([sys.executable, "tools/stress", "--quiet", "--json", str(out), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, f"stress {args}: exit {p.returncode}\nstdout:\n{p.stdout[-4000:]}" \
        f"\nstderr:\n{p.stderr[-4000:]}"
    s = json.loads(out.read_text())
    assert s["passed"] is True and s["violations"] == 0 and not s["reference_problem"], s
    for w in s["watchers_detail"]:
        assert w["status"] in ("ok", "compacted", "killed") and not w.get("problems"), w
    assert s["revisions_written"] > 0 and s["events_delivered"] > 0
    return s


@pytest.mark.timeout(150)
def test_stress_with_chaos_passes(tmp_path):
    s = stress(tmp_path, "--duration", "3", "--chaos")
    assert s["killed"], "--chaos killed nobody"
    assert any(w["status"] == "ok" and w["events"] > 0 for w in s["watchers_detail"])


@pytest.mark.timeout(150)
def test_stress_with_a_tiny_log_compacts_and_passes(tmp_path):
    # 6 s: the tool's stalled and late watchers act relative to its start, before its
    # children are up; with 3 s they barely stall and start "late" before the writes,
    # so a 32k log never wraps past anyone.
    s = stress(tmp_path, "--duration", "6", "--log-bytes", "32k")
    compacted = [w for w in s["watchers_detail"] if w["status"] == "compacted"]
    assert s["compactions"] > 0 and compacted, \
        f"a 32k log forced no compaction cancel: {s['watchers_detail']}"
    assert any(w["status"] == "ok" for w in s["watchers_detail"])
