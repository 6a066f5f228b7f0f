"""Checkpoints: a consistent cut across servers while workers keep adding, bit-identical
values and optimizer state after a restore, safetensors files any reader can open, and
an interrupted checkpoint that never replaces a good one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import multiverso_py as mv
from multiverso_py import checkpoint, testing

RUN_TIMEOUT = 120.0


def run(tmp_path: Path, body: str, workers: int, servers: int = 2, options: tuple = ()) -> None:
    script = tmp_path / f"job{len(list(tmp_path.glob('job*.py')))}.py"
    script.write_text("import json, sys, time\nfrom pathlib import Path\nimport numpy as np\nimport multiverso_py as mv\n"
                      f"HERE = Path({str(tmp_path)!r})\n" + textwrap.dedent(body))
    result = testing.run_job(script, workers=workers, servers=servers, timeout=RUN_TIMEOUT, options=options)
    assert result.returncode == 0, testing.job_report(result)


CUT = """
mv.init(timeout=60)
w = mv.worker_id()
table = mv.ArrayTable(1 << 20, name="counts", dtype="int64")  # 8 MiB: partitions on both servers
kv = mv.KVTable(dim=2, name="kv", dtype="int64")
ones = np.ones(1 << 20, np.int64)
if w == 0:
    for _ in range(20):
        table.add_async(ones)  # whole-table adds: every one spans both servers
    path = mv.checkpoint(HERE / "ckpt")
    (HERE / "cut.json").write_text(json.dumps({"path": path}))
else:
    for i in range(60):  # the other worker adds all along, checkpoint or not
        table.add_async(ones)
        kv.add([i % 7, -1], [[1, 1], [1, 1]])
mv.barrier()
(HERE / f"final{w}.json").write_text(json.dumps({"count": int(table.get([0])[0]), "kv": len(kv)}))
mv.shutdown()
"""


def test_a_checkpoint_is_a_consistent_cut_across_servers(tmp_path: Path) -> None:
    run(tmp_path, CUT, workers=2)
    tables = checkpoint.load(tmp_path / "ckpt")
    counts = tables["counts"].values
    assert counts.shape == (1 << 20,)
    # no add half-applied: each whole-table add moved every element, on both servers, or none
    assert counts.min() == counts.max(), f"a torn checkpoint: counts from {counts.min()} to {counts.max()}"
    assert 20 <= counts[0] <= 80  # worker 0's 20 adds were flushed first; worker 1's, some of its 60
    kv = tables["kv"]
    assert kv.values.shape == (len(kv.keys), 2) and set(kv.keys) <= set(range(7)) | {-1}
    final = json.loads((tmp_path / "final0.json").read_text())
    assert final["count"] == 80  # the checkpoint paused the job; it lost nothing


TRAIN = """
mv.init(timeout=60)
rng = np.random.default_rng(7)
w = mv.MatrixTable(300, 4, name="w", updater="adam", lr=0.01)
e = mv.KVTable(dim=3, name="e", updater="adagrad", lr=0.1, init=("normal", 0.1))
s = mv.SparseMatrixTable(50, 2, name="s", updater="momentum", lr=0.1)
phase = "restored" if (HERE / "first.npz").exists() else "first"  # the second run starts from the checkpoint
steps = range(10, 20) if phase == "restored" else range(20)
for step in steps:
    rng = np.random.default_rng(step)  # the same gradients in both runs
    rows = rng.integers(0, 300, 40)
    w.add(rng.standard_normal((40, 4)).astype(np.float32), rows)
    e.add(rng.integers(-5, 5, 6), rng.standard_normal((6, 3)).astype(np.float32))
    s.add(rng.standard_normal((5, 2)).astype(np.float32), rng.integers(0, 50, 5))
    if phase == "first" and step == 9:
        mv.checkpoint(HERE / "train")
