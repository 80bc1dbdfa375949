"""The issue-14 options of NullSpaceOptimizer in one process, through public calls only.

- ``statistics="sketch"``: with enough sketch rows the projector equals the exact statistic's (its twin) and
  old outputs stay put; with too few the rule is capped and the layer is warned about by name; memory, the
  width threshold, checkpoints and the refusal to load the other kind;
- ``collect(stop_when_converged=...)`` / ``collect_until_converged``: stops early on a stationary stream,
  reports the samples used, and protects what the full pass would;
- ``stats_chunk_rows``: bf16 inputs upcast in chunks equal the one-copy twin within float32 summation error.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import low_rank_inputs, mlp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gnsp_optim import NullSpaceOptimizer
from gnsp_optim.statistics import CovarianceStat

F64 = torch.float64


def dense(proj) -> torch.Tensor:
    """The projector as a dense ``(G, d, d)`` matrix from its stored basis."""
    b = proj.basis.to(F64)
    outer = b @ b.transpose(1, 2)
    return torch.eye(proj.dim, dtype=F64) - outer if proj.form == "kept" else outer


def make(model: nn.Module, **kw) -> NullSpaceOptimizer:
    return NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), model,
                              rho=0.0, mode="update", **kw)


def steps(opt: NullSpaceOptimizer, model: nn.Module, dim: int, n: int = 4) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(n):
        opt.zero_grad()
        model(torch.randn(16, dim, generator=g, dtype=F64)).square().mean().backward()
        opt.step()


# ---------------------------------------------------------------------------------------- sketch
@settings(max_examples=12, deadline=None)
@given(width=st.integers(4, 24), hidden=st.integers(3, 20), rank=st.integers(1, 4), batches=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_a_sketch_with_enough_rows_gives_the_exact_projector(width, hidden, rank, batches, seed):
    """Inputs of rank <= sketch_rank (the bias column and the hidden layer's included): the sketch keeps them
    exactly (``Delta = 0``), so the rho = 0 projector keeps the exact statistic's ranks and leaves none of the
    exact memory's mass (the twin: ``statistics="exact"``), and old outputs stay. (Projectors are compared
    through the memory: directions with eigenvalues near the round-off floor rotate by ~1e-8 between an
    ``eigh`` of the Gram matrix and an SVD of the sketch rows, which moves nothing the memory holds.)"""
    g = torch.Generator().manual_seed(seed)
    old = low_rank_inputs(6 * batches, width, rank, gen=g)
    projs, ranks, memory = {}, {}, {}
    for stats in ("exact", "sketch"):
        torch.manual_seed(seed)
        model = mlp([width, hidden, 2])
        opt = make(model, statistics=stats, sketch_rank=6 * batches + 2, sketch_min_width=0)
        with opt.collect(), torch.no_grad():
            for x in old.split(6):
                model(x)
            before = model(old)
        opt.end_task()
        projs[stats] = {n: dense(p) for n, p in opt.projectors.items()}
        ranks[stats] = {n: p.kept_ranks for n, p in opt.projectors.items()}
        if stats == "exact":
            memory = {b.name: b.stat.memory[:, : b.projector_dim, : b.projector_dim] for b in opt.blocks}
        steps(opt, model, width)
        with torch.no_grad():  # the rho = 0 floor (d eps max) counts tanh's fast-decaying spectrum's tail as
            # null, moving outputs by up to ~sqrt(floor) |dW| on either path (measured up to 9e-9)
            drift = float((model(old) - before).abs().max())
            assert drift < 1e-7, (stats, drift)
    assert {type(b.stat).__name__ for b in opt.blocks} == {"SketchStat"}
    assert ranks["sketch"] == ranks["exact"]
    for name, mem in memory.items():
        p = projs["sketch"][name]
        leak = torch.einsum("gij,gjk,gki->", p, mem, p) / torch.einsum("gii->", mem)
        assert leak < 1e-12, (name, float(leak))


def test_a_saturated_sketch_is_named_in_a_warning_and_memory_stays_bounded():
    torch.manual_seed(0)
    model = mlp([30, 8, 2])
    opt = make(model, statistics="sketch", sketch_rank=5, sketch_min_width=20)  # "2" (d+1 = 9) stays exact
    assert [type(b.stat).__name__ for b in opt.blocks] == ["SketchStat", "CovarianceStat"]
    with opt.collect(), torch.no_grad():
        model(torch.randn(64, 30, dtype=F64))  # full-rank inputs: the rule wants 31 directions
    with pytest.warns(UserWarning, match=r"layer '0': the rank rule wants more directions than the sketch's 5"):
        opt.end_task()
    rows = {r["layer"]: r for r in opt.report()}
    assert rows["0"]["kept_rank"] == 5
    assert rows["0"]["memory_bytes"] == 5 * 31 * 8 < 31 * 31 * 8  # rank x (d+1) float64, not (d+1)^2
    assert rows["2"]["memory_bytes"] == 9 * 9 * 8


def test_sketch_checkpoints_round_trip_and_refuse_the_other_kind():
    torch.manual_seed(0)
    model = mlp([10, 6, 2])
    opt = make(model, statistics="sketch", sketch_rank=8, sketch_min_width=0)
    with opt.collect(), torch.no_grad():
        model(low_rank_inputs(20, 10, 3))
    opt.end_task()
    sd = opt.state_dict()
    assert sd["gnsp"]["blocks"]["0"]["memory"] is None and sd["gnsp"]["blocks"]["0"]["sketch"]["rank"] == 8
    other = make(model, statistics="sketch", sketch_rank=8, sketch_min_width=0)
    other.load_state_dict(sd)
    for b, c in zip(opt.blocks, other.blocks, strict=True):
        assert torch.equal(b.stat.memory, c.stat.memory) and b.stat.tasks_folded == c.stat.tasks_folded == 1
    with pytest.raises(ValueError, match=r"layer '0': saved with statistics='sketch', this optimizer keeps "
                                         r"statistics='exact'"):
        make(model).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"layer '0': saved sketch .* \(sketch_rank= differs\?\)"):
        make(model, statistics="sketch", sketch_rank=4, sketch_min_width=0).load_state_dict(sd)


@pytest.mark.parametrize(("kw", "match"), [
    (dict(statistics="dense"), "statistics must be one of"),
    (dict(sketch_rank=0), "sketch_rank must be an int >= 1"),
    (dict(sketch_min_width=-1), "sketch_min_width must be an int >= 0"),
    (dict(stats_chunk_rows=0), "stats_chunk_rows must be a positive int or None"),
])
def test_bad_statistics_options_name_the_parameter(kw, match):
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match=match):
        NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, **kw)


# ---------------------------------------------------------------------------------------- converging pass
def stream(n_batches: int, seed: int = 0) -> list[torch.Tensor]:
    """A stationary stream on a fixed 3-dimensional subspace of R^12."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(3, 12, generator=g, dtype=F64)
    return [torch.randn(32, 3, generator=g, dtype=F64) @ basis for _ in range(n_batches)]


