"""A vectorized open-addressing hash index from uint64 keys to int64 row numbers, and the
64-bit mix it hashes with.

Every operation takes a whole batch of keys and runs in numpy: a probe round examines one
slot for every key still unresolved, so the Python-level work is one loop iteration per
round (the longest probe sequence in the batch, short at load factor <= 0.5), never one
per key.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MASK64 = (1 << 64) - 1
EMPTY = -1  # row of an empty slot: keys use all 64 bits, so emptiness lives in the rows


def mix64(keys: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer of every element of a uint64 array (a bijection whose
    output bits all depend on all input bits). Multiplies wrap modulo 2**64."""
    z = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def mix64_int(value: int) -> int:
    """mix64 of one Python int, taken modulo 2**64."""
    return int(mix64(np.array([value & MASK64], dtype=np.uint64))[0])


class KeyIndex:
    """uint64 key -> int64 row, with linear probing over a power-of-two slot array.

    `lookup(keys)` gives each key's row or -1; `insert(keys, rows)` adds keys that are
    distinct and not present. The load factor stays <= 0.5: an insert that would pass it
    first rehashes into twice (or more) the slots, copying only the index. There is no
    delete (a table's keys only accumulate), so no tombstones are needed.
    """

    def __init__(self, capacity: int = 16):
        slots = 16
        while slots < capacity:
            slots *= 2
        self._keys = np.zeros(slots, dtype=np.uint64)
        self._rows = np.full(slots, EMPTY, dtype=np.int64)
        self._size = 0
        self.probes = 0  # slots examined by all lookups and inserts so far (a cost measure)
        self.rounds = 0  # vectorized probe rounds so far
        self.rehashes = 0

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        """Number of slots; at most half of them are used."""
        return len(self._keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The row of every key of a 1-D uint64 array, -1 where a key is absent. Keys may
        repeat."""
        keys = np.asarray(keys, dtype=np.uint64)
        rows = np.full(len(keys), EMPTY, dtype=np.int64)
        mask = np.uint64(self.capacity - 1)
        slot = (mix64(keys) & mask).astype(np.intp)
        todo = np.arange(len(keys))
        while len(todo):
            self.rounds += 1
            self.probes += len(todo)
            found_rows = self._rows[slot]
            hit = self._keys[slot] == keys[todo]
            occupied = found_rows != EMPTY
            done = hit & occupied
            rows[todo[done]] = found_rows[done]
            more = occupied & ~hit  # an empty slot ends a key's probe sequence: absent
            todo, slot = todo[more], (slot[more] + 1) & int(mask)
        return rows

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add distinct keys, none of them present yet, mapped to the given rows."""
        keys = np.asarray(keys, dtype=np.uint64)
        rows = np.asarray(rows, dtype=np.int64)
        if keys.shape != rows.shape or keys.ndim != 1:
            raise ValueError(f"keys {keys.shape} and rows {rows.shape} must be 1-D of one length")
        needed = 2 * (self._size + len(keys))
        if needed > self.capacity:
            self._rehash(needed)
        self._place(keys, rows)
        self._size += len(keys)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys, rows) of every entry, in slot order."""
        used = self._rows != EMPTY
        return self._keys[used], self._rows[used]

    def _rehash(self, needed: int) -> None:
        keys, rows = self.items()
        slots = self.capacity
        while slots < needed:
            slots *= 2
        self._keys = np.zeros(slots, dtype=np.uint64)
        self._rows = np.full(slots, EMPTY, dtype=np.int64)
        self._place(keys, rows)
        self.rehashes += 1

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write new keys into free slots. Each round, every pending key looks at its
        candidate slot; of the keys that find the same free slot, one (the first) takes
        it, and everyone else moves on to the next slot, exactly as if they had been
        inserted one by one in some order."""
        mask = self.capacity - 1
        slot = (mix64(keys) & np.uint64(mask)).astype(np.intp)
        todo = np.arange(len(keys))
        while len(todo):
            self.rounds += 1
            self.probes += len(todo)
            free = self._rows[slot] == EMPTY
            free_at = np.flatnonzero(free)
            _, first = np.unique(slot[free_at], return_index=True)
            won = free_at[first]
            self._keys[slot[won]] = keys[todo[won]]
            self._rows[slot[won]] = rows[todo[won]]
            lost = np.ones(len(todo), dtype=bool)
            lost[won] = False
            todo, slot = todo[lost], (slot[lost] + 1) & mask
