"""In-process connections: the embedded job's worker and server share one event loop and
talk through a pair of these, with no socket and no frame encoding.

A message's header is copied through msgpack, so the peer gets the same types it would
get off the wire and owns its copy; its arrays are not copied at all: the receiver reads
the sender's memory (a worker's get reply is copied once, from the partition straight
into the result). Delivery is synchronous, on the loop, so a reply is in the peer's
hands when send() returns and after_flush() can call back at once.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import msgpack

from multiverso_py.errors import ErrorCode
from multiverso_py.protocol import Frame, MsgType

FrameHandler = Callable[[Any, Frame], None]
CloseHandler = Callable[[Any, Optional[BaseException]], None]


class LocalConnection:
    """One end of an in-process pair; the same interface as transport.Connection."""

    def __init__(self, on_frame: FrameHandler, on_close: Optional[CloseHandler], peer: str):
        self.on_frame, self.on_close = on_frame, on_close
        self.peer = peer
        self.closed = False
        self.context: Any = None
        self.other: "LocalConnection" = self

    def send(self, msg_type: MsgType, req_id: int, body: Optional[dict] = None, buffers=()) -> None:
        if self.closed:
            return
        header = msgpack.unpackb(msgpack.packb(body or {}))
        views = [b if isinstance(b, memoryview) else memoryview(b) for b in buffers]
        self.other.on_frame(self.other, Frame(msg_type, req_id, header, views))

    def send_error(self, req_id: int, code: ErrorCode, message: str) -> None:
        self.send(MsgType.ERROR, req_id, {"code": int(code), "message": message})

    def after_flush(self, callback: Callable[[], None]) -> None:
        callback()  # the peer has already taken everything sent

    def unflushed(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass  # the in-process worker waits for its own replies; nothing piles up unread

    resume_reading = pause_reading

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.other.close()
        if self.on_close is not None:
            self.on_close(self, None)

    abort = close


def local_pair(a: tuple[FrameHandler, Optional[CloseHandler]], b: tuple[FrameHandler, Optional[CloseHandler]],
               name: str = "in-process") -> tuple[LocalConnection, LocalConnection]:
    """Two connected ends: what one sends, the other's on_frame receives."""
    end_a, end_b = LocalConnection(*a, name), LocalConnection(*b, name)
    end_a.other, end_b.other = end_b, end_a
    return end_a, end_b
