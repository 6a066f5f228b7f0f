"""``python -m benchmarks.torch_overhead [--quick]``: what training through the parameter
server costs a PyTorch model.

The seed design's CNN (multiverso_py.digits) on scikit-learn's digits, trained with
Adam: locally with plain torch.optim.Adam, and through PSOptimizer (the servers apply
Adam, waiting for each step's pull or with overlap=True) with 1 worker and with 2
workers, each a real job under the launcher. Reports samples/s of the training loop
(after a warm-up, evaluation excluded), its ratio to the local run (Multiverso measured
10.8% overhead for its torch binding; the target here is at most 10%), and each run's
test accuracy. The figures are medians over rounds. Writes
benchmarks/results/torch_overhead.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import report
from benchmarks.report import Row

WARMUP_STEPS = 10  # not timed: first-touch allocations, thread start-up


@dataclass(frozen=True)
class Settings:
    epochs: int = 6
    batch: int = 64
    lr: float = 2e-3
    rounds: int = 3
    servers: int = 1
    seed: int = 0


FULL = Settings()
QUICK = replace(FULL, epochs=3, rounds=1)


@dataclass
class Run:
    samples_per_s: float
    accuracy: float
    samples: int
    seconds: float


@dataclass
class Trainer:
    """One model and its optimizer, with its own random stream (dropout), so that
    interleaving several trainers in one process leaves each run as it would be alone."""

    model: torch.nn.Module
    opt: torch.optim.Optimizer
    rng: torch.Tensor
    samples: int = 0
    seconds: float = 0.0
    steps: int = 0

    def epoch(self, x: torch.Tensor, y: torch.Tensor, settings: Settings, seed: int) -> None:
        from multiverso_py.digits import batches

        torch.set_rng_state(self.rng)
        start = time.perf_counter()
        for xb, yb in batches(x, y, settings.batch, seed=seed):
            if self.steps == WARMUP_STEPS:  # restart the clock after the warm-up
                start, self.samples, self.seconds = time.perf_counter(), 0, 0.0
            self.opt.zero_grad()
            F.nll_loss(self.model(xb), yb).backward()
            self.opt.step()
            self.samples, self.steps = self.samples + len(xb), self.steps + 1
        self.seconds += time.perf_counter() - start
        self.rng = torch.get_rng_state()


# What each job's workers train, interleaved epoch by epoch so that load from elsewhere
# hits every setup alike; "local" is plain torch.optim.Adam in the same process.
JOB_SETUPS = {1: ("local", "exact", "overlap"), 2: ("exact", "overlap")}

LABELS = {
    "local": "seed CNN, local torch.optim.Adam",
    "exact": "PSOptimizer, 1 worker",
    "overlap": "PSOptimizer, 1 worker, overlap=True",
    "exact2": "PSOptimizer, 2 workers (total)",
    "overlap2": "PSOptimizer, 2 workers, overlap=True (total)",
}


def worker(job_dir: Path) -> None:
    """One worker of a job: every setup on this worker's shard; writes worker<i>.json."""
    import multiverso_py as mv
    from multiverso_py.digits import DigitsCNN, evaluate, load_digits
    from multiverso_py.torch import PSOptimizer

    settings = Settings(**json.loads((job_dir / "settings.json").read_text()))
    torch.set_num_threads(1)
    data = load_digits(settings.seed)
    with mv.init():
        rank, workers = mv.worker_id(), mv.workers_num()
        trainers = {}
        for setup in JOB_SETUPS[workers]:
            torch.manual_seed(settings.seed)
            model = DigitsCNN()
            opt = (torch.optim.Adam(model.parameters(), lr=settings.lr) if setup == "local" else
                   PSOptimizer(model.parameters(), updater="adam", lr=settings.lr, name=setup,
                               overlap=setup == "overlap"))
            trainers[setup] = Trainer(model, opt, torch.get_rng_state())
        x, y = data.shard(rank, workers)
        mv.barrier()  # start together
        for epoch in range(settings.epochs):
            for trainer in trainers.values():
                trainer.epoch(x, y, settings, settings.seed + 1000 * epoch + rank)
        mv.barrier()  # every worker's pushes are in
        result = {}
        for setup, trainer in trainers.items():
            if isinstance(trainer.opt, PSOptimizer):
                trainer.opt.pull()
            result[setup] = {"samples": trainer.samples, "seconds": trainer.seconds,
                             "accuracy": evaluate(trainer.model, data.x_test, data.y_test)[1]}
        (job_dir / f"worker{rank}.json").write_text(json.dumps(result))


