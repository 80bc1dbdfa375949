"""FSDP2 prototype (gnsp_optim.fsdp): two gloo CPU processes under fully_shard equal one process to 1e-9.

One spawn of two ranks (module fixture). Each rank builds the same float64 "zoo" (an MLP, a conv net with a
grouped conv whose channel groups straddle the shard boundary, packed attention whose q/k/v row blocks
straddle it, attention with separate q/k/v weights sharing one bias split differently from them, and a
left-multiplied ``x @ W`` weight), keeps an unsharded twin, shards the zoo with ``fully_shard`` and then, on
both copies: projects the gradients, takes an AdamW step in ``mode="update"`` style (snapshot, step, project
the change, restore), projects Adam's ``exp_avg``, and gathers full state dicts. The single-process twin uses
the core path (``Block.read``-style reshapes and ``Projector.apply``). The test process checks every
difference and that the projections did something.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_rank, spawn_ranks
from torch import nn

from gnsp_optim.fsdp import project_left_sharded_, project_rows_sharded_, row_shard
from gnsp_optim.projector import Projector

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
F64 = torch.float64


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 7), nn.Linear(7, 5)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(h), h


class Zoo(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()
        self.conv = nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 6, 2, groups=3))
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)
        self.att2 = nn.MultiheadAttention(6, 2, kdim=4, vdim=5, batch_first=True)
        self.proj = nn.Parameter(torch.randn(7, 4))  # used as h @ proj (CLIP's visual.proj layout)

    def forward(self, x, img, seq, k, v):
        y, h = self.mlp(x)
        return (y.square().sum() + self.conv(img).square().sum()
                + self.att(seq, seq, seq)[0].square().sum() + self.att2(seq, k, v)[0].square().sum()
                + (h @ self.proj).square().sum())


#: (name, weight, bias, groups, bias_rows, left-multiplied)
BLOCKS = [
    ("mlp.fc1", "mlp.fc1.weight", "mlp.fc1.bias", 1, None, False),
    ("mlp.fc2", "mlp.fc2.weight", "mlp.fc2.bias", 1, None, False),
    ("conv.0", "conv.0.weight", "conv.0.bias", 1, None, False),
    ("conv.2", "conv.2.weight", "conv.2.bias", 3, None, False),  # 6 rows, groups of 2, shards of 3
    ("att.in_proj", "att.in_proj_weight", "att.in_proj_bias", 3, None, False),  # 18 rows, shards of 9
    ("att.out_proj", "att.out_proj.weight", "att.out_proj.bias", 1, None, False),
    ("att2.q", "att2.q_proj_weight", "att2.in_proj_bias", 1, slice(0, 6), False),  # bias split 9/9, q 3/3
    ("att2.k", "att2.k_proj_weight", "att2.in_proj_bias", 1, slice(6, 12), False),
    ("att2.v", "att2.v_proj_weight", "att2.in_proj_bias", 1, slice(12, 18), False),
    ("proj", "proj", None, 1, None, True),
]


def inputs():
    g = torch.Generator().manual_seed(5)
    return (torch.randn(4, 6, generator=g, dtype=F64), torch.randn(2, 3, 5, 5, generator=g, dtype=F64),
            torch.randn(2, 3, 6, generator=g, dtype=F64), torch.randn(2, 4, 4, generator=g, dtype=F64),
            torch.randn(2, 4, 5, generator=g, dtype=F64))


def projectors(params: dict[str, torch.Tensor]) -> dict[str, Projector]:
    """Random orthonormal bases, ranks mixing both forms, seeded alike on every rank."""
    g = torch.Generator().manual_seed(11)
    out = {}
    for i, (name, wname, bname, groups, _, left) in enumerate(BLOCKS):
        w = params[wname]
        d = w.shape[0] if left else w[0].numel() + (bname is not None)
        q = torch.linalg.qr(torch.randn(groups, d, d, generator=g, dtype=F64))[0]
        ranks = [1 + (i + 2 * j) % (d - 1) for j in range(groups)]
        null = torch.stack([q[j].roll(-ranks[j], dims=1) for j in range(groups)])
        out[name] = Projector.from_bases(q, null, ranks)
    return out


def project_reference(proj: Projector, block, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """The single-process core path: read as (G, rows, d) [+ bias rows], Projector.apply, write back."""
    _, _, _, groups, bias_rows, left = block
    if left:
        wm = w.t().reshape(1, w.shape[1], -1)
        nw, _ = proj.apply(wm)
        w.copy_(nw.reshape(w.shape[1], w.shape[0]).t())
        return
    wm = w.reshape(groups, w.shape[0] // groups, -1)
    bb = None if b is None else (b if bias_rows is None else b[bias_rows])
    bm = None if bb is None else bb.reshape(groups, -1, 1)
    nw, nb = proj.apply(wm, bm)
    w.copy_(nw.reshape(w.shape))
    if bb is not None:
        bb.copy_(nb.reshape(bb.shape))


def project_sharded(proj: Projector, block, w: torch.Tensor, b: torch.Tensor | None) -> None:
    name, _, _, groups, bias_rows, left = block
    if left:
        project_left_sharded_(proj, w, name=name)
    else:
        project_rows_sharded_(proj, w, b, groups=groups, bias_rows=bias_rows, name=name)


def each_block(named: dict[str, torch.Tensor], fn, projs, get=lambda t: t) -> None:
    for block in BLOCKS:
        name, wname, bname, *_ = block
        fn(projs[name], block, get(named[wname]), None if bname is None else get(named[bname]))


def sketch_rows(rank: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(20 + rank)
    scale = torch.arange(1, 11, dtype=F64) ** -1.0
    return torch.randn((37, 23)[rank], 10, generator=g, dtype=F64) * scale


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare(diffs: dict, tag: str, sharded: dict, single: dict) -> None:
    diffs[tag] = max(float((full(sharded[k]) - single[k]).abs().max()) for k in single)


def _grad_checks(model, ref, projs, diffs: dict, moved: dict, layout: dict) -> None:
    def compare(tag: str, sharded: dict, single: dict) -> None:
        _compare(diffs, tag, sharded, single)

    # gradients: identical inputs on both ranks, so FSDP2's averaged gradient is the single-process one
    model(*inputs()).backward()
    ref(*inputs()).backward()
    sp = dict(model.named_parameters())
    rp = dict(ref.named_parameters())
    compare("grad_before", {k: p.grad for k, p in sp.items()}, {k: p.grad for k, p in rp.items()})
    before = {k: p.grad.clone() for k, p in rp.items()}
    for block in BLOCKS:  # where the shards cut (recorded to show the straddling cases happen)
        _, wname, bname, *_ = block
        layout[wname] = row_shard(sp[wname].grad)[1:3]
        if bname:
            layout[bname] = row_shard(sp[bname].grad)[1:3]
    each_block(sp, project_sharded, projs, get=lambda p: p.grad)
    each_block(rp, project_reference, projs, get=lambda p: p.grad)
    compare("grad_projected", {k: p.grad for k, p in sp.items()}, {k: p.grad for k, p in rp.items()})
    moved["grad"] = max(float((rp[k].grad - before[k]).abs().max()) for k in before)



def _step_checks(model, ref, projs, diffs: dict) -> bool:
    """Update mode, moment projection and full state dicts; returns whether the state dict is plain."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    sp, rp = dict(model.named_parameters()), dict(ref.named_parameters())

    def compare(tag: str, sharded: dict, single: dict) -> None:
        _compare(diffs, tag, sharded, single)

    # update mode: snapshot, AdamW step, project the change, restore (the core's W <- W0 + P(W - W0))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ropt = torch.optim.AdamW(ref.parameters(), lr=0.05, weight_decay=0.1)
    for params, o, fn in ((sp, opt, project_sharded), (rp, ropt, project_reference)):
        snap = {k: p.detach().clone() for k, p in params.items()}
        o.step()
        with torch.no_grad():
            for k, p in params.items():
                p.sub_(snap[k])
            each_block(params, fn, projs, get=lambda p: p.detach())
            for k, p in params.items():
                p.add_(snap[k])
    compare("update_mode_params", sp, {k: p.detach() for k, p in rp.items()})

    # moment projection: Adam's exp_avg is a DTensor sharded like its parameter
    for params, o, fn in ((sp, opt, project_sharded), (rp, ropt, project_reference)):
        state = {k: o.state[p]["exp_avg"] for k, p in params.items()}
        each_block(state, fn, projs)
    compare("exp_avg", {k: opt.state[p]["exp_avg"] for k, p in sp.items()},
            {k: ropt.state[p]["exp_avg"] for k, p in rp.items()})

    # checkpoints: full (gathered, plain-tensor) state dicts equal the single process's
    options = StateDictOptions(full_state_dict=True)
    msd = get_model_state_dict(model, options=options)
    diffs["full_model_state_dict"] = max(float((msd[k] - v).abs().max()) for k, v in ref.state_dict().items())
    osd = get_optimizer_state_dict(model, opt, options=options)
    diffs["full_optim_exp_avg"] = max(float((osd["state"][k]["exp_avg"] - ropt.state[p]["exp_avg"]).abs().max())
                                      for k, p in rp.items())
    plain = all(not hasattr(v, "full_tensor") for v in msd.values())

    return plain


