"""Side-by-side CPU cost of gnsp_optim against the base optimizer and the public GNSP code's dense projector.

Everything is measured in one run, variants interleaved round by round (the order rotates each round) and the
median kept, so the *ratios* are meaningful on a shared machine; absolute times are printed for context only.

What is compared (ViT-B/16 MLP shapes: ``c_fc`` 3072x768 with 768-d input, ``c_proj`` 768x3072 with 3072-d
input, ``visual.proj`` 768x512 with ``--full``):

1. per step: our projection (``Projector``: the smaller of kept / null basis, ``g - (gU)U^T`` or ``(gN)N^T``)
   against AdamW's step alone and against the public code's dense ``d x d`` projector ``g @ P``, and
   ``batch_layers=True`` (equal shapes in one batched product) against the per-layer loop;
2. ``end_task``: our ``eigh`` (float32, float64 retry) against the public code's full ``torch.svd`` + P;
3. collection: a forward with ``opt.collect()`` open against a plain forward, and the hooks' cost when closed;
4. memory: projector bytes from ``opt.report()`` against the dense ``d x d`` float32 projectors.

Layer inputs are synthetic power-law activations: ``X = diag(s) Q^T`` with a random orthogonal ``Q`` and
``s_i = i^(-alpha/2)``, so the input covariance has eigenvalues ``~ i^-alpha``; GNSP's ``rho = 0.15``.

``--kept-share FC,PROJ`` replaces the rank rule (on both sides) by fixed shares of the input dimension, e.g.
the shares a trained model's projectors show in ``opt.report()``.

``--clip-step`` times instead a whole CLIP training step (both towers forward, contrastive loss against class
prompts, backward, optimizer step) with GNSP's layer preset training (visual MLPs + ``visual.proj``): plain
AdamW against GNSP in grad and update mode, plus the collecting forward and ``end_task`` at that scale.
``--device cuda`` runs it under bf16 autocast (ViT-B/16 by default, ``--quick`` a tiny CLIP).

Run::

    python benchmarks/overhead.py            # 2 MLP blocks at ViT-B/16 widths
    python benchmarks/overhead.py --clip-step --device cuda --batch 64   # ViT-B/16 step on a GPU, bf16
    python benchmarks/overhead.py --kept-share 0.27,0.13
    python benchmarks/overhead.py --full     # 12 blocks + visual.proj (minutes)
    python benchmarks/overhead.py --quick    # tiny widths, seconds (used by the smoke test)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from gnsp_optim import FeatureSource, NullSpaceOptimizer
from gnsp_optim.projection import project_gradients
from gnsp_optim.statistics import CovarianceStat
from gnsp_optim.subspace import tail_energy_rank

HEADER = "| measurement | ours | other side | ratio (ours / other) | target | met |"


# ------------------------------------------------------------------------------------------ timing helpers
def interleaved(variants: dict[str, Callable[[], None]], rounds: int,
                prep: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of each variant; every round runs each variant once, in a rotating order.

    Example:
        >>> t = interleaved({"a": lambda: None, "b": lambda: None}, rounds=3)
        >>> sorted(t)
        ['a', 'b']
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if prep is not None:
                prep()
            t0 = time.perf_counter()
            variants[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def fmt_t(seconds: float) -> str:
    """Seconds as a short human string (``12.3 ms`` / ``1.23 s``)."""
    return f"{seconds * 1e3:.1f} ms" if seconds < 1.0 else f"{seconds:.2f} s"


def fmt_b(nbytes: float) -> str:
    """Bytes as MiB."""
    return f"{nbytes / 2**20:.1f} MiB"


# ---------------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """A CLIP residual block's MLP: ``c_fc`` (width -> hidden), GELU, ``c_proj`` (hidden -> width)."""

    def __init__(self, width: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.c_proj(self.gelu(self.c_fc(x)))


class Tower(nn.Module):
    """``blocks`` MLP blocks, then optionally a bare-matmul head ``x[:, 0] @ proj`` (CLIP's visual.proj)."""

    def __init__(self, width: int, hidden: int, blocks: int, head: int | None, bias: bool = True) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(MLP(width, hidden, bias) for _ in range(blocks))
        self.ln_post = nn.Identity()
        self.proj = nn.Parameter(torch.randn(width, head) / width**0.5) if head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x)
        x = self.ln_post(x)
        return x if self.proj is None else x[:, 0] @ self.proj


