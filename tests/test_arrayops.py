"""The vectorized row operations against numpy's own (slower) ones, on any input."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from multiverso_py import arrayops

ids = arrays(np.int64, st.integers(0, 300), elements=st.integers(-5, 40))


@settings(max_examples=200, deadline=None)
@given(ids, st.sampled_from([(), (3,), (2, 2)]), st.sampled_from(["float32", "int64"]))
def test_add_rows_sums_repeats_like_add_at(values: np.ndarray, row_shape: tuple, dtype: str) -> None:
    rows = values + 5  # row numbers 0..45
    rng = np.random.default_rng(len(values))
    data = rng.integers(-9, 9, (46, *row_shape)).astype(dtype)
    delta = rng.integers(-9, 9, (len(rows), *row_shape)).astype(dtype)  # integers: sums are exact in any order
    expected = data.copy()
    np.add.at(expected, rows, delta)
    sums = arrayops.RepeatSums()
    arrayops.add_rows(data, rows, delta, sums)
    np.testing.assert_array_equal(data, expected)
    distinct, summed = sums(rows, delta, len(data))
    np.testing.assert_array_equal(np.sort(distinct), np.unique(rows))
    per_row, summed_per_row = np.zeros_like(data), np.zeros_like(data)
    np.add.at(per_row, rows, delta)
    summed_per_row[distinct] = summed  # each row once, holding the sum of its repeats' deltas
    np.testing.assert_array_equal(summed_per_row, per_row)


@settings(max_examples=100, deadline=None)
@given(ids, st.sampled_from([(), (3,), (2, 2)]), st.booleans())
def test_put_rows_matches_fancy_assignment(values: np.ndarray, row_shape: tuple, strided: bool) -> None:
    rows = np.unique(values + 5)  # distinct row numbers 0..45
    rng = np.random.default_rng(len(rows))
    target = rng.standard_normal((46, *row_shape)).astype(np.float32)
    new = rng.standard_normal((len(rows) * (2 if strided else 1), *row_shape)).astype(np.float32)
    new = new[::2] if strided else new  # not contiguous: the plain path
    expected = target.copy()
    expected[rows] = new
    arrayops.put_rows(target, rows, new)
    np.testing.assert_array_equal(target, expected)


@given(arrays(np.int64, st.integers(0, 50), elements=st.integers(-2**63, 2**63 - 1)), st.integers(0, 2**62))
@settings(max_examples=200, deadline=None)
def test_below_is_the_range_check(index: np.ndarray, size: int) -> None:
    assert arrayops.below(index, size) == bool(np.all((index >= 0) & (index < size)))


@given(arrays(np.float32, st.tuples(st.integers(0, 30), st.integers(0, 5)),
              elements=st.sampled_from([0.0, -0.0, 1.5, -2.0, np.nan, np.inf])))
@settings(max_examples=200, deadline=None)
def test_nonzero_rows_matches_any(values: np.ndarray) -> None:
    np.testing.assert_array_equal(arrayops.nonzero_rows(values), np.flatnonzero(values.any(axis=1)))
    cube = np.repeat(values[:, :, None], 2, axis=2)  # rows of any shape
    np.testing.assert_array_equal(arrayops.nonzero_rows(cube), np.flatnonzero(values.any(axis=1)))


@settings(max_examples=200, deadline=None)
@given(ids)
def test_distinct_rows_keeps_each_row_once_in_ascending_order(values: np.ndarray) -> None:
    rows = values + 5  # row numbers 0..45
    np.testing.assert_array_equal(arrayops.distinct_rows(rows), np.unique(rows))


@settings(max_examples=50, deadline=None)
@given(st.sampled_from([(0,), (5,), (1000, 16), (3, 5, 7), (4096, 3)]),
       st.sampled_from(["float32", "float64", "int64", "float16"]))
def test_aligned_zeros_are_zeros_on_a_cache_line(shape: tuple, dtype: str) -> None:
    array = arrayops.aligned_zeros(shape, dtype)
    assert array.shape == shape and array.dtype == np.dtype(dtype)
    assert array.flags.c_contiguous and array.flags.writeable
    assert not array.any()
    if array.size:
        assert array.ctypes.data % arrayops.CACHE_LINE == 0
    array[...] = 1  # the whole extent is its own
    assert array.sum() == array.size


def test_row_shards_and_their_updater_state_start_on_a_cache_line() -> None:
    from multiverso_py.tables.base import TableSpec
    from multiverso_py.tables.ranges import DenseRowShard

    spec = TableSpec(kind="matrix", shape=(100_000, 16), dtype="float32", updater="adam")
    shard = DenseRowShard(spec, (16,), 0, 100_000)
    assert shard.data.ctypes.data % arrayops.CACHE_LINE == 0
    assert all(state.ctypes.data % arrayops.CACHE_LINE == 0 for state in shard.updater.state().values()
               if state.ndim == 2)
