"""The PyTorch integration against plain PyTorch: ParamManager with three worker
processes, PSOptimizer against torch.optim.SGD and Adam (and an LR scheduler), the
server-backed Embedding against nn.Embedding's gradients. Real scheduler and server
processes throughout; the pytest process is the worker where one worker suffices."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import multiverso_py as mv  # noqa: E402
from multiverso_py import testing  # noqa: E402
from multiverso_py.torch import Embedding, ParamManager, PSOptimizer  # noqa: E402
from torch_models import Branchy, train_embedding  # noqa: E402

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cluster_job(no_scheduler_env: None) -> Iterator[None]:
    """This process as the only worker of a job with 2 real server processes."""
    with testing.LocalCluster(workers=1, servers=2, log_level="warning") as cluster:
        with mv.init(cluster.address, timeout=20):
            yield


# ---------------------------------------------------------------- ParamManager, several worker processes

PARAM_MANAGER_WORKER = textwrap.dedent("""
    import hashlib
    import numpy as np
    import torch
    from torch import nn
    import multiverso_py as mv
    from multiverso_py.torch import ParamManager

    ROUNDS = 3

    class Net(nn.Module):  # float32, float64, bfloat16 parameters and BatchNorm buffers
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)
            self.bn = nn.BatchNorm1d(4)
            self.head = nn.Linear(4, 2).double()
            self.low = nn.Parameter(torch.randn(5).to(torch.bfloat16))

        def forward(self, x):
            return self.head(self.bn(self.lin(x)).double())

    def fail(message):
        raise SystemExit(f"MISMATCH worker {mv.worker_id()}: {message}")

    def state(net):
        return {k: v.detach().clone() for k, v in net.state_dict().items()}

    with mv.init():
        rank, n = mv.worker_id(), mv.workers_num()  # the job's size (later: the workers still in it)
        torch.manual_seed(100)
        master = state(Net())  # what worker 0 starts from
        torch.manual_seed(100 + rank)
        net = Net()
        pm = ParamManager(net, name="net", buffers=True)
        for k, v in state(net).items():  # the master's initial values won
            if not torch.equal(v, master[k]):
                fail(f"initial {k} is not the master's")
        mv.barrier()  # no worker adds before every worker has checked its initial pull
        # Known changes: worker i adds i + 1 to every float and 1 to the batch counter per round.
        for _ in range(ROUNDS):
            with torch.no_grad():
                for k, v in net.state_dict().items():
                    v.add_(1) if k.endswith("num_batches_tracked") else v.add_(rank + 1)
            pm.sync()
            mv.clock()  # BSP applies a clock's adds once every worker finished it
        mv.barrier()
        pm.sync()
        total = ROUNDS * n * (n + 1) // 2
        for k, v in state(net).items():
            if k.endswith("num_batches_tracked"):
                expected, tol = master[k] + ROUNDS * n, 0
            else:
                expected, tol = master[k].double() + total, (0.5 if v.dtype == torch.bfloat16 else 1e-4)
            if not torch.allclose(v.double(), expected.double(), atol=tol, rtol=0):
                fail(f"{k} after the adds: {v} != {expected}")
        mv.clock()  # under BSP one sync per clock: a get waits behind this worker's own held add
        # Real training on different data per worker, synced every step.
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(rank)
        for _ in range(5):
            x = torch.randn(8, 6, generator=gen)
            opt.zero_grad()
            net(x).pow(2).mean().backward()
            opt.step()
            pm.sync()
            mv.clock()
        mv.barrier()
        pm.sync()
        digest = hashlib.sha256(b"".join(v.view(torch.uint8).numpy().tobytes() if v.dtype == torch.bfloat16
                                         else v.numpy().tobytes() for v in state(net).values())).hexdigest()
        print(f"DIGEST {digest}")
        print("ok")
