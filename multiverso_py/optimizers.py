"""The stateful server-side updaters: sgd, momentum, adagrad, adam, ftrl and dcasgd.

Each writes only its `rule`: how the rows it is given change, in place, from their summed
delta `g` (the gradient). Which rows those are, and gathering and writing back their
values and state, is the base class's business (see updater_base).
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np

from multiverso_py.errors import InvalidArgument
from multiverso_py.updater_base import Rows, Updater, grown, non_negative, pair_of_units, per_row, positive, unit

Where = Union[slice, np.ndarray]


class SGD(Updater):
    """w -= lr * d"""

    name = "sgd"
    option_specs = {"lr": (0.01, positive)}

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict, lr: float, where: Where, args: dict) -> None:
        w -= g * lr


class Momentum(Updater):
    """v = mu * v + d; w -= lr * v  (torch's SGD with momentum, no dampening)"""

    name = "momentum"
    option_specs = {"lr": (0.01, positive), "momentum": (0.9, unit)}
    value_state = ("v",)

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict, lr: float, where: Where, args: dict) -> None:
        v = state["v"]
        v *= self.config["momentum"]
        v += g
        w -= v * lr


class AdaGrad(Updater):
    """G += d*d; w -= lr * d / (sqrt(G) + eps)"""

    name = "adagrad"
    option_specs = {"lr": (0.01, positive), "eps": (1e-10, non_negative)}
    value_state = ("G",)

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict, lr: float, where: Where, args: dict) -> None:
        total = state["G"]
        scratch = np.square(g)
        total += scratch
        np.sqrt(total, out=scratch)
        scratch += self.config["eps"]
        np.divide(g, scratch, out=scratch)
        scratch *= lr
        w -= scratch


class Adam(Updater):
    """torch.optim.Adam (no weight decay, no amsgrad), in torch's order of operations,
    with the step count kept per row: a row's bias correction counts only the adds that
    touched it."""

    name = "adam"
    option_specs = {"lr": (1e-3, positive), "betas": ((0.9, 0.999), pair_of_units), "eps": (1e-8, non_negative)}
    value_state = ("m", "v")
    row_state = ("step",)

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict, lr: float, where: Where, args: dict) -> None:
        m, v, step = state["m"], state["v"], state["step"]
        beta1, beta2 = self.config["betas"]
        step += 1
        scratch = np.subtract(g, m)
        scratch *= 1 - beta1
        m += scratch  # m.lerp_(g, 1 - beta1)
        v *= beta2
        np.multiply(g, 1 - beta2, out=scratch)
        scratch *= g
        v += scratch  # v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size, correction2_sqrt = self._corrections(step, lr, w)
        np.sqrt(v, out=scratch)
        scratch /= correction2_sqrt
        scratch += self.config["eps"]  # denom
        np.divide(m, scratch, out=scratch)
        scratch *= step_size
        w -= scratch  # w.addcdiv_(m, denom, value=-step_size)

    def _corrections(self, step: np.ndarray, lr: float, w: np.ndarray) -> tuple[Any, Any]:
        """lr / (1 - beta1**t) and sqrt(1 - beta2**t): scalars when every row is at the
        same step (a whole-table add, as torch computes them), else one per row."""
        beta1, beta2 = self.config["betas"]
        first = step.flat[0]
        if (step == first).all():
            t = float(first)
            return lr / (1 - beta1 ** t), (1 - beta2 ** t) ** 0.5
        t = step.astype(np.float64)
        step_size = (lr / (1 - np.power(beta1, t))).astype(w.dtype)
        correction2_sqrt = np.sqrt(1 - np.power(beta2, t)).astype(w.dtype)
        return per_row(step_size, w.ndim), per_row(correction2_sqrt, w.ndim)