def _statistics_checks(model, ref, rank: int, mesh, diffs: dict, layout: dict) -> None:
    # statistics under FSDP2: the core's hooks (Linear / Conv / packed in_proj) on the sharded model, each
    # rank its own batch, all-reduced; the single process sees both batches
    from gnsp_optim.hooks import Gate, Hooks
    from gnsp_optim.kinds import AttentionInProj, Conv, Linear, discover_blocks

    def stats_of(net, batches):
        blocks = [b for b in discover_blocks(net, {}, dtype=F64)
                  if isinstance(b.kind, (Linear, Conv, AttentionInProj))]
        hooks = Hooks.install(blocks, Gate(open=True))
        with torch.no_grad():
            for batch in batches:
                net(*batch)
        hooks.remove()
        return {b.name: b.stat for b in blocks}

    def shifted(i):
        return tuple(t + i for t in inputs())

    mine = stats_of(model, [shifted(rank)])
    for stat in mine.values():
        stat.all_reduce_()
    single = stats_of(ref, [shifted(r) for r in range(WORLD)])
    diffs["statistics_all_reduced"] = max(float((mine[k].task_sum - single[k].task_sum).abs().max())
                                          for k in single)
    layout["stat_layers"] = sorted(single)
    from torch.distributed.tensor import Shard, distribute_tensor

    try:  # column-sharded (tensor-parallel style): refused with the layer's name
        row_shard(distribute_tensor(torch.zeros(4, 6, dtype=F64), mesh, [Shard(1)]), "tp.weight")
        layout["column_shard_error"] = None
    except NotImplementedError as err:
        layout["column_shard_error"] = str(err)



