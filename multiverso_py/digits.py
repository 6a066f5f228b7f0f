"""The demo's data and model: scikit-learn's digits (1,797 8x8 grey images of 0-9, shipped
inside the scikit-learn package, so nothing is downloaded) and the seed design's CNN
(conv 32 -> conv 64 -> fc 128 -> fc 20 -> fc 10, dropout, log-softmax), sized for 8x8.
Shared by `multiverso-py demo` and benchmarks/torch_overhead.py."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    """Images (N, 1, 8, 8) float32, standardized with the training set's mean and std;
    labels int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def shard(self, rank: int, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Worker `rank`'s share of the training set: every workers-th sample."""
        return self.x_train[rank::workers], self.y_train[rank::workers]


def load_digits(seed: int = 0) -> Digits:
    """The digits split per class, with a fixed seed, into 80% training and 20% test."""
    x, y = _digits_arrays()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for label in np.unique(y):  # stratified: every digit is 20% of its own examples
        members = rng.permutation(np.flatnonzero(y == label))
        test[members[:round(TEST_FRACTION * len(members))]] = True
    train = rng.permutation(np.flatnonzero(~test))
    mean, std = x[train].mean(), x[train].std()

    def images(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((x[rows] - mean) / std).astype(np.float32)).view(-1, 1, 8, 8)

    def labels(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(y[rows].astype(np.int64))

    test_rows = np.flatnonzero(test)
    return Digits(images(train), labels(train), images(test_rows), labels(test_rows))


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (1797, 64), labels) of scikit-learn's digits. Read from the CSV that
    sklearn.datasets.load_digits reads, without importing scikit-learn (which costs
    seconds of start-up per worker on a small machine); through it if the file moved."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise SystemExit("the demo needs scikit-learn for its data set: pip install 'multiverso-py[torch]'")
    path = Path(next(iter(spec.submodule_search_locations or [""]))) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        data = np.loadtxt(path, delimiter=",")
        return data[:, :-1], data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    return sklearn_digits(return_X_y=True)


class DigitsCNN(nn.Module):
    """The seed's CNN for 8x8 images: two 3x3 convolutions (padding 1) and a 2x2 max-pool
    leave 64 x 4 x 4 features; three fully connected layers end in log-probabilities."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.dropout1 = nn.Dropout(0.25)
        self.fc1 = nn.Linear(64 * 4 * 4, 128)
        self.dropout2 = nn.Dropout(0.5)
        self.fc2 = nn.Linear(128, 20)
        self.fc3 = nn.Linear(20, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = self.dropout1(torch.flatten(x, 1))
        x = self.dropout2(F.relu(self.fc1(x)))
        x = F.relu(self.fc2(x))
        return F.log_softmax(self.fc3(x), dim=1)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of minibatches in an order fixed by `seed`."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(x), batch_size):
        index = order[start:start + batch_size]
        yield x[index], y[index]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) on a data set, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    try:
        out = model(x)
        return float(F.nll_loss(out, y)), float((out.argmax(dim=1) == y).float().mean())
    finally:
        model.train(was_training)
