"""Reporting shared by the benchmarks: a workload next to its limit (Row), the markdown
table, machine facts, the ratio plot, and the JSON + markdown + PNG result files."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import multiverso_py as mv

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One workload next to the limit it is judged against; ratio is value / limit."""

    key: str
    workload: str
    value: float
    unit: str
    limit_name: str
    limit: float  # nan when the limit could not be measured (a skipped peer)
    limit_unit: str = ""  # when it differs from unit
    lower_is_better: bool = False
    target: float | None = None  # a ratio to reach (>=), or not exceed when lower is better
    samples: list[float] = field(default_factory=list)  # per-round values, for the noise figure
    limit_key: str = ""  # the limit's key in benchmarks.limits.measure_all(), if it is one of them
    target_value: float | None = None  # an absolute value to reach, in unit

    @property
    def ratio(self) -> float:
        return self.value / self.limit if self.limit else float("nan")

    @property
    def noise(self) -> float | None:
        """(max - min) / median of the per-round values: how much to trust one figure."""
        if len(self.samples) < 2:
            return None
        return (max(self.samples) - min(self.samples)) / statistics.median(self.samples)

    @property
    def verdict(self) -> str | None:
        if self.target is None and self.target_value is None:
            return None
        checks = []
        if self.target is not None:
            if math.isnan(self.ratio):
                return "n/a"  # judged against a limit that was not measured
            checks.append(self.ratio <= self.target if self.lower_is_better else self.ratio >= self.target)
        if self.target_value is not None:
            checks.append(self.value <= self.target_value if self.lower_is_better else self.value >= self.target_value)
        return "PASS" if all(checks) else "MISS"


def rebase(rows: list[Row], limits: dict[str, float]) -> None:
    """Judge every row that has a raw limit against these limits (the best of several
    measurements); rows judged against a peer or another workload keep theirs."""
    for row in rows:
        if row.limit_key in limits:
            row.limit = limits[row.limit_key]


def fmt(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    return f"{value:,.0f} {unit}"


def markdown(rows: list[Row], notes: Sequence[str] = ()) -> str:
    lines = ["| workload | value | limit | ratio | spread | target |", "|---|---|---|---|---|---|"]
    for r in rows:
        noise = "" if r.noise is None else f"{r.noise:.0%}"
        sign = "≤" if r.lower_is_better else "≥"
        goals = ([f"{sign}{r.target:.2f}×"] if r.target is not None else []) + \
                ([f"{sign}{fmt(r.target_value, r.unit)}"] if r.target_value is not None else [])
        target = f"{' and '.join(goals)} {r.verdict}" if goals else ""
        ratio = "n/a" if math.isnan(r.ratio) else f"{r.ratio:.2f}×"
        limit = f"{r.limit_name} {fmt(r.limit, r.limit_unit or r.unit)}"
        lines.append(f"| {r.workload} | {fmt(r.value, r.unit)} | {limit} | {ratio} | {noise} | {target} |")
    lines.append("")
    lines.append("ratio = value / limit (for latencies, lower is better); spread = (max - min) / median "
                 "over the timed rounds.")
    lines.extend(notes)
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import msgpack
    import uvloop

    cpu_model = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,  # other load skews all
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "uvloop": uvloop.__version__,
        "msgpack": ".".join(map(str, msgpack.version)),
        "multiverso_py": mv.__version__,
    }


def plot(rows: list[Row], path: Path) -> bool:
    """A bar chart of ratios to limits, latencies in a panel of their own; False when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in rows if not math.isnan(r.ratio)]
    groups = [(g, title) for g, title in (([r for r in rows if not r.lower_is_better], "× limit (higher is better)"),
                                          ([r for r in rows if r.lower_is_better], "× limit (lower is better)")) if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(12, 4.5), squeeze=False,
                             gridspec_kw={"width_ratios": [max(len(g), 3) for g, _ in groups]})
    for ax, (group, title) in zip(axes[0], groups):
        ax.bar(range(len(group)), [r.ratio for r in group], color="tab:blue")
        ax.set_xticks(range(len(group)), [r.workload for r in group], rotation=30, ha="right", fontsize=8)
        ax.axhline(1.0, color="gray", linestyle="--", linewidth=1)
        for i, r in enumerate(group):
            ax.annotate(f"{r.ratio:.2f}×", (i, r.ratio), ha="center", va="bottom", fontsize=8)
        targets = [(i, r.target) for i, r in enumerate(group) if r.target is not None]
        for n, (i, target) in enumerate(targets):
            ax.hlines(target, i - 0.4, i + 0.4, color="tab:red", linewidth=2, label="target" if n == 0 else None)
        ratios = [r.ratio for r in group if r.ratio > 0]
        if ratios and max(ratios) > 20 * min(ratios):  # one peer far behind would flatten every other bar
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        if targets:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(name: str, title: str, rows: list[Row], limits: dict[str, float], quick: bool,
                  sizes: dict[str, Any], notes: Sequence[str] = (), extra: dict[str, Any] | None = None,
                  out: Path = RESULTS, plot_fn: Callable[[list[Row], Path], bool] = plot) -> None:
    """<name>.json (raw numbers and machine), <name>.md (the table) and <name>.png (if possible,
    drawn by plot_fn: by default the ratio bars)."""
    out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    data: dict[str, Any] = {
        "mode": "quick" if quick else "full",
        "sizes": sizes,
        "machine": info,
        "limits": limits,
        "workloads": {r.key: {**asdict(r), "ratio": r.ratio, "noise": r.noise, "verdict": r.verdict} for r in rows},
        **(extra or {}),
    }
    (out / f"{name}.json").write_text(json.dumps(_no_nan(data), indent=2, ensure_ascii=False) + "\n")
    (out / f"{name}.md").write_text(f"# {title} ({data['mode']}, {info['date']})\n\n{markdown(rows, notes)}\n")
    if not plot_fn(rows, out / f"{name}.png"):
        print(f"note: matplotlib is not installed; skipping benchmarks/results/{name}.png")


def _no_nan(value: Any) -> Any:
    """JSON has no NaN: an unmeasured figure becomes null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_nan(v) for v in value]
    return value
