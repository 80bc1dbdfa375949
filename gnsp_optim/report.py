r"""What the protection looks like: one row per protected layer, and a readable table of them.

Example:
    >>> import torch
    >>> from gnsp_optim import NullSpaceOptimizer
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    >>> report_rows(opt.blocks, opt.projectors)[0]["kept_rank"] is None   # no task closed yet
    True
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from .kinds import Block
from .projector import Projector

__all__ = ["report_rows", "null_mass", "format_summary", "warn_newly_full"]


def null_mass(proj: Projector) -> float | None:
    """Share of the eigenvalue mass in the null directions (the tail after each group's kept rank).

    Example:
        >>> p = Projector.from_bases(torch.eye(2)[None], torch.eye(2)[None].roll(-1, 2), [1])
        >>> p.eigenvalues = torch.tensor([[3.0, 1.0]])
        >>> null_mass(p)
        0.25
    """
    if proj.eigenvalues is None:
        return None
    lam = proj.eigenvalues.to(torch.float64)
    tail = sum(float(lam[g, k:].sum()) for g, k in enumerate(proj.kept_ranks))
    total = float(lam.sum())
    return tail / total if total > 0 else 0.0


def report_rows(blocks: list[Block], projectors: dict[str, Projector]) -> list[dict[str, Any]]:
    """One row per block; ``input_dim`` is the projector's dimension (the bias column included), ``kept_rank``
    and ``null_dim`` count over all groups; projector fields are None before the block's first task."""
    rows = []
    for b in blocks:
        p = projectors.get(b.name)
        mem = b.stat.memory
        row: dict[str, Any] = {"layer": b.name, "params": [n for n, _ in b.params], "groups": b.groups,
                               "input_dim": b.projector_dim, "kept_rank": None, "null_dim": None,
                               "null_mass": None, "form": None, "projector_bytes": 0,
                               "memory_bytes": 0 if mem is None else mem.numel() * mem.element_size()}
        if p is not None:
            row["kept_rank"] = sum(p.kept_ranks)
            row["null_dim"] = b.groups * b.projector_dim - sum(p.kept_ranks)
            row["form"] = "frozen" if p.is_zero else ("free" if p.is_identity else p.form)
            row["projector_bytes"] = p.nbytes
            row["null_mass"] = null_mass(p)
        rows.append(row)
    return rows


def _cell(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def format_summary(rows: list[dict[str, Any]], title: str, frozen: list[str]) -> str:
    """The rows as a fixed-width table under ``title``, with the projectors' total size and the frozen names."""
    head = f"{'layer':<44} {'in':>6} {'kept':>6} {'null':>6} {'null mass':>9} {'form':>6} {'proj MB':>8}"
    lines = [title, head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['layer'][-44:]:<44} {r['input_dim'] * r['groups']:>6} {_cell(r['kept_rank']):>6} "
                     f"{_cell(r['null_dim']):>6} {_cell(r['null_mass'], '.2e'):>9} {_cell(r['form']):>6} "
                     f"{r['projector_bytes'] / 2**20:>8.2f}")
    total = sum(r["projector_bytes"] for r in rows)
    names = f" ({', '.join(frozen[:6])}{', ...' if len(frozen) > 6 else ''})" if frozen else ""
    lines.append(f"projectors: {total / 2**20:.2f} MB; frozen parameters: {len(frozen)}{names}")
    return "\n".join(lines)


def warn_newly_full(blocks: list[Block], before: dict[str, Projector], after: dict[str, Projector]) -> None:
    """One warning naming the blocks that became fully occupied (they saw input; unseen ones are named
    already), with the way out."""
    full = [b.name for b in blocks if b.stat.seen and after[b.name].is_zero
            and not (b.name in before and before[b.name].is_zero)]
    if full:
        warnings.warn(f"GNSP: layer(s) {full} are fully occupied by earlier tasks' inputs (null dimension 0): they "
                      "no longer train. Raise rho (e.g. rho=0.15 leaves the low-energy directions free) or give "
                      "the layer a wider input (e.g. a larger LoRA rank r)", UserWarning, stacklevel=3)