def power_law_inputs(dim: int, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """``dim`` rows whose Gram matrix is ``Q diag(i^-alpha) Q^T`` for a random orthogonal ``Q`` (float32)."""
    q = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))[0]
    scales = torch.arange(1, dim + 1, dtype=torch.float64).pow(-alpha / 2)
    return (scales[:, None] * q.T).float() * dim**0.5  # mean-normalised covariance = Q diag(s^2) Q^T


# ---------------------------------------------------------------------------------------------- public side
def public_projector(cov: torch.Tensor, rho: float, rule: Callable[[torch.Tensor], int] | None = None
                     ) -> torch.Tensor:
    """The public GNSP code's way: full SVD of the covariance, dense ``P = U_null U_null^T`` (``d x d``)."""
    u, s, _ = torch.svd(cov)
    k = tail_energy_rank(s, rho) if rule is None else rule(s)
    null = u[:, k:]
    return null @ null.T


def previous_update(stat: CovarianceStat, x: torch.Tensor) -> None:
    """The accumulation ``CovarianceStat.update`` used before this benchmark (a fresh ``bmm`` then adds)."""
    x = x.unsqueeze(0)
    d = stat.dim
    if stat.task_sum is None:
        stat.task_sum = torch.zeros(1, d + 1, d + 1, dtype=stat.dtype, device=x.device)
    buf = stat.task_sum
    gram = torch.bmm(x.transpose(1, 2), x)
    col = x.sum(dim=1)
    buf[:, :d, :d] += gram
    buf[:, :d, d] += col
    buf[:, d, :d] += col
    buf[:, d, d] += float(x.shape[1])


