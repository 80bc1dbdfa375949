r"""Slow, obvious twins of the fast paths: one loop or one dense matrix each, written to be read, not run.

Every fast function in the core has its twin here; the tests hold each pair equal through public calls
(``tests/test_math_twins.py``). Nothing in the core calls this module. (Not to be confused with
:mod:`gnsp_optim.reference`, the CLIP continual-learning reference setup.)

=====================================  ==========================================================
fast path                              twin
=====================================  ==========================================================
:meth:`.Projector.apply` / ``apply_``  :func:`project_dense`: ``matrix @ (I - U U^T)``
:func:`.projection.project_block(s)`   :func:`project_block_dense`: read the layer's matrix, dense ``P``
:func:`.subspace.tail_energy_rank`     :func:`tail_energy_rank_loop`: a loop over ``k``
:class:`.CovarianceStat` accumulation  :func:`covariance_sum`: a sum of outer products
:func:`.kinds.conv_patches`            :func:`conv_patches_loop`: patches read out with index loops
:func:`.kinds.attention_heads`         :func:`attention_heads_loop`: softmax attention, one head at a time
:func:`.projector_from_counts`         :func:`one_hot_null_projector`: dense one-hot Gram matrix, ``eigh``
(``nn.Embedding``'s row mask)
=====================================  ==========================================================

Example:
    >>> import torch
    >>> project_dense(torch.ones(1, 2), torch.tensor([[1.0], [0.0]])).tolist()
    [[0.0, 1.0]]
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["project_dense", "project_block_dense", "tail_energy_rank_loop", "covariance_sum",
           "conv_patches_loop", "attention_heads_loop", "one_hot_null_projector"]


def project_dense(matrix: torch.Tensor, occupied: torch.Tensor) -> torch.Tensor:
    """``matrix @ (I - U U^T)`` with a dense ``d x d`` projector.

    ``matrix`` is ``(rows, d)`` (a protected bias already appended as the last column), ``occupied`` the
    ``(d, k)`` orthonormal basis of the occupied directions.

    Example:
        >>> project_dense(torch.ones(1, 2), torch.tensor([[1.0], [0.0]])).tolist()
        [[0.0, 1.0]]
    """
    d = matrix.shape[-1]
    dense = torch.eye(d, dtype=matrix.dtype) - occupied @ occupied.T
    return matrix @ dense


def tail_energy_rank_loop(eigenvalues: list[float], rho: float) -> int:
    """The smallest ``k`` with ``sum(l[k:]) <= rho * sum(l)``, by trying every ``k``.

    Example:
        >>> tail_energy_rank_loop([3.0, 1.0, 0.0], 0.3)
        1
    """
    lam = [max(float(v), 0.0) for v in eigenvalues]
    total = math.fsum(lam)
    if total <= 0.0:
        return 0
    for k in range(len(lam) + 1):
        if math.fsum(lam[k:]) <= rho * total:
            return k
    return len(lam)  # pragma: no cover - the loop always returns at k = len(lam)


def covariance_sum(batches: list[torch.Tensor], normalize: str = "mean") -> torch.Tensor:
    """A task's normalised ``[X | 1]^T [X | 1]`` from ``(n, d)`` batches, one outer product per row.

    Example:
        >>> covariance_sum([torch.tensor([[1.0, 0.0], [0.0, 2.0]])], "sum").tolist()
        [[1.0, 0.0, 1.0], [0.0, 4.0, 2.0], [1.0, 2.0, 2.0]]
    """
    d = batches[0].shape[-1]
    total = torch.zeros(d + 1, d + 1, dtype=batches[0].dtype)
    rows = 0
    for x in batches:
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        gram = sum((torch.outer(r, r) for r in xa), torch.zeros_like(total))
        if normalize == "frobenius":
            gram = gram / torch.linalg.matrix_norm(gram[:d, :d])
        total += gram
        rows += x.shape[0]
    if normalize == "mean":
        return total / rows
    if normalize == "frobenius":
        return total / torch.linalg.matrix_norm(total[:d, :d])
    return total


def conv_patches_loop(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a ``Conv1d`` / ``Conv2d`` multiplies its weight with, read out of ``x`` with loops.

    ``(G, n_patches, C/G * prod(k))``. Only zero padding with integer ``padding``. Example:
        >>> conv = torch.nn.Conv1d(1, 1, 2)
        >>> conv_patches_loop(conv, torch.arange(3.0).view(1, 1, 3)).tolist()
        [[[0.0, 1.0], [1.0, 2.0]]]
    """
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:
        x = x.unsqueeze(0)
    if spatial == 1:
        x = x.unsqueeze(2)
        k, s, dil, p = (1, *module.kernel_size), (1, *module.stride), (1, *module.dilation), (0, *module.padding)
    else:
        k, s, dil, p = module.kernel_size, module.stride, module.dilation, module.padding
    x = F.pad(x, (p[1], p[1], p[0], p[0]))
    n, c, h, w = x.shape
    g = module.groups
    cg = c // g
    out_h = (h - dil[0] * (k[0] - 1) - 1) // s[0] + 1
    out_w = (w - dil[1] * (k[1] - 1) - 1) // s[1] + 1
    rows: list[list[torch.Tensor]] = [[] for _ in range(g)]
    for gi in range(g):
        for b in range(n):
            for i in range(out_h):
                for j in range(out_w):
                    patch = [x[b, gi * cg + ch, i * s[0] + a * dil[0], j * s[1] + e * dil[1]]
                             for ch in range(cg) for a in range(k[0]) for e in range(k[1])]
                    rows[gi].append(torch.stack(patch))
    return torch.stack([torch.stack(r) for r in rows])


