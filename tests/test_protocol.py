"""Pure unit tests for the wire protocol (multiverso_py.protocol) and the error-code table.

No sockets and no processes: frames are built with encode/encode_bytes (or by hand, for
malformed input) and decoded with FrameReader, driven the way asyncio's BufferedProtocol
drives it or through feed().
"""

from __future__ import annotations

import itertools
import math
import struct
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from multiverso_py import errors
from multiverso_py.errors import (
    ErrorCode,
    MultiversoError,
    ProtocolError,
    RemoteError,
    code_for,
    exception_for,
)
from multiverso_py.framing import MAGIC, PREFIX, VERSION, FrameReader, encode, encode_bytes
from multiverso_py.protocol import (
    ALLOWED_DTYPES,
    DEFAULT_LIMITS,
    SCHEMAS,
    Frame,
    Limits,
    MsgType,
    pack_parts,
    parse_header,
    unpack_parts,
)

INT_MIN = -(2**63)
UINT_MAX = 2**64 - 1
REQ_ID_MAX = 2**63 - 1
BIG = 1 << 20  # well above the reader's 64 KiB direct-receive threshold

def check_descriptor(desc: Any, nbytes: int, limits: Limits = DEFAULT_LIMITS) -> tuple[np.dtype, tuple]:
    """One array descriptor checked as a message's part is, against a buffer of nbytes:
    the dtype and shape of the array unpacked."""
    [(_, _, [array])] = unpack_parts({"parts": [{"p": 0, "arrays": [desc]}]}, [memoryview(bytearray(nbytes))], limits)
    return array.dtype, array.shape


# Small limits for fuzzing, so that a corrupted length can never make the reader allocate much.
SMALL = Limits(max_header_bytes=4096, max_buffers=16, max_frame_bytes=1 << 16, max_array_dims=4)

FAST = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ---------------------------------------------------------------- helpers


def raw_frame(
    header: bytes,
    lengths: Sequence[int] = (),
    payload: bytes = b"",
    *,
    magic: bytes = MAGIC,
    version: int = VERSION,
    header_len: int | None = None,
    nbuf: int | None = None,
) -> bytes:
    """A frame built by hand, so that any field can lie about the rest."""
    hl = len(header) if header_len is None else header_len
    nb = len(lengths) if nbuf is None else nbuf
    lens = struct.pack(f"<{len(lengths)}Q", *lengths) if lengths else b""
    return PREFIX.pack(magic, version, hl, nb) + lens + header + payload


def pack_header(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def header_for(t: Any = int(MsgType.HEARTBEAT), req_id: Any = 1, body: Any = None) -> bytes:
    return pack_header({"t": t, "id": req_id, "b": {} if body is None else body})


def feed_split(reader: FrameReader, data: bytes, cuts: Sequence[int]) -> list[Frame]:
    """feed() the stream in pieces cut at the given offsets."""
    frames: list[Frame] = []
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(data)}), len(data)]
    for lo, hi in itertools.pairwise(bounds):
        frames.extend(reader.feed(data[lo:hi]))
    return frames


def drive(reader: FrameReader, data: bytes, sizes: Sequence[int]) -> list[Frame]:
    """What asyncio.BufferedProtocol does: receive at most `size` bytes into get_buffer()."""
    frames: list[Frame] = []
    pos = 0
    for size in itertools.cycle(sizes):
        if pos >= len(data):
            break
        buf = reader.get_buffer(-1)
        assert len(buf) > 0, "get_buffer must never offer an empty buffer"
        n = min(len(buf), size, len(data) - pos)
        buf[:n] = data[pos:pos + n]
        pos += n
        frames.extend(reader.buffer_updated(n))
    return frames


def decode_one(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Frame:
    frames = FrameReader(limits).feed(data)
    assert len(frames) == 1
    return frames[0]


def assert_same(a: Any, b: Any) -> None:
    """Equality that also tells True from 1, bytes from str and list from tuple."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def assert_bitwise_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    assert got.tobytes() == np.ascontiguousarray(want).tobytes()


# ---------------------------------------------------------------- strategies

# msgpack values that survive a round trip unchanged (no tuples, no NaN, str keys only).
_leaves = (
    st.none()
    | st.booleans()
    | st.integers(INT_MIN, UINT_MAX)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
values = st.recursive(
    _leaves,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
int_values = st.integers(INT_MIN, UINT_MAX)


def field_strategy(types: tuple[type, ...]) -> st.SearchStrategy[Any]:
    """A strategy for values a schema field accepts; fails loudly on a type it doesn't know."""
    if types == (object,):
        return values
    by_type = {
        int: int_values,
        str: st.text(max_size=12),
        list: st.lists(values, max_size=4),
        dict: st.dictionaries(st.text(max_size=6), values, max_size=4),
        bytes: st.binary(max_size=40),
        float: st.floats(allow_nan=False),
        bool: st.booleans(),
    }
    return st.one_of([by_type[t] for t in types])


def body_strategy(msg_type: MsgType) -> st.SearchStrategy[dict]:
    schema = SCHEMAS[msg_type]
    required = {k: field_strategy(types) for k, (types, req) in schema.items() if req}
    optional = {k: field_strategy(types) for k, (types, req) in schema.items() if not req}
    return st.fixed_dictionaries(required, optional=optional)


@st.composite
def arrays(draw: st.DrawFn, max_side: int = 5) -> np.ndarray:
    """Random arrays of every wire dtype, 0-D to 3-D, zero-size included, any bit pattern."""
    dtype = np.dtype(draw(st.sampled_from(sorted(ALLOWED_DTYPES))))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=3)))
    nbytes = math.prod(shape) * dtype.itemsize
    raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
    if dtype == np.bool_:
        raw = bytes(b & 1 for b in raw)
    arr = np.frombuffer(raw, dtype).reshape(shape).copy()
    if arr.ndim >= 2 and draw(st.booleans()):
        arr = arr.T  # not C-contiguous: pack_parts must still send it in C order
    elif arr.ndim == 1 and draw(st.booleans()):
        arr = arr[::2]  # strided view: must be sent as its logical contents
    return arr


