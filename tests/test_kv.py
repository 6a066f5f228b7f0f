"""KVTable: get/add against a dict reference over keys of every 64-bit value, insert on
get, len(), deterministic initializers (the same rows with 1 server and with 3), and user
errors raised on the calling worker."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py.tables import kv
from multiverso_py.testing import LocalCluster

pytestmark = pytest.mark.usefixtures("no_scheduler_env")

MASK = (1 << 64) - 1
EXTREMES = [0, -1, 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64 - 2]


def random_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """uint64 keys: small ones (repeats), the extremes, and any 64-bit pattern (half of
    them > 2**63-1, i.e. negative as int64)."""
    small = rng.integers(-20, 20, count // 3).astype(np.int64).view(np.uint64)
    extreme = np.array([k & MASK for k in EXTREMES], dtype=np.uint64)
    wide = rng.integers(0, MASK, count - len(small), dtype=np.uint64, endpoint=True)
    keys = np.concatenate([small, extreme, wide])
    return keys[rng.permutation(len(keys))]


def as_given(keys: np.ndarray, style: int) -> Any:
    """The same keys as the user may pass them."""
    if style == 0:
        return keys  # uint64
    if style == 1:
        return keys.view(np.int64)  # negative where > 2**63-1
    return [int(k) if k < 2**63 else int(k) - 2**64 * (i % 2) for i, k in enumerate(keys)]  # mixed Python ints


def reference_rows(reference: dict[int, np.ndarray], keys: np.ndarray, dim: int, dtype: str) -> np.ndarray:
    zero = np.zeros(dim, dtype=dtype)
    return np.array([reference.get(int(k), zero) for k in keys], dtype=dtype).reshape(len(keys), dim)


@pytest.mark.parametrize("dim", [1, 8])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_get_and_add_match_a_dict(job: mv.Job, dim: int, dtype: str) -> None:
    rng = np.random.default_rng(dim)
    table = mv.KVTable(dim, dtype)
    reference: dict[int, np.ndarray] = {}
    for step in range(6):
        keys = random_keys(rng, 600)
        values = rng.integers(-50, 50, (len(keys), dim)).astype(dtype)  # integer-valued: exact sums
        table.add(as_given(keys, step % 3), values[:, 0] if dim == 1 and step % 2 else values)
        for key, row in zip(keys.tolist(), values):
            reference[key] = reference.get(key, np.zeros(dim, dtype)) + row
        probe = np.concatenate([keys[:200], random_keys(rng, 100)])
        got = table.get(as_given(probe, (step + 1) % 3))
        assert got.shape == (len(probe), dim) and got.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got, reference_rows(reference, probe, dim, dtype))
        reference.update((int(k), np.zeros(dim, dtype)) for k in probe if int(k) not in reference)
        assert len(table) == len(reference)


def test_negative_and_wide_keys_are_their_bit_patterns(job: mv.Job) -> None:
    table = mv.KVTable(2, "int64")
    table.add([-1, 2**63], [[1, 2], [3, 4]])
    table.add([2**64 - 1, -(2**63)], np.array([[10, 20], [30, 40]]))
    np.testing.assert_array_equal(table.get(np.array([2**64 - 1], dtype=np.uint64)), [[11, 22]])
    np.testing.assert_array_equal(table.get(np.array([-(2**63)], dtype=np.int64)), [[33, 44]])
    np.testing.assert_array_equal(table.get(np.array([-1], dtype=np.int8)), [[11, 22]])
    assert len(table) == 2


def test_duplicate_keys_in_one_add_sum_and_async_keeps_order(job: mv.Job) -> None:
    table = mv.KVTable(3)
    futures = [table.add_async([5, 5, 7, 5], np.ones((4, 3))) for _ in range(10)]
    got = table.get_async([7, 5, 7])  # issued after the adds: sees all of them
    np.testing.assert_array_equal(got.result(timeout=20), [[10] * 3, [30] * 3, [10] * 3])
    assert all(f.result(timeout=20) is None for f in futures)
    assert table.get([]).shape == (0, 3) and len(table) == 2


def test_insert_on_get(job: mv.Job) -> None:
    stored = mv.KVTable(4, init=("uniform", -1, 1), name="stored")
    lookup = mv.KVTable(4, init=("uniform", -1, 1), name="lookup", insert_on_get=False)
    keys = np.arange(-3000, 3000) * 1_000_003  # enough keys for every shard to grow
    first = stored.get(keys)
    assert len(stored) == len(keys)
    np.testing.assert_array_equal(stored.get(keys[::-1]), first[::-1])
    peek = lookup.get(keys)
    assert len(lookup) == 0 and (peek != 0).all()
    np.testing.assert_array_equal(lookup.get(keys), peek)
    lookup.add(keys[:10], np.full((10, 4), 5.0))
    assert len(lookup) == 10
    np.testing.assert_allclose(lookup.get(keys[:20]), np.concatenate([peek[:10] + 5, peek[10:20]]), rtol=1e-6)


def test_uniform_init_is_deterministic_and_in_range(job: mv.Job) -> None:
    keys = np.random.default_rng(1).integers(-(2**63), 2**63 - 1, 20_000, dtype=np.int64)
    table = mv.KVTable(8, init=("uniform", -0.5, 2.0), name="u")
    rows = table.get(keys)
    assert rows.min() >= -0.5 and rows.max() <= 2.0
    assert abs(rows.mean() - 0.75) < 0.02 and abs(rows.std() - 2.5 / np.sqrt(12)) < 0.02
    assert len({tuple(r) for r in rows[:1000]}) == 1000 and len(set(rows[0])) == 8  # keys and columns differ
    again = mv.KVTable(8, init=("uniform", -0.5, 2.0), name="u2", insert_on_get=False)
    assert not np.array_equal(again.get(keys[:100]), rows[:100])  # another name, other rows
    np.testing.assert_array_equal(mv.KVTable(8, init=("uniform", -0.5, 2.0), name="u").get(keys), rows)


def test_normal_init_has_the_std_and_follows_the_seed(job: mv.Job) -> None:
    keys = np.arange(50_000)
    rows = mv.KVTable(4, "float64", init=("normal", 0.1), name="n").get(keys)
    assert abs(rows.mean()) < 0.002 and abs(rows.std() - 0.1) < 0.002
    assert 0.0022 < np.mean(np.abs(rows) > 0.3) < 0.0032  # beyond 3 std: 0.27% for a normal
    seeded = mv.KVTable(4, "float64", init=("normal", 0.1), name="n-seeded", seed=1)
    reseeded = mv.KVTable(4, "float64", init=("normal", 0.1), name="n-seeded2", seed=2)
    assert not np.array_equal(seeded.get(keys[:50]), reseeded.get(keys[:50]))
    assert not np.array_equal(seeded.get(keys[:50]), rows[:50])
    unnamed = [mv.KVTable(4, init=("normal", 1.0)) for _ in range(2)]  # named apart by creation order
    assert unnamed[0].name != unnamed[1].name
    assert not np.array_equal(unnamed[0].get([1]), unnamed[1].get([1]))


def initial_rows(address: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Initial rows of fixed keys, an add's result and len() in a job."""
    keys = random_keys(np.random.default_rng(5), 3000)
    with mv.init(address, timeout=20):
        normal = mv.KVTable(6, init=("normal", 1.0), name="emb", seed=11)
        uniform = mv.KVTable(3, "float64", init=("uniform", 0, 1), name="bias", insert_on_get=False)
        rows = normal.get(keys)
        normal.add(keys[:100], np.ones((100, 6)))
        added = normal.get(keys[:100])
        count = len(normal)
        return rows, uniform.get(keys), added, count


