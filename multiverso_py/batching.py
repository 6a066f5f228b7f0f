"""How a worker's Parts become messages: bounded chunks for big requests, one message for
many small adds (gathered per table in OpenBatches). No I/O.

Parts follow the tables' convention: an add part carries [values] for a whole partition
or [index, values] for some of its rows or keys; a get part carries [] or [index].
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np

from multiverso_py.tables.base import Part

MESSAGE_TARGET_BYTES = 8 << 20  # parts are grouped into messages of about this size
BATCH_BYTES = 64 << 10  # an add smaller than this may wait one loop turn to share a message


def part_bytes(part: Part) -> int:
    """What a part moves: its request arrays and its reply (by dest, or its estimate)."""
    return sum(a.nbytes for a in part.arrays) + sum(d.nbytes for d in part.dest or ()) + part.reply_bytes


def split_large(parts: Iterable[Part], target: int = MESSAGE_TARGET_BYTES) -> list[Part]:
    """Cut parts that carry an index (rows or keys) into pieces of about `target` bytes,
    request and reply counted, so that one huge request or reply cannot monopolise a
    connection. Arrays, destinations and reply estimates are cut in step with the index.
    Whole-partition parts are bounded already: partitions are sized to about `target`."""
    out: list[Part] = []
    for part in parts:
        nbytes = part_bytes(part)
        if nbytes <= target or not part.arrays or part.arrays[0].ndim != 1:
            out.append(part)
            continue
        count = len(part.arrays[0])
        step = max(1, count * target // nbytes)
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            out.append(Part(
                part.pid, part.args, [a[lo:hi] for a in part.arrays],
                None if part.dest is None else [d[lo * (d.nbytes // count):hi * (d.nbytes // count)] for d in part.dest],
                None if part.positions is None else part.positions[lo:hi],
                part.reply_bytes * (hi - lo) // count,
            ))
    return out


def chunk_messages(parts: list[Part], target: int = MESSAGE_TARGET_BYTES) -> list[list[Part]]:
    """Group one server's parts into messages of about `target` bytes, in order."""
    groups: list[list[Part]] = [[]]
    size = 0
    for part in parts:
        nbytes = part_bytes(part)
        if groups[-1] and size + nbytes > target:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += nbytes
    return groups if groups[0] else []


def merge_adds(parts: list[Part]) -> list[Part]:
    """Merge queued add parts of one table, for an additive updater (applying d1 then d2
    equals applying d1 + d2): whole-partition deltas of a partition are summed, indexed
    ones concatenated (the shard sums repeated rows or keys). Order across partitions
    does not matter; within one, every add stays in the merged part."""
    by_pid: dict[tuple[int, int], list[Part]] = {}
    for part in parts:
        by_pid.setdefault((part.pid, len(part.arrays)), []).append(part)
    merged = []
    for (pid, width), group in by_pid.items():
        if len(group) == 1 or any(p.args for p in group):
            merged.extend(group)
        elif width == 1:
            total = group[0].arrays[0].copy()  # np.sum would widen int32 to int64
            for p in group[1:]:
                total += p.arrays[0]
            merged.append(Part(pid, arrays=[total]))
        else:
            merged.append(Part(pid, arrays=[np.concatenate([p.arrays[i] for p in group]) for i in range(width)]))
    return merged


@dataclass
class Batch:
    """Small adds to one table, gathered on the caller's side until the I/O thread takes
    them (at its next turn) or they reach BATCH_BYTES. They share one message per server
    and one call: each add_async of the batch returns its future."""

    call: Any
    parts: list[Part] = field(default_factory=list)
    nbytes: int = 0
    count: int = 0


class OpenBatches:
    """The open batch of each table; callers join them, the I/O thread takes them."""

    def __init__(self) -> None:
        self._open: dict[int, Batch] = {}
        self._lock = threading.Lock()

    def join(self, table_id: int, parts: list[Part], nbytes: int, open_batch: Callable[[], Batch]) -> Batch:
        """Add a small add's parts to its table's open batch; open_batch() makes a new one
        (and schedules its sending) under the lock, so batches go out in the order opened."""
        with self._lock:
            batch = self._open.get(table_id)
            if batch is None:
                batch = self._open[table_id] = open_batch()
            batch.parts.extend(parts)
            batch.nbytes += nbytes
            batch.count += 1
            if batch.nbytes >= BATCH_BYTES:
                del self._open[table_id]
            return batch

    def close(self, table_id: int, batch: Batch | None = None) -> None:
        """Later adds to the table start a new batch (if `batch` is given: only if it is
        still the open one)."""
        with self._lock:
            if batch is None or self._open.get(table_id) is batch:
                self._open.pop(table_id, None)

    def close_all(self) -> None:
        with self._lock:
            self._open.clear()
