r"""The MTIL continual loop for CLIP: the GNSP recipe (CE + CD + MAP) on top of :class:`NullSpaceOptimizer`.

One :func:`run_continual` call trains one method through a sequence of tasks and evaluates zero-shot top-1 on
every task's test set after every task, giving the accuracy matrix ``R[i, j]`` (after task ``i``, test set
``j``). Methods differ only by a :class:`Method` record; the named presets are in :data:`METHODS`.

Task 1 fine-tunes every parameter but ``logit_scale`` (GNSP's protocol); from task 2 on only the layer preset
trains (GNSP's 25 visual tensors by default), through a ``NullSpaceOptimizer`` whose statistics are gathered
on each finished task's training data. Checkpoints are written after every task and ``resume=True``
continues from the last finished one with the same results as an uninterrupted run.

Example::

    result = run_continual(model, tokenizer, tasks, METHODS["gnsp+cd+map"], reference=ref_set,
                           out_dir="results/gnsp", seed=42)
    result["matrix"], result["average"], result["last"]
"""

from __future__ import annotations

import copy
import fnmatch
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..optimizer import NullSpaceOptimizer
from ..selection import GNSP_CLIP_VISUAL, FeatureSource
from .losses import cd_loss, ce_loss, map_loss
from .metrics import continual_metrics, modality_gap, retrieval_recall, zeroshot_classifier

__all__ = ["ContinualTask", "Method", "METHODS", "run_continual", "atomic_save", "atomic_write_text",
           "dist_info"]


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
    ``eval_templates``: ``"all"`` (the full ensemble) or ``"first_for_learnt"`` (the public code's rule:
    already-learnt tasks scored with the first template only).
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
    train: bool = True
    eval_templates: str = "all"
    label_smoothing: float = 0.2
    cd_temperature: float = 2.0


_PAPER_LAYERS = GNSP_CLIP_VISUAL
_OUR_LAYERS = GNSP_CLIP_VISUAL + ("visual.transformer.resblocks.*.mlp.c_fc.bias",
                                  "visual.transformer.resblocks.*.mlp.c_proj.bias")

#: Named presets. ``paper`` = the public code's choices; ``.../update`` = ours: exact update projection,
#: biases protected, plain (mean) covariance, the full template ensemble everywhere.
METHODS: dict[str, Method] = {
    "zeroshot": Method("zeroshot", train=False),
    "finetune": Method("finetune"),
    "l2init": Method("l2init", l2_weight=1.0),
    "finetune+cd": Method("finetune+cd", cd_weight=1.0),
    "gnsp": Method("gnsp", projection=True, layers=_PAPER_LAYERS, normalize="frobenius"),
    "gnsp+cd": Method("gnsp+cd", projection=True, layers=_PAPER_LAYERS, normalize="frobenius", cd_weight=1.0),
    "gnsp+cd+map": Method("gnsp+cd+map", projection=True, layers=_PAPER_LAYERS, normalize="frobenius",
                          cd_weight=1.0, map_weight=0.75),
    "gnsp+cd+map/paper-eval": Method("gnsp+cd+map/paper-eval", projection=True, layers=_PAPER_LAYERS,
                                     normalize="frobenius", cd_weight=1.0, map_weight=0.75,
                                     eval_templates="first_for_learnt"),
    "gnsp+cd+map/update": Method("gnsp+cd+map/update", projection=True, mode="update", layers=_OUR_LAYERS,
                                 normalize="mean", cd_weight=1.0, map_weight=0.75),
}


# ---------------------------------------------------------------------------------------------- files
def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and a rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
    """DDP's gradient averaging, for a loop that calls ``encode_image`` / ``encode_text`` directly."""
    import torch.distributed as dist

    world = dist_info()[1]
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad.div_(world)


# ---------------------------------------------------------------------------------------------- pieces
def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """lr multiplier: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _loader(ds: Dataset, batch: int, shuffle: bool, seed: int, workers: int = 0,
            shard: bool = False) -> DataLoader:
    """A loader; with ``shard=True`` under ``torch.distributed``, this rank's share (``DistributedSampler``)."""
    rank, world = dist_info()
    if shard and world > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                     drop_last=shuffle and len(ds) >= world * batch)
        return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                          drop_last=shuffle and len(ds) // world > batch)
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch, shuffle=shuffle, generator=g, num_workers=workers,
                      drop_last=shuffle and len(ds) > batch)


