"""The wire protocol's vocabulary: message types, the schema of each message's header,
hard limits, and how arrays travel as out-of-band buffers. No I/O; the byte layout of
a frame and its incremental decoder live in multiverso_py.framing."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence, Union

import msgpack
import numpy as np

from multiverso_py.errors import ProtocolError


@dataclass(frozen=True)
class Limits:
    """Hard limits on what a peer may send; checked before any allocation."""

    max_header_bytes: int = 1 << 20
    max_buffers: int = 4096
    max_frame_bytes: int = 1 << 31
    max_array_dims: int = 8


DEFAULT_LIMITS = Limits()
# What a peer may send before it has authenticated: a handshake frame and nothing big.
HANDSHAKE_LIMITS = Limits(max_header_bytes=1024, max_buffers=0, max_frame_bytes=2048)


class MsgType(enum.IntEnum):
    # worker -> server: table operations
    GET = 1
    ADD = 2
    SET = 3
    ADD_GET = 4  # an add, then a get of the same rows in the same turn: a push-pull in one round trip
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
    # consistency: worker -> server (a worker finished a clock), scheduler -> server
    CLOCK = 29
    WORKER_LEFT = 30
    # connection set-up: acceptor -> connector (a nonce when a token is required), and the answer
    HELLO = 31
    AUTH = 32
    # checkpoints: worker -> scheduler; scheduler -> workers (pause, resume) and servers (snapshot)
    CHECKPOINT = 33
    PAUSE = 34
    RESUME = 35
    SNAPSHOT = 36
    SERVER_MOVED = 37  # scheduler -> workers: a lost server's replacement is at this address
    WORKER_JOINED = 38  # scheduler -> servers: a worker that was lost rejoined (a restart with its id)
    SERVER_LOST = 39  # scheduler -> workers: a server stopped answering; drop the connection to it
    SHM_PROBE = 40  # worker -> server: can you map my shared memory? (same host; see multiverso_py.shm)


# A table call's message type by the call's name.
TABLE_OPS = {"get": MsgType.GET, "add": MsgType.ADD, "set": MsgType.SET, "add_get": MsgType.ADD_GET}

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
    "shm": ((list,), False),  # [segment, bytes]: arrays travel in the worker's shared memory
}
SCHEMAS: dict[MsgType, _Schema] = {
    MsgType.GET: _TABLE_OP,
    MsgType.ADD: _TABLE_OP,
    MsgType.SET: _TABLE_OP,
    MsgType.ADD_GET: _TABLE_OP,
    MsgType.REPLY: {"parts": ((list,), False), "data": ((object,), False), "shm": ((bool,), False)},
    MsgType.ERROR: {"code": (_INT, True), "message": ((str,), True)},
    MsgType.MOVED: {"map": (_INT, True)},
    MsgType.REGISTER: {
        "role": ((str,), True),
        "host": ((str,), False),
        "port": (_INT, False),
        "rank": (_INT, False),
        "checkpoint_dir": ((str,), False),  # a server asking for periodic checkpoints of the job
        "checkpoint_every": ((float, int), False),
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
        "workers": ((list,), True),  # the live workers, whose clocks the table's consistency counts
        "restore": ((dict,), False),  # fill the partitions from a checkpoint (see server_checkpoint)
    },
    MsgType.HEARTBEAT: {},
    MsgType.LEAVE: {},
    MsgType.SHUTDOWN: {},
    MsgType.CLOCK: {"client": (_INT, True)},
    MsgType.WORKER_LEFT: {"worker": (_INT, True)},
    MsgType.HELLO: {
        "nonce": ((bytes,), False),
        "local": ((str,), False),  # a server's abstract Unix socket, for workers on its host (see multiverso_py.direct)
    },
    MsgType.AUTH: {"mac": ((bytes,), True)},
    MsgType.CHECKPOINT: {"path": ((str,), True)},
    MsgType.PAUSE: {},
    MsgType.RESUME: {},
    MsgType.SNAPSHOT: {"file": ((str,), True)},
    MsgType.SERVER_MOVED: {"server": (_INT, True), "host": ((str,), True), "port": (_INT, True)},
    MsgType.WORKER_JOINED: {"worker": (_INT, True)},
    MsgType.SERVER_LOST: {"server": (_INT, True)},
    MsgType.SHM_PROBE: {"name": ((str,), True), "size": (_INT, True), "token": ((bytes,), True)},
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

_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_INTP_MAX = int(np.iinfo(np.intp).max)


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
    return [_NAMES.get(array.dtype) or array.dtype.name, list(array.shape)]  # dtype.name is slow


def as_buffer(array: np.ndarray) -> memoryview:
    """A flat byte view of a C-contiguous array, for sending without a copy."""
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    return memoryview(array).cast("B") if array.size else memoryview(b"")  # cast refuses zeros in the shape


def parse_descriptor(desc: Any, limits: Limits = DEFAULT_LIMITS) -> tuple[np.dtype, tuple, int]:
    """Validate an array descriptor: (dtype, shape, bytes the array takes)."""
    if not (isinstance(desc, list) and len(desc) == 2):
        raise ProtocolError(f"array descriptor must be [dtype, shape], got {desc!r:.80}")
    name, shape = desc
    dtype = _DTYPES.get(name) if isinstance(name, str) else None
    if dtype is None:
        raise ProtocolError(f"dtype {name!r:.40} is not allowed on the wire")
    if not isinstance(shape, list) or len(shape) > limits.max_array_dims:
        raise ProtocolError(f"array shape must be a list of at most {limits.max_array_dims} ints")
    for n in shape:
        if type(n) is not int or n < 0:
            raise ProtocolError(f"array shape {shape!r:.80} has a negative or non-int size")
    nbytes = math.prod(shape) * dtype.itemsize
    # numpy must be able to make the array, even one of no elements
    if (nbytes or math.prod(n or 1 for n in shape) * dtype.itemsize) > _INTP_MAX:
        raise ProtocolError(f"array shape {shape!r:.80} is too big for numpy")
    return dtype, tuple(shape), nbytes


# Arrays in a frame come as its buffers; arrays elsewhere (in shared memory, see
# multiverso_py.shm) as a function that lays them out from their sizes.
Buffers = Union[Sequence[memoryview], Callable[[list[int]], Sequence[memoryview]]]


def unpack_parts(body: dict, buffers: Buffers,
                 limits: Limits = DEFAULT_LIMITS) -> list[tuple[int, dict, list[np.ndarray]]]:
    """Split a message's parts into (partition, args, arrays); arrays view the buffers.
    Every descriptor is parsed once, before any buffer is touched."""
    described = []
    for part in body.get("parts") or ():
        _PART_CHECKER.check(part, _part)
        described.append((part["p"], part.get("args", {}), [parse_descriptor(d, limits) for d in part.get("arrays", ())]))
    lengths = [n for _, _, arrays in described for _, _, n in arrays]
    if len(lengths) > limits.max_buffers:
        raise ProtocolError(f"{len(lengths)} arrays exceed the limit of {limits.max_buffers}")
    if callable(buffers):
        buffers = buffers(lengths)
    if len(buffers) != len(lengths):
        raise ProtocolError(f"the frame carries {len(buffers)} buffers, its parts describe {len(lengths)} arrays")
    out = []
    cursor = iter(buffers)
    for pid, args, arrays in described:
        views = []
        for (dtype, shape, expected), buf in zip(arrays, cursor):
            if buf.nbytes != expected:
                raise ProtocolError(f"array {dtype.name}{list(shape)} needs {expected} bytes, buffer has {buf.nbytes}")
            views.append(np.ndarray(shape, dtype, buf))  # a view, as np.frombuffer(...).reshape() but 2x faster
        out.append((pid, args, views))
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


# ---------------------------------------------------------------- validation


class _Checker:
    """A schema compiled for the common case, a well-formed map: one pass that tests the
    exact type of each value. Anything else takes the schema itself, field by field,
    which says what is wrong (or accepts what isinstance does, a subclass say)."""

    def __init__(self, schema: _Schema):
        self.schema = schema
        self.names = frozenset(schema)
        self.required = frozenset(key for key, (_, required) in schema.items() if required)
        self.exact = {key: None if types == (object,) else frozenset(types) for key, (types, _) in schema.items()}

    def check(self, obj: Any, what: Callable[[], str]) -> None:
        """Raise ProtocolError, with `what()` naming the map, unless obj fits the schema."""
        if type(obj) is dict and obj.keys() <= self.names and obj.keys() >= self.required:
            exact = self.exact
            for key, value in obj.items():
                types = exact[key]
                if types is not None and type(value) not in types:
                    break
            else:
                return
        _check_fields(obj, self.schema, what())


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


_BODY_CHECKERS = {msg_type: _Checker(schema) for msg_type, schema in SCHEMAS.items()}
_PART_CHECKER = _Checker(_PART_SCHEMA)
_MSG_TYPES = {int(t): t for t in MsgType}
_HEADER_FIELDS = frozenset({"t", "id", "b"})


def _part() -> str:
    return "part"


def parse_header(data: bytes | memoryview) -> tuple[MsgType, int, dict]:
    """Decode and validate a msgpack header: (type, request id, body)."""
    try:
        header = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ProtocolError(f"header is not valid msgpack: {exc}") from None
    if type(header) is not dict or header.keys() != _HEADER_FIELDS:
        raise ProtocolError("header must be a map with exactly the fields t, id, b")
    t, req_id, body = header["t"], header["id"], header["b"]
    msg_type = _MSG_TYPES.get(t) if type(t) is int else None
    if msg_type is None:
        raise ProtocolError(f"unknown message type {t!r:.40}")
    if type(req_id) is not int or not 0 <= req_id < 1 << 63:
        raise ProtocolError(f"request id {req_id!r:.40} is not a non-negative 63-bit int")
    _BODY_CHECKERS[msg_type].check(body, lambda: f"{msg_type.name} body")
    return msg_type, req_id, body
