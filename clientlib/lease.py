"""`Lease`: a granted lease as an object, with clientv3's keep-alive in a thread
(`AsyncLease`: the same for clientlib.aio, the keep-alive a task of the event loop).

`Client.lease(...)` grants one and returns it. The keep-alive renews it at a third of
its TTL (clientv3's KeepAlive); if a renewal fails for a passing reason (a timeout, the
broker restarting) it retries every second until the lease's own deadline, and once the
broker answers TTL 0 (the lease is gone: expired, revoked elsewhere, or its bound client
went) or the deadline passes, the lease is *lost*: `lost` turns True and `wait_lost`
returns, as clientv3's keep-alive channel closes. A lease bound with TTL 0 has no
keep-alive: the broker ends it exactly when its client goes.

A `Lease` belongs to the process that created it: its keep-alive thread does not
survive `fork()` (a forked child's client is a new client; a bound lease stays the
parent's).
"""

from __future__ import annotations

import asyncio
import threading
import time

from shmwatch.wire import errors
from shmwatch.wire.types import LeaseGrantResponse, LeaseRevokeResponse

RETRY_S = 1.0  # keep-alive retry after a failed renewal (clientv3 retries every 500 ms)


class Lease:
    """A granted lease. `id`, `granted_ttl`, `bound`; `remaining()`, `keys()`,
    `refresh()`, `revoke()`; `lost`, `wait_lost()`; a context manager that revokes the
    lease on exit. Pass it (or its `id`) as `put(..., lease=...)`."""

    def __init__(self, client, grant: LeaseGrantResponse, *, bound: bool, forever: bool,
                 keep_alive: bool):
        self.id: int = grant.id
        self.granted_ttl: int = grant.ttl
        self.bound = bound
        self._client = client
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + grant.ttl  # as far as this process knows
        self._thread: threading.Thread | None = None
        if keep_alive and not forever:
            self._thread = threading.Thread(target=self._keep_alive, daemon=True,
                                            name=f"shmwatch-lease-{self.id:x}")
            self._thread.start()

    def __index__(self) -> int:
        return self.id

    def __repr__(self) -> str:
        state = "lost" if self._lost.is_set() else "live"
        return (f"<Lease {self.id:x} ttl={self.granted_ttl}{' bound' if self.bound else ''} "
                f"{state}>")

    # ------------------------------------------------------------ queries

    def remaining(self, *, timeout: float | None = None) -> int:
        """Seconds left, as the broker reports them (etcd's TimeToLive: -1 if the lease
        is gone)."""
        return self._client.lease_time_to_live(self.id, timeout=timeout).ttl

    def keys(self, *, timeout: float | None = None) -> list[bytes]:
        """The keys attached to the lease, sorted."""
        return self._client.lease_time_to_live(self.id, keys=True, timeout=timeout).keys

    @property
    def lost(self) -> bool:
        """True once the lease is known to be gone (or could not be kept alive past its
        deadline); a revoked lease is lost too."""
        return self._lost.is_set()

    def wait_lost(self, timeout: float | None = None) -> bool:
        """Block until the lease is lost (True) or `timeout` passes (False)."""
        return self._lost.wait(timeout)

    # ------------------------------------------------------------ changes

    def refresh(self, *, timeout: float | None = None) -> int:
        """Renew the lease now; its TTL. LeaseNotFoundError if it is gone (clientv3's
        KeepAliveOnce)."""
        ttl = self._client.lease_keep_alive_once(self.id, timeout=timeout).ttl
        if ttl <= 0:
            self._lose()
            raise errors.LeaseNotFoundError()
        self._deadline = time.monotonic() + ttl
        return ttl

    def revoke(self, *, timeout: float | None = None) -> LeaseRevokeResponse:
        """Stop the keep-alive and revoke the lease (its keys are deleted at one
        revision). LeaseNotFoundError if it was gone already."""
        self._stop.set()
        try:
            return self._client.lease_revoke(self.id, timeout=timeout)
        finally:
            self._lose()

    def close(self) -> None:
        """Stop the keep-alive without revoking: the lease ends by its TTL (or, bound,
        with its client)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.revoke()
        except (errors.LeaseNotFoundError, errors.ClientClosed):
            pass  # already ended (a closed client's bound leases went with it)
        finally:
            self.close()

    # ------------------------------------------------------------ keep-alive

    def _lose(self) -> None:
        self._lost.set()
        self._stop.set()

    def _keep_alive(self) -> None:
        interval = max(self.granted_ttl / 3.0, 0.1)
        wait = interval
        while not self._stop.wait(wait):
            try:
                # As long as the lease lasts anyway: a slow answer is still in time.
                ttl = self._client.lease_keep_alive_once(
                    self.id, timeout=max(0.1, self._deadline - time.monotonic()))
            except (errors.ClientClosed, errors.InheritedWatchError):
                break  # closed here: nobody will keep it alive
            except errors.ShmwatchError:
                # Timeout, broker restarting, ...: retry until the lease would expire.
                if time.monotonic() >= self._deadline:
                    break
                wait = min(RETRY_S, interval)
                continue
            if ttl.ttl <= 0:
                break  # the broker says it is gone
            self._deadline = time.monotonic() + ttl.ttl
            wait = interval
        if not self._stop.is_set():  # not stopped by revoke() or close(): it is gone
            self._lose()


class AsyncLease:
    """`clientlib.Lease` for asyncio: the keep-alive is a task of the client's loop.
    `id`, `granted_ttl`, `bound`; `await remaining()`, `keys()`, `refresh()`,
    `revoke()`; `lost`, `await wait_lost()`; `async with` revokes on exit."""

    def __init__(self, ac, grant: LeaseGrantResponse, *, bound: bool,
                 forever: bool, keep_alive: bool):
        self.id: int = grant.id
        self.granted_ttl: int = grant.ttl
        self.bound = bound
        self._ac = ac
        self._lost = asyncio.Event()
        self._deadline = time.monotonic() + grant.ttl
        self._task: asyncio.Task | None = None
        if keep_alive and not forever:
            self._task = asyncio.get_running_loop().create_task(self._keep_alive())

    def __index__(self) -> int:
        return self.id

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def wait_lost(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._lost.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def remaining(self, *, timeout: float | None = None) -> int:
        return (await self._ac.lease_time_to_live(self.id, timeout=timeout)).ttl

    async def keys(self, *, timeout: float | None = None) -> list[bytes]:
        return (await self._ac.lease_time_to_live(self.id, keys=True, timeout=timeout)).keys

    async def refresh(self, *, timeout: float | None = None) -> int:
        ttl = (await self._ac.lease_keep_alive_once(self.id, timeout=timeout)).ttl
        if ttl <= 0:
            self._lose()
            raise errors.LeaseNotFoundError()
        self._deadline = time.monotonic() + ttl
        return ttl

    async def revoke(self, *, timeout: float | None = None) -> LeaseRevokeResponse:
        self._stop()
        try:
            return await self._ac.lease_revoke(self.id, timeout=timeout)
        finally:
            self._lost.set()

    def close(self) -> None:
        """Stop the keep-alive without revoking."""
        self._stop()

    async def __aenter__(self) -> "AsyncLease":
        return self

    async def __aexit__(self, *exc) -> None:
        try:
            await self.revoke()
        except (errors.LeaseNotFoundError, errors.ClientClosed):
            pass

    def _stop(self) -> None:
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None

    def _lose(self) -> None:
        self._lost.set()
        self._stop()

    async def _keep_alive(self) -> None:
        interval = max(self.granted_ttl / 3.0, 0.1)
        wait = interval
        while True:
            await asyncio.sleep(wait)
            try:
                resp = await self._ac.lease_keep_alive_once(
                    self.id, timeout=max(0.1, self._deadline - time.monotonic()))
            except errors.ClientClosed:
                break
            except errors.ShmwatchError:
                if time.monotonic() >= self._deadline:
                    break
                wait = min(1.0, interval)
                continue
            if resp.ttl <= 0:
                break
            self._deadline = time.monotonic() + resp.ttl
            wait = interval
        self._lost.set()


__all__ = ["AsyncLease", "Lease"]
