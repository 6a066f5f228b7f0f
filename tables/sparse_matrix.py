"""SparseMatrixTable (Multiverso's sparse matrix): a MatrixTable whose gets move only the
rows that changed since this worker last fetched them, and whose adds ship only
non-zero rows. The worker keeps a cache of the whole matrix; the server keeps a bit
per row and worker: set when the row is sent to that worker, cleared for every worker
when the row changes."""

from __future__ import annotations

import weakref
from concurrent.futures import Future
from typing import Any, Optional

import numpy as np
from multiverso_py.tables import matrix
from multiverso_py.tables.base import Part, TableSpec, as_array, check_shape
from multiverso_py.tables.matrix import MatrixTable
from multiverso_py.tables.ranges import DenseRowShard, result_array

from multiverso_py import arrayops
from multiverso_py.errors import InvalidArgument

layout = matrix.layout  # the same row ranges as MatrixTable


def make_shard(spec: TableSpec, layout: dict, pid: int) -> "SparseRowShard":
    lo, hi = layout["bounds"][pid], layout["bounds"][pid + 1]
    return SparseRowShard(spec, (spec.shape[1],), lo, hi)


class SparseRowShard(DenseRowShard):
    """Dense rows plus change tracking. The server names the requesting worker in args
    {"w": id}; a get may carry {"all": True} (send every row asked for: the worker's cache is empty);
    it replies [row ids, rows] for the rows that worker has not seen since they changed.

    The flags are one bit per row and worker, a row's bits side by side in whole bytes
    (8 workers a byte): a change clears a row's bits for all workers in one write, a
    get reads and sets one worker's bit of each row. Requests touch random rows, so
    what they cost is the cache lines they miss: with a byte per row and worker (4 MB
    for 10^6 rows, room for 4 workers) a server spent 75-81 µs of a 4096-row add
    clearing flags and 151 µs on a get of changed rows, with a bit (1 MB) 28-32 µs
    and 102-108 µs."""

    def __init__(self, spec: TableSpec, row_shape: tuple, lo: int, hi: int):
        super().__init__(spec, row_shape, lo, hi)
        self._fresh = np.zeros((hi - lo, 1), np.uint8)  # [row, byte of workers' bits]: set if that cache holds the row as is
        self._bit: dict[int, int] = {}  # worker -> its bit in _fresh, in order of first get

    def _worker_bit(self, worker: int) -> int:
        bit = self._bit.get(worker)
        if bit is None:
            bit = self._bit[worker] = len(self._bit)
            width = self._fresh.shape[1]
            if bit == 8 * width:  # a worker more than the bytes have room for: twice the bytes
                grown = np.zeros((len(self._fresh), 2 * width), np.uint8)
                grown[:, :width] = self._fresh
                self._fresh = grown
        return bit

    def get(self, args: dict, arrays: list, alloc: arrayops.Alloc = np.empty) -> tuple[dict, list]:
        worker = args.get("w")
        if type(worker) is not int or worker < 0:
            raise InvalidArgument("a sparse get names its worker: args {'w': id}")
        if len(arrays) > 1:
            raise InvalidArgument(f"a get carries at most row ids, got {len(arrays)} arrays")
        byte, bit = divmod(self._worker_bit(worker), 8)
        mask = np.uint8(1 << bit)
        if arrays:
            where = changed = self._local_rows(arrays[0])
        else:
            where = self._span(args) or slice(0, len(self.data))
            changed = np.arange(where.start, where.stop)
        flags = self._fresh[:, byte]  # one byte column: a 1-D view (contiguous for up to 8 workers)
        seen = flags[where]
        if not args.get("all"):
            stale = (seen & mask) == 0
            changed, seen = changed[stale], seen[stale]
        flags[changed] = seen | mask  # a repeated row writes the same byte each time
        # The worker's cache now equals the shard on every row it asked for: the rows
        # sent, and rows unchanged since they were last sent (and reported pulled).
        self.updater.pulled(worker, changed)
        ids = np.add(changed, self.lo, out=alloc(changed.shape, np.int64))
        return {}, [ids, arrayops.gather_rows(self.data, changed, alloc)]

    def restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        super().restore_arrays(arrays)
        self._fresh[...] = 0  # restored rows are news to every worker

    def _changed(self, rows: Any) -> None:
        """Every worker's bits of the rows an add or set wrote go."""
        if rows is None or isinstance(rows, slice):
            self._fresh[slice(None) if rows is None else rows] = 0
        else:  # each row's bytes as one word (up to 64 workers), or as whole words
            width = self._fresh.shape[1]
            words = self._fresh.view(np.dtype(f"u{min(width, 8)}"))
            (words[:, 0] if words.shape[1] == 1 else words)[rows] = 0


