"""Which parameters are protected, the policy for the rest, and clear errors for bad input."""

import warnings

import pytest
import torch
from helpers import collect, mlp, train
from torch import nn

from gnsp_optim import GNSP_CLIP_VISUAL, FeatureSource, NullSpaceOptimizer


class TinyVisual(nn.Module):
    """Parameter names laid out like open_clip's CLIP vision tower (2 blocks)."""

    def __init__(self, width=8, out=4):
        super().__init__()
        self.visual = nn.Module()
        self.visual.transformer = nn.Module()
        self.visual.transformer.resblocks = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.ln_2 = nn.LayerNorm(width)
            blk.mlp = nn.Sequential()
            blk.mlp.add_module("c_fc", nn.Linear(width, 2 * width))
            blk.mlp.add_module("gelu", nn.GELU())
            blk.mlp.add_module("c_proj", nn.Linear(2 * width, width))
            self.visual.transformer.resblocks.append(blk)
        self.visual.ln_post = nn.LayerNorm(width)
        self.visual.proj = nn.Parameter(torch.randn(width, out) * 0.3)

    def forward(self, x):  # x: (B, T, width)
        for blk in self.visual.transformer.resblocks:
            x = x + blk.mlp(blk.ln_2(x))
        return self.visual.ln_post(x[:, 0]) @ self.visual.proj


def cls_token(t):
    return t[:, 0] if t.dim() == 3 else t


def test_gnsp_clip_preset_is_one_line_and_protects_the_25_tensor_pattern():
    torch.manual_seed(0)
    model = TinyVisual().double()
    opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, rho=1e-15, mode="update",
                             protect=GNSP_CLIP_VISUAL,
                             feature_sources={"visual.proj": FeatureSource("visual.ln_post", select=cls_token)})
    names = sorted(n for b in opt.blocks for n, _ in b.params)
    assert names == sorted([f"visual.transformer.resblocks.{i}.mlp.{m}.weight" for i in range(2)
                            for m in ("c_fc", "c_proj")] + ["visual.proj"])
    old = torch.randn(2, 5, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        before = collect(opt, model, old)
    msgs = [str(x.message) for x in w if "not covered" in str(x.message)]
    assert len(msgs) == 1 and "mlp.c_fc.bias" in msgs[0] and "ln_post.weight" in msgs[0]
    start = model.visual.proj.detach().clone()
    first, last = train(opt, model, torch.randn(16, 5, 8, dtype=torch.float64),
                        torch.randn(16, 4, dtype=torch.float64), 20)
    assert (model(old) - before).abs().max() < 1e-9 and last < first
    assert (model.visual.proj - start).abs().max() > 1e-4
    assert torch.equal(model.visual.ln_post.weight, torch.ones(8, dtype=torch.float64))  # frozen


def test_uncovered_policies():
    def setup(policy):
        model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
        return model, NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=1e-15,
                                         uncovered=policy)

    model, opt = setup("freeze")
    assert opt.uncovered_parameters == ["1.weight", "1.bias"]
    with pytest.warns(UserWarning, match=r"1\.weight.*1\.bias"):
        collect(opt, model, torch.randn(2, 4, dtype=torch.float64))
    ln = model[1].weight.detach().clone()
    train(opt, model, torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), 3)
    assert torch.equal(model[1].weight, ln)

    model, opt = setup("train")
    collect(opt, model, torch.randn(2, 4, dtype=torch.float64))
    ln = model[1].weight.detach().clone()
    train(opt, model, torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), 3)
    assert not torch.equal(model[1].weight, ln)

    model, opt = setup("raise")
    with opt.collect(), torch.no_grad():
        model(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"1\.weight"):
        opt.end_task()


