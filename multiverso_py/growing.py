"""Arrays that grow along their first axis in place, for storage that fills as it goes
(a hash table's rows and their optimizer state).

Growing a numpy array means a new array, a copy of the old rows into it, and both held
at once during the copy; the new array's pages all fault in again besides. A
GrowingArray lives in an anonymous mapping that reserves address space for far more rows
than it holds (MAP_NORESERVE: a page takes memory only once written), so growing is a
wider view of the same memory: no copy, and each page faults in once, when its first row
is written. Only a growth past the reservation moves the rows to a larger one.

A KV shard filling with 1M keys of 16 float32 (doubling its rows from 64 to 1M) peaked
at 178 MiB of RSS where the doubling copies took it to 194 MiB.

Unlike numpy's large arrays, a reservation asks for no transparent huge pages. Rows fill
it in order, so a huge page faults in on a request's path every 32k rows of 64 bytes,
and where the kernel must compact memory to find one (THP `defrag=madvise`), that fault
took 17 ms: a tenth of a KV shard's 4096-key inserts did, and they ran at 0.5-1.3M keys/s
instead of 3-4M. With small pages the inserts cost 15-20% more when huge pages come
cheap, and never stall; gathers of existing rows measured the same either way.
"""

from __future__ import annotations

import mmap
import sys
from typing import Any

import numpy as np

# Not exported by Python's mmap module before 3.13; Linux's value. Elsewhere anonymous
# memory is committed lazily anyway.
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)
RESERVE_BYTES = 1 << 30  # address space a growing array reserves at first (not memory)
RESERVE_FACTOR = 8  # a reservation outgrown is replaced by one this many times the rows


def _map(nbytes: int, flags: int = 0) -> mmap.mmap:
    return mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)


def _view(block: mmap.mmap, shape: tuple, dtype: np.dtype) -> np.ndarray:
    """An array of `shape` at the start of `block`."""
    return np.frombuffer(block, dtype, int(np.prod(shape, dtype=np.int64))).reshape(shape)


class GrowingArray:
    """An array whose first axis grows; rows it has not held before start zero.

    `array` is the current array (a view: take it again after a growth, which replaces
    it). Views taken before a growth stay valid, and see the same rows unless the growth
    moved them to a new reservation."""

    def __init__(self, shape: tuple, dtype: Any):
        self.dtype = np.dtype(dtype)
        self.row_shape = tuple(shape[1:])
        self.row_bytes = max(int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize, 1)
        self._block, self._reserved_rows = self._reserve(shape[0], RESERVE_BYTES)
        self.array = _view(self._block, tuple(shape), self.dtype)

    @classmethod
    def holding(cls, array: np.ndarray) -> "GrowingArray":
        """A growing array that starts as a copy of `array`."""
        growing = cls(array.shape, array.dtype)
        growing.array[...] = array
        return growing

    def grow(self, rows: int) -> np.ndarray:
        """Make the array `rows` long (never shorter) and return it."""
        if rows <= len(self.array):
            return self.array
        old, moved = self.array, rows > self._reserved_rows
        if moved:  # rare: to a reservation RESERVE_FACTOR times the rows
            self._block, self._reserved_rows = self._reserve(rows, RESERVE_FACTOR * rows * self.row_bytes)
        self.array = _view(self._block, (rows, *self.row_shape), self.dtype)
        if moved:
            self.array[:len(old)] = old
        return self.array

    def _reserve(self, rows: int, reserve_bytes: int) -> tuple[mmap.mmap, int]:
        """A new reservation of about reserve_bytes, and the rows it holds; just `rows` rows
        where the kernel refuses to overcommit (vm.overcommit_memory=2 counts a
        reservation as memory)."""
        reserve = max(reserve_bytes, rows * self.row_bytes)
        try:
            block = _map(reserve, MAP_NORESERVE)
        except OSError:
            reserve = rows * self.row_bytes
            block = _map(reserve)
        return block, reserve // self.row_bytes
