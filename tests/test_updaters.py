"""Server-side updaters.

- Each rule against a plain numpy reference of its formula: whole shards, spans, repeated
  rows, per-call lr, pulls by two workers; rows outside an add keep their values and state
  bit for bit; float32 and float64; 1-D (ArrayTable) and 2-D rows.
- Adam against torch.optim.Adam, on a dense table and with per-row step counts.
- Every table type through real server processes, and dcasgd's per-worker backups with two
  worker processes.
- Bad updaters, options and per-call learning rates are refused on the worker.
"""

from __future__ import annotations

import textwrap
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py import testing
from multiverso_py.tables.base import TableSpec
from multiverso_py.tables.kv import KVShard, initial_rows, table_seed
from multiverso_py.updaters import UPDATERS, call_args, check_updater, is_additive, make_updater

pytestmark = pytest.mark.usefixtures("no_scheduler_env")

RUN_TIMEOUT = 90.0  # seconds for a whole multi-process job; it normally takes a few
DTYPES = ["float32", "float64"]
TOL = {"float32": {"rtol": 2e-5, "atol": 2e-6}, "float64": {"rtol": 1e-11, "atol": 1e-13}}
TORCH_TOL = {"float32": {"rtol": 1e-6, "atol": 5e-7}, "float64": {"rtol": 1e-12, "atol": 1e-14}}
# Every option given, none at its default: a rule that ignores one fails.
OPTIONS: dict[str, dict] = {
    "add": {},
    "sgd": {"lr": 0.1},
    "momentum": {"lr": 0.1, "momentum": 0.8},
    "adagrad": {"lr": 0.2, "eps": 1e-6},
    "adam": {"lr": 0.05, "betas": (0.8, 0.99), "eps": 1e-6},
    "ftrl": {"alpha": 0.2, "beta": 0.5, "l1": 0.05, "l2": 0.1},
    "dcasgd": {"lr": 0.1, "lam": 0.5},
}
NAMES = list(OPTIONS)


class Reference:
    """The updaters' formulas written plainly: per add, the deltas of repeated rows summed,
    then every touched row updated once; per pull, the worker's backup of those rows."""

    def __init__(self, name: str, w: np.ndarray, options: dict):
        self.name, self.o, self.w = name, options, w.copy()
        self.lr = options.get("lr", options.get("alpha"))
        zeros = np.zeros_like(self.w)
        self.state = {
            "momentum": {"v": zeros},
            "adagrad": {"G": zeros},
            "adam": {"m": zeros, "v": zeros.copy(), "step": np.zeros(len(w), np.int64)},
            "ftrl": {"z": zeros, "n": zeros.copy()},
        }.get(name, {})
        self.backup: dict[int, np.ndarray] = {}

    def pull(self, worker: int, rows: Any = None) -> None:
        if self.name != "dcasgd":
            return
        if worker not in self.backup:
            self.backup[worker] = self.w.copy()
        else:
            rows = slice(None) if rows is None else rows
            self.backup[worker][rows] = self.w[rows]

    def add(self, rows: Any, delta: np.ndarray, lr: Optional[float] = None, worker: int = 0) -> None:
        if rows is None:
            rows = np.arange(len(self.w))
        elif isinstance(rows, slice):
            rows = np.arange(len(self.w))[rows]
        total = np.zeros_like(self.w)
        for row, d in zip(rows, delta):
            total[row] += d
        touched = np.unique(rows)
        self._rule(touched, total[touched], self.lr if lr is None else lr, worker)

    def _rule(self, i: np.ndarray, g: np.ndarray, lr: float, worker: int) -> None:
        w, s, o = self.w, self.state, self.o
        if self.name == "add":
            w[i] += g
        elif self.name == "sgd":
            w[i] -= lr * g
        elif self.name == "momentum":
            s["v"][i] = o["momentum"] * s["v"][i] + g
            w[i] -= lr * s["v"][i]
        elif self.name == "adagrad":
            s["G"][i] += g * g
            w[i] -= lr * g / (np.sqrt(s["G"][i]) + o["eps"])
        elif self.name == "adam":
            b1, b2 = o["betas"]
            s["step"][i] += 1
            t = s["step"][i].reshape(-1, *(1,) * (w.ndim - 1))
            s["m"][i] = b1 * s["m"][i] + (1 - b1) * g
            s["v"][i] = b2 * s["v"][i] + (1 - b2) * g * g
            m_hat, v_hat = s["m"][i] / (1 - b1 ** t), s["v"][i] / (1 - b2 ** t)
            w[i] -= lr * m_hat / (np.sqrt(v_hat) + o["eps"])
        elif self.name == "ftrl":
            z, n, l1 = s["z"][i], s["n"][i], o["l1"]
            sigma = (np.sqrt(n + g * g) - np.sqrt(n)) / lr
            z, n = z + g - sigma * w[i], n + g * g
            s["z"][i], s["n"][i] = z, n
            w[i] = np.where(np.abs(z) <= l1, 0, -(z - np.sign(z) * l1) / ((o["beta"] + np.sqrt(n)) / lr + o["l2"]))
        elif self.name == "dcasgd":
            backup = self.backup.get(worker)
            compensation = 0 if backup is None else o["lam"] * g * g * (w[i] - backup[i])
            w[i] -= lr * (g + compensation)

    def full_state(self) -> dict[str, np.ndarray]:
        return {**self.state, **{f"backup/{worker}": b for worker, b in self.backup.items()}}


