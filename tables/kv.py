"""KVTable: a hash table from 64-bit keys to fixed-size rows, hash-partitioned over servers.

Keys are carried as uint64 bit patterns, so -1 and 2**64-1 name the same key. A key's
partition is taken from the high 32 bits of its splitmix64 mix and its slot in a shard's
KeyIndex from the low bits, so the two choices do not correlate.

A table has PARTITIONS_PER_SERVER partitions per server (one), fixed at creation. Every
partition that a batch touches costs a part with a fixed price (a pool job, a dozen numpy
calls per probe round, a scatter on the worker) while the GIL gives a server no
parallelism across its partitions: embedded, 4096-key batches, get-with-insert ran at
1.4M / 1.1M / 0.95M / 0.6M keys/s with 1 / 2 / 4 / 8 partitions per server (2 cores;
16 cores look the same), and over sockets the pass of 1M new keys went from 1.86-1.89M
to 2.09-2.12M keys/s from two to one. A table on one server then sends its keys as
given, with no hashing on the worker. What one partition per server gives up: a shard
that grows rehashes the index of all of its server's keys at once, a pause of one request.

Missing keys take an initial row computed on the server from a hash of (table seed, key,
column): the same key gets the same row whatever the number of servers, and no worker
has to write initial content.
"""

from __future__ import annotations

import dataclasses
import zlib
from concurrent.futures import Future
from typing import Any, Optional, Sequence

import numpy as np
from multiverso_py.tables.base import (
    Part,
    TableHandle,
    TableInfo,
    TableSpec,
    as_array,
    group_by_partition,
    numpy_of,
    reply_view,
    scatter_rows,
)
from multiverso_py.tables.keyindex import GOLDEN, MASK64, KeyIndex, mix64, mix64_int

from multiverso_py import arrayops, context
from multiverso_py.buffers import results
from multiverso_py.errors import InvalidArgument
from multiverso_py.growing import GrowingArray
from multiverso_py.updaters import Updater, call_args, make_updater

PARTITIONS_PER_SERVER = 1
KEY_DTYPES = ("int64", "uint64")
INITIAL_ROWS = 64
_UNIT = 2.0 ** -53



def layout(spec: TableSpec, num_servers: int) -> dict:
    return {"partitions": PARTITIONS_PER_SERVER * num_servers}


def make_shard(spec: TableSpec, layout: dict, pid: int) -> "KVShard":
    return KVShard(spec)


_TOP_BIT = np.uint64(1 << 63)


def partition_of(keys: np.ndarray, partitions: int) -> np.ndarray:
    """The partition of every uint64 key: the high 32 bits of its mix scaled to [0, P)."""
    return ((mix64(keys) >> np.uint64(32)) * np.uint64(partitions) >> np.uint64(32)).astype(np.intp)


def as_keys(value: Any) -> np.ndarray:
    """Keys as a 1-D uint64 array of bit patterns, from a list, an integer array of any
    dtype or a torch tensor; negative keys wrap to their two's complement."""
    keys = numpy_of(value, "keys")
    if keys.ndim != 1:
        raise InvalidArgument(f"keys must be one-dimensional, got shape {keys.shape}")
    if keys.dtype.kind in "fO" and isinstance(value, (list, tuple)) and _all_ints(value):
        keys = _wrap_ints(value)  # numpy makes float64 or object of ints beyond int64 mixed with others
    if keys.size == 0:
        return np.empty(0, dtype=np.uint64)
    if not np.issubdtype(keys.dtype, np.integer):
        raise InvalidArgument(f"keys must be integers, got dtype {keys.dtype}")
    if np.issubdtype(keys.dtype, np.signedinteger):
        return keys.astype(np.int64, copy=False).view(np.uint64)
    return keys.astype(np.uint64, copy=False)


def _all_ints(values: Sequence) -> bool:
    return all(isinstance(k, int) and not isinstance(k, bool) for k in values)


def _wrap_ints(values: Sequence[int]) -> np.ndarray:
    bad = next((k for k in values if not -(1 << 63) <= k <= MASK64), None)
    if bad is not None:
        raise InvalidArgument(f"key {bad} does not fit in 64 bits")
    return np.array([k & MASK64 for k in values], dtype=np.uint64)