def test_feature_source_layouts_and_errors():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(3, 5)
            self.w_t = nn.Parameter(torch.randn(2, 5))  # used as x @ w_t.T

        def forward(self, x):
            return self.inp(x) @ self.w_t.T

    m = M().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, rho=1e-15,
                             feature_sources={"w_t": FeatureSource("inp", layout="x@W.T")})
    old = torch.randn(2, 3, dtype=torch.float64)
    before = collect(opt, m, old)
    train(opt, m, torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), 5)
    assert (m(old) - before).abs().max() < 1e-9
    with pytest.raises(ValueError, match="no module named 'nope'"):
        NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, feature_sources={"w_t": FeatureSource("nope")})
    with pytest.raises(ValueError, match="'zz'"):
        NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, feature_sources={"zz": FeatureSource("inp")})
    with pytest.raises(ValueError, match="layout"):
        FeatureSource("inp", layout="W@x")


@pytest.mark.parametrize("kwargs,match", [
    (dict(rho=1.0), "rho"), (dict(rho=-0.1), "rho"), (dict(mode="adam"), "mode"),
    (dict(uncovered="ignore"), "uncovered"), (dict(normalize="l2"), "normalize"),
    (dict(stats_dtype=torch.float16), "stats_dtype"),
    (dict(protect=["nothing.*"]), "nothing"), (dict(protect=["0.weight", "0.weight"]), "twice"),
    (dict(protect=["1.weight"]), r"'1\.weight'.*shape"), (dict(protect=["0.bias"]), "together"),
])
def test_bad_arguments_are_refused_by_name(kwargs, match):
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2))
    with pytest.raises((ValueError, TypeError), match=match):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


def test_optimizer_and_model_must_match():
    model, other = nn.Linear(3, 3), nn.Linear(3, 3)
    with pytest.raises(ValueError, match="shares no parameter"):
        NullSpaceOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), model)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        NullSpaceOptimizer(object(), model)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(TypeError, match="already"):
        NullSpaceOptimizer(opt, model)


def test_tied_weight_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    m = Tied()
    with pytest.raises(ValueError, match="tied"):
        NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)


def test_non_finite_collection_is_refused_and_memory_kept():
    model = mlp([4, 6, 2], "tanh")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=1e-15)
    collect(opt, model, torch.randn(2, 4, dtype=torch.float64))
    memory = {b.name: b.stat.memory.clone() for b in opt.blocks}
    projectors = dict(opt.projectors)
    bad = torch.randn(2, 4, dtype=torch.float64)
    bad[0, 1] = float("nan")
    with opt.collect(), torch.no_grad():
        model(bad)
    with pytest.raises(ValueError, match=r"\['0', '2'\]"):
        opt.end_task()
    assert opt.tasks_seen == 1 and opt.projectors == projectors
    for b in opt.blocks:
        assert torch.equal(b.stat.memory, memory[b.name])
    opt.discard_collection()
    collect(opt, model, torch.randn(2, 4, dtype=torch.float64))
    assert opt.tasks_seen == 2


def test_layer_that_saw_no_input_is_frozen_with_a_warning():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x, use_b=False):
            return self.b(x) if use_b else self.a(x)

    m = TwoHeads().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m, rho=1e-15)
    with pytest.warns(UserWarning, match=r"\['b'\] saw no input"):
        collect(opt, m, torch.randn(2, 3, dtype=torch.float64))
    assert opt.projectors["b"].is_zero
    wb = m.b.weight.detach().clone()
    opt.zero_grad()
    m(torch.randn(4, 3, dtype=torch.float64), use_b=True).sum().backward()
    opt.step()
    assert torch.equal(m.b.weight, wb)


def test_collect_misuse():
    model = mlp([3, 2])
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with opt.collect():
        with pytest.raises(RuntimeError, match="already open"):
            with opt.collect():
                pass
        with pytest.raises(RuntimeError, match="still open"):
            opt.end_task()