@dataclass
class Msg:
    type: MsgType
    req_id: int
    body: dict
    parts: list | None  # (pid, args, arrays) when the body carries parts, else None
    buffers: list[memoryview]


@st.composite
def messages(draw: st.DrawFn, max_side: int = 5, max_parts: int = 3) -> Msg:
    msg_type = draw(st.sampled_from(list(MsgType)))
    req_id = draw(st.integers(0, REQ_ID_MAX))
    body = draw(body_strategy(msg_type))
    if "parts" in SCHEMAS[msg_type]:
        # Parts come from pack_parts; an optional "parts" (REPLY) stays absent when drawn absent.
        if "parts" not in body:
            return Msg(msg_type, req_id, body, [], [])
        parts = draw(
            st.lists(
                st.tuples(
                    int_values,
                    st.dictionaries(st.text(max_size=6), values, max_size=3),
                    st.lists(arrays(max_side), max_size=3),
                ),
                max_size=max_parts,
            )
        )
        body["parts"], buffers = pack_parts(parts)
        return Msg(msg_type, req_id, body, parts, buffers)
    # Other types: the frame layer still carries opaque buffers.
    raw = draw(st.lists(st.binary(max_size=64), max_size=3))
    return Msg(msg_type, req_id, body, None, [memoryview(b) for b in raw])


def wire_of(msg: Msg) -> bytes:
    return encode_bytes(msg.type, msg.req_id, msg.body, msg.buffers)


def check_frame(frame: Frame, msg: Msg) -> None:
    assert isinstance(frame.type, MsgType)
    assert frame.type == msg.type
    assert type(frame.req_id) is int and frame.req_id == msg.req_id
    assert_same(frame.body, msg.body)
    if msg.parts is None:
        assert [bytes(b) for b in frame.buffers] == [bytes(b) for b in msg.buffers]
        return
    unpacked = unpack_parts(frame.body, frame.buffers)
    assert len(unpacked) == len(msg.parts)
    for (pid, args, got), (want_pid, want_args, want) in zip(unpacked, msg.parts):
        assert_same(pid, want_pid)
        assert_same(args, want_args)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_bitwise_equal(g, w)


def minimal_body(msg_type: MsgType) -> dict:
    """A body with just the required fields, each with a plain valid value."""
    plain = {int: 1, str: "x", list: [], dict: {}, bytes: b"x", float: 1.5, bool: True, object: None}
    return {k: plain[types[0]] for k, (types, req) in SCHEMAS[msg_type].items() if req}


# ---------------------------------------------------------------- round trips


@FAST
@given(
    msgs=st.lists(messages(), min_size=1, max_size=4),
    data=st.data(),
    use_drive=st.booleans(),
)
def test_round_trip_random_splits(msgs: list[Msg], data: st.DataObject, use_drive: bool) -> None:
    # Several frames back to back, cut anywhere, through a staging buffer of any size.
    # Tiny staging sizes only under drive(), which fails cleanly (feed would spin) if the
    # reader ever offers an empty buffer.
    stream = b"".join(wire_of(m) for m in msgs)
    staging = data.draw(st.sampled_from(([0, 1, 11] if use_drive else []) + [12, 13, 64, 256 * 1024]))
    reader = FrameReader(staging=staging)
    if use_drive:
        sizes = data.draw(st.lists(st.integers(1, 4096), min_size=1, max_size=8))
        frames = drive(reader, stream, sizes)
    else:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
        frames = feed_split(reader, stream, cuts)
    assert len(frames) == len(msgs)
    for frame, msg in zip(frames, msgs):
        check_frame(frame, msg)
    # Nothing left over: the reader is back at a frame boundary and decodes the next frame.
    tail = Msg(MsgType.ERROR, 77, {"code": 1, "message": "next"}, None, [memoryview(b"t")])
    [frame] = reader.feed(wire_of(tail))
    check_frame(frame, tail)


@pytest.mark.parametrize("staging", [0, 1, 11, 12])
def test_tiny_staging_still_offers_room(staging: int) -> None:
    # asyncio refuses an empty buffer from get_buffer(); a staging area smaller than the
    # prefix must not leave the reader unable to take the next byte.
    msgs = [Msg(MsgType.HEARTBEAT, 1, {}, None, []), Msg(MsgType.ERROR, 2, {"code": 1, "message": "m"}, None, [memoryview(b"xyz")])]
    frames = drive(FrameReader(staging=staging), b"".join(wire_of(m) for m in msgs), [5, 1, 64])
    assert len(frames) == 2
    for frame, msg in zip(frames, msgs):
        check_frame(frame, msg)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(messages(max_side=2, max_parts=2), min_size=1, max_size=3))
def test_round_trip_one_byte_at_a_time(msgs: list[Msg]) -> None:
    # Each frame must come out exactly when its last byte arrives, not before or after.
    wires = [wire_of(m) for m in msgs]
    stream = b"".join(wires)
    ends = set(itertools.accumulate(len(w) for w in wires))
    reader = FrameReader()
    frames: list[Frame] = []
    for i in range(len(stream)):
        out = reader.feed(stream[i:i + 1])
        assert len(out) == (1 if i + 1 in ends else 0)
        frames.extend(out)
    for frame, msg in zip(frames, msgs):
        check_frame(frame, msg)


