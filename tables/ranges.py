"""Range partitioning, shared by the row-based table types (ArrayTable, MatrixTable,
SparseMatrixTable): the layout, worker-side splitting of row requests, the server-side
dense row shard, and the worker-side handle that reads and writes rows."""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

import numpy as np
from multiverso_py.tables.base import (
    Part,
    Runtime,
    TableHandle,
    TableInfo,
    TableSpec,
    after,
    as_array,
    check_shape,
    group_by_partition,
    reply_view,
    scatter_rows,
)

from multiverso_py import arrayops
from multiverso_py.buffers import results
from multiverso_py.errors import IndexOutOfRange, InvalidArgument
from multiverso_py.updaters import Updater, call_args, make_updater

# A fixed number of partitions per server, whatever the table's size: a request for
# random rows then touches a bounded number of them (the cost per row does not grow with
# the table). A vector's (ArrayTable's) whole-table adds and gets are large numpy calls
# that release the GIL, so with two partitions two table threads apply one at once (an
# embedded 64 MiB push: 17 GB/s with two, 9 with one, on 2 cores). A matrix's requests
# are mostly scattered rows, whose parts run one after another under the GIL anyway: a
# second partition only adds a part to each request, split and copied on the worker, run
# and answered on the server (4096-row adds and gets took 15-20% longer with two).
VECTOR_PARTITIONS_PER_SERVER = 2
ROW_PARTITIONS_PER_SERVER = 1
MIN_SPLIT_BYTES = 1 << 20  # a smaller table keeps one partition per server: splitting costs per part
SPAN_BYTES = 8 << 20  # whole-table transfers go in row spans of about this size: pipelined

