r"""From an input covariance to the subspace that earlier tasks occupy.

A protected layer's memory ``M`` is symmetric positive semi-definite (a sum of ``X^T X``). Its eigenvectors,
sorted by eigenvalue, split the input space into the *occupied* directions (large eigenvalues: the inputs of
earlier tasks live there) and the *null* directions (the tail). A **rank rule** decides how many leading
directions count as occupied; everything after them is where updates are allowed.

A rank rule is any callable ``rule(eigenvalues) -> k`` taking one group's eigenvalues in descending order
(clamped at zero, in the decomposition's dtype) and returning the number ``k`` of occupied directions,
``0 <= k <= len(eigenvalues)``. Data path, step 4 of 5 (hook -> statistics -> end_task -> **rule + eigh**
-> projector -> step): :func:`eigh_descending` decomposes a block's memory, the rule splits the spectrum, and
:func:`gnsp_optim.projector.projector_from_memory` turns the split into a :class:`~gnsp_optim.Projector`.

Example:
    >>> import torch
    >>> lam = torch.tensor([10.0, 5.0, 0.5, 0.0], dtype=torch.float64)
    >>> TailEnergy(0.15)(lam)   # tail mass 0.5/15.5 < 0.15 once two directions are kept
    2
    >>> FixedRank(3)(lam)
    3
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .naive import tail_energy_rank_loop as tail_energy_rank_reference  # noqa: F401  (its old name)

RankRule = Callable[[torch.Tensor], int]

__all__ = [
    "RankRule",
    "TailEnergy",
    "CumulativeEnergy",
    "RelativeEigenvalue",
    "FixedRank",
    "tail_energy_rank",
    "eigh_descending",
]


def tail_energy_rank(eigenvalues: torch.Tensor, rho: float) -> int:
    r"""GNSP's rule: the smallest ``k`` with ``sum(l[k:]) <= rho * sum(l)``.

    ``rho`` is the share of eigenvalue mass allowed to stay in the null space. ``rho = 0`` keeps every
    direction whose eigenvalue is not exactly zero (the exact null space); an all-zero spectrum gives ``k = 0``.

    Example:
        >>> tail_energy_rank(torch.tensor([3.0, 1.0, 0.0]), 0.3)
        1
    """
    lam = eigenvalues.detach().to(torch.float64).clamp_min(0).flatten()
    total = float(lam.sum())
    if total <= 0.0:
        return 0
    # tails[k] = sum(lam[k:]) for k = 0..d (tails[d] = 0), computed from the small end for accuracy
    tails = torch.cat([lam.flip(0).cumsum(0).flip(0), lam.new_zeros(1)])
    return int(torch.nonzero(tails <= rho * total)[0, 0])


@dataclass(frozen=True)
class TailEnergy:
    """Keep the fewest leading directions whose complement holds at most ``rho`` of the eigenvalue mass.

    GNSP's rule (default ``rho = 0.15``). ``rho = 0`` gives the numerical null space: eigenvalues under
    ``d * eps * largest`` (``eps`` of the eigenvalues' dtype, i.e. of the decomposition) count as zero.

    Example:
        >>> TailEnergy(0.15)(torch.tensor([10.0, 5.0, 0.5, 0.0]))
        2
        >>> TailEnergy(0.0)(torch.tensor([10.0, 5.0, 1e-7, 0.0]))   # 1e-7 is float32 round-off of 10
        2
    """

    rho: float = 0.15

    def __post_init__(self) -> None:
        if not (0.0 <= self.rho < 1.0):
            raise ValueError(f"rho must lie in [0, 1), got {self.rho!r}")

    def __call__(self, eigenvalues: torch.Tensor) -> int:
        if self.rho == 0.0 and eigenvalues.is_floating_point() and eigenvalues.numel():
            # rho = 0 asks for the null space itself: eigenvalues under the decomposition's round-off floor
            # (d * eps * largest, eps of the dtype the eigenvalues come in) are zero; any rho > 0 keeps every
            # eigenvalue and lets the tail mass decide
            floor = eigenvalues.numel() * torch.finfo(eigenvalues.dtype).eps * eigenvalues.max()
            eigenvalues = torch.where(eigenvalues <= floor, torch.zeros_like(eigenvalues), eigenvalues)
        return tail_energy_rank(eigenvalues, self.rho)


@dataclass(frozen=True)
class CumulativeEnergy:
    """Keep the fewest leading directions that hold at least ``keep`` of the eigenvalue mass (GPM's form).

    The same family as :class:`TailEnergy` with ``rho = 1 - keep``; offered under the name other papers use.

    Example:
        >>> CumulativeEnergy(0.9)(torch.tensor([10.0, 5.0, 0.5, 0.0]))
        2
    """

    keep: float = 0.97

    def __post_init__(self) -> None:
        if not (0.0 < self.keep <= 1.0):
            raise ValueError(f"keep must lie in (0, 1], got {self.keep!r}")

    def __call__(self, eigenvalues: torch.Tensor) -> int:
        return tail_energy_rank(eigenvalues, 1.0 - self.keep)


@dataclass(frozen=True)
class RelativeEigenvalue:
    """Count a direction as occupied when its eigenvalue exceeds ``eps`` times the largest (Adam-NSCL's form).

    Example:
        >>> RelativeEigenvalue(0.01)(torch.tensor([10.0, 5.0, 0.05, 0.0]))
        2
    """

    eps: float = 1e-3

    def __post_init__(self) -> None:
        if not (0.0 <= self.eps < 1.0):
            raise ValueError(f"eps must lie in [0, 1), got {self.eps!r}")

    def __call__(self, eigenvalues: torch.Tensor) -> int:
        lam = eigenvalues.detach().to(torch.float64).clamp_min(0).flatten()
        if lam.numel() == 0 or float(lam[0]) <= 0.0:
            return 0
        return int((lam > self.eps * lam[0]).sum())


@dataclass(frozen=True)
class FixedRank:
    """Always count the first ``rank`` directions as occupied (clipped to the input dimension).

    Example:
        >>> FixedRank(8)(torch.ones(4))
        4
    """

    rank: int

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank!r}")

    def __call__(self, eigenvalues: torch.Tensor) -> int:
        return min(self.rank, eigenvalues.numel())


def eigh_descending(matrix: torch.Tensor, label: str, dtype: torch.dtype | None = None):
    r"""Eigendecomposition of a (batch of) symmetric PSD matrices, eigenvalues sorted descending.

    Runs ``torch.linalg.eigh`` in ``dtype`` (default: the matrix's own, at least float32); if that fails to
    converge it retries in float64, and if that fails too it raises a ``RuntimeError`` naming ``label``.
    Non-finite input is refused up front with a ``ValueError`` naming ``label``. Eigenvalues are clamped at 0.

    Returns ``(eigenvalues, eigenvectors)`` shaped ``(..., d)`` and ``(..., d, d)``, columns are eigenvectors.

    Example:
        >>> lam, vec = eigh_descending(torch.diag(torch.tensor([1.0, 3.0])), "demo")
        >>> lam.tolist()
        [3.0, 1.0]
    """
    if not torch.isfinite(matrix).all():
        raise ValueError(f"{label}: the input covariance contains NaN or Inf; cannot build a projector")
    if dtype is None:
        dtype = torch.promote_types(matrix.dtype, torch.float32)
    sym = 0.5 * (matrix + matrix.transpose(-1, -2))
    try:
        lam, vec = torch.linalg.eigh(sym.to(dtype))
        if not (torch.isfinite(lam).all() and torch.isfinite(vec).all()):
            raise torch.linalg.LinAlgError("non-finite eigendecomposition")
    except (RuntimeError, torch.linalg.LinAlgError):
        try:
            lam, vec = torch.linalg.eigh(sym.to(torch.float64))
            lam, vec = lam.to(dtype), vec.to(dtype)
        except (RuntimeError, torch.linalg.LinAlgError) as err:
            raise RuntimeError(f"{label}: eigh failed in {dtype} and in float64: {err}") from err
    return lam.flip(-1).clamp_min(0), vec.flip(-1)
