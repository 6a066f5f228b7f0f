"""Faults: servers that die or freeze under a live client, and the launcher's teardown.

Server faults use LocalCluster (real scheduler and server processes) and an in-process
client; a request to a dead or frozen server must fail with a typed error naming the
table, the operation and the server within the configured timeout, never hang.
Launcher tests run `multiverso-py run` as a subprocess, record every process it starts
(sampled with psutil while it runs), and check that none outlives it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import psutil
import pytest

import multiverso_py as mv
from multiverso_py.testing import LocalCluster, wait_for

CLI = Path(sys.executable).with_name("multiverso-py")  # the installed console script


def assert_names_request(exc: BaseException, op: str, table: str, server: int) -> None:
    message = str(exc)
    assert re.search(rf"\b{op}\b", message), f"the error does not name the operation {op!r}: {message}"
    assert f"'{table}'" in message, f"the error does not name table {table!r}: {message}"
    assert re.search(rf"\bserver {server}\b", message), f"the error does not name server {server}: {message}"


# ---------------------------------------------------------------- server faults


def test_killed_server_fails_pending_and_new_gets() -> None:
    with LocalCluster(workers=1, servers=2) as cluster, mv.init(cluster.address, timeout=5):
        table = mv.ArrayTable(1 << 16, "float32", name="spanning")
        assert set(table._info.owners) == {0, 1}, "the table must have partitions on both servers"
        ones = np.ones(1 << 16, np.float32)
        table.add(ones)
        np.testing.assert_array_equal(table.get(), ones)
        victim = cluster.servers[1]
        # Freeze it first, so that a get is surely in flight when it dies.
        os.kill(victim.pid, signal.SIGSTOP)
        assert wait_for(lambda: psutil.Process(victim.pid).status() == psutil.STATUS_STOPPED, 5)
        pending = table.get_async()
        cluster.kill_server(1)
        start = time.monotonic()
        with pytest.raises(mv.MultiversoError) as info:
            pending.result(timeout=10)
        assert time.monotonic() - start < 10
        assert isinstance(info.value, (mv.ConnectionLost, mv.RequestTimeout)), repr(info.value)
        assert_names_request(info.value, "get", "spanning", 1)

        start = time.monotonic()
        with pytest.raises(mv.MultiversoError) as info:
            table.get_async().result(timeout=10)
        assert time.monotonic() - start < 10
        assert isinstance(info.value, (mv.ConnectionLost, mv.RequestTimeout)), repr(info.value)
        assert_names_request(info.value, "get", "spanning", 1)

        # The partitions on the surviving server still answer.
        np.testing.assert_array_equal(table.get_async([0, 1, 2]).result(timeout=10), ones[:3])
        assert cluster.servers[0].poll() is None


def test_frozen_server_times_out_and_the_next_get_gets_its_own_reply() -> None:
    with LocalCluster(workers=1, servers=2) as cluster, mv.init(cluster.address, timeout=2):
        table = mv.ArrayTable(4096, "int64", name="frozen")
        values = np.arange(4096, dtype=np.int64)
        table.add(values)
        frozen = cluster.servers[0]
        os.kill(frozen.pid, signal.SIGSTOP)  # the connection stays open, nothing answers
        try:
            assert wait_for(lambda: psutil.Process(frozen.pid).status() == psutil.STATUS_STOPPED, 5)
            start = time.monotonic()
            with pytest.raises(mv.RequestTimeout) as info:
                table.get_async().result(timeout=10)
            elapsed = time.monotonic() - start
            assert 1.8 <= elapsed <= 4.0, f"a 2 s timeout fired after {elapsed:.2f} s"
            assert_names_request(info.value, "get", "frozen", 0)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        # The late reply to the timed-out get must not be taken for this one's.
        np.testing.assert_array_equal(table.get_async().result(timeout=10), values)
        table.add(values)
        np.testing.assert_array_equal(table.get_async().result(timeout=10), 2 * values)


# ---------------------------------------------------------------- the launcher

# Each worker starts a grandchild `sleep 60` (in the worker's process group, as a training
# script's helper would be), prints its PID and sleeps; the failing rank instead waits for
# the test's go file, then exits 3.
SLEEPER = textwrap.dedent("""
    import os, subprocess, sys, time
    rank = int(os.environ["MV_RANK"])
    go_file, failing_rank = sys.argv[1], int(sys.argv[2])
    if rank == failing_rank:
        deadline = time.monotonic() + 30
        while not os.path.exists(go_file) and time.monotonic() < deadline:
            time.sleep(0.01)
        sys.exit(3)
    child = subprocess.Popen(["sleep", "60"])
    print(f"GRANDCHILD {child.pid}", flush=True)
    time.sleep(60)
