"""Polling instead of sleeping, where the next message usually comes within a couple of
milliseconds.

A thread woken from sleep runs its next hundred microseconds of Python slowly, on a
virtual machine especially, and the wake-up itself costs tens of microseconds. So a
worker's synchronous call polls its socket for the reply (multiverso_py.direct), and a
server's event loop keeps polling its sockets for a while after each request from
another process (LoopPolling) rather than sleep in epoll until the next one. Either
polls for twice the recent wait, when that is within a limit (2 ms by default,
`MV_POLL_US`), and yields the CPU between polls. The loop also stops at once when a
round lost the CPU for a while: another thread on its core wanted it (a worker's call
polls on; see multiverso_py.direct.ReplyClock).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Callable, Optional

from multiverso_py.errors import InvalidArgument

POLL_LIMIT = 2e-3  # seconds: poll for what usually comes within this
YIELDED = 50e-6  # a poll round this long gave the CPU away (interrupts alone pass 12 µs every few ms)
yield_cpu = getattr(os, "sched_yield", lambda: time.sleep(0))  # sched_yield is POSIX only; it releases the GIL


def poll_limit_from_env() -> float:
    """MV_POLL_US: how long a worker's call may poll for its reply, and a server's loop for
    the next request, before sleeping; POLL_LIMIT when unset."""
    raw = os.environ.get("MV_POLL_US")
    return POLL_LIMIT if raw is None else parse_poll_us(raw, "MV_POLL_US")


def parse_poll_us(raw: str, what: str) -> float:
    """Seconds from a poll limit given in microseconds, from 0 (never poll) to 1 s."""
    try:
        micros = float(raw)
    except ValueError:
        micros = -1.0
    if not 0 <= micros <= 1e6:
        raise InvalidArgument(f"{what}={raw!r} is not a number of microseconds from 0 (never poll) to 1000000")
    return micros * 1e-6


def poll_until(start: float, recent: Optional[float], limit: float) -> float:
    """When to stop polling, from `start`, for something that lately took `recent` seconds
    (None: not known yet): twice that later, or 0.0 (never poll) when that exceeds the
    limit or the limit is 0. Times are time.perf_counter() values."""
    window = limit if recent is None else 2 * recent
    return start + window if 0 < window <= limit else 0.0


def running_average(average: Optional[float], sample: float) -> float:
    """An average that moves an eighth of the way to each new sample."""
    return sample if average is None else average + (sample - average) / 8


class LoopPolling:
    """Keeps an event loop polling its sockets, instead of sleeping, for a while after
    each request: twice the recent gap between requests, within `limit` seconds. Each
    round is a callback that yields the CPU (and the GIL, for the table threads) and
    queues itself again, which makes the loop look at its sockets without blocking; a
    round that lost the CPU for longer than YIELDED ends the polling until the next
    request. While `busy()` (a table thread runs a job) the loop sleeps instead, since
    each round needs the GIL that the job's Python wants too; the job's reply calls
    resume(). An idle loop sleeps as before."""

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: float = POLL_LIMIT,
                 busy: Callable[[], bool] = lambda: False):
        self.limit = limit
        self._busy = busy
        self.gap: Optional[float] = None  # seconds between requests, lately
        self.poll_until = 0.0  # a time.perf_counter() value
        self.rounds = 0  # polling rounds run, for tests
        self._loop = loop
        self._last = 0.0  # when the previous request came
        self._polling = False

    def request_arrived(self) -> None:
        now = time.perf_counter()
        if self._last:
            self.gap = running_average(self.gap, now - self._last)
        self._last = now
        self.poll_until = poll_until(now, self.gap, self.limit)
        self.resume()

    def resume(self) -> None:
        """Poll for the rest of the window, unless polling already: after a request, or
        once the work that paused polling is done."""
        if not self._polling and time.perf_counter() < self.poll_until:
            self._polling = True
            self._loop.call_soon(self._poll)

    def _poll(self) -> None:
        before = time.perf_counter()
        if before < self.poll_until and not self._busy():
            yield_cpu()
            self.rounds += 1
            if time.perf_counter() - before <= YIELDED:
                self._loop.call_soon(self._poll)
                return
            self.poll_until = 0.0  # lost the CPU: sleep until the next request
        self._polling = False
