r"""Contrastive pre-training of a (tiny) CLIP on image-caption pairs, and small dataset adapters.

The offline benchmark cannot download CLIP, so it pre-trains a tiny one on generated pairs
(:mod:`gnsp_optim.reference.toydata`) with the CLIP objective (symmetric InfoNCE), caches the weights, and
then fine-tunes it continually.

Example:
    >>> ds = TensorImageDataset(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    >>> ds[1][0].shape, ds[1][1]
    (torch.Size([3, 8, 8]), 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .model import CLIP_MEAN, CLIP_STD

__all__ = ["TensorImageDataset", "CaptionedImages", "pretrain_clip"]


class TensorImageDataset(Dataset):
    """``uint8`` images ``(N, 3, S, S)`` and labels -> CLIP-normalised float images and ``int`` labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        x = self.images[i].float() / 255.0 if self.images.dtype == torch.uint8 else self.images[i].float()
        return (x - self.mean) / self.std, int(self.labels[i])


class CaptionedImages(TensorImageDataset):
    """Images with one caption each; identical captions form a class (``class_captions[label]``).

    Serves as the reference set of CD / MAP and as the paired set for retrieval and the modality gap
    (``captions[i]`` is item ``i``'s caption).
    """

    def __init__(self, images: torch.Tensor, captions: list[str]) -> None:
        self.class_captions = sorted(set(captions))
        index = {c: k for k, c in enumerate(self.class_captions)}
        super().__init__(images, torch.tensor([index[c] for c in captions]))
        self.captions = list(captions)


def pretrain_clip(model, tokenizer: Callable[[list[str]], torch.Tensor], pairs: CaptionedImages, *,
                  steps: int = 1000, batch_size: int = 128, lr: float = 1e-3, weight_decay: float = 0.1,
                  warmup: int = 50, seed: int = 0, progress: bool = True) -> list[float]:
    """CLIP's contrastive objective on ``pairs`` for ``steps`` AdamW steps; returns the loss curve.

    Batches avoid duplicate captions only statistically; identical captions in a batch share the target mass
    (soft targets), so repeated phrasing does not fight the loss.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = tokenizer(pairs.captions)
    labels = pairs.labels
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    other = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=lr)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="pretrain tiny CLIP", leave=False, dynamic_ncols=True)
        except ImportError:
            bar = None
    losses = []
    model.train()
    n = len(pairs)
    for step in range(steps):
        for grp in opt.param_groups:
            grp["lr"] = lr * (min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        idx = torch.randint(0, n, (batch_size,), generator=g)
        images = torch.stack([pairs[int(i)][0] for i in idx])
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        same = (labels[idx][:, None] == labels[idx][None, :]).float()
        target = same / same.sum(1, keepdim=True)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    if bar is not None:
        bar.close()
    model.eval()
    return losses
