r"""FSDP2 (``torch.distributed.fsdp.fully_shard``): GNSP's projections on row-sharded ``DTensor`` s.

Prototype functions for the optimizer to call when a protected weight is a ``DTensor`` (see
``docs/design/scale.md`` for the wiring). FSDP2 shards every parameter on dim 0 with ``torch.chunk``
semantics: rank ``r`` of ``W`` holds global rows ``[r c, min((r+1) c, n))`` with ``c = ceil(n / world)``;
its ``.grad``, the optimizer's moments (Adam's ``exp_avg``) and any ``p - p0`` difference are DTensors with the
same placement, so one function serves the gradient, the ``mode="update"`` change and moment projection.

**Input-side weights** (``nn.Linear`` / ``Conv`` / attention ``in_proj``: ``y = W x``; a row of ``W`` acts on
the input). The projection ``[dW | db] P`` acts on each row on its own, so every rank projects its local rows
with **no communication** (:func:`project_rows_sharded_`). Row *groups* (grouped convolutions' channel blocks,
attention's q/k/v row blocks) may straddle shard boundaries: the local rows are cut into per-group segments
and each segment uses its group's basis. The bias column: ``nn.Linear`` / ``Conv`` / packed ``in_proj`` biases
have as many rows as the weight, so FSDP2 splits them the same way and they stay local. Attention with separate
``q/k/v_proj_weight`` shares one ``in_proj_bias`` of ``3 e`` rows, split differently from each ``e``-row weight:
then the bias is gathered (``3 e`` numbers), each rank projects the rows it holds, and the new bias entries are
summed into place with one all-reduce of ``3 e`` numbers.

**Left-multiplied weights** (``y = x @ W``, ``W`` stored ``d x out``, e.g. CLIP's ``visual.proj``): the shard
dimension *is* the input dimension, so the projection ``P g = g - U (U^T g)`` needs ``U^T g`` summed over the
shards: **one all-reduce of a** ``k x out`` **matrix** (``k``: the stored basis' width, :func:`project_left_sharded_`).

**Embeddings** (``nn.Embedding``: ``out = one_hot(t) @ W``, ``W`` stored ``(V, d)``) are left-multiplied too, but
their projector is a row mask (the one-hot covariance is diagonal: ``dW <- D dW``, ``D`` the unused tokens).
FSDP2 shards the vocabulary, so rank ``r`` holds rows ``[r c, min((r+1) c, V))`` (uneven last shard, possibly
empty; FSDP2's padding is not part of ``to_local()``) and multiplies them by the same slice of the replicated
mask: **no communication**. The token counts behind the mask are all-reduced at ``end_task`` like the other
statistics, so every rank holds the same mask. A weight tied to an output layer (rows of the same ``W``) is
an input-side block whose rows are local as well.

Statistics need nothing new: FSDP2 all-gathers parameters for the forward, the hooks see each rank's own batch
of inputs, and the statistics are all-reduced at ``end_task`` as under DDP. Projectors are replicated (built
from the same reduced statistics on every rank; each basis acts on the *input* dimension, which no input-side
weight shards).

Plain (non-DTensor) tensors are accepted too and projected whole (a single process is the ``world = 1`` case),
which is what the tests compare against, with :meth:`~gnsp_optim.projector.Projector.apply` on the gathered
``full_tensor()`` as the reference.

Example:
    >>> import torch
    >>> from gnsp_optim.projector import Projector
    >>> p = Projector.from_bases(torch.eye(3)[None, :, :1], torch.eye(3)[None, :, 1:], [1])
    >>> w, b = torch.ones(4, 2), torch.ones(4)                    # a Linear(2, 4) with bias: d = 3
    >>> project_rows_sharded_(p, w, b)
    >>> w[0].tolist(), b[0].item()
    ([0.0, 1.0], 1.0)
"""

from __future__ import annotations

import math

import torch

from .projector import Projector