def test_encode_layout() -> None:
    # The documented byte layout, checked field by field; buffers are passed through uncopied.
    a, empty, c = memoryview(b"abc"), memoryview(b""), memoryview(bytearray(b"wxyz"))
    body = {"table": 3, "client": 4, "seq": 5, "map": 6, "parts": []}
    chunks = encode(MsgType.ADD, 7, body, [a, empty, c])
    assert len(chunks) == 3 and chunks[1] is a and chunks[2] is c  # empty buffer not sent
    wire = b"".join(bytes(x) for x in chunks)
    assert wire == encode_bytes(MsgType.ADD, 7, body, [a, empty, c])
    assert PREFIX.size == 12
    magic, version, header_len, nbuf = PREFIX.unpack_from(wire)
    assert (magic, version, nbuf) == (b"MV", 1, 3)
    assert wire[3] == 0  # pad byte
    assert struct.unpack_from("<3Q", wire, 12) == (3, 0, 4)
    header = msgpack.unpackb(wire[36:36 + header_len], raw=False)
    assert header == {"t": 2, "id": 7, "b": body}
    assert wire[36 + header_len:] == b"abcwxyz"


def test_encode_without_body_or_buffers() -> None:
    wire = encode_bytes(MsgType.BARRIER, 0)
    frame = decode_one(wire)
    assert (frame.type, frame.req_id, frame.body, frame.buffers) == (MsgType.BARRIER, 0, {}, [])
    assert len(wire) == PREFIX.size + len(header_for(int(MsgType.BARRIER), 0, {}))


@pytest.mark.parametrize("req_id", [0, 1, REQ_ID_MAX])
def test_request_id_bounds_accepted(req_id: int) -> None:
    assert decode_one(encode_bytes(MsgType.HEARTBEAT, req_id)).req_id == req_id


@pytest.mark.parametrize("msg_type", list(MsgType))
def test_minimal_body_of_every_type_decodes(msg_type: MsgType) -> None:
    # Baseline for the schema-violation tests below: the unmodified body is accepted.
    body = minimal_body(msg_type)
    frame = decode_one(encode_bytes(msg_type, 9, body))
    assert frame.type is msg_type and frame.body == body


def test_unpack_parts_views_buffers_without_copy() -> None:
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    parts, buffers = pack_parts([(0, {}, [a])])
    frame = decode_one(encode_bytes(MsgType.SET, 1, {"table": 0, "client": 0, "seq": 0, "map": 0, "parts": parts}, buffers))
    [(pid, args, [got])] = unpack_parts(frame.body, frame.buffers)
    assert (pid, args) == (0, {})
    assert_bitwise_equal(got, a)
    assert np.shares_memory(got, np.asarray(frame.buffers[0]))


# ---------------------------------------------------------------- large buffers


