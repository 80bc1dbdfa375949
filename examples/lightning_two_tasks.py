"""Two tasks with PyTorch Lightning: the wrapper from configure_optimizers, GNSPCallback closes each task.

Run:  pip install lightning && python examples/lightning_two_tasks.py
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from gnsp_optim import NullSpaceOptimizer
from gnsp_optim.integrations.lightning import GNSPCallback


class Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
        self.gnsp: NullSpaceOptimizer | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self):
        if self.gnsp is None:  # build once: the wrapper carries the memory of earlier tasks
            self.gnsp = NullSpaceOptimizer(torch.optim.AdamW(self.parameters(), lr=3e-3), self, rho=1e-4,
                                           mode="update")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.gnsp, T_max=200)
        return {"optimizer": self.gnsp, "lr_scheduler": sched}


def task(seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g) @ torch.randn(4, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 4, generator=g) / 4)
    return DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)


def main() -> None:
    torch.manual_seed(0)
    model, (a, b) = Net(), (task(1), task(2))

    def fit(loader, callbacks):
        trainer = pl.Trainer(max_epochs=25, accelerator="cpu", logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(model, loader)

    def loss(loader):
        x, y = loader.dataset.tensors
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), y).item()

    fit(a, [GNSPCallback(dataloader=a)])  # the callback collects on task A and calls end_task() at the end
    print(f"task A loss after A: {loss(a):.5f}")
    fit(b, [])
    print(f"task A loss after B: {loss(a):.5f}   task B loss: {loss(b):.5f}")
    print(model.gnsp.summary())


if __name__ == "__main__":
    main()