class FTRL(Updater):
    """FTRL-Proximal, per coordinate (McMahan et al., KDD 2013, algorithm 1):
        sigma = (sqrt(n + d*d) - sqrt(n)) / alpha;  z += d - sigma * w;  n += d*d
        w = 0 if |z| <= l1 else -(z - sign(z) * l1) / ((beta + sqrt(n)) / alpha + l2)
    alpha is the learning rate: lr= is another name for it."""

    name = "ftrl"
    option_specs = {"alpha": (0.1, positive), "beta": (1.0, non_negative), "l1": (0.0, non_negative),
                    "l2": (0.0, non_negative)}
    aliases = {"lr": "alpha"}
    lr_option = "alpha"
    value_state = ("z", "n")

    @classmethod
    def check_options(cls, options: dict) -> dict:
        config = super().check_options(options)
        if config["beta"] == 0 and config["l2"] == 0:
            raise InvalidArgument("updater 'ftrl': beta and l2 cannot both be 0 (a coordinate with no gradient "
                                  "yet would divide 0 by 0)")
        return config

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict, lr: float, where: Where, args: dict) -> None:
        z, n = state["z"], state["n"]
        alpha, c = lr, self.config
        sigma = np.sqrt(n)
        root = np.square(g)
        n += root
        np.sqrt(n, out=root)
        np.subtract(root, sigma, out=sigma)
        sigma /= alpha
        sigma *= w
        z += g
        z -= sigma
        shrunk = sigma  # sign(z) * max(|z| - l1, 0)
        np.abs(z, out=shrunk)
        shrunk -= c["l1"]
        np.maximum(shrunk, 0, out=shrunk)
        np.copysign(shrunk, z, out=shrunk)
        denom = root
        denom += c["beta"]
        denom /= alpha
        denom += c["l2"]
        np.divide(shrunk, denom, out=w)
        np.negative(w, out=w)


class DCASGD(Updater):
    """Delay-compensated ASGD (Zheng et al., arXiv 1609.08326):
        w -= lr * (d + lam * d*d * (w - w_bak[worker]))
    where w_bak[worker] holds the values that worker last pulled. A worker's backup is a
    copy of the shard made at its first get; an add from a worker that never pulled is
    plain sgd."""

    name = "dcasgd"
    option_specs = {"lr": (0.01, positive), "lam": (0.04, non_negative)}

    def __init__(self, data: np.ndarray, options: dict):
        super().__init__(data, options)
        self.backups: dict[int, np.ndarray] = {}

    def rule(self, w: np.ndarray, g: np.ndarray, state: dict, lr: float, where: Where, args: dict) -> None:
        backup = self.backups.get(_worker(args.get("w")))
        if backup is None:
            w -= g * lr
            return
        scratch = np.subtract(w, backup[where] if isinstance(where, slice) else np.take(backup, where, axis=0))
        scratch *= g
        scratch *= g
        scratch *= self.config["lam"]
        scratch += g
        scratch *= lr
        w -= scratch

    def pulled(self, worker: Any, rows: Rows) -> None:
        worker = _worker(worker)
        backup = self.backups.get(worker)
        if backup is None:
            self.backups[worker] = self.data.copy()
        elif rows is None or isinstance(rows, slice):
            span = slice(None) if rows is None else rows
            np.copyto(backup[span], self.data[span])
        else:
            backup[rows] = np.take(self.data, rows, axis=0)

    def state(self) -> dict[str, np.ndarray]:
        return {**super().state(), **{f"backup/{worker}": b for worker, b in self.backups.items()}}

    def load_state(self, state: dict[str, np.ndarray], rows: slice = slice(None)) -> None:
        super().load_state(state, rows)
        for name, array in state.items():
            if name.startswith("backup/"):
                backup = self.backups.setdefault(int(name.split("/")[1]), self.data.copy())
                backup[rows] = array

    def resize(self, data: np.ndarray) -> None:
        super().resize(data)
        self.backups = {worker: grown(b, len(data)) for worker, b in self.backups.items()}

    def inserted(self, span: slice) -> None:
        super().inserted(span)
        for backup in self.backups.values():
            backup[span] = self.data[span]  # a new row: every worker's view of it is its initial value


def _worker(worker: Any) -> int:
    if type(worker) is not int or worker < 0:
        raise InvalidArgument(f"updater 'dcasgd' needs the worker's id in args 'w', got {worker!r:.40}")
    return worker
