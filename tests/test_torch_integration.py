"""The wrapper behaves as a torch optimizer: schedulers, GradScaler, clipping, closures, param groups."""

import pytest
import torch
from helpers import collect, low_rank_inputs, mlp, train
from torch import nn

from gnsp_optim import NullSpaceOptimizer


def make(mode="grad", base=None, **kw):
    model = mlp([6, 10, 2], "tanh")
    base = base or torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, NullSpaceOptimizer(base, model, rho=1e-15, mode=mode, **kw)


def test_is_an_optimizer_and_delegates_param_groups_state_defaults():
    model, opt = make()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.base.param_groups
    assert opt.state is opt.base.state and opt.defaults is opt.base.defaults
    opt.param_groups[0]["lr"] = 0.5
    assert opt.base.param_groups[0]["lr"] == 0.5
    assert "NullSpaceOptimizer" in repr(opt)


def test_lr_scheduler_drives_the_base_optimizer_also_after_resume():
    model, opt = make()
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(opt, model, torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), 1)
    sched.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(0.05)
    ckpt = {"opt": opt.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()}
    model2, opt2 = make()
    model2.load_state_dict(ckpt["model"])
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    opt2.load_state_dict(ckpt["opt"])
    sched2.load_state_dict(ckpt["sched"])
    assert opt2.base.param_groups[0]["lr"] == pytest.approx(0.05)
    train(opt2, model2, torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64), 1)
    sched2.step()
    assert opt2.base.param_groups[0]["lr"] == pytest.approx(0.025)  # the scheduler reaches the base


def test_step_hooks_run():
    model, opt = make()
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    train(opt, model, torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), 1)
    assert seen == ["pre", "post"]


def test_grad_scaler_and_clipping_keep_protection():
    model, opt = make(mode="update", base=None)
    opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, rho=1e-15, mode="update")
    old = low_rank_inputs(3, 6, 2)
    before = collect(opt, model, old)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    for _ in range(10):
        opt.zero_grad()
        loss = model(torch.randn(16, 6, dtype=torch.float64)).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        scaler.step(opt)
        scaler.update()
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    assert (model(old) - before).abs().max() < 1e-9


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_closure_based_optimizer(mode):
    model = mlp([6, 10, 2], "tanh")
    opt = NullSpaceOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5), model, rho=1e-15,
                             mode=mode)
    old = low_rank_inputs(3, 6, 2)
    before = collect(opt, model, old)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 2, dtype=torch.float64)

    def closure():
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        return loss

    first = closure().item()
    for _ in range(3):
        opt.step(closure)
    assert (model(old) - before).abs().max() < 1e-8
    assert closure().item() < first


def test_param_groups_protect_each_group_and_add_param_group():
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    base = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.05},
                            {"params": model[2].parameters(), "lr": 0.2}], momentum=0.9)
    opt = NullSpaceOptimizer(base, model, rho=1e-15)
    assert [b.name for b in opt.blocks] == ["0", "2"]
    old = torch.randn(3, 6, dtype=torch.float64)
    before = collect(opt, model, old)
    train(opt, model, torch.randn(16, 6, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64), 10)
    assert (model(old) - before).abs().max() < 1e-9

    model2 = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    opt2 = NullSpaceOptimizer(torch.optim.SGD(model2[0].parameters(), lr=0.1), model2, rho=1e-15)
    assert [b.name for b in opt2.blocks] == ["0"]
    opt2.add_param_group({"params": model2[2].parameters()})
    assert [b.name for b in opt2.blocks] == ["0", "2"]


def test_parameters_without_gradients_are_left_alone():
    model, opt = make()
    old = torch.randn(2, 6, dtype=torch.float64)
    collect(opt, model, old)
    w = model[2].weight.detach().clone()
    opt.zero_grad()
    model[0](torch.randn(4, 6, dtype=torch.float64)).sum().backward()  # only the first layer gets a grad
    opt.step()
    assert torch.equal(model[2].weight, w)
    assert model[2].weight.grad is None