""")


@pytest.mark.parametrize("consistency, workers", [("async", 3), ("bsp", 2)])
def test_param_manager_workers_agree(tmp_path: Path, consistency: str, workers: int) -> None:
    script = tmp_path / "param_manager_worker.py"
    script.write_text(PARAM_MANAGER_WORKER.replace("mv.init()", f"mv.init(consistency={consistency!r})"))
    result = testing.run_job(str(script), workers=workers, servers=2, timeout=80)
    report = testing.job_report(result)
    assert result.returncode == 0, report
    assert "MISMATCH" not in result.stdout, report
    digests = {int(w): d for w, d in re.findall(r"^\[worker (\d)\] DIGEST (\w+)$", result.stdout, re.M)}
    assert sorted(digests) == list(range(workers)), report
    assert len(set(digests.values())) == 1, f"workers ended with different weights\n{report}"


# ---------------------------------------------------------------- PSOptimizer against torch.optim


def twin_runs(make_ps, make_local, steps: int = 8, scheduler=None) -> tuple[nn.Module, nn.Module, list]:
    """The same model, batches and loss through PSOptimizer and through a local torch
    optimizer; returns both models and the learning rates seen per step."""
    torch.manual_seed(0)
    ps_model, local_model = Branchy(), Branchy()
    local_model.load_state_dict(ps_model.state_dict())
    ps_opt, local_opt = make_ps(ps_model.parameters()), make_local(local_model.parameters())
    scheds = [scheduler(ps_opt), scheduler(local_opt)] if scheduler else []
    gen = torch.Generator().manual_seed(1)
    lrs = []
    for step in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen, dtype=torch.float64)
        for model, opt in ((ps_model, ps_opt), (local_model, local_opt)):
            opt.zero_grad()
            (model(x, step) - y).pow(2).mean().backward()
            opt.step()
        lrs.append(ps_opt.param_groups[0]["lr"])
        for s in scheds:
            s.step()
    return ps_model, local_model, lrs


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == q.dtype
        torch.testing.assert_close(p.detach(), q.detach(), atol=atol, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def test_psoptimizer_sgd_matches_torch_sgd(cluster_job: None) -> None:
    ps, local, _ = twin_runs(lambda p: PSOptimizer(p, updater="sgd", lr=0.1),
                             lambda p: torch.optim.SGD(p, lr=0.1))
    assert_same_weights(ps, local, atol=1e-6)
    assert not torch.equal(ps.side.weight, Branchy().side.weight)  # it trained


def test_psoptimizer_adam_matches_torch_adam(cluster_job: None) -> None:
    ps, local, _ = twin_runs(lambda p: PSOptimizer(p, updater="adam", lr=0.01, betas=(0.8, 0.99)),
                             lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99)), steps=10)
    assert_same_weights(ps, local, atol=1e-5)


def test_lr_scheduler_changes_the_server_step(cluster_job: None) -> None:
    def step_lr(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)

    ps, local, lrs = twin_runs(lambda p: PSOptimizer(p, updater="sgd", lr=0.5),
                               lambda p: torch.optim.SGD(p, lr=0.5), steps=6, scheduler=step_lr)
    assert lrs == pytest.approx([0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    assert_same_weights(ps, local, atol=1e-6)
    # Had the servers kept lr=0.5, the weights would be far from the scheduled ones.
    constant, _, _ = twin_runs(lambda p: PSOptimizer(p, updater="sgd", lr=0.5, name="constant"),
                               lambda p: torch.optim.SGD(p, lr=0.5), steps=6)
    assert (constant.body.weight - ps.body.weight).abs().max() > 1e-3


def test_overlap_lands_each_pull_one_step_later(cluster_job: None) -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    opt = PSOptimizer(model.parameters(), updater="sgd", lr=0.1, overlap=True)
    x = torch.tensor([[1.0, 2.0, 3.0]])

    def grad_at(w: torch.Tensor) -> torch.Tensor:  # of (x @ w.T).sum() ** 2
        return 2 * (x @ w.T).sum() * x

    model(x).sum().pow(2).backward()
    opt.step()
    assert torch.equal(model.weight, w0)  # the first pull is still on its way
    opt.zero_grad()
    model(x).sum().pow(2).backward()  # computed on w0 again: one update old
    opt.step()
    w1 = w0 - 0.1 * grad_at(w0)
    torch.testing.assert_close(model.weight.detach(), w1)  # the first step's pull landed
    opt.pull()
    torch.testing.assert_close(model.weight.detach(), w1 - 0.1 * grad_at(w0))


def test_pulls_land_in_the_parameters_themselves(cluster_job: None) -> None:
    """Without overlap, CPU parameters become views of the optimizer's weight buffer: a
    step's pull writes them in place, and autograd still learns that they changed."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = PSOptimizer(model.parameters(), updater="sgd", lr=0.1, name="held")
    buffer = opt._slots[0][0].weights.host
    start = buffer.data_ptr()
    inside = range(start, start + buffer.numel() * buffer.element_size())
    assert all(p.data_ptr() in inside for p in model.parameters())
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    loss = model.weight.pow(2).sum() + model.bias.pow(2).sum()  # pow keeps its input for the backward
    loss.backward(retain_graph=True)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * 2 * w0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the graph's saved weights are not the weights any more
    model.bias.data = torch.zeros(2)  # storage of its own: the pull is copied into it
    opt.zero_grad()
    model.bias.sum().backward()
    opt.step()
    assert model.bias.data_ptr() not in inside
    torch.testing.assert_close(model.bias.detach(), torch.from_numpy(opt.tables[0][0].get()[8:]))
    torch.testing.assert_close(model.bias.detach(), b0 - 0.1 * 2 * b0 - 0.1)


