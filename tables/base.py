"""What every table type builds on: its spec, the unit of a request (a Part), the runtime
interface a worker-side handle talks to, input validation, and range partitioning with
a dense row shard (shared by ArrayTable and MatrixTable).

Table types never touch sockets or the event loop: a handle turns a call into Parts,
one per partition, and the runtime routes them; a shard applies one Part on numpy.
"""

from __future__ import annotations

import dataclasses
import math
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional, Protocol

import numpy as np

from multiverso_py import arrayops
from multiverso_py.errors import IndexOutOfRange, InvalidArgument

TABLE_DTYPES = ("float32", "float64", "int32", "int64")


@dataclass(frozen=True)
class TableSpec:
    """What every worker must agree on for a table of a given name."""

    kind: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    updater: str = "add"
    options: dict = field(default_factory=dict)  # updater options
    consistency: str = "async"
    staleness: int = 0
    table_options: dict = field(default_factory=dict)  # the table type's own, e.g. a KV initializer

    def to_wire(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "dtype": self.dtype, "updater": self.updater,
                "options": dict(self.options), "consistency": self.consistency, "staleness": self.staleness,
                "table_options": dict(self.table_options)}

    @classmethod
    def from_wire(cls, d: dict) -> "TableSpec":
        try:
            spec = cls(str(d["kind"]), tuple(int(n) for n in d["shape"]), str(d["dtype"]),
                       str(d["updater"]), dict(d["options"]),
                       str(d["consistency"]), int(d["staleness"]), dict(d.get("table_options", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"malformed table spec: {exc}") from None
        if spec.dtype not in TABLE_DTYPES:
            raise InvalidArgument(f"dtype {spec.dtype!r} is not one of {', '.join(TABLE_DTYPES)}")
        if not spec.shape or any(n <= 0 for n in spec.shape):
            raise InvalidArgument(f"table shape {spec.shape} must have positive sizes")
        return spec

    def mismatch(self, other: "TableSpec") -> Optional[str]:
        """What differs from another spec for the same name, or None."""
        for attr in ("kind", "shape", "dtype", "updater", "options", "consistency", "staleness", "table_options"):
            mine, theirs = getattr(self, attr), getattr(other, attr)
            if mine != theirs:
                return f"{attr} {theirs!r} differs from the existing {mine!r}"
        return None


@dataclass
class Part:
    """One partition's slice of a request, and where its reply goes."""

    pid: int
    args: dict = field(default_factory=dict)
    arrays: list = field(default_factory=list)
    dest: Optional[list] = None  # memoryviews the reply's arrays are received into
    positions: Any = None  # worker-side bookkeeping: where this part's rows belong
    reply_bytes: int = 0  # about how big the reply is, where no dest says so (to bound messages)


# Merges one part's reply arrays into the request's result (not needed for parts with dest).
OnReply = Callable[[Part, list[np.ndarray], dict, Any], None]


@dataclass
class TableStats:
    """What a worker's use of one table cost: messages, payload bytes, rows moved."""

    requests: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rows_sent: int = 0
    rows_received: int = 0


@dataclass
class TableInfo:
    """A created table as the worker sees it: id, spec, layout and shard map."""

    table_id: int
    name: str
    spec: TableSpec
    layout: dict  # table-type specific, e.g. {"bounds": [...]} for range partitions
    owners: list[int]  # partition id -> server id
    map_version: int
    stats: TableStats = field(default_factory=TableStats)


class Runtime(Protocol):
    """The worker runtime, as a table handle sees it (implemented by the client)."""

    worker_id: int
    timeout: float

    def table_name(self, name: Optional[str]) -> str: ...

    def create_table(self, name: str, spec: TableSpec) -> tuple[TableInfo, bool]: ...

    def table_ready(self, info: TableInfo) -> None: ...

    def submit(self, op: str, info: TableInfo, parts: list[Part], on_reply: Optional[OnReply], result: Any,
               finish: Optional[Callable[[Any], Any]] = None) -> Future: ...

    def wait(self, future: Future) -> Any: ...

    def call(self, start: Callable[[], Future]) -> Any:
        """start() submits a call; wait for it (the runtime may run it on this thread)."""
        ...


# ---------------------------------------------------------------- input validation


def numpy_of(value: Any, what: str) -> np.ndarray:
    """A numpy view of a list, an array or a (CPU or CUDA) tensor, without importing torch:
    a CPU tensor is shared, not copied; a CUDA one costs one device-to-host copy."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            value = value.float()
        value = value.numpy()
    try:
        return np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not array-like: {exc}") from None


def as_array(value: Any, dtype: np.dtype, what: str) -> np.ndarray:
    """numpy_of(value), cast to the table's dtype only where that loses no kind of
    information (float64 -> float32 is fine, float -> int is not)."""
    array = numpy_of(value, what)
    if array.dtype != dtype:
        if not np.can_cast(array.dtype, dtype, casting="same_kind"):
            raise InvalidArgument(f"{what} has dtype {array.dtype}, which cannot be cast safely to the table's {dtype}")
        array = array.astype(dtype)
    return array


def as_index(value: Any, size: int, what: str) -> np.ndarray:
    """Validated int64 indices in [0, size)."""
    index = numpy_of(value, what)
    if index.ndim == 0:
        index = index.reshape(1)
    if index.ndim != 1:
        raise InvalidArgument(f"{what} must be one-dimensional, got shape {index.shape}")
    if index.size and not np.issubdtype(index.dtype, np.integer):
        raise InvalidArgument(f"{what} must be integers, got dtype {index.dtype}")
    index = index.astype(np.int64, copy=False)
    if not arrayops.below(index, size):
        bad = index[(index < 0) | (index >= size)][0]
        raise IndexOutOfRange(f"{what} contains {bad}, outside [0, {size})")
    return index


def check_shape(array: np.ndarray, shape: tuple, what: str) -> np.ndarray:
    if array.shape != tuple(shape):
        if array.size == math.prod(shape) and array.ndim <= 1:
            return array.reshape(shape)
        raise InvalidArgument(f"{what} has shape {array.shape}, expected {tuple(shape)}")
    return array


# ---------------------------------------------------------------- partitions

MASK_GROUPING_MAX = 16  # up to this many partitions, one boolean pass each beats sorting


def group_by_partition(pid: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(partition, positions) for each partition named in pid, positions in their order.
    For two partitions pid may be a bool mask of the second's: no counting at all."""
    if not len(pid):
        return []
    if pid.dtype == bool:
        return [(p, pos) for p, pos in enumerate((np.flatnonzero(~pid), np.flatnonzero(pid))) if len(pos)]
    counts = np.bincount(pid)
    if len(counts) <= MASK_GROUPING_MAX:
        return [(int(p), np.flatnonzero(pid == p)) for p in np.flatnonzero(counts)]
    order = np.argsort(pid, kind="stable")
    cuts = np.flatnonzero(np.diff(pid[order])) + 1
    return [(int(pid[g[0]]), g) for g in np.split(order, cuts)]


class TableHandle:
    """Worker-side base: creation through the runtime, sync wrappers over futures."""

    kind: ClassVar[str]

    def __init__(self, runtime: Runtime, name: Optional[str], spec: TableSpec):
        self._runtime = runtime
        self._info, must_init = runtime.create_table(runtime.table_name(name), spec)
        self.name = self._info.name
        self.dtype = np.dtype(spec.dtype)
        self._setup(self._info)
        if must_init:
            self._initialize()
            runtime.table_ready(self._info)

    def _setup(self, info: TableInfo) -> None:
        """Prepare worker-side routing from the table's layout."""

    def _initialize(self) -> None:
        """Master worker only: write the initial content (zeros need nothing)."""

    def _submit(self, op: str, parts: list[Part], on_reply: Optional[OnReply] = None, result: Any = None,
                finish: Optional[Callable[[Any], Any]] = None) -> Future:
        return self._runtime.submit(op, self._info, parts, on_reply, result, finish)

    def stats(self) -> dict:
        """This worker's traffic on this table: requests, bytes sent and received (array
        payload), rows sent and received."""
        return dataclasses.asdict(self._info.stats)

    def _wait(self, future: Future) -> Any:
        return self._runtime.wait(future)

    def _call(self, start: Callable[..., Future], *args: Any, **kwargs: Any) -> Any:
        """The outcome of start(*args, **kwargs), an async method of this table, called
        synchronously: the runtime may then send and receive on the caller's thread."""
        return self._runtime.call(lambda: start(*args, **kwargs))

    def __repr__(self) -> str:
        s = self._info.spec
        return f"{type(self).__name__}(name={self.name!r}, shape={s.shape}, dtype={s.dtype}, updater={s.updater!r})"


def after(first: Future, second: Future) -> Future:
    """A future for second's outcome once first has succeeded too (first's failure wins)."""
    both: Future = Future()

    def finish(_: Future) -> None:
        failure = first.exception() or second.exception()
        if failure is not None:
            both.set_exception(failure)
        else:
            both.set_result(second.result())

    first.add_done_callback(lambda _: second.add_done_callback(finish))
    return both


def reply_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, for a Part's dest: a reply is received straight
    into them, so this is never a copy."""
    if not array.flags.c_contiguous:
        raise ValueError("a reply destination must be C-contiguous")
    return memoryview(array.reshape(-1).view(np.uint8))


def scatter_rows(part: Part, arrays: list, args: dict, out: np.ndarray) -> None:
    """On the I/O thread: a part's reply rows go to their positions in the result."""
    arrayops.put_rows(out, part.positions, arrays[0])
