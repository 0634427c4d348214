"""The peers' servers: a loopback redis-server and a loopback single-member etcd.

Owns finding their executables, starting each on free 127.0.0.1 ports in a fresh
temporary directory (retrying a few times: a free port can be taken before the server
binds it), waiting until it answers, and stopping it by its pid with its directory
removed. Every process started is registered in `procs.REG`. Never sends records.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time

from .procs import REG

HOST = "127.0.0.1"
ATTEMPTS = 3  # starts tried before giving up (a port taken between our bind and theirs)
POLL_S = 0.05
REDIS_READY_S = 10.0
ETCD_READY_S = 15.0
ETCD_EXE = "/usr/bin/etcd"  # where apt's etcd-server puts it; else the one on PATH


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """One server process in its own temporary directory."""

    what = "?"

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None
        self.port = 0

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def _popen(self, argv: list[str], log_path: str) -> None:
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, close_fds=True)
        REG.add_server(self.proc)

    def _wait_ready(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            if self.ready():
                return True
            time.sleep(POLL_S)
        return False

    def ready(self) -> bool:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            REG.stop_server(self.proc)
            self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None


class RedisServer(Server):
    """redis-server without persistence, bound to 127.0.0.1."""

    what = "redis-server"

    @staticmethod
    def missing() -> str:
        """Why it cannot run here ("" if it can)."""
        try:
            import redis  # noqa: F401  (optional: the bench extra)
        except ImportError:
            return "redis-py is not installed (pip install redis)"
        if not shutil.which("redis-server"):
            return "redis-server is not installed (apt-get install redis-server)"
        return ""

    def start(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shmwatch-bench-redis-")
        for _attempt in range(ATTEMPTS):
            self.port = free_port()
            self._popen([shutil.which("redis-server"), "--port", str(self.port), "--bind", HOST,
                         "--save", "", "--appendonly", "no", "--dir", self.dir,
                         "--protected-mode", "yes", "--daemonize", "no"],
                        os.path.join(self.dir, "redis.log"))
            if self._wait_ready(REDIS_READY_S):
                return
            REG.stop_server(self.proc)
        raise RuntimeError("redis-server did not start on 127.0.0.1")

    def ready(self) -> bool:
        import redis

        try:
            redis.Redis(host=HOST, port=self.port, socket_timeout=1).ping()
        except redis.RedisError:
            return False
        return True


class EtcdServer(Server):
    """A single-member etcd cluster with a short election timeout, quiet logs."""

    what = "etcd"

    @staticmethod
    def exe() -> str | None:
        return ETCD_EXE if os.access(ETCD_EXE, os.X_OK) else shutil.which("etcd")

    @classmethod
    def missing(cls) -> str:
        return "" if cls.exe() else "etcd is not installed (apt-get install etcd-server)"

    def start(self) -> None:
        last = ""
        for _attempt in range(ATTEMPTS):
            self.dir = tempfile.mkdtemp(prefix="shmwatch-bench-etcd-")
            port, peer = free_port(), free_port()
            while peer == port:
                peer = free_port()
            curl, purl = f"http://{HOST}:{port}", f"http://{HOST}:{peer}"
            logp = os.path.join(self.dir, "etcd.log")
            self._popen(
                [self.exe(), "--name", "bench", "--data-dir", os.path.join(self.dir, "data"),
                 "--listen-client-urls", curl, "--advertise-client-urls", curl,
                 "--listen-peer-urls", purl, "--initial-advertise-peer-urls", purl,
                 "--initial-cluster", f"bench={purl}", "--initial-cluster-state", "new",
                 "--heartbeat-interval", "10", "--election-timeout", "100",
                 "--logger", "zap", "--log-level", "error", "--log-outputs", "stderr"], logp)
            self.port = port
            if self._wait_ready(ETCD_READY_S):
                return
            with contextlib.suppress(OSError), open(logp, "rb") as f:
                last = f.read()[-2000:].decode(errors="replace")
            self.stop()
        raise RuntimeError(f"etcd did not start on 127.0.0.1: {last}")

    def ready(self) -> bool:
        try:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=1)
            try:
                conn.request("GET", "/health")
                body = conn.getresponse().read()
            finally:
                conn.close()
            return json.loads(body).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False
