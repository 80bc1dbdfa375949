"""Two tasks with the Hugging Face Trainer: GNSPTrainer wraps the optimizer the Trainer builds.

Run:  pip install transformers accelerate && python examples/hf_trainer_two_tasks.py
"""

from __future__ import annotations

import tempfile

import torch
from torch import nn
from transformers import TrainingArguments

from gnsp_optim.integrations.huggingface import GNSPTrainer


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))

    def forward(self, x, labels=None):
        out = self.body(x)
        return {"loss": None if labels is None else nn.functional.mse_loss(out, labels), "logits": out}


def task(seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 4, generator=g) @ torch.randn(4, 16, generator=g)
    y = torch.tanh(x @ torch.randn(16, 4, generator=g) / 4)
    return [{"x": x[i], "labels": y[i]} for i in range(len(x))]


def main() -> None:
    torch.manual_seed(0)
    model, a, b = Regressor(), task(1), task(2)
    out = tempfile.mkdtemp()
    args = TrainingArguments(output_dir=out, num_train_epochs=25, per_device_train_batch_size=32,
                             learning_rate=3e-3, use_cpu=True, report_to="none", save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, remove_unused_columns=False)

    def loss(ds):
        x, y = torch.stack([r["x"] for r in ds]), torch.stack([r["labels"] for r in ds])
        with torch.no_grad():
            return nn.functional.mse_loss(model.body(x), y).item()

    trainer = GNSPTrainer(model=model, args=args, train_dataset=a,
                          gnsp_kwargs={"rho": 1e-4, "mode": "update"})
    trainer.train()
    trainer.end_task(a)  # collect on task A, build the projectors
    print(f"task A loss after A: {loss(a):.5f}")
    GNSPTrainer(model=model, args=args, train_dataset=b, gnsp_optimizer=trainer.gnsp_optimizer).train()
    print(f"task A loss after B: {loss(a):.5f}   task B loss: {loss(b):.5f}")


if __name__ == "__main__":
    main()
