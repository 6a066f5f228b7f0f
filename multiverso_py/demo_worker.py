"""One worker of `multiverso-py demo` (run by the launcher, N copies): trains the digits
CNN on its shard of the training set through PSOptimizer, reporting progress as event
lines that the demo command turns into a progress bar. Worker 0 also evaluates on the
test set after each epoch and, at the end, saves the checkpoint, the figure and
summary.json into the output directory."""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

import multiverso_py as mv
from multiverso_py.digits import DigitsCNN, Digits, batches, evaluate, load_digits
from multiverso_py.torch import PSOptimizer

EVENT = "@mv-demo "  # prefix of the lines the demo command parses
STEP_EVENTS_PER_EPOCH = 10


def emit(kind: str, **fields: Any) -> None:
    print(EVENT + json.dumps({"ev": kind, "worker": mv.worker_id(), **fields}), flush=True)


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m multiverso_py.demo_worker")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--updater", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overlap", action="store_true")
    return parser.parse_args(argv)


def train(args: argparse.Namespace, data: Digits) -> dict[str, Any]:
    rank, workers = mv.worker_id(), mv.workers_num()
    torch.manual_seed(args.seed)  # the same initial model everywhere; the master's is used anyway
    model = DigitsCNN()
    # Under BSP a step's pull can only land after the clock: overlap=True (see PSOptimizer).
    opt = PSOptimizer(model.parameters(), updater=args.updater, lr=args.lr, name="demo", overlap=args.overlap)
    x, y = data.shard(rank, workers)
    # Every worker takes the same number of steps (shards differ by a sample at most):
    # under BSP or SSP a worker that stopped clocking early would hold the others back.
    steps_per_epoch = -(-(len(data.x_train) // workers) // args.batch_size)
    samples_per_epoch = sum(len(xb) for xb, _ in islice(batches(x, y, args.batch_size, 0), steps_per_epoch))
    emit("start", samples=samples_per_epoch * args.epochs, steps=steps_per_epoch * args.epochs)
    every = max(1, steps_per_epoch // STEP_EVENTS_PER_EPOCH)
    history: dict[str, list] = {"step_loss": [], "epoch_test_accuracy": [], "epoch_test_loss": []}
    samples, seconds, step = 0, 0.0, 0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        for xb, yb in islice(batches(x, y, args.batch_size, seed=args.seed + 1000 * epoch + rank), steps_per_epoch):
            opt.zero_grad()
            loss = F.nll_loss(model(xb), yb)
            loss.backward()
            opt.step()
            mv.clock()  # a no-op for async tables; SSP/BSP wait on it
            samples, step = samples + len(xb), step + 1
            history["step_loss"].append(loss.item())
            if step % every == 0:
                emit("step", samples=samples, loss=sum(history["step_loss"][-every:]) / every)
        seconds += time.perf_counter() - start  # training time only, not the evaluations below
        if rank == 0:
            test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
            history["epoch_test_loss"].append(test_loss)
            history["epoch_test_accuracy"].append(test_accuracy)
            emit("epoch", epoch=epoch + 1, test_loss=test_loss, test_accuracy=test_accuracy)
    emit("done", samples=samples, seconds=seconds)
    mv.barrier()  # every worker's last push is in
    opt.pull()
    return {"model": model, "optimizer": opt, "history": history, "samples": samples, "seconds": seconds,
            "workers": workers}


def save(args: argparse.Namespace, data: Digits, result: dict[str, Any]) -> None:
    """Worker 0: the final test accuracy, the checkpoint, the figure and summary.json."""
    model, history = result["model"], result["history"]
    test_loss, test_accuracy = evaluate(model, data.x_test, data.y_test)
    checkpoint = args.out / "digits_cnn.pt"
    torch.save({"model": model.state_dict(), "optimizer": result["optimizer"].state_dict(),
                "test_accuracy": test_accuracy}, checkpoint)
    figure = plot(history, args.out / "training.png")
    summary = {"test_accuracy": test_accuracy, "test_loss": test_loss, "checkpoint": str(checkpoint),
               "figure": figure, "workers": result["workers"], "servers": mv.servers_num(), **history}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


def plot(history: dict[str, list], path: Path) -> Optional[str]:
    """Training loss per step and test accuracy per epoch; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(history["step_loss"], linewidth=0.8)
    left.set(title="training loss (worker 0)", xlabel="step", ylabel="NLL loss")
    epochs = range(1, len(history["epoch_test_accuracy"]) + 1)
    right.plot(epochs, history["epoch_test_accuracy"], marker="o")
    right.set(title="test accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)  # the workers and servers share the machine's cores
    data = load_digits(args.seed)
    with mv.init():
        result = train(args, data)
        if mv.is_master_worker():
            save(args, data, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
