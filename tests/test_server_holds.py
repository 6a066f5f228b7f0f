"""A get is sent from the partition's own memory: no add may change it on its way out,
and a reader that never reads cannot keep the partition closed to everyone else."""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Iterator

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py.framing import encode_bytes
from multiverso_py.protocol import Limits, MsgType, pack_parts
from multiverso_py.scheduler import Scheduler, SchedulerConfig
from multiverso_py.server import Server, ServerConfig
from multiverso_py import testing
from multiverso_py.testing import LocalCluster, raw_connection
from multiverso_py.transport import LoopThread, parse_address

pytestmark = pytest.mark.timeout(120)

ROWS = 4 << 20  # 16 MiB of float32: two partitions, each big enough to be sent in pieces


def _raw_adds(address: str, body: dict, buffers, count: int) -> None:
    """Push `count` adds of one partition over a raw connection, reading every reply."""
    with raw_connection(address, timeout=30) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for seq in range(1, count + 1):
            sock.sendall(encode_bytes(MsgType.ADD, seq, {**body, "seq": seq}, buffers))
            sock.recv(1 << 16)  # the small REPLY; keeps adds and gets interleaving


@contextlib.contextmanager
def in_process_job(config: ServerConfig) -> Iterator[Server]:
    """A scheduler and a server configured for the test, on an I/O thread of this
    process, and this process as the job's one worker."""
    io = LoopThread()
    scheduler = Scheduler(SchedulerConfig(workers=1, servers=1))
    server = Server(config)

    async def start() -> None:
        await scheduler.start()
        await server.start()
        await server.register(parse_address(scheduler.address))

    try:
        io.run(start(), 10)
        with mv.init(scheduler.address, timeout=20):
            yield server
    finally:
        io.call_soon(scheduler.close)
        io.call_soon(server.close)
        io.stop()


def _reads_until_closed(sock: socket.socket, limit: int = 1 << 30) -> bool:
    """Drain what the server sent; True once it closed or reset the connection."""
    received = 0
    try:
        while received < limit:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return True
            received += len(chunk)
    except ConnectionResetError:
        return True
    return False


def test_gets_are_never_torn_by_concurrent_adds():
    with LocalCluster(workers=1, servers=1, log_level="warning") as cluster, mv.init(cluster.address, timeout=30):
        table = mv.ArrayTable(ROWS, name="torn")
        info = table._info
        lo, hi = info.layout["bounds"][0], info.layout["bounds"][1]
        parts, buffers = pack_parts([(0, {}, [np.ones(hi - lo, np.float32)])])
        body = {"table": info.table_id, "client": 4242, "map": info.map_version, "parts": parts}
        adder = threading.Thread(target=_raw_adds, args=(cluster.server_address(0), body, buffers, 60))
        adder.start()
        try:
            seen = set()
            while adder.is_alive() and len(seen) < 200:
                values = table.get()[lo:hi]
                assert values.min() == values.max(), "a get saw a partition half-way through an add"
                seen.add(float(values[0]))
        finally:
            adder.join(60)
        assert len(seen) > 1, "the adds never interleaved with the gets; the test proved nothing"
        np.testing.assert_array_equal(table.get()[lo:hi], np.full(hi - lo, 60, np.float32))


def test_a_reader_that_never_reads_is_dropped_and_frees_the_partition():
    with in_process_job(ServerConfig(flush_timeout=1.0)) as server:
        table = mv.ArrayTable(ROWS, name="stall")
        info = table._info
        # A peer asks for the whole table many times over and never reads a byte.
        stalled = raw_connection(server.address)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        get = encode_bytes(MsgType.GET, 1, {"table": info.table_id, "client": 77, "seq": 1,
                                            "map": info.map_version, "parts": [{"p": 0}, {"p": 1}]})
        stalled.sendall(get * 8)
        # The worker's add waits behind the stalled get, then goes through once the
        # server drops the stalled reader (flush_timeout = 1 s, far below the 20 s timeout).
        table.add(np.ones(ROWS, np.float32))
        np.testing.assert_array_equal(table.get()[:3], [1, 1, 1])
        stalled.settimeout(10)
        assert _reads_until_closed(stalled), "the server kept the stalled connection open"
        stalled.close()


