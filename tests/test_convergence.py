"""The statistics pass that stops when converged (gnsp_optim.convergence).

Promises: it stops on stationary streams (well before the data runs out) and not while new directions keep
arriving; the "subspace" check equals its dense twin; the "covariance" check is the exact relative Frobenius
change when probes span the space; bad options raise naming the option.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gnsp_optim.convergence import ConvergenceMonitor, run_until_converged, window_leak_reference
from gnsp_optim.sketch import SketchStat
from gnsp_optim.statistics import CovarianceStat
from gnsp_optim.subspace import TailEnergy

F64 = torch.float64


def stationary(gen: torch.Generator, d: int, rank: int, alpha: float = 1.0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    scale = torch.arange(1, rank + 1, dtype=F64) ** (-alpha / 2)
    basis = q[:, :rank] * scale

    def batch(n: int) -> torch.Tensor:
        return torch.randn(n, rank, generator=gen, dtype=F64) @ basis.T

    return batch


def arriving(gen: torch.Generator, d: int, base_rank: int, new_until: int, per_batch_new: float = 2.0):
    """Batches of a stationary base plus, for batch t < new_until, rows on a fresh direction of their own.

    The fresh rows carry more than half of each batch's mass: above any tail budget rho, so the protected
    subspace must grow with them (arrivals under rho's budget rightly change nothing the rule keeps).
    """
    base = stationary(gen, d, base_rank, alpha=0.5)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    fresh = q[:, base_rank:]
    t = [0]

    def batch(n: int) -> torch.Tensor:
        x = base(n)
        if t[0] < new_until:
            x = torch.cat([x, per_batch_new * torch.randn(n, 1, generator=gen, dtype=F64) @ fresh[:, t[0]][None]])
        t[0] += 1
        return x

    return batch


@pytest.mark.parametrize("criterion", ["subspace", "covariance"])
@pytest.mark.parametrize("kind", ["exact", "sketch"])
def test_stops_on_a_stationary_stream_well_before_the_data_runs_out(criterion, kind):
    gen = torch.Generator().manual_seed(0)
    batch = stationary(gen, 24, 24, alpha=1.5)
    stat = CovarianceStat("fc", 24, dtype=F64) if kind == "exact" else SketchStat("fc", 24, 12, dtype=F64)
    mon = ConvergenceMonitor({"fc": stat}, every=5, tol=0.03, patience=2, criterion=criterion)

    def forward(x):
        stat.update(x)
        return len(x)

    out = run_until_converged((batch(64) for _ in range(400)), forward, mon)
    assert out["converged"] and not out["exhausted"]
    assert out["batches"] < 200, out
    assert out["samples"] == 64 * out["batches"]
    assert [h["converged"] for h in mon.history].count(True) == 1  # it says so once, at the last check


@pytest.mark.parametrize("kind", ["exact", "sketch"])
def test_does_not_stop_while_new_directions_keep_arriving(kind):
    gen = torch.Generator().manual_seed(1)
    new_until = 72
    batch = arriving(gen, 96, 4, new_until)
    stat = CovarianceStat("fc", 96, dtype=F64) if kind == "exact" else SketchStat("fc", 96, 90, dtype=F64)
    mon = ConvergenceMonitor({"fc": stat}, every=4, tol=0.05, patience=2, rule=TailEnergy(0.15))
    stopped = None
    for t in range(400):
        stat.update(batch(32))
        if mon.update(samples=32):
            stopped = t
            break
    assert stopped is not None and stopped >= new_until, (stopped, mon.history[-3:])
    before = [h["change"] for h in mon.history if h["batches"] <= new_until and h["change"] is not None]
    assert min(before) > 0.05  # every check during the arrivals saw the window leak


def test_a_running_mean_test_would_stop_early_on_the_same_stream():
    """Why "subspace" is the default: the mean covariance's relative change shrinks like 1/sqrt(t) regardless.

    Same stream, same tolerance: "covariance" stops while directions still arrive, "subspace" does not.
    """
    stops = {}
    for criterion in ("covariance", "subspace"):
        gen = torch.Generator().manual_seed(1)
        batch = arriving(gen, 96, 4, 72)
        stat = CovarianceStat("fc", 96, dtype=F64)
        mon = ConvergenceMonitor({"fc": stat}, every=4, tol=0.1, patience=2, criterion=criterion, probes=97)
        for _ in range(400):
            stat.update(batch(32))
            if mon.update(samples=32):
                break
        stops[criterion] = mon.batches - 1
    assert stops["covariance"] < 72 <= stops["subspace"], stops


@given(st.integers(3, 9), st.integers(1, 4), st.integers(0, 1000), st.floats(0.0, 0.5))
def test_subspace_check_equals_its_dense_twin(d, every, seed, rho):
    gen = torch.Generator().manual_seed(seed)
    batch = arriving(gen, d + 3, 2, 3) if seed % 2 else stationary(gen, d + 3, d + 3)
    stat = CovarianceStat("fc", d + 3, dtype=F64)
    mon = ConvergenceMonitor({"fc": stat}, every=every, tol=0.0, patience=100, rule=TailEnergy(rho))
    snapshots = []
    for _ in range(4 * every):
        stat.update(batch(5))
        mon.update(samples=5)
        if mon.batches % every == 0:
            snapshots.append(stat.task_sum[0].clone())
    changes = [h["change"] for h in mon.history]
    assert changes[0] is None
    twins = [window_leak_reference(a, b, TailEnergy(rho)) for a, b in zip(snapshots[:-1], snapshots[1:], strict=True)]
    assert len(twins) == len(changes) - 1
    for got, want in zip(changes[1:], twins, strict=True):
        assert got == pytest.approx(want, abs=1e-9)


def test_covariance_check_is_the_exact_relative_frobenius_change_with_spanning_probes():
    gen = torch.Generator().manual_seed(3)
    batch = stationary(gen, 6, 6)
    stat = CovarianceStat("fc", 6, dtype=F64)
    mon = ConvergenceMonitor({"fc": stat}, every=1, tol=0.0, criterion="covariance", probes=7)
    means = []
    for _ in range(4):
        stat.update(batch(10))
        mon.update(samples=10)
        means.append(stat.task_sum[0] / stat.task_sum[0, 6, 6])
    for h, a, b in zip(mon.history[1:], means[:-1], means[1:], strict=True):
        want = float(torch.linalg.matrix_norm(b - a) / torch.linalg.matrix_norm(b))
        assert h["change"] == pytest.approx(want, rel=1e-9)


def test_groups_and_several_layers_take_the_worst_and_min_samples_holds():
    gen = torch.Generator().manual_seed(4)
    batch = stationary(gen, 5, 5)
    a, b = CovarianceStat("a", 5, groups=3, dtype=F64), CovarianceStat("b", 5, dtype=F64)
    mon = ConvergenceMonitor({"a": a, "b": b}, every=2, tol=0.05, min_samples=10_000)
    for _ in range(60):
        x = batch(40)
        a.update(torch.stack([x, 2 * x, x[:, [1, 0, 2, 3, 4]]]))
        b.update(x)
        mon.update(samples=40)
    assert not mon.converged  # 2400 samples < min_samples
    assert {h["layer"] for h in mon.history if h["layer"]} <= {"a", "b"}


def test_bad_options_raise_naming_the_option():
    stat = {"fc": CovarianceStat("fc", 3)}
    with pytest.raises(ValueError, match="criterion"):
        ConvergenceMonitor(stat, criterion="angles")
    with pytest.raises(ValueError, match="every"):
        ConvergenceMonitor(stat, every=0)
    with pytest.raises(ValueError, match="patience"):
        ConvergenceMonitor(stat, patience=0)
    with pytest.raises(ValueError, match="tol"):
        ConvergenceMonitor(stat, tol=-1.0)
    with pytest.raises(ValueError, match="empty"):
        ConvergenceMonitor({})
