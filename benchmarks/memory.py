"""Peak memory of a big pull: one server process holding a 1 GiB float32 ArrayTable (256 MiB
with --quick), one fresh worker process pulling all of it with get(out=...) and with get().

Peaks are the kernel's high-water marks (VmHWM in /proc/<pid>/status), reset to the
current RSS just before each pull (writing 5 to /proc/<pid>/clear_refs), so filling the
table beforehand does not count. Both idle processes' RSS is reported too: the fixed
cost of Python, numpy and multiverso_py that every peak includes. Linux only.

Run with ``python -m benchmarks [--quick]``; ``python -m benchmarks.memory`` runs this part.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

import multiverso_py as mv
from benchmarks import report
from benchmarks.limits import watchdog
from benchmarks.report import Row
from multiverso_py.testing import LocalCluster

MiB = 1 << 20
SERVER_TARGET = 1.3  # server peak <= 1.3x (table bytes + updater state; the "add" updater keeps none)
WORKER_TARGET = 2.0  # worker peak <= 2x the pulled bytes
WORKER_TIMEOUT_S = 120.0
MODES = {"out": "get(out=)", "new": "get()"}


@dataclass(frozen=True)
class Sizes:
    table_bytes: int


FULL = Sizes(table_bytes=1024 * MiB)
QUICK = Sizes(table_bytes=256 * MiB)
QUICK_NOTE = ("quick: a 256 MiB table, where the idle processes' fixed RSS weighs four times as much; "
              "judge targets on the full run (1 GiB).")


def vm(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM")}


def reset_peak(pid: int | str = "self") -> None:
    """Set the process's VmHWM back to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _worker(env: dict[str, str], server_pid: int, sizes: Sizes, conn: Connection, parent: int) -> None:
    """Join the job, fill the table, then pull it both ways; send every RSS figure."""
    watchdog(parent)
    os.environ.update(env)
    mv.init()
    try:
        figures = {"worker_idle": vm()["VmRSS"]}
        floats = sizes.table_bytes // 4
        table = mv.ArrayTable(floats, name="big")
        table.add(np.ones(floats, np.float32))  # real data: untouched zero pages would not count on the server
        figures["server_loaded"] = vm(server_pid)["VmRSS"]
        for mode in MODES:
            out = np.empty(floats, np.float32) if mode == "out" else None
            reset_peak()
            reset_peak(server_pid)
            figures[f"worker_before_{mode}"] = vm()["VmRSS"]
            figures[f"server_before_{mode}"] = vm(server_pid)["VmRSS"]
            result = table.get(out=out)
            if result[0] != 1 or result[-1] != 1:
                raise RuntimeError(f"the pulled table does not hold ones: {result[0]}, {result[-1]}")
            figures[f"worker_peak_{mode}"] = vm()["VmHWM"]
            figures[f"server_peak_{mode}"] = vm(server_pid)["VmHWM"]
            del result, out
        conn.send(figures)
    finally:
        mv.shutdown()


def measure(sizes: Sizes) -> dict[str, int]:
    """Every RSS figure, in bytes: the idle server before any table, then the worker's."""
    ctx = mp.get_context("spawn")
    with LocalCluster(workers=1, servers=1, log_level="warning") as cluster:
        server_pid = cluster.servers[0].pid
        idle = vm(server_pid)["VmRSS"]
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(cluster.worker_env(0), server_pid, sizes, send, os.getpid()),
                           daemon=True)
        proc.start()
        send.close()
        try:
            if not recv.poll(WORKER_TIMEOUT_S):
                raise RuntimeError(f"the memory benchmark's worker did not finish within {WORKER_TIMEOUT_S:g} s")
            return {"server_idle": idle, **recv.recv()}
        except EOFError:
            raise RuntimeError(f"the memory benchmark's worker exited early ({proc.exitcode})") from None
        finally:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join()


def rows(figures: dict[str, int], sizes: Sizes) -> list[Row]:
    table = sizes.table_bytes / MiB
    size = f"{sizes.table_bytes // MiB} MiB" if sizes.table_bytes < 1024 * MiB else f"{sizes.table_bytes >> 30} GiB"

    def mib(key: str) -> float:
        return figures[key] / MiB

    out = [Row("rss_server_idle", "server RSS, idle (no table)", mib("server_idle"), "MiB", "table bytes", table,
               lower_is_better=True),
           Row("rss_worker_idle", "worker RSS after mv.init(), idle", mib("worker_idle"), "MiB", "pulled bytes", table,
               lower_is_better=True)]
    for mode, call in MODES.items():
        out += [Row(f"rss_server_peak_{mode}", f"server peak RSS, {size} pull with {call}", mib(f"server_peak_{mode}"),
                    "MiB", "table + updater state", table, lower_is_better=True, target=SERVER_TARGET),
                Row(f"rss_worker_peak_{mode}", f"worker peak RSS, {size} pull with {call}", mib(f"worker_peak_{mode}"),
                    "MiB", "pulled bytes", table, lower_is_better=True, target=WORKER_TARGET)]
    return out


def run(quick: bool = False) -> tuple[list[Row], dict]:
    """The rows of the report and, for the JSON, every RSS figure in bytes; no rows
    (with a note) where /proc cannot tell peak RSS."""
    if not Path("/proc/self/clear_refs").exists():
        print("note: no /proc/<pid>/clear_refs on this system; skipping the memory benchmark")
        return [], {}
    sizes = QUICK if quick else FULL
    figures = measure(sizes)
    return rows(figures, sizes), {"rss_bytes": figures}


def notes(extra: dict, quick: bool) -> list[str]:
    before = ", ".join(f"{call}: server {extra['rss_bytes'][f'server_before_{mode}'] / MiB:,.0f} MiB, worker "
                       f"{extra['rss_bytes'][f'worker_before_{mode}'] / MiB:,.0f} MiB" for mode, call in MODES.items())
    return ["ratio = RSS / bytes of the table; peaks are reset just before each pull, so they include what "
            "the process held then (the idle RSS, the table on the server, memory the fill left behind; the "
            f"out= array only once the pull writes it). RSS just before each pull: {before}.",
            *([QUICK_NOTE] if quick else [])]


def write_results(rows: list[Row], extra: dict, quick: bool) -> None:
    report.write_results("memory", "Peak memory of a big pull", rows, {}, quick, asdict(QUICK if quick else FULL),
                         notes(extra, quick), extra)


if __name__ == "__main__":
    quick = "--quick" in sys.argv[1:]
    found, extra = run(quick)
    print(report.markdown(found, notes(extra, quick)))
    write_results(found, extra, quick)
