r"""``torch.distributed`` support: what works, and a clear refusal for what does not (no framework needed).

**Works (tested in ``tests/test_distributed.py`` and ``tests/test_fsdp_optimizer.py``):**

- ``DistributedDataParallel`` (and ``DataParallel``). Every rank keeps a full replica, the forward hooks see
  the rank's local batch, and :meth:`~gnsp_optim.NullSpaceOptimizer.end_task` all-reduces (SUM) the collected
  sums and row counts before the eigendecomposition, so every rank builds the same projectors, equal to those
  of one process that saw all the ranks' data.
- FSDP2 (``torch.distributed.fsdp.fully_shard``; HSDP's 2-D mesh too): parameters are ``DTensor`` s sharded
  on dim 0. Statistics are all-reduced as under DDP; projectors are replicated; each step projects the local
  row shards (:mod:`gnsp_optim.fsdp`: no communication for input-side weights, one all-reduce of a
  ``k x out`` matrix for a left-multiplied ``x @ W`` weight, a gather + all-reduce of ``3 e`` numbers for a
  q/k/v bias split differently from its weights).

Parameter names are stored without ``module.``, so checkpoints move freely between DDP, FSDP2 and a single
process.

**Refused:** FSDP1 (``FullyShardedDataParallel``) flattens each unit's parameters into one 1-D
``FlatParameter`` and gives every rank a slice of it: GNSP reads each protected weight as a
``(groups, rows, d)`` matrix and multiplies whole rows by a ``d x d`` projector (attention's q/k/v row blocks,
grouped convolutions, ``x @ W`` weights stored transposed, the bias as an extra input column), none of which is
defined on a slice of a flat vector. DTensors placed otherwise than ``Shard(0)`` (+ ``Replicate``), e.g.
tensor parallelism's ``Shard(1)``, are refused too. :func:`check_model_supported` raises a ``TypeError``
saying so instead of letting a step fail deep inside, or silently project the wrong numbers.

Example:
    >>> import torch
    >>> check_model_supported(torch.nn.Sequential(torch.nn.Linear(4, 4)))
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["check_model_supported", "is_sharded_parameter", "is_row_sharded", "reshard_fsdp_modules"]

_WHY = ("GNSP projects every protected weight as whole (groups, rows, input_dim) matrices, with the bias as "
        "an extra input column; a slice of a flat parameter does not hold whole rows. Use FSDP2 "
        "(torch.distributed.fsdp.fully_shard: supported), DistributedDataParallel (supported) or train unsharded.")


def _fsdp1_class() -> type | None:
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - very old or stripped torch builds
        return None
    return FullyShardedDataParallel


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


def is_row_sharded(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DTensor sharded on dim 0 along one mesh dimension and replicated along any other
    (FSDP2's layout, which :mod:`gnsp_optim.fsdp` projects).

    Example:
        >>> is_row_sharded(torch.zeros(2, 2))
        False
    """
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(p, dtensor):
        return False
    from torch.distributed.tensor import Replicate, Shard

    shards = [q for q in p.placements if isinstance(q, Shard)]
    return (len(shards) == 1 and shards[0].dim == 0
            and all(isinstance(q, (Shard, Replicate)) for q in p.placements))


def _refusal(name: str, p: torch.Tensor) -> str | None:
    if type(p).__name__ == "FlatParameter" or bool(getattr(p, "_is_flat_param", False)):
        return f"GNSP does not support sharded parameters: {name!r} is an FSDP1 FlatParameter. {_WHY}"
    if is_sharded_parameter(p) and not is_row_sharded(p):
        return (f"GNSP does not support sharded parameters: {name!r} is a DTensor with placements "
                f"{tuple(p.placements)}; GNSP projects DTensors sharded on dim 0 along one mesh dimension "
                "(FSDP2's Shard(0), replicated elsewhere), since each rank then holds whole weight rows")
    return None


def check_model_supported(model: nn.Module, params: Iterable[torch.Tensor] | None = None) -> None:
    """Raise ``TypeError`` when ``model`` (or ``params``) is sharded in a way GNSP cannot project.

    Plain modules, ``torch.compile``\\d modules, ``DataParallel``, ``DistributedDataParallel`` and FSDP2
    (``fully_shard``: DTensors sharded on dim 0) pass; FSDP1 and DTensors placed otherwise (tensor parallel
    ``Shard(1)``, ``Replicate`` only) are refused with the reason. ``params`` (e.g. the base optimizer's
    parameters) are checked as well when given.

    Example:
        >>> import torch
        >>> check_model_supported(torch.nn.Linear(3, 2))                 # passes silently
        >>> check_model_supported(FullyShardedDataParallel(model))      # doctest: +SKIP
        Traceback (most recent call last):
        TypeError: GNSP does not support FullyShardedDataParallel (FSDP1): ...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fsdp1 = _fsdp1_class()
    for name, mod in model.named_modules():
        where = f" (module {name!r})" if name else ""
        if fsdp1 is not None and isinstance(mod, fsdp1):
            raise TypeError(f"GNSP does not support FullyShardedDataParallel (FSDP1){where}: FSDP1 flattens "
                            f"parameters into 1-D FlatParameter shards. {_WHY}")
    checked = list(model.named_parameters())
    if params is not None:
        checked += [(f"<optimizer parameter #{i}>", p) for i, p in enumerate(params)]
    for name, p in checked:
        why = _refusal(name, p)
        if why is not None:
            raise TypeError(why)


def reshard_fsdp_modules(model: nn.Module) -> None:
    """Free the gathered parameters FSDP2 keeps after a forward without backward (a ``no_grad`` pass leaves the
    root unit unsharded: its full weights stay in memory, and ``named_parameters()`` yields them instead of
    the sharded ones the optimizer holds). Local, no communication; a no-op for unsharded models.

    Example:
        >>> reshard_fsdp_modules(torch.nn.Linear(2, 2))
    """
    if not torch.distributed.is_available():
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return
    for mod in model.modules():
        if isinstance(mod, FSDPModule):
            mod.reshard()
