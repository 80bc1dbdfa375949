r"""The main job as a library: build a setup, run every (method, seed) job, aggregate over seeds, write outputs.

Read top-down, a run is: :class:`ExperimentSpec` (what to run) -> :func:`offline_setup` or :func:`mtil_setup`
(tasks, tokenizer, the pre-trained model, reference pairs per task, the held-out caption set) ->
:func:`run_jobs` (each ``(method, seed)`` through :func:`~.continual.run_continual`, in worker processes
with one thread each) -> :func:`aggregate` (mean and standard error over seeds, paired differences) ->
:func:`write_outputs` (``results.json``, CSVs, plots) and :func:`format_table`.

``benchmarks/mtil_clip.py`` is the command line over this module.

Example::

    spec = ExperimentSpec(methods=("finetune", "gnsp+cd+map"), seeds=(1, 2, 3), out="results/x")
    payload = run_experiment(spec)
    payload["methods"]["gnsp+cd+map"]["average"], payload["methods"]["gnsp+cd+map"]["average_se"]
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .continual import (
    METHODS,
    ContinualTask,
    RunConfig,
    check_fsdp_method,
    dist_info,
    run_continual,
    with_overrides,
)
from .files import atomic_write_text

__all__ = ["DEFAULT_METHODS", "ExperimentSpec", "Setup", "aggregate", "diagnostics", "format_table",
           "merge_results", "mtil_setup", "offline_setup", "paired_difference", "run_experiment", "run_jobs",
           "write_outputs"]

CONFIGS = Path(__file__).with_name("configs")

#: Methods of the default offline run (others by name, see ``continual.METHODS``).
DEFAULT_METHODS = ("zeroshot", "finetune", "finetune+cd", "gnsp", "gnsp+cd+map", "gnsp+cd+map/update",
                   "gnsp+cd+map/all")
#: Every method is compared, paired over seeds, with these two.
BASELINES = ("finetune", "gnsp+cd+map")


@dataclass(frozen=True)
class ExperimentSpec:
    """What one benchmark run does. ``mode``: ``"offline"`` (the mini-MTIL) or ``"mtil"`` (real data).

    ``seeds``: fine-tuning seeds (the pre-trained model is one fixed checkpoint); ``workers``: processes
    running ``(method, seed)`` jobs side by side, one torch thread each (``1``: in this process).
    ``quick``: the same pipeline on reduced data and iterations (a smoke test). ``fsdp``: shard each job's
    model with FSDP2 over the ranks of a ``torchrun`` launch (``RunConfig.fsdp``; jobs then run one after
    another in the launched processes).

    Example:
        >>> ExperimentSpec(seeds=(1, 2)).seeds
        (1, 2)
    """

    mode: str = "offline"
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (1, 2, 3)
    out: str = "results/run"
    workers: int = 2
    resume: bool = False
    progress: bool = True
    quick: bool = False
    device: str = "cpu"
    rho: float | None = None
    iterations: int | None = None
    warmup: int | None = None
    checkpoint: str | None = None
    schedule: str | None = None
    # real MTIL
    data_root: str | None = None
    clip: str | None = None
    bpe: str | None = None
    order: str = "I"
    tasks: tuple[str, ...] | None = None
    ref_size: int = 1000
    open_clip_model: str | None = None
    fsdp: bool = False

    def method(self, name: str):
        """The preset ``name`` with this run's overrides (``rho``)."""
        m = METHODS[name]
        return with_overrides(m, rho=self.rho) if self.rho is not None else m


@dataclass
class Setup:
    """Everything a job needs: tasks, tokenizer, the model to start from, reference pairs per (task, seed)."""

    tasks: list[ContinualTask]
    tokenizer: Callable
    model: torch.nn.Module
    references: Callable[[int, int], Any]
    pairs: Any
    run: RunConfig
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def task_records(self) -> list[dict[str, Any]]:
        """``[{"name", "n_test", "chance"}]`` (chance in percent)."""
        return [{"name": t.name, "n_test": len(t.test), "chance": 100.0 / len(t.classnames)} for t in self.tasks]