def check_init(init: Any, dtype: np.dtype) -> list:
    """init= as it travels in the spec: ["zeros"], ["uniform", low, high] or ["normal", std]."""
    if init is None or init == "zeros":
        return ["zeros"]
    kind = init[0] if isinstance(init, (tuple, list)) and init else None
    try:
        params = [float(x) for x in init[1:]] if kind in ("uniform", "normal") else None
    except (TypeError, ValueError):
        params = None
    if params is None or not (kind == "uniform" and len(params) == 2 and params[0] <= params[1]
                              or kind == "normal" and len(params) == 1 and params[0] >= 0):
        raise InvalidArgument(f"init={init!r} is not 'zeros', ('uniform', low, high) with low <= high "
                              "or ('normal', std) with std >= 0")
    if not all(np.isfinite(params)):
        raise InvalidArgument(f"init={init!r} has a parameter that is not finite")
    if not np.issubdtype(dtype, np.floating):
        raise InvalidArgument(f"random init= needs a float table, this one is {dtype}")
    return [kind, *params]


def table_seed(name: str, seed: Optional[int]) -> int:
    """The initializer's seed: stable across processes (crc32, not hash()), and distinct
    per table name and per seed=."""
    base = mix64_int(zlib.crc32(name.encode()))
    return base if seed is None else mix64_int(base ^ mix64_int(int(seed) + int(GOLDEN)))


def initial_rows(init: list, seed: int, keys: np.ndarray, dim: int, dtype: np.dtype) -> np.ndarray:
    """The initial rows of uint64 keys: a (len(keys), dim) array; each value depends only
    on (seed, key, column)."""
    if init[0] == "zeros":
        return np.zeros((len(keys), dim), dtype=dtype)
    base = mix64(keys ^ np.uint64(seed))[:, None]
    columns = np.arange(dim, dtype=np.uint64)[None, :]

    def unit(stream: int) -> np.ndarray:  # a float64 in [0, 1) per (key, column, stream)
        salt = (np.uint64(2) * columns + np.uint64(stream + 1)) * GOLDEN
        return (mix64(base + salt) >> np.uint64(11)).astype(np.float64) * _UNIT

    if init[0] == "uniform":
        low, high = init[1], init[2]
        return (low + (high - low) * unit(0)).astype(dtype)
    radius = np.sqrt(-2.0 * np.log1p(-unit(0)))  # Box-Muller; 1 - u lies in (0, 1]
    return (init[1] * radius * np.cos(2.0 * np.pi * unit(1))).astype(dtype)