def _sketch_and_monitor(rank: int, layout: dict) -> dict:
    # a bounded-memory sketch merges across ranks (all_gather, stack, shrink): identical on every rank
    from gnsp_optim.sketch import SketchStat

    sketch = SketchStat("fc", 10, 4, dtype=F64)
    sketch.update(sketch_rows(rank))
    sketch.all_reduce_()
    sketch.fold()
    # the converging pass under several ranks: each rank its own stream, one decision for all
    from gnsp_optim.convergence import ConvergenceMonitor
    from gnsp_optim.statistics import CovarianceStat

    conv_stat = CovarianceStat("fc", 40, dtype=F64)
    monitor = ConvergenceMonitor({"fc": conv_stat}, every=2, tol=0.05, patience=2)
    g = torch.Generator().manual_seed(40 + rank)
    basis = torch.randn(3, 40, generator=g, dtype=F64)
    for t in range(200):
        extra = (torch.randn(16, 1, generator=g, dtype=F64) * 20 * torch.eye(40, dtype=F64)[t][None]
                 if rank == 1 and t < 30 else torch.zeros(0, 40, dtype=F64))  # rank 1: a new direction each
        # batch until batch 30
        conv_stat.update(torch.cat([torch.randn(16, 3, generator=g, dtype=F64) @ basis, extra]))
        if monitor.update(samples=16):
            break
    layout["converged_at"] = (monitor.batches, monitor.converged)

    return {"memory": sketch.dense_memory(True)[0], "delta": float(sketch.memory_delta[0]),
            "total": float(sketch.spectrum(True).total[0])}


