"""Same-host transfers through shared memory (multiverso_py.shm): the pieces on their own,
then real jobs whose large arrays go through the workers' segments, checked against the
socket path, a held add whose segment the worker reuses, a worker killed with kill -9,
and servers fed bad segment references."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py import shm, testing
from multiverso_py.errors import ErrorCode, ProtocolError
from multiverso_py.framing import FrameReader, encode_bytes
from multiverso_py.protocol import MsgType
from multiverso_py.server import SEGMENT_SWEEP_S
from multiverso_py.tables.base import Part
from multiverso_py.testing import LocalCluster

MiB = 1 << 20
IO_TIMEOUT = 10.0
# Without POSIX shared memory every array goes on the socket (the rest of the suite covers that).
needs_shm = pytest.mark.skipif(not shm.usable(), reason="no usable POSIX shared memory on this machine")


def segment_exists(name: str) -> bool:
    links = shm.ServerLinks()
    try:
        links.segment([name, 1])
        return True
    except ProtocolError:
        return False
    finally:
        links.close()


# ---------------------------------------------------------------- the pieces


def test_layout_aligns_every_array_and_views_refuse_what_does_not_fit() -> None:
    starts, end = shm.layout([1, 64, 65, 0, 3])
    assert starts == [0, 64, 128, 256, 256] and end == 320
    buf = memoryview(bytearray(320))
    assert [v.nbytes for v in shm.views(buf, [1, 64, 65, 0, 3])] == [1, 64, 65, 0, 3]
    with pytest.raises(ProtocolError, match="do not fit"):
        shm.views(buf, [300, 30])


@needs_shm
def test_pool_reuses_segments_and_unlinks_what_it_does_not_keep() -> None:
    pool = shm.SegmentPool(keep_bytes=3 * MiB)
    first, second = pool.take(2 * MiB), pool.take(2 * MiB)
    pool.give_back(first)
    assert pool.take(2 * MiB) is first  # reused, not a fresh segment
    assert pool.take(8 * MiB).size == 8 * MiB  # never a segment too small, nor one twice too big
    pool.give_back(first)
    pool.give_back(second)  # over keep_bytes: one of them goes
    assert segment_exists(first.name) != segment_exists(second.name)
    pool.close()
    assert not segment_exists(first.name) and not segment_exists(second.name)


@needs_shm
def test_a_worker_lends_segments_only_to_probed_servers_for_big_messages() -> None:
    links = shm.WorkerLinks(enabled=True, lent_bytes=4 * MiB)
    big = np.arange(MiB // 2, dtype=np.float32)  # 2 MiB
    assert links.lend(0, "add", [], [memoryview(big).cast("B")]) is None  # not probed
    links._servers.add(0)
    assert links.lend(0, "add", [], [memoryview(big[:100]).cast("B")]) is None  # small: the socket
    below = big[:shm.MIN_BYTES // 4 - 1]
    assert links.lend(0, "add", [], [memoryview(below).cast("B")]) is None
    least = links.lend(0, "add", [], [memoryview(big[:shm.MIN_BYTES // 4]).cast("B")])
    assert least is not None and least.size == shm.SEGMENT_UNIT  # segments come in whole units
    links.give_back(least)
    links.moved_bytes = 0
    segment = links.lend(0, "add", [], [memoryview(big).cast("B")])
    assert segment is not None and np.array_equal(np.frombuffer(segment.buf, np.float32)[:len(big)], big)
    get = [Part(0, dest=[memoryview(bytearray(3 * MiB))])]
    assert links.lend(0, "get", get, []) is None  # 2 + 3 MiB would pass lent_bytes
    links.give_back(segment)
    assert links.lend(0, "get", get, []) is not None
    assert links.lend(0, "get", [Part(0)], []) is None  # a reply of unknown size
    assert links.moved_bytes == big.nbytes + 3 * MiB
    links.close()


@needs_shm
def test_a_server_refuses_segments_that_are_not_a_workers() -> None:
    links = shm.ServerLinks()
    for wire, words in [("mvpy_0123456789abcdef", "must be"), (["../etc/passwd", 1], "not a multiverso_py"),
                        (["mvpy_0123456789abcdef", 1], "cannot map"), (["mvpy_0123456789abcdef", True], "must be")]:
        with pytest.raises(ProtocolError, match=words):
            links.segment(wire)
    segment = shm.Segment(MiB)
    try:
        assert links.segment([segment.name, MiB]).nbytes == MiB
        with pytest.raises(ProtocolError, match="the request says"):
            links.segment([segment.name, 2 * MiB])
    finally:
        links.close()
        segment.close()


def test_place_copies_a_reply_into_the_segment_or_declines() -> None:
    rows = np.arange(48, dtype=np.float32).reshape(12, 4)
    ids = np.arange(12, dtype=np.int64)
    results = [(3, {}, [ids, rows]), (4, {}, [rows[::2]])]  # a strided array too
    buf = memoryview(bytearray(1024))
    placed = shm.place(buf, results)
    assert [pid for pid, _, _ in placed] == [3, 4]
    for (_, _, got), (_, _, want) in zip(placed, results):
        for g, w in zip(got, want):
            assert np.array_equal(g, w) and g.dtype == w.dtype
            assert np.shares_memory(g, np.frombuffer(buf, np.uint8))
    assert shm.place(memoryview(bytearray(256)), results) is None


def test_a_reply_gathered_in_the_reply_area_is_not_copied_again() -> None:
    buf = memoryview(bytearray(1024))
    area = shm.ReplyArea(buf)
    table = np.arange(400, dtype=np.float32).reshape(100, 4)
    rows = np.array([7, 3, 99], np.int64)
    ids = np.add(rows, 1000, out=area.empty(rows.shape, np.int64))
    values = np.take(table, rows, axis=0, out=area.empty((3, 4), np.float32))
    results = [(0, {}, [ids, values])]
    assert shm.place(buf, results, area) is results  # in place already: nothing copied
    got_ids = np.frombuffer(buf[:ids.nbytes], np.int64)
    got = np.frombuffer(buf[shm.layout([ids.nbytes])[1]:][:values.nbytes], np.float32).reshape(3, 4)
    assert np.array_equal(got_ids, rows + 1000) and np.array_equal(got, table[rows])
    assert shm.views(buf, [ids.nbytes, values.nbytes])[1].tobytes() == table[rows].tobytes()  # where place() puts it
    too_big = area.empty((1000, 4), np.float32)  # does not fit what is left: ordinary memory
    assert not np.shares_memory(too_big, np.frombuffer(buf, np.uint8))


def test_place_moves_reply_area_arrays_it_did_not_lay_out_itself() -> None:
    """A reply that mixes gathered arrays with others (a view of a partition first, say)
    is laid out anew; the gathered arrays are copied out before the segment is written."""
    buf = memoryview(bytearray(1024))
    area = shm.ReplyArea(buf)
    gathered = area.empty((8,), np.float64)
    gathered[:] = np.arange(8)
    other = np.full(16, 5.0, np.float32)
    placed = shm.place(buf, [(1, {}, [other, gathered])], area)
    got_other, got_gathered = placed[0][2]
    assert np.array_equal(got_other, other) and np.array_equal(got_gathered, np.arange(8))


# ---------------------------------------------------------------- real jobs


def run_tables(shared: bool) -> tuple[dict, int]:
    """Dense, row, sparse and KV traffic big enough for shared memory, on 2 servers."""
    rng = np.random.default_rng(7)
    out: dict[str, np.ndarray] = {}
    os.environ["MV_SHARED_MEMORY"] = "1" if shared else "0"
    try:
        with LocalCluster(servers=2, log_level="warning") as cluster, mv.init(cluster.address, timeout=30):
            dense = mv.ArrayTable(3 * MiB, name="dense")  # 12 MiB: several spans per server
            delta = rng.standard_normal(3 * MiB).astype(np.float32)
            dense.add(delta)
            dense.add(delta)
            into = np.empty(3 * MiB, np.float32)
            out["dense"], out["dense_out"] = dense.get(), dense.get(out=into).copy()
            out["dense_add_get"] = dense.add_get(delta, out=into).copy()  # the reply overwrites the add's arrays
            spots = rng.integers(0, 3 * MiB, MiB)
            out["dense_add_get_at"] = dense.add_get(np.ones(MiB, np.float32), spots)
            rows = rng.integers(0, 200_000, 60_000)  # 60k rows of 16: 3.8 MiB each way
            matrix = mv.MatrixTable(200_000, 16, name="matrix")
            matrix.add(np.ones((len(rows), 16), np.float32), rows)
            out["rows"] = matrix.get(rows)
            sparse = mv.SparseMatrixTable(200_000, 16, name="sparse")
            sparse.add(np.full((len(rows), 16), 2, np.float32), rows)
            out["sparse"] = sparse.get(rows)
            kv = mv.KVTable(dim=16, name="kv")
            keys = rng.integers(-2**62, 2**62, 70_000)
            kv.add(keys, np.ones((len(keys), 16), np.float32))
            out["kv"] = kv.get(keys)
            moved = mv.api._job.client.shared_memory.moved_bytes
    finally:
        del os.environ["MV_SHARED_MEMORY"]
    return out, moved


@needs_shm
def test_large_arrays_go_through_shared_memory_with_the_sockets_results() -> None:
    shared, moved = run_tables(shared=True)
    plain, none_moved = run_tables(shared=False)
    assert none_moved == 0
    assert moved >= 4 * 12 * MiB  # the dense adds and gets at least
    for name in plain:
        np.testing.assert_array_equal(shared[name], plain[name], err_msg=name)
    np.testing.assert_allclose(shared["dense"], 2 * np.random.default_rng(7).standard_normal(3 * MiB).astype(np.float32),
                               rtol=1e-6)
    assert shared["rows"].min() >= 1 and shared["sparse"].min() >= 2  # every row named got its adds


HELD_ADDS = """
import json, sys
import numpy as np
import multiverso_py as mv