# ------------------------------------------------------------------------------------------------ setups
def load_schedule(path: str | os.PathLike) -> dict[str, Any]:
    """A task-order config: ``tasks``, per-task ``lr`` and ``iterations``, batches, warm-up (JSON).

    Example:
        >>> load_schedule(CONFIGS / "mtil_order_I.json")["iterations"][0]
        100
    """
    with open(path) as f:
        cfg = json.load(f)
    n = len(cfg["tasks"])
    if len(cfg["lr"]) != n or len(cfg["iterations"]) != n:
        raise ValueError(f"{path}: 'lr' and 'iterations' need one entry per task ({n})")
    return cfg


#: Reduced sizes of ``--quick`` (same pipeline, same checkpoint).
QUICK = dict(n_train=64, n_test=50, n_caption=32, n_reference=32, iterations=2, warmup=1, batch_size=16,
             ref_batch_size=16)


def offline_setup(spec: ExperimentSpec) -> Setup:
    """The offline mini-MTIL: the shipped tiny CLIP (hash verified), 7 tasks, per-task schedule, references.

    Example::

        setup = offline_setup(ExperimentSpec(quick=True))
        [t.name for t in setup.tasks]
    """
    from .pretrain import TensorImageDataset
    from .tinyclip import CHECKPOINT_PATH, build_offline_data, load_tiny_clip

    model, tok, record = load_tiny_clip(spec.checkpoint or CHECKPOINT_PATH)
    sched = load_schedule(spec.schedule or CONFIGS / "offline_mini_mtil.json")
    sizes = dict(n_train=sched["n_train"], n_test=sched["n_test"], n_caption=sched["n_caption"],
                 n_reference=sched["n_reference"])
    batch, ref_batch, warmup = sched["batch_size"], sched["reference_batch_size"], sched["warmup"]
    iterations = list(sched["iterations"])
    if spec.quick:
        sizes = {k: QUICK[k] for k in sizes}
        batch, ref_batch, warmup = QUICK["batch_size"], QUICK["ref_batch_size"], QUICK["warmup"]
        iterations = [QUICK["iterations"]] * len(iterations)
    if spec.iterations is not None:
        iterations = [spec.iterations] * len(iterations)
    if spec.warmup is not None:
        warmup = spec.warmup
    data = build_offline_data(**sizes)
    if [t.name for t in data.tasks] != sched["tasks"]:
        raise ValueError(f"schedule tasks {sched['tasks']} differ from the data's {[t.name for t in data.tasks]}")
    tasks = [ContinualTask(t.name, t.classnames, t.templates, TensorImageDataset(t.train_images, t.train_labels),
                           TensorImageDataset(t.test_images, t.test_labels), lr, it)
             for t, lr, it in zip(data.tasks, sched["lr"], iterations, strict=True)]
    run = RunConfig(batch_size=batch, ref_batch_size=ref_batch, warmup=warmup, device=spec.device,
                    progress=spec.progress, resume=spec.resume, fsdp=spec.fsdp)
    info = {"checkpoint": record.get("file"), "checkpoint_sha256": record.get("sha256"),
            "pretrain_seconds": record.get("train_seconds"), "logit_scale": float(model.logit_scale.detach().exp()),
            **sizes, "lr": list(sched["lr"]), "iterations": iterations}
    return Setup(tasks, tok, model, data.reference_set, data.caption_set, run, info)