def assert_close(got: np.ndarray, expected: np.ndarray, dtype: str, what: str, tol: dict = TOL) -> None:
    np.testing.assert_allclose(got, expected, **tol[dtype], err_msg=what)


# ------------------------------------------------------------------ each rule on its own


def unit_program(rng: np.random.Generator, num_rows: int, row_shape: tuple, dtype: str) -> list[tuple]:
    """("add", rows, delta, lr, worker) and ("pull", worker, rows): the whole shard, spans,
    repeated rows, per-call lr, and two workers that pull different rows at different times."""
    def delta(count: int) -> np.ndarray:
        return rng.normal(size=(count, *row_shape)).astype(dtype)

    def rows(*ids: int) -> np.ndarray:
        return np.array(ids, dtype=np.int64)

    last = num_rows - 1
    return [
        ("add", None, delta(num_rows), None, 0),
        ("pull", 0, None),
        ("add", rows(3, 3, 5, 0, 3), delta(5), None, 0),
        ("add", slice(2, 7), delta(5), None, 1),
        ("pull", 1, rows(2, 3, 4)),
        ("add", rows(last, 0), delta(2), 0.3, 1),
        ("add", None, delta(num_rows), 0.05, 0),
        ("pull", 0, slice(0, 4)),
        ("add", rows(5, 5, 5, 5), delta(4), None, 0),
        ("add", rng.integers(0, num_rows, 9), delta(9), None, 1),
        ("pull", 1, None),
        ("add", slice(1, last), delta(last - 1), 0.2, 0),
        ("add", rows(2, 4, 2), delta(3), None, 1),
    ]


