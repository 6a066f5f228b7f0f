"""Many tensors as one flat host buffer: the unit that ParamManager and PSOptimizer push
and pull, so that a sync costs one add and one get per table, not one per tensor.

The buffer is a CPU tensor whose numpy view is what the tables send and receive into
(`get(out=...)`), so a pull lands in it without another copy. Tensors on a GPU move
with one device<->host copy each; the buffer is then pinned and the copies are issued
non-blocking, with one synchronization per direction (untested on CUDA here).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch

from multiverso_py.errors import InvalidArgument

# The table dtype that holds tensors of each torch dtype. Half precisions are stored as
# float32 on the servers: numpy has no bfloat16, and sums of many small float16 updates
# would lose them.
SERVER_DTYPES: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.float32,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float64: torch.float64,
    torch.int32: torch.int32,
    torch.int64: torch.int64,
}


def server_dtype(dtype: torch.dtype, what: str) -> torch.dtype:
    try:
        return SERVER_DTYPES[dtype]
    except KeyError:
        names = ", ".join(str(d).removeprefix("torch.") for d in SERVER_DTYPES)
        raise InvalidArgument(f"{what} has dtype {dtype}; the parameter server holds {names}") from None


def table_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def table_consistency(table: Any) -> str:
    """The consistency model a table was created with (the job's default unless given)."""
    return table._info.spec.consistency


def group_by_server_dtype(named: Sequence[tuple[str, torch.Tensor]]) -> dict[torch.dtype, list[tuple[str, torch.Tensor]]]:
    """Tensors grouped by the dtype of the table that holds them, in a fixed order (all
    workers must create the same tables in the same order)."""
    groups: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        groups.setdefault(server_dtype(tensor.dtype, name), []).append((name, tensor))
    order = list(SERVER_DTYPES.values())
    return dict(sorted(groups.items(), key=lambda item: order.index(item[0])))


class FlatBuffer:
    """`tensors` laid back to back in one host buffer of `dtype`."""

    def __init__(self, tensors: Sequence[torch.Tensor], dtype: torch.dtype):
        if not tensors:
            raise InvalidArgument("a flat buffer needs at least one tensor")
        self.tensors = list(tensors)
        self.dtype = dtype
        self.on_device = any(t.device.type != "cpu" for t in self.tensors)
        self.sizes = [t.numel() for t in self.tensors]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)
        self.numel = int(self.offsets[-1])
        # Pinned memory makes device copies asynchronous; only worth it (and only
        # possible) with CUDA present.
        pin = self.on_device and torch.cuda.is_available()
        self.host = torch.empty(self.numel, dtype=dtype, pin_memory=pin)
        self.array: np.ndarray = self.host.numpy()  # shares memory with self.host
        self.views = [self.host[o:o + n].view(t.shape) for o, n, t in zip(self.offsets, self.sizes, self.tensors)]
        # Writing float32 into a bfloat16 tensor rounds: the values a worker holds then
        # differ from the buffer, which matters to ParamManager's delta.
        self.exact = all(t.dtype == dtype for t in self.tensors)
        self._pending: list = []  # CUDA events of copies out of the host buffer still running

    def gather(self, sources: Optional[Sequence[Optional[torch.Tensor]]] = None) -> np.ndarray:
        """Copy the tensors (or `sources`, shaped like them, e.g. their gradients; None
        entries become zeros) into the host buffer; returns its numpy view."""
        self.wait_copies_out()
        sources = self.tensors if sources is None else sources
        with torch.no_grad():
            for view, src in zip(self.views, sources):
                if src is None:
                    view.zero_()
                else:
                    view.copy_(src.detach(), non_blocking=self.on_device)
        if self.on_device:
            _synchronize(self.tensors)  # device->host copies must land before numpy reads them
        return self.array

    def hold(self) -> None:
        """Make the tensors views of the host buffer where they can be (C-contiguous CPU
        tensors of the buffer's dtype), keeping their values: a pull into the buffer then
        lands in them, and scatter() copies only the others. For tensors that nothing
        reads while a pull is in flight (PSOptimizer without overlap)."""
        with torch.no_grad():
            for tensor, view in zip(self.tensors, self.views):
                if tensor.device.type == "cpu" and tensor.dtype == self.dtype and tensor.is_contiguous():
                    view.copy_(tensor)
                    tensor.data = view

    def scatter(self) -> None:
        """Copy the host buffer into the tensors, in place; a tensor that is a view of the
        buffer (see hold) has its values already, and only autograd's version counter
        learns that they changed."""
        held = []
        with torch.no_grad():
            for tensor, view in zip(self.tensors, self.views):
                if tensor.data_ptr() == view.data_ptr() and tensor.shape == view.shape:
                    held.append(tensor)
                else:
                    tensor.copy_(view, non_blocking=self.on_device)
        if held:
            torch.autograd.graph.increment_version(held)
        if self.on_device and torch.cuda.is_available():
            # The host->device copies read the buffer asynchronously: the next write into
            # it (a gather, a pull) waits for them.
            self._pending = [torch.cuda.Event() for _ in _cuda_devices(self.tensors)]
            for event, device in zip(self._pending, _cuda_devices(self.tensors)):
                event.record(torch.cuda.current_stream(device))

    def wait_copies_out(self) -> None:
        """Before the host buffer is overwritten: wait for copies still reading it."""
        for event in self._pending:
            event.synchronize()
        self._pending = []

    def indices_of(self, present: Sequence[bool]) -> np.ndarray:
        """The flat positions of the tensors marked present."""
        spans = [np.arange(self.offsets[i], self.offsets[i + 1]) for i, keep in enumerate(present) if keep]
        return np.concatenate(spans) if spans else np.empty(0, np.int64)


def _cuda_devices(tensors: Sequence[torch.Tensor]) -> list[torch.device]:
    return sorted({t.device for t in tensors if t.device.type == "cuda"}, key=lambda d: d.index or 0)


def _synchronize(tensors: Sequence[torch.Tensor]) -> None:
    for device in _cuda_devices(tensors):
        torch.cuda.current_stream(device).synchronize()