def mtil_setup(spec: ExperimentSpec) -> Setup:
    """The real MTIL protocol: 11 datasets (Order I / II), a real CLIP, a fresh ImageNet reference set per task.

    ``spec.clip`` is a local OpenAI / open_clip checkpoint read by :func:`~.model.load_clip_state_dict`, or with
    ``spec.open_clip_model`` an open_clip model built by name (``spec.clip`` then optional weights).

    Example::

        setup = mtil_setup(ExperimentSpec(mode="mtil", data_root="/data", clip="ViT-B-16.pt"))
    """
    from .data import imagenet_reference_set, load_mtil_dataset
    from .data.images import CLIPImageTransform

    sched = load_schedule(CONFIGS / f"mtil_order_{spec.order}.json")
    if spec.open_clip_model:
        from .model import open_clip_as_reference

        model, tok = open_clip_as_reference(spec.open_clip_model, spec.clip)
    else:
        from .model import load_clip_state_dict
        from .tokenizer import load_bpe_tokenizer

        model = load_clip_state_dict(spec.clip)
        tok = load_bpe_tokenizer(spec.bpe, context_length=model.config.context_length)
        if tok.vocab_size != model.config.vocab_size:
            raise ValueError(f"the BPE vocabulary has {tok.vocab_size} tokens but the model expects "
                             f"{model.config.vocab_size}: wrong --bpe file for these weights")
    transform = CLIPImageTransform(model.config.image_size)
    wanted = list(spec.tasks) if spec.tasks else sched["tasks"]
    unknown = [t for t in wanted if t not in sched["tasks"]]
    if unknown:
        raise ValueError(f"--tasks: {unknown} are not MTIL tasks {sched['tasks']}")
    tasks = []
    for name, lr, iters in zip(sched["tasks"], sched["lr"], sched["iterations"], strict=True):
        if name not in wanted:
            continue
        train = load_mtil_dataset(name, spec.data_root, "train", transform)
        test = load_mtil_dataset(name, spec.data_root, "test", transform)
        tasks.append(ContinualTask(name, list(train.classnames), list(train.templates), train, test, lr,
                                   spec.iterations or iters))

    def references(task_index: int, seed: int):
        # a fresh ImageNet reference set per task, drawn with a per-task seed (GNSP: 1,000 per task)
        return imagenet_reference_set(spec.data_root, n=spec.ref_size, seed=10_000 * (seed + 1) + task_index,
                                      transform=transform)

    pairs = references(-1, 0)  # held-out paired set for the gap and retrieval: its own seed
    run = RunConfig(batch_size=sched["batch_size"], ref_batch_size=sched["reference_batch_size"],
                    warmup=sched["warmup"] if spec.warmup is None else spec.warmup, device=spec.device,
                    progress=spec.progress, resume=spec.resume, fsdp=spec.fsdp)
    info = {"order": spec.order, "clip": spec.clip, "open_clip_model": spec.open_clip_model,
            "lr": [t.lr for t in tasks], "iterations": [t.iterations for t in tasks]}
    return Setup(tasks, tok, model, references, pairs, run, info)


def build_setup(spec: ExperimentSpec) -> Setup:
    """:func:`offline_setup` or :func:`mtil_setup`, as ``spec.mode`` says."""
    if spec.mode == "offline":
        return offline_setup(spec)
    if spec.mode == "mtil":
        return mtil_setup(spec)
    raise ValueError(f"ExperimentSpec.mode must be 'offline' or 'mtil', got {spec.mode!r}")


# ------------------------------------------------------------------------------------------------ jobs
def job_dir(out: str, method: str, seed: int) -> str:
    """Where one job writes: ``out/<method with / as _>/seed<seed>``."""
    return os.path.join(out, method.replace("/", "_"), f"seed{seed}")


def run_job(spec: ExperimentSpec, setup: Setup, method_name: str, seed: int, log=print) -> dict[str, Any]:
    """Train one method with one seed from the setup's model (a fresh copy) and return its result."""
    import copy

    method = spec.method(method_name)
    out_dir = job_dir(spec.out, method_name, seed)
    done = os.path.join(out_dir, "results.json")
    if spec.resume and os.path.exists(done):
        with open(done) as f:
            prev = json.load(f)
        if prev.get("config") == asdict(method) and prev.get("seed") == seed:
            log(f"[{method_name} seed {seed}] resumed after task {len(prev['matrix'])} of {len(setup.tasks)} "
                "(finished)")
            return prev
    model = copy.deepcopy(setup.model)

    def references(i: int):
        return setup.references(i, seed)

    config = replace(setup.run, seed=seed, out_dir=out_dir)
    return run_continual(model, setup.tokenizer, setup.tasks, method, config, references=references,
                         pairs=setup.pairs, log=log)


