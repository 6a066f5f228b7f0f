"""``python -m benchmarks.torch_overhead [--quick] [--device cuda] [--workers 1,2,4,8]``: what
training through the parameter server costs a PyTorch model.

The seed design's CNN (multiverso_py.digits) on scikit-learn's digits, trained with
Adam: locally with plain torch.optim.Adam, and through PSOptimizer (the servers apply
Adam, waiting for each step's pull or with overlap=True) with 1 worker and with 2
workers (or the counts --workers names), each a real job under the launcher. Reports
samples/s of the training loop (after a warm-up, evaluation excluded), its ratio to the
local run of the same rounds (Multiverso measured 10.8% overhead for its torch binding;
the target here is at most 10%), and each run's test accuracy. The figures are medians
over rounds. Writes benchmarks/results/torch_overhead.{json,md,png}.

--device cuda keeps the model, its gradients and the data on the GPU (every worker of
a job shares the one device; the servers stay on the CPU, so each step copies the
gradients to the host and the weights back), trains more epochs (steps are short there,
and 8 workers get few each) and writes torch_overhead_cuda.{json,md,png} instead.
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
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from benchmarks import report
from benchmarks.report import Row

WARMUP_STEPS = 10  # not timed: first-touch allocations, thread start-up, CUDA kernels' first launches


@dataclass(frozen=True)
class Settings:
    epochs: int = 6
    batch: int = 64
    lr: float = 2e-3
    rounds: int = 3
    servers: int = 1
    seed: int = 0
    device: str = "cpu"


FULL = Settings()
QUICK = replace(FULL, epochs=3, rounds=1)
# 8 workers share an epoch's 23 minibatches: 20 epochs leave each of them 50 timed steps.
CUDA_FULL = replace(FULL, epochs=20, device="cuda")
CUDA_QUICK = replace(CUDA_FULL, epochs=8, rounds=1)


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
    rng: tuple[torch.Tensor, Optional[torch.Tensor]]  # CPU and (dropout on a GPU) CUDA generator states
    samples: int = 0
    seconds: float = 0.0
    steps: int = 0

    def epoch(self, x: torch.Tensor, y: torch.Tensor, settings: Settings, seed: int) -> None:
        from multiverso_py.digits import batches

        set_rng(self.rng)
        cuda = x.device.type == "cuda"
        start = time.perf_counter()
        for xb, yb in batches(x, y, settings.batch, seed=seed):
            if self.steps == WARMUP_STEPS:  # restart the clock after the warm-up
                if cuda:
                    torch.cuda.synchronize()  # the warm-up's queued kernels are not timed
                start, self.samples, self.seconds = time.perf_counter(), 0, 0.0
            self.opt.zero_grad()
            F.nll_loss(self.model(xb), yb).backward()
            self.opt.step()
            self.samples, self.steps = self.samples + len(xb), self.steps + 1
        if cuda:
            torch.cuda.synchronize()  # a local step only queues kernels: time them done
        self.seconds += time.perf_counter() - start
        self.rng = get_rng(cuda)


def get_rng(cuda: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return torch.get_rng_state(), torch.cuda.get_rng_state() if cuda else None


def set_rng(state: tuple[torch.Tensor, Optional[torch.Tensor]]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1])


# What each job's workers train, interleaved epoch by epoch so that load from elsewhere
# hits every setup alike; "local" is plain torch.optim.Adam in the 1-worker job's process.
def job_setups(workers: int) -> tuple[str, ...]:
    return ("local", "exact", "overlap") if workers == 1 else ("exact", "overlap")


def run_key(setup: str, workers: int) -> str:
    return setup if workers == 1 else f"{setup}{workers}"


def labels(worker_counts: Sequence[int]) -> dict[str, str]:
    """Result key -> label, in report order: "exact2" is PSOptimizer with 2 workers."""
    out = {}
    for n in worker_counts:
        for setup in job_setups(n):
            if setup == "local":
                out["local"] = "seed CNN, local torch.optim.Adam"
            else:
                who = "1 worker" if n == 1 else f"{n} workers"
                total = "" if n == 1 else " (total)"
                out[run_key(setup, n)] = (f"PSOptimizer, {who}" + (", overlap=True" if setup == "overlap" else "")
                                          + total)
    return out


def worker(job_dir: Path) -> None:
    """One worker of a job: every setup on this worker's shard; writes worker<i>.json."""
    import multiverso_py as mv
    from multiverso_py.digits import DigitsCNN, evaluate, load_digits
    from multiverso_py.torch import PSOptimizer

    settings = Settings(**json.loads((job_dir / "settings.json").read_text()))
    torch.set_num_threads(1)
    device = torch.device(settings.device)
    data = load_digits(settings.seed)
    with mv.init():
        rank, workers = mv.worker_id(), mv.workers_num()
        trainers = {}
        for setup in job_setups(workers):
            torch.manual_seed(settings.seed)
            model = DigitsCNN().to(device)
            opt = (torch.optim.Adam(model.parameters(), lr=settings.lr) if setup == "local" else
                   PSOptimizer(model.parameters(), updater="adam", lr=settings.lr, name=setup,
                               overlap=setup == "overlap"))
            trainers[setup] = Trainer(model, opt, get_rng(device.type == "cuda"))
        x, y = (t.to(device) for t in data.shard(rank, workers))  # the whole shard lives on the device
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
                             "accuracy": evaluate(trainer.model, data.x_test.to(device), data.y_test.to(device))[1]}
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
    for setup in job_setups(workers):
        samples = sum(r[setup]["samples"] for r in results)
        seconds = max(r[setup]["seconds"] for r in results)  # a job trains until its slowest worker is done
        runs[run_key(setup, workers)] = Run(samples / seconds, results[0][setup]["accuracy"], samples, seconds)
    return runs


