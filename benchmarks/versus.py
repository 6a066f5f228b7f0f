"""multiverso_py against the peer parameter servers, workload by workload: the figures
benchmarks.dense and benchmarks.sparse measured, each divided by the same workload's
figure on the Ray actor peer (benchmarks.peers.ray_ps) or the torch.distributed.rpc peer
(benchmarks.peers.torch_rpc), all from the same run. For latencies the ratio is
multiverso_py's time over the peer's, so 0.1x is ten times faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from benchmarks import peers, report
from benchmarks.peers import Samples
from benchmarks.report import Row
from benchmarks.sparse import sci

RAY_DENSE_TARGET = 1.0  # same-host dense pull and push at least on par with the Ray actor
RAY_SMALL_TARGET = 10.0  # >= 10x Ray on small ops; latency <= 1/10 of Ray's
TORCH_TARGET = 3.0  # >= 3x torch RPC on dense and small ops; latency <= 1/3


@dataclass(frozen=True)
class Versus:
    key: str
    ours: str  # the key of a dense or sparse Row
    peer_figure: str  # a key of benchmarks.peers.figures() of the peer
    workload: str
    peer_call: str  # what the peer does for it
    target: float | None  # a ratio to reach (>=); for latencies its inverse is the ratio not to exceed


RAY = (
    Versus("ray_dense_pull_into", "dense_pull_out", "dense_pull_into_gbps", "dense pull {mib} MiB, get(out=)",
           "ray.get + np.copyto into a reused array", RAY_DENSE_TARGET),
    Versus("ray_dense_pull_copy", "dense_pull", "dense_pull_copy_gbps", "dense pull {mib} MiB, get()",
           "ray.get(...).copy()", RAY_DENSE_TARGET),
    Versus("ray_dense_pull_view", "dense_pull_out", "dense_pull_view_gbps", "dense pull {mib} MiB, get(out=)",
           "ray.get, read-only view (data not read)", None),
    Versus("ray_dense_push", "dense_push", "dense_push_gbps", "dense push {mib} MiB, add()", "apply_gradients",
           RAY_DENSE_TARGET),
    Versus("ray_small_get_p50", "small_get_p50", "small_get_p50_us", "small get p50 (16 floats)", "get_small p50",
           RAY_SMALL_TARGET),
    Versus("ray_small_get_p99", "small_get_p99", "small_get_p99_us", "small get p99 (16 floats)", "get_small p99",
           RAY_SMALL_TARGET),
    Versus("ray_small_adds", "small_adds_all", "small_adds_all_per_s", "small add_async, all in flight",
           "apply_small.remote, all in flight", RAY_SMALL_TARGET),
    Versus("ray_rows_pull", "row_pull_matrix", "sparse_pull_rows_per_s", "MatrixTable.get({batch} rows), {shape}",
           "get_rows", None),
    Versus("ray_rows_push", "row_push_matrix", "sparse_push_rows_per_s", "MatrixTable.add({batch} rows), {shape}",
           "apply_row_gradients (np.add.at)", None),
)
TORCH = (
    Versus("torch_dense_pull", "dense_pull_out", "dense_pull_gbps", "dense pull {mib} MiB, get(out=)",
           "rpc_sync pull_dense", TORCH_TARGET),
    Versus("torch_dense_push", "dense_push", "dense_push_gbps", "dense push {mib} MiB, add()", "rpc_sync push_dense",
           TORCH_TARGET),
    Versus("torch_small_get_p50", "small_get_p50", "small_get_p50_us", "small get p50 (16 floats)",
           "rpc_sync get_small p50", TORCH_TARGET),
)


def _rows(cases: Sequence[Versus], peer_name: str, ours: dict[str, Row], theirs: dict[str, float] | None,
          names: dict[str, str]) -> list[Row]:
    out = []
    for case in cases:
        row = ours[case.ours]
        latency = row.lower_is_better
        target = None if case.target is None else (1 / case.target if latency else case.target)
        limit = theirs[case.peer_figure] if theirs else float("nan")
        name = f"{peer_name} {case.peer_call}" + ("" if theirs else " (skipped)")
        out.append(Row(case.key, f"vs {peer_name}: " + case.workload.format(**names), row.value, row.unit, name, limit,
                       lower_is_better=latency, target=target, samples=row.samples))
    return out


def run(mine: list[Row], ray: Samples | None, torch: Samples | None, sizes: peers.PeerSizes) -> list[Row]:
    """Rows comparing `mine` (dense and sparse rows of this run) with each peer's samples."""
    ours = {row.key: row for row in mine}
    names = {"mib": sizes.dense_bytes >> 20, "batch": sizes.batch_rows,
             "shape": f"{sci(sizes.table_rows)}x{sizes.cols}"}
    return (_rows(RAY, "Ray", ours, ray and peers.figures(ray), names)
            + _rows(TORCH, "torch RPC", ours, torch and peers.figures(torch), names))


NOTES = ["For latencies the ratio is multiverso_py's time over the peer's (0.10x: ten times faster); for "
         "the rest it is multiverso_py's rate over the peer's. Ray hands large values over through its "
         "shared-memory object store: ray.get of the weights returns a read-only view whose pages are only "
         "mapped, so the view row is a bound, not a like-for-like figure."]


def write_results(rows: list[Row], limits: dict[str, float], quick: bool, sizes: peers.PeerSizes) -> None:
    report.write_results("peers", "multiverso_py against peer parameter servers", rows, limits, quick,
                         asdict(sizes), NOTES)
