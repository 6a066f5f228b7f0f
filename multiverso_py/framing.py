"""Frames on the wire: encoding, and an incremental decoder. No I/O.

A frame is::

    prefix   b"MV", version u8, pad u8, header length u32, buffer count u32   (12 bytes)
    lengths  one u64 per buffer
    header   msgpack map {"t": message type, "id": request id, "b": body map}
    buffers  raw bytes, one after another (numpy arrays travel here, never in msgpack)

The decoder checks every limit before it allocates anything, validates the header
against the schema of its message type, and can receive buffers straight into memory
that the caller preallocated (a pending get's result array, say).
"""

from __future__ import annotations

import functools
import struct
from typing import Callable, Optional, Sequence

import msgpack
import numpy as np

from multiverso_py.errors import ProtocolError
from multiverso_py.protocol import DEFAULT_LIMITS, Frame, Limits, MsgType, parse_header

MAGIC = b"MV"
VERSION = 1
PREFIX = struct.Struct("<2sBxII")


@functools.lru_cache(maxsize=64)
def _lengths_format(count: int) -> struct.Struct:
    """The compiled layout of a frame's `count` buffer lengths (formatting it anew costs more)."""
    return struct.Struct(f"<{count}Q")


# ---------------------------------------------------------------- encoding


def encode(
    msg_type: MsgType,
    req_id: int,
    body: Optional[dict] = None,
    buffers: Sequence[memoryview] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> list:
    """A frame as a list of byte chunks for transport.writelines (buffers are not copied)."""
    header = msgpack.packb({"t": int(msg_type), "id": req_id, "b": body or {}}, use_bin_type=True)
    views = [b if type(b) is memoryview else memoryview(b) for b in buffers]
    lengths = [v.nbytes for v in views]
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {limits.max_header_bytes}")
    if len(lengths) > limits.max_buffers:
        raise ProtocolError(f"{len(lengths)} buffers exceed the limit of {limits.max_buffers}")
    total = PREFIX.size + 8 * len(lengths) + len(header) + sum(lengths)
    if total > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {total} bytes exceeds {limits.max_frame_bytes}; split the request")
    head = PREFIX.pack(MAGIC, VERSION, len(header), len(lengths))
    if lengths:
        head += _lengths_format(len(lengths)).pack(*lengths)
    return [head + header, *(v for v in views if v.nbytes)]


def encode_bytes(msg_type: MsgType, req_id: int, body: Optional[dict] = None, buffers: Sequence = ()) -> bytes:
    """A whole frame as one bytes object (tests and tools; the transport uses encode)."""
    return b"".join(bytes(c) for c in encode(msg_type, req_id, body, buffers))


# ---------------------------------------------------------------- incremental decoding

# Called with a decoded header and buffer lengths; returns writable memoryviews of exactly
# those lengths to receive into (zero-copy), or None to let the reader allocate.
Allocator = Callable[[MsgType, int, dict, list[int]], Optional[list[memoryview]]]

_DIRECT_MIN = 64 * 1024  # a buffer with this much left to receive is read into directly


class FrameReader:
    """Turns a byte stream into Frames. Drive it with get_buffer()/buffer_updated(n), the
    asyncio.BufferedProtocol interface, or feed(bytes) in tests. Raises ProtocolError on
    malformed input; the caller must then drop the connection, whose stream is lost."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, allocator: Optional[Allocator] = None, staging: int = 256 * 1024):
        self.limits = limits
        self.allocator = allocator
        self._staging = bytearray(max(staging, PREFIX.size))
        self._view = memoryview(self._staging)
        self._start = 0  # unread data lies in _staging[_start:_end]
        self._end = 0
        self._frame: Optional[Frame] = None  # the frame whose buffers are being received
        self._pending_lengths: list[int] = []
        self._targets: list[memoryview] = []
        self._filled = 0  # bytes received into the current target
        self._direct = False  # get_buffer returns the current target itself

    # -- BufferedProtocol interface
    def get_buffer(self, sizehint: int = -1) -> memoryview:
        if self._direct:
            return self._targets[len(self._frame.buffers)][self._filled:]
        if self._end == len(self._staging):
            self._compact()
        return self._view[self._end:]

    def buffer_updated(self, nbytes: int) -> list[Frame]:
        if self._direct:
            self._filled += nbytes
            target = self._targets[len(self._frame.buffers)]
            if self._filled < target.nbytes:
                return []
            self._direct = False
            done = self._finish_buffer()
            frames = [done] if done else []
        else:
            self._end += nbytes
            frames = []
        while True:
            frame = self._step()
            if frame is None:
                return frames
            frames.append(frame)

    def feed(self, data: bytes) -> list[Frame]:
        """Push bytes in (for tests and tools): the frames they complete."""
        frames = []
        data = memoryview(data)
        while data:
            buf = self.get_buffer()
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            data = data[n:]
            frames.extend(self.buffer_updated(n))
        return frames

    @property
    def mid_frame(self) -> bool:
        """Whether part of a frame has arrived but not all of it."""
        return self._frame is not None or self._available() > 0

    # -- state machine
    def _available(self) -> int:
        return self._end - self._start

    def _compact(self) -> None:
        n = self._available()
        if self._start:
            self._view[:n] = self._view[self._start:self._end]
            self._start, self._end = 0, n

    def _ensure_capacity(self, n: int) -> None:
        if n > len(self._staging):
            grown = bytearray(n)
            grown[: self._available()] = self._view[self._start:self._end]
            self._end = self._available()
            self._start = 0
            self._staging = grown
            self._view = memoryview(grown)

    def _step(self) -> Optional[Frame]:
        """Make as much progress as the staged bytes allow; a Frame when one completes."""
        if self._frame is not None:
            return self._receive_staged_buffer()
        if self._available() < PREFIX.size:
            return None
        magic, version, header_len, nbuf = PREFIX.unpack_from(self._view, self._start)
        if magic != MAGIC or version != VERSION:
            raise ProtocolError("bad frame prefix: not a multiverso_py peer or wrong version")
        if header_len > self.limits.max_header_bytes:
            raise ProtocolError(f"header of {header_len} bytes exceeds {self.limits.max_header_bytes}")
        if nbuf > self.limits.max_buffers:
            raise ProtocolError(f"{nbuf} buffers exceed the limit of {self.limits.max_buffers}")
        head_len = PREFIX.size + 8 * nbuf + header_len
        self._ensure_capacity(head_len)
        start = self._start
        if self._end - start < head_len:
            return None
        lengths = list(_lengths_format(nbuf).unpack_from(self._view, start + PREFIX.size)) if nbuf else []
        if head_len + sum(lengths) > self.limits.max_frame_bytes:
            raise ProtocolError(f"frame of {head_len + sum(lengths)} bytes exceeds {self.limits.max_frame_bytes}")
        msg_type, req_id, body = parse_header(self._view[start + head_len - header_len:start + head_len])
        self._start = start + head_len
        frame = Frame(msg_type, req_id, body)
        if not lengths:
            return frame
        targets = self.allocator(msg_type, req_id, body, lengths) if self.allocator else None
        if targets is None or [t.nbytes for t in targets] != lengths:
            targets = [memoryview(np.empty(n, np.uint8)) for n in lengths]
        self._frame, self._targets, self._filled = frame, targets, 0
        return self._receive_staged_buffer()

    def _receive_staged_buffer(self) -> Optional[Frame]:
        """Copy staged bytes into the current target; switch to direct reads for big ones."""
        while self._frame is not None:
            target = self._targets[len(self._frame.buffers)]
            n = min(target.nbytes - self._filled, self._available())
            if n:
                target[self._filled:self._filled + n] = self._view[self._start:self._start + n]
                self._filled += n
                self._start += n
            if self._filled < target.nbytes:
                if target.nbytes - self._filled >= _DIRECT_MIN:
                    self._direct = True
                self._start = self._end = 0 if self._available() == 0 else self._start
                return None
            done = self._finish_buffer()
            if done is not None:
                return done
        return None

    def _finish_buffer(self) -> Optional[Frame]:
        frame = self._frame
        frame.buffers.append(self._targets[len(frame.buffers)])
        self._filled = 0
        if len(frame.buffers) < len(self._targets):
            return None
        self._frame, self._targets = None, []
        return frame