def test_a_reply_over_the_frame_limit_is_an_error_and_frees_the_partition(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MV_SHARED_MEMORY", "0")  # in shared memory the reply would not be a frame at all
    with in_process_job(ServerConfig(limits=Limits(max_frame_bytes=3 << 20))):  # 3 MiB frames, both ways
        table = mv.ArrayTable(1 << 20, name="too_big")  # 4 MiB: a whole get is one 4 MiB reply
        with pytest.raises(mv.ProtocolError, match="exceeds"):
            table.get()
        # The failed get gave its partitions back: adds and small gets still go through.
        last = (1 << 20) - 1
        table.add([1.0, 2.0], [0, last])
        np.testing.assert_array_equal(table.get([0, last]), [1, 2])


def test_a_flooding_peer_is_paused_at_the_in_flight_limit_not_queued_without_bound():
    limit = 8
    with in_process_job(ServerConfig(flush_timeout=2.0, max_in_flight=limit)) as server:
        table = mv.ArrayTable(ROWS, name="flood")
        info = table._info
        body = {"table": info.table_id, "client": 77, "map": info.map_version, "parts": [{"p": 0}]}
        # A stalled reader holds partition 0 (its get keeps the turn until flushed or dropped)...
        stalled = raw_connection(server.address)
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.sendall(encode_bytes(MsgType.GET, 1, {**body, "seq": 1}) * 4)
        # ...while a flooder sends 500 adds to that partition without reading the replies.
        parts, buffers = pack_parts([(0, {}, [np.array([0]), np.ones(1, np.float32)])])  # row 0 += 1
        flood = b"".join(encode_bytes(MsgType.ADD, seq, {**body, "client": 78, "seq": seq, "parts": parts}, buffers)
                         for seq in range(1, 501))
        flooder = raw_connection(server.address, timeout=30)
        sender = threading.Thread(target=flooder.sendall, args=(flood,), daemon=True)
        sender.start()
        # Far fewer than 500 reach the partition's line while it is held; the rest wait unread.
        assert testing.wait_for(lambda: server.flow.peak >= limit, 10), f"peak {server.flow.peak}"
        line = server.tables[info.table_id].partitions[0].line
        assert len(line) <= limit + 4, f"{len(line)} requests queued on the partition"
        # Once the stalled reader is dropped, every add is applied: nothing was lost.
        sender.join(30)
        assert not sender.is_alive()
        assert testing.wait_for(lambda: float(table.get([0])[0]) == 500.0, 30), table.get([0])
        assert server.flow.peak <= limit + 1
        stalled.close()
        flooder.close()


def test_table_pool_runs_jobs_logs_escaped_errors_and_drops_queued_jobs_on_shutdown(
        caplog: pytest.LogCaptureFixture) -> None:
    from multiverso_py.server_jobs import TablePool

    pool = TablePool(2, "test-pool")
    ran: list[int] = []

    def fail() -> None:
        raise RuntimeError("a job's own bug")

    with caplog.at_level("ERROR", logger="multiverso_py.server_jobs"):
        pool.submit(fail)
        for i in range(20):
            pool.submit(lambda i=i: ran.append(i))
        # Two threads: a later job may finish before an earlier one, so wait for all 20.
        assert testing.wait_for(lambda: len(ran) == 20, 10), f"the pool stopped serving after a job raised: {ran}"
        # the other thread may still be logging the failure
        assert testing.wait_for(lambda: "a table job failed" in caplog.text, 10), caplog.text
    assert sorted(ran) == list(range(20))
    assert "a job's own bug" in caplog.text

    blocker, running = threading.Event(), threading.Event()
    pool.submit(lambda: (running.set(), blocker.wait(10)))
    assert running.wait(10)
    pool.shutdown()
    pool.submit(lambda: ran.append(-1))  # queued after shutdown: never runs
    blocker.set()  # the running job finishes
    for thread in pool._threads:
        thread.join(10)
        assert not thread.is_alive(), "a pool thread did not stop after shutdown"
    assert -1 not in ran


def test_table_pool_gives_each_job_to_the_thread_that_went_idle_last_and_runs_a_backlog_in_order() -> None:
    from multiverso_py.server_jobs import TablePool

    pool = TablePool(3, "test-pool")
    try:
        # One request at a time (a synchronous caller): always the same thread, whose
        # cache is warm; the others are never woken.
        names = []
        for _ in range(50):
            done = threading.Event()
            pool.submit(lambda done=done: (names.append(threading.current_thread().name), done.set()))
            assert done.wait(10)
            assert testing.wait_for(lambda: len(pool._idle) == 3, 10), "a thread did not go idle after its job"
        assert len(set(names)) == 1, names

        # Jobs that arrive while every thread is busy wait, and run in arrival order
        # once a thread is free; the busy ones run side by side.
        release = [threading.Event() for _ in range(3)]
        running = [threading.Event() for _ in range(3)]
        order: list[int] = []
        for i in range(3):
            pool.submit(lambda i=i: (running[i].set(), release[i].wait(10)))
        assert all(event.wait(10) for event in running), "the pool did not run three jobs at once"
        for i in range(5):
            pool.submit(lambda i=i: order.append(i))
        assert order == []
        release[0].set()  # one thread free: it drains the backlog alone
        assert testing.wait_for(lambda: len(order) == 5, 10), order
        assert order == list(range(5))
        for event in release:
            event.set()
    finally:
        pool.shutdown()
