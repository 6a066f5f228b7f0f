"""Receive buffers for the large arrays of adds, reused across requests.

A fresh 8 MiB numpy buffer for every span of a push is a fresh mapping whose pages all
fault in as the data arrives: on a small machine that costs about as much as receiving
the data. The server hands these buffers back once a request is applied, and the next
push of the same size receives into them."""

from __future__ import annotations

import threading
from typing import Optional

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