def _cycle(loader: DataLoader):
    epoch = 0
    while True:
        if hasattr(loader.sampler, "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


@torch.no_grad()
def evaluate(model, tokenizer, tasks: Sequence[ContinualTask], device, batch: int = 256,
             learnt: int = -1, eval_templates: str = "all") -> list[float]:
    """Zero-shot top-1 (percent) on every task's test set.

    With ``eval_templates="first_for_learnt"``, tasks with index ``<= learnt`` use only their first template.
    """
    model.eval()
    accs = []
    for j, task in enumerate(tasks):
        templates = task.templates[:1] if (eval_templates == "first_for_learnt" and j <= learnt) else task.templates
        classifier = zeroshot_classifier(model, tokenizer, task.classnames, templates, device)
        correct = total = 0
        for images, labels in _loader(task.test, batch, False, 0):
            feats = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
            pred = (feats @ classifier.T).argmax(-1).cpu()
            correct += int((pred == labels).sum())
            total += len(labels)
        accs.append(100.0 * correct / max(1, total))
    return accs


@torch.no_grad()
def alignment_metrics(model, tokenizer, pairs, device, batch: int = 256) -> dict[str, float]:
    """Modality gap and image<->text retrieval R@1/5/10 on a paired set (``pairs[i] -> (image, _)``,
    ``pairs.captions[i]``)."""
    if pairs is None:
        return {}
    model.eval()
    img, txt = [], []
    for start in range(0, len(pairs), batch):
        idx = range(start, min(len(pairs), start + batch))
        img.append(model.encode_image(torch.stack([pairs[i][0] for i in idx]).to(device)).float())
        txt.append(model.encode_text(tokenizer([pairs.captions[i] for i in idx]).to(device)).float())
    img, txt = torch.cat(img), torch.cat(txt)
    out = {"modality_gap": modality_gap(img, txt)}
    out.update(retrieval_recall(img, txt, ks=(1, 5, 10)))
    return out


def _set_trainable(model, patterns: tuple[str, ...] | None) -> list[torch.nn.Parameter]:
    params = []
    for name, p in model.named_parameters():
        on = name != "logit_scale" and (patterns is None or any(fnmatch.fnmatchcase(name, pat)
                                                                 for pat in patterns))
        p.requires_grad_(on)
        if on:
            params.append(p)
    return params


# ---------------------------------------------------------------------------------------------- the loop
def run_continual(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    tasks: Sequence[ContinualTask],
    method: Method,
    *,
    reference: Dataset | None = None,
    pairs: Dataset | None = None,
    out_dir: str | None = None,
    resume: bool = False,
    seed: int = 42,
    batch_size: int = 64,
    ref_batch_size: int = 64,
    stats_batch_size: int = 64,
    warmup: int = 100,
    device: str | torch.device = "cpu",
    progress: bool = True,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``method`` through ``tasks``; return the accuracy matrix, Transfer / Average / Last and more.

    ``reference``: dataset of reference images yielding ``(image, class index)`` with ``.class_captions``
    (CD / MAP; MAP's soft targets share mass within a class).
    ``pairs``: a held-out image-caption set for the modality gap and retrieval, measured before the first
    task and after each. ``out_dir``: JSON lines per task (``log.jsonl``), a checkpoint after every task
    (``checkpoint.pt``), ``results.json`` at the end; ``resume=True`` continues from the checkpoint.
    """
    if (method.cd_weight or method.map_weight) and reference is None:
        raise ValueError(f"method {method.name!r} uses CD/MAP losses and needs a reference set")
    model.to(device)
    initial = copy.deepcopy(model).eval() if (method.cd_weight or method.l2_weight) else None
    if initial is not None:
        for p in initial.parameters():
            p.requires_grad_(False)
    t0 = time.time()
    matrix: list[list[float]] = []
    align: list[dict[str, float]] = [alignment_metrics(model, tokenizer, pairs, device)]
    seconds: list[float] = []
    opt: NullSpaceOptimizer | None = None
    start_task = 0
    ckpt_path = os.path.join(out_dir, "checkpoint.pt") if out_dir else None
    is_main = dist_info()[0] == 0
    if out_dir and is_main:
        os.makedirs(out_dir, exist_ok=True)
    if resume and ckpt_path and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        if ckpt["method"] != asdict(method) or ckpt["tasks"] != [t.name for t in tasks]:
            raise ValueError(f"{ckpt_path} was written by another method or task list; refusing to resume")
        model.load_state_dict(ckpt["model"])
        matrix, align, seconds, start_task = ckpt["matrix"], ckpt["align"], ckpt["seconds"], ckpt["next_task"]
        if ckpt["opt"] is not None:
            opt = _make_optimizer(model, method, 1.0)
            opt.load_state_dict(ckpt["opt"])
        if is_main:
            log(f"[{method.name}] resumed after task {start_task} of {len(tasks)}")

    bar = _progress(progress and is_main, total=sum(t.iterations for t in tasks[start_task:]) if method.train else 0,
                    desc=method.name)
    for i in range(start_task, len(tasks)):
        task = tasks[i]
        t_task = time.time()
        if method.train:
            opt = _train_task(model, tokenizer, task, i, method, opt, initial, reference, seed, batch_size,
                              ref_batch_size, warmup, device, bar, workers)
        seconds.append(time.time() - t_task)
        row = evaluate(model, tokenizer, tasks, device, learnt=i, eval_templates=method.eval_templates)
        matrix.append(row)
        align.append(alignment_metrics(model, tokenizer, pairs, device))
        if method.projection and method.train and i < len(tasks) - 1:
            opt = _gather_statistics(model, task, method, opt, stats_batch_size, device, workers)
        record = {"task": i, "name": task.name, "accuracy": row, "train_seconds": seconds[-1], **align[-1]}
        if out_dir and is_main:  # checkpoint first: a kill between the two writes re-runs this task on resume
            atomic_save({"method": asdict(method), "tasks": [t.name for t in tasks], "model": model.state_dict(),
                         "opt": None if opt is None else opt.state_dict(), "matrix": matrix, "align": align,
                         "seconds": seconds, "next_task": i + 1}, ckpt_path)
            _append_log(os.path.join(out_dir, "log.jsonl"), record, keep_before=i)
        _barrier()
    if bar is not None:
        bar.close()
    metrics = continual_metrics(torch.tensor(matrix)) if len(matrix) > 1 else {
        "transfer": float("nan"), "average": matrix[0][0], "last": matrix[0][0]}
    result = {"method": method.name, "matrix": matrix, **metrics, "alignment": align,
              "train_seconds": sum(seconds), "wall_seconds": time.time() - t0, "config": asdict(method)}
    if out_dir and is_main:
        atomic_write_text(os.path.join(out_dir, "results.json"), json.dumps(result, indent=2))
    return result


def _append_log(path: str, record: dict, keep_before: int) -> None:
    """Append one JSON line, first dropping lines of tasks >= ``keep_before`` left by a killed run."""
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip() and json.loads(ln)["task"] < keep_before]
    lines.append(json.dumps(record))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _progress(enabled: bool, total: int, desc: str):
    if not enabled or total == 0:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _feature_sources(model) -> dict[str, FeatureSource]:
    names = dict(model.named_parameters())
    return {"visual.proj": FeatureSource("visual.ln_post", select=_cls)} if "visual.proj" in names else {}


def _make_optimizer(model, method: Method, lr: float) -> NullSpaceOptimizer:
    params = _set_trainable(model, method.layers)
    base = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    srcs = {k: v for k, v in _feature_sources(model).items()
            if any(fnmatch.fnmatchcase(k, p) for p in method.layers or ("*",))}
    return NullSpaceOptimizer(base, model, rho=method.rho, mode=method.mode, protect=method.layers,
                              feature_sources=srcs, normalize=method.normalize, uncovered="freeze")


def _gather_statistics(model, task: ContinualTask, method: Method, opt, batch: int, device, workers: int):
    if opt is None:
        opt = _make_optimizer(model, method, 1.0)
    model.eval()
    with opt.collect(), torch.no_grad():
        for images, _ in _loader(task.train, batch, False, 0, workers, shard=True):  # end_task all-reduces
            model.encode_image(images.to(device))
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GNSP: .* not covered")
        opt.end_task()
    return opt


def _train_task(model, tokenizer, task, i, method, opt, initial, reference, seed, batch_size, ref_batch_size,
                warmup, device, bar, workers):
    torch.manual_seed(seed + 1000 * i)
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
    init_params = None
    if method.l2_weight:
        init_params = {n: p for n, p in initial.named_parameters()}
    prompts = tokenizer([task.templates[0].format(c) for c in task.classnames]).to(device)
    data = _cycle(_loader(task.train, batch_size, True, seed + i, workers, shard=True))
    trained = [p for p in model.parameters() if p.requires_grad]
    ref_loader = _loader(reference, ref_batch_size, False, 0, workers) if reference is not None else None
    ref_iter = _cycle(ref_loader) if ref_loader is not None else None
    # reference items are (image, class index); class k is captioned reference.class_captions[k]
    ref_tokens = tokenizer(list(reference.class_captions)).to(device) if reference is not None else None
    # the frozen initial model's reference features never change and the reference batches cycle in a fixed
    # order: compute them once per task (same batches, same numbers) instead of once per step
    ref_features0 = None
    if method.cd_weight and ref_loader is not None:
        with torch.no_grad():
            ref_features0 = [(initial.encode_image(img.to(device)), initial.encode_text(ref_tokens[lab.to(device)]))
                             for img, lab in ref_loader]
    model.train()
    scale = model.logit_scale.exp().detach()
    # when no text-tower parameter trains (GNSP's visual layer preset), text features are constants of the task:
    # encode the class prompts and the reference captions once instead of every step (same numbers)
    text_frozen = not any(p.requires_grad for n, p in model.named_parameters()
                          if not n.startswith("visual.") and n != "logit_scale")
    prompt_features = ref_text_features = None
    if text_frozen:
        with torch.no_grad():
            prompt_features = model.encode_text(prompts)
            if (method.cd_weight or method.map_weight) and ref_tokens is not None:
                ref_text_features = torch.cat([model.encode_text(ref_tokens[k:k + 256])
                                               for k in range(0, len(ref_tokens), 256)])
    for step in range(task.iterations):
        for g in optimizer.param_groups:
            g["lr"] = task.lr * warmup_cosine(step, task.iterations, warmup)
        images, labels = next(data)
        images, labels = images.to(device), labels.to(device)
        text = prompt_features if text_frozen else model.encode_text(prompts)
        loss = ce_loss(model.encode_image(images), text, labels, scale, method.label_smoothing)
        if method.cd_weight or method.map_weight:
            r_img, r_lab = next(ref_iter)
            ref_batch = step % len(ref_features0) if ref_features0 is not None else 0
            r_img, r_lab = r_img.to(device), r_lab.to(device)
            f_i = model.encode_image(r_img)
            f_t = ref_text_features[r_lab] if text_frozen else model.encode_text(ref_tokens[r_lab])
            if method.cd_weight:
                f_i0, f_t0 = ref_features0[ref_batch]
                loss = loss + method.cd_weight * cd_loss(f_i, f_t, f_i0, f_t0, scale, method.cd_temperature)
            if method.map_weight:
                loss = loss + method.map_weight * map_loss(f_i, f_t, r_lab, scale,
                                                           method.label_smoothing)
        if init_params is not None:
            l2 = sum(((p - init_params[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad)
            loss = loss + method.l2_weight * l2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _average_gradients(trained)
        optimizer.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(task=task.name, loss=f"{loss.item():.3f}", refresh=False)
    return opt


def with_overrides(method: Method, **kw: Any) -> Method:
    """A copy of a preset with some fields changed (e.g. ``rho``)."""
    return replace(method, **kw)

