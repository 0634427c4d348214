"""The README's fenced code blocks: read them, and run one as a reader would.

`read_blocks()` splits README.md into blocks by language. `python` and `sh` blocks are
run; a `text` block shows the standard output of the block right before it; any other
language is an error, so a new block cannot slip by untested. A block is left unrun only
where the prose right before it says why, visibly: "(not run by tests/test_readme.py:
REASON)". In `sh` blocks, the quick start's install steps (`python3 -m pip install ...
&&`) and the test command (`python3 -m pytest`) are not run: the package is already
installed where the tests run, CI runs both, and this test is part of that test run.

`python -m tests.readme_blocks LANG FILE` runs one block as a child of its own session
(inside a private /dev/shm when the test can mount one), waits for it, stops what it
left running (its process group, and a broker named $SHMWATCH_NAME, as
`shmwatch serve --detach` leaves one), and prints a JSON report with its exit code, its
output and whatever it left in /dev/shm.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = {"python": [sys.executable], "sh": ["bash", "-e"]}
OUTPUT = "text"
NOT_RUN = re.compile(r"\(not run by tests/test_readme\.py:\s*([^)]*)\)")
FENCE = re.compile(r"^(\s*)```(.*)$")
PIP_INSTALL = re.compile(r"^python3 -m pip install [^&]*&&\s*")
BLOCK_TIMEOUT = 240.0


@dataclass
class Block:
    """One fenced block: its language, code, first line in README.md, the prose before
    it, the output the README shows for it (a `text` block right after), and the reason
    it is not run (None: it is run)."""

    lang: str
    code: str
    line: int
    before: str
    expected: str | None = None
    not_run: str | None = None

    @property
    def id(self) -> str:
        return f"{self.lang}-line{self.line}"


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of a README, output blocks attached to the block they show.

    Raises ValueError for what the test cannot judge: an indented or unclosed fence, a
    language it does not know, an output block with no block before it to show."""
    blocks: list[Block] = []
    prose: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        if m.group(1):
            raise ValueError(f"README.md:{i + 1}: an indented fence; the test reads only "
                             f"fences at the start of a line")
        lang, start = m.group(2).strip(), i + 1
        body = []
        i += 1
        while i < len(lines) and lines[i].rstrip() != "```":
            body.append(lines[i])
            i += 1
        if i == len(lines):
            raise ValueError(f"README.md:{start}: a fence that is never closed")
        i += 1
        before = "\n".join(prose)
        prose = []
        code = "\n".join(body) + "\n"
        if lang == OUTPUT:
            if not blocks or blocks[-1].lang not in RUN or blocks[-1].expected is not None:
                raise ValueError(f"README.md:{start}: a `text` block shows the output of "
                                 f"the code block right before it, and there is none")
            blocks[-1].expected = code
            continue
        if lang not in RUN:
            raise ValueError(f"README.md:{start}: a ```{lang} block: the README test runs "
                             f"{sorted(RUN)} blocks and reads `text` ones as their output")
        reason = NOT_RUN.search(before.split("\n\n")[-1])
        blocks.append(Block(lang, code, start, before,
                            not_run=" ".join(reason.group(1).split()) if reason else None))
    return blocks


def runnable(block: Block) -> str:
    """The code of a block as the test runs it: the quick start's install steps and
    the test command left out (see the module docstring)."""
    if block.lang != "sh":
        return block.code
    out = []
    for line in block.code.splitlines():
        line = PIP_INSTALL.sub("", line)
        if line.startswith("python3 -m pip install") or line.startswith("python3 -m pytest"):
            continue
        out.append(line)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ inside the run


def _ours(name: str, private: bool) -> list[str]:
    try:
        entries = sorted(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return []
    if private:
        return entries
    return [e for e in entries if f"shmwatch.{name}." in e]


def _stop_group(pgid: int) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def _stop_broker(name: str) -> bool:
    """SIGTERM the broker called `name` if one runs (it unlinks all it made), wait."""
    import psutil

    from broker.admin import broker_info

    info = broker_info(name)
    if info["state"] not in ("alive", "starting") or not info["pid"]:
        return False
    try:
        p = psutil.Process(info["pid"])
        p.terminate()
        p.wait(10)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        p.kill()
    return True


def run_here(lang: str, path: str) -> dict:
    """Run one block (saved at `path`) in this /dev/shm and report what happened."""
    from broker.admin import cleanup_stale

    name = os.environ["SHMWATCH_NAME"]
    private = os.environ.get("README_PRIVATE_SHM") == "1"
    out_path, err_path = path + ".out", path + ".err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([*RUN[lang], path], cwd=ROOT, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=err, start_new_session=True)
    timed_out = False
    try:
        rc = proc.wait(BLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        timed_out, rc = True, None
    _stop_group(proc.pid)  # anything it started in the background with `&`
    if timed_out:
        proc.wait()
    stopped = _stop_broker(name)  # `shmwatch serve --detach` runs in a session of its own
    leftovers = _ours(name, private)
    cleanup_stale(name)  # leave nothing behind, even after a failure
    return {"rc": rc, "timed_out": timed_out, "stopped_broker": stopped,
            "stdout": Path(out_path).read_text(errors="replace"),
            "stderr": Path(err_path).read_text(errors="replace"),
            "leftovers": leftovers}


if __name__ == "__main__":
    print(json.dumps(run_here(sys.argv[1], sys.argv[2])))
