"""The learning benchmark end to end on a tiny configuration: a real job (launcher,
scheduler, a server, two worker processes) must learn the digits well above chance."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(60)
def test_tiny_learning_run_learns_digits(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.learning", "--updaters", "add", "--modes", "async", "--workers", "2",
           "--servers", "1", "--epochs", "2", "--results", str(tmp_path)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    report = json.loads((tmp_path / "learning.json").read_text())
    (run,) = report["runs"]
    reference = report["single_process"]["add"]
    assert run["accuracy"] >= 0.85, run  # chance is 0.10
    assert reference["accuracy"] >= 0.85, reference
    assert len(run["curve"]) == 2 and run["job_s"] > run["train_s"] > 0
    assert "| async | add |" in (tmp_path / "learning.md").read_text()
    assert (tmp_path / "learning.png").stat().st_size > 0