def _big_stream() -> tuple[bytes, list[Msg]]:
    rng = np.random.default_rng(1234)
    big = rng.random(BIG // 4, dtype=np.float32)  # 1 MiB
    mid = rng.integers(INT_MIN, REQ_ID_MAX, size=12_500, dtype=np.int64)  # 100,000 bytes
    tiny = np.array([1, 2, 3], dtype=np.uint8)
    empty = np.empty((0, 4), dtype=np.float64)
    parts = [(0, {}, [big, empty]), (1, {"k": 1}, [mid, tiny])]
    body_parts, buffers = pack_parts(parts)
    msgs = [
        Msg(MsgType.HEARTBEAT, 1, {}, None, []),
        Msg(MsgType.REPLY, 2, {"parts": body_parts}, parts, buffers),
        Msg(MsgType.ERROR, 3, {"code": 2, "message": "after"}, None, [memoryview(b"tail")]),
    ]
    return b"".join(wire_of(m) for m in msgs), msgs


@pytest.mark.parametrize("chunk", [1 << 30, 1 << 16, 4093, 300_001])
@pytest.mark.parametrize("use_drive", [True, False])
def test_large_buffers_round_trip(chunk: int, use_drive: bool) -> None:
    # Big buffers (direct path) mixed with small and empty ones, between two small frames.
    stream, msgs = _big_stream()
    reader = FrameReader()
    if use_drive:
        frames = drive(reader, stream, [chunk])
    else:
        frames = feed_split(reader, stream, range(chunk, len(stream), chunk))
    assert len(frames) == 3
    for frame, msg in zip(frames, msgs):
        check_frame(frame, msg)


def test_large_buffer_takes_direct_path() -> None:
    # Once the header is in, the reader offers the whole rest of the big buffer, which is
    # more than its staging area holds: the transport receives straight into the target.
    src = np.random.default_rng(5).random(BIG // 8)  # float64, 1 MiB
    body_parts, buffers = pack_parts([(0, {}, [src])])
    wire = encode_bytes(MsgType.REPLY, 1, {"parts": body_parts}, buffers)
    head = len(wire) - BIG
    reader = FrameReader()
    assert reader.feed(wire[:head + 10]) == []
    view = reader.get_buffer()
    assert len(view) == BIG - 10
    view[:] = wire[head + 10:]
    frames = reader.buffer_updated(len(view))
    assert len(frames) == 1
    assert np.shares_memory(np.asarray(frames[0].buffers[0]), np.asarray(view))
    [(_, _, [got])] = unpack_parts(frames[0].body, frames[0].buffers)
    assert_bitwise_equal(got, src)


@pytest.mark.parametrize("chunk", [1 << 30, 1 << 16, 7919])
def test_allocator_receives_into_preallocated_memory(chunk: int) -> None:
    rng = np.random.default_rng(7)
    big = rng.random(BIG // 8)  # direct path
    small = rng.integers(0, 100, size=10, dtype=np.int32)  # staged path
    body_parts, buffers = pack_parts([(0, {}, [big]), (1, {}, [small])])
    body = {"parts": body_parts}
    wire = encode_bytes(MsgType.REPLY, 5, body, buffers)
    dest_big, dest_small = np.zeros_like(big), np.zeros_like(small)
    targets = [memoryview(d.reshape(-1).view(np.uint8)) for d in (dest_big, dest_small)]
    calls: list[tuple] = []

    def allocator(t: MsgType, rid: int, b: dict, lengths: list[int]) -> list[memoryview]:
        calls.append((t, rid, b, lengths))
        return targets

    reader = FrameReader(allocator=allocator)
    head = len(wire) - big.nbytes - small.nbytes
    assert reader.feed(wire[:head + 3]) == []
    # Mid-frame, the reader hands out the caller's own memory to receive into.
    assert np.shares_memory(np.asarray(reader.get_buffer()), dest_big)
    frames = drive(reader, wire[head + 3:], [chunk])
    assert len(calls) == 1
    assert calls[0] == (MsgType.REPLY, 5, body, [big.nbytes, small.nbytes])
    [frame] = frames
    assert frame.buffers[0] is targets[0] and frame.buffers[1] is targets[1]
    assert np.shares_memory(np.asarray(frame.buffers[0]), dest_big)
    assert np.shares_memory(np.asarray(frame.buffers[1]), dest_small)
    assert_bitwise_equal(dest_big, big)
    assert_bitwise_equal(dest_small, small)
    unpacked = unpack_parts(frame.body, frame.buffers)
    assert np.shares_memory(unpacked[0][2][0], dest_big)
    assert np.shares_memory(unpacked[1][2][0], dest_small)


@pytest.mark.parametrize("bad", ["wrong_size", "too_few", "none"])
def test_allocator_unusable_answer_falls_back(bad: str) -> None:
    # A wrong-sized answer must not be written into (it would overrun or truncate).
    src = np.random.default_rng(9).random(BIG // 8)
    body_parts, buffers = pack_parts([(0, {}, [src]), (1, {}, [src[:3]])])
    wire = encode_bytes(MsgType.REPLY, 5, {"parts": body_parts}, buffers)
    dest = np.zeros(BIG // 8 + 1)
    view = memoryview(dest.view(np.uint8))
    answers = {
        "wrong_size": [view, memoryview(bytearray(24))],
        "too_few": [memoryview(dest[:-1].view(np.uint8))],
        "none": None,
    }
    reader = FrameReader(allocator=lambda *_: answers[bad])
    [frame] = reader.feed(wire)
    assert not dest.any()
    assert not np.shares_memory(np.asarray(frame.buffers[0]), dest)
    unpacked = unpack_parts(frame.body, frame.buffers)
    assert_bitwise_equal(unpacked[0][2][0], src)
    assert_bitwise_equal(unpacked[1][2][0], src[:3])


# ---------------------------------------------------------------- garbage


def _feed_garbage(reader: FrameReader, data: bytes, cuts: Sequence[int]) -> list[Frame]:
    """Feed; a ProtocolError is an acceptable outcome, any other exception fails the test."""
    try:
        frames = feed_split(reader, data, cuts)
    except ProtocolError:
        return []
    for f in frames:
        assert isinstance(f.type, MsgType) and 0 <= f.req_id <= REQ_ID_MAX
    return frames


@FUZZ
@given(data=st.binary(max_size=512), cuts=st.lists(st.integers(0, 512), max_size=6))
def test_random_bytes_only_protocol_errors(data: bytes, cuts: list[int]) -> None:
    _feed_garbage(FrameReader(SMALL), data, cuts)


@FUZZ
@given(rest=st.binary(max_size=512), cuts=st.lists(st.integers(0, 520), max_size=6))
def test_random_bytes_after_valid_magic_only_protocol_errors(rest: bytes, cuts: list[int]) -> None:
    # A valid magic and version get the garbage past the first check, into lengths and header.
    _feed_garbage(FrameReader(SMALL), MAGIC + bytes([VERSION, 0]) + rest, cuts)


@FUZZ
@given(msg=messages(max_side=3), data=st.data())
def test_corrupted_frames_only_protocol_errors(msg: Msg, data: st.DataObject) -> None:
    wire = bytearray(wire_of(msg))
    edits = data.draw(st.lists(st.tuples(st.integers(0, len(wire) - 1), st.integers(0, 255)), min_size=1, max_size=4))
    for pos, value in edits:
        wire[pos] = value
    if data.draw(st.booleans()):
        wire = wire[: data.draw(st.integers(0, len(wire)))]
    wire += data.draw(st.binary(max_size=16))
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=6))
    for frame in _feed_garbage(FrameReader(SMALL), bytes(wire), cuts):
        try:
            unpack_parts(frame.body, frame.buffers, SMALL)
        except ProtocolError:
            pass


_FIELD_NAMES = sorted({k for schema in SCHEMAS.values() for k in schema} | {"zz"})
_near_bodies = st.one_of(
    st.sampled_from(list(MsgType)).flatmap(body_strategy),
    st.dictionaries(st.sampled_from(_FIELD_NAMES), values, max_size=5),
    values,
)
_near_headers = st.one_of(
    values,
    st.fixed_dictionaries(
        {
            "t": st.sampled_from([int(t) for t in MsgType]) | values,
            "id": st.integers(-3, UINT_MAX) | values,
            "b": _near_bodies,
        },
        optional={"x": values},
    ),
)


@FUZZ
@given(header=_near_headers)
def test_parse_header_random_structures(header: Any) -> None:
    # Either a ProtocolError, or a result that really satisfies the schema.
    try:
        msg_type, req_id, body = parse_header(pack_header(header))
    except ProtocolError:
        return
    assert isinstance(msg_type, MsgType)
    assert type(req_id) is int and 0 <= req_id <= REQ_ID_MAX
    schema = SCHEMAS[msg_type]
    assert set(body) <= set(schema)
    assert {k for k, (_, req) in schema.items() if req} <= set(body)


_dtype_like = st.sampled_from(sorted(ALLOWED_DTYPES) + ["object", "float128", "complex64", "<f4", "int16"]) | values
_shape_like = st.lists(st.integers(0, 4) | st.integers(-2, UINT_MAX) | values, max_size=9) | values
_desc_like = st.tuples(_dtype_like, _shape_like).map(list) | values
_part_like = st.one_of(
    st.fixed_dictionaries(
        {"p": st.integers(0, 9)},
        optional={"arrays": st.lists(_desc_like, max_size=3), "args": st.dictionaries(st.text(max_size=3), values, max_size=2)},
    ),
    st.dictionaries(st.sampled_from(["p", "args", "arrays", "q"]), values | st.lists(_desc_like, max_size=3), max_size=4),
    values,
)


@FUZZ
@given(parts=st.lists(_part_like, max_size=4), raw=st.lists(st.binary(max_size=24), max_size=4))
def test_unpack_parts_random_structures(parts: list, raw: list[bytes]) -> None:
    buffers = [memoryview(b) for b in raw]
    try:
        unpacked = unpack_parts({"parts": parts}, buffers)
    except ProtocolError:
        return
    arrays = [a for _, _, arrs in unpacked for a in arrs]
    assert len(arrays) == len(buffers)
    for a, b in zip(arrays, buffers):
        assert a.nbytes == b.nbytes and a.dtype.name in ALLOWED_DTYPES


@FUZZ
@given(
    dtype=st.sampled_from(sorted(ALLOWED_DTYPES)),
    shape=st.lists(st.just(0) | st.integers(1, UINT_MAX), min_size=1, max_size=8).filter(lambda s: 0 in s),
)
def test_zero_size_descriptor_is_rejected_or_usable(dtype: str, shape: list[int]) -> None:
    # Accepting a descriptor numpy cannot build would surface as a non-protocol error later.
    try:
        check_descriptor([dtype, shape], 0)
    except ProtocolError:
        return
    [(_, _, [arr])] = unpack_parts({"parts": [{"p": 0, "arrays": [[dtype, shape]]}]}, [memoryview(b"")])
    assert arr.shape == tuple(shape) and arr.size == 0


# -- frame-level rejections


@pytest.mark.parametrize(
    "magic, version",
    [(b"XX", VERSION), (b"mv", VERSION), (b"\x00\x00", VERSION), (MAGIC, 0), (MAGIC, VERSION + 1), (MAGIC, 255)],
)
def test_bad_prefix_rejected_from_prefix_alone(magic: bytes, version: int) -> None:
    wire = raw_frame(header_for(), magic=magic, version=version)
    with pytest.raises(ProtocolError, match="prefix"):
        FrameReader().feed(wire[: PREFIX.size])


def _peak_while_rejecting(data: bytes, match: str) -> int:
    """Feed data to a fresh reader, expect a ProtocolError, return the peak traced memory."""
    reader = FrameReader()
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match):
            reader.feed(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize(
    "data, match",
    [
        # the prefix alone: a header or a lengths table too big to stage
        (PREFIX.pack(MAGIC, VERSION, 2**32 - 1, 0), "header"),
        (PREFIX.pack(MAGIC, VERSION, 0, 2**32 - 1), "buffers exceed"),
        # prefix plus lengths (no header at all): a 1 TiB buffer
        (raw_frame(b"", [2**40]), "exceeds"),
        # prefix, lengths and a valid header, but no buffer bytes yet
        (raw_frame(header_for(), [2**40]), "exceeds"),
        (raw_frame(header_for(), [UINT_MAX, UINT_MAX]), "exceeds"),
        (raw_frame(header_for(), [1 << 30] * 3), "exceeds"),
    ],
)
def test_huge_claims_rejected_before_allocation(data: bytes, match: str) -> None:
    assert _peak_while_rejecting(data, match) < 1 << 20


def test_header_limit_boundary() -> None:
    header = header_for(body={})
    wire = raw_frame(header)
    assert decode_one(wire, Limits(max_header_bytes=len(header))).type is MsgType.HEARTBEAT
    with pytest.raises(ProtocolError, match="header"):
        FrameReader(Limits(max_header_bytes=len(header) - 1)).feed(wire[: PREFIX.size])


def test_buffer_count_limit_boundary() -> None:
    wire = encode_bytes(MsgType.HEARTBEAT, 1, {}, [b"a", b"bc", b""])
    frame = decode_one(wire, Limits(max_buffers=3))
    assert [bytes(b) for b in frame.buffers] == [b"a", b"bc", b""]
    with pytest.raises(ProtocolError, match="buffers exceed"):
        FrameReader(Limits(max_buffers=2)).feed(wire[: PREFIX.size])


def test_frame_size_limit_boundary() -> None:
    wire = encode_bytes(MsgType.HEARTBEAT, 1, {}, [b"x" * 100, b"y" * 50])
    assert len(decode_one(wire, Limits(max_frame_bytes=len(wire))).buffers) == 2
    # Rejected as soon as the head is in, before a single buffer byte arrives.
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameReader(Limits(max_frame_bytes=len(wire) - 1)).feed(wire[:-150])


@pytest.mark.parametrize(
    "header",
    [
        b"\xc1",  # a byte msgpack never uses
        b"\x81",  # a map with its entry missing
        b"\x81\xa1t",  # a map whose value is missing
        header_for() + b"\x00",  # trailing bytes after the map
        b"",  # no header at all
    ],
)
def test_header_not_msgpack(header: bytes) -> None:
    with pytest.raises(ProtocolError, match="msgpack"):
        FrameReader().feed(raw_frame(header))


@pytest.mark.parametrize("obj", [[26, 1, {}], 26, "t", None, b"tb", {1: 2}])
def test_header_not_a_map_with_t_id_b(obj: Any) -> None:
    with pytest.raises(ProtocolError):
        FrameReader().feed(raw_frame(pack_header(obj)))


@pytest.mark.parametrize(
    "obj",
    [
        {"t": 26, "id": 1},
        {"t": 26, "b": {}},
        {"id": 1, "b": {}},
        {"t": 26, "id": 1, "b": {}, "x": 0},
        {b"t": 26, b"id": 1, b"b": {}},
        {},
    ],
)
def test_header_missing_or_extra_fields(obj: dict) -> None:
    with pytest.raises(ProtocolError, match="exactly the fields"):
        FrameReader().feed(raw_frame(pack_header(obj)))


@pytest.mark.parametrize("t", [0, 5, 9, 99, -1, UINT_MAX, "GET", "HEARTBEAT", 26.0, True, None, [26]])
def test_unknown_message_type(t: Any) -> None:
    with pytest.raises(ProtocolError, match="message type"):
        FrameReader().feed(raw_frame(header_for(t=t)))


@pytest.mark.parametrize("req_id", [-1, INT_MIN, 2**63, UINT_MAX, True, False, 1.0, "1", None, [1]])
def test_bad_request_id(req_id: Any) -> None:
    with pytest.raises(ProtocolError, match="request id"):
        FrameReader().feed(raw_frame(header_for(req_id=req_id)))


@pytest.mark.parametrize("body", [[], "x", None, 1, True, b"{}"])
def test_body_not_a_map(body: Any) -> None:
    with pytest.raises(ProtocolError, match="must be a map"):
        FrameReader().feed(raw_frame(pack_header({"t": int(MsgType.HEARTBEAT), "id": 1, "b": body})))


_REQUIRED = [(t, k) for t, schema in SCHEMAS.items() for k, (_, req) in schema.items() if req]


@pytest.mark.parametrize("msg_type, field", _REQUIRED, ids=[f"{t.name}-{k}" for t, k in _REQUIRED])
def test_body_missing_required_field(msg_type: MsgType, field: str) -> None:
    body = minimal_body(msg_type)
    del body[field]
    with pytest.raises(ProtocolError, match="lacks field"):
        FrameReader().feed(raw_frame(header_for(int(msg_type), 1, body)))


_WRONG = {
    int: ["1", 1.5, True, None, [1], b"\x01"],
    str: [1, b"x", None, ["x"], True],
    list: [{}, "x", 1, None, b""],
    dict: [[], "x", 1, None, True],
    bytes: ["x", 1, None, [1], True],
    float: ["1", None, [1], True, b""],
    bool: [1, "x", None, [1], b""],
}
_TYPED = [
    (t, k, bad)
    for t, schema in SCHEMAS.items()
    for k, (types, _) in schema.items()
    if types != (object,)
    for bad in _WRONG[types[0]]
]


@pytest.mark.parametrize("msg_type, field, bad", _TYPED, ids=[f"{t.name}-{k}-{b!r}" for t, k, b in _TYPED])
def test_body_field_of_wrong_type(msg_type: MsgType, field: str, bad: Any) -> None:
    body = minimal_body(msg_type)
    body[field] = bad
    with pytest.raises(ProtocolError, match="must be"):
        FrameReader().feed(raw_frame(header_for(int(msg_type), 1, body)))


@pytest.mark.parametrize("msg_type", list(MsgType))
def test_body_unknown_field(msg_type: MsgType) -> None:
    body = minimal_body(msg_type)
    body["surprise"] = 1
    with pytest.raises(ProtocolError, match="unknown field"):
        FrameReader().feed(raw_frame(header_for(int(msg_type), 1, body)))


def test_reply_data_accepts_anything() -> None:
    # "data" is typed object: any msgpack value passes, unlike every other field.
    for data in [None, True, 1, "s", b"b", [1, [2]], {"k": {"j": 1}}]:
        frame = decode_one(raw_frame(header_for(int(MsgType.REPLY), 1, {"data": data})))
        assert_same(frame.body["data"], data)


# -- parts and descriptors


@pytest.mark.parametrize(
    "desc, nbytes, match",
    [
        ("float32", 4, "descriptor"),
        (("float32", [1]), 4, "descriptor"),
        (["float32"], 4, "descriptor"),
        (["float32", [1], 0], 4, "descriptor"),
        (["object", [1]], 8, "dtype"),
        (["float128", [1]], 16, "dtype"),
        (["complex64", [1]], 8, "dtype"),
        (["int16", [1]], 2, "dtype"),
        (["<f4", [1]], 4, "dtype"),
        (["", []], 1, "dtype"),
        ([None, [1]], 1, "dtype"),
        ([1, [1]], 1, "dtype"),
        ([["float32"], [1]], 4, "dtype"),  # unhashable dtype name
        ([{"x": 1}, [1]], 4, "dtype"),
        (["float32", (1,)], 4, "shape"),
        (["float32", "1"], 4, "shape"),
        (["float32", None], 4, "shape"),
        (["float32", 1], 4, "shape"),
        (["uint8", [1] * 9], 1, "shape"),
        (["uint8", [-1]], 0, "negative"),
        (["uint8", [2, -1]], 0, "negative"),
        (["float32", [1.0]], 4, "non-int"),
        (["float32", [True]], 4, "non-int"),
        (["float32", ["1"]], 4, "non-int"),
        (["float32", [None]], 4, "non-int"),
        (["float32", [2]], 4, "needs"),
        (["float32", [2]], 12, "needs"),
        (["float64", []], 4, "needs"),
        (["uint8", [0]], 1, "needs"),
        (["uint8", [2**62, 4]], 0, None),  # 2**64 elements: must not wrap around to 0
        (["uint8", [UINT_MAX]], 0, None),
        (["uint8", [2**70]], 0, None),
        (["uint8", [0, 2**63]], 0, None),  # zero-size, but numpy cannot hold such a shape
        (["float64", [0, 2**61]], 0, None),
    ],
)
def test_bad_descriptor(desc: Any, nbytes: int, match: str | None) -> None:
    with pytest.raises(ProtocolError, match=match):
        check_descriptor(desc, nbytes)


def test_descriptor_dims_follow_limits() -> None:
    assert check_descriptor(["uint8", [1] * 8], 1) == (np.dtype("uint8"), (1,) * 8)
    assert check_descriptor(["uint8", [1, 1]], 1, Limits(max_array_dims=2))[1] == (1, 1)
    with pytest.raises(ProtocolError, match="shape"):
        check_descriptor(["uint8", [1, 1, 1]], 1, Limits(max_array_dims=2))


@pytest.mark.parametrize(
    "desc, nbytes, shape",
    [
        (["float32", [2, 3]], 24, (2, 3)),
        (["float64", []], 8, ()),
        (["bool", [0]], 0, (0,)),
        (["uint8", [0, 2**40]], 0, (0, 2**40)),
        (["uint64", [1, 1, 1, 1]], 8, (1, 1, 1, 1)),
    ],
)
def test_good_descriptor(desc: list, nbytes: int, shape: tuple) -> None:
    dtype, got = check_descriptor(desc, nbytes)
    assert dtype == np.dtype(desc[0]) and got == shape


def _one_part(part: Any) -> dict:
    return {"parts": [part]}


@pytest.mark.parametrize(
    "body, nbuf, match",
    [
        (_one_part(1), 0, "must be a map"),
        (_one_part([0]), 0, "must be a map"),
        (_one_part({}), 0, "lacks field"),
        (_one_part({"args": {}}), 0, "lacks field"),
        (_one_part({"p": "0"}), 0, "must be"),
        (_one_part({"p": True}), 0, "must be"),
        (_one_part({"p": 0, "q": 1}), 0, "unknown field"),
        (_one_part({"p": 0, "args": []}), 0, "must be"),
        (_one_part({"p": 0, "arrays": "uint8"}), 1, "must be"),
        (_one_part({"p": 0, "arrays": [["uint8", [4]]]}), 1, "needs"),
        (_one_part({"p": 0, "arrays": [["uint8", [-3]]]}), 1, "negative"),
        (_one_part({"p": 0, "arrays": [["complex128", [3]]]}), 1, "dtype"),
    ],
)
def test_bad_part(body: dict, nbuf: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpack_parts(body, [memoryview(b"abc")] * nbuf)


def test_more_buffers_than_parts_describe() -> None:
    parts, buffers = pack_parts([(0, {}, [np.zeros(2, np.int8)])])
    with pytest.raises(ProtocolError, match="parts describe"):
        unpack_parts({"parts": parts}, [*buffers, memoryview(b"extra")])
    with pytest.raises(ProtocolError, match="parts describe"):
        unpack_parts({}, [memoryview(b"orphan")])


def test_fewer_buffers_than_parts_describe() -> None:
    parts, buffers = pack_parts([(0, {}, [np.zeros(2, np.int8), np.zeros(3, np.int8)])])
    with pytest.raises(ProtocolError, match="carries 1 buffers, its parts describe 2 arrays"):
        unpack_parts({"parts": parts}, buffers[:1])
    with pytest.raises(ProtocolError, match="carries 0 buffers, its parts describe 2 arrays"):
        unpack_parts({"parts": parts}, [])


def test_buffers_for_parts_through_the_reader_are_checked() -> None:
    # A well-formed frame whose header lies about its arrays is caught at unpack time.
    body = {"table": 0, "client": 0, "seq": 0, "map": 0, "parts": [{"p": 0, "arrays": [["float64", [3]]]}]}
    frame = decode_one(encode_bytes(MsgType.GET, 1, body, [memoryview(b"\x00" * 16)]))
    with pytest.raises(ProtocolError, match="needs 24 bytes"):
        unpack_parts(frame.body, frame.buffers)


# ---------------------------------------------------------------- encode limits


def _encode_joined(msg_type: MsgType, body: dict, buffers: Sequence, limits: Limits) -> bytes:
    return b"".join(bytes(c) for c in encode(msg_type, 1, body, buffers, limits))


def test_encode_refuses_header_over_limit() -> None:
    body = {"role": "w" * 200}
    size = len(header_for(int(MsgType.REGISTER), 1, body))
    wire = _encode_joined(MsgType.REGISTER, body, [], Limits(max_header_bytes=size))
    assert decode_one(wire, Limits(max_header_bytes=size)).body == body
    with pytest.raises(ProtocolError, match="header"):
        encode(MsgType.REGISTER, 1, body, (), Limits(max_header_bytes=size - 1))


def test_encode_refuses_too_many_buffers() -> None:
    buffers = [memoryview(b"a")] * 3
    assert len(decode_one(_encode_joined(MsgType.HEARTBEAT, {}, buffers, Limits(max_buffers=3))).buffers) == 3
    with pytest.raises(ProtocolError, match="buffers"):
        encode(MsgType.HEARTBEAT, 1, {}, buffers, Limits(max_buffers=2))


def test_encode_refuses_frame_over_limit() -> None:
    buffers = [memoryview(b"x" * 1000), memoryview(b"")]
    total = len(encode_bytes(MsgType.HEARTBEAT, 1, {}, buffers))
    wire = _encode_joined(MsgType.HEARTBEAT, {}, buffers, Limits(max_frame_bytes=total))
    assert len(wire) == total
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(MsgType.HEARTBEAT, 1, {}, buffers, Limits(max_frame_bytes=total - 1))


def test_encode_default_limits_refuse_oversized_buffer_without_copying() -> None:
    # A buffer over the default 2 GiB frame limit, faked with a zero-stride view (no memory).
    huge = np.lib.stride_tricks.as_strided(np.zeros(1, np.uint8), shape=(DEFAULT_LIMITS.max_frame_bytes,), strides=(0,))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(MsgType.HEARTBEAT, 1, {}, [memoryview(huge)])


# ---------------------------------------------------------------- errors.py

_TABLE = list(errors._CODE_TO_EXCEPTION.items())


@pytest.mark.parametrize("code, cls", _TABLE, ids=[c.name for c, _ in _TABLE])
def test_error_code_round_trip(code: ErrorCode, cls: type[MultiversoError]) -> None:
    assert code_for(cls("boom")) is code
    rebuilt = exception_for(int(code_for(cls("boom"))), "boom")
    assert type(rebuilt) is cls and str(rebuilt) == "boom"
    assert isinstance(rebuilt, MultiversoError)


@pytest.mark.parametrize(
    "code, cls, builtin",
    [
        (ErrorCode.INTERNAL, RemoteError, Exception),
        (ErrorCode.BAD_REQUEST, ProtocolError, Exception),
        (ErrorCode.UNKNOWN_TABLE, errors.TableNotFound, Exception),
        (ErrorCode.SPEC_MISMATCH, errors.TableSpecMismatch, Exception),
        (ErrorCode.TIMEOUT, errors.RequestTimeout, TimeoutError),
        (ErrorCode.SHUTTING_DOWN, errors.ConnectionLost, Exception),
        (ErrorCode.INVALID_ARGUMENT, errors.InvalidArgument, ValueError),
        (ErrorCode.INDEX_OUT_OF_RANGE, errors.IndexOutOfRange, IndexError),
    ],
)
def test_each_code_rebuilds_its_own_exception(code: ErrorCode, cls: type, builtin: type) -> None:
    # A consistent but swapped table would still round-trip; pin what each code means, and
    # that callers can catch remote errors by the builtin type they subclass.
    exc = exception_for(int(code), "m")
    assert type(exc) is cls and isinstance(exc, builtin)


def test_error_code_table_is_a_bijection_over_all_codes() -> None:
    assert set(errors._CODE_TO_EXCEPTION) == set(ErrorCode)
    assert len(set(errors._CODE_TO_EXCEPTION.values())) == len(ErrorCode)


@pytest.mark.parametrize("code", [0, -1, 99, 2**31, max(ErrorCode) + 1])
def test_unknown_error_code_is_remote_error(code: int) -> None:
    exc = exception_for(code, "who knows")
    assert type(exc) is RemoteError and str(exc) == "who knows"


@pytest.mark.parametrize("code, cls", _TABLE, ids=[c.name for c, _ in _TABLE])
def test_subclasses_map_to_their_parents_code(code: ErrorCode, cls: type[MultiversoError]) -> None:
    sub = type("Sub" + cls.__name__, (cls,), {})
    assert code_for(sub("x")) is code


@pytest.mark.parametrize("exc", [ValueError("v"), RuntimeError("r"), KeyError("k"), errors.NotInitialized("n")])
def test_unmapped_exceptions_are_internal(exc: BaseException) -> None:
    assert code_for(exc) is ErrorCode.INTERNAL
    assert type(exception_for(code_for(exc), "m")) is RemoteError


@pytest.mark.parametrize("code, cls", _TABLE, ids=[c.name for c, _ in _TABLE])
def test_error_travels_in_an_error_frame(code: ErrorCode, cls: type[MultiversoError]) -> None:
    # Server side: exception -> ERROR frame; caller side: frame -> the same exception class.
    wire = encode_bytes(MsgType.ERROR, 42, {"code": int(code_for(cls("disk on fire"))), "message": "disk on fire"})
    frame = decode_one(wire)
    assert frame.type is MsgType.ERROR and frame.req_id == 42
    rebuilt = exception_for(frame.body["code"], frame.body["message"])
    assert type(rebuilt) is cls and str(rebuilt) == "disk on fire"
