"""Synchronous requests sent and answered on the caller's own thread.

A table call normally crosses two thread hand-offs on the worker: the caller queues it
for the I/O thread, which sends it, and the I/O thread wakes the caller with the reply.
Each costs 30-90 µs on a small machine, a third of a small get. When a synchronous call
is all this worker has outstanding and fits one message to one server, the caller's
thread instead writes the message to a socket of its own to that server and reads
the reply from it (the way redis-py talks to a server). Ordering holds because
nothing else of this worker is in flight; everything else (async calls, batches, TLS,
the embedded job's in-process server, pauses and lost servers) takes the I/O thread.

A DirectLink is one such socket: it speaks the same frames, handshake included, and the
server sees just another connection of this worker. On the server's host it is a Unix
socket: the server also listens on an abstract one and names it in its HELLO, and a
small get is a tenth faster without the TCP stack. DirectCalls is the Client's part
that decides when a call may take it.

While it waits for a reply that usually comes within a couple of milliseconds, the
caller polls its socket instead of sleeping (ReplyClock; see multiverso_py.polling). A
thread woken from sleep runs its next hundred microseconds of Python slowly: on 2
cores a small get took 190-220 µs asleep and 135 µs polling, a 4096-row get 550 µs and
410 µs. Each poll yields the CPU, so another thread that wants this core (the server's,
on a machine with no core to spare) runs first. Replies that take longer than the limit
are waited for asleep.
"""

from __future__ import annotations

import logging
import math
import select
import socket
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Optional, Sequence

from multiverso_py.auth import Auth
from multiverso_py.errors import AuthFailed, ConnectFailed, MultiversoError, ProtocolError
from multiverso_py.framing import FrameReader, encode
from multiverso_py.polling import POLL_LIMIT, poll_until, running_average, yield_cpu
from multiverso_py.protocol import DEFAULT_LIMITS, HANDSHAKE_LIMITS, TABLE_OPS, Frame, Limits, MsgType
from multiverso_py.transport import Connection, parse_address

log = logging.getLogger("multiverso_py.client")

CONNECT_TIMEOUT = 5.0  # a server on the job's network answers at once, or not at all


class LinkBroken(ConnectionError):
    """The link failed; `sent` tells whether the whole request had left (it may then
    have been applied, so a resend must reuse its sequence number)."""

    def __init__(self, message: str, sent: bool):
        super().__init__(message)
        self.sent = sent


def read_frames(sock: socket.socket, reader: FrameReader, clock: Optional["ReplyClock"] = None,
                deadline: float = math.inf) -> list[Frame]:
    """The frames that the next reads complete, received through the reader: large
    buffers land in their destination. A blocking socket's own timeout bounds each read.
    A non-blocking one (a DirectLink's) is polled until the clock's poll_until, if given,
    then waited on asleep until `deadline` (a time.monotonic() value): socket.timeout then."""
    while True:
        n = _receive(sock, reader.get_buffer(), clock, deadline)
        if not n:
            raise ConnectionError("the peer closed the connection")
        frames = reader.buffer_updated(n)
        if frames:
            return frames


def _receive(sock: socket.socket, buffer: memoryview, clock: Optional["ReplyClock"], deadline: float) -> int:
    """sock.recv_into(buffer); on a non-blocking socket, polling and yielding the CPU
    between polls while the clock allows, then sleeping until data comes or the deadline."""
    while True:
        try:
            return sock.recv_into(buffer)
        except BlockingIOError:
            pass
        if clock is not None and time.perf_counter() < clock.poll_until:
            yield_cpu()
        else:
            wait_ready(sock, select.POLLIN, deadline)


def wait_ready(sock: socket.socket, events: int, deadline: float) -> None:
    """Sleep until a non-blocking socket is ready for `events` (select.POLLIN, POLLOUT),
    or fails; socket.timeout at the deadline (a time.monotonic() value)."""
    poller = select.poll()
    poller.register(sock, events)
    left = deadline - time.monotonic()
    if left <= 0 or not poller.poll(None if left == math.inf else left * 1e3):
        raise socket.timeout("timed out")


