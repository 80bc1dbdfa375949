r"""GNSP's three training losses (method.md sec. 2), each beside a slow, obviously correct ``*_reference`` twin.

``logit_scale`` is the multiplier itself (``model.logit_scale.exp()``, 100 for GNSP), not its log. Features
are L2-normalised inside every function, so raw ``encode_image`` / ``encode_text`` outputs can be passed.
The total GNSP loss is ``ce_loss + cd_loss + 0.75 * map_loss``.

Example:
    >>> img, txt = torch.randn(4, 8), torch.randn(3, 8)
    >>> float(ce_loss(img, txt, torch.tensor([0, 1, 2, 0]), 100.0)) > 0
    True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _scaled_similarity(image_features: torch.Tensor, text_features: torch.Tensor,
                       logit_scale: torch.Tensor | float) -> torch.Tensor:
    return logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T


def ce_loss(image_features: torch.Tensor, class_text_features: torch.Tensor, labels: torch.Tensor,
            logit_scale: torch.Tensor | float, label_smoothing: float = 0.2) -> torch.Tensor:
    r"""Classification loss over the task's classes: ``CE_ls(s * f_I f_T(c)^T, y)``.

    Args:
        image_features: ``(B, D)`` image embeddings.
        class_text_features: ``(C, D)`` one text embedding per class (first prompt template).
        labels: ``(B,)`` class indices. logit_scale: ``s``. label_smoothing: ``eps`` (target ``(1-eps) onehot
        + eps / C``).

    Example:
        >>> ce_loss(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 2]), 100.0).shape
        torch.Size([])
    """
    logits = _scaled_similarity(image_features, class_text_features, logit_scale)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def cd_loss(image_features: torch.Tensor, text_features: torch.Tensor, image_features_0: torch.Tensor,
            text_features_0: torch.Tensor, logit_scale: torch.Tensor | float,
            temperature: float = 2.0) -> torch.Tensor:
    r"""Contrastive distillation from the frozen initial model on reference pairs.

    With ``A = s f_I(r) f_T(u)^T`` (current model) and ``A0`` the same for the frozen model (same ``s``),
    returns ``T^2 [mean_k CE(softmax(A0_k / T), log_softmax(A_k / T)) + (same with A^T, A0^T)]``.
    The frozen-model features are detached (they carry no gradient by construction).

    Example:
        >>> f = torch.randn(4, 8)
        >>> float(cd_loss(f, f, f, f, 100.0)) > 0  # soft-target CE: the entropy of the targets at the optimum
        True
    """
    a = _scaled_similarity(image_features, text_features, logit_scale) / temperature
    a0 = _scaled_similarity(image_features_0.detach(), text_features_0.detach(), logit_scale) / temperature
    a0 = a0.detach()
    image_to_text = F.cross_entropy(a, a0.softmax(dim=-1))
    text_to_image = F.cross_entropy(a.T, a0.T.softmax(dim=-1))
    return temperature ** 2 * (image_to_text + text_to_image)


def map_loss(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
             logit_scale: torch.Tensor | float, label_smoothing: float = 0.2) -> torch.Tensor:
    r"""Modality alignment preservation: symmetric InfoNCE with same-class soft targets.

    ``Q_kj = 1[y_k = y_j] / sum_j 1[y_k = y_j]``, smoothed ``Q (1 - eps) + eps / B``; the loss is the **sum** of
    the image->text and text->image soft-target cross-entropies of ``s f_I f_T^T`` (method.md sec. 2: both
    directions, each at MAP's weight; the public code adds them).

    Example:
        >>> f = torch.randn(4, 8)
        >>> map_loss(f, f, torch.tensor([0, 0, 1, 2]), 100.0).shape
        torch.Size([])
    """
    logits = _scaled_similarity(image_features, text_features, logit_scale)
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    image_to_text = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    text_to_image = F.cross_entropy(logits.T, targets.T, label_smoothing=label_smoothing)
    return image_to_text + text_to_image


# ----------------------------------------------------------------------------------------------------------
# Slow twins: explicit loops over rows, log-sum-exp by hand, no F.cross_entropy.


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def _log_softmax_row(row: torch.Tensor) -> torch.Tensor:
    top = row.max().detach()
    return row - (top + torch.log(torch.exp(row - top).sum()))


def _similarity_reference(image_features: torch.Tensor, text_features: torch.Tensor,
                          logit_scale: torch.Tensor | float) -> torch.Tensor:
    rows = []
    for i in range(image_features.shape[0]):
        u = _unit(image_features[i])
        rows.append(torch.stack([logit_scale * (u * _unit(text_features[j])).sum()
                                 for j in range(text_features.shape[0])]))
    return torch.stack(rows)


def _soft_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for k in range(logits.shape[0]):
        total = total - (targets[k] * _log_softmax_row(logits[k])).sum()
    return total / logits.shape[0]


def ce_loss_reference(image_features: torch.Tensor, class_text_features: torch.Tensor, labels: torch.Tensor,
                      logit_scale: torch.Tensor | float, label_smoothing: float = 0.2) -> torch.Tensor:
    """Slow twin of :func:`ce_loss`. Example: see :func:`ce_loss`."""
    logits = _similarity_reference(image_features, class_text_features, logit_scale)
    num_classes = logits.shape[1]
    targets = torch.full_like(logits, label_smoothing / num_classes)
    for k, y in enumerate(labels.tolist()):
        targets[k, y] += 1.0 - label_smoothing
    return _soft_cross_entropy_reference(logits, targets)


def cd_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor,
                      image_features_0: torch.Tensor, text_features_0: torch.Tensor,
                      logit_scale: torch.Tensor | float, temperature: float = 2.0) -> torch.Tensor:
    """Slow twin of :func:`cd_loss`. Example: see :func:`cd_loss`."""
    a = _similarity_reference(image_features, text_features, logit_scale) / temperature
    a0 = (_similarity_reference(image_features_0, text_features_0, logit_scale) / temperature).detach()
    p = torch.exp(a0 - torch.logsumexp(a0, dim=1, keepdim=True))
    p_t = torch.exp(a0.T - torch.logsumexp(a0.T, dim=1, keepdim=True))
    loss = _soft_cross_entropy_reference(a, p) + _soft_cross_entropy_reference(a.T, p_t)
    return temperature ** 2 * loss


def map_loss_reference(image_features: torch.Tensor, text_features: torch.Tensor, labels: torch.Tensor,
                       logit_scale: torch.Tensor | float, label_smoothing: float = 0.2) -> torch.Tensor:
    """Slow twin of :func:`map_loss`. Example: see :func:`map_loss`."""
    logits = _similarity_reference(image_features, text_features, logit_scale)
    batch = len(labels)
    y = labels.tolist()
    targets = torch.zeros_like(logits)
    for k in range(batch):
        count = sum(1 for j in range(batch) if y[j] == y[k])
        for j in range(batch):
            q = (1.0 if y[j] == y[k] else 0.0) / count
            targets[k, j] = q * (1 - label_smoothing) + label_smoothing / batch
    return _soft_cross_entropy_reference(logits, targets) + _soft_cross_entropy_reference(logits.T, targets.T)
