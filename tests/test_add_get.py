"""add_get: an add and then a get of the same values in one round trip.

- Against a numpy reference of the updater on 2 real server processes: the whole tensor
  and flat indices (repeated, across partitions and servers), per-call lr, the values
  returned and those left in the table; one message per server instead of two.
- A resent ADD_GET (same client and sequence number) is applied once and still answers
  with the values.
- SSP and BSP tables: an add followed by a get, with those models' semantics; a server
  refuses a raw ADD_GET on them.
- PSOptimizer steps with one add_get per table when every parameter has a gradient.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py import testing
from multiverso_py.errors import ErrorCode
from multiverso_py.protocol import MsgType, pack_parts, unpack_parts
from test_routing import _request

pytestmark = [pytest.mark.timeout(60), pytest.mark.usefixtures("no_scheduler_env")]

SIZE = 300_000  # 1.2 MB of float32: two partitions on each of the two servers


@pytest.fixture
def cluster() -> Iterator[testing.LocalCluster]:
    with testing.LocalCluster(workers=1, servers=2, log_level="warning") as cluster:
        with mv.init(cluster.address, timeout=20):
            yield cluster


def test_add_get_is_an_add_then_a_get_in_one_message_per_server(cluster: testing.LocalCluster) -> None:
    rng = np.random.default_rng(3)
    table = mv.ArrayTable(SIZE, name="w", updater="sgd", lr=0.5)
    ref = np.zeros(SIZE, np.float32)
    servers = len(set(table._info.owners))
    assert servers == 2
    for lr in (None, 0.25):
        delta = rng.standard_normal(SIZE).astype(np.float32)
        before = table.stats()["requests"]
        got = table.add_get(delta, lr=lr)
        assert table.stats()["requests"] - before == servers  # an add and a get would take twice as many
        ref -= np.float32(0.5 if lr is None else lr) * delta
        np.testing.assert_allclose(got, ref, rtol=1e-6)
    at = np.concatenate([rng.integers(0, SIZE, 5000), [0, 0, SIZE - 1, SIZE // 2]])  # repeats, every partition
    delta = rng.standard_normal(len(at)).astype(np.float32)
    out = np.empty(len(at), np.float32)
    got = table.add_get(delta, at, lr=1.0, out=out)
    assert got is out
    np.subtract.at(ref, at, delta)  # repeated indices sum
    np.testing.assert_allclose(got, ref[at], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table.get(), ref, rtol=1e-5, atol=1e-6)


def test_add_get_async_keeps_the_order_of_a_workers_calls(cluster: testing.LocalCluster) -> None:
    table = mv.ArrayTable((40, 5), name="ordered")
    futures = [table.add_get_async(np.ones((40, 5))) for _ in range(20)]
    table.add(np.ones((40, 5)))
    values = [f.result(timeout=20) for f in futures]
    assert [v[0, 0] for v in values] == list(range(1, 21))  # each sees exactly the adds before it
    assert all(np.all(v == v[0, 0]) for v in values)
    assert np.all(table.get() == 21)


def test_a_resent_add_get_is_applied_once_and_still_answers(cluster: testing.LocalCluster) -> None:
    table = mv.ArrayTable(8, "int64", name="once")
    info = table._info
    count = info.layout["bounds"][1]  # partition 0's values
    parts, buffers = pack_parts([(0, {}, [np.arange(count, dtype=np.int64)])])
    body = {"table": info.table_id, "client": 900, "seq": 1, "map": info.map_version, "parts": parts}
    address = cluster.server_address(info.owners[0])
    replies = [_request(address, MsgType.ADD_GET, body, buffers, req_id=n) for n in (1, 2)]
    for reply in replies:
        assert reply.type is MsgType.REPLY, reply.body
        [(pid, _, [values])] = unpack_parts(reply.body, reply.buffers)
        np.testing.assert_array_equal(values, np.arange(count))
    np.testing.assert_array_equal(table.get()[:count], np.arange(count))  # not twice that


@pytest.mark.parametrize("consistency", ["ssp", "bsp"])
def test_on_ssp_and_bsp_tables_it_is_an_add_then_a_get(cluster: testing.LocalCluster, consistency: str) -> None:
    table = mv.ArrayTable(6, name=consistency, consistency=consistency, staleness=0)
    first = table.add_get(np.ones(6))
    # BSP holds an add until its clock completes; SSP with staleness 0 applies it at once
    assert np.all(first == (0 if consistency == "bsp" else 1))
    mv.clock()
    assert np.all(table.add_get(np.ones(6)) == (1 if consistency == "bsp" else 2))
    info = table._info
    parts, buffers = pack_parts([(0, {}, [np.ones(info.layout["bounds"][1], np.float32)])])
    body = {"table": info.table_id, "client": 901, "seq": 1, "map": info.map_version, "parts": parts}
    reply = _request(cluster.server_address(info.owners[0]), MsgType.ADD_GET, body, buffers)
    assert reply.type is MsgType.ERROR and reply.body["code"] == ErrorCode.BAD_REQUEST
    assert "async" in reply.body["message"]


def test_bad_input_is_refused_before_anything_is_sent(cluster: testing.LocalCluster) -> None:
    table = mv.ArrayTable(10, name="checked")
    with pytest.raises(ValueError, match="delta"):
        table.add_get(np.ones(9))
    with pytest.raises(IndexError):
        table.add_get([1.0], [10])
    with pytest.raises(ValueError, match="out="):
        table.add_get(np.ones(10), out=np.empty(10, np.float64))
    assert table.stats()["requests"] == 0


def test_psoptimizer_steps_in_one_round_trip_per_table(cluster: testing.LocalCluster) -> None:
    torch = pytest.importorskip("torch")
    from multiverso_py.torch import PSOptimizer

    torch.manual_seed(0)
    model, local = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    local.load_state_dict(model.state_dict())
    opt, local_opt = PSOptimizer(model.parameters(), lr=0.1), torch.optim.SGD(local.parameters(), lr=0.1)
    [[table]] = opt.tables
    before = table.stats()["requests"]
    for _ in range(5):
        x = torch.randn(8, 4)
        for m, o in ((model, opt), (local, local_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    servers = len(set(table._info.owners))
    assert table.stats()["requests"] - before == 5 * servers  # an add and a get each would take twice as many
    for p, q in zip(model.parameters(), local.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=1e-5)
