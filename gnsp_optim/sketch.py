r"""Bounded-memory input statistics: a frequent-directions sketch of each layer's input stream.

:class:`~gnsp_optim.statistics.CovarianceStat` keeps the exact ``(d+1) x (d+1)`` Gram matrix of ``[X | 1]``:
485 MB per layer in float32 at LLaMA-7B's 11008-wide MLP input. :class:`SketchStat` keeps instead a matrix
``B`` of ``rank`` rows (``rank x (d+1)``, plus a working buffer of ``2 * rank`` rows while a task is being
collected) with ``B^T B ~ A^T A``, where ``A`` is the stream of (normalised) augmented input rows: memory
``O(d * rank)``.

**Algorithm** (frequent directions, Liberty 2013; Ghashami, Liberty, Phillips & Woodruff 2016). Rows are
appended to the buffer; when it holds ``2 * rank`` rows it is *shrunk*: with its SVD ``U S V^T`` and
``delta = s_{rank+1}^2``, the buffer becomes ``sqrt(max(S^2 - delta, 0)) V^T`` (its first ``rank`` rows; the
rest are zero). Ending a task merges the task's sketch into the memory the same way (stack, shrink), after
scaling it as ``normalize`` says, and :meth:`SketchStat.all_reduce_` merges the ranks' sketches (stack, shrink):
frequent-directions sketches are mergeable.

**Guarantee** (every shrink, merge and fold included). Let ``A`` be all rows that entered, each scaled as its
task's normalisation scales it (so ``A^T A`` is exactly the memory :class:`CovarianceStat` would hold) and
``Delta`` the sum of the shrinks' ``delta``. Then, for every ``k <= rank``::

    0  <=  x^T (A^T A - B^T B) x  <=  Delta  <=  ||A - A_k||_F^2 / (rank + 1 - k)      for all unit x,

so ``||A^T A - B^T B||_2 <= ||A - A_k||_F^2 / (rank + 1 - k)`` (``A_k``: the best rank-``k`` approximation),
each eigenvalue of the sketch lies in ``[lambda_i - Delta, lambda_i]`` of the exact one, and an input stream
of rank at most ``rank`` is kept *exactly* (``Delta = 0``). (The usual statement, with a sketch of ``l`` rows
whose last one is zero, reads ``/(l - k)``; here ``l = rank + 1``.)

**Total mass.** The tail-energy rule needs ``trace(A^T A)``, which the sketch underestimates by at least
``(rank+1) * Delta``. The statistic therefore also keeps the exact trace (``sum ||x||^2`` and the row count,
scaled as the rows are), and :meth:`SketchStat.spectrum` spreads the mass the sketch lost evenly over the
directions it does not hold, so :class:`~gnsp_optim.subspace.TailEnergy` sees the right total and the right
tail (any spread gives the same tail sums); rules that read single eigenvalues
(:class:`~gnsp_optim.subspace.RelativeEigenvalue`) see an estimate.

**The tail-energy rule stays safe.** Since ``B^T B <= A^T A``, the sketch's tail after ``k`` directions,
``total - sum_{i<=k} lambda_i(B^T B)``, is never below the exact tail, so ``TailEnergy(rho)`` on the sketch
keeps at least as many directions as on the exact memory, and its kept basis ``U`` leaks at most ``rho`` of
the *exact* memory's mass: ``tr(U^T A^T A U) >= tr(U^T B^T B U) >= (1 - rho) total``. The only exception is a
*saturated* group (the rule wanted more than ``rank`` directions; :meth:`SketchSpectrum.ranks` flags it):
raise ``rank`` there. Both promises are property tests.

Normalisation as in :mod:`gnsp_optim.statistics`: ``"mean"`` divides a task's rows by ``sqrt(n)`` (exact,
from the row count); ``"sum"`` keeps them; ``"frobenius"`` scales each batch by ``||X^T X||_F^{-1/2}``
(computed exactly, ``O(n^2 d)`` without a ``d x d`` matrix; this mode upcasts each batch once) and the
task by its sketch's estimate of ``||X^T X||_F`` (within the bound above).

Cost: one shrink of a ``2 rank x (d+1)`` matrix per ``rank`` rows (the ``2 rank x 2 rank`` Gram matrix,
its eigendecomposition and one product: ``O(rank * d)`` flops per row, see :func:`fd_shrink`), against
``O(d^2)`` per row for the exact Gram matrix.

Example:
    >>> import torch
    >>> st = SketchStat("fc", dim=3, rank=2)
    >>> x = torch.randn(50, 2) @ torch.randn(2, 3)    # rank-2 inputs, 4 augmented columns: rank 3
    >>> st.update(x); st.fold()
    >>> exact = torch.cat([x, torch.ones(50, 1)], 1)
    >>> exact = exact.T @ exact / 50
    >>> bool(torch.linalg.matrix_norm(exact - st.dense_memory(True)[0], ord=2) <= st.error_bound(1)[0] + 1e-5)
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .projector import Projector
from .statistics import NORMALIZE_MODES

__all__ = ["SketchStat", "SketchMemory", "SketchSpectrum", "SketchReference", "fd_shrink", "frobenius_of_gram"]


def fd_shrink(rows: torch.Tensor, rank: int, method: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One frequent-directions shrink of ``rows`` (``(G, m, D)``) to at most ``rank`` rows per group.

    Returns ``(B, delta)``: ``B^T B = V max(S^2 - delta, 0) V^T`` with ``delta = s_{rank+1}^2`` (0 when
    ``rows`` has at most ``rank`` singular values), per group; ``B`` has ``min(rank, m, D)`` rows.

    ``method="gram"`` (default when ``m <= D``, the wide case): eigendecompose the small ``m x m`` Gram matrix
    ``R R^T = U S^2 U^T`` in float64 and return ``sqrt(max(1 - delta / s_i^2, 0)) u_i^T R`` for ``i <= rank``
    (equal to ``sqrt(s_i^2 - delta) v_i^T``, with factors <= 1: no division by small singular values); about
    4.6x faster than the SVD at ``512 x 3073`` on one CPU thread. ``method="svd"``: ``torch.linalg.svd`` of
    ``R`` (default when ``m > D``).

    Example:
        >>> b, delta = fd_shrink(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))[None], 2)
        >>> (b[0].T @ b[0]).diag().round(decimals=6).tolist(), delta.round(decimals=6).tolist()
        ([8.0, 3.0, 0.0], [1.0])
    """
    g, m, dim = rows.shape
    if method is None:
        method = "gram" if m <= dim else "svd"
    if method == "gram":
        if m <= rank:
            return rows.clone(), rows.new_zeros(g)
        r64 = rows.to(torch.float64)
        lam, u = torch.linalg.eigh(r64 @ r64.transpose(1, 2))
        lam, u = lam.flip(-1).clamp_min(0), u.flip(-1)
        delta = lam[:, rank]
        top = lam[:, :rank]
        factor = torch.where(top > 0, (1.0 - delta[:, None] / top.clamp_min(torch.finfo(torch.float64).tiny))
                             .clamp_min(0).sqrt(), torch.zeros_like(top))
        new = factor[..., None] * (u[:, :, :rank].transpose(1, 2) @ r64)
        return new.to(rows.dtype), delta.to(rows.dtype)
    if method != "svd":
        raise ValueError(f"method must be 'gram' or 'svd', got {method!r}")
    _, s, vh = torch.linalg.svd(rows, full_matrices=False)
    r = s.shape[-1]
    if r <= rank:
        return s[..., :, None] * vh, s.new_zeros(s.shape[0])
    delta = s[:, rank] ** 2
    kept = (s[:, :rank] ** 2 - delta[:, None]).clamp_min(0).sqrt()
    return kept[..., None] * vh[:, :rank], delta


