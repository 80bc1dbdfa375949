r"""Applying projectors to tensors: the plain functions under :meth:`NullSpaceOptimizer.step`.

Data path, step 5 of 5 (hook -> statistics -> end_task -> rule + eigh -> projector -> **step**): each
protected block's tensors (gradients, optimizer moments, or the change a step made) are read as
``(G, rows, d)`` matrices (:meth:`.kinds.Block.read`) and multiplied by the block's projector.

- :func:`project_block`: one block, in place (``in_place=False``: apply then write back, the twin);
- :func:`project_blocks`: many blocks, per block or (``batched=True``) one padded product per shape;
- :func:`project_gradients`: the ``.grad`` of every block (a frozen block's gradient is dropped);
- :func:`project_moments`: the base optimizer's linear moment buffers, at a task boundary;
- :func:`projected_change`: the update mode, ``W <- W0 + P(W - W0)`` around the base step, as one context.

Example:
    >>> import torch
    >>> from gnsp_optim.kinds import discover_blocks
    >>> from gnsp_optim.projector import Projector
    >>> lin = torch.nn.Linear(2, 1, bias=False)
    >>> b = discover_blocks(lin, {})[0]
    >>> proj = Projector.from_bases(torch.eye(2)[None, :, :1], torch.eye(2)[None, :, 1:], [1])
    >>> g = torch.tensor([[2.0, 3.0]])
    >>> project_block(b, proj, g, None)
    >>> g.tolist()
    [[0.0, 3.0]]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .fsdp import is_dtensor, project_left_sharded_, project_rows_sharded_
from .kinds import Block
from .projector import Projector

__all__ = ["project_block", "project_blocks", "project_gradients", "project_moments", "projected_change",
           "stack_projectors", "LINEAR_STATE_KEYS", "Item"]

#: optimizer-state entries that are linear in past gradients: projected onto the new null space at end_task.
#: (Centred RMSprop's ``grad_avg`` is linear too but must stay below ``square_avg``; it is left alone.)
LINEAR_STATE_KEYS = ("momentum_buffer", "exp_avg")

#: ``(block, projector, weight-shaped tensor, bias-shaped tensor or None)``
Item = tuple[Block, Projector, torch.Tensor, "torch.Tensor | None"]


def _is_view_of(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` shares the storage of a contiguous ``base`` (writing into it writes into ``base``)."""
    return base.is_contiguous() and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


