"""A real etcd 3.4 for the differential tests, and a client with shmwatch's API over it.

`etcd_server` starts a fresh single-member etcd on 127.0.0.1 (free ports, temp data dir)
per test, so absolute revisions start at 1 in every scenario, and kills exactly that
process at teardown. `EtcdClient` speaks etcd's v3 JSON gateway (HTTP/1.1 on the client
port) with only the standard library and returns clientlib's types and raises clientlib's
errors, so a scenario written against shmwatch's client runs unchanged on etcd.

Gateway facts this relies on (etcd 3.4.23, observed):
- Unary calls: POST /v3/kv/{put,range,deleterange,txn,compaction} with a JSON body; keys
  and values base64; int64 fields are JSON strings; zero/false/empty fields are omitted.
  An error is `{"error": text, "message": text, "code": grpc_code}` with a non-200 status.
- Watch: POST /v3/watch is one gRPC watch stream. The request body is a chunked stream
  of JSON WatchRequests, the response a chunked stream of `{"result": WatchResponse}`.
  The request MUST carry `Expect: 100-continue`: without it etcd's HTTP server never
  starts the response while the request body is still open (observed: no byte at all).
- Leases: POST /v3/lease/{grant,revoke,timetolive,leases} are unary (3.4 also serves
  revoke and timetolive under /v3/kv/lease/; both answer the same). /v3/lease/keepalive
  is the gRPC keep-alive stream, but a plain POST of ONE JSON request is a whole stream:
  the gateway sends the request, closes the sending side, and answers
  `{"result": LeaseKeepAliveResponse}` (or `{"error": {...}}`), then ends.
- Lease timing: etcd's minimum TTL is ceil(1.5 * election timeout) seconds, so the
  fast election timeout `start_etcd` uses (100 ms) makes it 1 s; `LEASE_TIMING` restores
  etcd's defaults (100 ms / 1000 ms: minimum 2 s, as shmwatch's broker by default).
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

import pytest

from shmwatch.wire import errors as E
from shmwatch.wire.etcd_json import (
    ERROR_BY_MESSAGE,
    EtcdError,
    _b64,
    _header_rev,
    _int,
    delete_json,
    delete_response,
    error_from_json,
    lease_leases_response,
    lease_time_to_live_response,
    put_json,
    put_response,
    range_json,
    range_response,
    txn_json,
    txn_response,
    watch_response_from_json,
)
from shmwatch.wire.ops import (
    DeleteOp,
    PutOp,
    op_get,
    prefix_range_end,
    resolve_range,
    to_bytes,
)
from shmwatch.wire.types import (
    CompactResponse,
    DeleteRangeResponse,
    LeaseGrantResponse,
    LeaseKeepAliveResponse,
    LeaseLeasesResponse,
    LeaseRevokeResponse,
    LeaseTimeToLiveResponse,
    PutResponse,
    RangeResponse,
    TxnResponse,
    WatchResponse,
)

HOST = "127.0.0.1"
SKIP_REASON = "etcd-server not installed (apt-get install etcd-server): differential tests need a real etcd"
# etcd's default heartbeat and election timeout: its minimum lease TTL is then 2 s
LEASE_TIMING = ("--heartbeat-interval", "100", "--election-timeout", "1000")


# --------------------------------------------------------------------------- the server


def etcd_binary() -> str | None:
    if os.access("/usr/bin/etcd", os.X_OK):
        return "/usr/bin/etcd"
    return shutil.which("etcd")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class EtcdServer:
    proc: subprocess.Popen
    data_dir: str
    port: int
    peer_port: int
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def client(self, timeout: float = 5.0) -> EtcdClient:
        return EtcdClient(HOST, self.port, timeout=timeout)

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Kill exactly this etcd (by its pid) and remove its data dir."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a SIGKILLed process exits
            pass
        shutil.rmtree(self.data_dir, ignore_errors=True)


def _ready(port: int) -> bool:
    """True once etcd answers a linearizable read (it has a leader and applies requests)."""
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=1)
        try:
            conn.request("GET", "/health")
            body = conn.getresponse().read()
        finally:
            conn.close()
        return json.loads(body).get("health") == "true"
    except (OSError, ValueError, http.client.HTTPException):
        return False


def start_etcd(binary: str, startup_timeout: float = 15.0,
               extra_args: tuple[str, ...] = (), name: str = "diff") -> EtcdServer:
    """Start one fresh single-member etcd on loopback; retry on a lost port race.
    `extra_args` are added to etcd's command line (e.g. --max-request-bytes); `name` is
    the member's name (member list shows it)."""
    last = ""
    for _attempt in range(3):
        data_dir = tempfile.mkdtemp(prefix="shmwatch-etcd-")
        port, peer_port = _free_port(), _free_port()
        while peer_port == port:
            peer_port = _free_port()
        client_url = f"http://{HOST}:{port}"
        peer_url = f"http://{HOST}:{peer_port}"
        log_path = os.path.join(data_dir, "etcd.log")
        args = [
            binary,
            "--name", name,
            "--data-dir", os.path.join(data_dir, "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{name}={peer_url}",
            "--initial-cluster-state", "new",
            # a single member elects itself after one tick: a short tick starts it fast
            "--heartbeat-interval", "10",
            "--election-timeout", "100",
            "--logger", "zap",
            "--log-level", "error",
            "--log-outputs", "stderr",
            *extra_args,
        ]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True
            )
        server = EtcdServer(proc, data_dir, port, peer_port, log_path)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _ready(port):
                return server
            time.sleep(0.02)
        last = server.log_tail()
        server.stop()
    raise RuntimeError(f"etcd did not start on 127.0.0.1; last log:\n{last}")


