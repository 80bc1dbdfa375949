"""torch.distributed: two gloo CPU processes under DistributedDataParallel behave like one process.

One spawn of two ranks runs the whole story (spawning costs seconds, so it runs once, in a module fixture):

1. every rank loads a checkpoint written by a *single* process (task 0 already protected) into a
   DDP-wrapped model and wrapper, and trains task 1 under DDP (task 0's outputs must not move);
2. each rank collects a *different, unevenly sized* shard of task 1's data; ``end_task()`` all-reduces;
3. each rank writes its projectors (as dense ``d x d`` matrices), kept ranks and memory to disk; then trains
   task 2 under DDP and records the outputs on tasks 0 and 1; rank 0 saves a wrapper checkpoint.

The test process then checks (a) the ranks agree, (b) they equal a single process that saw all of task 1
and a hand-written float64 reference, (c) old outputs did not move, (d) the DDP checkpoint loads and
protects in a single process (and the single-process checkpoint loaded under DDP in step 1).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_rank, spawn_ranks
from torch import nn

from gnsp_optim import NullSpaceOptimizer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
DIM, HIDDEN, OUT = 6, 12, 3
RHO = 1e-12
SHARDS = (3, 5)  # rows of task 1's old data on rank 0 and rank 1 (uneven on purpose)


# ---------------------------------------------------------------------------------------- shared set-up
def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, OUT)).double()


def make_opt(model: nn.Module) -> NullSpaceOptimizer:
    base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    return NullSpaceOptimizer(base, model, rho=RHO, mode="update")


def data(seed: int, n: int, rank: int = 2) -> torch.Tensor:
    """``n`` rows on a random rank-``rank`` subspace of R^DIM (low rank: the null space is not empty)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, DIM, generator=g,
                                                                               dtype=torch.float64)


def task0() -> torch.Tensor:
    return data(100, 4)


def task1_all() -> torch.Tensor:
    return data(101, sum(SHARDS))


def task1_shard(rank: int) -> torch.Tensor:
    start = sum(SHARDS[:rank])
    return task1_all()[start: start + SHARDS[rank]]


def dense(proj) -> torch.Tensor:
    """The projector as a dense ``(G, d, d)`` matrix, built from its stored basis (not from ``apply``)."""
    basis = proj.basis.to(torch.float64)
    eye = torch.eye(proj.dim, dtype=torch.float64)
    outer = basis @ basis.transpose(1, 2)  # zero-padded columns add nothing
    return eye - outer if proj.form == "kept" else outer


def train_steps(ddp_or_model: nn.Module, opt, seed: int, steps: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, DIM, generator=g, dtype=torch.float64)
        y = torch.randn(8, OUT, generator=g, dtype=torch.float64)
        opt.zero_grad()
        nn.functional.mse_loss(ddp_or_model(x), y).backward()
        opt.step()


# ---------------------------------------------------------------------------------------- the ranks
def _worker(rank: int, tmp: str) -> None:
    with gloo_rank(rank, tmp, WORLD):
        single = torch.load(f"{tmp}/single.pt", weights_only=False)
        model = make_model()
        model.load_state_dict(single["model"])
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = make_opt(ddp)
        opt.load_state_dict(single["opt"])  # (d), other direction: single-process checkpoint under DDP
        with torch.no_grad():
            out0 = model(task0())
        # task 1 under DDP: each rank its own batches (seed differs), gradients averaged by DDP
        train_steps(ddp, opt, seed=10 + rank, steps=15)
        with torch.no_grad():
            drift0_after_task1 = (model(task0()) - out0).abs().max().item()
        weights_at_collect = {k: v.clone() for k, v in model.state_dict().items()}
        ddp.eval()
        with opt.collect(), torch.no_grad():
            ddp(task1_shard(rank))  # a different shard on each rank, through the DDP wrapper
        ddp.train()
        opt.end_task()
        with torch.no_grad():
            out1 = model(task1_all())
        projectors = {name: dense(p) for name, p in opt.projectors.items()}
        ranks = {name: list(p.kept_ranks) for name, p in opt.projectors.items()}
        memory = {b.name: b.stat.memory.clone() for b in opt.blocks}
        # task 2 under DDP
        train_steps(ddp, opt, seed=20 + rank, steps=15)
        with torch.no_grad():
            drift0 = (model(task0()) - out0).abs().max().item()
            drift1 = (model(task1_all()) - out1).abs().max().item()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        if rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, f"{tmp}/ddp.pt")
        torch.save({"projectors": projectors, "ranks": ranks, "memory": memory, "drift0_after_task1":
                    drift0_after_task1, "drift0": drift0, "drift1": drift1, "params": flat,
                    "weights_at_collect": weights_at_collect, "tasks_seen": opt.tasks_seen,
                    "block_names": [b.name for b in opt.blocks]}, f"{tmp}/rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    # a single process protects task 0 and writes a checkpoint that the DDP ranks start from
    model = make_model()
    opt = make_opt(model)
    train_steps(model, opt, seed=1, steps=5)
    weights_task0 = {k: v.clone() for k, v in model.state_dict().items()}
    with opt.collect(), torch.no_grad():
        model(task0())
    opt.end_task()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp / "single.pt")
    results = spawn_ranks(_worker, tmp, WORLD)
    return {"tmp": Path(tmp), "results": results, "weights_task0": weights_task0}


