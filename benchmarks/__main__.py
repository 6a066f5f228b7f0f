"""``python -m benchmarks [--quick]``: measure this machine's raw limits, then run every
benchmark against them in the same run, and write benchmarks/results/."""

from __future__ import annotations

import argparse
import sys
import time

from benchmarks import dense, limits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer rounds (about 30 s)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    before = limits.measure_all(args.quick)
    rows = dense.run(before, args.quick)
    measured = limits.best_of(before, limits.measure_all(args.quick))  # before and after the workloads
    dense.rebase(rows, measured)
    width = max(map(len, measured))
    print("## raw limits (best of before and after the workloads)\n")
    for name, value in measured.items():
        print(f"    {name:<{width}}  {value:>14,.2f}")
    print(f"\n## dense ({'quick' if args.quick else 'full'})\n")
    print(dense.markdown(rows, args.quick))
    dense.write_results(rows, measured, args.quick)
    print(f"\nwrote {dense.RESULTS}/dense.{{json,md}} in {time.perf_counter() - start:.1f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
