"""NullSpaceOptimizer under FSDP2 (``fully_shard``): two gloo CPU processes equal one process to 1e-9.

One spawn of two ranks (module fixture; spawning costs seconds). For each model (an MLP, a conv net with a
grouped conv whose channel groups straddle the shard boundary, attention: packed q/k/v and separate q/k/v
weights sharing one bias, a tiny CLIP with its ``x @ W`` image projection, called through ``encode_image`` /
``encode_text`` as the MTIL loop calls it (``register_fsdp_forward_method``), its token embedding protected by
the Embedding kind's row mask, the MLP with bounded ``statistics="sketch"``, and two embeddings whose
vocabularies split unevenly over the ranks, one tied to the output layer), float64, ``rho = 0``, AdamW with
weight decay in ``mode="update"``:

1. every rank collects its own shard of task 0's data; ``end_task()`` all-reduces the statistics;
2. three steps on each rank's own batch (FSDP2 averages the gradients); task 1 is collected the same way
   (its ``end_task()`` also projects the optimizer's moments, DTensors here), two more steps;
3. ``state_dict()`` on both ranks (a collective), loaded into a *fresh* single-process optimizer, and the
   single process's state dict loaded into a *fresh* sharded one ("and back"); one more step on each.

A single-process twin (a deep copy taken before ``fully_shard``) sees both ranks' data and the mean of their
losses. The test process checks parameters, kept ranks, old outputs and the embeddings' row masks (equal on
every rank, old tokens' rows exactly still). Beside it, the sliced row mask is held to its dense twin (the
one-hot ``eigh`` projector) for vocabularies that split evenly, unevenly, and leave a rank no rows.

The CLIP and sketch cases use SGD (momentum, weight decay) instead of AdamW: Adam divides each coordinate by
``sqrt(v)``, so entries whose projected gradient is round-off (~1e-17 where the exact value is 0) take steps
of size ``lr * noise / eps``; two correct runs whose gradients differ only by summation order (FSDP2's
reduce-scatter mean against one process's mean loss) then differ by ~1e-8 (measured: 7e-9 on the tiny CLIP,
projectors bitwise equal), while SGD keeps them within 1e-15.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from helpers import gloo_rank, spawn_ranks
from torch import nn

from gnsp_optim import FeatureSource, NullSpaceOptimizer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
F64 = torch.float64
MODELS = ("mlp", "conv", "attention", "clip", "mlp_sketch", "embedding")


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 9), nn.Linear(9, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(2, 6, 3), nn.Conv2d(6, 6, 2, groups=3)  # c2: 6 rows, groups of 2, shards of 3

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x))).flatten(1)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(6, 2, batch_first=True)  # in_proj: 18 rows, shards of 9
        self.att2 = nn.MultiheadAttention(6, 2, kdim=4, vdim=5, batch_first=True)  # bias split unlike q/k/v

    def forward(self, x):
        seq, k, v = x[..., :6], x[..., 6:10], x[..., 10:15]
        return self.att(seq, seq, seq)[0] + self.att2(seq, k, v)[0]


class TiedLM(nn.Module):
    """Embeddings whose vocabularies split unevenly over 2 ranks (7 rows: 4 + 3, FSDP2 pads the second shard;
    5 rows: 3 + 2), a padding index, and the token embedding tied to the output layer (rows of one ``W``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.types = nn.Embedding(7, 8, padding_idx=0), nn.Embedding(5, 8)
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids, types):
        return self.head(torch.tanh(self.fc(self.emb(ids) + self.types(types))))


def tiny_clip() -> nn.Module:
    from gnsp_optim.reference.model import CLIP, CLIPConfig  # tests may use the reference model; the core not

    return CLIP(CLIPConfig.tiny(embed_dim=6, image_size=8, patch_size=4, vision_width=8, vision_layers=1,
                                vision_heads=2, context_length=5, vocab_size=20, text_width=8, text_layers=1,
                                text_heads=2))


def build(name: str) -> tuple[nn.Module, list[str], dict]:
    """``(float64 model, the names of the modules to fully_shard, inner first, optimizer options)``."""
    torch.manual_seed(0)
    if name in ("mlp", "mlp_sketch"):
        opts = dict(statistics="sketch", sketch_rank=16, sketch_min_width=0, sgd=True) if name == "mlp_sketch" else {}
        return MLP().double(), ["fc1", ""], opts
    if name == "conv":
        return ConvNet().double(), ["c1", "c2", ""], {}
    if name == "attention":
        return Attention().double(), ["att", "att2", ""], {}
    if name == "embedding":
        return TiedLM().double(), ["fc", ""], {}
    m = tiny_clip().double()
    units = [n for n, _ in m.named_modules() if n.endswith(("resblocks.0", "resblocks.1"))] + [""]
    return m, units, {"feature_sources": {"visual.proj": FeatureSource("visual.ln_post")}, "sgd": True}


