"""Fuzzing of request validation on a live server: well-framed table requests with random
fields, parts, arguments and arrays, aimed at real tables of every type, while a worker
keeps checking exact results. Every request must get an answer that is a clear error (or
a reply), never an internal failure; the server must keep serving. Bounded: a fixed
number of examples."""

from __future__ import annotations

import socket
from typing import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import multiverso_py as mv
from multiverso_py import testing
from multiverso_py.errors import ErrorCode
from multiverso_py.framing import FrameReader, encode_bytes
from multiverso_py.protocol import ALLOWED_DTYPES, TABLE_OPS, MsgType, pack_parts
from tests.test_bad_input import GoodWorker, LiveJob

EXAMPLES = 150


@pytest.fixture
def live() -> Iterator[tuple[LiveJob, dict[str, int], socket.socket]]:
    """A server holding a table of each type, a worker checking its own table, and a raw
    connection for the fuzzer."""
    with testing.LocalCluster(workers=1, servers=1) as cluster:
        with mv.init(cluster.address, timeout=10):
            table = mv.ArrayTable(4096, "int64", name="good")
            victims = {"array": mv.ArrayTable(100, name="v-array"), "matrix": mv.MatrixTable(50, 4, name="v-matrix"),
                       "sparse": mv.SparseMatrixTable(50, 4, name="v-sparse"),
                       "kv": mv.KVTable(dim=3, name="v-kv", updater="adam"),
                       "sgd": mv.MatrixTable(20, 2, name="v-sgd", updater="sgd", lr=0.1)}
            worker = GoodWorker(table)
            worker.start()
            sock = testing.raw_connection(cluster.server_address(0), timeout=10)
            try:
                worker.wait_progress(5)
                yield LiveJob(cluster, table, worker), {k: v._info.table_id for k, v in victims.items()}, sock
            finally:
                sock.close()
                worker.stop()
            assert worker.error is None, f"the well-behaved worker failed: {worker.error!r}"


scalars = st.one_of(st.integers(-2**63, 2**64 - 1), st.floats(allow_nan=True), st.text(max_size=5), st.none(),
                    st.booleans(), st.binary(max_size=4))
args = st.dictionaries(st.sampled_from(["lo", "hi", "all", "lr", "w", "count", "x"]), scalars, max_size=3)


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(sorted(ALLOWED_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    values = draw(st.lists(st.integers(-3, 60), min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.array(values).astype(dtype).reshape(shape)


parts = st.lists(st.tuples(st.sampled_from([-1, 0, 1, 2, 2**40]), args, st.lists(arrays(), max_size=3)), max_size=3)


def test_random_requests_get_clear_answers_and_the_server_keeps_serving(live) -> None:
    job, table_ids, sock = live

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(op=st.sampled_from(sorted(TABLE_OPS.values())), victim=st.sampled_from(sorted(table_ids)),
           request_parts=parts, client=st.integers(1, 2**40), seq=st.integers(-5, 2**40))
    def one_request(op: MsgType, victim: str, request_parts: list, client: int, seq: int) -> None:
        # clients >= 1: worker 0 is the live worker, whose sequence numbers are not ours to disturb
        body_parts, buffers = pack_parts(request_parts)
        body = {"table": table_ids[victim], "client": client, "seq": seq, "map": 1, "parts": body_parts}
        sock.sendall(encode_bytes(op, 99, body, buffers))
        answer = testing.read_frame(sock, FrameReader())
        assert answer.req_id == 99
        assert answer.type in (MsgType.REPLY, MsgType.ERROR, MsgType.MOVED), answer
        if answer.type is MsgType.ERROR:
            assert answer.body["code"] != ErrorCode.INTERNAL, f"an internal failure, not a clear error: {answer.body}"

    one_request()
    # Random requests may all be harmless ones (moved partitions, empty parts), which log
    # nothing: end with one that must be refused and logged.
    sock.sendall(encode_bytes(MsgType.GET, 98, {"table": 10**6, "client": 1, "seq": 1, "map": 1, "parts": []}))
    answer = testing.read_frame(sock, FrameReader())
    assert (answer.type, answer.body["code"]) == (MsgType.ERROR, ErrorCode.UNKNOWN_TABLE), answer
    job.check_healthy(0, "server 0")
