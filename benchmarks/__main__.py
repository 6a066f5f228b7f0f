"""``python -m benchmarks [--quick]``: measure this machine's raw limits, then run every
benchmark against them and against the peer parameter servers (Ray actor,
torch.distributed.rpc) in the same run, and write benchmarks/results/."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TypeVar

from benchmarks import concurrent, dense, limits, memory, peers, report, sparse, versus

T = TypeVar("T")


def _print_figures(title: str, figures: dict[str, float]) -> None:
    width = max(map(len, figures))
    print(f"\n## {title}\n")
    for name, value in figures.items():
        print(f"    {name:<{width}}  {value:>14,.2f}")


def _print_table(title: str, rows: list[report.Row], notes: list[str], quick: bool) -> None:
    print(f"\n## {title} ({'quick' if quick else 'full'})\n")
    print(report.markdown(rows, notes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (under a minute)")
    quick = parser.parse_args(argv).quick
    start = time.perf_counter()
    spent: dict[str, float] = {}  # seconds per part, printed at the end

    def timed(part: str, action: Callable[[], T]) -> T:
        begin = time.perf_counter()
        try:
            return action()
        finally:
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - begin

    peer_sizes = peers.QUICK if quick else peers.FULL
    before = timed("limits", lambda: limits.measure_all(quick))
    dense_rows = timed("dense", lambda: dense.run(before, quick))
    measured = {peer: timed(peer.key, lambda: peers.measure(peer, peer_sizes)) for peer in (peers.TORCH_RPC, peers.RAY)}
    sparse_rows, sparse_extra = timed("sparse", lambda: sparse.run(before, measured[peers.TORCH_RPC], quick))
    concurrent_rows, concurrent_extra = timed("concurrent", lambda: concurrent.run(before, quick))
    memory_rows, memory_extra = timed("memory", lambda: memory.run(quick))
    versus_rows = versus.run(dense_rows + sparse_rows, measured[peers.RAY], measured[peers.TORCH_RPC], peer_sizes)
    best = limits.best_of(before, timed("limits", lambda: limits.measure_all(quick)))  # before and after
    report.rebase(dense_rows + sparse_rows + concurrent_rows, best)

    _print_figures("raw limits (best of before and after the workloads)", best)
    for peer, samples in measured.items():
        if samples is not None:
            _print_figures(f"{peer.name} (medians; latencies: p50 and p99)", peers.figures(samples))
    _print_table("dense and small ops", dense_rows, dense.notes(quick), quick)
    _print_table("sparse, KV and small adds", sparse_rows, sparse.notes(sparse_extra, quick), quick)
    _print_table("concurrent push", concurrent_rows, concurrent.notes(concurrent_extra, quick), quick)
    if memory_rows:
        _print_table("peak memory of a big pull", memory_rows, memory.notes(memory_extra, quick), quick)
    _print_table("against the peers", versus_rows, versus.NOTES, quick)

    dense.write_results(dense_rows, best, quick)
    sparse.write_results(sparse_rows, sparse_extra, best, quick)
    concurrent.write_results(concurrent_rows, concurrent_extra, best, quick)
    if memory_rows:
        memory.write_results(memory_rows, memory_extra, quick)
    versus.write_results(versus_rows, best, quick, peer_sizes)
    for peer, samples in measured.items():
        if samples is not None:
            peers.save(peer, samples, peer_sizes, quick)
    print(f"\nwrote {report.RESULTS}/{{dense,sparse,concurrent,memory,peers}}.{{json,md,png}} and the peers' "
          f"figures in {time.perf_counter() - start:.1f} s total "
          f"({', '.join(f'{part} {seconds:.1f} s' for part, seconds in spent.items())})")
    return 0

if __name__ == "__main__":
    sys.exit(main())
