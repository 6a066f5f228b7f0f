"""The consistency models: the vector clock's rules on their own, then async, SSP and BSP
jobs of real processes started by `multiverso-py run` (and, for a worker killed with
SIGKILL, by hand next to a LocalCluster)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from multiverso_py import testing
from multiverso_py.consistency import Kind, Model, TableClock
from multiverso_py.errors import InvalidArgument

RUN_TIMEOUT = 90.0


# ---------------------------------------------------------------- the clock's rules


class Recorder:
    """Collects what a TableClock releases, in order."""

    def __init__(self) -> None:
        self.released: list[str] = []

    def admit(self, clock: TableClock, worker: int, kind: Kind, name: str) -> bool:
        return clock.admit(worker, kind, lambda: self.released.append(name))


def test_ssp_get_waits_only_beyond_the_staleness() -> None:
    clock, rec = TableClock(Model.SSP, 2, {0: 0, 1: 0}), Recorder()
    for _ in range(2):
        clock.tick(0)
    assert rec.admit(clock, 0, Kind.GET, "get at 2")  # 2 ahead of worker 1: within s = 2
    clock.tick(0)
    assert not rec.admit(clock, 0, Kind.GET, "get at 3")  # 3 ahead: held
    assert rec.admit(clock, 1, Kind.ADD, "add at 0")  # SSP adds never wait for anyone
    clock.tick(1)
    assert rec.released == ["get at 3"]
    assert clock.held() == 0


def test_bsp_holds_adds_until_their_clock_completes_and_runs_them_before_gets() -> None:
    clock, rec = TableClock(Model.BSP, 0, {0: 0, 1: 0}), Recorder()
    assert not rec.admit(clock, 0, Kind.ADD, "add 0@0")
    clock.tick(0)
    assert not rec.admit(clock, 0, Kind.GET, "get 0@1")  # worker 1 is still at clock 0
    assert rec.admit(clock, 1, Kind.GET, "get 1@0")  # clock 0 is complete for gets at 0
    assert not rec.admit(clock, 1, Kind.ADD, "add 1@0")
    assert rec.released == []
    clock.tick(1)  # clock 0 done everywhere: both adds of clock 0, then the get at 1
    assert rec.released == ["add 0@0", "add 1@0", "get 0@1"]


def test_a_workers_requests_never_overtake_its_held_ones() -> None:
    clock, rec = TableClock(Model.SSP, 0, {0: 0, 1: 0}), Recorder()
    clock.tick(0)
    assert not rec.admit(clock, 0, Kind.GET, "get")
    assert not rec.admit(clock, 0, Kind.ADD, "add after it")  # would run at once, but not ahead of the get
    assert rec.admit(clock, 1, Kind.ADD, "other worker's add")
    clock.tick(1)
    assert rec.released == ["get", "add after it"]


def test_a_bsp_get_passes_its_own_workers_held_adds_of_the_clock() -> None:
    """add; get (no clock in between): the get must not see the add, so it need not wait for it."""
    clock, rec = TableClock(Model.BSP, 0, {0: 0, 1: 0}), Recorder()
    assert not rec.admit(clock, 0, Kind.ADD, "add 0@0")
    assert rec.admit(clock, 0, Kind.GET, "get 0@0")
    assert not rec.admit(clock, 0, Kind.ADD, "second add 0@0")
    clock.tick(0)
    clock.tick(1)
    assert rec.released == ["add 0@0", "second add 0@0"]


def test_a_worker_that_leaves_stops_counting() -> None:
    clock, rec = TableClock(Model.BSP, 0, {0: 0, 1: 0, 2: 0}), Recorder()
    clock.tick(0)
    clock.tick(1)
    assert not rec.admit(clock, 0, Kind.GET, "get 0@1")
    clock.drop(2)
    assert rec.released == ["get 0@1"]
    with pytest.raises(InvalidArgument, match="worker 2 is not a live worker"):
        clock.admit(2, Kind.ADD, lambda: None)
    clock.drop(0)
    clock.drop(1)
    assert clock.slowest() == float("inf")  # nobody left to wait for


def test_async_never_holds_and_initial_content_is_never_held() -> None:
    clock = TableClock(Model.ASYNC, 0, {0: 0, 1: 0})
    for _ in range(5):
        clock.tick(0)
    assert clock.admit(0, Kind.GET, lambda: None) and clock.admit(0, Kind.ADD, lambda: None)
    bsp = TableClock(Model.BSP, 0, {0: 0, 1: 0})
    assert bsp.admit(0, Kind.SET, lambda: None)
    with pytest.raises(InvalidArgument, match="staleness"):
        TableClock(Model.SSP, -1, {})


# ---------------------------------------------------------------- jobs of real processes

COMMON = """
import json, os, sys, time
from pathlib import Path
import numpy as np
import multiverso_py as mv

