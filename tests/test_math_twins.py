"""Fast paths held equal to their slow, obvious twins."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gnsp_optim import FeatureSource, NullSpaceOptimizer
from gnsp_optim.kinds import attention_heads, conv_patches
from gnsp_optim.naive import (
    attention_heads_loop,
    conv_patches_loop,
    covariance_sum,
    project_block_dense,
    project_dense,
    tail_energy_rank_loop,
)
from gnsp_optim.projection import project_block, project_blocks
from gnsp_optim.projector import Projector
from gnsp_optim.statistics import CovarianceStat
from gnsp_optim.subspace import (
    CumulativeEnergy,
    FixedRank,
    RelativeEigenvalue,
    TailEnergy,
    eigh_descending,
    tail_energy_rank,
)

spectra = st.lists(st.floats(0, 1e3, allow_nan=False), min_size=1, max_size=40).map(
    lambda v: sorted(v, reverse=True))


@given(spectra, st.floats(0, 0.999))
def test_tail_energy_rank_matches_loop(lam, rho):
    assert tail_energy_rank(torch.tensor(lam, dtype=torch.float64), rho) == tail_energy_rank_loop(lam, rho)


@given(spectra, st.floats(0.01, 0.99))
def test_rank_rules_are_in_range_and_monotone(lam, t):
    x = torch.tensor(lam, dtype=torch.float64)
    for rule in (TailEnergy(t), CumulativeEnergy(t), RelativeEigenvalue(t), FixedRank(int(t * 50))):
        assert 0 <= rule(x) <= len(lam)
    assert TailEnergy(t)(x) >= TailEnergy(min(0.999, t + 0.1))(x)  # less tail allowed -> more kept
    assert CumulativeEnergy(t)(x) == TailEnergy(1 - t)(x)


def test_rank_rule_examples_and_errors():
    lam = torch.tensor([10.0, 5.0, 0.5, 0.0])
    assert TailEnergy(0.15)(lam) == 2 and TailEnergy(0.0)(lam) == 3
    assert RelativeEigenvalue(0.01)(lam) == 3 and FixedRank(10)(lam) == 4
    assert TailEnergy(0.5)(torch.zeros(3)) == 0
    for bad in (lambda: TailEnergy(1.0), lambda: TailEnergy(-0.1), lambda: CumulativeEnergy(0.0),
                lambda: FixedRank(-1), lambda: RelativeEigenvalue(1.5)):
        with pytest.raises(ValueError):
            bad()


def _random_projector(groups: int, dim: int, k_raw: int, gen: torch.Generator):
    """A projector over ``groups`` random orthonormal bases of ``dim`` with ranks derived from ``k_raw``;
    returns ``(projector, bases q, ranks)``."""
    ranks = [min(dim, (k_raw + g) % (dim + 1)) for g in range(groups)]
    q = torch.linalg.qr(torch.randn(groups, dim, dim, dtype=torch.float64, generator=gen))[0]
    null = torch.stack([q[g].roll(-ranks[g], dims=1) for g in range(groups)])
    return Projector.from_bases(q, null, ranks), q, ranks


@given(st.integers(1, 3), st.integers(2, 12), st.integers(1, 6), st.integers(0, 12), st.booleans(),
       st.integers(0, 1000))
def test_projector_matches_dense_reference(groups, d, rows, k_raw, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    dim = d + int(with_bias)
    proj, q, ranks = _random_projector(groups, dim, k_raw, gen)
    assert proj.basis.shape[-1] == max(min(k, dim - k) for k in ranks) or proj.form in ("kept", "null")
    w = torch.randn(groups, rows, d, dtype=torch.float64, generator=gen)
    b = torch.randn(groups, rows, 1, dtype=torch.float64, generator=gen) if with_bias else None
    nw, nb = proj.apply(w, b)
    for g in range(groups):
        full = w[g] if b is None else torch.cat([w[g], b[g]], 1)
        expect = project_dense(full, q[g][:, : ranks[g]])
        got = nw[g] if b is None else torch.cat([nw[g], nb[g]], 1)
        torch.testing.assert_close(got, expect, atol=1e-10, rtol=0)
        # idempotent and orthogonal to the occupied directions
        torch.testing.assert_close(project_dense(got, q[g][:, : ranks[g]]), got, atol=1e-10, rtol=0)


def test_projector_picks_the_smaller_basis():
    q = torch.eye(10, dtype=torch.float64)[None]
    assert Projector.from_bases(q, q.roll(-2, 2), [2]).form == "kept"
    p = Projector.from_bases(q, q.roll(-8, 2), [8])
    assert p.form == "null" and p.basis.shape == (1, 10, 2) and p.nbytes == 10 * 2 * 8


conv_cfg = st.fixed_dictionaries({
    "spatial": st.sampled_from([1, 2]), "groups": st.sampled_from([1, 2]), "k": st.integers(1, 3),
    "stride": st.integers(1, 3), "padding": st.integers(0, 2), "dilation": st.integers(1, 2),
    "batch": st.integers(1, 2), "size": st.integers(4, 7)})


@given(conv_cfg)
def test_conv_patches_match_loops_and_reproduce_the_convolution(c):
    cls = nn.Conv1d if c["spatial"] == 1 else nn.Conv2d
    conv = cls(4, 6, c["k"], stride=c["stride"], padding=c["padding"], dilation=c["dilation"],
               groups=c["groups"], bias=False).double()
    shape = (c["batch"], 4) + (c["size"],) * c["spatial"]
    x = torch.randn(shape, dtype=torch.float64)
    fast = conv_patches(conv, x)
    torch.testing.assert_close(fast, conv_patches_loop(conv, x))
    # weight @ patches is the convolution's output: the statistic sees exactly what the weight multiplies
    g = c["groups"]
    w = conv.weight.reshape(g, 6 // g, -1)
    out = torch.einsum("gnd,god->gon", fast, w)  # (G, out/G, patches)
    ref = conv(x)  # (N, out, *spatial)
    ref = ref.reshape(c["batch"], g, 6 // g, -1).permute(1, 2, 0, 3).reshape(g, 6 // g, -1)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_conv_patches_with_padding_modes_reproduce_the_convolution(padding_mode):
    conv = nn.Conv2d(3, 5, 3, padding=1, padding_mode=padding_mode, bias=False).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = conv_patches(conv, x)[0] @ conv.weight.reshape(5, -1).T  # (N*L, out)
    torch.testing.assert_close(out, conv(x).permute(0, 2, 3, 1).reshape(-1, 5))


@given(st.sampled_from(["mean", "sum", "frobenius"]), st.integers(1, 4), st.integers(1, 5), st.booleans(),
       st.integers(0, 99))
def test_covariance_stat_matches_naive_sums(normalize, batches, n, fast, seed):
    gen = torch.Generator().manual_seed(seed)
    st_ = CovarianceStat("layer", 3, dtype=torch.float64, normalize=normalize, fast=fast)
    xs = [torch.randn(n, 3, dtype=torch.float64, generator=gen) for _ in range(batches)]
    for x in xs:
        st_.update(x)
    st_.fold()
    torch.testing.assert_close(st_.memory[0], covariance_sum(xs, normalize))
    assert st_.task_sum is None and not st_.seen


def test_statistics_accumulate_in_float32_under_bf16_autocast():
    st_ = CovarianceStat("layer", 8, dtype=torch.float32)
    x = torch.randn(64, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        st_.update(x.to(torch.bfloat16))
    assert st_.task_sum.dtype == torch.float32
    xb = x.to(torch.bfloat16).float()
    torch.testing.assert_close(st_.task_sum[0, :8, :8], xb.T @ xb, rtol=1e-5, atol=1e-4)


def test_eigh_descending_sorts_and_retries_in_float64(monkeypatch):
    m = torch.diag(torch.tensor([1.0, 3.0, 2.0]))
    lam, vec = eigh_descending(m, "demo")
    assert lam.tolist() == [3.0, 2.0, 1.0]
    torch.testing.assert_close(vec @ torch.diag(lam) @ vec.T, m)
    real = torch.linalg.eigh
    calls = []

    def flaky(a, *args, **kw):
        calls.append(a.dtype)
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("did not converge")
        return real(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    lam, _ = eigh_descending(m, "demo")
    assert calls == [torch.float32, torch.float64] and lam.dtype == torch.float32

    def broken(a, *args, **kw):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(RuntimeError, match="blocks.3.mlp"):
        eigh_descending(m, "blocks.3.mlp")
    with pytest.raises(ValueError, match="NaN"):
        eigh_descending(torch.full((2, 2), float("nan")), "x")


@given(st.integers(1, 3), st.integers(2, 12), st.integers(1, 6), st.integers(0, 12), st.booleans(),
       st.integers(0, 1000))
def test_in_place_projection_matches_apply(groups, d, rows, k_raw, with_bias, seed):
    """``Projector.apply_`` (in place, both forms, views included) equals ``apply`` (fresh tensors)."""
    gen = torch.Generator().manual_seed(seed)
    proj = _random_projector(groups, d + int(with_bias), k_raw, gen)[0]
    w = torch.randn(groups * rows, d, dtype=torch.float64, generator=gen)
    b = torch.randn(groups * rows, dtype=torch.float64, generator=gen) if with_bias else None
    wm, bm = w.view(groups, rows, d), None if b is None else b.view(groups, rows, 1)
    nw, nb = proj.apply(wm, bm)
    proj.apply_(wm, bm)  # writes through the views into w and b
    torch.testing.assert_close(w.view(groups, rows, d), nw, atol=1e-12, rtol=0)
    if with_bias:
        torch.testing.assert_close(b.view(groups, rows, 1), nb, atol=1e-12, rtol=0)


def _collected_model(layout: str, rank: int, **kw):
    """A model of one layout, its wrapper after one collected task (``FixedRank(rank)``), and inputs."""
    torch.manual_seed(1)
    sources = {}
    if layout == "linear":
        model = nn.Sequential(nn.Linear(6, 5)).double()
        x = (torch.randn(3, 6, dtype=torch.float64),)
    elif layout == "x@W":
        class Head(nn.Module):
            def __init__(self):
                super().__init__()
                self.ln = nn.Identity()
                self.proj = nn.Parameter(torch.randn(6, 4, dtype=torch.float64))

            def forward(self, t):
                return self.ln(t) @ self.proj

        model, sources, x = Head(), {"proj": FeatureSource("ln")}, (torch.randn(3, 6, dtype=torch.float64),)
    elif layout == "conv":
        model = nn.Sequential(nn.Conv1d(4, 6, 3, groups=2)).double()
        x = (torch.randn(2, 4, 5, dtype=torch.float64),)
    else:
        model = nn.MultiheadAttention(6, 2, kdim=7, vdim=8).double()
        x = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64),
             torch.randn(3, 8, dtype=torch.float64))
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rule=FixedRank(rank),
                             feature_sources=sources, uncovered="train", **kw)
    with opt.collect(), torch.no_grad():
        model(*x)
    opt.end_task()
    return model, opt, x


@pytest.mark.parametrize("rank", [2, 5])  # kept form, null form
@pytest.mark.parametrize("layout", ["linear", "x@W", "conv", "mha"])
def test_block_projection_in_place_and_copy_paths_match_the_dense_twin(layout, rank, monkeypatch):
    """``project_block`` in place (views, transposed, bias rows) and with ``in_place=False`` (apply, then
    write back) both equal the dense per-group projection of :func:`gnsp_optim.naive.project_block_dense`."""
    model, opt, _ = _collected_model(layout, rank)
    assert {p.form for p in opt.projectors.values()} == {"kept" if rank == 2 else "null"}
    calls = []
    real_apply_ = Projector.apply_
    monkeypatch.setattr(Projector, "apply_", lambda self, *a: calls.append(1) or real_apply_(self, *a))
    torch.manual_seed(2)
    for b in opt.blocks:
        proj = opt.projectors[b.name]
        w = torch.randn_like(b.weight)
        bias = None if b.bias is None else torch.randn_like(b.bias)
        expect_w, expect_b = project_block_dense(b, proj, w, bias)
        for in_place in (True, False):
            got_w, got_b = w.clone(), None if bias is None else bias.clone()
            project_block(b, proj, got_w, got_b, in_place=in_place)
            torch.testing.assert_close(got_w, expect_w, atol=1e-12, rtol=0)
            if bias is not None:
                torch.testing.assert_close(got_b, expect_b, atol=1e-12, rtol=0)
        assert not torch.equal(expect_w, w)  # something was projected
    assert len(calls) == len(opt.blocks)  # the in-place path ran once per block (in_place=True)


@given(st.sampled_from(["mean", "sum"]), st.integers(1, 3), st.integers(1, 3), st.integers(1, 6),
       st.integers(1, 9), st.sampled_from([None, 1, 2, 3, 64]), st.integers(0, 99))
def test_covariance_fast_accumulation_matches_general_path(normalize, groups, batches, n, d, block, seed):
    """The in-place (block-symmetric) GEMM accumulation equals the general bmm-then-add path."""
    gen = torch.Generator().manual_seed(seed)
    fast = CovarianceStat("f", d, groups, dtype=torch.float64, normalize=normalize, gram_block=block)
    slow = CovarianceStat("s", d, groups, dtype=torch.float64, normalize=normalize, fast=False)
    for i in range(batches):
        x = torch.randn(groups, n, d, dtype=torch.float64, generator=gen)
        xs = x[i % groups]
        for stat in (fast, slow):
            stat.update(x)
            stat.update(xs, group=i % groups)
            stat.update(xs)  # (n, d) for every group: the broadcast (general) path on both sides
    torch.testing.assert_close(fast.task_sum, slow.task_sum, atol=1e-12, rtol=0)
    assert fast.task_count == slow.task_count and fast.task_batches == slow.task_batches


@pytest.mark.parametrize("d", [600, 2100])  # the automatic block widths (128, 256)
def test_symmetric_gram_at_auto_block_widths_matches_one_gemm(d):
    x = torch.randn(2, 40, d, dtype=torch.float64)
    fast = CovarianceStat("f", d, 2, dtype=torch.float64, normalize="sum")
    slow = CovarianceStat("s", d, 2, dtype=torch.float64, normalize="sum", fast=False)
    for stat in (fast, slow):
        stat.update(x)
        stat.update(x)
    torch.testing.assert_close(fast.task_sum, slow.task_sum, atol=1e-10, rtol=0)
    torch.testing.assert_close(fast.task_sum[:, :d, :d], 2 * x.transpose(1, 2) @ x, atol=1e-10, rtol=0)


class _FirstBlockFull:
    """Rank rule: the first block decomposed is fully occupied (frozen), every later one keeps 2."""

    def __init__(self):
        self.calls = 0

    def __call__(self, lam):
        self.calls += 1
        return len(lam) if self.calls == 1 else min(2, len(lam))


@pytest.mark.parametrize("batch_layers", [False, True])
@pytest.mark.parametrize("layout", ["linear", "mha", "mha_frozen_query"])
def test_update_mode_step_matches_explicit_formula(layout, batch_layers):
    """``mode="update"`` (in place in the parameters) equals, on a copy with a plain AdamW: gradients
    projected by the dense twin, the plain step, then ``W0 + P(W - W0)`` with the dense twin again.
    (``mha_frozen_query``: the query block is fully occupied while it shares ``in_proj_bias`` with key and
    value, whose rows must still get their projected gradient.)"""
    import copy

    torch.manual_seed(3)
    if layout == "linear":
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        xs = (torch.randn(4, 6, dtype=torch.float64),)
    else:
        model = nn.MultiheadAttention(6, 2, kdim=7, vdim=8).double()
        xs = (torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 7, dtype=torch.float64),
              torch.randn(3, 8, dtype=torch.float64))
    rule = _FirstBlockFull() if layout == "mha_frozen_query" else FixedRank(2)
    opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1), model,
                             rule=rule, mode="update", uncovered="train", batch_layers=batch_layers)
    with opt.collect(), torch.no_grad():
        model(*xs)
    opt.end_task()
    frozen = {n for b in opt.blocks if opt.projectors[b.name].is_zero for n in (b.weight_name,)}
    assert bool(frozen) == (layout == "mha_frozen_query")
    twin = copy.deepcopy(model)
    twin_base = torch.optim.AdamW(twin.parameters(), lr=0.1, weight_decay=0.1)
    grads = [torch.randn_like(p) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    twin_grads = dict(zip(names, (g.clone() for g in grads), strict=True))
    for blk in opt.blocks:  # the dense twin's projected gradients (a shared bias: each block its own rows)
        g_b = None if blk.bias_name is None else twin_grads[blk.bias_name]
        new_w, new_b = project_block_dense(blk, opt.projectors[blk.name], twin_grads[blk.weight_name], g_b)
        twin_grads[blk.weight_name] = new_w
        if new_b is not None:
            twin_grads[blk.bias_name] = new_b
    for n, q in twin.named_parameters():
        q.grad = twin_grads[n].clone()
    w0 = {n: q.detach().clone() for n, q in twin.named_parameters()}
    twin_base.step()
    expect = {n: q.detach().clone() for n, q in twin.named_parameters()}
    for blk in opt.blocks:
        d_b = None if blk.bias_name is None else expect[blk.bias_name] - w0[blk.bias_name]
        dw, db = project_block_dense(blk, opt.projectors[blk.name], expect[blk.weight_name] - w0[blk.weight_name],
                                     d_b)
        expect[blk.weight_name] = w0[blk.weight_name] + dw
        if db is not None:
            rows = blk.bias_rows if blk.bias_rows is not None else slice(None)
            expect[blk.bias_name][rows] = (w0[blk.bias_name] + db)[rows]
    for p, g in zip(model.parameters(), grads, strict=True):
        p.grad = g.clone()
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expect[n], atol=1e-12, rtol=0, msg=n)
        assert torch.equal(p.detach(), w0[n]) == (n in frozen)  # every parameter moved, the frozen ones not


class _EqualShapes(nn.Module):
    """Layers of repeated shapes for the batched projection: a Linear stack, attention whose k and v
    projections have equal shapes and share ``in_proj_bias`` rows, grouped convolutions, an ``x @ W`` head."""

    def __init__(self, depth: int, width: int, bias: bool, conv_groups: int) -> None:
        super().__init__()
        self.lins = nn.ModuleList(nn.Linear(width, width, bias=bias) for _ in range(depth))
        self.attn = nn.MultiheadAttention(width, 1, kdim=width + 1, vdim=width + 1, bias=bias, batch_first=True)
        self.convs = nn.ModuleList(nn.Conv1d(2 * conv_groups, 2 * conv_groups, 3, padding=1, groups=conv_groups,
                                             bias=bias) for _ in range(2))
        self.ln = nn.Identity()
        self.head = nn.Parameter(torch.randn(width, 3))

    def forward(self, x: torch.Tensor, kv: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        for lin in self.lins:
            x = torch.tanh(lin(x))
        x = x + self.attn(x, kv, kv, need_weights=False)[0]
        for conv in self.convs:
            s = torch.tanh(conv(s))
        return (self.ln(x) @ self.head).sum() + s.sum()


@given(st.integers(2, 4), st.integers(2, 6), st.booleans(), st.sampled_from(["grad", "update"]),
       st.sampled_from(["sgd", "adamw"]), st.integers(0, 6), st.sampled_from([1, 2]), st.integers(0, 99))
def test_batched_projection_matches_per_layer(depth, width, bias, mode, optim, k, conv_groups, seed):
    """``batch_layers=True`` (one padded batched product per shape) equals the per-layer loop, and takes
    fewer products than there are layers whenever shapes repeat."""
    import copy

    class VaryingRank:  # a rank rule giving different ranks per layer, so bases of one group are zero-padded
        def __init__(self):
            self.calls = 0

        def __call__(self, lam):
            self.calls += 1
            return min(len(lam), (k + self.calls) % (len(lam) + 1))

    torch.manual_seed(seed)
    model = _EqualShapes(depth, width, bias, conv_groups).double()
    twin = copy.deepcopy(model)
    data = [(torch.randn(2, 3, width, dtype=torch.float64), torch.randn(2, 4, width + 1, dtype=torch.float64),
             torch.randn(2, 2 * conv_groups, 5, dtype=torch.float64)) for _ in range(3)]
    opts = []
    for net, batched in ((model, False), (twin, True)):
        base = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if optim == "sgd"
                else torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1))
        opt = NullSpaceOptimizer(base, net, rule=VaryingRank(), mode=mode, uncovered="train",
                                 feature_sources={"head": FeatureSource("ln")}, batch_layers=batched)
        with opt.collect(), torch.no_grad():
            net(*data[0])
        opt.end_task()
        opts.append(opt)
    products = {False: 0, True: 0}
    real_apply_ = Projector.apply_
    for net, opt in zip((model, twin), opts, strict=True):
        Projector.apply_ = lambda self, *a, o=opt: products.__setitem__(o.batch_layers, products[o.batch_layers]
                                                                        + 1) or real_apply_(self, *a)
        try:
            for x in data[1:]:
                opt.zero_grad()
                net(*x).backward()
                opt.step()
        finally:
            Projector.apply_ = real_apply_
    projected = [(p.form, b.projector_dim, b.weight.shape) for b in opts[1].blocks
                 for p in [opts[1].projectors[b.name]] if not p.is_identity and not (p.is_zero and not b.shares_bias)]
    if len(set(projected)) < len(projected):  # equal shapes exist: the batched run took fewer products
        assert products[True] < products[False]
    for (n, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(q.detach(), p.detach(), atol=1e-12, rtol=0, msg=n)


def test_batched_projection_cache_survives_passes_with_different_members(monkeypatch):
    """Update mode projects the gradients of the layers that have one, then the changes of every layer: two
    member lists per shape, both cached (a single slot per shape was rebuilt twice per step)."""
    import gnsp_optim.projection as projection

    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(3))
    opt = NullSpaceOptimizer(torch.optim.AdamW(layers.parameters(), lr=1e-2), layers, rho=0.3, mode="update",
                             batch_layers=True)
    with opt.collect(), torch.no_grad():
        for lin in layers:
            lin(torch.randn(64, 16))
    opt.end_task()
    built = []
    real = projection.stack_projectors
    monkeypatch.setattr(projection, "stack_projectors", lambda projs, dtype: built.append(real(projs, dtype))
                        or built[-1])
    for _ in range(5):
        opt.zero_grad()
        (layers[0](torch.randn(8, 16)).sum() + layers[1](torch.randn(8, 16)).sum()).backward()  # layers[2] idle
        opt.step()
    assert len(built) == 2  # gradients of layers 0-1, changes of 0-2: stacked once each, reused every step
    # the same through the plain function: a cache the caller keeps
    cache: dict = {}
    items = [(b, opt.projectors[b.name], torch.randn_like(b.weight), torch.randn_like(b.bias)) for b in opt.blocks]
    plain = [(b, p, w.clone(), g.clone()) for b, p, w, g in items]
    for _ in range(3):
        project_blocks(items, batched=True, cache=cache)
        project_blocks(items[:2], batched=True, cache=cache)
    for item in plain:
        project_block(*item)
        project_block(*item)
    for (_, _, w, g), (_, _, w2, g2) in zip(items, plain, strict=True):  # projection is idempotent
        torch.testing.assert_close(w, w2, atol=1e-4, rtol=0)  # float32, a few projections each
        torch.testing.assert_close(g, g2, atol=1e-4, rtol=0)
    assert len(cache) == 2


@pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
@given(st.booleans(), st.booleans(), st.booleans(), st.sampled_from([None, "bool", "float"]), st.booleans(),
       st.integers(0, 99))
def test_attention_out_proj_input_matches_the_per_head_loop(packed, batch_first, bias, attn_mask, padding, seed):
    """What the hooks record for ``out_proj`` (the call replayed with an identity output projection) equals
    softmax attention computed one head and one sample at a time, masks and layouts included."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    e, heads, n, length, src = 6, 2, 2, 3, 4
    kdim = None if packed else 5
    m = nn.MultiheadAttention(e, heads, bias=bias, kdim=kdim, vdim=kdim, batch_first=batch_first).double().eval()
    kv_dim = e if packed else 5

    def seq(t, d):
        x = torch.randn(t, n, d, dtype=torch.float64, generator=gen)
        return x.transpose(0, 1) if batch_first else x

    q, k = seq(length, e), seq(src, kv_dim)
    v = seq(src, kv_dim)
    kwargs = {}
    if attn_mask == "bool":
        kwargs["attn_mask"] = torch.rand(length, src, generator=gen) < 0.3
        kwargs["attn_mask"][:, 0] = False  # every query attends somewhere
    elif attn_mask == "float":
        kwargs["attn_mask"] = torch.randn(length, src, dtype=torch.float64, generator=gen)
    if padding:
        kwargs["key_padding_mask"] = torch.zeros(n, src, dtype=torch.bool)
        kwargs["key_padding_mask"][:, -1] = True
    heads_out = attention_heads(m, (q, k, v), dict(kwargs))
    torch.testing.assert_close(heads_out, attention_heads_loop(m, q, k, v, **kwargs), atol=1e-12, rtol=0)
    # and through the optimizer: the out_proj memory is the Gram matrix of those rows
    opt = NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, normalize="sum", uncovered="train")
    with opt.collect(), torch.no_grad():
        m(q, k, v, **kwargs)
    opt.end_task()
    memory = opt.state_dict()["gnsp"]["blocks"]["out_proj"]["memory"][0]
    rows = attention_heads_loop(m, q, k, v, **kwargs).reshape(-1, e)
    torch.testing.assert_close(memory, covariance_sum([rows], "sum"), atol=1e-12, rtol=0)
