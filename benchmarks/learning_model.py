"""The model of the learning benchmark, shared by the single-process reference and the
workers: the digits data, multinomial logistic regression in numpy, the minibatch order,
and the update rules the servers apply (so the reference applies the same ones)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

ADAGRAD_EPS = 1e-10  # the server's adagrad eps (SPEC section 4)


@dataclass(frozen=True)
class Data:
    """Standardized features with a trailing constant 1 (the bias), float32; labels int64."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def features(self) -> int:
        return self.x_train.shape[1]

    @property
    def classes(self) -> int:
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def save(self, path: Path) -> None:
        np.savez(path, x_train=self.x_train, y_train=self.y_train, x_test=self.x_test, y_test=self.y_test)

    @classmethod
    def load(cls, path: Path) -> "Data":
        with np.load(path) as f:
            return cls(f["x_train"], f["y_train"], f["x_test"], f["y_test"])


def load_digits_split(test_fraction: float, seed: int) -> Data:
    """scikit-learn's digits (8x8 images, 10 classes; shipped with the package), split
    stratified with a fixed seed and standardized with the training set's statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    std[std == 0] = 1.0  # pixels that are always blank stay 0

    def prepare(a: np.ndarray) -> np.ndarray:
        return np.hstack([(a - mean) / std, np.ones((len(a), 1))]).astype(np.float32)

    return Data(prepare(x_train), y_train.astype(np.int64), prepare(x_test), y_test.astype(np.int64))


def gradient(w: np.ndarray, x: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    """Gradient of the mean softmax cross-entropy of x @ w plus (l2 / 2) * |w|^2."""
    logits = x @ w
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    return (x.T @ p / len(y) + l2 * w).astype(np.float32)


def accuracy(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(x @ w, axis=1) == y))


def batches(indices: np.ndarray, batch: int, steps: int, rng: np.random.Generator) -> list[np.ndarray]:
    """`steps` minibatches of `batch` indices from a fresh shuffle of `indices` (one epoch)."""
    order = rng.permutation(indices)
    return [order[i * batch:(i + 1) * batch] for i in range(steps)]


class Rule:
    """A server-side update rule in plain numpy, with its state: the reference applies
    exactly what the servers apply to a pushed gradient `d`."""

    def __init__(self, name: str, lr: float, shape: tuple[int, ...]):
        if name not in ("sgd", "adagrad"):
            raise ValueError(f"no reference rule for updater {name!r}")
        self.name, self.lr = name, lr
        self.sum_sq = np.zeros(shape, np.float32) if name == "adagrad" else None

    def apply(self, w: np.ndarray, d: np.ndarray) -> None:
        if self.sum_sq is None:  # sgd: w -= lr * d
            w -= self.lr * d
        else:  # adagrad: G += d*d; w -= lr * d / (sqrt(G) + eps)
            self.sum_sq += d * d
            w -= self.lr * d / (np.sqrt(self.sum_sq) + ADAGRAD_EPS)
