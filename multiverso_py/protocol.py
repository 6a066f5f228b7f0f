"""The wire protocol: message types, frame encoding and an incremental decoder. No I/O.

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

import enum
import math
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import msgpack
import numpy as np

from multiverso_py.errors import ProtocolError

MAGIC = b"MV"
VERSION = 1
PREFIX = struct.Struct("<2sBxII")


@dataclass(frozen=True)
class Limits:
    """Hard limits on what a peer may send; checked before any allocation."""

    max_header_bytes: int = 1 << 20
    max_buffers: int = 4096
    max_frame_bytes: int = 1 << 31
    max_array_dims: int = 8


DEFAULT_LIMITS = Limits()


class MsgType(enum.IntEnum):
    # worker -> server: table operations
    GET = 1
    ADD = 2
    SET = 3
    # replies, to any request
    REPLY = 10
    ERROR = 11
    MOVED = 12
    # control: node <-> scheduler, scheduler -> server
    REGISTER = 20
    BARRIER = 21
    CREATE_TABLE = 22
    TABLE_READY = 23
    SHARD_MAP = 24
    CREATE_SHARDS = 25
    HEARTBEAT = 26
    LEAVE = 27
    SHUTDOWN = 28


TABLE_OPS = frozenset({MsgType.GET, MsgType.ADD, MsgType.SET})

# Body schema per message type: field -> (accepted types, required).
_INT = (int,)
_Schema = dict[str, tuple[tuple[type, ...], bool]]
_TABLE_OP: _Schema = {
    "table": (_INT, True),
    "client": (_INT, True),
    "seq": (_INT, True),
    "map": (_INT, True),
    "parts": ((list,), True),
    "opts": ((dict,), False),
}
SCHEMAS: dict[MsgType, _Schema] = {
    MsgType.GET: _TABLE_OP,
    MsgType.ADD: _TABLE_OP,
    MsgType.SET: _TABLE_OP,
    MsgType.REPLY: {"parts": ((list,), False), "data": ((object,), False)},
    MsgType.ERROR: {"code": (_INT, True), "message": ((str,), True)},
    MsgType.MOVED: {"map": (_INT, True)},
    MsgType.REGISTER: {
        "role": ((str,), True),
        "host": ((str,), False),
        "port": (_INT, False),
        "rank": (_INT, False),
    },
    MsgType.BARRIER: {},
    MsgType.CREATE_TABLE: {"name": ((str,), True), "spec": ((dict,), True)},
    MsgType.TABLE_READY: {"table": (_INT, True)},
    MsgType.SHARD_MAP: {"table": (_INT, True)},
    MsgType.CREATE_SHARDS: {
        "table": (_INT, True),
        "spec": ((dict,), True),
        "layout": ((dict,), True),
        "partitions": ((list,), True),
        "map": (_INT, True),
    },
    MsgType.HEARTBEAT: {},
    MsgType.LEAVE: {},
    MsgType.SHUTDOWN: {},
}
# A part of a table operation or of its reply: one partition's slice of the request.
_PART_SCHEMA: _Schema = {
    "p": (_INT, True),
    "args": ((dict,), False),
    "arrays": ((list,), False),
}

ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int32", "int64", "uint8", "uint64", "bool"}
)


@dataclass
class Frame:
    """One decoded message: its type, request id, body and raw buffers."""

    type: MsgType
    req_id: int
    body: dict[str, Any]
    buffers: list[memoryview] = field(default_factory=list)


# ---------------------------------------------------------------- arrays in frames


def describe(array: np.ndarray) -> list:
    """The header descriptor of an array that travels as a buffer: [dtype, shape]."""
    return [array.dtype.name, list(array.shape)]


def as_buffer(array: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array, for sending without a copy."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return memoryview(array.reshape(-1).view(np.uint8))


def check_descriptor(desc: Any, nbytes: int, limits: Limits = DEFAULT_LIMITS) -> tuple[np.dtype, tuple]:
    """Validate an array descriptor against the size of the buffer that carries it."""
    if not (isinstance(desc, list) and len(desc) == 2):
        raise ProtocolError(f"array descriptor must be [dtype, shape], got {desc!r:.80}")
    name, shape = desc
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise ProtocolError(f"dtype {name!r:.40} is not allowed on the wire")
    if not isinstance(shape, list) or len(shape) > limits.max_array_dims:
        raise ProtocolError(f"array shape must be a list of at most {limits.max_array_dims} ints")
    if not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(f"array shape {shape!r:.80} has a negative or non-int size")
    dtype = np.dtype(name)
    if math.prod(n or 1 for n in shape) * dtype.itemsize > np.iinfo(np.intp).max:
        raise ProtocolError(f"array shape {shape!r:.80} is too big for numpy")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize
    if expected != nbytes:
        raise ProtocolError(f"array {name}{shape} needs {expected} bytes, buffer has {nbytes}")
    return dtype, tuple(shape)


def unpack_parts(body: dict, buffers: Sequence[memoryview], limits: Limits = DEFAULT_LIMITS) -> list[tuple[int, dict, list[np.ndarray]]]:
    """Split a message's parts into (partition, args, arrays); arrays view the buffers."""
    parts = body.get("parts") or []
    out = []
    cursor = 0
    for part in parts:
        _check_fields(part, _PART_SCHEMA, "part")
        arrays = []
        for desc in part.get("arrays", ()):
            if cursor >= len(buffers):
                raise ProtocolError("a part describes more arrays than the frame carries")
            buf = buffers[cursor]
            cursor += 1
            dtype, shape = check_descriptor(desc, buf.nbytes, limits)
            arrays.append(np.frombuffer(buf, dtype=dtype).reshape(shape))
        out.append((part["p"], part.get("args", {}), arrays))
    if cursor != len(buffers):
        raise ProtocolError(f"frame carries {len(buffers)} buffers, parts describe {cursor}")
    return out