# ---------------------------------------------------------------------------------------------- the run
def main(argv: list[str] | None = None) -> int:  # noqa: C901, PLR0912, PLR0915  (see below)
    """Parse arguments, run every measurement, print the table. Returns the exit status.

    (One long, straight script of measurement sections sharing one model and its projectors; its branches
    are flags, not logic. Exempt from the complexity limits until the sections become functions.)
    """
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=2, help="MLP blocks (default 2)")
    ap.add_argument("--full", action="store_true", help="12 blocks + visual.proj (ViT-B/16)")
    ap.add_argument("--quick", action="store_true", help="tiny widths, runs in seconds")
    ap.add_argument("--alpha", type=float, default=1.0, help="eigenvalues ~ i^-alpha")
    ap.add_argument("--rho", type=float, default=0.15)
    ap.add_argument("--kept-share", default=None, metavar="FC,PROJ",
                    help="fix the kept rank to these shares of c_fc's and c_proj's input dimension (both sides) "
                         "instead of the tail-energy rule, e.g. the shares a trained model shows")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per measurement")
    ap.add_argument("--batch", type=int, default=8, help="images per collecting forward")
    ap.add_argument("--tokens", type=int, default=197)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine extra threads stall each other)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--clip-step", action="store_true",
                    help="time a whole CLIP training step (ViT-B/16; --quick: tiny) instead of the layer kernels")
    ap.add_argument("--device", default="cpu", help="--clip-step: cpu or cuda")
    ap.add_argument("--stats-chunk-rows", type=int, default=None,
                    help="--clip-step: NullSpaceOptimizer(stats_chunk_rows=...) (16-bit inputs upcast in chunks)")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                    help="--clip-step: bf16 autocast (default: on for cuda, off for cpu)")
    args = ap.parse_args(argv)
    if args.clip_step:
        return clip_step(args, ap)

    width, hidden, head, blocks, batch, tokens = 768, 3072, None, args.blocks, args.batch, args.tokens
    rounds, slow_rounds = args.rounds or 7, max(2, (args.rounds or 7) // 2)
    if args.full:
        blocks, head = 12, 512
    if args.quick:
        width, hidden, blocks, head, batch, tokens = 64, 256, 1, 32, 2, 17
        rounds, slow_rounds = args.rounds or 3, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rule = kept_share_rule(args, ap, hidden)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message="GNSP: ")

    print(f"# gnsp_optim overhead, {datetime.date.today().isoformat()}, CPU ({platform.processor() or 'cpu'},"
          " "
          f"{torch.get_num_threads()} threads), torch {torch.__version__}")
    print(f"# {blocks} MLP block(s) width {width} / hidden {hidden}"
          f"{f' + proj {width}x{head}' if head else ''}; alpha={args.alpha}, "
          f"{f'kept shares {args.kept_share}' if rule else f'rho={args.rho}'}; "
          f"{rounds} interleaved rounds (end_task: {slow_rounds}), medians")
    rows: list[tuple[str, str, str, str, str, str]] = []

    def row(name: str, ours: float, other: float, target: float | None, other_label: str = "",
            kind: str = "t") -> None:
        ratio = ours / other if other > 0 else float("inf")
        f = fmt_t if kind == "t" else fmt_b
        met = "-" if target is None else ("yes" if ratio <= target else "no")
        rows.append((name, f(ours), f"{f(other)}{' ' + other_label if other_label else ''}", f"{ratio:.2f}x",
                     "-" if target is None else f"<= {target}x", met))

    # ---------------------------------------------------------------- model, protection, task-1 statistics
    model = Tower(width, hidden, blocks, head, bias=False)
    protect = ["resblocks.*.c_fc.weight", "resblocks.*.c_proj.weight"] + (["proj"] if head else [])
    cls_token = FeatureSource("ln_post", select=lambda t: t[:, 0] if t.dim() == 3 else t)
    sources = {"proj": cls_token} if head else {}
    ours_opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), model, rho=args.rho, rule=rule,
                                  protect=protect, feature_sources=sources, uncovered="train")
    x_w, x_h = power_law_inputs(width, args.alpha, gen), power_law_inputs(hidden, args.alpha, gen)

    def collect_task() -> None:
        with ours_opt.collect(), torch.no_grad():
            for blk in model.resblocks:
                blk.c_fc(x_w)
                blk.c_proj(x_h)
            if head:
                model.ln_post(x_w)

    # ---------------------------------------------------------------- 2. end_task: eigh vs full svd
    covs: dict[str, torch.Tensor] = {}

    def ours_end_task() -> None:
        ours_opt.end_task()

    def public_end_task() -> None:
        for name, cov in covs.items():
            dense[name] = public_projector(cov, args.rho, rule)

    collect_task()
    for b in ours_opt.blocks:
        covs[b.name] = b.stat.task_contribution()[0, : b.stat.dim, : b.stat.dim].clone()
    dense: dict[str, torch.Tensor] = {}
    end_times = interleaved({"ours": ours_end_task, "public": public_end_task}, slow_rounds,
                            prep=lambda: None if ours_opt.blocks[0].stat.seen else collect_task())
    # (prep re-collects for our side when a previous end_task consumed the collection; it is not timed)
    row("end_task (eigh vs svd + dense P)", end_times["ours"], end_times["public"], 0.5)

    # ---------------------------------------------------------------- 1. per-step projection
    params = [p for b in ours_opt.blocks for p in (b.weight,)]
    by_name = {b.name: b for b in ours_opt.blocks}
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params]
    base_alone = torch.optim.AdamW(model.parameters(), lr=1e-5)
    public_base = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ours_update = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), model, rho=args.rho, rule=rule,
                                     protect=protect, feature_sources=sources, uncovered="train",
                                     mode="update")
    ours_update.projectors = ours_opt.projectors  # the same projectors, update mode
    ours_batched = NullSpaceOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-5), model, rho=args.rho, rule=rule,
                                      protect=protect, feature_sources=sources, uncovered="train",
                                      batch_layers=True)
    ours_batched.projectors = ours_opt.projectors  # the same projectors, equal shapes in one product
    for extra in (ours_update, ours_batched):  # only ours_opt collects (no public hook removal yet: issue 13)
        extra._hooks.remove()
    dense_by_param = [(by_name[n].weight, P, by_name[n].transposed) for n, P in dense.items()]

    def set_grads() -> None:
        for p, g in zip(params, grads, strict=True):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def public_project() -> None:
        for p, P, transposed in dense_by_param:
            p.grad = (P @ p.grad) if transposed else (p.grad @ P)  # x @ W layout: P acts on the rows

    def public_step() -> None:
        public_project()
        public_base.step()

    pairs = [(b, ours_opt.projectors[b.name]) for b in ours_opt.blocks]
    batched_cache: dict = {}

    def ours_project() -> None:  # what step() does before the base step, grad mode
        project_gradients(pairs)

    def ours_project_batched() -> None:
        project_gradients(pairs, batched=True, cache=batched_cache)

    for opt in (base_alone, public_base, ours_opt, ours_update):  # allocate AdamW state before timing
        set_grads()
        opt.step()
    step_times = interleaved({
        "adamw": base_alone.step, "ours_step": ours_opt.step, "ours_update_step": ours_update.step,
        "public_step": public_step, "ours_proj": ours_project, "public_proj": public_project,
        "ours_proj_batched": ours_project_batched,
    }, rounds, prep=set_grads)
    t = step_times
    row("projection per step (ours vs dense g @ P)", t["ours_proj"], t["public_proj"], 0.5)
    if blocks > 1:
        row(f"projection, batch_layers=True vs per layer ({blocks} layers per shape)", t["ours_proj_batched"],
            t["ours_proj"], None, "(per layer)")
    o_over, p_over = t["ours_step"] - t["adamw"], t["public_step"] - t["adamw"]
    row("step overhead over AdamW, grad mode (ours vs public)", max(o_over, 0.0), max(p_over, 1e-9), 0.5)
    row("AdamW + projection, grad mode vs AdamW alone", t["ours_step"], t["adamw"], None, "(AdamW)")
    row("AdamW + dense g @ P vs AdamW alone (public)", t["public_step"], t["adamw"], None, "(AdamW)")
    row("AdamW + projection, update mode vs AdamW alone", t["ours_update_step"], t["adamw"], None, "(AdamW)")

    # ---------------------------------------------------------------- 3. collection
    net = Tower(width, hidden, blocks, head, bias=True).eval()
    plain = copy.deepcopy(net)
    hooked_opt = NullSpaceOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-5), net, rho=args.rho,
                                    protect=[*protect, "resblocks.*.bias"], feature_sources=sources,
                                    uncovered="train")
    x = torch.randn(batch, tokens, width, generator=gen)

    # the same tower with bounded statistics: a frequent-directions sketch for the widest input (c_proj's)
    sk_net = copy.deepcopy(plain)
    sk_opt = NullSpaceOptimizer(torch.optim.AdamW(sk_net.parameters(), lr=1e-5), sk_net, rho=args.rho,
                                protect=[*protect, "resblocks.*.bias"], feature_sources=sources,
                                uncovered="train", statistics="sketch", sketch_rank=min(256, hidden // 4),
                                sketch_min_width=hidden + 1)

    def run_collect() -> None:
        with hooked_opt.collect():
            net(x)

    def run_collect_sketch() -> None:
        with sk_opt.collect():
            sk_net(x)

    with torch.no_grad():
        for f in (lambda: plain(x), lambda: net(x), run_collect, run_collect_sketch):
            f()  # warm-up (allocates the statistics buffers)
        ct = interleaved({"plain": lambda: plain(x), "hooked": lambda: net(x), "collect": run_collect,
                          "collect_sketch": run_collect_sketch}, rounds)
    hooked_opt.discard_collection()
    sk_opt.discard_collection()
    row(f"collecting forward vs plain ({batch}x{tokens} tokens)", ct["collect"], ct["plain"], 1.3, "(plain)")
    row("forward with hooks, collect() closed vs plain", ct["hooked"], ct["plain"], 1.05, "(plain)")
    n_sk = sum(type(b.stat).__name__ == "SketchStat" for b in sk_opt.blocks)
    row(f"collecting forward, statistics='sketch' ({n_sk} sketched inputs, rank {min(256, hidden // 4)}) "
        "vs exact", ct["collect_sketch"], ct["collect"], None, "(exact)")

    # ---------------------------------------------------------------- 3b. row subsampling: saving vs drift
    # old-task tokens with power-law structure; after collecting (all rows or a share), 10 AdamW update-mode
    # steps on new data; drift = relative change of the old outputs (unprotected run for scale)
    mix = power_law_inputs(width, args.alpha, gen)
    x_old = torch.randn(batch, tokens, width, generator=gen) @ mix
    x_new = torch.randn(batch, tokens, width, generator=gen)

    def drift_after(frac: float | None, rho: float = args.rho) -> float:
        torch.manual_seed(args.seed)
        tower = copy.deepcopy(plain).train()
        base = torch.optim.AdamW(tower.parameters(), lr=1e-3)
        opt = base
        if frac is not None:
            opt = NullSpaceOptimizer(base, tower, rho=rho, mode="update",
                                     protect=[*protect, "resblocks.*.bias"], feature_sources=sources,
                                     uncovered="train")
            with opt.collect(row_fraction=frac), torch.no_grad():
                tower(x_old)
            opt.end_task()
        with torch.no_grad():
            y0 = tower(x_old)
        for _ in range(10):
            opt.zero_grad()
            tower(x_new).square().mean().backward()
            opt.step()
        with torch.no_grad():
            return ((tower(x_old) - y0).norm() / y0.norm()).item()

    free = drift_after(None)
    subsample_rows = []
    for frac in (1.0, 0.5, 0.25):
        def run_frac(f=frac) -> None:
            with hooked_opt.collect(row_fraction=f):
                net(x)

        with torch.no_grad():
            run_frac()
            st = interleaved({"plain": lambda: plain(x), "collect": run_frac}, rounds)
        subsample_rows.append((frac, st["collect"] / st["plain"], drift_after(frac), drift_after(frac, 1e-4)))
    hooked_opt.discard_collection()

    stat_new = CovarianceStat("new", hidden)
    stat_old = CovarianceStat("old", hidden)
    xs = torch.randn(batch * tokens, hidden, generator=gen)
    stat_new.update(xs)
    previous_update(stat_old, xs)
    ut = interleaved({"new": lambda: stat_new.update(xs), "old": lambda: previous_update(stat_old, xs)},
                     rounds)
    row(f"CovarianceStat.update, {batch * tokens}x{hidden} (now vs previous)", ut["new"], ut["old"], None,
        "(previous)")

    # ---------------------------------------------------------------- 4. memory
    ours_bytes = sum(r["projector_bytes"] for r in ours_opt.report())
    dense_bytes = sum(P.numel() * P.element_size() for P in dense.values())
    row("projector memory (report() vs dense d x d)", ours_bytes, dense_bytes, 0.5, kind="b")

    # ---------------------------------------------------------------- print
    print()
    print(HEADER)
    print("|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(f"row subsampling in collect(): collecting forward / plain forward, and the old outputs' relative "
          f"drift after 10 update-mode AdamW steps on new data (unprotected drift {free:.3e})")
    print(f"| row_fraction | collect / plain | drift, rho={args.rho} | / unprotected | drift, rho=1e-4 "
          f"| / unprotected |")
    print("|---|---|---|---|---|---|")
    for frac, ratio, drift, strict in subsample_rows:
        print(f"| {frac:.2f} | {ratio:.2f}x | {drift:.3e} | {drift / free:.3f} | {strict:.3e} | "
              f"{strict / free:.3f} |")
    print()
    print("per layer: name, input dim, kept rank k, stored basis width min(k, d-k), ours MiB vs dense MiB")
    for r in ours_opt.report():
        d = r["input_dim"] * r["groups"]
        k = r["kept_rank"]
        print(f"  {r['layer']:<28} d={d:<5} k={k:<5} width={min(k, d - k):<5} "
              f"{r['projector_bytes'] / 2**20:7.2f} vs {d * d * 4 / 2**20:7.2f}")
    return 0


def kept_share_rule(args: argparse.Namespace, ap: argparse.ArgumentParser,
                    hidden: int) -> Callable[[torch.Tensor], int] | None:
    """``--kept-share FC,PROJ`` as a rank rule: ``PROJ`` of the dimension for ``c_proj``'s ``hidden``-d input
    (``hidden + 1`` with a bias), ``FC`` of it for every other layer; None without the option."""
    if not args.kept_share:
        return None
    try:
        share_fc, share_proj = (float(v) for v in args.kept_share.split(","))
    except ValueError:
        ap.error(f"--kept-share wants two numbers FC,PROJ, got {args.kept_share!r}")
    if not (0.0 <= share_fc <= 1.0 and 0.0 <= share_proj <= 1.0):
        ap.error(f"--kept-share: shares must lie in [0, 1], got {args.kept_share!r}")

    def rule(lam: torch.Tensor) -> int:
        d = lam.numel()
        return round((share_proj if d in (hidden, hidden + 1) else share_fc) * d)

    return rule


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clip_step(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:  # noqa: C901, PLR0915
    """``--clip-step``: a whole CLIP training step, plain AdamW vs GNSP (grad / update mode), side by side.

    (A straight script like :func:`main`, exempt from the complexity limits for the same reason.)
    """
    import contextlib
    import fnmatch

    import torch.nn.functional as F

    from gnsp_optim import GNSP_CLIP_VISUAL
    from gnsp_optim.reference.model import CLIP, CLIPConfig

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    bf16 = (device.type == "cuda") if args.bf16 is None else args.bf16
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    cfg = CLIPConfig.tiny(vision_layers=2, text_layers=2) if args.quick else CLIPConfig.vit_b16()
    rounds = args.rounds or (3 if args.quick else 10)
    batch = args.batch if not args.quick else min(args.batch, 4)
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message="GNSP: ")
    model = CLIP(cfg).to(device)
    for name, p in model.named_parameters():  # GNSP's preset trains, on both sides; everything else is frozen
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in GNSP_CLIP_VISUAL))
    trainable = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    size = cfg.image_size
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    n_classes, length = 20, min(cfg.context_length, 16)
    tokens = torch.randint(1, cfg.vocab_size - 1, (n_classes, cfg.context_length), generator=gen)
    tokens[:, length - 1] = cfg.vocab_size - 1  # EOT
    tokens[:, length:] = 0
    tokens = tokens.to(device)
    labels = torch.randint(0, n_classes, (batch,), generator=gen).to(device)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    sources = {"visual.proj": FeatureSource("visual.ln_post", select=lambda t: t[:, 0] if t.dim() == 3 else t)}

    rule = kept_share_rule(args, ap, 4 * cfg.vision_width)

    def make(mode: str) -> NullSpaceOptimizer:
        return NullSpaceOptimizer(torch.optim.AdamW(trainable, lr=1e-5), model, rho=args.rho, rule=rule,
                                  mode=mode, protect=GNSP_CLIP_VISUAL, feature_sources=sources,
                                  stats_chunk_rows=args.stats_chunk_rows)

    plain = torch.optim.AdamW(trainable, lr=1e-5)
    grad_opt, update_opt = make("grad"), make("update")
    stat_images = [torch.randn(batch, 3, size, size, generator=gen).to(device) for _ in range(4)]

    def collect_pass() -> None:
        with grad_opt.collect(), torch.no_grad(), amp():
            for x in stat_images:
                model.encode_image(x)
        _sync(device)

    def end_task() -> None:
        grad_opt.end_task()
        _sync(device)

    model.eval()
    with torch.no_grad(), amp():
        model.encode_image(images)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    collect_pass()
    t_collect_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    end_task()
    t_end = time.perf_counter() - t0
    update_opt.projectors = grad_opt.projectors  # the same projectors, update mode
    update_opt._hooks.remove()  # only grad_opt collects (no public hook removal yet: issue 13)

    def plain_forward() -> None:
        with torch.no_grad(), amp():
            model.encode_image(images)
        _sync(device)

    def collecting_forward() -> None:
        with grad_opt.collect(), torch.no_grad(), amp():
            model.encode_image(images)
        _sync(device)

    fwd = interleaved({"plain": plain_forward, "collect": collecting_forward}, rounds)
    grad_opt.discard_collection()
    model.train()

    def train_step(opt: torch.optim.Optimizer) -> Callable[[], None]:
        def run() -> None:
            opt.zero_grad(set_to_none=True)
            with amp():
                img = F.normalize(model.encode_image(images), dim=-1)
                txt = F.normalize(model.encode_text(tokens), dim=-1)
                loss = F.cross_entropy(100.0 * img @ txt.T, labels)
            loss.backward()
            opt.step()
            _sync(device)
        return run

    variants = {"adamw": train_step(plain), "gnsp_grad": train_step(grad_opt), "gnsp_update": train_step(update_opt)}
    for f in variants.values():  # warm-up: kernels, allocator, AdamW state
        f()
    st = interleaved(variants, rounds)
    ranks = [(r["layer"], r["input_dim"], r["kept_rank"]) for r in grad_opt.report()]
    print(f"# gnsp_optim --clip-step, {datetime.date.today().isoformat()}, {device.type}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}, {'bf16 autocast' if bf16 else 'float32'}")
    print(f"# CLIP {'tiny' if args.quick else 'ViT-B/16'}, batch {batch} images + {n_classes} prompts; "
          f"trains {len(trainable)} tensors (GNSP_CLIP_VISUAL), "
          f"{f'kept shares {args.kept_share}' if rule else f'rho={args.rho}'}; {rounds} interleaved rounds")
    print()
    print("| measurement | time | ratio |")
    print("|---|---|---|")
    print(f"| training step, AdamW alone | {fmt_t(st['adamw'])} | 1.00x |")
    for key, label in (("gnsp_grad", "GNSP grad mode"), ("gnsp_update", "GNSP update mode")):
        print(f"| training step, AdamW + {label} | {fmt_t(st[key])} | {st[key] / st['adamw']:.2f}x |")
    print(f"| image forward, plain | {fmt_t(fwd['plain'])} | 1.00x |")
    print(f"| image forward, collect() open | {fmt_t(fwd['collect'])} | {fwd['collect'] / fwd['plain']:.2f}x |")
    print(f"| statistics pass ({len(stat_images)} batches, first call) | {fmt_t(t_collect_first)} | - |")
    print(f"| end_task ({len(ranks)} layers) | {fmt_t(t_end)} | - |")
    print()
    print("kept ranks: " + ", ".join(f"{n.replace('visual.transformer.resblocks.', '')} {k}/{d}"
                                    for n, d, k in ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
