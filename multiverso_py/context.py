"""The worker runtime of this process, as table constructors find it, and the defaults
that mv.init() set for new tables."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from multiverso_py.errors import InvalidArgument, NotInitialized
from multiverso_py.tables.base import TABLE_DTYPES, Runtime, TableSpec
from multiverso_py.updaters import check_updater

CONSISTENCY_MODELS = ("async", "ssp", "bsp")

_runtime: Optional[Runtime] = None
_defaults: dict[str, Any] = {"consistency": "async", "staleness": 0}


def install(runtime: Runtime, consistency: Optional[str], staleness: Optional[int]) -> None:
    global _runtime
    _runtime = runtime
    _defaults["consistency"] = check_consistency(consistency or "async")
    _defaults["staleness"] = check_staleness(0 if staleness is None else staleness)


def clear() -> None:
    global _runtime
    _runtime = None


def current() -> Runtime:
    if _runtime is None:
        raise NotInitialized("no multiverso_py job in this process: call mv.init() before creating tables")
    return _runtime


def check_consistency(model: str) -> str:
    if model not in CONSISTENCY_MODELS:
        raise InvalidArgument(f"consistency {model!r} is not one of {', '.join(CONSISTENCY_MODELS)}")
    return model


def check_staleness(staleness: Any) -> int:
    if not isinstance(staleness, int) or isinstance(staleness, bool) or staleness < 0:
        raise InvalidArgument(f"staleness must be an int >= 0, got {staleness!r}")
    return staleness


def table_spec(kind: str, shape: tuple, dtype: Any, updater: str, options: dict,
               consistency: Optional[str], staleness: Optional[int], table_options: Optional[dict] = None) -> TableSpec:
    """A validated spec for a new table, with the job's defaults filled in."""
    try:
        shape = tuple(int(n) for n in shape)
    except (TypeError, ValueError):
        raise InvalidArgument(f"shape {shape!r} must be ints") from None
    if not shape or any(n <= 0 for n in shape):
        raise InvalidArgument(f"shape {shape} must have positive sizes")
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in TABLE_DTYPES:
        raise InvalidArgument(f"dtype {dtype!r} is not one of {', '.join(TABLE_DTYPES)}")
    options = check_updater(updater, options, name)  # with its defaults: workers that spell them out agree
    return TableSpec(
        kind, shape, name, updater, options,
        check_consistency(consistency or _defaults["consistency"]),
        check_staleness(_defaults["staleness"] if staleness is None else staleness),
        dict(table_options or {}),
    )