def pack_parts(parts: Sequence[tuple[int, dict, Sequence[np.ndarray]]]) -> tuple[list, list[memoryview]]:
    """The inverse of unpack_parts: a parts list for the body plus the flat buffer list."""
    body_parts = []
    buffers: list[memoryview] = []
    for pid, args, arrays in parts:
        part: dict[str, Any] = {"p": pid}
        if args:
            part["args"] = args
        if arrays:
            part["arrays"] = [describe(a) for a in arrays]
            buffers.extend(as_buffer(a) for a in arrays)
        body_parts.append(part)
    return body_parts, buffers


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
    lengths = [memoryview(b).nbytes for b in buffers]
    if len(header) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(header)} bytes exceeds {limits.max_header_bytes}")
    if len(lengths) > limits.max_buffers:
        raise ProtocolError(f"{len(lengths)} buffers exceed the limit of {limits.max_buffers}")
    total = PREFIX.size + 8 * len(lengths) + len(header) + sum(lengths)
    if total > limits.max_frame_bytes:
        raise ProtocolError(f"frame of {total} bytes exceeds {limits.max_frame_bytes}; split the request")
    head = PREFIX.pack(MAGIC, VERSION, len(header), len(lengths))
    if lengths:
        head += struct.pack(f"<{len(lengths)}Q", *lengths)
    chunks: list = [head + header]
    chunks.extend(b for b in buffers if memoryview(b).nbytes)
    return chunks


def encode_bytes(msg_type: MsgType, req_id: int, body: Optional[dict] = None, buffers: Sequence = ()) -> bytes:
    """A whole frame as one bytes object (tests and tools; the transport uses encode)."""
    return b"".join(bytes(c) for c in encode(msg_type, req_id, body, buffers))


# ---------------------------------------------------------------- validation


def _check_fields(obj: Any, schema: _Schema, what: str) -> None:
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a map, got {type(obj).__name__}")
    for key in obj:
        if key not in schema:
            raise ProtocolError(f"{what} has unknown field {key!r:.40}")
    for key, (types, required) in schema.items():
        if key not in obj:
            if required:
                raise ProtocolError(f"{what} lacks field {key!r}")
            continue
        value = obj[key]
        if types != (object,) and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
            raise ProtocolError(f"{what} field {key!r} must be {types[0].__name__}, got {type(value).__name__}")


def parse_header(data: bytes | memoryview) -> tuple[MsgType, int, dict]:
    """Decode and validate a msgpack header: (type, request id, body)."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict) or set(header) != {"t", "id", "b"}:
        raise ProtocolError("header must be a map with exactly the fields t, id, b")
    t, req_id, body = header["t"], header["id"], header["b"]
    if type(t) is not int or t not in MsgType._value2member_map_:
        raise ProtocolError(f"unknown message type {t!r:.40}")
    if type(req_id) is not int or not 0 <= req_id < 1 << 63:
        raise ProtocolError(f"request id {req_id!r:.40} is not a non-negative 63-bit int")
    msg_type = MsgType(t)
    _check_fields(body, SCHEMAS[msg_type], f"{msg_type.name} body")
    return msg_type, req_id, body


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
        if self._available() < head_len:
            return None
        lengths = list(struct.unpack_from(f"<{nbuf}Q", self._view, self._start + PREFIX.size))
        if head_len + sum(lengths) > self.limits.max_frame_bytes:
            raise ProtocolError(f"frame of {head_len + sum(lengths)} bytes exceeds {self.limits.max_frame_bytes}")
        header = self._view[self._start + head_len - header_len:self._start + head_len]
        msg_type, req_id, body = parse_header(header)
        self._start += head_len
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
