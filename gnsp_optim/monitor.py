r"""A protection monitor: measure, every few steps, how far the model's old outputs have moved.

The projection keeps a layer's old outputs exact only for the inputs its hooks saw. Any path the hooks cannot
see (a weight used outside its module, a buffer that moves, an op the wrapper does not know) shows up only at
the model's output. :class:`ProtectionMonitor` keeps a small sample of each finished task's inputs with the
outputs the model gave on them when the task ended, and every ``every`` optimizer steps runs the model on
them again (``model.eval()``, ``torch.no_grad()``; the training flags are restored after) and records the
relative drift ``||y - y0|| / ||y0||``. Above ``tol`` it warns, naming the task.

Cost: per check one forward pass over ``sample`` rows of every registered task (no backward, no statistics),
i.e. ``tasks * sample / batch`` extra forwards per ``every`` steps; memory: the kept inputs and their
reference outputs. With ``every=100``, ``sample=64`` and a batch of 64 that is about 1% more forward passes
per task remembered. A check does not touch the RNG of the training loop except through the model's own
forward (dropout is off in eval mode).

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> base = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> mon = ProtectionMonitor(model, every=2, tol=1e-3, warn=False)
    >>> mon.add_task(torch.randn(16, 4), name="A")
    >>> handle = mon.attach(base)           # checks after every 2nd base.step()
    >>> for _ in range(4):
    ...     base.zero_grad(); model(torch.randn(8, 4)).square().mean().backward(); base.step()
    >>> [row["step"] for row in mon.history]
    [2, 4]
    >>> mon.history[-1]["drift"] > 0        # unprotected SGD moved the old outputs
    True
    >>> handle.remove()
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["ProtectionMonitor", "output_tensors"]

logger = logging.getLogger("gnsp_optim.monitor")


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating-point tensor in a model output, in a fixed order (tensors, tuples, dicts, HF outputs).

    Example:
        >>> [t.shape for t in output_tensors({"logits": torch.zeros(2, 3), "n": 1, "h": (torch.ones(1),)})]
        [torch.Size([2, 3]), torch.Size([1])]
    """
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):  # transformers' ModelOutput is an OrderedDict of the fields that are set
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def _take(inputs: Any, n: int) -> Any:
    """The first ``n`` rows (dim 0) of every tensor in ``inputs``, detached and copied."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n].detach().clone() if inputs.dim() > 0 else inputs.detach().clone()
    if isinstance(inputs, Mapping):
        return {k: _take(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_take(v, n) for v in inputs)
    return inputs


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


class ProtectionMonitor:
    r"""Keep a sample of old inputs per task; every ``every`` steps measure and log the old outputs' drift.

    Args:
        model: the model whose outputs are watched.
        every: check after every ``every``-th call of :meth:`step` (``attach`` calls it after each optimizer
            step); must be positive.
        tol: relative drift above which a check warns (``UserWarning``) and logs at WARNING level.
        sample: how many rows (dim 0) of each task's inputs are kept.
        forward: ``forward(model, inputs) -> output``; default ``model(inputs)`` (``model(*inputs)`` for a
            tuple, ``model(**inputs)`` for a dict). Every floating-point tensor of the output counts.
        warn: emit a ``UserWarning`` above ``tol`` (the log line is written either way).

    ``history`` holds one row per task per check: ``{"step", "task", "drift"}``.
    """

    def __init__(self, model: nn.Module, *, every: int = 100, tol: float = 1e-4, sample: int = 64,
                 forward: Callable[[nn.Module, Any], Any] | None = None, warn: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if not (tol >= 0.0):
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if not isinstance(sample, int) or sample < 1:
            raise ValueError(f"sample must be a positive int, got {sample!r}")
        self.model, self.every, self.tol, self.sample, self.warn = model, every, float(tol), sample, warn
        self.forward = forward or _call
        self.tasks: dict[str, tuple[Any, list[torch.Tensor]]] = {}
        self.history: list[dict[str, Any]] = []
        self.steps = 0

    def _outputs(self, inputs: Any) -> list[torch.Tensor]:
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()  # no dropout; normalisation layers use (and never update) their running stats
        try:
            with torch.no_grad():
                outs = output_tensors(self.forward(self.model, inputs))
        finally:
            for m, training in flags:
                m.training = training
        if not outs:
            raise ValueError("the model's output holds no floating-point tensor to compare; pass forward=")
        return [t.detach().clone() for t in outs]

    def add_task(self, inputs: Any, name: str | None = None) -> None:
        """Remember ``inputs`` (their first ``sample`` rows) and the outputs the model gives on them now.

        Call it when a task ends (``end_task()`` does, once wired into the wrapper). ``name`` defaults to
        ``"task <n>"``; adding a name twice replaces it.
        """
        name = name if name is not None else f"task {len(self.tasks)}"
        kept = _take(inputs, self.sample)
        self.tasks[name] = (kept, self._outputs(kept))

    def check(self) -> dict[str, float]:
        """Measure every remembered task's drift now; log it, warn above ``tol``; ``{task: drift}``."""
        result = {}
        for name, (inputs, ref) in self.tasks.items():
            now = self._outputs(inputs)
            if len(now) != len(ref) or any(a.shape != b.shape for a, b in zip(now, ref, strict=True)):
                raise ValueError(f"task {name!r}: the model's output structure changed since add_task()")
            num = sum(float((a.double() - b.double()).square().sum()) for a, b in zip(now, ref, strict=True))
            den = sum(float(b.double().square().sum()) for b in ref)
            drift = (num / den) ** 0.5 if den > 0 else num ** 0.5
            result[name] = drift
            self.history.append({"step": self.steps, "task": name, "drift": drift})
            if drift > self.tol:
                msg = (f"GNSP monitor: old outputs of {name!r} drifted by {drift:.3e} (relative) at step "
                       f"{self.steps}, above tol={self.tol:.1e}: a path the projection does not see moves them")
                logger.warning(msg)
                if self.warn:
                    warnings.warn(msg, UserWarning, stacklevel=2)
            else:
                logger.info("GNSP monitor: %r drift %.3e at step %d", name, drift, self.steps)
        return result

    def step(self) -> dict[str, float] | None:
        """Count one optimizer step; every ``every``-th runs :meth:`check` and returns its result."""
        self.steps += 1
        if self.tasks and self.steps % self.every == 0:
            return self.check()
        return None

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Call :meth:`step` after each ``optimizer.step()``; returns the hook handle (``.remove()``)."""
        return optimizer.register_step_post_hook(lambda *_: self.step())

    def forget(self, names: Sequence[str] | None = None) -> None:
        """Drop the samples of ``names`` (all when None)."""
        for n in list(self.tasks) if names is None else names:
            self.tasks.pop(n, None)