def measure(settings: Settings, worker_counts: Sequence[int] = (1, 2)) -> dict[str, list[Run]]:
    runs: dict[str, list[Run]] = {key: [] for key in labels(worker_counts)}
    for r in range(settings.rounds):
        for workers in worker_counts:
            for key, run in run_job(settings, workers).items():
                runs[key].append(run)
        print(f"round {r + 1}/{settings.rounds}: " + ", ".join(
            f"{k} {v[-1].samples_per_s:,.0f}/s ({v[-1].accuracy:.1%})" for k, v in runs.items()), flush=True)
    return runs


def rows(runs: dict[str, list[Run]], names: dict[str, str]) -> list[Row]:
    local = [r.samples_per_s for r in runs["local"]]
    base = statistics.median(local)
    out = [Row("local", names["local"], base, "samples/s", "itself", base, samples=local)]
    for key in names:
        if key == "local":
            continue
        values = [r.samples_per_s for r in runs[key]]
        out.append(Row(key, names[key], statistics.median(values), "samples/s", "local torch", base,
                       target=0.9 if key in ("exact", "overlap") else None, samples=values))
    return out


def round_ratios(runs: dict[str, list[Run]], key: str) -> list[float]:
    """PS samples/s over the local run's, round by round (the local run of the same round
    shares its load)."""
    return [p.samples_per_s / q.samples_per_s for p, q in zip(runs[key], runs["local"])]


def notes(settings: Settings, runs: dict[str, list[Run]]) -> list[str]:
    acc = {k: statistics.median(r.accuracy for r in v) for k, v in runs.items()}
    per_round = "; ".join(f"{k} " + "/".join(f"{r.accuracy:.1%}" for r in v) for k, v in runs.items())
    where = f"{os.cpu_count()} cores shared by workers and servers"
    if settings.device == "cuda":
        where = (f"model, gradients and data on {torch.cuda.get_device_name()} (torch {torch.__version__}), one "
                 f"GPU shared by every worker of a job, the servers on the CPU; " + where)
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
        f"server process(es); {where}. A job's workers train their "
        "setups interleaved epoch by epoch (local Adam in the 1-worker job's process), so that load from "
        f"elsewhere hits them alike; samples/s counts training steps after {WARMUP_STEPS} warm-up steps; a "
        "multi-worker figure is all workers' samples over the slowest one's time.",
    ]


def worker_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected worker counts like 1,2,4,8, got {text!r}") from None
    if 1 not in counts or min(counts) < 1 or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError("worker counts must be distinct, >= 1 and include 1 (the 1-worker job "
                                         "also runs the local baseline)")
    return tuple(sorted(counts))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torch_overhead", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and one round")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model, its gradients and the data live (default cpu)")
    parser.add_argument("--workers", type=worker_counts, default=(1, 2),
                        help="comma-separated worker counts, one job each per round (default 1,2)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    torch.set_num_threads(1)  # as every worker: the comparison is per process
    if args.device == "cuda":
        settings, name, title = CUDA_QUICK if args.quick else CUDA_FULL, "torch_overhead_cuda", \
            "PyTorch through the parameter server, CUDA tensors"
        extra = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    else:
        settings, name, title = QUICK if args.quick else FULL, "torch_overhead", "PyTorch through the parameter server"
        extra = {}
    runs = measure(settings, args.workers)
    table = rows(runs, labels(args.workers))
    print(report.markdown(table, notes(settings, runs)))
    report.write_results(name, title, table, {}, args.quick, asdict(settings), notes(settings, runs),
                         extra={**extra, "runs": {k: [asdict(r) for r in v] for k, v in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
