"""A soak test under chaos: 4 workers do random gets and adds on dense, sparse and KV
tables for a bounded time while the test kills a server with SIGKILL twice and
`multiverso-py run` replaces it each time. At the end every value on the servers that
were never killed equals the reference computed from the acknowledged adds; on the
killed server each value lies between zero and that reference (what the guarantee
allows to be lost is the adds acknowledged after the latest checkpoint), and the job
finishes cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil

from multiverso_py import testing
from multiverso_py.tables.kv import as_keys, partition_of

ROWS, KEYS, SECONDS = 512, 64, 6.0
WORKER = f"""
import json, time
from pathlib import Path
import numpy as np
import multiverso_py as mv

HERE = Path(__file__).parent
mv.init(timeout=60)
w = mv.worker_id()
rng = np.random.default_rng(w)
dense = mv.ArrayTable({ROWS}, dtype="int64", name="dense")
sparse = mv.SparseMatrixTable({ROWS}, 2, name="sparse")
kv = mv.KVTable(dim=2, dtype="int64", name="kv")
ref = {{"dense": np.zeros({ROWS}, np.int64), "sparse": np.zeros(({ROWS}, 2)), "kv": np.zeros(({KEYS}, 2), np.int64)}}
(HERE / f"started{{w}}").write_text("")
end = time.monotonic() + {SECONDS}
while time.monotonic() < end:
    what = rng.integers(0, 6)
    if what == 0:
        dense.add(np.ones({ROWS}, np.int64)); ref["dense"] += 1
    elif what == 1:
        idx = rng.integers(0, {ROWS}, 20); dense.add(np.ones(20, np.int64), idx); np.add.at(ref["dense"], idx, 1)
    elif what == 2:
        rows = rng.integers(0, {ROWS}, 16); sparse.add(np.ones((16, 2)), rows); np.add.at(ref["sparse"], rows, 1)
    elif what == 3:
        keys = rng.integers(0, {KEYS}, 8); kv.add(keys, np.ones((8, 2), np.int64)); np.add.at(ref["kv"], keys, 1)
    else:  # reads: they must come back whatever happens to a server
        dense.get(rng.integers(0, {ROWS}, 10)); sparse.get(rng.integers(0, {ROWS}, 10)); kv.get(rng.integers(0, {KEYS}, 5))
(HERE / f"ref{{w}}.json").write_text(json.dumps({{k: v.tolist() for k, v in ref.items()}}))
mv.barrier()
if w == 0:
    got = {{"dense": dense.get().tolist(), "sparse": sparse.get().tolist(), "kv": kv.get(np.arange({KEYS})).tolist(),
           "layouts": {{t._info.name: [t._info.owners, t._info.layout] for t in (dense, sparse, kv)}}}}
    (HERE / "got.json").write_text(json.dumps(got))
mv.shutdown()
"""


def test_soak_with_a_server_killed_twice(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MV_")}
    launcher = subprocess.Popen([sys.executable, "-m", "multiverso_py", "--log-level", "warning", "run",
                                 "--workers", "4", "--servers", "2", "--checkpoint-dir", str(tmp_path / "ckpt"),
                                 "--checkpoint-every", "0.3", "--", sys.executable, str(script)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert testing.wait_for(lambda: all((tmp_path / f"started{w}").exists() for w in range(4)), 60)
        for _ in range(2):  # the chaos loop: kill server 1 twice, once a checkpoint exists
            assert testing.wait_for(lambda: (tmp_path / "ckpt" / "LATEST").exists(), 30)
            time.sleep(1.0)  # let adds pile up after the checkpoint: some are to be lost
            server = next(p for p in psutil.Process(launcher.pid).children()
                          if "server" in p.cmdline() and p.is_running() and _server_index(p) == 1)
            os.kill(server.pid, signal.SIGKILL)
        output = launcher.communicate(timeout=120)[0]
    finally:
        if launcher.poll() is None:
            launcher.terminate()
            launcher.communicate(timeout=30)
    assert launcher.returncode == 0, output
    assert output.count("starting a replacement") == 2, output
    got = json.loads((tmp_path / "got.json").read_text())
    refs = [json.loads((tmp_path / f"ref{w}.json").read_text()) for w in range(4)]
    reference = {name: sum(np.array(r[name]) for r in refs) for name in ("dense", "sparse", "kv")}
    for name in ("dense", "sparse", "kv"):
        values, expected = np.array(got[name]), reference[name]
        survivor = _on_server_0(name, *got["layouts"][name])
        np.testing.assert_array_equal(values[survivor], expected[survivor], err_msg=f"{name}: lost on server 0")
        assert (0 <= values).all() and (values <= expected).all(), f"{name}: more than was added"


def _on_server_0(name: str, owners: list, layout: dict) -> np.ndarray:
    """Which rows (or keys 0..KEYS-1) live on server 0, the one never killed."""
    if name == "kv":
        return np.array(owners)[partition_of(as_keys(np.arange(KEYS)), layout["partitions"])] == 0
    mask = np.zeros(ROWS, bool)
    for p, owner in enumerate(owners):
        mask[layout["bounds"][p]:layout["bounds"][p + 1]] = owner == 0
    return mask


def _server_index(proc: psutil.Process) -> int:
    """Which server a process is: the launcher names the first ones by their ready file."""
    cmdline = proc.cmdline()
    if "--ready-file" in cmdline:
        return int(Path(cmdline[cmdline.index("--ready-file") + 1]).name.removeprefix("server"))
    return 1  # a replacement: only server 1 is ever replaced here
