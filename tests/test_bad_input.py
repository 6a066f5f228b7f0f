"""Bad input against live scheduler and server processes.

Each test starts a real cluster (LocalCluster: scheduler and server as child processes)
and an in-process worker that keeps adding and reading back an int64 table on its own
thread, checking every value exactly. While it runs, the test opens raw sockets to the
server (or scheduler) and sends garbage. Every case checks four things: the bad
connection gets an ERROR frame or is closed, the process is still alive, it logged a
warning, and the well-behaved worker kept getting exactly correct results throughout.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import msgpack
import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py.errors import ErrorCode
from multiverso_py.framing import MAGIC, PREFIX, VERSION, FrameReader, encode_bytes
from multiverso_py.protocol import DEFAULT_LIMITS, Frame, MsgType, pack_parts
from multiverso_py import testing
from multiverso_py.testing import LocalCluster, wait_for

SIZE = 4096  # elements in the well-behaved worker's table
IO_TIMEOUT = 5.0  # seconds to wait for the server's answer on a raw socket
PROGRESS_AFTER = 20  # worker iterations that must complete after the garbage
GARBAGE_CLIENT = 7777  # client id on raw requests, distinct from the worker's


class GoodWorker(threading.Thread):
    """Adds known deltas (dense and at indices) and reads them back, checking that the
    table holds exactly the sum of this worker's adds after every step."""

    def __init__(self, table: mv.ArrayTable):
        super().__init__(name="good-worker", daemon=True)
        self.table = table
        self.iterations = 0
        self.error: Optional[BaseException] = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(1234)
        expected = np.zeros(SIZE, np.int64)
        try:
            while not self._stop_event.is_set():
                delta = rng.integers(-5, 6, SIZE, dtype=np.int64)
                self.table.add(delta)
                expected += delta
                idx = rng.integers(0, SIZE, 32)
                vals = rng.integers(1, 4, 32, dtype=np.int64)
                self.table.add(vals, idx)
                np.add.at(expected, idx, vals)
                got = self.table.get()
                if not np.array_equal(got, expected):
                    bad = np.flatnonzero(got != expected)
                    raise AssertionError(f"iteration {self.iterations}: {bad.size} wrong values, first at "
                                         f"{bad[0]}: got {got[bad[0]]}, expected {expected[bad[0]]}")
                got_idx = self.table.get(idx)
                if not np.array_equal(got_idx, expected[idx]):
                    raise AssertionError(f"iteration {self.iterations}: get(indices) returned wrong values")
                self.iterations += 1
        except BaseException as exc:  # reported by the test thread
            self.error = exc

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), "the well-behaved worker did not stop within 30 s"

    def wait_progress(self, target: int, timeout: float = 30.0) -> None:
        """Wait until `target` iterations are done; fail on the worker's first error."""
        wait_for(lambda: self.iterations >= target or self.error is not None or not self.is_alive(), timeout)
        assert self.error is None, f"the well-behaved worker failed: {self.error!r}"
        assert self.iterations >= target, (
            f"the well-behaved worker made {self.iterations} iterations, expected {target} within {timeout}s")


@dataclass
class LiveJob:
    cluster: LocalCluster
    table: mv.ArrayTable
    worker: GoodWorker

    @property
    def table_id(self) -> int:
        return self.table._info.table_id

    def log(self) -> str:
        return self.cluster.log.getvalue()

    def check_healthy(self, log_mark: int, source: str) -> None:
        """After garbage: the process logged a warning, every process lives, and the worker
        completes PROGRESS_AFTER more exactly checked iterations."""
        pattern = re.compile(rf"^\[{re.escape(source)}\] \S+ \S+ (WARNING|ERROR) ", re.MULTILINE)
        logged = wait_for(lambda: pattern.search(self.log(), log_mark) is not None, IO_TIMEOUT)
        self.worker.wait_progress(self.worker.iterations + PROGRESS_AFTER)
        assert self.cluster.scheduler.poll() is None, f"the scheduler exited:\n{self.log()[-3000:]}"
        assert self.cluster.servers[0].poll() is None, f"the server exited:\n{self.log()[-3000:]}"
        assert logged, f"{source} logged no warning about the bad input; new log lines:\n{self.log()[log_mark:]}"


