"""Shard-map routing and exactly-once adds, against real server processes: a server
answers "moved" for a partition it does not hold and the client recovers; a resent add
(same client id and sequence number) is applied once."""

from __future__ import annotations


import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py.framing import FrameReader, encode_bytes
from multiverso_py.protocol import MsgType, pack_parts
from multiverso_py.tables.ranges import RangeRows
from multiverso_py.testing import LocalCluster, raw_connection

pytestmark = pytest.mark.timeout(120)


def _request(address: str, msg_type: MsgType, body: dict, buffers=(), req_id: int = 7):
    """Send one frame on a fresh connection and return the first reply frame."""
    with raw_connection(address) as sock:
        sock.sendall(encode_bytes(msg_type, req_id, body, buffers))
        reader = FrameReader()
        while True:
            data = sock.recv(1 << 16)
            assert data, "server closed the connection without replying"
            frames = reader.feed(data)
            if frames:
                return frames[0]


def test_moved_reply_then_client_refreshes_map_and_retries():
    with LocalCluster(workers=1, servers=2, log_level="warning") as cluster, mv.init(cluster.address, timeout=10):
        table = mv.ArrayTable(1000, name="moved")
        table.add(np.arange(1000))
        info = table._info
        assert sorted(set(info.owners)) == [0, 1]

        # A server asked for a partition it does not hold says so, with its map version.
        wrong = next(s for s in range(2) if s != info.owners[0])
        reply = _request(cluster.server_address(wrong), MsgType.GET,
                         {"table": info.table_id, "client": 99, "seq": 1, "map": 0, "parts": [{"p": 0}]})
        assert reply.type is MsgType.MOVED and reply.body == {"map": info.map_version}

        # A worker with a stale map (owners swapped) is redirected and still gets it right.
        owners = list(info.owners)
        info.owners = [1 - o for o in owners]
        np.testing.assert_array_equal(table.get(), np.arange(1000, dtype=np.float32))
        assert info.owners == owners
        table.add(np.ones(1000))
        np.testing.assert_array_equal(table.get(), np.arange(1000, dtype=np.float32) + 1)



def test_resent_add_is_applied_once():
    with LocalCluster(workers=1, servers=2, log_level="warning") as cluster, mv.init(cluster.address, timeout=10):
        table = mv.ArrayTable(1000, name="dedup")
        table.add(np.arange(1000))
        info = table._info
        # The same (client id, sequence number) sent twice is applied once.
        owner = info.owners[0]
        lo, hi = info.layout["bounds"][0], info.layout["bounds"][1]
        parts, buffers = pack_parts([(0, {}, [np.full(hi - lo, 5, np.float32)])])
        body = {"table": info.table_id, "client": 99, "seq": 10, "map": info.map_version, "parts": parts}
        for _ in range(2):
            assert _request(cluster.server_address(owner), MsgType.ADD, body, buffers).type is MsgType.REPLY
        expected = np.arange(1000, dtype=np.float32)
        expected[lo:hi] += 5
        np.testing.assert_array_equal(table.get(), expected)

        # An older sequence number from that client is a resend too; a newer one applies.
        for seq, applied in ((9, False), (11, True)):
            body["seq"] = seq
            assert _request(cluster.server_address(owner), MsgType.ADD, body, buffers).type is MsgType.REPLY
            expected[lo:hi] += 5 if applied else 0
            np.testing.assert_array_equal(table.get(), expected)


@pytest.mark.parametrize("bounds", [[0, 10], [0, 6, 10], [0, 3, 3, 10], [0, 4, 7, 10]])
def test_rows_split_by_partition(bounds: list[int]) -> None:
    """Worker-side splitting: every row goes to the partition whose range holds it, in
    its order."""
    ranges = RangeRows(bounds)
    rng = np.random.default_rng(len(bounds))
    for size in (0, 1, 5, 40):
        rows = rng.integers(0, 10, size)
        owner = np.searchsorted(np.array(bounds), rows, side="right") - 1
        expected = {p: np.flatnonzero(owner == p) for p in np.unique(owner)}
        got = dict(ranges.split(rows))
        assert got.keys() == expected.keys()
        for p, positions in got.items():
            np.testing.assert_array_equal(positions, expected[p])


@pytest.mark.parametrize("servers", [1, 3])
def test_vectors_take_two_partitions_a_server_and_matrices_one(servers: int) -> None:
    """A big vector is split in two per server (its whole-table work runs on two table
    threads); a matrix, whose requests are scattered rows, in one per server; a small
    table of either kind in one per server."""
    from multiverso_py.tables import array, matrix
    from multiverso_py.tables.base import TableSpec

    def count(layout: dict) -> int:
        return len(layout["bounds"]) - 1

    assert count(array.layout(TableSpec("array", (4 << 20,)), servers)) == 2 * servers
    assert count(array.layout(TableSpec("array", (1000,)), servers)) == servers
    for kind in ("matrix", "sparse_matrix"):
        assert count(matrix.layout(TableSpec(kind, (1 << 20, 16)), servers)) == servers
    bounds = matrix.layout(TableSpec("matrix", (10, 4)), servers)["bounds"]
    assert bounds[0] == 0 and bounds[-1] == 10 and bounds == sorted(bounds)