HERE = Path(__file__).parent


def wait_until(condition, what, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"worker {mv.worker_id()}: timed out waiting for {what}")
        time.sleep(0.01)


def save(name, value):
    (HERE / f"{name}{mv.worker_id()}.json").write_text(json.dumps(value))
"""


def write_script(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(COMMON) + textwrap.dedent(body))
    return script


def run(tmp_path: Path, body: str, workers: int) -> None:
    result = testing.run_job(write_script(tmp_path, body), workers=workers, servers=2, timeout=RUN_TIMEOUT)
    assert result.returncode == 0, testing.job_report(result)


def saved(tmp_path: Path, name: str, workers) -> dict[int, list]:
    return {w: json.loads((tmp_path / f"{name}{w}.json").read_text()) for w in workers}


BSP_JOB = """
CLOCKS, EARLY_EXIT_AFTER = 6, 3  # the last worker adds at clocks 0..2 and leaves without a last clock
mv.init(timeout=30)
w, n = mv.worker_id(), mv.workers_num()
table = mv.ArrayTable(n, dtype="float64", name="bsp", consistency="bsp")
early = w == n - 1
seen = []
for c in range(EARLY_EXIT_AFTER if early else CLOCKS):
    time.sleep(0.02 * w)  # workers of different speeds
    seen.append(table.get().tolist())
    delta = np.zeros(n)
    delta[w] = (c + 1) * (w + 1)
    table.add_async(delta / 2)  # two adds a clock, batched ones included
    table.add(delta / 2)
    if not (early and c == EARLY_EXIT_AFTER - 1):
        mv.clock()
save("seen", seen)
mv.shutdown()
"""


def test_bsp_gets_at_a_clock_are_identical_and_hold_exactly_the_earlier_clocks(tmp_path: Path) -> None:
    workers, early_exit_after = 3, 3
    run(tmp_path, BSP_JOB, workers)
    seen = saved(tmp_path, "seen", range(workers))
    for c in range(6):
        at_c = [seen[w][c] for w in range(workers) if c < len(seen[w])]
        # every add issued at clocks < c: worker v adds (k + 1) * (v + 1) at clock k
        expected = [sum((k + 1) * (v + 1) for k in range(min(c, 6 if v < workers - 1 else early_exit_after)))
                    for v in range(workers)]
        for got in at_c:
            assert got == at_c[0], f"clock {c}: workers saw different values: {at_c}"
        assert at_c[0] == expected, f"clock {c}: got {at_c[0]}, expected {expected}"
    assert len(seen[0]) == 6  # the others were not stalled by the worker that left early


SSP_JOB = """
S = 2
mv.init(timeout=30)
w = mv.worker_id()
table = mv.ArrayTable(2, dtype="float64", name="ssp", consistency="ssp", staleness=S)
signal = mv.ArrayTable(1, name="signal")  # async: it must keep working while SSP gets wait
if w == 0:  # the fast worker
    report = []
    for c in range(6):
        future = table.get_async()
        if c <= S:  # the slow worker is still at clock 0: at most S ahead, never waits
            values = future.result(timeout=10)
        else:
            if c == S + 1:  # more than S ahead: held until the slow worker finishes clock 0
                time.sleep(0.5)
                report.append(["done while held", future.done()])
                signal.add([1.0])
            values = future.result(timeout=20)
        report.append([c, values.tolist()])
        table.add([1.0, 0.0])
        mv.clock()
    save("fast", report)
