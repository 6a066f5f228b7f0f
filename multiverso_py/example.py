"""A short example job: workers fit one linear model together through an ArrayTable.

    multiverso-py run --workers 2 --servers 2 -- python -m multiverso_py.example
    python -m multiverso_py.example          # the same script, as an embedded job

Each worker holds its own slice of the data, pulls the shared weights, and pushes its
share of the gradient step; the server sums the pushes.
"""

from __future__ import annotations

import logging

import numpy as np

import multiverso_py as mv

FEATURES, SAMPLES, STEPS, LR = 10, 2000, 60, 0.1


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with mv.init():
        true_w = np.linspace(-1.0, 1.0, FEATURES, dtype=np.float32)
        rng = np.random.default_rng(mv.worker_id())
        x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32)
        y = x @ true_w + rng.normal(scale=0.01, size=SAMPLES).astype(np.float32)
        weights = mv.ArrayTable(FEATURES, name="weights")
        workers = mv.workers_num()  # the job's size at the start (workers_num() later counts those still in it)
        for step in range(STEPS):
            w = weights.get()
            grad = x.T @ (x @ w - y) / SAMPLES
            weights.add(-LR * grad / workers)
            if step % 20 == 0:
                print(f"worker {mv.worker_id()}: step {step:3d}  loss {np.mean((x @ w - y) ** 2):.5f}")
        mv.barrier()
        w = weights.get()
        print(f"worker {mv.worker_id()} of {workers}: final loss {np.mean((x @ w - y) ** 2):.5f}, "
              f"largest weight error {np.abs(w - true_w).max():.4f}")


if __name__ == "__main__":
    main()
