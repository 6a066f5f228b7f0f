"""A torch.distributed.rpc parameter server, written as the PyTorch tutorials write one
("Implementing a Parameter Server Using Distributed RPC Framework"): a server process
owns the tensors in a ParameterServer object behind an RRef; the trainer calls its
methods with rpc_sync / rpc_async through `_call_method`. TensorPipe backend, both
processes on 127.0.0.1 (MASTER_ADDR/MASTER_PORT rendezvous), listening on loopback only.

Measures what the multiverso_py benchmarks measure: sparse row pull/push, small adds,
small get latency and the dense pull/push. Run with
``python -m benchmarks.peers torch_rpc [--quick]``; the suite starts it through
benchmarks.peers.measure.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import rpc

from benchmarks.limits import rates
from benchmarks.peers import PeerSizes, Samples, reply

RPC_TIMEOUT_S = 60.0
SMALL = 16  # floats in the small table
WINDOW = 64  # in-flight adds, as in the multiverso_py windowed run


class ParameterServer:
    """The tables, living in the server process. RPC runs calls on a thread pool, so
    updates take a lock (index_add_ and add_ are not atomic); reads do not."""

    def __init__(self, num_rows: int, num_cols: int, dense_floats: int):
        self.table = torch.zeros(num_rows, num_cols)
        self.dense = torch.zeros(dense_floats)
        self.small = torch.zeros(SMALL)
        self.lock = threading.Lock()

    def pull(self, rows: torch.Tensor) -> torch.Tensor:
        return self.table[rows]

    def push(self, rows: torch.Tensor, delta: torch.Tensor) -> None:
        with self.lock:
            self.table.index_add_(0, rows, delta)

    def pull_dense(self) -> torch.Tensor:
        return self.dense

    def push_dense(self, delta: torch.Tensor) -> None:
        with self.lock:
            self.dense.add_(delta)

    def get_small(self) -> torch.Tensor:
        return self.small

    def add_small(self, delta: torch.Tensor) -> None:
        with self.lock:
            self.small.add_(delta)


def _call_method(method: Callable[..., Any], rref: rpc.RRef, *args: Any) -> Any:
    """Runs on the owner of rref: the tutorial's way to call a method of a remote object."""
    return method(rref.local_value(), *args)


def _sync(method: Callable[..., Any], rref: rpc.RRef, *args: Any) -> Any:
    return rpc.rpc_sync(rref.owner(), _call_method, args=(method, rref, *args))


def _async(method: Callable[..., Any], rref: rpc.RRef, *args: Any) -> torch.futures.Future:
    return rpc.rpc_async(rref.owner(), _call_method, args=(method, rref, *args))


def _adds_windowed(ps: rpc.RRef, n: int, window: int) -> float:
    delta = torch.ones(SMALL)
    in_flight: deque[torch.futures.Future] = deque()
    start = time.perf_counter()
    for _ in range(n):
        if len(in_flight) >= window:
            in_flight.popleft().wait()
        in_flight.append(_async(ParameterServer.add_small, ps, delta))
    torch.futures.wait_all(list(in_flight))
    return n / (time.perf_counter() - start)


def _adds_all_in_flight(ps: rpc.RRef, n: int) -> float:
    delta = torch.ones(SMALL)
    start = time.perf_counter()
    torch.futures.wait_all([_async(ParameterServer.add_small, ps, delta) for _ in range(n)])
    return n / (time.perf_counter() - start)


def _train(sizes: PeerSizes) -> Samples:
    ps = rpc.remote("ps", ParameterServer, args=(sizes.table_rows, sizes.cols, sizes.dense_bytes // 4))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, sizes.table_rows, (sizes.batch_rows,), generator=gen) for _ in range(sizes.requests)]
    delta = torch.ones(sizes.batch_rows, sizes.cols)
    rows_per_round = sizes.requests * sizes.batch_rows
    samples: Samples = rates(rows_per_round, {
        "sparse_pull_rows_per_s": lambda: [_sync(ParameterServer.pull, ps, rows) for rows in batches],
        "sparse_push_rows_per_s": lambda: [_sync(ParameterServer.push, ps, rows, delta) for rows in batches],
    }, sizes.rounds)

    dense_delta = torch.ones(sizes.dense_bytes // 4)
    samples.update(rates(sizes.dense_bytes / 1e9, {
        "dense_pull_gbps": lambda: _sync(ParameterServer.pull_dense, ps),
        "dense_push_gbps": lambda: _sync(ParameterServer.push_dense, ps, dense_delta),
    }, sizes.dense_rounds))

    latencies = []
    for i in range(sizes.small_gets + sizes.small_gets // 10):
        start = time.perf_counter()
        _sync(ParameterServer.get_small, ps)
        if i >= sizes.small_gets // 10:  # the first tenth warms up
            latencies.append((time.perf_counter() - start) * 1e6)
    samples["small_get_us"] = latencies

    _adds_windowed(ps, sizes.small_adds // 10, WINDOW)  # warm-up
    samples["small_adds_window_per_s"] = [_adds_windowed(ps, sizes.small_adds, WINDOW) for _ in range(3)]
    samples["small_adds_all_per_s"] = [_adds_all_in_flight(ps, sizes.small_adds) for _ in range(3)]
    return samples


def _host_store(port: int) -> dist.TCPStore:
    """The rendezvous store, bound to 127.0.0.1 only (left to init_rpc, it listens on every
    interface). torchrun's agent hosts the store the same way."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return dist.TCPStore("127.0.0.1", port, None, True, timedelta(seconds=RPC_TIMEOUT_S), wait_for_workers=False,
                         master_listen_fd=sock.detach())


def run_role(role: str, port: int, sizes: PeerSizes, conn: Connection | None) -> None:
    """One process of the peer: "ps" serves until the trainer is done; "trainer" measures
    and sends its samples (or an error string) through conn."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    if "lo" in {name for _, name in socket.if_nameindex()}:
        os.environ.update(TP_SOCKET_IFNAME="lo", GLOO_SOCKET_IFNAME="lo")  # listen on loopback only
    # init_rpc's internal use of a Gloo group trips a deprecation warning meant for users
    warnings.filterwarnings("ignore", message="You are using a Backend", category=UserWarning)
    store = _host_store(port) if role == "ps" else None
    options = rpc.TensorPipeRpcBackendOptions(rpc_timeout=RPC_TIMEOUT_S)
    rpc.init_rpc(role, rank=0 if role == "ps" else 1, world_size=2, rpc_backend_options=options)
    try:
        if conn is not None:
            reply(conn, lambda: _train(sizes))
    finally:
        rpc.shutdown()  # graceful: the server waits here until the trainer is done too
        del store  # the store outlives shutdown, which still talks through it

