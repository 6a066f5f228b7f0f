"""How a worker's calls become messages: small add_async calls to one table share a batch
(one message, one Future), anything else on that table closes the batch so that one
table's calls take effect in the order issued, and big requests travel in bounded chunks.

Deltas are integer-valued throughout, so every sum is exact in every dtype and results
compare with ==.
"""

from __future__ import annotations

import math
import textwrap
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py import testing
from multiverso_py.testing import LocalCluster

RUN_TIMEOUT = 90.0  # seconds for a whole multi-process job; it normally takes two or three
MESSAGE_LIMIT = 9 << 20  # messages are grouped to about 8 MiB; allow headers and rounding
BIG_ROWS = 300_000  # x 16 float32 columns: 19.2 MB of values in one call

Table = mv.ArrayTable | mv.MatrixTable  # SparseMatrixTable is a MatrixTable

pytestmark = pytest.mark.usefixtures("no_scheduler_env")


def batched_adds() -> int:
    return mv.api._job.client.batched_adds


def requests(table: Table) -> int:
    return table.stats()["requests"]


# ------------------------------------------------------------------ many small adds


@pytest.mark.parametrize("dtype", ["int32", "float32"])
def test_many_small_adds_sum_exactly(job: mv.Job, dtype: str) -> None:
    """Whole-table and indexed deltas, issued back to back, so that batches hold both."""
    table = mv.ArrayTable(16, dtype)
    rng = np.random.default_rng(1)
    expected = np.zeros(16, np.int64)
    for i in range(5000):
        if i % 3 == 0:
            indices = rng.integers(0, 16, 3)  # repeats are frequent: they must sum
            delta = rng.integers(-5, 6, 3)
            np.add.at(expected, indices, delta)
            table.add_async(delta.astype(dtype), indices)
        else:
            delta = rng.integers(-5, 6, 16)
            expected += delta
            table.add_async(delta.astype(dtype))
    np.testing.assert_array_equal(table.get(), expected.astype(dtype))


def test_whole_then_indexed_add_in_one_batch(job: mv.Job) -> None:
    """The smallest case of the above: two adds to one partition that share a message."""
    table = mv.ArrayTable(4, "int64")
    first = table.add_async(np.ones(4, np.int64))
    second = table.add_async([10], [2])
    mv.barrier()
    assert first.result() is None and second.result() is None
    np.testing.assert_array_equal(table.get(), [1, 1, 11, 1])

    matrix = mv.MatrixTable(4, 2, "int64")
    matrix.add_async(np.ones((4, 2), np.int64))
    matrix.add_async([[10, 20]], [2])
    np.testing.assert_array_equal(matrix.get(), [[1, 1], [1, 1], [11, 21], [1, 1]])


@pytest.mark.parametrize("indexed", [False, True], ids=["whole", "indexed"])
def test_back_to_back_adds_share_a_future(job: mv.Job, indexed: bool) -> None:
    table = mv.ArrayTable(16, "int32")
    before = batched_adds()
    count = 2000
    futures: list[Future] = []
    for _ in range(count):
        futures.append(table.add_async([1, 1], [3, 3]) if indexed else table.add_async(np.ones(16, np.int32)))
    expected = np.zeros(16, np.int32)
    if indexed:
        expected[3] = 2 * count
    else:
        expected[:] = count
    np.testing.assert_array_equal(table.get(), expected)
    # Issued faster than the I/O thread takes them, adds join open batches: far fewer
    # futures (and messages) than calls.
    distinct = len({id(f) for f in futures})
    assert distinct < count // 2, f"{distinct} futures for {count} adds"
    assert requests(table) < count // 2
    assert count // 2 < batched_adds() - before <= count
    assert all(f.done() and f.exception() is None for f in futures)


# ------------------------------------------------------------------ ordering


