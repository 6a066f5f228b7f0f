"""Peer parameter servers the benchmarks are judged against, each run as its own processes.

This module only launches them: it never imports torch or ray, so the multiverso_py
benchmarks run in a process without them, and a machine without one skips that peer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import socket
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from benchmarks.limits import watchdog

Samples = dict[str, list[float]]  # figure name -> per-round values (latencies: every call)


@dataclass(frozen=True)
class PeerSizes:
    table_rows: int  # the sparse table is table_rows x cols float32
    cols: int
    batch_rows: int  # random rows per sparse request
    requests: int  # sparse requests per timed round
    rounds: int
    dense_bytes: int
    dense_rounds: int
    small_adds: int  # adds per timed round: the peers do a few thousand per second
    small_gets: int


FULL = PeerSizes(table_rows=1_000_000, cols=16, batch_rows=4096, requests=30, rounds=7,
                 dense_bytes=64 << 20, dense_rounds=9, small_adds=5000, small_gets=1000)
QUICK = PeerSizes(table_rows=1_000_000, cols=16, batch_rows=4096, requests=10, rounds=3,
                  dense_bytes=16 << 20, dense_rounds=3, small_adds=1000, small_gets=200)
PEER_TIMEOUT_S = 180.0  # the measuring process's whole run, start-up included
EXIT_GRACE_S = 20.0  # for the framework's own shutdown once the measuring process has reported


@dataclass(frozen=True)
class Peer:
    """A peer's module exposes run_role(role, port, sizes, conn); the last role measures
    and sends its Samples (or an error string) through conn, the others serve."""

    name: str  # as printed and reported
    key: str  # its results file: benchmarks/results/<key>.json
    module: str
    framework: str  # the distribution it needs; without it the peer is skipped
    extra: str  # the multiverso-py extra that installs it
    roles: tuple[str, ...]
    own_session: bool = False  # the roles start daemons of their own: kill their process group after
    env: tuple[tuple[str, str], ...] = ()  # set in each role's process before the module is imported


TORCH_RPC = Peer("torch.distributed.rpc peer", "torch_rpc", "benchmarks.peers.torch_rpc", "torch", "torch",
                 ("ps", "trainer"))
# Local Ray as Ray runs it on macOS and Windows: every daemon bound to 127.0.0.1. No usage
# stats; token authentication, as Ray's default for a local cluster, but said explicitly.
RAY = Peer("Ray actor peer", "ray_ps", "benchmarks.peers.ray_ps", "ray", "peers", ("driver",), own_session=True,
           env=(("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                ("RAY_AUTH_MODE", "token")))


def free_port() -> int:
    """A port free on 127.0.0.1 now; the rendezvous store binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_role(peer: Peer, role: str, port: int, sizes: PeerSizes, conn: Connection | None, parent: int) -> None:
    """Child entry point: import the peer here, so only the children load its framework."""
    if peer.own_session:
        os.setsid()  # whatever the framework starts shares this group, so none can outlive the run
    watchdog(parent)
    os.environ.update(peer.env)
    importlib.import_module(peer.module).run_role(role, port, sizes, conn)


def reply(conn: Connection, train: Callable[[], Samples]) -> None:
    """For a peer's measuring role: send train()'s samples, or what went wrong, which the
    launcher prints before skipping the peer."""
    try:
        conn.send(train())
    except Exception as exc:  # noqa: BLE001 - reported by the launcher
        conn.send(f"{type(exc).__name__}: {exc}")


def measure(peer: Peer, sizes: PeerSizes, timeout_s: float = PEER_TIMEOUT_S) -> Samples | None:
    """Run the peer's processes; the samples of its measuring role, or None (with the
    reason printed) when it cannot run."""
    if importlib.util.find_spec(peer.framework) is None:
        print(f"note: {peer.framework} is not installed; skipping the {peer.name} "
              f"(pip install 'multiverso-py[{peer.extra}]')")
        return None
    ctx = mp.get_context("spawn")
    port = free_port()
    recv_end, send_end = ctx.Pipe(duplex=False)
    procs = [ctx.Process(target=_run_role, daemon=True,
                         args=(peer, role, port, sizes, send_end if role == peer.roles[-1] else None, os.getpid()))
             for role in peer.roles]
    for proc in procs:
        proc.start()
    send_end.close()
    replied = False  # then they shut down by themselves; otherwise they are killed at once
    try:
        result, replied = _receive(peer, recv_end, procs, timeout_s)
    finally:
        recv_end.close()
        _stop(procs, EXIT_GRACE_S if replied else 0, peer.own_session)
    return result


def _receive(peer: Peer, conn: Connection, procs: list[BaseProcess], timeout_s: float) -> tuple[Samples | None, bool]:
    """The peer's samples, and whether it replied at all."""
    try:
        if not conn.poll(timeout_s):
            print(f"note: the {peer.name} did not finish within {timeout_s:g} s; skipping it")
            return None, False
        answer: Any = conn.recv()
    except EOFError:
        for proc in procs:
            proc.join(1.0)  # for its exit code
        print(f"note: the {peer.name} exited early (exit codes {[p.exitcode for p in procs]}); skipping it")
        return None, False
    if not isinstance(answer, dict):
        print(f"note: the {peer.name} failed: {answer}")
        return None, True
    return answer, True


def _stop(procs: list[BaseProcess], grace_s: float, own_session: bool) -> None:
    for proc in procs:
        proc.join(grace_s)
    for proc in procs:  # all at once: a survivor logs its lost peer loudly
        if proc.is_alive():
            proc.kill()
    for proc in procs:
        proc.join()
        if own_session:
            _kill_group(proc.pid)


def _kill_group(pgid: int | None) -> None:
    """Kill what is left of a process group that a peer process led (a daemon its
    framework started that outlived it); nothing when the group is empty."""
    if pgid is None:
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def figures(samples: Samples) -> dict[str, float]:
    """Medians of every figure; latencies (names ending _us) as p50 and p99 of every call."""
    out: dict[str, float] = {}
    for name, values in samples.items():
        if name.endswith("_us"):
            stem = name[:-3]
            out[f"{stem}_p50_us"], out[f"{stem}_p99_us"] = (float(np.percentile(values, p)) for p in (50, 99))
        else:
            out[name] = statistics.median(values)
    return out


def save(peer: Peer, samples: Samples, sizes: PeerSizes, quick: bool, out: Path = report.RESULTS) -> None:
    """<key>.json: the peer's figures and samples, for any benchmark that reports against it."""
    data = {"mode": "quick" if quick else "full", "sizes": asdict(sizes),
            peer.framework: importlib.metadata.version(peer.framework),
            "machine": report.machine_info(), "figures": figures(samples), "samples": samples}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{peer.key}.json").write_text(json.dumps(data, indent=2) + "\n")