_WORKER: dict[str, Any] = {}


def _worker_init(spec: ExperimentSpec, parent: int) -> None:
    torch.set_num_threads(1)
    try:  # die with the parent (a killed run must leave no orphan writing into its folder)
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)
    _WORKER["spec"], _WORKER["setup"] = spec, build_setup(spec)


def _worker_job(method_name: str, seed: int) -> tuple[dict[str, Any], list[str]]:
    lines: list[str] = []
    result = run_job(_WORKER["spec"], _WORKER["setup"], method_name, seed, log=lines.append)
    return result, lines


def _job_cost(spec: ExperimentSpec, name: str) -> float:
    m = spec.method(name)
    if not m.train:
        return 0.1
    cost = 1.0 + 0.6 * m.uses_reference + 0.3 * (m.layers is None and m.projection)
    return cost


def run_jobs(spec: ExperimentSpec, setup: Setup | None = None, log=print) -> dict[str, dict[int, dict]]:
    """Every ``(method, seed)`` of ``spec``; returns ``{method: {seed: result}}``.

    ``zeroshot`` does not depend on the seed: it is evaluated once and its result stands for every seed (so
    paired differences to it are well defined). With ``spec.workers > 1`` (and not under ``torchrun``) the
    jobs run in that many spawned processes with one torch thread each, longest first.
    """
    jobs = [(m, s) for m in spec.methods for s in (spec.seeds[:1] if m == "zeroshot" else spec.seeds)]
    jobs.sort(key=lambda j: -_job_cost(spec, j[0]))
    results: dict[str, dict[int, dict]] = {m: {} for m in spec.methods}
    t0 = time.time()
    bar = None
    if spec.progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(jobs), desc="jobs (method x seed)", dynamic_ncols=True)
        except ImportError:
            bar = None

    def done(m: str, s: int, r: dict, lines: Sequence[str] = ()) -> None:
        for line in lines:
            log(line)
        results[m][s] = r
        if bar is not None:
            bar.update(1)
        log(f"{m:<22} seed {s}: Transfer {r['transfer']:5.1f}  Average {r['average']:5.1f}  Last {r['last']:5.1f}"
            f"  ({r['train_seconds']:.0f}s training, {time.time() - t0:.0f}s elapsed)")

    workers = min(spec.workers, len(jobs))
    if workers <= 1 or dist_info()[1] > 1:
        setup = setup if setup is not None else build_setup(spec)
        for m, s in jobs:
            done(m, s, run_job(spec, setup, m, s, log=log))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                 initargs=(replace(spec, progress=False), os.getpid())) as pool:
            futures = {pool.submit(_worker_job, m, s): (m, s) for m, s in jobs}
            for fut in as_completed(futures):
                m, s = futures[fut]
                r, lines = fut.result()
                done(m, s, r, lines)
    if bar is not None:
        bar.close()
    if "zeroshot" in results:  # one evaluation stands for every seed
        only = next(iter(results["zeroshot"].values()))
        results["zeroshot"] = {s: {**only, "seed": s} for s in spec.seeds}
    return {m: dict(sorted(results[m].items())) for m in spec.methods}


# ------------------------------------------------------------------------------------------------ statistics
def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``; ``nan`` for one value).

    Example:
        >>> mean_se([1.0, 2.0, 3.0])
        (2.0, 0.5773502691896257)
    """
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean and standard error of ``a[s] - b[s]`` over the seeds both have, and how many they share.

    Example:
        >>> paired_difference({1: 5.0, 2: 7.0}, {1: 4.0, 2: 4.0})
        (2.0, 1.0, 2)
    """
    common = sorted(set(a) & set(b))
    if not common:
        return math.nan, math.nan, 0
    m, se = mean_se([a[s] - b[s] for s in common])
    return m, se, len(common)


def _forgetting(m: list[list[float]]) -> float:
    if len(m) < 2:
        return math.nan
    drops = [max(m[i][j] for i in range(j, len(m))) - m[-1][j] for j in range(len(m) - 1)]
    return sum(drops) / len(drops)


