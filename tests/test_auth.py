"""Authentication: a shared token, an HMAC challenge on every connection, nothing served
before it succeeds; refused peers get a clear error and everyone else goes on."""

from __future__ import annotations

import itertools
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

import multiverso_py as mv
from multiverso_py import testing
from multiverso_py.auth import Auth, load_auth
from multiverso_py.direct import connect_local
from multiverso_py.errors import ErrorCode, InvalidArgument
from multiverso_py.framing import MAGIC, PREFIX, VERSION, FrameReader, encode_bytes
from multiverso_py.protocol import MsgType
from multiverso_py.server import Server, ServerConfig
from multiverso_py.transport import LoopThread

TOKEN = "a-shared-secret-of-the-job-0123456789"


# ---------------------------------------------------------------- the token


def test_mac_depends_on_token_and_nonce_and_check_is_strict() -> None:
    auth, other = Auth(TOKEN.encode()), Auth(b"another-token-of-16-bytes")
    nonce = Auth.nonce()
    assert auth.check(nonce, auth.mac(nonce))
    assert not auth.check(nonce, other.mac(nonce))
    assert not auth.check(Auth.nonce(), auth.mac(nonce))
    assert not auth.check(nonce, "not bytes")
    assert TOKEN not in repr(auth)


def test_token_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    assert load_auth(str(path), {}) == Auth(TOKEN.encode())
    assert load_auth(None, {"MV_AUTH_TOKEN_FILE": str(path)}) == Auth(TOKEN.encode())
    assert load_auth(None, {"MV_AUTH_TOKEN": TOKEN}) == Auth(TOKEN.encode())
    assert load_auth(None, {}) is None
    with pytest.raises(InvalidArgument, match="cannot read the auth token file"):
        load_auth(str(tmp_path / "missing"), {})
    with pytest.raises(InvalidArgument, match="at least 16 bytes"):
        load_auth(None, {"MV_AUTH_TOKEN": "short"})


# ---------------------------------------------------------------- a job with a token


@pytest.fixture
def secured(monkeypatch: pytest.MonkeyPatch) -> Iterator[testing.LocalCluster]:
    """A scheduler and a server that require TOKEN (their environment carries it)."""
    monkeypatch.setenv("MV_AUTH_TOKEN", TOKEN)
    with testing.LocalCluster(workers=1, servers=1) as cluster:
        yield cluster


def _connect(where: str) -> socket.socket:
    """A socket to a server's HOST:PORT, or to its abstract Unix socket by name."""
    if ":" in where:
        return socket.create_connection(testing.parse_address(where), timeout=10)
    return connect_local(where, 10)


def read_answer(sock: socket.socket) -> list:
    """Frames until the peer closes (bounded by the socket's timeout)."""
    reader, frames = FrameReader(), []
    try:
        while data := sock.recv(1 << 16):
            frames += reader.feed(data)
    except ConnectionResetError:
        pass
    return frames


def test_a_worker_with_the_token_works_and_others_are_refused(secured: testing.LocalCluster,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MV_AUTH_TOKEN")
    with pytest.raises(mv.AuthFailed, match="requires the job's shared token: set MV_AUTH_TOKEN"):
        mv.init(secured.address, timeout=10)
    monkeypatch.setenv("MV_AUTH_TOKEN", "not-the-token-of-this-job-at-all")
    with pytest.raises(mv.AuthFailed, match="authentication failed"):
        mv.init(secured.address, timeout=10)
    monkeypatch.setenv("MV_AUTH_TOKEN", TOKEN)
    with mv.init(secured.address, timeout=10) as job:
        table = mv.ArrayTable(4, name="t")
        table.add(np.ones(4))
        assert job.client.direct_calls == 1  # the caller's own link authenticated too (multiverso_py.direct)
        assert job.client._links[0]._sock.family == socket.AF_UNIX  # through the server's local socket
        server = secured.server_address(0)
        local = job.client._conns[0].greeting["local"]
        # while the worker runs, peers without the token try the server in every way, on both its sockets
        for attempt, where in itertools.product((
            encode_bytes(MsgType.GET, 1, {"table": 0, "client": 0, "seq": 1, "map": 1, "parts": [{"p": 0}]}),
            encode_bytes(MsgType.AUTH, 0, {"mac": b"\0" * 32}),
            b"garbage that is no frame at all" * 10,
            PREFIX.pack(MAGIC, VERSION, 100, 1) + struct.pack("<Q", 1 << 30),  # asks us to allocate 1 GiB
        ), ("tcp", "local")):
            with _connect(server if where == "tcp" else local) as sock:
                hello = testing.read_frame(sock, FrameReader())
                assert hello.type is MsgType.HELLO and len(hello.body["nonce"]) == 32
                sock.sendall(attempt)
                answer = read_answer(sock)
            assert all(f.type is MsgType.ERROR for f in answer), answer  # nothing served
            assert not answer or answer[0].body["code"] in (ErrorCode.AUTH_FAILED, ErrorCode.BAD_REQUEST)
            np.testing.assert_array_equal(table.get(), np.ones(4))  # and the server kept serving
        # a peer that answers the challenge is served like a worker
        with testing.raw_connection(server, auth=Auth(TOKEN.encode())) as sock:
            sock.sendall(encode_bytes(MsgType.HEARTBEAT, 5))
            assert testing.read_frame(sock, FrameReader()).type is MsgType.REPLY
    assert testing.wait_for(lambda: "refused connection" in secured.log.getvalue(), 10)


def test_a_peer_that_never_authenticates_is_dropped() -> None:
    io = LoopThread()
    server = Server(ServerConfig(auth=Auth(TOKEN.encode()), handshake_timeout=0.3))
    try:
        address = io.run(server.start(), 10)
        with socket.create_connection(testing.parse_address(address), timeout=10) as sock:
            assert testing.read_frame(sock, FrameReader()).type is MsgType.HELLO
            assert read_answer(sock) == []  # silence, then the server hangs up (the socket timeout is 10 s)
    finally:
        io.call_soon(server.close)
        io.stop()


def test_run_with_a_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        import multiverso_py as mv
        with mv.init():
            workers = mv.workers_num()
            t = mv.ArrayTable(3, name="t")
            t.add(np.ones(3))
            mv.barrier()
            assert (t.get() == workers).all()
    """))
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("MV_")}
    result = subprocess.run([sys.executable, "-m", "multiverso_py", "--log-level", "warning", "run", "--workers", "2",
                             "--auth-token-file", str(token), "--", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=90, env=env)
    assert result.returncode == 0, testing.job_report(result)
