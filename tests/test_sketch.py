"""Bounded-memory statistics (gnsp_optim.sketch) and low-precision accumulation (gnsp_optim.precision).

Promises: the frequent-directions guarantee (0 <= A^T A - B^T B <= Delta <= ||A - A_k||_F^2 / (rank+1-k)) over
updates, folds with every normalisation and merges; exact for streams of rank <= rank; the fast sketch equals
its dense twin; the tail-energy rule sees the exact total; chunked low-precision accumulation equals the
float32-copy twin within the stated bound.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gnsp_optim.precision import add_augmented_gram_, add_augmented_gram_reference
from gnsp_optim.projector import project_reference
from gnsp_optim.sketch import SketchReference, SketchSpectrum, SketchStat, fd_shrink
from gnsp_optim.statistics import CovarianceStat
from gnsp_optim.subspace import FixedRank, TailEnergy, eigh_descending

F64 = torch.float64


def power_law_rows(n: int, d: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Rows whose covariance has eigenvalues ~ i^-alpha in a random basis."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    scale = torch.arange(1, d + 1, dtype=F64) ** (-alpha / 2)
    return (torch.randn(n, d, generator=gen, dtype=F64) * scale) @ q.T


def exact_memory(tasks: list[list[torch.Tensor]], normalize: str, scales=None) -> torch.Tensor:
    """The exact augmented memory CovarianceStat builds for the same batches (the test's ground truth).

    ``frobenius``: the task's norm is not knowable in O(d l) memory, so the sketch divides by its own estimate;
    ``scales`` (the sketch's ``task_scales``) replaces CovarianceStat's task-level factor then.
    """
    d = tasks[0][0].shape[1]
    st_ = CovarianceStat("exact", d, dtype=F64, normalize=normalize)
    memory = None
    for t, batches in enumerate(tasks):
        for x in batches:
            st_.update(x)
        part = st_.task_sum[0] * float(scales[t][0]) if scales is not None else st_.task_contribution()[0]
        memory = part if memory is None else memory + part
        st_.clear_task()
    return memory


streams = st.fixed_dictionaries({
    "d": st.integers(2, 12), "rank": st.integers(1, 6), "seed": st.integers(0, 10_000),
    "tasks": st.lists(st.lists(st.integers(1, 17), min_size=1, max_size=4), min_size=1, max_size=3),
    "alpha": st.floats(0.0, 3.0), "normalize": st.sampled_from(["mean", "sum", "frobenius"]),
})


def build(case) -> tuple[SketchStat, list[list[torch.Tensor]]]:
    gen = torch.Generator().manual_seed(case["seed"])
    tasks = [[power_law_rows(n, case["d"], case["alpha"], gen) for n in sizes] for sizes in case["tasks"]]
    sk = SketchStat("fc", case["d"], case["rank"], dtype=F64, normalize=case["normalize"])
    for batches in tasks:
        for x in batches:
            sk.update(x)
        sk.fold()
    return sk, tasks


@given(streams)
def test_frequent_directions_guarantee_holds_over_updates_and_folds(case):
    sk, tasks = build(case)
    exact = exact_memory(tasks, case["normalize"], sk.task_scales if case["normalize"] == "frobenius" else None)
    err = exact - sk.dense_memory(with_bias=True)[0]
    lam_err = torch.linalg.eigvalsh(err)
    scale = float(torch.linalg.matrix_norm(exact, ord=2)) + 1.0
    assert float(lam_err[0]) >= -1e-9 * scale  # the sketch never overestimates: B^T B <= A^T A
    delta = float(sk.memory_delta[0])
    assert float(lam_err[-1]) <= delta + 1e-9 * scale  # ... and misses at most the certified Delta
    lam = eigh_descending(exact, "exact")[0].to(F64)
    total = float(lam.sum())
    assert float(sk.spectrum(True).total[0]) == pytest.approx(total, rel=1e-9, abs=1e-12)  # exact mass
    for k in range(0, case["rank"] + 1):
        tail_k = total - float(lam[:k].sum())  # ||A - A_k||_F^2
        assert delta <= tail_k / (case["rank"] + 1 - k) + 1e-9 * scale, k
        assert float(sk.error_bound(k)[0]) >= tail_k / (case["rank"] + 1 - k) - 1e-9 * scale  # a valid bound


@given(st.integers(2, 10), st.integers(1, 6), st.integers(0, 1000), st.lists(st.integers(1, 40), min_size=1,
                                                                          max_size=4))
def test_stream_of_rank_at_most_rank_is_kept_exactly(d, rank, seed, sizes):
    gen = torch.Generator().manual_seed(seed)
    r = min(rank - 1, d)  # augmented rows [x | 1] have rank <= r + 1 <= rank
    a = torch.randn(r, d, generator=gen, dtype=F64)
    batches = [torch.randn(n, r, generator=gen, dtype=F64) @ a for n in sizes]
    sk = SketchStat("fc", d, rank, dtype=F64)
    for x in batches:
        sk.update(x)
    sk.fold()
    exact = exact_memory([batches], "mean")
    assert torch.allclose(sk.dense_memory(True)[0], exact, atol=1e-9 * (1 + float(exact.abs().max())))
    assert float(sk.memory_delta[0]) <= 1e-9 * (1 + float(exact.abs().max()))


@given(st.integers(2, 9), st.integers(1, 5), st.integers(0, 1000), st.sampled_from(["mean", "sum"]),
       st.lists(st.lists(st.integers(1, 13), min_size=1, max_size=3), min_size=1, max_size=3),
       st.sampled_from([None, 1, 3]))
def test_fast_sketch_equals_its_dense_twin(d, rank, seed, normalize, tasks, chunk_rows):
    gen = torch.Generator().manual_seed(seed)
    fast = SketchStat("fc", d, rank, dtype=F64, normalize=normalize)
    slow = SketchReference(d, rank, normalize=normalize)
    for sizes in tasks:
        for n in sizes:
            x = power_law_rows(n, d, 1.0, gen)
            fast.update(x, chunk_rows=chunk_rows)
            slow.update(x, chunk_rows=chunk_rows)
        fast.fold()
        slow.fold()
        assert fast.memory.shape[1] == slow.memory_rows
    m = fast.dense_memory(True)[0]
    assert torch.allclose(m, slow.memory, atol=1e-8 * (1 + float(slow.memory.abs().max())))


def test_groups_and_single_group_updates_match_separate_sketches():
    gen = torch.Generator().manual_seed(0)
    xs = [power_law_rows(11, 5, 1.0, gen) for _ in range(3)]
    grouped = SketchStat("qkv", 5, 3, groups=3, dtype=F64)
    grouped.update(torch.stack(xs))
    grouped.update(xs[1][:4], group=1)  # group 1 only: the groups' fills now differ
    grouped.update(torch.stack(xs))  # ... and a joint update takes the per-group path
    grouped.fold()
    for g in range(3):
        alone = SketchStat("one", 5, 3, dtype=F64)
        alone.update(xs[g])
        if g == 1:
            alone.update(xs[1][:4])
        alone.update(xs[g])
        alone.fold()
        assert torch.allclose(grouped.dense_memory(True)[g], alone.dense_memory(True)[0], atol=1e-10), g
        assert torch.allclose(grouped.memory_mass[g], alone.memory_mass[0])


def test_tail_energy_rule_sees_the_exact_total_and_projector_matches_exact_on_low_rank():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(60, 3, generator=gen, dtype=F64) @ torch.randn(3, 8, generator=gen, dtype=F64)
    sk = SketchStat("fc", 8, 6, dtype=F64)
    sk.update(x)
    sk.fold()
    exact = exact_memory([[x]], "mean")
    lam, vec = eigh_descending(exact, "exact")
    k = TailEnergy(1e-12)(lam)
    proj = sk.spectrum(True).to_projector(TailEnergy(1e-12), dtype=F64)
    assert proj.kept_ranks == [k] == [4]  # 3 input directions + the bias column
    g = torch.randn(5, 9, generator=gen, dtype=F64)
    new_w, new_b = proj.apply(g[None, :, :8], g[None, :, 8:])
    assert torch.allclose(torch.cat([new_w, new_b], -1)[0], project_reference(g, vec[:, :k]), atol=1e-9)


def test_spectrum_tail_padding_and_saturation():
    spec = SketchSpectrum(torch.tensor([[5.0, 3.0]], dtype=F64), torch.eye(6, dtype=F64)[None, :, :2],
                          torch.tensor([10.0], dtype=F64), 6)
    assert spec.padded().tolist() == [[5.0, 3.0, 0.5, 0.5, 0.5, 0.5]]
    assert spec.ranks(TailEnergy(0.25)) == ([2], [False])  # tail 2/10 <= 0.25 with both kept
    assert spec.ranks(TailEnergy(0.1)) == ([2], [True])  # wants 4 directions: capped, flagged
    assert spec.to_projector(FixedRank(1)).basis.shape == (1, 6, 1)


def test_all_reduce_is_not_touched_by_single_process_and_errors():
    with pytest.raises(ValueError, match="rank must be a positive int"):
        SketchStat("fc", 4, 0)
    with pytest.raises(ValueError, match="normalize"):
        SketchStat("fc", 4, 2, normalize="max")
    sk = SketchStat("fc", 4, 2)
    with pytest.raises(ValueError, match=r"fc: expected inputs \(\.\.\., 4\)"):
        sk.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="fc: no task has been folded"):
        sk.spectrum(True)
    sk.update(torch.full((2, 4), float("nan")))
    assert not sk.task_is_finite()


def test_state_dict_round_trip_and_mismatch():
    gen = torch.Generator().manual_seed(2)
    sk = SketchStat("fc", 6, 3, dtype=F64)
    sk.update(power_law_rows(20, 6, 1.0, gen))
    sk.fold()
    other = SketchStat("fc", 6, 3, dtype=F64)
    other.load_state_dict(sk.state_dict())
    assert torch.equal(other.memory, sk.memory) and other.tasks_folded == 1
    assert torch.equal(other.spectrum(True).total, sk.spectrum(True).total)
    with pytest.raises(ValueError, match="fc: saved sketch"):
        SketchStat("fc", 6, 4).load_state_dict(sk.state_dict())


def test_memory_is_bounded_by_rank_not_by_width_squared():
    sk = SketchStat("wide", 512, 8)
    sk.update(torch.randn(100, 512))
    collecting = sk.memory_bytes()
    sk.fold()
    assert collecting == 2 * 8 * 513 * 4 and sk.memory_bytes() == 8 * 513 * 4
    assert collecting < 513 * 513 * 4 / 10


def test_fd_shrink_frees_rows_and_removes_delta():
    rows = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=F64))[None]
    b, delta = fd_shrink(rows, 2)
    assert b.shape == (1, 2, 4) and float(delta[0]) == pytest.approx(4.0)
    assert torch.allclose(torch.linalg.eigvalsh(b[0].T @ b[0]).flip(0)[:2], torch.tensor([12.0, 5.0], dtype=F64))


# ---------------------------------------------------------------------------------------- precision
@given(st.integers(1, 70), st.integers(1, 9), st.integers(1, 3), st.sampled_from([torch.bfloat16, torch.float16]),
       st.integers(1, 16), st.integers(0, 1000))
def test_chunked_low_precision_gram_equals_float32_copy_within_bound(n, d, groups, dtype, chunk, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(groups, n, d, generator=gen) * 3).to(dtype)
    fast = torch.zeros(groups, d + 1, d + 1)
    slow = torch.zeros(groups, d + 1, d + 1)
    add_augmented_gram_(fast, x, chunk_rows=chunk)
    add_augmented_gram_reference(slow, x)
    xa = torch.cat([x.float().abs(), torch.ones(groups, n, 1)], -1)
    bound = 4 * n * 2.0**-24 * (xa.transpose(1, 2) @ xa)
    assert bool(((fast - slow).abs() <= bound).all())
    exact = torch.zeros(groups, d + 1, d + 1, dtype=F64)  # and both are close to the float64 truth
    add_augmented_gram_reference(exact, x)
    assert bool(((fast.double() - exact).abs() <= bound.double()).all())


def test_low_precision_gram_matches_covariance_stat_and_checks_shapes():
    x = torch.randn(33, 7).to(torch.bfloat16)
    out = torch.zeros(1, 8, 8)
    add_augmented_gram_(out, x, chunk_rows=5)
    st_ = CovarianceStat("fc", 7)
    st_.update(x)  # today's path: a float32 copy of the batch
    assert torch.allclose(out, st_.task_sum, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="x must be"):
        add_augmented_gram_(out, torch.zeros(3, 6))
    with pytest.raises(ValueError, match="float32 or float64"):
        add_augmented_gram_(out.half(), x)
    with pytest.raises(ValueError, match="chunk_rows"):
        add_augmented_gram_(out, x, chunk_rows=0)


def test_sketch_accepts_bf16_rows_and_matches_float32_rows():
    x = torch.randn(40, 6).to(torch.bfloat16)
    a, b = SketchStat("fc", 6, 3), SketchStat("fc", 6, 3)
    a.update(x)
    b.update(x.float())
    a.fold()
    b.fold()
    assert torch.allclose(a.dense_memory(True), b.dense_memory(True), atol=1e-5)


@given(st.integers(1, 8), st.integers(1, 12), st.integers(1, 14), st.integers(1, 3), st.integers(0, 1000))
def test_fd_shrink_gram_route_equals_svd_route(rank, m, dim, groups, seed):
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randn(groups, m, dim, generator=gen, dtype=F64)
    if seed % 3 == 0 and m > 1:
        rows[:, -1] = rows[:, 0]  # a repeated row: a zero singular value among the rows
    outs = {method: fd_shrink(rows, rank, method=method) for method in ("gram", "svd")}
    (bg, dg), (bs, ds) = outs["gram"], outs["svd"]
    assert torch.allclose(bg.transpose(1, 2) @ bg, bs.transpose(1, 2) @ bs, atol=1e-9)
    assert torch.allclose(dg, ds, atol=1e-9)
    if m <= dim:
        assert bg.shape[1] == bs.shape[1]
    with pytest.raises(ValueError, match="method"):
        fd_shrink(rows, rank, method="qr")


@given(streams, st.floats(0.01, 0.6))
def test_tail_energy_on_the_sketch_is_conservative_and_leaks_at_most_rho_of_the_exact_memory(case, rho):
    sk, tasks = build(case)
    exact = exact_memory(tasks, case["normalize"], sk.task_scales if case["normalize"] == "frobenius" else None)
    lam, vec = eigh_descending(exact, "exact")
    k_exact = TailEnergy(rho)(lam)
    spec = sk.spectrum(with_bias=True)
    (k_sketch,), (saturated,) = spec.ranks(TailEnergy(rho))
    if saturated:
        assert k_sketch == spec.eigenvalues.shape[-1]
        return
    assert k_sketch >= k_exact
    u = spec.vectors[0, :, :k_sketch]
    leak = 1.0 - float(torch.trace(u.T @ exact @ u) / torch.trace(exact))
    assert leak <= rho + 1e-9
