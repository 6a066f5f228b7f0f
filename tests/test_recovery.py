"""Recovery: a server killed with SIGKILL in the middle of a two-worker job is replaced by
a new server process; it reloads its partitions from the latest checkpoint, the workers
reconnect and resend what was in flight, and the job finishes with nothing lost beyond
what the guarantee allows (adds acknowledged after that checkpoint, on that server)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from multiverso_py import shm, testing

ADDS = 400
JOB = f"""
import json, time
from pathlib import Path
import numpy as np
import multiverso_py as mv

HERE = Path(__file__).parent
mv.init(timeout=60)
table = mv.ArrayTable(1 << 18, name="counts", dtype="int64")  # 2 MiB: partitions on both servers
ones = np.ones(1 << 18, np.int64)
for i in range({ADDS}):
    table.add(ones)  # every add spans both servers and is acknowledged before the next
    if i == 100 and mv.worker_id() == 0:
        (HERE / "running").write_text("")
    time.sleep(0.004)
mv.barrier()
if mv.worker_id() == 0:
    info = table._info
    (HERE / "final.json").write_text(json.dumps({{"values": table.get().tolist(), "owners": info.owners,
                                                  "bounds": info.layout["bounds"],
                                                  "shared": mv.api._job.client.shared_memory.moved_bytes}}))
mv.shutdown()
"""


def test_a_killed_server_is_replaced_from_the_checkpoint_and_the_job_finishes(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(JOB))
    with testing.LocalCluster(workers=2, servers=2, checkpoints=(str(tmp_path / "ckpt"), 0.3)) as cluster:
        workers = [subprocess.Popen([sys.executable, str(script)], env={**os.environ, **cluster.worker_env(rank)},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
        replacement = None
        try:
            assert testing.wait_for(lambda: (tmp_path / "running").exists()
                                    and (tmp_path / "ckpt" / "LATEST").exists(), 60), "the job never got going"
            killed = time.monotonic()
            cluster.kill_server(1)
            assert testing.wait_for(lambda: "disconnected; waiting for a replacement" in cluster.log.getvalue(), 10)
            replacement = subprocess.Popen([sys.executable, "-m", "multiverso_py", "server", "--scheduler",
                                            cluster.address], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True)
            assert testing.wait_for(lambda: "server 1 is back" in cluster.log.getvalue(), 60), cluster.log.getvalue()
            print(f"recovered {time.monotonic() - killed:.2f} s after the kill (a new process started by hand)")
            outputs = [w.communicate(timeout=90)[0] for w in workers]
        finally:
            for proc in [*workers, *([replacement] if replacement else [])]:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()
        log = cluster.log.getvalue()
    assert all(w.returncode == 0 for w in workers), "\n".join(outputs) + log
    assert "server 1 is back" in log, log
    final = json.loads((tmp_path / "final.json").read_text())
    if shm.usable():  # then the resent adds went through shared memory too
        assert final["shared"] > 0, "the adds (1 MiB per server) did not go through shared memory"
    values, bounds = np.array(final["values"]), final["bounds"]
    on = {sid: np.concatenate([values[bounds[p]:bounds[p + 1]] for p, owner in enumerate(final["owners"])
                               if owner == sid]) for sid in set(final["owners"])}
    assert (on[0] == 2 * ADDS).all(), "the server that lived lost adds"
    # the replaced server: the checkpoint's adds plus every later one, each whole (a consistent cut)
    assert on[1].min() == on[1].max(), "the replaced server holds a torn state"
    print("replaced server holds", on[1][0], "of", 2 * ADDS)
    assert 0 < on[1][0] <= 2 * ADDS


RUN_JOB = """
import json, os, signal, time
from pathlib import Path
import numpy as np
import psutil
import multiverso_py as mv

HERE = Path(__file__).parent
mv.init(timeout=60)
table = mv.ArrayTable(1 << 16, name="counts", dtype="int64")
ones = np.ones(1 << 16, np.int64)
for i in range(300):
    table.add(ones)
    if i == 100 and mv.worker_id() == 0:  # kill -9 a server the launcher started, once a checkpoint exists
        deadline = time.monotonic() + 30
        while not (HERE / "ckpt" / "LATEST").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        launcher = psutil.Process(os.getppid())
        server = next(p for p in launcher.children() if "server" in p.cmdline() and "--ready-file" in p.cmdline())
        os.kill(server.pid, signal.SIGKILL)
    time.sleep(0.003)
mv.barrier()
if mv.worker_id() == 0:
    (HERE / "done.json").write_text(json.dumps(int(table.get().max())))
mv.shutdown()
"""


def test_run_replaces_a_server_that_dies(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(RUN_JOB))
    result = testing.run_job(script, workers=2, servers=2, timeout=120,
                             options=("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0.3"))
    assert result.returncode == 0, testing.job_report(result)
    assert "starting a replacement" in result.stderr + result.stdout, testing.job_report(result)
    assert json.loads((tmp_path / "done.json").read_text()) == 600  # the rows on the server that lived