@pytest.fixture
def job() -> Iterator[LiveJob]:
    with LocalCluster(workers=1, servers=1) as cluster:
        with mv.init(cluster.address, timeout=10):
            table = mv.ArrayTable(SIZE, "int64", name="good")
            worker = GoodWorker(table)
            worker.start()
            try:
                worker.wait_progress(5)  # the worker is busy before any garbage arrives
                yield LiveJob(cluster, table, worker)
            finally:
                worker.stop()
            assert worker.error is None, f"the well-behaved worker failed: {worker.error!r}"


# ---------------------------------------------------------------- raw sockets


@dataclass
class Answer:
    frames: list[Frame]
    closed: bool  # the peer closed (EOF or reset) before the deadline


def _address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def send_raw(address: str, data: bytes, *, want_frames: int = 1, close_after_send: bool = False,
             until_closed: bool = False) -> Answer:
    """Send data on a fresh connection and collect what comes back: until `want_frames`
    frames arrived, or (until_closed) until the peer closes; bounded by IO_TIMEOUT."""
    sock = testing.raw_connection(address, timeout=IO_TIMEOUT)
    reader = FrameReader()
    frames: list[Frame] = []
    closed = False
    try:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            closed = True  # the server dropped us mid-send; what it sent first is still readable
        if close_after_send:
            return Answer([], False)
        deadline = time.monotonic() + IO_TIMEOUT
        while time.monotonic() < deadline:
            if not until_closed and len(frames) >= want_frames:
                break
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            frames.extend(reader.feed(chunk))
        return Answer(frames, closed)
    finally:
        sock.close()


def assert_error(answer: Answer, req_id: int, code: ErrorCode, words: str) -> Frame:
    """Exactly one frame came back: an ERROR for req_id with this code, mentioning `words`."""
    assert len(answer.frames) == 1, f"expected one ERROR frame, got {answer.frames}"
    frame = answer.frames[0]
    assert frame.type is MsgType.ERROR, f"expected ERROR, got {frame.type.name} {frame.body}"
    assert frame.req_id == req_id
    assert frame.body["code"] == int(code), frame.body
    assert re.search(words, frame.body["message"], re.IGNORECASE), frame.body["message"]
    return frame


def assert_dropped(answer: Answer, words: Optional[str] = None) -> None:
    """The server closed the connection; whatever it sent first is an ERROR frame."""
    assert answer.closed, f"the server kept a corrupt stream open; frames: {answer.frames}"
    for frame in answer.frames:
        assert frame.type is MsgType.ERROR and frame.body["code"] == int(ErrorCode.BAD_REQUEST), frame
    if words is not None:
        assert len(answer.frames) == 1, f"expected an ERROR frame before the close, got {answer.frames}"
        assert re.search(words, answer.frames[0].body["message"], re.IGNORECASE), answer.frames[0].body


def table_op(msg_type: MsgType, req_id: int, table: int, parts: list, buffers: list) -> bytes:
    body = {"table": table, "client": GARBAGE_CLIENT, "seq": req_id, "map": 1, "parts": parts}
    return encode_bytes(msg_type, req_id, body, buffers)


def prefix(header_len: int, nbuf: int, lengths: tuple[int, ...] = ()) -> bytes:
    data = PREFIX.pack(MAGIC, VERSION, header_len, nbuf)
    return data + (struct.pack(f"<{len(lengths)}Q", *lengths) if lengths else b"")


def server(job: LiveJob) -> str:
    return job.cluster.server_address(0)


# ---------------------------------------------------------------- (a) random bytes


def test_random_bytes_are_dropped(job: LiveJob) -> None:
    mark = len(job.log())
    noise = random.Random(1).randbytes(64 * 1024)
    answer = send_raw(server(job), b"XX" + noise, until_closed=True)
    assert_dropped(answer)
    job.check_healthy(mark, "server 0")


def test_random_header_after_a_valid_prefix_is_dropped(job: LiveJob) -> None:
    mark = len(job.log())
    header = random.Random(2).randbytes(40)
    answer = send_raw(server(job), prefix(len(header), 0) + header, until_closed=True)
    assert_dropped(answer, words="header")
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (b) truncated frames


