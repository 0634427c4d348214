"""A real 3-member etcd 3.4 cluster on 127.0.0.1 for the mirroring-broker tests.

`etcd_cluster` starts three members (free ports, one temp data dir each, Debian's
etcd-server as tests/etcd_support.py uses for one member), waits until every member is
healthy, and at teardown kills exactly those pids and removes the data. `EtcdCluster`
can kill a member (SIGKILL, data kept), restart it on the same ports, and tell which
member leads (etcd's /v3/maintenance/status through the JSON gateway; standard library).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest

from tests.etcd_support import HOST, SKIP_REASON, _free_port, _ready, etcd_binary

# Fast but stable elections on a loaded 2-core machine: a member notices a dead leader
# within ~0.5 s. etcd's minimum lease TTL is then ceil(1.5 * 0.5) = 1 s.
TIMING = ("--heartbeat-interval", "50", "--election-timeout", "500")


@dataclass
class Member:
    name: str
    data_dir: str
    port: int
    peer_port: int
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    binary: str
    members: list[Member] = field(default_factory=list)

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL (what --upstream takes, comma-joined)."""
        return [m.url for m in self.members]

    def _start(self, m: Member) -> None:
        initial = ",".join(f"{x.name}={x.peer_url}" for x in self.members)
        log = open(os.path.join(m.data_dir, "etcd.log"), "ab")
        args = [self.binary, "--name", m.name, "--data-dir", os.path.join(m.data_dir, "data"),
                "--listen-client-urls", m.url, "--advertise-client-urls", m.url,
                "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"shmwatch-{self.members[0].port}",
                "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr", *TIMING]
        with log:
            m.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                      close_fds=True)

    def start(self, timeout: float = 20.0) -> None:
        for m in self.members:
            self._start(m)
        self.wait_healthy(self.members, timeout)

    def wait_healthy(self, members: list[Member], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for m in members:
            while not _ready(m.port):
                if not m.alive or time.monotonic() > deadline:
                    raise RuntimeError(f"etcd member {m.name} not healthy:\n{self.log_tail(m)}")
                time.sleep(0.05)

    def log_tail(self, m: Member, n: int = 3000) -> str:
        try:
            with open(os.path.join(m.data_dir, "etcd.log"), "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self, m: Member) -> None:
        """SIGKILL one member by its pid; its data stays for `restart`."""
        if m.alive:
            os.kill(m.proc.pid, signal.SIGKILL)
        if m.proc is not None:
            m.proc.wait(timeout=10)

    def restart(self, m: Member, wait: bool = True) -> None:
        """Start a killed member again on its ports with its data."""
        self._start(m)
        if wait:
            self.wait_healthy([m])

    def status(self, m: Member) -> dict | None:
        """etcd's maintenance status of one member (None if it does not answer)."""
        try:
            conn = http.client.HTTPConnection(HOST, m.port, timeout=1)
            try:
                conn.request("POST", "/v3/maintenance/status", body=b"{}")
                return json.loads(conn.getresponse().read())
            finally:
                conn.close()
        except (OSError, ValueError, http.client.HTTPException):
            return None

    def leader(self, timeout: float = 10.0) -> Member:
        """The member that leads now (waits for an election if there is none)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.members:
                st = self.status(m) if m.alive else None
                if st and st.get("leader") and st["leader"] == st["header"]["member_id"]:
                    return m
            time.sleep(0.05)
        raise RuntimeError("the etcd cluster has no leader")

    def follower(self) -> Member:
        lead = self.leader()
        return next(m for m in self.members if m is not lead and m.alive)

    def stop(self) -> None:
        """Kill every member by pid and remove the data dirs."""
        for m in self.members:
            try:
                self.kill(m)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            shutil.rmtree(m.data_dir, ignore_errors=True)


def start_cluster(binary: str, size: int = 3) -> EtcdCluster:
    """Start a fresh `size`-member cluster on loopback free ports; retry a lost port race."""
    last: Exception | None = None
    for _attempt in range(3):
        ports: set[int] = set()
        while len(ports) < 2 * size:
            ports.add(_free_port())
        it = iter(sorted(ports))
        cluster = EtcdCluster(binary)
        for i in range(size):
            cluster.members.append(Member(f"m{i}", tempfile.mkdtemp(prefix="shmwatch-etcdc-"),
                                          next(it), next(it)))
        try:
            cluster.start()
            return cluster
        except RuntimeError as exc:
            last = exc
            cluster.stop()
    raise RuntimeError(f"etcd cluster did not start: {last}")


@pytest.fixture
def etcd_cluster():
    """A fresh 3-member etcd 3.4 cluster per test; every member killed at teardown."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    cluster = start_cluster(binary)
    try:
        yield cluster
    finally:
        cluster.stop()