def _learning(m: list[list[float]]) -> float:
    return sum(m[i][i] for i in range(len(m))) / len(m)


METRICS = ("transfer", "average", "last")


def aggregate(results: dict[str, dict[int, dict]], task_records: list[dict], config: dict[str, Any],
              seconds: float) -> dict[str, Any]:
    """The ``results.json`` payload: per method its seeds, mean +- SE, paired differences, alignment per task.

    Per method: ``seeds`` (one record per seed: ``seed, matrix, transfer, average, last`` and the per-task
    alignment), ``transfer`` / ``average`` / ``last`` (mean over seeds) with ``*_se``, ``matrix`` (mean),
    ``modality_gap`` / ``retrieval_r1`` (after each task, mean over seeds, with ``*_se`` and the value before
    training in ``*_before``), ``learning`` (mean diagonal) and ``forgetting`` with SEs, and ``vs_<baseline>``:
    the paired difference to each of :data:`BASELINES` (``{metric: d, metric_se: se, "seeds": n}``).
    """
    out: dict[str, Any] = {"tasks": task_records, "methods": {}, "config": config, "seconds": seconds}
    derived = {"learning": _learning, "forgetting": _forgetting}
    per_metric: dict[str, dict[str, dict[int, float]]] = {}
    for name, runs in results.items():
        per_metric[name] = {k: {s: r[k] for s, r in runs.items()} for k in METRICS}
        for k, fn in derived.items():
            per_metric[name][k] = {s: fn(r["matrix"]) for s, r in runs.items()}
    for name, runs in results.items():
        seeds = [{"seed": s, "matrix": r["matrix"], "transfer": r["transfer"], "average": r["average"],
                  "last": r["last"], "alignment": r["alignment"], "train_seconds": r["train_seconds"]}
                 for s, r in runs.items()]
        rec: dict[str, Any] = {"seeds": seeds}
        for k in METRICS + ("learning", "forgetting"):
            rec[k], rec[f"{k}_se"] = mean_se(list(per_metric[name][k].values()))
        t = len(task_records)
        rec["matrix"] = [[mean_se([r["matrix"][i][j] for r in runs.values()])[0] for j in range(t)]
                         for i in range(len(next(iter(runs.values()))["matrix"]))]
        for key, src in (("modality_gap", "modality_gap"), ("retrieval_r1", "retrieval_R@1")):
            series = [[a.get(src, math.nan) for a in r["alignment"]] for r in runs.values()]
            if not series[0] or all(math.isnan(v) for v in series[0]):
                rec[key], rec[f"{key}_se"], rec[f"{key}_before"] = None, None, None
                continue
            rec[f"{key}_before"] = mean_se([s[0] for s in series])[0]
            stats = [mean_se([s[i] for s in series]) for i in range(1, len(series[0]))]
            rec[key], rec[f"{key}_se"] = [m for m, _ in stats], [e for _, e in stats]
        rec["train_seconds"] = mean_se([r["train_seconds"] for r in runs.values()])[0]
        for base in BASELINES:
            if base not in results or base == name:
                continue
            d: dict[str, Any] = {}
            for k in METRICS:
                d[k], d[f"{k}_se"], d["seeds"] = paired_difference(per_metric[name][k], per_metric[base][k])
            rec[f"vs_{base}"] = d
        out["methods"][name] = rec
    return _json_safe(out)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------ reports
def _pm(v: float | None, se: float | None, width: int = 12) -> str:
    if v is None:
        return f"{'-':>{width}}"
    s = f"{v:.1f}" + (f" +- {se:.1f}" if se is not None else "")
    return f"{s:>{width}}"


def _sig(d: float | None, se: float | None) -> str:
    return "*" if d is not None and se is not None and se > 0 and abs(d) > 2 * se else (
        "*" if d is not None and se == 0 and d != 0 else " ")


