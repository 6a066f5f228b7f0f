"""Multiverso's own binding scenarios (its Python test_multiverso.py), run the way a user
runs a job: real scheduler, server and worker processes started by `multiverso-py run`.

Every worker runs the same script; it checks the shared tables after each round and exits
non-zero on the first mismatch, so the launcher's exit status tells whether all workers
saw what they should.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from multiverso_py import testing

RUN_TIMEOUT = 90.0  # seconds for a whole job; it normally takes a few

# The worker script. Values stay below 2**24 so float32 sums are exact.
WORKER_SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np

    import multiverso_py as mv

    ROUNDS = 3


    def fail(message: str) -> None:
        raise SystemExit(f"MISMATCH worker {mv.worker_id()}: {message}")


    def check_equal(got, expected, what: str) -> None:
        got = np.asarray(got)
        if got.shape != expected.shape:
            fail(f"{what}: shape {got.shape}, expected {expected.shape}")
        bad = np.argwhere(got != expected)
        if len(bad):
            at = tuple(int(i) for i in bad[0])
            fail(f"{what}: {len(bad)} wrong value(s), first at {at}: {got[at]} != {expected[at]}")


    def array_scenario(size: int) -> None:
        # Multiverso's TestArray: every worker adds 1..size twice per round.
        table = mv.ArrayTable(size)
        n = mv.workers_num()
        delta = np.arange(1, size + 1, dtype=np.float32)
        for r in range(ROUNDS):
            table.add(delta)
            table.add(delta)
            mv.barrier()
            check_equal(table.get(), delta * (r + 1) * 2 * n, f"array[{size}] round {r}")
            mv.barrier()  # nobody adds for the next round before everyone checked this one


    def matrix_scenario() -> None:
        # Multiverso's TestMatrix: whole-table adds of ones plus row adds on rows 0, 1, 5, 10.
        # Rows start distinct (init_value) so that a row returned in the wrong order shows.
        num_rows, num_cols = 11, 10
        base = (np.arange(num_rows)[:, None] * 100 + np.arange(num_cols)[None, :]).astype(np.float32)
        table = mv.MatrixTable(num_rows, num_cols, init_value=base)
        n = mv.workers_num()
        row_ids = [0, 1, 5, 10]
        per_round = np.ones((num_rows, num_cols), np.float32)
        per_round[row_ids] += 1
        for r in range(ROUNDS):
            table.add(np.ones((num_rows, num_cols), np.float32))
            table.add(np.ones((len(row_ids), num_cols), np.float32), row_ids)
            mv.barrier()
            expected = base + per_round * (r + 1) * n
            check_equal(table.get(), expected, f"matrix round {r}")
            check_equal(table.get(row_ids=[0, 5, 10]), expected[[0, 5, 10]], f"matrix rows [0, 5, 10] round {r}")
            check_equal(table.get([10, 0]), expected[[10, 0]], f"matrix rows [10, 0] round {r}")
            mv.barrier()


    def main() -> None:
        mv.init()
        workers = mv.workers_num()  # the job's size; later it counts the workers still in it
        try:
            array_scenario(10_000)
            array_scenario(1)  # fewer elements than servers: some servers hold nothing
            matrix_scenario()
            mv.barrier()
            print(f"worker {mv.worker_id()} of {workers} on {mv.servers_num()} server(s): ok", flush=True)
        finally:
            mv.shutdown()
        print("ok", flush=True)


    main()
    """
)



@pytest.fixture(scope="module")
def worker_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scenarios") / "scenario_worker.py"
    path.write_text(WORKER_SCRIPT)
    return path


@pytest.mark.timeout(120)
@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("workers", [1, 2, 3])
def test_multiverso_scenarios(worker_script: Path, workers: int, servers: int) -> None:
    result = testing.run_job(str(worker_script), workers, servers, timeout=RUN_TIMEOUT)
    report = testing.job_report(result)
    assert result.returncode == 0, report
    assert "MISMATCH" not in result.stdout, report
    lines = result.stdout.splitlines()
    for i in range(workers):
        # Each worker ran to the end, on a job of the requested size, with its own id.
        assert f"[worker {i}] ok" in lines, report
        assert f"[worker {i}] worker {i} of {workers} on {servers} server(s): ok" in lines, report
    assert not any(line.startswith(f"[worker {workers}]") for line in lines), report


@pytest.mark.timeout(120)
def test_scenario_failure_is_reported(tmp_path: Path) -> None:
    """The checks above can fail: a worker that sees a wrong value makes the job exit
    non-zero and says what it saw (here worker 1 expects one add too many)."""
    broken = WORKER_SCRIPT.replace(
        "check_equal(table.get(), delta * (r + 1) * 2 * n,",
        "check_equal(table.get(), delta * (r + 1) * 2 * (n + mv.worker_id()),",
    )
    assert broken != WORKER_SCRIPT
    script = tmp_path / "broken_worker.py"
    script.write_text(broken)
    result = testing.run_job(str(script), workers=2, servers=1, timeout=RUN_TIMEOUT)
    report = testing.job_report(result)
    assert result.returncode != 0, report
    assert "MISMATCH worker 1: array[10000] round 0" in result.stdout + result.stderr, report
    assert "[worker 1] ok" not in result.stdout.splitlines(), report
