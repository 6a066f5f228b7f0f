"""What every server-side updater shares: checking its options, and applying its rule to
the whole shard, a span of rows or some rows, with optimizer state kept per row.

A rule sees the rows it updates as arrays of equal length: the stored values `w`, the
delta `g` (repeated rows already summed) and its state arrays. For the whole shard or a
span they are views, updated in place; for scattered rows they are gathered copies,
written back afterwards. Rows outside an add are never read or written, so their values
and state (momentum, Adam's step count, ...) stay as they are.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any, Callable, Optional, Union

import numpy as np

from multiverso_py.arrayops import RepeatSums, aligned_zeros, put_rows
from multiverso_py.errors import InvalidArgument
from multiverso_py.growing import GrowingArray

Rows = Union[None, slice, np.ndarray]  # all rows, a span of them, or local row numbers
Check = Callable[[str, str, Any], Any]  # (updater, option, value) -> normalized value


def _real(updater: str, option: str, value: Any) -> float:
    try:
        x = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
    except OverflowError:
        x = math.inf
    if not math.isfinite(x):
        raise InvalidArgument(f"updater {updater!r}: {option} must be a finite number, got {value!r:.60}")
    return x


def positive(updater: str, option: str, value: Any) -> float:
    x = _real(updater, option, value)
    if x <= 0:
        raise InvalidArgument(f"updater {updater!r}: {option} must be > 0, got {value!r}")
    return x


def non_negative(updater: str, option: str, value: Any) -> float:
    x = _real(updater, option, value)
    if x < 0:
        raise InvalidArgument(f"updater {updater!r}: {option} must be >= 0, got {value!r}")
    return x


def unit(updater: str, option: str, value: Any) -> float:
    """A decay rate in [0, 1)."""
    x = _real(updater, option, value)
    if not 0 <= x < 1:
        raise InvalidArgument(f"updater {updater!r}: {option} must be in [0, 1), got {value!r}")
    return x


def pair_of_units(updater: str, option: str, value: Any) -> list[float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidArgument(f"updater {updater!r}: {option} must be a pair (beta1, beta2), got {value!r:.60}")
    return [unit(updater, f"{option}[{i}]", v) for i, v in enumerate(value)]


def check_lr(updater: str, lr: Any) -> float:
    return positive(updater, "lr", lr)


class Updater:
    """Base: `apply(delta, rows, args)` updates `self.data` in place, where rows is None
    (all of them), a slice (a span of them) or an int64 array of row numbers (repeats sum).
    Subclasses name their options and state and write `rule`."""

    name = ""
    # option -> (default, check); the checked options, defaults filled in, are what a table's spec holds
    option_specs: dict[str, tuple[Any, Check]] = {}
    # Applying d1 then d2 equals applying d1 + d2: the client may merge queued adds.
    additive = False
    has_lr = True  # takes lr, per table and per call
    float_only = True  # refuses integer tables
    value_state: tuple[str, ...] = ()  # state arrays shaped like the data
    row_state: tuple[str, ...] = ()  # state with one int64 per row (per element of a 1-D table)
    aliases: dict[str, str] = {}  # another name -> the option it stands for
    lr_option = "lr"  # the option that is the learning rate (and that lr= per call replaces)

    @classmethod
    def check_options(cls, options: dict) -> dict:
        """The options checked and completed with defaults; InvalidArgument for an unknown
        option or a bad value."""
        accepted = {*cls.option_specs, *cls.aliases}
        unknown = set(options) - accepted
        if unknown:
            raise InvalidArgument(
                f"updater {cls.name!r} takes no option {', '.join(sorted(map(str, unknown)))}; "
                f"it accepts: {', '.join(sorted(accepted)) or 'none'}"
            )
        options = dict(options)
        for alias, option in cls.aliases.items():
            if alias in options:
                if option in options:
                    raise InvalidArgument(f"updater {cls.name!r}: give {option}= or {alias}= (the same thing), not both")
                options[option] = options.pop(alias)
        return {option: check(cls.name, option, options.get(option, default))
                for option, (default, check) in cls.option_specs.items()}

    def __init__(self, data: np.ndarray, options: dict):
        self.config = self.check_options(options)
        if self.float_only and not np.issubdtype(data.dtype, np.floating):
            raise InvalidArgument(f"updater {self.name!r} needs a float table, this one is {data.dtype}; "
                                  "only 'add' works on integer tables")
        self.data = data
        self.lr: Optional[float] = self.config.get(self.lr_option)
        self._state: dict[str, np.ndarray] = {name: aligned_zeros(data.shape, data.dtype)
                                               for name in self.value_state}
        self._state.update((name, np.zeros(len(data), np.int64)) for name in self.row_state)
        self._growing: dict[str, GrowingArray] = {}  # state of a shard that grows, once it has
        self.repeat_sums = RepeatSums()  # partitions serialise their requests: one scratch per shard is enough

    def call_lr(self, args: dict) -> Optional[float]:
        """The learning rate of one add: args["lr"] if given, else the table's."""
        lr = args.get("lr")
        if lr is None:
            return self.lr
        if not self.has_lr:
            raise InvalidArgument(f"updater {self.name!r} has no learning rate, but the add carries lr={lr!r:.40}")
        return check_lr(self.name, lr)

    def apply(self, delta: np.ndarray, rows: Rows, args: dict) -> None:
        lr = self.call_lr(args)
        if not len(delta):
            return
        if rows is None or isinstance(rows, slice):
            span = slice(None) if rows is None else rows
            self.rule(self.data[span], delta, {k: a[span] for k, a in self._state.items()}, lr, span, args)
            return
        rows, delta = self.repeat_sums(rows, delta, len(self.data))
        values = np.take(self.data, rows, axis=0)
        state = {k: np.take(a, rows, axis=0) for k, a in self._state.items()}
        self.rule(values, delta, state, lr, rows, args)
        put_rows(self.data, rows, values)
        for k, a in self._state.items():
            put_rows(a, rows, state[k])

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict[str, np.ndarray], lr: Optional[float],
             where: Union[slice, np.ndarray], args: dict) -> None:
        """Update w and state in place from g; `where` says which of the shard's rows they are."""
        raise NotImplementedError

    def pulled(self, worker: Any, rows: Rows) -> None:
        """A shard's get sent `rows` (as in apply) to `worker`."""

    def state(self) -> dict[str, np.ndarray]:
        """Arrays of optimizer state, row-aligned with the shard's data, for checkpoints."""
        return dict(self._state)

    def load_state(self, state: dict[str, np.ndarray], rows: slice = slice(None)) -> None:
        """Take state saved by state() (from a checkpoint) into `rows` of this shard."""
        for name, array in state.items():
            if name in self._state:
                self._state[name][rows] = array

    def resize(self, data: np.ndarray) -> None:
        """The shard grew (a hash table's storage): `data` replaces `self.data`, its first
        rows holding the old rows; state arrays grow to match (in place), new rows zero."""
        self.data = data
        for name, array in self._state.items():
            if name not in self._growing:
                self._growing[name] = GrowingArray.holding(array)
            self._state[name] = self._growing[name].grow(len(data))

    def inserted(self, span: slice) -> None:
        """Rows in `span` were just created with their initial values (a hash table's new
        keys): their state starts afresh."""
        for array in self._state.values():
            array[span] = 0


def grown(array: np.ndarray, rows: int) -> np.ndarray:
    """A copy of array with `rows` rows, the old ones first."""
    out = np.empty((rows, *array.shape[1:]), array.dtype)
    out[:len(array)] = array
    return out


def per_row(x: Any, ndim: int) -> Any:
    """A per-row array shaped to broadcast against rows of ndim dimensions (scalars as they are)."""
    return x.reshape(-1, *(1,) * (ndim - 1)) if isinstance(x, np.ndarray) else x