def format_table(payload: dict[str, Any]) -> str:
    """Mean +- SE over seeds per method; then the paired differences (``*``: beyond two standard errors).

    Example::

        print(format_table(json.load(open("results/x/results.json"))))
    """
    methods = payload["methods"]
    n_seeds = max(len(m["seeds"]) for m in methods.values())
    head = (f"{'method':<22} {'Transfer':>12} {'Average':>12} {'Last':>12} {'learning':>12} {'forgetting':>12} "
            f"{'gap':>6} {'R@1':>6}")
    lines = [f"mean +- standard error over {n_seeds} seed(s); gap / R@1 after the last task", head, "-" * len(head)]
    for name, r in methods.items():
        gap = r["modality_gap"][-1] if r.get("modality_gap") else None
        r1 = r["retrieval_r1"][-1] if r.get("retrieval_r1") else None
        lines.append(f"{name:<22} {_pm(r['transfer'], r['transfer_se'])} {_pm(r['average'], r['average_se'])} "
                     f"{_pm(r['last'], r['last_se'])} {_pm(r['learning'], r['learning_se'])} "
                     f"{_pm(r['forgetting'], r['forgetting_se'])} "
                     f"{'-' if gap is None else format(gap, '.3f'):>6} {'-' if r1 is None else format(r1, '.1f'):>6}")
    for base in BASELINES:
        rows = [(n, r[f"vs_{base}"]) for n, r in methods.items() if f"vs_{base}" in r]
        if not rows:
            continue
        lines += ["", f"paired difference to {base} (mean +- SE over seeds; * beyond 2 SE)",
                  f"{'method':<22} {'Transfer':>14} {'Average':>14} {'Last':>14}"]
        for n, d in rows:
            cells = [f"{_pm(d[k], d[k + '_se'], 12)}{_sig(d[k], d[k + '_se'])}" for k in METRICS]
            lines.append(f"{n:<22} " + " ".join(f"{c:>14}" for c in cells))
    return "\n".join(lines)


def diagnostics(payload: dict[str, Any]) -> list[str]:
    """Lines that say whether the benchmark can tell methods apart: zero-shot against chance, learning and
    forgetting per method (means over seeds)."""
    tasks = payload["tasks"]
    methods = payload["methods"]
    lines = []
    if "zeroshot" in methods:
        zs = methods["zeroshot"]["matrix"][0]
        lines.append("zero-shot vs chance: " + ", ".join(f"{t['name']} {a:.1f} ({t['chance']:.1f})"
                                                          for t, a in zip(tasks, zs, strict=True)))
    for name, r in methods.items():
        if name == "zeroshot":
            continue
        lines.append(f"{name}: learning {r['learning']:.1f} (mean accuracy on each task right after training on "
                     f"it), forgetting {r['forgetting']:.1f} (best after learning minus final, mean over tasks "
                     f"1..{len(tasks) - 1})")
    return lines


