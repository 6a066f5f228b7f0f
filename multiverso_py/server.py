"""The server: holds table partitions and applies get/add/set on them.

The event loop only reads, validates and routes frames; table work runs on a thread pool
(multiverso_py.server_jobs). A request runs as one job once it has its turn on every
partition it touches, so operations on one partition run in arrival order while
requests on different partitions run in parallel. A partition remembers the last
sequence number it applied per client, so a retried add is applied once. Before that,
each table's vector clock (see multiverso_py.consistency) may hold a request until the
slowest worker catches up. A worker on this host may lend a segment of shared memory
with a request (multiverso_py.shm): an add's arrays are read from it, a get's reply
written into it. Workers on this host may also reach the server through a local
(abstract Unix) socket, which its HELLO names.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from typing import Callable, Optional

from multiverso_py import shm, tables
from multiverso_py.auth import Auth
from multiverso_py.buffers import BufferPool
from multiverso_py.consistency import Kind, Model, TableClock
from multiverso_py.errors import ErrorCode, MultiversoError, ProtocolError, code_for
from multiverso_py.flow import FlowControl
from multiverso_py.local import LocalConnection, local_pair
from multiverso_py.polling import POLL_LIMIT, LoopPolling
from multiverso_py.protocol import DEFAULT_LIMITS, TABLE_OPS, Buffers, Frame, Limits, MsgType, unpack_parts
from multiverso_py.server_checkpoint import SnapshotJob, restore_partitions
from multiverso_py.server_jobs import READS, Job, Partition, Table, TablePool, Turns
from multiverso_py.tables.base import TableSpec
from multiverso_py.tls import TLS
from multiverso_py.transport import Connection, open_connection

log = logging.getLogger(__name__)

SEGMENT_SWEEP_S = 2.0  # how often the segments workers dropped are unmapped (their memory then goes)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = min(4, os.cpu_count() or 1)
    connect_timeout: float = 10.0
    flush_timeout: float = 30.0  # a reader this slow is dropped: it holds partitions closed
    limits: Limits = DEFAULT_LIMITS
    auth: Optional[Auth] = None  # required of every connection when set
    handshake_timeout: float = 10.0  # a connection not authenticated by then is dropped
    max_in_flight: int = 1024  # requests of one connection being served; beyond it, reading pauses
    tls: TLS = TLS()
    checkpoint_dir: Optional[str] = None  # asks the scheduler for periodic checkpoints here...
    checkpoint_every: Optional[float] = None  # ...this often
    poll_limit: float = POLL_LIMIT  # seconds the loop may poll for the next request before sleeping; 0: never
    local_socket: bool = True  # also listen on an abstract Unix socket for workers on this host (Linux, no TLS)


_KINDS = {MsgType.GET: Kind.GET, MsgType.ADD: Kind.ADD, MsgType.SET: Kind.SET, MsgType.ADD_GET: Kind.ADD}


class Server:
    """A server process's state. `start()` listens, `register()` joins a job's scheduler,
    `wait_closed()` returns once the scheduler ends the job."""

    def __init__(self, config: ServerConfig = ServerConfig()):
        self.config = config
        self.server_id: Optional[int] = None
        self.tables: dict[int, Table] = {}
        self.loop: asyncio.AbstractEventLoop
        self.address = ""
        self._pool = TablePool(config.threads, "mv-server")
        self.turns = Turns(self._pool)
        self.flow = FlowControl(config.max_in_flight)
        self.buffers = BufferPool()
        self._listener: Optional[asyncio.base_events.Server] = None
        self._local_listener: Optional[asyncio.base_events.Server] = None
        self.local_name: Optional[str] = None  # the abstract Unix socket's name, when listening on one
        self._scheduler: Optional[Connection] = None
        self._connections: set[Connection] = set()
        self._shm: dict[Connection, shm.ServerLinks] = {}  # workers' segments mapped, per connection
        self._segment_sweep: Optional[asyncio.TimerHandle] = None
        self._closed: Optional[asyncio.Event] = None
        self._register_reply: Optional[asyncio.Future] = None
        self._clocks: dict[int, int] = {}  # worker -> clocks it finished; new tables start from these
        self._left: set[int] = set()  # workers that left the job or were declared dead
        self._handlers = {
            **{op: self._table_op for op in TABLE_OPS.values()},
            MsgType.CLOCK: self._clock,
            MsgType.SHM_PROBE: lambda conn, frame: conn.send(MsgType.REPLY, frame.req_id,
                                                             {"data": shm.probe_answer(frame.body)}),
            MsgType.HEARTBEAT: lambda conn, frame: conn.send(MsgType.REPLY, frame.req_id),
        }

    async def start(self) -> str:
        self.loop = asyncio.get_running_loop()
        self.polling = LoopPolling(self.loop, self.config.poll_limit, self._pool.busy)
        self._closed = asyncio.Event()
        self._listener = await self.loop.create_server(self._new_connection, self.config.host, self.config.port,
                                                       ssl=self.config.tls.accept)
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        if self.config.local_socket and self.config.tls.accept is None and sys.platform == "linux":
            await self._listen_locally()
        log.info("server listening on %s%s", self.address,
                 f" and on local socket {self.local_name}" if self.local_name else "")
        self._sweep_segments()
        return self.address

    async def _listen_locally(self) -> None:
        """Listen on an abstract Unix socket too, named at random. Every connection's HELLO
        names it, and a worker on this host sends its synchronous calls through it: a Unix
        socket skips the TCP stack, a tenth of a small get (see multiverso_py.direct). An
        abstract name needs no file, so nothing is left behind when the server dies, and it
        is reachable from this host's network namespace only, as 127.0.0.1 is. Never with
        TLS, which it would bypass."""
        name = f"multiverso-server-{secrets.token_hex(16)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.listen(socket.SOMAXCONN)
            self._local_listener = await self.loop.create_unix_server(self._new_connection, sock=sock)
        except OSError as exc:
            sock.close()
            log.warning("no local socket for workers on this host (%s); they use TCP", exc)
            return
        self.local_name = name

    def _new_connection(self) -> Connection:
        conn = Connection(self._on_frame, self._on_close, self.config.limits, self.buffers.allocate, accept=True,
                          auth=self.config.auth, handshake_timeout=self.config.handshake_timeout,
                          greeting={"local": self.local_name} if self.local_name else None)
        self._connections.add(conn)
        return conn

    def _on_close(self, conn: Connection, exc: Optional[BaseException]) -> None:
        self._connections.discard(conn)
        self.flow.forget(conn)
        links = self._shm.pop(conn, None)
        if links is not None:
            links.close()

    def _shm_links(self, conn: Connection) -> shm.ServerLinks:
        links = self._shm.get(conn)
        if links is None:
            links = self._shm[conn] = shm.ServerLinks()
        return links

    def _sweep_segments(self) -> None:
        """Unmap the segments that workers dropped, on any of their connections."""
        for links in self._shm.values():
            links.forget_unlinked()
        self._segment_sweep = self.loop.call_later(SEGMENT_SWEEP_S, self._sweep_segments)

    def connect_local(self, on_frame: Callable, on_close: Callable) -> LocalConnection:
        """A connection from a worker in this process (the embedded job), on this loop: no
        socket, no encoding. Returns the worker's end."""
        worker_end, server_end = local_pair((on_frame, on_close), (self._on_frame, self._on_close),
                                            f"in-process worker of server {self.address}")
        self._connections.add(server_end)
        return worker_end

    # -- worker requests
    def _on_frame(self, conn: Connection, frame: Frame) -> None:
        self.polling.request_arrived()
        handler = self._handlers.get(frame.type)
        if handler is None:
            log.warning("unexpected %s from %s", frame.type.name, conn.peer)
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, f"a server does not handle {frame.type.name}")
            return
        handler(conn, frame)

    def _table_op(self, conn: Connection, frame: Frame) -> None:
        body = frame.body
        table = self.tables.get(body["table"])
        if table is None:
            log.warning("%s from %s names unknown table %s", frame.type.name, conn.peer, body["table"])
            conn.send_error(frame.req_id, ErrorCode.UNKNOWN_TABLE, f"server {self.server_id} has no table {body['table']}")
            return
        if frame.type is MsgType.ADD_GET and table.spec.consistency != "async":
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, f"ADD_GET needs an async table; table "
                            f"{body['table']} is {table.spec.consistency} (send an ADD, then a GET)")
            return
        segment = None
        try:
            buffers: Buffers = frame.buffers
            if "shm" in body:  # the arrays are in the worker's shared memory (see multiverso_py.shm)
                segment = self._shm_links(conn).segment(body["shm"])
                if frame.type is not MsgType.GET:  # a get's row ids still travel in the frame
                    if buffers:
                        raise ProtocolError(f"a {frame.type.name} in shared memory carries no buffers")
                    buffers = functools.partial(shm.views, segment)
            parts = unpack_parts(body, buffers, self.config.limits)
        except ProtocolError as exc:
            log.warning("bad %s from %s: %s", frame.type.name, conn.peer, exc)
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, str(exc))
            return
        if not parts:
            conn.send(MsgType.REPLY, frame.req_id, {"parts": []})
            return
        if any(pid not in table.partitions for pid, _, _ in parts):
            conn.send(MsgType.MOVED, frame.req_id, {"map": table.map_version})
            return
        for _, args, arrays in parts:
            args["w"] = body["client"]  # shards that keep per-worker state learn the worker here, not from the client
        job_parts = [(pid, table.partitions[pid], args, arrays) for pid, args, arrays in parts]
        partitions = list({id(p): p for _, p, _, _ in job_parts}.values())
        job = Job(self, conn, frame, job_parts, partitions, segment if frame.type in READS else None)
        try:
            if frame.type is MsgType.ADD and table.clock.model is not Model.ASYNC:
                for _, partition, args, arrays in job_parts:  # it may be held, and acknowledged before it runs
                    partition.shard.check_add(args, arrays)
            now = table.clock.admit(body["client"], _KINDS[frame.type], lambda: self.turns.arrive(job), job)
        except MultiversoError as exc:
            conn.send_error(frame.req_id, code_for(exc), str(exc))
            return
        self.flow.started(conn)
        if now:
            self.turns.arrive(job)
        elif frame.type is MsgType.ADD:
            if segment is not None:
                job.own_arrays()  # the worker reuses its segment once acknowledged
            job.acknowledge()  # so that flushes and barriers never wait for other workers' clocks

    def _clock(self, conn: Connection, frame: Frame) -> None:
        worker = frame.body["client"]
        if worker in self._left:
            conn.send_error(frame.req_id, ErrorCode.BAD_REQUEST, f"worker {worker} has left the job")
            return
        self._clocks[worker] = self._clocks.get(worker, 0) + 1
        for table in self.tables.values():
            table.clock.tick(worker)
        conn.send(MsgType.REPLY, frame.req_id)

    def _worker_joined(self, worker: int) -> None:
        """A restarted worker took a lost one's id: count it again, from the slowest clock,
        and forget the sequence numbers of the process it replaces."""
        self._left.discard(worker)
        self._clocks[worker] = min(self._clocks.values(), default=0)
        for table in self.tables.values():
            table.clock.join(worker)
            for partition in table.partitions.values():
                partition.applied.pop(worker, None)

    def _worker_left(self, worker: int) -> None:
        self._left.add(worker)
        self._clocks.pop(worker, None)
        for table in self.tables.values():
            table.clock.drop(worker)

    def after_flush(self, conn: Connection, callback: Callable[[], None]) -> None:
        """Run callback once conn has sent its replies; drop a reader that stalls."""
        conn.after_flush(callback)
        if not conn.closed and conn.unflushed():
            self.loop.call_later(self.config.flush_timeout, self._drop_if_stalled, conn)

    def _drop_if_stalled(self, conn: Connection) -> None:
        if not conn.closed and conn.unflushed():
            log.warning("dropping %s: it read no reply for %ss", conn.peer, self.config.flush_timeout)
            conn.abort()

    # -- the scheduler session
    async def register(self, scheduler: tuple[str, int]) -> int:
        """Join the job: register with the scheduler and take commands from it."""
        conn = await open_connection(*scheduler, lambda: Connection(self._on_scheduler_frame, self._on_scheduler_lost,
                                                                     self.config.limits, auth=self.config.auth),
                                     self.config.connect_timeout, self.config.tls.connect)
        self._scheduler = conn
        self._register_reply = self.loop.create_future()
        host, port = self.address.rsplit(":", 1)
        periodic = {"checkpoint_dir": self.config.checkpoint_dir, "checkpoint_every": self.config.checkpoint_every}
        conn.send(MsgType.REGISTER, 0, {"role": "server", "host": host, "port": int(port),
                                        **(periodic if all(periodic.values()) else {})})
        reply = await asyncio.wait_for(self._register_reply, self.config.connect_timeout)
        self.server_id = reply["data"]["id"]
        log.info("server %s registered with scheduler %s:%s", self.server_id, *scheduler)
        return self.server_id

    def _on_scheduler_frame(self, conn: Connection, frame: Frame) -> None:
        if frame.type is MsgType.REPLY and self._register_reply and not self._register_reply.done():
            self._register_reply.set_result(frame.body)
        elif frame.type is MsgType.ERROR and self._register_reply and not self._register_reply.done():
            self._register_reply.set_exception(MultiversoError(frame.body["message"]))
        elif frame.type is MsgType.CREATE_SHARDS:
            try:
                self._create_shards(frame.body)
            except (MultiversoError, ValueError) as exc:
                conn.send_error(frame.req_id, code_for(exc), str(exc))
                return
            conn.send(MsgType.REPLY, frame.req_id)
        elif frame.type is MsgType.WORKER_LEFT:
            self._worker_left(frame.body["worker"])
        elif frame.type is MsgType.WORKER_JOINED:
            self._worker_joined(frame.body["worker"])
        elif frame.type is MsgType.SNAPSHOT:
            self._snapshot(conn, frame)
        elif frame.type is MsgType.SHUTDOWN:
            log.info("server %s: the scheduler ended the job", self.server_id)
            self.close()
        elif frame.type is MsgType.HEARTBEAT:
            conn.send(MsgType.REPLY, frame.req_id)

    def _on_scheduler_lost(self, conn: Connection, exc: Optional[BaseException]) -> None:
        if not self._closed.is_set():
            log.warning("server %s lost its scheduler; shutting down", self.server_id)
            self.close()

    def _create_shards(self, body: dict) -> None:
        spec = TableSpec.from_wire(body["spec"])
        clocks = {w: self._clocks.get(w, 0) for w in body["workers"] if type(w) is int and w not in self._left}
        clock = TableClock(Model(spec.consistency), spec.staleness, clocks)
        shards = {pid: tables.make_shard(spec, body["layout"], pid) for pid in body["partitions"]}
        applied = restore_partitions(shards, body["restore"]) if "restore" in body else {}
        partitions = {pid: Partition(shard, applied=applied.get(pid, {})) for pid, shard in shards.items()}
        self.tables[body["table"]] = Table(spec, body["map"], partitions, clock)
        log.info("server %s holds partitions %s of table %s", self.server_id, body["partitions"], body["table"])

    def _snapshot(self, conn: Connection, frame: Frame) -> None:
        """Write this server's partitions for a checkpoint, once every request that arrived
        before has been applied; reply when the file is on disk."""
        def done(error: Optional[Exception]) -> None:
            if error is None:
                conn.send(MsgType.REPLY, frame.req_id)
            else:
                conn.send_error(frame.req_id, code_for(error), f"server {self.server_id}: {error}")
        self.turns.arrive(SnapshotJob(self, frame.body["file"], done))

    # -- life cycle
    def close(self) -> None:
        if self._closed is None or self._closed.is_set():
            return
        self._closed.set()
        if self._segment_sweep is not None:
            self._segment_sweep.cancel()
        for listener in (self._listener, self._local_listener):
            if listener is not None:
                listener.close()
        for conn in list(self._connections):
            conn.close()
        if self._scheduler is not None:
            self._scheduler.close()
        self._pool.shutdown()

    async def wait_closed(self) -> None:
        await self._closed.wait()