__all__ = ["is_dtensor", "row_shard", "project_rows_sharded_", "project_left_sharded_"]


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return None
    return DTensor


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``.

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def row_shard(t: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, int, int, object | None]:
    """``(local tensor, first global row, stop row, process group of the shard dimension)`` of ``t``.

    A plain tensor is its own single shard (group ``None``). A DTensor must be sharded on dim 0 along exactly
    one mesh dimension and replicated along any other (FSDP2; HSDP's 2-D mesh); anything else raises
    ``NotImplementedError`` naming ``name``.

    Example:
        >>> local, start, stop, group = row_shard(torch.zeros(5, 3))
        >>> tuple(local.shape), start, stop, group
        ((5, 3), 0, 5, None)
    """
    if not is_dtensor(t):
        return t, 0, t.shape[0], None
    from torch.distributed.tensor import Replicate, Shard

    shard_dims = [i for i, p in enumerate(t.placements) if isinstance(p, Shard)]
    if len(shard_dims) != 1 or t.placements[shard_dims[0]].dim != 0 or any(
            not isinstance(p, (Shard, Replicate)) for p in t.placements):
        raise NotImplementedError(f"{name}: GNSP projects DTensors sharded on dim 0 along one mesh dimension "
                                  f"(FSDP2's default); got placements {t.placements}")
    mesh_dim = shard_dims[0]
    mesh = t.device_mesh
    world = mesh.size(mesh_dim)
    coord = mesh.get_coordinate()[mesh_dim]
    n = t.shape[0]
    chunk = math.ceil(n / world)
    start = min(coord * chunk, n)
    stop = min(start + chunk, n)
    local = t.to_local()
    if local.shape[0] != stop - start:
        raise NotImplementedError(f"{name}: local shard has {local.shape[0]} rows, torch.chunk sharding of {n} "
                                  f"rows over {world} ranks gives rank {coord} {stop - start}: unknown layout")
    return local, start, stop, mesh.get_group(mesh_dim)


def _group_projector(proj: Projector, g: int) -> Projector:
    return Projector(proj.form, proj.basis[g:g + 1], [proj.kept_ranks[g]], proj.dim)


