r"""Embeddings protected, not frozen; and a weight tied between an embedding and an output layer.

**Embedding.** ``nn.Embedding`` computes ``out = W[t]``: a matmul ``W^T e_t`` with a one-hot input ``e_t``.
The uncentred covariance of one-hot inputs is ``diag(counts)`` (how often each token occurred), so the
statistic is a vector of ``V`` token counts instead of a ``V x V`` matrix, and its null space is spanned by
the rows no old token used: the projection keeps the rows of used tokens fixed and lets the rest move.
(As a layer kind: the weight reads as ``x @ W`` with ``W`` of shape ``(V, d)``, input dimension ``V``, no
bias; the projector is the diagonal mask of unused rows, applied on the left: ``dW <- D dW``.)

**Tied embedding / head.** With ``head.weight is emb.weight`` (GPT-2, tied LLaMA / Qwen) the same ``W``
(``V x d``) serves two uses, each with its own constraint:

- the embedding's: ``D dW = dW`` (rows of used tokens are zero), ``D = diag(unused)``, acting on rows;
- the head's (``logits = h W^T``, ``h`` the head's ``d``-dimensional inputs): ``dW h = 0`` for old ``h``,
  i.e. ``dW P = dW`` with ``P`` the projector onto the null space of the head's input covariance, acting on
  columns.

``D`` multiplies from the left and ``P`` from the right, so the two projections commute
(``D (dW P) = (D dW) P``) and their product ``D dW P`` is itself an orthogonal projection (of ``dW``,
in the Frobenius inner product) that satisfies both: its used rows are zero and ``(D dW P) h = D (dW P h) = 0``.
So both uses stay exact, in update mode with any optimizer and in grad mode with SGD (momentum buffers
projected the same way at ``end_task``). With a head bias ``b`` the head's matrix is ``[W | b]`` and its
input ``[h | 1]``; the row mask then also applies to ``b`` (``D [dW | db] P``), which keeps both exact.
The per-step cost is the head's alone (``V x d x d``) plus a row mask.

Example:
    >>> import torch
    >>> st = TokenCountStat(6)
    >>> st.update(torch.tensor([[0, 2, 2]]))
    >>> st.fold()
    >>> st.used.tolist()
    [True, False, True, False, False, False]
    >>> dw = torch.ones(6, 2)
    >>> project_embedding_(dw, st.used)[:, 0].tolist()
    [0.0, 1.0, 0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

import torch

__all__ = ["TokenCountStat", "project_embedding_", "project_tied_", "null_projector"]


class TokenCountStat:
    r"""The input statistic of an ``nn.Embedding``: token counts (the diagonal of the one-hot covariance).

    ``task_counts`` holds the open collection, ``memory`` the sum over finished tasks of each task's counts,
    normalised as ``normalize`` says (``"sum"``: raw counts; ``"mean"``: divided by the task's token count,
    as :class:`~gnsp_optim.statistics.CovarianceStat` divides a Gram matrix by its rows; ``"frobenius"``:
    divided by the counts' norm, the Frobenius norm of ``diag(counts)``). ``memory`` is ``None`` before the
    first finished task. ``padding_idx`` is counted like any token: its row receives no gradient from the
    embedding, but weight decay, a tied output layer or an update-mode step can still move it, and old outputs
    at padding positions would move with it (holding it costs no plasticity).
    The optimizer drives it through the same calls as a ``CovarianceStat`` (``seen``, ``merged_memory``,
    ``fold``, ``clear_task``, ``all_reduce_``); ``row_fraction`` is ignored (counting every token is cheap
    and protects at least as much).

    Example:
        >>> st = TokenCountStat(4, padding_idx=0)
        >>> st.update(torch.tensor([0, 0, 3]))
        >>> st.task_counts.tolist()
        [2, 0, 0, 1]
    """

    groups = 1
    dtype = torch.float64

    def __init__(self, num_embeddings: int, padding_idx: int | None = None, *, normalize: str = "sum",
                 name: str = "") -> None:
        if num_embeddings < 1:
            raise ValueError(f"num_embeddings must be positive, got {num_embeddings}")
        if normalize not in ("mean", "sum", "frobenius"):
            raise ValueError(f"normalize must be 'mean', 'sum' or 'frobenius', got {normalize!r}")
        self.name, self.num_embeddings, self.padding_idx, self.normalize = name, num_embeddings, padding_idx, normalize
        self.task_counts = torch.zeros(num_embeddings, dtype=torch.long)
        self.memory: torch.Tensor | None = None
        self.tasks_folded = 0
        self.row_fraction, self.generator = 1.0, None

    @property
    def dim(self) -> int:
        """The input dimension of the one-hot view: the vocabulary size."""
        return self.num_embeddings

    @property
    def task_count(self) -> int:
        """Tokens counted in the open collection."""
        return int(self.task_counts.sum())

    @torch.no_grad()
    def update(self, ids: torch.Tensor) -> None:
        """Add the token ids of one batch (any shape; a NestedTensor's real positions only)."""
        if ids.is_nested:
            ids = torch.cat([t.reshape(-1) for t in ids.unbind()]) if ids.size(0) else ids.new_zeros(0)
        flat = ids.reshape(-1).to("cpu", torch.long)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise ValueError(f"token ids must lie in [0, {self.num_embeddings}), got [{int(flat.min())}, "
                             f"{int(flat.max())}]")
        self.task_counts += torch.bincount(flat, minlength=self.num_embeddings)

    @property
    def seen(self) -> bool:
        """Whether the open collection counted any token."""
        return bool(self.task_counts.any())

    def task_is_finite(self) -> bool:
        """Counts are integers: always finite."""
        return True

    def all_reduce_(self) -> None:
        """Sum the open collection's counts over all processes of the default ``torch.distributed`` group."""
        import torch.distributed as dist

        # the counts live on the CPU; NCCL reduces CUDA tensors only
        on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        counts = self.task_counts if on is None else self.task_counts.to(on)
        dist.all_reduce(counts)
        if on is not None:
            self.task_counts.copy_(counts.cpu())

    def task_contribution(self) -> torch.Tensor:
        """The open collection's counts, normalised as ``normalize`` says (float64)."""
        c = self.task_counts.to(torch.float64)
        if self.normalize == "mean":
            return c / c.sum().clamp_min(1.0)
        if self.normalize == "frobenius":
            return c / c.norm().clamp_min(torch.finfo(torch.float64).tiny)
        return c

    def merged_memory(self) -> torch.Tensor:
        """The memory as it will be once the open collection is folded in (nothing changes)."""
        c = self.task_contribution()
        return c if self.memory is None else self.memory + c

    def fold(self, merged: torch.Tensor | None = None) -> None:
        """Add the open collection to the memory of earlier tasks and clear it (nothing counted: no change)."""
        if self.seen:
            self.memory = self.merged_memory() if merged is None else merged
            self.tasks_folded += 1
        self.clear_task()

    def clear_task(self) -> None:
        """Forget the open collection."""
        self.task_counts.zero_()

    @property
    def used(self) -> torch.Tensor:
        """``(V,)`` bool: rows some finished task's token used (kept fixed)."""
        if self.memory is None:
            return torch.zeros(self.num_embeddings, dtype=torch.bool)
        return self.memory > 0

    def gram_reference(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The ``V x V`` one-hot covariance ``diag(counts)`` as a dense matrix (slow twin, for tests)."""
        return torch.diag(torch.zeros(self.num_embeddings, dtype=dtype) if self.memory is None
                          else self.memory.to(dtype))


@torch.no_grad()
def project_embedding_(delta: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
    """Zero the rows of used tokens in ``delta`` (``(V, d)``, a gradient or an update), in place; returns it."""
    if delta.shape[0] != used.shape[0]:
        raise ValueError(f"delta has {delta.shape[0]} rows, the token statistic {used.shape[0]}")
    delta[used.to(delta.device)] = 0
    return delta


def null_projector(inputs: torch.Tensor, with_bias: bool = False, rtol: float | None = None) -> torch.Tensor:
    """The orthogonal projector onto the null space of ``inputs`` (``(n, d)``; ``[x | 1]`` with ``with_bias``).

    The obvious construction (``eigh`` of the Gram matrix, eigenvalues under ``rtol * largest`` are zero;
    default ``rtol = d * eps``), as the core builds it for rho = 0. ``(d, d)`` (or ``(d + 1, d + 1)``).

    Example:
        >>> p = null_projector(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
        >>> p.tolist()
        [[0.0, 0.0], [0.0, 1.0]]
    """
    x = inputs.reshape(-1, inputs.shape[-1])
    if with_bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    lam, vec = torch.linalg.eigh(x.T @ x)
    tol = (rtol if rtol is not None else x.shape[1] * torch.finfo(x.dtype).eps) * lam.abs().max().clamp_min(0)
    null = vec[:, lam <= tol]
    return null @ null.T


@torch.no_grad()
def project_tied_(delta: torch.Tensor, used: torch.Tensor, head_projector: torch.Tensor,
                  delta_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    r"""``delta <- D delta P`` for a weight tied between an embedding (rows ``used``) and a head.

    ``delta``: ``(V, d)``; ``head_projector``: ``(d, d)``, or ``(d + 1, d + 1)`` when the head has a bias whose
    change ``delta_bias`` (``(V,)``) is projected jointly as the last column. In place; returns both.
    """
    v, d = delta.shape
    if delta_bias is None:
        if head_projector.shape != (d, d):
            raise ValueError(f"head_projector must be ({d}, {d}), got {tuple(head_projector.shape)}")
        delta.copy_(delta @ head_projector)
    else:
        if head_projector.shape != (d + 1, d + 1):
            raise ValueError(f"with a head bias, head_projector must be ({d + 1}, {d + 1}), got "
                             f"{tuple(head_projector.shape)}")
        full = torch.cat([delta, delta_bias.reshape(v, 1)], dim=1) @ head_projector
        delta.copy_(full[:, :d])
        delta_bias.copy_(full[:, d])
        project_embedding_(delta_bias.view(v, 1), used)
    project_embedding_(delta, used)
    return delta, delta_bias