def attention_heads_loop(module: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                         attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """What ``out_proj`` multiplies: the heads' concatenated output, one head and one sample at a time.

    ``softmax(Q_h K_h^T / sqrt(d_h) + mask) V_h`` for each head ``h``, laid out like the module's output
    (``(L, N, E)``, or ``(N, L, E)`` with ``batch_first``). Masks are boolean (True: not attended) or
    additive floats; no ``bias_kv`` / ``add_zero_attn``, no dropout (eval mode).

    Example:
        >>> m = torch.nn.MultiheadAttention(4, 2)
        >>> tuple(attention_heads_loop(m, *(torch.randn(3, 1, 4),) * 3).shape)
        (3, 1, 4)
    """
    if module.bias_k is not None or module.add_zero_attn:
        raise NotImplementedError("attention_heads_loop: bias_kv / add_zero_attn are not modelled")
    if module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, h = module.embed_dim, module.num_heads
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    b_q = b_k = b_v = None
    if module.in_proj_bias is not None:
        b_q, b_k, b_v = module.in_proj_bias.chunk(3)
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    dh = e // h
    out = torch.zeros_like(q)
    for n in range(q.shape[1]):
        for head in range(h):
            cols = slice(head * dh, (head + 1) * dh)
            scores = q[:, n, cols] @ k[:, n, cols].T / math.sqrt(dh)  # (L, S)
            for mask in (attn_mask if attn_mask is None or attn_mask.dim() == 2 else attn_mask[n * h + head],
                         None if key_padding_mask is None else key_padding_mask[n].expand_as(scores)):
                if mask is not None:
                    scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
            out[:, n, cols] = torch.softmax(scores, dim=-1) @ v[:, n, cols]
    return out.transpose(0, 1) if module.batch_first else out


def project_block_dense(block: Any, proj: Any, w: torch.Tensor, b: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What projecting tensors shaped like a block's (weight, bias) must give, with one dense ``d x d``
    projector per group; returns new tensors (the inputs are left alone).

    The weight is read as the layer multiplies it (``W``, or ``W^T`` for a ``transposed`` block stored
    ``(d, out)``; a conv kernel flattened per output channel), split into ``groups`` row blocks, the block's
    rows of the bias appended as a last column; each group's matrix is multiplied by ``I - U U^T``
    (``proj.form == "kept"``) or ``N N^T`` (``"null"``).

    Example:
        >>> from gnsp_optim.kinds import discover_blocks
        >>> from gnsp_optim.projector import Projector
        >>> blk = discover_blocks(torch.nn.Linear(2, 1, bias=False), {})[0]
        >>> p = Projector.from_bases(torch.eye(2)[None, :, :1], torch.eye(2)[None, :, 1:], [1])
        >>> project_block_dense(blk, p, torch.tensor([[2.0, 3.0]]), None)[0].tolist()
        [[0.0, 3.0]]
    """
    mat = w.t() if block.transposed else w.reshape(w.shape[0], -1)  # conv: (out, C/G * prod(k))
    rows = slice(None) if block.bias_rows is None else block.bias_rows
    bias = None if b is None else b[rows]
    g = block.groups
    per = mat.shape[0] // g
    new_w, new_b = mat.clone(), None if b is None else b.clone()
    for gi in range(g):
        r = slice(gi * per, (gi + 1) * per)
        full = mat[r] if bias is None else torch.cat([mat[r], bias[r, None]], 1)
        basis = proj.basis[gi].to(full.dtype)
        width = proj.kept_ranks[gi] if proj.form == "kept" else proj.dim - proj.kept_ranks[gi]
        cols = basis[:, :width]
        if proj.form == "kept":
            out = project_dense(full, cols)
        else:
            out = full @ cols @ cols.T
        new_w[r] = out[:, : mat.shape[1]]
        if new_b is not None:
            new_b[rows][r] = out[:, -1]
    return (new_w.t() if block.transposed else new_w.reshape(w.shape)), new_b


def one_hot_null_projector(tasks: list[torch.Tensor], vocab: int, rule: Any, normalize: str = "mean"
                           ) -> torch.Tensor:
    """The ``V x V`` null-space projector of an embedding's inputs, the obvious way: every task's token ids
    as one-hot rows, their normalised Gram matrix (:func:`covariance_sum`) summed over tasks, ``eigh``, the
    rule's rank on the descending eigenvalues, ``N N^T``. An embedding's weight change ``dW`` (``V x d``)
    keeps old outputs when it is ``P dW``.

    Example:
        >>> from gnsp_optim.subspace import TailEnergy
        >>> p = one_hot_null_projector([torch.tensor([0, 0, 2])], 3, TailEnergy(0.0))
        >>> torch.diagonal(p).round().tolist()
        [0.0, 1.0, 0.0]
    """
    memory = torch.zeros(vocab, vocab, dtype=torch.float64)
    for ids in tasks:
        rows = F.one_hot(ids.reshape(-1), vocab).to(torch.float64)
        memory += covariance_sum([rows], normalize)[:vocab, :vocab]
    lam, vec = torch.linalg.eigh(memory)
    lam, vec = lam.flip(0), vec.flip(1)
    null = vec[:, int(rule(lam)):]
    return null @ null.T