def test_bsp_needs_overlap_and_works_with_it(cluster_job: None) -> None:
    with pytest.raises(mv.InvalidArgument, match="overlap=True"):
        PSOptimizer(nn.Linear(3, 1).parameters(), updater="sgd", lr=0.1, consistency="bsp")
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    w0 = model.weight.detach().clone()
    opt = PSOptimizer(model.parameters(), updater="sgd", lr=0.1, overlap=True, consistency="bsp", name="bsp")
    x = torch.tensor([[1.0, 2.0, 3.0]])
    for _ in range(2):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
        mv.clock()
    opt.pull()
    torch.testing.assert_close(model.weight.detach(), w0 - 2 * 0.1 * x)


def test_psoptimizer_master_values_win_and_state_dict(cluster_job: None) -> None:
    torch.manual_seed(3)
    model = nn.Linear(4, 2)
    first = PSOptimizer(model.parameters(), updater="momentum", lr=0.1, momentum=0.5, name="shared")
    other = nn.Linear(4, 2)  # different values; the existing table's win, as a non-master's would
    PSOptimizer(other.parameters(), updater="momentum", lr=0.1, momentum=0.5, name="shared")
    assert torch.equal(other.weight, model.weight)
    sched = torch.optim.lr_scheduler.StepLR(first, step_size=1, gamma=0.5)
    model(torch.ones(1, 4)).sum().backward()
    first.step()
    sched.step()
    saved = first.state_dict()
    assert saved["state"] == {}
    assert saved["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert saved["ps"] == [{"tables": ["shared/group0/float32"], "updater": "momentum",
                            "options": {"lr": 0.1, "momentum": 0.5}}]
    resumed = PSOptimizer(nn.Linear(4, 2).parameters(), updater="momentum", lr=0.1, momentum=0.5, name="shared")
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.05)
    wrong = PSOptimizer(nn.Linear(4, 2).parameters(), updater="momentum", lr=0.1, momentum=0.9, name="other")
    with pytest.raises(mv.InvalidArgument, match="momentum"):
        wrong.load_state_dict(saved)


# ---------------------------------------------------------------- Embedding against nn.Embedding