def test_load_state_dict_refuses_other_models_and_versions():
    model = mlp([4, 6, 2], "tanh")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    collect(opt, model, torch.randn(3, 4, dtype=torch.float64))
    sd = opt.state_dict()
    wider = mlp([4, 7, 2], "tanh")
    other = NullSpaceOptimizer(torch.optim.SGD(wider.parameters(), lr=0.1), wider)
    with pytest.raises(ValueError, match="layer '2'.*dim=6.*dim=7"):
        other.load_state_dict(sd)
    deeper = mlp([4, 6, 6, 2], "tanh")
    other = NullSpaceOptimizer(torch.optim.SGD(deeper.parameters(), lr=0.1), deeper)
    with pytest.raises(ValueError, match="missing"):
        other.load_state_dict(sd)
    bad = {"base": sd["base"], "gnsp": dict(sd["gnsp"], format_version=99)}
    fresh = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(ValueError, match="version 99"):
        fresh.load_state_dict(bad)
    with pytest.raises(ValueError, match="not a NullSpaceOptimizer state dict"):
        fresh.load_state_dict(sd["base"])
    assert fresh.tasks_seen == 0 and not fresh.projectors  # nothing changed


def test_summary_reports_ranks_and_memory():
    model = mlp([8, 12, 2], "tanh")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=1e-15)
    collect(opt, model, torch.randn(3, 8, dtype=torch.float64))
    rows = {r["layer"]: r for r in opt.report()}
    assert rows["0"]["input_dim"] == 9 and rows["0"]["kept_rank"] == 3 and rows["0"]["null_dim"] == 6
    assert rows["0"]["form"] == "kept" and rows["0"]["projector_bytes"] == 9 * 3 * 8
    assert rows["0"]["null_mass"] < 1e-12
    text = opt.summary()
    assert "kept" in text and "null mass" in text
    lines = text.splitlines()
    for r in opt.report():  # one row per layer, with its numbers
        row = [line.split() for line in lines if line.split()[:1] == [r["layer"]]]
        assert len(row) == 1, (r["layer"], text)
        assert row[0][1:5] == [str(r["input_dim"]), str(r["kept_rank"]), str(r["null_dim"]),
                               f"{r['null_mass']:.2e}"], row
    assert "frozen parameters: 0" in lines[-1]


def test_report_null_mass_is_the_tail_share_of_the_spectrum():
    """``null_mass`` is the share of the collected covariance's eigenvalue mass past the kept rank,
    checked against a spectrum computed here (eigvalsh of the naive sum) and the loop rank rule."""
    from gnsp_optim.naive import covariance_sum, tail_energy_rank_loop

    torch.manual_seed(0)
    model = nn.Linear(6, 3, bias=False).double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.3)
    x = torch.randn(40, 6, dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.3, 0.1], dtype=torch.float64)
    collect(opt, model, x)
    lam = torch.linalg.eigvalsh(covariance_sum([x])[:6, :6]).flip(0).tolist()
    k = tail_energy_rank_loop(lam, 0.3)
    expected = sum(lam[k:]) / sum(lam)
    (row,) = opt.report()
    assert row["kept_rank"] == k and 0 < k < 6
    assert row["null_mass"] == pytest.approx(expected, rel=1e-9) and 0.01 < expected <= 0.3


def test_row_subsampling_keeps_a_share_of_rows_and_still_protects_a_low_rank_task():
    torch.manual_seed(0)
    model = mlp([8, 12, 2], "identity")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=1e-15)
    with pytest.raises(ValueError, match="row_fraction"):
        with opt.collect(row_fraction=0.0):
            pass
    z = torch.randn(200, 3, dtype=torch.float64) @ torch.randn(3, 8, dtype=torch.float64)  # rank-3 inputs
    with opt.collect(row_fraction=0.1), torch.no_grad():
        before = model(z)
    assert opt.blocks[0].stat.task_count == 20  # 10% of 200 rows
    opt.end_task()
    assert opt.projectors["0"].kept_ranks == [4]  # the sample spans the inputs (3) plus the bias column
    train(opt, model, torch.randn(16, 8, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64), 5)
    assert (model(z) - before).abs().max() < 1e-9  # unsampled rows lie in the sampled span: still exact
    assert opt.blocks[0].stat.row_fraction == 1.0  # reset when collect() closes


