"""A vectorized open-addressing hash index from uint64 keys to int64 row numbers, and the
64-bit mix it hashes with.

Every operation takes a whole batch of keys and runs in numpy: a probe round examines one
slot for every key still unresolved, so the Python-level work is one loop iteration per
round (the longest probe sequence in the batch, short at load factor <= 0.5), never one
per key.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
MASK64 = (1 << 64) - 1
EMPTY = -1  # row of an empty slot: keys use all 64 bits, so emptiness lives in the rows
WINDOW = 8  # slots a probe round examines per key after the first


# A window's WINDOW booleans (one byte each) read as one integer: any() over a window is
# then one comparison per key, 5x faster than numpy's per-row reduction.
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
    distinct and not present; `find_or_insert(keys, next_row)` does both, numbering the
    new keys' rows. The load factor stays <= 0.5: an insert that would pass it
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
            # A key ends at its first hit or empty slot (absent); an empty slot cannot
            # come before the hit, as keys are never deleted.
            free, has_hit, has_free = self._examine(keys, todo, start, rows)
            more = ~(has_hit | has_free)
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
        self._make_room(len(keys))
        if self._size:
            self._settle(keys, rows)
        else:
            self._fill(keys, rows)
        self._size += len(keys)

    def find_or_insert(self, keys: np.ndarray, next_row: int) -> tuple[np.ndarray, np.ndarray]:
        """The row of every key of a 1-D uint64 array (keys may repeat), inserting the
        absent ones: each distinct new key takes the next of next_row, next_row + 1, ...
        Returns (rows, the new keys in the order of their rows). One probing pass, where a
        lookup and then an insert probe twice, and repeated new keys are found as they
        collide (no sort)."""
        keys = np.asarray(keys, dtype=np.uint64)
        self._make_room(len(keys))
        rows, new = self._settle(keys, None, next_row)
        self._size += len(new)
        return rows, keys[new]

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
        than _settle's scattered probe rounds on a rehash of 500k keys. Keys in the order
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
            self._settle(keys[order[inside:]], rows[order[inside:]])

    def _window(self, start: np.ndarray, width: int) -> np.ndarray:
        """Slots start .. start+width-1 (wrapping) of every key: a (len(start), width) array."""
        self.rounds += 1
        self.probes += len(start) * width
        return (start[:, None] + np.arange(width)) & (self.capacity - 1)

    def _examine(self, keys: np.ndarray, todo: np.ndarray, start: np.ndarray, rows: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One probe round over the windows from start of keys[todo]: the rows of the keys
        found go into rows[todo]; returns (the windows' free slots, whether each window
        holds its key, whether it has a free slot)."""
        slots = self._window(start, WINDOW)
        found = np.take(self._rows, slots)
        free = found == EMPTY
        hit = ~free & (np.take(self._keys, slots) == keys[todo, None])
        has_hit, has_free = _window_bytes(hit) != 0, _window_bytes(free) != 0
        rows[todo[has_hit]] = found[has_hit, hit[has_hit].argmax(axis=1)]
        return free, has_hit, has_free

    def _make_room(self, count: int) -> None:
        """Rehash if `count` more keys could take the load factor past 0.5."""
        needed = 2 * (self._size + count)
        if needed > self.capacity:
            self._rehash(needed)

    def _settle(self, keys: np.ndarray, given: Optional[np.ndarray], next_row: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
        """Find or insert every key: (each key's row, positions in keys of the keys
        inserted, in the order of their rows). New keys take given[position], or with
        given None the rows from next_row on.

        Each round every pending key examines its window (its home slot first): a hit
        ends it; otherwise it claims the window's first free slot (an absent key can
        lie nowhere past a free slot, as keys are never deleted). Of the keys that claim
        one slot, one takes it: the others go on after it, exactly as if they had been
        inserted one by one in some order, except those that find their own key there,
        a repeat of the winner's."""
        mask = self.capacity - 1
        out = np.empty(0, np.int64)  # the home round's rows, for no keys
        todo, start = np.arange(len(keys)), self._home(keys)
        inserted: list[np.ndarray] = []
        home_round = True
        while len(todo):
            if home_round:  # on flat arrays: most keys end there
                self.rounds, self.probes = self.rounds + 1, self.probes + len(keys)
                out = found = np.take(self._rows, start)  # right for the hits; the rest are set below
                has_free = found == EMPTY
                has_hit = ~has_free & (np.take(self._keys, start) == keys)
                claimers = np.flatnonzero(has_free)  # a free home is no hit
                claim, width, home_round = start[claimers], 1, False
            else:
                free, has_hit, has_free = self._examine(keys, todo, start, out)
                claimers = np.flatnonzero(~has_hit & has_free)
                claim, width = (start[claimers] + free[claimers].argmax(axis=1)) & mask, WINDOW
            neither = ~(has_hit | has_free)  # these look at the next window
            next_todo, next_start = todo[neither], (start[neither] + width) & mask
            if len(claimers):
                # Each claimed slot keeps one of the markers written to it: that claimer wins.
                marker = -2 - claimers
                self._rows[claim] = marker
                won = self._rows[claim] == marker
                winners, taken = todo[claimers[won]], claim[won]
                if given is None:
                    new_rows = np.arange(next_row, next_row + len(winners))
                    next_row += len(winners)
                else:
                    new_rows = given[winners]
                self._keys[taken] = keys[winners]
                self._rows[taken] = new_rows
                out[winners] = new_rows
                inserted.append(winners)
                losers, lost = todo[claimers[~won]], claim[~won]
                twin = self._keys[lost] == keys[losers]  # the winner was this very key
                out[losers[twin]] = self._rows[lost[twin]]
                # The others go on after the slot they lost.
                next_todo = np.concatenate([next_todo, losers[~twin]])
                next_start = np.concatenate([next_start, (lost[~twin] + 1) & mask])
            todo, start = next_todo, next_start
        return out, (np.concatenate(inserted) if inserted else np.empty(0, np.intp))
