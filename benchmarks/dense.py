"""Dense and small-op benchmarks: one server process, this process as the only worker.

Every figure is reported as a ratio to a raw limit measured in the same run (see
benchmarks.limits), because absolute numbers on shared machines drift between runs.
Run with ``python -m benchmarks [--quick]``; ``python -m benchmarks.dense`` does the same.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections import deque
from concurrent.futures import Future, wait
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import multiverso_py as mv
from benchmarks.limits import timed_rounds
from multiverso_py.testing import LocalCluster

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"
PULL_TARGET = 0.5  # the current issue's target: dense pull >= 50% of the socket stream
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


@dataclass
class Row:
    """One workload next to the limit it is judged against; ratio is value / limit."""

    key: str
    workload: str
    value: float
    unit: str
    limit_name: str
    limit: float
    limit_unit: str = ""  # when it differs from unit
    lower_is_better: bool = False
    target: float | None = None  # a ratio to reach (>=), or not exceed when lower is better
    samples: list[float] = field(default_factory=list)  # per-round values, for the noise figure
    limit_key: str = ""  # the limit's key in benchmarks.limits.measure_all()

    @property
    def ratio(self) -> float:
        return self.value / self.limit if self.limit else float("nan")

    @property
    def noise(self) -> float | None:
        """(max - min) / median of the per-round values: how much to trust one figure."""
        if len(self.samples) < 2:
            return None
        return (max(self.samples) - min(self.samples)) / statistics.median(self.samples)

    @property
    def verdict(self) -> str | None:
        if self.target is None:
            return None
        ok = self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target
        return "PASS" if ok else "MISS"


def _gbps(nbytes: int, times: list[float]) -> list[float]:
    return [nbytes / t / 1e9 for t in times]


def _dense(table: mv.ArrayTable, sizes: Sizes) -> tuple[list[float], list[float], list[float]]:
    """GB/s per round of get() (a new result each time), get(out=...) (one reused
    result, as a training loop pulls) and add(delta), on the whole table."""
    delta = np.ones(table.size, np.float32)
    out = np.empty(table.shape, np.float32)
    pull = _gbps(sizes.dense_bytes, timed_rounds(table.get, sizes.rounds))
    pull_out = _gbps(sizes.dense_bytes, timed_rounds(lambda: table.get(out=out), sizes.rounds))
    push = _gbps(sizes.dense_bytes, timed_rounds(lambda: table.add(delta), sizes.rounds))
    return pull, pull_out, push


def _small_get_us(table: mv.ArrayTable, sizes: Sizes) -> np.ndarray:
    times = []
    for _ in range(sizes.small_warmup + sizes.small_gets):
        start = time.perf_counter()
        table.get()
        times.append(time.perf_counter() - start)
    return np.array(times[sizes.small_warmup:]) * 1e6


def _adds_all_in_flight(table: mv.ArrayTable, n: int) -> float:
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
            _adds_all_in_flight(small, max(sizes.small_adds // 10, ADD_WINDOW))  # warm-up
            adds_all = [_adds_all_in_flight(small, sizes.small_adds) for _ in range(3)]
            adds_win = [_adds_windowed(small, sizes.small_adds, ADD_WINDOW) for _ in range(3)]
        finally:
            mv.shutdown()
    mv.init()  # embedded: scheduler and server on this process's I/O thread
    try:
        embedded = _gbps(sizes.dense_bytes, timed_rounds(mv.ArrayTable(floats, name="dense").get, sizes.rounds))
    finally:
        mv.shutdown()

    msgs, p50, p99 = (limits[k] for k in ("uvloop_pipelined_msgs_per_s", "uvloop_pingpong_p50_us",
                                          "uvloop_pingpong_p99_us"))
    med = statistics.median
    return [
        Row("dense_pull", f"dense pull {mib} MiB, get()", med(pull), "GB/s", "socket stream", stream,
            target=PULL_TARGET, samples=pull, limit_key="socket_stream_gbps"),
        Row("dense_pull_out", f"dense pull {mib} MiB, get(out=)", med(pull_out), "GB/s", "socket stream", stream,
            target=PULL_TARGET, samples=pull_out, limit_key="socket_stream_gbps"),
        Row("dense_push", f"dense push {mib} MiB, add()", med(push), "GB/s", "socket stream", stream, samples=push, limit_key="socket_stream_gbps"),
        Row("small_get_p50", "small get p50 (16 floats)", float(np.percentile(lat, 50)), "µs",
            "uvloop round trip p50", p50, lower_is_better=True, limit_key="uvloop_pingpong_p50_us"),
        Row("small_get_p99", "small get p99 (16 floats)", float(np.percentile(lat, 99)), "µs",
            "uvloop round trip p99", p99, lower_is_better=True, limit_key="uvloop_pingpong_p99_us"),
        Row("small_adds_all", f"small add_async, {sizes.small_adds:,} in flight", med(adds_all), "adds/s",
            "uvloop pipelined", msgs, "msgs/s", samples=adds_all, limit_key="uvloop_pipelined_msgs_per_s"),
        Row("small_adds_window", f"small add_async, {ADD_WINDOW} in flight", med(adds_win), "adds/s",
            "uvloop pipelined", msgs, "msgs/s", samples=adds_win, limit_key="uvloop_pipelined_msgs_per_s"),
        Row("embedded_pull", f"embedded pull {mib} MiB, get()", med(embedded), "GB/s", "memcpy", memcpy,
            samples=embedded, limit_key="memcpy_gbps"),
    ]


def rebase(rows: list[Row], limits: dict[str, float]) -> None:
    """Judge every row against these limits (the best of several measurements)."""
    for row in rows:
        row.limit = limits[row.limit_key]


# ---------------------------------------------------------------- reporting


def _fmt(value: float, unit: str) -> str:
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "µs":
        return f"{value:,.0f} µs"
    return f"{value:,.0f} {unit}"


def markdown(rows: list[Row], quick: bool = False) -> str:
    lines = ["| workload | value | limit | ratio | spread | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        noise = "" if r.noise is None else f"{r.noise:.0%}"
        target = ""
        if r.target is not None:
            target = f"{'≤' if r.lower_is_better else '≥'}{r.target:.2f}× {r.verdict}"
        limit = f"{r.limit_name} {_fmt(r.limit, r.limit_unit or r.unit)}"
        lines.append(f"| {r.workload} | {_fmt(r.value, r.unit)} | {limit} | {r.ratio:.2f}× | {noise} | {target} |")
    lines.append("")
    lines.append("ratio = value / limit (for latencies, lower is better); spread = (max - min) / median "
                 "over the timed rounds.")
    if quick:
        lines.append("quick: limits and workloads use 16 MiB and few rounds, so ratios can be off by 2x; "
                     "judge targets on the full run.")
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import msgpack
    import uvloop

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other load skews all
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "uvloop": uvloop.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "multiverso_py": mv.__version__,
    }


def _plot(rows: list[Row], path: Path) -> bool:
    """A bar chart of ratios to limits; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = [([r for r in rows if not r.lower_is_better], "× limit (higher is better)"),
              ([r for r in rows if r.lower_is_better], "× uvloop round trip (lower is better)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [len(groups[0][0]), 3]})
    for ax, (group, title) in zip(axes, groups):
        ax.bar(range(len(group)), [r.ratio for r in group], color="tab:blue")
        ax.set_xticks(range(len(group)), [r.workload for r in group], rotation=30, ha="right", fontsize=8)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        targets = [(i, r.target) for i, r in enumerate(group) if r.target is not None]
        for i, r in enumerate(group):
            ax.annotate(f"{r.ratio:.2f}×", (i, r.ratio), ha="center", va="bottom", fontsize=8)
        for n, (i, target) in enumerate(targets):
            ax.hlines(target, i - 0.4, i + 0.4, color="tab:red", linewidth=2, label="target" if n == 0 else None)
        ax.set_title(title, fontsize=10)
        if any(r.target is not None for r in group):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(rows: list[Row], limits: dict[str, float], quick: bool, out: Path = RESULTS) -> None:
    """dense.json (raw numbers and machine), dense.md (the table) and dense.png (if possible)."""
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(rows, quick)
    info = machine_info()
    data: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "sizes": asdict(QUICK if quick else FULL),
        "machine": info,
        "limits": limits,
        "workloads": {r.key: {**asdict(r), "ratio": r.ratio, "noise": r.noise, "verdict": r.verdict} for r in rows},
    }
    (out / "dense.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    (out / "dense.md").write_text(f"# Dense benchmark ({data['mode']}, {info['date']})\n\n{table}\n")
    if not _plot(rows, out / "dense.png"):
        print("note: matplotlib is not installed; skipping benchmarks/results/dense.png")


def main(argv: list[str]) -> None:
    from benchmarks import limits as limits_mod

    quick = "--quick" in argv
    limits = limits_mod.measure_all(quick)
    rows = run(limits, quick)
    print(markdown(rows, quick))
    write_results(rows, limits, quick)


if __name__ == "__main__":
    main(sys.argv[1:])
