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
  three times a get and fault its pages in again.

Both keep a bounded amount of idle memory, and make room for a block that goes idle by
dropping the blocks idle longest: a pool that refused new blocks once full would keep,
say, two 64 MiB results from an early dense pull for good, and every 4096-row get after
them would map and fault its memory afresh (a third slower)."""

from __future__ import annotations

import math
import mmap
import threading
import weakref
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

from multiverso_py.protocol import MsgType

MIN_BYTES = 1 << 16  # smaller buffers come cheap from the allocator's free lists


def mapped(nbytes: int) -> mmap.mmap:
    """Fresh memory in a mapping of its own, which goes back to the kernel as soon as it is
    freed. glibc serves large blocks from its heap once it has freed one of them, and a
    freed heap block stays in the process: a server whose receive buffers came from the
    heap kept 100-200 MiB more after a burst of pushes."""
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


class IdleBlocks:
    """Idle blocks of memory by size, at most keep_bytes of them; the longest idle go
    first when one more needs room. Not thread-safe: its owner holds a lock."""

    def __init__(self, keep_bytes: int):
        self.keep_bytes = keep_bytes
        self.kept = 0
        self._by_size: dict[int, dict[int, Any]] = {}  # nbytes -> {id: block}, in the order they went idle
        self._age: OrderedDict[int, int] = OrderedDict()  # id -> nbytes, the longest idle first

    def take(self, nbytes: int) -> Optional[Any]:
        """An idle block of nbytes (the last to go idle: likeliest still in cache), or None."""
        blocks = self._by_size.get(nbytes)
        if not blocks:
            return None
        key, block = blocks.popitem()
        del self._age[key]
        self.kept -= nbytes
        return block

    def put(self, nbytes: int, block: Any) -> None:
        """Keep a block that went idle, dropping the longest idle ones if it needs the room;
        one larger than keep_bytes is dropped itself."""
        if nbytes > self.keep_bytes:
            return
        while self.kept + nbytes > self.keep_bytes:
            key, size = self._age.popitem(last=False)
            del self._by_size[size][key]
            self.kept -= size
        key = id(block)  # unique while kept here
        self._by_size.setdefault(nbytes, {})[key] = block
        self._age[key] = nbytes
        self.kept += nbytes


class BufferPool:
    def __init__(self, keep_bytes: int = 64 << 20):
        self._free = IdleBlocks(keep_bytes)  # at most one 64 MiB push's: bounded server memory
        self._lent: set[int] = set()  # ids of the arrays given out: only those come back here
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
        array = self._free.take(nbytes) if nbytes >= MIN_BYTES else None
        if array is None:  # a mapping of its own: see mapped()
            array = np.frombuffer(mapped(nbytes), np.uint8) if nbytes >= MIN_BYTES else np.empty(nbytes, np.uint8)
        return array

    def release(self, buffers: list[memoryview]) -> None:
        """A request is done with its buffers: keep the large ones this pool gave out (not,
        say, an in-process worker's own arrays) for the next request."""
        with self._lock:
            for view in buffers:
                array = view.obj
                if id(array) not in self._lent:
                    continue
                self._lent.discard(id(array))
                if view.nbytes >= MIN_BYTES:
                    self._free.put(view.nbytes, array)


class ResultMemory:
    """Memory for large result arrays, reused once every array viewing a result is gone.

    A result is a view of an owner array that does not own its memory (an anonymous
    mapping does). numpy points every view of a view at the first array that owns its
    memory or whose base is not an array, so each view of the result keeps that owner
    alive, and the owner's death means no array sees the memory any more."""

    def __init__(self, keep_bytes: int = 128 << 20, min_bytes: int = MIN_BYTES):
        self.min_bytes = min_bytes  # smaller arrays come cheap from the allocator's free lists
        self._free = IdleBlocks(keep_bytes)  # idle memory kept at most: two 64 MiB pulls
        self._lock = threading.Lock()  # results die on any thread

    def empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        """An uninitialised array, as np.empty(shape, dtype)."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        with self._lock:
            block = self._free.take(nbytes)
        if block is None:
            block = mapped(nbytes)
        owner = np.frombuffer(block, np.uint8)
        weakref.finalize(owner, self._give_back, block).atexit = False
        return owner.view(dtype).reshape(shape)

    def _give_back(self, block: mmap.mmap) -> None:
        with self._lock:
            self._free.put(len(block), block)
        # A block not kept (or dropped later) is unmapped once nothing refers to it; closing
        # it here would fail: the dying owner's view of it exists while its finalizers run.


results = ResultMemory()  # this process's: the tables' large get results come from it
