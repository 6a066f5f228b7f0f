"""The server's pool of receive buffers: reuse, bounds, and never a foreign array."""

from __future__ import annotations

import numpy as np

import multiverso_py as mv
from multiverso_py.buffers import MIN_BYTES, BufferPool
from multiverso_py.protocol import MsgType
from multiverso_py.testing import LocalCluster


def test_large_add_buffers_are_reused_after_release() -> None:
    pool = BufferPool(keep_bytes=4 * MIN_BYTES)
    first = pool.allocate(MsgType.ADD, 1, {}, [MIN_BYTES, 16])
    assert [v.nbytes for v in first] == [MIN_BYTES, 16]
    pool.release(first)
    second = pool.allocate(MsgType.ADD, 2, {}, [MIN_BYTES])
    assert second[0].obj is first[0].obj  # the same memory, no fresh pages
    assert pool.allocate(MsgType.GET, 3, {}, [MIN_BYTES]) is None  # gets carry small index arrays
    assert pool.allocate(MsgType.ADD, 4, {}, [100, 200]) is None  # small ones: the reader's own


def test_only_its_own_arrays_come_back_and_the_pool_is_bounded() -> None:
    pool = BufferPool(keep_bytes=MIN_BYTES)
    foreign = np.empty(MIN_BYTES, np.uint8)
    pool.release([memoryview(foreign)])  # e.g. an in-process worker's own delta
    assert all(v.obj is not foreign for v in pool.allocate(MsgType.ADD, 1, {}, [MIN_BYTES]))
    lent = [pool.allocate(MsgType.ADD, i, {}, [MIN_BYTES])[0] for i in range(3)]
    pool.release(lent)
    assert pool._kept <= MIN_BYTES


def test_pushes_through_reused_buffers_stay_exact() -> None:
    with LocalCluster(workers=1, servers=1) as cluster, mv.init(cluster.address):  # real sockets, real reuse
        table = mv.ArrayTable(3 << 20, "int64", name="pushes")  # 24 MiB: spans of 8 MiB
        rng = np.random.default_rng(0)
        total = np.zeros(3 << 20, np.int64)
        for _ in range(4):
            delta = rng.integers(-9, 9, 3 << 20)
            table.add(delta)
            total += delta
        np.testing.assert_array_equal(table.get(), total)
