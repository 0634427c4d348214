"""Every code block of README.md runs as written, on a 64 MB /dev/shm.

Each `python` and `sh` block runs in a fresh process (see tests/readme_blocks.py for
what is read and what is left out), in a private 64 MB /dev/shm of its own mount
namespace where this test may mount one (as root, as CI runs), so the README is proven
on Docker's /dev/shm size and cannot collide with other runs. `shmwatch` is this
checkout's, `$SHMWATCH_NAME` a fresh name. A block must exit 0, print exactly the
output the README shows for it (where it shows one), and leave nothing running and
nothing in /dev/shm once a broker it started in the background is stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import broker
from tests import readme_blocks as rb

BLOCKS = rb.read_blocks(rb.README.read_text())
# A block of nothing but the quick start's install and test steps has nothing left to run.
RUNS = [b for b in BLOCKS if b.not_run is None and rb.runnable(b).strip()]
SHM_SIZE = "64m"


def _private_shm_available() -> bool:
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c",
                            f"mount -t tmpfs -o size={SHM_SIZE} none /dev/shm"],
                           check=False, capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


PRIVATE = _private_shm_available()


def _shims(tmp_path) -> str:
    """A bin directory whose `shmwatch` and `python3` are this checkout's and this
    interpreter (the installed `shmwatch` may belong to another checkout)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, line in (("shmwatch", f'exec "{sys.executable}" -m shmwatch.tools.cli "$@"'),
                       ("python3", f'exec "{sys.executable}" "$@"')):
        path = bin_dir / tool
        path.write_text(f"#!/bin/sh\n{line}\n")
        path.chmod(0o755)
    return str(bin_dir)


def run_block(block: rb.Block, tmp_path) -> dict:
    code = tmp_path / f"block.{block.lang}"
    code.write_text(rb.runnable(block))
    env = {**os.environ, "PYTHONPATH": str(rb.ROOT),
           "PATH": _shims(tmp_path) + os.pathsep + os.environ.get("PATH", ""),
           "SHMWATCH_NAME": broker.unique_name("readme"),
           "README_PRIVATE_SHM": "1" if PRIVATE else "0"}
    env.pop("SHMWATCH_SHM_BUDGET", None)  # the private /dev/shm is the budget
    inner = [sys.executable, "-m", "tests.readme_blocks", block.lang, str(code)]
    if PRIVATE:
        cmd = ["unshare", "-m", "sh", "-c",
               f'mount -t tmpfs -o size={SHM_SIZE} none /dev/shm && exec "$@"', "sh", *inner]
    else:
        cmd = inner
    r = subprocess.run(cmd, cwd=rb.ROOT, env=env, capture_output=True, text=True,
                       timeout=rb.BLOCK_TIMEOUT + 60, check=False)
    assert r.returncode == 0, f"the block runner failed:\n{r.stderr[-4000:]}"
    return json.loads(r.stdout)


def test_the_readme_has_runnable_blocks_and_says_why_for_the_others():
    assert any(b.lang == "python" for b in RUNS) and any(b.lang == "sh" for b in RUNS)
    for b in BLOCKS:
        if b.not_run is not None:
            assert len(b.not_run) > 10, f"README.md:{b.line}: give a reason, not {b.not_run!r}"


def test_blocks_are_read_by_language_with_output_and_exceptions():
    text = ("intro\n```sh\necho hi\n```\nprints\n```text\nhi\n```\n"
            "Later (not run by tests/test_readme.py: it\nruns forever):\n"
            "```sh\nsleep 1000\n```\n")
    first, second = rb.read_blocks(text)
    assert (first.lang, first.code, first.expected, first.not_run) == \
        ("sh", "echo hi\n", "hi\n", None)
    assert second.not_run == "it runs forever"
    for bad in ("```js\nx\n```\n", "```text\nhi\n```\n", "```sh\nopen\n", "  ```sh\nx\n  ```\n"):
        with pytest.raises(ValueError):
            rb.read_blocks(bad)


def test_quick_start_install_and_test_steps_are_the_only_lines_left_out():
    b = rb.Block("sh", "python3 -m pip install -e . && shmwatch stress\n"
                 "python3 -m pip install -e '.[test]' && python3 -m pytest -q\n"
                 "shmwatch put a b\n", 1, "")
    assert rb.runnable(b) == "shmwatch stress\nshmwatch put a b\n"


@pytest.mark.timeout(rb.BLOCK_TIMEOUT + 120)
@pytest.mark.parametrize("block", RUNS, ids=[b.id for b in RUNS])
def test_readme_block_runs_as_written(block, tmp_path):
    r = run_block(block, tmp_path)
    where = f"README.md:{block.line} ({'private 64 MB /dev/shm' if PRIVATE else 'host /dev/shm'})"
    assert not r["timed_out"], f"{where}: still running after {rb.BLOCK_TIMEOUT}s"
    assert r["rc"] == 0, f"{where}: exit {r['rc']}\nstdout:\n{r['stdout'][-3000:]}" \
        f"\nstderr:\n{r['stderr'][-3000:]}"
    assert "Traceback" not in r["stderr"], f"{where}:\n{r['stderr'][-3000:]}"
    if block.expected is not None:
        assert r["stdout"] == block.expected, f"{where}: the README shows other output"
    assert r["leftovers"] == [], f"{where}: left in /dev/shm: {r['leftovers']}"
