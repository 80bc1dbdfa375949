"""Tests for gnsp_optim.reference.metrics: hand-computed MTIL metrics, retrieval, modality gap, zero-shot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from gnsp_optim.reference.metrics import (
    continual_metrics,
    continual_metrics_reference,
    modality_gap,
    retrieval_recall,
    retrieval_recall_reference,
    zeroshot_accuracy,
    zeroshot_classifier,
)
from gnsp_optim.reference.model import CLIP, CLIPConfig
from gnsp_optim.reference.tokenizer import WordTokenizer

# --- continual metrics -------------------------------------------------------------------------------------


def test_continual_metrics_hand_computed_3x3():
    r = [[10.0, 20.0, 30.0],
         [40.0, 50.0, 60.0],
         [70.0, 80.0, 90.0]]
    # transfer: column 2 -> R[0,1] = 20; column 3 -> (R[0,2] + R[1,2]) / 2 = 45; mean = 32.5
    assert continual_metrics(r) == {"transfer": 32.5, "average": 50.0, "last": 80.0}
    assert continual_metrics(np.array(r)) == continual_metrics(torch.tensor(r))


def test_continual_metrics_single_task_has_nan_transfer():
    out = continual_metrics([[61.0]])
    assert math.isnan(out["transfer"]) and out["average"] == 61.0 and out["last"] == 61.0


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], [1.0, 2.0], [[[1.0]]]])
def test_continual_metrics_rejects_non_square(bad):
    with pytest.raises(ValueError):
        continual_metrics(bad)


_matrices = st.integers(1, 6).flatmap(
    lambda t: arrays(np.float64, (t, t), elements=st.floats(0, 100, allow_nan=False)))


@settings(max_examples=100, deadline=None)
@given(_matrices)
def test_continual_metrics_equal_reference(r):
    fast, slow = continual_metrics(r), continual_metrics_reference(r)
    for key in ("average", "last"):
        assert math.isclose(fast[key], slow[key], rel_tol=1e-12, abs_tol=1e-12)
    assert (math.isnan(fast["transfer"]) and math.isnan(slow["transfer"])) or math.isclose(
        fast["transfer"], slow["transfer"], rel_tol=1e-12, abs_tol=1e-12)


@settings(max_examples=50, deadline=None)
@given(_matrices.filter(lambda r: len(r) > 1), st.floats(0, 100))
def test_transfer_reads_only_the_strict_upper_triangle(r, value):
    changed = r.copy()
    changed[np.tril_indices(len(r))] = value
    assert math.isclose(continual_metrics(changed)["transfer"], continual_metrics(r)["transfer"], rel_tol=1e-12)
    constant = np.full_like(r, value)
    assert all(math.isclose(v, value, rel_tol=1e-12, abs_tol=1e-12) for v in continual_metrics(constant).values())


# --- retrieval and modality gap ----------------------------------------------------------------------------


def test_retrieval_recall_hand_case():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    text = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 1.0]])
    # image->text: image 0 ranks text 2 first, then its own text 0 (rank 1); image 1: texts 0,1 tie (hit);
    # image 2: own text first. text->image: text 0 ranks image 1 first, then image 2 (rank 2 for own)
    out = retrieval_recall(image, text, ks=(1, 2))
    assert out["image_to_text_R@1"] == pytest.approx(200 / 3) and out["image_to_text_R@2"] == 100.0
    assert out["text_to_image_R@1"] == pytest.approx(200 / 3) and out["text_to_image_R@2"] == pytest.approx(200 / 3)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_retrieval_recall_equals_sorting_reference(n, seed):
    g = torch.Generator().manual_seed(seed)
    image, text = torch.randn(n, 6, generator=g), torch.randn(n, 6, generator=g)
    fast = retrieval_recall(image, text, ks=(1, 3, 5, n))
    assert fast == pytest.approx(retrieval_recall_reference(image, text, ks=(1, 3, 5, n)))
    assert fast[f"image_to_text_R@{n}"] == 100.0 and fast[f"text_to_image_R@{n}"] == 100.0
    assert fast["image_to_text_R@1"] <= fast["image_to_text_R@3"] <= fast["image_to_text_R@5"]


def test_retrieval_recall_needs_pairs():
    with pytest.raises(ValueError):
        retrieval_recall(torch.randn(3, 4), torch.randn(2, 4))


def test_modality_gap_hand_and_invariances():
    image = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # centre (0.5, 0.5)
    text = torch.tensor([[0.0, -2.0], [0.0, -1.0]])  # centre (0, -1)
    assert modality_gap(image, text) == pytest.approx(math.sqrt(0.25 + 2.25))
    assert modality_gap(image, image * 7) == pytest.approx(0.0, abs=1e-7)
    shuffled = image[torch.tensor([1, 0])]
    assert modality_gap(shuffled, text) == pytest.approx(modality_gap(image, text))


# --- zero-shot ---------------------------------------------------------------------------------------------


def test_zeroshot_classifier_equals_per_template_loop():
    classes, templates = ["cat", "dog", "red car"], ["a photo of a {}.", "a {} in the wild.", "art of the {}"]
    tok = WordTokenizer.from_texts([t.format(c) for t in templates for c in classes], 16)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size)).double().eval()
    weights = zeroshot_classifier(model, tok, classes, templates, "cpu")
    assert weights.shape == (3, 64)
    with torch.no_grad():
        for c, name in enumerate(classes):
            total = torch.zeros(64, dtype=torch.float64)
            for template in templates:
                e = model.encode_text(tok([template.format(name)]))[0]
                total += e / e.norm()
            torch.testing.assert_close(weights[c], (total / total.norm()).float())
    as_callables = [lambda c, t=t: t.format(c) for t in templates]
    torch.testing.assert_close(zeroshot_classifier(model, tok, classes, as_callables, "cpu"), weights)
    # encoded a few prompts at a time (chunks that split a class's templates): the same classifier
    torch.testing.assert_close(zeroshot_classifier(model, tok, classes, templates, "cpu", batch=2), weights)


class _IdentityImageModel(torch.nn.Module):
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images


def test_zeroshot_accuracy_hand_case():
    classifier = torch.eye(3)
    batches = [
        (torch.tensor([[5.0, 1.0, 0.0], [0.0, 0.2, 0.1]]), torch.tensor([0, 1])),  # predicts 0, 1
        (torch.tensor([[0.0, 0.0, -1.0], [1.0, 0.0, 2.0]]), [2, 2]),  # predicts 0 (wrong), 2
    ]
    assert zeroshot_accuracy(_IdentityImageModel(), classifier, batches, "cpu") == 75.0
    assert zeroshot_accuracy(_IdentityImageModel(), classifier * 5, iter(batches[:1]), "cpu") == 100.0


def test_zeroshot_accuracy_with_a_real_model_matches_manual_argmax():
    torch.manual_seed(1)
    model = CLIP(CLIPConfig.tiny()).eval()
    classifier = F.normalize(torch.randn(4, 64), dim=-1)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        predictions = (model.encode_image(images) @ classifier.T).argmax(-1)
    expected = 100.0 * float((predictions == labels).float().mean())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=4)
    assert zeroshot_accuracy(model, classifier, loader, "cpu") == pytest.approx(expected)


def test_zeroshot_accuracy_without_samples_raises():
    with pytest.raises(ValueError):
        zeroshot_accuracy(_IdentityImageModel(), torch.eye(2), [], "cpu")
