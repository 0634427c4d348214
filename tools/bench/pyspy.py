"""--profile: py-spy attached to the broker, writer 0 and reader 0 of every shmwatch trial,
and the summary of what it sampled (DIR/summary.md).

Owns starting py-spy on those pids (registered in `procs.REG`), stopping it so it writes
its file, and reading the collapsed stacks back into self / inclusive shares. Profiling
perturbs the figures; nothing here is used unless --profile is given.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import re
import signal
import subprocess
import time

from .procs import REG

RATE = 200  # samples per second
ATTACH_S = 1.0  # py-spy needs about this long to attach before the trial starts
WRITE_S = 20.0  # time py-spy gets to write its file after SIGINT
TOP = 12  # functions listed per table


class Spies:
    """The py-spy processes of a run, and what each recorded (`profiles`)."""

    def __init__(self, directory: str):
        self.dir = directory
        self.profiles: list[dict] = []  # workload, variant, role, path, seconds

    def start(self, trial, env: dict, procs: list) -> list:
        """py-spy on the broker, writer 0 and reader 0 of a shmwatch trial (readers are
        started first: procs[0] is reader 0, procs[trial.readers] writer 0)."""
        if trial.transport != "shmwatch" or not shutil.which("py-spy"):
            return []
        os.makedirs(self.dir, exist_ok=True)
        n = sum(1 for p in self.profiles if p["workload"] == trial.workload
                and p["variant"] == trial.variant) // 3 + 1
        slug = f"{trial.workload}-{re.sub(r'[^A-Za-z0-9,._-]+', '_', trial.variant)}-{n}"
        targets = [("broker", env["pid"]), ("writer", procs[trial.readers].pid),
                   ("reader", procs[0].pid)]
        spies = []
        for role, pid in targets:
            path = os.path.join(self.dir, f"{slug}-{role}.txt")
            sp = subprocess.Popen(
                [shutil.which("py-spy"), "record", "--pid", str(pid), "--rate", str(RATE),
                 "--nonblocking", "--nolineno", "--format", "raw", "-o", path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            REG.add_server(sp)
            spies.append((sp, path))
            self.profiles.append({"workload": trial.workload, "variant": trial.variant,
                                  "role": role, "path": path})
        time.sleep(ATTACH_S)
        now = time.monotonic()
        return [(sp, path, now) for sp, path in spies]

    def stop(self, spies: list) -> None:
        for sp, path, t0 in spies:
            for p in self.profiles:
                if p["path"] == path:
                    p["seconds"] = time.monotonic() - t0
            if sp.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(sp.pid, signal.SIGINT)  # py-spy writes its file on SIGINT
        for sp, *_ in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                sp.wait(WRITE_S)
            REG.stop_server(sp)  # SIGTERM, SIGKILL: one that did not finish writing in time

    def write_summary(self, command: str) -> str:
        """DIR/summary.md: every profile's top functions; returns its path."""
        parts = ["# py-spy profiles of shmwatch trials", "", f"Command: `{command}`", ""]
        for p in self.profiles:
            parts += [f"## {p['workload']} {p['variant']}: {p['role']}", "",
                      f"`{p['path']}`", "",
                      summarize(p["path"], p.get("seconds", 1.0)), ""]
        path = os.path.join(self.dir, "summary.md")
        with open(path, "w") as f:
            f.write("\n".join(parts) + "\n")
        return path


def _read_stacks(path: str) -> tuple[int, dict[str, int], dict[str, int]]:
    """Samples, self counts and inclusive counts per function of a py-spy raw file."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack or not n.isdigit():
                continue
            frames = [fr for fr in stack.split(";")
                      if not fr.startswith(("process ", "thread "))]
            if not frames:
                continue
            total += int(n)
            self_c[frames[-1]] = self_c.get(frames[-1], 0) + int(n)
            for fr in set(frames):
                incl[fr] = incl.get(fr, 0) + int(n)
    return total, self_c, incl


def summarize(path: str, seconds: float, rate: int = RATE, top: int = TOP) -> str:
    """Top functions of a py-spy raw (collapsed stacks) file: self and inclusive shares of
    the samples where the process was running Python (idle waits are not sampled)."""
    try:
        total, self_c, incl = _read_stacks(path)
    except OSError as exc:
        return f"(no profile: {exc})"
    if not total:
        return "(no samples)"
    busy = total / max(rate * seconds, 1)
    lines = [f"{total} samples over {seconds:.1f} s: busy ~{busy * 100:.0f}% of one core "
             f"(py-spy samples only running code)", "", "| self % | function |", "|---|---|"]
    for fr, c in sorted(self_c.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {c / total * 100:.1f} | `{fr}` |")
    lines += ["", "| inclusive % | function |", "|---|---|"]
    for fr, c in sorted(incl.items(), key=lambda kv: -kv[1])[:top + 4]:
        lines.append(f"| {c / total * 100:.1f} | `{fr}` |")
    return "\n".join(lines)
