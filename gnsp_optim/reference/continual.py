r"""The MTIL continual loop for CLIP: the GNSP recipe (CE + CD + MAP) on top of :class:`NullSpaceOptimizer`.

One :func:`run_continual` call trains one method (a :class:`Method` record; the named presets are in
:data:`METHODS`) through a sequence of tasks with one :class:`RunConfig`, and evaluates zero-shot top-1 on
every task's test set after every task, giving the accuracy matrix ``R[i, j]`` (after task ``i``, test set
``j``), plus the modality gap and image<->text retrieval on a held-out paired set before the first task and
after each one.

Task 1 fine-tunes every parameter but ``logit_scale`` (GNSP's protocol; the logit scale stays at its
pre-trained value throughout); from task 2 on only the method's layers train, through a
``NullSpaceOptimizer`` whose statistics are gathered on each finished task's training data. Checkpoints are
written after every task and ``RunConfig(resume=True)`` continues from the last finished one with the same
results as an uninterrupted run.

Example::

    result = run_continual(model, tokenizer, tasks, METHODS["gnsp+cd+map"], RunConfig(seed=1),
                           references=[ref_task1, ref_task2, ...], pairs=caption_set)
    result["matrix"], result["average"], result["last"]
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..convergence import CRITERIA
from ..fsdp import is_dtensor
from ..integrations._common import collect_batches
from ..monitor import ProtectionMonitor
from ..optimizer import STATISTICS, NullSpaceOptimizer
from ..selection import GNSP_CLIP_VISUAL, FeatureSource
from ..sharding import reshard_fsdp_modules
from .files import append_log, atomic_save, atomic_write_text
from .losses import cd_loss, ce_loss, map_loss
from .metrics import continual_metrics, modality_gap, retrieval_recall, zeroshot_classifier

__all__ = ["ContinualTask", "Method", "METHODS", "RunConfig", "run_continual", "dist_info", "evaluate",
           "alignment_metrics", "warmup_cosine", "with_overrides", "check_fsdp_method"]


def _cls(t: torch.Tensor) -> torch.Tensor:
    return t[:, 0] if t.dim() == 3 else t


@dataclass
class ContinualTask:
    """A task: datasets yielding ``(image_tensor, label)``, class names, prompt templates, lr, iterations."""

    name: str
    classnames: list[str]
    templates: list[str]
    train: Dataset
    test: Dataset
    lr: float = 1e-5
    iterations: int = 1000


@dataclass(frozen=True)
class Method:
    """How a method trains. ``projection=False`` trains plainly (fine-tune / baselines).

    ``layers``: parameter patterns trained after task 1 (``None``: every parameter but ``logit_scale``).
    ``protect``: what the ``NullSpaceOptimizer`` protects (``None``: every layer it can among ``layers``:
    Linear / attention / conv weights and biases, plus ``visual.proj`` and ``text_projection`` through feature
    sources); parameters it cannot protect (LayerNorms, embeddings) are frozen after task 1.
    ``visual_proj_history``: ``"renormalise"`` = the public code's rule for ``visual.proj`` (its memory is
    divided by its Frobenius norm before each new task is added), ``"accumulate"`` = every task weighs the same.
    ``stats_batch_size``: batch of the statistics pass (the per-batch Frobenius rule depends on it).
    ``eval_templates``: ``"all"`` (the full ensemble) or ``"first_for_learnt"`` (the public code's rule:
    already-learnt tasks scored with the first template only). ``map_label_smoothing``: MAP's own smoothing
    (``None``: ``label_smoothing``, the paper's 0.2). ``weight_ensemble_every``: ZSCL's weight ensemble
    (``k > 0``): every ``k`` steps (and after the last) the trained weights join a running mean that starts
    from the weights before the task, and the task ends with that mean (``0``: off).

    The statistics pass (issue 14): ``statistics`` / ``sketch_rank`` / ``sketch_min_width`` are the
    ``NullSpaceOptimizer`` options of the same names (``"sketch"``: a frequent-directions sketch of
    ``sketch_rank`` rows for inputs at least ``sketch_min_width`` wide, bias column counted).
    ``stop_when_converged``: stop feeding the finished task's images once the protected subspaces stopped
    changing (``collect(stop_when_converged=...)`` with a ``ConvergenceMonitor`` of ``convergence_every``,
    ``convergence_tol``, ``convergence_patience``, ``convergence_criterion``); the text prompts, when the
    preset trains the text tower, are fed either way. ``drift_sample``: test images of each finished task
    whose image features are remembered at its statistics pass; the run logs their relative drift
    (``ProtectionMonitor``) at every later pass and at the end (0: off; evaluation-mode forwards only, the
    training numbers do not change).

    Example:
        >>> METHODS["gnsp+cd+map"].map_weight, METHODS["gnsp+cd+map"].stats_batch_size
        (0.75, 16)
    """

    name: str
    projection: bool = False
    mode: str = "grad"
    rho: float = 0.15
    normalize: str = "mean"
    cd_weight: float = 0.0
    map_weight: float = 0.0
    l2_weight: float = 0.0
    layers: tuple[str, ...] | None = None
    protect: tuple[str, ...] | None = None
    visual_proj_history: str = "accumulate"
    stats_batch_size: int = 16
    train: bool = True
    eval_templates: str = "all"
    label_smoothing: float = 0.2
    map_label_smoothing: float | None = None
    cd_temperature: float = 2.0
    weight_ensemble_every: int = 0
    statistics: str = "exact"
    sketch_rank: int = 256
    sketch_min_width: int = 2048
    stop_when_converged: bool = False
    convergence_every: int = 10
    convergence_tol: float = 0.02
    convergence_patience: int = 2
    convergence_criterion: str = "subspace"
    drift_sample: int = 64

    def __post_init__(self) -> None:
        if self.visual_proj_history not in ("renormalise", "accumulate"):
            raise ValueError(f"Method {self.name!r}: visual_proj_history must be 'renormalise' or 'accumulate', "
                             f"got {self.visual_proj_history!r}")
        if self.eval_templates not in ("all", "first_for_learnt"):
            raise ValueError(f"Method {self.name!r}: eval_templates must be 'all' or 'first_for_learnt'")
        if self.statistics not in STATISTICS:
            raise ValueError(f"Method {self.name!r}: statistics must be one of {STATISTICS}, got {self.statistics!r}")
        if self.statistics == "sketch" and self.visual_proj_history == "renormalise":
            raise ValueError(f"Method {self.name!r}: visual_proj_history='renormalise' rescales a dense memory; "
                             "use 'accumulate' with statistics='sketch'")
        if self.convergence_criterion not in CRITERIA:
            raise ValueError(f"Method {self.name!r}: convergence_criterion must be one of {CRITERIA}, got "
                             f"{self.convergence_criterion!r}")
        if isinstance(self.drift_sample, bool) or not isinstance(self.drift_sample, int) or self.drift_sample < 0:
            raise ValueError(f"Method {self.name!r}: drift_sample must be an int >= 0, got {self.drift_sample!r}")

    @property
    def uses_reference(self) -> bool:
        """Whether the method needs reference pairs (CD or MAP)."""
        return bool(self.cd_weight or self.map_weight)


@dataclass(frozen=True)
class RunConfig:
    """How one run is executed (the method says what is trained; this says batches, seed, files, device).

    ``batch_size`` / ``ref_batch_size``: task and reference batch (GNSP: 64 + 64); ``warmup``: linear warm-up
    steps of every task's schedule (then cosine to 0); ``eval_batch_size``: evaluation batch; ``out_dir``:
    ``log.jsonl``, ``checkpoint.pt`` and ``results.json`` go there; ``resume`` continues from the checkpoint.
    ``fsdp``: shard the model with FSDP2 (``fully_shard`` on every residual block of both towers, then the
    root) over the default process group (launch under ``torchrun``); the data are split over the ranks as in
    the plain data-parallel run, so the numbers equal that run's to round-off. The caller's model is left
    sharded. Not with ``l2init`` (its penalty on the sharded weights is not implemented) or a method that
    protects the token embedding (``gnsp+cd+map/all``: the Embedding kind has no FSDP2 projection yet).

    Example:
        >>> RunConfig(seed=3).batch_size, RunConfig().fsdp
        (64, False)
    """

    seed: int = 42
    batch_size: int = 64
    ref_batch_size: int = 64
    warmup: int = 100
    eval_batch_size: int = 1000
    device: str = "cpu"
    workers: int = 0
    progress: bool = True
    out_dir: str | None = None
    resume: bool = False
    fsdp: bool = False


_MLPS = ("visual.transformer.resblocks.*.mlp.c_fc.weight", "visual.transformer.resblocks.*.mlp.c_proj.weight")
_PAPER_LAYERS = GNSP_CLIP_VISUAL
_OUR_LAYERS = GNSP_CLIP_VISUAL + ("visual.transformer.resblocks.*.mlp.c_fc.bias",
                                  "visual.transformer.resblocks.*.mlp.c_proj.bias")
_PAPER = dict(projection=True, layers=_PAPER_LAYERS, normalize="frobenius", visual_proj_history="renormalise",
              stats_batch_size=16)
_OURS = dict(projection=True, mode="update", normalize="mean")

_UPDATE = dict(cd_weight=1.0, map_weight=0.75, layers=_OUR_LAYERS, **_OURS)
#: the tiny CLIP's protected statistics are 129 (visual.proj's 128 inputs and c_fc's, plus the constant column)
#: and 513 (c_proj) wide: a 64-row sketch of every one of them keeps 50% / 12.5% of the width
_SKETCH = dict(statistics="sketch", sketch_rank=64, sketch_min_width=128)

#: Named presets. ``gnsp*`` without a suffix = the public code's choices (grad projection + AdamW, rho 0.15,
#: the Frobenius accumulation with ``visual.proj``'s renormalised history, statistics batch 16, one full
#: exact statistics pass); ``/update`` and ``/all`` are ours; ``/update/sketch`` (bounded statistics memory:
#: a 64-row frequent-directions sketch of every protected input) and ``/update/early`` (the statistics pass
#: stops once the protected subspaces stopped changing) are ``/update`` with issue 14's options;
#: ``/noproj``, ``finetune/visual`` and ``/ls0`` (MAP without label smoothing) are ablations.
METHODS: dict[str, Method] = {
    "zeroshot": Method("zeroshot", train=False),
    "finetune": Method("finetune"),
    "finetune/visual": Method("finetune/visual", layers=("visual.*",)),
    "l2init": Method("l2init", l2_weight=1.0),
    "finetune+cd": Method("finetune+cd", cd_weight=1.0),
    "finetune+cd/we": Method("finetune+cd/we", cd_weight=1.0, weight_ensemble_every=5),
    "gnsp/noproj": Method("gnsp/noproj", layers=_PAPER_LAYERS),
    "gnsp": Method("gnsp", **_PAPER),
    "gnsp+cd": Method("gnsp+cd", cd_weight=1.0, **_PAPER),
    "gnsp+cd+map": Method("gnsp+cd+map", cd_weight=1.0, map_weight=0.75, **_PAPER),
    "gnsp+cd+map/paper-eval": Method("gnsp+cd+map/paper-eval", cd_weight=1.0, map_weight=0.75,
                                     eval_templates="first_for_learnt", **_PAPER),
    "gnsp+cd+map/ls0": Method("gnsp+cd+map/ls0", cd_weight=1.0, map_weight=0.75, map_label_smoothing=0.0,
                              **_PAPER),
    "gnsp+cd+map/update": Method("gnsp+cd+map/update", cd_weight=1.0, map_weight=0.75, layers=_OUR_LAYERS,
                                 **_OURS),
    "gnsp+cd+map/all": Method("gnsp+cd+map/all", cd_weight=1.0, map_weight=0.75, layers=None, **_OURS),
    "gnsp+cd+map/update/sketch": Method("gnsp+cd+map/update/sketch", **_UPDATE, **_SKETCH),
    "gnsp+cd+map/update/early": Method("gnsp+cd+map/update/early", stop_when_converged=True, **_UPDATE),
}


def with_overrides(method: Method, **kw: Any) -> Method:
    """A copy of a preset with some fields changed (e.g. ``rho``).

    Example:
        >>> with_overrides(METHODS["gnsp"], rho=0.05).rho
        0.05
    """
    return replace(method, **kw)


# ---------------------------------------------------------------------------------------------- processes
def dist_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default ``torch.distributed`` group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """DDP's gradient averaging, for a loop that calls ``encode_image`` / ``encode_text`` directly.

    FSDP2-sharded parameters (``DTensor`` s) are skipped: FSDP2's backward already reduce-scattered (averaged)
    their gradients; only plain parameters (an unsharded model, or ones left out of sharding) are all-reduced.
    """
    import torch.distributed as dist

    world = dist_info()[1]
    if world == 1:
        return
    for p in params:
        if is_dtensor(p):
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


def check_fsdp_method(model, method: Method) -> None:
    """Raise ``NotImplementedError`` naming the reason when ``run_continual`` cannot run ``method`` on ``model``
    correctly under ``RunConfig(fsdp=True)``: ``l2init`` (its penalty on sharded weights) and the weight
    ensemble (``finetune+cd/we``: not tested on sharded weights). Every projection
    preset runs sharded (the token embedding's row mask included, see :mod:`gnsp_optim.fsdp`).

    Example:
        >>> check_fsdp_method(torch.nn.Linear(2, 2), METHODS["gnsp+cd+map/all"])   # nothing to refuse
        >>> check_fsdp_method(torch.nn.Linear(2, 2), METHODS["l2init"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        NotImplementedError: method 'l2init' under RunConfig(fsdp=True): the L2-to-initial penalty ...
    """
    if method.l2_weight:
        raise NotImplementedError(f"method {method.name!r} under RunConfig(fsdp=True): the L2-to-initial penalty "
                                  "is not implemented on FSDP2-sharded weights; run it without --fsdp")
    if method.weight_ensemble_every:
        raise NotImplementedError(f"method {method.name!r} under RunConfig(fsdp=True): the weight ensemble is "
                                  "not tested on FSDP2-sharded weights; run it without --fsdp")


def _shard_model(model: torch.nn.Module, device) -> None:
    """FSDP2 over the default process group: ``fully_shard`` every residual block of both towers (children of
    any ``resblocks`` list), then the root with its 0-d parameters (``logit_scale``, which never trains) left
    out; ``encode_image`` / ``encode_text`` registered as forward methods (the loop calls those, not forward).
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("RunConfig(fsdp=True) needs an initialised torch.distributed process group "
                           "(launch under torchrun, e.g. torchrun --nproc_per_node 2 benchmarks/mtil_clip.py --fsdp)")
    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    blocks = [blk for name, mod in model.named_modules() if name.split(".")[-1] == "resblocks"
              for blk in mod.children()]
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    fully_shard(model, mesh=mesh, ignored_params=scalars or None)
    for meth in ("encode_image", "encode_text"):
        if hasattr(model, meth):
            register_fsdp_forward_method(model, meth)


def _model_state(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """The model's full state dict for a checkpoint (under FSDP2 a collective: call on every rank; rank 0
    gets the full tensors on the CPU, the others an empty dict). Same keys as an unsharded model's."""
    if not fsdp:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# ---------------------------------------------------------------------------------------------- data
def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """lr multiplier: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``.

    Example:
        >>> warmup_cosine(0, 10, 2), warmup_cosine(1, 10, 2)
        (0.5, 1.0)
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(ds: Dataset, batch: int, *, shuffle: bool, seed: int, workers: int = 0, shard: bool = False
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over ``ds`` in batches; ``shard=True`` under ``torch.distributed`` gives this rank's share.

    In-memory datasets with a ``batch(idx)`` method are sliced directly (no per-item Python work); others go
    through a ``DataLoader``. Shuffled passes drop the last incomplete batch when there is more than one.
    """
    rank, world = dist_info() if shard else (0, 1)
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    if world > 1:
        order = order[rank::world]
    if hasattr(ds, "batch"):
        stops = range(0, len(order), batch)
        for s in stops:
            idx = order[s:s + batch]
            if shuffle and len(idx) < batch and len(order) > batch:
                break
            yield ds.batch(idx)
        return
    subset = torch.utils.data.Subset(ds, order.tolist())
    yield from DataLoader(subset, batch_size=batch, shuffle=False, num_workers=workers,
                          drop_last=shuffle and len(order) > batch)


def _cycle(ds: Dataset, batch: int, seed: int, workers: int = 0, shard: bool = True):
    epoch = 0
    while True:
        yield from _batches(ds, batch, shuffle=True, seed=seed * 7919 + epoch, workers=workers, shard=shard)
        epoch += 1


# ---------------------------------------------------------------------------------------------- evaluation
def text_state(model) -> tuple:
    """A key that changes whenever a text-side parameter (anything outside ``visual.*``) changes.

    Each parameter's identity and version counter (bumped by every in-place write: optimizer steps,
    ``load_state_dict``); the zero-shot classifiers depend on these parameters only.
    """
    return tuple((n, id(p), p._version) for n, p in model.named_parameters() if not n.startswith("visual."))


@torch.no_grad()
def evaluate(model, tokenizer, tasks: Sequence[ContinualTask], device, batch: int = 500,
             learnt: int = -1, eval_templates: str = "all", cache: dict | None = None) -> list[float]:
    """Zero-shot top-1 (percent) on every task's test set.

    With ``eval_templates="first_for_learnt"``, tasks with index ``<= learnt`` use only their first template.
    ``cache``: a dict kept between calls; a task's class embeddings are reused while :func:`text_state` is
    unchanged (the text tower frozen after task 1 in GNSP's preset), recomputed otherwise.

    Example::

        evaluate(model, tokenizer, tasks, "cpu")      # [acc on task 1, acc on task 2, ...]
    """
    model.eval()
    accs = []
    state = text_state(model) if cache is not None else None
    for j, task in enumerate(tasks):
        templates = task.templates[:1] if (eval_templates == "first_for_learnt" and j <= learnt) else task.templates
        key = (j, task.name, tuple(templates))
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] == state:
            classifier = hit[1]
        else:
            classifier = zeroshot_classifier(model, tokenizer, task.classnames, templates, device)
            if cache is not None:
                cache[key] = (state, classifier)
        correct = total = 0
        for images, labels in _batches(task.test, batch, shuffle=False, seed=0):
            feats = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
            pred = (feats @ classifier.T).argmax(-1).cpu()
            correct += int((pred == torch.as_tensor(labels)).sum())
            total += len(labels)
        accs.append(100.0 * correct / max(1, total))
    return accs


@torch.no_grad()
def alignment_metrics(model, tokenizer, pairs, device, batch: int = 500) -> dict[str, float]:
    """Modality gap and image<->text retrieval R@1/5/10 on a paired set (``pairs[i] -> (image, _)``,
    ``pairs.captions[i]``); ``retrieval_R@1`` is the mean of both directions.

    Example::

        alignment_metrics(model, tokenizer, caption_set, "cpu")["modality_gap"]
    """
    if pairs is None:
        return {}
    model.eval()
    img, txt = [], []
    for start in range(0, len(pairs), batch):
        idx = torch.arange(start, min(len(pairs), start + batch))
        images = pairs.batch(idx)[0] if hasattr(pairs, "batch") else torch.stack([pairs[int(i)][0] for i in idx])
        img.append(model.encode_image(images.to(device)).float())
        txt.append(model.encode_text(tokenizer([pairs.captions[int(i)] for i in idx]).to(device)).float())
    img, txt = torch.cat(img), torch.cat(txt)
    out = {"modality_gap": modality_gap(img, txt)}
    out.update(retrieval_recall(img, txt, ks=(1, 5, 10)))
    out["retrieval_R@1"] = (out["image_to_text_R@1"] + out["text_to_image_R@1"]) / 2
    return out


# ---------------------------------------------------------------------------------------------- the optimizer
def _set_trainable(model, patterns: tuple[str, ...] | None) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        on = name != "logit_scale" and (patterns is None or any(fnmatch.fnmatchcase(name, pat)
                                                                 for pat in patterns))
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


def _feature_sources(model) -> dict[str, FeatureSource]:
    """Bare-matmul projections: ``visual.proj`` sees ``ln_post`` at CLS; ``text_projection`` sees ``ln_final``
    (all positions kept by the text trimming: a superset of the EOT rows it multiplies, so still exact)."""
    names = dict(model.named_parameters())
    out = {}
    if "visual.proj" in names:
        out["visual.proj"] = FeatureSource("visual.ln_post", select=_cls)
    if "text_projection" in names:
        out["text_projection"] = FeatureSource("ln_final")
    return out


def _make_optimizer(model, method: Method, lr: float) -> NullSpaceOptimizer:
    params = _set_trainable(model, method.layers)
    base = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    protect = method.protect if method.protect is not None else method.layers
    srcs = {k: v for k, v in _feature_sources(model).items()
            if any(fnmatch.fnmatchcase(k, p) for p in protect or ("*",))}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GNSP: .* not covered")
        return NullSpaceOptimizer(base, model, rho=method.rho, mode=method.mode, protect=protect,
                                  feature_sources=srcs, normalize=method.normalize, uncovered="freeze",
                                  statistics=method.statistics, sketch_rank=method.sketch_rank,
                                  sketch_min_width=method.sketch_min_width)


def _renormalise_visual_proj_history(opt: NullSpaceOptimizer) -> None:
    """The public code's ``visual.proj`` rule: its memory is divided by its Frobenius norm before a new task is
    added (so older tasks weigh less there than in the MLPs). Done through the optimizer's public state dict."""
    sd = opt.state_dict()
    changed = False
    for rec in sd["gnsp"]["blocks"].values():
        if rec["weight"] == "visual.proj" and rec["memory"] is not None:
            d = rec["dim"]
            norm = torch.linalg.matrix_norm(rec["memory"][:, :d, :d]).clamp_min(1e-30)
            rec["memory"] = rec["memory"] / norm[:, None, None]
            changed = True
    if changed:
        opt.load_state_dict(sd)


def _statistics_forward(model, item) -> None:
    kind, x = item
    if kind == "image":
        model.encode_image(x)
    else:
        model.encode_text(x)


def _statistics_images(task: ContinualTask, method: Method, device, workers: int):
    """The task's training images, this rank's share, in batches of ``stats_batch_size``."""
    for x, _ in _batches(task.train, method.stats_batch_size, shuffle=False, seed=0, workers=workers, shard=True):
        yield "image", x.to(device)


def _statistics_texts(tokenizer, task: ContinualTask, method: Method, device):
    """When the preset trains the text tower: every template x class prompt (one batch)."""
    if method.layers is None or any(not p.startswith("visual.") for p in method.layers):
        prompts = [t.format(c) for t in task.templates for c in task.classnames]
        yield "text", tokenizer(prompts).to(device)


def _statistics_inputs(tokenizer, task: ContinualTask, method: Method, device, workers: int):
    """What the statistics pass feeds the model: the task's training images (this rank's share, batches of
    ``stats_batch_size``) and, when the preset trains the text tower, every template x class prompt, fed right
    after the first image batch: then both towers have run when the second image batch starts the image path
    over, where the outside-use check stops watching (each block's statistic sees its inputs in the same
    order either way)."""
    images = _statistics_images(task, method, device, workers)
    first = next(images, None)
    if first is not None:
        yield first
    yield from _statistics_texts(tokenizer, task, method, device)
    yield from images


def _collect_until_converged(opt, model, tokenizer, task: ContinualTask, method: Method, device, workers: int,
                             count: Callable) -> dict[str, Any]:
    """The early-stopping pass: images until the optimizer's ``ConvergenceMonitor`` says the protected subspaces
    stopped changing (every rank calls it once per batch, so all stop together), then the text prompts."""
    options = dict(every=method.convergence_every, tol=method.convergence_tol,
                   patience=method.convergence_patience, criterion=method.convergence_criterion)
    was_training = model.training
    model.eval()
    exhausted = True
    try:
        with opt.collect(stop_when_converged=options), torch.no_grad():
            for item in _statistics_images(task, method, device, workers):
                count(model, item)
                if opt.collection_converged(len(item[1])):
                    exhausted = False
                    break
            for item in _statistics_texts(tokenizer, task, method, device):
                count(model, item)
    finally:
        model.train(was_training)
    return {**opt.convergence.report(), "exhausted": exhausted}


def _tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _collecting_bytes(stat) -> int:
    """What a block's statistic holds while a task is being collected (memory plus the task's buffer)."""
    return _tensor_bytes(stat.memory, getattr(stat, "task_sum", None), getattr(stat, "buffer", None))


@dataclass
class _PassLog:
    """What the statistics passes of one optimizer recorded (kept beside it, not in its state)."""

    passes: dict[int, dict[str, Any]]
    drift: ProtectionMonitor | None


_PASS_LOGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _pass_log(opt, model, method: Method) -> _PassLog:
    if opt not in _PASS_LOGS:
        mon = None
        if method.drift_sample:
            mon = ProtectionMonitor(model, every=1, tol=math.inf, sample=method.drift_sample,
                                    forward=lambda m, x: m.encode_image(x), warn=False)
        _PASS_LOGS[opt] = _PassLog({}, mon)
    return _PASS_LOGS[opt]


def _gather_statistics(model, tokenizer, task: ContinualTask, method: Method, opt, device, workers: int):
    """After a task: the statistics pass over its training data, then ``end_task()`` (the integrations' loop).

    A full pass by default; ``method.stop_when_converged``: until the protected subspaces stopped changing.
    What it used and cost (samples, seconds of the pass and of ``end_task``, bytes of the statistics, and the
    drift of earlier tasks' image features so far) is kept for :func:`_statistics_record`.
    """
    if opt is None:
        opt = _make_optimizer(model, method, 1.0)
    if method.visual_proj_history == "renormalise" and opt.tasks_seen > 0:
        _renormalise_visual_proj_history(opt)
    log = _pass_log(opt, model, method)
    fed = {"image": 0, "text": 0}

    def count(model, item) -> None:
        fed[item[0]] += len(item[1])
        _statistics_forward(model, item)

    rank, world = dist_info()
    rec: dict[str, Any] = {"task": task.name, "samples_full": len(range(rank, len(task.train), world)),
                           "stopped_early": False}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GNSP: .* not covered")
        t0 = time.perf_counter()
        if method.stop_when_converged:
            rec["convergence"] = _collect_until_converged(opt, model, tokenizer, task, method, device, workers,
                                                          count)
            rec["stopped_early"] = not rec["convergence"]["exhausted"]
        else:
            collect_batches(opt, model, _statistics_inputs(tokenizer, task, method, device, workers), count)
        t1 = time.perf_counter()
        collecting = sum(_collecting_bytes(b.stat) for b in opt.blocks)
        opt.end_task()
        t2 = time.perf_counter()
    rec.update(samples=fed["image"], text_samples=fed["text"], collect_seconds=t1 - t0, end_task_seconds=t2 - t1,
               memory_bytes=sum(_tensor_bytes(b.stat.memory) for b in opt.blocks), collecting_bytes=collecting,
               sketched={b.name: [b.stat.rank, b.stat.dim + 1] for b in opt.blocks if hasattr(b.stat, "rank")},
               kept_rank={r["layer"]: r["kept_rank"] for r in opt.report()})
    if log.drift is not None:
        rec["drift"] = log.drift.check()  # earlier tasks' image features now against when each ended
        probe = next(iter(_batches(task.test, method.drift_sample, shuffle=False, seed=0)))[0].to(device)
        log.drift.add_task(probe, name=task.name)
    rec["after_task"] = opt.tasks_seen - 1  # a resumed optimizer has seen one task per earlier pass
    log.passes[rec["after_task"]] = rec
    return opt


def _statistics_record(opt, task_index: int) -> dict[str, Any]:
    """``{"statistics": ...}`` of the pass that followed task ``task_index`` (empty when there was none)."""
    log = _PASS_LOGS.get(opt) if opt is not None else None
    if log is None:
        return {}
    rec = log.passes.get(task_index)
    return {} if rec is None else {"statistics": rec}


def _statistics_summary(opt) -> dict[str, Any] | None:
    """For ``results.json``: every pass this optimizer ran (in this process: a resumed run has the passes after
    the resume here, every pass in ``log.jsonl``) and the final drift of each remembered task's image features."""
    log = _PASS_LOGS.get(opt) if opt is not None else None
    if log is None:
        return None
    passes = [log.passes[k] for k in sorted(log.passes)]
    final = log.drift.check() if log.drift is not None and log.drift.tasks else {}
    return {"passes": passes, "final_drift": final,
            "samples": sum(p["samples"] for p in passes), "samples_full": sum(p["samples_full"] for p in passes),
            "collect_seconds": sum(p["collect_seconds"] for p in passes),
            "end_task_seconds": sum(p["end_task_seconds"] for p in passes),
            "memory_bytes": passes[-1]["memory_bytes"] if passes else 0,
            "collecting_bytes": max((p["collecting_bytes"] for p in passes), default=0)}


# ---------------------------------------------------------------------------------------------- the loop
def run_continual(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    tasks: Sequence[ContinualTask],
    method: Method,
    config: RunConfig = RunConfig(),
    *,
    references: Sequence[Dataset] | Callable[[int], Dataset] | Dataset | None = None,
    pairs: Dataset | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``method`` through ``tasks``; return the accuracy matrix, Transfer / Average / Last and more.

    ``references``: CD / MAP reference pairs, one dataset per task (a sequence, or a function of the task
    index; a single dataset is used for every task); each yields ``(image, class index)`` and has
    ``.class_captions`` (MAP's soft targets share mass within a class).
    ``pairs``: a held-out image-caption set for the modality gap and retrieval, measured before the first
    task and after each. Files (``config.out_dir``): JSON lines per task (``log.jsonl``), a checkpoint after
    every task (``checkpoint.pt``), ``results.json`` at the end.

    Example::

        run_continual(model, tok, tasks, METHODS["finetune"], RunConfig(seed=1, out_dir="results/ft"))
    """
    if method.uses_reference and references is None:
        raise ValueError(f"method {method.name!r} uses CD/MAP losses and needs reference pairs (references=)")
    if config.fsdp:
        check_fsdp_method(model, method)
    device = config.device
    model.to(device)
    # the frozen initial model (CD's teacher) is an unsharded copy, taken before any sharding
    initial = copy.deepcopy(model).eval() if (method.cd_weight or method.l2_weight) else None
    if initial is not None:
        for p in initial.parameters():
            p.requires_grad_(False)
    t0 = time.time()
    matrix: list[list[float]] = []
    align: list[dict[str, float]] = [alignment_metrics(model, tokenizer, pairs, device, config.eval_batch_size)]
    seconds: list[float] = []
    opt: NullSpaceOptimizer | None = None
    classifiers: dict = {}  # zero-shot class embeddings, reused while the text tower is unchanged
    start_task = 0
    out_dir = config.out_dir
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    is_main = dist_info()[0] == 0
    if out_dir and is_main:
        os.makedirs(out_dir, exist_ok=True)
    identity = {"method": asdict(method), "tasks": [t.name for t in tasks], "seed": config.seed}
    ckpt = None
    if config.resume and ckpt_path and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        if ckpt.get("identity") != identity:
            raise ValueError(f"{ckpt_path} was written by another method, seed or task list; refusing to resume")
        model.load_state_dict(ckpt["model"])  # a full state dict (also under FSDP2), loaded before sharding
        matrix, align, seconds, start_task = ckpt["matrix"], ckpt["align"], ckpt["seconds"], ckpt["next_task"]
    if config.fsdp:
        _shard_model(model, device)
    if ckpt is not None:
        if ckpt["opt"] is not None:  # built on the (sharded) parameters; a full state dict loads into it
            opt = _make_optimizer(model, method, 1.0)
            opt.load_state_dict(ckpt["opt"])
        if is_main:
            log(f"[{method.name} seed {config.seed}] resumed after task {start_task} of {len(tasks)}")

    bar = _progress(config.progress and is_main,
                    total=sum(t.iterations for t in tasks[start_task:]) if method.train else 0,
                    desc=f"{method.name} s{config.seed}")
    for i in range(start_task, len(tasks)):
        task = tasks[i]
        t_task = time.time()
        if method.train:
            ref = _reference_for(references, i) if method.uses_reference else None
            _train_task(model, tokenizer, task, i, method, opt, initial, ref, config, bar)
        seconds.append(time.time() - t_task)
        if method.train or not matrix:
            # under FSDP2 every rank runs the same evaluation forwards (they all-gather weights), then the
            # no-grad passes' gathered root weights are freed (resharded)
            row = evaluate(model, tokenizer, tasks, device, config.eval_batch_size, learnt=i,
                           eval_templates=method.eval_templates, cache=classifiers)
            align.append(alignment_metrics(model, tokenizer, pairs, device, config.eval_batch_size))
            reshard_fsdp_modules(model)
        else:  # an untrained model gives the same numbers after every task: measured once
            row, _ = list(matrix[-1]), align.append(dict(align[-1]))
        matrix.append(row)
        if method.projection and method.train and i < len(tasks) - 1:
            opt = _gather_statistics(model, tokenizer, task, method, opt, device, config.workers)
        record = {"task": i, "name": task.name, "accuracy": row, "train_seconds": seconds[-1], **align[-1],
                  **_statistics_record(opt, i)}
        if out_dir and (is_main or config.fsdp):  # under FSDP2 both state dicts are collectives: every rank
            model_sd = _model_state(model, config.fsdp)
            opt_sd = None if opt is None else opt.state_dict()
            if is_main:  # checkpoint first: a kill between the two writes re-runs this task on resume
                atomic_save({"identity": identity, "model": model_sd, "opt": opt_sd, "matrix": matrix,
                             "align": align, "seconds": seconds, "next_task": i + 1}, ckpt_path)
                append_log(os.path.join(out_dir, "log.jsonl"), record, keep_before=i)
            del model_sd, opt_sd
        _barrier()
    if bar is not None:
        bar.close()
    metrics = continual_metrics(torch.tensor(matrix)) if len(matrix) > 1 else {
        "transfer": float("nan"), "average": matrix[0][0], "last": matrix[0][0]}
    result = {"method": method.name, "seed": config.seed, "matrix": matrix, **metrics, "alignment": align,
              "train_seconds": sum(seconds), "wall_seconds": time.time() - t0, "config": asdict(method),
              "statistics": _statistics_summary(opt)}
    if out_dir and is_main:
        atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=2))
    return result


def _reference_for(references, i: int):
    if callable(references) and not isinstance(references, Dataset):
        return references(i)
    if isinstance(references, Sequence) and not isinstance(references, Dataset):
        return references[i]
    return references


def _progress(enabled: bool, total: int, desc: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


class WeightEnsemble:
    """ZSCL's weight ensemble over one task: a running mean of the parameters, sampled every few steps.

    It starts from the parameters as they are (the weights before the task); :meth:`add` folds in the current
    ones (``mean += (p - mean) / n``), :meth:`load` writes the mean back into the parameters. A mean of
    weights that each leave old inputs' outputs unchanged leaves them unchanged too, so it composes with
    null-space projection.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> we = WeightEnsemble([p])
        >>> with torch.no_grad():
        ...     _ = p.fill_(3.0)
        >>> we.add(); we.load()
        >>> p.tolist()  # the mean of the start (0) and one sample (3)
        [1.5, 1.5]
    """

    def __init__(self, params: Sequence[torch.nn.Parameter]) -> None:
        self.params = list(params)
        self.mean = [p.detach().clone() for p in self.params]
        self.count = 1

    @torch.no_grad()
    def add(self) -> None:
        """Fold the current parameters into the mean."""
        self.count += 1
        for m, p in zip(self.mean, self.params, strict=True):
            m.add_(p.detach() - m, alpha=1.0 / self.count)

    @torch.no_grad()
    def load(self) -> None:
        """Write the mean into the parameters."""
        for m, p in zip(self.mean, self.params, strict=True):
            p.copy_(m)


def _train_task(model, tokenizer, task: ContinualTask, i: int, method: Method, opt, initial, reference,
                config: RunConfig, bar) -> None:
    device = config.device
    torch.manual_seed(config.seed * 1000 + i)
    projecting = method.projection and i > 0
    if projecting:
        if opt is None:
            raise RuntimeError("projection requested but no statistics were gathered")
        _set_trainable(model, method.layers)
        optimizer = opt
        optimizer.base.state.clear()  # a fresh AdamW per task, as a new optimizer would be
    else:
        optimizer = torch.optim.AdamW(_set_trainable(model, None if i == 0 else method.layers), lr=task.lr,
                                      betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    init_params = {n: p for n, p in initial.named_parameters()} if method.l2_weight else None
    prompts = tokenizer([task.templates[0].format(c) for c in task.classnames]).to(device)
    data = _cycle(task.train, config.batch_size, config.seed * 100 + i, config.workers, shard=True)
    trained = [p for p in model.parameters() if p.requires_grad]
    ensemble = WeightEnsemble(trained) if method.weight_ensemble_every > 0 else None
    ref_batches = ref_tokens = None
    if reference is not None:
        # reference items are (image, class index); class k is captioned reference.class_captions[k];
        # batches cycle in a fixed order, so the frozen initial model's features are computed once per task
        ref_batches = list(_batches(reference, config.ref_batch_size, shuffle=False, seed=0))
        ref_tokens = tokenizer(list(reference.class_captions)).to(device)
    ref_features0 = None
    if method.cd_weight and ref_batches is not None:
        with torch.no_grad():
            ref_features0 = [(initial.encode_image(img.to(device)), initial.encode_text(ref_tokens[lab.to(device)]))
                             for img, lab in ref_batches]
    model.train()
    scale = model.logit_scale.exp().detach()  # frozen at its pre-trained value (CLIP's 100 in the paper)
    # when no text-tower parameter trains (GNSP's visual layer preset), text features are constants of the task:
    # encode the class prompts and the reference captions once instead of every step (same numbers)
    text_frozen = not any(p.requires_grad for n, p in model.named_parameters()
                          if not n.startswith("visual.") and n != "logit_scale")
    prompt_features = ref_text_features = None
    if text_frozen:
        with torch.no_grad():
            prompt_features = model.encode_text(prompts)
            if ref_tokens is not None:
                ref_text_features = torch.cat([model.encode_text(ref_tokens[k:k + 256])
                                               for k in range(0, len(ref_tokens), 256)])
        reshard_fsdp_modules(model)  # FSDP2: a no-grad pass leaves the root's weights gathered
    for step in range(task.iterations):
        for g in optimizer.param_groups:
            g["lr"] = task.lr * warmup_cosine(step, task.iterations, config.warmup)
        images, labels = next(data)
        images, labels = images.to(device), torch.as_tensor(labels).to(device)
        text = prompt_features if text_frozen else model.encode_text(prompts)
        loss = ce_loss(model.encode_image(images), text, labels, scale, method.label_smoothing)
        if ref_batches is not None:
            k = step % len(ref_batches)
            r_img, r_lab = ref_batches[k]
            r_img, r_lab = r_img.to(device), torch.as_tensor(r_lab).to(device)
            f_i = model.encode_image(r_img)
            f_t = ref_text_features[r_lab] if text_frozen else model.encode_text(ref_tokens[r_lab])
            if method.cd_weight:
                f_i0, f_t0 = ref_features0[k]
                loss = loss + method.cd_weight * cd_loss(f_i, f_t, f_i0, f_t0, scale, method.cd_temperature)
            if method.map_weight:
                eps = method.label_smoothing if method.map_label_smoothing is None else method.map_label_smoothing
                loss = loss + method.map_weight * map_loss(f_i, f_t, r_lab, scale, eps)
        if init_params is not None:
            l2 = sum(((p - init_params[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad)
            loss = loss + method.l2_weight * l2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(trained)
        optimizer.step()
        if ensemble is not None and (step + 1) % method.weight_ensemble_every == 0:
            ensemble.add()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=task.name, loss=f"{loss.item():.3f}", refresh=False)
    if ensemble is not None:
        if task.iterations % method.weight_ensemble_every:  # the final weights always join the mean
            ensemble.add()
        ensemble.load()
