"""Synchronous calls on the caller's own thread (multiverso_py.direct), against real
server processes: the same results as through the I/O thread, never overtaking a call
in flight, and the same faults: a frozen server times out, a killed one fails fast, and
an add whose link broke after it left is applied once. On the server's host the link
takes the server's local (abstract Unix) socket, and TCP where that is off or missing."""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import struct
import termios
import threading
import time
from typing import Any, Callable

import numpy as np
import psutil
import pytest

import multiverso_py as mv
from multiverso_py.direct import DirectLink, connect_local
from multiverso_py.framing import FrameReader
from multiverso_py.protocol import MsgType
from multiverso_py.testing import LocalCluster, read_frame, wait_for


def _run_in_thread(action: Callable[[], Any]) -> tuple[threading.Thread, dict]:
    """Run action on a thread of its own; the dict gets its "value" or "error"."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except BaseException as exc:  # handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def _queued_at_server(link_sock: socket.socket, server_pid: int) -> int:
    """Bytes the server has not read yet on its end of this socket (it is stopped); on a
    Unix socket, which charges them to the sender until read, the memory they take."""
    if link_sock.family == socket.AF_UNIX:
        return struct.unpack("i", fcntl.ioctl(link_sock, termios.TIOCOUTQ, bytes(4)))[0]
    ours = link_sock.getsockname()[1]
    for conn in psutil.Process(server_pid).net_connections("tcp"):
        if conn.raddr and conn.raddr.port == ours:
            break
    else:
        return 0
    local_port = f"{conn.laddr.port:04X}"
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":" + local_port) and fields[2].endswith(f":{ours:04X}"):
                return int(fields[4].split(":")[1], 16)  # tx_queue:rx_queue
    return 0


def _stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 5)


def test_synchronous_calls_go_on_the_callers_thread_with_the_io_threads_results(
        monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 1000, 300)
    delta = rng.standard_normal((300, 8)).astype(np.float32)
    keys = rng.integers(-2**63, 2**63 - 1, 500, dtype=np.int64)
    results = {}
    for direct in ("1", "0"):
        monkeypatch.setenv("MV_DIRECT", direct)
        with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
            matrix = mv.MatrixTable(1000, 8, name=f"m{direct}")
            kv = mv.KVTable(dim=4, name=f"kv{direct}")
            big = mv.ArrayTable(1 << 18, name=f"big{direct}")  # 1 MiB: through shared memory
            matrix.add(delta, rows)
            kv.add(keys, np.ones((500, 4), np.float32))
            big.add(np.arange(1 << 18, dtype=np.float32))
            results[direct] = (matrix.get(), matrix.get(rows), kv.get(keys), len(kv), big.get())
            assert job.client.direct_calls == (8 if direct == "1" else 0)
    for on, off in zip(*results.values()):
        np.testing.assert_array_equal(on, off)
    expected = np.zeros((1000, 8), np.float32)
    np.add.at(expected, rows, delta)
    np.testing.assert_allclose(results["1"][0], expected, rtol=1e-6)


def test_a_synchronous_call_never_overtakes_an_async_one_in_flight() -> None:
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
        table = mv.ArrayTable(16, name="t")
        table.add(np.ones(16))
        before = job.client.direct_calls
        server = cluster.servers[0].pid
        _stop(server)
        try:
            pending = table.add_async(np.full(16, 2.0))  # cannot be acknowledged while stopped
            thread, outcome = _run_in_thread(table.get)
            thread.join(0.3)
            assert thread.is_alive() and not outcome
        finally:
            os.kill(server, signal.SIGCONT)
        thread.join(10)
        pending.result(10)
        np.testing.assert_array_equal(outcome["value"], np.full(16, 3.0))  # it saw the add before it
        assert job.client.direct_calls == before  # and went through the I/O thread behind it
        table.get()
        assert job.client.direct_calls == before + 1  # nothing in flight: on the caller's thread again


def test_a_frozen_server_times_out_a_direct_get_and_the_next_one_gets_its_own_reply() -> None:
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=2) as job:
        table = mv.ArrayTable(64, "int64", name="frozen")
        values = np.arange(64)
        table.add(values)
        server = cluster.servers[0].pid
        _stop(server)
        try:
            start = time.monotonic()
            with pytest.raises(mv.RequestTimeout, match=r"get on table 'frozen': no reply from server 0"):
                table.get()
            assert 1.8 <= time.monotonic() - start <= 4.0
        finally:
            os.kill(server, signal.SIGCONT)
        calls = job.client.direct_calls
        np.testing.assert_array_equal(table.get(), values)  # on a new link: the late reply is not taken
        table.add(values)
        np.testing.assert_array_equal(table.get(), 2 * values)
        assert job.client.direct_calls == calls + 3


def test_a_server_killed_under_a_direct_get_fails_it_fast() -> None:
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=30) as job:
        table = mv.ArrayTable(64, name="doomed")
        table.get()  # opens the link
        server = cluster.servers[0].pid
        _stop(server)
        thread, outcome = _run_in_thread(table.get)
        link = job.client._links[0]
        assert wait_for(lambda: _queued_at_server(link._sock, server) > 0, 10), "the get never reached the server"
        start = time.monotonic()
        cluster.kill_server(0)
        thread.join(15)
        assert time.monotonic() - start < 10, "the get waited for its 30 s timeout"
        assert isinstance(outcome.get("error"), mv.ConnectionLost), outcome
        assert "'doomed'" in str(outcome["error"]) and "server 0" in str(outcome["error"])


def test_an_add_whose_link_broke_after_it_left_is_applied_once() -> None:
    """The link breaks with the add in the stopped server's socket buffer: the client
    resends it through the I/O thread with the same sequence number, so whichever copy
    the server reads second is recognised and skipped."""
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
        table = mv.ArrayTable(16, name="once")
        table.get()  # opens the link
        server = cluster.servers[0].pid
        _stop(server)
        try:
            thread, outcome = _run_in_thread(lambda: table.add(np.ones(16)))
            link = job.client._links[0]
            assert wait_for(lambda: _queued_at_server(link._sock, server) > 0, 10), "the add never left"
            link.interrupt()  # what the client does when the server's connection breaks
            assert wait_for(lambda: 0 not in job.client._links, 10)  # the caller handed it over
        finally:
            os.kill(server, signal.SIGCONT)
        thread.join(15)
        assert outcome == {"value": None}, outcome
        np.testing.assert_array_equal(table.get(), np.ones(16))


def test_threads_calling_at_once_share_the_link_and_lose_nothing() -> None:
    """One thread at a time takes the link; the others go through the I/O thread."""
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
        table = mv.ArrayTable(8, "int64", name="shared")
        rounds, threads = 60, 4

        def work(k: int) -> None:
            for _ in range(rounds):
                table.add(np.full(8, k + 1))
                assert table.get().min() >= k + 1  # this thread's own add is always seen

        workers = [_run_in_thread(lambda k=k: work(k)) for k in range(threads)]
        for thread, _ in workers:
            thread.join(60)
        assert all(outcome == {"value": None} for _, outcome in workers), [o for _, o in workers]
        before = job.client.direct_calls
        np.testing.assert_array_equal(table.get(), np.full(8, rounds * sum(range(1, threads + 1))))
        assert job.client.direct_calls == before + 1  # every call accounted for: the link is free again


def _local_name(job: Any, sid: int) -> str:
    return job.client._conns[sid].greeting["local"]


def test_a_worker_on_the_servers_host_calls_through_its_local_socket() -> None:
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
        table = mv.ArrayTable(16, name="t")
        table.add(np.arange(16))
        np.testing.assert_array_equal(table.get(), np.arange(16))
        sock = job.client._links[0]._sock
        assert sock.family == socket.AF_UNIX
        assert sock.getpeername() == b"\0" + _local_name(job, 0).encode()  # abstract: no file to leave behind
        assert job.client.direct_calls == 2


def test_a_server_started_with_no_local_socket_is_called_over_tcp() -> None:
    with LocalCluster(workers=1, servers=1, server_options=["--no-local-socket"]) as cluster, \
            mv.init(cluster.address, timeout=20) as job:
        table = mv.ArrayTable(16, name="t")
        table.add(np.ones(16))
        np.testing.assert_array_equal(table.get(), np.ones(16))
        assert "local" not in job.client._conns[0].greeting
        assert job.client._links[0]._sock.family == socket.AF_INET and job.client.direct_calls == 2


def test_a_link_takes_tcp_where_the_local_socket_does_not_answer() -> None:
    """As for a server on another host, whose abstract socket does not exist here."""
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
        address = job.client.servers[0]
        for local, family in ((_local_name(job, 0), socket.AF_UNIX), ("multiverso-server-elsewhere", socket.AF_INET)):
            link = DirectLink(address, None, local=local)
            try:
                assert link._sock.family == family, local
                reply = link.exchange(MsgType.HEARTBEAT, 1, {}, [], None, 10)
                assert reply.type is MsgType.REPLY and reply.req_id == 1
            finally:
                link.close()


def test_garbage_on_the_local_socket_is_refused_and_the_server_serves_on() -> None:
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=20) as job:
        table = mv.ArrayTable(16, name="t")
        table.add(np.ones(16))
        sock = connect_local(_local_name(job, 0), 10)
        try:
            reader = FrameReader()
            assert read_frame(sock, reader).type is MsgType.HELLO
            sock.sendall(np.random.default_rng(5).bytes(4096))
            answer = read_frame(sock, reader)
            assert answer.type is MsgType.ERROR and "malformed frame" in answer.body["message"]
            assert sock.recv(1) == b""  # then closed: the stream's framing is lost
        finally:
            sock.close()
        np.testing.assert_array_equal(table.get(), np.ones(16))
        assert wait_for(lambda: "closing connection from a local socket" in cluster.log.getvalue(), 10), \
            cluster.log.getvalue()
