"""``python -m benchmarks.learning [--quick]``: does training through the parameter server
learn as well as training in one process?

Multinomial logistic regression on scikit-learn's digits, trained by 4 workers (2 server
processes) under async, SSP (staleness 1 and 3) and BSP, with the servers' sgd and
adagrad updaters; each run's final test accuracy and wall time stand next to the same
model trained in one process with the same rule and hyperparameters. Each distributed run
is a real job under ``multiverso-py run``; its workers run this module with ``--worker``.
Writes benchmarks/results/learning.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

import multiverso_py as mv
from benchmarks import learning_report
from benchmarks.learning_model import Data, Rule, accuracy, batches, gradient, load_digits_split
from benchmarks.learning_report import Result
from benchmarks.report import RESULTS

ROOT = Path(__file__).resolve().parent.parent
# Learning rates per updater. A BSP round applies the 4 workers' gradients of one point,
# like one step of 4x the batch and 4x the rate: 0.1 keeps that stable. Adagrad's early
# steps are large, so stale gradients move its final accuracy most; 40 epochs let it
# settle (numpy simulations with random delays of up to 40 pushes stayed within 0.5 pp).
LR = {"sgd": 0.1, "adagrad": 0.1}
# "add" stores what is pushed: the worker pushes -lr * gradient itself, which is sgd
# without the server-side updaters (a check of the job machinery alone).
REFERENCE_RULE = {"sgd": "sgd", "adagrad": "adagrad", "add": "sgd"}


@dataclass(frozen=True)
class Mode:
    label: str
    consistency: str
    staleness: int = 0


MODES = {
    "async": Mode("async", "async"),
    "ssp1": Mode("SSP s=1", "ssp", 1),
    "ssp3": Mode("SSP s=3", "ssp", 3),
    "bsp": Mode("BSP", "bsp"),
}


@dataclass(frozen=True)
class Settings:
    epochs: int
    batch: int  # per worker step, and per step of the single process
    l2: float  # weight decay: a strongly convex loss, so every run heads for the same optimum
    workers: int
    servers: int
    modes: tuple[str, ...]
    updaters: tuple[str, ...]
    lr: dict[str, float] = field(default_factory=lambda: dict(LR))
    seed: int = 0
    reference_runs: int = 5  # single-process runs (shuffle seeds) averaged into the reference
    test_fraction: float = 0.25
    job_timeout: float = 300.0


FULL = Settings(epochs=40, batch=32, l2=1e-2, workers=4, servers=2, modes=tuple(MODES), updaters=("sgd", "adagrad"))
QUICK = replace(FULL, epochs=10, modes=("async", "bsp"))


@dataclass(frozen=True)
class JobSpec:
    """What every worker of one distributed run reads from job.json."""

    data: str
    updater: str
    lr: float
    epochs: int
    batch: int
    l2: float
    seed: int


def worker(job_dir: Path) -> None:
    """One worker: train on this worker's shard, pulling the weights and pushing each
    minibatch gradient; the master worker records the test accuracy after every epoch."""
    spec = JobSpec(**json.loads((job_dir / "job.json").read_text()))
    data = Data.load(Path(spec.data))
    with mv.init():
        rank, workers = mv.worker_id(), mv.workers_num()
        options = {} if spec.updater == "add" else {"lr": spec.lr}
        # consistency and staleness: the job's defaults, from the launcher's flags
        table = mv.MatrixTable(data.features, data.classes, name="weights", updater=spec.updater, **options)
        shard = np.arange(rank, len(data.y_train), workers)
        steps = len(data.y_train) // workers // spec.batch  # the same for every worker: clocks stay in step
        scale = -spec.lr if spec.updater == "add" else 1.0
        rng = np.random.default_rng([spec.seed, rank])
        curve = []
        mv.barrier()  # every worker has the table: start together
        start = time.perf_counter()
        for _ in range(spec.epochs):
            for idx in batches(shard, spec.batch, steps, rng):
                w = table.get()
                table.add(scale * gradient(w, data.x_train[idx], data.y_train[idx], spec.l2))
                mv.clock()
            if mv.is_master_worker():
                curve.append((time.perf_counter() - start, accuracy(table.get(), data.x_test, data.y_test)))
        mv.barrier()  # every worker's adds are acknowledged: the last get sees them all
        if mv.is_master_worker():
            final = accuracy(table.get(), data.x_test, data.y_test)
            result = {"accuracy": final, "train_s": time.perf_counter() - start, "curve": curve}
            (job_dir / "result.json").write_text(json.dumps(result))


def launch(job_dir: Path, settings: Settings, mode: Mode) -> float:
    """Run one job under the launcher, as a user would; its wall time, start-up included."""
    staleness = ["--staleness", str(mode.staleness)] if mode.consistency == "ssp" else []
    cmd = [sys.executable, "-m", "multiverso_py", "--log-level", "warning", "run", "--workers",
           str(settings.workers), "--servers", str(settings.servers), "--consistency", mode.consistency, *staleness,
           "--", sys.executable, "-m", "benchmarks.learning", "--worker", str(job_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MV_")}
    env["OMP_NUM_THREADS"] = env["OPENBLAS_NUM_THREADS"] = "1"  # tiny matrices: BLAS threads only contend
    start = time.perf_counter()
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          stdin=subprocess.DEVNULL) as proc:
        try:
            out, _ = proc.communicate(timeout=settings.job_timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # SIGTERM: the launcher stops everything it started
            out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"job {' '.join(cmd)} exited with status {proc.returncode}:\n{out}")
    return time.perf_counter() - start


def run_distributed(data_path: Path, settings: Settings, mode: str, updater: str) -> Result:
    with tempfile.TemporaryDirectory(prefix="mv-learning-") as tmp:
        job_dir = Path(tmp)
        spec = JobSpec(str(data_path), updater, settings.lr[REFERENCE_RULE[updater]], settings.epochs,
                       settings.batch, settings.l2, settings.seed)
        (job_dir / "job.json").write_text(json.dumps(asdict(spec)))
        job_s = launch(job_dir, settings, MODES[mode])
        out = json.loads((job_dir / "result.json").read_text())
    return Result(MODES[mode].label, updater, out["accuracy"], out["train_s"], [tuple(p) for p in out["curve"]],
                  job_s=job_s)


def train_single(data: Data, settings: Settings, updater: str, seed: int) -> list[tuple[float, float]]:
    """The same model, rule, hyperparameters and epochs in one process: (seconds, test
    accuracy) after each epoch."""
    rule = Rule(REFERENCE_RULE[updater], settings.lr[REFERENCE_RULE[updater]], (data.features, data.classes))
    w = np.zeros((data.features, data.classes), np.float32)
    rng = np.random.default_rng(seed)
    everything = np.arange(len(data.y_train))
    steps = len(everything) // settings.batch
    curve = []
    start = time.perf_counter()
    for _ in range(settings.epochs):
        for idx in batches(everything, settings.batch, steps, rng):
            rule.apply(w, gradient(w, data.x_train[idx], data.y_train[idx], settings.l2))
        curve.append((time.perf_counter() - start, accuracy(w, data.x_test, data.y_test)))
    return curve


def reference(data: Data, settings: Settings, updater: str) -> Result:
    """Single-process training averaged over several shuffles: one shuffle's final
    accuracy moves by a few test images, which would blur the 1 pp comparison."""
    curves = np.array([train_single(data, settings, updater, settings.seed + i)
                       for i in range(settings.reference_runs)])
    curve = [(float(t), float(a)) for t, a in curves.mean(axis=0)]
    return Result("single process", updater, curve[-1][1], curve[-1][0], curve,
                  run_accuracies=[float(a) for a in curves[:, -1, 1]])


def describe(settings: Settings, data: Data) -> list[str]:
    """The notes under the table: what was trained, and how the figures are measured."""
    rates = ", ".join(f"{u} {settings.lr[REFERENCE_RULE[u]]:g}" for u in settings.updaters)
    return [
        f"Multinomial logistic regression on scikit-learn's digits ({len(data.y_train)} training, "
        f"{len(data.y_test)} test images, standardized); {settings.epochs} epochs, minibatches of {settings.batch}, "
        f"learning rate {rates}, weight decay {settings.l2:g}. Distributed: {settings.workers} workers, each on its "
        f"shard of the training set, {settings.servers} server processes; the servers apply the updater "
        "(with `add` the workers push -lr × gradient, which is sgd).",
        "",
        f"single process: the mean of {settings.reference_runs} runs with different shuffles (their range in "
        f"brackets); difference = accuracy - that mean; a run passes when it is at most "
        f"{learning_report.TOLERANCE_PP:g} pp below. Wall time is the training loop's (the master worker's for a job); "
        "job time is the whole job under `multiverso-py run`, process start-up included.",
    ]


def missing_updaters(updaters: tuple[str, ...]) -> list[str]:
    from multiverso_py.updaters import UPDATERS

    return [u for u in updaters if u not in UPDATERS]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.learning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{QUICK.epochs} epochs, async and BSP only")
    parser.add_argument("--updaters", type=lambda s: tuple(s.split(",")), help="comma-separated, from sgd, adagrad, "
                        "add (add: the worker applies sgd itself, for servers without sgd)")
    parser.add_argument("--modes", type=lambda s: tuple(s.split(",")), help=f"comma-separated, from {', '.join(MODES)}")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--servers", type=int)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where learning.{json,md,png} go")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a job's worker: its job folder
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    base = QUICK if args.quick else FULL
    overrides = {k: getattr(args, k) for k in ("updaters", "modes", "epochs", "workers", "servers")}
    settings = replace(base, **{k: v for k, v in overrides.items() if v is not None})
    unknown = [m for m in settings.modes if m not in MODES] + [u for u in settings.updaters if u not in REFERENCE_RULE]
    if unknown:
        raise SystemExit(f"unknown mode or updater: {', '.join(unknown)}")
    missing = missing_updaters(settings.updaters)
    if missing:
        raise SystemExit(f"the servers have no updater {', '.join(missing)} yet; try --updaters add")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        worker(args.worker)
        return 0
    settings = settings_from(args)
    start = time.perf_counter()
    data = load_digits_split(settings.test_fraction, settings.seed)
    references = {u: reference(data, settings, u) for u in settings.updaters}
    runs = []
    with tempfile.TemporaryDirectory(prefix="mv-learning-data-") as tmp:
        data_path = Path(tmp) / "digits.npz"
        data.save(data_path)
        for updater in settings.updaters:
            for mode in settings.modes:
                run = replace(run_distributed(data_path, settings, mode, updater),
                              reference=references[updater].accuracy)
                print(learning_report.progress_line(run), flush=True)
                runs.append(run)
    notes = describe(settings, data)
    print()
    print(learning_report.markdown(runs, references, notes))
    learning_report.write(args.results, runs, references, asdict(settings), notes, quick=args.quick)
    print(f"\nwrote {args.results}/learning.{{json,md,png}} in {time.perf_counter() - start:.1f} s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
