"""Server-side updaters: how a pushed delta changes the stored values of a shard.

An updater owns the optimizer state of one shard, sized to it, and applies a delta to the
whole shard or to some of its rows. Rows repeated in one add are summed first.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from multiverso_py.errors import InvalidArgument


class Updater:
    """Base: `apply(delta, rows, args)` updates `self.data` in place, where rows is None
    (all of them), a slice (a span of them) or an int64 array of row numbers (repeats sum)."""

    name = ""
    option_names: frozenset[str] = frozenset()
    # Applying d1 then d2 equals applying d1 + d2: the client may merge queued adds.
    additive = False

    def __init__(self, data: np.ndarray, options: dict):
        unknown = set(options) - self.option_names
        if unknown:
            raise InvalidArgument(
                f"updater {self.name!r} takes no option {', '.join(sorted(unknown))}; "
                f"it accepts: {', '.join(sorted(self.option_names)) or 'none'}"
            )
        self.data = data

    def apply(self, delta: np.ndarray, rows: Optional[np.ndarray], args: dict) -> None:
        raise NotImplementedError

    def state(self) -> dict[str, np.ndarray]:
        """Arrays of optimizer state, for checkpoints."""
        return {}

    def resize(self, data: np.ndarray) -> None:
        """The shard grew (a hash table's storage): `data` replaces `self.data`, its first
        rows holding the old rows; state arrays must grow to match."""
        self.data = data


class AddUpdater(Updater):
    """w += d"""

    name = "add"
    additive = True

    def apply(self, delta: np.ndarray, rows: Optional[np.ndarray], args: dict) -> None:
        if rows is None or isinstance(rows, slice):
            target = self.data if rows is None else self.data[rows]
            np.add(target, delta, out=target)
        else:
            add_rows(self.data, rows, delta)


def add_rows(data: np.ndarray, rows: np.ndarray, delta: np.ndarray) -> None:
    """data[rows] += delta, repeated rows summed. np.add.at over flat element indices: 3-4x
    faster than np.add.at on rows of a 2-D array."""
    if data.ndim == 1:
        np.add.at(data, rows, delta)
        return
    width = data[0].size
    flat = (rows[:, None] * width + np.arange(width)).reshape(-1)
    np.add.at(data.reshape(-1), flat, delta.reshape(-1))


UPDATERS: dict[str, type[Updater]] = {cls.name: cls for cls in (AddUpdater,)}


def make_updater(name: str, options: dict, data: np.ndarray) -> Updater:
    try:
        cls = UPDATERS[name]
    except KeyError:
        raise InvalidArgument(f"unknown updater {name!r}; choose one of {', '.join(UPDATERS)}") from None
    return cls(data, options)


def check_updater(name: str, options: dict) -> None:
    """Raise at table creation, on the worker, for an unknown updater or option."""
    make_updater(name, options, np.zeros(1))


def is_additive(name: str) -> bool:
    return UPDATERS[name].additive
