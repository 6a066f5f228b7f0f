"""Smoke tests of the benchmark suite's newer parts on tiny sizes: the Ray actor peer (when
ray is installed) leaves no daemon behind, the concurrent push ends at its closed form,
the scaling run checks every server count, the memory probe reads peaks, and the comparison
rows invert targets for latencies, the actions timed side by side take turns, and the
round trip across two CPUs runs its ends where it says."""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks/ is not installed

from benchmarks import concurrent, limits, memory, peers, scaling, versus  # noqa: E402
from benchmarks.report import Row  # noqa: E402

TINY = peers.PeerSizes(table_rows=1000, cols=4, batch_rows=64, requests=2, rounds=1, dense_bytes=1 << 20,
                       dense_rounds=1, small_adds=20, small_gets=10)
RAY_DAEMONS = ("raylet", "gcs_server", "ray::")


def _ray_processes_since(start: float) -> list[str]:
    found = []
    for proc in psutil.process_iter(["name", "cmdline", "create_time"]):
        names = [proc.info["name"] or "", *(proc.info["cmdline"] or [])[:1]]
        if proc.info["create_time"] >= start and any(d in n for d in RAY_DAEMONS for n in names):
            found.append(f"{proc.pid} {names}")
    return found


@pytest.mark.timeout(120)
def test_ray_peer_measures_every_figure_and_leaves_nothing_running() -> None:
    # Ray is the optional `peers` extra (an 80 MB install that starts a cluster of daemons),
    # not part of the test install: the suite runs this where a user installed it, and
    # test_a_missing_framework_skips_the_peer covers the benchmark without it.
    pytest.importorskip("ray")
    start = time.time() - 1
    samples = peers.measure(peers.RAY, TINY)
    assert samples is not None
    figures = peers.figures(samples)
    assert {case.peer_figure for case in versus.RAY} <= set(figures), figures
    assert all(value > 0 for value in figures.values()), figures
    assert len(samples["small_get_us"]) == TINY.small_gets
    time.sleep(1)
    assert _ray_processes_since(start) == []


def test_a_missing_framework_skips_the_peer(capsys: pytest.CaptureFixture[str]) -> None:
    absent = peers.Peer("absent peer", "absent", "benchmarks.peers.absent", "no_such_framework_here", "peers",
                        ("driver",))
    assert peers.measure(absent, TINY) is None
    assert "no_such_framework_here is not installed; skipping the absent peer" in capsys.readouterr().out


@pytest.mark.timeout(90)
def test_concurrent_push_ends_at_the_closed_form() -> None:
    sizes = concurrent.Sizes(workers=2, servers=2, dense_bytes=1 << 20, pushes=2, rounds=2)
    reports = concurrent.measure(sizes)
    expected = concurrent.expected_value(sizes)
    assert expected == 2 * (1 + 2 * 2)
    assert all(r.final_min == r.final_max == expected for r in reports)
    rates = concurrent.aggregate_gbps(reports, sizes)
    assert len(rates) == sizes.rounds and all(rate > 0 for rate in rates)


@pytest.mark.timeout(90)
def test_memory_probe_sees_the_table_on_the_server_and_the_result_on_the_worker() -> None:
    sizes = memory.Sizes(table_bytes=64 << 20)
    figures = memory.measure(sizes)
    assert figures["server_peak_out"] >= figures["server_idle"] + sizes.table_bytes * 0.9
    assert figures["worker_peak_out"] >= figures["worker_idle"] + sizes.table_bytes * 0.9
    rows = memory.rows(figures, sizes)
    assert {row.verdict for row in rows if row.target is not None} <= {"PASS", "MISS"}


def test_versus_rows_divide_by_the_peer_and_invert_latency_targets() -> None:
    mine = [Row(case.ours, case.ours, 100.0, "µs" if "get_p" in case.ours else "GB/s", "limit", 1.0,
                lower_is_better="get_p" in case.ours) for case in versus.RAY + versus.TORCH]
    ray = {"small_get_us": [1000.0] * 100, **{case.peer_figure: [50.0] for case in versus.RAY if "_us" not in
                                             case.peer_figure}}
    rows = {row.key: row for row in versus.run(mine, ray, None, TINY)}
    assert rows["ray_small_get_p50"].ratio == pytest.approx(0.1)
    assert rows["ray_small_get_p50"].target == pytest.approx(0.1) and rows["ray_small_get_p50"].verdict == "PASS"
    assert rows["ray_dense_push"].ratio == pytest.approx(2.0) and rows["ray_dense_push"].verdict == "PASS"
    assert rows["torch_dense_pull"].verdict == "n/a" and "(skipped)" in rows["torch_dense_pull"].limit_name


@pytest.mark.timeout(120)
def test_scaling_runs_each_server_count_and_checks_the_final_value(tmp_path: Path) -> None:
    plan = scaling.Plan(servers=(1, 2), workers=2, dense_bytes=1 << 20, pushes=2, rounds=2)
    rows, extra = scaling.run(plan, {"socket_stream_gbps": 1.0})
    assert [r.key for r in rows] == ["push_1_servers", "push_2_servers"]
    assert all(len(r.samples) == plan.rounds and r.value > 0 for r in rows)
    runs = extra["runs"]
    assert all(r["final_value"]["ok"] and r["final_value"]["expected"] == 2 * (1 + 2 * 2) for r in runs)
    assert runs[0]["speedup"] == 1.0 and runs[1]["speedup"] == pytest.approx(rows[1].value / rows[0].value)
    assert [len(r["cpu"]["servers"]) for r in runs] == [len(r["cpu"]["server_loops"]) for r in runs] == [1, 2]
    assert all(len(r["cpu"]["workers"]) == 2 for r in runs)
    scaling.write_results(rows, extra, {"socket_stream_gbps": 1.0, "memcpy_gbps": 1.0}, plan, quick=True,
                          out=tmp_path)
    table = (tmp_path / "scaling.md").read_text()
    assert table.count("10 everywhere") == 2 and "MISMATCH" not in table and (tmp_path / "scaling.json").exists()


def test_actions_timed_side_by_side_take_turns_after_one_warm_up_each() -> None:
    calls: list[str] = []
    times = limits.interleaved_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b"] * 4  # the warm-ups, then three rounds in turn
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for t in times["a"] + times["b"])
    rates = limits.rates(10.0, {"slow": lambda: time.sleep(0.02)}, 2)["slow"]
    assert len(rates) == 2 and all(0 < r <= 10.0 / 0.02 for r in rates)  # per_round / seconds


@pytest.mark.timeout(60)
def test_the_round_trip_across_two_cpus_runs_its_ends_there_and_gives_the_caller_its_cpus_back() -> None:
    cpus = limits.two_cpus()
    if cpus is None:
        pytest.skip("needs two CPUs and sched_setaffinity (Linux)")
    before = os.sched_getaffinity(0)

    async def where(client: object) -> tuple[set[int], list[list[int]]]:
        helpers = [psutil.Process(child.pid).cpu_affinity() for child in mp.active_children()]
        return os.sched_getaffinity(0), helpers

    client_cpus, helper_cpus = limits._run_echo(1, where, 30.0, "affinity probe", cpus=cpus)
    assert client_cpus == {cpus[0]} and helper_cpus == [[cpus[1]]]
    assert os.sched_getaffinity(0) == before
    latency = limits.uvloop_pingpong_us(n=50, warmup=5, cpus=cpus)
    assert 0 < latency["p50"] <= latency["p99"]
    assert os.sched_getaffinity(0) == before
