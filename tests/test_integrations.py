"""Frameworks and compilers around the wrapper: torch.compile, autocast, Lightning, the Hugging Face Trainer.

Lightning and transformers/accelerate tests skip cleanly when the package is missing.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from torch import nn

from gnsp_optim import NullSpaceOptimizer


def low_rank(n: int, dim: int, rank: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, rank, generator=g, dtype=torch.float64)
            @ torch.randn(rank, dim, generator=g, dtype=torch.float64)).to(dtype)


def net(dtype=torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def dense(proj) -> torch.Tensor:
    basis = proj.basis.to(torch.float64)
    outer = basis @ basis.transpose(1, 2)
    return torch.eye(proj.dim, dtype=torch.float64) - outer if proj.form == "kept" else outer


def _train_collect_and_compare_twins(task: int, models: tuple[nn.Module, nn.Module], opts: list) -> torch.Tensor:
    """One task for the eager and the compiled twin: train both, collect on both, check that their statistics
    and projectors agree; returns the task's old inputs."""
    g = torch.Generator().manual_seed(task)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 3, generator=g,
                                                                              dtype=torch.float64)
        for m, opt in zip(models, opts, strict=True):
            opt.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    old = low_rank(4, 6, 1, seed=50 + task, dtype=torch.float64)
    for m, opt in zip(models, opts, strict=True):
        with opt.collect(), torch.no_grad():
            m(old[:2])
            m(old[2:])
    for b_e, b_c in zip(opts[0].blocks, opts[1].blocks, strict=True):
        assert b_c.stat.task_count == b_e.stat.task_count == 4 and b_c.stat.task_batches == 2
        assert torch.allclose(b_c.stat.task_sum, b_e.stat.task_sum, rtol=1e-12, atol=1e-12)
    for opt in opts:
        opt.end_task()
    for name, p in opts[1].projectors.items():
        assert list(p.kept_ranks) == list(opts[0].projectors[name].kept_ranks)
        assert torch.allclose(dense(p), dense(opts[0].projectors[name]), atol=1e-9)
    return old


# ---------------------------------------------------------------------------------------- torch.compile
def test_compiled_model_same_statistics_and_protection_as_eager_and_no_recompile_per_task():
    """A compiled twin and an eager twin see the same data: memories and projectors must agree, old outputs
    must not move, and after the first task's cycle (train, collect on, collect off) no later task compiles
    a new graph. What is counted: calls of the compiler backend (one per graph dynamo hands over)."""
    torch._dynamo.reset()
    compiled_graphs: list[int] = []

    def counting_backend(gm: torch.fx.GraphModule, example_inputs):
        compiled_graphs.append(len(gm.graph.nodes))
        return gm.forward

    eager, inner = net(torch.float64), net(torch.float64)
    model = torch.compile(inner, backend=counting_backend)
    opts = [NullSpaceOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), m, rho=1e-13, mode="update")
            for m in (eager, model)]
    assert [b.name for b in opts[1].blocks] == ["0", "2"]  # _orig_mod. unwrapped
    olds: list[tuple[torch.Tensor, torch.Tensor]] = []
    after_first_task = None
    try:
        for task in range(3):
            old = _train_collect_and_compare_twins(task, (eager, model), opts)
            with torch.no_grad():
                olds.append((old, model(old)))
            if task == 0:
                after_first_task = len(compiled_graphs)
        assert after_first_task is not None and after_first_task >= 1
        assert len(compiled_graphs) == after_first_task  # tasks 2 and 3 reuse the cached graphs
        # three rank-1 tasks + the bias column: protected, neither free nor frozen
        assert opts[1].projectors["0"].kept_ranks == [4] and opts[1].projectors["2"].kept_ranks == [12]
        with torch.no_grad():
            for old, before in olds:
                assert (model(old) - before).abs().max() < 1e-9
            assert torch.allclose(model(olds[0][0]), eager(olds[0][0]), atol=1e-9)
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_statistics_stay_float32_and_protection_holds(dtype):
    """Train and collect under CPU autocast (fp16 with ``GradScaler("cpu")``): memory is float32 and equals
    a float64 reference built from the low-precision inputs the layers actually saw; old outputs hold."""
    if not hasattr(torch.amp, "GradScaler") and dtype == torch.float16:  # pragma: no cover - torch < 2.3
        pytest.skip("torch.amp.GradScaler('cpu') needs torch >= 2.3")

    def run(protect: bool):
        model = net()
        base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        opt = NullSpaceOptimizer(base, model, rho=1e-7, mode="update") if protect else base
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0) if dtype == torch.float16 else None
        seen: dict[str, list[torch.Tensor]] = {"0": [], "2": []}
        hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: seen[str(i)].append(a[0].detach()))
                 for i in (0, 2)]
        old = low_rank(10, 6, 2, seed=7)
        if protect:
            with opt.collect(), torch.no_grad(), torch.autocast("cpu", dtype=dtype):
                model(old)
            opt.end_task()
        for h in hooks:
            h.remove()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            before_amp = model(old).float()
        with torch.no_grad():
            before_first = model[0](old)
        g = torch.Generator().manual_seed(3)
        for _ in range(20):
            x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=dtype):
                loss = nn.functional.mse_loss(model(x).float(), y)
            if scaler is None:
                loss.backward()
                opt.step()
            else:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
            drift_amp = (model(old).float() - before_amp).abs().max().item()
        with torch.no_grad():
            drift_first = (model[0](old) - before_first).abs().max().item()
        return opt, seen, drift_amp, drift_first

    opt, seen, drift_amp, drift_first = run(protect=True)
    _, _, free_amp, free_first = run(protect=False)
    assert seen["2"][0].dtype == dtype  # the second layer really saw low-precision inputs
    for b in opt.blocks:
        assert b.stat.memory.dtype == torch.float32
        x = seen[b.name][0].to(torch.float64)
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
        ref = xa.T @ xa / len(x)
        assert torch.allclose(b.stat.memory[0].double(), ref, rtol=1e-5, atol=1e-6), b.name
    assert free_first > 1e-2 and free_amp > 1e-2  # without protection the old outputs do move
    assert drift_first < 1e-5  # float32 inputs to the first layer: protected to float32 precision
    assert drift_amp < 0.05 * free_amp  # the whole model under autocast: within low-precision rounding


