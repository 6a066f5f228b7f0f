"""`multiverso-py run`: a local job launcher, like mpirun or torchrun.

Starts a scheduler and M servers as child processes, runs N copies of the command with
MV_SCHEDULER set, prefixes every line they print, and stops everything it started when
the command ends or fails (each child runs in its own process group, so whatever the
command spawns goes too). Exits with the first non-zero worker status.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO, Optional, Sequence

from multiverso_py.errors import MultiversoError

log = logging.getLogger(__name__)

STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL
JOB_END_GRACE = 10.0  # seconds the scheduler and servers get to exit after the last worker


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    pump: threading.Thread


class Children:
    """The processes this launcher started; closing stops every one still running."""

    def __init__(self, out: IO[str]):
        self.out = out
        self.children: list[_Child] = []
        self.stopping = False  # set once stopping begins: children that exit now are not replaced
        self._print_lock = threading.Lock()

    def start(self, name: str, argv: Sequence[str], env: Optional[dict] = None) -> _Child:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True, text=True, errors="replace", bufsize=1)
        pump = threading.Thread(target=self._pump, args=(name, proc.stdout), daemon=True)
        pump.start()
        child = _Child(name, proc, pump)
        self.children.append(child)
        return child

    def _pump(self, name: str, stream: IO[str]) -> None:
        for line in stream:
            with self._print_lock:
                self.out.write(f"[{name}] {line if line.endswith(chr(10)) else line + chr(10)}")
                self.out.flush()

    def stop(self, children: Sequence[_Child]) -> None:
        """SIGTERM each child's process group, then SIGKILL what outlives the grace period."""
        self.stopping = True
        live = [c for c in children if c.proc.poll() is None]
        for child in live:
            _signal_group(child.proc, signal.SIGTERM)
        _wait_all(live, STOP_GRACE, "%s did not stop on SIGTERM; killing it")
        for child in children:
            _signal_group(child.proc, signal.SIGKILL)  # also whatever a child left in its group
            child.proc.wait()
            child.pump.join(1.0)

    def __enter__(self) -> "Children":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop(self.children)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the child leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _wait_ready(path: str, child: _Child, timeout: float) -> str:
    """The address a scheduler or server wrote once it was up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            with open(path) as f:
                return f.read().strip()
        if child.proc.poll() is not None:
            raise MultiversoError(f"{child.name} exited with status {child.proc.returncode} before it was ready")
        time.sleep(0.02)
    raise MultiversoError(f"{child.name} was not ready within {timeout}s")


MAX_REPLACEMENTS = 3  # of one server, by `run` in a job with checkpoints


def mv_command(log_level: str = "info") -> list[str]:
    return [sys.executable, "-m", "multiverso_py", "--log-level", log_level]


def start_nodes(children: Children, workdir: str, workers: int, servers: int, *, log_level: str = "info",
                startup_timeout: float = 30.0, heartbeat_timeout: Optional[float] = None,
                restore: Optional[str] = None,
                checkpoints: tuple[Optional[str], Optional[float]] = (None, None),
                server_options: Sequence[str] = ()) -> tuple[str, list[_Child]]:
    """Start a scheduler and `servers` servers (`multiverso-py server` given server_options
    too); (scheduler address, [scheduler, servers...])."""
    mv = mv_command(log_level)
    ready = os.path.join(workdir, "scheduler")
    extra = [] if heartbeat_timeout is None else ["--heartbeat-timeout", str(heartbeat_timeout)]
    extra += [] if restore is None else ["--restore", os.path.abspath(restore)]
    if all(checkpoints):
        extra += ["--checkpoint-dir", os.path.abspath(checkpoints[0]), "--checkpoint-every", str(checkpoints[1])]
    scheduler = children.start("scheduler", [*mv, "scheduler", "--port", "0", "--workers", str(workers),
                                             "--servers", str(servers), "--ready-file", ready, *extra])
    address = _wait_ready(ready, scheduler, startup_timeout)
    nodes = [scheduler]
    for j in range(servers):
        ready_j = os.path.join(workdir, f"server{j}")
        nodes.append(children.start(f"server {j}", [*mv, "server", "--scheduler", address, "--ready-file", ready_j,
                                                    *server_options]))
        _wait_ready(ready_j, nodes[-1], startup_timeout)
    return address, nodes


def worker_env(address: str, rank: int, *, consistency: Optional[str] = None, staleness: Optional[int] = None,
               timeout: Optional[float] = None) -> dict[str, str]:
    """The environment a worker process of the job runs with."""
    env = {**os.environ, "MV_SCHEDULER": address, "MV_RANK": str(rank), "PYTHONUNBUFFERED": "1"}
    for key, value in (("MV_CONSISTENCY", consistency), ("MV_STALENESS", staleness), ("MV_TIMEOUT", timeout)):
        if value is not None:
            env[key] = str(value)
    return env


def launch(cmd: Sequence[str], workers: int, servers: int, *, consistency: Optional[str] = None,
           staleness: Optional[int] = None, timeout: Optional[float] = None, startup_timeout: float = 30.0,
           heartbeat_timeout: Optional[float] = None, restore: Optional[str] = None,
           checkpoints: tuple[Optional[str], Optional[float]] = (None, None), log_level: str = "info",
           out: IO[str] = sys.stdout) -> int:
    """Run a whole local job; return the first non-zero worker status, else 0."""
    previous = signal.signal(signal.SIGTERM, _raise_exit)
    try:
        with tempfile.TemporaryDirectory(prefix="mv-run-") as tmp, Children(out) as children:
            address, nodes = start_nodes(children, tmp, workers, servers, log_level=log_level,
                                         startup_timeout=startup_timeout, heartbeat_timeout=heartbeat_timeout,
                                         restore=restore, checkpoints=checkpoints)
            procs = [children.start(f"worker {i}", cmd, worker_env(address, i, consistency=consistency,
                                                                  staleness=staleness, timeout=timeout))
                     for i in range(workers)]
            if all(checkpoints):  # the scheduler can restore a lost server: bring one back
                for j, node in enumerate(nodes[1:]):
                    threading.Thread(target=_replace_when_dead, args=(children, node, j, address, log_level),
                                     daemon=True).start()
            status = _wait_workers(procs)
            if status != 0:
                return status
            _wait_job_end(nodes)
            return 0
    except FileNotFoundError as exc:
        raise MultiversoError(f"cannot run {cmd[0]!r}: {exc.strerror}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _replace_when_dead(children: Children, node: _Child, index: int, address: str, log_level: str) -> None:
    """Start a new server whenever this one dies before the job ends (at most MAX_REPLACEMENTS
    times); the scheduler gives it the dead one's partitions from the latest checkpoint."""
    for attempt in range(MAX_REPLACEMENTS):
        status = node.proc.wait()
        if status == 0 or children.stopping:
            return
        log.warning("server %d exited with status %d; starting a replacement", index, _exit_status(status))
        node = children.start(f"server {index}", [*mv_command(log_level), "server", "--scheduler", address])


def _wait_workers(procs: list[_Child]) -> int:
    """Wait for every worker; at the first failure, return its status (the caller stops the rest)."""
    done: queue.Queue[_Child] = queue.Queue()
    for child in procs:
        threading.Thread(target=lambda c=child: (c.proc.wait(), done.put(c)), daemon=True).start()
    for _ in procs:
        child = done.get()
        if child.proc.returncode != 0:
            log.error("%s exited with status %d; stopping the job", child.name, _exit_status(child.proc.returncode))
            return _exit_status(child.proc.returncode)
    return 0


def _wait_job_end(nodes: list[_Child]) -> None:
    """The scheduler ends the job once all workers left; give it and the servers time to exit."""
    _wait_all(nodes, JOB_END_GRACE, "%s still running after the job ended; stopping it")


def _wait_all(children: Sequence[_Child], grace: float, warning: str) -> None:
    """Wait up to `grace` seconds in all for the children to exit; warn about each that did not."""
    deadline = time.monotonic() + grace
    for child in children:
        try:
            child.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(warning, child.name)


def _raise_exit(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