def test_read_your_writes_between_async_adds(job: mv.Job) -> None:
    """Every get sees exactly the adds issued before it, however the adds were batched."""
    table = mv.ArrayTable(16, "int64")
    rng = np.random.default_rng(2)
    expected = np.zeros(16, np.int64)
    gets: list[tuple[Future, np.ndarray]] = []
    for i in range(3000):
        # Whole-table deltas only: batches mixing them with indexed adds lose adds, which
        # test_whole_then_indexed_add_in_one_batch shows on its own.
        delta = rng.integers(-5, 6, 16)
        expected += delta
        table.add_async(delta)
        if rng.random() < 0.15:
            gets.append((table.get_async(), expected.copy()))
        if i % 500 == 0:
            gets.append((table.get_async([0, 15, 0]), expected[[0, 15, 0]].copy()))
    for k, (future, wanted) in enumerate(gets):
        np.testing.assert_array_equal(future.result(timeout=20), wanted, err_msg=f"get #{k}")


def test_two_tables_interleaved_stay_consistent(job: mv.Job) -> None:
    """Calls on one table do not reorder those of another; each table sees its own adds
    in order, whatever happens on the other."""
    vector = mv.ArrayTable(8, "int64")
    matrix = mv.MatrixTable(10, 3, "int64")
    rng = np.random.default_rng(3)
    want_vector = np.zeros(8, np.int64)
    want_matrix = np.zeros((10, 3), np.int64)
    gets: list[tuple[str, Future, np.ndarray]] = []
    for _ in range(3000):
        choice = rng.integers(0, 6)
        if choice <= 1:
            delta = rng.integers(-3, 4, 8)
            want_vector += delta
            vector.add_async(delta)
        elif choice <= 3:
            rows = rng.integers(0, 10, 4)
            delta = rng.integers(-3, 4, (4, 3))
            np.add.at(want_matrix, rows, delta)
            matrix.add_async(delta, rows)
        elif choice == 4:
            gets.append(("vector", vector.get_async(), want_vector.copy()))
        else:
            gets.append(("matrix", matrix.get_async(), want_matrix.copy()))
    for k, (what, future, wanted) in enumerate(gets):
        np.testing.assert_array_equal(future.result(timeout=20), wanted, err_msg=f"get #{k} of {what}")
    np.testing.assert_array_equal(vector.get(), want_vector)
    np.testing.assert_array_equal(matrix.get(), want_matrix)


def test_big_add_between_small_ones_keeps_order(job: mv.Job) -> None:
    size = 1 << 17  # int64: a whole-table delta is 1 MiB, far above the batch size
    table = mv.ArrayTable(size, "int64")
    rng = np.random.default_rng(4)
    expected = np.zeros(size, np.int64)
    gets: list[tuple[Future, np.ndarray]] = []

    def small() -> Future:
        indices = rng.integers(0, size, 4)
        delta = rng.integers(-9, 10, 4)
        np.add.at(expected, indices, delta)
        return table.add_async(delta, indices)

    for round_ in range(4):
        before = [small() for _ in range(50)]
        gets.append((table.get_async(), expected.copy()))
        big_delta = rng.integers(-9, 10, size)
        expected += big_delta
        big = table.add_async(big_delta)
        gets.append((table.get_async(), expected.copy()))
        after = [small() for _ in range(50)]
        gets.append((table.get_async(), expected.copy()))
        # The big add travels alone; the small ones after it start a new batch.
        assert big not in before and big not in after
        assert not set(before) & set(after), f"round {round_}: a batch spans the big add"
    for k, (future, wanted) in enumerate(gets):
        np.testing.assert_array_equal(future.result(timeout=20), wanted, err_msg=f"get #{k}")