else:  # the slow worker: finishes clock 0 only once the fast one is held at clock S + 1
    wait_until(lambda: signal.get()[0] >= 1, "the fast worker's signal")
    table.add([0.0, 1.0])  # the same partition as the held get: holding a get blocks no add
    mv.clock()
    for c in range(1, 3):
        table.add([0.0, 1.0])
        mv.clock()
    save("slow", table.get().tolist())
mv.shutdown()  # the slow worker leaves at clock 3 while the fast one goes on to clock 6
"""


def test_ssp_blocks_a_worker_exactly_when_it_is_more_than_s_clocks_ahead(tmp_path: Path) -> None:
    run(tmp_path, SSP_JOB, workers=2)
    report = saved(tmp_path, "fast", [0])[0]
    assert ["done while held", False] in report, report
    gets = [entry for entry in report if isinstance(entry[0], int)]
    assert [c for c, _ in gets] == list(range(6))
    for c, (own, slow) in gets:
        assert own == c, f"clock {c}: the fast worker's own adds are missing: {own}"
        assert slow >= c - 2, f"clock {c}: a get must include the slow worker's adds from clocks < {c - 2}: {slow}"
        if c <= 2:
            assert slow == 0, f"clock {c}: the slow worker had not added yet, but the get saw {slow}"


ASYNC_JOB = """
mv.init(timeout=10)
table = mv.ArrayTable(2, name="async", consistency="async")
signal = mv.ArrayTable(1, name="signal")
if mv.worker_id() == 0:  # fast: 20 clocks while the slow worker has not finished one
    for c in range(20):
        values = table.get()
        table.add([1.0, 0.0])
        mv.clock()
    save("fast", values.tolist())
    signal.add([1.0])
else:
    wait_until(lambda: signal.get()[0] >= 1, "the fast worker")
    table.add([0.0, 1.0])
    mv.clock()
mv.shutdown()
"""


def test_async_never_waits_for_a_slow_worker(tmp_path: Path) -> None:
    run(tmp_path, ASYNC_JOB, workers=2)
    assert saved(tmp_path, "fast", [0])[0] == [19.0, 0.0]


KILLED_WORKER = """
mv.init(timeout=30)
w = mv.worker_id()
table = mv.ArrayTable(2, dtype="float64", name="bsp", consistency="bsp")
seen = []
for c in range(5):
    seen.append(table.get().tolist())
    delta = np.zeros(2)
    delta[w] = 1.0
    table.add(delta)  # acknowledged (held) before the worker goes on
    if w == 1 and c == 1:
        os.kill(os.getpid(), 9)  # dies at clock 1, after its add
    mv.clock()
save("seen", seen)
wait_until(lambda: mv.workers_num() == 1, "workers_num() to count only the live worker")
mv.shutdown()
"""


def start_workers(script: Path, cluster: testing.LocalCluster) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, str(script)], env={**os.environ, **cluster.worker_env(rank)},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for rank in range(cluster.workers)]


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_a_worker_killed_with_sigkill_does_not_stall_bsp(tmp_path: Path) -> None:
    script = write_script(tmp_path, KILLED_WORKER)
    with testing.LocalCluster(workers=2, servers=1) as cluster:
        procs = start_workers(script, cluster)
        try:
            outputs = [p.communicate(timeout=RUN_TIMEOUT)[0] for p in procs]
        finally:
            stop_all(procs)
    assert procs[1].returncode == -9, outputs[1]
    assert procs[0].returncode == 0, outputs[0] + cluster.log.getvalue()
    seen = saved(tmp_path, "seen", [0])[0]
    # worker 1's adds at clocks 0 and 1 count (both were acknowledged); it counts no more after
    assert seen == [[float(c), min(c, 2.0)] for c in range(5)], seen


STOPPED_WORKER = """
mv.init(timeout=30)
w = mv.worker_id()
table = mv.ArrayTable(2, dtype="float64", name="bsp", consistency="bsp")
seen = []
for c in range(4):
    seen.append(table.get().tolist())
    delta = np.zeros(2)
    delta[w] = 1.0
    table.add(delta)
    mv.clock()
    if w == 1:  # hangs after its first clock (its I/O thread would go on sending heartbeats)
        (HERE / "hanging").write_text("")
        time.sleep(RUN_TIMEOUT)
