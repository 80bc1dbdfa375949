r"""``torch.distributed`` support: what works, and a clear refusal for what does not (no framework needed).

**Works (tested in ``tests/test_distributed.py``):** ``DistributedDataParallel`` (and ``DataParallel``). Every
rank keeps a full replica, the forward hooks see the rank's local batch, and
:meth:`~gnsp_optim.NullSpaceOptimizer.end_task` all-reduces (SUM) the collected sums and row counts before
the eigendecomposition, so every rank builds the same projectors, equal to those of one process that saw
all the ranks' data. Parameter names are stored without ``module.``, so checkpoints move freely between a
DDP run and a single process.

**Refused:** sharded parameters. FSDP1 (``FullyShardedDataParallel``) flattens each unit's parameters into
one 1-D ``FlatParameter`` and gives every rank a slice of it; FSDP2 (``fully_shard``) and tensor parallelism
turn parameters into ``DTensor`` shards. GNSP reads each protected weight as a ``(groups, rows, d)`` matrix
and multiplies whole rows by a ``d x d`` projector (attention's q/k/v row blocks, grouped convolutions,
``x @ W`` weights stored transposed, the bias as an extra input column, the ``mode="update"`` snapshot and
the projection of Adam's ``exp_avg``): none of that is defined on a flat slice, and none of it is
DTensor-aware. :func:`check_model_supported` raises a ``TypeError`` saying so instead of letting a step fail
deep inside, or silently project the wrong numbers.

Example:
    >>> import torch
    >>> check_model_supported(torch.nn.Sequential(torch.nn.Linear(4, 4)))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["check_model_supported", "is_sharded_parameter"]

_WHY = ("GNSP projects every protected weight as whole (groups, rows, input_dim) matrices, with the bias as "
        "an extra input column; a sharded parameter does not hold whole matrices. Use "
        "DistributedDataParallel (supported: statistics are all-reduced at end_task) or train unsharded.")


def _fsdp1_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - very old or stripped torch builds
        return None
    return FullyShardedDataParallel


def _fsdp2_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return None
    return FSDPModule


def _dtensor_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        try:
            from torch.distributed._tensor import DTensor  # type: ignore[no-redef]
        except ImportError:
            return None
    return DTensor


def is_sharded_parameter(p: torch.Tensor) -> bool:
    """Whether ``p`` is a ``DTensor`` (FSDP2 / tensor-parallel shard) or an FSDP1 ``FlatParameter``.

    Example:
        >>> is_sharded_parameter(torch.nn.Parameter(torch.zeros(2, 2)))
        False
    """
    dtensor = _dtensor_class()
    if dtensor is not None and isinstance(p, dtensor):
        return True
    return type(p).__name__ == "FlatParameter" or bool(getattr(p, "_is_flat_param", False))


def check_model_supported(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> None:
    """Raise ``TypeError`` when ``model`` (or ``params``) is sharded by FSDP1, FSDP2 or tensor parallelism.

    Plain modules, ``torch.compile``\\d modules, ``DataParallel`` and ``DistributedDataParallel`` pass.
    ``params`` (e.g. the base optimizer's parameters) are checked as well when given.

    Example:
        >>> import torch
        >>> check_model_supported(torch.nn.Linear(3, 2))                 # passes silently
        >>> check_model_supported(FullyShardedDataParallel(model))      # doctest: +SKIP
        Traceback (most recent call last):
        TypeError: GNSP does not support FullyShardedDataParallel (FSDP1): ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fsdp1, fsdp2 = _fsdp1_class(), _fsdp2_class()
    for name, mod in model.named_modules():
        where = f" (module {name!r})" if name else ""
        if fsdp1 is not None and isinstance(mod, fsdp1):
            raise TypeError(f"GNSP does not support FullyShardedDataParallel (FSDP1){where}: FSDP1 flattens "
                            f"parameters into 1-D FlatParameter shards. {_WHY}")
        if fsdp2 is not None and isinstance(mod, fsdp2):
            raise TypeError(f"GNSP does not support FSDP2 / fully_shard{where}: its parameters are DTensor "
                            f"shards. {_WHY}")
    checked = list(model.named_parameters())
    if params is not None:
        checked += [(f"<optimizer parameter #{i}>", p) for i, p in enumerate(params)]
    for name, p in checked:
        if is_sharded_parameter(p):
            kind = "a DTensor (FSDP2 / tensor parallel)" if type(p).__name__ != "FlatParameter" else \
                "an FSDP1 FlatParameter"
            raise TypeError(f"GNSP does not support sharded parameters: {name!r} is {kind}. {_WHY}")