def read_frame(sock: socket.socket, reader: FrameReader) -> Frame:
    """The next frame, where the peer sends one and waits for an answer (the handshake)."""
    return read_frames(sock, reader)[0]


def handshake(sock: socket.socket, reader: FrameReader, auth: Optional[Auth]) -> None:
    """The connecting side of the handshake (see multiverso_py.transport) on a blocking
    socket: answer HELLO, with the job's token when the peer asks for one."""
    hello = read_frame(sock, reader)
    if hello.type is MsgType.ERROR:
        raise AuthFailed(f"the peer refused the connection: {hello.body['message']}")
    if hello.type is not MsgType.HELLO:
        raise ConnectFailed(f"expected HELLO, got {hello.type.name}; is it a multiverso-py scheduler or server?")
    if "nonce" not in hello.body:
        return
    if auth is None:
        raise AuthFailed("the peer requires the job's shared token: set MV_AUTH_TOKEN or MV_AUTH_TOKEN_FILE")
    sock.sendall(b"".join(encode(MsgType.AUTH, 0, {"mac": auth.mac(hello.body["nonce"])})))
    answer = read_frame(sock, reader)
    if answer.type is not MsgType.REPLY:
        raise AuthFailed(f"authentication refused: {answer.body.get('message', answer.type.name)}")


def connect(address: str, timeout: float, auth: Optional[Auth] = None,
            local: Optional[str] = None) -> tuple[socket.socket, FrameReader]:
    """A blocking socket to a scheduler or server, past the handshake, and its reader.
    Given `local`, the name of a server's abstract Unix socket (from its HELLO), through
    that socket if the server answers there: it does when it runs on this host, and a
    Unix socket skips the TCP stack (a small get is 10% faster). TCP otherwise."""
    if local is not None:
        try:
            return _past_handshake(connect_local(local, timeout), auth)
        except (OSError, MultiversoError) as exc:
            log.debug("server %s is not reachable on a local socket (%s); connecting over TCP", address, exc)
    try:
        sock = socket.create_connection(parse_address(address), timeout=timeout)
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to {address} ({exc}); check the address and that the process "
                            "is running") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return _past_handshake(sock, auth)