save("seen", seen)
mv.shutdown()
"""


def test_a_hung_worker_is_declared_dead_by_heartbeat_and_stops_counting(tmp_path: Path) -> None:
    script = write_script(tmp_path, f"RUN_TIMEOUT = {RUN_TIMEOUT}\n" + STOPPED_WORKER)
    with testing.LocalCluster(workers=2, servers=1, heartbeat_timeout=1.0) as cluster:
        procs = start_workers(script, cluster)
        try:
            assert testing.wait_for(lambda: (tmp_path / "hanging").exists(), 30), "worker 1 never got to clock 1"
            # busy but alive (its heartbeats go on): never declared dead, however long it takes
            assert not testing.wait_for(lambda: "declared dead" in cluster.log.getvalue(), 2.5)
            os.kill(procs[1].pid, signal.SIGSTOP)  # no more heartbeats: the scheduler must give up on it
            output = procs[0].communicate(timeout=RUN_TIMEOUT)[0]
        finally:
            stop_all(procs)
        assert procs[0].returncode == 0, output + cluster.log.getvalue()
        assert testing.wait_for(lambda: "worker 1 sent nothing for 1.0s: declared dead" in cluster.log.getvalue(), 10)
    # worker 1 finished clock 0 only: its one add counts from clock 1 on
    assert saved(tmp_path, "seen", [0])[0] == [[0.0, 0.0], [1.0, 1.0], [2.0, 1.0], [3.0, 1.0]]


def test_ssp_and_bsp_in_an_embedded_job() -> None:
    """One worker alone is never held back: its gets see its own adds of earlier clocks
    (and, under BSP, not those of the current one)."""
    import multiverso_py as mv

    with mv.init():
        bsp = mv.ArrayTable(3, consistency="bsp")
        ssp = mv.ArrayTable(3, consistency="ssp", staleness=1)
        for c in range(3):
            np.testing.assert_array_equal(bsp.get(), np.full(3, c))
            np.testing.assert_array_equal(ssp.get(), np.full(3, c))
            bsp.add(np.ones(3))
            ssp.add(np.ones(3))
            np.testing.assert_array_equal(bsp.get(), np.full(3, c))  # BSP: not even its own add of clock c
            np.testing.assert_array_equal(ssp.get(), np.full(3, c + 1))  # SSP: read-your-writes
            mv.clock()


REJOIN = """
mv.init(timeout=30)
w = mv.worker_id()
table = mv.ArrayTable(2, dtype="float64", name="t")
restarted = (HERE / "first-run-of-1").exists() and w == 1
if w == 1 and not restarted:
    (HERE / "first-run-of-1").write_text("")
    for _ in range(5):
        table.add([0.0, 1.0])
    os.kill(os.getpid(), 9)  # dies; the test starts it again with the same id
for _ in range(5):
    table.add([1.0, 0.0] if w == 0 else [0.0, 1.0])
if w == 0:  # stays in the job (alone, it would end it) until the restarted worker 1 has added
    wait_until(lambda: table.get()[1] >= 10, "the restarted worker's adds", timeout=60)
mv.barrier()
save("final", table.get().tolist())
mv.shutdown()
"""


def test_a_worker_restarted_with_its_id_rejoins(tmp_path: Path) -> None:
    script = write_script(tmp_path, REJOIN)
    with testing.LocalCluster(workers=2, servers=1) as cluster:
        procs = start_workers(script, cluster)
        try:
            assert procs[1].wait(30) == -9
            again = subprocess.Popen([sys.executable, str(script)], env={**os.environ, **cluster.worker_env(1)},
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            procs.append(again)
            outputs = [procs[0].communicate(timeout=RUN_TIMEOUT)[0], again.communicate(timeout=RUN_TIMEOUT)[0]]
        finally:
            stop_all(procs)
        assert procs[0].returncode == 0 and again.returncode == 0, "\n".join(outputs) + cluster.log.getvalue()
        assert testing.wait_for(lambda: "worker 1 rejoined the job" in cluster.log.getvalue(), 10)
    # the dead process's 5 adds and the new one's 5 all count: its fresh sequence numbers were not mistaken for old ones
    assert saved(tmp_path, "final", [0, 1]) == {0: [5.0, 10.0], 1: [5.0, 10.0]}
