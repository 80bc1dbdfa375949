r"""Per-layer input statistics: the uncentred covariance of what each protected weight sees.

Data path, step 2 of 5 (hook -> **statistics** -> end_task -> rule + eigh -> projector -> step): the hooks
(:mod:`.hooks`) call :meth:`CovarianceStat.update` with the rows a weight multiplies; ``end_task`` folds
the task's sums into the memory of earlier tasks, whose eigendecomposition (:mod:`.subspace`) gives the
projector.

For inputs ``X`` (``n x d``) the statistic is the augmented Gram matrix of ``[X | 1]``::

    [[X^T X,  X^T 1],
     [1^T X,  n    ]]

so a protected bias (the weight of the constant-1 column) needs nothing extra; when the bias is not
protected the top-left ``d x d`` block is used alone. Accumulation always runs in ``dtype`` (float32 or
wider) with autocast switched off, whatever precision the forward pass uses.

How a task's sums become memory (``normalize``):

- ``"mean"`` (default): the task's covariance ``S / n``, so every task weighs the same whatever its size;
- ``"sum"``: the plain sums ``S``;
- ``"frobenius"``: the public GNSP code's rule: each batch's Gram matrix divided by its Frobenius norm,
  the task's total divided by its Frobenius norm (both measured on the ``X^T X`` block).

Example:
    >>> import torch
    >>> st = CovarianceStat("fc", dim=2)
    >>> st.update(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    >>> st.task_sum[0].tolist()
    [[1.0, 0.0, 1.0], [0.0, 4.0, 2.0], [1.0, 2.0, 2.0]]
"""

from __future__ import annotations

import math

import torch

__all__ = ["CovarianceStat", "NORMALIZE_MODES"]

NORMALIZE_MODES = ("mean", "sum", "frobenius")