""")

# A real job: both workers add and meet at a barrier, then worker 1 crashes.
CRASHER = textwrap.dedent("""
    import time
    import numpy as np
    import multiverso_py as mv
    mv.init(timeout=20)
    rank = mv.worker_id()
    table = mv.ArrayTable(8, "int64", name="shared")
    table.add(np.ones(8, np.int64))
    mv.barrier()
    print(f"rank {rank} sees {int(table.get()[0])}", flush=True)
    if rank == 1:
        raise RuntimeError("boom in the middle of the job")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        table.get()
        time.sleep(0.05)
""")


@dataclass
class Launch:
    """A running `multiverso-py run` and every process seen below it."""

    proc: subprocess.Popen
    output: Path
    seen: dict[int, tuple[psutil.Process, list[str]]] = field(default_factory=dict)

    def sample(self) -> None:
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in descendants:
            known = self.seen.get(p.pid)
            try:  # read again each time: a child sampled between fork and exec shows our cmdline
                cmdline = p.cmdline()
            except psutil.Error:
                cmdline = []  # it exited between listing and asking
            if known is None or cmdline:  # a zombie's cmdline is empty: keep what was read before
                self.seen[p.pid] = (known[0] if known else p, cmdline or [])

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def run_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Sample descendants until condition() holds or the deadline passes."""
        def check() -> bool:
            self.sample()
            return condition()
        return wait_for(check, timeout)

    def wait_exit(self, timeout: float) -> int:
        exited = self.run_until(lambda: self.proc.poll() is not None, timeout)
        assert exited, f"the launcher did not exit within {timeout}s; output:\n{self.text()[-3000:]}"
        return self.proc.returncode

    def roles(self) -> dict[str, int]:
        """How many scheduler, server and worker processes were seen."""
        count = {"scheduler": 0, "server": 0, "worker": 0}
        for _, cmdline in self.seen.values():
            if "scheduler" in cmdline:
                count["scheduler"] += 1
            elif "server" in cmdline:
                count["server"] += 1
            elif "-c" in cmdline:
                count["worker"] += 1
        return count

    def grandchildren(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"^\[worker \d+\] GRANDCHILD (\d+)$", self.text(), re.MULTILINE)]

    def wait_grandchildren(self, count: int) -> None:
        """Wait until `count` workers printed their grandchild's PID and it was sampled."""
        def sampled() -> bool:
            pids = self.grandchildren()
            return len(pids) == count and set(pids) <= set(self.seen)
        self.run_until(lambda: sampled() or self.proc.poll() is not None, 30)
        assert sampled(), f"grandchildren {self.grandchildren()} not seen; output:\n{self.text()[-3000:]}"

    def survivors(self) -> list[str]:
        def alive(p: psutil.Process) -> bool:
            try:  # is_running also compares start times, so a reused PID does not count
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False
        return [f"{pid} {' '.join(cmd)}" for pid, (p, cmd) in self.seen.items() if alive(p)]

    def assert_no_orphans(self) -> None:
        wait_for(lambda: not self.survivors(), 10)
        assert not self.survivors(), "processes outlived the launcher:\n" + "\n".join(self.survivors())

    def kill_all(self) -> None:
        """Last-resort cleanup of whatever is left, by recorded PID."""
        self.sample()
        if self.proc.poll() is None:
            self.proc.kill()
        for p, _ in self.seen.values():
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Callable[..., Launch]]:
    launches: list[Launch] = []

    def start(workers: int, servers: int, script: str, *args: str) -> Launch:
        assert CLI.exists(), f"no console script at {CLI}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MV_")}
        output = tmp_path / f"launch{len(launches)}.out"
        with open(output, "w") as out:
            proc = subprocess.Popen(
                [str(CLI), "run", "--workers", str(workers), "--servers", str(servers), "--",
                 sys.executable, "-c", script, *args],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=tmp_path)
        launch = Launch(proc, output)
        launches.append(launch)
        return launch

    yield start
    for launch in launches:
        launch.kill_all()


