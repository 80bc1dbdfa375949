r"""PyTorch Lightning: return the wrapper from ``configure_optimizers``; let a callback close each task.

``NullSpaceOptimizer`` is a real ``torch.optim.Optimizer``, so Lightning accepts it (alone, in a list, or in
the ``{"optimizer": ..., "lr_scheduler": ...}`` dict) and calls ``step(closure)`` on it; the wrapper
projects inside the closure, after backward and gradient clipping. :class:`GNSPCallback` runs the model on
the finished task's data under ``opt.collect()`` and calls ``opt.end_task()``, either when ``trainer.fit``
ends (give it ``dataloader=``) or when you call :meth:`GNSPCallback.end_task` between two ``fit`` calls.

Build the wrapper **once** (e.g. in the LightningModule's ``__init__`` or lazily on first call) and return
the same object from every ``configure_optimizers`` call: a new ``Trainer`` calls it again, and a new
wrapper would forget the earlier tasks.

Under DDP every rank runs the callback on its share of the batches (round-robin when ``shard=True``) and
``end_task`` all-reduces the statistics.

Example::

    class Net(lightning.pytorch.LightningModule):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(8, 2)
            self.gnsp = None
        def configure_optimizers(self):
            if self.gnsp is None:
                self.gnsp = NullSpaceOptimizer(torch.optim.AdamW(self.parameters()), self, mode="update")
            sched = torch.optim.lr_scheduler.StepLR(self.gnsp, step_size=10)
            return {"optimizer": self.gnsp, "lr_scheduler": sched}

    cb = GNSPCallback()
    for loader in task_loaders:
        Trainer(max_epochs=1, callbacks=[cb]).fit(net, loader)
        cb.end_task(net, loader)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ..optimizer import NullSpaceOptimizer
from ._common import collect_batches, find_gnsp_optimizer, forward_batch

__all__ = ["GNSPCallback", "find_gnsp_optimizer", "default_forward"]


def _lightning_callback_base() -> type:
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError as e:
            raise ImportError("gnsp_optim.integrations.lightning needs PyTorch Lightning: "
                              "pip install lightning  (or pip install pytorch-lightning)") from e
    return Callback


#: how a batch is fed to the LightningModule (``module(batch[0])`` for tuples)
default_forward = forward_batch


_Callback = _lightning_callback_base()


class GNSPCallback(_Callback):  # type: ignore[misc, valid-type]
    """Close a task for a :class:`NullSpaceOptimizer` trained by Lightning: collect, then ``end_task()``.

    Args:
        dataloader: the finished task's data. When given, the task is closed in ``on_train_end`` (at the
            end of every ``trainer.fit``); when ``None``, call :meth:`end_task` yourself.
        optimizer: the wrapper; ``None`` finds it in ``trainer.optimizers``.
        forward: ``forward(module, batch)`` runs the model on one batch
            (default: :func:`default_forward`).
        max_batches: collect on at most this many batches (``None``: all).
        shard: under a ``torch.distributed`` group, each rank takes every ``world``-th batch (the
            statistics are all-reduced in ``end_task``); set ``False`` if the loader is already sharded.

    Example::

        cb = GNSPCallback(dataloader=task1_loader)
        Trainer(callbacks=[cb], max_epochs=1).fit(net, task1_loader)   # task 1 is closed at the end
    """

    def __init__(self, dataloader: Iterable | None = None, *, optimizer: NullSpaceOptimizer | None = None,
                 forward: Callable[[nn.Module, Any], Any] = default_forward,
                 max_batches: int | None = None, shard: bool = True) -> None:
        super().__init__()
        self.dataloader, self.optimizer, self.forward = dataloader, optimizer, forward
        self.max_batches, self.shard = max_batches, shard
        self.tasks_closed = 0

    def on_train_end(self, trainer: Any, pl_module: nn.Module) -> None:
        if self.dataloader is not None:
            self.end_task(pl_module, self.dataloader, trainer=trainer)

    def end_task(self, pl_module: nn.Module, dataloader: Iterable | None = None, *,
                 trainer: Any = None) -> NullSpaceOptimizer:
        """Run ``pl_module`` (eval mode, no grad) on ``dataloader`` under ``collect()``, then ``end_task()``.

        Returns the wrapper. Example::

            cb.end_task(net, task1_loader)
        """
        loader = dataloader if dataloader is not None else self.dataloader
        if loader is None:
            raise ValueError("GNSPCallback.end_task needs a dataloader")
        opt = self.optimizer
        if opt is None:
            opt = find_gnsp_optimizer(trainer if trainer is not None else pl_module)
            self.optimizer = opt
        import torch.distributed as dist

        rank, world = 0, 1
        if self.shard and dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
        collect_batches(opt, pl_module, loader, self.forward, self.max_batches, rank, world)
        opt.end_task()
        self.tasks_closed += 1
        return opt
