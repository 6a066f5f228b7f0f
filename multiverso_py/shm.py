"""Same-host bulk transfers through shared memory.

A worker and a server on one host can move a large array with one memory copy, where the
socket takes two (into the kernel and out again) at about a third of memcpy's speed. The
worker lends the server a segment of shared memory with the request; the socket carries
only the header.

- An add's arrays: the worker copies them into the segment; the server applies them
  straight from it and is done with it when it replies (a held add copies them out first).
- A get's reply: the server copies the arrays into the segment on a pool thread; the
  worker copies them into the result when the reply arrives.

Segments belong to the worker, which reuses them; its resource tracker unlinks them when
it exits, even after kill -9. The server maps them, per connection, and unmaps them when
the connection closes, or within seconds of the worker dropping (unlinking) them. A connection uses shared memory only once a probe has shown that
the server can open the worker's segments (same host, same IPC namespace), and only for
messages of at least MIN_BYTES.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import re
import secrets
import threading
from collections import OrderedDict
from multiprocessing import resource_tracker
from typing import Any, Awaitable, Callable, Optional, Sequence

try:  # CPython's POSIX shared memory calls, as multiprocessing.shared_memory makes them
    import _posixshmem
except ImportError:  # no POSIX shared memory (Windows): every array goes on the socket
    _posixshmem = None

import numpy as np

from multiverso_py.errors import MultiversoError, ProtocolError
from multiverso_py.tables.base import Part

log = logging.getLogger(__name__)

# Below this a message's arrays stay on the socket: from here on the copy the segment
# saves outweighs lending it (a 600 KB push-pull takes 10-20% less time, 64 KiB the same).
MIN_BYTES = 256 << 10
SEGMENT_UNIT = 1 << 20  # segments come in whole MiB, so that similar messages share them
ALIGN = 64  # arrays start on cache lines
PREFIX = "mvpy_"
_NAME = re.compile(PREFIX + r"[0-9a-f]{16}\Z")  # the only segments a server opens
# The memory both sides touch: a worker's segments in flight (more goes on the socket; a
# 64 MiB pull fits) and those it keeps idle for reuse.
LENT_BYTES = 96 << 20
KEEP_BYTES = 96 << 20
MAPPED_BYTES = LENT_BYTES + KEEP_BYTES  # what a server keeps mapped for one connection: all a worker has


def layout(lengths: Sequence[int]) -> tuple[list[int], int]:
    """Where each of these arrays starts in a segment, and the bytes they take in all."""
    starts, end = [], 0
    for n in lengths:
        starts.append(end)
        end += -(-n // ALIGN) * ALIGN
    return starts, end


def views(buf: memoryview, lengths: Sequence[int]) -> list[memoryview]:
    """Byte views of arrays laid out in a segment (see layout)."""
    starts, end = layout(lengths)
    if end > len(buf):
        raise ProtocolError(f"arrays of {end} bytes do not fit a shared memory segment of {len(buf)}")
    return [buf[start:start + n] for start, n in zip(starts, lengths)]


def copy_in(buf: memoryview, arrays: Sequence[Any]) -> list[memoryview]:
    """Copy arrays (buffers) into a segment; their views there. numpy copies without the GIL."""
    targets = views(buf, [memoryview(a).nbytes for a in arrays])
    for target, array in zip(targets, arrays):
        np.frombuffer(target, np.uint8)[:] = np.frombuffer(array, np.uint8)
    return targets


# ---------------------------------------------------------------- the worker's side


def _map(name: str, flags: int, size: Optional[int] = None) -> mmap.mmap:
    fd = _posixshmem.shm_open("/" + name, flags, mode=0o600)  # this user only
    try:
        if size is not None:
            os.ftruncate(fd, size)
            if hasattr(os, "posix_fallocate"):  # a full /dev/shm fails here, not with SIGBUS at a write
                os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


class Segment:
    """One shared memory segment of a worker. The mapping goes when the last view of it
    does (an mmap outlives its own name until then), so closing never waits for readers."""

    def __init__(self, size: int, tracked: bool = True):
        self.name, self.size, self.tracked = PREFIX + secrets.token_hex(8), size, tracked
        try:
            self.buf: Optional[memoryview] = memoryview(_map(self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, size))
        except OSError:
            _unlink(self.name)
            raise
        if tracked:  # the tracker (a process of its own, started once) unlinks it if this process dies
            resource_tracker.register("/" + self.name, "shared_memory")

    def wire(self) -> list:
        return [self.name, self.size]

    def close(self) -> None:
        """Unlink now; the memory goes once nothing maps it any more."""
        if self.buf is not None:
            self.buf = None
            _unlink(self.name)
            if self.tracked:
                resource_tracker.unregister("/" + self.name, "shared_memory")


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass


def _free_shared_bytes() -> int:
    """What /dev/shm can still take (a container's may hold 64 MiB in all); unbounded
    where that cannot be told."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return 1 << 62
    return stat.f_bavail * stat.f_frsize


def usable() -> bool:
    """Whether this process can create segments of MIN_BYTES (no POSIX shared memory, or
    a full /dev/shm: no)."""
    if _posixshmem is None:
        return False
    try:
        Segment(MIN_BYTES, tracked=False).close()
    except OSError:
        return False
    return True


def segment_bytes(nbytes: int) -> int:
    """The size of a segment for nbytes: whole SEGMENT_UNITs."""
    return max(1, -(-nbytes // SEGMENT_UNIT)) * SEGMENT_UNIT


class SegmentPool:
    """A worker's idle segments, reused (a fresh segment's pages fault in on both sides,
    which costs as much as the copy); at most keep_bytes of them."""

    def __init__(self, keep_bytes: int = KEEP_BYTES):
        self.keep_bytes = keep_bytes
        self._free: list[Segment] = []  # smallest first
        self._kept = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> Segment:
        """The smallest idle segment of size bytes or more, if not twice that; else a new one."""
        with self._lock:
            for i, segment in enumerate(self._free):
                if size <= segment.size <= 2 * size:
                    self._kept -= segment.size
                    return self._free.pop(i)
        return Segment(size)

    def give_back(self, segment: Segment) -> None:
        with self._lock:
            while self._free and self._kept + segment.size > self.keep_bytes:  # the largest go first
                evicted = self._free.pop()
                self._kept -= evicted.size
                evicted.close()
            if self._kept + segment.size <= self.keep_bytes:
                self._free.append(segment)
                self._free.sort(key=lambda s: s.size)
                self._kept += segment.size
                return
        segment.close()

    def close(self) -> None:
        with self._lock:
            segments, self._free, self._kept = self._free, [], 0
        for segment in segments:
            segment.close()


class WorkerLinks:
    """Which servers take this worker's shared memory, and the segments lent to them."""

    def __init__(self, enabled: bool, lent_bytes: int = LENT_BYTES):
        self.enabled = enabled and _posixshmem is not None
        share = _free_shared_bytes() // 4  # other workers on this host use it too
        self.lent_bytes = min(lent_bytes, share)
        self.pool = SegmentPool(min(KEEP_BYTES, share))
        self._servers: set[int] = set()
        self._lent = 0
        self._lent_lock = threading.Lock()  # lent from the I/O thread and from direct calls
        self.moved_bytes = 0  # array bytes that went through shared memory instead of a socket

    async def probe(self, server: int, ask: Callable[[dict], Awaitable[Any]]) -> bool:
        """Ask a server to read a token from a fresh segment of ours; use shared memory
        with it from now on if it could."""
        self._servers.discard(server)
        if not self.enabled:
            return False
        token = secrets.token_bytes(16)
        try:
            segment = Segment(len(token), tracked=False)  # gone in a moment: no tracker process for it
        except OSError as exc:
            log.info("no shared memory (%s): every array goes on the socket", exc)
            return False
        try:
            segment.buf[:len(token)] = token
            ok = await ask({"name": segment.name, "size": segment.size, "token": token}) is True
        except MultiversoError:
            ok = False  # an older server, or one that cannot map it
        finally:
            segment.close()
        if ok:
            self._servers.add(server)
        return ok

    def lend(self, server: int, op: str, parts: list[Part], buffers: list[memoryview]) -> Optional[Segment]:
        """A segment for one message, or None to send it all on the socket. An add's or
        set's arrays are copied in here; a get's must fit its reply."""
        if server not in self._servers:
            return None
        exact = op != "get" or all(p.dest is not None for p in parts)  # the arrays' sizes are known
        if exact:  # an add's arrays, or a reply's destinations
            lengths = [b.nbytes for b in buffers] if op != "get" else [d.nbytes for p in parts for d in p.dest]
            payload = sum(lengths)
        elif all(p.reply_bytes for p in parts):
            payload = sum(p.reply_bytes for p in parts)
        else:
            return None  # no bound on the reply's size
        if payload < MIN_BYTES:  # most messages: decided before any layout work
            return None
        # an estimated reply leaves room to align up to two arrays a part
        size = segment_bytes(layout(lengths)[1] if exact else payload + 2 * ALIGN * len(parts))
        with self._lent_lock:
            if self._lent + size > self.lent_bytes:
                return None
            self._lent += size
        try:
            segment = self.pool.take(size)
        except OSError as exc:  # /dev/shm is full, say: stop trying
            log.warning("cannot create shared memory (%s); large arrays go on the socket from now on", exc)
            self.enabled, self._servers = False, set()
            self._returned(size)
            return None
        self._returned(size - segment.size)  # a pooled segment may be larger than asked for
        self.moved_bytes += payload
        if op != "get":
            copy_in(segment.buf, buffers)
        return segment

    def give_back(self, segment: Segment) -> None:
        """The server replied: it is done with the segment."""
        self._returned(segment.size)
        self.pool.give_back(segment)

    def drop(self, segment: Segment) -> None:
        """No reply is coming (a timeout, a lost server): a server may still write into
        the segment, so it is never reused."""
        self._returned(segment.size)
        segment.close()

    def _returned(self, size: int) -> None:
        with self._lent_lock:
            self._lent -= size

    def close(self) -> None:
        self.pool.close()


# ---------------------------------------------------------------- the server's side


class ServerLinks:
    """The segments one connection's requests named, each mapped once; the least recently
    used are unmapped beyond limit_bytes. The server unmaps those the worker has dropped
    (unlinked) from time to time: they are never named again, and their memory lasts
    while any process maps them."""

    def __init__(self, limit_bytes: int = MAPPED_BYTES):
        self.limit_bytes = limit_bytes
        self._mapped: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._bytes = 0

    def segment(self, wire: Any) -> memoryview:
        """The memory of a request's segment ([name, bytes]); ProtocolError if unusable."""
        if not (isinstance(wire, list) and len(wire) == 2 and isinstance(wire[0], str) and type(wire[1]) is int):
            raise ProtocolError(f"shm must be [segment name, bytes], got {wire!r:.80}")
        name, size = wire
        if not _NAME.match(name):
            raise ProtocolError(f"{name!r:.40} is not a multiverso_py segment name")
        mapped = self._mapped.get(name)
        if mapped is None:
            if _posixshmem is None:
                raise ProtocolError("this server has no POSIX shared memory")
            try:
                mapped = _map(name, os.O_RDWR)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"cannot map shared memory segment {name}: {exc}") from None
            self._mapped[name] = mapped
            self._bytes += len(mapped)
            while self._bytes > self.limit_bytes and len(self._mapped) > 1:
                self._bytes -= len(self._mapped.popitem(last=False)[1])  # unmapped with its last view
        else:
            self._mapped.move_to_end(name)
        if not 0 < size <= len(mapped):
            raise ProtocolError(f"segment {name} has {len(mapped)} bytes, the request says {size}")
        return memoryview(mapped)[:size]

    def forget_unlinked(self) -> None:
        """Unmap the segments whose worker has unlinked them."""
        for name in [name for name in self._mapped if not _linked(name)]:
            self._bytes -= len(self._mapped.pop(name))  # unmapped with its last view

    def close(self) -> None:
        self._mapped.clear()
        self._bytes = 0


def _linked(name: str) -> bool:
    """Whether a segment still has its name (True where that cannot be told)."""
    try:
        os.close(_posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600))
    except FileNotFoundError:
        return False
    except OSError:
        pass
    return True


def probe_answer(body: dict) -> bool:
    """Whether this process can read the token a worker left in its probe segment."""
    links = ServerLinks()
    try:
        token = body["token"]
        return bytes(links.segment([body["name"], body["size"]])[:len(token)]) == token
    except ProtocolError:
        return False
    finally:
        links.close()


class ReplyArea:
    """Arrays for a get's reply, laid out in the worker's segment as place() lays out a
    reply, so that a shard can gather its rows straight there: place() then copies
    nothing. An array that does not fit comes from ordinary memory."""

    def __init__(self, segment: memoryview):
        self.segment = segment
        self.arrays: list[np.ndarray] = []  # handed out, in layout order
        self._end = 0

    def empty(self, shape: tuple, dtype: Any) -> np.ndarray:
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        start = self._end
        if start + nbytes > len(self.segment):
            return np.empty(shape, dtype)
        self._end = start + -(-nbytes // ALIGN) * ALIGN
        array = np.frombuffer(self.segment[start:start + nbytes], dtype).reshape(shape)
        self.arrays.append(array)
        return array

    def holds(self, arrays: Sequence[np.ndarray]) -> bool:
        """Whether these are exactly the arrays handed out, in order: a reply in place."""
        return len(arrays) == len(self.arrays) and all(a is b for a, b in zip(arrays, self.arrays))


def place(segment: memoryview, results: list[tuple[int, dict, list[np.ndarray]]],
          area: Optional[ReplyArea] = None) -> Optional[list]:
    """A get's reply arrays copied into the worker's segment: the results with views of
    them there, or None if they do not fit (the reply then goes on the socket). Arrays
    that `area` gathered there already are not copied again."""
    arrays = [np.ascontiguousarray(a) for _, _, part_arrays in results for a in part_arrays]
    if area is not None and area.arrays:
        if area.holds(arrays):
            return results
        owned = {id(a) for a in area.arrays}  # out of the way before the segment is written over
        arrays = [a.copy() if id(a) in owned else a for a in arrays]
    if layout([a.nbytes for a in arrays])[1] > len(segment):
        return None
    targets = iter(copy_in(segment, arrays))
    return [(pid, args, [np.frombuffer(next(targets), a.dtype).reshape(a.shape) for a in part_arrays])
            for pid, args, part_arrays in results]
