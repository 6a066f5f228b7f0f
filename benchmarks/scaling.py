"""Push scaling: W workers, each in its own process, push the whole dense table again and
again against 1, 2, 4 ... servers (the concurrent-push workload of benchmarks.concurrent,
one fresh cluster per server count). Reports the aggregate GB/s per server count against
the loopback socket stream measured in the same run and against as many raw streams at
once as there are servers (what the machine allows that many receiving processes), the
speed-up over one server, where the CPU went during the timed rounds (per process, and each
server's event loop, its main thread), and checks after every run that the table ends at its closed form
(no add lost or applied twice).

    python -m benchmarks.scaling [--quick] [--servers 1,2,4] [--workers 8] [--mib 64]

It needs about W + 2 x servers cores to say anything about scaling, so it is not part of
``python -m benchmarks``. Writes benchmarks/results/scaling.{json,md,png}.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import psutil

from benchmarks import concurrent, limits, report
from benchmarks.report import Row
from multiverso_py.server import ServerConfig

MiB = 1 << 20
SAMPLE_EVERY_S = 0.02  # CPU sampling period: a full run's timed round lasts about a second


@dataclass(frozen=True)
class Plan:
    servers: tuple[int, ...]  # one run per server count, in this order
    workers: int
    dense_bytes: int
    pushes: int  # adds of the whole table per worker per timed round
    rounds: int

    def sizes(self, servers: int) -> concurrent.Sizes:
        return concurrent.Sizes(workers=self.workers, servers=servers, dense_bytes=self.dense_bytes,
                                pushes=self.pushes, rounds=self.rounds)


FULL = Plan(servers=(1, 2, 4), workers=8, dense_bytes=64 * MiB, pushes=4, rounds=8)
QUICK = Plan(servers=(1, 2), workers=4, dense_bytes=16 * MiB, pushes=2, rounds=3)


class CpuSampler:
    """Samples the CPU seconds of every process of the job, of each server's threads and of
    the whole machine on a thread of its own, so that the CPU spent inside the workers'
    timed rounds (known only afterwards, from their reports) can be cut out by interpolation."""

    def __init__(self, pids: dict[str, list[int]]):
        self.pids = pids
        self.times: list[float] = []
        self.procs: dict[int, list[float]] = {pid: [] for group in pids.values() for pid in group}
        self.threads: dict[int, dict[int, list[tuple[float, float]]]] = {pid: {} for pid in pids["servers"]}
        self.machine: list[float] = []  # busy CPU seconds of all cores together
        self._handles = {pid: psutil.Process(pid) for pid in self.procs}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self._sample()

    def _sample(self) -> None:
        now = time.monotonic()  # the clock the workers time their rounds with
        for pid, handle in self._handles.items():
            series = self.procs[pid]
            try:
                cpu = handle.cpu_times()
                series.append(cpu.user + cpu.system)
                if pid in self.threads:
                    for t in handle.threads():
                        self.threads[pid].setdefault(t.id, []).append((now, t.user_time + t.system_time))
            except psutil.Error:  # it has exited: it spends no more
                series.append(series[-1] if series else 0.0)
        total = psutil.cpu_times()
        self.machine.append(sum(total) - total.idle - getattr(total, "iowait", 0.0))
        self.times.append(now)

    def busy(self, series: list[float], windows: list[tuple[float, float]], times: list[float] | None = None) -> float:
        """Cores kept busy on average over the windows: CPU seconds spent inside them / their length."""
        at = np.asarray(self.times if times is None else times)
        values = np.asarray(series)
        spent = sum(np.interp(end, at, values) - np.interp(start, at, values) for start, end in windows)
        return float(spent / sum(end - start for start, end in windows))

    def summary(self, windows: list[tuple[float, float]]) -> dict[str, Any]:
        def per(role: str) -> list[float]:
            return [self.busy(self.procs[pid], windows) for pid in self.pids[role]]

        def loop(pid: int) -> float:  # a server's event loop is its main thread, whose id is the pid
            series = self.threads[pid].get(pid, [])
            return self.busy([v for _, v in series], windows, [t for t, _ in series]) if len(series) > 1 else 0.0

        return {"servers": per("servers"), "server_loops": [loop(pid) for pid in self.pids["servers"]],
                "workers": per("workers"), "scheduler": per("scheduler")[0],
                "machine": self.busy(self.machine, windows)}


def timed_windows(reports: list[concurrent.WorkerReport]) -> list[tuple[float, float]]:
    """Per round: from the first worker's start to the last worker's end (the span the rate divides by)."""
    return [(min(s for s, _ in spans), max(e for _, e in spans)) for spans in zip(*(r.spans for r in reports))]


def measure_count(plan: Plan, servers: int) -> dict[str, Any]:
    """One fresh cluster with this many servers: rates per round, the final-value check, CPU."""
    sizes = plan.sizes(servers)
    samplers: list[CpuSampler] = []

    def observe(pids: dict[str, list[int]]) -> CpuSampler:
        samplers.append(CpuSampler(pids))
        return samplers[-1]

    streams = limits.parallel_socket_stream_gbps(servers, plan.dense_bytes, rounds=3)
    reports = concurrent.measure(sizes, observe)
    rates = concurrent.aggregate_gbps(reports, sizes)
    return {"servers": servers, "rates_gbps": rates, "median_gbps": statistics.median(rates),
            "parallel_streams_gbps": streams,
            "final_value": concurrent.final_check(reports, sizes),
            "cpu": samplers[0].summary(timed_windows(reports))}


def run(plan: Plan, limit_figures: dict[str, float]) -> tuple[list[Row], dict[str, Any]]:
    """A row per server count and, for the JSON, every run's figures with its speed-up."""
    runs = []
    for servers in plan.servers:
        runs.append(measure_count(plan, servers))
        print(f"{servers} server(s): {runs[-1]['median_gbps']:.2f} GB/s aggregate", flush=True)
    base = next((r["median_gbps"] for r in runs if r["servers"] == 1), None)
    rows = []
    for r in runs:
        r["speedup"] = r["median_gbps"] / base if base else None
        rows.append(Row(f"push_{r['servers']}_servers",
                        f"{plan.workers} workers x {r['servers']} server{'s' if r['servers'] > 1 else ''}, "
                        f"each pushing {plan.dense_bytes // MiB} MiB, aggregate", r["median_gbps"], "GB/s",
                        "socket stream", limit_figures["socket_stream_gbps"], samples=r["rates_gbps"],
                        limit_key="socket_stream_gbps"))
    return rows, {"runs": runs, "server_threads": ServerConfig.threads}