def test_same_initial_rows_with_one_and_with_three_servers(no_scheduler_env: None) -> None:
    embedded = initial_rows(None)
    with LocalCluster(workers=1, servers=3, log_level="warning") as cluster:
        distributed = initial_rows(cluster.address)
    for one, three in zip(embedded[:3], distributed[:3]):
        np.testing.assert_array_equal(one, three)
    assert embedded[3] == distributed[3] == len(np.unique(random_keys(np.random.default_rng(5), 3000)))


def test_partitions_span_every_server(no_scheduler_env: None) -> None:
    with LocalCluster(workers=1, servers=3, log_level="warning") as cluster, mv.init(cluster.address, timeout=20):
        table = mv.KVTable(2, "int64")
        assert sorted(table._info.owners) == [0, 1, 2] and table.num_partitions == 3  # one per server
        keys = np.arange(-500, 500)
        table.add(keys, np.stack([keys, -keys], axis=1))
        np.testing.assert_array_equal(table.get(keys[::-1]), np.stack([keys, -keys], axis=1)[::-1])
        assert len(table) == 1000


def test_a_two_partition_split_is_partition_of() -> None:
    """A table of two partitions (on two servers) splits its keys by the mix's top bit:
    exactly partition_of's answer for two partitions, so each server gets the keys
    partition_of names."""
    keys = np.random.default_rng(3).integers(0, 2**64 - 1, 50_000, dtype=np.uint64, endpoint=True)
    keys[:3] = [0, 2**63, 2**64 - 1]
    groups = dict(kv.group_by_partition(kv.mix64(keys) >= kv._TOP_BIT))
    owner = kv.partition_of(keys, 2)
    for p in (0, 1):
        np.testing.assert_array_equal(groups[p], np.flatnonzero(owner == p))