@pytest.mark.parametrize("row_shape", [(), (3,)], ids=["elements", "rows"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_rule_matches_its_formula(name: str, dtype: str, row_shape: tuple) -> None:
    rng = np.random.default_rng(3)
    num_rows = 10
    data = rng.normal(size=(num_rows, *row_shape)).astype(dtype)
    updater = make_updater(name, OPTIONS[name], data)
    ref = Reference(name, data, OPTIONS[name])
    for step, op in enumerate(unit_program(rng, num_rows, row_shape, dtype)):
        what = f"{name} {dtype} step {step}"
        if op[0] == "pull":
            updater.pulled(op[1], op[2])
            ref.pull(op[1], op[2])
            continue
        _, rows, delta, lr, worker = op
        lr = None if name == "add" else lr  # add has no learning rate
        before = {"data": data.copy(), **{k: a.copy() for k, a in updater.state().items()}}
        updater.apply(delta, rows, {"w": worker, **({} if lr is None else {"lr": lr})})
        ref.add(rows, delta, lr, worker)
        assert updater.data is data and data.dtype == np.dtype(dtype)
        assert_close(data, ref.w, dtype, f"{what}: values")
        state, expected = updater.state(), ref.full_state()
        assert sorted(state) == sorted(expected), what
        for key in expected:
            assert_close(state[key], expected[key], dtype, f"{what}: state {key}")
        if isinstance(rows, np.ndarray):  # rows outside the add: values and state unchanged, bit for bit
            untouched = np.setdiff1d(np.arange(num_rows), rows)
            after = {"data": data, **state}
            for key, array in before.items():
                np.testing.assert_array_equal(after[key][untouched], array[untouched], err_msg=f"{what}: {key}")


def test_an_add_at_elements_allocates_nothing_the_size_of_the_table() -> None:
    # A scratch slot per row (4 bytes) would double a float32 vector's memory on a server.
    data = np.zeros(1 << 20, np.float32)
    updater = make_updater("add", {}, data)
    rows = np.array([7, 9, 7, 0, (1 << 20) - 1])
    tracemalloc.start()
    try:
        updater.apply(np.ones(len(rows), np.float32), rows, {})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < data.nbytes // 100, f"the add allocated {peak} bytes for a table of {data.nbytes}"
    np.testing.assert_array_equal(data[[7, 9, 0, (1 << 20) - 1]], [2, 1, 1, 1])
    assert data.sum() == len(rows)


def test_only_add_is_additive_and_a_state_is_what_the_rule_keeps() -> None:
    assert [name for name in UPDATERS if is_additive(name)] == ["add"]
    assert sorted(UPDATERS) == sorted(NAMES)
    data = np.zeros((4, 2), np.float32)
    keys = {name: sorted(make_updater(name, OPTIONS[name], data.copy()).state()) for name in NAMES}
    assert keys == {"add": [], "sgd": [], "momentum": ["v"], "adagrad": ["G"], "adam": ["m", "step", "v"],
                    "ftrl": ["n", "z"], "dcasgd": []}
    adam = make_updater("adam", {}, data)
    assert adam.state()["step"].shape == (4,) and adam.state()["m"].shape == (4, 2)


def test_ftrl_l1_keeps_weak_coordinates_at_zero() -> None:
    data = np.zeros(4)
    updater = make_updater("ftrl", {"alpha": 0.5, "l1": 1.0}, data)
    for _ in range(3):
        updater.apply(np.array([0.1, -0.2, 2.0, -3.0]), None, {})
    assert data[0] == 0 and data[1] == 0  # |z| stays <= l1
    assert data[2] < 0 < data[3]


@pytest.mark.parametrize("name", [n for n in NAMES if n != "add"])
def test_state_grows_with_a_kv_shard_and_new_keys_start_afresh(name: str) -> None:
    """200 keys added in steps make a KV shard double its storage twice: state grows with
    it, old rows keep theirs; dcasgd's backup of a new key is its initial row."""
    spec = TableSpec("kv", (2,), "float64", name, check_updater(name, OPTIONS[name]),
                     table_options={"init": ["uniform", -1.0, 1.0], "init_seed": 5, "insert_on_get": True})
    shard = KVShard(spec)
    keys = np.arange(200, dtype=np.uint64) * np.uint64(7919)
    w0 = initial_rows(["uniform", -1.0, 1.0], 5, keys, 2, np.dtype("float64"))
    ref = Reference(name, w0, OPTIONS[name])
    rng = np.random.default_rng(0)
    shard.get({"w": 0}, [keys[:10]])
    ref.pull(0, np.arange(10))
    for count in (10, 50, 120, 200, 200):
        index = rng.permutation(np.r_[0:count, rng.integers(0, count, 2 * count)])  # every key, some repeated
        delta = rng.normal(size=(len(index), 2))
        shard.add({"w": 0}, [keys[index], delta])
        ref.add(index, delta)
        rows = shard.index.lookup(keys[:count])
        assert_close(shard.data[rows], ref.w[:count], "float64", f"{name} after {count} keys")
        for key, expected in ref.full_state().items():
            state = shard.updater.state()[key]
            assert len(state) == len(shard.data)
            assert_close(state[rows], expected[:count], "float64", f"{name} state {key}")
    assert len(shard.data) == 256


# ------------------------------------------------------------------ learning rates and options


@pytest.mark.parametrize("lr", [0, -0.5, float("nan"), float("inf"), "0.1", True, [0.1]])
def test_a_bad_lr_in_an_add_is_refused_by_the_shard_too(lr: Any) -> None:
    for name in NAMES:
        data = np.ones(3)
        updater = make_updater(name, OPTIONS[name], data)
        with pytest.raises(mv.InvalidArgument, match="lr"):
            updater.apply(np.ones(3), None, {"lr": lr})
        np.testing.assert_array_equal(data, np.ones(3))
        with pytest.raises(mv.InvalidArgument, match="lr"):
            call_args(name, lr)


def test_call_args() -> None:
    assert call_args("add", None) == {} and call_args("sgd", None) == {}
    assert call_args("sgd", 2) == {"lr": 2.0} and call_args("ftrl", np.float32(0.5)) == {"lr": 0.5}
    with pytest.raises(mv.InvalidArgument, match="'add' has no learning rate"):
        call_args("add", 0.1)


def test_defaults_are_filled_in() -> None:
    assert check_updater("add", {}) == {}
    assert check_updater("sgd", {}) == {"lr": 0.01}
    assert check_updater("momentum", {}) == {"lr": 0.01, "momentum": 0.9}
    assert check_updater("adagrad", {}) == {"lr": 0.01, "eps": 1e-10}
    assert check_updater("adam", {}) == {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8}
    assert check_updater("ftrl", {}) == {"alpha": 0.1, "beta": 1.0, "l1": 0.0, "l2": 0.0}
    assert check_updater("ftrl", {"lr": 0.3}) == {"alpha": 0.3, "beta": 1.0, "l1": 0.0, "l2": 0.0}
    assert check_updater("dcasgd", {"lr": 1}) == {"lr": 1.0, "lam": 0.04}


BAD_OPTIONS = [
    ("nope", {}, r"unknown updater 'nope'.*adam"),
    ("add", {"lr": 0.1}, r"'add' takes no option lr"),
    ("sgd", {"momentum": 0.9}, r"'sgd' takes no option momentum; it accepts: lr"),
    ("sgd", {"lr": 0}, r"lr must be > 0"),
    ("sgd", {"lr": -1.0}, r"lr must be > 0"),
    ("sgd", {"lr": float("nan")}, r"lr must be a finite number"),
    ("sgd", {"lr": "0.1"}, r"lr must be a finite number"),
    ("sgd", {"lr": True}, r"lr must be a finite number"),
    ("momentum", {"momentum": 1.0}, r"momentum must be in \[0, 1\)"),
    ("adagrad", {"eps": -1e-10}, r"eps must be >= 0"),
    ("adam", {"betas": (0.9,)}, r"betas must be a pair"),
    ("adam", {"betas": (1.0, 0.999)}, r"betas\[0\] must be in \[0, 1\)"),
    ("adam", {"betas": (0.9, -0.1)}, r"betas\[1\] must be in \[0, 1\)"),
    ("adam", {"eps": -1.0}, r"eps must be >= 0"),
    ("adam", {"lam": 0.1}, r"'adam' takes no option lam"),
    ("ftrl", {"l1": -0.1}, r"l1 must be >= 0"),
    ("ftrl", {"l2": -0.1}, r"l2 must be >= 0"),
    ("ftrl", {"alpha": 0}, r"alpha must be > 0"),
    ("ftrl", {"alpha": 0.1, "lr": 0.1}, r"alpha= or lr="),
    ("ftrl", {"beta": 0}, r"beta and l2 cannot both be 0"),
    ("dcasgd", {"lam": -0.5}, r"lam must be >= 0"),
    ("dcasgd", {"eps": 1e-8}, r"'dcasgd' takes no option eps"),
]

TABLES: dict[str, Callable[..., Any]] = {
    "array": lambda dtype="float32", shape=(4,), **kw: mv.ArrayTable(shape, dtype, **kw),
    "matrix": lambda dtype="float32", shape=(4,), **kw: mv.MatrixTable(*shape, 2, dtype, **kw),
    "sparse_matrix": lambda dtype="float32", shape=(4,), **kw: mv.SparseMatrixTable(*shape, 2, dtype, **kw),
    "kv": lambda dtype="float32", shape=(4,), **kw: mv.KVTable(*shape, dtype, **kw),
}


@pytest.mark.parametrize("name,options,match", BAD_OPTIONS, ids=[f"{n}-{'-'.join(o) or 'none'}" for n, o, _ in BAD_OPTIONS])
def test_bad_updater_or_option_is_refused_at_creation(job: mv.Job, name: str, options: dict, match: str) -> None:
    for kind, make in TABLES.items():
        with pytest.raises(mv.InvalidArgument, match=match):
            make(name=kind, updater=name, **options)
        make(name=kind, shape=(5,))  # nothing was created: the name is free for another spec


@pytest.mark.parametrize("name", [n for n in NAMES if n != "add"])
def test_a_float_only_updater_refuses_an_integer_table(job: mv.Job, name: str) -> None:
    for kind, make in TABLES.items():
        for dtype in ("int32", "int64"):
            with pytest.raises(mv.InvalidArgument, match=f"'{name}' needs a float table, this one is {dtype}"):
                make(dtype, updater=name)


def test_per_call_lr_errors_raise_before_anything_is_sent(job: mv.Job) -> None:
    for kind, make in TABLES.items():
        plain, sgd = make("float64"), make("float64", updater="sgd", lr=0.5)
        for table in (plain, sgd):
            lrs = [0.1] if table is plain else [0, -1, float("nan"), "fast", True]
            for lr in lrs:
                with pytest.raises(mv.InvalidArgument, match="lr"):
                    if kind == "kv":
                        table.add([1, 2], np.ones((2, 4)), lr=lr)
                    else:
                        table.add_async(np.ones(table.shape), lr=lr)
        if kind == "kv":
            np.testing.assert_array_equal(sgd.get([1, 2]), np.zeros((2, 4)))
            assert len(sgd) == 2  # the get inserted them; no add did
            sgd.add([1], [[2, 2, 2, 2]], lr=1)
            np.testing.assert_array_equal(sgd.get([1]), [[-2, -2, -2, -2]])
        else:
            np.testing.assert_array_equal(sgd.get(), np.zeros(sgd.shape))
            sgd.add(np.ones(sgd.shape), lr=2)
            np.testing.assert_array_equal(sgd.get(), np.full(sgd.shape, -2.0))


def test_explicit_defaults_name_the_same_table(job: mv.Job) -> None:
    first = mv.MatrixTable(3, 2, name="w", updater="adam")
    again = mv.MatrixTable(3, 2, name="w", updater="adam", lr=0.001, betas=[0.9, 0.999], eps=1e-8)
    assert again._info.table_id == first._info.table_id
    assert first._info.spec.options == {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8}
    with pytest.raises(mv.TableSpecMismatch, match="options"):
        mv.MatrixTable(3, 2, name="w", updater="adam", lr=0.01)
    with pytest.raises(mv.TableSpecMismatch, match="updater"):
        mv.MatrixTable(3, 2, name="w", updater="sgd", lr=0.001)


# ------------------------------------------------------------------ Adam against torch


@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_matches_torch_on_a_dense_table(job: mv.Job, dtype: str) -> None:
    import torch  # the test extra installs it with the torch extra; a missing torch must fail, not skip

    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(16, 5)).astype(dtype)
    table = mv.MatrixTable(16, 5, dtype, updater="adam", lr=0.01, init_value=w0)
    param = torch.nn.Parameter(torch.tensor(w0))
    adam = torch.optim.Adam([param], lr=0.01)
    for step in range(25):
        grad = rng.normal(size=w0.shape).astype(dtype)
        lr = 0.03 if step % 5 == 4 else None  # a per-call lr is torch's lr for that step
        adam.param_groups[0]["lr"] = lr or 0.01
        param.grad = torch.tensor(grad)
        adam.step()
        table.add(grad, lr=lr)
        assert_close(table.get(), param.detach().numpy(), dtype, f"step {step}", TORCH_TOL)
    assert not np.allclose(table.get(), w0, atol=0.05)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["matrix", "array"])
