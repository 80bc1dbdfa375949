r"""Contrastive pre-training of a (tiny) CLIP on image-caption pairs, and small dataset adapters.

The offline benchmark cannot download CLIP, so it pre-trains a tiny one on generated pairs
(:mod:`gnsp_optim.reference.toydata`) with the CLIP objective (symmetric InfoNCE, a learnt logit scale
clamped at 100). :mod:`gnsp_optim.reference.tinyclip` holds the recipe, the shipped checkpoint and its
checks; this module holds the training loop.

Example:
    >>> ds = TensorImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    >>> ds[1][0].shape, ds[1][1]
    (torch.Size([3, 8, 8]), 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data.images import CLIP_MEAN, CLIP_STD

__all__ = ["TensorImageDataset", "CaptionedImages", "pretrain_clip", "MAX_LOGIT_SCALE"]

#: CLIP clamps its learnt logit scale at 100 (``log(100)`` for the stored parameter).
MAX_LOGIT_SCALE = 100.0


class TensorImageDataset(Dataset):
    """``uint8`` images ``(N, 3, S, S)`` and labels -> CLIP-normalised float images and ``int`` labels.

    :meth:`batch` normalises many items at once (what the training loops use: no per-item Python work).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def __getitem__(self, i: int):
        return self._normalise(self.images[i]), int(self.labels[i])

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of the items ``idx``, normalised together.

        Example:
            >>> ds = TensorImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
            >>> x, y = ds.batch(torch.tensor([0, 3]))
            >>> tuple(x.shape), y.tolist(), torch.equal(x[1], ds[3][0])
            ((2, 3, 8, 8), [0, 1], True)
        """
        return self._normalise(self.images[idx]), self.labels[idx]


class CaptionedImages(TensorImageDataset):
    """Images with one caption each; identical captions form a class (``class_captions[label]``).

    Serves as the reference set of CD / MAP, as the paired set for retrieval and the modality gap
    (``captions[i]`` is item ``i``'s caption) and as the pre-training corpus (``sources[i]``: which kind of
    scene item ``i`` is, for single-source batches).
    """

    def __init__(self, images: torch.Tensor, captions: list[str], sources: Sequence[str] | None = None) -> None:
        self.class_captions = sorted(set(captions))
        index = {c: k for k, c in enumerate(self.class_captions)}
        super().__init__(images, torch.tensor([index[c] for c in captions], dtype=torch.long))
        self.captions = list(captions)
        self.sources = list(sources) if sources is not None else None


def _batch_indices(n: int, batch_size: int, groups: list[torch.Tensor] | None, single_source_share: float,
                   g: torch.Generator) -> torch.Tensor:
    if groups and float(torch.rand(1, generator=g)) < single_source_share:
        pool = groups[int(torch.randint(0, len(groups), (1,), generator=g))]
        return pool[torch.randint(0, len(pool), (batch_size,), generator=g)]
    return torch.randint(0, n, (batch_size,), generator=g)


def pretrain_clip(model, tokenizer: Callable[[list[str]], torch.Tensor], pairs: CaptionedImages, *,
                  steps: int = 1000, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.1,
                  warmup: int = 50, seed: int = 0, single_source_share: float = 0.0,
                  logit_scale_lr: float | None = None, progress: bool = True,
                  desc: str = "pretrain tiny CLIP") -> dict[str, list[float]]:
    """CLIP's contrastive objective on ``pairs`` for ``steps`` AdamW steps (warm-up + cosine).

    Identical captions in a batch share the target mass (soft targets), so repeated phrasing does not fight
    the loss. ``single_source_share`` of the batches are drawn from one kind of scene only (``pairs.sources``):
    hard negatives (ten digits against each other instead of a digit against a texture).
    ``model.logit_scale`` is learnt (at ``logit_scale_lr``, default ``lr``, no weight decay) and clamped at
    :data:`MAX_LOGIT_SCALE` after every step, as in CLIP. Returns ``{"loss": [...], "logit_scale": [...]}``.

    Example::

        curves = pretrain_clip(model, tokenizer, CaptionedImages(images, captions), steps=1500)
    """
    g = torch.Generator().manual_seed(seed)
    tokens = tokenizer(pairs.captions)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2]
    other = [p for n, p in named if p.dim() < 2 and n != "logit_scale"]
    groups_ = [{"params": decay, "weight_decay": weight_decay, "lr_mult": 1.0},
               {"params": other, "weight_decay": 0.0, "lr_mult": 1.0}]
    if model.logit_scale.requires_grad:
        groups_.append({"params": [model.logit_scale], "weight_decay": 0.0,
                        "lr_mult": (logit_scale_lr if logit_scale_lr is not None else lr) / lr})
    opt = torch.optim.AdamW(groups_, lr=lr)
    source_groups = None
    if single_source_share > 0:
        if pairs.sources is None:
            raise ValueError("single_source_share > 0 needs pairs built with sources=")
        kinds = sorted(set(pairs.sources))
        src = pairs.sources
        source_groups = [torch.tensor([i for i, s in enumerate(src) if s == k]) for k in kinds]
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=desc, leave=False, dynamic_ncols=True)
        except ImportError:
            bar = None
    curves: dict[str, list[float]] = {"loss": [], "logit_scale": []}
    model.train()
    n = len(pairs)
    for step in range(steps):
        factor = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for grp in opt.param_groups:
            grp["lr"] = lr * grp["lr_mult"] * factor
        idx = _batch_indices(n, batch_size, source_groups, single_source_share, g)
        images, lab = pairs.batch(idx)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (lab[:, None] == lab[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(MAX_LOGIT_SCALE))
        curves["loss"].append(loss.item())
        curves["logit_scale"].append(float(model.logit_scale.detach().exp()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{curves['logit_scale'][-1]:.1f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return curves
