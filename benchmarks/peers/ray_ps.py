"""A Ray actor parameter server, written as Ray's own parameter-server example writes one
(ray-core/examples "Parameter Server"): a `@ray.remote` actor holds the parameters as
numpy arrays behind `get_weights` / `apply_gradients`; the worker calls them with
`.remote(...)` and waits on the object refs with `ray.get`, and for small updates keeps
many calls in flight before one `ray.get`. Large values travel through Ray's shared-memory
object store, so `ray.get` of the weights returns a read-only view of them.

Ray runs locally only: `ray.init(num_cpus=2, include_dashboard=False)` in the peer's own
process, every daemon bound to 127.0.0.1 and usage stats off (benchmarks.peers.RAY sets
the environment for that before ray is imported), a per-run auth token (nothing written
to the home directory), its session in a temporary directory removed after
`ray.shutdown()`. Run with ``python -m benchmarks.peers ray_ps [--quick]``; the suite
starts it through benchmarks.peers.measure.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from multiprocessing.connection import Connection

import numpy as np
import ray

from benchmarks.limits import rates
from benchmarks.peers import PeerSizes, Samples, reply

SMALL = 16  # floats in the small table
STORE_WARMUP = 8  # untimed pulls first: the object store's first objects land in fresh shared memory, several x slower


@ray.remote
class ParameterServer:
    """The parameters, living in the actor's process. An actor runs one call at a time,
    so updates need no lock."""

    def __init__(self, num_rows: int, num_cols: int, dense_floats: int):
        self.weights = np.zeros(dense_floats, np.float32)
        self.rows = np.zeros((num_rows, num_cols), np.float32)
        self.small = np.zeros(SMALL, np.float32)

    def get_weights(self) -> np.ndarray:
        return self.weights

    def apply_gradients(self, gradient: np.ndarray) -> None:
        self.weights += gradient

    def get_rows(self, rows: np.ndarray) -> np.ndarray:
        return self.rows[rows]

    def apply_row_gradients(self, rows: np.ndarray, gradient: np.ndarray) -> None:
        np.add.at(self.rows, rows, gradient)  # repeated rows sum, as index_add_ does

    def get_small(self) -> np.ndarray:
        return self.small

    def apply_small(self, gradient: np.ndarray) -> None:
        self.small += gradient


def _dense(ps: ray.actor.ActorHandle, sizes: PeerSizes) -> Samples:
    """GB/s of the weights as ray.get returns them (a read-only view into the object
    store), copied into one reused writable array (as a trainer loads its model), copied
    into a new array each time, and of apply_gradients."""
    gb, rounds = sizes.dense_bytes / 1e9, sizes.dense_rounds
    out = np.empty(sizes.dense_bytes // 4, np.float32)
    gradient = np.ones(sizes.dense_bytes // 4, np.float32)
    for _ in range(STORE_WARMUP):
        ray.get(ps.get_weights.remote())
    return rates(gb, {
        "dense_pull_view_gbps": lambda: ray.get(ps.get_weights.remote()),
        "dense_pull_into_gbps": lambda: np.copyto(out, ray.get(ps.get_weights.remote())),
        "dense_pull_copy_gbps": lambda: ray.get(ps.get_weights.remote()).copy(),
        "dense_push_gbps": lambda: ray.get(ps.apply_gradients.remote(gradient)),
    }, rounds)


def _sparse(ps: ray.actor.ActorHandle, sizes: PeerSizes) -> Samples:
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, sizes.table_rows, sizes.batch_rows) for _ in range(sizes.requests)]
    gradient = np.ones((sizes.batch_rows, sizes.cols), np.float32)
    per_round = sizes.requests * sizes.batch_rows
    return rates(per_round, {
        "sparse_pull_rows_per_s": lambda: [ray.get(ps.get_rows.remote(r)) for r in batches],
        "sparse_push_rows_per_s": lambda: [ray.get(ps.apply_row_gradients.remote(r, gradient)) for r in batches],
    }, sizes.rounds)


def _small(ps: ray.actor.ActorHandle, sizes: PeerSizes) -> Samples:
    """Latency of every get after a tenth of them as warm-up, and adds/s with a whole
    round in flight; the table must then hold the closed form of the adds."""
    latencies = []
    for i in range(sizes.small_gets + sizes.small_gets // 10):
        start = time.perf_counter()
        ray.get(ps.get_small.remote())
        if i >= sizes.small_gets // 10:
            latencies.append((time.perf_counter() - start) * 1e6)
    gradient = np.ones(SMALL, np.float32)

    def adds(n: int) -> float:
        start = time.perf_counter()
        ray.get([ps.apply_small.remote(gradient) for _ in range(n)])
        return n / (time.perf_counter() - start)

    adds(sizes.small_adds // 10)  # warm-up
    rates = [adds(sizes.small_adds) for _ in range(3)]
    expected = sizes.small_adds // 10 + 3 * sizes.small_adds
    if not np.all(ray.get(ps.get_small.remote()) == expected):
        raise RuntimeError(f"the small table does not hold {expected} after {expected} adds of ones")
    return {"small_get_us": latencies, "small_adds_all_per_s": rates}


def _train(sizes: PeerSizes) -> Samples:
    ps = ParameterServer.remote(sizes.table_rows, sizes.cols, sizes.dense_bytes // 4)
    return {**_dense(ps, sizes), **_sparse(ps, sizes), **_small(ps, sizes)}


def run_role(role: str, port: int, sizes: PeerSizes, conn: Connection | None) -> None:
    """The peer's only process ("driver"): start local Ray, measure, send the samples (or
    an error string) through conn, shut Ray down. The port is unused: Ray picks its own."""
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # this run's token, never written to ~/.ray
    with tempfile.TemporaryDirectory(prefix="ray-peer-") as tmp:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning", _temp_dir=tmp)
        try:
            if conn is not None:
                reply(conn, lambda: _train(sizes))
        finally:
            ray.shutdown()

