"""Small models and loops shared by the core tests."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gnsp_optim import NullSpaceOptimizer

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "identity": nn.Identity}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
    "sgd_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5, centered=True),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}
#: optimizers for which projecting the gradient alone is exact (linear in the gradient, no weight decay)
GRAD_EXACT = ("sgd", "sgd_momentum", "sgd_nesterov")


def mlp(widths: list[int], act: str = "tanh", bias: bool = True, dtype=torch.float64) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(ACTIVATIONS[act]())
    return nn.Sequential(*layers).to(dtype)


def low_rank_inputs(n: int, dim: int, rank: int, dtype=torch.float64, gen=None) -> torch.Tensor:
    z = torch.randn(n, rank, dtype=dtype, generator=gen)
    a = torch.randn(rank, dim, dtype=dtype, generator=gen)
    return z @ a


def collect(opt: NullSpaceOptimizer, model: nn.Module, *inputs) -> torch.Tensor:
    with opt.collect(), torch.no_grad():
        out = model(*inputs)
    opt.end_task()
    return out


def train(opt, model, x, y, steps: int) -> tuple[float, float]:
    """Regress model(x) on y for some steps; returns (first loss, last loss)."""
    first = last = None
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    with torch.no_grad():
        last = (model(x) - y).square().mean().item()
    return first, last


@contextlib.contextmanager
def gloo_rank(rank: int, tmp: str, world: int):
    """Inside a spawned worker: one torch thread, warnings off, join the gloo group (file rendezvous in
    ``tmp``); the group is destroyed on the way out, also after an error."""
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker: Callable[[int, str], None], tmp: Path, world: int) -> list[dict]:
    """Run ``worker(rank, str(tmp))`` in ``world`` spawned processes (one OpenMP thread each) and load what
    each saved to ``tmp/rank{r}.pt``."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        torch.multiprocessing.spawn(worker, args=(str(tmp),), nprocs=world, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]
