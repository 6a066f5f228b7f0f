"""The server: holds table partitions and applies get/add/set on them.

The event loop only reads, validates and routes frames; table work runs on a thread pool.
Each partition has a serial queue, so operations on one partition run in arrival order
while different partitions run in parallel. A shard remembers the last sequence number
it applied per client, so a retried add is applied once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from multiverso_py import tables
from multiverso_py.errors import ErrorCode, MultiversoError, ProtocolError, code_for
from multiverso_py.protocol import DEFAULT_LIMITS, Frame, Limits, MsgType, pack_parts, unpack_parts
from multiverso_py.tables.base import TableSpec
from multiverso_py.transport import Connection, open_connection

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0
    threads: int = min(4, os.cpu_count() or 1)
    connect_timeout: float = 10.0
    flush_timeout: float = 30.0  # a reader this slow is dropped: it holds partitions closed
    limits: Limits = DEFAULT_LIMITS


class PartitionQueue:
    """Runs jobs for one partition one at a time, in submission order, on a shared pool.
    A job that returns True holds the queue closed until release() (a get whose reply
    still reads the partition's memory)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self._pool = pool
        self._jobs: deque[Callable[[], bool]] = deque()
        self._lock = threading.Lock()
        self._running = False

    def submit(self, job: Callable[[], bool]) -> None:
        with self._lock:
            self._jobs.append(job)
            if self._running:
                return
            self._running = True
        self._pool.submit(self._drain)

    def release(self) -> None:
        with self._lock:
            if not self._jobs:
                self._running = False
                return
        self._pool.submit(self._drain)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._running = False
                    return
                job = self._jobs.popleft()
            if job():
                return


@dataclass
class Partition:
    shard: Any
    queue: PartitionQueue
    applied: dict[int, int] = field(default_factory=dict)  # client id -> last applied seq

    def run(self, op: MsgType, client: int, seq: int, args: dict, arrays: list) -> tuple[dict, list]:
        if op is MsgType.GET:
            return self.shard.get(args, arrays)
        if seq <= self.applied.get(client, -1):
            return {}, []  # a retry of an add this partition already applied
        result = (self.shard.add if op is MsgType.ADD else self.shard.set)(args, arrays)
        self.applied[client] = seq
        return result


@dataclass
class Table:
    spec: TableSpec
    map_version: int
    partitions: dict[int, Partition]


class _Job:
    """One table request: its parts run on partition queues; the last one replies.

    A get replies with views of the partitions, not copies: each part holds its
    partition's queue closed until the reply has been handed to the kernel, so no add
    changes the data while it is on its way out."""

    def __init__(self, server: "Server", conn: Connection, frame: Frame, count: int):
        self.server, self.conn, self.frame = server, conn, frame
        self.results: list[Any] = [None] * count
        self.error: Optional[BaseException] = None
        self.held: list[PartitionQueue] = []
        self._left = count
        self._lock = threading.Lock()

    def run_part(self, index: int, pid: int, partition: Partition, args: dict, arrays: list) -> bool:
        """Runs on a pool thread; True keeps the partition's queue closed (see reply)."""
        body = self.frame.body
        hold = self.frame.type is MsgType.GET
        try:
            args_out, arrays_out = partition.run(self.frame.type, body["client"], body["seq"], args, arrays)
            self.results[index] = (pid, args_out, arrays_out)
        except Exception as exc:  # reported to the caller as an ERROR reply
            if isinstance(exc, (MultiversoError, ValueError, IndexError)):
                log.warning("bad %s on table %s partition %s from %s: %s", self.frame.type.name, body["table"], pid,
                            self.conn.peer, exc)
            else:
                log.exception("%s on table %s partition %s failed", self.frame.type.name, body["table"], pid)
            self.error = exc
        with self._lock:
            if hold:
                self.held.append(partition.queue)
            self._left -= 1
            last = self._left == 0
        if last:
            self.server.loop.call_soon_threadsafe(self.reply)
        return hold

    def reply(self) -> None:
        if self.error is not None:
            self.conn.send_error(self.frame.req_id, code_for(self.error), str(self.error))
        else:
            parts, buffers = pack_parts(self.results)
            self.conn.send(MsgType.REPLY, self.frame.req_id, {"parts": parts}, buffers)
        if self.held:
            self.server.after_flush(self.conn, self._release)

    def _release(self) -> None:
        for queue in self.held:
            queue.release()


class Server:
    """A server process's state. `start()` listens, `register()` joins a job's scheduler,
    `wait_closed()` returns once the scheduler ends the job."""

    def __init__(self, config: ServerConfig = ServerConfig()):
        self.config = config
        self.server_id: Optional[int] = None
        self.tables: dict[int, Table] = {}
        self.loop: asyncio.AbstractEventLoop
        self.address = ""
        self._pool = ThreadPoolExecutor(config.threads, thread_name_prefix="mv-server")
        self._listener: Optional[asyncio.base_events.Server] = None
        self._scheduler: Optional[Connection] = None
        self._connections: set[Connection] = set()
        self._closed: Optional[asyncio.Event] = None
        self._register_reply: Optional[asyncio.Future] = None
        self._handlers = {
            MsgType.GET: self._table_op,
            MsgType.ADD: self._table_op,
            MsgType.SET: self._table_op,
            MsgType.HEARTBEAT: lambda conn, frame: conn.send(MsgType.REPLY, frame.req_id),
        }

    async def start(self) -> str:
        self.loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        self._listener = await self.loop.create_server(self._new_connection, self.config.host, self.config.port)
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        log.info("server listening on %s", self.address)
        return self.address

    def _new_connection(self) -> Connection:
        conn = Connection(self._on_frame, self._on_close, self.config.limits)
        self._connections.add(conn)
        return conn

    def _on_close(self, conn: Connection, exc: Optional[BaseException]) -> None:
        self._connections.discard(conn)

    # -- worker requests
    def _on_frame(self, conn: Connection, frame: Frame) -> None:
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
        try:
            parts = unpack_parts(body, frame.buffers, self.config.limits)
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
        job = _Job(self, conn, frame, len(parts))
        for index, (pid, args, arrays) in enumerate(parts):
            partition = table.partitions[pid]
            partition.queue.submit(lambda i=index, p=pid, part=partition, a=args, arr=arrays: job.run_part(i, p, part, a, arr))

    def after_flush(self, conn: Connection, callback: Callable[[], None]) -> None:
        """Run callback once conn has sent its replies; drop a reader that stalls."""
        conn.after_flush(callback)
        if not conn.closed and conn.transport.get_write_buffer_size():
            self.loop.call_later(self.config.flush_timeout, self._drop_if_stalled, conn)

    def _drop_if_stalled(self, conn: Connection) -> None:
        if not conn.closed and conn.transport.get_write_buffer_size():
            log.warning("dropping %s: it read no reply for %ss", conn.peer, self.config.flush_timeout)
            conn.abort()

    # -- the scheduler session
    async def register(self, scheduler: tuple[str, int]) -> int:
        """Join the job: register with the scheduler and take commands from it."""
        conn = await open_connection(*scheduler, lambda: Connection(self._on_scheduler_frame, self._on_scheduler_lost,
                                                                     self.config.limits), self.config.connect_timeout)
        self._scheduler = conn
        self._register_reply = self.loop.create_future()
        host, port = self.address.rsplit(":", 1)
        conn.send(MsgType.REGISTER, 0, {"role": "server", "host": host, "port": int(port)})
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
        shards = {pid: Partition(tables.make_shard(spec, body["layout"], pid), PartitionQueue(self._pool))
                  for pid in body["partitions"]}
        self.tables[body["table"]] = Table(spec, body["map"], shards)
        log.info("server %s holds partitions %s of table %s", self.server_id, body["partitions"], body["table"])

    # -- life cycle
    def close(self) -> None:
        if self._closed is None or self._closed.is_set():
            return
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            conn.close()
        if self._scheduler is not None:
            self._scheduler.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def wait_closed(self) -> None:
        await self._closed.wait()
