"""`multiverso-py demo`: the newcomer's first job, one command after install.

Trains the digits CNN (multiverso_py.digits) with N workers and M server processes
through PSOptimizer, started by the same launcher as `multiverso-py run`. The workers
(multiverso_py.demo_worker) print progress events; this side draws them as one
progress bar for the whole job, then reports test accuracy, throughput and where the
checkpoint and the figure went.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import IO, Any, Optional

from multiverso_py.context import CONSISTENCY_MODELS
from multiverso_py.errors import InvalidArgument
from multiverso_py.updaters import check_updater

EVENT = "@mv-demo "  # as multiverso_py.demo_worker prints it (not imported: that needs torch)
BAR_WIDTH = 20


def add_parser(sub: Any, positive: Any, non_negative: Any) -> None:
    demo = sub.add_parser("demo", help="train a small CNN on handwritten digits through the parameter server",
                          description="Train the digits CNN (scikit-learn's 8x8 digits, shipped with the package) "
                                      "with several workers and servers through PSOptimizer; show progress, test "
                                      "accuracy and where the checkpoint and figures went. Needs the torch extra.")
    demo.add_argument("--workers", type=positive, default=2, help="worker processes (default: 2)")
    demo.add_argument("--servers", type=positive, default=2, help="server processes (default: 2)")
    demo.add_argument("--epochs", type=positive, default=10, help="passes over the training set (default: 10)")
    demo.add_argument("--batch-size", type=positive, default=32, help="minibatch per worker step (default: 32)")
    demo.add_argument("--updater", default="adam", help="server-side updater (default: adam)")
    demo.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: 0.002)")
    demo.add_argument("--consistency", choices=CONSISTENCY_MODELS, default="async",
                      help="consistency model of the tables (default: async)")
    demo.add_argument("--staleness", type=non_negative, help="SSP staleness in clocks (with --consistency ssp)")
    demo.add_argument("--seed", type=int, default=0, help="data split and initial model (default: 0)")
    demo.add_argument("--out", type=Path, help="directory for the checkpoint, figure and summary "
                                               "(default: a new multiverso-demo-<time> directory here)")


def run(args: argparse.Namespace, out: IO[str] = sys.stdout) -> int:
    from multiverso_py.launcher import launch

    missing = [name for name in ("torch", "sklearn") if not _importable(name)]
    if missing:
        out.write(f"the demo needs {' and '.join(missing)}: pip install 'multiverso-py[torch]'\n")
        return 1
    try:
        check_updater(args.updater, {"lr": args.lr})  # here, not in N workers after seconds of start-up
    except InvalidArgument as exc:
        out.write(f"multiverso-py demo: {exc}\n")
        return 2
    directory = args.out or _new_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "multiverso_py.demo_worker", "--out", str(directory), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--updater", args.updater,
           "--seed", str(args.seed), *(["--overlap"] if args.consistency == "bsp" else [])]
    out.write(f"multiverso-py demo: {args.workers} worker(s) and {args.servers} server(s) train a CNN on "
              f"scikit-learn's digits for {args.epochs} epochs ({args.updater}, lr {args.lr:g}, "
              f"{args.consistency}{', PSOptimizer(overlap=True)' if args.consistency == 'bsp' else ''})\n")
    progress = Progress(out)
    start = time.perf_counter()
    status = launch(cmd, args.workers, args.servers, consistency=args.consistency, staleness=args.staleness,
                    log_level="warning", out=progress)
    progress.close()
    if status != 0:
        out.write(f"the demo job failed (exit status {status}); its output is above\n")
        return status
    return report(directory, progress, time.perf_counter() - start, out)


def report(directory: Path, progress: "Progress", wall: float, out: IO[str]) -> int:
    try:
        summary = json.loads((directory / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        out.write(f"the demo finished but wrote no summary ({exc})\n")
        return 1
    figure = summary["figure"] or "not drawn: matplotlib is not installed (pip install matplotlib)"
    lines = [
        f"test accuracy  {summary['test_accuracy']:.2%}  (loss {summary['test_loss']:.4f})",
        f"throughput     {progress.samples_per_second():,.0f} samples/s over {summary['workers']} worker(s)",
        f"wall time      {wall:.1f} s (start-up included)",
        f"checkpoint     {summary['checkpoint']}  (torch.load: model and optimizer state_dicts)",
        f"figure         {figure}",
        f"summary        {directory / 'summary.json'}",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()
    return 0


def _new_directory() -> Path:
    base = Path.cwd() / time.strftime("multiverso-demo-%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class Progress:
    """What the launcher writes the job's output to: event lines from the workers
    become one progress bar (redrawn in place on a terminal, a line per epoch
    otherwise); every other line passes through above it."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.total: dict[int, int] = {}  # worker -> samples it will train on
        self.done: dict[int, int] = {}  # worker -> samples trained so far
        self.loss: dict[int, float] = {}
        self.finished: dict[int, tuple[int, float]] = {}  # worker -> (samples, training seconds)
        self.epoch = ""
        self.started: Optional[float] = None
        self._bar_shown = False

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self._line(line)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def _line(self, line: str) -> None:
        at = line.find(EVENT)
        if at < 0:
            self._clear()
            self.out.write(line + "\n")
            self._draw()
            return
        try:
            event = json.loads(line[at + len(EVENT):])
            self._event(event)
        except (ValueError, KeyError, TypeError):
            self._clear()
            self.out.write(line + "\n")  # not an event after all
        self._draw()

    def _event(self, event: dict) -> None:
        worker, kind = int(event["worker"]), event["ev"]
        if kind == "start":
            self.total[worker] = int(event["samples"])
            self.started = self.started or time.perf_counter()
        elif kind == "step":
            self.done[worker], self.loss[worker] = int(event["samples"]), float(event["loss"])
        elif kind == "epoch":
            self.epoch = f"epoch {event['epoch']}: test acc {event['test_accuracy']:.1%}"
            if not self.tty:
                self.out.write(self._bar() + "\n")
        elif kind == "done":
            self.done[worker] = int(event["samples"])
            self.finished[worker] = (int(event["samples"]), float(event["seconds"]))

    def samples_per_second(self) -> float:
        """All workers' training samples over the longest worker's training time."""
        if not self.finished:
            return 0.0
        longest = max(seconds for _, seconds in self.finished.values())
        return sum(samples for samples, _ in self.finished.values()) / max(longest, 1e-9)

    def _bar(self) -> str:
        total, done = sum(self.total.values()), sum(self.done.values())
        fraction = done / total if total else 0.0
        filled = int(BAR_WIDTH * fraction)
        elapsed = time.perf_counter() - self.started if self.started else 0.0
        rate = f"{done / elapsed:,.0f} samples/s" if done and elapsed > 0 else ""
        loss = f"loss {sum(self.loss.values()) / len(self.loss):.3f}" if self.loss else ""
        parts = [f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {fraction:4.0%}", f"{done}/{total}", loss, rate,
                 self.epoch]
        return "  ".join(p for p in parts if p)

    def _draw(self) -> None:
        if self.tty and self.total:
            width = shutil.get_terminal_size().columns - 1  # a wrapped line could not be redrawn in place
            self.out.write("\r" + self._bar()[:width] + "\x1b[K")
            self.out.flush()
            self._bar_shown = True

    def _clear(self) -> None:
        if self._bar_shown:
            self.out.write("\r\x1b[K")
            self._bar_shown = False

    def close(self) -> None:
        if self._bar_shown:
            self.out.write("\n")
            self._bar_shown = False
        self.out.flush()
