"""KeyIndex, the vectorized open-addressing index behind KV shards, against a dict: random
batches with repeats, keys that share a home slot or wrap around the slot array, the
extreme 64-bit keys, and growth over many rehashes; and an insert's cost per key does not
grow with the size of the index."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiverso_py.tables.keyindex import KeyIndex, mix64

EXTREMES = [0, 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2]


def _same_home(home: int, count: int, slots: int = 16) -> list[int]:
    """Keys whose home slot in a `slots`-slot index is `home`."""
    candidates = np.arange(200_000, dtype=np.uint64)
    return [int(k) for k in candidates[(mix64(candidates) & np.uint64(slots - 1)) == home][:count]]


COLLIDING = _same_home(0, 40)
WRAPPING = _same_home(15, 40)  # the last slot: probing wraps to slot 0
key = st.one_of(st.sampled_from(EXTREMES), st.sampled_from(COLLIDING), st.sampled_from(WRAPPING),
                st.integers(0, 50), st.integers(0, 2**64 - 1))
batches = st.lists(st.lists(key, max_size=40), min_size=1, max_size=12)


def apply_batch(index: KeyIndex, reference: dict[int, int], batch: list[int]) -> None:
    """Look a batch up, check it against the reference, insert what is missing."""
    keys = np.array(batch, dtype=np.uint64)
    rows = index.lookup(keys)
    assert rows.dtype == np.int64 and rows.shape == keys.shape
    assert rows.tolist() == [reference.get(k, -1) for k in batch]
    missing = np.unique(keys[rows < 0])
    new_rows = np.arange(len(reference), len(reference) + len(missing)) * 3 + 7  # any row numbers
    index.insert(missing, new_rows)
    reference.update(zip(missing.tolist(), new_rows.tolist()))


def check_contents(index: KeyIndex, reference: dict[int, int]) -> None:
    assert len(index) == len(reference)
    assert len(index) * 2 <= index.capacity
    keys, rows = index.items()
    assert dict(zip(keys.tolist(), rows.tolist())) == reference
    everything = np.array(list(reference), dtype=np.uint64)
    assert index.lookup(everything).tolist() == list(reference.values())


@settings(max_examples=80, deadline=None)
@given(batches)
def test_matches_a_dict(batch_list: list[list[int]]) -> None:
    index, reference = KeyIndex(), {}
    for batch in batch_list:
        apply_batch(index, reference, batch)
    check_contents(index, reference)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=300, unique=True), st.integers(1, 64))
def test_inserts_in_any_batching(keys: list[int], batch: int) -> None:
    index, reference = KeyIndex(), {}
    for start in range(0, len(keys), batch):
        apply_batch(index, reference, keys[start:start + batch])
    check_contents(index, reference)
    absent = np.array([k ^ 0x5555 for k in keys if k ^ 0x5555 not in reference], dtype=np.uint64)
    assert (index.lookup(absent) == -1).all()


@settings(max_examples=80, deadline=None)
@given(batches)
def test_find_or_insert_matches_a_dict(batch_list: list[list[int]]) -> None:
    """Repeats within a batch (colliding and wrapping keys among them) get one row; new
    keys take the next rows in the order returned."""
    index, reference = KeyIndex(), {}
    for batch in batch_list:
        keys = np.array(batch, dtype=np.uint64)
        rows, new = index.find_or_insert(keys, len(reference))
        assert new.dtype == np.uint64 and len(set(new.tolist())) == len(new)
        assert set(new.tolist()) == set(batch) - set(reference)
        reference.update(zip(new.tolist(), range(len(reference), len(reference) + len(new))))
        assert rows.tolist() == [reference[k] for k in batch]
    check_contents(index, reference)


def test_one_long_cluster_with_wraparound() -> None:
    """All keys share the last home slot: one cluster that wraps past the end, placed
    within one batch (in-batch collisions on every slot) and found again."""
    index = KeyIndex(capacity=128)
    keys = np.array(_same_home(127, 60, slots=128), dtype=np.uint64)
    index.insert(keys, np.arange(60))
    assert index.capacity == 128 and index.rehashes == 0
    np.testing.assert_array_equal(index.lookup(keys), np.arange(60))
    np.testing.assert_array_equal(index.lookup(keys[::-1]), np.arange(60)[::-1])
    assert (index.lookup(np.array(_same_home(127, 70, slots=128)[60:], dtype=np.uint64)) == -1).all()
    more = np.array(_same_home(127, 70, slots=128)[55:], dtype=np.uint64)  # 5 present, 10 new, twice each
    rows, new = index.find_or_insert(np.r_[more, more[::-1]], 100)
    assert index.capacity == 256 and len(new) == 10 and set(new.tolist()) == set(more[5:].tolist())
    np.testing.assert_array_equal(rows[:15], rows[15:][::-1])
    np.testing.assert_array_equal(rows[:5], np.arange(55, 60))
    assert sorted(rows[5:15].tolist()) == list(range(100, 110))
    np.testing.assert_array_equal(index.lookup(new), np.arange(100, 110))


def test_growth_over_many_rehashes() -> None:
    rng = np.random.default_rng(7)
    index, reference = KeyIndex(), {}
    for _ in range(150):
        batch = rng.integers(0, 2**64 - 1, size=int(rng.integers(1, 400)), dtype=np.uint64, endpoint=True)
        batch = np.concatenate([batch, batch[:5], np.array(EXTREMES, dtype=np.uint64)])
        apply_batch(index, reference, batch.tolist())
    assert index.rehashes >= 6 and index.capacity >= 2**15
    check_contents(index, reference)


def test_empty_and_rejected_input() -> None:
    index = KeyIndex()
    assert index.lookup(np.array([], dtype=np.uint64)).shape == (0,)
    index.insert(np.array([], dtype=np.uint64), np.array([], dtype=np.int64))
    assert len(index) == 0 and (index.lookup(np.array(EXTREMES, dtype=np.uint64)) == -1).all()
    with pytest.raises(ValueError, match="1-D of one length"):
        index.insert(np.array([1, 2], dtype=np.uint64), np.array([0], dtype=np.int64))
    with pytest.raises(ValueError, match=">= 0"):
        index.insert(np.array([1], dtype=np.uint64), np.array([-1], dtype=np.int64))


def _filled(size: int, capacity: int, rng: np.random.Generator) -> KeyIndex:
    index = KeyIndex(capacity)
    for start in range(0, size, 100_000):
        count = min(100_000, size - start)
        index.insert(rng.integers(0, 2**63, count, dtype=np.uint64), np.arange(start, start + count))
    return index


def test_insert_cost_per_key_does_not_grow_with_size() -> None:
    """10^4 new keys into an index of 10^4 and of 10^6 keys: probes per key stay small and
    alike (a deterministic count), and so does time (medians, a generous factor). The
    capacities are fixed so that no timed insert rehashes."""
    rng = np.random.default_rng(3)
    batch = 10_000
    results = {}
    for size, capacity in ((10_000, 2**18), (1_000_000, 2**22)):
        index = _filled(size, capacity, rng)
        times, probes = [], []
        for trial in range(7):
            keys = rng.integers(0, 2**63, batch, dtype=np.uint64)
            before = index.probes
            start = time.perf_counter()
            index.insert(keys, np.arange(batch))
            times.append(time.perf_counter() - start)
            probes.append((index.probes - before) / batch)
        assert index.rehashes == 0
        results[size] = (float(np.median(times)), max(probes))
    (small_time, small_probes), (big_time, big_probes) = results[10_000], results[1_000_000]
    assert small_probes < 8 and big_probes < 8, results  # at load <= 0.5: ~1 slot, a few windows
    assert big_time < 5 * small_time + 0.002, results
