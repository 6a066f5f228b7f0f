"""Polling instead of sleeping (multiverso_py.polling). A synchronous call on the
caller's thread polls for its reply before it sleeps (multiverso_py.direct.ReplyClock):
the window follows recent waits, a reply that comes within it is read without the
thread ever sleeping, and a poll that shares its CPU with another process gives it the
CPU at each poll and polls on. A server's event loop polls for the next request for
twice the recent gap between requests, and sleeps when requests stop."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import psutil
import pytest

import multiverso_py as mv
from multiverso_py.direct import ReplyClock, read_frames
from multiverso_py.framing import FrameReader
from multiverso_py.polling import POLL_LIMIT, LoopPolling
from multiverso_py.protocol import MsgType
from multiverso_py.testing import LocalCluster

# Connects back; for each byte it reads, waits that many milliseconds and sends a frame.
_LATE_SENDER = """
import socket, sys, time
from multiverso_py.framing import encode
from multiverso_py.protocol import MsgType
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while delay := sock.recv(1):
    time.sleep(delay[0] / 1000)
    sock.sendall(b"".join(encode(MsgType.REPLY, 7, {"data": 1})))
"""


def _polls_for(poller: ReplyClock | LoopPolling, window: float) -> bool:
    """Whether the poller, told of a send (a ReplyClock) or a request (a LoopPolling)
    now, polls for `window` seconds from then; bounded by the times around the call, so
    a preempted test thread cannot fail the check."""
    start = time.perf_counter()
    if isinstance(poller, ReplyClock):
        poller.sent()
    else:
        poller.request_arrived()
    return start + window <= poller.poll_until <= time.perf_counter() + window


def test_the_poll_window_is_twice_the_recent_waits_within_the_limit() -> None:
    clock = ReplyClock(2e-3)
    assert _polls_for(clock, 2e-3)  # nothing known yet: the whole limit
    clock.expected = 0.4e-3
    assert _polls_for(clock, 0.8e-3)
    clock.expected = 1.5e-3  # replies take longer than the limit allows polling for: sleep
    clock.sent()
    assert clock.poll_until == 0.0
    never = ReplyClock(0.0)
    never.sent()
    assert never.poll_until == 0.0
    clock.expected = 1e-3
    start = time.perf_counter()
    clock.sent()
    clock.answered()  # answered at once: the average moves an eighth of the way to ~0
    took = time.perf_counter() - start
    assert 0.875e-3 - 1e-12 <= clock.expected <= 0.875e-3 + took / 8 + 1e-12


@pytest.fixture()
def late_sender():
    """Our end of a connection to a process that answers each byte with a frame, as late
    as the byte says (in milliseconds)."""
    listener = socket.create_server(("127.0.0.1", 0))
    proc = subprocess.Popen([sys.executable, "-c", _LATE_SENDER, str(listener.getsockname()[1])])
    try:
        listener.settimeout(30)
        sock, _ = listener.accept()
        sock.setblocking(False)  # as a DirectLink's: its reads poll, then wait in poll()
        yield sock
        sock.close()
        proc.wait(10)
    finally:
        listener.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# Linux counts a thread's sleeps (voluntary context switches); the tests that read them need it.
counts_sleeps = pytest.mark.skipif(not hasattr(resource, "RUSAGE_THREAD"), reason="needs Linux's per-thread rusage")


def _slept_while_reading(sock: socket.socket, clock: ReplyClock, delay_ms: int) -> int:
    """Times this thread went to sleep while it waited for a frame sent delay_ms late."""
    sock.sendall(bytes([delay_ms]))
    clock.sent()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw
    frames = read_frames(sock, FrameReader(), clock, time.monotonic() + 10)
    slept = resource.getrusage(resource.RUSAGE_THREAD).ru_nvcsw - before
    assert [(f.type, f.req_id, f.body) for f in frames] == [(MsgType.REPLY, 7, {"data": 1})]
    return slept


def test_a_read_past_its_deadline_times_out(late_sender: socket.socket) -> None:
    late_sender.sendall(bytes([200]))
    start = time.monotonic()
    with pytest.raises(socket.timeout):
        read_frames(late_sender, FrameReader(), ReplyClock(1e-3), start + 0.05)
    assert 0.05 <= time.monotonic() - start < 0.18  # it slept until the deadline, not until the reply
    late = read_frames(late_sender, FrameReader(), None, time.monotonic() + 10)  # the reply still comes whole
    assert [(f.type, f.req_id) for f in late] == [(MsgType.REPLY, 7)]


@counts_sleeps
def test_a_reply_within_the_window_is_read_without_sleeping(late_sender: socket.socket) -> None:
    assert _slept_while_reading(late_sender, ReplyClock(0.0), 1) >= 1  # the wait, asleep
    polled = []
    for _ in range(10):  # an interrupt or another process can take the CPU from a poll, which then stops
        clock = ReplyClock(0.5)
        polled.append(_slept_while_reading(late_sender, clock, 1))
        if clock.poll_until:
            break
    assert polled[-1] == 0, polled  # polled the millisecond through


@counts_sleeps
def test_a_reply_after_the_window_is_waited_for_asleep(late_sender: socket.socket) -> None:
    assert _slept_while_reading(late_sender, ReplyClock(0.2e-3), 5) >= 1  # polled 0.2 ms of the 5


@counts_sleeps
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="pinning threads to a CPU needs Linux")
def test_a_poll_that_shares_its_cpu_polls_on_and_lets_the_other_process_run(late_sender: socket.socket) -> None:
    """On a core another process wants, each poll's yield lets that process run; the
    poll keeps going (sleeping would leave its core idle for the server's threads to
    move onto) and reads the reply without sleeping. The process's share while the poll
    runs is judged against its share while this thread sleeps, which other load on the
    machine lowers too; a poll that did not yield would leave it half."""
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        os.sched_setaffinity(busy.pid, {cpu})
        os.sched_setaffinity(0, {cpu})  # this thread and the busy process take turns on one CPU
        other = psutil.Process(busy.pid)

        def share_while(wait: Callable[[], object]) -> float:
            """The busy process's CPU seconds over the wall seconds that wait() took."""
            ran, start = sum(other.cpu_times()[:2]), time.perf_counter()
            wait()
            return (sum(other.cpu_times()[:2]) - ran) / (time.perf_counter() - start)

        for _ in range(10):  # until the busy process has started, and so competes
            if share_while(lambda: time.sleep(0.05)) > 0.4:
                break
        shares = []
        for _ in range(3):  # a burst of other load can fall on either measurement
            alone = share_while(lambda: time.sleep(0.2))
            slept: list[int] = []
            polling = share_while(lambda: slept.append(_slept_while_reading(late_sender, ReplyClock(2.0), 200)))
            assert slept == [0]  # polled the 200 ms through
            shares.append((polling, alone))
            if polling > 0.75 * alone:  # the yields gave the core away
                break
        else:
            raise AssertionError(f"the busy process's CPU share while polling / while asleep: {shares}")
    finally:
        os.sched_setaffinity(0, before)
        busy.kill()
        busy.wait()