def _savefig(fig, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def plot(out: str, payload: dict[str, Any]) -> None:
    """``<method>/heatmap.png`` (mean matrix) and ``summary.png``: T / A / L with SE bars, the modality gap and
    retrieval R@1 after every task (mean +- SE over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t["name"] for t in payload["tasks"]]
    methods = payload["methods"]
    for name, r in methods.items():
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(names), 1 + 0.6 * len(names)))
        im = ax.imshow(r["matrix"], vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(r["matrix"])), [f"after {t}" for t in names[:len(r["matrix"])]])
        for i, row in enumerate(r["matrix"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set_title(f"{name}: Avg {r['average']:.1f} / Last {r['last']:.1f} (mean of {len(r['seeds'])} seeds)")
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        os.makedirs(os.path.join(out, name.replace("/", "_")), exist_ok=True)
        _savefig(fig, os.path.join(out, name.replace("/", "_"), "heatmap.png"))
        plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    width = 0.27
    xs = list(range(len(methods)))
    for k, key in enumerate(METRICS):
        axes[0].bar([x + (k - 1) * width for x in xs], [m[key] for m in methods.values()], width, label=key,
                    yerr=[m[f"{key}_se"] or 0 for m in methods.values()], capsize=2)
    axes[0].set_xticks(xs, list(methods), rotation=45, ha="right")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_title("Transfer / Average / Last (mean +- SE)")
    for ax, key, title in ((axes[1], "modality_gap", "modality gap"), (axes[2], "retrieval_r1",
                                                                       "retrieval R@1 (mean of both ways)")):
        for n, m in methods.items():
            if m.get(key) is None:
                continue
            ys = [m[f"{key}_before"], *m[key]]
            es = [0.0, *[e or 0.0 for e in m[f"{key}_se"]]]
            ax.errorbar(range(len(ys)), ys, yerr=es, marker="o", ms=3, capsize=2, label=n)
        ax.set_xticks(range(len(names) + 1), ["start"] + names, rotation=45, ha="right")
        ax.set_xlabel("after learning task")
        ax.set_title(title + " on the held-out caption set")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, os.path.join(out, "summary.png"))
    plt.close(fig)


def write_outputs(out: str, payload: dict[str, Any], log=print) -> None:
    """``results.json``, per method ``matrix.csv`` (mean over seeds) and the plots (matplotlib optional)."""
    os.makedirs(out, exist_ok=True)
    names = [t["name"] for t in payload["tasks"]]
    for name, r in payload["methods"].items():
        folder = os.path.join(out, name.replace("/", "_"))
        os.makedirs(folder, exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["after \\ test"] + names)
        for i, row in enumerate(r["matrix"]):
            w.writerow([names[i]] + [f"{v:.2f}" for v in row])
        atomic_write_text(os.path.join(folder, "matrix.csv"), buf.getvalue())
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(payload, indent=2))
    try:
        plot(out, payload)
    except ImportError as err:
        log(f"(plots skipped: {err}; pip install matplotlib)")


def merge_results(paths: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """One payload from several runs' ``results.json`` (same tasks; e.g. the default run and an ablation run of
    the same code and seeds), re-aggregated so every method is paired with the baselines of any of them.

    Example::

        payload = merge_results(["results/final/results.json", "results/ablation/results.json"])
    """
    runs: dict[str, dict[int, dict]] = {}
    tasks = None
    configs = []
    seconds = 0.0
    for path in paths:
        with open(path) as f:
            p = json.load(f)
        if tasks is not None and p["tasks"] != tasks:
            raise ValueError(f"{path}: other tasks than the first file's; cannot merge")
        tasks = p["tasks"]
        configs.append(p["config"])
        seconds += p["seconds"]
        for name, m in p["methods"].items():
            runs.setdefault(name, {})
            for rec in m["seeds"]:
                runs[name][rec["seed"]] = rec
    return aggregate(runs, tasks, {"merged_from": [str(x) for x in paths], "configs": configs}, seconds)


def run_experiment(spec: ExperimentSpec, log=print) -> dict[str, Any]:
    """Setup, every job, aggregation, outputs (rank 0 writes); returns the ``results.json`` payload.

    Example::

        run_experiment(ExperimentSpec(quick=True, out="results/quick"))
    """
    t0 = time.time()
    unknown = [m for m in spec.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    setup = build_setup(spec)
    if spec.fsdp:  # refuse what FSDP2 cannot run before any job starts
        for name in spec.methods:
            check_fsdp_method(setup.model, spec.method(name))
    log(f"{len(setup.tasks)} tasks: " + ", ".join(f"{t['name']} ({t['n_test']} test, chance {t['chance']:.1f}%)"
                                                  for t in setup.task_records))
    results = run_jobs(spec, setup if spec.workers <= 1 or dist_info()[1] > 1 else None, log=log)
    seconds = time.time() - t0
    config = {"mode": spec.mode, "quick": spec.quick, "methods": list(spec.methods), "seeds": list(spec.seeds),
              "workers": spec.workers, "processes": dist_info()[1], "threads_per_worker": 1 if spec.workers > 1
              else torch.get_num_threads(), "run": asdict(setup.run), **setup.info}
    payload = aggregate(results, setup.task_records, config, seconds)
    if dist_info()[0] == 0:
        write_outputs(spec.out, payload, log=log)
    return payload
