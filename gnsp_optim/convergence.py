r"""When has a statistics pass seen enough? A cheap test on the running statistics, checked every N batches.

GNSP's per-task cost is dominated by one forward over the whole finished task. :class:`ConvergenceMonitor`
watches the protected layers' statistics while :meth:`~gnsp_optim.NullSpaceOptimizer.collect` is open and
says when more data would no longer change what gets protected. Two criteria:

``criterion="subspace"`` (default): **window leak.** At each check the monitor builds every layer's kept basis
``U`` (the rank rule on the running statistic, as ``end_task`` would) and remembers two scalars. At the next
check it asks how much of the mass that arrived *in between* (the window ``W = S_now - S_prev`` of the
accumulated sums, never materialised) falls outside ``span(U)``, against how much of the running statistic
itself did::

    excess = (1 - tr(U^T W U) / tr(W))  -  (1 - tr(U^T S_prev U) / tr(S_prev))

On a stationary stream the window looks like the past, so ``excess`` only fluctuates around 0; while new
directions keep arriving, the window's mass lies outside the old basis and ``excess`` stays near the new
mass's share, however long the stream has run (a test on the running *mean* would not see this: new data's
weight in the mean falls like ``1/t``). The pass has converged when ``max(excess) <= tol`` over all layers
and groups for ``patience`` checks in a row. Cost per check and layer: one eigendecomposition (``d^3`` for an
exact statistic, an SVD of ``2 rank x d`` for a :class:`~gnsp_optim.sketch.SketchStat`) and one ``d^2 k``
product; memory: the ``d x k`` basis.

``criterion="covariance"``: **relative change of the mean covariance**, ``||C_now - C_prev||_F / ||C_now||_F``,
estimated through ``probes`` fixed orthonormal random directions ``Omega`` (``||(C_now - C_prev) Omega||_F /
||C_now Omega||_F``; exact when ``probes >= d+1``): ``d^2 probes`` flops and ``d probes`` memory per check, no
eigendecomposition. Cheaper, but it can stop while rare new directions still trickle in (their weight in the
mean shrinks as the pass goes on); prefer ``"subspace"`` where an eigendecomposition per check is affordable.

Both read :class:`~gnsp_optim.statistics.CovarianceStat` (``task_sum``, ``task_count``) and
:class:`~gnsp_optim.sketch.SketchStat` without changing them.

Example:
    >>> import torch
    >>> from gnsp_optim.statistics import CovarianceStat
    >>> st = CovarianceStat("fc", dim=4, dtype=torch.float64)
    >>> mon = ConvergenceMonitor({"fc": st}, every=2, tol=0.05, patience=2)
    >>> basis = torch.randn(2, 4, dtype=torch.float64)          # a stationary stream on a 2-d subspace
    >>> for i in range(100):
    ...     st.update(torch.randn(32, 2, dtype=torch.float64) @ basis)
    ...     if mon.update(samples=32):
    ...         break
    >>> mon.converged, mon.samples < 100 * 32
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .statistics import CovarianceStat
from .subspace import RankRule, TailEnergy, eigh_descending

__all__ = ["ConvergenceMonitor", "run_until_converged", "window_leak_reference", "CRITERIA"]

CRITERIA = ("subspace", "covariance")


def _sums(stat) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(task sums (G, D, D) or None, trace (G,))`` of a CovarianceStat, in float64."""
    s = stat.task_sum
    if s is None:
        return None, torch.zeros(stat.groups, dtype=torch.float64)
    return s, torch.diagonal(s, dim1=-2, dim2=-1).sum(-1).to(torch.float64).cpu()


def _kept_basis(stat, rule: RankRule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U (G, D, k) zero-padded, tr(U^T S U) (G,), tr(S) (G,))`` of the running statistic's task sums."""
    if isinstance(stat, CovarianceStat):
        s, trace = _sums(stat)
        if s is None:
            raise ValueError(f"{stat.name}: nothing collected yet")
        lam, vec = eigh_descending(s.to(torch.float64), label=stat.name)
        ranks = [int(rule(lam[g])) for g in range(lam.shape[0])]
        width = max(ranks, default=0)
        u = torch.zeros(*vec.shape[:2], width, dtype=vec.dtype, device=vec.device)
        for g, k in enumerate(ranks):
            u[g, :, :k] = vec[g, :, :k]
        inside = _captured(stat, u)
        return u, inside, trace
    # SketchStat: the task's sketch rows B (B^T B ~ S, exact trace kept separately)
    from .sketch import SketchSpectrum

    b = stat._task_rows().to(torch.float64)
    _, sv, vh = torch.linalg.svd(b, full_matrices=False)
    trace = stat.task_mass.sum(-1)
    spec = SketchSpectrum(sv**2, vh.transpose(1, 2), trace, b.shape[-1])
    ranks, _ = spec.ranks(rule)
    width = max(ranks, default=0)
    u = torch.zeros(b.shape[0], b.shape[-1], width, dtype=torch.float64, device=b.device)
    for g, k in enumerate(ranks):
        u[g, :, :k] = spec.vectors[g, :, :k]
    return u, _captured(stat, u), trace


