"""GrowingArray: rows grow in place within a reservation (no copy: views taken before a
growth see later writes), new rows start zero, a growth past the reservation moves the
rows, a kernel that refuses to overcommit gets exact-size mappings, and a reservation asks
for no transparent huge pages."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from multiverso_py import growing
from multiverso_py.growing import GrowingArray


def test_growth_within_the_reservation_is_the_same_memory() -> None:
    rows = GrowingArray((4, 3), np.float32)
    assert rows.array.shape == (4, 3) and not rows.array.any()
    before = rows.array
    before[:] = np.arange(12).reshape(4, 3)
    grown = rows.grow(1000)
    assert grown is rows.array and grown.shape == (1000, 3) and grown.dtype == np.float32
    np.testing.assert_array_equal(grown[:4], np.arange(12).reshape(4, 3))
    assert not grown[4:].any()  # rows never held start zero
    assert np.shares_memory(before, grown)  # not a copy
    grown[2] = -1
    np.testing.assert_array_equal(before[2], [-1, -1, -1])
    assert rows.grow(10) is grown  # never shorter


def test_growth_past_the_reservation_moves_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(growing, "RESERVE_BYTES", 64 * 8)  # room for 64 int64 rows
    counts = GrowingArray((8,), np.int64)
    counts.array[:] = np.arange(8)
    first = counts.grow(64)
    moved = counts.grow(65)
    assert not np.shares_memory(first, moved)
    np.testing.assert_array_equal(moved[:8], np.arange(8))
    assert not moved[8:].any()
    assert np.shares_memory(moved, counts.grow(65 * growing.RESERVE_FACTOR))  # the new reservation's room


def test_a_kernel_that_refuses_to_overcommit_gets_exact_mappings(monkeypatch: pytest.MonkeyPatch) -> None:
    original = growing._map

    def strict(nbytes: int, flags: int = 0):
        if flags & growing.MAP_NORESERVE:
            raise OSError(12, "Cannot allocate memory")
        return original(nbytes, flags)

    monkeypatch.setattr(growing, "MAP_NORESERVE", growing.MAP_NORESERVE or 0x4000)
    monkeypatch.setattr(growing, "_map", strict)
    rows = GrowingArray((2, 5), np.float64)
    rows.array[:] = 1.5
    grown = rows.grow(3)
    np.testing.assert_array_equal(grown[:2], np.full((2, 5), 1.5))
    assert not grown[2].any() and not np.shares_memory(grown, rows.grow(4))  # each growth a move


def test_holding_copies_an_array() -> None:
    source = np.arange(6, dtype=np.int64)
    copy = GrowingArray.holding(source)
    source[0] = 99
    np.testing.assert_array_equal(copy.grow(8), [0, 1, 2, 3, 4, 5, 0, 0])


def _vm_flags(array: np.ndarray) -> list[str]:
    """The kernel's flags of this process's mapping that holds the middle of an array
    (numpy advises from the first whole page on: the mapping's first page splits off)."""
    address = array.ctypes.data + array.nbytes // 2
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(x, 16) for x in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_reservation_asks_for_no_huge_pages() -> None:
    """Rows fill a reservation in order, so each huge page would fault in (and maybe wait
    for the kernel to compact memory) on some request's path."""
    advised = mmap.mmap(-1, 4 << 20)  # for contrast: a mapping that asks for them
    try:
        advised.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):
        pytest.skip("this kernel has no transparent huge pages to ask for")
    assert "hg" in _vm_flags(np.frombuffer(advised, np.uint8))
    rows = GrowingArray((1 << 16, 16), np.float32)  # 4 MiB: numpy would ask for huge pages
    assert "hg" not in _vm_flags(rows.array)
