"""Raw limits of this machine, measured in the same run as the benchmarks reported against them.

Sockets are set up as the real transport sets them: TCP_NODELAY, default buffer sizes.
Print them with ``python -m benchmarks.limits [--quick]``."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import struct
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from multiprocessing.connection import Connection
from typing import Any, TypedDict

import numpy as np
import uvloop

MiB = 1 << 20
HEADER = struct.Struct("!I")  # length prefix of every echo message
MESSAGE = HEADER.pack(96) + b"x" * 96  # 100 bytes with its prefix
STARTUP_TIMEOUT_S = 30.0  # a spawned child imports numpy and uvloop before it listens
HELPER_LIFETIME_S = 300.0  # a helper exits after this long whatever happens


class LimitTimeout(TimeoutError):
    """A limit measurement did not finish within its time bound."""


class LatencyUs(TypedDict):
    p50: float
    p99: float


def watchdog(parent_pid: int) -> None:
    """Exit this helper when its parent dies or its lifetime ends, so none is left behind."""

    def watch() -> None:
        deadline = time.monotonic() + HELPER_LIFETIME_S
        while os.getppid() == parent_pid and time.monotonic() < deadline:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


@contextmanager
def _helper(target: Callable[..., None], *args: Any) -> Iterator[int]:
    """Run target(port_conn, parent_pid, *args) in a spawned process; yield the port it reports."""
    ctx = mp.get_context("spawn")
    recv_end, send_end = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target, args=(send_end, os.getpid(), *args), daemon=True)
    proc.start()
    send_end.close()
    try:
        if not recv_end.poll(STARTUP_TIMEOUT_S):
            raise LimitTimeout(f"{target.__name__} did not report a port within {STARTUP_TIMEOUT_S:g} s")
        try:
            port = recv_end.recv()
        except EOFError:
            proc.join(1.0)
            raise RuntimeError(f"{target.__name__} exited ({proc.exitcode}) before listening") from None
        yield port
    finally:
        recv_end.close()
        proc.join(5.0)  # helpers exit once their client disconnects; a stuck one is killed
        if proc.is_alive():
            proc.kill()
            proc.join()


def _nodelay(sock: socket.socket) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _uv_run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run coro to completion on a fresh uvloop loop (uvloop.run needs uvloop >= 0.18)."""
    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def interleaved_rounds(actions: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each action's rounds, after one untimed warm-up call each. The actions
    take turns round by round, so a slow spell (this machine has them, and Ray's object
    store stalls for a few hundred ms every so often) costs each of them a round instead
    of costing one of them its median."""
    for action in actions.values():
        action()
    times: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(rounds):
        for name, action in actions.items():
            start = time.perf_counter()
            action()
            times[name].append(time.perf_counter() - start)
    return times


def rates(per_round: float, actions: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """per_round / seconds for each round of each action, the actions interleaved."""
    return {name: [per_round / t for t in times] for name, times in interleaved_rounds(actions, rounds).items()}


def _median_s(action: Callable[[], object], rounds: int) -> float:
    """Median seconds of rounds calls, after one untimed warm-up call."""
    return statistics.median(interleaved_rounds({"": action}, rounds)[""])


def _stream_receiver(port_conn: Connection, parent_pid: int, nbytes: int, rounds: int) -> None:
    """Receive nbytes per round into one preallocated buffer and acknowledge each with one byte."""
    watchdog(parent_pid)
    with socket.create_server(("127.0.0.1", 0)) as server:
        port_conn.send(server.getsockname()[1])
        port_conn.close()
        conn, _ = server.accept()
    with conn:
        _nodelay(conn)
        view = memoryview(np.empty(nbytes, dtype=np.uint8)).cast("B")
        for _ in range(rounds):
            got = 0
            while got < nbytes:
                n = conn.recv_into(view[got:])
                if n == 0:
                    return
                got += n
            conn.sendall(b"\x01")


def socket_stream_gbps(nbytes: int = 64 * MiB, rounds: int = 3, timeout_s: float = 60.0) -> float:
    """Median loopback TCP GB/s: sendall of nbytes, timed until the receiver acks it; each
    send and each ack wait is bounded by timeout_s."""
    payload = np.ones(nbytes, dtype=np.uint8)  # ones, not empty, so its pages are already mapped
    with _helper(_stream_receiver, nbytes, rounds + 1) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
            _nodelay(sock)

            def send_round() -> None:
                sock.sendall(payload)
                if sock.recv(1) != b"\x01":
                    raise RuntimeError("stream receiver closed before acknowledging")

            try:
                return nbytes / _median_s(send_round, rounds) / 1e9
            except TimeoutError:
                raise LimitTimeout(f"streaming {nbytes} bytes took over {timeout_s:g} s") from None


def parallel_socket_stream_gbps(streams: int, nbytes: int = 64 * MiB, rounds: int = 3,
                                timeout_s: float = 60.0) -> float:
    """Median aggregate loopback GB/s of `streams` streams at once, as socket_stream_gbps but
    each from a thread of this process (sendall releases the GIL) to a receiver process of
    its own: what the machine's cores and memory allow that many receiving processes. Every
    round starts at a barrier and spans the first start to the last acknowledgement."""
    payload = np.ones(nbytes, dtype=np.uint8)  # read by every sender
    barrier = threading.Barrier(streams)
    spans: list[list[tuple[float, float]]] = [[] for _ in range(streams)]
    with ExitStack() as stack:
        ports = [stack.enter_context(_helper(_stream_receiver, nbytes, rounds + 1)) for _ in range(streams)]
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=timeout_s))
                 for port in ports]

        def send(i: int) -> None:
            try:
                _nodelay(socks[i])
                for _ in range(rounds + 1):  # the first round warms up
                    barrier.wait(timeout_s)
                    start = time.perf_counter()
                    socks[i].sendall(payload)
                    if socks[i].recv(1) != b"\x01":
                        raise RuntimeError("stream receiver closed before acknowledging")
                    spans[i].append((start, time.perf_counter()))
            except BaseException:
                barrier.abort()  # the other senders stop waiting for this one
                raise

        with ThreadPoolExecutor(streams) as pool:
            futures = [pool.submit(send, i) for i in range(streams)]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        cause = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), None)  # the first failure
        if (cause is None and errors) or isinstance(cause, TimeoutError):
            raise LimitTimeout(f"{streams} parallel streams of {nbytes} bytes took over {timeout_s:g} s")
        if cause is not None:
            raise cause
    return statistics.median([streams * nbytes / (max(e for _, e in r) - min(s for s, _ in r)) / 1e9
                              for r in list(zip(*spans))[1:]])


class _FramedProtocol(asyncio.Protocol):
    """Splits the stream into length-prefixed messages and hands each, whole, to on_message."""

    transport: asyncio.Transport

    def __init__(self) -> None:
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= HEADER.size:
            end = pos + HEADER.size + HEADER.unpack_from(buf, pos)[0]
            if len(buf) < end:
                break
            self.on_message(bytes(buf[pos:end]))
            pos = end
        del buf[:pos]

    def on_message(self, message: bytes) -> None:
        raise NotImplementedError


class _EchoProtocol(_FramedProtocol):
    """Writes each message back as it completes: one reply per request, like a real server."""

    def __init__(self, lost: asyncio.Future[None]) -> None:
        super().__init__()
        self.lost = lost

    def on_message(self, message: bytes) -> None:
        self.transport.write(message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _serve_echo(port_conn: Connection, unix: bool) -> None:
    """Echo for one client and return once it disconnects, so the helper exits by itself.
    Listens on 127.0.0.1, or on an abstract Unix socket (as a server does for workers on
    its host) with `unix`; reports the port or the name."""
    loop = asyncio.get_running_loop()
    lost: asyncio.Future[None] = loop.create_future()
    if unix:
        name = f"\0multiverso-limits-{os.getpid()}"
        server = await loop.create_unix_server(lambda: _EchoProtocol(lost), sock=_unix_listener(name))
        port_conn.send(name)
    else:
        server = await loop.create_server(lambda: _EchoProtocol(lost), "127.0.0.1", 0)
        port_conn.send(server.sockets[0].getsockname()[1])
    port_conn.close()
    await lost


def _unix_listener(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(name)
    sock.listen()
    return sock


def _echo_server(port_conn: Connection, parent_pid: int, unix: bool, cpu: int | None) -> None:
    watchdog(parent_pid)
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    _uv_run(_serve_echo(port_conn, unix))


class _EchoClient(_FramedProtocol):
    """Keeps up to window messages in flight, sending one more as each echo arrives; run(n)
    awaits a future that data_received resolves, as a real client awaits its requests."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window
        self.n = self.sent = self.received = 0
        self.done: asyncio.Future[None] | None = None

    async def run(self, n: int) -> None:
        self.n, self.received, self.sent = n, 0, min(self.window, n)
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(MESSAGE * self.sent)
        await self.done

    def on_message(self, message: bytes) -> None:
        assert self.done is not None
        self.received += 1
        if self.sent < self.n:
            self.sent += 1
            self.transport.write(MESSAGE)
        elif self.received == self.n:
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():  # fail now rather than time out
            self.done.set_exception(ConnectionError(f"echo helper disconnected: {exc or 'EOF'}"))


def _run_echo(window: int, body: Callable[[_EchoClient], Awaitable[Any]], timeout_s: float, what: str,
              unix: bool = False, cpus: tuple[int, int] | None = None) -> Any:
    """Run body on a client of a fresh echo helper (over TCP, or a Unix socket with
    `unix`), on a fresh uvloop loop, within timeout_s; with `cpus`, the client's thread
    runs on the first CPU and the helper on the second."""

    async def session(port: int | str) -> Any:
        loop = asyncio.get_running_loop()
        if unix:  # uvloop connects to no abstract name itself: hand it a connected socket
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(port)
            transport, client = await loop.create_unix_connection(lambda: _EchoClient(window), sock=sock)
        else:
            transport, client = await loop.create_connection(lambda: _EchoClient(window), "127.0.0.1", port)
        try:
            return await body(client)
        finally:
            transport.close()

    client_cpu, helper_cpu = cpus or (None, None)
    with _helper(_echo_server, unix, helper_cpu) as port, _on_cpu(client_cpu):
        try:
            return _uv_run(asyncio.wait_for(session(port), timeout_s))
        except asyncio.TimeoutError:
            raise LimitTimeout(f"{what} took over {timeout_s:g} s") from None


@contextmanager
def _on_cpu(cpu: int | None) -> Iterator[None]:
    """Run the calling thread on `cpu` only (None: leave it be), and restore its CPUs after."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def two_cpus() -> tuple[int, int] | None:
    """Two CPUs this process may run on (Linux), or None."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) >= 2 else None


def uvloop_pingpong_us(n: int = 2000, warmup: int = 200, timeout_s: float = 60.0, unix: bool = False,
                       cpus: tuple[int, int] | None = None) -> LatencyUs:
    """Round-trip latency percentiles in microseconds for one 100-byte message at a time,
    over TCP or (`unix`) an abstract Unix socket. With `cpus`, the two ends run on those
    two CPUs; without, where the kernel puts them (often both on one CPU, where a
    wake-up costs the least)."""

    async def body(client: _EchoClient) -> list[float]:
        times: list[float] = []
        for _ in range(warmup + n):
            start = time.perf_counter()
            await client.run(1)
            times.append(time.perf_counter() - start)
        return times[warmup:]

    times_us = np.array(_run_echo(1, body, timeout_s, f"{n} uvloop round trips", unix, cpus)) * 1e6
    return LatencyUs(p50=float(np.percentile(times_us, 50)), p99=float(np.percentile(times_us, 99)))


def uvloop_pipelined_msgs_per_s(n: int = 100_000, window: int = 64, timeout_s: float = 60.0) -> float:
    """Echoed messages per second with window 100-byte messages kept in flight."""

    async def body(client: _EchoClient) -> float:
        await client.run(max(n // 10, window))  # warm-up
        start = time.perf_counter()
        await client.run(n)
        return n / (time.perf_counter() - start)

    return _run_echo(window, body, timeout_s, f"{n} pipelined uvloop messages")


def memcpy_gbps(nbytes: int = 64 * MiB, rounds: int = 5) -> float:
    """Median np.copyto bandwidth in GB/s, counting the bytes copied (not read plus written)."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.zeros(nbytes, dtype=np.uint8)
    return nbytes / _median_s(lambda: np.copyto(dst, src), rounds) / 1e9


def measure_all(quick: bool = False) -> dict[str, float]:
    """Every limit, flat; quick=True trades precision for a run of a few seconds."""
    size = (16 if quick else 64) * MiB
    trips = 500 if quick else 2000
    latency = uvloop_pingpong_us(n=trips)
    unix = uvloop_pingpong_us(n=trips, unix=True) if sys.platform == "linux" else None
    cpus = two_cpus()
    apart = None if cpus is None else uvloop_pingpong_us(n=trips, cpus=cpus)
    return {
        "socket_stream_gbps": socket_stream_gbps(size, rounds=3),
        "uvloop_pingpong_p50_us": latency["p50"],
        "uvloop_pingpong_p99_us": latency["p99"],
        **({} if unix is None else {"uvloop_pingpong_unix_p50_us": unix["p50"]}),
        **({} if apart is None else {"uvloop_pingpong_two_cpus_p50_us": apart["p50"]}),
        "uvloop_pipelined_msgs_per_s": uvloop_pipelined_msgs_per_s(n=20_000 if quick else 100_000),
        "memcpy_gbps": memcpy_gbps(size, rounds=3 if quick else 5),
    }


if __name__ == "__main__":
    limits = measure_all(quick="--quick" in sys.argv[1:])
    width = max(map(len, limits))
    print(f"{'limit':<{width}}  {'value':>12}")
    for name, value in limits.items():
        print(f"{name:<{width}}  {value:>12,.2f}")


def best_of(*runs: dict[str, float]) -> dict[str, float]:
    """The best each limit reached over several measure_all() runs: the highest
    throughput, the lowest latency. The machine can do at least that, so ratios to it
    are conservative, and a burst of load during one measurement does not flatter them."""
    return {key: (min if key.endswith("_us") else max)(run[key] for run in runs) for key in runs[0]}