def test_barrier_waits_for_every_async_add(job: mv.Job) -> None:
    """Small batched adds around big ones (12.8 MB each, slow for the server to apply):
    the barrier itself answers at once, so only waiting for the adds makes this pass."""
    table = mv.MatrixTable(200_000, 16, "float32")
    big = np.ones((200_000, 16), np.float32)
    futures: list[Future] = []
    for i in range(3000):
        futures.append(table.add_async(np.ones((2, 16), np.float32), [i % 32, (7 * i) % 32]))
        if i % 1000 == 0:
            futures.append(table.add_async(big))
    futures += [table.add_async(big) for _ in range(3)]  # still on their way when the barrier starts
    mv.barrier()
    assert all(f.done() for f in futures), "barrier() returned before every add was acknowledged"
    assert all(f.exception() is None for f in futures)
    expected = np.full((200_000, 16), 6, np.float32)
    np.add.at(expected, [r for i in range(3000) for r in (i % 32, (7 * i) % 32)], 1)
    np.testing.assert_array_equal(table.get(), expected)


def test_failed_batched_add_surfaces_at_barrier(no_scheduler_env: None) -> None:
    """No delta that passes the worker's checks is refused by a server, so the failure
    here is a lost server: the batched adds nobody waited on must fail barrier()."""
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=5):
        table = mv.ArrayTable(16, "float32", name="orphaned")
        table.add(np.ones(16, np.float32))
        cluster.kill_server(0)
        futures = [table.add_async(np.ones(16, np.float32)) for _ in range(200)]
        with pytest.raises(mv.MultiversoError) as info:
            mv.barrier()
        assert isinstance(info.value, (mv.ConnectionLost, mv.RequestTimeout)), repr(info.value)
        assert "add on table 'orphaned'" in str(info.value), str(info.value)
        assert all(f.done() and f.exception() is not None for f in futures)


# ------------------------------------------------------------------ big requests in chunks


def messages(table: Table, before: dict, direction: str) -> tuple[int, int]:
    """(messages, payload bytes in `direction`, "sent" or "received") since `before`."""
    after = table.stats()
    return after["requests"] - before["requests"], after[f"bytes_{direction}"] - before[f"bytes_{direction}"]


def unbounded(counts: dict[str, tuple[int, int]]) -> dict[str, str]:
    """The calls that did not go as several bounded messages to the one server."""
    return {what: f"{sent} message(s) for {payload} bytes" for what, (sent, payload) in counts.items()
            if sent < max(2, math.ceil(payload / MESSAGE_LIMIT))}


@pytest.mark.parametrize("kind", ["matrix", "sparse"])
def test_big_row_add_is_split(job: mv.Job, kind: str) -> None:
    """A 1000-row table is one partition; 300,000 repeated row ids make one 21.6 MB part."""
    cls = mv.MatrixTable if kind == "matrix" else mv.SparseMatrixTable
    table = cls(1000, 16, "float32")
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 1000, BIG_ROWS)
    delta = rng.integers(-3, 4, (BIG_ROWS, 16)).astype(np.float32)
    delta[:, 0] = 1  # no zero rows: every row travels
    before = table.stats()
    table.add(delta, rows)
    counts = {"add": messages(table, before, "sent")}
    assert counts["add"][1] >= delta.nbytes
    expected = np.zeros((1000, 16), np.float64)
    np.add.at(expected, rows, delta.astype(np.float64))
    np.testing.assert_array_equal(table.get(), expected.astype(np.float32))
    assert unbounded(counts) == {}


def test_big_row_get_is_split(job: mv.Job) -> None:
    """The reply to a get of 300,000 row ids of that table (19.2 MB) must not be one
    message either."""
    values = np.arange(1000 * 16, dtype=np.float32).reshape(1000, 16)
    table = mv.MatrixTable(1000, 16, "float32", init_value=values)
    rows = np.random.default_rng(6).integers(0, 1000, BIG_ROWS)
    before = table.stats()
    np.testing.assert_array_equal(table.get(rows), values[rows])
    counts = {"get rows": messages(table, before, "received")}
    assert counts["get rows"][1] >= BIG_ROWS * 16 * 4
    assert unbounded(counts) == {}


