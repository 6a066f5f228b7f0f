"""A server's part of checkpoints: writing its partitions at a consistent point, and
filling new partitions from a checkpoint.

The snapshot runs as one job that takes its turn on every partition the server holds,
so every add that arrived before it is applied and none after it is (the scheduler has
paused the workers, so none arrives meanwhile). Adds held by a BSP or SSP clock were
acknowledged, so they are saved too, as requests; a restored job applies them at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np

from multiverso_py.checkpoint import read_tensors, write_tensors
from multiverso_py.errors import InvalidArgument

log = logging.getLogger(__name__)


class SnapshotJob:
    """Writes the server's partitions to one file when it has its turn on all of them
    (Turns runs it like a table request); `done(error or None)` is called on the loop."""

    def __init__(self, server: Any, path: str, done: Callable[[Exception | None], None]):
        self.server, self.path, self.done = server, path, done
        self.partitions = [p for table in server.tables.values() for p in table.partitions.values()]
        self.waiting = 0
        self.held = {tid: table.clock.held_adds() for tid, table in server.tables.items()}  # read on the loop

    def run(self) -> None:
        error = None
        try:
            tensors, metadata = self._collect()
            write_tensors(Path(self.path), tensors, metadata)
        except Exception as exc:  # reported to the scheduler, which discards the checkpoint
            log.exception("server %s: writing checkpoint file %s failed", self.server.server_id, self.path)
            error = exc
        self.server.loop.call_soon_threadsafe(self.done, error)
        self.server.turns.leave(self)

    def _collect(self) -> tuple[dict[str, np.ndarray], dict]:
        tensors: dict[str, np.ndarray] = {}
        applied, held = {}, []
        for tid, table in self.server.tables.items():
            for pid, partition in table.partitions.items():
                for name, array in partition.shard.checkpoint_arrays().items():
                    tensors[f"t{tid}/p{pid}/{name}"] = array
                applied[f"t{tid}/p{pid}"] = {str(c): s for c, s in partition.applied.items()}
            for job in self.held[tid]:
                parts = []
                for pid, _, args, arrays in job.parts:
                    for i, array in enumerate(arrays):
                        tensors[f"held/{len(held)}/{len(parts)}/{i}"] = array
                    parts.append([pid, args, len(arrays)])
                held.append({"table": tid, "client": job.frame.body["client"], "seq": job.frame.body["seq"],
                             "parts": parts})
        return tensors, {"server": self.server.server_id, "applied": applied, "held": held}


def restore_partitions(shards: dict[int, Any], restore: dict) -> dict[int, dict[int, int]]:
    """Fill new shards from a checkpoint: restore = {"dir", "table" (its id there),
    "files": {partition: file}, "recover" (a replaced server of the same job)}; then
    apply the table's held adds of that checkpoint. Returns, when recovering, each
    partition's applied sequence numbers (client -> seq), so that resent adds apply once."""
    folder, old = Path(restore["dir"]), restore["table"]
    files = {int(p): f for p, f in restore["files"].items()}
    applied: dict[int, dict[int, int]] = {}
    for file in sorted({files[p] for p in shards if p in files}):
        tensors, metadata = read_tensors(folder / file)
        if restore.get("recover"):
            for pid in shards:
                seqs = metadata.get("applied", {}).get(f"t{old}/p{pid}")
                if seqs is not None:
                    applied[pid] = {int(client): seq for client, seq in seqs.items()}
        for pid, shard in shards.items():
            prefix = f"t{old}/p{pid}/"
            arrays = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if arrays:
                shard.restore_arrays(arrays)
        for n, request in enumerate(metadata.get("held", [])):
            if request["table"] != old:
                continue
            for j, (pid, args, count) in enumerate(request["parts"]):
                if pid in shards:
                    shards[pid].add(args, [tensors[f"held/{n}/{j}/{i}"] for i in range(count)])
    missing = [p for p in shards if p not in files]
    if missing:
        raise InvalidArgument(f"the checkpoint has no data for partitions {missing}")
    return applied