def _big_add(job: LiveJob) -> bytes:
    parts, buffers = pack_parts([(0, {}, [np.ones(SIZE, np.int64)])])
    return table_op(MsgType.ADD, 1, job.table_id, parts, buffers)


@pytest.mark.parametrize("cut", ["in_prefix", "in_header", "in_buffer"])
def test_truncated_frame_then_close(job: LiveJob, cut: str) -> None:
    frame = _big_add(job)
    head = PREFIX.size + 8
    at = {"in_prefix": 5, "in_header": head + 6, "in_buffer": len(frame) - SIZE * 4}[cut]
    mark = len(job.log())
    send_raw(server(job), frame[:at], close_after_send=True)
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (c) oversized frames


@pytest.mark.parametrize("case", ["header_length", "buffer_count", "buffer_length", "buffer_length_u64_max"])
def test_oversized_frame_prefix_is_refused(job: LiveJob, case: str) -> None:
    header = msgpack.packb({"t": int(MsgType.ADD), "id": 1, "b": {}})
    limits = DEFAULT_LIMITS
    data = {
        "header_length": prefix(limits.max_header_bytes + 1, 0),
        "buffer_count": prefix(len(header), limits.max_buffers + 1),
        "buffer_length": prefix(len(header), 1, (limits.max_frame_bytes,)) + header,
        "buffer_length_u64_max": prefix(len(header), 1, (2**64 - 1,)) + header,
    }[case]
    mark = len(job.log())
    answer = send_raw(server(job), data, until_closed=True)
    assert_dropped(answer, words="exceed")
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (d) unknown table


@pytest.mark.parametrize("op", [MsgType.GET, MsgType.ADD], ids=lambda op: op.name)
def test_unknown_table_id_gets_an_error(job: LiveJob, op: MsgType) -> None:
    unknown = job.table_id + 12345
    arrays = [np.ones(SIZE, np.int64)] if op is MsgType.ADD else []
    parts, buffers = pack_parts([(0, {}, arrays)])
    mark = len(job.log())
    answer = send_raw(server(job), table_op(op, 41, unknown, parts, buffers))
    assert_error(answer, 41, ErrorCode.UNKNOWN_TABLE, str(unknown))
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (e) buffer vs descriptor


@pytest.mark.parametrize("case", ["short_buffer", "extra_buffer"])
def test_add_whose_buffers_do_not_match_descriptors(job: LiveJob, case: str) -> None:
    delta = np.ones(SIZE, np.int64)
    parts, buffers = pack_parts([(0, {}, [delta])])
    if case == "short_buffer":
        buffers = [memoryview(delta.tobytes()[:-3])]  # descriptor says SIZE int64s
        words = "bytes"
    else:
        buffers = [*buffers, memoryview(b"\x00" * 8)]
        words = "buffers"
    mark = len(job.log())
    answer = send_raw(server(job), table_op(MsgType.ADD, 42, job.table_id, parts, buffers))
    assert_error(answer, 42, ErrorCode.BAD_REQUEST, words)
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (f) wrong delta shape