# ---------------------------------------------------------------------------------------- checks
def test_a_every_rank_builds_identical_projectors(run):
    r0, r1 = run["results"]
    assert r0["block_names"] == r1["block_names"] == ["0", "2"]  # DDP unwrapped: no "module." prefix
    assert r0["tasks_seen"] == r1["tasks_seen"] == 2
    assert r0["ranks"] == r1["ranks"]
    for name in r0["projectors"]:
        assert torch.equal(r0["projectors"][name], r1["projectors"][name]), name
        assert torch.equal(r0["memory"][name], r1["memory"][name]), name
    assert torch.equal(r0["params"], r1["params"])  # and the replicas stay in step


def _single_process_reference(run) -> NullSpaceOptimizer:
    """One process, the same checkpoint and weights, collecting all of task 1 at once."""
    tmp = run["tmp"]
    model = make_model()
    opt = make_opt(model)
    opt.load_state_dict(torch.load(tmp / "single.pt", weights_only=False)["opt"])
    model.load_state_dict(run["results"][0]["weights_at_collect"])
    with opt.collect(), torch.no_grad():
        model(task1_all())
    opt.end_task()
    return opt


def _by_hand(run) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Slow float64 reference: mean augmented Gram matrix of each task, summed, eigh, TailEnergy(RHO)."""
    def hidden(weights, x):
        return torch.tanh(x @ weights["0.weight"].T + weights["0.bias"])

    def gram(x):
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
        return xa.T @ xa / len(x)

    w0, w1 = run["weights_task0"], run["results"][0]["weights_at_collect"]
    mem = {"0": gram(task0()) + gram(task1_all()),
           "2": gram(hidden(w0, task0())) + gram(hidden(w1, task1_all()))}
    dense_p, ranks = {}, {}
    for name, m in mem.items():
        lam, vec = torch.linalg.eigh(m)
        lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
        total = float(lam.sum())
        k = next(k for k in range(len(lam) + 1) if float(lam[k:].sum()) <= RHO * total)
        u = vec[:, :k]
        dense_p[name] = (torch.eye(len(m), dtype=m.dtype) - u @ u.T)[None]
        ranks[name] = k
    return dense_p, ranks


def test_b_equal_to_one_process_that_saw_all_the_data(run):
    r0 = run["results"][0]
    ref = _single_process_reference(run)
    by_hand, hand_ranks = _by_hand(run)
    for name, p in ref.projectors.items():
        assert r0["ranks"][name] == list(p.kept_ranks) == [hand_ranks[name]], name
        assert 0 < hand_ranks[name] < p.dim  # neither free nor frozen: the comparison means something
        assert torch.allclose(r0["projectors"][name], dense(p), atol=1e-9), name
        assert torch.allclose(r0["projectors"][name], by_hand[name], atol=1e-8), name
    for b in ref.blocks:
        assert torch.allclose(r0["memory"][b.name], b.stat.memory, rtol=1e-12, atol=1e-12), b.name


def test_c_old_outputs_unchanged_after_ddp_training(run):
    for r in run["results"]:
        assert r["drift0_after_task1"] < 1e-9  # the single-process checkpoint protects under DDP
        assert r["drift0"] < 1e-9 and r["drift1"] < 1e-9


def test_d_ddp_checkpoint_loads_and_protects_in_a_single_process(run):
    r0 = run["results"][0]
    ckpt = torch.load(run["tmp"] / "ddp.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in ckpt["opt"]["gnsp"]["blocks"])
    model = make_model()
    model.load_state_dict(ckpt["model"])
    opt = make_opt(model)
    opt.load_state_dict(ckpt["opt"])
    assert opt.tasks_seen == 2
    for name, p in opt.projectors.items():
        assert torch.equal(dense(p), r0["projectors"][name]), name
    with torch.no_grad():
        before = model(torch.cat([task0(), task1_all()]))
    train_steps(model, opt, seed=30, steps=10)
    with torch.no_grad():
        after = model(torch.cat([task0(), task1_all()]))
    assert (after - before).abs().max() < 1e-9
    assert not torch.equal(torch.cat([p.detach().flatten() for p in model.parameters()]), r0["params"])


# ---------------------------------------------------------------------------------------- FSDP1: refused
@pytest.fixture
def single_rank_group(tmp_path):
    """A one-process gloo group in this process (FSDP and DTensor need one), destroyed afterwards."""
    if dist.is_initialized():  # pragma: no cover - another test leaked a group
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_fsdp1_and_other_dtensor_placements_are_refused_fsdp2_ddp_and_plain_pass(single_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from gnsp_optim.integrations.distributed import check_model_supported, is_sharded_parameter
    from gnsp_optim.sharding import is_row_sharded

    def net() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fsdp1 = FullyShardedDataParallel(net(), device_id=torch.device("cpu"))
    with pytest.raises(TypeError, match=r"FullyShardedDataParallel \(FSDP1\).*whole \(groups, rows"):
        check_model_supported(fsdp1)
    assert any(is_sharded_parameter(p) for p in fsdp1.parameters())  # the FlatParameter itself
    with pytest.raises(TypeError, match="sharded parameters"):  # a flat parameter handed over on its own
        check_model_supported(nn.Linear(2, 2), params=list(fsdp1.parameters()))

    mesh = init_device_mesh("cpu", (1,))
    fsdp2 = net()
    fully_shard(fsdp2, mesh=mesh)
    check_model_supported(fsdp2)  # FSDP2: row-sharded DTensors, supported (tests/test_fsdp_optimizer.py)
    assert all(is_row_sharded(p) for p in fsdp2.parameters())

    tp = net()  # DTensor parameters placed otherwise (tensor parallel style): refused, naming the parameter
    tp[0].weight = nn.Parameter(distribute_tensor(tp[0].weight.detach(), mesh, [Replicate()]))
    with pytest.raises(TypeError, match=r"'0\.weight' is a DTensor with placements \(Replicate\(\),\)"):
        check_model_supported(tp)
    tp[0].weight = nn.Parameter(distribute_tensor(tp[0].weight.detach().full_tensor(), mesh, [Shard(1)]))
    with pytest.raises(TypeError, match=r"'0\.weight' is a DTensor with placements \(Shard\(dim=1\),\)"):
        check_model_supported(tp)

    plain = net()
    check_model_supported(plain)
    check_model_supported(nn.parallel.DistributedDataParallel(plain))
    check_model_supported(nn.DataParallel(net()))
    assert not any(is_sharded_parameter(p) for p in plain.parameters())
    with pytest.raises(TypeError, match="nn.Module"):
        check_model_supported("not a model")  # type: ignore[arg-type]


def test_token_counts_are_synchronised_like_covariances(single_rank_group):
    """An embedding block's counts go through all_reduce with sync=True (one rank: the sum is itself)."""
    model = nn.Sequential(nn.Embedding(6, 3), nn.Linear(3, 2)).double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0, sync=True)
    with opt.collect(), torch.no_grad():
        model(torch.tensor([1, 1, 4]))
    opt.end_task()
    assert opt.blocks[0].stat.memory.tolist() == [0.0, 2 / 3, 0.0, 0.0, 1 / 3, 0.0]
    assert opt.projectors["0"].kept_ranks == [2]