def range_layout(num_rows: int, row_bytes: int, num_servers: int, per_server: int) -> dict:
    """Split rows into per_server contiguous partitions per server, or one per server for
    a small table (and never more partitions than rows)."""
    per_server = per_server if num_rows * row_bytes >= MIN_SPLIT_BYTES * num_servers else 1
    count = max(1, min(num_rows, per_server * num_servers))
    bounds = [num_rows * p // count for p in range(count + 1)]
    return {"bounds": bounds}


class RangeRows:
    """Worker-side splitting of row requests over range partitions."""

    def __init__(self, bounds: Sequence[int]):
        self.bounds = np.asarray(bounds, dtype=np.int64)
        self.count = len(self.bounds) - 1
        b = [int(x) for x in bounds]
        self._whole = [(p, b[p], b[p + 1]) for p in range(self.count) if b[p + 1] > b[p]]

    def whole(self) -> list[tuple[int, int, int]]:
        """(partition, lo, hi) of every non-empty partition."""
        return self._whole

    def spans(self, row_bytes: int) -> list[tuple[int, int, int, dict]]:
        """(partition, lo, hi, args) covering every row in pieces of about SPAN_BYTES; args
        name the piece's local rows {"lo", "hi"} unless it is the whole partition."""
        step = max(1, SPAN_BYTES // max(1, row_bytes))
        out = []
        for p, lo, hi in self._whole:
            for start in range(lo, hi, step):
                end = min(hi, start + step)
                out.append((p, start, end, {} if end - start == hi - lo else {"lo": start - lo, "hi": end - lo}))
        return out

    def split(self, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(partition, positions into rows) for each partition that some row falls in."""
        if self.count == 1:
            return [(0, np.arange(len(rows)))] if len(rows) else []
        if self.count == 2:  # a comparison, 3x faster than a search
            return group_by_partition(rows >= self.bounds[1])
        return group_by_partition(np.searchsorted(self.bounds[1:-1], rows, side="right"))


class DenseRowShard:
    """Server-side storage of rows [lo, hi) of a range-partitioned table, each row of
    shape row_shape. Requests carry row ids local to the table (global)."""

    def __init__(self, spec: TableSpec, row_shape: tuple[int, ...], lo: int, hi: int):
        self.lo, self.hi = lo, hi
        self.data = arrayops.aligned_zeros((hi - lo, *row_shape), spec.dtype)
        self.updater: Updater = make_updater(spec.updater, spec.options, self.data)

    def _local_rows(self, rows: np.ndarray) -> np.ndarray:
        if rows.dtype != np.int64 or rows.ndim != 1:
            raise InvalidArgument("row ids must be a 1-D int64 array")
        local = rows - self.lo if self.lo else rows
        if not arrayops.below(local, self.hi - self.lo):
            raise IndexOutOfRange(f"row ids outside this partition's rows [{self.lo}, {self.hi})")
        return local

    def _span(self, args: dict) -> Optional[slice]:
        """The local rows {"lo", "hi"} of a whole-span request; None for all of them."""
        if "lo" not in args and "hi" not in args:
            return None
        lo, hi = args.get("lo"), args.get("hi")
        if type(lo) is not int or type(hi) is not int or not 0 <= lo < hi <= len(self.data):
            raise IndexOutOfRange(f"row span [{lo}, {hi}) is not inside this partition's {len(self.data)} rows")
        return slice(lo, hi)

    def get(self, args: dict, arrays: list, alloc: arrayops.Alloc = np.empty) -> tuple[dict, list]:
        """All the partition's rows or a span of them (no arrays: a view, which the server
        keeps unchanged until it is sent), or the rows named by arrays[0] (gathered into
        memory from `alloc`)."""
        if not arrays:
            span = self._span(args)
            self.updater.pulled(args.get("w"), span)
            return {}, [self.data if span is None else self.data[span]]
        if len(arrays) != 1:
            raise InvalidArgument(f"a get carries at most row ids, got {len(arrays)} arrays")
        rows = self._local_rows(arrays[0])
        self.updater.pulled(args.get("w"), rows)
        return {}, [arrayops.gather_rows(self.data, rows, alloc)]

    def _delta(self, args: dict, arrays: list) -> tuple[Any, np.ndarray]:
        """(local row ids, a span, or None for the whole partition; delta) of an add or set."""
        if len(arrays) not in (1, 2):
            raise InvalidArgument(f"an add carries a delta and optional row ids, got {len(arrays)} arrays")
        rows = self._local_rows(arrays[0]) if len(arrays) == 2 else self._span(args)
        delta = arrays[-1]
        if rows is None:
            count = len(self.data)
        else:
            count = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        expected = (count, *self.data.shape[1:])
        if delta.shape != expected or delta.dtype != self.data.dtype:
            raise InvalidArgument(f"delta {delta.dtype}{list(delta.shape)} does not match {self.data.dtype}{list(expected)}")
        return rows, delta

    def add(self, args: dict, arrays: list) -> tuple[dict, list]:
        rows, delta = self._delta(args, arrays)
        self.updater.apply(delta, rows, args)
        self._changed(rows)
        return {}, []

    def check_add(self, args: dict, arrays: list) -> None:
        """Raise what add() would for a malformed request, changing nothing: a server
        acknowledges an add that it holds for clocks before the add runs."""
        self._delta(args, arrays)
        self.updater.call_lr(args)

    def set(self, args: dict, arrays: list) -> tuple[dict, list]:
        rows, values = self._delta(args, arrays)
        self.data[slice(None) if rows is None else rows] = values
        self._changed(rows)
        return {}, []

    def _changed(self, rows: Any) -> None:
        """An add or set just wrote these local rows (ids, a span, or None: all of them),
        for a shard that tracks changes."""

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps of this partition: its rows and their updater state."""
        return {"data": self.data, **{f"state/{k}": v for k, v in self.updater.state().items()}}

    def restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        if arrays["data"].shape != self.data.shape:
            raise InvalidArgument(f"the checkpoint's partition is {list(arrays['data'].shape)}, "
                                  f"this one {list(self.data.shape)}")
        self.data[...] = arrays["data"]
        self.updater.load_state({k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")})

def initial_content(init: Any, init_value: Any, shape: tuple, dtype: np.dtype,
                    seed: Optional[int]) -> Callable[[], Optional[np.ndarray]]:
    """Validate init_value= or init= ("zeros", ("uniform", low, high), ("normal", std))
    at once, on every worker; return what makes the content (called on the master only,
    so random content is drawn once). It returns None for zeros."""
    if init_value is not None:
        if init is not None:
            raise InvalidArgument("give init_value= or init=, not both")
        values = check_shape(as_array(init_value, dtype, "init_value"), shape, "init_value")
        return lambda: values
    if init is None or init == "zeros":
        return lambda: None
    kind = init[0] if isinstance(init, (tuple, list)) and init else None
    if not (kind == "uniform" and len(init) == 3 or kind == "normal" and len(init) == 2):
        raise InvalidArgument(f"init={init!r} is not 'zeros', ('uniform', low, high) or ('normal', std)")
    if not np.issubdtype(dtype, np.floating):
        raise InvalidArgument(f"random init= needs a float table, this one is {dtype}")
    params = [float(x) for x in init[1:]]

    def draw() -> np.ndarray:
        rng = np.random.default_rng(seed)
        if kind == "uniform":
            return rng.uniform(params[0], params[1], size=shape).astype(dtype)
        return rng.normal(0.0, params[0], size=shape).astype(dtype)

    return draw


class RangeTableHandle(TableHandle):
    """Worker side of a table stored as rows over range partitions. A row is a scalar
    for ArrayTable (flat elements) and a vector for MatrixTable."""

    def __init__(self, runtime: Runtime, name: Optional[str], spec: TableSpec, row_shape: tuple,
                 init: Any, init_value: Any, seed: Optional[int]):
        self._row_shape = row_shape
        self._num_rows = spec.shape[0] if row_shape else math.prod(spec.shape)
        self._initial = initial_content(init, init_value, spec.shape, np.dtype(spec.dtype), seed)
        super().__init__(runtime, name, spec)
        del self._initial

    def _setup(self, info: TableInfo) -> None:
        self._ranges = RangeRows(info.layout["bounds"])
        self._all_spans = self._ranges.spans(math.prod(self._row_shape) * self.dtype.itemsize)

    def _spans(self) -> list[tuple[int, int, int, dict]]:
        """The spans of a request for all rows (fixed for the table: callers copy the args)."""
        return self._all_spans

    def _initialize(self) -> None:
        values = self._initial()
        if values is not None:
            self._wait(self._write_rows("set", values.reshape(self._num_rows, *self._row_shape), None))

    def _read_rows(self, rows: Optional[np.ndarray], shape: Optional[tuple] = None,
                   out: Optional[np.ndarray] = None) -> Future:
        """Start a get of all rows (the result in `shape`) or of the given rows, into `out`
        or a new array. Replies are received straight into the result wherever its
        layout allows; reusing `out` also spares the page faults of fresh memory."""
        return self._request("get", rows, None, {}, self._result(rows, shape, out))

    def _write_rows(self, op: str, delta: np.ndarray, rows: Optional[np.ndarray], lr: Any = None) -> Future:
        """Start an add (or the master's set) of all rows or of the given rows, with the
        add's own learning rate `lr` if given."""
        return self._request(op, rows, delta, call_args(self._info.spec.updater, lr), None)

    def _add_read_rows(self, delta: np.ndarray, rows: Optional[np.ndarray], lr: Any, shape: Optional[tuple] = None,
                       out: Optional[np.ndarray] = None) -> Future:
        """Start an add of all rows or of the given rows, then a get of the same rows: one
        round trip (ADD_GET) on an async table. On an SSP or BSP table a get may wait for
        clocks and an add may be held, so it is an add followed by a get."""
        result = self._result(rows, shape, out)
        if self._info.spec.consistency != "async":
            return after(self._write_rows("add", delta, rows, lr), self._request("get", rows, None, {}, result))
        return self._request("add_get", rows, delta, call_args(self._info.spec.updater, lr), result)

    def _result(self, rows: Optional[np.ndarray], shape: Optional[tuple], out: Optional[np.ndarray]) -> np.ndarray:
        count = self._num_rows if rows is None else len(rows)
        return result_array(out, shape if rows is None and shape else (count, *self._row_shape), self.dtype)

    def _request(self, op: str, rows: Optional[np.ndarray], delta: Optional[np.ndarray], args: dict,
                 result: Optional[np.ndarray]) -> Future:
        """Start `op` on all rows (in row spans) or on the given rows, split by partition:
        `delta` (an add's or set's values) goes with the rows, a reply's rows land in
        `result` (a get's or add-get's)."""
        if rows is None:
            flat = None if result is None else result.reshape(self._num_rows, *self._row_shape)
            parts = [Part(p, {**span, **args}, [] if delta is None else [delta[lo:hi]],
                          None if flat is None else [reply_view(flat[lo:hi])]) for p, lo, hi, span in self._spans()]
            return self._submit(op, parts, None, result)
        groups = self._ranges.split(rows)
        if len(groups) == 1:  # the caller's arrays go as they are; a reply goes straight into the result
            arrays = [rows] if delta is None else [rows, delta]
            dest = None if result is None else [reply_view(result)]
            return self._submit(op, [Part(groups[0][0], dict(args), arrays, dest)], None, result)
        row_bytes = 0 if result is None else result.nbytes // max(1, len(rows))
        parts = [Part(p, dict(args), [rows[pos]] if delta is None else [rows[pos], np.take(delta, pos, axis=0)],
                      positions=pos, reply_bytes=len(pos) * row_bytes) for p, pos in groups]
        return self._submit(op, parts, None if result is None else scatter_rows, result)


def result_array(out: Optional[np.ndarray], shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A new result array (in reused memory if large), or the caller's `out` once it is
    known to fit exactly."""
    if out is None:
        return results.empty(shape, dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != tuple(shape):
        got = f"{out.dtype}{list(out.shape)}" if isinstance(out, np.ndarray) else type(out).__name__
        raise InvalidArgument(f"out= must be a {dtype}{list(shape)} numpy array, got {got}")
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise InvalidArgument("out= must be C-contiguous and writeable")
    return out

