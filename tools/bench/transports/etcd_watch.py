"""etcd 3.4 watch as a transport, through its v3 JSON gateway with the standard library
only: writers POST /v3/kv/put (or a 64-put /v3/kv/txn) over one keep-alive connection,
each reader holds one /v3/watch stream on the run's loopback etcd (servers.EtcdServer).

Owns the HTTP framing of that stream (status line, chunked encoding, concatenated JSON
objects) and the base64 of keys and values; paced writes are held to ETCD_PACE (a
synchronous etcd put takes about a millisecond here).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import socket
import time

from ..servers import HOST, EtcdServer
from .base import Transport

CONNECT_S = 30.0
ETCD_PACE = 500.0  # records/s in W3
ETCD_IDLE_S = 3.0  # etcd can pause longer than the others between two events
RECV_BYTES = 1 << 20


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range end for "every key with this prefix" (clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


class EtcdWriter:
    """Puts through etcd's v3 JSON gateway over one keep-alive HTTP/1.1 connection."""

    def __init__(self, env, trial, idx):
        self.conn = http.client.HTTPConnection(HOST, env["port"], timeout=CONNECT_S)
        self.hdr = {"Content-Type": "application/json"}

    def _post(self, path, body):
        self.conn.request("POST", path, body=json.dumps(body).encode(), headers=self.hdr)
        resp = self.conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"etcd {path}: HTTP {resp.status}: {data[:200]!r}")

    def send(self, key, value, seq):
        self._post("/v3/kv/put", {"key": _b64(key), "value": _b64(value)})

    def send_batch(self, items):
        self._post("/v3/kv/txn", {"success": [
            {"request_put": {"key": _b64(k), "value": _b64(v)}} for k, v, _ in items]})

    def close(self):
        self.conn.close()


class ChunkedJson:
    """The body of one HTTP/1.1 streaming response, bytes in, JSON objects out: skips the
    `100 Continue` interim response, checks the status, undoes chunked transfer encoding,
    and splits the text into the whole JSON objects it holds so far."""

    def __init__(self):
        self.raw = bytearray()
        self.text = ""
        self.headers_done = False
        self.dec = json.JSONDecoder()

    def feed(self, data: bytes) -> list[dict]:
        self.raw += data
        if not self.headers_done and not self._headers():
            return []
        self.text += self._chunks()
        return self._objects()

    def _headers(self) -> bool:
        raw = self.raw
        while True:
            end = raw.find(b"\r\n\r\n")
            if end < 0:
                return False
            status = raw[:end].split(b"\r\n", 1)[0]
            code = int(status.split()[1])
            del raw[: end + 4]
            if code == 100:
                continue
            if code != 200:
                raise ConnectionError(f"etcd watch refused: {status!r}")
            self.headers_done = True
            return True

    def _chunks(self) -> str:
        raw = self.raw
        pos = 0
        text = []
        while True:
            nl = raw.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(bytes(raw[pos:nl]).split(b";")[0] or b"0", 16)
            if size == 0:
                raise ConnectionError("etcd ended the watch stream")
            if len(raw) < nl + 2 + size + 2:
                break
            text.append(bytes(raw[nl + 2: nl + 2 + size]).decode())
            pos = nl + 2 + size + 2
        del raw[:pos]
        return "".join(text)

    def _objects(self) -> list[dict]:
        out = []
        buf, dec = self.text, self.dec
        i, n = 0, len(buf)
        while True:
            while i < n and buf[i] in " \r\n\t":
                i += 1
            if i >= n:
                break
            try:
                obj, j = dec.raw_decode(buf, i)
            except ValueError:  # an object not whole yet
                break
            out.append(obj)
            i = j
        self.text = buf[i:]
        return out


def _values(obj: dict) -> list[bytes]:
    """The record values of one streamed {"result": WatchResponse}."""
    res = obj.get("result")
    if res is None:
        if "error" in obj:
            raise RuntimeError(f"etcd watch stream error: {obj['error']}")
        return []
    if res.get("canceled"):
        raise RuntimeError(f"etcd watch canceled: {res}")
    b64d = base64.b64decode
    out = []
    for ev in res.get("events") or ():
        kv = ev["kv"]
        b64d(kv["key"])  # decoded as a real consumer would (shmwatch's reader decodes keys)
        out.append(b64d(kv.get("value", "")))
    return out


class EtcdReader:
    """One /v3/watch stream: a chunked HTTP request (Expect: 100-continue, else etcd's
    HTTP server never starts the response) answered by a chunked stream of
    {"result": WatchResponse} JSON objects."""

    def __init__(self, env, trial, idx):
        self.sock = socket.create_connection((HOST, env["port"]), timeout=CONNECT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = ChunkedJson()
        self.sock.sendall(
            b"POST /v3/watch HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
            % (HOST.encode(), env["port"]))
        req = json.dumps({"create_request": {"key": _b64(trial.prefix),
                                             "range_end": _b64(prefix_end(trial.prefix))}})
        data = req.encode() + b"\n"
        self.sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n")
        deadline = time.monotonic() + CONNECT_S
        self.pending: list[bytes] = []
        while True:
            objs = self._read(1.0)
            if any(o.get("result", {}).get("created") for o in objs):
                for o in objs:
                    self.pending.extend(_values(o))
                return
            if time.monotonic() > deadline:
                raise TimeoutError("etcd: no created watch response")

    def _read(self, timeout) -> list[dict]:
        """Receive what is there (waiting up to timeout), return the whole JSON objects."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(RECV_BYTES)
        except (TimeoutError, BlockingIOError):
            return []
        if not data:
            raise ConnectionError("etcd closed the watch stream")
        return self.stream.feed(data)

    def recv(self, timeout):
        if self.pending:
            out, self.pending = self.pending, []
            return out
        out = []
        for o in self._read(timeout):
            out.extend(_values(o))
        return out

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.sendall(b"0\r\n\r\n")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class EtcdT(Transport):
    name = "etcd"
    label = "etcd 3.4 watch (JSON gateway)"
    write_paths = ("sync", "batched")
    max_pace = ETCD_PACE
    min_idle_s = ETCD_IDLE_S
    writer = EtcdWriter
    reader = EtcdReader

    def __init__(self):
        self.server = EtcdServer()

    missing = staticmethod(EtcdServer.missing)

    def start(self):
        self.server.start()

    def stop(self):
        self.server.stop()

    def server_pid(self, env):
        return self.server.pid

    def prepare(self, trial):
        return {"port": self.server.port}
