"""Frames over asyncio streams: one BufferedProtocol per connection, uvloop when present.

Sending hands the header and the arrays' memoryviews to transport.writelines, so arrays
are never joined into one bytes object; receiving goes through a FrameReader, which reads
large buffers straight into their destination.

Every connection starts with a handshake (see multiverso_py.auth): the accepting side
sends HELLO, with a nonce when the job has a token; the connecting side answers it before
sending anything else. Frames reach their owner only after it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Awaitable, Callable, Optional

from multiverso_py.auth import Auth
from multiverso_py.errors import AuthFailed, ConnectFailed, ErrorCode, ProtocolError
from multiverso_py.framing import Allocator, FrameReader, encode
from multiverso_py.protocol import DEFAULT_LIMITS, HANDSHAKE_LIMITS, Frame, Limits, MsgType

log = logging.getLogger(__name__)

FrameHandler = Callable[["Connection", Frame], None]
CloseHandler = Callable[["Connection", Optional[BaseException]], None]


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop where uvloop is installed, else asyncio's default."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a core dependency off Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class Connection(asyncio.BufferedProtocol):
    """One peer connection. Frames go to on_frame on the loop; a malformed stream gets an
    ERROR frame (when it can still be sent) and is closed, since its framing is lost."""

    def __init__(
        self,
        on_frame: FrameHandler,
        on_close: Optional[CloseHandler] = None,
        limits: Limits = DEFAULT_LIMITS,
        allocator: Optional[Allocator] = None,
        *,
        accept: bool = False,  # the listening side, which opens the handshake
        auth: Optional[Auth] = None,
        handshake_timeout: float = 10.0,
        greeting: Optional[dict] = None,  # the listening side: what else its HELLO tells the peer
    ):
        self.on_frame = on_frame
        self.on_close = on_close
        self.limits = limits
        self.reader = FrameReader(HANDSHAKE_LIMITS, allocator)  # until the handshake is done
        self.open = False  # handshake done: frames go to on_frame
        self.ready: Optional[asyncio.Future] = None  # the connecting side's handshake outcome
        self._accept, self._auth, self._handshake_timeout = accept, auth, handshake_timeout
        self.greeting = greeting or {}  # the connecting side: the peer's HELLO, once received
        self._nonce: Optional[bytes] = None  # the acceptor's challenge; b"" once a connector answered
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.closed = False
        self._lost = False  # connection_lost ran: the transport holds no buffers any more
        self._flush_waiters: list[Callable[[], None]] = []
        self._backlog: deque[Frame] = deque()  # frames read but not yet handed on (while paused)
        self._paused = False
        self.context: Any = None  # what the owner knows of this peer (node id, role)

    # -- asyncio.BufferedProtocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        # Pause at any unsent byte, resume at none: resume_writing then says "flushed".
        transport.set_write_buffer_limits(high=0, low=0)  # type: ignore[attr-defined]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "a local socket"  # a Unix socket's is ""
        loop = asyncio.get_running_loop()
        if not self._accept:
            self.ready = loop.create_future()
            return
        self._nonce = Auth.nonce() if self._auth else None
        self.send(MsgType.HELLO, 0, {**self.greeting, "nonce": self._nonce} if self._nonce else self.greeting)
        if self._nonce is None:
            self._open()
        else:
            loop.call_later(self._handshake_timeout, self._handshake_expired)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.reader.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self.reader.buffer_updated(nbytes)
        except ProtocolError as exc:
            log.warning("closing connection from %s: %s", self.peer, exc)
            self.send_error(0, ErrorCode.BAD_REQUEST, f"malformed frame: {exc}")
            self.close()
            return
        self._backlog.extend(frames)
        self._dispatch()

    def _dispatch(self) -> None:
        while self._backlog and not self._paused:
            frame = self._backlog.popleft()
            if self.open:
                self.on_frame(self, frame)
            elif not self.closed:
                self._handshake(frame)

    # -- the handshake
    def _handshake(self, frame: Frame) -> None:
        if self._accept:
            if frame.type is MsgType.AUTH and self._auth.check(self._nonce, frame.body["mac"]):
                self.send(MsgType.REPLY, 0)
                self._open()
                return
            why = "a wrong token" if frame.type is MsgType.AUTH else f"{frame.type.name} before authenticating"
            log.warning("refused connection from %s: %s", self.peer, why)
            self.send_error(0, ErrorCode.AUTH_FAILED, "authentication failed: this job needs its shared token "
                                                       "(MV_AUTH_TOKEN or MV_AUTH_TOKEN_FILE)")
            self.close()
        elif frame.type is MsgType.HELLO and "nonce" not in frame.body:
            self.greeting = frame.body
            self._open()
        elif frame.type is MsgType.HELLO and self._auth is None:
            self._refused("it requires the job's shared token: set MV_AUTH_TOKEN or MV_AUTH_TOKEN_FILE")
        elif frame.type is MsgType.HELLO:
            self.greeting = frame.body
            self.send(MsgType.AUTH, 0, {"mac": self._auth.mac(frame.body["nonce"])})
            self._nonce = b""
        elif frame.type is MsgType.REPLY and self._nonce == b"":
            self._open()
        elif frame.type is MsgType.ERROR:
            self._refused(frame.body["message"])
        else:
            self._refused(f"it sent {frame.type.name} before the handshake")

    def _open(self) -> None:
        self.open = True
        self.reader.limits = self.limits
        if self.ready is not None and not self.ready.done():
            self.ready.set_result(None)

    def _refused(self, why: str) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(AuthFailed(f"{self.peer} refused the connection: {why}"))
        self.close()

    def _handshake_expired(self) -> None:
        if not self.open and not self.closed:
            log.warning("dropping %s: no authentication within %ss", self.peer, self._handshake_timeout)
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        if self.reader.mid_frame:
            log.warning("connection from %s closed in the middle of a frame", self.peer)
        self.closed = self._lost = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectFailed(f"{self.peer} closed the connection during the handshake"))
        self._run_flush_waiters()
        if self.on_close is not None:
            self.on_close(self, exc)

    def pause_writing(self) -> None:
        pass  # after_flush() asks the transport directly

    def resume_writing(self) -> None:
        self._run_flush_waiters()

    def _run_flush_waiters(self) -> None:
        waiters, self._flush_waiters = self._flush_waiters, []
        for waiter in waiters:
            waiter()

    # -- sending
    def send(self, msg_type: MsgType, req_id: int, body: Optional[dict] = None, buffers=()) -> None:
        """Queue one frame; a closed connection drops it (its requests fail by on_close)."""
        if self.closed or self.transport is None:
            return
        self.transport.writelines(encode(msg_type, req_id, body, buffers, self.limits))

    def send_error(self, req_id: int, code: ErrorCode, message: str) -> None:
        self.send(MsgType.ERROR, req_id, {"code": int(code), "message": message})

    def pause_reading(self) -> None:
        """Hand on no more frames, and read no more, until resume_reading(): back-pressure
        on a peer that sends requests faster than they are served (its sends block once the
        kernel's buffers fill). Frames already read wait here."""
        self._paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
        self._dispatch()

    def unflushed(self) -> int:
        """Bytes sent but not yet handed to the kernel."""
        return 0 if self._lost or self.transport is None else self.transport.get_write_buffer_size()

    def after_flush(self, callback: Callable[[], None]) -> None:
        """Call back once everything sent so far has been handed to the kernel, or the
        connection is gone: until then the transport may still read the sent buffers."""
        if self.unflushed() == 0:
            callback()
        else:
            self._flush_waiters.append(callback)

    def abort(self) -> None:
        """Drop the connection and whatever it has not sent yet, at once: a reset, not a
        FIN that waits until the kernel has pushed its buffers to a reader that won't read."""
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


async def open_connection(host: str, port: int, factory: Callable[[], Connection], timeout: float,
                          tls: Optional[ssl.SSLContext] = None) -> Connection:
    """Connect (over TLS when given a context, verifying the peer's certificate for host)
    and complete the handshake."""
    loop = asyncio.get_running_loop()
    try:
        _, conn = await asyncio.wait_for(
            loop.create_connection(factory, host, port, ssl=tls, server_hostname=host if tls else None), timeout)
    except ssl.SSLError as exc:
        raise ConnectFailed(f"TLS with {host}:{port} failed ({exc.reason or exc}); check MV_TLS_CA and that the "
                            "peer runs with --tls-cert/--tls-key") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise ConnectFailed(
            f"cannot connect to {host}:{port} ({exc or 'timed out'}); check the address and that the process is running"
        ) from None
    try:
        await asyncio.wait_for(asyncio.shield(conn.ready), timeout)
    except asyncio.TimeoutError:
        conn.ready.cancel()
        conn.abort()
        raise ConnectFailed(f"{host}:{port} accepted the connection but sent no handshake within {timeout}s; "
                            "is it a multiverso-py scheduler or server?") from None
    return conn


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' -> (host, port), with a clear error for anything else."""
    host, sep, port = str(address).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConnectFailed(f"address {address!r} is not HOST:PORT (for example 127.0.0.1:9000)")
    return host, int(port)


class LoopThread:
    """An event loop running in a daemon thread, for synchronous callers (the worker API
    and the embedded job). Coroutines are submitted from any thread."""

    def __init__(self, name: str = "multiverso-io"):
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        self.loop.close()

    def submit(self, coro: Awaitable) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def run(self, coro: Awaitable, timeout: Optional[float] = None) -> Any:
        return self.submit(coro).result(timeout)

    def call_soon(self, fn: Callable, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
