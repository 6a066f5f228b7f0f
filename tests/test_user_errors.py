"""Wrong user input raises a typed mv.MultiversoError subclass with a message naming the
offending value, on the calling worker, before anything is sent.

"Before anything is sent" is checked by raising from the `_async` call itself (not from its
future) and by a barrier afterwards: a barrier first waits for every add this worker
issued and re-raises a failed one, so an add that had gone out and failed would show.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np
import pytest

import multiverso_py as mv

pytestmark = pytest.mark.usefixtures("no_scheduler_env")


def raises_locally(call: Callable[[], Any], exc: type[BaseException], match: str) -> BaseException:
    """`call` raises `exc` itself (not through a future), and nothing failed remotely."""
    with pytest.raises(exc, match=match) as info:
        call()
    assert isinstance(info.value, mv.MultiversoError), type(info.value).__mro__
    mv.barrier()  # re-raises any add that had been sent and failed
    return info.value


# ------------------------------------------------------------------ deltas


def test_wrong_delta_shape_array(job: mv.Job) -> None:
    table = mv.ArrayTable(10)
    raises_locally(lambda: table.add_async(np.ones(9)), mv.InvalidArgument, r"\(9,\).*\(10,\)")
    raises_locally(lambda: table.add(np.ones(11)), ValueError, r"\(11,\)")
    grid = mv.ArrayTable((3, 4))
    raises_locally(lambda: grid.add_async(np.ones((4, 3))), mv.InvalidArgument, r"\(4, 3\).*\(3, 4\)")
    np.testing.assert_array_equal(table.get(), np.zeros(10))
    np.testing.assert_array_equal(grid.get(), np.zeros((3, 4)))


def test_wrong_delta_shape_indexed(job: mv.Job) -> None:
    table = mv.ArrayTable(10)
    raises_locally(lambda: table.add_async([1.0, 2.0, 3.0], [0, 1]), mv.InvalidArgument, r"\(3,\)")
    np.testing.assert_array_equal(table.get(), np.zeros(10))


def test_wrong_delta_shape_matrix(job: mv.Job) -> None:
    table = mv.MatrixTable(4, 3)
    raises_locally(lambda: table.add_async(np.ones((4, 2))), mv.InvalidArgument, r"\(4, 2\).*\(4, 3\)")
    raises_locally(lambda: table.add_async(np.ones((3, 3)), [0, 1]), mv.InvalidArgument, r"\(3, 3\).*\(2, 3\)")
    np.testing.assert_array_equal(table.get(), np.zeros((4, 3)))


def test_float_delta_into_int_table(job: mv.Job) -> None:
    table = mv.ArrayTable(3, "int32")
    raises_locally(lambda: table.add_async(np.array([1.5, 2.0, 3.0])), mv.InvalidArgument, r"float64.*int32")
    raises_locally(lambda: table.add_async([0.5], [1]), ValueError, r"float64.*int32")
    np.testing.assert_array_equal(table.get(), [0, 0, 0])


def test_complex_delta_into_float_table(job: mv.Job) -> None:
    table = mv.MatrixTable(2, 2, "float32")
    raises_locally(lambda: table.add_async(np.ones((2, 2), np.complex64)), mv.InvalidArgument, r"complex64.*float32")
    raises_locally(lambda: table.add_async([[1 + 2j, 0]], [0]), mv.InvalidArgument, r"complex128")
    np.testing.assert_array_equal(table.get(), np.zeros((2, 2)))


def test_non_numeric_delta(job: mv.Job) -> None:
    table = mv.ArrayTable(2)
    raises_locally(lambda: table.add_async(["a", "b"]), mv.InvalidArgument, r"delta")


# ------------------------------------------------------------------ indices and row ids


@pytest.mark.parametrize("bad", [10, 11, -1, -10])
def test_array_index_out_of_range(job: mv.Job, bad: int) -> None:
    table = mv.ArrayTable(10)
    for call in (lambda: table.get_async([0, bad]), lambda: table.add_async([1.0, 1.0], [bad, 0])):
        exc = raises_locally(call, mv.IndexOutOfRange, rf"{bad}\b.*\[0, 10\)")
        assert isinstance(exc, IndexError)
    np.testing.assert_array_equal(table.get(), np.zeros(10))


@pytest.mark.parametrize("bad", [11, 12, -1])
def test_matrix_row_id_out_of_range(job: mv.Job, bad: int) -> None:
    table = mv.MatrixTable(11, 10)
    for call in (lambda: table.get_async([bad]), lambda: table.get_async(row_ids=[0, bad]),
                 lambda: table.add_async(np.ones((1, 10)), [bad])):
        exc = raises_locally(call, IndexError, rf"{bad}\b.*\[0, 11\)")
        assert isinstance(exc, mv.IndexOutOfRange)
    np.testing.assert_array_equal(table.get(), np.zeros((11, 10)))


@pytest.mark.parametrize("bad", [[1.5], [0.0, 1.0], ["a"], [[0, 1]]], ids=["fraction", "float", "str", "2d"])
def test_non_integer_indices(job: mv.Job, bad: list) -> None:
    array = mv.ArrayTable(4)
    matrix = mv.MatrixTable(4, 2)
    raises_locally(lambda: array.get_async(bad), mv.InvalidArgument, r"indices")
    raises_locally(lambda: array.add_async(np.ones(len(bad)), bad), mv.InvalidArgument, r"indices")
    raises_locally(lambda: matrix.get_async(bad), mv.InvalidArgument, r"row_ids")
    raises_locally(lambda: matrix.add_async(np.ones((len(bad), 2)), bad), mv.InvalidArgument, r"row_ids")


def test_float_indices_name_their_dtype(job: mv.Job) -> None:
    table = mv.ArrayTable(4)
    raises_locally(lambda: table.get([1.5]), mv.InvalidArgument, r"integers.*float64")


# ------------------------------------------------------------------ table creation


@pytest.mark.parametrize("dtype", ["float16", "complex64", "uint8", "bogus"])
def test_unknown_dtype(job: mv.Job, dtype: str) -> None:
    with pytest.raises(mv.InvalidArgument, match=dtype):
        mv.ArrayTable(4, dtype)
    with pytest.raises(mv.InvalidArgument, match=dtype):
        mv.MatrixTable(2, 2, dtype=dtype)


@pytest.mark.parametrize("shape", [0, -3, (3, 0), (2, -1), ()], ids=str)
def test_non_positive_array_shape(job: mv.Job, shape: Any) -> None:
    with pytest.raises(mv.InvalidArgument, match="positive"):
        mv.ArrayTable(shape)


@pytest.mark.parametrize("rows,cols", [(0, 5), (5, 0), (-1, 2)])
def test_non_positive_matrix_shape(job: mv.Job, rows: int, cols: int) -> None:
    with pytest.raises(mv.InvalidArgument, match="positive"):
        mv.MatrixTable(rows, cols)


def test_non_integer_shape(job: mv.Job) -> None:
    with pytest.raises(mv.InvalidArgument, match="shape"):
        mv.ArrayTable(("a", 2))


def test_unknown_updater(job: mv.Job) -> None:
    with pytest.raises(mv.InvalidArgument, match="'nope'"):
        mv.ArrayTable(4, updater="nope")
    with pytest.raises(mv.InvalidArgument, match="'nope'"):
        mv.MatrixTable(2, 2, updater="nope")


def test_unknown_updater_option(job: mv.Job) -> None:
    with pytest.raises(mv.InvalidArgument, match="bogus_option"):
        mv.ArrayTable(4, bogus_option=1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"init_value": np.ones(5)}, r"init_value.*\(5,\)"),
        ({"init": ("gauss", 1.0)}, r"gauss"),
        ({"init": ("uniform", 0.0)}, r"uniform"),
        ({"init_value": np.ones(4), "init": ("normal", 1.0)}, r"init_value.*init"),
    ],
    ids=["init_value-shape", "init-kind", "init-arity", "both"],
)
def test_bad_initial_content_creates_no_table(job: mv.Job, kwargs: dict, match: str) -> None:
    """A bad init= / init_value= is a user mistake like a bad shape: it must be refused
    before the table exists, so the name stays free for a corrected call."""
    with pytest.raises(mv.InvalidArgument, match=match):
        mv.ArrayTable(4, name="w", **kwargs)
    retry = mv.ArrayTable(6, name="w")  # a table 'w' of shape (4,) would make this a mismatch
    np.testing.assert_array_equal(retry.get(), np.zeros(6))


def test_random_init_of_int_table_creates_no_table(job: mv.Job) -> None:
    with pytest.raises(mv.InvalidArgument, match="int32"):
        mv.MatrixTable(2, 2, "int32", name="m", init=("uniform", 0, 1))
    retry = mv.MatrixTable(2, 3, "int32", name="m")
    np.testing.assert_array_equal(retry.get(), np.zeros((2, 3)))


def test_table_before_init(no_scheduler_env: None) -> None:
    for make in (lambda: mv.ArrayTable(3), lambda: mv.MatrixTable(2, 2)):
        with pytest.raises(mv.NotInitialized, match=r"mv\.init"):
            make()
    for call in (mv.barrier, mv.worker_id, mv.workers_num, mv.servers_num, mv.is_master_worker, mv.clock):
        with pytest.raises(mv.NotInitialized, match=r"mv\.init"):
            call()


def test_table_spec_mismatch(job: mv.Job) -> None:
    mv.ArrayTable(10, name="w")
    with pytest.raises(mv.TableSpecMismatch, match=r"'w'.*shape"):
        mv.ArrayTable(11, name="w")
    with pytest.raises(mv.TableSpecMismatch, match=r"'w'.*dtype"):
        mv.ArrayTable(10, "float64", name="w")
    with pytest.raises(mv.TableSpecMismatch, match=r"'w'"):
        mv.MatrixTable(2, 5, name="w")
    mv.MatrixTable(3, 3, name="m")
    with pytest.raises(mv.TableSpecMismatch, match=r"'m'.*shape"):
        mv.MatrixTable(3, 4, name="m")
    # The existing tables are untouched and a matching spec still opens them.
    again = mv.ArrayTable(10, name="w")
    again.add(np.ones(10))
    np.testing.assert_array_equal(mv.ArrayTable(10, name="w").get(), np.ones(10))


# ------------------------------------------------------------------ mv.init


def test_unknown_init_option(no_scheduler_env: None) -> None:
    with pytest.raises(mv.InvalidArgument, match="bogus"):
        mv.init(bogus=1)
    with pytest.raises(mv.NotInitialized):
        mv.worker_id()  # no job was started
    with mv.init(timeout=20):  # and nothing was left half-started
        assert mv.workers_num() == 1


@pytest.mark.parametrize(
    "kwargs,match",
    [({"timeout": 0}, "timeout"), ({"timeout": -1.0}, "timeout"), ({"consistency": "bogus"}, "bogus"),
     ({"staleness": -1}, "-1")],
    ids=["timeout0", "timeout-neg", "consistency", "staleness"],
)
def test_bad_init_values(no_scheduler_env: None, kwargs: dict, match: str) -> None:
    with pytest.raises(mv.InvalidArgument, match=match):
        mv.init(**kwargs)
    with pytest.raises(mv.NotInitialized):
        mv.worker_id()


def test_bad_timeout_env(monkeypatch: pytest.MonkeyPatch, no_scheduler_env: None) -> None:
    monkeypatch.setenv("MV_TIMEOUT", "soon")
    with pytest.raises(mv.InvalidArgument, match="soon"):
        mv.init()


@pytest.mark.timeout(30)
def test_unreachable_scheduler(no_scheduler_env: None) -> None:
    start = time.monotonic()
    with pytest.raises(mv.ConnectFailed, match=r"127\.0\.0\.1:1\b"):
        mv.init("127.0.0.1:1", timeout=2)
    assert time.monotonic() - start < 15  # refused at once, not after a long hang
    with pytest.raises(mv.NotInitialized):
        mv.worker_id()
    with mv.init(timeout=20):  # the failed attempt left no job behind
        assert mv.worker_id() == 0


@pytest.mark.timeout(30)
def test_unreachable_scheduler_from_env(monkeypatch: pytest.MonkeyPatch, no_scheduler_env: None) -> None:
    monkeypatch.setenv("MV_SCHEDULER", "127.0.0.1:1")
    with pytest.raises(mv.ConnectFailed, match=r"127\.0\.0\.1:1\b"):
        mv.init(timeout=2)


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:", ":9000", "127.0.0.1:port", "127.0.0.1:0",
                                     "127.0.0.1:70000"])
def test_malformed_scheduler_address(no_scheduler_env: None, address: str) -> None:
    with pytest.raises(mv.MultiversoError, match="HOST:PORT") as info:
        mv.init(address, timeout=2)
    assert repr(address) in str(info.value)
    with pytest.raises(mv.NotInitialized):
        mv.worker_id()


def test_malformed_scheduler_address_from_env(monkeypatch: pytest.MonkeyPatch, no_scheduler_env: None) -> None:
    monkeypatch.setenv("MV_SCHEDULER", "nohost")
    with pytest.raises(mv.MultiversoError, match="nohost"):
        mv.init(timeout=2)
