"""Back-pressure for a server: how many requests of each connection it serves at once."""

from __future__ import annotations

from typing import Any


class FlowControl:
    """Bounds the requests of each connection that are being served (queued for their
    turn, running, or held by a clock), so a peer that floods a server fills its own
    socket buffers instead of the server's memory: reading pauses at the limit and
    resumes at half of it. On the event loop only."""

    def __init__(self, limit: int):
        self.limit = limit
        self._serving: dict[Any, int] = {}
        self._paused: set[Any] = set()
        self.peak = 0  # the most requests of one connection served at once, for tests and operators

    def started(self, conn: Any) -> None:
        n = self._serving[conn] = self._serving.get(conn, 0) + 1
        self.peak = max(self.peak, n)
        if n >= self.limit and conn not in self._paused:
            self._paused.add(conn)
            conn.pause_reading()

    def finished(self, conn: Any) -> None:
        n = self._serving.get(conn, 0) - 1
        if n < 0:
            return  # the connection was closed and forgotten meanwhile
        self._serving[conn] = n
        if n <= self.limit // 2 and conn in self._paused:
            self._paused.discard(conn)
            conn.resume_reading()

    def forget(self, conn: Any) -> None:
        self._serving.pop(conn, None)
        self._paused.discard(conn)
