"""Dense and small-op benchmarks: one server process, this process as the only worker.

Every figure is reported as a ratio to a raw limit measured in the same run (see
benchmarks.limits), because absolute numbers on shared machines drift between runs.
Run with ``python -m benchmarks [--quick]``; ``python -m benchmarks.dense`` does the same.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections import deque
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass

import numpy as np

import multiverso_py as mv
from benchmarks import report
from benchmarks.limits import rates
from benchmarks.report import Row
from multiverso_py.testing import LocalCluster

MiB = 1 << 20
PULL_TARGET = 0.8  # dense pull >= 0.8x the socket stream
PUSH_TARGET = 0.65  # dense push >= 0.65x the socket stream
SMALL_GET_TARGET = 1.5  # small get p50 <= 1.5x the uvloop round trip
SMALL_ADD_TARGET = 150_000  # adds/s
EMBEDDED_PULL_TARGET = 0.4  # embedded pull >= 40% of memcpy
ADD_WINDOW = 64  # in-flight adds in the windowed run, as the spec's reference figures use


@dataclass(frozen=True)
class Sizes:
    dense_bytes: int
    rounds: int  # timed rounds of each dense transfer after one warm-up; pulls vary 2x round to round
    small_gets: int
    small_warmup: int
    small_adds: int


FULL = Sizes(dense_bytes=64 * MiB, rounds=11, small_gets=2000, small_warmup=200, small_adds=20_000)
QUICK = Sizes(dense_bytes=16 * MiB, rounds=5, small_gets=500, small_warmup=50, small_adds=5_000)


def _dense(table: mv.ArrayTable, sizes: Sizes) -> tuple[list[float], list[float], list[float]]:
    """GB/s per round of get() (a new result each time), get(out=...) (one reused
    result, as a training loop pulls) and add(delta), on the whole table."""
    delta = np.ones(table.size, np.float32)
    out = np.empty(table.shape, np.float32)
    gbps = rates(sizes.dense_bytes / 1e9, {"pull": table.get, "pull_out": lambda: table.get(out=out),
                                           "push": lambda: table.add(delta)}, sizes.rounds)
    return gbps["pull"], gbps["pull_out"], gbps["push"]


def _small_get_us(table: mv.ArrayTable, sizes: Sizes) -> np.ndarray:
    times = []
    for _ in range(sizes.small_warmup + sizes.small_gets):
        start = time.perf_counter()
        table.get()
        times.append(time.perf_counter() - start)
    return np.array(times[sizes.small_warmup:]) * 1e6


def adds_all_in_flight(table: mv.ArrayTable, n: int) -> float:
    """Adds/s issuing n add_async calls at once, then waiting for every future."""
    delta = np.ones(table.size, np.float32)
    start = time.perf_counter()
    futures = [table.add_async(delta) for _ in range(n)]
    wait(futures)
    elapsed = time.perf_counter() - start
    for f in futures:
        f.result()  # surface a failed add instead of timing it as a success
    return n / elapsed


def _adds_windowed(table: mv.ArrayTable, n: int, window: int) -> float:
    """Adds/s keeping at most window adds in flight, like the uvloop pipelined limit."""
    delta = np.ones(table.size, np.float32)
    in_flight: deque[Future] = deque()
    start = time.perf_counter()
    for _ in range(n):
        if len(in_flight) >= window:
            in_flight.popleft().result()
        in_flight.append(table.add_async(delta))
    for f in in_flight:
        f.result()
    return n / (time.perf_counter() - start)


def run(limits: dict[str, float], quick: bool = False) -> list[Row]:
    """Every dense workload, each against its limit from `limits` (benchmarks.limits)."""
    sizes = QUICK if quick else FULL
    mib = sizes.dense_bytes // MiB
    floats = sizes.dense_bytes // 4
    stream, memcpy = limits["socket_stream_gbps"], limits["memcpy_gbps"]
    with LocalCluster(workers=1, servers=1, log_level="warning") as cluster:
        mv.init(cluster.address)
        try:
            pull, pull_out, push = _dense(mv.ArrayTable(floats, name="dense"), sizes)
            small = mv.ArrayTable(16, name="small")
            lat = _small_get_us(small, sizes)
            adds_all_in_flight(small, max(sizes.small_adds // 10, ADD_WINDOW))  # warm-up
            adds_all = [adds_all_in_flight(small, sizes.small_adds) for _ in range(3)]
            adds_win = [_adds_windowed(small, sizes.small_adds, ADD_WINDOW) for _ in range(3)]
        finally:
            mv.shutdown()
    os.environ["MV_SHARED_MEMORY"] = "0"  # the same transfers with every array on the socket
    try:
        with LocalCluster(workers=1, servers=1, log_level="warning") as cluster, mv.init(cluster.address):
            socket_pull, socket_pull_out, socket_push = _dense(mv.ArrayTable(floats, name="dense"), sizes)
    finally:
        del os.environ["MV_SHARED_MEMORY"]
    mv.init()  # embedded: scheduler and server on this process's I/O thread, reached without a socket
    try:
        embedded, embedded_out, embedded_push = _dense(mv.ArrayTable(floats, name="dense"), sizes)
    finally:
        mv.shutdown()

    msgs, p50, p99 = (limits[k] for k in ("uvloop_pipelined_msgs_per_s", "uvloop_pingpong_p50_us",
                                          "uvloop_pingpong_p99_us"))
    med = statistics.median
    def vs_memcpy(key: str, workload: str, samples: list[float], target: float | None) -> Row:
        return Row(key, workload, med(samples), "GB/s", "memcpy", memcpy, target=target, samples=samples,
                   limit_key="memcpy_gbps")

    def vs_stream(key: str, workload: str, samples: list[float], target: float) -> Row:
        return Row(key, workload, med(samples), "GB/s", "socket stream", stream, target=target, samples=samples,
                   limit_key="socket_stream_gbps")

    def vs_round_trip(key: str, against: str, limit: str, limit_key: str) -> list[Row]:
        """The small get's p50 against another round trip, where this machine measured it."""
        return [Row(key, f"small get p50, against {against}", float(np.percentile(lat, 50)), "µs", limit,
                    limits[limit_key], lower_is_better=True, limit_key=limit_key)] if limit_key in limits else []

    return [
        vs_stream("dense_pull", f"dense pull {mib} MiB, get()", pull, PULL_TARGET),
        vs_stream("dense_pull_out", f"dense pull {mib} MiB, get(out=)", pull_out, PULL_TARGET),
        vs_stream("dense_push", f"dense push {mib} MiB, add()", push, PUSH_TARGET),
        vs_stream("dense_pull_socket", f"dense pull {mib} MiB, get(), socket only", socket_pull, PULL_TARGET),
        vs_stream("dense_pull_out_socket", f"dense pull {mib} MiB, get(out=), socket only", socket_pull_out,
                  PULL_TARGET),
        vs_stream("dense_push_socket", f"dense push {mib} MiB, add(), socket only", socket_push, PUSH_TARGET),
        Row("small_get_p50", "small get p50 (16 floats)", float(np.percentile(lat, 50)), "µs",
            "uvloop round trip p50", p50, lower_is_better=True, target=SMALL_GET_TARGET,
            limit_key="uvloop_pingpong_p50_us"),
        Row("small_get_p99", "small get p99 (16 floats)", float(np.percentile(lat, 99)), "µs",
            "uvloop round trip p99", p99, lower_is_better=True, limit_key="uvloop_pingpong_p99_us"),
        # The get goes over the server's local Unix socket (multiverso_py.direct): against that round trip too.
        *vs_round_trip("small_get_p50_unix", "a Unix socket round trip", "uvloop round trip p50, Unix socket",
                       "uvloop_pingpong_unix_p50_us"),
        # Worker and server each poll on a CPU of their own, where the kernel may put the
        # plain round trip's two ends on one: against a round trip across two CPUs too.
        *vs_round_trip("small_get_p50_two_cpus", "a round trip across two CPUs",
                       "uvloop round trip p50, ends on two CPUs", "uvloop_pingpong_two_cpus_p50_us"),
        Row("small_adds_all", f"small add_async, {sizes.small_adds:,} in flight", med(adds_all), "adds/s",
            "uvloop pipelined", msgs, "msgs/s", samples=adds_all, limit_key="uvloop_pipelined_msgs_per_s",
            target_value=SMALL_ADD_TARGET),
        Row("small_adds_window", f"small add_async, {ADD_WINDOW} in flight", med(adds_win), "adds/s",
            "uvloop pipelined", msgs, "msgs/s", samples=adds_win, limit_key="uvloop_pipelined_msgs_per_s"),
        vs_memcpy("embedded_pull", f"embedded pull {mib} MiB, get()", embedded, EMBEDDED_PULL_TARGET),
        vs_memcpy("embedded_pull_out", f"embedded pull {mib} MiB, get(out=)", embedded_out, EMBEDDED_PULL_TARGET),
        vs_memcpy("embedded_push", f"embedded push {mib} MiB, add()", embedded_push, None),
    ]

SHARED_MEMORY_NOTE = ("Worker and server share this host, so the arrays of large requests cross through "
                      "shared memory (one copy each way); the socket-only rows set MV_SHARED_MEMORY=0.")
QUICK_NOTE = ("quick: limits and workloads use 16 MiB and few rounds, so ratios can be off by 2x; "
              "judge targets on the full run.")


def notes(quick: bool) -> list[str]:
    return [SHARED_MEMORY_NOTE, *([QUICK_NOTE] if quick else [])]


def markdown(rows: list[Row], quick: bool = False) -> str:
    return report.markdown(rows, notes(quick))


def write_results(rows: list[Row], limits: dict[str, float], quick: bool) -> None:
    """dense.json (raw numbers and machine), dense.md (the table) and dense.png (if possible)."""
    report.write_results("dense", "Dense benchmark", rows, limits, quick, asdict(QUICK if quick else FULL),
                         notes(quick))


def main(argv: list[str]) -> None:
    from benchmarks import limits as limits_mod

    quick = "--quick" in argv
    limits = limits_mod.measure_all(quick)
    rows = run(limits, quick)
    print(markdown(rows, quick))
    write_results(rows, limits, quick)


if __name__ == "__main__":
    main(sys.argv[1:])
