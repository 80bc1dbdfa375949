r"""Bounded statistics memory and the converging statistics pass, on synthetic power-law inputs.

Part 1, per input width (ViT-B/16: 768 / 3072; LLaMA-7B: 4096 / 11008): ``n`` rows whose covariance has
eigenvalues ``~ i^-alpha`` in a random basis (four Householder reflections of a diagonal scaling) are collected
once by the exact :class:`~gnsp_optim.statistics.CovarianceStat` and once by the frequent-directions
:class:`~gnsp_optim.sketch.SketchStat` (``rank`` rows), side by side, then each builds its ``TailEnergy(rho)``
projector. Printed: memory, collection and end_task time (ratios measured in the same run), kept ranks, and
quality against the exact statistic ``C``:

- ``leak``: share of ``C``'s mass outside the kept subspace (the exact projector's leak is <= rho by
  construction);
- ``drift``: relative change of old outputs under a random update ``G`` (256 Gaussian rows, the same ``G``
  for both projectors) after projection, ``sqrt(tr(G_p C G_p^T) / tr(G C G^T))`` (``G_p`` projected; 1
  would be no protection; for an isotropic ``G`` its square estimates the leak);
- ``||C - B^T B||_2`` (power iteration on the PSD difference) next to the sketch's certificate ``Delta`` and
  the a-priori bound ``||A - A_k||_F^2 / (rank+1-k)`` at ``k = rank/2``.

Above ``--exact-eigh-max-width`` the exact eigendecomposition is not run (an 11008-wide float32 ``eigh``
takes minutes: time it once with ``--time-eigh 11008``); the exact ranks and leaks there come from the top
``--topk`` eigenpairs by randomized subspace iteration (``[exact*]`` in the table).

Part 2: the statistics pass that stops when converged (:class:`~gnsp_optim.convergence.ConvergenceMonitor`)
on a stationary stream, mean +- standard error over seeds: samples used against a full pass, collection time
ratio, and the leak / drift of the stopped projector on the *full-pass* statistic next to the full-pass
projector's own.

Usage::

    python benchmarks/statistics_memory.py                       # the default run (~10 min on 2 shared cores)
    python benchmarks/statistics_memory.py --widths 768 --samples 2048 --seeds 2 --alphas 1.5     # a quick look
    python benchmarks/statistics_memory.py --time-eigh 11008      # one float32 eigh at that width
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnsp_optim.convergence import ConvergenceMonitor  # noqa: E402
from gnsp_optim.projector import Projector  # noqa: E402
from gnsp_optim.sketch import SketchStat  # noqa: E402
from gnsp_optim.statistics import CovarianceStat  # noqa: E402
from gnsp_optim.subspace import TailEnergy, eigh_descending  # noqa: E402


def log(msg: str) -> None:
    print(msg, flush=True)


class PowerLawStream:
    """Rows ``z * i^(-alpha/2)`` rotated by four random Householder reflections (a dense random basis)."""

    def __init__(self, d: int, alpha: float, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.scale = torch.arange(1, d + 1, dtype=torch.float32) ** (-alpha / 2)
        vs = torch.randn(4, d, generator=self.gen)
        self.reflections = vs / vs.norm(dim=1, keepdim=True)
        self.d = d

    def batch(self, n: int) -> torch.Tensor:
        x = torch.randn(n, self.d, generator=self.gen) * self.scale
        for v in self.reflections:
            x = x - 2.0 * (x @ v)[:, None] * v[None]
        return x


def kept_basis(proj: Projector) -> torch.Tensor:
    """``(D, k)`` occupied basis of a one-group projector of either form (null form: complement via QR)."""
    b = proj.basis[0, :, : proj.kept_ranks[0] if proj.form == "kept" else proj.dim - proj.kept_ranks[0]]
    if proj.form == "kept":
        return b
    q = torch.linalg.qr(torch.cat([b, torch.randn(proj.dim, proj.kept_ranks[0], dtype=b.dtype)], 1))[0]
    return q[:, b.shape[1]:]


def leak_and_drift(c: torch.Tensor, u: torch.Tensor, g: torch.Tensor) -> tuple[float, float]:
    """Share of ``c``'s mass outside span(u), and the relative old-output drift of the random update ``g``
    (rows x D) after projection (the same ``g`` for every projector compared: a paired comparison)."""
    c = c.double()
    u = u.double()
    total = float(torch.trace(c))
    inside = float((u * (c @ u)).sum())
    gp = g - (g @ u) @ u.T
    drift = math.sqrt(float((gp * (gp @ c)).sum()) / float((g * (g @ c)).sum()))
    return 1.0 - inside / total, drift


def top_eigenpairs(c: torch.Tensor, k: int, gen: torch.Generator, iters: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``k`` eigenpairs of PSD ``c`` by randomized subspace iteration (oversampled by 32)."""
    q = torch.linalg.qr(c @ torch.randn(c.shape[0], k + 32, generator=gen, dtype=c.dtype))[0]
    for _ in range(iters):
        q = torch.linalg.qr(c @ q)[0]
    lam, w = torch.linalg.eigh(q.T @ c @ q)
    lam, w = lam.flip(0)[:k], w.flip(1)[:, :k]
    return lam.clamp_min(0), q @ w


