"""The PyTorch integration with CUDA tensors, against plain PyTorch on the same device:
tables taking CUDA tensors, ParamManager on a model on the GPU (one worker, and two
worker processes), PSOptimizer against torch.optim.SGD and Adam, the server-backed
Embedding against nn.Embedding's gradients. Real scheduler and server processes, as in
test_torch.py. Everything here needs a CUDA device and is skipped without one."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import multiverso_py as mv  # noqa: E402
from multiverso_py import testing  # noqa: E402
from multiverso_py.torch import Embedding, ParamManager, PSOptimizer  # noqa: E402
from torch_models import Branchy, train_embedding  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.timeout(120)]

CUDA = torch.device("cuda")


@pytest.fixture
def cluster_job(no_scheduler_env: None) -> Iterator[None]:
    """This process as the only worker of a job with 2 real server processes."""
    with testing.LocalCluster(workers=1, servers=2, log_level="warning") as cluster:
        with mv.init(cluster.address, timeout=20):
            yield


def on_cuda(module: nn.Module) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device.type == "cuda", f"{name} left the GPU: {t.device}"


def storage(module: nn.Module) -> list[int]:
    """Where each tensor lives: updates must land in place, not in new tensors."""
    return [t.data_ptr() for t in [*module.parameters(), *module.buffers()]]


# ---------------------------------------------------------------- tables


def test_tables_take_cuda_tensors(cluster_job: None) -> None:
    dense = mv.ArrayTable(6)
    grad_tracked = torch.arange(6, dtype=torch.float32, device=CUDA).requires_grad_(True)
    dense.add(grad_tracked)
    dense.add(torch.full((6,), 0.5, dtype=torch.bfloat16, device=CUDA))  # widened on the host
    dense.add(torch.full((2,), 0.25, dtype=torch.float16, device=CUDA), torch.tensor([1, 4], device=CUDA))
    np.testing.assert_array_equal(dense.get(), np.arange(6) + 0.5 + np.array([0, 0.25, 0, 0, 0.25, 0]))
    np.testing.assert_array_equal(dense.get(torch.tensor([4, 0], device=CUDA)), [4.75, 0.5])
    with pytest.raises(mv.InvalidArgument, match="cannot be cast safely"):
        mv.ArrayTable(2, "int64").add(torch.ones(2, device=CUDA))
    with pytest.raises(mv.IndexOutOfRange):
        dense.get(torch.tensor([6], device=CUDA))

    matrix = mv.MatrixTable(5, 3, "float64")
    rows = torch.tensor([3, 1, 3], device=CUDA)  # a repeated row sums
    matrix.add(torch.ones(3, 3, dtype=torch.float64, device=CUDA), rows)
    expected = np.zeros((5, 3))
    expected[1], expected[3] = 1, 2
    np.testing.assert_array_equal(matrix.get(), expected)
    np.testing.assert_array_equal(matrix.get(torch.tensor([3, 0], device=CUDA)), expected[[3, 0]])

    sparse = mv.SparseMatrixTable(8, 2)
    sparse.add(torch.tensor([[1.0, 2.0], [0.0, 0.0]], device=CUDA), torch.tensor([6, 2], device=CUDA))
    np.testing.assert_array_equal(sparse.get(torch.tensor([6, 2], device=CUDA)), [[1, 2], [0, 0]])

    kv = mv.KVTable(2)
    keys = torch.tensor([10**12, -5, 7], device=CUDA)
    kv.add(keys, torch.arange(6, dtype=torch.float32, device=CUDA).view(3, 2))
    np.testing.assert_array_equal(kv.get(keys.flip(0)), [[4, 5], [2, 3], [0, 1]])


# ---------------------------------------------------------------- ParamManager


class Mixed(nn.Module):
    """float32, float64 and bfloat16 parameters and BatchNorm buffers (int64 included)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2).double()
        self.low = nn.Parameter(torch.randn(5).to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.lin(x)).double()).sum(dim=1) + self.low.double().sum()


