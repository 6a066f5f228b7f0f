"""Large buffers reused across requests: a server's receive buffers for the arrays of
adds, and a worker's result arrays for large gets.

A fresh 8 MiB numpy buffer is a fresh mapping whose pages all fault in as the data
arrives: on a small machine that costs about as much as receiving the data (a 64 MiB
get into fresh memory: 12-160 ms, into reused memory 8-11 ms).
- The server hands its receive buffers back once a request is applied, and the next
  push of the same size receives into them.
- A worker's large results come from memory that earlier results gave back when the
  last array viewing them went away. From 64 KiB up, since glibc returns the top of
  its heap to the kernel once more than 128 KiB there is free: a 256 KiB result made
  and dropped each request (4096 rows of 16 float32) could grow and shrink the heap
  three times a get and fault its pages in again."""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from typing import Any, Optional

import numpy as np

from multiverso_py.protocol import MsgType

MIN_BYTES = 1 << 16  # smaller buffers come cheap from the allocator's free lists


class BufferPool:
    def __init__(self, keep_bytes: int = 64 << 20):
        self.keep_bytes = keep_bytes  # kept for reuse at most: one 64 MiB push, bounded server memory
        self._free: dict[int, list[np.ndarray]] = {}
        self._lent: set[int] = set()  # ids of the arrays given out: only those come back here
        self._kept = 0
        self._lock = threading.Lock()  # taken on the event loop and on pool threads

    def allocate(self, msg_type: MsgType, req_id: int, body: dict, lengths: list[int]) -> Optional[list[memoryview]]:
        """A FrameReader allocator: buffers for an add's or set's arrays (None: the reader's own)."""
        if msg_type not in (MsgType.ADD, MsgType.SET, MsgType.ADD_GET) or max(lengths) < MIN_BYTES:
            return None
        with self._lock:
            arrays = [self._take(n) for n in lengths]
            self._lent.update(id(a) for a in arrays)
        return [memoryview(a) for a in arrays]

    def _take(self, nbytes: int) -> np.ndarray:
        free = self._free.get(nbytes)
        if nbytes >= MIN_BYTES and free:
            self._kept -= nbytes
            return free.pop()
        return np.empty(nbytes, np.uint8)

    def release(self, buffers: list[memoryview]) -> None:
        """A request is done with its buffers: keep the large ones this pool gave out (not,
        say, an in-process worker's own arrays) for the next request."""
        with self._lock:
            for view in buffers:
                array = view.obj
                if id(array) not in self._lent:
                    continue
                self._lent.discard(id(array))
                if view.nbytes >= MIN_BYTES and self._kept + view.nbytes <= self.keep_bytes:
                    self._free.setdefault(view.nbytes, []).append(array)
                    self._kept += view.nbytes


class ResultMemory:
    """Memory for large result arrays, reused once every array viewing a result is gone.

    A result is a view of an owner array that does not own its memory (an anonymous
    mapping does). numpy points every view of a view at the first array that owns its
    memory or whose base is not an array, so each view of the result keeps that owner
    alive, and the owner's death means no array sees the memory any more."""

    def __init__(self, keep_bytes: int = 128 << 20, min_bytes: int = MIN_BYTES):
        self.keep_bytes = keep_bytes  # idle memory kept at most: two 64 MiB pulls
        self.min_bytes = min_bytes  # smaller arrays come cheap from the allocator's free lists
        self._free: dict[int, list[mmap.mmap]] = {}
        self._kept = 0
        self._lock = threading.Lock()  # results die on any thread

    def empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        """An uninitialised array, as np.empty(shape, dtype)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self._kept -= nbytes
                block = free.pop()
            else:
                block = None
        if block is None:
            block = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        owner = np.frombuffer(block, np.uint8)
        weakref.finalize(owner, self._give_back, block).atexit = False
        return owner.view(dtype).reshape(shape)

    def _give_back(self, block: mmap.mmap) -> None:
        with self._lock:
            if self._kept + len(block) <= self.keep_bytes:
                self._free.setdefault(len(block), []).append(block)
                self._kept += len(block)
        # else unmapped with the owner's view of it, right after this (closing it here
        # would fail: that view still exists while the owner's finalizers run)


results = ResultMemory()  # this process's: the tables' large get results come from it