mv.init(timeout=30)
w = mv.worker_id()
table = mv.ArrayTable(1 << 20, dtype="float32", name="held", consistency="bsp")  # 4 MiB adds
if w == 0:
    table.add(np.full(1 << 20, 1, np.float32))  # held until worker 1 finishes clock 0, acknowledged at once
    table.add(np.full(1 << 20, 10, np.float32))  # the same segment again: the held add must not see this
    lent = mv.api._job.client.shared_memory.moved_bytes
    if lent < 8 << 20:
        sys.exit(f"the adds did not go through shared memory ({lent} bytes)")
mv.clock()
mv.barrier()
values = table.get()
if not np.all(values == 11):
    sys.exit(f"worker {w}: expected 11 everywhere, got {np.unique(values)}")
mv.shutdown()
"""


@needs_shm
def test_a_held_add_keeps_its_arrays_when_the_worker_reuses_its_segment(tmp_path: Path) -> None:
    script = tmp_path / "held.py"
    script.write_text(textwrap.dedent(HELD_ADDS))
    result = testing.run_job(script, workers=2, servers=1, timeout=90)
    assert result.returncode == 0, testing.job_report(result)


def unlinked_segments_mapped(pid: int) -> set[str]:
    """The names of segments process pid still maps though their worker has unlinked them."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split("/dev/shm/")[1].split()[0] for line in lines if "/dev/shm/mvpy_" in line and "(deleted)" in line}


