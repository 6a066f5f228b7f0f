"""Concurrent push: 2 workers x 2 servers, each worker in its own process pushing the whole
dense table again and again. Reports the aggregate GB/s against the socket stream measured
in the same run, and checks that the table ends at its closed form (every element = the
number of adds of ones it received), so no add was lost or applied twice under load.

Part of ``python -m benchmarks [--quick]``; benchmarks.scaling runs it over several server counts.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from typing import Any
from multiprocessing.connection import Connection, wait

import numpy as np

import multiverso_py as mv
from benchmarks import report
from benchmarks.limits import watchdog
from benchmarks.report import Row
from multiverso_py.testing import LocalCluster

MiB = 1 << 20
WORKER_TIMEOUT_S = 120.0  # a whole worker run, start-up included


@dataclass(frozen=True)
class Sizes:
    workers: int
    servers: int
    dense_bytes: int
    pushes: int  # adds of the whole table per worker per timed round
    rounds: int


FULL = Sizes(workers=2, servers=2, dense_bytes=64 * MiB, pushes=4, rounds=5)
QUICK = Sizes(workers=2, servers=2, dense_bytes=16 * MiB, pushes=4, rounds=3)


@dataclass(frozen=True)
class WorkerReport:
    spans: list[tuple[float, float]]  # time.monotonic() at the start and end of each round
    final_min: float  # the table's smallest and largest element after every worker's last add
    final_max: float


def expected_value(sizes: Sizes) -> float:
    """Every element after all adds of ones: a warm-up add and rounds x pushes, per worker."""
    return float(sizes.workers * (1 + sizes.rounds * sizes.pushes))


def _worker(env: dict[str, str], sizes: Sizes, conn: Connection, parent: int) -> None:
    """One worker process: join the job, push rounds (each started at a barrier, so the
    workers push at the same time), then read the final table after a last barrier."""
    watchdog(parent)
    os.environ.update(env)
    mv.init()
    try:
        floats = sizes.dense_bytes // 4
        table = mv.ArrayTable(floats, name="concurrent")
        delta = np.ones(floats, np.float32)
        table.add(delta)  # warm-up: connections, server pages
        spans = []
        for _ in range(sizes.rounds):
            mv.barrier()
            start = time.monotonic()  # one clock for every process of the machine
            for _ in range(sizes.pushes):
                table.add(delta)
            spans.append((start, time.monotonic()))
        mv.barrier()  # every add of every worker has been acknowledged
        final = table.get()
        conn.send(WorkerReport(spans, float(final.min()), float(final.max())))
    finally:
        mv.shutdown()


# Given the pids by role ("scheduler", "servers", "workers"), a context held while the workers run:
# lets a caller watch the processes (benchmarks.scaling samples their CPU time).
Observer = Callable[[dict[str, list[int]]], AbstractContextManager[Any]]


def measure(sizes: Sizes, observe: Observer | None = None) -> list[WorkerReport]:
    """Start the cluster and the worker processes; every worker's report."""
    ctx = mp.get_context("spawn")
    with LocalCluster(workers=sizes.workers, servers=sizes.servers, log_level="warning") as cluster:
        pipes = [ctx.Pipe(duplex=False) for _ in range(sizes.workers)]
        procs = [ctx.Process(target=_worker, args=(cluster.worker_env(rank), sizes, send, os.getpid()), daemon=True)
                 for rank, (_, send) in enumerate(pipes)]
        for proc in procs:
            proc.start()
        pids = {"scheduler": [cluster.scheduler.pid], "servers": [p.pid for p in cluster.servers],
                "workers": [p.pid for p in procs if p.pid is not None]}
        try:
            with observe(pids) if observe else nullcontext():
                return [_receive(recv, proc) for (recv, _), proc in zip(pipes, procs)]
        finally:
            for proc in procs:
                proc.join(10.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def _receive(conn: Connection, proc: mp.process.BaseProcess) -> WorkerReport:
    if not wait([conn, proc.sentinel], WORKER_TIMEOUT_S) or not conn.poll():
        raise RuntimeError(f"a concurrent-push worker sent nothing (exit code {proc.exitcode})")
    return conn.recv()


def aggregate_gbps(reports: list[WorkerReport], sizes: Sizes) -> list[float]:
    """Per round: the bytes every worker pushed over the time from the first start to the last end."""
    per_round = sizes.workers * sizes.pushes * sizes.dense_bytes
    return [per_round / (max(end for _, end in spans) - min(start for start, _ in spans)) / 1e9
            for spans in zip(*(r.spans for r in reports))]


def final_check(reports: list[WorkerReport], sizes: Sizes) -> dict[str, Any]:
    """The table's extremes as the workers read them against the closed form; warns on a mismatch."""
    expected = expected_value(sizes)
    check: dict[str, Any] = {"expected": expected, "min": min(r.final_min for r in reports),
                             "max": max(r.final_max for r in reports)}
    check["ok"] = check["min"] == check["max"] == expected
    if not check["ok"]:
        print(f"warning: the concurrently pushed table does not hold its closed form: {check}")
    return check


def run(limits: dict[str, float], quick: bool = False) -> tuple[list[Row], dict]:
    """The row of the report and, for the JSON, the final-value check."""
    sizes = QUICK if quick else FULL
    reports = measure(sizes)
    rates = aggregate_gbps(reports, sizes)
    check = final_check(reports, sizes)
    row = Row("concurrent_push", f"{sizes.workers} workers x {sizes.servers} servers, each pushing "
              f"{sizes.dense_bytes // MiB} MiB, aggregate", statistics.median(rates), "GB/s", "socket stream",
              limits["socket_stream_gbps"], samples=rates, limit_key="socket_stream_gbps")
    return [row], {"final_value": check}


def notes(extra: dict, quick: bool) -> list[str]:
    check = extra["final_value"]
    verdict = "as expected" if check["ok"] else f"MISMATCH (min {check['min']:g}, max {check['max']:g})"
    lines = ["", f"Final value after every add, read by each worker: {check['expected']:g} everywhere, {verdict}."]
    return lines + (["quick: 16 MiB tables and 3 rounds; judge on the full run."] if quick else [])


def write_results(rows: list[Row], extra: dict, limits: dict[str, float], quick: bool) -> None:
    report.write_results("concurrent", "Concurrent push benchmark", rows, limits, quick,
                         asdict(QUICK if quick else FULL), notes(extra, quick), extra)

