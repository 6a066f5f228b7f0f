"""Embedding: an embedding layer whose rows live on the parameter servers. A forward pulls
the rows of the batch's distinct ids only; the backward pushes their gradients (summed
over repeated ids) to the servers, whose updater (adagrad by default) applies them. The
module has no nn.Parameters: a normal torch optimizer trains the rest of the model."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import multiverso_py as mv
from multiverso_py.errors import InvalidArgument

_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class _PullRows(torch.autograd.Function):
    """rows[inverse] forward; backward sums the gradient per row and hands it to `push`
    (the rows are a pulled copy, not a leaf anyone optimizes: they get no gradient)."""

    @staticmethod
    def forward(ctx: Any, rows: torch.Tensor, inverse: torch.Tensor,
                push: Callable[[torch.Tensor], None]) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.num_rows, ctx.push = rows.shape[0], push
        return rows.index_select(0, inverse)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None]:
        (inverse,) = ctx.saved_tensors
        summed = grad.new_zeros((ctx.num_rows, grad.shape[-1]))
        summed.index_add_(0, inverse, grad)
        ctx.push(summed)
        return None, None, None


class Embedding(nn.Module):
    """A lookup table of `embedding_dim`-wide rows, held by the parameter servers.

    - num_embeddings=None: a KVTable keyed by the ids themselves (any int64 value, e.g.
      hashed features); rows are created on first use with their `init` values,
      deterministic per (table name, seed, id).
    - num_embeddings=N: a SparseMatrixTable of N rows (ids in [0, N)): each worker keeps
      a cache of the matrix and a pull moves only the rows that changed since this
      worker last pulled them (Multiverso's choice for word embeddings). The cache costs
      N * embedding_dim * 4 bytes per worker; use num_embeddings=None for huge id spaces.

    `init` is ("normal", 1.0) like nn.Embedding's, or "zeros" / ("uniform", low, high);
    `updater` and `options` (lr=, eps=, ...) choose the server-side rule; `lr` (an
    attribute, None for the table's) is sent with every push, so it can be scheduled.
    Ids of any shape give rows of shape (*ids.shape, embedding_dim), float32, on the
    ids' device. `padding_idx` rows read as zeros and get no gradient (they are never
    pulled or pushed). Constructing it is collective, like every table.
    """

    def __init__(self, embedding_dim: int, num_embeddings: Optional[int] = None, updater: str = "adagrad",
                 padding_idx: Optional[int] = None, name: Optional[str] = None, *, init: Any = ("normal", 1.0),
                 seed: Optional[int] = None, **options: Any):
        super().__init__()
        if not _is_int(embedding_dim) or embedding_dim < 1:
            raise InvalidArgument(f"embedding_dim must be an int >= 1, got {embedding_dim!r}")
        if num_embeddings is not None and (not _is_int(num_embeddings) or num_embeddings < 1):
            raise InvalidArgument(f"num_embeddings must be an int >= 1 or None, got {num_embeddings!r}")
        if padding_idx is not None:
            if not _is_int(padding_idx):
                raise InvalidArgument(f"padding_idx must be an int or None, got {padding_idx!r}")
            if num_embeddings is not None:
                if not -num_embeddings <= padding_idx < num_embeddings:
                    raise InvalidArgument(f"padding_idx {padding_idx} is outside [-{num_embeddings}, {num_embeddings})")
                padding_idx %= num_embeddings  # as nn.Embedding: -1 is the last row
        self.embedding_dim, self.num_embeddings, self.padding_idx = int(embedding_dim), num_embeddings, padding_idx
        self.lr: Optional[float] = None
        if num_embeddings is None:
            self.table: Any = mv.KVTable(self.embedding_dim, name=name, init=init, seed=seed, updater=updater,
                                         **options)
        else:
            self.table = mv.SparseMatrixTable(int(num_embeddings), self.embedding_dim, name=name, init=init,
                                              seed=seed, updater=updater, **options)
        self._pushes: list[Future] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES:
            got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise InvalidArgument(f"Embedding takes an integer tensor of ids, got {got}")
        self._wait_pushes()  # surfaces a failed push; the pull below sees it anyway (calls apply in order)
        shape, device = (*ids.shape, self.embedding_dim), ids.device
        if ids.numel() == 0:
            return torch.zeros(shape, device=device)
        unique, inverse = torch.unique(ids.reshape(-1), sorted=True, return_inverse=True)
        keys = unique.cpu().numpy().astype(np.int64, copy=False)
        pad = self._padding_position(keys)
        wanted = keys if pad is None else np.delete(keys, pad)
        rows = torch.from_numpy(self._pull(wanted))
        if pad is not None:  # a zero row where the padding id sorts: never pulled, never pushed
            rows = torch.cat([rows[:pad], rows.new_zeros((1, self.embedding_dim)), rows[pad:]])
        rows = rows.to(device, non_blocking=True)
        if not torch.is_grad_enabled():
            return rows.index_select(0, inverse).view(shape)
        rows.requires_grad_(True)  # so autograd calls _PullRows.backward, which pushes
        out = _PullRows.apply(rows, inverse, lambda grad: self._push(wanted, grad, pad))
        return out.view(shape)

    def _padding_position(self, keys: np.ndarray) -> Optional[int]:
        if self.padding_idx is None:
            return None
        at = int(np.searchsorted(keys, self.padding_idx))
        return at if at < len(keys) and keys[at] == self.padding_idx else None

    def _pull(self, keys: np.ndarray) -> np.ndarray:
        if not len(keys):
            return np.zeros((0, self.embedding_dim), np.float32)
        return self.table.get(keys)

    def _push(self, keys: np.ndarray, grad: torch.Tensor, pad: Optional[int]) -> None:
        values = grad.detach().to("cpu", torch.float32).numpy()
        if pad is not None:
            values = np.delete(values, pad, axis=0)
        if not len(keys):
            return
        lr = {} if self.lr is None else {"lr": self.lr}
        if self.num_embeddings is None:
            self._pushes.append(self.table.add_async(keys, values, **lr))
        else:
            self._pushes.append(self.table.add_async(values, keys, **lr))

    def _wait_pushes(self) -> None:
        pushes, self._pushes = self._pushes, []
        for future in pushes:
            self.table._wait(future)

    def flush(self) -> None:
        """Wait until every gradient pushed so far is acknowledged (mv.barrier() does too)."""
        self._wait_pushes()

    def extra_repr(self) -> str:
        rows = "hashed ids" if self.num_embeddings is None else f"num_embeddings={self.num_embeddings}"
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"{self.embedding_dim}, {rows}{pad}, table={self.table!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