# ---------------------------------------------------------------------------------------- Lightning
HAS_LIGHTNING = (importlib.util.find_spec("lightning") is not None
                 or importlib.util.find_spec("pytorch_lightning") is not None)


@pytest.mark.skipif(not HAS_LIGHTNING, reason="PyTorch Lightning is not installed (pip install lightning)")
def test_lightning_two_tasks_configure_optimizers_with_scheduler_and_callback():
    try:
        import lightning.pytorch as pl
    except ImportError:  # pragma: no cover - only pytorch_lightning installed
        import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from gnsp_optim.integrations.lightning import GNSPCallback, find_gnsp_optimizer

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = net()
            self.gnsp: NullSpaceOptimizer | None = None
            self.lrs: list[float] = []

        def forward(self, x):
            return self.body(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.lrs.append(self.gnsp.base.param_groups[0]["lr"])
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            if self.gnsp is None:  # one wrapper for all tasks: it holds the memory of earlier tasks
                self.gnsp = NullSpaceOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2), self,
                                               rho=1e-7, mode="update")
            sched = torch.optim.lr_scheduler.StepLR(self.gnsp, step_size=1, gamma=0.5)
            return {"optimizer": self.gnsp, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def loader(seed: int, n: int = 24) -> DataLoader:
        x = low_rank(n, 6, 2, seed=seed)
        y = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
        return DataLoader(TensorDataset(x, y), batch_size=8)

    def fit(model, dl, callbacks):
        trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, dl)
        return trainer

    model = Net()
    task_a, task_b, task_c = loader(1), loader(2), loader(3)
    xa = task_a.dataset.tensors[0]
    cb = GNSPCallback(dataloader=task_a)  # closes task A when the first fit ends
    trainer = fit(model, task_a, [cb])
    assert find_gnsp_optimizer(trainer) is model.gnsp
    assert model.gnsp.tasks_seen == 1 and cb.tasks_closed == 1
    assert model.lrs[:3] == pytest.approx([1e-2, 5e-3, 2.5e-3])  # the scheduler drives the base optimizer
    assert [b.name for b in model.gnsp.blocks] == ["body.0", "body.2"]
    with torch.no_grad():
        before_a = model(xa)

    cb2 = GNSPCallback()  # explicit route: close task B by hand between two fit calls
    w0 = model.body[0].weight.detach().clone()
    fit(model, task_b, [cb2])
    assert not torch.equal(model.body[0].weight, w0)  # task B did train
    assert model.gnsp.tasks_seen == 1
    cb2.end_task(model, task_b)
    assert model.gnsp.tasks_seen == 2
    with torch.no_grad():
        before_b = model(task_b.dataset.tensors[0])
    fit(model, task_c, [])
    with torch.no_grad():
        assert (model(xa) - before_a).abs().max() < 1e-4
        assert (model(task_b.dataset.tensors[0]) - before_b).abs().max() < 1e-4
    assert model.training  # the callback restored training mode