def _captured(stat, u: torch.Tensor) -> torch.Tensor:
    """``tr(U^T S U)`` per group for the statistic's current task sums (sketch: ``||B U||_F^2``)."""
    if isinstance(stat, CovarianceStat):
        s, _ = _sums(stat)
        if s is None:
            return torch.zeros(u.shape[0], dtype=torch.float64)
        su = torch.bmm(s.to(torch.float64), u.to(s.device))
        return (su * u.to(s.device)).sum(dim=(1, 2)).cpu()
    b = stat._task_rows().to(torch.float64)
    return torch.bmm(b, u.to(b.device)).square().sum(dim=(1, 2)).cpu()


def _probe(stat, omega: torch.Tensor) -> torch.Tensor:
    """``C omega`` for the current task's mean covariance ``C``: ``(G, D, p)`` float64."""
    if isinstance(stat, CovarianceStat):
        s = stat.task_sum
        if s is None:
            return torch.zeros(stat.groups, omega.shape[0], omega.shape[1], dtype=torch.float64)
        d = stat.dim
        counts = s[:, d, d].to(torch.float64).clamp_min(1.0).cpu()  # rows per group (the constant-1 entry)
        return torch.matmul(s.to(torch.float64), omega.to(s.device)).cpu() / counts[:, None, None]
    return stat.task_probe(omega).to(torch.float64).cpu()