def batch(name: str, seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    if name in ("mlp", "mlp_sketch"):
        return (torch.randn(n, 6, generator=g, dtype=F64),)
    if name == "mlp_old":  # rank-3 inputs on a fixed subspace: a null space remains at every layer
        return (torch.randn(n, 3, generator=g, dtype=F64) @ torch.randn(3, 6, generator=torch.Generator()
                                                                        .manual_seed(7), dtype=F64),)
    if name == "conv":
        return (torch.randn(n, 2, 5, 5, generator=g, dtype=F64),)
    if name == "conv_old":  # spatially constant images: every patch is one of n x 2 values, a null space remains
        return (torch.randn(n, 2, 1, 1, generator=g, dtype=F64).expand(n, 2, 5, 5).contiguous(),)
    if name == "attention":
        return (torch.randn(n, 3, 15, generator=g, dtype=F64),)
    if name == "attention_old":  # 2 tokens per sequence: the q/k/v and out_proj inputs keep a null space
        return (torch.randn(n, 2, 15, generator=g, dtype=F64),)
    if name == "embedding":  # every token, padding included
        return torch.randint(0, 7, (n, 4), generator=g), torch.randint(0, 5, (n, 4), generator=g)
    if name == "embedding_old":  # tokens 1-3 (rows 0, 4-6 stay free), types 0-1: the head's inputs keep a null space
        return torch.randint(1, 4, (n, 4), generator=g), torch.randint(0, 2, (n, 4), generator=g)
    return (torch.randn(n, 3, 8, 8, generator=g, dtype=F64), torch.randint(1, 20, (n, 5), generator=g))


def loss_of(name: str, model: nn.Module, data) -> torch.Tensor:
    if name == "clip":  # as the MTIL loop does: encode_image / encode_text called directly (see shard())
        img, txt = model.encode_image(data[0]), model.encode_text(data[1])
        return (img @ txt.T).diagonal().sum() + img.square().sum()
    return model(*data).square().sum()


def outputs(name: str, model: nn.Module, data) -> torch.Tensor:
    out = model(*data)
    return torch.cat([out[0].flatten(), out[1].flatten()]) if name == "clip" else out


def flat(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.named_parameters()}


def make_opt(model: nn.Module, opts: dict) -> NullSpaceOptimizer:
    opts = dict(opts)
    if opts.pop("sgd", False):
        base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    else:
        base = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    return NullSpaceOptimizer(base, model, rho=0.0, mode="update", **opts)


def train(name: str, model, opt, steps: int, rank: int | None, seed: int) -> None:
    """``rank``: this rank's batch; None: the single process, the mean of both ranks' losses."""
    for t in range(steps):
        opt.zero_grad()
        if rank is None:
            loss = sum(loss_of(name, model, batch(name, seed + 10 * t + r, 4)) for r in range(WORLD)) / WORLD
        else:
            loss = loss_of(name, model, batch(name, seed + 10 * t + rank, 4))
        loss.backward()
        opt.step()


def old_data(name: str, r: int, task: int = 0):
    kind = {"conv": "conv_old", "attention": "attention_old", "mlp": "mlp_old", "mlp_sketch": "mlp_old",
            "embedding": "embedding_old"}.get(name, name)
    return batch(kind, 100 + 50 * task + r, (1, 2)[r] if name == "attention" else 3 + r)  # uneven shards


def collect(name: str, model, opt, ranks: list[int], task: int = 0) -> None:
    with opt.collect(), torch.no_grad():
        for r in ranks:
            data = old_data(name, r, task)
            if name == "clip":
                model.encode_image(data[0]), model.encode_text(data[1])
            else:
                model(*data)
    opt.end_task()


def shard(model: nn.Module, units: list[str], mesh) -> None:
    from torch.distributed.fsdp import fully_shard

    modules = dict(model.named_modules())
    # fully_shard refuses 0-d parameters (CLIP's logit_scale): left out of sharding, replicated on every rank
    scalars = {p for p in model.parameters() if p.dim() == 0}
    for u in units:
        fully_shard(modules[u], mesh=mesh, **({"ignored_params": scalars} if u == "" and scalars else {}))
    if hasattr(model, "encode_image"):  # methods other than forward that use the root's parameters
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "encode_image")
        register_fsdp_forward_method(model, "encode_text")


def free_rows(opt: NullSpaceOptimizer) -> dict[str, torch.Tensor]:
    """``{embedding weight name: its free rows (bool)}``: the Embedding kind's row masks (task 0's)."""
    return {b.weight_name: opt.projectors[b.name].basis[0, :, 0] > 0.5
            for b in opt.blocks if type(b.kind).__name__ == "Embedding"}