def test_collect_stops_when_converged_reports_samples_and_protects_like_the_full_pass():
    data = stream(60)
    torch.manual_seed(0)
    full_model = nn.Linear(12, 4).double()
    stop_model = nn.Linear(12, 4).double()
    stop_model.load_state_dict(full_model.state_dict())
    full, stop = make(full_model), make(stop_model)
    with full.collect(), torch.no_grad():  # the default: a full pass, no monitor
        for x in data:
            full_model(x)
            assert not full.collection_converged(len(x))
    assert full.convergence is None
    used = 0
    with stop.collect(stop_when_converged={"every": 2, "tol": 0.02}), torch.no_grad():
        for x in data:
            stop_model(x)
            used += len(x)
            if stop.collection_converged(len(x)):
                break
    report = stop.convergence.report()
    assert report["converged"] and report["samples"] == used < 60 * 32
    assert report["batches"] == used // 32 and report["criterion"] == "subspace"
    full.end_task()
    stop.end_task()
    assert (dense(stop.projectors[""]) - dense(full.projectors[""])).abs().max() < 1e-9
    with torch.no_grad():
        before = stop_model(torch.cat(data))
    steps(stop, stop_model, 12)
    with torch.no_grad():  # the rows the stopped pass never saw are protected too (the same subspace)
        assert (stop_model(torch.cat(data)) - before).abs().max() < 1e-9


def test_collect_until_converged_runs_the_loop_and_says_when_data_ran_out():
    model = nn.Linear(12, 4).double()
    opt = make(model)
    out = opt.collect_until_converged(stream(60), lambda x: len(model(x)), every=2, tol=0.02)
    assert out["converged"] and not out["exhausted"] and out["samples"] < 60 * 32
    assert torch.is_grad_enabled()  # grad mode restored after the no_grad pass
    opt.end_task()
    out = opt.collect_until_converged(stream(3, seed=1), lambda x: len(model(x)), every=2, tol=0.0)
    assert out["exhausted"] and not out["converged"] and out["samples"] == 3 * 32
    opt.discard_collection()


def test_collection_converged_needs_an_open_collection_and_options_are_checked():
    model = nn.Linear(3, 2)
    opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    with pytest.raises(RuntimeError, match="inside collect"):
        opt.collection_converged(4)
    with pytest.raises(TypeError, match="stop_when_converged must be a bool or a dict"):
        with opt.collect(stop_when_converged="yes"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="criterion must be one of"):
        with opt.collect(stop_when_converged={"criterion": "guess"}):
            pass


# ---------------------------------------------------------------------------------------- 16-bit inputs
@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 70), d=st.integers(1, 9), chunk=st.integers(1, 80), groups=st.sampled_from([1, 3]),
       dtype=st.sampled_from([torch.bfloat16, torch.float16]), seed=st.integers(0, 10_000))
def test_chunked_upcast_of_16_bit_inputs_equals_one_copy(n, d, chunk, groups, dtype, seed):
    """Products of 16-bit numbers are exact in float32: only the summation order differs from the twin
    (``chunk_rows=None``: one float32 copy of the batch), within ``4 n eps32 (|X|^T |X|)`` entrywise."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(groups, n, d, generator=g) * 3).to(dtype)
    fast, twin = (CovarianceStat("fc", d, groups, normalize="sum", chunk_rows=c) for c in (chunk, None))
    fast.update(x)
    twin.update(x)
    xa = torch.cat([x.float().abs(), torch.ones(groups, n, 1)], dim=-1)
    bound = 4 * n * torch.finfo(torch.float32).eps * (xa.transpose(1, 2) @ xa)
    assert ((fast.task_sum - twin.task_sum).abs() <= bound).all()
    assert fast.task_count == twin.task_count == n and fast.task_batches == twin.task_batches == 1


def test_stats_chunk_rows_reaches_the_statistics_of_a_bf16_model():
    torch.manual_seed(0)
    model = mlp([8, 6, 2], dtype=torch.bfloat16)
    x = torch.randn(50, 8).to(torch.bfloat16)
    mem = {}
    for chunk in (7, None):
        opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, stats_chunk_rows=chunk)
        assert [b.stat.chunk_rows for b in opt.blocks] == [chunk, chunk]
        with opt.collect(), torch.no_grad():
            model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.end_task()
        mem[chunk] = [b.stat.memory for b in opt.blocks]
    for a, b in zip(mem[7], mem[None], strict=True):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=1e-5, atol=1e-6)