def frobenius_of_gram(x: torch.Tensor, block: int = 1024) -> torch.Tensor:
    r"""``||X^T X||_F`` per group of ``x`` (``(G, n, d)``) without a ``d x d`` matrix: ``||X X^T||_F`` by row blocks.

    Example:
        >>> frobenius_of_gram(torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])).tolist()
        [18.357559204101562]
    """
    total = x.new_zeros(x.shape[0])
    for i in range(0, x.shape[1], block):
        total += torch.bmm(x[:, i:i + block], x.transpose(1, 2)).square().sum(dim=(1, 2))
    return total.sqrt()


@dataclass
class SketchSpectrum:
    """What a rank rule and a projector need from a (sketched) memory, per group.

    ``eigenvalues`` ``(G, r)`` descending and ``vectors`` ``(G, D, r)`` (orthonormal columns) of the sketch's
    ``B^T B``; ``total`` ``(G,)`` the exact trace of the memory it approximates; ``dim`` = ``D``.
    """

    eigenvalues: torch.Tensor
    vectors: torch.Tensor
    total: torch.Tensor
    dim: int

    @property
    def tail(self) -> torch.Tensor:
        """Mass the sketch does not hold: ``total - sum(eigenvalues)`` (>= 0), per group."""
        return (self.total - self.eigenvalues.to(self.total).sum(-1)).clamp_min(0)

    def padded(self) -> torch.Tensor:
        """A full-length ``(G, D)`` descending spectrum: the sketch's eigenvalues, then the tail spread evenly.

        Example:
            >>> s = SketchSpectrum(torch.tensor([[4.0, 1.0]]), torch.eye(4)[None, :, :2], torch.tensor([6.0]), 4)
            >>> s.padded().tolist()
            [[4.0, 1.0, 0.5, 0.5]]
        """
        lam = self.eigenvalues.to(torch.float64).clamp_min(0)
        g, r = lam.shape
        rest = self.dim - r
        fill = (self.tail.to(torch.float64) / max(rest, 1))[:, None].expand(g, rest)
        return torch.cat([lam, fill], dim=1)

    def ranks(self, rule, dtype: torch.dtype = torch.float64) -> tuple[list[int], list[bool]]:
        """``rule`` applied to :meth:`padded` (in ``dtype``), capped at the sketch's width; also which groups hit
        the cap.

        A capped (``saturated``) group wanted more directions than the sketch holds: raise ``rank``.
        ``dtype``: the dtype the rule sees the eigenvalues in; ``TailEnergy(0)``'s round-off floor is that
        dtype's (the optimizer passes the statistics' dtype, as the exact path's ``eigh`` does).
        """
        spec = self.padded().to(dtype)
        r = self.eigenvalues.shape[-1]
        want = [int(rule(spec[g])) for g in range(spec.shape[0])]
        return [min(k, r) for k in want], [k > r for k in want]

    def to_projector(self, rule, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None,
                     rule_dtype: torch.dtype = torch.float64) -> Projector:
        """The ``form="kept"`` projector of ``rule``'s occupied directions (basis ``(G, D, max k)``).

        Example:
            >>> s = SketchSpectrum(torch.tensor([[4.0, 1.0]]), torch.eye(3)[None, :, :2], torch.tensor([5.0]), 3)
            >>> from gnsp_optim.subspace import TailEnergy
            >>> s.to_projector(TailEnergy(0.3)).kept_ranks
            [1]
        """
        ranks, _ = self.ranks(rule, rule_dtype)
        width = max(ranks, default=0)
        basis = self.vectors.new_zeros(self.vectors.shape[0], self.dim, width)
        for g, k in enumerate(ranks):
            basis[g, :, :k] = self.vectors[g, :, :k]
        proj = Projector("kept", basis.to(device=device, dtype=dtype), ranks, self.dim)
        proj.eigenvalues = self.padded().cpu()
        return proj


