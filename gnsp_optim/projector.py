r"""The projector as data, and how it applies to a layer's weight matrix.

For a weight ``W`` (``rows x d``) whose input ``x`` is ``d``-dimensional, an update ``dW`` leaves
``W x`` unchanged for every old input exactly when ``dW`` kills the occupied subspace. With an orthonormal
basis ``U`` (``d x k``) of that subspace and ``N`` (``d x (d-k)``) of its complement, the projection is

    ``dW P  =  dW - (dW U) U^T  =  (dW N) N^T``.

Both forms are exact; the cheaper one stores and multiplies by the smaller basis, so a projector keeps
``U`` when ``k <= d - k`` and ``N`` otherwise (memory ``d * min(k, d-k)``). A layer may have ``G`` groups
(grouped convolutions, the q/k/v rows of attention) with their own bases; bases of different width are
zero-padded, which changes neither form.

Data path, step 4-5 of 5 (hook -> statistics -> end_task -> rule + eigh -> **projector** -> step):
:func:`projector_from_memory` builds it at ``end_task``; :mod:`gnsp_optim.projection` applies it each step.

An input whose covariance is diagonal (an ``nn.Embedding``'s one-hot tokens: ``diag(counts)``) has the
coordinate axes as eigenvectors, so its projector is a mask (``form="diagonal"``: ``basis`` is ``(G, d, 1)``,
1 for a free coordinate, 0 for an occupied one), built by :func:`projector_from_counts` without an ``eigh``
and stored in ``d`` numbers instead of ``d * min(k, d-k)``.

A protected bias is the weight of a constant-1 input: the basis then has ``d + 1`` rows and the last one
belongs to the bias, so ``[dW | db]`` is projected as one matrix without ever concatenating it.

Example:
    >>> import torch
    >>> U = torch.eye(3)[:, :1].unsqueeze(0)            # occupied: the first input coordinate
    >>> proj = Projector.from_bases(kept=U, null=torch.eye(3)[:, 1:].unsqueeze(0), ranks=[1])
    >>> proj.apply(torch.ones(1, 2, 3))[0][0, 0].tolist()
    [0.0, 1.0, 1.0]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .naive import project_dense as project_reference  # noqa: F401  (its old name)
from .subspace import RankRule, eigh_descending

__all__ = ["Projector", "projector_from_memory", "projector_from_counts"]


@dataclass
class Projector:
    """Either the occupied basis (``form="kept"``) or the null basis (``form="null"``) of each group, or the
    free-coordinate mask (``form="diagonal"``, ``basis`` ``(G, d, 1)``) of a diagonal covariance.

    ``basis`` is ``(G, d, r)`` with orthonormal (or zero-padded) columns; ``kept_ranks[g]`` is the number of
    occupied directions of group ``g``; ``dim`` the input dimension ``d`` (bias column included when protected).
    """

    form: str
    basis: torch.Tensor
    kept_ranks: list[int]
    dim: int
    eigenvalues: torch.Tensor | None = None  # (G, d) descending, for reports; optional

    @classmethod
    def from_bases(cls, kept: torch.Tensor, null: torch.Tensor, ranks: list[int]) -> Projector:
        """Choose the cheaper of two equivalent bases (see the module docstring).

        ``kept`` and ``null`` are ``(G, d, *)``; group ``g`` uses the first ``ranks[g]`` columns of ``kept``
        and the first ``d - ranks[g]`` columns of ``null``.

        Example:
            >>> p = Projector.from_bases(torch.eye(4)[None, :, :3], torch.eye(4)[None, :, 3:], [3])
            >>> p.form, tuple(p.basis.shape)
            ('null', (1, 4, 1))
        """
        d = kept.shape[-2]
        width_kept = max(ranks, default=0)
        width_null = max((d - k for k in ranks), default=0)
        if width_kept <= width_null:
            form, src, widths = "kept", kept, list(ranks)
        else:
            form, src, widths = "null", null, [d - k for k in ranks]
        width = max(widths, default=0)
        basis = src.new_zeros(src.shape[0], d, width)
        for g, w in enumerate(widths):
            basis[g, :, :w] = src[g, :, :w]
        return cls(form=form, basis=basis.contiguous(), kept_ranks=list(ranks), dim=d)

    @classmethod
    def occupying_all(cls, dim: int, groups: int, *, device: torch.device | None = None,
                      dtype: torch.dtype | None = None) -> Projector:
        """Every direction occupied: the block is frozen (used for a block that saw no input).

        Example:
            >>> Projector.occupying_all(3, 2).is_zero
            True
        """
        eye = torch.eye(dim, dtype=dtype, device=device).expand(groups, dim, dim)
        return cls.from_bases(eye, eye[:, :, :0], [dim] * groups)

    @classmethod
    def diagonal(cls, free: torch.Tensor) -> Projector:
        """The mask projector of a diagonal covariance: ``free`` is ``(G, d)`` bool, True where no input lives.

        Example:
            >>> p = Projector.diagonal(torch.tensor([[True, False, True]]))
            >>> p.kept_ranks, p.apply(torch.ones(1, 1, 3))[0].tolist()
            ([1], [[[1.0, 0.0, 1.0]]])
        """
        ranks = [int((~f).sum()) for f in free]
        return cls(form="diagonal", basis=free.to(torch.get_default_dtype()).unsqueeze(-1).contiguous(),
                   kept_ranks=ranks, dim=free.shape[-1])

    @property
    def is_identity(self) -> bool:
        """Nothing is occupied: every update passes unchanged."""
        return all(k == 0 for k in self.kept_ranks)

    @property
    def is_zero(self) -> bool:
        """Everything is occupied: the layer is frozen."""
        return all(k == self.dim for k in self.kept_ranks)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored basis."""
        return self.basis.numel() * self.basis.element_size()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Projector:
        """A copy of the projector on another device / dtype (the ranks are unchanged)."""
        return Projector(self.form, self.basis.to(device=device, dtype=dtype), list(self.kept_ranks), self.dim,
                         self.eigenvalues)

    def apply(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Project ``[weight | bias]`` onto the null space; returns new tensors of the same shapes.

        ``weight`` is ``(G, rows, d_w)`` and ``bias`` ``(G, rows, 1)`` or None, with ``d_w (+1) == dim``.

        Example:
            >>> p = Projector.from_bases(torch.eye(2)[None, :, :1], torch.eye(2)[None, :, 1:], [1])
            >>> p.apply(torch.tensor([[[2.0, 3.0]]]))[0].tolist()
            [[[0.0, 3.0]]]
        """
        b_w, b_b = self._split(weight, bias)
        if self.form == "diagonal":
            return weight * b_w.transpose(1, 2), (None if bias is None else bias * b_b.transpose(1, 2))
        coef = torch.bmm(weight, b_w)
        if bias is not None:
            coef = coef + torch.bmm(bias, b_b)
        if self.form == "kept":
            new_w = weight - torch.bmm(coef, b_w.transpose(1, 2))
            new_b = None if bias is None else bias - torch.bmm(coef, b_b.transpose(1, 2))
        else:
            new_w = torch.bmm(coef, b_w.transpose(1, 2))
            new_b = None if bias is None else torch.bmm(coef, b_b.transpose(1, 2))
        return new_w, new_b

    def _split(self, weight: torch.Tensor,
               bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        basis = self.basis.to(weight.dtype)
        dw = weight.shape[-1]
        if dw + (0 if bias is None else 1) != self.dim:
            raise ValueError(f"projector of dimension {self.dim} cannot act on a weight with {dw} inputs"
                             f"{'' if bias is None else ' plus a bias'}")
        return basis[:, :dw, :], (None if bias is None else basis[:, dw:, :])

    def apply_(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """In-place :meth:`apply`: overwrite ``weight`` (and ``bias``) with their projection.

        Same shapes as :meth:`apply`; the tensors may be views (e.g. of a parameter's ``.grad``). No
        ``rows x d`` temporary is allocated: the second product accumulates straight into ``weight``.

        Example:
            >>> p = Projector.from_bases(torch.eye(2)[None, :, :1], torch.eye(2)[None, :, 1:], [1])
            >>> w = torch.tensor([[[2.0, 3.0]]])
            >>> p.apply_(w)
            >>> w.tolist()
            [[[0.0, 3.0]]]
        """
        b_w, b_b = self._split(weight, bias)
        if self.form == "diagonal":
            weight.mul_(b_w.transpose(1, 2))
            if bias is not None:
                bias.mul_(b_b.transpose(1, 2))
            return
        coef = torch.bmm(weight, b_w)
        if bias is not None:
            coef.baddbmm_(bias, b_b)
        keep = self.form == "kept"  # kept: W - (W U) U^T; null: (W N) N^T, overwriting W (beta=0)
        weight.baddbmm_(coef, b_w.transpose(1, 2), beta=1.0 if keep else 0.0, alpha=-1.0 if keep else 1.0)
        if bias is not None:
            bias.baddbmm_(coef, b_b.transpose(1, 2), beta=1.0 if keep else 0.0, alpha=-1.0 if keep else 1.0)


def projector_from_memory(memory: torch.Tensor, rule: RankRule, label: str, *,
                          device: torch.device | None = None, dtype: torch.dtype | None = None) -> Projector:
    """The projector of a block's memory ``(G, d, d)``: ``eigh``, the rule's rank per group, the cheaper basis.

    The eigendecomposition runs in the memory's dtype (:func:`~gnsp_optim.subspace.eigh_descending`, with its
    float64 retry); the projector is moved to ``device`` / ``dtype`` (the weight's) and keeps the eigenvalues
    (on the CPU) for reports. ``label`` names the layer in errors.

    Example:
        >>> from gnsp_optim.subspace import TailEnergy
        >>> mem = torch.diag(torch.tensor([4.0, 1.0, 0.0]))[None]
        >>> projector_from_memory(mem, TailEnergy(0.0), "demo").kept_ranks
        [2]
    """
    lam, vec = eigh_descending(memory, label=label)
    ranks = [int(rule(lam[g])) for g in range(lam.shape[0])]
    null = torch.stack([vec[g].roll(-ranks[g], dims=1) for g in range(lam.shape[0])])
    proj = Projector.from_bases(vec, null, ranks).to(device=device, dtype=dtype)
    proj.eigenvalues = lam.detach().cpu()
    return proj


def projector_from_counts(counts: torch.Tensor, rule: RankRule, *, device: torch.device | None = None,
                          dtype: torch.dtype | None = None) -> Projector:
    """The projector of a diagonal covariance ``diag(counts)`` (``(G, d)``): its eigenvalues are the counts
    and its eigenvectors the coordinate axes, so the rule's rank ``k`` occupies the ``k`` largest counts
    (ties: the lower index first) and the projector is a mask. Twin: :func:`gnsp_optim.naive.diagonal_projector_dense`.

    Example:
        >>> from gnsp_optim.subspace import TailEnergy
        >>> projector_from_counts(torch.tensor([[3.0, 0.0, 1.0]]), TailEnergy(0.0)).basis[0, :, 0].tolist()
        [0.0, 1.0, 0.0]
    """
    counts = counts.detach().to(torch.float64)
    lam, order = torch.sort(counts, dim=-1, descending=True, stable=True)
    free = torch.ones_like(counts, dtype=torch.bool)
    for g in range(counts.shape[0]):
        free[g, order[g, : int(rule(lam[g]))]] = False
    proj = Projector.diagonal(free).to(device=device, dtype=dtype)
    proj.eigenvalues = lam.cpu()
    return proj
