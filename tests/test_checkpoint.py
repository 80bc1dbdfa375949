"""A fresh model + wrapper loaded from a checkpoint continues exactly like the uninterrupted run."""

import io

import pytest
import torch
from helpers import OPTIMIZERS, low_rank_inputs, mlp
from torch import nn

from gnsp_optim import NullSpaceOptimizer


def reload_into(fresh, model, opt):
    """Save model and optimizer through bytes (weights_only), load them into a ``fresh()`` pair."""
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c, opt_c = fresh()
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    return model_c, opt_c

def run_tasks(opt, model, tasks, steps):
    for x, y in tasks:
        for _ in range(steps):
            opt.zero_grad()
            (model(x) - y).square().mean().backward()
            opt.step()
        with opt.collect(), torch.no_grad():
            model(x)
        opt.end_task()


def make_tasks(seed):
    g = torch.Generator().manual_seed(seed)
    return [(low_rank_inputs(6, 8, 3, gen=g), torch.randn(6, 3, dtype=torch.float64, generator=g))
            for _ in range(4)]


@pytest.mark.parametrize("mode,opt_name", [("grad", "sgd_momentum"), ("update", "adamw")])
def test_resume_equals_uninterrupted_run(mode, opt_name):
    tasks = make_tasks(0)

    def fresh():
        torch.manual_seed(5)
        model = mlp([8, 12, 3], "tanh")
        return model, NullSpaceOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, rho=1e-15, mode=mode)

    model_a, opt_a = fresh()
    run_tasks(opt_a, model_a, tasks, 5)

    model_b, opt_b = fresh()
    run_tasks(opt_b, model_b, tasks[:2], 5)
    model_c, opt_c = reload_into(fresh, model_b, opt_b)
    assert opt_c.tasks_seen == 2
    run_tasks(opt_c, model_c, tasks[2:], 5)

    for (n, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12, msg=n)
    for name, pa in opt_a.projectors.items():
        pc = opt_c.projectors[name]
        assert pa.kept_ranks == pc.kept_ranks and pa.form == pc.form
    # protection survives the resume: task 1's outputs are still those it ended with
    x0 = tasks[0][0]
    with torch.no_grad():
        torch.testing.assert_close(model_a(x0), model_c(x0), rtol=0, atol=1e-12)


def test_state_dict_holds_projectors_and_memory_by_name():
    model = mlp([8, 12, 3], "tanh")
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    run_tasks(opt, model, make_tasks(1)[:1], 1)
    sd = opt.state_dict()
    g = sd["gnsp"]
    assert set(g["blocks"]) == {"0", "2"} and set(g["projectors"]) == {"0", "2"}
    assert g["blocks"]["0"]["weight"] == "0.weight" and g["blocks"]["0"]["memory"].shape == (1, 9, 9)
    assert g["format_version"] == 2 and g["tasks_seen"] == 1 and g["base_keys"] == "ids"


@pytest.mark.parametrize("mode,opt_name", [("grad", "sgd_momentum"), ("update", "adamw")])
def test_resume_keeps_uncovered_parameters_frozen(mode, opt_name):
    """An uncovered LayerNorm, frozen by the uncovered policy at the first end_task(), is frozen again after
    a fresh wrapper loads the checkpoint: it stays exactly as saved through later tasks' steps, and the
    resumed run equals the uninterrupted one."""
    tasks = make_tasks(2)

    def fresh():
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).double()
        opt = NullSpaceOptimizer(OPTIMIZERS[opt_name](model.parameters()), model, rho=1e-15, mode=mode)
        return model, opt

    model_a, opt_a = fresh()
    with pytest.warns(UserWarning, match="frozen"):
        run_tasks(opt_a, model_a, tasks, 5)
    model_b, opt_b = fresh()
    with pytest.warns(UserWarning, match="frozen"):
        run_tasks(opt_b, model_b, tasks[:2], 5)
    model_c, opt_c = reload_into(fresh, model_b, opt_b)
    assert sorted(opt_c.frozen) == ["1.bias", "1.weight"] == sorted(opt_b.frozen)
    saved = {n: p.detach().clone() for n, p in model_c[1].named_parameters()}
    moved = {n: p.detach().clone() for n, p in model_c.named_parameters()}
    run_tasks(opt_c, model_c, tasks[2:], 5)
    for n, p in model_c[1].named_parameters():
        assert torch.equal(p.detach(), saved[n]), n  # frozen: not one bit moved after load + steps
    assert any((p.detach() - moved[n]).abs().max() > 1e-3 for n, p in model_c.named_parameters())  # others train
    for (n, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items(), strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12, msg=n)
