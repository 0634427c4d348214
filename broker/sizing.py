"""How much of /dev/shm a broker takes when the user does not say: sizes from free space.

This module owns the default sizes of the revision log and of the rings, the arithmetic
of what a broker reserves in /dev/shm (every segment is allocated up front with
posix_fallocate, so that a full /dev/shm fails at creation rather than with SIGBUS
later), and the check, before anything is created, that the start-up reservation fits.

Everything here is a pure function of one figure, the free bytes of /dev/shm. It is
measured with statvfs unless a budget is given (`--shm-budget`, or $SHMWATCH_SHM_BUDGET
for brokers started by tools and tests): "assume /dev/shm has this much free". That is
what lets a test run a broker exactly as it would run on Docker's 64 MB /dev/shm.
This module creates nothing and never reads shared memory.

The policy (README, "Broker options"):
- the revision log gets a quarter of the free space, at most 64 MiB and at least 1 MiB;
- the request, response and watch rings keep their full sizes (1 MiB, 1 MiB, 256 KiB)
  while one client with one arena of watch rings fits in 1/32 of the free space, and are
  halved until it does (at most 64 times smaller), so that on a 64 MB /dev/shm the log
  plus a few dozen clients fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from shm.layout import CLIENT_HEADER, ctl_payload_size
from shm.revlog import revlog_bytes
from shm.ring import ring_bytes
from shm.segment import HEADER_SIZE, SHM_DIR

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

FULL_LOG = 64 * MiB
MIN_LOG = 1 * MiB
LOG_SHARE = 4  # the sized log takes at most 1/LOG_SHARE of the free space
FULL_REQUEST_RING = 1 * MiB
FULL_RESPONSE_RING = 1 * MiB
FULL_WATCH_RING = 256 * KiB
CLIENT_SHARE = 32  # one client (its two rings and one arena) fits in 1/CLIENT_SHARE
MAX_SHRINK = 6  # rings are at most 2**6 = 64 times smaller than their full size
PAGE = 4096  # tmpfs allocates whole pages; a semaphore is one page too

BUDGET_ENV = "SHMWATCH_SHM_BUDGET"


def parse_size(text: str) -> int:
    """'64M', '256k', '1.5M', '1G' or plain bytes (suffixes are powers of 1024; a trailing
    'B' or 'iB' is allowed). Raises ValueError with a message a user can act on."""
    t = str(text).strip().lower()
    for tail in ("ib", "b"):
        if t.endswith(tail) and len(t) > len(tail):
            t = t[:-len(tail)]
            break
    mult = {"k": KiB, "m": MiB, "g": GiB}.get(t[-1:], 1)
    number = t[:-1] if mult > 1 else t
    try:
        value = float(number) * mult
    except ValueError:
        raise ValueError(f"cannot read {text!r} as a size "
                         f"(bytes, or with a k, M or G suffix: 256k, 64M)") from None
    if value != value or value < 0 or value >= 1 << 62:  # NaN, negative, absurd
        raise ValueError(f"{text!r} is not a usable size")
    return int(value)


def human(n: int) -> str:
    """A size as people read it: '64 MiB', '1.5 MiB', '256 KiB', '100 B'."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            text = f"{n / unit:.1f}".removesuffix(".0")
            return f"{text} {name}"
    return f"{n} B"


def option_size(n: int) -> str:
    """A size as an option value ('16M', '256k', '1000')."""
    if n and n % MiB == 0:
        return f"{n // MiB}M"
    if n and n % KiB == 0:
        return f"{n // KiB}k"
    return str(n)


