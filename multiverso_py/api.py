"""The process-level API: join a job, leave it, and ask about it.

`init()` with no scheduler address (and no MV_SCHEDULER) starts an embedded job: a
scheduler and a server on this process's I/O thread, this process as worker 0 of 1.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
from typing import Any, Optional

from multiverso_py import context
from multiverso_py.auth import Auth, load_auth
from multiverso_py.client import Client, ClientConfig
from multiverso_py.polling import poll_limit_from_env
from multiverso_py.errors import InvalidArgument, NotInitialized
from multiverso_py.scheduler import Scheduler, SchedulerConfig
from multiverso_py.server import Server, ServerConfig
from multiverso_py.tls import load_tls
from multiverso_py.transport import LoopThread, parse_address

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
_INIT_OPTIONS = {"threads", "restore"}  # the embedded job's: server threads, a checkpoint to start from


class Job:
    """This process's membership in a job. A context manager: leaving the block shuts down."""

    def __init__(self, io: LoopThread, client: Client, embedded: Optional[tuple[Scheduler, Server]]):
        self.io = io
        self.client = client
        self.embedded = embedded

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        shutdown()

    def close(self) -> None:
        try:
            self.client.leave()
        finally:
            if self.embedded is not None:
                scheduler, server = self.embedded
                self.io.call_soon(scheduler.close)
                self.io.call_soon(server.close)
            self.io.stop()


_job: Optional[Job] = None
_lock = threading.Lock()


def init(scheduler: Optional[str] = None, *, timeout: Optional[float] = None, consistency: Optional[str] = None,
         staleness: Optional[int] = None, **options: Any) -> Job:
    """Join a job (scheduler "HOST:PORT", else MV_SCHEDULER), or start an embedded one."""
    global _job
    unknown = set(options) - _INIT_OPTIONS
    if unknown:
        raise InvalidArgument(f"mv.init() got unknown option(s) {', '.join(sorted(unknown))}; "
                              f"it accepts scheduler, timeout, consistency, staleness, {', '.join(sorted(_INIT_OPTIONS))}")
    timeout = _resolve_timeout(timeout)
    consistency = consistency or os.environ.get("MV_CONSISTENCY") or None
    if staleness is None and os.environ.get("MV_STALENESS"):
        staleness = _int_env("MV_STALENESS")
    address = scheduler or os.environ.get("MV_SCHEDULER") or None
    target = parse_address(address) if address else None
    if options.get("restore") and target is not None:
        raise InvalidArgument("restore= starts an embedded job from a checkpoint; a job with a scheduler "
                              "restores through it: multiverso-py run/scheduler --restore PATH")
    context.check_consistency(consistency or "async")
    context.check_staleness(0 if staleness is None else staleness)
    with _lock:
        if _job is not None:
            raise InvalidArgument("mv.init() was called already in this process; call mv.shutdown() first")
        auth = load_auth()
        # an embedded job never leaves this machine (its worker reaches its server in-process): no TLS
        tls = load_tls().connect if target is not None else None
        shared_memory = os.environ.get("MV_SHARED_MEMORY", "1") != "0"  # 0: every array on the socket
        direct = os.environ.get("MV_DIRECT", "1") != "0"  # 0: every call through the I/O thread
        config = ClientConfig(timeout=timeout, auth=auth, tls=tls, shared_memory=shared_memory, direct=direct,
                              poll_limit=poll_limit_from_env())
        io = LoopThread()
        client = Client(io, config)
        embedded = None
        try:
            if target is None:
                embedded = io.run(_start_embedded(options.get("threads"), auth, options.get("restore")), timeout)
                target = parse_address(embedded[0].address)
            client.start(target, _int_env("MV_RANK") if os.environ.get("MV_RANK") else None,
                         local=embedded[1] if embedded is not None else None)
        except BaseException:
            if embedded is not None:
                io.call_soon(embedded[0].close)
                io.call_soon(embedded[1].close)
            io.stop()
            raise
        _job = Job(io, client, embedded)
        context.install(client, consistency, staleness)
    atexit.register(_shutdown_at_exit)
    return _job


async def _start_embedded(threads: Optional[int], auth: Optional[Auth],
                          restore: Optional[str]) -> tuple[Scheduler, Server]:
    scheduler = Scheduler(SchedulerConfig(workers=1, servers=1, auth=auth, restore=restore))
    await scheduler.start()
    # Its loop is this worker's I/O thread, which must never poll: the caller's thread needs the GIL.
    config = ServerConfig(auth=auth, poll_limit=0.0)
    server = Server(dataclasses.replace(config, threads=threads) if threads else config)
    await server.start()
    await server.register(parse_address(scheduler.address))
    return scheduler, server


def _resolve_timeout(timeout: Optional[float]) -> float:
    if timeout is None:
        raw = os.environ.get("MV_TIMEOUT")
        try:
            timeout = float(raw) if raw else DEFAULT_TIMEOUT
        except ValueError:
            raise InvalidArgument(f"MV_TIMEOUT={raw!r} is not a number of seconds") from None
    if not isinstance(timeout, (int, float)) or timeout <= 0:
        raise InvalidArgument(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def _int_env(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise InvalidArgument(f"{name}={raw!r} is not an integer") from None


def shutdown() -> None:
    """Flush pending adds, leave the job and close connections. Safe to call twice."""
    global _job
    with _lock:
        job, _job = _job, None
        context.clear()
    if job is not None:
        job.close()


def _shutdown_at_exit() -> None:
    try:
        shutdown()
    except Exception as exc:  # the interpreter is exiting: report, do not raise
        log.warning("mv.shutdown() at exit failed: %s", exc)


def _client() -> Client:
    if _job is None:
        raise NotInitialized("no multiverso_py job in this process: call mv.init() first")
    return _job.client


def worker_id() -> int:
    return _client().worker_id


def workers_num() -> int:
    return _client().workers_num


def servers_num() -> int:
    return len(_client().servers)


def is_master_worker() -> bool:
    return _client().worker_id == 0


def barrier() -> None:
    """Wait until this worker's adds are acknowledged, then for every live worker."""
    _client().barrier()


def checkpoint(path: str) -> str:
    """Write a consistent checkpoint of every table (values, updater state, held adds)
    under the directory `path`; returns the checkpoint's own directory. Every worker of
    the job pauses while it is taken. Read it with multiverso_py.checkpoint.load(path);
    start a job from it with `--restore path` (or mv.init(restore=path) when embedded)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidArgument(f"checkpoint needs a directory path, got {path!r}")
    return _client().checkpoint(os.path.abspath(path))


def clock() -> None:
    """This worker finished an iteration: advance its clock on every server (what SSP and
    BSP tables wait on; async tables ignore it). Adds issued before count at the old clock."""
    _client().clock()


__all__ = ["init", "shutdown", "worker_id", "workers_num", "servers_num", "is_master_worker", "barrier", "clock",
           "checkpoint", "Job"]