@pytest.mark.parametrize("kind", ["matrix", "sparse"])
def test_big_table_row_add_and_get_are_split(job: mv.Job, kind: str) -> None:
    """300,000 distinct rows of a 300,000-row table (three partitions): a row-id add, a
    row-id get and a whole get each move 19.2 MB or more."""
    cls = mv.MatrixTable if kind == "matrix" else mv.SparseMatrixTable
    table = cls(BIG_ROWS, 16, "float32")
    rows = np.random.default_rng(7).permutation(BIG_ROWS)
    delta = (rows[:, None] % 7 + 1 + np.arange(16)[None, :]).astype(np.float32)
    expected = np.empty((BIG_ROWS, 16), np.float32)
    expected[rows] = delta
    counts: dict[str, tuple[int, int]] = {}

    before = table.stats()
    table.add(delta, rows)
    counts["add rows"] = messages(table, before, "sent")

    before = table.stats()
    np.testing.assert_array_equal(table.get(rows), expected[rows])
    counts["get rows"] = messages(table, before, "received")

    table.add(np.ones((BIG_ROWS, 16), np.float32))  # every row changes: a sparse get moves all again
    expected += 1
    before = table.stats()
    np.testing.assert_array_equal(table.get(), expected)
    counts["get all"] = messages(table, before, "received")

    assert all(payload >= expected.nbytes for _, payload in counts.values()), counts
    assert unbounded(counts) == {}


# ------------------------------------------------------------------ several worker processes