# ---- regressions found by review (each failed before its fix) --------------------------------------------
D64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("mode,make", [("grad", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)),
                                       ("update", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))])
def test_weight_tied_to_an_embedding_is_protected_in_both_uses(mode, make):
    """Issue 13 replaced the refusal: the embedding's rows of old tokens and the head's old inputs both hold."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.mix = nn.Linear(6, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    torch.manual_seed(0)
    m = LM().double()
    opt = NullSpaceOptimizer(make(m.parameters()), m, rho=0.0, mode=mode)
    assert {"emb", "head"} <= {r["layer"] for r in opt.report()}  # two blocks on the one weight
    old = torch.tensor([[1, 2, 3]])  # 3 tokens: rows 1-3 held; 3 head inputs of 6 dimensions occupied
    before = collect(opt, m, old)
    w0 = m.emb.weight.detach().clone()
    new = torch.randint(0, 10, (4, 5))
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(m(new).flatten(0, 1), new.flatten().roll(1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert (m(old) - before).abs().max() < 1e-9 and losses[-1] < losses[0]
    assert torch.equal(m.emb.weight[1:4], w0[1:4]) and not torch.equal(m.emb.weight, w0)


def test_weight_tied_between_two_linear_layers_is_still_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    m = Tied()
    with pytest.raises(ValueError, match=r"'a\.weight' is shared by several modules"):
        NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), m)


@pytest.mark.parametrize("bias_lr", [0.1, 0.03])
def test_grad_mode_is_exact_when_weight_and_bias_have_different_learning_rates(bias_lr):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    base = torch.optim.SGD([{"params": weights, "lr": 0.1}, {"params": biases, "lr": bias_lr}])
    opt = NullSpaceOptimizer(base, model, rho=1e-15, mode="grad")
    old = torch.randn(3, 6, **D64) + 2.0  # affine data: the constant-1 direction is occupied
    before = collect(opt, model, old)
    first, last = train(opt, model, torch.randn(16, 6, **D64), torch.randn(16, 2, **D64), 10)
    assert (model(old) - before).abs().max() < 1e-9 and last < first


def test_lbfgs_history_cannot_move_frozen_parameters_in_update_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 2)).double()
    # project_state=False: LBFGS's flat curvature history cannot be projected per layer, so by default
    # end_task() drops it, and a history built only from projected gradients (frozen entries 0) would never
    # move the LayerNorm anyway; kept, task 1's history (over every parameter) does move it, and only update
    # mode's restore holds it still
    opt = NullSpaceOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4), model, rho=1e-15,
                             mode="update", project_state=False)
    x1, y1 = torch.randn(16, 5, **D64), torch.randn(16, 2, **D64)

    def closure_for(x, y):
        def closure():
            opt.zero_grad()
            loss = (model(x) - y).square().mean()
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        opt.step(closure_for(x1, y1))  # task 1 builds LBFGS curvature history over every parameter
    old = torch.randn(3, 5, **D64)
    before = collect(opt, model, old)
    ln = model[1].weight.detach().clone()
    for _ in range(3):
        opt.step(closure_for(torch.randn(16, 5, **D64), torch.randn(16, 2, **D64)))
    assert torch.equal(model[1].weight, ln)
    assert (model(old) - before).abs().max() < 1e-9


def test_shared_qkv_bias_is_uncovered_when_one_of_q_k_v_is_not_protected():
    m = nn.MultiheadAttention(4, 1, kdim=6, vdim=6).double()
    m.v_proj_weight.requires_grad_(False)
    opt = NullSpaceOptimizer(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2), m,
                             rho=1e-15, mode="update")
    assert "in_proj_bias" in opt.uncovered_parameters
    assert all(b.bias is None for b in opt.blocks if b.name.endswith(("q_proj", "k_proj")))


def test_add_param_group_after_end_task_refits_projectors_and_freezes_newcomers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.PReLU(), nn.Linear(6, 2)).double()
    model[0].bias.requires_grad_(False)
    base = torch.optim.SGD([model[0].weight, model[2].weight, model[2].bias], lr=0.1)
    opt = NullSpaceOptimizer(base, model, rho=1e-15)
    old = torch.randn(3, 5, **D64) + 1.0
    before = collect(opt, model, old)
    model[0].bias.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"\['1\.weight'\]"):
        opt.add_param_group({"params": [model[0].bias, model[1].weight]})
    assert opt.projectors["0"].dim == 6 and "1.weight" in opt.frozen
    train(opt, model, torch.randn(16, 5, **D64), torch.randn(16, 2, **D64), 10)
    assert (model(old) - before).abs().max() < 1e-9


def test_hooks_accept_positional_and_keyword_call_forms():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2)
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            y = self.attn(x, x, x, None, False)[0]  # key_padding_mask, need_weights positionally
            return self.lin(input=y)

    m = M().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), m, rho=1e-15)
    old = torch.randn(3, 1, 4, **D64)
    before = collect(opt, m, old)
    assert all(b.stat.tasks_folded == 1 for b in opt.blocks)
    train(opt, m, torch.randn(3, 8, 4, **D64), torch.randn(3, 8, 3, **D64), 5)
    assert (m(old) - before).abs().max() < 1e-9


def test_rho_zero_keeps_exactly_the_occupied_directions():
    model = mlp([16, 4], "identity")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
    collect(opt, model, torch.randn(20, 3, **D64) @ torch.randn(3, 16, **D64))
    assert opt.projectors["0"].kept_ranks == [4]  # rank 3 inputs + the bias column, round-off ignored


def test_bias_frozen_by_requires_grad_stays_put():
    model = mlp([5, 6, 2], "tanh")
    model[0].bias.requires_grad_(False)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=1e-15)
    old = torch.randn(3, 5, **D64)
    before = collect(opt, model, old)
    b0 = model[0].bias.detach().clone()
    train(opt, model, torch.randn(16, 5, **D64), torch.randn(16, 2, **D64), 10)
    assert torch.equal(model[0].bias, b0) and (model(old) - before).abs().max() < 1e-9


def test_stale_momentum_is_projected_when_the_bias_has_no_buffer_yet():
    torch.manual_seed(0)
    model = mlp([5, 6, 2], "tanh")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.95), model, rho=1e-15)
    for _ in range(3):  # momentum for the first weight only: its bias gets no gradient in task 1
        opt.zero_grad()
        (torch.randn(8, 5, **D64) @ model[0].weight.T).square().mean().backward()  # no bias, no layer 2
        opt.step()
    old = torch.randn(3, 5, **D64)
    before = collect(opt, model, old)
    train(opt, model, torch.randn(16, 5, **D64), torch.randn(16, 2, **D64), 5)
    assert (model(old) - before).abs().max() < 1e-9


def test_feature_source_reading_an_attention_module():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)
            self.P = nn.Parameter(torch.randn(4, 2))

        def forward(self, x):
            return self.attn(x, x, x)[0] @ self.P

    m = M().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), m, rho=1e-15,
                             feature_sources={"P": FeatureSource("attn", select=lambda t: t)})
    old = torch.randn(1, 2, 4, **D64)
    with opt.collect(), torch.no_grad():
        before = m(old)
    opt.end_task()
    assert not opt.projectors["P"].is_zero
    train(opt, m, torch.randn(4, 3, 4, **D64), torch.randn(4, 3, 2, **D64), 5)
    assert (m(old) - before).abs().max() < 1e-9
