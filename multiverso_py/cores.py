"""Keeping a server's small table jobs on its event loop's core.

The loop hands a job to a table thread and yields its CPU (see server_jobs.TablePool):
when the kernel wakes the thread on the loop's core, the job runs at once and its reply
is queued before the loop looks for events again. But the kernel wakes a thread where
it last ran, and with every core busy (a worker polling for its reply on the other
core of a small machine) a thread that once ran elsewhere stays there: each small job
then wakes the sleeping loop, and a small get took 88-98 µs instead of 65-69 µs in a
third of the runs of the dense benchmark, counted from /proc.

So a table thread whose small jobs keep running away from the loop's core moves itself
there once: it narrows its own CPU affinity to that core, which moves a running thread
at once, and widens it back at once, so nothing stays pinned and the kernel may move
it again when it has better use for it. Jobs that take longer than SMALL_JOB (numpy
work that runs without the GIL) are left wherever they run. Linux only; elsewhere
current_cpu() is -1 and nothing moves.
"""

from __future__ import annotations

import ctypes
import os
import sys
from typing import Callable

SMALL_JOB = 100e-6  # seconds: a job this short is better run on the loop's core than beside it
AWAY_LIMIT = 16  # small jobs in a row away from the loop's core before the thread moves


def _sched_getcpu() -> Callable[[], int]:
    if sys.platform != "linux" or not hasattr(os, "sched_setaffinity"):
        return lambda: -1
    try:
        return ctypes.CDLL(None, use_errno=True).sched_getcpu
    except (OSError, AttributeError):
        return lambda: -1


current_cpu = _sched_getcpu()  # the core the calling thread runs on, -1 where that cannot be told


def move_to(cpu: int) -> bool:
    """Move the calling thread to core `cpu` and leave its affinity as it was; False if
    that core is not one it may run on."""
    allowed = os.sched_getaffinity(0)
    if cpu not in allowed or len(allowed) < 2:
        return False
    os.sched_setaffinity(0, {cpu})  # a running thread moves at once
    os.sched_setaffinity(0, allowed)  # and stays there until the kernel moves it
    return True


class LoopCore:
    """One table thread's count of small jobs in a row run away from the loop's core."""

    def __init__(self) -> None:
        self.away = 0
        self.moves = 0  # times this thread moved itself, for tests

    def job_done(self, seconds: float, loop_cpu: int) -> None:
        """After a job of `seconds` on this thread, with the loop last seen on `loop_cpu`."""
        if seconds > SMALL_JOB or loop_cpu < 0 or current_cpu() == loop_cpu:
            self.away = 0
            return
        self.away += 1
        if self.away >= AWAY_LIMIT:
            self.away = 0
            self.moves += move_to(loop_cpu)
