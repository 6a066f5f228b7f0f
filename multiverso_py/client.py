"""The worker side: a session with the scheduler, a connection to every server, and the
routing of table requests.

Training code calls in from its own thread; I/O runs on a LoopThread. A table call
arrives as Parts (one per partition); the client groups them by owning server, sends
every server its messages at once, and merges the replies, receiving large arrays
straight into the result (or, from a server on this host, through a segment of shared
memory lent with the request; see multiverso_py.shm). A synchronous call that is all
this worker has outstanding and fits one message goes out and comes back on the
caller's own thread instead (see multiverso_py.direct). Each message carries (client id,
sequence number) so that a resent add is applied once. Every request has a deadline.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import ssl
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from multiverso_py.acks import AddTracker
from multiverso_py.auth import Auth
from multiverso_py.batching import (BATCH_BYTES, MESSAGE_TARGET_BYTES, Batch, OpenBatches, chunk_messages, merge_adds,
                                    part_bytes, split_large)
from multiverso_py.control import ControlRequests, SendGate, heartbeat
from multiverso_py.direct import DirectCalls
from multiverso_py.polling import POLL_LIMIT
from multiverso_py.errors import ConnectionLost, MultiversoError, exception_for
from multiverso_py.interruptions import Interruptions
from multiverso_py.protocol import DEFAULT_LIMITS, TABLE_OPS, Buffers, Frame, Limits, MsgType, pack_parts, unpack_parts
from multiverso_py.shm import Segment, WorkerLinks, views
from multiverso_py.tables.base import OnReply, Part, TableInfo, TableSpec
from multiverso_py.transport import Connection, LoopThread, open_connection
from multiverso_py.updaters import is_additive

log = logging.getLogger(__name__)

MAX_MOVED_RETRIES = 5
_FROM_SCHEDULER = frozenset({MsgType.PAUSE, MsgType.RESUME, MsgType.SERVER_MOVED, MsgType.SERVER_LOST,
                             MsgType.WORKER_LEFT, MsgType.WORKER_JOINED})  # what it tells a worker unasked


@dataclass
class _Op:
    """One table call; done when every message it was split into has its reply."""

    name: str
    info: TableInfo
    future: Future
    on_reply: Optional[OnReply]
    result: Any
    finish: Optional[Callable[[Any], Any]] = None  # turns result into the future's value
    left: int = 0
    moved_retries: int = 0


@dataclass
class _Pending:
    """One message in flight: some of one call's parts (a batch of small adds is one call);
    its reply completes one share of that call."""

    op: _Op
    server: int
    parts: list[Part]
    deadline: float
    seq: int  # kept: a message resent to a replaced server must be recognised as the same one
    dest: Optional[list[memoryview]] = None
    segment: Optional[Segment] = None  # shared memory lent to the server for this message


@dataclass
class ClientConfig:
    timeout: float = 60.0
    limits: Limits = DEFAULT_LIMITS
    auth: Optional[Auth] = None  # the job's token, when it has one
    tls: Optional[ssl.SSLContext] = None  # verifies the scheduler's and servers' certificates
    shared_memory: bool = True  # large arrays to and from servers on this host go through shared memory
    direct: bool = True  # synchronous calls on the caller's thread where they can (multiverso_py.direct)
    poll_limit: float = POLL_LIMIT  # seconds a direct call polls for its reply before sleeping; 0: never


class Client(Interruptions, DirectCalls):
    """Implements the Runtime interface that table handles use."""

    def __init__(self, io: LoopThread, config: ClientConfig = ClientConfig()):
        self.io = io
        self.config = config
        self.timeout = config.timeout
        self.worker_id = -1
        self.workers_num = 0
        self.servers: dict[int, str] = {}
        self._scheduler: Optional[Connection] = None
        self._conns: dict[int, Connection] = {}
        self._pending: dict[int, _Pending] = {}
        self._req_ids = itertools.count(1)
        self._control = ControlRequests(self._req_ids.__next__, config.timeout)
        self._seq = itertools.count(1)
        self._unnamed_tables = itertools.count()
        self._acks = AddTracker()
        self._batches = OpenBatches()
        self.batched_adds = 0  # adds that went out in a batch, for tests and benchmarks
        self._sweeper: Optional[asyncio.Task] = None
        self._heartbeat: Optional[asyncio.Task] = None
        self._leaving = False
        self._gate = SendGate()
        self._recovery = False  # the job replaces dead servers: wait for them instead of failing
        self.shared_memory = WorkerLinks(config.shared_memory)
        self._init_direct()

    # ------------------------------------------------------------ life cycle (any thread)
    def start(self, scheduler: tuple[str, int], rank: Optional[int] = None, local: Optional[Any] = None) -> None:
        """Join the job; `local` is a server on this process's loop (the embedded job's),
        reached through an in-process connection instead of a socket."""
        self.io.run(self._start(scheduler, rank, local), self.timeout + 5)

    def leave(self) -> None:
        """Flush adds, leave the job, close every connection."""
        try:
            self.flush()
        finally:
            self._close_links()
            self.io.run(self._leave(), self.timeout + 5)

    def flush(self) -> None:
        """Wait until every add issued so far is acknowledged (see AddTracker)."""
        self._acks.flush(self.timeout)

    def barrier(self) -> None:
        self.flush()
        self.control(MsgType.BARRIER, {}, "barrier")

    def control(self, msg_type: MsgType, body: dict, what: str) -> Any:
        """A request to the scheduler from the calling thread; returns the reply's data."""
        return self.io.run(self._ask_scheduler(msg_type, body, what))

    def clock(self) -> None:
        """Tell every server that this worker finished a clock. Adds issued before it count
        at the old clock: open batches close now and go out ahead of the clock messages
        (the loop runs their sends first), and each connection keeps their order."""
        self._batches.close_all()
        self.io.run(self._clock_all())

    async def _clock_all(self) -> None:
        await asyncio.gather(*(self._control.ask(conn, f"server {sid} ({self.servers[sid]})", MsgType.CLOCK,
                                         {"client": self.worker_id}, "mv.clock()")
                               for sid, conn in self._conns.items()))

    # ------------------------------------------------------------ Runtime interface
    def table_name(self, name: Optional[str]) -> str:
        """A table's name: its own, or by creation order, so workers creating tables in the
        same order agree."""
        return f"table{next(self._unnamed_tables)}" if name is None else name

    def create_table(self, name: str, spec: TableSpec) -> tuple[TableInfo, bool]:
        data = self.control(MsgType.CREATE_TABLE, {"name": name, "spec": spec.to_wire()}, f"creating table {name!r}")
        info = TableInfo(data["table"], data["name"], spec, data["layout"], data["owners"], data["map"])
        return info, data["init"]

    def table_ready(self, info: TableInfo) -> None:
        self.control(MsgType.TABLE_READY, {"table": info.table_id}, f"table {info.name!r} ready")

    def submit(self, op: str, info: TableInfo, parts: list[Part], on_reply: Optional[OnReply], result: Any,
               finish: Optional[Callable[[Any], Any]] = None) -> Future:
        """Start a table call from the caller's thread. A small add joins its table's open
        batch; anything else closes that batch first, so one table's calls take effect in
        the order issued. A call on the caller's thread (multiverso_py.direct) runs to its
        end before any other thread's call starts: a server skips an add whose sequence
        number is not newer than the last it applied, so adds on the two connections must
        never cross."""
        with self._starting:
            if self._may_call_directly():
                call = self._new_op(op, info, on_reply, result, finish)
                if not self._call_direct(call, parts):
                    self._batches.close(info.table_id)
                    self.io.call_soon(self._send_op, call, parts)
                return call.future
            nbytes = sum(part_bytes(p) for p in parts) if op == "add" else BATCH_BYTES
            if nbytes < BATCH_BYTES:
                return self._batches.join(info.table_id, parts, nbytes, lambda: self._open_batch(info)).call.future
            self._batches.close(info.table_id)
            call = self._new_op(op, info, on_reply, result, finish)
            self.io.call_soon(self._send_op, call, parts)
            return call.future

    def _open_batch(self, info: TableInfo) -> Batch:
        batch = Batch(self._new_op("add", info, None, None, None))
        self.io.call_soon(self._send_batch, info.table_id, batch)
        return batch

    def _new_op(self, op: str, info: TableInfo, on_reply: Optional[OnReply], result: Any,
                finish: Optional[Callable[[Any], Any]]) -> _Op:
        call = _Op(op, info, Future(), on_reply, result, finish)
        self._started(call.future)
        if op != "get":
            self._acks.track(call.future)
        return call

    def wait(self, future: Future) -> Any:
        return self._acks.wait(future)

    # ------------------------------------------------------------ on the loop
    async def _start(self, scheduler: tuple[str, int], rank: Optional[int], local: Optional[Any]) -> None:
        self._scheduler = await open_connection(*scheduler, self._connection, self.timeout, self.config.tls)
        body = {"role": "worker"} if rank is None else {"role": "worker", "rank": rank}
        data = await self._ask_scheduler(MsgType.REGISTER, body, "registering with the scheduler")
        self.worker_id, self.workers_num = data["id"], data["workers"]
        self._recovery = bool(data.get("recovery"))
        self.servers = {sid: f"{host}:{port}" for sid, host, port in data["servers"]}
        for sid, host, port in data["servers"]:
            if local is not None and local.address == f"{host}:{port}":
                self._conns[sid] = local.connect_local(self._on_frame, self._on_close)
            else:
                self._conns[sid] = await open_connection(host, port, self._connection, self.timeout, self.config.tls)
                await self._probe_shared_memory(sid)
            self._conns[sid].context = sid
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        self._heartbeat = loop.create_task(heartbeat(self._scheduler, data["heartbeat"]))
        log.info("worker %d of %d joined; %d server(s)", self.worker_id, self.workers_num, len(self.servers))

    async def _leave(self) -> None:
        self._leaving = True
        try:
            if self._scheduler is not None and not self._scheduler.closed:
                await self._ask_scheduler(MsgType.LEAVE, {}, "leaving the job")
        finally:
            for task in (self._sweeper, self._heartbeat):
                if task is not None:
                    task.cancel()
            for conn in [*self._conns.values(), self._scheduler]:
                if conn is not None:
                    conn.close()
            self.shared_memory.close()

    async def _probe_shared_memory(self, sid: int) -> None:
        conn = self._conns[sid]
        if await self.shared_memory.probe(sid, lambda body: self._control.ask(
                conn, f"server {sid}", MsgType.SHM_PROBE, body, "probing shared memory")):
            log.debug("server %s maps this worker's shared memory", sid)

    def _connection(self) -> Connection:
        return Connection(self._on_frame, self._on_close, self.config.limits, self._allocate, auth=self.config.auth)

    async def _ask_scheduler(self, msg_type: MsgType, body: dict, what: str) -> Any:
        return await self._control.ask(self._scheduler, "the scheduler", msg_type, body, what)

    def _send_op(self, call: _Op, parts: list[Part], resent: bool = False) -> None:
        """Send a call's parts, or (resent) those of one of its messages again, in bounded
        messages to the servers that own them."""
        if call.future.done():
            return
        messages = self._messages(call, parts)
        call.left += len(messages) - resent
        if not messages:
            self._complete(call)
        for sid, group in messages:
            self._send_message(call, sid, group)

    @staticmethod
    def _messages(call: _Op, parts: list[Part]) -> list[tuple[int, list[Part]]]:
        """A call's parts as bounded messages: (server, parts) each."""
        if len(parts) == 1 and part_bytes(parts[0]) <= MESSAGE_TARGET_BYTES:  # most calls: nothing to split
            return [(call.info.owners[parts[0].pid], parts)]
        by_server: dict[int, list[Part]] = {}
        for part in split_large(parts):
            by_server.setdefault(call.info.owners[part.pid], []).append(part)
        return [(sid, group) for sid, server_parts in by_server.items() for group in chunk_messages(server_parts)]

    def _send_batch(self, table_id: int, batch: Batch) -> None:
        """Close a batch (later adds start a new one) and send it, merged where the updater
        allows, one message per server."""
        self._batches.close(table_id, batch)
        spec = batch.call.info.spec
        self.batched_adds += batch.count
        self._send_op(batch.call, merge_adds(batch.parts) if is_additive(spec.updater) else batch.parts)

    def _send_message(self, call: _Op, sid: int, parts: list[Part], seq: Optional[int] = None) -> None:
        # A resend (seq given) was in flight already: never held by a pause, but held while
        # its server is down (one that a broken direct link hands over, say).
        if (seq is None or sid in self._gate.down) and self._gate.hold((call, sid, parts, seq)):
            return
        conn = self._conns.get(sid)
        if conn is None or conn.closed:
            self._fail(call, ConnectionLost(f"{call.name} on table {call.info.name!r}: server {sid} "
                                            f"({self.servers.get(sid, '?')}) is not connected"))
            return
        req_id = next(self._req_ids)
        body, buffers, self._pending[req_id] = self._message(call, sid, parts, next(self._seq) if seq is None else seq)
        conn.send(TABLE_OPS[call.name], req_id, body, buffers)

    def _message(self, call: _Op, sid: int, parts: list[Part], seq: int) -> tuple[dict, list[memoryview], _Pending]:
        """One message's body and buffers, and what its reply is waited for with (the
        segment lent with it, where its arrays go when every part says)."""
        info = call.info
        dest = [d for p in parts for d in p.dest] if all(p.dest is not None for p in parts) else None
        body_parts, buffers = pack_parts([(p.pid, p.args, p.arrays) for p in parts])
        body = {"table": info.table_id, "client": self.worker_id, "seq": seq,
                "map": info.map_version, "parts": body_parts}
        info.stats.requests += 1
        info.stats.bytes_sent += sum(b.nbytes for b in buffers)
        segment = self.shared_memory.lend(sid, call.name, parts, buffers)
        if segment is not None:
            body["shm"] = segment.wire()  # a get's reply goes there; an add's arrays are there already
            buffers = buffers if call.name == "get" else []
        return body, buffers, _Pending(call, sid, parts, time.monotonic() + self.timeout, seq, dest, segment)

    def _complete(self, call: _Op) -> None:
        if call.future.done():
            return
        try:
            value = call.finish(call.result) if call.finish is not None else call.result
        except Exception as exc:
            call.future.set_exception(exc)
            return
        call.future.set_result(value)

    def _allocate(self, msg_type: MsgType, req_id: int, body: dict, lengths: list[int]) -> Optional[list[memoryview]]:
        """Receive a get's reply straight into its result array."""
        pending = self._pending.get(req_id)
        return pending.dest if pending is not None and msg_type is MsgType.REPLY else None

    def _on_frame(self, conn: Connection, frame: Frame) -> None:
        if frame.type in _FROM_SCHEDULER and conn is self._scheduler:
            if frame.type in (MsgType.WORKER_LEFT, MsgType.WORKER_JOINED):  # workers_num() counts live ones
                self.workers_num += 1 if frame.type is MsgType.WORKER_JOINED else -1
            elif frame.type is MsgType.SERVER_MOVED:
                asyncio.get_running_loop().create_task(self._reconnect(frame.body))
            elif frame.type is MsgType.SERVER_LOST and frame.body["server"] in self._conns:
                self._conns[frame.body["server"]].abort()  # its requests fail now, or wait for a replacement
            else:
                (self._pause if frame.type is MsgType.PAUSE else self._resume)(frame.req_id)
            return
        if self._control.answer(frame):
            return
        pending = self._pending.pop(frame.req_id, None)
        if pending is None:
            if frame.type is MsgType.ERROR:
                log.warning("error from %s: %s", conn.peer, frame.body["message"])
            return  # a reply that arrived after its request timed out
        try:
            self._answered(pending, frame)
        finally:
            if pending.segment is not None:
                self.shared_memory.give_back(pending.segment)

    def _answered(self, pending: _Pending, frame: Frame) -> None:
        call = pending.op
        if frame.type is MsgType.ERROR:
            self._fail(call, exception_for(frame.body["code"], f"{self._where(pending)}: {frame.body['message']}"))
        elif frame.type is MsgType.MOVED:
            self.io.submit(self._resend_moved(pending))  # from the loop or a direct call
        else:
            try:
                self._merge(pending, frame)
            except Exception as exc:
                self._fail(call, MultiversoError(f"{self._where(pending)}: bad reply: {exc}"))
                return
            call.left -= 1
            if call.left == 0:
                self._complete(call)

    def _where(self, pending: _Pending) -> str:
        call = pending.op
        return f"{call.name} on table {call.info.name!r} at server {pending.server} ({self.servers[pending.server]})"

    def _merge(self, pending: _Pending, frame: Frame) -> None:
        in_segment = pending.segment is not None and not frame.buffers and frame.body.get("shm")
        buffers: Buffers = functools.partial(views, pending.segment.buf) if in_segment else frame.buffers
        replies = unpack_parts(frame.body, buffers, self.config.limits)
        if len(replies) != len(pending.parts):
            raise MultiversoError(f"{len(replies)} parts in the reply, {len(pending.parts)} requested")
        call = pending.op
        call.info.stats.bytes_received += sum(a.nbytes for _, _, arrays in replies for a in arrays)
        in_place = not in_segment and pending.dest is not None and all(
            a is b for a, b in zip(frame.buffers, pending.dest))
        for part, (pid, args, arrays) in zip(pending.parts, replies):
            if part.dest is not None:
                if not in_place:  # the reader could not use the destination: copy once
                    for dest, array in zip(part.dest, arrays):
                        np.frombuffer(dest, np.uint8)[:] = array.reshape(-1).view(np.uint8)
            elif call.on_reply is not None:
                call.on_reply(part, arrays, args, call.result)

    async def _resend_moved(self, pending: _Pending) -> None:
        """A server no longer holds a partition: refresh the map and resend the parts."""
        call = pending.op
        call.moved_retries += 1
        if call.moved_retries > MAX_MOVED_RETRIES:
            self._fail(call, MultiversoError(f"{call.name} on table {call.info.name!r}: partitions keep moving"))
            return
        try:
            data = await self._ask_scheduler(MsgType.SHARD_MAP, {"table": call.info.table_id},
                                             f"refreshing the map of table {call.info.name!r}")
        except MultiversoError as exc:
            self._fail(call, exc)
            return
        call.info.owners, call.info.map_version = data["owners"], data["map"]
        self._send_op(call, pending.parts, resent=True)

    def _fail(self, call: _Op, exc: BaseException) -> None:
        if not call.future.done():
            call.future.set_exception(exc)