def run_job(settings: Settings, workers: int) -> dict[str, Run]:
    from multiverso_py.launcher import launch

    with tempfile.TemporaryDirectory(prefix="mv-torch-bench-") as tmp:
        job_dir = Path(tmp)
        (job_dir / "settings.json").write_text(json.dumps(asdict(settings)))
        cmd = [sys.executable, "-m", "benchmarks.torch_overhead", "--worker", str(job_dir)]
        status = launch(cmd, workers, settings.servers, log_level="warning")
        if status != 0:
            raise RuntimeError(f"the {workers}-worker job exited with status {status}")
        results = [json.loads((job_dir / f"worker{i}.json").read_text()) for i in range(workers)]
    runs = {}
    for setup in JOB_SETUPS[workers]:
        samples = sum(r[setup]["samples"] for r in results)
        seconds = max(r[setup]["seconds"] for r in results)  # a job trains until its slowest worker is done
        key = setup if workers == 1 else f"{setup}2"
        runs[key] = Run(samples / seconds, results[0][setup]["accuracy"], samples, seconds)
    return runs


def measure(settings: Settings) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {key: [] for key in LABELS}
    for r in range(settings.rounds):
        for workers in (1, 2):
            for key, run in run_job(settings, workers).items():
                runs[key].append(run)
        print(f"round {r + 1}/{settings.rounds}: " + ", ".join(
            f"{k} {v[-1].samples_per_s:,.0f}/s ({v[-1].accuracy:.1%})" for k, v in runs.items()), flush=True)
    return runs


def rows(runs: dict[str, list[Run]]) -> list[Row]:
    local = [r.samples_per_s for r in runs["local"]]
    base = statistics.median(local)
    out = [Row("local", LABELS["local"], base, "samples/s", "itself", base, samples=local)]
    for key in ("exact", "overlap", "exact2", "overlap2"):
        values = [r.samples_per_s for r in runs[key]]
        out.append(Row(key, LABELS[key], statistics.median(values), "samples/s", "local torch", base,
                       target=0.9 if key in ("exact", "overlap") else None, samples=values))
    return out


def round_ratios(runs: dict[str, list[Run]], key: str) -> list[float]:
    """PS samples/s over the local run's, round by round (the local run of the same round
    shares its load)."""
    return [p.samples_per_s / q.samples_per_s for p, q in zip(runs[key], runs["local"])]


def notes(settings: Settings, runs: dict[str, list[Run]]) -> list[str]:
    acc = {k: statistics.median(r.accuracy for r in v) for k, v in runs.items()}
    per_round = "; ".join(f"{k} " + "/".join(f"{r.accuracy:.1%}" for r in v) for k, v in runs.items())
    return [
        "",
        "1-worker overhead, 1 - PS / local: " + "; ".join(
            f"{label} {1 - statistics.median(round_ratios(runs, key)):.1%} (per round: "
            + ", ".join(f"{1 - r:.0%}" for r in round_ratios(runs, key)) + ")"
            for key, label in (("exact", "waiting for each step's pull"), ("overlap", "overlap=True")))
        + " — the median of each round against its own local run; Multiverso's torch binding: 10.8%, target ≤ 10%.",
        "Test accuracy (median over rounds): " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()) +
        f" (per round: {per_round}).",
        f"Setup: {settings.epochs} epochs of the 1,438 training images, minibatches of {settings.batch}, Adam lr "
        f"{settings.lr:g} (the servers' adam for PSOptimizer); one torch thread per process; {settings.servers} "
        f"server process(es); {os.cpu_count()} cores shared by workers and servers. A job's workers train their "
        "setups interleaved epoch by epoch (local Adam in the 1-worker job's process), so that load from "
        f"elsewhere hits them alike; samples/s counts training steps after {WARMUP_STEPS} warm-up steps; a "
        "2-worker figure is both workers' samples over the slower one's time.",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_overhead", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one round")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    torch.set_num_threads(1)  # as every worker: the comparison is per process
    settings = QUICK if args.quick else FULL
    runs = measure(settings)
    table = rows(runs)
    print(report.markdown(table, notes(settings, runs)))
    report.write_results("torch_overhead", "PyTorch through the parameter server", table, {}, args.quick,
                         asdict(settings), notes(settings, runs),
                         extra={"runs": {k: [asdict(r) for r in v] for k, v in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
