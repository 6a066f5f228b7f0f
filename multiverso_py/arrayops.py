"""Vectorized row operations that the server and the tables run on every scattered-row
request, written for request-sized arrays (thousands of rows).

Measured on numpy 2.4 with 4096 random row ids: np.unique takes ~4x a plain sort (it
goes through a hash table first), a sort 3-5x a scratch slot per row, and np.add.at on
4096 rows of 16 costs ~1.3 ms where a gather, an add and a scatter of distinct rows cost
~0.15 ms. So repeated rows of a table are found with a scratch slot per row (no sort at
all; keys of unbounded range as they collide in a KeyIndex), and only the few repeated
rows go through np.add.at. Scattering whole
rows is 2-2.5x faster when each row is seen as one opaque item (a void view) than
through numpy's multi-dimensional fancy indexing.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np


CACHE_LINE = 64  # bytes


def aligned_zeros(shape: tuple, dtype: Any) -> np.ndarray:
    """np.zeros(shape, dtype) starting on a cache line. A large numpy array starts 16
    bytes into its pages (after malloc's header), so each 64-byte row of a table spans
    two cache lines; aligned, a row read or written at random touches one."""
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.zeros(nbytes + CACHE_LINE, np.uint8)
    start = -raw.ctypes.data % CACHE_LINE
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def below(index: np.ndarray, size: int) -> bool:
    """Whether every int64 index is in [0, size): one pass, as unsigned (negatives wrap
    to huge values), where a min and a max take two."""
    return not index.size or int(index.view(np.uint64).max()) < size


# Where gathered rows go, like np.empty(shape, dtype): a server passes one that lays them
# out in the worker's shared memory (multiverso_py.shm.ReplyArea).
Alloc = Callable[[tuple, Any], np.ndarray]


def gather_rows(data: np.ndarray, rows: np.ndarray, alloc: Alloc = np.empty) -> np.ndarray:
    """data[rows] for row ids already checked, into memory from alloc. np.take is 3-4x
    faster than fancy indexing; mode="clip" because with its default mode it gathers
    into a buffer of its own first when given out=."""
    out = alloc((len(rows), *data.shape[1:]), data.dtype)
    return np.take(data, rows, axis=0, out=out, mode="clip")


def nonzero_rows(values: np.ndarray) -> np.ndarray:
    """Positions of the rows (along axis 0) with a non-zero element: what
    np.flatnonzero(values.any(axis=1)) gives for a matrix, ~4x faster, because each
    row's mask of non-zeros is compared with zeros whole, as one opaque item."""
    width = math.prod(values.shape[1:])
    if not width:
        return np.empty(0, np.intp)
    mask = (values != 0).reshape(len(values), width)
    if mask.all():  # the usual gradient: no row to drop, and one reduction says so (2x faster)
        return np.arange(len(values))
    items = mask.view(np.dtype((np.void, width)))[:, 0]
    return np.flatnonzero(items != np.zeros((), items.dtype))


class RepeatSums:
    """Finds the rows that a request names more than once, for one table or shard, in
    linear time: a scratch slot per row remembers which position of the request last
    named it, so repeats show up with their positions and without a sort (an argsort of
    4096 ids costs 2x this). Called, it sums repeated rows' deltas. The slots are
    np.empty: only the pages of rows that requests touch take memory, 4 bytes a row at
    most. Not thread-safe: a shard's requests are serialised."""

    def __init__(self) -> None:
        self._last = np.empty(0, np.int32)

    def winners(self, rows: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(each position, the position its row's slot kept): equal at one position of
        every distinct row."""
        if len(self._last) < num_rows:
            self._last = np.empty(num_rows, np.int32)
        positions = np.arange(len(rows), dtype=np.int32)
        self._last[rows] = positions  # a repeated row keeps one of its positions, whichever
        return positions, np.take(self._last, rows)

    def __call__(self, rows: np.ndarray, delta: np.ndarray, num_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(distinct rows, their summed deltas) for valid row ids below num_rows; the inputs
        themselves when no row repeats."""
        if len(rows) < 2:
            return rows, delta
        positions, winner = self.winners(rows, num_rows)
        repeat = winner != positions
        if not repeat.any():
            return rows, delta
        kept = np.flatnonzero(~repeat)
        slot = np.empty(len(rows), np.intp)
        slot[kept] = np.arange(len(kept))
        summed = np.take(delta, kept, axis=0)
        np.add.at(summed, slot[winner[repeat]], delta[repeat])
        return rows[kept], summed


def distinct_rows(rows: np.ndarray) -> np.ndarray:
    """Each row id in `rows` once, in ascending order. A sort, where the positions of
    repeats are not needed: for 4096 random ids of a large table it takes half the time
    of RepeatSums' scratch slots, which a worker's traffic keeps evicting from the cache
    (a sparse get 10-12% faster), and it keeps no scratch."""
    ordered = np.sort(rows)
    first = np.empty(len(ordered), bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    return ordered[first]


def add_rows(data: np.ndarray, rows: np.ndarray, delta: np.ndarray, sums: RepeatSums) -> None:
    """data[rows] += delta, repeated rows summed. Every position of a repeated row ends up
    holding that row's whole sum, so the scatter may write the row from any of them: no
    copy of the distinct rows' deltas, which sums() would make (random row ids repeat
    in almost every request of thousands: 15-20% faster)."""
    positions, winner = sums.winners(rows, len(data))
    current = np.take(data, rows, axis=0)
    current += delta
    repeat = np.flatnonzero(winner != positions)
    if len(repeat):
        first = winner[repeat]
        np.add.at(current, first, delta[repeat])
        current[repeat] = current[first]
    put_rows(data, rows, current)


def put_rows(target: np.ndarray, rows: np.ndarray, values: np.ndarray) -> None:
    """target[rows] = values, for rows of any shape."""
    width = math.prod(target.shape[1:])  # elements per row (np.prod costs ~5 µs a call)
    if target.ndim < 2 or not width or not len(values) or not (target.flags.c_contiguous and values.flags.c_contiguous) \
            or values.dtype != target.dtype or values.shape[1:] != target.shape[1:]:
        target[rows] = values
        return
    item = np.dtype((np.void, width * target.itemsize))
    target.reshape(len(target), width).view(item)[:, 0][rows] = values.reshape(len(values), width).view(item)[:, 0]