class CovarianceStat:
    """Running ``[X | 1]^T [X | 1]`` of one layer input, for ``groups`` independent groups.

    ``dim`` is the layer's input width ``d`` (the constant-1 column is extra: the sums are ``d + 1`` wide).
    ``task_sum`` holds the current task's collection (allocated on first use, freed by :meth:`fold`);
    ``memory`` holds the normalised sum over all finished tasks.

    ``fast=True`` accumulates with in-place GEMMs straight into the buffer, computing only the upper block
    strips of the symmetric Gram matrix (``gram_block`` wide; None: chosen from ``dim``); ``fast=False`` is
    the general path (a fresh ``bmm``, then adds), kept as the twin the tests compare against.
    ``chunk_rows``: upcast 16-bit inputs that many rows at a time (see :meth:`update`; None: the whole batch).
    """

    def __init__(self, name: str, dim: int, groups: int = 1, dtype: torch.dtype = torch.float32,
                 normalize: str = "mean", *, fast: bool = True, gram_block: int | None = None,
                 chunk_rows: int | None = None) -> None:
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"statistics accumulate in float32 or float64, got {dtype}")
        self.name, self.dim, self.groups, self.dtype, self.normalize = name, dim, groups, dtype, normalize
        if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
            raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
        self.fast, self.gram_block, self.chunk_rows = fast, gram_block, chunk_rows
        self.task_sum: torch.Tensor | None = None
        self.task_count = 0  # rows seen this task (per group)
        self.task_batches = 0
        self.memory: torch.Tensor | None = None
        self.tasks_folded = 0
        #: share of rows (tokens / patches) kept per batch; < 1 samples rows at random (see ``collect``)
        self.row_fraction = 1.0
        self.generator: torch.Generator | None = None

    def _buffer(self, device: torch.device) -> torch.Tensor:
        if self.task_sum is None:
            d = self.dim + 1
            self.task_sum = torch.zeros(self.groups, d, d, dtype=self.dtype, device=device)
        return self.task_sum

    @torch.no_grad()
    def update(self, x: torch.Tensor, group: int | None = None) -> None:
        """Add inputs ``x``: ``(n, d)`` (the same rows for every group, or for ``group`` alone) or ``(G, n, d)``.

        16-bit inputs (bf16 / fp16) with ``chunk_rows`` set are upcast ``chunk_rows`` rows at a time (the
        transient float copy is ``chunk_rows x d``, not ``n x d``); products of 16-bit numbers are exact in
        float32, so only the order of additions changes (twin: ``chunk_rows=None``, one copy of the batch).
        """
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.detach()
            if x.dim() == 2:
                x = x.unsqueeze(0)
            if x.shape[-1] != self.dim or x.shape[0] not in (1, self.groups):
                raise ValueError(f"{self.name}: expected inputs (..., {self.dim}) for {self.groups} group(s), "
                                 f"got {tuple(x.shape)}")
            n = x.shape[1]
            if n == 0:
                return
            if self.row_fraction < 1.0:  # row subsampling: an unbiased estimate of the mean covariance
                keep = max(1, math.ceil(n * self.row_fraction))
                idx = torch.randperm(n, generator=self.generator)[:keep].to(x.device)
                x, n = x[:, idx], keep
            buf = self._buffer(x.device)
            if group is not None:
                buf = buf[group : group + 1]
            chunk = self.chunk_rows
            if chunk and x.element_size() < 4 and self.normalize != "frobenius":  # frobenius: whole-batch norm
                for start in range(0, n, chunk):
                    self._accumulate(buf, x[:, start:start + chunk].to(self.dtype))
            else:
                self._accumulate(buf, x.to(self.dtype))
            self.task_count += n
            self.task_batches += 1

    def _accumulate(self, buf: torch.Tensor, x: torch.Tensor) -> None:
        """``buf += [X | 1]^T [X | 1]`` (per batch Frobenius-normalised under ``"frobenius"``)."""
        n, d = x.shape[1], self.dim
        if self.fast and self.normalize != "frobenius" and x.shape[0] == buf.shape[0]:
            # fast path: the GEMM accumulates straight into the buffer's X^T X block (no fresh d x d
            # tensor, no extra add pass); twin: the general path below (tests/test_math_twins.py)
            _add_gram_(buf[:, :d, :d], x, self.gram_block)
            col = x.sum(dim=1)
            buf[:, :d, d] += col
            buf[:, d, :d] += col
            buf[:, d, d] += float(n)
            return
        gram = torch.bmm(x.transpose(1, 2), x)  # (1 or G, d, d): one GEMM per group
        col = x.sum(dim=1)  # (1 or G, d)
        count = torch.full((x.shape[0],), float(n), dtype=self.dtype, device=x.device)
        if self.normalize == "frobenius":
            scale = torch.linalg.matrix_norm(gram).clamp_min(torch.finfo(self.dtype).tiny).reciprocal()
            gram, col, count = gram * scale[:, None, None], col * scale[:, None], count * scale
        buf[:, :d, :d] += gram
        buf[:, :d, d] += col
        buf[:, d, :d] += col
        buf[:, d, d] += count

    @property
    def seen(self) -> bool:
        """Whether any input reached this statistic during the current collection."""
        return self.task_batches > 0

    def task_is_finite(self) -> bool:
        """False when a NaN or Inf reached the current collection."""
        return self.task_sum is None or bool(torch.isfinite(self.task_sum).all())

    def all_reduce_(self) -> None:
        """Sum the current collection over all processes of the default ``torch.distributed`` group."""
        import torch.distributed as dist

        if self.task_sum is None:
            self.task_sum = torch.zeros(self.groups, self.dim + 1, self.dim + 1, dtype=self.dtype,
                                        device=self.memory.device if self.memory is not None else "cpu")
        counts = torch.tensor([float(self.task_count), float(self.task_batches)], dtype=torch.float64,
                              device=self.task_sum.device)
        dist.all_reduce(self.task_sum)
        dist.all_reduce(counts)
        self.task_count, self.task_batches = int(counts[0]), int(counts[1])

    def task_contribution(self) -> torch.Tensor:
        """The current collection normalised as ``normalize`` says (without touching any state)."""
        assert self.task_sum is not None and self.task_count > 0
        if self.normalize == "mean":  # per group: divide by its own row count (the constant-1 entry)
            d = self.dim
            return self.task_sum / self.task_sum[:, d : d + 1, d : d + 1].clamp_min(1.0)
        if self.normalize == "frobenius":
            d = self.dim
            norm = torch.linalg.matrix_norm(self.task_sum[:, :d, :d]).clamp_min(torch.finfo(self.dtype).tiny)
            return self.task_sum / norm[:, None, None]
        return self.task_sum.clone()

    def merged_memory(self) -> torch.Tensor:
        """The memory as it will be once the current collection is folded in (nothing changes)."""
        contribution = self.task_contribution()
        return contribution if self.memory is None else self.memory + contribution.to(self.memory)

    def fold(self, merged: torch.Tensor | None = None) -> None:
        """Add the current collection to the memory of earlier tasks and clear the collection.

        ``merged``: :meth:`merged_memory`'s result when the caller already computed it (end_task builds every
        projector before it changes any memory).
        """
        if self.seen:
            self.memory = self.merged_memory() if merged is None else merged
            self.tasks_folded += 1
        self.clear_task()

    def clear_task(self) -> None:
        """Forget the current collection (memory of earlier tasks is kept)."""
        self.task_sum, self.task_count, self.task_batches = None, 0, 0

    def block(self, with_bias: bool) -> torch.Tensor | None:
        """The memory restricted to the weight inputs (``with_bias=False``) or with the constant-1 column."""
        if self.memory is None:
            return None
        return self.memory if with_bias else self.memory[:, : self.dim, : self.dim]


def _add_gram_(out: torch.Tensor, x: torch.Tensor, block: int | None = None) -> None:
    """``out += x^T x`` for ``out`` ``(B, d, d)`` symmetric and ``x`` ``(B, n, d)``, in place.

    Computes only the block-row strips on and above the diagonal (about half the FLOPs of one full GEMM for
    wide inputs) and copies each finished strip's transpose below the diagonal, which is exact because ``out``
    stays symmetric. ``block=None`` picks 256 for ``d >= 2048``, 128 for ``d >= 512`` and one GEMM below.
    Twin: ``CovarianceStat(fast=False)``'s one ``bmm`` per batch (tests/test_math_twins.py).
    """
    d = x.shape[-1]
    if block is None:
        block = 256 if d >= 2048 else (128 if d >= 512 else d)
    xt = x.transpose(1, 2)
    for i0 in range(0, d, block):
        i1 = min(d, i0 + block)
        out[:, i0:i1, i0:].baddbmm_(xt[:, i0:i1], x[:, :, i0:])
        if i1 < d:
            out[:, i1:, i0:i1] = out[:, i0:i1, i1:].transpose(1, 2)


def __getattr__(name: str):  # the pre-redesign homes of the conv patch extraction, kept importable
    if name == "conv_patches":
        from .kinds import conv_patches

        return conv_patches
    if name == "conv_patches_reference":
        from .naive import conv_patches_loop

        return conv_patches_loop
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
