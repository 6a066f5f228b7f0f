"""ArrayTable: a dense tensor of any shape, stored flat and range-partitioned over servers."""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
from multiverso_py.tables.base import TableSpec, as_array, as_index, check_shape
from multiverso_py.tables.ranges import VECTOR_PARTITIONS_PER_SERVER, DenseRowShard, RangeTableHandle, range_layout

from multiverso_py import context


def layout(spec: TableSpec, num_servers: int) -> dict:
    return range_layout(math.prod(spec.shape), np.dtype(spec.dtype).itemsize, num_servers,
                        VECTOR_PARTITIONS_PER_SERVER)


def make_shard(spec: TableSpec, layout: dict, pid: int) -> DenseRowShard:
    lo, hi = layout["bounds"][pid], layout["bounds"][pid + 1]
    return DenseRowShard(spec, (), lo, hi)


class ArrayTable(RangeTableHandle):
    """A dense tensor shared by all workers. `get()` returns the whole tensor, `get(indices)`
    the values at flat indices; `add(delta)` adds a tensor of the same shape, `add(delta,
    indices)` adds at flat indices (repeated indices sum). The table's updater ("add", "sgd",
    "adam", ...; see multiverso_py.updaters) decides what an add does; lr= overrides its
    learning rate for one add."""

    kind = "array"

    def __init__(self, shape: int | tuple[int, ...], dtype: str = "float32", *, name: Optional[str] = None,
                 init_value: Any = None, init: Any = None, updater: str = "add", consistency: Optional[str] = None,
                 staleness: Optional[int] = None, seed: Optional[int] = None, **updater_options: Any):
        runtime = context.current()
        shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
        spec = context.table_spec(self.kind, shape, dtype, updater, updater_options, consistency, staleness)
        self.shape = spec.shape
        self.size = math.prod(self.shape)
        super().__init__(runtime, name, spec, (), init, init_value, seed)

    def get_async(self, indices: Any = None, *, out: Optional[np.ndarray] = None) -> Future:
        if indices is None:
            return self._read_rows(None, self.shape, out)
        return self._read_rows(as_index(indices, self.size, "indices"), out=out)

    def get(self, indices: Any = None, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """The whole tensor, or the values at flat `indices`; into `out` when given."""
        return self._call(self.get_async, indices, out=out)

    def add_async(self, delta: Any, indices: Any = None, *, lr: Optional[float] = None) -> Future:
        values, index = self._delta(delta, indices)
        return self._write_rows("add", values, index, lr)

    def add(self, delta: Any, indices: Any = None, *, lr: Optional[float] = None) -> None:
        """Push `delta` (the whole tensor, or values at flat `indices`) through the table's
        updater; `lr` replaces the table's learning rate for this add."""
        self._call(self.add_async, delta, indices, lr=lr)

    def add_get_async(self, delta: Any, indices: Any = None, *, lr: Optional[float] = None,
                      out: Optional[np.ndarray] = None) -> Future:
        values, index = self._delta(delta, indices)
        return self._add_read_rows(values, index, lr, None if index is not None else self.shape, out)

    def add_get(self, delta: Any, indices: Any = None, *, lr: Optional[float] = None,
                out: Optional[np.ndarray] = None) -> np.ndarray:
        """add(delta, indices, lr=lr) and then get(indices, out=out), in one round trip
        to each server on an async table: the push-pull of a training step. Returns the
        values right after this add (and any earlier one)."""
        return self._call(self.add_get_async, delta, indices, lr=lr, out=out)

    def _delta(self, delta: Any, indices: Any) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """An add's validated values (flat) and flat indices (None for the whole tensor)."""
        if indices is None:
            return check_shape(as_array(delta, self.dtype, "delta"), self.shape, "delta").reshape(-1), None
        index = as_index(indices, self.size, "indices")
        return check_shape(as_array(delta, self.dtype, "delta"), (len(index),), "delta"), index