def test_param_manager_syncs_a_model_on_cuda(cluster_job: None) -> None:
    torch.manual_seed(0)
    net = Mixed().to(CUDA)
    pm = ParamManager(net, name="cudanet", buffers=True)
    on_cuda(net)
    where = storage(net)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for _ in range(2):
        with torch.no_grad():
            for k, v in net.state_dict().items():
                v.add_(1 if k.endswith("num_batches_tracked") else 1.5)
        pm.sync()
    for k, v in net.state_dict().items():
        tol = 0.1 if v.dtype == torch.bfloat16 else 1e-5
        expected = start[k] + (2 if k.endswith("num_batches_tracked") else 3.0)
        torch.testing.assert_close(v, expected, atol=tol, rtol=0, msg=lambda m: f"{k}: {m}")
    on_cuda(net)
    assert storage(net) == where
    # The float32 table holds what the module's float32 and bfloat16 tensors hold, in
    # ParamManager's order; bfloat16 holds the table's value rounded.
    table = torch.from_numpy(pm.tables[0].get())
    tensors = {**dict(net.named_parameters()), **dict(net.named_buffers())}
    at = 0
    for t in (tensors[n] for n in pm.names if tensors[n].dtype in (torch.float32, torch.bfloat16)):
        part, at = table[at:at + t.numel()], at + t.numel()
        tol = 0.05 if t.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(t.detach().float().flatten().cpu(), part, atol=tol, rtol=0)
    assert at == len(table)
    # A real local step on the GPU, then a sync: a single worker keeps what it computed.
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net(torch.randn(8, 6, device=CUDA)).pow(2).mean().backward()
    opt.step()
    trained = {k: v.detach().clone() for k, v in net.state_dict().items()}
    pm.sync()
    for k, v in net.state_dict().items():
        tol = 0.05 if v.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(v, trained[k], atol=tol, rtol=1e-6, msg=lambda m: f"{k}: {m}")
    assert storage(net) == where


CUDA_WORKER = textwrap.dedent("""
    import torch
    from torch import nn
    import multiverso_py as mv
    from multiverso_py.torch import ParamManager

    with mv.init():
        rank, n = mv.worker_id(), mv.workers_num()
        torch.manual_seed(100 + rank)
        net = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).cuda()
        pm = ParamManager(net, name="net", buffers=True)
        start = {k: v.clone() for k, v in net.state_dict().items()}  # the master's, on every worker
        with torch.no_grad():
            for k, v in net.state_dict().items():
                v.add_(1 if k.endswith("num_batches_tracked") else rank + 1)
        pm.sync()
        mv.clock()
        mv.barrier()
        pm.sync()
        for k, v in net.state_dict().items():
            added = n if k.endswith("num_batches_tracked") else n * (n + 1) // 2
            if v.device.type != "cuda" or not torch.allclose(v, start[k] + added, atol=1e-5):
                raise SystemExit(f"MISMATCH worker {rank}: {k} = {v}, expected {start[k] + added}")
        print("SUM", float(sum(v.double().sum() for v in net.state_dict().values())))
""")


def test_param_manager_cuda_workers_agree(tmp_path: Path) -> None:
    script = tmp_path / "cuda_worker.py"
    script.write_text(CUDA_WORKER)
    result = testing.run_job(str(script), workers=2, servers=2, timeout=100)
    report = testing.job_report(result)
    assert result.returncode == 0, report
    assert "MISMATCH" not in result.stdout, report
    sums = [line.split()[-1] for line in result.stdout.splitlines() if " SUM " in line]
    assert len(sums) == 2 and sums[0] == sums[1], report


# ---------------------------------------------------------------- PSOptimizer against torch.optim


MakeOpt = Callable[[Iterator[nn.Parameter]], torch.optim.Optimizer]


def twin_runs(make_ps: MakeOpt, make_ref: MakeOpt, steps: int = 8, ref_device: torch.device = CUDA
              ) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    """The same model, batches and loss through PSOptimizer on the GPU and through a
    reference optimizer on `ref_device`."""
    torch.manual_seed(0)
    ps_model, ref_model = Branchy(), Branchy()
    ref_model.load_state_dict(ps_model.state_dict())
    ps_model, ref_model = ps_model.to(CUDA), ref_model.to(ref_device)
    ps_opt, ref_opt = make_ps(ps_model.parameters()), make_ref(ref_model.parameters())
    where = storage(ps_model)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen, dtype=torch.float64)
        for model, opt in ((ps_model, ps_opt), (ref_model, ref_opt)):
            device = next(model.parameters()).device
            opt.zero_grad()
            (model(x.to(device), step) - y.to(device)).pow(2).mean().backward()
            opt.step()
    on_cuda(ps_model)
    assert storage(ps_model) == where  # weights landed in place
    return ps_model, ref_model, ps_opt, ref_opt


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p.detach().cpu(), q.detach().cpu(), atol=atol, rtol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


