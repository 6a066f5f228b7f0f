"""Peer parameter servers the benchmarks are judged against, each run as its own processes.

This module only launches them: it never imports torch, so the multiverso_py benchmarks
run in a process without it, and a machine without torch skips the peer.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import socket
import statistics
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
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
    small_adds: int  # adds per timed round: torch RPC does a few thousand per second
    small_gets: int


FULL = PeerSizes(table_rows=1_000_000, cols=16, batch_rows=4096, requests=30, rounds=7,
                 dense_bytes=64 << 20, dense_rounds=5, small_adds=5000, small_gets=1000)
QUICK = PeerSizes(table_rows=1_000_000, cols=16, batch_rows=4096, requests=10, rounds=3,
                  dense_bytes=16 << 20, dense_rounds=3, small_adds=1000, small_gets=200)
PEER_TIMEOUT_S = 180.0  # the trainer's whole run, start-up included
EXIT_GRACE_S = 20.0  # for rpc.shutdown on both sides once the trainer has reported


def free_port() -> int:
    """A port free on 127.0.0.1 now; the rendezvous store binds it a moment later."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_role(module: str, role: str, port: int, sizes: PeerSizes, conn: Connection | None, parent: int) -> None:
    """Child entry point: import the peer here, so only the children load its framework."""
    watchdog(parent)
    importlib.import_module(module).run_role(role, port, sizes, conn)


def measure_torch_rpc(sizes: PeerSizes, timeout_s: float = PEER_TIMEOUT_S) -> Samples | None:
    """Run the torch.distributed.rpc peer (benchmarks.peers.torch_rpc) as a server and a
    trainer process; their samples, or None (with the reason printed) when it cannot run."""
    if importlib.util.find_spec("torch") is None:
        print("note: torch is not importable; skipping the torch.distributed.rpc peer")
        return None
    ctx = mp.get_context("spawn")
    port = free_port()
    recv_end, send_end = ctx.Pipe(duplex=False)
    module = "benchmarks.peers.torch_rpc"
    procs = [ctx.Process(target=_run_role, args=(module, "ps", port, sizes, None, os.getpid()), daemon=True),
             ctx.Process(target=_run_role, args=(module, "trainer", port, sizes, send_end, os.getpid()), daemon=True)]
    for proc in procs:
        proc.start()
    send_end.close()
    result: Samples | None = None
    replied = False  # then both shut down by themselves; otherwise they are killed at once
    try:
        if recv_end.poll(timeout_s):
            reply: Any = recv_end.recv()
            replied = True
            if isinstance(reply, dict):
                result = reply
            else:
                print(f"note: the torch.distributed.rpc peer failed: {reply}")
        else:
            print(f"note: the torch.distributed.rpc peer did not finish within {timeout_s:g} s; skipping it")
    except EOFError:
        print(f"note: the torch.distributed.rpc peer exited early ({[p.exitcode for p in procs]}); skipping it")
    finally:
        recv_end.close()
        for proc in procs:
            proc.join(EXIT_GRACE_S if replied else 0)
        for proc in procs:  # all at once: a survivor logs its lost peer loudly
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
    return result


def save_torch_rpc(samples: Samples, sizes: PeerSizes, quick: bool, out: Path = report.RESULTS) -> None:
    """torch_rpc.json: the peer's medians (latency percentiles) and samples, for any
    benchmark that reports against it."""
    figures = {name: statistics.median(values) for name, values in samples.items() if name != "small_get_us"}
    for pct in (50, 99):
        figures[f"small_get_p{pct}_us"] = float(np.percentile(samples["small_get_us"], pct))
    data = {"mode": "quick" if quick else "full", "sizes": asdict(sizes), "torch": importlib.metadata.version("torch"),
            "machine": report.machine_info(), "figures": figures, "samples": samples}
    out.mkdir(parents=True, exist_ok=True)
    (out / "torch_rpc.json").write_text(json.dumps(data, indent=2) + "\n")