@pytest.mark.parametrize("case", ["dense_too_long", "dense_2d", "rows_and_delta_differ"])
def test_add_with_wrong_delta_shape_for_the_partition(job: LiveJob, case: str) -> None:
    arrays = {
        "dense_too_long": [np.ones(SIZE + 1, np.int64)],
        "dense_2d": [np.ones((2, SIZE // 2), np.int64)],
        "rows_and_delta_differ": [np.arange(3, dtype=np.int64), np.ones(5, np.int64)],
    }[case]
    parts, buffers = pack_parts([(0, {}, arrays)])
    mark = len(job.log())
    answer = send_raw(server(job), table_op(MsgType.ADD, 43, job.table_id, parts, buffers))
    assert_error(answer, 43, ErrorCode.INVALID_ARGUMENT, "delta")
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (g) unknown message type


def test_unknown_message_type_is_refused(job: LiveJob) -> None:
    header = msgpack.packb({"t": 99, "id": 44, "b": {}})
    mark = len(job.log())
    answer = send_raw(server(job), prefix(len(header), 0) + header, until_closed=True)
    assert_dropped(answer, words="unknown message type")
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- (h) control messages


@pytest.mark.parametrize("op", [MsgType.BARRIER, MsgType.CREATE_SHARDS, MsgType.SHUTDOWN, MsgType.WORKER_LEFT],
                         ids=lambda op: op.name)
def test_control_message_a_server_does_not_handle(job: LiveJob, op: MsgType) -> None:
    body = {
        MsgType.BARRIER: {},
        MsgType.SHUTDOWN: {},
        MsgType.WORKER_LEFT: {"worker": 0},  # would stop counting a live worker's clock
        # would replace the live table's shard, were it accepted from a worker connection
        MsgType.CREATE_SHARDS: {"table": job.table_id, "spec": job.table._info.spec.to_wire(),
                                "layout": {"bounds": [0, SIZE]}, "partitions": [0], "map": 1, "workers": [0]},
    }[op]
    mark = len(job.log())
    answer = send_raw(server(job), encode_bytes(op, 45, body))
    assert_error(answer, 45, ErrorCode.BAD_REQUEST, op.name)
    job.check_healthy(mark, "server 0")


# ---------------------------------------------------------------- the scheduler


def test_garbage_to_the_scheduler(job: LiveJob) -> None:
    address = job.cluster.address
    mark = len(job.log())
    assert_dropped(send_raw(address, b"\xff" + random.Random(3).randbytes(4096), until_closed=True))
    # well-framed, but from a connection that never registered
    answer = send_raw(address, encode_bytes(MsgType.TABLE_READY, 46, {"table": job.table_id}))
    assert_error(answer, 46, ErrorCode.BAD_REQUEST, "register")
    answer = send_raw(address, encode_bytes(MsgType.REGISTER, 47, {"role": "worker"}))
    assert_error(answer, 47, ErrorCode.BAD_REQUEST, "full")
    answer = send_raw(address, encode_bytes(MsgType.GET, 48, {"table": 0, "client": 0, "seq": 1, "map": 1,
                                                             "parts": []}))
    assert_error(answer, 48, ErrorCode.BAD_REQUEST, "GET")
    job.check_healthy(mark, "scheduler")
    # the job still works through the scheduler: a new table and a barrier
    fresh = mv.ArrayTable(16, "int64", name="after-garbage")
    fresh.add(np.arange(16))
    mv.barrier()
    np.testing.assert_array_equal(fresh.get(), np.arange(16))


# ---------------------------------------------------------------- (h) a bad add that would be held


@pytest.mark.parametrize("kind", ["array", "kv"])
def test_a_bad_add_that_bsp_would_hold_is_refused_not_acknowledged(kind: str) -> None:
    """A BSP server holds an add until its clock completes and acknowledges it at once (so
    that barriers never wait for other workers): it must check the add first, or a
    malformed one would be acknowledged and then fail where nobody hears of it."""
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address, timeout=10):
        if kind == "array":
            table: mv.ArrayTable | mv.KVTable = mv.ArrayTable(8, "int64", name="held", consistency="bsp")
            arrays = [np.arange(3, dtype=np.int64), np.ones(5, np.int64)]  # 3 indices, 5 values
        else:
            table = mv.KVTable(dim=2, name="held", consistency="bsp")
            arrays = [np.arange(3, dtype=np.uint64), np.ones((3, 4), np.float32)]  # rows of 4, not 2
        parts, buffers = pack_parts([(0, {}, arrays)])
        body = {"table": table._info.table_id, "client": mv.worker_id(), "seq": 1, "map": 1, "parts": parts}
        answer = send_raw(cluster.server_address(0), encode_bytes(MsgType.ADD, 5, body, buffers))
        assert_error(answer, 5, ErrorCode.INVALID_ARGUMENT, "delta|do not match")
        if kind == "array":  # the worker's own adds still go through, held until its clock
            table.add(np.ones(8, np.int64))
            mv.clock()
            np.testing.assert_array_equal(table.get(), np.ones(8, np.int64))
