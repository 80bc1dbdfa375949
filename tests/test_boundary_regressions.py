"""Issue 13, one regression test per bullet: protection is never lost in silence at the wrapper's boundary.

Public API only. Each test failed on main 03ce54c (the measured numbers are in docs/design/anymodel.md)
and passes with the integration of issue 13. Public names these tests fix:

- ``NullSpaceOptimizer(..., running_stats="freeze" | "track")``: normalisation running statistics after
  ``end_task()`` (default ``"freeze"``);
- ``opt.remove_hooks()``; ``with NullSpaceOptimizer(...) as opt:`` removes them on exit;
- ``opt.monitor(inputs, every=N, tol=...)`` (see :mod:`gnsp_optim.monitor`).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import io
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gnsp_optim import NullSpaceOptimizer

TOL = 1e-9
HAS_PEFT = importlib.util.find_spec("peft") is not None and importlib.util.find_spec("transformers") is not None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def low_rank(n: int, d: int, r: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g,
                                                                             dtype=torch.float64)


def fit(opt, model, x, steps=10):
    """A few steps on task-2 data (regress the outputs onto a fixed random target)."""
    y = torch.randn_like(model(x)).detach()
    for _ in range(steps):
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()


def tasks_one_and_two(model, opt, old, new, steps=10):
    with opt.collect(), torch.no_grad():
        y0 = model(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.end_task()
    fit(opt, model, new, steps)
    with torch.no_grad():
        return rel(model(old), y0)


# ---------------------------------------------------------------- normalisation running statistics
class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4 * 4 * 4, 2)

    def forward(self, x):
        return self.head(F.relu(self.bn(self.conv(x))).flatten(1))


def _bn_drift(**kw) -> tuple[float, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = ConvBN().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, rho=0.0, **kw)
    old = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model.eval()
    with opt.collect(), torch.no_grad():
        y0 = model(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.end_task()
    mean0 = model.bn.running_mean.clone()
    model.train()  # the user trains task 2 in train mode, as usual
    fit(opt, model, torch.randn(8, 3, 6, 6, dtype=torch.float64) * 3 + 1)
    model.eval()
    with torch.no_grad():
        return rel(model(old), y0), mean0, model.bn.running_mean.clone()


def test_batchnorm_running_stats_kept_fixed_by_default():
    drift, _, _ = _bn_drift()
    assert drift < TOL, drift


def test_batchnorm_running_stats_option_lets_them_move():
    _, mean0, mean1 = _bn_drift(running_stats="track")
    assert not torch.equal(mean0, mean1)


# ---------------------------------------------------------------- staged unfreezing
def test_parameter_unfrozen_after_construction_is_protected_or_warned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    model[0].requires_grad_(False)  # staged unfreezing: the first layer joins later
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, rho=0.0)
    old = low_rank(12, 8, 3)
    with opt.collect(), torch.no_grad():
        y0 = model(old)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.end_task()
        model[0].requires_grad_(True)
        fit(opt, model, torch.randn(16, 8, dtype=torch.float64))
    with torch.no_grad():
        drift = rel(model(old), y0)
    named = any("0.weight" in str(w.message) for w in caught)
    assert drift < TOL or named, f"drift {drift:.3e} and no warning names '0.weight'"


# ---------------------------------------------------------------- protected weight used outside its module
class OutsideUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(F.linear(h, self.fc.weight))  # fc.weight again, outside fc's forward


def test_weight_used_outside_its_module_is_named():
    torch.manual_seed(0)
    model = OutsideUse().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, rho=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with opt.collect(), torch.no_grad():
                model(low_rank(6, 8, 3))
        except (RuntimeError, ValueError) as err:  # an error naming it is as good as a warning
            caught.append(warnings.WarningMessage(str(err), UserWarning, "", 0))
    assert any("fc.weight" in str(w.message) for w in caught)


# ---------------------------------------------------------------- NestedTensor (TransformerEncoder fast path)
def test_transformer_encoder_padding_mask_nested_tensor():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).double().eval()
    opt = NullSpaceOptimizer(torch.optim.SGD(enc.parameters(), lr=0.05, momentum=0.9), enc, rho=0.0)
    x = torch.randn(2, 5, 16, dtype=torch.float64) * 0.5
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    keep = ~mask
    with opt.collect(), torch.no_grad():
        y0 = enc(x, src_key_padding_mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.end_task()
    new = torch.randn(8, 5, 16, dtype=torch.float64)
    fit(opt, enc, new)
    with torch.no_grad():
        y1 = enc(x, src_key_padding_mask=mask)
    assert rel(y1[keep], y0[keep]) < TOL  # padded positions are excluded from the statistic and the check


# ---------------------------------------------------------------- a weight the user freezes mid-task
@pytest.mark.parametrize("mode,make", [
    ("grad", lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01)),
    ("update", lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1))])
def test_weight_frozen_mid_task_stays_still(mode, make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).double()
    opt = NullSpaceOptimizer(make(model.parameters()), model, rho=0.0, mode=mode)
    tasks_one_and_two(model, opt, low_rank(6, 8, 3), torch.randn(16, 8, dtype=torch.float64), steps=3)
    model[0].weight.requires_grad_(False)  # the user's freeze; model[0].bias keeps training
    w = model[0].weight.detach().clone()
    fit(opt, model, torch.randn(16, 8, dtype=torch.float64), steps=3)
    assert torch.equal(model[0].weight.detach(), w), (model[0].weight.detach() - w).abs().max().item()


# ---------------------------------------------------------------- DoRA refused clearly
@pytest.mark.skipif(not HAS_PEFT, reason="peft not installed")
def test_dora_refused_clearly():
    import peft
    import transformers as tf

    torch.manual_seed(0)
    base = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                                              num_hidden_layers=1, num_attention_heads=2))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises((ValueError, TypeError), match="DoRA"):
        NullSpaceOptimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model)


# ---------------------------------------------------------------- meta device
def test_meta_device_model_refused_at_construction():
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    with pytest.raises((ValueError, TypeError), match="meta"):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)


# ---------------------------------------------------------------- hook lifecycle
def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def test_remove_hooks_is_public():
    model = _small()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert _hook_count(model) > 0
    opt.remove_hooks()
    assert _hook_count(model) == 0


def test_context_manager_removes_hooks_on_exit():
    model = _small()
    with NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model) as opt:
        assert isinstance(opt, NullSpaceOptimizer) and _hook_count(model) > 0
    assert _hook_count(model) == 0


def test_dropping_the_wrapper_releases_it_and_its_hooks():
    model = _small()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    assert _hook_count(model) == 0


def test_torch_save_of_a_wrapped_model():
    model = _small()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))
    assert opt.tasks_seen == 0


def test_deepcopy_never_feeds_the_original_statistics():
    def kept_ranks(run_copy: bool):
        model = _small()
        opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
        teacher = copy.deepcopy(model)
        with opt.collect(), torch.no_grad():
            model(low_rank(6, 8, 2))
            if run_copy:
                teacher(torch.randn(20, 8, dtype=torch.float64))  # full-rank inputs, to the copy only
        opt.end_task()
        return [r["kept_rank"] for r in opt.report()]

    assert kept_ranks(True) == kept_ranks(False)


# ---------------------------------------------------------------- conversion after wrapping
def test_double_after_wrapping_keeps_exact_statistics_or_says_why():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))  # float32 at construction
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, rho=0.0)
    model.double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drift = tasks_one_and_two(model, opt, low_rank(6, 8, 3), torch.randn(16, 8, dtype=torch.float64))
    said = any("float64" in str(w.message) or "dtype" in str(w.message) for w in caught)
    assert drift < TOL or said, f"drift {drift:.3e}, no warning about the dtype"


# ---------------------------------------------------------------- end_task with nothing collected
def test_end_task_with_nothing_collected_is_an_error():
    model = _small()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises((RuntimeError, ValueError), match="collect"):
        opt.end_task()
    assert opt.tasks_seen == 0


def test_end_task_with_nothing_collected_changes_nothing_it_should_not():
    """Holds today and must keep holding: no input reached a layer -> that layer is never left unprotected."""
    model = _small()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with opt.collect(), torch.no_grad():
        model[0](torch.randn(3, 8, dtype=torch.float64))  # layer "2" sees nothing
    with pytest.warns(UserWarning, match="'2'"):
        opt.end_task()
    w = model[2].weight.detach().clone()
    fit(opt, model, torch.randn(8, 8, dtype=torch.float64), steps=2)
    assert torch.equal(model[2].weight.detach(), w)


# ---------------------------------------------------------------- a block that becomes fully occupied
def test_fully_occupied_block_is_named_with_the_way_out():
    model = _small()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
    with opt.collect(), torch.no_grad():
        model(low_rank(40, 8, 3))  # layer "0": rank 3 (+ bias column) of 9; layer "2": 16-d tanh features
        model[2](torch.randn(40, 16, dtype=torch.float64))  # full rank: layer "2" is fully occupied
    with pytest.warns(UserWarning, match=r"'2'.*(rho|rank)"):
        opt.end_task()


# ---------------------------------------------------------------- the protection monitor
def test_monitor_warns_when_a_path_the_hooks_cannot_see_moves_old_outputs():
    torch.manual_seed(0)
    model = OutsideUse().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), model, rho=0.0)
    old = low_rank(6, 8, 3)
    with opt.collect(), torch.no_grad():
        model(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.end_task()
    mon = opt.monitor(old, every=2, tol=1e-6)
    with pytest.warns(UserWarning, match="drift"):
        fit(opt, model, torch.randn(16, 8, dtype=torch.float64), steps=4)
    assert mon.history and mon.history[-1]["drift"] > 1e-6
