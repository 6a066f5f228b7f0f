"""MatrixTable: dense rows of num_cols values, partitioned over servers by row ranges."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
from multiverso_py.tables.base import TableSpec, as_array, as_index, check_shape
from multiverso_py.tables.ranges import ROW_PARTITIONS_PER_SERVER, DenseRowShard, RangeTableHandle, range_layout

from multiverso_py import context


def layout(spec: TableSpec, num_servers: int) -> dict:
    num_rows, num_cols = spec.shape
    return range_layout(num_rows, num_cols * np.dtype(spec.dtype).itemsize, num_servers, ROW_PARTITIONS_PER_SERVER)


def make_shard(spec: TableSpec, layout: dict, pid: int) -> DenseRowShard:
    lo, hi = layout["bounds"][pid], layout["bounds"][pid + 1]
    return DenseRowShard(spec, (spec.shape[1],), lo, hi)


class MatrixTable(RangeTableHandle):
    """A dense (num_rows, num_cols) matrix shared by all workers. `get(row_ids=None)` returns
    all rows or the given ones; `add(delta, row_ids=None)` adds to all rows or the given
    ones (repeated row ids sum), through the table's updater; lr= overrides its learning
    rate for one add."""

    kind = "matrix"

    def __init__(self, num_rows: int, num_cols: int, dtype: str = "float32", *, name: Optional[str] = None,
                 init_value: Any = None, init: Any = None, updater: str = "add", consistency: Optional[str] = None,
                 staleness: Optional[int] = None, seed: Optional[int] = None, **updater_options: Any):
        runtime = context.current()
        spec = context.table_spec(self.kind, (num_rows, num_cols), dtype, updater, updater_options, consistency, staleness)
        self.num_rows, self.num_cols = spec.shape
        self.shape = spec.shape
        super().__init__(runtime, name, spec, (self.num_cols,), init, init_value, seed)

    def _rows(self, row_ids: Any) -> Optional[np.ndarray]:
        return None if row_ids is None else as_index(row_ids, self.num_rows, "row_ids")

    def get_async(self, row_ids: Any = None, *, out: Optional[np.ndarray] = None) -> Future:
        return self._read_rows(self._rows(row_ids), out=out)

    def get(self, row_ids: Any = None, *, out: Optional[np.ndarray] = None) -> np.ndarray:
        """All rows, or the rows `row_ids` in that order; into `out` when given."""
        return self._call(self.get_async, row_ids, out=out)

    def add_async(self, delta: Any, row_ids: Any = None, *, lr: Optional[float] = None) -> Future:
        rows = self._rows(row_ids)
        expected = self.shape if rows is None else (len(rows), self.num_cols)
        values = check_shape(as_array(delta, self.dtype, "delta"), expected, "delta")
        return self._write_rows("add", values, rows, lr)

    def add(self, delta: Any, row_ids: Any = None, *, lr: Optional[float] = None) -> None:
        """Push `delta` (all rows, or the rows `row_ids`) through the table's updater; `lr`
        replaces the table's learning rate for this add."""
        self._call(self.add_async, delta, row_ids, lr=lr)