@dataclass
class SketchMemory:
    """A sketch memory: ``rows`` ``(G, <= rank, D)`` with ``rows^T rows ~`` the exact memory, its exact mass
    ``(G, 2)`` (scaled ``sum ||x||^2``, scaled count), the certificate ``delta`` ``(G,)``; ``scale``: the
    factor of the task that was merged last (None for a stored memory)."""

    name: str
    dim: int
    rows: torch.Tensor
    mass: torch.Tensor
    delta: torch.Tensor
    scale: torch.Tensor | None

    def spectrum(self, with_bias: bool) -> SketchSpectrum:
        """Eigenpairs of ``rows^T rows`` (descending) and the exact total mass, per group; ``with_bias=False``
        restricts to the ``d`` weight inputs (drops the constant-1 column: the bound holds for that block too)."""
        b = self.rows if with_bias else self.rows[:, :, : self.dim]
        _, s, vh = torch.linalg.svd(b, full_matrices=False)
        total = self.mass[:, 0] + (self.mass[:, 1] if with_bias else 0.0)
        return SketchSpectrum(eigenvalues=(s**2).to(self.rows.dtype), vectors=vh.transpose(1, 2).contiguous(),
                              total=total.clone(), dim=b.shape[-1])

    def projector(self, rule, with_bias: bool, *, device: torch.device | None = None,
                  dtype: torch.dtype | None = None) -> Projector:
        """The ``form="kept"`` projector of ``rule`` on this memory; warns naming the layer when a group is
        saturated (the rule wanted more directions than the sketch holds: raise ``sketch_rank``)."""
        import warnings

        spec = self.spectrum(with_bias)
        ranks, saturated = spec.ranks(rule, self.rows.dtype)
        if any(saturated):
            warnings.warn(f"GNSP: layer {self.name!r}: the rank rule wants more directions than the sketch's "
                          f"{spec.eigenvalues.shape[-1]} rows hold; kept {ranks} per group, so the tail-energy "
                          "promise does not hold there (raise sketch_rank)", stacklevel=5)
        return spec.to_projector(rule, dtype=dtype, device=device, rule_dtype=self.rows.dtype)