@pytest.fixture
def etcd_server():
    """A fresh etcd 3.4 per test (absolute revisions start at 1); killed at teardown."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    server = start_etcd(binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_lease_server():
    """As `etcd_server`, with etcd's default election timing (`LEASE_TIMING`), so that
    its minimum lease TTL is its default 2 s."""
    binary = etcd_binary()
    if binary is None:
        pytest.skip(SKIP_REASON)
    server = start_etcd(binary, extra_args=LEASE_TIMING)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- the client


class EtcdWatch:
    """One watch on the client's single /v3/watch stream; the same surface as shmwatch's.

    As in clientlib: the first response is the created one; after the final canceled
    response has been read, get() raises CompactedError (compaction), the refusal's error
    (refused create), else WatchClosed; iteration ends there.
    """

    def __init__(self, client: EtcdClient):
        self._client = client
        self._queue: queue.Queue = queue.Queue()
        self.watch_id: int | None = None  # set by the created response (-1 if refused)
        self._final = False  # the canceled response was handed out
        self._error: E.ShmwatchError | None = None

    # called by the reader thread; None = the stream ended
    def _deliver(self, resp: WatchResponse | None) -> None:
        self._queue.put(resp)

    def _take(self, resp: WatchResponse | None) -> WatchResponse:
        if resp is None:
            self._queue.put(None)  # stay closed for later calls
            self._final = True
            self._error = self._error or E.WatchClosed(
                self._client._stream_error or E.WatchClosed.default_message)
            raise self._error
        if resp.canceled:
            self._final = True
            if resp.compact_revision:
                self._error = E.CompactedError()
            elif resp.created:
                cls = ERROR_BY_MESSAGE.get(resp.cancel_reason, EtcdError)
                self._error = cls(resp.cancel_reason)
            else:
                self._error = E.WatchClosed(
                    "shmwatch: watch canceled"
                    + (f": {resp.cancel_reason}" if resp.cancel_reason else ""))
        return resp

    def _raise_if_over(self) -> None:
        if self._final and self._queue.empty():
            raise self._error or E.WatchClosed()

    def get(self, timeout: float | None = None) -> WatchResponse:
        self._raise_if_over()
        try:
            resp = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise E.Timeout(f"no watch response within {timeout} s") from None
        return self._take(resp)

    def get_nowait(self) -> WatchResponse | None:
        self._raise_if_over()
        try:
            resp = self._queue.get_nowait()
        except queue.Empty:
            return None
        return self._take(resp)

    @property
    def canceled(self) -> bool:
        return self._final

    def __iter__(self):
        return self

    def __next__(self) -> WatchResponse:
        try:
            return self.get()
        except (E.WatchClosed, E.CompactedError, E.InvalidRangeError,
                E.DuplicateWatchIdError, EtcdError):
            raise StopIteration from None

    def cancel(self) -> None:
        """Send etcd's cancel request; the canceled response arrives on this watch."""
        if self.watch_id is None or self.watch_id < 0 or self._final:
            return
        self._client._send_watch_request({"cancel_request": {"watch_id": self.watch_id}})

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if not self._client._closed:
            try:
                self.cancel()
            except OSError:
                pass