def _worker(rank: int, tmp: str) -> None:
    with gloo_rank(rank, tmp, WORLD):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(0)
        model = Zoo().double()
        ref = copy.deepcopy(model)
        mesh = init_device_mesh("cpu", (WORLD,))
        for part in (model.mlp, model.conv, model.att, model.att2, model):
            fully_shard(part, mesh=mesh)
        projs = projectors(dict(ref.named_parameters()))
        diffs: dict[str, float] = {}
        moved: dict[str, float] = {}
        layout: dict = {}
        _grad_checks(model, ref, projs, diffs, moved, layout)
        plain = _step_checks(model, ref, projs, diffs)
        _statistics_checks(model, ref, rank, mesh, diffs, layout)
        sketch_out = _sketch_and_monitor(rank, layout)
        torch.save({"diffs": diffs, "moved": moved, "layout": layout, "plain_state_dict": plain,
                    "forms": {n: p.form for n, p in projs.items()}, "sketch": sketch_out}, f"{tmp}/rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("fsdp2"), WORLD)


def test_the_cases_that_need_care_really_occur(results):
    lay = results[0]["layout"]
    assert lay["conv.2.weight"] == (0, 3)  # rows 0-2: group 0 and half of group 1
    assert lay["att.in_proj_weight"] == (0, 9)  # q rows and half of k
    assert lay["att2.q_proj_weight"] == (0, 3) and lay["att2.in_proj_bias"] == (0, 9)  # bias split otherwise
    assert results[1]["layout"]["mlp.fc1.weight"] == (4, 7)  # uneven shards
    assert set(results[0]["forms"].values()) == {"kept", "null"}
    assert results[0]["plain_state_dict"]
    assert {"mlp.fc1", "mlp.fc2", "conv.0", "conv.2", "att.in_proj"} <= set(lay["stat_layers"])
    assert lay["column_shard_error"].startswith("tp.weight: GNSP projects DTensors sharded on dim 0")


@pytest.mark.parametrize("what", ["grad_before", "grad_projected", "update_mode_params", "exp_avg",
                                  "full_model_state_dict", "full_optim_exp_avg", "statistics_all_reduced"])
def test_two_ranks_equal_one_process(results, what):
    for r in results:
        assert r["diffs"][what] < 1e-9, (what, r["diffs"])


def test_sketch_all_reduce_merges_ranks_within_the_guarantee(results):
    s0, s1 = results[0]["sketch"], results[1]["sketch"]
    assert torch.equal(s0["memory"], s1["memory"]) and s0["delta"] == s1["delta"]
    rows = torch.cat([sketch_rows(0), sketch_rows(1)])
    aug = torch.cat([rows, torch.ones(len(rows), 1, dtype=F64)], 1)
    exact = aug.T @ aug / len(rows)
    lam = torch.linalg.eigvalsh(exact - s0["memory"])
    assert float(lam[0]) > -1e-12 and float(lam[-1]) <= s0["delta"] + 1e-12
    assert s0["delta"] > 0  # something was shrunk: the merge was not trivially exact
    assert s0["total"] == pytest.approx(float(torch.trace(exact)), rel=1e-12)


def test_ranks_stop_the_statistics_pass_together(results):
    (b0, c0), (b1, c1) = results[0]["layout"]["converged_at"], results[1]["layout"]["converged_at"]
    assert c0 and c1 and b0 == b1 >= 30  # rank 0's stream alone was stationary from the start


def test_the_projection_changed_the_gradients(results):
    assert results[0]["moved"]["grad"] > 1e-2


def test_row_shard_of_a_plain_tensor_is_the_whole_tensor():
    from gnsp_optim.fsdp import is_dtensor

    assert not is_dtensor(torch.zeros(1))
    local, a, b, group = row_shard(torch.zeros(4, 2))
    assert (a, b, group) == (0, 4, None)


def test_projection_argument_errors_name_the_layer():
    p = Projector.from_bases(torch.eye(3)[None, :, :1], torch.eye(3)[None, :, 1:], [1])
    with pytest.raises(ValueError, match="fc: projector of dimension 3 cannot act on 4 inputs"):
        project_rows_sharded_(p, torch.zeros(2, 4), name="fc")
    with pytest.raises(ValueError, match="fc: 5 rows do not split into 2 groups"):
        project_rows_sharded_(p, torch.zeros(5, 2), groups=2, name="fc")
    with pytest.raises(ValueError, match="proj: a left-multiplied weight of 4 input rows"):
        project_left_sharded_(p, torch.zeros(4, 2), name="proj")