def _absmax(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def one_model(name: str, rank: int, mesh, tmp: str) -> dict:
    model, units, opts = build(name)
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)  # weights before any training, for the fresh sharded copy below
    shard(model, units, mesh)
    opt, ropt = make_opt(model, opts), make_opt(ref, opts)
    collect(name, model, opt, [rank])
    collect(name, ref, ropt, list(range(WORLD)))
    free = free_rows(opt)  # embeddings: each rank's row mask must be the one process's (counts all-reduced)
    out: dict = {"masks_equal": free.keys() == free_rows(ropt).keys()
                 and all(torch.equal(m, free_rows(ropt)[k]) for k, m in free.items()),
                 "free_rows": {k: int(m.sum()) for k, m in free.items()}}
    old = [old_data(name, r) for r in range(WORLD)]
    with torch.no_grad():
        before = [outputs(name, ref, b) for b in old]
    out["init_to_ref"] = max(float((flat(model)[k] - v).abs().max()) for k, v in flat(ref).items())
    train(name, model, opt, 3, rank, seed=1)
    train(name, ref, ropt, 3, None, seed=1)
    # a second task: end_task now also projects the base optimizer's moments (DTensors under FSDP2)
    collect(name, model, opt, [rank], task=1)
    collect(name, ref, ropt, list(range(WORLD)), task=1)
    train(name, model, opt, 2, rank, seed=5)
    train(name, ref, ropt, 2, None, seed=5)
    p, rp = flat(model), flat(ref)
    out["params"] = max(float((p[k] - rp[k]).abs().max()) for k in rp)
    out["moved"] = max(float((rp[k] - flat(start)[k]).abs().max()) for k in rp)
    s0 = flat(start)  # an embedding's rows of old tokens held under FSDP2, its free rows trained
    out["emb_held"], out["emb_moved"] = ({k: _absmax((p[k] - s0[k])[sel(m)]) for k, m in free.items()}
                                         for sel in (torch.logical_not, lambda m: m))
    with torch.no_grad():
        out["drift_sharded"] = max(float((a - outputs(name, model, b)).abs().max())
                                   for a, b in zip(before, old, strict=True))
    # (this no_grad forward leaves FSDP2's root unit gathered; state_dict() reshards it)
    out["ranks"] = {n: list(q.kept_ranks) for n, q in opt.projectors.items()}
    out["ref_ranks"] = {n: list(q.kept_ranks) for n, q in ropt.projectors.items()}
    out["kinds"] = sorted({type(b.kind).__name__ for b in opt.blocks})
    out["stats"] = sorted({type(b.stat).__name__ for b in opt.blocks})
    out.update(round_trip(name, (model, opt, ref, ropt), start, units, opts, rank, mesh, tmp))
    return out


