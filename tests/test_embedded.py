"""Embedded mode: `mv.init()` with nothing set up runs a whole job in this process (an
in-process scheduler and server, this process as worker 0 of 1), and the same script runs
unchanged under `multiverso-py run`."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import multiverso_py as mv

DTYPES = ["float32", "float64", "int32", "int64"]
SHAPES = [7, (3, 4), (2, 3, 5)]
BIG_ROWS = 3_000_000  # float32 elements: 12 MiB, more than one ~8 MiB partition on the one server


pytestmark = pytest.mark.usefixtures("no_scheduler_env")


def sample(shape: tuple[int, ...] | int, dtype: str, seed: int = 0) -> np.ndarray:
    """Small integer-valued data: exact in every table dtype, so sums compare exactly."""
    return np.random.default_rng(seed).integers(-50, 50, size=shape).astype(dtype)


# ------------------------------------------------------------------ the job


def test_embedded_job_is_worker_0_of_1(job: mv.Job) -> None:
    assert isinstance(job, mv.Job)
    assert mv.worker_id() == 0
    assert mv.workers_num() == 1
    assert mv.servers_num() == 1
    assert mv.is_master_worker() is True
    mv.barrier()  # a barrier of one worker returns at once
    mv.clock()


def test_context_manager_leaves_the_job(no_scheduler_env: None) -> None:
    with mv.init(timeout=20) as job:
        assert isinstance(job, mv.Job)
        table = mv.ArrayTable(3)
        table.add([1, 2, 3])
        np.testing.assert_array_equal(table.get(), [1, 2, 3])
    with pytest.raises(mv.NotInitialized):
        mv.worker_id()
    with pytest.raises(mv.NotInitialized):
        mv.ArrayTable(3)


def test_context_manager_leaves_the_job_on_error(no_scheduler_env: None) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with mv.init(timeout=20):
            raise RuntimeError("boom")
    with pytest.raises(mv.NotInitialized):
        mv.workers_num()


def test_shutdown_twice_is_safe_and_init_works_again(no_scheduler_env: None) -> None:
    mv.init(timeout=20)
    table = mv.ArrayTable(2)
    table.add([5, 6])
    mv.shutdown()
    mv.shutdown()
    with pytest.raises(mv.NotInitialized):
        mv.barrier()
    # A fresh job starts empty: tables of the old one are gone.
    with mv.init(timeout=20):
        fresh = mv.ArrayTable(2)
        np.testing.assert_array_equal(fresh.get(), [0, 0])


def test_second_init_without_shutdown_raises(job: mv.Job) -> None:
    table = mv.ArrayTable(4)
    with pytest.raises(mv.MultiversoError, match="shutdown"):
        mv.init()
    # The failed second init left the running job alone.
    table.add(np.ones(4))
    np.testing.assert_array_equal(table.get(), np.ones(4))
    assert mv.worker_id() == 0


# ------------------------------------------------------------------ ArrayTable


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"shape{s}")
def test_array_round_trip(job: mv.Job, shape: int | tuple[int, ...], dtype: str) -> None:
    table = mv.ArrayTable(shape, dtype)
    full = (shape,) if isinstance(shape, int) else shape
    first = table.get()
    assert first.shape == full and first.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(first, np.zeros(full, dtype))
    a, b = sample(full, dtype, 1), sample(full, dtype, 2)
    table.add(a)
    table.add(b.tolist())  # a list works as well as an array
    got = table.get()
    assert got.shape == full and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, a + b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"shape{s}")
def test_array_indexed_get_and_add_match_numpy(job: mv.Job, shape: int | tuple[int, ...], dtype: str) -> None:
    full = (shape,) if isinstance(shape, int) else shape
    size = int(np.prod(full))
    start = sample(full, dtype, 3)
    table = mv.ArrayTable(shape, dtype, init_value=start)
    reference = start.reshape(-1).copy()
    rng = np.random.default_rng(4)
    for _ in range(3):
        # Repeated indices, in no particular order: their deltas sum.
        index = rng.integers(0, size, size=2 * size)
        index[:3] = index[0]
        delta = sample(len(index), dtype, int(rng.integers(1000)))
        table.add(delta, index)
        np.add.at(reference, index, delta)
    np.testing.assert_array_equal(table.get(), reference.reshape(full))
    query = np.array([size - 1, 0, size // 2, 0, size - 1])
    got = table.get(query)
    assert got.shape == (len(query),) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, reference[query])


def test_array_safe_casts_are_accepted(job: mv.Job) -> None:
    table = mv.ArrayTable(3, "float32")
    table.add(np.array([1.5, 2.5, 3.5], np.float64))  # float64 -> float32 loses no kind
    table.add(np.array([1, 2, 3], np.int64))
    np.testing.assert_array_equal(table.get(), np.array([2.5, 4.5, 6.5], np.float32))


def test_big_array_indexed_ops_across_partitions(job: mv.Job) -> None:
    """A table bigger than one partition: indices in descending order span partitions."""
    table = mv.ArrayTable(BIG_ROWS, "float32")
    index = np.array([BIG_ROWS - 1, 5, BIG_ROWS // 2 + 1, 5, 0, BIG_ROWS - 1])
    delta = np.array([1, 2, 3, 4, 5, 6], np.float32)
    table.add(delta, index)
    reference = np.zeros(BIG_ROWS, np.float32)
    np.add.at(reference, index, delta)
    np.testing.assert_array_equal(table.get(index), reference[index])
    np.testing.assert_array_equal(table.get(), reference)


def test_big_array_sorted_indices_across_partitions(job: mv.Job) -> None:
    table = mv.ArrayTable(BIG_ROWS, "float32")
    index = np.array([0, 5, 5, BIG_ROWS // 2 + 1, BIG_ROWS - 1])
    table.add(np.array([1, 2, 3, 4, 5], np.float32), index)
    np.testing.assert_array_equal(table.get(index), [1, 5, 5, 4, 5])
    full = table.get()
    assert float(full.sum()) == 15.0
    assert full[BIG_ROWS - 1] == 5 and full[BIG_ROWS // 2 + 1] == 4


# ------------------------------------------------------------------ MatrixTable


@pytest.mark.parametrize("dtype", DTYPES)
def test_matrix_rows_with_duplicates_sum(job: mv.Job, dtype: str) -> None:
    table = mv.MatrixTable(6, 4, dtype)
    whole = sample((6, 4), dtype, 5)
    table.add(whole)
    rows = [4, 1, 4, 0, 4]
    delta = sample((len(rows), 4), dtype, 6)
    table.add(delta, rows)
    reference = whole.copy()
    np.add.at(reference, rows, delta)
    got = table.get()
    assert got.shape == (6, 4) and got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, reference)
    picked = table.get(row_ids=[5, 4, 0, 4])
    assert picked.shape == (4, 4)
    np.testing.assert_array_equal(picked, reference[[5, 4, 0, 4]])
    np.testing.assert_array_equal(table.get([2]), reference[[2]])


def test_matrix_init_value(job: mv.Job) -> None:
    start = np.arange(12, dtype=np.float64).reshape(3, 4)
    table = mv.MatrixTable(3, 4, "float64", init_value=start)
    np.testing.assert_array_equal(table.get(), start)
    table.add(np.ones((1, 4)), [2])
    np.testing.assert_array_equal(table.get([2, 0]), [start[2] + 1, start[0]])


def test_matrix_init_uniform(job: mv.Job) -> None:
    table = mv.MatrixTable(50, 20, init=("uniform", -0.5, 0.25))
    first, second = table.get(), table.get()
    assert first.shape == (50, 20) and first.dtype == np.float32
    assert first.min() >= -0.5 and first.max() <= 0.25
    assert first.std() > 0.05  # really random, not a constant
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(table.get([7, 3]), first[[7, 3]])


def test_matrix_init_normal(job: mv.Job) -> None:
    table = mv.MatrixTable(100, 50, "float64", init=("normal", 0.1))
    first, second = table.get(), table.get()
    assert first.shape == (100, 50) and first.dtype == np.float64
    assert abs(first.mean()) < 0.01
    assert 0.09 < first.std() < 0.11
    np.testing.assert_array_equal(first, second)


def test_matrix_init_zeros(job: mv.Job) -> None:
    table = mv.MatrixTable(2, 3, "int32", init="zeros")
    np.testing.assert_array_equal(table.get(), np.zeros((2, 3), np.int32))


def test_array_init_value_multidimensional(job: mv.Job) -> None:
    start = np.arange(24, dtype=np.int32).reshape(2, 3, 4)
    table = mv.ArrayTable((2, 3, 4), "int32", init_value=start)
    np.testing.assert_array_equal(table.get(), start)
    np.testing.assert_array_equal(table.get([23, 0]), [23, 0])


def test_same_name_is_the_same_table(job: mv.Job) -> None:
    first = mv.ArrayTable(4, name="shared")
    second = mv.ArrayTable(4, name="shared")
    first.add([1, 2, 3, 4])
    np.testing.assert_array_equal(second.get(), [1, 2, 3, 4])
    other = mv.ArrayTable(4)  # unnamed tables are distinct
    np.testing.assert_array_equal(other.get(), [0, 0, 0, 0])


# ------------------------------------------------------------------ async and ordering


def test_async_twins_return_futures(job: mv.Job) -> None:
    array = mv.ArrayTable(3, "int64")
    matrix = mv.MatrixTable(2, 2, "int64")
    add = array.add_async([1, 2, 3])
    assert isinstance(add, concurrent.futures.Future)
    add.result(timeout=20)
    got = array.get_async()
    assert isinstance(got, concurrent.futures.Future)
    np.testing.assert_array_equal(got.result(timeout=20), [1, 2, 3])
    np.testing.assert_array_equal(array.get_async([2, 0]).result(timeout=20), [3, 1])
    assert isinstance(array.add_async([1], [0]), concurrent.futures.Future)
    madd = matrix.add_async([[1, 1]], [1])
    assert isinstance(madd, concurrent.futures.Future)
    madd.result(timeout=20)
    mget = matrix.get_async([1])
    assert isinstance(mget, concurrent.futures.Future)
    np.testing.assert_array_equal(mget.result(timeout=20), [[1, 1]])
    np.testing.assert_array_equal(array.get(), [2, 2, 3])


def test_read_your_writes_after_many_async_adds(job: mv.Job) -> None:
    table = mv.ArrayTable(64, "int64")
    for i in range(300):
        table.add_async(np.full(64, i, np.int64))
    np.testing.assert_array_equal(table.get(), np.full(64, sum(range(300))))


def test_async_gets_see_exactly_the_adds_before_them(job: mv.Job) -> None:
    """Every get issued after k adds sees exactly k of them: one worker's operations on
    one table take effect in the order issued, async ones included."""
    table = mv.ArrayTable(16, "int64")
    gets = []
    for k in range(1, 101):
        table.add_async(np.ones(16, np.int64))
        gets.append(table.get_async([k % 16, 0]))
    for k, future in enumerate(gets, start=1):
        np.testing.assert_array_equal(future.result(timeout=20), [k, k], err_msg=f"get after {k} adds")


def test_matrix_row_adds_in_order(job: mv.Job) -> None:
    table = mv.MatrixTable(10, 3, "int64")
    gets = []
    for k in range(1, 51):
        table.add_async(np.ones((2, 3), np.int64), [k % 10, k % 10])
        gets.append(table.get_async())
    for k, future in enumerate(gets, start=1):
        got = future.result(timeout=20)
        assert int(got.sum()) == 6 * k, f"get after {k} adds"
    assert int(table.get([0])[0, 0]) == 10  # rows 0 got adds at k = 10, 20, ..., 50


# ------------------------------------------------------------------ same script, two ways

SCRIPT = textwrap.dedent(
    """
    import numpy as np

    import multiverso_py as mv

    with mv.init():
        table = mv.ArrayTable(100)
        matrix = mv.MatrixTable(5, 4)
        table.add(np.arange(100, dtype=np.float32))
        matrix.add(np.ones((2, 4), np.float32), [3, 3])
        mv.barrier()
        n = mv.workers_num()
        got = table.get()
        assert np.array_equal(got, np.arange(100) * n), got
        assert np.array_equal(matrix.get([3, 0]), [[2 * n] * 4, [0] * 4]), matrix.get()
        print(f"ok worker {mv.worker_id()} of {n}, {mv.servers_num()} server(s)", flush=True)
    """
)


def script_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MV_")}


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.timeout(90)
def test_script_runs_embedded(script: Path) -> None:
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                            env=script_env(), stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == ["ok worker 0 of 1, 1 server(s)"], result.stdout + result.stderr


@pytest.mark.timeout(90)
def test_same_script_runs_under_launcher(script: Path) -> None:
    cmd = [sys.executable, "-m", "multiverso_py", "--log-level", "warning", "run", "--workers", "1",
           "--servers", "1", "--", sys.executable, str(script)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=script_env(),
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[worker 0] ok worker 0 of 1, 1 server(s)" in result.stdout.splitlines(), result.stdout + result.stderr


def test_get_into_out_reuses_the_callers_array(job: mv.Job) -> None:
    table = mv.MatrixTable(6, 3, dtype="float64", name="out", init_value=np.arange(18.0).reshape(6, 3))
    whole = np.empty((6, 3))
    assert table.get(out=whole) is whole
    np.testing.assert_array_equal(whole, np.arange(18.0).reshape(6, 3))
    rows = np.full((2, 3), -1.0)
    assert table.get([5, 1], out=rows) is rows
    np.testing.assert_array_equal(rows, [[15, 16, 17], [3, 4, 5]])
    vector = mv.ArrayTable((2, 4), dtype="int32", name="out_vec", init_value=np.arange(8).reshape(2, 4))
    flat = np.zeros((2, 4), np.int32)
    assert vector.get_async(out=flat).result() is flat
    np.testing.assert_array_equal(flat, np.arange(8).reshape(2, 4))
    # The wrong dtype, shape or layout is refused before anything is sent.
    for bad in (np.empty((6, 3), np.float32), np.empty((3, 6)), np.empty((3, 6)).T, [[0.0] * 3] * 6):
        with pytest.raises(mv.InvalidArgument, match="out="):
            table.get(out=bad)


# ------------------------------------------------------------------ the in-process path


def test_embedded_worker_reaches_its_server_without_a_socket(job: mv.Job) -> None:
    from multiverso_py.local import LocalConnection

    assert all(isinstance(conn, LocalConnection) for conn in job.client._conns.values())


def test_in_process_results_are_copies_not_views_of_the_partition(job: mv.Job) -> None:
    """The reply's arrays are the partition's memory: the result must still be a copy."""
    dense = mv.MatrixTable(BIG_ROWS // 4, 4, name="copies")
    kv = mv.KVTable(dim=3, name="copies-kv")
    sparse = mv.SparseMatrixTable(50, 2, name="copies-sparse")
    dense.add(np.ones((BIG_ROWS // 4, 4), np.float32))
    rows = dense.get([5, 7])
    whole = dense.get()
    keys = kv.get([1, 2])
    sparse.add(np.ones((2, 2)), [3, 4])
    cached = sparse.get([3, 4])
    dense.add(np.ones((BIG_ROWS // 4, 4), np.float32))
    kv.add([1, 2], np.ones((2, 3)))
    sparse.add(np.ones((2, 2)), [3, 4])
    assert (rows == 1).all() and (whole == 1).all() and (keys == 0).all() and (cached == 1).all()
    np.testing.assert_array_equal(dense.get([5]), [[2, 2, 2, 2]])
    np.testing.assert_array_equal(sparse.get([3, 4]), np.full((2, 2), 2))