@needs_shm
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's mappings from /proc")
def test_a_server_unmaps_the_segments_its_worker_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # A worker that keeps 16 MiB of idle segments and pulls tables of changing sizes drops
    # segments all the time; the server must not keep their memory alive.
    monkeypatch.setattr(shm, "_free_shared_bytes", lambda: 64 * MiB)
    dropped: set[str] = set()
    close = shm.Segment.close

    def closed(self: shm.Segment) -> None:
        if self.buf is not None:
            dropped.add(self.name)
        close(self)

    monkeypatch.setattr(shm.Segment, "close", closed)
    with LocalCluster(servers=1, log_level="warning") as cluster, mv.init(cluster.address, timeout=30):
        for mib in (3, 6, 12, 5, 11, 4, 9, 13):
            table = mv.ArrayTable(mib * MiB // 4, name=f"t{mib}")
            table.add(np.full(table.size, mib, np.float32))
            assert table.get()[-1] == mib
        assert len(dropped) >= 4, dropped  # the worker did drop segments the server had mapped
        server = cluster.servers[0].pid
        assert testing.wait_for(lambda: not unlinked_segments_mapped(server), timeout=4 * SEGMENT_SWEEP_S), \
            f"the server still maps dropped segments {unlinked_segments_mapped(server)}"
        np.testing.assert_array_equal(table.get(), np.full(table.size, 13, np.float32))  # and serves on


KILLED_WORKER = """
import os, sys, time
import numpy as np
import multiverso_py as mv

mv.init(timeout=30)
table = mv.ArrayTable(4 << 20, name="big")
table.add(np.ones(4 << 20, np.float32))
table.get()
names = [s.name for s in mv.api._job.client.shared_memory.pool._free]
print(" ".join(names), flush=True)
time.sleep(60)  # killed before this ends
"""


@needs_shm
def test_a_worker_killed_with_kill_9_leaves_no_segments_behind(tmp_path: Path) -> None:
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED_WORKER))
    with LocalCluster(servers=1, log_level="warning") as cluster:
        env = {**os.environ, **cluster.worker_env(0)}
        with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env) as worker:
            try:
                names = worker.stdout.readline().split()
                assert names and all(segment_exists(n) for n in names), names
                os.kill(worker.pid, signal.SIGKILL)
                worker.wait(timeout=IO_TIMEOUT)
            finally:
                if worker.poll() is None:
                    worker.kill()
        assert testing.wait_for(lambda: not any(segment_exists(n) for n in names), timeout=20), \
            f"segments left after the worker died: {[n for n in names if segment_exists(n)]}"