@torch.no_grad()
def project_rows_sharded_(proj: Projector, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                          groups: int = 1, bias_rows: slice | None = None, name: str = "weight") -> None:
    r"""Project an input-side ``[weight | bias]`` pair in place, each a row-sharded DTensor or a plain tensor.

    ``weight`` is shaped like the parameter (``(rows, *in)``: Linear ``(out, in)``, Conv ``(out, in/g, *k)``,
    ``in_proj_weight`` ``(3e, e)``); its rows form ``groups`` equal consecutive blocks, block ``g`` projected
    with ``proj``'s group ``g``. ``bias`` (optional) is 1-D; row ``r`` of the weight owns bias entry
    ``bias_rows.start + r`` (``bias_rows`` ``None``: entry ``r``). Communication: none when the bias (if any)
    is split like the weight, else one all-gather and one all-reduce of the bias' length.

    Example:
        >>> from gnsp_optim.projector import Projector
        >>> u = torch.eye(2)[None, :, :1]
        >>> proj = Projector.from_bases(torch.cat([u, u]), torch.cat([torch.eye(2)[None, :, 1:]] * 2), [1, 1])
        >>> w = torch.ones(4, 2)                    # two groups of two rows, input dim 2, no bias
        >>> project_rows_sharded_(proj, w, groups=2)
        >>> w.tolist()
        [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]
    """
    local_w, a, b, pg = row_shard(weight, name)
    rows_total = weight.shape[0]
    if rows_total % groups:
        raise ValueError(f"{name}: {rows_total} rows do not split into {groups} groups")
    per = rows_total // groups
    wm = local_w.reshape(local_w.shape[0], -1)  # a view of the local shard (contiguous)
    d_w = wm.shape[1]
    if d_w + (0 if bias is None else 1) != proj.dim:
        raise ValueError(f"{name}: projector of dimension {proj.dim} cannot act on {d_w} inputs"
                         f"{'' if bias is None else ' plus a bias'}")
    off = 0 if bias_rows is None else bias_rows.start
    local_b, gathered = _bias_of_rows(bias, a + off, b + off, name)
    for g in range(a // per, min(groups, -(-b // per))):  # the groups this rank's rows [a, b) touch
        lo, hi = max(a, g * per), min(b, (g + 1) * per)
        seg_w = wm[lo - a: hi - a].unsqueeze(0)
        seg_b = None if local_b is None else local_b[lo - a: hi - a].reshape(1, -1, 1)
        _group_projector(proj, g).apply_(seg_w, seg_b)
    if gathered is not None:
        _write_gathered_bias(bias, gathered, local_b, (a + off, b + off), (off, off + rows_total), pg, name)
    if not wm.data_ptr() == local_w.data_ptr():  # pragma: no cover - non-contiguous local shard
        local_w.copy_(wm.view_as(local_w))


def _bias_of_rows(bias: torch.Tensor | None, start: int, stop: int,
                  name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(the bias entries of weight rows [start, stop) as a writable view, the gathered bias or None)``."""
    if bias is None:
        return None, None
    if not is_dtensor(bias):
        return bias[start:stop], None  # a plain bias next to a (sharded) weight: its matching entries
    local_b, c, e, _ = row_shard(bias, f"{name} (bias)")
    if (c, e) == (start, stop):
        return local_b, None  # split like the weight: local
    gathered = bias.full_tensor().clone()  # ``3e`` numbers; every rank projects its own rows' entries
    return gathered[start:stop], gathered


def _write_gathered_bias(bias: torch.Tensor, gathered: torch.Tensor, projected: torch.Tensor,
                         mine: tuple[int, int], owned: tuple[int, int], pg, name: str) -> None:
    """Sum every rank's projected entries (``mine``: this rank's) into place, then write the part of
    ``owned`` (the block's entries) that this rank's bias shard holds."""
    import torch.distributed as dist

    if pg is None:  # a whole weight next to a sharded bias: this rank projected every row itself
        new = gathered
    else:
        new = torch.zeros_like(gathered)
        new[mine[0]: mine[1]] = projected  # the entries of the rows this rank holds (the rows partition)
        dist.all_reduce(new, group=pg)
    mine_b, c, e, _ = row_shard(bias, f"{name} (bias)")
    lo, hi = max(c, owned[0]), min(e, owned[1])
    if lo < hi:
        mine_b[lo - c: hi - c] = new[lo:hi]


def _mask_rows_(mask: torch.Tensor, local: torch.Tensor, start: int, stop: int, bias: torch.Tensor | None,
                name: str) -> None:
    """``[W; b] <- diag(mask) [W; b]`` on this rank's rows ``[start, stop)`` of ``W`` (and its bias shard)."""
    local.mul_(mask[start:stop].reshape(-1, *([1] * (local.dim() - 1))))
    if bias is not None:  # the bias is the weight row of the constant-1 input: the mask's last entry
        local_b = row_shard(bias, f"{name} (bias)")[0]
        local_b.mul_(mask[-1])


@torch.no_grad()
def project_left_sharded_(proj: Projector, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          name: str = "weight") -> None:
    r"""Project a left-multiplied weight (``y = x @ W [+ b]``, ``W`` is ``d x out``) in place: ``[W; b] <- P [W; b]``.

    ``weight`` is row-sharded on its input dimension (or plain). ``proj`` has one group and acts on the ``d``
    inputs plus, when ``bias`` is given (transformers' ``Conv1D``), the constant-1 input whose weight row is
    the bias (``proj.dim == d + 1``). Communication: one all-reduce of the ``r x out`` matrix ``B^T W`` (``B``:
    the stored basis, ``r`` its width) over the shard dimension's process group, plus a gather of the bias
    (``out`` numbers) when it is sharded. A ``form="diagonal"`` projector (an ``nn.Embedding``'s row mask of
    unused tokens: ``W`` is ``(V, d)``, its rows are the one-hot inputs) is sliced to the rank's rows and
    multiplied in: no communication.

    Example:
        >>> from gnsp_optim.projector import Projector
        >>> proj = Projector.from_bases(torch.eye(3)[None, :, :1], torch.eye(3)[None, :, 1:], [1])
        >>> w = torch.ones(3, 2)
        >>> project_left_sharded_(proj, w)
        >>> w.tolist()
        [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        >>> emb = torch.ones(3, 2)                  # an embedding's (V, d) weight; token 1 was used
        >>> project_left_sharded_(Projector.diagonal(torch.tensor([[True, False, True]])), emb)
        >>> emb[:, 0].tolist()
        [1.0, 0.0, 1.0]
    """
    local, a, b, pg = row_shard(weight, name)
    d = weight.shape[0]
    if proj.basis.shape[0] != 1 or proj.dim != d + (bias is not None):
        raise ValueError(f"{name}: a left-multiplied weight of {d} input rows"
                         f"{'' if bias is None else ' and a bias'} needs a one-group projector of dimension "
                         f"{d + (bias is not None)}, got {tuple(proj.basis.shape)}")
    full = proj.basis[0].to(local.dtype)  # (D, r)
    if proj.form == "diagonal":  # a row mask (an embedding's): each rank masks its own rows, no communication
        _mask_rows_(full[:, 0], local, a, b, bias, name)
        return
    basis = full[a:b]  # this rank's input rows
    coef = basis.T @ local  # partial B^T W over this rank's rows: (r, out)
    if pg is not None:
        import torch.distributed as dist

        dist.all_reduce(coef, group=pg)
    full_b = None
    if bias is not None:
        full_b = (bias.full_tensor() if is_dtensor(bias) else bias).to(local.dtype)
        coef = coef + full[d:].T @ full_b[None]  # the bias row's share, the same on every rank
    kept = proj.form == "kept"
    if kept:
        local.sub_(basis @ coef)
    else:
        local.copy_(basis @ coef)
    if bias is not None:
        new_b = (full_b - full[d] @ coef) if kept else full[d] @ coef
        local_b, c, e, _ = row_shard(bias, f"{name} (bias)")
        local_b.copy_(new_b[c:e])