def test_mv_poll_us_sets_the_window_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("soon", "-1", "nan", "2e6"):
        monkeypatch.setenv("MV_POLL_US", bad)
        with pytest.raises(mv.InvalidArgument, match="MV_POLL_US"):
            mv.init()
    for setting, limit in (("0", 0.0), ("500", 500e-6), (None, POLL_LIMIT)):
        if setting is None:
            monkeypatch.delenv("MV_POLL_US")
        else:
            monkeypatch.setenv("MV_POLL_US", setting)
        with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
            table = mv.ArrayTable(4, name="t")
            table.add(np.ones(4))
            np.testing.assert_array_equal(table.get(), np.ones(4))
            assert job.client.direct_calls == 2 and job.client._links[0].replies.limit == limit


def test_a_server_loop_polls_for_twice_the_recent_gap_within_its_limit() -> None:
    loop = asyncio.new_event_loop()
    try:
        for _ in range(10):  # a round needs the loop to run within the window: a busy machine may delay it
            polling = LoopPolling(loop, 2e-3)
            assert _polls_for(polling, 2e-3)  # nothing known yet: the whole limit
            loop.run_until_complete(asyncio.sleep(0.01))  # the window passes: polling ends by itself
            if polling.rounds:
                break
        assert polling.rounds > 0 and not polling._polling
        rounds = polling.rounds
        polling.request_arrived()  # 10 ms or more after the last: longer than the limit, so no polling
        assert polling.poll_until == 0.0
        loop.run_until_complete(asyncio.sleep(0.005))
        assert polling.rounds == rounds
        recent = LoopPolling(loop, 2e-3)
        recent.gap = 0.3e-3  # its first request: no gap to average in
        assert _polls_for(recent, 0.6e-3)  # twice the gap
        busy = [True]  # a table thread runs a job: the loop leaves the GIL to it, asleep
        paused = LoopPolling(loop, 2e-3, busy=lambda: busy[0])
        paused.request_arrived()
        loop.run_until_complete(asyncio.sleep(0))
        assert paused.rounds == 0 and not paused._polling and paused.poll_until
        busy[0] = False
        for _ in range(10):
            paused.poll_until = time.perf_counter() + 2e-3  # the window, however long the loop took to get here
            paused.resume()  # the job's reply went out: poll for the rest of the window
            loop.run_until_complete(asyncio.sleep(0.01))
            if paused.rounds:
                break
        assert paused.rounds > 0 and not paused._polling
        never = LoopPolling(loop, 0.0)
        never.request_arrived()
        loop.run_until_complete(asyncio.sleep(0.005))
        assert never.poll_until == 0.0 and never.rounds == 0
    finally:
        loop.close()