# ---------------------------------------------------------------------------------------- Hugging Face
HAS_HF = all(importlib.util.find_spec(m) is not None for m in ("transformers", "accelerate"))
NEEDS_HF = "needs transformers and accelerate (pip install transformers accelerate)"


class _TinyRegressor(nn.Module):
    """A Trainer-compatible model: ``forward(x, labels)`` returns a dict with the loss."""

    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x, labels=None):
        out = self.body(x)
        loss = None if labels is None else nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


def _hf_dataset(seed: int, n: int = 16) -> list[dict[str, torch.Tensor]]:
    x = low_rank(n, 6, 2, seed=seed)
    y = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def _hf_args(tmp_path, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                             per_device_eval_batch_size=8, learning_rate=1e-2, use_cpu=True,
                             report_to="none", save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False, dataloader_num_workers=0, **kw)


def _old_outputs(model, ds) -> torch.Tensor:
    with torch.no_grad():
        return model.body(torch.stack([r["x"] for r in ds]))


@pytest.mark.skipif(not HAS_HF, reason=NEEDS_HF)
def test_hf_trainer_optimizers_tuple_route(tmp_path):
    from transformers import Trainer

    from gnsp_optim.integrations.huggingface import collect_and_end_task

    model = _TinyRegressor()
    opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, rho=1e-7, mode="update")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    task_a, task_b = _hf_dataset(1), _hf_dataset(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=_hf_args(tmp_path), train_dataset=task_a, optimizers=(opt, sched))
        trainer.train()
        assert opt.base.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 ** 6)  # scheduler -> base
        assert find_in(trainer) is opt
        collect_and_end_task(trainer, model, trainer.get_eval_dataloader(task_a))
        before = _old_outputs(model, task_a)
        w = model.body[2].weight.detach().clone()
        opt.param_groups[0]["lr"] = 1e-2
        sched2 = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        Trainer(model=model, args=_hf_args(tmp_path), train_dataset=task_b, optimizers=(opt, sched2)).train()
    assert opt.tasks_seen == 1
    assert not torch.equal(model.body[2].weight, w)  # task B trained
    assert (_old_outputs(model, task_a) - before).abs().max() < 1e-4


def find_in(trainer):
    from gnsp_optim.integrations._common import find_gnsp_optimizer

    return find_gnsp_optimizer(trainer)


@pytest.mark.skipif(not HAS_HF, reason=NEEDS_HF)
def test_hf_gnsp_trainer_create_optimizer_route(tmp_path):
    from gnsp_optim.integrations.huggingface import GNSPTrainer

    model = _TinyRegressor()
    task_a, task_b = _hf_dataset(1), _hf_dataset(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GNSPTrainer(model=model, args=_hf_args(tmp_path, weight_decay=0.1), train_dataset=task_a,
                              gnsp_kwargs={"rho": 1e-7, "mode": "update"})
        trainer.train()
        opt = trainer.gnsp_optimizer
        assert isinstance(opt, NullSpaceOptimizer) and isinstance(opt.base, torch.optim.AdamW)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]  # the Trainer's own grouping
        assert [b.name for b in opt.blocks] == ["body.0", "body.2"]
        trainer.end_task(task_a)
        before = _old_outputs(model, task_a)
        w = model.body[2].weight.detach().clone()
        trainer2 = GNSPTrainer(model=model, args=_hf_args(tmp_path, weight_decay=0.1), train_dataset=task_b,
                               gnsp_optimizer=opt)
        trainer2.train()
    assert trainer2.gnsp_optimizer is opt and opt.tasks_seen == 1
    assert not torch.equal(model.body[2].weight, w)
    assert (_old_outputs(model, task_a) - before).abs().max() < 1e-4
    with pytest.raises(ValueError, match="gnsp_optimizer"):
        GNSPTrainer(model=model, args=_hf_args(tmp_path), optimizers=(opt, None))
