"""The central promise: after end_task(), steps leave outputs on the collected inputs unchanged."""

import copy

import pytest
import torch
from helpers import GRAD_EXACT, OPTIMIZERS, collect, low_rank_inputs, mlp, train
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gnsp_optim import NullSpaceOptimizer
from gnsp_optim.naive import project_block_dense

# (tolerance on old-output drift relative to the output scale, rho): float32 statistics carry ~1e-7
# relative noise in their eigenvalues, so the "null" threshold must sit above it.
PRECISION = {torch.float64: (1e-8, 1e-15), torch.float32: (2e-3, 1e-6)}


@given(
    depth=st.integers(1, 3),
    width=st.integers(6, 24),
    n_old=st.integers(1, 5),
    in_rank=st.integers(1, 4),
    act=st.sampled_from(["tanh", "relu", "gelu", "identity"]),
    case=st.sampled_from([("grad", o) for o in GRAD_EXACT] + [("update", o) for o in OPTIMIZERS]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_old_outputs_unchanged_and_new_loss_falls(depth, width, n_old, in_rank, act, case, dtype, bias, seed):
    mode, opt_name = case
    tol, rho = PRECISION[dtype]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    widths = [width] + [width] * depth + [3]
    model = mlp(widths, act, bias=bias, dtype=dtype)
    opt = NullSpaceOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, rho=rho, mode=mode)
    # a few unprotected steps first, so momentum / moments exist before the task boundary
    train(opt, model, torch.randn(16, width, dtype=dtype, generator=gen),
          torch.randn(16, 3, dtype=dtype, generator=gen), 3)
    old = low_rank_inputs(n_old, width, min(in_rank, n_old), dtype, gen)
    before = collect(opt, model, old)
    x_new = torch.randn(64, width, dtype=dtype, generator=gen)
    y_new = torch.randn(64, 3, dtype=dtype, generator=gen)
    first, last = train(opt, model, x_new, y_new, 25)
    with torch.no_grad():
        drift = (model(old) - before).abs().max().item()
    scale = before.abs().max().item() + 1.0
    assert drift <= tol * scale, f"old outputs moved by {drift:.3e}"
    assert last < first, f"new-task loss did not fall ({first:.4f} -> {last:.4f})"


@pytest.mark.parametrize("opt_name", ["adam", "adamw", "sgd_wd"])
def test_grad_mode_is_only_approximate_for_adaptive_or_decaying_optimizers(opt_name):
    """Documented limitation: projecting only the gradient lets Adam / weight decay move old outputs."""
    torch.manual_seed(1)
    model = mlp([10, 16, 3], "tanh")
    opt = NullSpaceOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, rho=1e-12, mode="grad")
    old = low_rank_inputs(3, 10, 3)
    before = collect(opt, model, old)
    train(opt, model, torch.randn(32, 10, dtype=torch.float64), torch.randn(32, 3, dtype=torch.float64), 30)
    drift = (model(old) - before).abs().max().item()
    assert drift > 1e-4


def test_stale_momentum_is_projected_at_end_task():
    """SGD momentum built before end_task must not carry old directions into later steps."""
    drifts = {}
    for project_state in (True, False):
        torch.manual_seed(3)
        model = mlp([8, 12, 2], "tanh")
        opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.95), model,
                                 rho=1e-12, project_state=project_state)
        train(opt, model, torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64), 5)
        old = torch.randn(4, 8, dtype=torch.float64)
        before = collect(opt, model, old)
        train(opt, model, torch.randn(32, 8, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64), 5)
        drifts[project_state] = (model(old) - before).abs().max().item()
    assert drifts[True] < 1e-10
    assert drifts[False] > 1e-6


