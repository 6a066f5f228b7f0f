"""Small table jobs kept on the event loop's core (multiverso_py.cores): real threads on
real cores, with a busy process on the other core as a polling worker would be."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from multiverso_py import cores
from multiverso_py.cores import LoopCore, current_cpu, move_to
from multiverso_py.polling import yield_cpu
from multiverso_py.server_jobs import TablePool

needs_two_cores = pytest.mark.skipif(current_cpu() < 0 or len(os.sched_getaffinity(0)) < 2,
                                     reason="moves threads between two cores (Linux)")


def on_a_thread(fn):
    """fn's result, run on a thread of its own (whose affinity the test may change)."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join(10)
    assert result, "the thread did not finish"
    return result[0]


@needs_two_cores
def test_move_to_moves_the_calling_thread_and_leaves_its_affinity_as_it_was() -> None:
    allowed = os.sched_getaffinity(0)

    def moves() -> list:
        return [(cpu, move_to(cpu), current_cpu(), os.sched_getaffinity(0)) for cpu in sorted(allowed)[:2]]

    for cpu, moved, now, mask in on_a_thread(moves):
        assert moved and now == cpu and mask == allowed, (cpu, moved, now, mask)
    assert on_a_thread(lambda: move_to(max(allowed) + 1)) is False  # not a core it may use


def small_jobs_on(pool: TablePool, loop_core: int, count: int) -> list[int]:
    """The cores that `count` small jobs ran on, submitted by a thread on loop_core that
    polls for each job's end (yielding), as the event loop does."""

    def loop() -> list[int]:
        os.sched_setaffinity(0, {loop_core})
        ran_on: list[int] = []
        deadline = time.monotonic() + 20
        for _ in range(count):
            done = threading.Event()
            pool.submit(lambda: (ran_on.append(current_cpu()), done.set()))
            while not done.is_set():
                if time.monotonic() > deadline:
                    return ran_on
                yield_cpu()
        return ran_on

    return on_a_thread(loop)


def another_core() -> int:
    """A core the calling thread may run on other than the one it runs on now."""
    return next(c for c in sorted(os.sched_getaffinity(0)) if c != current_cpu())


@needs_two_cores
def test_a_run_of_small_jobs_away_from_the_loop_moves_the_thread_and_nothing_else_does() -> None:
    """LoopCore on a real thread: long jobs, an unknown loop core or jobs on the loop's
    core never move it; AWAY_LIMIT small jobs in a row elsewhere move it there."""

    def run() -> tuple[int, int, int, int]:
        away = another_core()
        stays = LoopCore()
        for _ in range(2 * cores.AWAY_LIMIT):
            stays.job_done(2 * cores.SMALL_JOB, away)  # numpy work: left where it runs
            stays.job_done(1e-6, -1)  # the loop's core unknown
            stays.job_done(1e-6, current_cpu())  # already there
        moves = LoopCore()
        for _ in range(5):  # bounded retries: the kernel may move the thread mid-run by itself
            target = another_core()
            for _ in range(cores.AWAY_LIMIT):
                moves.job_done(1e-6, target)
            if moves.moves:
                return stays.moves, moves.moves, current_cpu(), target
        return stays.moves, moves.moves, -1, -1

    stayed, moved, now, target = on_a_thread(run)
    assert stayed == 0
    assert moved == 1 and now == target, (moved, now, target)


JOBS = 20 * cores.AWAY_LIMIT  # a thread that must move itself does so early in the first half


@needs_two_cores
def test_small_jobs_submitted_from_one_core_end_up_running_on_it() -> None:
    """The whole path: a table thread that last ran on the busy core ends up beside the
    submitting loop, by moving itself or by the kernel's own choice (some kernels wake it
    beside its waker; others leave it away, which the move fixes)."""
    loop_core, other = sorted(os.sched_getaffinity(0))[:2]
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a polling worker's core
    pool = TablePool(1, "test-pool")
    try:
        os.sched_setaffinity(busy.pid, {other})
        table_thread = pool._threads[0].native_id
        allowed = os.sched_getaffinity(table_thread)
        os.sched_setaffinity(table_thread, {other})
        assert small_jobs_on(pool, loop_core, 1) == [other]  # it ran there last...
        os.sched_setaffinity(table_thread, allowed)  # ...and may run anywhere again
        ran_on = small_jobs_on(pool, loop_core, JOBS)
    finally:
        pool.shutdown()
        busy.kill()
        busy.wait(10)
    assert len(ran_on) == JOBS
    last = ran_on[JOBS // 2:]
    assert last.count(loop_core) >= 0.9 * len(last), \
        f"the last small jobs ran on cores {last} (the thread moved itself {pool.cores[0].moves} times)"
