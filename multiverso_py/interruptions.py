"""What a worker does when its job is interrupted: paused while the scheduler takes a
checkpoint, a server lost (and later replaced, when the job replaces dead servers), or a
request past its deadline. A part of the Client, kept apart to keep the request path
readable."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

from multiverso_py.consistency import wait_hint
from multiverso_py.errors import ConnectionLost, ErrorCode, MultiversoError, RequestTimeout
from multiverso_py.protocol import MsgType
from multiverso_py.transport import Connection, open_connection

log = logging.getLogger("multiverso_py.client")


class Interruptions:
    """Mixed into Client: uses its scheduler connection, pending messages and send gate."""

    _scheduler: Any
    _pending: dict
    _gate: Any
    _direct_add: bool  # an add in flight on the caller's thread (multiverso_py.direct)

    def checkpoint(self, path: str) -> str:
        """Flush this worker's adds, then have the scheduler take a checkpoint (it pauses
        every worker until its adds are acknowledged). Returns its directory."""
        self.flush()
        return self.control(MsgType.CHECKPOINT, {"path": path}, f"checkpoint to {path!r}")["path"]

    def _pause(self, req_id: int) -> None:
        """From the scheduler: hold back new messages; answer once no add is unacknowledged."""
        self._gate.paused = True

        async def answer_when_quiet() -> None:
            deadline = time.monotonic() + self.timeout
            while self._direct_add or any(p.op.name != "get" for p in self._pending.values()):
                if time.monotonic() > deadline:
                    return self._scheduler.send_error(req_id, ErrorCode.TIMEOUT, f"worker {self.worker_id}: adds "
                                                      f"still unacknowledged after {self.timeout}s")
                await asyncio.sleep(0.002)
            self._scheduler.send(MsgType.REPLY, req_id)
        asyncio.get_running_loop().create_task(answer_when_quiet())

    def _resume(self, req_id: int) -> None:
        self._gate.paused = False
        for message in self._gate.release():
            self._send_message(*message)
        self._scheduler.send(MsgType.REPLY, req_id)

    async def _reconnect(self, moved: dict) -> None:
        """A replacement of a lost server registered: connect, resend what it never
        answered (same sequence numbers: what it applied already is skipped), send the rest."""
        sid, address = moved["server"], f"{moved['host']}:{moved['port']}"
        try:
            conn = await open_connection(moved["host"], moved["port"], self._connection, self.timeout, self.config.tls)
        except MultiversoError as exc:
            log.error("cannot reach the replacement of server %s at %s: %s", sid, address, exc)
            return
        conn.context, self._conns[sid], self.servers[sid] = sid, conn, address
        await self._probe_shared_memory(sid)
        self._gate.down.discard(sid)
        for req_id, pending in [(r, p) for r, p in self._pending.items() if p.server == sid]:
            self._abandon(req_id)
            self._send_message(pending.op, sid, pending.parts, pending.seq)
        for message in self._gate.release():
            self._send_message(*message)
        log.info("server %s is back at %s", sid, address)

    def _on_close(self, conn: Connection, exc: Optional[BaseException]) -> None:
        self._control.connection_closed(conn)
        if conn is self._scheduler:
            if not self._leaving:
                log.error("lost the connection to the scheduler")
            return
        sid = conn.context
        self._interrupt_link(sid)
        if self._recovery and not self._leaving:
            self._gate.down.add(sid)  # its requests wait (within their deadlines) for a replacement
            log.warning("lost server %s; waiting for its replacement", sid)
            return
        for req_id, pending in list(self._pending.items()):
            if pending.server == sid:
                self._abandon(req_id)
                call = pending.op
                self._fail(call, ConnectionLost(
                    f"{call.name} on table {call.info.name!r}: connection to server {sid} "
                    f"({self.servers.get(sid, '?')}) lost"))
        if not self._leaving:
            log.error("lost the connection to server %s", sid)

    async def _sweep(self) -> None:
        """Fail requests past their deadline (pending is in deadline order)."""
        interval = min(0.1, self.timeout / 10)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for req_id, pending in list(self._pending.items()):
                if pending.deadline > now:
                    break
                self._abandon(req_id)
                self._fail(pending.op, self._timeout_error(pending))

    def _timeout_error(self, pending: Any) -> RequestTimeout:
        call = pending.op
        return RequestTimeout(f"{call.name} on table {call.info.name!r}: no reply from server {pending.server} "
                              f"({self.servers[pending.server]}) within {self.timeout}s"
                              f"{wait_hint(call.name, call.info.spec.consistency)}")

    def _abandon(self, req_id: int) -> Any:
        """Stop waiting for a message's reply. Its segment is never reused: the server may
        still write into it."""
        pending = self._pending.pop(req_id)
        if pending.segment is not None:
            self.shared_memory.drop(pending.segment)
        return pending