keys = np.arange(-5, 5)
np.savez(HERE / f"{phase}.npz", w=w.get(), e=e.get(keys), s=s.get())
mv.shutdown()
"""


def test_a_restored_job_continues_bit_identically(tmp_path: Path) -> None:
    run(tmp_path, TRAIN, workers=1)
    (tmp_path / "restored.py").write_text("")  # the phase travels as an argument: rewrite the script's argv
    script = next(tmp_path.glob("job*.py"))
    script.write_text(script.read_text().replace('phase = "restored" if (HERE / "first.npz").exists() else "first"  # the second run starts from the checkpoint',
                                                 'phase = "restored"'))
    result = testing.run_job(script, workers=1, servers=2, timeout=RUN_TIMEOUT,
                             options=("--restore", str(tmp_path / "train")))
    assert result.returncode == 0, testing.job_report(result)
    first, restored = np.load(tmp_path / "first.npz"), np.load(tmp_path / "restored.npz")
    for name in ("w", "e", "s"):
        np.testing.assert_array_equal(restored[name], first[name], err_msg=name)  # values and state: bit for bit
    state = checkpoint.load(tmp_path / "train")["w"].state
    assert set(state) == {"m", "v", "step"} and state["step"].max() > 0


PERIODIC = """
mv.init(timeout=60)
table = mv.ArrayTable(1 << 18, name="counts", dtype="int64")
ones = np.ones(1 << 18, np.int64)
deadline = time.monotonic() + 30
while not (HERE / "periodic" / "LATEST").exists() and time.monotonic() < deadline:
    table.add_async(ones)  # adds all along, while the scheduler checkpoints on its own
    time.sleep(0.01)