def _writes_through(wm: torch.Tensor, w: torch.Tensor, bm: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return _is_view_of(wm, w) and (b is None or _is_view_of(bm, b))


@torch.no_grad()
def project_block(block: Block, proj: Projector, w: torch.Tensor, b: torch.Tensor | None, *,
                  in_place: bool = True) -> None:
    """Project tensors shaped like the block's (weight, bias) in place.

    ``in_place=True`` multiplies straight into the tensors when the matrix view writes through (no copy
    back); otherwise, or with ``in_place=False`` (the twin), it applies to fresh tensors and writes back.
    FSDP2: a row-sharded ``DTensor`` weight is projected shard by shard (:mod:`.fsdp`; the single-process
    path on the gathered tensors is its twin, ``tests/test_fsdp_optimizer.py``).
    """
    if is_dtensor(w):
        _project_sharded(block, proj, w, b)
        return
    wm, bm = block.read(w, b)
    if in_place and _writes_through(wm, w, bm, b):
        proj.apply_(wm, bm)
        return
    nw, nb = proj.apply(wm, bm)
    block.write(w, b, nw, nb)


def _project_sharded(block: Block, proj: Projector, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """FSDP2: rows of an input-side weight are local (no communication); an ``x @ W`` weight is sharded on
    its input dimension (one all-reduce of ``k x out``)."""
    if block.transposed:  # bare x @ W (CLIP's visual.proj), transformers' Conv1D (x @ W + b)
        project_left_sharded_(proj, w, b, name=block.name)
    else:
        project_rows_sharded_(proj, w, b, groups=block.groups, bias_rows=block.bias_rows, name=block.name)


def stack_projectors(projs: list[Projector], dtype: torch.dtype) -> Projector:
    """One projector over the groups of ``projs`` (same form and dimension), bases zero-padded to the widest.

    Zero columns change neither form (``W - (W U) U^T`` nor ``(W N) N^T``).

    Example:
        >>> p = Projector.from_bases(torch.eye(3)[None, :, :1], torch.eye(3)[None, :, 1:], [1])
        >>> stack_projectors([p, p], torch.float32).kept_ranks
        [1, 1]
    """
    width = max(p.basis.shape[-1] for p in projs)
    first = projs[0].basis
    basis = first.new_zeros(sum(p.basis.shape[0] for p in projs), first.shape[1], width, dtype=dtype)
    start = 0
    for p in projs:
        basis[start:start + p.basis.shape[0], :, : p.basis.shape[-1]] = p.basis
        start += p.basis.shape[0]
    return Projector(projs[0].form, basis, [k for p in projs for k in p.kept_ranks], projs[0].dim)


@torch.no_grad()
def project_blocks(items: list[Item], *, batched: bool = False, cache: dict | None = None) -> None:
    """Project every item in place: one product per block, or with ``batched`` one per group of equal shapes.

    ``cache`` (any dict the caller keeps; clear it when the projectors change) holds the stacked bases per
    member list, so repeated steps do not restack them. Twin of ``batched=True``: ``batched=False``.
    """
    if not batched or len(items) < 2:
        for item in items:
            project_block(*item)
        return
    shapes: dict[tuple, list] = {}
    for b, proj, w, bias in items:
        if is_dtensor(w):  # FSDP2 shards: per block (a stack of shards of different layouts means nothing)
            project_block(b, proj, w, bias)
            continue
        wm, bm = b.read(w, bias)
        key = (proj.form, proj.dim, tuple(wm.shape[1:]), bm is None, wm.dtype, wm.device)
        shapes.setdefault(key, []).append((b, proj, w, bias, wm, bm))
    for key, members in shapes.items():
        if len(members) == 1:
            project_block(*members[0][:4])
        else:
            _project_stacked(members, key, {} if cache is None else cache)


def _project_stacked(members: list, key: tuple, cache: dict) -> None:
    projs = [m[1] for m in members]
    slot = (key, tuple(id(p) for p in projs))  # the cache holds the projectors, so their ids stay unique
    if slot not in cache:
        cache[slot] = (projs, stack_projectors(projs, key[4]))
    big_w = torch.cat([m[4] for m in members])  # (sum of groups, rows, d): one copy in ...
    big_b = None if key[3] else torch.cat([m[5] for m in members])
    cache[slot][1].apply_(big_w, big_b)
    start = 0
    for b, _, w, bias, wm, bm in members:  # ... and one copy back
        stop = start + wm.shape[0]
        nw, nb = big_w[start:stop], None if big_b is None else big_b[start:stop]
        if _writes_through(wm, w, bm, bias):
            wm.copy_(nw)
            if bm is not None:
                bm.copy_(nb)
        else:
            b.write(w, bias, nw, nb)
        start = stop


@torch.no_grad()
def project_gradients(pairs: list[tuple[Block, Projector]], *, batched: bool = False,
                      cache: dict | None = None) -> None:
    """Project the ``.grad`` of every block; a block that is frozen and owns its tensors gets ``grad = None``.

    A frozen block sharing its bias gets ``grad = None`` on its weight and zeros on its rows of the shared
    bias gradient; a shared bias every entry of which belongs to a frozen block gets ``grad = None`` (a zero
    gradient would still let decoupled weight decay move it). A block with a gradient on only one of
    weight / bias gets zeros for the other, so ``[dW | db]`` is projected whole.
    """
    items: list[Item] = []
    frozen_rows: dict[int, tuple[torch.Tensor, set[int]]] = {}  # shared bias -> its entries frozen blocks own
    frozen_weights: list[torch.Tensor] = []
    for b, proj in pairs:
        if proj.is_zero and not b.shares_bias:
            for _, p in b.params:
                p.grad = None
            continue
        if proj.is_zero:  # projected (its rows of the shared bias zeroed, FSDP2 shards too); weight dropped after
            frozen_weights.append(b.weight)
            owned = range(*b.bias_rows.indices(b.bias.shape[0]))
            frozen_rows.setdefault(id(b.bias), (b.bias, set()))[1].update(owned)
        if b.weight.grad is None and (b.bias is None or b.bias.grad is None):
            continue
        if b.weight.grad is None:
            b.weight.grad = torch.zeros_like(b.weight)
        if b.bias is not None and b.bias.grad is None:
            b.bias.grad = torch.zeros_like(b.bias)
        items.append((b, proj, b.weight.grad, None if b.bias is None else b.bias.grad))
    project_blocks(items, batched=batched, cache=cache)
    _drop_frozen(frozen_weights, frozen_rows)


def _drop_frozen(weights: list[torch.Tensor], bias_rows: dict[int, tuple[torch.Tensor, set[int]]]) -> None:
    """``grad = None`` for frozen weights that share a bias, and for shared biases wholly owned by them."""
    for w in weights:
        w.grad = None
    for bias, rows in bias_rows.values():
        if len(rows) == bias.shape[0]:
            bias.grad = None


@torch.no_grad()
def project_moments(state: dict, pairs: list[tuple[Block, Projector]],
                    keys: tuple[str, ...] = LINEAR_STATE_KEYS) -> None:
    """Project the base optimizer's linear moment buffers (``state[param][key]``) of every block.

    A bias without a buffer yet is projected as ``[m_w | 0]``; SGD's momentum buffer for the bias is created
    from the result (SGD reads it when present), other optimizers' cannot be.
    """
    for b, proj in pairs:
        bufs_w = state.get(b.weight, {})
        bufs_b = state.get(b.bias, {}) if b.bias is not None else {}
        for key in keys:
            t_w, t_b = bufs_w.get(key), bufs_b.get(key)
            if not isinstance(t_w, torch.Tensor) or t_w.shape != b.weight.shape:
                continue
            if b.bias is not None and not (isinstance(t_b, torch.Tensor) and t_b.shape == b.bias.shape):
                t_b = torch.zeros_like(b.bias)
                if key == "momentum_buffer" and not bufs_b:
                    state[b.bias]["momentum_buffer"] = t_b
            project_block(b, proj, t_w, t_b)


@contextlib.contextmanager
def projected_change(pairs: list[tuple[Block, Projector]], held_still: list[torch.Tensor], *,
                     batched: bool = False, cache: dict | None = None) -> Iterator[None]:
    """Around the ``with`` body (the base step): ``W <- W0 + P(W - W0)`` for every block, ``p <- p0`` for
    ``held_still``, in place in the parameters.

    Each tensor is copied once (a bias shared by several blocks too) and restored from that one copy; the
    change is projected even when the body raises (a partial step is then still a protected one).
    """
    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for b, _ in pairs:
        for t in (b.weight, b.bias):
            if t is not None and id(t) not in originals:
                originals[id(t)] = (t.detach(), t.detach().clone())
    snapshot = [(p.detach(), p.detach().clone()) for p in held_still]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, t0 in originals.values():
                t.sub_(t0)
            project_blocks([(b, proj, b.weight.detach(), None if b.bias is None else b.bias.detach())
                            for b, proj in pairs], batched=batched, cache=cache)
            for t, t0 in originals.values():
                t.add_(t0)
            for p, p0 in snapshot:
                p.copy_(p0)
