"""``python -m benchmarks [--quick]``: measure this machine's raw limits, then run every
benchmark against them (and against the torch.distributed.rpc peer) in the same run,
and write benchmarks/results/."""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from benchmarks import dense, limits, peers, report, sparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (about 30 s)")
    args = parser.parse_args(argv)
    quick = args.quick
    start = time.perf_counter()
    before = limits.measure_all(quick)
    dense_rows = dense.run(before, quick)
    peer = peers.measure_torch_rpc((sparse.QUICK if quick else sparse.FULL).peer)
    sparse_rows, extra = sparse.run(before, peer, quick)
    measured = limits.best_of(before, limits.measure_all(quick))  # before and after the workloads
    report.rebase(dense_rows + sparse_rows, measured)
    width = max(map(len, measured))
    print("## raw limits (best of before and after the workloads)\n")
    for name, value in measured.items():
        print(f"    {name:<{width}}  {value:>14,.2f}")
    if peer is not None:
        print("\n## torch.distributed.rpc peer (medians; small_get_us: p50)\n")
        for name, values in peer.items():
            print(f"    {name:<{width}}  {statistics.median(values):>14,.2f}")
    print(f"\n## dense ({'quick' if quick else 'full'})\n")
    print(dense.markdown(dense_rows, quick))
    print(f"\n## sparse, KV and small adds ({'quick' if quick else 'full'})\n")
    print(report.markdown(sparse_rows, sparse.notes(extra, quick)))
    dense.write_results(dense_rows, measured, quick)
    sparse.write_results(sparse_rows, extra, measured, peer, quick)
    print(f"\nwrote {report.RESULTS}/{{dense,sparse}}.{{json,md,png}}{' and torch_rpc.json' if peer else ''} "
          f"in {time.perf_counter() - start:.1f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