def notes(extra: dict[str, Any], quick: bool) -> list[str]:
    cores = os.cpu_count()
    lines = ["", "| servers | speed-up over 1 server | × as many raw streams at once | CPU per server, cores "
             "(its event loop) | CPU per worker | machine busy | processes on the cores | final value |",
             "|---|---|---|---|---|---|---|---|"]
    for r in extra["runs"]:
        cpu, check = r["cpu"], r["final_value"]
        speedup = "n/a" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        per_server = ", ".join(f"{c:.2f} ({t:.2f})" for c, t in zip(cpu["servers"], cpu["server_loops"]))
        workers = f"{statistics.mean(cpu['workers']):.2f}"
        processes = (f"{len(cpu['workers'])} workers + {r['servers']} server(s) x {extra['server_threads']} "
                     f"table threads on {cores} cores")
        verdict = f"{check['expected']:g} everywhere" if check["ok"] else \
            f"MISMATCH (min {check['min']:g}, max {check['max']:g}, expected {check['expected']:g})"
        streams = f"{r['median_gbps'] / r['parallel_streams_gbps']:.2f}× of {r['parallel_streams_gbps']:.2f} GB/s"
        lines.append(f"| {r['servers']} | {speedup} | {streams} | {per_server} | {workers} | "
                     f"{cpu['machine']:.1f} of {cores} | "
                     f"{processes} | {verdict} |")
    lines += ["", "Raw streams: as many loopback socket streams at once as there are servers, each to a process "
              "of its own, measured just before. "
              "CPU: cores kept busy on average during the timed rounds (user + system time); a server's "
              "event loop (its main thread) receives every byte sent on the socket (with shared memory, only "
              "headers), its table threads apply the adds. "
              "Final value: the table after every add, read by each worker, against its closed form."]
    return lines + (["quick: small tables and few rounds; judge on the full run."] if quick else [])