def test_psoptimizer_sgd_matches_torch_sgd_on_cuda(cluster_job: None) -> None:
    ps, ref, _, _ = twin_runs(lambda p: PSOptimizer(p, updater="sgd", lr=0.1),
                              lambda p: torch.optim.SGD(p, lr=0.1))
    assert_same_weights(ps, ref, atol=1e-6)
    assert not torch.equal(ps.side.weight.cpu(), Branchy().side.weight)  # it trained


def test_psoptimizer_adam_matches_torch_adam_on_cuda(cluster_job: None) -> None:
    ps, ref, _, _ = twin_runs(
        lambda p: PSOptimizer(p, updater="adam", lr=0.01, betas=(0.8, 0.99), weight_decay=0.01),
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.01), steps=10)
    assert_same_weights(ps, ref, atol=1e-5)


def test_overlap_on_cuda_matches_overlap_on_cpu(cluster_job: None) -> None:
    """overlap=True lands each pull a step later: the host buffer must not be refilled
    while its copy to the GPU is still running. The same run with CPU parameters (tested
    against the update rule in test_torch.py) is the reference."""
    ps, ref, ps_opt, ref_opt = twin_runs(
        lambda p: PSOptimizer(p, updater="adam", lr=0.01, overlap=True, name="gpu"),
        lambda p: PSOptimizer(p, updater="adam", lr=0.01, overlap=True, name="cpu"),
        steps=10, ref_device=torch.device("cpu"))
    assert_same_weights(ps, ref, atol=1e-5)  # each one step behind its table
    ps_opt.pull()
    ref_opt.pull()
    assert_same_weights(ps, ref, atol=1e-5)  # and the tables agree after the last pushes
    on_cuda(ps)


# ---------------------------------------------------------------- Embedding against nn.Embedding


@pytest.mark.parametrize("num_embeddings", [None, 20], ids=["kv", "sparse_matrix"])
def test_embedding_on_cuda_matches_nn_embedding(cluster_job: None, num_embeddings) -> None:
    dim, pad = 4, 3
    emb = Embedding(dim, num_embeddings, updater="sgd", lr=1.0, padding_idx=pad, name="emb")
    ids = torch.tensor([[1, 5, 3, 5], [7, 1, 1, 3], [5, 9, 3, 3]], device=CUDA)  # repeats and padding
    touched = np.array([1, 5, 7, 9])
    before = emb.table.get(touched) if num_embeddings is None else emb.table.get(row_ids=touched)
    ref = nn.Embedding(10, dim, padding_idx=pad).to(CUDA)
    with torch.no_grad():
        ref.weight[torch.from_numpy(touched).to(CUDA)] = torch.from_numpy(before).to(CUDA)
    proj = torch.randn(dim, 2, generator=torch.Generator().manual_seed(0)).to(CUDA)

    out = emb(ids)
    assert out.device.type == "cuda" and out.shape == (3, 4, dim) and out.dtype == torch.float32
    assert torch.equal(out[ids == pad], torch.zeros(4, dim, device=CUDA))
    torch.testing.assert_close(out.detach(), ref(ids).detach())
    (out @ proj).pow(2).sum().backward()  # on CUDA, autograd runs this backward on its device thread
    (ref(ids) @ proj).pow(2).sum().backward()
    emb.flush()

    after = emb.table.get(touched) if num_embeddings is None else emb.table.get(row_ids=touched)
    grad = ref.weight.grad[torch.from_numpy(touched).to(CUDA)].cpu()
    torch.testing.assert_close(torch.from_numpy(before - after), grad)
    if num_embeddings is None:
        assert len(emb.table) == len(touched)  # the padding id was never pulled or pushed
    with torch.no_grad():
        assert emb(ids.to(torch.int32)).device.type == "cuda"
        assert emb(torch.empty(0, dtype=torch.int64, device=CUDA)).device.type == "cuda"


def test_embedding_trains_on_cuda(cluster_job: None) -> None:
    torch.manual_seed(0)
    first, last, _ = train_embedding(Embedding(8, updater="adagrad", lr=0.3), CUDA)
    assert last < 0.2 * first
