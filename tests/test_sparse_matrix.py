"""SparseMatrixTable: a get moves only the rows that changed since this worker last fetched
them, an add ships only non-zero rows, and the values are always those of a plain matrix.

Embedded tests read the table's stats() around each call; the multi-worker test runs real
scheduler, server and worker processes under `multiverso-py run` and checks, from the
workers' own stats, that rows changed by another worker move and unchanged rows do not.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import multiverso_py as mv
from multiverso_py import testing

RUN_TIMEOUT = 90.0  # seconds for a whole multi-process job; it normally takes two or three
ID_BYTES = 8  # a reply names each row it carries; allow up to an int64 per row on the wire

pytestmark = pytest.mark.usefixtures("no_scheduler_env")


def base_matrix(num_rows: int, num_cols: int, dtype: str = "int64") -> np.ndarray:
    """Distinct rows, so that a row delivered to the wrong place shows."""
    return (np.arange(num_rows)[:, None] * 100 + np.arange(num_cols)[None, :]).astype(dtype)


def moved(table: mv.SparseMatrixTable, before: dict) -> dict:
    """What the table's counters grew by since `before`."""
    after = table.stats()
    return {key: after[key] - before[key] for key in after}


# ------------------------------------------------------------------ what a get moves


def test_second_get_without_adds_moves_nothing(job: mv.Job) -> None:
    base = base_matrix(50, 4)
    table = mv.SparseMatrixTable(50, 4, "int64", init_value=base)
    before = table.stats()
    np.testing.assert_array_equal(table.get(), base)
    first = moved(table, before)
    assert first["rows_received"] == 50, first  # a cold cache fetches every row once

    before = table.stats()
    np.testing.assert_array_equal(table.get(), base)
    np.testing.assert_array_equal(table.get([49, 0, 7]), base[[49, 0, 7]])
    again = moved(table, before)
    assert again["rows_received"] == 0, again
    assert again["bytes_received"] == 0, again


def test_get_after_own_add_moves_exactly_the_changed_rows(job: mv.Job) -> None:
    base = base_matrix(60, 5)
    table = mv.SparseMatrixTable(60, 5, "int64", init_value=base)
    table.get()
    changed = [3, 17, 40]
    table.add(np.full((3, 5), 7, np.int64), changed)
    expected = base.copy()
    expected[changed] += 7
    row_bytes = 5 * 8

    # A get of some rows moves only those of them that changed...
    before = table.stats()
    np.testing.assert_array_equal(table.get([17, 20, 21]), expected[[17, 20, 21]])
    part = moved(table, before)
    assert part["rows_received"] == 1, part
    assert row_bytes <= part["bytes_received"] <= row_bytes + ID_BYTES, part

    # ...and a whole get afterwards moves the changed rows it has not fetched yet.
    before = table.stats()
    np.testing.assert_array_equal(table.get(), expected)
    rest = moved(table, before)
    assert rest["rows_received"] == 2, rest
    assert 2 * row_bytes <= rest["bytes_received"] <= 2 * (row_bytes + ID_BYTES), rest


