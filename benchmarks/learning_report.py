"""Results of the learning benchmark: one run's figures, the markdown table, the plot of
test accuracy against wall time, and learning.{json,md,png}."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from benchmarks.report import machine_info

TOLERANCE_PP = 1.0  # a distributed run passes at most this many points below the single process


@dataclass(frozen=True)
class Result:
    mode: str
    updater: str
    accuracy: float  # final test accuracy
    train_s: float  # wall time of the training loop (a job's: its master worker's)
    curve: list[tuple[float, float]]  # (seconds into training, test accuracy) after each epoch
    job_s: Optional[float] = None  # a job's whole run under the launcher, process start-up included
    reference: Optional[float] = None  # the single-process accuracy with the same updater
    run_accuracies: list[float] = field(default_factory=list)  # a reference's: each run's final accuracy

    @property
    def diff_pp(self) -> float:
        return 100.0 * (self.accuracy - self.reference)

    @property
    def verdict(self) -> str:
        return "PASS" if self.diff_pp >= -TOLERANCE_PP - 1e-9 else "MISS"

    def to_json(self) -> dict[str, Any]:
        extra = {} if self.reference is None else {"diff_pp": self.diff_pp, "verdict": self.verdict}
        return {**asdict(self), **extra}


def progress_line(run: Result) -> str:
    return (f"{run.updater:<8} {run.mode:<8} accuracy {run.accuracy:.2%} (single process {run.reference:.2%}, "
            f"{run.diff_pp:+.2f} pp) {run.verdict}  training {run.train_s:.1f} s, job {run.job_s:.1f} s")


def markdown(runs: Sequence[Result], references: dict[str, Result], notes: Sequence[str]) -> str:
    lines = ["| mode | updater | accuracy | single process | difference | wall time | single-process wall time "
             f"| job time | within {TOLERANCE_PP:g} pp |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        low, high = min(references[r.updater].run_accuracies), max(references[r.updater].run_accuracies)
        single = f"{r.reference:.2%} ({low:.2%}-{high:.2%})"
        lines.append(f"| {r.mode} | {r.updater} | {r.accuracy:.2%} | {single} | {r.diff_pp:+.2f} pp "
                     f"| {r.train_s:.2f} s | {references[r.updater].train_s:.3f} s | {r.job_s:.1f} s | {r.verdict} |")
    return "\n".join([*lines, "", *notes])


def plot(runs: Sequence[Result], references: dict[str, Result], path: Path) -> bool:
    """Test accuracy against wall time, one panel per updater; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    updaters = list(references)
    fig, axes = plt.subplots(1, len(updaters), figsize=(6 * len(updaters), 4.5), squeeze=False, sharey=True)
    for ax, updater in zip(axes[0], updaters):
        for r in [r for r in runs if r.updater == updater] + [references[updater]]:
            times, accs = zip(*r.curve)
            style = {"color": "black", "linestyle": "--"} if r.reference is None else {"marker": "."}
            label = r.mode if r.reference is not None else f"{r.mode}, mean of {len(r.run_accuracies)}"
            ax.plot(times, accs, label=f"{label} ({r.accuracy:.1%})", **style)
        ax.set_xscale("log")  # the single process finishes in a fraction of a job's time
        ax.set_title(f"updater {updater}", fontsize=10)
        ax.set_xlabel("wall time since training started (s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    lowest = min(a for r in [*runs, *references.values()] for _, a in r.curve)
    axes[0][0].set_ylim(max(0.0, lowest - 0.02), 1.0)
    axes[0][0].set_ylabel("test accuracy (after each epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(out: Path, runs: Sequence[Result], references: dict[str, Result], settings: dict[str, Any],
          notes: Sequence[str], quick: bool) -> None:
    """learning.json (every figure, the curves, the machine), learning.md and learning.png."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    mode = "quick" if quick else "full"
    data = {"mode": mode, "settings": settings, "machine": info,
            "single_process": {u: r.to_json() for u, r in references.items()},
            "runs": [r.to_json() for r in runs]}
    (out / "learning.json").write_text(json.dumps(data, indent=2) + "\n")
    title = f"# Learning benchmark ({mode}, {info['date']})"
    (out / "learning.md").write_text(f"{title}\n\n{markdown(runs, references, notes)}\n")
    if not plot(runs, references, out / "learning.png"):
        print(f"note: matplotlib is not installed; skipping {out}/learning.png")