def test_launcher_stops_everything_when_a_worker_fails(launcher: Callable[..., Launch], tmp_path: Path) -> None:
    go = tmp_path / "go"
    launch = launcher(2, 2, SLEEPER, str(go), "1")
    launch.wait_grandchildren(1)  # the other worker's grandchild exists and was seen
    go.touch()
    start = time.monotonic()  # worker 1 exits 3 now
    status = launch.wait_exit(30)
    assert status == 3, f"launcher exited {status}; output:\n{launch.text()}"
    assert time.monotonic() - start < 8, "the launcher took too long to stop the job"
    assert launch.roles() == {"scheduler": 1, "server": 2, "worker": 2}, launch.seen
    assert len(launch.grandchildren()) == 1, launch.text()
    launch.assert_no_orphans()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_to_the_launcher_stops_everything(launcher: Callable[..., Launch], tmp_path: Path,
                                                 sig: signal.Signals) -> None:
    launch = launcher(2, 2, SLEEPER, str(tmp_path / "go"), "-1")
    launch.wait_grandchildren(2)
    launch.proc.send_signal(sig)
    start = time.monotonic()
    status = launch.wait_exit(30)
    assert status != 0, f"the launcher exited 0 after {sig.name}"
    assert time.monotonic() - start < 8, "the launcher took too long to stop the job"
    assert launch.roles() == {"scheduler": 1, "server": 2, "worker": 2}, launch.seen
    launch.assert_no_orphans()


def test_worker_crash_mid_job(launcher: Callable[..., Launch]) -> None:
    launch = launcher(2, 2, CRASHER)
    status = launch.wait_exit(60)
    text = launch.text()
    assert status == 1, f"launcher exited {status}; output:\n{text}"
    lines = text.splitlines()
    assert "[worker 0] rank 0 sees 2" in lines, text
    assert "[worker 1] rank 1 sees 2" in lines, text
    assert "[worker 1] RuntimeError: boom in the middle of the job" in lines, text
    assert "[worker 1] Traceback (most recent call last):" in lines, text
    assert launch.roles()["server"] == 2 and launch.roles()["scheduler"] == 1, launch.seen
    launch.assert_no_orphans()


def test_a_hung_server_is_declared_dead_and_requests_to_it_fail_fast() -> None:
    """SIGSTOP: the server's connections stay open, so only missing heartbeats tell."""
    with LocalCluster(workers=1, servers=1, heartbeat_timeout=1.0) as cluster:
        with mv.init(cluster.address, timeout=30):
            table = mv.ArrayTable(4, name="t")
            table.add(np.ones(4))
            os.kill(cluster.servers[0].pid, signal.SIGSTOP)
            try:
                start = time.monotonic()
                with pytest.raises(mv.ConnectionLost, match="server 0"):
                    table.get()
                assert time.monotonic() - start < 10, "the get waited for its 30 s timeout instead"
                declared = "server 0 answered nothing for 1.0s: declared dead"
                assert wait_for(lambda: declared in cluster.log.getvalue(), 10), cluster.log.getvalue()
            finally:
                os.kill(cluster.servers[0].pid, signal.SIGCONT)