def test_adam_counts_steps_per_row_like_one_torch_adam_per_row(job: mv.Job, kind: str, dtype: str) -> None:
    """Rows touched different numbers of times: each row's bias correction follows its own
    step count, as if each row had its own torch Adam stepped only when the row is added to."""
    import torch

    rng = np.random.default_rng(2)
    num_rows, row_shape = 12, ((3,) if kind == "matrix" else ())
    w0 = rng.normal(size=(num_rows, *row_shape)).astype(dtype)
    table = (mv.MatrixTable(num_rows, 3, dtype, updater="adam", lr=0.02, betas=(0.85, 0.98), init_value=w0)
             if kind == "matrix" else mv.ArrayTable(num_rows, dtype, updater="adam", lr=0.02, betas=(0.85, 0.98),
                                                    init_value=w0))
    params = [torch.nn.Parameter(torch.tensor(row)) for row in w0]
    optims = [torch.optim.Adam([p], lr=0.02, betas=(0.85, 0.98)) for p in params]
    weights = np.linspace(1, 8, num_rows)  # later rows are drawn more often
    for step in range(20):
        rows = rng.choice(num_rows, size=6, p=weights / weights.sum())  # repeats sum
        grads = rng.normal(size=(6, *row_shape)).astype(dtype)
        table.add(grads, rows)
        for row in np.unique(rows):
            params[row].grad = torch.tensor(grads[rows == row].sum(axis=0, dtype=dtype))
            optims[row].step()
        expected = np.stack([p.detach().numpy() for p in params])
        assert_close(table.get(), expected, dtype, f"step {step}", TORCH_TOL)
    steps = [int(o.state[p]["step"]) if o.state else 0 for o, p in zip(optims, params)]
    assert len(set(steps)) > 3, steps  # the rows really were at different steps


