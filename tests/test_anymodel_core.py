"""Issue 13 in the core: the behaviours the acceptance files do not pin down, through public calls only.

The embedding's row-mask projector is held to its dense twin (:func:`gnsp_optim.naive.one_hot_null_projector`);
the rest are example tests of the new options and edges (hook lifecycle, outside use, monitor, staged
unfreezing, checkpoints, tied heads with a bias, conversions).
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from gnsp_optim import NullSpaceOptimizer
from gnsp_optim.naive import one_hot_null_projector
from gnsp_optim.subspace import TailEnergy

D64 = dict(dtype=torch.float64)


def quiet_end_task(opt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.end_task()


class EmbLM(nn.Module):
    def __init__(self, vocab=7, d=3):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, d), nn.Linear(d, 2)

    def forward(self, ids):
        return self.head(self.emb(ids))


# ------------------------------------------------------------------ the embedding's projector vs its dense twin
@settings(max_examples=25, deadline=None)
@given(tasks=st.lists(st.lists(st.integers(0, 6), min_size=1, max_size=12), min_size=1, max_size=2),
       rho=st.sampled_from([0.0, 0.3]), normalize=st.sampled_from(["mean", "sum", "frobenius"]))
def test_embedding_step_equals_the_dense_one_hot_projection(tasks, rho, normalize):
    """SGD (lr 1, grad mode) on the embedding moves it by exactly ``-P G``, P from the dense one-hot twin."""
    ids = [torch.tensor(t) for t in tasks]
    memory = torch.zeros(7, **D64)  # ties at the rule's cut make the dense eigenbasis arbitrary: skip those
    for t in ids:
        c = torch.bincount(t, minlength=7).double()
        memory += {"mean": c / c.sum(), "sum": c, "frobenius": c / c.norm()}[normalize]
    lam = memory.sort(descending=True).values
    k = TailEnergy(rho)(lam)
    assume(k in (0, 7) or lam[k - 1] != lam[k])
    torch.manual_seed(0)
    model = EmbLM().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.emb.parameters(), lr=1.0), model, rho=rho,
                             normalize=normalize)
    for t in ids:
        with opt.collect(), torch.no_grad():
            model(t)
        quiet_end_task(opt)
    w0 = model.emb.weight.detach().clone()
    g = torch.randn(7, 3, **D64)
    model.emb.weight.grad = g.clone()
    opt.step()
    expected = w0 - one_hot_null_projector(ids, 7, TailEnergy(rho), normalize) @ g
    assert torch.allclose(model.emb.weight.detach(), expected, atol=1e-12)


def test_embedding_padding_idx_and_report():
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=0), nn.Linear(4, 2)).double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
    with opt.collect(), torch.no_grad():
        model(torch.tensor([[0, 0, 3, 5]]))
    quiet_end_task(opt)
    row = next(r for r in opt.report() if r["layer"] == "0")
    assert (row["kept_rank"], row["null_dim"], row["form"]) == (3, 3, "diagonal")  # tokens 0 (padding), 3, 5
    assert row["projector_bytes"] == 6 * 8  # a mask of V numbers, not V x V


def test_embedding_with_max_norm_is_left_to_the_uncovered_policy():
    model = nn.Sequential(nn.Embedding(6, 4, max_norm=1.0), nn.Linear(4, 2))
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert opt.uncovered_parameters == ["0.weight"]


# ------------------------------------------------------------------ tied embedding and head, head with a bias
def test_tied_head_with_bias_keeps_both_uses_exact_and_holds_the_bias():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.mix, self.head = nn.Embedding(9, 6), nn.Linear(6, 6), nn.Linear(6, 9)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.mix(self.emb(ids))))

    torch.manual_seed(0)
    m = LM().double()
    opt = NullSpaceOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), m, rho=0.0, mode="update")
    assert "head.bias" in opt.uncovered_parameters
    old = torch.tensor([[1, 4, 4]])
    with opt.collect(), torch.no_grad():
        y0 = m(old)
    quiet_end_task(opt)
    new = torch.randint(0, 9, (3, 4))
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(m(new).flatten(0, 1), new.flatten().roll(1)).backward()
        opt.step()
    assert (m(old) - y0).abs().max() < 1e-10


# ------------------------------------------------------------------ checkpoints with a token-count block
def test_checkpoint_round_trip_with_an_embedding_block():
    torch.manual_seed(0)
    model = EmbLM().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
    with opt.collect(), torch.no_grad():
        model(torch.tensor([1, 2, 2]))
    quiet_end_task(opt)
    twin = copy.deepcopy(model)
    opt2 = NullSpaceOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), twin, rho=0.0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.report() == opt.report()
    g = torch.randn(7, 3, **D64)
    for m, o in ((model, opt), (twin, opt2)):
        o.zero_grad()
        m.emb.weight.grad = g.clone()
        o.step()
    assert torch.equal(model.emb.weight, twin.emb.weight)


# ------------------------------------------------------------------ hook lifecycle, edges
def test_collect_after_remove_hooks_refuses_and_removal_is_idempotent():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with opt.collect(), torch.no_grad():
        model(torch.randn(4, 3))
    quiet_end_task(opt)  # installs the running-statistics freeze on the BatchNorm
    assert len(model[1]._forward_hooks) == 1
    opt.remove_hooks()
    opt.remove_hooks()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    with pytest.raises(RuntimeError, match="remove_hooks"):
        with opt.collect():
            pass
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))]})
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_torch_save_and_deepcopy_with_the_running_stats_freeze_installed():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with opt.collect(), torch.no_grad():
        model(torch.randn(4, 3))
    quiet_end_task(opt)
    buf = io.BytesIO()
    torch.save(model, buf)
    teacher = copy.deepcopy(model).train()
    mean0 = teacher[1].running_mean.clone()
    teacher(torch.randn(8, 3) + 3)  # the copy is the user's own model: its statistics move
    assert not torch.equal(teacher[1].running_mean, mean0)
    kept = model[1].running_mean.clone()
    model.train()(torch.randn(8, 3) + 3)  # the wrapped model's are held
    assert torch.equal(model[1].running_mean, kept)


# ------------------------------------------------------------------ outside use: policies
class Reuse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.linear(self.fc(x), self.fc.weight)


def test_outside_use_raise_and_ignore():
    model = Reuse()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, outside_use="raise")
    with pytest.raises(RuntimeError, match=r"'fc\.weight' \(by linear\)"):
        with opt.collect(), torch.no_grad():
            model(torch.randn(2, 4))
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, outside_use="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.collect(), torch.no_grad():
            model(torch.randn(2, 4))


def test_no_false_outside_use_on_attention_conv_and_tied_models():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv = nn.Embedding(5, 4), nn.Conv1d(4, 4, 1)
            self.attn, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
            return self.head(self.attn(h, h, h)[0])

    model = M()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.collect(), torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))


@pytest.mark.parametrize("kwargs,match", [(dict(running_stats="move"), "running_stats"),
                                          (dict(outside_use="loud"), "outside_use")])
def test_new_options_are_checked_by_name(kwargs, match):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=match):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kwargs)


# ------------------------------------------------------------------ monitor fed by the next collect()
def test_monitor_without_inputs_records_the_next_collection():
    torch.manual_seed(0)
    model = Reuse().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, rho=0.0,
                             outside_use="ignore")
    mon = opt.monitor(every=1, tol=1e-6)
    with opt.collect(), torch.no_grad():
        model(torch.randn(3, 4, **D64) @ torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], **D64)))
    quiet_end_task(opt)
    assert list(mon.tasks) == ["task 0"]
    with pytest.warns(UserWarning, match="drift"):  # fc.weight's outside use moves the old outputs
        for _ in range(2):
            opt.zero_grad()
            model(torch.randn(8, 4, **D64)).square().mean().backward()
            opt.step()
    assert [r["step"] for r in mon.history] == [1, 2] and mon.history[-1]["drift"] > 1e-6
    assert opt.monitor() is mon


# ------------------------------------------------------------------ staged unfreezing of an uncovered parameter
def test_uncovered_parameter_unfrozen_later_is_warned_and_held():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    model[1].requires_grad_(False)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
    with opt.collect(), torch.no_grad():
        model(torch.randn(2, 4, **D64))
    quiet_end_task(opt)
    assert opt.frozen == []
    model[1].requires_grad_(True)
    ln = model[1].weight.detach().clone()
    model(torch.randn(8, 4, **D64)).square().mean().backward()
    with pytest.warns(UserWarning, match=r"\['1\.weight', '1\.bias'\] were unfrozen"):
        opt.step()
    assert torch.equal(model[1].weight, ln) and opt.frozen == ["1.weight", "1.bias"]


def test_bias_unfrozen_after_the_task_joins_its_block_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    model[0].bias.requires_grad_(False)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model, rho=0.0)
    old = torch.randn(3, 5, **D64)
    with opt.collect(), torch.no_grad():
        y0 = model(old)
    quiet_end_task(opt)
    model[0].bias.requires_grad_(True)
    b0 = model[0].bias.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 5, **D64)).square().mean().backward()
        opt.step()
    assert (model(old) - y0).abs().max() < 1e-10 and not torch.equal(model[0].bias, b0)


# ------------------------------------------------------------------ conversions
def test_stats_dtype_fixed_at_float32_and_a_double_model_is_said():
    model = nn.Linear(3, 2)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, stats_dtype=torch.float32)
    model.double()
    with pytest.warns(UserWarning, match="float32 round-off"):
        with opt.collect():
            pass


def test_double_after_wrapping_switches_the_statistics_to_float64():
    model = nn.Linear(3, 2)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    model.double()
    with pytest.warns(UserWarning, match="switch to float64"):
        with opt.collect(), torch.no_grad():
            model(torch.randn(2, 3, **D64))
    assert opt.blocks[0].stat.dtype == torch.float64 and opt.stats_dtype == torch.float64


def test_parameters_replaced_by_a_conversion_are_refused_by_name():
    model = nn.Linear(3, 2)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    with pytest.raises(RuntimeError, match="'weight' was replaced"):
        with opt.collect():
            pass


def test_outside_use_watch_leaves_after_the_first_model_call():
    """The check runs during the model's first call of a collection only; it still names the use."""
    model = Reuse()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.warns(UserWarning, match=r"'fc\.weight' \(by linear\)"):
        with opt.collect(), torch.no_grad():
            assert torch._C._len_torch_function_stack() == 1
            model(torch.randn(2, 4))
            assert torch._C._len_torch_function_stack() == 0  # the mode left: later batches run bare
            model(torch.randn(2, 4))


