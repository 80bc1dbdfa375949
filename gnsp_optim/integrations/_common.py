"""Helpers shared by the framework integrations (no framework imported here)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..optimizer import NullSpaceOptimizer

__all__ = ["find_gnsp_optimizer", "to_device"]


def find_gnsp_optimizer(obj: Any) -> NullSpaceOptimizer:
    """The :class:`NullSpaceOptimizer` behind a Trainer, a LightningModule or an optimizer wrapper.

    Looks through ``trainer.optimizers``, ``module.trainer.optimizers``, Lightning's ``LightningOptimizer``
    and accelerate's ``AcceleratedOptimizer`` (``._optimizer`` / ``.optimizer``).

    Example::

        opt = find_gnsp_optimizer(trainer)
    """
    def unwrap(o: Any) -> NullSpaceOptimizer | None:
        for _ in range(8):  # LightningOptimizer._optimizer, AcceleratedOptimizer.optimizer, ...
            if isinstance(o, NullSpaceOptimizer):
                return o
            inner = getattr(o, "__dict__", {})
            o = inner.get("_optimizer", inner.get("optimizer"))
            if o is None:
                return None
        return None

    candidates: list[Any] = [obj]
    opts = getattr(obj, "optimizers", None)
    if isinstance(opts, (list, tuple)):  # a Trainer
        candidates += list(opts)
    elif isinstance(obj, nn.Module):  # a LightningModule attached to a Trainer
        trainer = obj.__dict__.get("_trainer")
        candidates += list(getattr(trainer, "optimizers", None) or [])
    for c in candidates:
        found = unwrap(c)
        if found is not None:
            return found
    raise ValueError(f"no NullSpaceOptimizer found behind {type(obj).__name__}; return one from "
                     "configure_optimizers or pass it to GNSPCallback(optimizer=...)")


def to_device(batch: Any, device: torch.device) -> Any:
    """Move the tensors of a (nested) batch to ``device``.

    Example:
        >>> to_device({"x": torch.ones(1)}, torch.device("cpu"))["x"].device.type
        'cpu'
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def forward_batch(model: nn.Module, batch: Any) -> Any:
    """Run a model on a batch: ``model(**batch)`` for a dict, ``model(batch[0])`` for a tuple / list (inputs
    first, as DataLoaders yield them), ``model(batch)`` otherwise.

    Example:
        >>> forward_batch(torch.nn.Identity(), (torch.ones(1), 0)).tolist()
        [1.0]
    """
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (list, tuple)):
        return model(batch[0])
    return model(batch)


def collect_batches(opt: NullSpaceOptimizer, model: nn.Module, loader: Any, forward: Any,
                    max_batches: int | None = None, rank: int = 0, world: int = 1) -> None:
    """Run ``model`` in eval mode without gradients on ``loader`` inside ``opt.collect()`` (this rank's share:
    every ``world``-th batch from ``rank``; at most ``max_batches`` batches looked at), then restore the mode.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with opt.collect(), torch.no_grad():
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                if i % world == rank:
                    forward(model, to_device(batch, device))
    finally:
        model.train(was_training)