class _Cache:
    """A worker's copy of a sparse table, shared by its handles of that table."""

    def __init__(self, values: np.ndarray):
        self.values = values
        self.cold = True  # the next get asks for every row: nothing cached yet, or a get failed


_caches: "weakref.WeakValueDictionary[tuple[Any, int], _Cache]" = weakref.WeakValueDictionary()


class SparseMatrixTable(MatrixTable):
    """Same API as MatrixTable: `get(row_ids=None, *, out=None)`, `add(delta, row_ids=None)`.
    A get transfers only rows changed since this worker's last get of them; an add ships
    only non-zero rows. `stats()` shows what moved."""

    kind = "sparse_matrix"

    def _setup(self, info) -> None:
        super()._setup(info)
        # The server tracks what it sent per worker, so all of a worker's handles of this
        # table must share one cache: a row one of them fetched is fresh for all.
        key = (self._runtime, info.table_id)
        self._shared = _caches.get(key)
        if self._shared is None:
            self._shared = _caches[key] = _Cache(arrayops.aligned_zeros(info.spec.shape, info.spec.dtype))
        self._cache = self._shared.values

    def get_async(self, row_ids: Any = None, *, out: Optional[np.ndarray] = None) -> Future:
        rows = self._rows(row_ids)
        shape = self.shape if rows is None else (len(rows), self.num_cols)
        result = result_array(out, shape, self.dtype)
        args = {"all": True} if self._shared.cold else {}
        self._shared.cold = False
        row_bytes = 8 + self.num_cols * self.dtype.itemsize  # a row id and its values, if it changed
        if rows is None:
            parts = [Part(p, {**args, **span}, reply_bytes=(hi - lo) * row_bytes) for p, lo, hi, span in self._spans()]
        else:
            distinct = arrayops.distinct_rows(rows)
            parts = [Part(p, args, [distinct if len(pos) == len(distinct) else distinct[pos]],
                          reply_bytes=len(pos) * row_bytes) for p, pos in self._ranges.split(distinct)]
        future = self._submit("get", parts, self._merge_rows, result,
                              finish=lambda res: _copy_rows(self._cache, rows, res))
        future.add_done_callback(self._on_get_done)
        return future

    def _merge_rows(self, part: Part, arrays: list, args: dict, result: Any) -> None:
        """On the I/O thread: changed rows go into the cache."""
        ids, values = arrays
        arrayops.put_rows(self._cache, ids, values)
        self._info.stats.rows_received += len(ids)

    def _on_get_done(self, future: Future) -> None:
        if future.exception() is not None:
            self._shared.cold = True  # the server may think we have rows that never arrived

    def add_async(self, delta: Any, row_ids: Any = None, *, lr: Optional[float] = None) -> Future:
        rows = self._rows(row_ids)
        expected = self.shape if rows is None else (len(rows), self.num_cols)
        values = check_shape(as_array(delta, self.dtype, "delta"), expected, "delta")
        nonzero = arrayops.nonzero_rows(values)
        if len(nonzero) < len(values):  # ship only those; all of them (the usual case): no copy
            values = np.take(values, nonzero, axis=0)
            rows = nonzero if rows is None else rows[nonzero]
        elif rows is None:
            rows = nonzero
        self._info.stats.rows_sent += len(rows)
        return self._write_rows("add", values, rows, lr)


def _copy_rows(cache: np.ndarray, rows: Optional[np.ndarray], out: np.ndarray) -> np.ndarray:
    if rows is None:
        np.copyto(out, cache)
    else:
        np.take(cache, rows, axis=0, out=out, mode="clip")  # rows are checked; on clip see arrayops.gather_rows
    return out