class ConvergenceMonitor:
    r"""Decide during a statistics pass when the protected subspaces have stopped changing.

    Call :meth:`update` once after each batch's forward pass; it checks every ``every`` batches and returns
    True once the pass has converged (then stop feeding batches and call ``end_task``). ``samples`` and
    ``batches`` count what was used; ``history`` holds one row per check.

    Args:
        stats: ``{name: statistic}`` (``CovarianceStat`` or ``SketchStat``), e.g. ``{b.name: b.stat for b in
            opt.blocks}``.
        every: batches between checks.
        tol: the largest change (``excess`` or relative change, see the module docstring) that counts as none.
        patience: consecutive quiet checks needed.
        criterion: ``"subspace"`` or ``"covariance"``.
        rule: the rank rule that builds the kept basis (``"subspace"``); default ``TailEnergy(0.15)``: give
            the optimizer's own rule.
        probes: random directions of the ``"covariance"`` estimate.
        min_samples: never stop before this many samples.
        seed: seeds the probe directions.
        sync: take the largest change over all ``torch.distributed`` ranks at each check (one scalar
            all-reduce every ``every`` batches) so every rank stops at the same batch; ``None``: when a process
            group with more than one rank is initialised. Every rank must then call :meth:`update` equally often.

    Example:
        >>> from gnsp_optim.statistics import CovarianceStat
        >>> mon = ConvergenceMonitor({"fc": CovarianceStat("fc", 3)}, every=4)
        >>> mon.update(samples=8), mon.batches, mon.samples
        (False, 1, 8)
    """

    def __init__(self, stats: Mapping[str, Any], *, every: int = 10, tol: float = 0.02, patience: int = 2,
                 criterion: str = "subspace", rule: RankRule | None = None, probes: int = 16,
                 min_samples: int = 0, seed: int = 0, sync: bool | None = None) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        for name, value in (("every", every), ("patience", patience), ("probes", probes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not tol >= 0:
            raise ValueError(f"tol must be >= 0, got {tol!r}")
        if not stats:
            raise ValueError("stats is empty: nothing to watch")
        self.stats = dict(stats)
        self.every, self.tol, self.patience, self.criterion = every, float(tol), patience, criterion
        self.rule = rule if rule is not None else TailEnergy(0.15)
        self.probes, self.min_samples, self.sync = probes, int(min_samples), sync
        self.generator = torch.Generator().manual_seed(seed)
        self.batches = 0
        self.samples = 0
        self.quiet = 0
        self.converged = False
        self.history: list[dict[str, Any]] = []
        self._prev: dict[str, Any] = {}
        self._omega: dict[int, torch.Tensor] = {}

    def update(self, samples: int = 0) -> bool:
        """Count one batch of ``samples`` rows; check every ``every`` batches; True once converged."""
        self.batches += 1
        self.samples += int(samples)
        if self.converged:
            return True
        if self.batches % self.every:
            return False
        change, worst = self._check()
        change = self._synced(change)
        quiet = change is not None and change <= self.tol
        self.quiet = self.quiet + 1 if quiet else 0
        self.converged = self.quiet >= self.patience and self.samples >= self.min_samples
        self.history.append({"batches": self.batches, "samples": self.samples, "change": change,
                             "layer": worst, "converged": self.converged})
        return self.converged

    def _synced(self, change: float | None) -> float | None:
        import torch.distributed as dist

        sync = self.sync
        if sync is None:
            sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not sync:
            return change
        t = torch.tensor([float("inf") if change is None else change], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return None if t.item() == float("inf") else t.item()

    def _check(self) -> tuple[float | None, str | None]:
        changes: dict[str, float] = {}
        for name, stat in self.stats.items():
            if not stat.seen:
                continue
            value = self._subspace(name, stat) if self.criterion == "subspace" else self._covariance(name, stat)
            if value is not None:
                changes[name] = value
        if not changes or len(changes) < sum(1 for s in self.stats.values() if s.seen):
            return None, None  # some layer had no previous check yet: not comparable
        worst = max(changes, key=changes.get)
        return changes[worst], worst

    def _subspace(self, name: str, stat) -> float | None:
        prev = self._prev.get(name)
        change = None
        if prev is not None:
            u, inside_prev, trace_prev = prev
            inside_now = _captured(stat, u)
            trace_now = _trace(stat)
            window = (trace_now - trace_prev).clamp_min(torch.finfo(torch.float64).tiny)
            leak_window = 1.0 - (inside_now - inside_prev) / window
            leak_prev = 1.0 - inside_prev / trace_prev.clamp_min(torch.finfo(torch.float64).tiny)
            change = float((leak_window - leak_prev).max())
        self._prev[name] = _kept_basis(stat, self.rule)
        return change

    def _covariance(self, name: str, stat) -> float | None:
        dim = stat.dim + 1
        if dim not in self._omega:
            p = min(self.probes, dim)
            g = torch.randn(dim, p, generator=self.generator, dtype=torch.float64)
            self._omega[dim] = torch.linalg.qr(g)[0]  # orthonormal probes: exact when p = dim
        y = _probe(stat, self._omega[dim])
        prev = self._prev.get(name)
        self._prev[name] = y
        if prev is None:
            return None
        num = torch.linalg.vector_norm(y - prev, dim=(1, 2))
        den = torch.linalg.vector_norm(y, dim=(1, 2)).clamp_min(torch.finfo(torch.float64).tiny)
        return float((num / den).max())

    def report(self) -> dict[str, Any]:
        """Samples and batches used, whether the pass converged, and the last check's change."""
        last = self.history[-1] if self.history else {}
        return {"converged": self.converged, "samples": self.samples, "batches": self.batches,
                "checks": len(self.history), "last_change": last.get("change"), "criterion": self.criterion}


def _trace(stat) -> torch.Tensor:
    if isinstance(stat, CovarianceStat):
        return _sums(stat)[1]
    return stat.task_mass.sum(-1).clone()


def run_until_converged(batches: Iterable, forward: Callable[[Any], int], monitor: ConvergenceMonitor,
                        progress: bool = False) -> dict[str, Any]:
    """Feed ``batches`` to ``forward`` (which returns the batch's sample count) until ``monitor`` converges.

    The loop ``collect()`` would run (``forward`` calls the model inside ``opt.collect()``); returns
    :meth:`ConvergenceMonitor.report` plus ``"exhausted"`` (the data ran out first). ``progress`` shows a
    tqdm bar when tqdm is installed.

    Example:
        >>> from gnsp_optim.statistics import CovarianceStat
        >>> st = CovarianceStat("fc", 2, dtype=torch.float64)
        >>> mon = ConvergenceMonitor({"fc": st}, every=1, tol=1.0, patience=1)
        >>> def forward(x):
        ...     st.update(x)
        ...     return len(x)
        >>> out = run_until_converged([torch.randn(4, 2, dtype=torch.float64)] * 10, forward, mon)
        >>> out["converged"], out["batches"], out["exhausted"]
        (True, 2, False)
    """
    it = batches
    if progress:
        try:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc="collect", unit="batch")
        except ImportError:  # pragma: no cover - optional extra
            pass
    exhausted = True
    for batch in it:
        if monitor.update(samples=int(forward(batch))):
            exhausted = False
            break
    out = monitor.report()
    out["exhausted"] = exhausted
    return out


def window_leak_reference(sum_prev: torch.Tensor, sum_now: torch.Tensor, rule: RankRule) -> float:
    """Slow, obvious twin of the ``"subspace"`` check for one group: dense window, dense projector.

    ``sum_prev`` / ``sum_now``: the accumulated ``(D, D)`` sums at the previous and the current check.

    Example:
        >>> s0 = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
        >>> s1 = s0 + torch.diag(torch.tensor([0.0, 0.0, 5.0], dtype=torch.float64))  # a new direction
        >>> round(window_leak_reference(s0, s1, TailEnergy(0.25)), 3)   # all new mass leaks; old leak 1/5
        0.8
    """
    lam, vec = torch.linalg.eigh(sum_prev.to(torch.float64))
    lam, vec = lam.flip(0).clamp_min(0), vec.flip(1)
    k = int(rule(lam))
    u = vec[:, :k]
    outside = torch.eye(len(u), dtype=torch.float64) - u @ u.T
    window = sum_now.to(torch.float64) - sum_prev.to(torch.float64)
    leak_window = float(torch.trace(outside @ window) / torch.trace(window))
    leak_prev = float(torch.trace(outside @ sum_prev.to(torch.float64)) / torch.trace(sum_prev.to(torch.float64)))
    return leak_window - leak_prev
