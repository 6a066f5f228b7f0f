"""Server-side updaters: how a pushed delta changes the stored values of a shard.

An updater owns the optimizer state of one shard, sized to it, and applies a delta to the
whole shard or to some of its rows. Rows repeated in one add are summed first. The
registry here is what tables and the worker runtime use: make an updater for a shard,
check a table's updater and options at creation, check a per-call learning rate.

    add       w += d                                          (no options)
    sgd       w -= lr * d                                     lr
    momentum  v = mu * v + d; w -= lr * v                     lr, momentum
    adagrad   G += d*d; w -= lr * d / (sqrt(G) + eps)         lr, eps
    adam      torch.optim.Adam, step count per row            lr, betas, eps
    ftrl      FTRL-Proximal, per coordinate                   alpha (= lr), beta, l1, l2
    dcasgd    w -= lr * (d + lam * d*d * (w - w_bak[worker])) lr, lam
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from multiverso_py.errors import InvalidArgument
from multiverso_py.optimizers import DCASGD, FTRL, SGD, AdaGrad, Adam, Momentum
from multiverso_py.arrayops import add_rows
from multiverso_py.updater_base import Rows, Updater, check_lr

__all__ = ["UPDATERS", "AddUpdater", "Updater", "call_args", "check_updater", "is_additive", "make_updater"]


class AddUpdater(Updater):
    """w += d"""

    name = "add"
    additive = True
    has_lr = False
    float_only = False

    def apply(self, delta: np.ndarray, rows: Rows, args: dict) -> None:
        self.call_lr(args)  # refuses a per-call lr
        if rows is None or isinstance(rows, slice):
            target = self.data if rows is None else self.data[rows]
            np.add(target, delta, out=target)
        elif self.data.ndim == 1:  # one number a row: numpy's scatter-add is 4-5x faster, and needs no scratch
            np.add.at(self.data, rows, delta)
        else:
            add_rows(self.data, rows, delta, self.repeat_sums)


UPDATERS: dict[str, type[Updater]] = {cls.name: cls for cls in (AddUpdater, SGD, Momentum, AdaGrad, Adam, FTRL, DCASGD)}


def updater_class(name: Any) -> type[Updater]:
    cls = UPDATERS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise InvalidArgument(f"unknown updater {name!r:.60}; choose one of {', '.join(UPDATERS)}")
    return cls


def make_updater(name: str, options: dict, data: np.ndarray) -> Updater:
    return updater_class(name)(data, options)


def check_updater(name: str, options: dict, dtype: Any = "float32") -> dict:
    """Raise at table creation, on the worker, for an unknown updater, an unknown option,
    a bad option value, or a float-only updater on an integer table. Returns the options
    checked and completed with their defaults (what the table's spec holds)."""
    cls = updater_class(name)
    config = cls.check_options(options)
    if cls.float_only and not np.issubdtype(np.dtype(dtype), np.floating):
        raise InvalidArgument(f"updater {name!r} needs a float table, this one is {np.dtype(dtype).name}; "
                              "only 'add' works on integer tables")
    return config


def call_args(name: str, lr: Optional[Any]) -> dict:
    """The args an add carries for `lr=` given per call: checked on the caller, before
    anything is sent."""
    if lr is None:
        return {}
    cls = updater_class(name)
    if not cls.has_lr:
        raise InvalidArgument(f"updater {name!r} has no learning rate, so add() takes no lr=; "
                              f"create the table with one of {', '.join(n for n, c in UPDATERS.items() if c.has_lr)}")
    return {"lr": check_lr(name, lr)}


def is_additive(name: str) -> bool:
    return UPDATERS[name].additive