def connect_local(name: str, timeout: float) -> socket.socket:
    """A socket connected to the abstract Unix socket `name` (a server's local socket),
    its timeout set; the handshake is the caller's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect("\0" + name)  # abstract: Linux only, and only within this host's network namespace
    except BaseException:
        sock.close()
        raise
    return sock


def _past_handshake(sock: socket.socket, auth: Optional[Auth]) -> tuple[socket.socket, FrameReader]:
    try:
        reader = FrameReader(HANDSHAKE_LIMITS)
        handshake(sock, reader, auth)
    except BaseException:
        sock.close()
        raise
    return sock, reader


class ReplyClock:
    """How long a caller polls for a reply before it sleeps: twice the recent waits on its
    link (a running average), when that is within `limit` seconds; not at all for a link
    whose replies take longer, nor with limit 0.

    A poll that lost the CPU (its yield let another thread here run) polls on. Stopping
    there, as this once did, made things worse on 2 cores: the caller's sleeps left its
    core idle, the kernel woke the server's table thread there, and from then on every
    job preempted the polling caller, who stopped and slept again. A small get took
    125-132 µs in 5 of 8 runs that way, and in 1 of 8 polling on (101-104 µs otherwise)."""

    def __init__(self, limit: float):
        self.limit = limit
        self.expected: Optional[float] = None  # seconds from sending to the whole reply, lately
        self.poll_until = 0.0  # a time.perf_counter() value
        self._sent_at = 0.0

    def sent(self) -> None:
        self._sent_at = time.perf_counter()
        self.poll_until = poll_until(self._sent_at, self.expected, self.limit)

    def answered(self) -> None:
        self.expected = running_average(self.expected, time.perf_counter() - self._sent_at)


class DirectLink:
    """A connection to one server, through its local socket where it can, for one thread
    at a time."""

    def __init__(self, address: str, auth: Optional[Auth], limits: Limits = DEFAULT_LIMITS,
                 poll_limit: float = POLL_LIMIT, local: Optional[str] = None):
        self.address = address
        self._sock, self._reader = connect(address, CONNECT_TIMEOUT, auth, local)
        self._sock.setblocking(False)  # waits poll the socket and then sleep in wait_ready, with no ioctl per call
        self._reader.limits = limits
        self._dest: Optional[list[memoryview]] = None
        self._reader.allocator = self._allocate
        self._unanswered: list[Frame] = []  # frames read along with another one
        self.limits = limits
        self.replies = ReplyClock(poll_limit)

    def _allocate(self, msg_type: MsgType, req_id: int, body: dict, lengths: list[int]) -> Optional[list[memoryview]]:
        return self._dest if msg_type is MsgType.REPLY else None

    def exchange(self, msg_type: MsgType, req_id: int, body: dict, buffers: Sequence[memoryview],
                 dest: Optional[list[memoryview]], timeout: float) -> Frame:
        """Send one request and return its reply, received into `dest` where it fits.
        socket.timeout past `timeout` seconds; LinkBroken if the connection fails."""
        chunks = encode(msg_type, req_id, body, buffers, self.limits)  # ProtocolError before anything is sent
        deadline = time.monotonic() + timeout
        try:
            self._send(chunks, deadline)
        except socket.timeout:
            raise
        except OSError as exc:
            raise LinkBroken(f"sending to {self.address} failed ({exc})", sent=False) from None
        self._dest = dest
        self.replies.sent()
        try:
            while True:  # anything else is a late reply to a request that timed out, or a notice
                if not self._unanswered:
                    self._unanswered = read_frames(self._sock, self._reader, self.replies, deadline)
                frame = self._unanswered.pop(0)
                if frame.req_id == req_id:
                    self.replies.answered()
                    return frame
        except socket.timeout:
            raise
        except (OSError, ProtocolError) as exc:
            raise LinkBroken(f"no reply from {self.address} ({exc})", sent=True) from None
        finally:
            self._dest = None

    def _send(self, chunks: list, deadline: float) -> None:
        views = [memoryview(c).cast("B") for c in chunks]
        while views:
            try:
                sent = self._sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
            except BlockingIOError:  # the kernel's buffer is full
                wait_ready(self._sock, select.POLLOUT, deadline)
                continue
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def interrupt(self) -> None:
        """From another thread: end a wait for a reply at once (the reader sees the
        connection closed); the socket itself is closed by its own thread."""
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # not connected any more

    def close(self) -> None:
        self._sock.close()


class DirectCalls:
    """Mixed into Client: its synchronous calls on the caller's thread. Uses the client's
    connections (to see which servers are reachable by socket), its send gate, pending
    calls and message building; a link broken mid-call hands the message back to it."""

    _conns: dict
    _gate: Any
    _leaving: bool
    servers: dict
    timeout: float

    def _init_direct(self) -> None:
        self._synchronous = threading.local()  # .on: the caller's thread is in call()
        self._unfinished = 0  # calls started and not done: a direct call needs to be the only one
        self._unfinished_lock = threading.Lock()
        self._links: dict[int, DirectLink] = {}  # server -> the caller's-thread connection to it
        self._no_link: set[str] = set()  # server addresses a link could not reach
        # Held while a call starts, and through a direct call: one thread's at a time, and
        # no other call starts meanwhile (re-entrant: a reply's callbacks may start calls).
        self._starting = threading.RLock()
        self._direct_add = False  # a direct add is in flight: a pause must wait for its ack
        self.direct_calls = 0  # calls that went out on the caller's thread, for tests and benchmarks

    def call(self, start: Callable[[], Future]) -> Any:
        """A synchronous call: start it (a table's submit) and wait for its outcome. The
        submit may run the whole call on this thread."""
        self._synchronous.on = True
        try:
            future = start()
        finally:
            self._synchronous.on = False
        return self.wait(future)

    def _may_call_directly(self) -> bool:
        """Whether a call being submitted is a synchronous one that may go direct."""
        return self.config.direct and getattr(self._synchronous, "on", False) and self.config.tls is None

    def _started(self, future: Future) -> None:
        with self._unfinished_lock:
            self._unfinished += 1
        future.add_done_callback(self._finished)

    def _finished(self, _: Future) -> None:
        with self._unfinished_lock:
            self._unfinished -= 1

    def _call_direct(self, call: Any, parts: list) -> bool:
        """Run a call on this thread (holding _starting) if it is all this worker has
        outstanding (so nothing can be overtaken) and is one message to one reachable
        server; False if not."""
        if self._unfinished != 1 or self._gate.paused or self._leaving:
            return False
        messages = self._messages(call, parts)
        if len(messages) != 1:
            return False
        sid, group = messages[0]
        conn = self._conns.get(sid)
        if sid in self._gate.down or not isinstance(conn, Connection) or conn.closed:  # in-process: no socket
            return False
        link = self._link(sid, conn.greeting.get("local"))
        if link is None:
            return False
        self._direct_add = call.name != "get"
        try:
            if self._gate.paused:  # a pause came in: it either sees the flag or we see it
                return False
            call.left = 1
            self._exchange(call, sid, group, link)
            return True
        finally:
            self._direct_add = False

    def _link(self, sid: int, local: Optional[str]) -> Optional[DirectLink]:
        """The link to server sid (through its local socket `local` where it answers),
        opened on first use; None where it cannot be opened."""
        address = self.servers[sid]
        link = self._links.get(sid)
        if link is not None and link.address != address:  # the server was replaced
            link.close()
            link = None
        if link is None and address not in self._no_link:
            try:
                link = self._links[sid] = DirectLink(address, self.config.auth, self.config.limits,
                                                     self.config.poll_limit, local)
            except (MultiversoError, OSError) as exc:
                log.info("synchronous calls to server %s go through the I/O thread: %s", sid, exc)
                self._no_link.add(address)
        return link

    def _exchange(self, call: Any, sid: int, parts: list, link: DirectLink) -> None:
        """Send one message on the link and handle its reply as the I/O thread would. A
        broken link hands the message to the I/O thread: as it was if it may have been
        applied, so that the server skips it then."""
        seq = next(self._seq)
        body, buffers, pending = self._message(call, sid, parts, seq)
        self.direct_calls += 1
        try:
            frame = link.exchange(TABLE_OPS[call.name], next(self._req_ids), body, buffers, pending.dest,
                                  self.timeout)
        except (socket.timeout, LinkBroken) as exc:
            link.close()
            del self._links[sid]
            if pending.segment is not None:
                self.shared_memory.drop(pending.segment)  # the server may still write into it
            if isinstance(exc, socket.timeout):
                self._fail(call, self._timeout_error(pending))
            else:
                log.info("link to server %s broke (%s); resending through the I/O thread", sid, exc)
                self.io.call_soon(self._send_message, call, sid, parts, seq if exc.sent else None)
            return
        try:
            self._answered(pending, frame)
        finally:
            if pending.segment is not None:
                self.shared_memory.give_back(pending.segment)

    def _interrupt_link(self, sid: int) -> None:
        """From the I/O thread, when the server's connection closed: a direct call
        waiting on its link fails over to that connection's fate."""
        link = self._links.get(sid)
        if link is not None:
            link.interrupt()

    def _close_links(self) -> None:
        with self._starting:
            for link in self._links.values():
                link.close()
            self._links.clear()
