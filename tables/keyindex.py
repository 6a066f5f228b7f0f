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
WINDOW = 8  # slots a probe round examines per key after the first


# A window's WINDOW booleans (one byte each) read as one integer: any() and all() over
# a window are then one comparison per key, 5x faster than numpy's per-row reductions.
_ALL_OF_WINDOW = np.uint64(0x0101010101010101)
assert WINDOW == 8


def _window_bytes(mask: np.ndarray) -> np.ndarray:
    """A C-contiguous (n, WINDOW) bool array as n uint64s."""
    return mask.view(np.uint64)[:, 0]


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
        mask = self.capacity - 1
        home = self._home(keys)
        # The home slot first, on flat arrays: most keys end there (at load <= 0.5).
        self.rounds += 1
        self.probes += len(keys)
        rows = np.take(self._rows, home)
        occupied = rows != EMPTY
        hit = occupied & (np.take(self._keys, home) == keys)
        todo = np.flatnonzero(occupied & ~hit)  # another key sits there: look on
        rows[~hit] = EMPTY
        start = (home[todo] + 1) & mask
        while len(todo):
            slots = self._window(start, WINDOW)
            found_rows = np.take(self._rows, slots)
            occupied = found_rows != EMPTY
            hit = occupied & (np.take(self._keys, slots) == keys[todo, None])
            # A key ends at its first hit or empty slot (absent); an empty slot cannot
            # come before the hit, as keys are never deleted.
            has_hit = _window_bytes(hit) != 0
            rows[todo[has_hit]] = found_rows[has_hit, hit[has_hit].argmax(axis=1)]
            more = ~has_hit & (_window_bytes(occupied) == _ALL_OF_WINDOW)
            todo, start = todo[more], (start[more] + WINDOW) & mask
        return rows

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add distinct keys, none of them present yet, mapped to the given rows (>= 0)."""
        keys = np.asarray(keys, dtype=np.uint64)
        rows = np.asarray(rows, dtype=np.int64)
        if keys.shape != rows.shape or keys.ndim != 1:
            raise ValueError(f"keys {keys.shape} and rows {rows.shape} must be 1-D of one length")
        if rows.size and rows.min() < 0:
            raise ValueError("rows must be >= 0: negative rows mark empty slots")
        needed = 2 * (self._size + len(keys))
        if needed > self.capacity:
            self._rehash(needed)
        if self._size:
            self._place(keys, rows)
        else:
            self._fill(keys, rows)
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
        self._fill(keys, rows)
        self.rehashes += 1

    def _home(self, keys: np.ndarray) -> np.ndarray:
        return (mix64(keys) & np.uint64(self.capacity - 1)).astype(np.intp)

    def _fill(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write distinct keys into an empty index without probing: taken in order of
        their home slots, each key goes to its home or, if that is taken, to the slot after
        the previous key's. That is a layout linear probing could have built (the slots
        from a key's home to its own are all taken), and one sequential pass: 2-3x faster
        than _place's scattered probe rounds on a rehash of 500k keys. Keys in the order
        of an index's slots (a rehash's) come nearly sorted by home, which the stable
        sort (timsort) goes through in close to linear time."""
        home = self._home(keys)
        order = np.argsort(home, kind="stable")
        steps = np.arange(len(keys))
        slots = np.maximum.accumulate(home[order] - steps) + steps  # strictly increasing
        inside = int(np.searchsorted(slots, self.capacity))
        self._keys[slots[:inside]] = keys[order[:inside]]
        self._rows[slots[:inside]] = rows[order[:inside]]
        if inside < len(keys):  # the last run went past the end: the rest wrap around
            self._place(keys[order[inside:]], rows[order[inside:]])

    def _window(self, start: np.ndarray, width: int) -> np.ndarray:
        """Slots start .. start+width-1 (wrapping) of every key: a (len(start), width) array."""
        self.rounds += 1
        self.probes += len(start) * width
        return (start[:, None] + np.arange(width)) & (self.capacity - 1)

    def _place(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Write new keys into free slots. Each round, every pending key claims the first
        free slot in its window; of the keys that claim the same slot one takes it and
        the others go on after it, exactly as if they had been inserted one by one in
        some order."""
        mask = self.capacity - 1
        start = self._home(keys)
        todo = np.arange(len(keys))
        width = 1
        while len(todo):
            free = self._rows[self._window(start, width)] == EMPTY
            if width == 1:  # the home slot
                has_free, first = free[:, 0], 0
            else:
                has_free, first = _window_bytes(free) != 0, free.argmax(axis=1)
            claim = (start + first) & mask
            claimers = np.flatnonzero(has_free)
            # Each claimed slot keeps one of the markers written to it: that claimer wins.
            marker = -2 - claimers
            self._rows[claim[claimers]] = marker
            won = claimers[self._rows[claim[claimers]] == marker]
            self._keys[claim[won]] = keys[todo[won]]
            self._rows[claim[won]] = rows[todo[won]]
            pending = np.ones(len(todo), dtype=bool)
            pending[won] = False
            # A loser's claimed slot is taken now: it goes on from the next one.
            start = np.where(has_free, claim + 1, start + width) & mask
            todo, start = todo[pending], start[pending]
            width = WINDOW