def plot(runs: list[dict[str, Any]], stream_gbps: float, path: Path) -> bool:
    """Aggregate GB/s against the server count, with linear scaling from one server and the
    single socket stream for reference; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    servers = [r["servers"] for r in runs]
    medians = [r["median_gbps"] for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.errorbar(servers, medians, yerr=[[m - min(r["rates_gbps"]) for m, r in zip(medians, runs)],
                                        [max(r["rates_gbps"]) - m for m, r in zip(medians, runs)]],
                marker="o", capsize=4, label="aggregate push (median, min-max over rounds)")
    for s, m, r in zip(servers, medians, runs):
        if r["speedup"] is not None:
            ax.annotate(f"{r['speedup']:.2f}×", (s, m), textcoords="offset points", xytext=(8, -4), fontsize=8)
    base = next((r["median_gbps"] for r in runs if r["servers"] == 1), None)
    if base:
        ax.plot(servers, [base * s for s in servers], linestyle=":", color="gray", label="linear from 1 server")
    ax.plot(servers, [r["parallel_streams_gbps"] for r in runs], marker="s", linestyle="--", color="tab:green",
            label="as many raw socket streams at once")
    ax.axhline(stream_gbps, color="tab:red", linestyle="--", linewidth=1, label="one socket stream")
    ax.set_xticks(servers)
    ax.set_xlim(min(servers) - 0.3, max(servers) + 0.4)  # room for the speed-up labels
    ax.set_xlabel("servers")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"{len(runs[0]['cpu']['workers'])} workers pushing the whole table concurrently", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(rows: list[Row], extra: dict[str, Any], limit_figures: dict[str, float], plan: Plan, quick: bool,
                  out: Path = report.RESULTS) -> None:
    report.write_results("scaling", "Push scaling benchmark", rows, limit_figures, quick, asdict(plan),
                         notes(extra, quick), extra, out,
                         plot_fn=lambda _, path: plot(extra["runs"], limit_figures["socket_stream_gbps"], path))


def measure_limits(quick: bool) -> dict[str, float]:
    """The limits these rows are judged against (the latency ones are of no use here)."""
    size = (16 if quick else 64) * MiB
    return {"socket_stream_gbps": limits.socket_stream_gbps(size, rounds=3),
            "memcpy_gbps": limits.memcpy_gbps(size, rounds=3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 and 2 servers, 4 workers, 16 MiB (under a minute)")
    parser.add_argument("--servers", help="comma-separated server counts (default: 1,2,4; quick: 1,2)")
    parser.add_argument("--workers", type=int, help="worker processes (default: 8; quick: 4)")
    parser.add_argument("--mib", type=int, help="table size in MiB, pushed whole by every add (default: 64)")
    parser.add_argument("--rounds", type=int, help="timed rounds per server count (default: 8; quick: 3)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = replace(plan, **{k: v for k, v in {
        "servers": tuple(int(s) for s in args.servers.split(",")) if args.servers else None,
        "workers": args.workers, "dense_bytes": args.mib * MiB if args.mib else None,
        "rounds": args.rounds}.items() if v is not None})
    start = time.perf_counter()
    before = measure_limits(args.quick)
    rows, extra = run(plan, before)
    best = limits.best_of(before, measure_limits(args.quick))  # before and after the workloads
    report.rebase(rows, best)
    print(f"\n## push scaling ({'quick' if args.quick else 'full'})\n")
    print(report.markdown(rows, notes(extra, args.quick)))
    write_results(rows, extra, best, plan, args.quick)
    print(f"\nwrote {report.RESULTS}/scaling.{{json,md,png}} in {time.perf_counter() - start:.1f} s")
    return 0 if all(r["final_value"]["ok"] for r in extra["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