def spectral_norm_psd(m: torch.Tensor, gen: torch.Generator, iters: int = 40) -> float:
    v = torch.randn(m.shape[0], generator=gen, dtype=m.dtype)
    for _ in range(iters):
        v = m @ v
        v = v / v.norm()
    return float(v @ (m @ v))


def collect_both(exact: CovarianceStat, sketch: SketchStat, stream, args) -> tuple[float, float]:
    """Feed the same batches to both statistics; seconds spent in each."""
    t_exact = t_sketch = 0.0
    for _ in range(args.samples // args.batch):
        x = stream.batch(args.batch)
        t0 = time.perf_counter()
        exact.update(x)
        t1 = time.perf_counter()
        sketch.update(x)
        t2 = time.perf_counter()
        t_exact += t1 - t0
        t_sketch += t2 - t1
    return t_exact, t_sketch


def exact_basis(exact: CovarianceStat, d: int, args, rule, gen: torch.Generator):
    """``(k, kept basis, end_task seconds, tag)`` of the exact memory: an eigh up to
    ``--exact-eigh-max-width``, the top eigenpairs beyond (tag ``*``; ``*>=`` when ``--topk`` was too few)."""
    c = exact.memory[0]
    if d <= args.exact_eigh_max_width:
        t0 = time.perf_counter()
        lam, vec = eigh_descending(exact.memory, "exact")
        k_exact = int(rule(lam[0]))
        return k_exact, vec[0, :, :k_exact], time.perf_counter() - t0, ""
    lam_top, vec_top = top_eigenpairs(c, args.topk, gen)
    total = float(torch.trace(c))
    tails = total - torch.cumsum(lam_top.double(), 0)
    hit = torch.nonzero(tails <= args.rho * total)
    k_exact = int(hit[0, 0]) + 1 if len(hit) else args.topk
    return k_exact, vec_top[:, :k_exact], float("nan"), "*" if len(hit) else "*>="


def part1(args) -> None:
    rule = TailEnergy(args.rho)
    log(f"\n== Part 1: bounded statistics memory (alpha={args.alpha}, rho={args.rho}, sketch rank={args.rank}, "
        f"batch={args.batch}, torch threads={torch.get_num_threads()}) ==")
    head = (f"{'width':>6} {'n':>6} {'exact MB':>8} {'sk collect MB':>13} {'sk kept MB':>10} {'collect s/e':>11} "
            f"{'end_task s/e':>12} {'k exact':>8} {'k sketch':>8} {'leak exact':>10} {'leak sketch':>11} "
            f"{'drift exact':>11} {'drift sketch':>12} {'||C-BtB||':>10} {'Delta':>9} {'bound':>9}")
    rows = []
    for d in args.widths:
        gen = torch.Generator().manual_seed(123)
        stream = PowerLawStream(d, args.alpha, seed=d)
        exact = CovarianceStat("exact", d)
        sketch = SketchStat("sketch", d, args.rank)
        t_exact, t_sketch = collect_both(exact, sketch, stream, args)
        mem_exact = exact.task_sum.numel() * 4 / 2**20
        mem_collect = sketch.memory_bytes() / 2**20  # the task buffer (2 rank rows); first task: no memory yet
        exact.fold()
        sketch.fold()
        mem_kept = sketch.memory_bytes() / 2**20  # what stays between tasks (rank rows)
        c = exact.memory[0]
        t0 = time.perf_counter()
        spec = sketch.spectrum(with_bias=True)
        proj_s = spec.to_projector(rule)
        t_end_sketch = time.perf_counter() - t0
        _, saturated = spec.ranks(rule)
        k_exact, u_exact, t_end_exact, tag = exact_basis(exact, d, args, rule, gen)
        g = torch.randn(256, d + 1, generator=gen, dtype=torch.float64)
        leak_e, drift_e = leak_and_drift(c, u_exact, g)
        leak_s, drift_s = leak_and_drift(c, kept_basis(proj_s), g)
        err = spectral_norm_psd((c - sketch.dense_memory(True)[0]).double(), gen)
        bound = float(sketch.error_bound(args.rank // 2)[0])
        delta = float(sketch.memory_delta[0])
        k_s = f"{proj_s.kept_ranks[0]}{'!' if saturated[0] else ''}"
        end_ratio = t_end_sketch / t_end_exact if t_end_exact == t_end_exact else float("nan")
        row = (f"{d:>6} {args.samples:>6} {mem_exact:>8.1f} {mem_collect:>13.1f} {mem_kept:>10.1f} "
               f"{t_sketch / t_exact:>11.2f} {end_ratio:>12.4f} {tag + str(k_exact):>8} {k_s:>8} "
               f"{leak_e:>10.4f} {leak_s:>11.4f} {drift_e:>11.4f} {drift_s:>12.4f} {err:>10.3e} {delta:>9.3e} "
               f"{bound:>9.3e}")
        rows.append(row)
        log(f"  width {d}: collect exact {t_exact:.2f} s, sketch {t_sketch:.2f} s; end_task exact "
            f"{t_end_exact:.2f} s, sketch {t_end_sketch:.3f} s")
        del exact, sketch, c
    log(head)
    for r in rows:
        log(r)
    log("s/e: sketch time / exact time in the same run; '!': the rule wanted more directions than the sketch holds "
        "(rank capped); '*': exact rank from the top eigenpairs (randomized subspace iteration), eigh not run")


def part2(args) -> None:
    d = args.conv_width
    rule = TailEnergy(args.rho)
    log(f"\n== Part 2: statistics pass that stops when converged (width {d}, alpha={args.alpha}, "
        f"{args.conv_batches} batches x {args.conv_batch} rows, check every {args.every}, tol={args.tol}, "
        f"patience 2, {args.seeds} seeds) ==")
    results: dict[str, list[list[float]]] = {"subspace": [], "covariance": []}
    for seed in range(args.seeds):
        stream = PowerLawStream(d, args.alpha, seed=1000 + seed)
        batches = [stream.batch(args.conv_batch) for _ in range(args.conv_batches)]
        full = CovarianceStat("full", d, dtype=torch.float64)
        t0 = time.perf_counter()
        for x in batches:
            full.update(x)
        t_full = time.perf_counter() - t0
        full.fold()
        c = full.memory[0]
        lam, vec = eigh_descending(full.memory, "full")
        u_full = vec[0, :, : int(rule(lam[0]))]
        g = torch.randn(256, d + 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        leak_f, drift_f = leak_and_drift(c, u_full, g)
        for criterion in results:
            st = CovarianceStat("early", d, dtype=torch.float64)
            mon = ConvergenceMonitor({"fc": st}, every=args.every, tol=args.tol, patience=2,
                                     criterion=criterion, rule=rule)
            t_gram = t_check = 0.0
            for x in batches:
                t0 = time.perf_counter()
                st.update(x)
                t1 = time.perf_counter()
                done = mon.update(samples=len(x))
                t_check += time.perf_counter() - t1
                t_gram += t1 - t0
                if done:
                    break
            st.fold()
            lam_e, vec_e = eigh_descending(st.memory, "early")
            u_e = vec_e[0, :, : int(rule(lam_e[0]))]
            leak_e, drift_e = leak_and_drift(c, u_e, g)
            results[criterion].append([mon.samples / (len(batches) * args.conv_batch), t_check / t_full,
                                       leak_e, leak_f, drift_e, drift_f, float(mon.converged)])
    log(f"{'criterion':>10} {'samples used':>14} {'checks / full':>14} {'leak stop':>16} {'leak full':>16} "
        f"{'drift stop':>16} {'drift full':>16} {'converged':>9}")
    for criterion, vals in results.items():
        t = torch.tensor(vals, dtype=torch.float64)
        mean = t.mean(0)
        se = t.std(0) / math.sqrt(len(t)) if len(t) > 1 else torch.zeros_like(mean)
        cells = [f"{float(m):.3f}+-{float(s):.3f}" for m, s in zip(mean[:6], se[:6], strict=True)]
        log(f"{criterion:>10} {cells[0]:>14} {cells[1]:>14} {cells[2]:>16} {cells[3]:>16} {cells[4]:>16} "
            f"{cells[5]:>16} {int(t[:, 6].sum())}/{len(t)}")
    log("samples used: share of the full pass (the forward passes saved are the rest); checks / full: time "
        "spent in the monitor's checks over the full pass's Gram accumulation time (the real pass also runs the "
        "model forward, which this synthetic stream does not have); leak / drift on the full-pass statistic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--widths", type=int, nargs="+", default=[768, 3072, 4096, 11008])
    p.add_argument("--samples", type=int, default=8192)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--alphas", type=float, nargs="+", default=[1.5, 1.0],
                   help="power-law exponents of Part 1 (Part 2 uses the first)")
    p.add_argument("--rho", type=float, default=0.15)
    p.add_argument("--rank", type=int, default=256)
    p.add_argument("--topk", type=int, default=192)
    p.add_argument("--exact-eigh-max-width", type=int, default=4096)
    p.add_argument("--conv-width", type=int, default=768)
    p.add_argument("--conv-batches", type=int, default=200)
    p.add_argument("--conv-batch", type=int, default=128)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--tol", type=float, default=0.02)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on the shared 2-core box 2 threads oversubscribed and ran ~10x slower)")
    p.add_argument("--skip-part1", action="store_true")
    p.add_argument("--skip-part2", action="store_true")
    p.add_argument("--time-eigh", type=int, default=None, help="only time one float32 eigh at this width")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    args.alpha = args.alphas[0]
    if args.time_eigh:
        x = PowerLawStream(args.time_eigh, args.alpha, seed=0).batch(args.samples)
        c = x.T @ x / len(x)
        t0 = time.perf_counter()
        torch.linalg.eigh(c)
        log(f"float32 eigh, width {args.time_eigh}: {time.perf_counter() - t0:.1f} s ({args.threads} threads)")
        return
    if not args.skip_part1:
        for alpha in args.alphas:
            args.alpha = alpha
            part1(args)
        args.alpha = args.alphas[0]
    if not args.skip_part2:
        part2(args)
    log(f"\ntotal wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
