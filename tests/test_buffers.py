"""Reused large buffers: the server's receive buffers (reuse, bounds, never a foreign
array) and a worker's result memory (reused only once no array sees it)."""

from __future__ import annotations

import sys
from concurrent.futures import wait
from pathlib import Path

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py.buffers import MIN_BYTES, BufferPool, ResultMemory
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
    assert pool._free.kept <= MIN_BYTES


def test_a_full_pool_makes_room_for_new_buffers_by_dropping_the_longest_idle() -> None:
    """Idle buffers of an early large push must not keep later adds' buffers out."""
    pool = BufferPool(keep_bytes=4 * MIN_BYTES)
    large = pool.allocate(MsgType.ADD, 1, {}, [2 * MIN_BYTES, 2 * MIN_BYTES])
    pool.release(large)  # the pool is full now
    small = pool.allocate(MsgType.ADD, 2, {}, [MIN_BYTES])
    pool.release(small)
    assert pool._free.kept == 3 * MIN_BYTES  # one large buffer dropped to keep the new one
    assert pool.allocate(MsgType.ADD, 3, {}, [MIN_BYTES])[0].obj is small[0].obj
    assert pool.allocate(MsgType.ADD, 4, {}, [2 * MIN_BYTES])[0].obj is large[1].obj  # the one idle less long


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


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def heap_rss(pid: int) -> int:
    """Resident bytes of a process's brk heap, where glibc puts blocks it serves itself."""
    smaps = Path(f"/proc/{pid}/smaps").read_text().split("\n")
    rss, in_heap = 0, False
    for line in smaps:
        if line and line[0] in "0123456789abcdef" and "-" in line.split()[0]:
            in_heap = line.endswith("[heap]")
        elif in_heap and line.startswith("Rss:"):
            rss += int(line.split()[1]) * 1024
    return rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory map from /proc")
def test_a_burst_of_pushes_leaves_no_receive_buffers_in_the_servers_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    # More pushes in flight than the pool keeps buffers for: those it drops are freed. Had
    # they come from glibc's heap (where it serves big blocks once it has freed one), their
    # memory would stay with the server.
    monkeypatch.setenv("MV_SHARED_MEMORY", "0")  # every array on the socket, into the server's buffers
    with LocalCluster(servers=1, log_level="warning") as cluster, mv.init(cluster.address, timeout=30):
        table = mv.ArrayTable(16 << 20, name="t")
        delta = np.ones(2 << 20, np.float32)  # with its row ids, 24 MiB a push: slower to apply than to read
        for _ in range(4):
            wait([table.add_async(delta, np.arange(i << 21, (i + 1) << 21)) for i in range(8) for _ in range(4)])
        assert table.get()[::1 << 20].tolist() == [16.0] * 16
        heap = heap_rss(cluster.servers[0].pid)
    # Python's own heap takes about 6 MiB; 14-62 MiB were left there before.
    assert heap < 12 << 20, f"the server's heap holds {heap >> 20} MiB after the pushes"


def test_result_memory_is_reused_only_once_every_view_is_gone() -> None:
    memory = ResultMemory(keep_bytes=8 << 20, min_bytes=1 << 20)
    first = memory.empty((512, 1024), np.float32)  # 2 MiB
    first[:] = 1.0
    address = _address(first)
    views = [first.reshape(-1)[::2], first[3:], first.T]  # each keeps the memory, not `first`
    del first
    assert memory._free.kept == 0
    other = memory.empty((512, 1024), np.float32)
    assert _address(other) != address  # still seen through the views: fresh memory
    other[:] = 2.0
    assert all((v == 1.0).all() for v in views)
    del views
    assert memory._free.kept == 2 << 20
    again = memory.empty((1024, 512), np.float32)  # the same bytes in another shape
    assert _address(again) == address and again.flags.writeable and again.flags.c_contiguous
    assert memory._free.kept == 0


def test_a_4096_row_result_is_reused_by_default() -> None:
    """256 KiB results, made and dropped each request, must not churn the C heap."""
    memory = ResultMemory()
    first = memory.empty((4096, 16), np.float32)
    first_bytes = first.nbytes
    address = _address(first)
    del first
    assert memory._free.kept == first_bytes  # kept mapped, not handed back to malloc
    assert _address(memory.empty((4096, 16), np.float32)) == address


def test_results_go_on_being_reused_after_large_ones_filled_the_memory() -> None:
    """Two idle 64 MiB results of a dense pull (a full default pool) must not make every
    later 4096-row result map fresh memory."""
    memory = ResultMemory()
    pulls = [memory.empty((16 << 20,), np.float32) for _ in range(2)]
    del pulls
    assert memory._free.kept == 128 << 20
    rows = memory.empty((4096, 16), np.float32)
    address = _address(rows)
    del rows
    again = memory.empty((4096, 16), np.float32)
    assert _address(again) == address
    assert memory._free.kept == 64 << 20  # the pull idle longest made room


def test_result_memory_is_bounded_and_leaves_small_arrays_to_numpy() -> None:
    memory = ResultMemory(keep_bytes=3 << 20, min_bytes=1 << 20)
    assert memory.empty((10,), np.float64).flags.owndata  # np.empty's own
    results = [memory.empty((2 << 20,), np.uint8) for _ in range(3)]
    del results
    assert memory._free.kept == 2 << 20  # one 2 MiB block kept, the others unmapped
    exported = memoryview(memory.empty((1 << 18,), np.float32))  # a consumer of the buffer keeps it
    assert memory._free.kept == 2 << 20
    del exported
    assert memory._free.kept == 3 << 20