class EtcdClient:
    """shmwatch's client API over etcd's v3 JSON gateway (standard library only)."""

    def __init__(self, host: str = HOST, port: int = 2379, timeout: float = 5.0):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the differential tests talk to loopback only")
        self.host, self.port, self.timeout = host, port, timeout
        self._http = http.client.HTTPConnection(host, port, timeout=timeout)
        self._http_lock = threading.Lock()
        # the single watch stream
        self._wlock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._pending: list[EtcdWatch] = []  # created responses come in request order
        self._watches: dict[int, EtcdWatch] = {}
        self._stream_error: str | None = None
        self._closed = False
        self.raw_log: list | None = None  # set to a list to record every raw JSON exchanged

    # ---- unary calls

    def _call(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        with self._http_lock:
            for attempt in (0, 1):
                try:
                    self._http.request(
                        "POST", path, body=data, headers={"Content-Type": "application/json"}
                    )
                    resp = self._http.getresponse()
                    raw = resp.read()
                    break
                except (http.client.HTTPException, ConnectionError):
                    self._http.close()
                    if attempt:
                        raise
        try:
            obj = json.loads(raw)
        except ValueError:
            raise E.ProtocolError(f"etcd gateway answered {resp.status}: {raw[:200]!r}") from None
        if self.raw_log is not None:
            self.raw_log.append((path, body, obj))
        if resp.status != 200 or ("error" in obj and "header" not in obj):
            raise error_from_json(obj)
        return obj

    def put(self, key, value=b"", prev_kv: bool = False, ignore_value: bool = False,
            lease: int = 0, ignore_lease: bool = False) -> PutResponse:
        op = PutOp(to_bytes(key), to_bytes(value, "value"), bool(prev_kv), bool(ignore_value),
                   int(lease), bool(ignore_lease))
        return put_response(self._call("/v3/kv/put", put_json(op)))

    def get(self, key, range_end=None, prefix: bool = False, revision: int = 0, limit: int = 0,
            keys_only: bool = False, count_only: bool = False, **options) -> RangeResponse:
        op = op_get(key, range_end, prefix, revision, limit, keys_only, count_only, **options)
        return range_response(self._call("/v3/kv/range", range_json(op)))

    def delete(self, key, range_end=None, prefix: bool = False,
               prev_kv: bool = False) -> DeleteRangeResponse:
        k, end = resolve_range(key, range_end, prefix)
        return delete_response(
            self._call("/v3/kv/deleterange", delete_json(DeleteOp(k, end, bool(prev_kv))))
        )

    def txn(self, compare=(), success=(), failure=()) -> TxnResponse:
        return txn_response(self._call("/v3/kv/txn", txn_json(compare, success, failure)))

    def compact(self, revision: int) -> CompactResponse:
        # physical=True: etcd answers once the compaction is applied, so what a watch or a
        # read sees right after does not depend on etcd's background scheduler.
        obj = self._call("/v3/kv/compaction", {"revision": int(revision), "physical": True})
        return CompactResponse(_header_rev(obj))

    # ---- leases

    def lease_grant(self, ttl: int, lease_id: int = 0) -> LeaseGrantResponse:
        body: dict = {}
        if ttl:
            body["TTL"] = str(int(ttl))
        if lease_id:
            body["ID"] = str(int(lease_id))
        obj = self._call("/v3/lease/grant", body)
        return LeaseGrantResponse(_header_rev(obj), _int(obj, "ID"), _int(obj, "TTL"))

    def lease_revoke(self, lease_id: int) -> LeaseRevokeResponse:
        obj = self._call("/v3/lease/revoke", {"ID": str(int(lease_id))} if lease_id else {})
        return LeaseRevokeResponse(_header_rev(obj))

    def lease_keep_alive_once(self, lease_id: int) -> LeaseKeepAliveResponse:
        """One keep-alive: one request on a keep-alive stream of its own (see the module
        docstring). A missing lease answers ttl 0, as etcd's server does."""
        obj = self._call("/v3/lease/keepalive", {"ID": str(int(lease_id))} if lease_id else {})
        if "result" not in obj:
            raise E.ProtocolError(f"etcd keep-alive answered {obj!r}")
        res = obj["result"]
        return LeaseKeepAliveResponse(_header_rev(res), _int(res, "ID"), _int(res, "TTL"))

    def lease_time_to_live(self, lease_id: int, keys: bool = False) -> LeaseTimeToLiveResponse:
        body: dict = {"ID": str(int(lease_id))} if lease_id else {}
        if keys:
            body["keys"] = True
        return lease_time_to_live_response(self._call("/v3/lease/timetolive", body))

    def leases(self) -> LeaseLeasesResponse:
        return lease_leases_response(self._call("/v3/lease/leases", {}))

    # ---- the watch stream

    def _open_stream(self) -> None:
        if self._closed:
            raise E.WatchClosed("client closed")
        if self._sock is not None:
            return
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.settimeout(None)
        sock.sendall(
            b"POST /v3/watch HTTP/1.1\r\n"
            b"Host: " + f"{self.host}:{self.port}".encode() + b"\r\n"
            b"Content-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n"
            b"Expect: 100-continue\r\n"
            b"\r\n"
        )
        self._sock = sock
        self._reader = threading.Thread(
            target=self._read_loop, args=(sock,), name="etcd-watch-reader", daemon=True
        )
        self._reader.start()

    def _send_watch_request(self, req: dict) -> None:
        data = json.dumps(req).encode() + b"\n"
        if self.raw_log is not None:
            self.raw_log.append(("/v3/watch", req, None))
        if self._sock is None:
            raise E.WatchClosed("client closed")
        self._sock.sendall(b"%x\r\n" % len(data) + data + b"\r\n")

    def watch(self, key, range_end=None, prefix: bool = False, start_revision: int = 0,
              prev_kv: bool = False, filters=(), progress_notify: bool = False,
              fragment: bool = False, watch_id: int | None = None) -> EtcdWatch:
        k = to_bytes(key)
        if prefix:
            k, end = (k, prefix_range_end(k)) if k else (b"\0", b"\0")
        else:
            end = None if range_end is None else to_bytes(range_end, "range_end")
        create: dict = {"key": _b64(k)}
        if end:
            create["range_end"] = _b64(end)
        if start_revision:
            create["start_revision"] = int(start_revision)
        if progress_notify:
            create["progress_notify"] = True
        names = []
        for f in filters:
            name = str(f).upper().replace("_", "")
            if name not in ("NOPUT", "NODELETE"):
                raise ValueError(f"unknown watch filter {f!r}")
            names.append(name)
        if names:
            create["filters"] = names
        if prev_kv:
            create["prev_kv"] = True
        if fragment:
            create["fragment"] = True
        if watch_id is not None:
            create["watch_id"] = int(watch_id)
        w = EtcdWatch(self)
        with self._wlock:
            self._open_stream()
            self._pending.append(w)
            self._send_watch_request({"create_request": create})
        return w

    def request_progress(self) -> None:
        with self._wlock:
            self._open_stream()
            self._send_watch_request({"progress_request": {}})

    def _route(self, resp: WatchResponse) -> None:
        with self._wlock:
            if resp.created:
                if not self._pending:
                    return
                w = self._pending.pop(0)
                w.watch_id = resp.watch_id
                if not resp.canceled:
                    self._watches[resp.watch_id] = w
                targets = [w]
            elif resp.watch_id == -1 and not resp.canceled:
                # a progress response is not tied to a watch: every watch of the stream gets it
                targets = list(self._watches.values())
            else:
                w = self._watches.get(resp.watch_id)
                if w is None:
                    return
                if resp.canceled:
                    del self._watches[resp.watch_id]
                targets = [w]
        for w in targets:
            w._deliver(resp)

    def _read_loop(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        decoder = json.JSONDecoder()
        try:
            # status line + headers; skip any interim "100 Continue"
            while True:
                status = reader.readline()
                if not status:
                    raise ConnectionError("watch stream closed before its response")
                code = int(status.split()[1])
                headers = {}
                while True:
                    line = reader.readline()
                    if line in (b"\r\n", b"\n", b""):
                        break
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                if code != 100:
                    break
            if code != 200:
                raise ConnectionError(f"watch stream refused: HTTP {code}")
            if "chunked" not in headers.get("transfer-encoding", ""):
                raise ConnectionError("watch stream is not chunked")
            buf = ""
            while True:
                size_line = reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                chunk = reader.read(size)
                reader.readline()  # CRLF after the chunk
                buf += chunk.decode()
                while True:
                    stripped = buf.lstrip()
                    if not stripped:
                        buf = ""
                        break
                    try:
                        obj, end = decoder.raw_decode(stripped)
                    except ValueError:
                        buf = stripped  # incomplete: wait for more
                        break
                    buf = stripped[end:]
                    if self.raw_log is not None:
                        self.raw_log.append(("/v3/watch", None, obj))
                    if "result" in obj:
                        self._route(watch_response_from_json(obj["result"]))
                    elif "error" in obj:
                        err = obj["error"]
                        self._stream_error = (
                            err.get("message", json.dumps(err)) if isinstance(err, dict) else str(err)
                        )
                        return
        except (OSError, ValueError, ConnectionError) as exc:
            if not self._closed:
                self._stream_error = f"etcd watch stream failed: {exc}"
        finally:
            with self._wlock:
                everyone = list(self._watches.values()) + self._pending
                self._watches.clear()
                self._pending.clear()
            for w in everyone:
                w._deliver(None)
            try:
                reader.close()
            except OSError:
                pass

    # ---- lifetime

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._wlock:
            sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.sendall(b"0\r\n\r\n")
            except OSError:
                pass
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        with self._http_lock:
            self._http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EtcdTranscripts:
    """Each scenario's transcript on a real etcd, taken once (on the server the pytest
    fixture `fixture` starts) and reused by the expectation and differential tests."""

    def __init__(self, scenarios: dict, fixture: str):
        self.scenarios, self.fixture, self._taken = scenarios, fixture, {}

    def taken(self, name: str) -> bool:
        return name in self._taken

    def get(self, name: str, request) -> list:
        if name not in self._taken:
            server = request.getfixturevalue(self.fixture)
            with server.client() as c:
                self._taken[name] = self.scenarios[name](c)
        return self._taken[name]
