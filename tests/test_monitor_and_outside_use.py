"""The protection monitor and the outside-use detector, standalone (public calls only)."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from gnsp_optim import NullSpaceOptimizer
from gnsp_optim.monitor import ProtectionMonitor, output_tensors
from gnsp_optim.outside_use import OutsideUseDetector

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


class OutsideUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.out(F.linear(torch.tanh(self.fc(x)), self.fc.weight))


def low_rank(n, d, r, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ monitor
@given(seed=st.integers(0, 2**16), n=st.integers(1, 12), scale=st.floats(1e-6, 1.0))
def test_monitor_drift_equals_the_obvious_formula(seed, n, scale):
    torch.manual_seed(seed)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(n, 5, dtype=torch.float64)
    mon = ProtectionMonitor(lin, every=1, tol=float("inf"), sample=64)
    mon.add_task(x, name="old")
    y0 = (x @ lin.weight.T + lin.bias).detach()
    dw = torch.randn_like(lin.weight) * scale
    with torch.no_grad():
        lin.weight += dw
    expected = ((x @ dw.T).norm() / y0.norm()).item()
    got = mon.check()["old"]
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-15)
    assert mon.history[-1] == {"step": 0, "task": "old", "drift": got}


def test_monitor_unchanged_model_has_zero_drift_and_no_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    mon = ProtectionMonitor(model, every=1, tol=0.0)
    mon.add_task(torch.randn(10, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mon.check() == {"task 0": 0.0}


def test_monitor_keeps_only_the_sample_and_checks_every_n_steps():
    model = nn.Linear(3, 2)
    mon = ProtectionMonitor(model, every=3, sample=5, warn=False)
    mon.add_task({"input": torch.randn(40, 3)}, name="dict-inputs")
    assert mon.tasks["dict-inputs"][0]["input"].shape == (5, 3)
    results = [mon.step() for _ in range(7)]
    assert [r is not None for r in results] == [False, False, True, False, False, True, False]
    assert [h["step"] for h in mon.history] == [3, 6]


def test_monitor_check_is_eval_mode_and_leaves_running_stats_and_flags_alone():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    model[2].eval()  # a mixed state the monitor must restore exactly
    mon = ProtectionMonitor(model, every=1, tol=0.0, warn=False)
    mon.add_task(torch.randn(8, 3))
    mean = model[1].running_mean.clone()
    assert mon.check()["task 0"] == 0.0  # eval: dropout off, running stats used, so it is deterministic
    assert torch.equal(model[1].running_mean, mean)
    assert [m.training for m in model] == [True, True, False]


def test_monitor_warns_and_logs_above_tol(caplog):
    lin = nn.Linear(3, 2)
    mon = ProtectionMonitor(lin, every=1, tol=1e-6)
    mon.add_task(torch.randn(4, 3), name="A")
    with torch.no_grad():
        lin.bias += 1.0
    with pytest.warns(UserWarning, match="'A' drifted"), caplog.at_level("WARNING", "gnsp_optim.monitor"):
        mon.step()
    assert "drifted" in caplog.text


def test_monitor_bad_arguments_are_named():
    lin = nn.Linear(2, 2)
    for kw, word in (({"every": 0}, "every"), ({"tol": -1.0}, "tol"), ({"sample": 0}, "sample")):
        with pytest.raises(ValueError, match=word):
            ProtectionMonitor(lin, **kw)
    with pytest.raises(TypeError, match="nn.Module"):
        ProtectionMonitor(lambda x: x)  # type: ignore[arg-type]


def test_output_tensors_reads_hf_outputs():
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers not installed")
    from transformers.modeling_outputs import CausalLMOutput

    out = CausalLMOutput(logits=torch.ones(2, 3))
    assert [t.shape for t in output_tensors(out)] == [torch.Size([2, 3])]


def _wrapped(model_cls, tol=1e-7):
    torch.manual_seed(0)
    model = model_cls().double()
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), model, rho=0.0)
    old = low_rank(6, 8, 3)
    with opt.collect(), torch.no_grad():
        model(old)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt.end_task()
    mon = ProtectionMonitor(model, every=2, tol=tol)
    mon.add_task(old)
    mon.attach(opt)
    return model, opt, mon


def _train(opt, model, steps=4):
    x = torch.randn(16, 8, dtype=torch.float64)
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_monitor_on_the_wrapper_silent_when_protection_holds():
    model, opt, mon = _wrapped(lambda: nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(opt, model)
    assert len(mon.history) == 2 and max(h["drift"] for h in mon.history) < 1e-12


def test_monitor_on_the_wrapper_catches_a_path_the_hooks_cannot_see():
    model, opt, mon = _wrapped(OutsideUse)
    with pytest.warns(UserWarning, match="drifted"):
        _train(opt, model)
    assert mon.history[-1]["drift"] > 1e-3


# ------------------------------------------------------------------------------------------ outside use
def test_detector_names_the_outside_use_and_not_the_inside_ones():
    model = OutsideUse()
    with OutsideUseDetector(model, ["fc.weight", "fc.bias", "out.weight"]) as det, torch.no_grad():
        model(torch.randn(3, 8))
    assert det.outside == {"fc.weight": ["linear"]}
    with pytest.warns(UserWarning, match="'fc.weight' \\(by linear\\)"):
        det.warn()


def test_detector_silent_on_plain_models_and_removes_its_hooks():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    names = [n for n, _ in model.named_parameters()]
    with OutsideUseDetector(model, names) as det:
        model(torch.randn(2, 3, 6, 6))
    assert det.outside == {}
    with OutsideUseDetector(mha, [n for n, _ in mha.named_parameters()]) as det2:
        x = torch.randn(2, 5, 8)
        mha(x, x, x)  # out_proj's parameters are read inside the MHA's forward: not outside
    assert det2.outside == {}
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in [*model.modules(), *mha.modules()])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det.warn()


def test_detector_tied_weight_inside_either_owner_is_fine():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    with OutsideUseDetector(model, ["0.weight"]) as det:
        model(torch.tensor([[1, 2, 3]]))
    assert det.outside == {}


def test_detector_metadata_reads_are_not_uses_and_bad_names_raise():
    model = nn.Linear(3, 3)
    with OutsideUseDetector(model, ["weight"]) as det:
        _ = model.weight.shape, model.weight.dtype, model.weight.size(0), model.weight.dim()
    assert det.outside == {}
    with OutsideUseDetector(model, ["weight"]) as det:
        _ = model.weight.sum()
    assert det.outside == {"weight": ["sum"]}
    with pytest.raises(ValueError, match="no parameter"):
        OutsideUseDetector(model, ["nope"])
    with pytest.raises(ValueError, match="module 'x'"):
        OutsideUseDetector(model, {"weight": ["x"]})


def test_detector_explicit_observer_mapping():
    model = OutsideUse()
    # declare the parent's call as inside for fc.weight: the outside F.linear is then accepted
    with OutsideUseDetector(model, {"fc.weight": ["", "fc"]}) as det, torch.no_grad():
        model(torch.randn(2, 8))
    assert det.outside == {}


def test_detector_depth_is_popped_when_forward_raises():
    fc = nn.Linear(2, 2)
    with OutsideUseDetector(fc, ["weight"]) as det:
        with pytest.raises(RuntimeError):
            fc(torch.randn(1, 3))  # shape error inside fc's forward
        _ = fc.weight * 2  # after the failed call, fc is not "inside" any more
    assert det.outside == {"weight": ["mul"]}


class TiedRNNLM(nn.Module):
    """A char-RNN whose cell runs once per time step and whose output layer reuses the embedding outside it."""

    def __init__(self, head):
        super().__init__()
        self.emb, self.ih, self.hh, self.head = nn.Embedding(7, 4), nn.Linear(4, 4), nn.Linear(4, 4), head

    def forward(self, t):
        x = self.emb(t)
        h = torch.zeros(t.shape[0], 4)
        for i in range(t.shape[1]):  # ih and hh are entered again at step 2, after every owner has run once
            h = torch.tanh(self.ih(x[:, i]) + self.hh(h))
        return self.head(h, self.emb.weight)  # the tied head: emb.weight used outside emb, after the loop


@pytest.mark.parametrize("head,op", [(lambda h, w: F.linear(h, w), "linear"), (lambda h, w: h @ w.T, "T"),
                                     (lambda h, w: h @ w.mT, "mT")])
def test_collect_warns_on_a_use_after_an_owner_runs_again_inside_forward(head, op):
    """first_calls bounds the watch by the model's own call: owners re-entered inside its forward (a recurrent
    cell, a shared layer) do not end it early, and a ``.T`` / ``.mT`` view of the weight is a use."""
    torch.manual_seed(0)
    model = TiedRNNLM(head)
    t = torch.randint(0, 7, (2, 3))
    with torch.no_grad(), OutsideUseDetector(model, ["emb.weight", "ih.weight", "hh.weight"], first_calls=1) as det:
        model(t)
        assert not det.active  # the first model call ended the watch
    assert det.outside == {"emb.weight": [op]}
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.warns(UserWarning, match=rf"'emb\.weight' \(by {op}\)"):
        with opt.collect(), torch.no_grad():
            for _ in range(2):
                model(t)
    assert torch._C._len_torch_function_stack() == 0


def test_encode_loop_watch_is_not_ended_by_an_owner_run_twice_in_one_call():
    """Without a model call, only the first owner entered starting again ends the watch (a method that runs
    one owner twice before its outside use is watched to the end)."""
    model = TiedRNNLM(lambda h, w: F.linear(h, w))
    t = torch.randint(0, 7, (2, 3))
    with torch.no_grad(), OutsideUseDetector(model, ["emb.weight", "ih.weight", "hh.weight"], first_calls=1) as det:
        model.forward.__func__(model, t)  # the forward code, not through model.__call__ (like encode_text)
        assert det.active
        model.forward.__func__(model, t)  # emb, the first owner, starts again: the mode leaves
        assert not det.active and torch._C._len_torch_function_stack() == 0
    assert det.outside == {"emb.weight": ["linear"]}


class UserMode(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_early_leave_keeps_the_torch_function_mode_stack_intact():
    """Leaving from a pre-hook: never while a user's mode is innermost (it leaves at the next chance), and a
    raise inside forward or the end of the block after the mode is gone pop nothing else."""
    model = TiedRNNLM(lambda h, w: F.linear(h, w))
    t = torch.randint(0, 7, (2, 3))
    names = ["emb.weight", "ih.weight", "hh.weight"]
    with UserMode():
        with torch.no_grad(), OutsideUseDetector(model, names, first_calls=1) as det:
            with UserMode():
                model(t)
                assert det.active and torch._C._len_torch_function_stack() == 3  # the user's mode is on top
            model.emb(t)
            assert not det.active and torch._C._len_torch_function_stack() == 1  # left at the next entry
        assert torch._C._len_torch_function_stack() == 1  # the outer user mode is still there
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), OutsideUseDetector(model, names, first_calls=1) as det:
            model(t)
            raise RuntimeError("boom")
    assert torch._C._len_torch_function_stack() == 0 and det.outside == {"emb.weight": ["linear"]}


class SharedLayer(nn.Module):
    """One layer applied three times (ALBERT-style sharing), its weight reused once more after the loop."""

    def __init__(self):
        super().__init__()
        self.cell = nn.Linear(4, 4)

    def forward(self, x):
        for _ in range(3):  # the only owner, and the first one entered, starts again inside forward
            x = torch.tanh(self.cell(x))
        return F.linear(x, self.cell.weight)


def test_watch_spans_the_whole_first_model_call_when_its_first_owner_repeats():
    model = SharedLayer()
    with torch.no_grad(), OutsideUseDetector(model, ["cell.weight"], first_calls=1) as det:
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
    assert det.outside == {"cell.weight": ["linear"]}