# 70_000 x 32 float32 is about 9 MB: more than one ~8 MiB partition on the one server.
@pytest.mark.parametrize("num_rows, num_cols", [(100, 4), (70_000, 32)])
def test_whole_get_after_row_adds_moves_exactly_those_rows(job: mv.Job, num_rows: int, num_cols: int) -> None:
    table = mv.SparseMatrixTable(num_rows, num_cols, "float32")
    np.testing.assert_array_equal(table.get(), np.zeros((num_rows, num_cols), np.float32))
    expected = np.zeros((num_rows, num_cols), np.float32)
    # A few adds touching rows at both ends (so both partitions of the big table), one twice.
    for rows in ([0, num_rows - 1], [num_rows // 2], [1, num_rows // 2, num_rows - 2]):
        delta = np.arange(1, len(rows) * num_cols + 1, dtype=np.float32).reshape(len(rows), num_cols)
        table.add(delta, rows)
        np.add.at(expected, rows, delta)
    changed = {0, num_rows - 1, num_rows // 2, 1, num_rows - 2}

    before = table.stats()
    np.testing.assert_array_equal(table.get(), expected)
    assert moved(table, before)["rows_received"] == len(changed)


def test_all_zero_rows_ship_nothing(job: mv.Job) -> None:
    base = base_matrix(30, 3)
    table = mv.SparseMatrixTable(30, 3, "int64", init_value=base)
    table.get()

    before = table.stats()
    table.add(np.zeros((30, 3), np.int64))
    table.add(np.zeros((4, 3), np.int64), [2, 9, 9, 29])
    table.add_async(np.zeros((1, 3), np.int64), [5])
    mv.barrier()
    shipped = moved(table, before)
    assert shipped["rows_sent"] == 0, shipped
    assert shipped["bytes_sent"] == 0, shipped

    # Only the non-zero rows of a mixed delta travel, and only they count as changed.
    delta = np.zeros((30, 3), np.int64)
    delta[[4, 11]] = [[1, 0, 0], [0, 0, -2]]
    before = table.stats()
    table.add(delta)
    assert moved(table, before)["rows_sent"] == 2
    before = table.stats()
    np.testing.assert_array_equal(table.get(), base + delta)
    assert moved(table, before)["rows_received"] == 2


def test_duplicate_row_ids_in_get_and_add(job: mv.Job) -> None:
    base = base_matrix(20, 3)
    table = mv.SparseMatrixTable(20, 3, "int64", init_value=base)
    before = table.stats()
    np.testing.assert_array_equal(table.get([5, 5, 2, 5]), base[[5, 5, 2, 5]])
    assert moved(table, before)["rows_received"] == 2  # each distinct row once
    table.get()

    rows = [1, 1, 4, 1]
    delta = np.array([[1, 2, 3], [10, 20, 30], [5, 5, 5], [100, 0, 0]], np.int64)
    table.add(delta, rows)
    expected = base.copy()
    np.add.at(expected, rows, delta)

    # Asked for three times, a changed row still moves once.
    before = table.stats()
    np.testing.assert_array_equal(table.get([4, 1, 1, 7, 4, 1]), expected[[4, 1, 1, 7, 4, 1]])
    assert moved(table, before)["rows_received"] == 2
    np.testing.assert_array_equal(table.get(), expected)


def test_get_into_out(job: mv.Job) -> None:
    base = base_matrix(12, 4, "float64")
    table = mv.SparseMatrixTable(12, 4, "float64", init_value=base)
    out = np.full((12, 4), -1.0)
    assert table.get(out=out) is out
    np.testing.assert_array_equal(out, base)

    table.add(np.ones((1, 4)), [6])
    expected = base.copy()
    expected[6] += 1
    rows_out = np.full((3, 4), -1.0)
    assert table.get([6, 0, 6], out=rows_out) is rows_out
    np.testing.assert_array_equal(rows_out, expected[[6, 0, 6]])

    # Nothing moves now, yet out= is still filled completely (from the cache).
    out[:] = -1.0
    before = table.stats()
    assert table.get_async(out=out).result(timeout=20) is out
    assert moved(table, before)["rows_received"] == 0
    np.testing.assert_array_equal(out, expected)

    with pytest.raises(ValueError):
        table.get([1, 2], out=np.empty((3, 4)))  # wrong shape: refused before anything is sent


def test_two_handles_of_one_table_in_a_worker_see_their_own_adds(job: mv.Job) -> None:
    """Tables are collective by name, so a worker may construct the same table twice; the
    server's record of what this worker has seen must not make one handle miss a change
    that the other handle fetched."""
    first = mv.SparseMatrixTable(10, 2, "int64", name="twice")
    second = mv.SparseMatrixTable(10, 2, "int64", name="twice")
    first.get()
    second.get()
    first.add(np.ones((1, 2), np.int64), [3])
    expected = np.zeros((10, 2), np.int64)
    expected[3] = 1
    np.testing.assert_array_equal(second.get(), expected)
    np.testing.assert_array_equal(first.get(), expected)  # read-your-writes through `first`


# ------------------------------------------------------------------ against a numpy model


@st.composite
def programs(draw: st.DrawFn) -> tuple[np.ndarray, list[tuple]]:
    """An initial matrix and a sequence of ("add", rows or None, delta, wait) and
    ("get", rows or None, use_out) steps. Small values: zero rows are frequent."""
    num_rows = draw(st.integers(1, 9))
    num_cols = draw(st.integers(1, 3))
    init = draw(arrays(np.int64, (num_rows, num_cols), elements=st.integers(-9, 9)))
    row_ids = st.lists(st.integers(0, num_rows - 1), max_size=8)
    steps: list[tuple] = []
    for _ in range(draw(st.integers(1, 14))):
        rows: list[int] | None = draw(st.none() | row_ids)
        if draw(st.booleans()):
            count = num_rows if rows is None else len(rows)
            delta = draw(arrays(np.int64, (count, num_cols), elements=st.integers(-1, 1)))
            steps.append(("add", rows, delta, draw(st.booleans())))
        else:
            steps.append(("get", rows, draw(st.booleans())))
    return init, steps


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(program=programs())
def test_matches_a_numpy_model(job: mv.Job, program: tuple[np.ndarray, list[tuple]]) -> None:
    init, steps = program
    num_rows, num_cols = init.shape
    table = mv.SparseMatrixTable(num_rows, num_cols, "int64", init_value=init)  # a fresh table per example
    expected = init.copy()
    fresh = np.zeros(num_rows, bool)  # rows whose current value this worker has fetched
    for step in steps:
        if step[0] == "add":
            _, rows, delta, wait = step
            target = np.arange(num_rows) if rows is None else np.asarray(rows, np.int64)
            nonzero = delta.any(axis=1)
            before = table.stats()
            if wait:
                table.add(delta, rows)
            else:
                table.add_async(delta, rows)  # unwaited: the next get must still see it
            assert moved(table, before)["rows_sent"] == int(nonzero.sum())
            np.add.at(expected, target, delta)
            fresh[target[nonzero]] = False
        else:
            _, rows, use_out = step
            wanted = expected if rows is None else expected[rows]
            out = np.empty_like(wanted) if use_out else None
            before = table.stats()
            got = table.get(rows, out=out)
            asked = np.arange(num_rows) if rows is None else np.unique(np.asarray(rows, np.int64))
            assert moved(table, before)["rows_received"] == int((~fresh[asked]).sum())
            fresh[asked] = True
            np.testing.assert_array_equal(got, wanted)
            if use_out:
                assert got is out
    np.testing.assert_array_equal(table.get(), expected)


# ------------------------------------------------------------------ several worker processes

# Worker 0 fetches everything, worker 1 changes some rows on both servers' partitions, and
# worker 0's next gets must move exactly those rows. Then the roles swap for one row.
TWO_WORKER_SCRIPT = textwrap.dedent(
    """
    import numpy as np

    import multiverso_py as mv

    NUM_ROWS, NUM_COLS = 200, 8
    CHANGED = [0, 5, 99, 100, 150, 199]  # the row ranges of both partitions
    DELTA_ROWS = CHANGED + [5]  # row 5 twice: its deltas sum


    def fail(message):
        raise SystemExit(f"MISMATCH worker {mv.worker_id()}: {message}")


    def check(got, expected, what):
        if got.shape != expected.shape:
            fail(f"{what}: shape {got.shape}, expected {expected.shape}")
        wrong = np.flatnonzero((got != expected).any(axis=1))
        if len(wrong):
            row = wrong[0]
            fail(f"{what}: {len(wrong)} wrong row(s), first #{row}: {got[row].tolist()} != {expected[row].tolist()}")


    def fetch(table, what, expected, rows=None):
        # Get, check the values, report how many rows moved.
        before = table.stats()
        check(table.get(rows), expected if rows is None else expected[rows], what)
        after = table.stats()
        count = after["rows_received"] - before["rows_received"]
        print(f"MOVED {what} {count} rows {after['bytes_received'] - before['bytes_received']} bytes", flush=True)
        return count


    def expect_moved(count, wanted, what):
        if count != wanted:
            fail(f"{what}: {count} rows moved, expected {wanted}")


    def main():
        mv.init()
        try:
            me, workers = mv.worker_id(), mv.workers_num()
            base = (np.arange(NUM_ROWS)[:, None] * 1000 + np.arange(NUM_COLS)[None, :]).astype(np.int64)
            table = mv.SparseMatrixTable(NUM_ROWS, NUM_COLS, "int64", name="shared", init_value=base)
            expect_moved(fetch(table, "warm", base), NUM_ROWS, "warm")
            mv.barrier()

            delta = np.arange(1, len(DELTA_ROWS) * NUM_COLS + 1, dtype=np.int64).reshape(len(DELTA_ROWS), NUM_COLS)
            if me == 1:
                table.add(delta, DELTA_ROWS)
            mv.barrier()
            expected = base.copy()
            np.add.at(expected, DELTA_ROWS, delta)
            if me == 0:
                expect_moved(fetch(table, "changed-row", expected, [150]), 1, "a row worker 1 changed")
                expect_moved(fetch(table, "unchanged-rows", expected, [1, 2, 101, 198]), 0, "rows nobody changed")
                expect_moved(fetch(table, "whole", expected), len(CHANGED) - 1, "the other changed rows")
                expect_moved(fetch(table, "again", expected), 0, "a repeated get")
            else:
                expect_moved(fetch(table, "own-change", expected), len(CHANGED), "rows this worker changed")
            mv.barrier()

            if me == 0:
                table.add(np.full((1, NUM_COLS), 5, np.int64), [7])
            mv.barrier()
            expected[7] += 5
            if me == 1:
                expect_moved(fetch(table, "changed-by-0", expected), 1, "the row worker 0 changed")
            mv.barrier()
            print(f"worker {me} of {workers} on {mv.servers_num()} servers: ok", flush=True)
        finally:
            mv.shutdown()


    main()
    """
)



@pytest.mark.timeout(120)
def test_two_workers_get_moves_only_rows_the_other_changed(tmp_path: Path) -> None:
    script = tmp_path / "sparse_worker.py"
    script.write_text(TWO_WORKER_SCRIPT)
    result = testing.run_job(str(script), workers=2, servers=2, timeout=RUN_TIMEOUT)
    report = testing.job_report(result)
    assert result.returncode == 0, report
    assert "MISMATCH" not in result.stdout + result.stderr, report
    lines = set(result.stdout.splitlines())
    row = 8 * 8  # bytes of one int64 row of 8 columns
    # The launcher's own view of what moved, beside the workers' checks.
    for worker, what, rows in [(0, "warm", 200), (1, "warm", 200), (0, "changed-row", 1),
                               (0, "unchanged-rows", 0), (0, "whole", 5), (0, "again", 0),
                               (1, "own-change", 6), (1, "changed-by-0", 1)]:
        prefix = f"[worker {worker}] MOVED {what} {rows} rows "
        matches = [line for line in lines if line.startswith(prefix)]
        assert len(matches) == 1, f"no line {prefix!r}\n{report}"
        nbytes = int(matches[0].split()[-2])
        assert rows * row <= nbytes <= rows * (row + ID_BYTES), f"{matches[0]}\n{report}"
    for worker in (0, 1):
        assert f"[worker {worker}] worker {worker} of 2 on 2 servers: ok" in lines, report


def _moved(shard, worker: int, rows: list[int]) -> list[int]:
    """Row ids a shard's get sends to a worker, sorted."""
    _, (ids, values) = shard.get({"w": worker}, [np.asarray(rows, np.int64)])
    np.testing.assert_array_equal(values, shard.data[ids - shard.lo])
    return sorted(ids.tolist())


def test_shard_tracks_more_workers_than_its_first_flags_hold() -> None:
    """A shard's flags start with room for 8 workers (a bit each in a byte a row) and
    grow: workers who joined before the growth keep what they have seen, and a change
    reaches every worker exactly once."""
    from multiverso_py.tables.base import TableSpec
    from multiverso_py.tables.sparse_matrix import SparseRowShard

    shard = SparseRowShard(TableSpec("sparse_matrix", (30, 2)), (2,), 10, 30)  # rows 10..29
    asked = [10, 12, 29, 12]
    for worker in range(3):
        assert _moved(shard, worker, asked) == [10, 12, 12, 29]  # a repeated stale row moves twice
    shard.add({}, [np.array([12, 20], np.int64), np.ones((2, 2), np.float32)])
    for worker in range(3, 9):  # worker 8 needs a second byte a row
        assert _moved(shard, worker, asked) == [10, 12, 12, 29]
    assert shard._fresh.shape[1] > 1
    for worker in range(3):  # their flags survived the growth: only the changed row moves
        assert _moved(shard, worker, asked) == [12, 12]
    for worker in range(9):
        assert _moved(shard, worker, [12, 20, 29]) == [20], worker  # 20: changed, and never sent
        assert _moved(shard, worker, [12, 20, 29]) == []
    shard.add({}, [np.array([29], np.int64), np.ones((1, 2), np.float32)])  # with the grown flags
    for worker in range(9):
        assert _moved(shard, worker, [12, 29]) == [29], worker
    shard.set({"lo": 0, "hi": 5}, [np.zeros((5, 2), np.float32)])  # a span: rows 10..14
    assert _moved(shard, 7, [10, 14, 15, 29]) == [10, 14, 15]  # 15: never sent to worker 7
    shard.restore_arrays({"data": shard.data.copy()})
    assert _moved(shard, 0, [20, 29]) == [20, 29]  # both fresh in worker 0's cache before


@pytest.mark.parametrize("workers", [8, 16, 33, 70])
def test_a_change_reaches_each_of_many_workers_once(workers: int) -> None:
    """Whatever the flags' width (one byte a row up to 8 workers, a word up to 64, whole
    words beyond), a change clears every worker's bit of the row and no other row's."""
    from multiverso_py.tables.base import TableSpec
    from multiverso_py.tables.sparse_matrix import SparseRowShard

    shard = SparseRowShard(TableSpec("sparse_matrix", (20, 2)), (2,), 0, 20)
    for worker in range(workers):
        assert _moved(shard, worker, [3, 7, 19]) == [3, 7, 19]
    shard.add({}, [np.array([7], np.int64), np.ones((1, 2), np.float32)])
    for worker in range(workers):
        assert _moved(shard, worker, [3, 7, 19]) == [7], worker
        assert _moved(shard, worker, [3, 7, 19]) == []


def test_shard_get_refuses_a_get_without_its_worker() -> None:
    from multiverso_py.errors import InvalidArgument
    from multiverso_py.tables.base import TableSpec
    from multiverso_py.tables.sparse_matrix import SparseRowShard

    shard = SparseRowShard(TableSpec("sparse_matrix", (4, 2)), (2,), 0, 4)
    for args in ({}, {"w": -1}, {"w": "0"}):
        with pytest.raises(InvalidArgument, match="names its worker"):
            shard.get(args, [np.arange(2, dtype=np.int64)])