class SketchStat:
    r"""Frequent-directions sketch of the ``[X | 1]`` stream of one layer input, for ``groups`` groups.

    The same life cycle as :class:`~gnsp_optim.statistics.CovarianceStat`: :meth:`update` during a collection,
    :meth:`all_reduce_` across processes, :meth:`fold` at the task boundary (or :meth:`clear_task`), then
    :meth:`spectrum` for the rank rule and the projector. ``rank`` is the number of sketch rows kept (memory
    ``groups * rank * (dim+1)`` between tasks, three times that while collecting).

    Example:
        >>> st = SketchStat("fc", dim=4, rank=3, normalize="sum")
        >>> st.update(torch.eye(4))
        >>> st.fold()
        >>> spec = st.spectrum(with_bias=False)
        >>> spec.eigenvalues.shape[-1], round(float(spec.total[0]), 6), st.memory_bytes() < 4 * 5 * 5 * 4
        (3, 4.0, True)
    """

    def __init__(self, name: str, dim: int, rank: int, groups: int = 1, dtype: torch.dtype = torch.float32,
                 normalize: str = "mean") -> None:
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"statistics accumulate in float32 or float64, got {dtype}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"{name}: sketch rank must be a positive int, got {rank!r}")
        self.name, self.dim, self.rank, self.groups = name, dim, rank, groups
        self.dtype, self.normalize = dtype, normalize
        self.row_fraction = 1.0  # as CovarianceStat (collect() sets these)
        self.generator: torch.Generator | None = None
        self.memory: torch.Tensor | None = None  # (G, <= rank, D) sketch of earlier tasks
        self.memory_mass = torch.zeros(groups, 2, dtype=torch.float64)  # exact (sum ||x||^2, count) scaled
        self.memory_delta = torch.zeros(groups, dtype=torch.float64)  # sum of shrinks in the memory (Delta)
        self.tasks_folded = 0
        #: per folded task, the factor its Gram matrix entered memory with (``frobenius``: an estimate)
        self.task_scales: list[torch.Tensor] = []
        self.clear_task()

    # ------------------------------------------------------------------ collection
    def clear_task(self) -> None:
        """Forget the current collection (the memory of earlier tasks is kept)."""
        self.buffer: torch.Tensor | None = None  # (G, 2 rank, D) working sketch of this task
        self.fill = [0] * self.groups  # rows of the buffer in use, per group
        self.task_mass = torch.zeros(self.groups, 2, dtype=torch.float64)
        self.task_delta = torch.zeros(self.groups, dtype=torch.float64)
        self.group_counts = [0] * self.groups  # rows per group (the "mean" divisor)
        self.task_count = 0
        self.task_batches = 0

    @property
    def seen(self) -> bool:
        """Whether any input reached this statistic during the current collection."""
        return self.task_batches > 0

    def task_is_finite(self) -> bool:
        """False when a NaN or Inf reached the current collection."""
        return self.buffer is None or bool(torch.isfinite(self.buffer).all() and torch.isfinite(self.task_mass).all())

    def _buf(self, device: torch.device) -> torch.Tensor:
        if self.buffer is None:
            self.buffer = torch.zeros(self.groups, 2 * self.rank, self.dim + 1, dtype=self.dtype, device=device)
        return self.buffer

    @torch.no_grad()
    def update(self, x: torch.Tensor, group: int | None = None, chunk_rows: int | None = None) -> None:
        """Add inputs ``x``: ``(n, d)`` (the same rows for every group, or for ``group`` alone) or ``(G, n, d)``.

        ``x`` may be bf16 / fp16: rows are upcast at most ``rank`` (or ``chunk_rows``) at a time, never the batch.
        """
        if x.dim() == 2:
            x = x.unsqueeze(0)
        if x.shape[-1] != self.dim or x.shape[0] not in (1, self.groups):
            raise ValueError(f"{self.name}: expected inputs (..., {self.dim}) for {self.groups} group(s), "
                             f"got {tuple(x.shape)}")
        x = x.detach()
        n = x.shape[1]
        if n == 0:
            return
        if self.row_fraction < 1.0:
            keep = max(1, math.ceil(n * self.row_fraction))
            idx = torch.randperm(n, generator=self.generator)[:keep].to(x.device)
            x, n = x[:, idx], keep
        if group is not None and not (x.shape[0] == 1 and 0 <= group < self.groups):
            raise ValueError(f"{self.name}: group={group!r} takes (n, d) rows for one of {self.groups} group(s)")
        groups = [group] if group is not None else list(range(self.groups))
        if x.shape[0] == 1 and len(groups) > 1:
            x = x.expand(len(groups), n, self.dim)
        with torch.autocast(device_type=x.device.type, enabled=False):
            scale = torch.ones(x.shape[0], dtype=self.dtype, device=x.device)
            if self.normalize == "frobenius":
                scale = frobenius_of_gram(x.to(self.dtype)).clamp_min(torch.finfo(self.dtype).tiny).reciprocal()
            self._add_mass(x, groups, scale)
            buf = self._buf(x.device)
            fills = {self.fill[g] for g in groups}
            if len(fills) == 1:  # all groups in step: one batched push
                self._push(buf, groups, x, scale.sqrt(), chunk_rows)
            else:
                for j, g in enumerate(groups):
                    self._push(buf, [g], x[j:j + 1], scale[j:j + 1].sqrt(), chunk_rows)
        self.task_count += n
        self.task_batches += 1

    def _add_mass(self, x: torch.Tensor, groups: list[int], scale: torch.Tensor) -> None:
        """The exact (scaled) ``sum ||x||^2`` and row count per group, upcasting 4096 rows at a time."""
        n = x.shape[1]
        sq = torch.stack([x[:, i:i + 4096].to(self.dtype).square().sum(dim=(1, 2))
                          for i in range(0, n, 4096)]).sum(0)
        for j, g in enumerate(groups):
            self.task_mass[g, 0] += float(scale[j]) * float(sq[j])
            self.task_mass[g, 1] += float(scale[j]) * n
            self.group_counts[g] += n

    def _push(self, buf: torch.Tensor, groups: list[int], x: torch.Tensor, row_scale: torch.Tensor,
              chunk_rows: int | None) -> None:
        gs = slice(groups[0], groups[-1] + 1)  # groups is [g] or all groups: a view, no copy
        block = buf[gs]
        n, d, cap = x.shape[1], self.dim, 2 * self.rank
        start = 0
        while start < n:
            fill = self.fill[groups[0]]
            take = min(n - start, cap - fill, chunk_rows or cap)
            block[:, fill:fill + take, :d] = x[:, start:start + take].to(self.dtype) * row_scale[:, None, None]
            block[:, fill:fill + take, d] = row_scale[:, None]
            fill += take
            start += take
            if fill == cap:
                new, delta = fd_shrink(block, self.rank)
                block.zero_()
                block[:, : new.shape[1]] = new
                fill = new.shape[1]
                self.task_delta[gs] += delta.to(torch.float64).cpu()
            for g in groups:
                self.fill[g] = fill

    def _task_rows(self) -> torch.Tensor:
        """The task's sketch rows ``(G, max fill, D)`` (rows past a group's fill are zero)."""
        assert self.buffer is not None
        return self.buffer[:, : max(self.fill)]

    # ------------------------------------------------------------------ distributed
    def all_reduce_(self) -> None:
        """Merge the current collection over all processes of the default group (all_gather, stack, shrink).

        Every rank ends with rank 0's merged sketch (broadcast), so all ranks build identical projectors.
        """
        import torch.distributed as dist

        device = self.buffer.device if self.buffer is not None else (
            self.memory.device if self.memory is not None else torch.device("cpu"))
        buf = self._buf(device)
        parts = [torch.empty_like(buf) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, buf.contiguous())
        g = self.groups
        scal = torch.cat([self.task_mass.flatten(), self.task_delta,
                          torch.tensor(self.group_counts + [self.task_count, self.task_batches],
                                       dtype=torch.float64)]).to(device)
        dist.all_reduce(scal)
        merged, delta = fd_shrink(torch.cat(parts, dim=1), self.rank)
        dist.broadcast(merged, src=0)  # SVDs agree across ranks in practice; make them agree bitwise
        dist.broadcast(delta, src=0)
        scal = scal.cpu()
        self.task_mass = scal[: 2 * g].view(g, 2).clone()
        self.task_delta = scal[2 * g: 3 * g].clone() + delta.to(torch.float64).cpu()
        self.group_counts = [int(v) for v in scal[3 * g: 4 * g]]
        self.task_count, self.task_batches = int(scal[4 * g]), int(scal[4 * g + 1])
        self.buffer = torch.zeros_like(buf)
        self.buffer[:, : merged.shape[1]] = merged
        self.fill = [merged.shape[1]] * g

    # ------------------------------------------------------------------ task boundary
    def _task_scale(self) -> torch.Tensor:
        """Per-group factor the task's Gram matrix (and mass) is multiplied by when it enters memory."""
        g = self.groups
        if self.normalize == "mean":
            return torch.tensor([1.0 / max(c, 1) for c in self.group_counts], dtype=torch.float64)
        if self.normalize == "frobenius":
            b = self._task_rows()[:, :, : self.dim].to(torch.float64)
            norm = torch.linalg.matrix_norm(b @ b.transpose(1, 2)).cpu()
            return norm.clamp_min(torch.finfo(self.dtype).tiny).reciprocal()
        return torch.ones(g, dtype=torch.float64)

    def task_contribution(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current collection normalised as ``normalize`` says: ``(sketch rows (G, m, D), mass (G, 2))``."""
        assert self.buffer is not None and self.task_count > 0
        s = self._task_scale()
        rows = self._task_rows() * s.sqrt().to(self.buffer)[:, None, None]
        return rows, self.task_mass * s[:, None]

    def merged_memory(self) -> SketchMemory:
        """The memory as it will be once the current collection is folded in (nothing changes)."""
        rows, mass = self.task_contribution()
        s = self._task_scale()
        stacked = rows if self.memory is None else torch.cat([self.memory.to(rows), rows], dim=1)
        merged, delta = fd_shrink(stacked, self.rank)
        return SketchMemory(self.name, self.dim, merged, self.memory_mass + mass,
                            self.memory_delta + self.task_delta * s + delta.to(torch.float64).cpu(), s)

    def stored_memory(self) -> SketchMemory | None:
        """The memory of the tasks folded so far (None before the first)."""
        if self.memory is None:
            return None
        return SketchMemory(self.name, self.dim, self.memory, self.memory_mass, self.memory_delta, None)

    def fold(self, merged: SketchMemory | None = None) -> None:
        """Merge the current collection into the memory of earlier tasks (stack, shrink) and clear it.

        ``merged``: :meth:`merged_memory`'s result when the caller already computed it (the optimizer builds
        every projector before it changes any memory).
        """
        if self.seen:
            m = self.merged_memory() if merged is None else merged
            self.memory, self.memory_mass, self.memory_delta = m.rows, m.mass, m.delta
            self.task_scales.append(m.scale)
            self.tasks_folded += 1
        self.clear_task()

    # ------------------------------------------------------------------ what the rule and projector read
    def spectrum(self, with_bias: bool) -> SketchSpectrum:
        """Eigenpairs of the memory's sketch (descending) and its exact total mass, for each group.

        ``with_bias=False`` restricts to the ``d`` weight inputs (drops the constant-1 column: the bound holds
        for that principal block too).
        """
        mem = self.stored_memory()
        if mem is None:
            raise ValueError(f"{self.name}: no task has been folded into this sketch yet")
        return mem.spectrum(with_bias)

    def error_bound(self, k: int) -> torch.Tensor:
        r"""The a-priori bound ``||A - A_k||_F^2 / (rank + 1 - k)`` on ``||A^T A - B^T B||_2`` per group, using
        the sketch's own ``||A - A_k||_F^2 <= total - sum of its top k eigenvalues`` (valid: the sketch's
        eigenvalues never exceed the exact ones). For ``k > rank`` the bound is infinite.

        The measured certificate :attr:`memory_delta` (``Delta``) is never larger.
        """
        if k > self.rank:
            return torch.full((self.groups,), math.inf, dtype=torch.float64)
        spec = self.spectrum(with_bias=True)
        top = spec.eigenvalues.to(torch.float64)[:, :k].sum(-1)
        return (spec.total - top).clamp_min(0) / (self.rank + 1 - k)

    def dense_memory(self, with_bias: bool) -> torch.Tensor:
        """``B^T B`` as a dense ``(G, D, D)`` matrix: for tests and small layers only (``O(d^2)``)."""
        if self.memory is None:
            raise ValueError(f"{self.name}: no task has been folded into this sketch yet")
        b = self.memory if with_bias else self.memory[:, :, : self.dim]
        return b.transpose(1, 2) @ b

    def task_probe(self, omega: torch.Tensor) -> torch.Tensor:
        """``C omega`` for the current task's mean covariance ``C`` (``B^T B / n``): ``(G, D, p)`` (convergence)."""
        assert self.buffer is not None
        b = self._task_rows()
        counts = torch.tensor([max(c, 1) for c in self.group_counts], dtype=b.dtype, device=b.device)
        return (b.transpose(1, 2) @ (b @ omega.to(b))) / counts[:, None, None]

    def memory_bytes(self) -> int:
        """Bytes held now (memory sketch plus the task buffer while collecting)."""
        total = 0
        for t in (self.memory, self.buffer):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """What a checkpoint needs (the memory of earlier tasks; a collection in progress is not saved)."""
        return {"kind": "frequent_directions", "dim": self.dim, "rank": self.rank, "groups": self.groups,
                "normalize": self.normalize, "memory": self.memory, "memory_mass": self.memory_mass.clone(),
                "memory_delta": self.memory_delta.clone(), "tasks_folded": self.tasks_folded}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; ``ValueError`` naming the layer on a mismatch."""
        mine = ("frequent_directions", self.dim, self.rank, self.groups)
        theirs = (state.get("kind"), state.get("dim"), state.get("rank"), state.get("groups"))
        if mine != theirs:
            raise ValueError(f"{self.name}: saved sketch (kind, dim, rank, groups) = {theirs}, this one {mine}")
        mem = state["memory"]
        self.memory = None if mem is None else mem.to(self.dtype).clone()
        self.memory_mass = state["memory_mass"].to(torch.float64).clone()
        self.memory_delta = state["memory_delta"].to(torch.float64).clone()
        self.tasks_folded = int(state["tasks_folded"])
        self.clear_task()


class SketchReference:
    r"""Slow, obvious twin of :class:`SketchStat`: the same frequent-directions schedule on dense matrices.

    Keeps ``M = B^T B`` as a ``(G, D, D)`` matrix and shrinks it as ``V max(Lambda - lambda_{rank+1}, 0) V^T``
    (an eigendecomposition instead of the SVD of ``B``), row by row as a sum of outer products. Same buffer
    schedule (a shrink whenever the buffer count reaches ``2 rank``), same normalisation; only
    ``normalize="mean"`` and ``"sum"``, one group of rows at a time. Equal to :class:`SketchStat` within
    round-off (tests/test_sketch.py): the shrink is a continuous spectral function of ``M``, so it does not
    depend on how ties between eigenvectors are broken.

    Example:
        >>> ref = SketchReference(dim=2, rank=1)
        >>> ref.update(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        >>> ref.fold()
        >>> int(torch.linalg.matrix_rank(ref.memory)), ref.memory_rows    # two rows shrunk to one
        (1, 1)
    """

    def __init__(self, dim: int, rank: int, normalize: str = "mean", dtype: torch.dtype = torch.float64):
        if normalize not in ("mean", "sum"):
            raise ValueError("the reference implements normalize='mean' and 'sum'")
        self.dim, self.rank, self.normalize, self.dtype = dim, rank, normalize, dtype
        self.memory: torch.Tensor | None = None
        self.memory_rows = 0  # rows the fast sketch's memory has
        self._new_task()

    def _new_task(self) -> None:
        self.task = torch.zeros(self.dim + 1, self.dim + 1, dtype=self.dtype)
        self.fill, self.count = 0, 0  # rows "in the buffer", as SketchStat counts them

    def _shrink(self, m: torch.Tensor, rows: int) -> tuple[torch.Tensor, int]:
        """Shrink a Gram matrix of a ``rows``-row sketch; returns it and the rows its shrunk sketch has."""
        lam, vec = torch.linalg.eigh(m)
        lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
        r = min(rows, m.shape[0])
        if r <= self.rank:
            return m, r
        lam = (lam - lam[self.rank]).clamp_min(0)
        lam[self.rank:] = 0.0
        return (vec * lam) @ vec.T, self.rank

    def update(self, x: torch.Tensor, chunk_rows: int | None = None) -> None:
        """Add rows ``x`` (``(n, d)``), in the chunks :class:`SketchStat` would take them."""
        x = x.to(self.dtype)
        xa = torch.cat([x, torch.ones(len(x), 1, dtype=self.dtype)], dim=1)
        cap, start = 2 * self.rank, 0
        while start < len(xa):
            take = min(len(xa) - start, cap - self.fill, chunk_rows or cap)
            rows = xa[start:start + take]
            for r in rows:  # row by row: the obvious sum of outer products
                self.task = self.task + torch.outer(r, r)
            self.fill += take
            start += take
            if self.fill == cap:
                self.task, self.fill = self._shrink(self.task, cap)
        self.count += len(xa)

    def fold(self) -> None:
        """Scale the task, stack it onto the memory, shrink."""
        if self.count == 0:
            return
        task = self.task / self.count if self.normalize == "mean" else self.task
        if self.memory is None:
            self.memory, self.memory_rows = self._shrink(task, self.fill)
        else:
            self.memory, self.memory_rows = self._shrink(self.memory + task, self.memory_rows + self.fill)
        self._new_task()
