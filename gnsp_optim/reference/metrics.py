r"""Evaluation: MTIL summary metrics (method.md sec. 4), retrieval recall, modality gap, zero-shot accuracy.

Example:
    >>> continual_metrics([[10, 20, 30], [40, 50, 60], [70, 80, 90]])
    {'transfer': 32.5, 'average': 50.0, 'last': 80.0}
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _as_square_matrix(matrix: Any) -> torch.Tensor:
    r = torch.as_tensor(matrix, dtype=torch.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"expected a non-empty T x T accuracy matrix, got shape {tuple(r.shape)}")
    return r


def continual_metrics(matrix: Any) -> dict[str, float]:
    r"""Transfer / Average / Last from an accuracy matrix ``R[i, j]`` (after task i, test set j).

    * transfer = mean over ``j = 2..T`` of ``mean_{i<j} R[i, j]`` (zero-shot on tasks not yet learnt);
      ``nan`` when ``T = 1`` (no task is ever unseen);
    * average = mean of all ``T x T`` entries;
    * last = mean of the last row.

    Example:
        >>> continual_metrics([[50.0]])["transfer"]
        nan
    """
    r = _as_square_matrix(matrix)
    t = r.shape[0]
    if t == 1:
        transfer = math.nan
    else:
        strictly_upper = torch.ones(t, t, dtype=torch.bool).triu(1)
        column_means = (r * strictly_upper).sum(0)[1:] / torch.arange(1, t, dtype=torch.float64)
        transfer = float(column_means.mean())
    return {"transfer": transfer, "average": float(r.mean()), "last": float(r[-1].mean())}


def continual_metrics_reference(matrix: Any) -> dict[str, float]:
    """Slow twin of :func:`continual_metrics` (plain loops). Example: see :func:`continual_metrics`."""
    r = _as_square_matrix(matrix).tolist()
    t = len(r)
    per_column = [sum(r[i][j] for i in range(j)) / j for j in range(1, t)]
    transfer = sum(per_column) / len(per_column) if per_column else math.nan
    average = sum(sum(row) for row in r) / (t * t)
    return {"transfer": transfer, "average": average, "last": sum(r[-1]) / t}


def _ranks_of_matches(similarity: torch.Tensor) -> torch.Tensor:
    # rank of the true pair (the diagonal) in each row = how many candidates score strictly higher;
    # ties therefore count in the model's favour.
    return (similarity > similarity.diagonal()[:, None]).sum(dim=1)


def retrieval_recall(image_features: torch.Tensor, text_features: torch.Tensor,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    r"""Recall@k in percent for image->text and text->image retrieval, pair ``i`` matching pair ``i``.

    Features are normalised inside. Keys: ``"image_to_text_R@k"`` and ``"text_to_image_R@k"``. A tie with the
    true match counts as a hit (rank = number of strictly better candidates).

    Example:
        >>> f = torch.eye(3)
        >>> retrieval_recall(f, f, ks=(1,))
        {'image_to_text_R@1': 100.0, 'text_to_image_R@1': 100.0}
    """
    if image_features.shape[0] != text_features.shape[0]:
        raise ValueError("retrieval_recall needs as many texts as images (pair i matches pair i)")
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    out = {}
    for direction, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        ranks = _ranks_of_matches(s)
        for k in ks:
            out[f"{direction}_R@{k}"] = 100.0 * float((ranks < k).float().mean())
    return out


def retrieval_recall_reference(image_features: torch.Tensor, text_features: torch.Tensor,
                               ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Slow twin of :func:`retrieval_recall` via sorting (equal when scores have no ties)."""
    sim = F.normalize(image_features.float(), dim=-1) @ F.normalize(text_features.float(), dim=-1).T
    out = {}
    for direction, s in (("image_to_text", sim), ("text_to_image", sim.T)):
        for k in ks:
            hits = [i in s[i].argsort(descending=True)[:k].tolist() for i in range(s.shape[0])]
            out[f"{direction}_R@{k}"] = 100.0 * sum(hits) / len(hits)
    return out


def modality_gap(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    r"""``|| mean(normalised image embeddings) - mean(normalised text embeddings) ||_2``.

    Example:
        >>> modality_gap(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]))  # sqrt(2)
        1.4142135381698608
    """
    image_center = F.normalize(image_features.float(), dim=-1).mean(0)
    text_center = F.normalize(text_features.float(), dim=-1).mean(0)
    return float(torch.linalg.vector_norm(image_center - text_center))


def _fill(template: str | Callable[[str], str], classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


@torch.no_grad()
def zeroshot_classifier(model: torch.nn.Module, tokenizer: Callable[[list[str]], torch.Tensor],
                        classnames: Sequence[str], templates: Sequence[str | Callable[[str], str]],
                        device: torch.device | str, batch: int = 512) -> torch.Tensor:
    r"""``(C, D)`` float32 class embeddings: per class, normalise each template's text embedding, mean, normalise.

    ``templates`` are format strings with one ``{}`` or callables ``classname -> text``. The ``C x T`` prompts
    are encoded together, ``batch`` at a time.

    Example:
        >>> from gnsp_optim.reference.model import CLIP, CLIPConfig
        >>> from gnsp_optim.reference.tokenizer import WordTokenizer
        >>> tok = WordTokenizer.from_texts(["a photo of a cat dog"], 16)
        >>> model = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size))
        >>> zeroshot_classifier(model, tok, ["cat", "dog"], ["a photo of a {}."], "cpu").shape
        torch.Size([2, 64])
    """
    if not classnames or not templates:
        raise ValueError("zeroshot_classifier needs at least one class name and one template")
    texts = [_fill(t, name) for name in classnames for t in templates]
    feats = torch.cat([model.encode_text(tokenizer(texts[k:k + batch]).to(device)).float()
                       for k in range(0, len(texts), batch)])
    per_template = F.normalize(feats, dim=-1).view(len(classnames), len(templates), -1)
    return F.normalize(per_template.mean(1), dim=-1)


@torch.no_grad()
def zeroshot_accuracy(model: torch.nn.Module, classifier: torch.Tensor,
                      loader_or_batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      device: torch.device | str) -> float:
    r"""Top-1 accuracy in percent of ``argmax(100 * normalise(f_I(x)) @ classifier.T)`` over ``(images, labels)``.

    Example:
        >>> acc = zeroshot_accuracy(model, classifier, test_loader, "cuda")  # doctest: +SKIP
    """
    correct = total = 0
    weights = classifier.to(device)
    for images, labels in loader_or_batches:
        features = F.normalize(model.encode_image(images.to(device)).float(), dim=-1)
        predictions = (100.0 * features @ weights.float().T).argmax(dim=-1)
        correct += int((predictions.cpu() == torch.as_tensor(labels).cpu()).sum())
        total += len(labels)
    if total == 0:
        raise ValueError("zeroshot_accuracy got no samples")
    return 100.0 * correct / total