@pytest.mark.parametrize("num_embeddings", [None, 20], ids=["kv", "sparse_matrix"])
def test_embedding_gradients_match_nn_embedding(cluster_job: None, num_embeddings) -> None:
    dim, pad = 4, 3
    emb = Embedding(dim, num_embeddings, updater="sgd", lr=1.0, padding_idx=pad, name="emb")
    ids = torch.tensor([[1, 5, 3, 5], [7, 1, 1, 3], [5, 9, 3, 3]])  # repeats and padding
    touched = np.array([1, 5, 7, 9])
    before = emb.table.get(touched) if num_embeddings is None else emb.table.get(row_ids=touched)
    whole_before = None if num_embeddings is None else emb.table.get()
    # The reference: nn.Embedding holding the same rows.
    ref = nn.Embedding(10, dim, padding_idx=pad)
    with torch.no_grad():
        ref.weight[torch.from_numpy(touched)] = torch.from_numpy(before)
    proj = torch.randn(dim, 2, generator=torch.Generator().manual_seed(0))

    out = emb(ids)
    assert out.shape == (3, 4, dim)
    assert torch.equal(out[ids == pad], torch.zeros(4, dim))
    torch.testing.assert_close(out.detach(), ref(ids).detach())
    (out @ proj).pow(2).sum().backward()
    (ref(ids) @ proj).pow(2).sum().backward()
    emb.flush()

    after = emb.table.get(touched) if num_embeddings is None else emb.table.get(row_ids=touched)
    torch.testing.assert_close(torch.from_numpy(before - after), ref.weight.grad[torch.from_numpy(touched)])
    assert torch.equal(ref.weight.grad[pad], torch.zeros(dim))  # the reference agrees: no padding gradient
    if num_embeddings is None:
        assert len(emb.table) == len(touched)  # the padding id was never pulled or pushed
    else:  # only the touched rows moved; the padding row is as it was
        untouched = np.setdiff1d(np.arange(num_embeddings), touched)
        np.testing.assert_array_equal(emb.table.get()[untouched], whole_before[untouched])


def test_embedding_trains_inside_a_model_with_a_torch_optimizer(cluster_job: None) -> None:
    torch.manual_seed(0)
    emb = Embedding(8, updater="adagrad", lr=0.3)
    first, last, ids = train_embedding(emb, torch.device("cpu"))  # the dense part with a local optimizer
    assert last < 0.2 * first
    with torch.no_grad():
        assert emb(ids.to(torch.int32)).shape == (64, 3, 8)


# ---------------------------------------------------------------- bad input (an embedded job)


def test_clear_errors(job: mv.Job) -> None:
    with pytest.raises(mv.InvalidArgument, match="nn.Module"):
        ParamManager([torch.zeros(3)])
    with pytest.raises(mv.InvalidArgument, match="no parameters"):
        ParamManager(nn.ReLU())
    complex_module = nn.Module()
    complex_module.z = nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(mv.InvalidArgument, match="z has dtype torch.complex64"):
        ParamManager(complex_module)
    with pytest.raises(mv.InvalidArgument, match="learning rate"):
        PSOptimizer(nn.Linear(2, 2).parameters(), updater="add")
    with pytest.raises(mv.InvalidArgument, match="momentum"):
        PSOptimizer(nn.Linear(2, 2).parameters(), updater="sgd", lr=0.1, momentum=0.9)
    model = nn.Linear(2, 2)
    opt = PSOptimizer(model.parameters(), updater="momentum", lr=0.1)
    opt.param_groups[0]["momentum"] = 0.5
    model(torch.ones(1, 2)).sum().backward()
    with pytest.raises(mv.InvalidArgument, match="only lr and weight_decay"):
        opt.step()
    emb = Embedding(4, num_embeddings=10)
    with pytest.raises(mv.InvalidArgument, match="integer tensor"):
        emb(torch.tensor([1.0, 2.0]))
    with pytest.raises(mv.IndexOutOfRange):
        emb(torch.tensor([3, 10]))
    with pytest.raises(mv.InvalidArgument, match="padding_idx"):
        Embedding(4, num_embeddings=10, padding_idx=10)


def test_tables_take_tensors(job: mv.Job) -> None:
    from multiverso_py.tables.base import numpy_of

    weights = torch.ones(4, requires_grad=True)
    assert np.shares_memory(numpy_of(weights, "w"), weights.detach().numpy())  # a CPU tensor is not copied
    table = mv.ArrayTable(4)
    table.add(weights)
    table.add(torch.full((4,), 0.5, dtype=torch.bfloat16))  # numpy has no bfloat16
    table.add(torch.full((4,), 0.25, dtype=torch.float16))
    np.testing.assert_array_equal(table.get(), np.full(4, 1.75, np.float32))
    with pytest.raises(mv.InvalidArgument, match="cannot be cast safely"):
        mv.ArrayTable(2, "int64").add(torch.ones(2))
