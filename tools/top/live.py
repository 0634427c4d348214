"""tools/top's live view: the refresh loop. Every --interval it samples the broker and
redraws; in between it waits for keys (keys.py) and redraws at once on one or on a
resize. What it shows is decided by state.py (LiveState) and screen.py."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.live import Live

from .keys import Keys
from .screen import footer, live_body, live_screen
from .state import LiveState, Monitor


def run_live(name: str, interval: float, wait_broker: float) -> int:
    """Until q (0), or until the broker has been gone for `wait_broker` seconds (1)."""
    console = Console()
    mon = Monitor(name)
    ls = LiveState(name, wait_broker)
    exit_msg = None
    next_tick = 0.0
    with Keys() as keys, Live(console=console, screen=True, auto_refresh=False,
                              redirect_stdout=False, redirect_stderr=False) as live:
        while True:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + interval
                exit_msg = ls.refresh(mon, now)
                if exit_msg:
                    break
            w, h = console.size
            body = live_body(ls, mon, width=w, height=h - 1, now=time.monotonic())
            live.update(live_screen(body, footer(ls.sort, ls.paused, interval)), refresh=True)
            if ls.press(keys.wait(max(0.0, next_tick - time.monotonic())), mon):
                break
    if exit_msg:
        print(exit_msg, file=sys.stderr)
        return 1
    return 0
