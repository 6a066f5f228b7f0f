"""Models shared by the PyTorch tests (imported after torch is known to be installed)."""

from __future__ import annotations

import torch
from torch import nn


class Branchy(nn.Module):
    """float32 and float64 parameters (two tables in one group), and a branch used only
    on even steps (grad None on odd ones: skipped, as torch.optim skips it)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.side = nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        out = self.head(torch.tanh(self.body(x)))
        if step % 2 == 0:
            out = out + self.side(x)
        return out.double() * self.scale


def train_embedding(embedding: nn.Module, device: torch.device) -> tuple[float, float, torch.Tensor]:
    """Train a linear head over `embedding`'s rows (the dense part with a local SGD) for 30
    steps on ids of `device`; (loss before, loss after, the ids)."""
    head = nn.Linear(8, 1).to(device)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    ids = torch.randint(0, 50, (64, 3), device=device)
    target = (ids % 2).float().sum(dim=1, keepdim=True)

    def loss() -> torch.Tensor:
        return (head(embedding(ids).sum(dim=1)) - target).pow(2).mean()

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    return first, loss().item(), ids