def test_torch_keys_and_values(job: mv.Job) -> None:
    import torch  # the test extra installs it with the torch extra; a missing torch must fail, not skip
    table = mv.KVTable(2)
    table.add(torch.tensor([-4, 9]), torch.ones(2, 2))
    np.testing.assert_array_equal(table.get(torch.tensor([9, -4, 0], dtype=torch.int32)), [[1, 1], [1, 1], [0, 0]])


def raises_locally(call: Callable[[], Any], exc: type[BaseException], match: str) -> None:
    """`call` raises itself (nothing went out and failed: a barrier re-raises that)."""
    with pytest.raises(exc, match=match):
        call()
    mv.barrier()


def test_user_errors_raise_on_the_worker(job: mv.Job) -> None:
    table = mv.KVTable(2)
    raises_locally(lambda: table.get_async(np.zeros((2, 2), dtype=np.int64)), mv.InvalidArgument, r"one-dim.*\(2, 2\)")
    raises_locally(lambda: table.get_async([1.5, 2.0]), mv.InvalidArgument, "integers.*float64")
    raises_locally(lambda: table.get_async(np.array([True])), mv.InvalidArgument, "integers.*bool")
    raises_locally(lambda: table.get_async([2**64]), mv.InvalidArgument, "64 bits")
    raises_locally(lambda: table.get_async(5), mv.InvalidArgument, "one-dim")
    raises_locally(lambda: table.add_async([1, 2], np.ones((2, 3))), mv.InvalidArgument, r"\(2, 3\).*\(2, 2\)")
    raises_locally(lambda: table.add_async([1, 2], np.ones(2)), mv.InvalidArgument, r"\(2,\).*\(2, 2\)")
    raises_locally(lambda: table.add_async([[1, 2]], np.ones((2, 2))), mv.InvalidArgument, "one-dim")
    ints = mv.KVTable(1, "int64")
    raises_locally(lambda: ints.add_async([1], [0.5]), mv.InvalidArgument, "float64.*int64")
    raises_locally(lambda: ints.add_async([1, 2], [1]), mv.InvalidArgument, r"\(1,\).*\(2, 1\) or \(2,\)")
    assert len(table) == 0 and len(ints) == 0


@pytest.mark.parametrize("kwargs, match", [
    ({"init": ("normal",)}, "init="), ({"init": ("uniform", 1, 0)}, "low <= high"), ({"init": "ones"}, "init="),
    ({"init": ("normal", float("inf"))}, "finite"), ({"dtype": "int64", "init": ("normal", 1)}, "float table"),
    ({"key_dtype": "int32"}, "key_dtype"), ({"dim": 0}, "positive"), ({"updater": "nope"}, "unknown updater"),
    ({"seed": 1.5}, "seed"),
])
def test_bad_construction(job: mv.Job, kwargs: dict, match: str) -> None:
    with pytest.raises(mv.InvalidArgument, match=match):
        mv.KVTable(**kwargs)


def test_same_name_other_spec_is_a_mismatch(job: mv.Job) -> None:
    mv.KVTable(4, name="shared")
    with pytest.raises(mv.TableSpecMismatch, match="shape"):
        mv.KVTable(8, name="shared")
    with pytest.raises(mv.TableSpecMismatch, match="table_options"):
        mv.KVTable(4, name="shared", init=("normal", 0.1))
    mv.KVTable(4, name="shared").add([1], np.ones((1, 4)))
