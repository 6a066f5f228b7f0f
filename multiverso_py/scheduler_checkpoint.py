"""The scheduler's part of checkpoints: taking a consistent cut (on request and every
few seconds), and telling new tables where their content is in a checkpoint restored."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Optional

from multiverso_py.checkpoint import discard, new_checkpoint_dir, publish, read_manifest
from multiverso_py.errors import InvalidArgument, MultiversoError, TableSpecMismatch
from multiverso_py.protocol import MsgType
from multiverso_py.tables.base import TableSpec

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, scheduler: Any):
        self.scheduler = scheduler
        config = scheduler.config
        self._restore = read_manifest(config.restore) if config.restore else None  # (folder, manifest)
        self._busy = False
        self._periodic: Optional[asyncio.Task] = None
        # where periodic checkpoints go, and how often; a server may bring them (server --checkpoint-dir)
        self.dir, self.every = config.checkpoint_dir, config.checkpoint_every

    async def take(self, path: str) -> Path:
        """A consistent cut: pause every worker until its adds are acknowledged, have every
        server write its partitions once all earlier requests are applied, publish, resume."""
        if self._busy:
            raise MultiversoError("a checkpoint is being taken; try again after it")
        self._busy, tmp = True, None
        scheduler = self.scheduler
        workers = list(scheduler.workers.values())
        try:
            tmp, _ = new_checkpoint_dir(path)
            await asyncio.gather(*(scheduler.ask(node.conn, MsgType.PAUSE, {}) for node in workers))
            await asyncio.gather(*(scheduler.ask(node.conn, MsgType.SNAPSHOT,
                                                 {"file": str(tmp / f"server{sid}.safetensors")})
                                   for sid, node in scheduler.servers.items()))
            final = publish(tmp, self._manifest())
            log.info("checkpoint written to %s", final)
            return final
        except BaseException:
            if tmp is not None:
                discard(tmp)
            raise
        finally:
            for node in workers:
                node.conn.send(MsgType.RESUME, 0)  # request id 0: its answer is dropped
            self._busy = False

    def _manifest(self) -> dict:
        scheduler = self.scheduler
        return {"servers": len(scheduler.servers), "workers": scheduler.config.workers, "tables": {
            name: {"id": e.table_id, "spec": e.spec.to_wire(), "layout": e.layout, "owners": e.owners,
                   "files": {p: f"server{owner}.safetensors" for p, owner in enumerate(e.owners)}}
            for name, e in scheduler.tables.items() if e.ready.is_set()}}

    async def recover(self, node: Any) -> None:
        """A server replaces a lost one: give it the lost one's partitions from the latest
        checkpoint (values, updater state, applied sequence numbers), then tell the workers
        where it is. Adds acknowledged after that checkpoint are lost with the old server."""
        scheduler, sid = self.scheduler, node.node_id
        try:
            folder, manifest = read_manifest(self.dir)
        except InvalidArgument:
            folder, manifest = None, {"tables": {}}
            log.error("server %d replaced before any checkpoint: its partitions start empty", sid)
        for name, entry in scheduler.tables.items():
            saved = manifest["tables"].get(name)
            restore = saved and {"dir": str(folder), "table": saved["id"], "files": saved["files"], "recover": True}
            await scheduler.ask(node.conn, MsgType.CREATE_SHARDS, {
                "table": entry.table_id, "spec": entry.spec.to_wire(), "layout": entry.layout,
                "partitions": [p for p, owner in enumerate(entry.owners) if owner == sid], "map": entry.map_version,
                "workers": sorted(scheduler.workers), **({"restore": restore} if restore else {})})
        host, port = node.address.rsplit(":", 1)
        for worker in scheduler.workers.values():
            worker.conn.send(MsgType.SERVER_MOVED, 0, {"server": sid, "host": host, "port": int(port)})
        log.info("server %d is back at %s, restored from %s", sid, node.address, folder)

    def restored_table(self, name: str, spec: TableSpec) -> Optional[tuple[dict, dict]]:
        """Where a new table's content comes from in the checkpoint being restored, if any,
        and the layout it was saved with (which the table keeps: another version may split
        tables differently, and a KV key's partition follows from the layout)."""
        if self._restore is None or name not in self._restore[1]["tables"]:
            return None
        folder, manifest = self._restore
        saved = manifest["tables"][name]
        problem = TableSpec.from_wire(saved["spec"]).mismatch(spec)
        if problem:
            raise TableSpecMismatch(f"table {name!r} of checkpoint {folder} has another spec: {problem}")
        servers = len(self.scheduler.servers)
        if manifest["servers"] != servers:
            raise InvalidArgument(f"checkpoint {folder} was taken with {manifest['servers']} server(s); "
                                  f"restore it with as many (this job has {servers})")
        return {"dir": str(folder), "table": saved["id"], "files": saved["files"]}, saved["layout"]

    # -- periodic checkpoints
    def start_periodic(self, directory: Optional[str] = None, every: Optional[float] = None) -> None:
        """Take checkpoints every `every` seconds into `directory` (by default the
        scheduler's own settings); the first settings given win."""
        if self._periodic is not None or not (self.dir or directory) or not (self.every or every):
            return
        self.dir, self.every = self.dir or directory, self.every or every
        self._periodic = asyncio.get_running_loop().create_task(self._every(self.dir, self.every))

    def stop(self) -> None:
        if self._periodic is not None:
            self._periodic.cancel()

    async def _every(self, path: str, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            if not self.scheduler.workers or not self.scheduler.tables or self.scheduler.dead_servers:
                continue  # nothing to save yet, or a server is missing
            try:
                await self.take(path)
            except (MultiversoError, asyncio.TimeoutError, OSError) as exc:
                log.error("periodic checkpoint to %s failed: %s", path, exc)
