"""Control requests of a worker, awaited on its event loop: to the scheduler (register,
barrier, tables, leave) or to a server (a clock). Each has a timeout, and fails at once
when its connection closes. And the heartbeat that keeps the worker counted as alive."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Optional

from multiverso_py.errors import ConnectionLost, RequestTimeout, exception_for
from multiverso_py.protocol import Frame, MsgType


@dataclass
class _Waiting:
    future: asyncio.Future
    what: str
    conn: Any
    who: str


class ControlRequests:
    def __init__(self, next_id: Callable[[], int], timeout: float):
        self._next_id, self.timeout = next_id, timeout
        self._waiting: dict[int, _Waiting] = {}

    async def ask(self, conn: Optional[Any], who: str, msg_type: MsgType, body: dict, what: str) -> Any:
        """Send a request on conn; the reply's data. `what` and `who` name it in errors."""
        if conn is None or conn.closed:
            raise ConnectionLost(f"{what}: the connection to {who} is closed")
        req_id = self._next_id()
        waiting = self._waiting[req_id] = _Waiting(asyncio.get_running_loop().create_future(), what, conn, who)
        conn.send(msg_type, req_id, body)
        try:
            reply = await asyncio.wait_for(waiting.future, self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"{what}: no answer from {who} within {self.timeout}s") from None
        finally:
            self._waiting.pop(req_id, None)
        return reply.get("data") if reply else None

    def answer(self, frame: Frame) -> bool:
        """Complete the request this frame answers; False if it answers none of them."""
        waiting = self._waiting.get(frame.req_id)
        if waiting is None:
            return False
        if frame.type is MsgType.ERROR:
            waiting.future.set_exception(exception_for(frame.body["code"], f"{waiting.what}: {frame.body['message']}"))
        elif not waiting.future.done():
            waiting.future.set_result(frame.body)
        return True

    def connection_closed(self, conn: Any) -> None:
        for waiting in self._waiting.values():
            if waiting.conn is conn and not waiting.future.done():
                waiting.future.set_exception(ConnectionLost(f"{waiting.what}: {waiting.who} closed the connection"))


async def heartbeat(conn: Any, interval: float) -> None:
    """Tell the scheduler this worker lives, from the I/O thread, whatever training does."""
    while not conn.closed:
        conn.send(MsgType.HEARTBEAT, 0)  # request id 0: the reply is dropped
        await asyncio.sleep(interval)


class SendGate:
    """Messages that may not go out yet: all of them while the scheduler takes a
    checkpoint (paused), and those for a server that is down until its replacement
    registers. Released in the order they were held."""

    def __init__(self) -> None:
        self.paused = False
        self.down: set[int] = set()
        self._held: list[tuple] = []  # (call, server, parts)

    def hold(self, message: tuple) -> bool:
        if self.paused or message[1] in self.down:
            self._held.append(message)
            return True
        return False

    def release(self) -> list[tuple]:
        """The held messages that may go now, in order."""
        ready = [m for m in self._held if not self.paused and m[1] not in self.down]
        self._held = [m for m in self._held if self.paused or m[1] in self.down]
        return ready