# ------------------------------------------------------------------ real servers, every table type


class Driven:
    """A table and its reference, driven with rows local to the reference: flat element
    indices (array), row ids (matrix, sparse) or positions in a key list (kv)."""

    def __init__(self, kind: str, name: str, dtype: str, rng: np.random.Generator):
        self.kind = kind
        options = dict(OPTIONS[name], updater=name)
        if kind == "kv":
            self.keys = rng.choice(np.arange(-10**6, 10**6), 400, replace=False) * 7919
            self.table = mv.KVTable(3, dtype, name=f"kv-{name}-{dtype}", init=("uniform", -1, 1), seed=3,
                                     **options)
            w0 = initial_rows(["uniform", -1.0, 1.0], table_seed(f"kv-{name}-{dtype}", 3), self.keys.view(np.uint64), 3,
                              np.dtype(dtype))
        else:
            w0 = rng.normal(size=(40, 3)).astype(dtype)
            if kind == "array":
                self.table = mv.ArrayTable((8, 15), dtype, updater=name, init_value=w0.reshape(8, 15), **OPTIONS[name])
                w0 = w0.reshape(-1)
            else:
                make = mv.MatrixTable if kind == "matrix" else mv.SparseMatrixTable
                self.table = make(40, 3, dtype, init_value=w0, **options)
        self.ref = Reference(name, w0, OPTIONS[name])
        self.count = len(w0)

    def add(self, rows: Optional[np.ndarray], delta: np.ndarray, lr: Optional[float] = None) -> None:
        lr = None if self.ref.name == "add" else lr  # add has no learning rate
        if self.kind == "kv":
            rows = np.arange(self.count) if rows is None else rows
            self.table.add(self.keys[rows], delta, lr=lr)
        elif rows is None:
            self.table.add(delta.reshape(self.table.shape), lr=lr)
            if self.kind == "sparse_matrix":  # an all-zero row is not shipped: it is not touched
                rows = np.flatnonzero(delta.any(axis=1))
                delta = delta[rows]
        else:
            self.table.add(delta, rows, lr=lr)
        self.ref.add(rows, delta, lr)

    def get(self, rows: Optional[np.ndarray] = None) -> np.ndarray:
        """The table's values (all, or some rows), after checking them against the reference."""
        if self.kind == "kv":
            rows = np.arange(self.count) if rows is None else rows
            got = self.table.get(self.keys[rows])
        else:
            got = self.table.get(rows).reshape(-1, *self.ref.w.shape[1:])
        self.ref.pull(0, rows)
        return got