@pytest.mark.parametrize("mode,opt_name", [("grad", "sgd_momentum"), ("update", "adamw")])
@pytest.mark.parametrize("conv", [
    dict(cls=nn.Conv2d, cin=4, cout=6, k=3, stride=1, padding=1, dilation=1, groups=1),
    dict(cls=nn.Conv2d, cin=4, cout=6, k=3, stride=2, padding=2, dilation=2, groups=2),
    dict(cls=nn.Conv2d, cin=4, cout=4, k=(1, 3), stride=1, padding="same", dilation=1, groups=4),
    dict(cls=nn.Conv1d, cin=3, cout=6, k=3, stride=2, padding=1, dilation=1, groups=3),
])
def test_conv_layers_are_protected(conv, mode, opt_name):
    conv = dict(conv)
    cls = conv.pop("cls")
    cin, cout, k = conv.pop("cin"), conv.pop("cout"), conv.pop("k")
    shape = (1, cin, 7) if cls is nn.Conv1d else (1, cin, 7, 7)
    layer = cls(cin, cout, k, **conv, padding_mode="zeros").double()
    model = nn.Sequential(layer, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3).double())
    model(torch.randn(shape, dtype=torch.float64))  # materialise the lazy layer
    opt = NullSpaceOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, rho=1e-12, mode=mode)
    old = torch.randn(shape, dtype=torch.float64)
    before = collect(opt, model, old)
    x_new = torch.randn(16, *shape[1:], dtype=torch.float64)
    first, last = train(opt, model, x_new, torch.randn(16, 3, dtype=torch.float64), 20)
    assert (model(old) - before).abs().max().item() < 1e-9
    assert last < first


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_conv_padding_modes_are_protected(padding_mode):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, padding_mode=padding_mode), nn.Flatten(),
                          nn.Linear(3 * 25, 2)).double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, rho=1e-12)
    old = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    before = collect(opt, model, old)
    train(opt, model, torch.randn(8, 2, 5, 5, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), 10)
    assert (model(old) - before).abs().max().item() < 1e-9


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(16, 4, kdim=8, vdim=12)

    def forward(self, x, mem, k, v):
        y = self.self_attn(x, x, x, need_weights=False)[0] + self.self_attn(x, mem, mem)[0]
        return self.cross(y.transpose(0, 1), k, v)[0]


@pytest.mark.parametrize("mode,opt_name", [("grad", "sgd_momentum"), ("update", "adamw")])
def test_attention_is_protected_including_out_proj(mode, opt_name):
    torch.manual_seed(0)
    model = CrossAttention().double()
    opt = NullSpaceOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, rho=1e-12, mode=mode)
    d = dict(dtype=torch.float64)
    old = (torch.randn(1, 3, 16, **d), torch.randn(1, 2, 16, **d), torch.randn(4, 1, 8, **d),
           torch.randn(4, 1, 12, **d))
    before = collect(opt, model, *old)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(20):
        opt.zero_grad()
        new = (torch.randn(4, 3, 16, **d), torch.randn(4, 5, 16, **d), torch.randn(4, 4, 8, **d),
               torch.randn(4, 4, 12, **d))
        model(*new).square().mean().backward()
        opt.step()
    assert (model(*old) - before).abs().max().item() < 1e-9
    for name, p in model.named_parameters():  # every tensor trains (nothing was simply frozen)
        assert (p - start[name]).abs().max() > 1e-6, name


def test_transformer_encoder_layer_default_selection():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True).double().eval()
    opt = NullSpaceOptimizer(torch.optim.AdamW(layer.parameters(), lr=1e-2), layer, rho=1e-12, mode="update")
    old = torch.randn(1, 3, 16, dtype=torch.float64)
    before = collect(opt, layer, old)
    assert sorted(opt.frozen) == ["norm1.bias", "norm1.weight", "norm2.bias", "norm2.weight"]
    first, last = train(opt, layer, torch.randn(8, 5, 16, dtype=torch.float64),
                        torch.randn(8, 5, 16, dtype=torch.float64), 20)
    assert (layer(old) - before).abs().max().item() < 1e-9
    assert last < first


def _dense_twin(blocks, projs, tensors: dict, key=lambda n: n) -> None:
    """Project ``tensors`` (by parameter name, or ``key(name)``) block by block with the dense twin; a shared
    bias is projected by each block on its own rows, in turn."""
    for blk in blocks:
        bias = None if blk.bias_name is None else tensors[key(blk.bias_name)]
        new_w, new_b = project_block_dense(blk, projs[blk.name], tensors[key(blk.weight_name)], bias)
        tensors[key(blk.weight_name)].copy_(new_w)
        if new_b is not None:
            bias.copy_(new_b)