def test_an_embedded_server_never_polls() -> None:
    """Its loop is the worker's I/O thread, and the caller's thread needs the GIL."""
    with mv.init(threads=1) as job:
        assert job.embedded is not None and job.embedded[1].polling.limit == 0.0
        table = mv.ArrayTable(4, name="t")
        table.add(np.ones(4))
        np.testing.assert_array_equal(table.get(), np.ones(4))


def _loop_sleeps(pid: int) -> int:
    with open(f"/proc/{pid}/task/{pid}/status") as f:  # the main thread: the server's event loop
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="reads Linux's per-thread counters")
def test_a_server_loop_polls_between_requests_and_sleeps_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real server processes, started with MV_POLL_US=0 (the servers' default for
    --poll-us) and without: polling, the loop sleeps less often per small get; idle, it
    sleeps again instead of burning its core. A round that lost the CPU ends the
    polling, so on a loaded machine one block of gets may show little: up to three."""
    blocks = []
    for _ in range(3):
        sleeps = {setting: _sleeps_per_get(monkeypatch, setting) for setting in ("0", None)}
        blocks.append(sleeps)
        if sleeps[None] < 0.5 * sleeps["0"]:  # here: none a get polling, 1 without (in epoll, for the next get)
            return
    raise AssertionError(f"the polling server's loop slept about as often as the other: {blocks}")


def _sleeps_per_get(monkeypatch: pytest.MonkeyPatch, setting: str | None, gets: int = 1000) -> float:
    """How often a server's event loop, started with MV_POLL_US=setting, went to sleep per
    small get from this worker (which polls for its replies, its default: a worker that
    sleeps instead wakes on whichever core, and a polling loop that loses its core to it
    stops polling); then checks that the idle server uses no CPU."""
    if setting is None:
        monkeypatch.delenv("MV_POLL_US", raising=False)
    else:
        monkeypatch.setenv("MV_POLL_US", setting)
    with LocalCluster(workers=1, servers=1) as cluster:
        monkeypatch.delenv("MV_POLL_US", raising=False)
        with mv.init(cluster.address, timeout=20):
            table = mv.ArrayTable(16, name="t")
            table.get()
            pid = cluster.servers[0].pid
            before = _loop_sleeps(pid)
            for _ in range(gets):
                table.get()
            sleeps = (_loop_sleeps(pid) - before) / gets
            server = psutil.Process(pid)
            busy = sum(server.cpu_times()[:2])
            time.sleep(0.5)
            assert sum(server.cpu_times()[:2]) - busy < 0.1  # idle: not polling
    return sleeps