class KVShard:
    """One partition of a KV table on a server: rows in one array that grows in place as
    it fills (multiverso_py.growing: no copy of the rows held), found through a KeyIndex."""

    def __init__(self, spec: TableSpec):
        options = spec.table_options
        self.dim = spec.shape[0]
        self.dtype = np.dtype(spec.dtype)
        self.init, self.seed = list(options["init"]), int(options["init_seed"])
        self.insert_on_get = bool(options["insert_on_get"])
        self.index = KeyIndex()
        self.size = 0
        self._storage = GrowingArray((INITIAL_ROWS, self.dim), self.dtype)
        self.updater: Updater = make_updater(spec.updater, spec.options, self.data)

    @property
    def data(self) -> np.ndarray:
        """The rows, as many as the storage holds now (the first `size` are keys')."""
        return self._storage.array

    def _keys(self, arrays: list, count: int, op: str) -> np.ndarray:
        if len(arrays) != count:
            raise InvalidArgument(f"a KV {op} carries {count} array(s), got {len(arrays)}")
        keys = arrays[0]
        if keys.dtype != np.uint64 or keys.ndim != 1:
            raise InvalidArgument(f"KV keys must be a 1-D uint64 array, got {keys.dtype}{list(keys.shape)}")
        return keys

    def _rows_of(self, keys: np.ndarray) -> np.ndarray:
        """The row of every key; missing keys get new rows with their initial content."""
        start = self.size
        rows, new_keys = self.index.find_or_insert(keys, start)
        if len(new_keys):
            end = start + len(new_keys)
            if end > len(self.data):
                capacity = len(self.data)
                while capacity < end:
                    capacity *= 2
                self.updater.resize(self._storage.grow(capacity))
            self.data[start:end] = initial_rows(self.init, self.seed, new_keys, self.dim, self.dtype)
            self.updater.inserted(slice(start, end))
            self.size = end
        return rows

    def get(self, args: dict, arrays: list, alloc: arrayops.Alloc = np.empty) -> tuple[dict, list]:
        """The rows of arrays[0]'s keys (a copy), or with args {"op": "len"} the key count."""
        if "op" in args:
            if args["op"] != "len":
                raise InvalidArgument(f"a KV get has no op {args['op']!r:.40}")
            return {"count": self.size}, []
        keys = self._keys(arrays, 1, "get")
        if self.insert_on_get:
            rows = self._rows_of(keys)  # may grow (replace) self.data
            self.updater.pulled(args.get("w"), rows)
            return {}, [arrayops.gather_rows(self.data, rows, alloc)]
        rows = self.index.lookup(keys)
        found = rows >= 0
        present = rows[found]
        self.updater.pulled(args.get("w"), present)
        out = alloc((len(keys), self.dim), self.dtype)
        out[found] = np.take(self.data, present, axis=0)
        out[~found] = initial_rows(self.init, self.seed, keys[~found], self.dim, self.dtype)
        return {}, [out]

    def add(self, args: dict, arrays: list) -> tuple[dict, list]:
        """Add values to the rows of keys (missing keys start from their initial row)."""
        keys, values = self._keys_and_values(arrays)
        self.updater.apply(values, self._rows_of(keys), args)
        return {}, []

    def check_add(self, args: dict, arrays: list) -> None:
        """Raise what add() would for a malformed request, changing nothing: a server
        acknowledges an add that it holds for clocks before the add runs."""
        self._keys_and_values(arrays)
        self.updater.call_lr(args)

    def _keys_and_values(self, arrays: list) -> tuple[np.ndarray, np.ndarray]:
        keys = self._keys(arrays, 2, "add")
        values = arrays[1]
        if values.shape != (len(keys), self.dim) or values.dtype != self.dtype:
            raise InvalidArgument(f"values {values.dtype}{list(values.shape)} do not match "
                                  f"{self.dtype}{[len(keys), self.dim]}")
        return keys, values

    def set(self, args: dict, arrays: list) -> tuple[dict, list]:
        raise InvalidArgument("a KV table has no set operation")

    def checkpoint_arrays(self) -> dict[str, np.ndarray]:
        """The keys (in row order), their rows and the rows' updater state."""
        keys, rows = self.index.items()
        ordered = np.empty(self.size, np.uint64)
        ordered[rows] = keys
        state = {f"state/{k}": v[:self.size] for k, v in self.updater.state().items()}
        return {"keys": ordered, "data": self.data[:self.size], **state}

    def restore_arrays(self, arrays: dict[str, np.ndarray]) -> None:
        keys = np.asarray(arrays["keys"], np.uint64)
        capacity = max(INITIAL_ROWS, 1 << int(len(keys)).bit_length())
        self._storage = GrowingArray((capacity, self.dim), self.dtype)
        self.updater.resize(self.data)
        self.index.insert(keys, np.arange(len(keys)))
        self.data[:len(keys)] = arrays["data"]
        self.size = len(keys)
        self.updater.load_state({k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")},
                                slice(0, len(keys)))


class KVTable(TableHandle):
    """A hash table from int64 keys (any 64-bit value) to rows of `dim` values, shared by
    all workers. `get(keys)` returns a (len(keys), dim) array in the keys' order, creating
    missing keys with their initial row when insert_on_get; `add(keys, values)` adds
    (repeated keys sum) through the table's updater, whose state is kept per key;
    `len(table)` counts stored keys.

    key_dtype ("int64" or "uint64") is how the caller thinks of keys; either way a key is
    its 64-bit pattern. init= is "zeros", ("uniform", low, high) or ("normal", std), drawn
    per (table name, seed=, key, column), so reproducible in any job of any size."""

    kind = "kv"

    def __init__(self, dim: int = 1, dtype: str = "float32", *, key_dtype: str = "int64", name: Optional[str] = None,
                 init: Any = "zeros", insert_on_get: bool = True, updater: str = "add",
                 consistency: Optional[str] = None, staleness: Optional[int] = None, seed: Optional[int] = None,
                 **updater_options: Any):
        runtime = context.current()
        if key_dtype not in KEY_DTYPES:
            raise InvalidArgument(f"key_dtype {key_dtype!r} is not one of {', '.join(KEY_DTYPES)}")
        if seed is not None and not isinstance(seed, (int, np.integer)):
            raise InvalidArgument(f"seed must be an int, got {seed!r}")
        spec = context.table_spec(self.kind, (dim,), dtype, updater, updater_options, consistency, staleness)
        init_option = check_init(init, np.dtype(spec.dtype))
        name = runtime.table_name(name)  # now, not sooner: the seed needs it; invalid arguments raised above
        spec = dataclasses.replace(spec, table_options={
            "init": init_option, "init_seed": table_seed(name, seed),
            "insert_on_get": bool(insert_on_get), "key_dtype": key_dtype})
        self.dim = spec.shape[0]
        super().__init__(runtime, name, spec)

    def _setup(self, info: TableInfo) -> None:
        self.num_partitions = int(info.layout["partitions"])

    def _split(self, keys: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(partition, positions into keys) of every partition that some key falls in."""
        if self.num_partitions == 1:  # a table on one server: no hashing here
            return [(0, np.arange(len(keys)))] if len(keys) else []
        if self.num_partitions == 2:  # partition_of is the mix's top bit
            return group_by_partition(mix64(keys) >= _TOP_BIT)
        return group_by_partition(partition_of(keys, self.num_partitions))

    def get_async(self, keys: Any) -> Future:
        keys = as_keys(keys)
        result = results.empty((len(keys), self.dim), self.dtype)
        groups = self._split(keys)
        if len(groups) == 1:  # the keys go as given, the reply straight into the result
            return self._submit("get", [Part(groups[0][0], arrays=[keys], dest=[reply_view(result)])], None, result)
        row_bytes = self.dim * self.dtype.itemsize
        parts = [Part(p, arrays=[keys[pos]], positions=pos, reply_bytes=len(pos) * row_bytes) for p, pos in groups]
        return self._submit("get", parts, scatter_rows, result)

    def get(self, keys: Any) -> np.ndarray:
        """The rows of `keys`, in their order (repeats allowed)."""
        return self._call(self.get_async, keys)

    def add_async(self, keys: Any, values: Any, *, lr: Optional[float] = None) -> Future:
        args = call_args(self._info.spec.updater, lr)
        keys = as_keys(keys)
        values = as_array(values, self.dtype, "values")
        if self.dim == 1 and values.shape == (len(keys),):
            values = values.reshape(len(keys), 1)
        if values.shape != (len(keys), self.dim):
            expected = f"{(len(keys), self.dim)}" + (f" or {(len(keys),)}" if self.dim == 1 else "")
            raise InvalidArgument(f"values has shape {values.shape}, expected {expected}")
        groups = self._split(keys)
        if len(groups) == 1:  # the caller's arrays go as they are
            return self._submit("add", [Part(groups[0][0], dict(args), [keys, values])])
        return self._submit("add", [Part(p, dict(args), [keys[pos], np.take(values, pos, axis=0)]) for p, pos in groups])

    def add(self, keys: Any, values: Any, *, lr: Optional[float] = None) -> None:
        """Push `values` into the rows of `keys` through the table's updater (repeated keys
        sum); `lr` replaces the table's learning rate for this add."""
        self._call(self.add_async, keys, values, lr=lr)

    def len_async(self) -> Future:
        parts = [Part(p, args={"op": "len"}) for p in range(self.num_partitions)]
        return self._submit("get", parts, _count, [0])

    def __len__(self) -> int:
        return self._call(self.len_async)[0]



def _count(part: Part, arrays: list, args: dict, total: list) -> None:
    total[0] += int(args["count"])
