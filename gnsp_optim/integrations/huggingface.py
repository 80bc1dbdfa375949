r"""Hugging Face ``Trainer``: two routes to train with a :class:`~gnsp_optim.NullSpaceOptimizer`.

1. ``Trainer(..., optimizers=(opt, scheduler))`` with a wrapper you built; after ``trainer.train()`` close the
   task with :func:`collect_and_end_task`, and pass the *same* wrapper to the next task's ``Trainer``.
2. :class:`GNSPTrainer`, whose ``create_optimizer`` wraps the optimizer the Trainer builds from its
   ``TrainingArguments`` (``optim``, ``learning_rate``, the weight-decay split...). Use it where the Trainer
   refuses ``optimizers=`` (it does for FSDP / DeepSpeed, which GNSP refuses anyway) or to keep the
   Trainer's own optimizer choice. ``trainer.end_task(dataset)`` closes a task; ``gnsp_optimizer=`` hands
   the wrapper (and so the memory of earlier tasks) to the next task's trainer.

The Trainer hands the wrapper to ``accelerate``, which wraps it again (``AcceleratedOptimizer``) and calls its
``step()``; since the wrapper is a real ``torch.optim.Optimizer`` that works, and the Trainer's gradient
clipping happens before the projection.

Example::

    trainer = GNSPTrainer(model=model, args=args, train_dataset=task1, gnsp_kwargs={"mode": "update"})
    trainer.train()
    trainer.end_task(task1)                       # collect on task 1, build the projectors
    trainer2 = GNSPTrainer(model=model, args=args, train_dataset=task2, gnsp_optimizer=trainer.gnsp_optimizer)
    trainer2.train()                              # task 1's outputs stay where they were
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..optimizer import NullSpaceOptimizer
from ._common import collect_batches, find_gnsp_optimizer, forward_batch
from .distributed import check_model_supported

__all__ = ["GNSPTrainer", "collect_and_end_task", "hf_forward"]


def _trainer_base() -> type:
    try:
        from transformers import Trainer
    except ImportError as e:
        raise ImportError("gnsp_optim.integrations.huggingface needs the Hugging Face Trainer: "
                          "pip install transformers accelerate") from e
    return Trainer


#: how a Trainer-style batch is fed to the model (``model(**batch)`` for dicts)
hf_forward = forward_batch


def collect_and_end_task(optimizer: Any, model: nn.Module, dataloader: Iterable, *,
                         forward: Callable[[nn.Module, Any], Any] = hf_forward,
                         max_batches: int | None = None) -> NullSpaceOptimizer:
    """Close a task: run ``model`` (eval mode, no grad) on ``dataloader`` in ``collect()``; ``end_task()``.

    ``optimizer`` may be the wrapper itself or anything that holds it (a Trainer, accelerate's
    ``AcceleratedOptimizer``). Batches are moved to the model's device. Returns the wrapper.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=task1, optimizers=(opt, sched))
        trainer.train()
        collect_and_end_task(opt, model, trainer.get_eval_dataloader(task1))
    """
    opt = find_gnsp_optimizer(optimizer)
    collect_batches(opt, model, dataloader, forward, max_batches)
    opt.end_task()
    return opt


_Trainer = _trainer_base()


class GNSPTrainer(_Trainer):  # type: ignore[misc, valid-type]
    """A ``transformers.Trainer`` whose optimizer is wrapped in a :class:`NullSpaceOptimizer`.

    Args:
        gnsp_kwargs: keyword arguments for :class:`NullSpaceOptimizer` (``rho``, ``mode``, ``protect``, ...).
        gnsp_optimizer: an existing wrapper (e.g. ``previous_trainer.gnsp_optimizer``) to keep training with;
            it carries the memory of earlier tasks and the base optimizer's state.
        *args, **kwargs: as for ``transformers.Trainer`` (``optimizers=`` is not accepted: use the plain
            ``Trainer`` for that route).

    Example::

        trainer = GNSPTrainer(model=model, args=args, train_dataset=ds, gnsp_kwargs={"rho": 1e-3})
        trainer.train(); trainer.end_task(ds)
    """

    def __init__(self, *args: Any, gnsp_kwargs: dict[str, Any] | None = None,
                 gnsp_optimizer: NullSpaceOptimizer | None = None, **kwargs: Any) -> None:
        if kwargs.get("optimizers", (None, None))[0] is not None:
            raise ValueError("GNSPTrainer builds its own optimizer; pass a ready NullSpaceOptimizer as "
                             "gnsp_optimizer=..., or use transformers.Trainer(optimizers=(opt, sched))")
        super().__init__(*args, **kwargs)
        self.gnsp_kwargs = dict(gnsp_kwargs or {})
        self._gnsp = gnsp_optimizer

    @property
    def gnsp_optimizer(self) -> NullSpaceOptimizer:
        """The wrapper (built on the first ``create_optimizer``, or the one given as ``gnsp_optimizer``)."""
        if self._gnsp is None:
            raise RuntimeError("the optimizer is created by train() (or create_optimizer()); none yet")
        return self._gnsp

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the Trainer's optimizer as usual and wrap it (or reuse the given wrapper)."""
        if self.optimizer is None and self._gnsp is not None:
            self.optimizer = self._gnsp
        opt = super().create_optimizer(model)
        if not isinstance(opt, NullSpaceOptimizer):
            target = self.model if model is None else model
            check_model_supported(target)
            opt = NullSpaceOptimizer(opt, target, **self.gnsp_kwargs)
            self.optimizer = opt
        self._gnsp = opt
        return opt

    def end_task(self, dataset: Any = None, *, dataloader: Iterable | None = None,
                 max_batches: int | None = None) -> NullSpaceOptimizer:
        """Close a task: collect on ``dataset`` (through ``get_eval_dataloader``) or ``dataloader``.

        Example::

            trainer.train(); trainer.end_task(task1_dataset)
        """
        if dataloader is None:
            dataloader = self.get_eval_dataloader(dataset if dataset is not None else self.train_dataset)
        return collect_and_end_task(self.gnsp_optimizer, self.model, dataloader, max_batches=max_batches)
