"""A local cluster of real scheduler and server processes, for tests and benchmarks.

    with LocalCluster(workers=2, servers=2) as cluster:
        env = cluster.worker_env(rank=0)        # run a worker process with this environment
        cluster.kill_server(1)                  # kill -9, for fault tests
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional, Sequence

__all__ = ["LocalCluster", "raw_connection", "read_frame", "wait_for", "run_job", "job_report"]

from multiverso_py.auth import Auth
from multiverso_py.direct import read_frame
from multiverso_py.framing import FrameReader, encode_bytes
from multiverso_py.launcher import Children, start_nodes, worker_env
from multiverso_py.protocol import MsgType
from multiverso_py.transport import parse_address


class LocalCluster:
    """A scheduler and servers as child processes, each in its own process group; all of
    them are stopped on exit. Their output is kept in `log` for assertions."""

    def __init__(self, workers: int = 1, servers: int = 1, log_level: str = "info", startup_timeout: float = 30.0,
                 heartbeat_timeout: Optional[float] = None,
                 checkpoints: tuple[Optional[str], Optional[float]] = (None, None), server_options: Sequence[str] = ()):
        self.workers, self.servers_num = workers, servers
        self.server_options = server_options  # more `multiverso-py server` options
        self.heartbeat_timeout, self.checkpoints = heartbeat_timeout, checkpoints
        self.log = io.StringIO()
        self._log_level, self._startup_timeout = log_level, startup_timeout
        self._children = Children(self.log)
        self._tmp: Optional[tempfile.TemporaryDirectory] = None
        self.address = ""
        self.nodes: list = []

    def __enter__(self) -> "LocalCluster":
        self._tmp = tempfile.TemporaryDirectory(prefix="mv-cluster-")
        try:
            self.address, self.nodes = start_nodes(self._children, self._tmp.name, self.workers, self.servers_num,
                                                   log_level=self._log_level, startup_timeout=self._startup_timeout,
                                                   heartbeat_timeout=self.heartbeat_timeout,
                                                   checkpoints=self.checkpoints, server_options=self.server_options)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._children.stop(self._children.children)
        if self._tmp is not None:
            self._tmp.cleanup()

    @property
    def scheduler(self):
        return self.nodes[0].proc

    @property
    def servers(self) -> list:
        return [child.proc for child in self.nodes[1:]]

    def pids(self) -> list[int]:
        return [child.proc.pid for child in self.nodes]

    def server_address(self, index: int) -> str:
        with open(os.path.join(self._tmp.name, f"server{index}")) as f:
            return f.read().strip()

    def kill_server(self, index: int) -> None:
        proc = self.servers[index]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def worker_env(self, rank: int, **options) -> dict[str, str]:
        return worker_env(self.address, rank, **options)


def raw_connection(address: str, timeout: float = 10.0, auth: Optional[Auth] = None) -> socket.socket:
    """A plain socket to a scheduler or server, past the handshake (answered with `auth`
    when the peer asks for a token): for tests that speak the wire protocol by hand."""
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    reader = FrameReader()
    hello = read_frame(sock, reader)
    if hello.type is not MsgType.HELLO:
        raise AssertionError(f"expected HELLO, got {hello.type.name}")
    if "nonce" in hello.body and auth is not None:
        sock.sendall(encode_bytes(MsgType.AUTH, 0, {"mac": auth.mac(hello.body["nonce"])}))
        answer = read_frame(sock, reader)
        if answer.type is not MsgType.REPLY:
            raise AssertionError(f"authentication refused: {answer.body}")
    return sock


def wait_for(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll until condition() is true or the deadline passes; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def run_job(script: str, workers: int, servers: int, timeout: float = 90.0,
            options: Sequence[str] = ()) -> subprocess.CompletedProcess:
    """Run a Python script as a whole job under `multiverso-py run`, as a user would, with
    no MV_* variables inherited. On timeout the launcher gets SIGTERM, so it stops what it
    started (SIGKILL would orphan its children), and TimeoutError says what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MV_")}
    cmd = [sys.executable, "-m", "multiverso_py", "--log-level", "warning", "run",
           "--workers", str(workers), "--servers", str(servers), *options, "--", sys.executable, str(script)]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                          text=True, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                out, err = proc.communicate(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise TimeoutError(f"the job ran past {timeout}s\nstdout:\n{out}\nstderr:\n{err}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def job_report(result: subprocess.CompletedProcess) -> str:
    """A finished job's status and output, for assertion messages."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