@pytest.mark.parametrize("kind", ["array", "matrix", "sparse_matrix", "kv"])
def test_every_updater_on_real_servers(kind: str) -> None:
    rng = np.random.default_rng(4)
    with testing.LocalCluster(workers=1, servers=2, log_level="warning") as cluster, \
            mv.init(cluster.address, timeout=20):
        for name in NAMES:
            for dtype in DTYPES:
                run = Driven(kind, name, dtype, rng)
                what = f"{kind} {name} {dtype}"
                # kv: the adds insert some keys, the first get the rest, so the shards grow
                # (past 64 rows a partition) while holding state.
                first = min(run.count, 100)

                def delta(count: int) -> np.ndarray:
                    return rng.normal(size=(count, *run.ref.w.shape[1:])).astype(dtype)

                if kind == "kv":
                    run.add(rng.integers(0, first, 150), delta(150))
                else:
                    whole = delta(run.count)
                    whole[[3, 7]] = 0  # zero rows: touched on a dense table, not shipped by a sparse one
                    run.add(None, whole)
                run.add(rng.integers(0, first, 60), delta(60), lr=0.03)
                assert_close(run.get(), run.ref.w, dtype, f"{what}: after the first pair")  # dcasgd: a backup
                run.add(rng.integers(0, run.count, 80), delta(80))
                run.add(rng.integers(0, run.count, 80), delta(80), lr=0.2)
                some = rng.choice(run.count, run.count // 3, replace=False)  # dcasgd: refreshes these rows only
                assert_close(run.get(some), run.ref.w[some], dtype, f"{what}: some rows")
                run.add(None if kind != "kv" else rng.permutation(run.count), delta(run.count))
                run.add(np.repeat(np.arange(5), 4), delta(20))
                assert_close(run.get(), run.ref.w, dtype, f"{what}: at the end")


def test_async_adds_of_a_non_additive_updater_are_applied_one_by_one(job: mv.Job) -> None:
    """Small async adds queue and batch in the client; for momentum they must not be summed
    (v would see one step instead of thirty)."""
    rng = np.random.default_rng(6)
    table = mv.MatrixTable(6, 4, "float64", updater="momentum", lr=0.1, momentum=0.8)
    ref = Reference("momentum", np.zeros((6, 4)), {"lr": 0.1, "momentum": 0.8})
    futures = []
    for step in range(30):
        rows = rng.integers(0, 6, 3)
        delta = rng.normal(size=(3, 4))
        lr = 0.05 if step % 7 == 0 else None
        futures.append(table.add_async(delta, rows, lr=lr))
        ref.add(rows, delta, lr)
    for future in futures:
        future.result(timeout=20)
    assert_close(table.get(), ref.w, "float64", "after 30 async adds")


# ------------------------------------------------------------------ dcasgd with two worker processes

# Both workers drive three dcasgd tables through the same sequence, one actor per step and
# a barrier after each, and check the end values against a reference that keeps a backup
# per worker. A backup shared by the workers, or one kept for a worker that never pulled,
# gives other values.
DCASGD_SCRIPT = textwrap.dedent(
    """
    import numpy as np

    import multiverso_py as mv

    LR, LAM, ROWS, COLS = 0.1, 0.5, 12, 3
    KEYS = np.arange(ROWS) * 7919 - 40000


    class Reference:
        def __init__(self, w, lam):
            self.w, self.lam, self.backup = w.copy(), lam, {}

        def pull(self, worker, rows):
            if worker not in self.backup:
                self.backup[worker] = self.w.copy()
            self.backup[worker][rows] = self.w[rows]

        def add(self, worker, g, lr=LR):
            b = self.backup.get(worker)
            self.w -= lr * (g if b is None else g + self.lam * g * g * (self.w - b))


    def pull(kind, table, rows):
        table.get(KEYS[rows]) if kind == "kv" else table.get(np.arange(ROWS)[rows])


    def add(kind, table, g, lr):
        table.add(KEYS, g, lr=lr) if kind == "kv" else table.add(g, lr=lr)


    rng = np.random.default_rng(7)  # the same values in both workers
    w0 = rng.normal(size=(ROWS, COLS))
    grads = [rng.normal(size=(ROWS, COLS)) for _ in range(4)]
    some = np.r_[0:4, 8:12]  # rows of both partitions of the matrices
    STEPS = [  # (actor, op, argument)
        (0, "pull", slice(None)),  # worker 0's backup: w0
        (0, "add", 0),  # against w0, unchanged yet: no compensation
        (1, "add", 1),  # worker 1 never pulled: plain sgd, though w != w0 now
        (1, "pull", slice(None)),  # worker 1's backup: the values now
        (0, "add", 2),  # compensated by w - w0: worker 0's backup, not worker 1's
        (1, "pull", some),  # refreshes these rows of worker 1's backup only
        (1, "add", 3),  # against worker 1's backup, new on some rows only; with its own lr
    ]

    with mv.init():
        me = mv.worker_id()
        options = dict(updater="dcasgd", lr=LR, lam=LAM)
        tables = {
            "matrix": mv.MatrixTable(ROWS, COLS, "float64", name="m", init_value=w0, **options),
            "sparse": mv.SparseMatrixTable(ROWS, COLS, "float64", name="s", init_value=w0, **options),
            "kv": mv.KVTable(COLS, "float64", name="k", **options),
        }
        refs = {kind: Reference(np.zeros_like(w0) if kind == "kv" else w0, LAM) for kind in tables}
        plain = {kind: Reference(ref.w, 0.0) for kind, ref in refs.items()}  # no compensation
        for actor, op, arg in STEPS:
            lr = 0.05 if op == "add" and arg == 3 else None
            for kind, table in tables.items():
                for ref in (refs[kind], plain[kind]):
                    ref.pull(actor, arg) if op == "pull" else ref.add(actor, grads[arg], lr or LR)
                if me == actor:
                    pull(kind, table, arg) if op == "pull" else add(kind, table, grads[arg], lr)
            mv.barrier()
        for kind, table in tables.items():
            got = table.get(KEYS) if kind == "kv" else table.get()
            if not np.allclose(got, refs[kind].w, rtol=1e-12, atol=1e-12):
                raise SystemExit(f"worker {me} {kind}: {got.tolist()} != {refs[kind].w.tolist()}")
            if np.allclose(got, plain[kind].w, atol=1e-4):
                raise SystemExit(f"worker {me} {kind}: no delay compensation happened")
        mv.barrier()
        print(f"worker {me} dcasgd ok", flush=True)
    """
)


@pytest.mark.timeout(120)
def test_dcasgd_keeps_a_backup_per_worker(tmp_path: Path) -> None:
    (tmp_path / "dcasgd_worker.py").write_text(DCASGD_SCRIPT)
    result = testing.run_job(str(tmp_path / "dcasgd_worker.py"), workers=2, servers=2, timeout=RUN_TIMEOUT)
    done = [worker for worker in (0, 1) if f"worker {worker} dcasgd ok" in result.stdout]
    assert result.returncode == 0 and done == [0, 1], testing.job_report(result)