def shm_free() -> int | None:
    """Bytes an unprivileged process may still allocate in /dev/shm (None: unknown)."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def budget(given: int | None) -> tuple[int | None, str]:
    """(free bytes assumed, where the figure comes from) for sizing a broker."""
    if given is not None:
        return given, "--shm-budget"
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            return parse_size(env), "$" + BUDGET_ENV
        except ValueError as exc:
            raise ValueError(f"${BUDGET_ENV}: {exc}") from None
    return shm_free(), SHM_DIR


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def segment_bytes(payload: int) -> int:
    """What one segment of `payload` bytes takes in /dev/shm (header, whole pages)."""
    return _pages(HEADER_SIZE + payload)


def start_bytes(log_bytes: int, max_clients: int, stats_bytes: int) -> int:
    """What a broker takes in /dev/shm when it starts: control segment, its doorbell,
    the revision log and the stats segment."""
    return (segment_bytes(ctl_payload_size(max_clients)) + PAGE
            + segment_bytes(revlog_bytes(log_bytes)) + segment_bytes(stats_bytes))


def client_bytes(request_ring_bytes: int, response_ring_bytes: int) -> int:
    """What each connected client takes: its request and response rings, its doorbell."""
    return segment_bytes(CLIENT_HEADER + ring_bytes(request_ring_bytes)
                         + ring_bytes(response_ring_bytes)) + PAGE


def arena_bytes(watch_ring_bytes: int, rings_per_arena: int) -> int:
    """What one arena takes: a client gets one at its first watch, another every
    `rings_per_arena` watches it has open at once."""
    return segment_bytes(ring_bytes(watch_ring_bytes) * rings_per_arena)


@dataclass(frozen=True)
class Sizing:
    """The sizes a broker uses, and what they were sized from.

    `free` is the free space assumed (None: unknown, so the full defaults), `source`
    where that figure comes from ('/dev/shm', '--shm-budget' or '$SHMWATCH_SHM_BUDGET'),
    `sized` the options chosen here because the user gave none."""

    log_bytes: int
    request_ring_bytes: int
    response_ring_bytes: int
    watch_ring_bytes: int
    free: int | None
    source: str
    sized: tuple[str, ...]

    def describe(self) -> str:
        """The sizes for the ready line: what the broker reserves and per what."""
        text = (f"log {human(self.log_bytes)}, rings per client "
                f"{human(self.request_ring_bytes)} + {human(self.response_ring_bytes)}, "
                f"per watcher {human(self.watch_ring_bytes)}")
        return f"{text}; {self.origin()}"

    def origin(self) -> str:
        if not self.sized:
            return "sizes as given"
        if self.free is None:
            return f"full default sizes ({self.source} free space unknown)"
        if self.source == SHM_DIR:
            return f"sized from {human(self.free)} free in {SHM_DIR}"
        return f"sized from a {human(self.free)} budget ({self.source})"


def plan(free: int | None, source: str, *, rings_per_arena: int,
         log_bytes: int | None = None, request_ring_bytes: int | None = None,
         response_ring_bytes: int | None = None,
         watch_ring_bytes: int | None = None) -> Sizing:
    """Choose every size the user left out (None) for `free` bytes of /dev/shm.

    Given sizes are kept as they are; whether they fit is `check_start`'s business."""
    sized = []
    if log_bytes is None:
        sized.append("log_bytes")
        if free is None:
            log_bytes = FULL_LOG
        else:
            log_bytes = min(FULL_LOG, max(MIN_LOG, free // LOG_SHARE // MiB * MiB))
    shift = 0
    if free is not None:
        full_client = (FULL_REQUEST_RING + FULL_RESPONSE_RING
                       + FULL_WATCH_RING * max(1, rings_per_arena))
        while shift < MAX_SHRINK and full_client >> shift > free // CLIENT_SHARE:
            shift += 1
    if request_ring_bytes is None:
        sized.append("request_ring_bytes")
        request_ring_bytes = FULL_REQUEST_RING >> shift
    if response_ring_bytes is None:
        sized.append("response_ring_bytes")
        response_ring_bytes = FULL_RESPONSE_RING >> shift
    if watch_ring_bytes is None:
        sized.append("watch_ring_bytes")
        watch_ring_bytes = FULL_WATCH_RING >> shift
    return Sizing(log_bytes, request_ring_bytes, response_ring_bytes, watch_ring_bytes,
                  free, source, tuple(sized))


def check_start(s: Sizing, need: int) -> str | None:
    """Why a broker that takes `need` bytes at start cannot start under `s`'s free-space
    figure, in one line naming the option to shrink (None: it fits)."""
    if s.free is None or need <= s.free:
        return None
    return no_space_message(s, need)


def no_space_message(s: Sizing, need: int) -> str:
    """One line for a broker that does not fit in /dev/shm, naming the option to shrink."""
    free = "unknown" if s.free is None else f"{s.free:,}"
    where = (f"{SHM_DIR} has {free} bytes free" if s.source == SHM_DIR
             else f"{s.source} allows {free} bytes")
    head = (f"no space in {SHM_DIR}: the broker needs {need:,} bytes at start "
            f"(a {human(s.log_bytes)} revision log among them) and {where}")
    if s.free is not None and s.free >= 4 * MIN_LOG:
        fits = min(FULL_LOG, s.free // LOG_SHARE // MiB * MiB)
        return f"{head}; give a smaller --log-bytes (--log-bytes {option_size(fits)} fits)"
    return f"{head}; free some space ('shmwatch cleanup' removes what dead brokers left) " \
           f"or give a smaller --log-bytes"