# ---------------------------------------------------------------- bad references


@pytest.mark.parametrize("wire, words", [
    (["mvpy_0123456789abcdef", MiB], "cannot map"),
    (["/dev/shm/other", MiB], "not a multiverso_py segment"),
    (["mvpy_0123456789abcdef"], "must be"),
])
def test_a_server_answers_a_bad_segment_reference_with_an_error_and_goes_on(wire: list, words: str) -> None:
    with LocalCluster(servers=1, log_level="warning") as cluster, mv.init(cluster.address, timeout=10):
        table = mv.ArrayTable(16, name="t")
        table.add(np.ones(16, np.float32))
        info = table._info
        body = {"table": info.table_id, "client": 7777, "seq": 1, "map": info.map_version, "shm": wire,
                "parts": [{"p": 0, "arrays": [["float32", [16]]]}]}
        sock = testing.raw_connection(cluster.server_address(0), timeout=IO_TIMEOUT)
        try:
            sock.sendall(encode_bytes(MsgType.ADD, 5, body))
            frame = testing.read_frame(sock, FrameReader())
        finally:
            sock.close()
        assert frame.type is MsgType.ERROR and frame.body["code"] == int(ErrorCode.BAD_REQUEST), frame
        assert words in frame.body["message"], frame.body["message"]
        np.testing.assert_array_equal(table.get(), np.ones(16))  # the server still serves


def test_a_worker_that_cannot_create_segments_goes_on_with_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    links = shm.WorkerLinks(enabled=True)
    links._servers.add(0)
    monkeypatch.setattr(shm, "_map", full)
    big = memoryview(np.ones(MiB, np.float32)).cast("B")
    assert links.lend(0, "add", [], [big]) is None
    assert not links.enabled and links.moved_bytes == 0
    asked: list = []
    fresh = shm.WorkerLinks(enabled=True)
    assert asyncio.run(fresh.probe(0, asked.append)) is False and not asked  # no segment to show a server


def test_a_small_dev_shm_bounds_what_a_worker_lends_and_keeps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shm, "_free_shared_bytes", lambda: 64 * MiB)  # a container's default
    links = shm.WorkerLinks(enabled=True)
    assert links.lent_bytes == 16 * MiB and links.pool.keep_bytes == 16 * MiB
    assert shm.WorkerLinks(enabled=True, lent_bytes=8 * MiB).lent_bytes == 8 * MiB