class TwoEntries(nn.Module):
    """Called through two methods, never through ``forward`` (like CLIP's encode_image / encode_text)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def encode_a(self, x):
        return self.a(x)

    def encode_b(self, x):
        return F.linear(self.b(x), self.b.weight)  # b.weight used a second time, outside b


def test_outside_use_watch_is_bounded_without_a_model_call():
    """A loop of encode_* calls: the detector watches until every owner has run and one starts over."""
    from gnsp_optim.outside_use import OutsideUseDetector

    model = TwoEntries()
    x = torch.randn(2, 4)
    with torch.no_grad(), OutsideUseDetector(model, ["a.weight", "b.weight"], first_calls=1) as det:
        model.encode_a(x)
        model.encode_a(x)  # b has not run yet: still watching
        assert det.active
        model.encode_b(x)  # the outside use of b.weight is seen on b's first pass
        assert det.active
        model.encode_a(x)  # every owner finished once and one starts again: the mode leaves
        assert not det.active and torch._C._len_torch_function_stack() == 0
        model.encode_b(x)
    assert det.outside == {"b.weight": ["linear"]}
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.warns(UserWarning, match=r"'b\.weight' \(by linear\)"):
        with opt.collect(), torch.no_grad():
            for _ in range(3):
                model.encode_b(x)
                model.encode_a(x)


def test_embedding_padding_row_is_held_under_weight_decay():
    """The padding row gets no gradient, but AdamW's decay (update mode) would move it: it is protected."""
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4, padding_idx=0).double()
    with torch.no_grad():
        emb.weight[0] = 1.0  # a non-zero padding row (e.g. a loaded model)
    model = nn.Sequential(emb, nn.Linear(4, 2)).double()
    opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5), model, rho=0.0,
                             mode="update")
    old = torch.tensor([[0, 0, 3, 5]])
    with opt.collect(), torch.no_grad():
        model(old)
    quiet_end_task(opt)
    before = model(old).detach()
    for _ in range(3):
        opt.zero_grad()
        model(torch.tensor([[1, 2, 4, 0]])).pow(2).sum().backward()
        opt.step()
    assert torch.allclose(model(old), before, atol=1e-12)
    assert not torch.equal(emb.weight[1], torch.zeros(4, dtype=torch.float64))


def test_collect_in_training_mode_with_dropout_warns_naming_the_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2)).double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.warns(UserWarning, match=r"dropout active in training mode \(\['1'\]\).*model\.eval\(\)"):
        with opt.collect(), torch.no_grad():
            model(torch.randn(3, 4, dtype=torch.float64))
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with opt.collect(), torch.no_grad():  # eval mode: no warning
            model(torch.randn(3, 4, dtype=torch.float64))
