"""The smallest demonstration: learn task B after task A, with and without GNSP, and watch task A.

Run:  python examples/two_tasks.py
"""

from __future__ import annotations

import torch
from torch import nn

from gnsp_optim import NullSpaceOptimizer


def make_task(seed: int, n: int = 256, dim: int = 32, rank: int = 8):
    """Inputs on a random rank-`rank` subspace, targets from a random teacher network."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, dim, generator=g)
    teacher = torch.randn(dim, 4, generator=g) / dim**0.5
    return x, torch.tanh(x @ teacher)


def run(protect: bool, mode: str = "update") -> tuple[float, float]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    opt = NullSpaceOptimizer(base, model, rho=1e-4, mode=mode) if protect else base
    (xa, ya), (xb, yb) = make_task(1), make_task(2)

    def fit(x, y, steps=300):
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    fit(xa, ya)
    with torch.no_grad():
        loss_a_before = nn.functional.mse_loss(model(xa), ya).item()
    if protect:
        with opt.collect(), torch.no_grad():
            model(xa)
        opt.end_task()
    fit(xb, yb)
    with torch.no_grad():
        return loss_a_before, nn.functional.mse_loss(model(xa), ya).item(), nn.functional.mse_loss(
            model(xb), yb).item()


if __name__ == "__main__":
    print(f"{'method':<22} {'task A loss, after A':>21} {'task A loss, after B':>21} {'task B loss':>12}")
    for name, kw in [("AdamW (no protection)", dict(protect=False)),
                     ("GNSP grad mode", dict(protect=True, mode="grad")),
                     ("GNSP update mode", dict(protect=True, mode="update"))]:
        a0, a1, b = run(**kw)
        print(f"{name:<22} {a0:>21.5f} {a1:>21.5f} {b:>12.5f}")