table.add(ones)
mv.shutdown()
"""


def test_periodic_checkpoints_while_workers_add(tmp_path: Path) -> None:
    run(tmp_path, PERIODIC, workers=2,
        options=("--checkpoint-dir", str(tmp_path / "periodic"), "--checkpoint-every", "0.3"))
    counts = checkpoint.load(tmp_path / "periodic")["counts"].values
    assert counts.min() == counts.max() > 0, (counts.min(), counts.max())


def test_files_are_standard_safetensors_and_load_needs_no_job(tmp_path: Path) -> None:
    with mv.init():
        table = mv.MatrixTable(5, 3, name="m", updater="adam", lr=0.1, init_value=np.arange(15.0).reshape(5, 3))
        table.add(np.ones((2, 3)), [1, 3])
        folder = Path(mv.checkpoint(tmp_path))
        expected = table.get()
    tensors = load_file(str(folder / "server0.safetensors"))  # the reference reader
    np.testing.assert_array_equal(tensors["t0/p0/data"], expected)
    np.testing.assert_array_equal(tensors["t0/p0/state/step"], [0, 1, 0, 1, 0])
    loaded = checkpoint.load(tmp_path)
    np.testing.assert_array_equal(loaded["m"].values, expected)
    assert loaded["m"].spec["updater"] == "adam"


def test_an_interrupted_checkpoint_never_replaces_a_good_one(tmp_path: Path) -> None:
    with mv.init():
        table = mv.ArrayTable(4, name="a")
        table.add(np.ones(4))
        good = mv.checkpoint(tmp_path)
        table.add(np.ones(4))
        # a checkpoint cut short after its files, before it was published: as after a crash
        tmp, _ = checkpoint.new_checkpoint_dir(str(tmp_path))
        (tmp / "server0.safetensors").write_bytes(b"partial")
        np.testing.assert_array_equal(checkpoint.load(tmp_path)["a"].values, np.ones(4))
        assert str(checkpoint.latest(str(tmp_path))) == good
        newer = mv.checkpoint(tmp_path)  # the next one goes through and becomes the latest
    assert newer != good
    np.testing.assert_array_equal(checkpoint.load(tmp_path)["a"].values, np.full(4, 2.0))


def test_bad_checkpoint_paths_and_restores_are_refused(tmp_path: Path) -> None:
    with pytest.raises(mv.InvalidArgument, match="holds no checkpoint"):
        checkpoint.load(tmp_path)
    with mv.init():
        mv.MatrixTable(4, 2, name="m").add(np.ones((4, 2)))
        mv.checkpoint(tmp_path)
    with mv.init(restore=str(tmp_path)):
        with pytest.raises(mv.TableSpecMismatch, match="checkpoint"):
            mv.MatrixTable(4, 3, name="m")
        np.testing.assert_array_equal(mv.MatrixTable(4, 2, name="m").get(), np.ones((4, 2)))
    with pytest.raises(mv.InvalidArgument, match="restore="):
        mv.init("127.0.0.1:1", restore=str(tmp_path))


def test_a_server_started_with_checkpoint_options_brings_periodic_checkpoints(tmp_path: Path) -> None:
    """The contract's `multiverso-py server --checkpoint-dir D --checkpoint-every S`: the
    scheduler takes the cut (it alone can pause the workers), as the server asked."""
    folder = tmp_path / "ckpt"
    with testing.LocalCluster(workers=1, servers=1) as cluster:
        extra = subprocess.Popen([sys.executable, "-m", "multiverso_py", "server", "--scheduler", cluster.address,
                                  "--checkpoint-dir", str(folder), "--checkpoint-every", "0.2"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            with mv.init(cluster.address, timeout=20):
                table = mv.ArrayTable(8, name="t")
                table.add(np.ones(8))
                assert testing.wait_for(lambda: (folder / "LATEST").exists(), 20), cluster.log.getvalue()
                np.testing.assert_array_equal(checkpoint.load(folder)["t"].values, np.ones(8))
        finally:
            extra.kill()
            extra.communicate()
    assert os.path.isdir(folder)


def test_load_keeps_only_state_that_every_partition_holds(tmp_path: Path) -> None:
    """A dcasgd backup exists only where its worker pulled: joined across partitions it
    would no longer line up with the values, so load() leaves it out."""
    folder, _ = checkpoint.new_checkpoint_dir(str(tmp_path))
    checkpoint.write_tensors(folder / "server0.safetensors", {
        "t0/p0/data": np.zeros((2, 3), np.float32), "t0/p0/state/v": np.ones((2, 3), np.float32),
        "t0/p0/state/backup/1": np.ones((2, 3), np.float32),
        "t0/p1/data": np.ones((2, 3), np.float32), "t0/p1/state/v": np.full((2, 3), 2, np.float32)}, {})
    spec = {"kind": "matrix", "shape": [4, 3], "dtype": "float32"}
    checkpoint.publish(folder, {"servers": 1, "workers": 1, "tables": {"m": {
        "id": 0, "spec": spec, "layout": {"bounds": [0, 2, 4]}, "owners": [0, 0],
        "files": {"0": "server0.safetensors", "1": "server0.safetensors"}}}})
    table = checkpoint.load(tmp_path)["m"]
    np.testing.assert_array_equal(table.values, [[0] * 3, [0] * 3, [1] * 3, [1] * 3])
    assert set(table.state) == {"v"}
    np.testing.assert_array_equal(table.state["v"][:, 0], [1, 1, 2, 2])


def test_a_table_restores_with_the_partitions_it_was_saved_with(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint keeps each table's layout, and a restored table takes that layout,
    not the one this version would choose: a checkpoint from a version that split KV and
    matrix tables in two per server restores whole (KV keys are placed by partition, so
    a new layout would look for them on the wrong shard)."""
    from multiverso_py.tables import kv, matrix

    keys = np.random.default_rng(2).integers(-2**62, 2**62, 3000)
    with monkeypatch.context() as old_version:
        old_version.setattr(kv, "PARTITIONS_PER_SERVER", 2)
        old_version.setattr(matrix, "ROW_PARTITIONS_PER_SERVER", 2)
        with mv.init():
            table = mv.KVTable(2, name="kv", insert_on_get=False)
            table.add(keys, np.stack([keys, -keys], axis=1).astype(np.float32))
            rows = mv.MatrixTable(100_000, 4, name="rows")  # 1.6 MB: split when the version splits
            rows.add(np.ones((3, 4)), [0, 60_000, 99_999])
            assert table.num_partitions == 2 and len(rows._info.layout["bounds"]) == 3
            mv.checkpoint(tmp_path)
    with mv.init(restore=str(tmp_path)):
        table = mv.KVTable(2, name="kv", insert_on_get=False)
        assert table.num_partitions == 2 and len(table) == len(np.unique(keys))
        np.testing.assert_array_equal(table.get(keys), np.stack([keys, -keys], axis=1).astype(np.float32))
        rows = mv.MatrixTable(100_000, 4, name="rows")
        np.testing.assert_array_equal(rows.get([0, 60_000, 99_999, 1]), [[1] * 4] * 3 + [[0] * 4])
        assert mv.KVTable(2, name="new").num_partitions == 1  # a table not in the checkpoint: this version's layout
