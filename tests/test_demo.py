"""`multiverso-py demo` end to end (real launcher, scheduler, servers and workers), and
its progress display fed with event lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from multiverso_py.demo import EVENT, Progress

torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")


def run_demo(*args: str, timeout: float = 100.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MV_")}
    return subprocess.run([sys.executable, "-m", "multiverso_py", "demo", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.mark.timeout(120)
def test_demo_trains_the_digits_cnn(tmp_path: Path) -> None:
    from multiverso_py.digits import DigitsCNN, evaluate, load_digits

    out = tmp_path / "demo"
    result = run_demo("--epochs", "5", "--workers", "2", "--servers", "2", "--out", str(out))
    report = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9, report
    assert summary["workers"] == 2 and summary["servers"] == 2, report
    assert f"test accuracy  {summary['test_accuracy']:.2%}" in result.stdout, report
    assert "samples/s" in result.stdout and str(out / "digits_cnn.pt") in result.stdout, report
    assert "[#" in result.stdout, report  # the progress bar, one line per epoch when not on a terminal
    assert len(summary["epoch_test_accuracy"]) == 5, report
    # The checkpoint holds the final weights: they score what the demo reported.
    checkpoint = torch.load(out / "digits_cnn.pt")
    model = DigitsCNN()
    model.load_state_dict(checkpoint["model"])
    data = load_digits()
    assert evaluate(model, data.x_test, data.y_test)[1] == pytest.approx(summary["test_accuracy"])
    assert checkpoint["optimizer"]["ps"][0]["updater"] == "adam"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in result.stdout, report
    else:
        assert (out / "training.png").stat().st_size > 0, report


def test_demo_refuses_a_bad_updater_before_starting_anything(tmp_path: Path) -> None:
    result = run_demo("--updater", "nosuch", "--out", str(tmp_path / "x"), timeout=30)
    assert result.returncode == 2
    assert "unknown updater 'nosuch'" in result.stdout
    assert not (tmp_path / "x").exists()


def event(kind: str, worker: int, **fields) -> str:
    return f"[worker {worker}] {EVENT}{json.dumps({'ev': kind, 'worker': worker, **fields})}\n"


def test_progress_turns_events_into_one_bar() -> None:
    out = io.StringIO()
    progress = Progress(out)  # not a terminal: a line per epoch
    progress.write(event("start", 0, samples=100, steps=10))
    progress.write(event("start", 1, samples=100, steps=10))
    progress.write("[worker 1] some warning\n")
    progress.write(event("step", 0, samples=50, loss=0.5) + event("step", 1, samples=30, loss=0.7))
    progress.write(event("epoch", 0, epoch=1, test_loss=0.3, test_accuracy=0.9))
    progress.write(event("done", 0, samples=100, seconds=2.0) + event("done", 1, samples=100, seconds=4.0))
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "[worker 1] some warning"
    assert " 40%  80/200  loss 0.600" in lines[1] and "epoch 1: test acc 90.0%" in lines[1]
    assert len(lines) == 2  # events draw nothing else off a terminal
    assert progress.samples_per_second() == pytest.approx(200 / 4.0)


def test_progress_redraws_in_place_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    progress = Progress(out)
    progress.write(event("start", 0, samples=10, steps=1))
    progress.write(event("step", 0, samples=5, loss=1.0))
    progress.write("[worker 0] a line\n")
    progress.close()
    text = out.getvalue()
    assert text.count("\r[") >= 3 and " 50%  5/10  loss 1.000" in text
    assert "\r\x1b[K[worker 0] a line\n" in text  # the bar is cleared before a line, then redrawn
    assert text.endswith("\n")