# Every worker issues random add_async calls on four tables, interleaved, from a seed of its
# own; each can replay every worker's calls, so after a barrier each checks that every table
# holds exactly the sum of all workers' adds. Deltas are int64 or integer-valued float64.
MULTI_WORKER_SCRIPT = textwrap.dedent(
    """
    import numpy as np

    import multiverso_py as mv

    SEED = 20240601
    STEPS = 600
    ARRAY_SIZE = 50
    M_ROWS, M_COLS = 40, 6
    S_ROWS, S_COLS = 40, 5
    KV_DIM = 3
    EXTREME_KEYS = [-(2 ** 63), 2 ** 63 - 1, -1, 0, 1, -7]


    def calls(worker, key_pool):
        # The add_async calls of one worker, as (table, args) in issue order.
        rng = np.random.default_rng([SEED, worker])
        out = []
        for _ in range(STEPS):
            which = rng.integers(0, 4)
            if which == 0:
                if rng.random() < 0.5:
                    out.append(("array", (rng.integers(-5, 6, ARRAY_SIZE),)))
                else:
                    n = rng.integers(1, 6)
                    out.append(("array", (rng.integers(-5, 6, n), rng.integers(0, ARRAY_SIZE, n))))
            elif which == 1:
                n = rng.integers(1, 6)
                rows = rng.integers(0, M_ROWS, n)
                rows[-1] = rows[0]  # always a repeated row
                out.append(("matrix", (rng.integers(-5, 6, (n, M_COLS)), rows)))
            elif which == 2:
                if rng.random() < 0.2:
                    delta = np.zeros((S_ROWS, S_COLS))
                    hot = rng.integers(0, S_ROWS, 3)
                    delta[hot] = rng.integers(-5, 6, (3, S_COLS))
                    out.append(("sparse", (delta,)))
                else:
                    n = rng.integers(1, 6)
                    out.append(("sparse", (rng.integers(-5, 6, (n, S_COLS)).astype(np.float64),
                                           rng.integers(0, S_ROWS, n))))
            else:
                n = rng.integers(1, 8)
                keys = rng.choice(key_pool, n)  # repeats within a call and across workers
                out.append(("kv", (keys, rng.integers(-5, 6, (n, KV_DIM)))))
        return out


    def reference(workers, key_pool):
        array = np.zeros(ARRAY_SIZE, np.int64)
        matrix = np.zeros((M_ROWS, M_COLS), np.int64)
        sparse = np.zeros((S_ROWS, S_COLS), np.float64)
        kv = {}
        for worker in range(workers):
            for table, args in calls(worker, key_pool):
                if table == "array":
                    if len(args) == 1:
                        array += args[0]
                    else:
                        np.add.at(array, args[1], args[0])
                elif table == "matrix":
                    np.add.at(matrix, args[1], args[0])
                elif table == "sparse":
                    if len(args) == 1:
                        sparse += args[0]
                    else:
                        np.add.at(sparse, args[1], args[0])
                else:
                    for key, row in zip(args[0].tolist(), args[1]):
                        kv[key] = kv.get(key, 0) + row
        return array, matrix, sparse, kv


    def main():
        mv.init()
        try:
            me, workers = mv.worker_id(), mv.workers_num()
            drawn = np.random.default_rng(SEED).integers(-(2 ** 63), 2 ** 63 - 1, 40, dtype=np.int64)
            key_pool = np.concatenate([np.array(EXTREME_KEYS, np.int64), drawn])
            tables = {
                "array": mv.ArrayTable(ARRAY_SIZE, "int64", name="array"),
                "matrix": mv.MatrixTable(M_ROWS, M_COLS, "int64", name="matrix"),
                "sparse": mv.SparseMatrixTable(S_ROWS, S_COLS, "float64", name="sparse"),
                "kv": mv.KVTable(KV_DIM, "int64", name="kv"),
            }
            tables["sparse"].get()  # a warm cache: the final get must still bring every change
            mv.barrier()
            for table, args in calls(me, key_pool):
                tables[table].add_async(*args)  # nobody waits: the barrier must
            mv.barrier()

            array, matrix, sparse, kv = reference(workers, key_pool)
            keys = np.array(sorted(kv), np.int64)
            got = {
                "array": (tables["array"].get(), array),
                "matrix": (tables["matrix"].get(), matrix),
                "sparse": (tables["sparse"].get(), sparse),
                "kv": (tables["kv"].get(keys), np.array([kv[k] for k in keys.tolist()], np.int64)),
            }
            bad = 0
            for name, (value, expected) in got.items():
                wrong = np.argwhere(np.asarray(value) != expected)
                if value.shape != expected.shape or len(wrong):
                    bad += 1
                    at = tuple(int(i) for i in wrong[0]) if len(wrong) else None
                    print(f"MISMATCH {name}: {len(wrong)} wrong value(s), first at {at}", flush=True)
                else:
                    print(f"CHECK {name} ok", flush=True)
            count = len(tables["kv"])
            if count != len(kv):
                bad += 1
                print(f"MISMATCH kv length: {count} keys, expected {len(kv)}", flush=True)
            else:
                print("CHECK kv-length ok", flush=True)
            mv.barrier()
            print(f"worker {me} of {workers} on {mv.servers_num()} servers: done", flush=True)
            if bad:
                raise SystemExit(1)
        finally:
            mv.shutdown()


    main()
    """
)



@pytest.mark.timeout(120)
def test_three_workers_random_async_adds_sum_exactly(tmp_path: Path) -> None:
    script = tmp_path / "batching_worker.py"
    script.write_text(MULTI_WORKER_SCRIPT)
    result = testing.run_job(str(script), workers=3, servers=2, timeout=RUN_TIMEOUT)
    report = testing.job_report(result)
    lines = result.stdout.splitlines()
    # Per table and worker, so that a failure says which tables went wrong.
    failed = sorted(line for line in lines if "MISMATCH" in line)
    assert failed == [], report
    assert result.returncode == 0, report
    for worker in range(3):
        for name in ("array", "matrix", "sparse", "kv", "kv-length"):
            assert f"[worker {worker}] CHECK {name} ok" in lines, report
        assert f"[worker {worker}] worker {worker} of 3 on 2 servers: done" in lines, report
