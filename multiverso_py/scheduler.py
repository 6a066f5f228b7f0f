"""The scheduler: registers nodes, hands out ids, runs barriers, keeps the table registry
and owns each table's partition -> server map. It ends the job (and tells the servers)
once every worker has left."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Optional

from multiverso_py import tables
from multiverso_py.auth import Auth
from multiverso_py.errors import ConnectionLost, ErrorCode, MultiversoError, TableSpecMismatch, code_for, exception_for
from multiverso_py.protocol import DEFAULT_LIMITS, Frame, Limits, MsgType
from multiverso_py.scheduler_checkpoint import Checkpoints
from multiverso_py.tables.base import TableSpec
from multiverso_py.tls import TLS
from multiverso_py.transport import Connection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    workers: int = 1
    servers: int = 1  # workers are admitted once this many servers have registered
    host: str = "127.0.0.1"
    port: int = 0
    timeout: float = 60.0  # how long a table may wait for its master worker's content
    heartbeat_timeout: float = 30.0  # a worker silent this long is declared dead
    limits: Limits = DEFAULT_LIMITS
    auth: Optional[Auth] = None  # required of every connection when set
    tls: TLS = TLS()
    restore: Optional[str] = None  # a checkpoint: tables created under its names start from it
    checkpoint_dir: Optional[str] = None  # with checkpoint_every: where periodic checkpoints go
    checkpoint_every: Optional[float] = None  # seconds between them

    @property
    def heartbeat_interval(self) -> float:
        """How often workers send a heartbeat: a few may be late before one is declared dead."""
        return self.heartbeat_timeout / 5


@dataclass
class _Node:
    role: str
    node_id: int
    conn: Connection
    address: str = ""
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _TableEntry:
    table_id: int
    name: str
    spec: TableSpec
    layout: dict
    owners: list[int]
    map_version: int = 1
    created: asyncio.Event = field(default_factory=asyncio.Event)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    initializing: bool = False
    error: Optional[BaseException] = None

    def reply(self, init: bool) -> dict:
        return {"table": self.table_id, "name": self.name, "layout": self.layout,
                "owners": self.owners, "map": self.map_version, "init": init}


class Scheduler:
    def __init__(self, config: SchedulerConfig = SchedulerConfig()):
        if config.workers < 1 or config.servers < 1:
            raise ValueError("a job needs at least one worker and one server")
        self.config = config
        self.address = ""
        self.servers: dict[int, _Node] = {}
        self.workers: dict[int, _Node] = {}  # live workers
        self._admitted = 0  # workers given an id so far
        self._waiting_workers: list[tuple[Connection, int]] = []
        self.tables: dict[str, _TableEntry] = {}
        self._table_ids = itertools.count()
        self._req_ids = itertools.count(1)
        self._server_replies: dict[int, tuple[asyncio.Future, Connection]] = {}  # what ask() awaits
        self._barrier: list[tuple[Connection, int]] = []
        self._listener: Optional[asyncio.base_events.Server] = None
        self._done: Optional[asyncio.Event] = None
        self._watch: Optional[asyncio.Task] = None
        self.checkpoints = Checkpoints(self)
        self.dead_servers: set[int] = set()  # lost servers a newly registering one replaces
        self._handlers = {
            MsgType.REGISTER: self._register,
            MsgType.BARRIER: self._enter_barrier,
            MsgType.CREATE_TABLE: self._spawn(self._create_table),
            MsgType.TABLE_READY: self._table_ready,
            MsgType.SHARD_MAP: self._shard_map,
            MsgType.HEARTBEAT: lambda conn, frame: conn.send(MsgType.REPLY, frame.req_id),
            MsgType.LEAVE: self._leave,
            MsgType.CHECKPOINT: self._spawn(self._checkpoint),
            MsgType.REPLY: self._server_reply,
            MsgType.ERROR: self._server_reply,
        }

    async def start(self) -> str:
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        self._listener = await loop.create_server(
            lambda: Connection(self._on_frame, self._on_close, self.config.limits, accept=True, auth=self.config.auth),
            self.config.host, self.config.port, ssl=self.config.tls.accept)
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        self._watch = loop.create_task(self._watch_workers())
        self.checkpoints.start_periodic()
        log.info("scheduler listening on %s for %d worker(s), %d server(s)", self.address,
                 self.config.workers, self.config.servers)
        return self.address

    async def wait_done(self) -> None:
        await self._done.wait()

    def _spawn(self, handler):
        return lambda conn, frame: asyncio.get_running_loop().create_task(handler(conn, frame))

    def _on_frame(self, conn: Connection, frame: Frame) -> None:
        handler = self._handlers.get(frame.type)
        if handler is None:
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, f"the scheduler does not handle {frame.type.name}")
            return
        if frame.type not in (MsgType.REGISTER, MsgType.REPLY, MsgType.ERROR, MsgType.HEARTBEAT) and conn.context is None:
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, "register before sending " + frame.type.name)
            return
        if conn.context is not None:
            conn.context.last_seen = time.monotonic()
        handler(conn, frame)

    # -- registration
    def _register(self, conn: Connection, frame: Frame) -> None:
        body = frame.body
        if conn.context is not None:
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, "this connection is registered already")
        elif body["role"] == "server":
            if "host" not in body or "port" not in body:
                conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, "a server registers with its host and port")
                return
            replacing = min(self.dead_servers, default=None)
            node = _Node("server", len(self.servers) if replacing is None else replacing, conn,
                         f"{body['host']}:{body['port']}")
            self.servers[node.node_id] = conn.context = node
            log.info("server %d registered at %s", node.node_id, node.address)
            conn.send(MsgType.REPLY, frame.req_id, {"data": {"id": node.node_id}})
            self.checkpoints.start_periodic(body.get("checkpoint_dir"), body.get("checkpoint_every"))
            if replacing is None:
                self._admit_workers()
            else:
                self.dead_servers.discard(replacing)
                asyncio.get_running_loop().create_task(self.checkpoints.recover(node))
        elif body["role"] == "worker":
            rank = body.get("rank", -1)
            if self._admitted == self.config.workers and rank in set(range(self.config.workers)) - set(self.workers):
                self._rejoin(conn, frame.req_id, _Node("worker", rank, conn))
                return
            if self._admitted + len(self._waiting_workers) >= self.config.workers:
                conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST,
                                f"the job is full: it was started for {self.config.workers} worker(s)")
                return
            conn.context = _Node("worker", body.get("rank", -1), conn)
            self._waiting_workers.append((conn, frame.req_id))
            self._admit_workers()
        else:
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, f"unknown role {body['role']!r}")

    def _admit_workers(self) -> None:
        """Workers get their ids once all of them and enough servers have registered."""
        if len(self._waiting_workers) < self.config.workers or len(self.servers) < self.config.servers:
            return
        servers = self._server_list()
        requested = [conn.context.node_id for conn, _ in self._waiting_workers]
        free = iter(sorted(set(range(self.config.workers)) - set(requested)))
        taken: set[int] = set()
        for conn, req_id in self._waiting_workers:
            node = conn.context
            if not 0 <= node.node_id < self.config.workers or node.node_id in taken:
                node.node_id = next(free)  # no rank asked for, or asked twice: the next free one
            taken.add(node.node_id)
            self._admitted += 1
            self._welcome(conn, req_id, node, servers)
        self._waiting_workers.clear()
        log.info("all %d worker(s) registered; the job starts", self.config.workers)

    def _server_list(self) -> list:
        """[id, host, port] of every server, as workers are told at registration."""
        return [[sid, node.address.rsplit(":", 1)[0], int(node.address.rsplit(":", 1)[1])]
                for sid, node in sorted(self.servers.items())]

    def _welcome(self, conn: Connection, req_id: int, node: _Node, servers: list) -> None:
        self.workers[node.node_id] = conn.context = node
        node.last_seen = time.monotonic()
        conn.send(MsgType.REPLY, req_id, {"data": {"id": node.node_id, "workers": self.config.workers,
                                                    "servers": servers, "recovery": bool(self.checkpoints.dir),
                                                    "heartbeat": self.config.heartbeat_interval}})

    def _rejoin(self, conn: Connection, req_id: int, node: _Node) -> None:
        """A worker restarted with the id of one that was lost takes its place: the
        servers count its clock again (from the slowest one's) and forget its old
        sequence numbers, since the new process starts them over."""
        self._welcome(conn, req_id, node, self._server_list())
        for other in [*self.servers.values(), *(w for w in self.workers.values() if w is not node)]:
            other.conn.send(MsgType.WORKER_JOINED, 0, {"worker": node.node_id})
        log.info("worker %d rejoined the job", node.node_id)

    # -- tables
    async def _create_table(self, conn: Connection, frame: Frame) -> None:
        name, worker = frame.body["name"], conn.context.node_id
        try:
            spec = TableSpec.from_wire(frame.body["spec"])
            entry = self.tables.get(name)
            if entry is None:
                entry = await self._new_table(name, spec)
            else:
                await asyncio.wait_for(entry.created.wait(), self.config.timeout)
                if entry.error is not None:
                    raise entry.error
                problem = entry.spec.mismatch(spec)
                if problem:
                    raise TableSpecMismatch(f"table {name!r} exists with another spec: {problem}")
            if worker == 0 and not entry.ready.is_set() and not entry.initializing:
                entry.initializing = True
                conn.send(MsgType.REPLY, frame.req_id, {"data": entry.reply(init=True)})
                return
            await asyncio.wait_for(entry.ready.wait(), self.config.timeout)
            conn.send(MsgType.REPLY, frame.req_id, {"data": entry.reply(init=False)})
        except asyncio.TimeoutError:
            conn.send_error(frame.req_id, ErrorCode.TIMEOUT,
                            f"table {name!r} is not ready after {self.config.timeout}s: does worker 0 create it too?")
        except MultiversoError as exc:
            conn.send_error(frame.req_id, code_for(exc), str(exc))

    async def _new_table(self, name: str, spec: TableSpec) -> _TableEntry:
        restored = self.checkpoints.restored_table(name, spec)
        restore, layout = restored if restored else (None, tables.layout(spec, len(self.servers)))
        table_id = next(self._table_ids)
        count = len(layout["bounds"]) - 1 if "bounds" in layout else layout["partitions"]
        server_ids = sorted(self.servers)
        owners = [server_ids[p * len(server_ids) // count] for p in range(count)]
        entry = _TableEntry(table_id, name, spec, layout, owners)
        self.tables[name] = entry
        try:
            await asyncio.gather(*(
                self._ask_server(sid, MsgType.CREATE_SHARDS, {
                    "table": table_id, "spec": spec.to_wire(), "layout": layout,
                    "partitions": [p for p, owner in enumerate(owners) if owner == sid], "map": entry.map_version,
                    "workers": sorted(self.workers), **({"restore": restore} if restore else {})})
                for sid in server_ids))
            if restore:
                entry.ready.set()  # its content is the checkpoint's: no worker writes initial content
        except (MultiversoError, asyncio.TimeoutError) as exc:
            entry.error = MultiversoError(f"creating table {name!r} on the servers failed: {exc}")
            raise entry.error from None
        finally:
            entry.created.set()
        log.info("table %r (id %d): %s %s %s, %d partition(s)", name, table_id, spec.kind, spec.shape, spec.dtype, count)
        return entry

    async def _checkpoint(self, conn: Connection, frame: Frame) -> None:
        path = frame.body["path"]
        try:
            final = await self.checkpoints.take(path)
        except (MultiversoError, asyncio.TimeoutError, OSError) as exc:
            conn.send_error(frame.req_id, code_for(exc), f"checkpoint to {path!r} failed: {exc or 'timed out'}")
            return
        conn.send(MsgType.REPLY, frame.req_id, {"data": {"path": str(final)}})

    async def _ask_server(self, sid: int, msg_type: MsgType, body: dict) -> dict:
        return await self.ask(self.servers[sid].conn, msg_type, body)

    async def ask(self, conn: Connection, msg_type: MsgType, body: dict) -> dict:
        """Send a request to a node; its reply. Fails when the node's connection closes."""
        if conn.closed:
            raise ConnectionLost(f"{msg_type.name}: the node's connection is closed")
        req_id = next(self._req_ids)
        reply = asyncio.get_running_loop().create_future()
        self._server_replies[req_id] = (reply, conn)
        conn.send(msg_type, req_id, body)
        try:
            return await asyncio.wait_for(reply, self.config.timeout)
        finally:
            self._server_replies.pop(req_id, None)

    def _server_reply(self, conn: Connection, frame: Frame) -> None:
        reply, _ = self._server_replies.get(frame.req_id, (None, None))
        if reply is None or reply.done():
            return
        if frame.type is MsgType.ERROR:
            reply.set_exception(exception_for(frame.body["code"], frame.body["message"]))
        else:
            reply.set_result(frame.body)

    def _table_ready(self, conn: Connection, frame: Frame) -> None:
        entry = self._entry_by_id(frame.body["table"])
        if entry is None:
            conn.send_error(frame.req_id, ErrorCode.UNKNOWN_TABLE, f"no table {frame.body['table']}")
            return
        entry.ready.set()
        conn.send(MsgType.REPLY, frame.req_id)

    def _shard_map(self, conn: Connection, frame: Frame) -> None:
        entry = self._entry_by_id(frame.body["table"])
        if entry is None:
            conn.send_error(frame.req_id, ErrorCode.UNKNOWN_TABLE, f"no table {frame.body['table']}")
            return
        conn.send(MsgType.REPLY, frame.req_id, {"data": {"owners": entry.owners, "map": entry.map_version}})

    def _entry_by_id(self, table_id: int) -> Optional[_TableEntry]:
        return next((e for e in self.tables.values() if e.table_id == table_id), None)

    # -- barrier and leaving
    def _enter_barrier(self, conn: Connection, frame: Frame) -> None:
        self._barrier.append((conn, frame.req_id))
        self._release_barrier()

    def _release_barrier(self) -> None:
        arrived = {c.context.node_id for c, _ in self._barrier if not c.closed}
        if not self._barrier or not set(self.workers) <= arrived:
            return
        for c, req_id in self._barrier:
            c.send(MsgType.REPLY, req_id)
        self._barrier.clear()

    def _leave(self, conn: Connection, frame: Frame) -> None:
        conn.send(MsgType.REPLY, frame.req_id)
        self._drop_worker(conn.context, "left the job")

    def _on_close(self, conn: Connection, exc: Optional[BaseException]) -> None:
        for reply, asked in self._server_replies.values():
            if asked is conn and not reply.done():
                reply.set_exception(ConnectionLost("the node closed its connection before answering"))
        node = conn.context
        if node is None:
            return
        if node.role == "worker":
            self._waiting_workers = [(c, r) for c, r in self._waiting_workers if c is not conn]
            self._drop_worker(node, "disconnected")
        elif self.servers.get(node.node_id) is node and not self._done.is_set():
            log.error("server %d at %s disconnected%s", node.node_id, node.address,
                      "; waiting for a replacement" if self.checkpoints.dir else "")
            if self.checkpoints.dir:  # a job with checkpoints can bring a server back
                self.dead_servers.add(node.node_id)

    async def _watch_workers(self) -> None:
        """Declare dead the nodes that sent nothing, not even a heartbeat, for
        heartbeat_timeout: a hung or stopped worker holds no barrier or clock forever, and
        requests to a hung server fail (or wait for its replacement) instead of timing out."""
        while True:
            await asyncio.sleep(self.config.heartbeat_interval / 2)
            for server in self.servers.values():
                server.conn.send(MsgType.HEARTBEAT, 0)  # its answer, like anything it sends, counts as alive
            silent_since = time.monotonic() - self.config.heartbeat_timeout
            for node in [n for n in self.workers.values() if n.last_seen < silent_since]:
                log.warning("worker %d sent nothing for %ss: declared dead", node.node_id, self.config.heartbeat_timeout)
                self._drop_worker(node, "was declared dead")
                node.conn.abort()
            for node in [n for n in self.servers.values() if n.last_seen < silent_since and not n.conn.closed]:
                log.warning("server %d answered nothing for %ss: declared dead", node.node_id, self.config.heartbeat_timeout)
                node.conn.abort()
                for worker in self.workers.values():
                    worker.conn.send(MsgType.SERVER_LOST, 0, {"server": node.node_id})

    def _drop_worker(self, node: _Node, why: str) -> None:
        if self.workers.pop(node.node_id, None) is None:
            return
        log.info("worker %d %s; %d live worker(s) remain", node.node_id, why, len(self.workers))
        for other in [*self.servers.values(), *self.workers.values()]:  # servers: its clock stops counting
            other.conn.send(MsgType.WORKER_LEFT, 0, {"worker": node.node_id})
        self._barrier = [(c, r) for c, r in self._barrier if c.context is not node]
        self._release_barrier()
        if not self.workers and self._admitted == self.config.workers:
            self.finish()

    def finish(self) -> None:
        """End the job: tell the servers, stop listening."""
        if self._done.is_set():
            return
        log.info("all workers left; shutting the job down")
        self._done.set()
        if self._watch is not None:
            self._watch.cancel()
        self.checkpoints.stop()
        for node in self.servers.values():
            node.conn.send(MsgType.SHUTDOWN, 0)
        if self._listener is not None:
            self._listener.close()

    def close(self) -> None:
        self.finish()
        for node in [*self.servers.values(), *self.workers.values()]:
            node.conn.close()