@pytest.mark.parametrize("mode,opt_name", [("update", "adamw"), ("grad", "sgd_momentum"), ("grad", "sgd")])
def test_frozen_query_block_does_not_release_the_shared_bias(mode, opt_name):
    """kdim/vdim attention: q/k/v weights are separate but share in_proj_bias. When the query block is fully
    occupied (frozen) and key/value are not, the query rows of the shared bias must still not move, and the
    key / value rows train exactly as the dense twin says (:func:`gnsp_optim.naive.project_block_dense` on
    the gradients, the moments at the boundary and, in update mode, each step's change; float64)."""
    torch.manual_seed(0)
    m = nn.MultiheadAttention(4, 1, kdim=8, vdim=8).double()
    base = OPTIMIZERS[opt_name](m.parameters())
    lr = 0.005 if opt_name.startswith("sgd") else base.param_groups[0]["lr"]
    base.param_groups[0]["lr"] = lr
    opt = NullSpaceOptimizer(base, m, rho=1e-15, mode=mode)
    d = dict(dtype=torch.float64)
    g = torch.Generator().manual_seed(1)

    def new_batch():
        return (torch.randn(6, 1, 4, generator=g, **d), torch.randn(3, 1, 8, generator=g, **d),
                torch.randn(3, 1, 8, generator=g, **d))

    for _ in range(3):  # momentum / moments exist before the task boundary
        opt.zero_grad()
        m(*new_batch())[0].square().sum().backward()
        opt.step()
    twin = copy.deepcopy(m)  # the twin: a plain base optimizer, every projection done by the dense twin
    twin_base = OPTIMIZERS[opt_name](twin.parameters())
    twin_base.load_state_dict(copy.deepcopy(base.state_dict()))  # (load_state_dict shares the tensors)
    old = (torch.randn(10, 1, 4, **d), torch.randn(2, 1, 8, **d), torch.randn(2, 1, 8, **d))
    before = collect(opt, m, *old)[0]
    assert opt.projectors["q_proj"].is_zero and not opt.projectors["k_proj"].is_zero
    tp = dict(twin.named_parameters())
    for key in ("momentum_buffer", "exp_avg"):  # the boundary: linear moments projected
        if key in twin_base.state[tp["in_proj_bias"]]:
            _dense_twin(opt.blocks, opt.projectors, {n: twin_base.state[p][key] for n, p in tp.items()})
    bias0 = m.in_proj_bias.detach().clone()
    for _ in range(20):
        batch = new_batch()
        opt.zero_grad()
        m(*batch)[0].square().sum().backward()
        opt.step()
        twin_base.zero_grad()
        twin(*batch)[0].square().sum().backward()
        with torch.no_grad():
            _dense_twin(opt.blocks, opt.projectors, {n: p.grad for n, p in tp.items()})
            w0 = {n: p.detach().clone() for n, p in tp.items()}
            twin_base.step()
            if mode == "update":
                change = {n: p.detach() - w0[n] for n, p in tp.items()}
                _dense_twin(opt.blocks, opt.projectors, change)
                for n, p in tp.items():
                    p.copy_(w0[n] + change[n])
    assert (m(*old)[0] - before).abs().max().item() < 1e-9
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.detach(), tp[n].detach(), rtol=0, atol=1e-13)
    moved = (m.in_proj_bias.detach() - bias0).abs()
    assert moved[:4].max() < 1e-12  # the frozen query block's rows of the shared bias
    assert moved[4:].min() > 1e-4  # key / value rows train (plain SGD: from this task's gradients alone, so a
    # frozen block must not drop the shared bias's whole gradient), as the twin says


@pytest.mark.parametrize("mode", ["update", "grad"])
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "separate_qkv"])
def test_fully_occupied_attention_holds_its_bias_under_weight_decay(packed, mode):
    """q/k/v fully occupied (old inputs span every direction, bias column included: rank full, nothing free):
    the attention is frozen, and AdamW's decoupled weight decay must not move ``in_proj_bias`` (nor the
    weights), whether the bias is owned by the packed block or shared by the separate q/k/v blocks."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    kdim, vdim = (4, 4) if packed else (3, 5)
    m = nn.MultiheadAttention(4, 2, **({} if packed else dict(kdim=kdim, vdim=vdim))).double()
    with torch.no_grad():
        m.in_proj_bias.normal_()  # initialised to 0, which weight decay would leave alone
    opt = NullSpaceOptimizer(torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.5), m, rho=0.0, mode=mode)

    def new_batch(n=3):
        return torch.randn(n, 1, 4, **d), torch.randn(n, 1, kdim, **d), torch.randn(n, 1, vdim, **d)

    for _ in range(2):  # Adam moments exist before the boundary
        opt.zero_grad()
        m(*new_batch())[0].square().sum().backward()
        opt.step()
    old = new_batch(12)
    collect(opt, m, *old)
    assert all(p.is_zero for p in opt.projectors.values())  # nothing free anywhere
    start = {n: p.detach().clone() for n, p in m.named_parameters()}
    decayed = start["in_proj_bias"] * (1 - 0.1 * 0.5)  # what one plain AdamW step with zero gradient gives
    assert (decayed - start["in_proj_bias"]).abs().max() > 1e-2  # weight decay would move it
    for _ in range(3):
        opt.zero_grad()
        m(*new_batch())[0].square().sum().backward()
        opt.step()
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), start[n]), n