def round_trip(name: str, runs: tuple, start: nn.Module, units: list[str], opts: dict, rank: int, mesh,
               tmp: str) -> dict:
    """Checkpoints of the trained ``runs`` (sharded model + optimizer, one process's): sharded -> one process
    and back, one more step on each."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, opt, ref, ropt = runs
    out: dict = {}
    # checkpoint, sharded -> one process: a fresh single-process model + optimizer loads it
    sd = opt.state_dict()  # a collective under FSDP2
    msd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    out["base_keys"] = sd["gnsp"]["base_keys"]
    if rank == 0:
        torch.save({"opt": sd, "model": msd}, f"{tmp}/{name}.pt")
    dist.barrier()
    saved = torch.load(f"{tmp}/{name}.pt", weights_only=False)
    single, _, _ = build(name)
    single.load_state_dict(saved["model"])
    sopt = make_opt(single, opts)
    sopt.load_state_dict(saved["opt"])
    # one process -> sharded: a fresh sharded copy (untrained weights loaded with the reference's) loads the
    # single process's state dict
    fresh = copy.deepcopy(start)
    fresh.load_state_dict(ref.state_dict())
    shard(fresh, units, mesh)
    fopt = make_opt(fresh, opts)
    fopt.load_state_dict(ropt.state_dict())
    out["sharded"] = [type(o.base.param_groups[0]["params"][0]).__name__ for o in (opt, fopt, sopt)]
    train(name, single, sopt, 1, None, seed=50)
    train(name, fresh, fopt, 1, rank, seed=50)
    train(name, ref, ropt, 1, None, seed=50)
    rp = flat(ref)
    out["loaded_single"] = max(float((flat(single)[k] - rp[k]).abs().max()) for k in rp)
    out["loaded_sharded"] = max(float((flat(fresh)[k] - rp[k]).abs().max()) for k in rp)
    return out


def embedding_slices(mesh) -> list[tuple[int, int, int, float, int]]:
    """The sliced row mask (each rank masks its own rows of a ``Shard(0)`` DTensor, through ``project_block``)
    against the obvious dense twin, ``N N^T dW`` with ``N`` from ``eigh`` of the one-hot Gram matrix, for
    vocabularies that split evenly (2, 20), unevenly (3, 7) and leave rank 1 no rows (1).
    ``(vocab, first row, stop row, max difference, kept rank)`` per vocabulary, on this rank."""
    from torch.distributed.tensor import Shard, distribute_tensor

    from gnsp_optim.fsdp import row_shard
    from gnsp_optim.kinds import discover_blocks
    from gnsp_optim.naive import one_hot_null_projector
    from gnsp_optim.projection import project_block
    from gnsp_optim.subspace import TailEnergy

    out = []
    for vocab in (1, 2, 3, 7, 20):
        g = torch.Generator().manual_seed(vocab)
        ids = torch.randint(0, vocab, (max(1, vocab // 2),), generator=g)  # some tokens used, others free
        block = discover_blocks(nn.Embedding(vocab, 3).double(), {})[0]
        block.stat.update(ids)
        block.stat.fold()
        proj = block.kind.projector(block, block.stat.memory, TailEnergy(0.0), dtype=F64)
        delta = torch.randn(vocab, 3, generator=g, dtype=F64)
        want = one_hot_null_projector([ids], vocab, TailEnergy(0.0)) @ delta
        sharded = distribute_tensor(delta.clone(), mesh, [Shard(0)])
        project_block(block, proj, sharded, None)
        _, start, stop, _ = row_shard(sharded)
        out.append((vocab, start, stop, float((sharded.full_tensor() - want).abs().max()), proj.kept_ranks[0]))
    return out


def _worker(rank: int, tmp: str) -> None:
    with gloo_rank(rank, tmp, WORLD):
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        results = {name: one_model(name, rank, mesh, tmp) for name in MODELS}
        results["embedding_slices"] = embedding_slices(mesh)
        torch.save(results, f"{tmp}/rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("fsdp2_opt"), WORLD)


@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_training_equals_one_process(results, name):
    for r in results:
        out = r[name]
        assert out["init_to_ref"] == 0.0
        assert out["params"] < 1e-9, out
        assert out["ranks"] == out["ref_ranks"]
        assert out["sharded"][0] == "DTensor"  # really sharded
        assert out["moved"] > 1e-3  # training did something
        assert out["drift_sharded"] < 1e-9  # old outputs did not move under FSDP2
        assert out["masks_equal"]
        assert all(v == 0.0 for v in out["emb_held"].values()), out["emb_held"]  # old tokens' rows: exactly
        assert all(v > 1e-3 for v in out["emb_moved"].values()), out["emb_moved"]


@pytest.mark.parametrize("name", MODELS)
def test_fsdp2_checkpoint_loads_into_one_process_and_back(results, name):
    for r in results:
        out = r[name]
        assert out["base_keys"] == "names"
        assert out["sharded"] == ["DTensor", "DTensor", "Parameter"]  # sharded, fresh sharded, one process
        assert out["loaded_single"] < 1e-9, out
        assert out["loaded_sharded"] < 1e-9, out


def test_the_models_cover_the_kinds_and_statistics(results):
    r = results[0]
    assert set(r["attention"]["kinds"]) == {"AttentionInProj", "AttentionRowProj", "AttentionOutProj"}
    assert "BareMatmul" in r["clip"]["kinds"] and "Conv" in r["clip"]["kinds"]
    assert r["mlp_sketch"]["stats"] == ["SketchStat"] and r["mlp"]["stats"] == ["CovarianceStat"]
    assert any(k < 7 * 1 for k in sum(r["mlp"]["ranks"].values(), []))  # a null space really remained
    assert r["embedding"]["kinds"] == ["Embedding", "Linear"] and "Embedding" in r["clip"]["kinds"]
    assert r["embedding"]["free_rows"] == {"emb.weight": 4, "types.weight": 3}  # rows 0, 4-6; types 2-4
    assert 0 < r["clip"]["free_rows"]["token_embedding.weight"] < 20
    tied = r["embedding"]["ranks"]["head"]  # the tied head's inputs: a null space remained
    assert tied[0] < 8, tied


def test_sharded_row_mask_equals_the_dense_one_hot_projector(results):
    layouts = {r: [row[:3] for row in out["embedding_slices"]] for r, out in enumerate(results)}
    assert layouts == {0: [(1, 0, 1), (2, 0, 1), (3, 0, 2), (7, 0, 4), (20, 0, 10)],  # torch.chunk rows
                       1: [(1, 1, 1), (2, 1, 2), (3, 2, 3), (7, 4, 7), (20, 10, 20)]}  # V = 1: rank 1 empty
    for out in results:
        for vocab, _, _, diff, kept in out["embedding_slices"]:
            assert diff < 1e-12, (vocab, diff)
            assert vocab < 3 or 0 < kept < vocab  # used and free rows both present
