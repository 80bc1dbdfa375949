"""Tests for gnsp_optim.reference.losses: each loss equals its slow twin (values and gradients) plus hand cases."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gnsp_optim.reference.losses import (
    cd_loss,
    cd_loss_reference,
    ce_loss,
    ce_loss_reference,
    map_loss,
    map_loss_reference,
)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


def _values_and_grads(fn, inputs: list[torch.Tensor], *rest):
    loss = fn(*inputs, *rest)
    grads = torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])
    return loss, grads


def _assert_twins_equal(fast, slow, inputs, *rest) -> None:
    fast_loss, fast_grads = _values_and_grads(fast, inputs, *rest)
    slow_loss, slow_grads = _values_and_grads(slow, inputs, *rest)
    torch.testing.assert_close(fast_loss, slow_loss, rtol=1e-10, atol=1e-10)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


_shapes = st.tuples(st.integers(1, 7), st.integers(1, 6), st.integers(2, 9), st.integers(0, 2**31 - 1))
_scales = st.sampled_from([1.0, 14.3, 100.0])
_smoothing = st.sampled_from([0.0, 0.2, 0.5])


@settings(max_examples=30, deadline=None)
@given(_shapes, _scales, _smoothing)
def test_ce_loss_equals_reference(shape, scale, eps):
    batch, classes, dim, seed = shape
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    scale_t = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    inputs = [_randn(batch, dim, seed=seed), _randn(classes, dim, seed=seed + 1)]
    _assert_twins_equal(lambda i, t: ce_loss(i, t, labels, scale_t, eps),
                        lambda i, t: ce_loss_reference(i, t, labels, scale_t, eps), inputs)
    _assert_twins_equal(lambda s: ce_loss(inputs[0], inputs[1], labels, s, eps),
                        lambda s: ce_loss_reference(inputs[0], inputs[1], labels, s, eps), [scale_t])


@settings(max_examples=30, deadline=None)
@given(_shapes, _scales, st.sampled_from([1.0, 2.0, 3.5]))
def test_cd_loss_equals_reference(shape, scale, temperature):
    batch, _, dim, seed = shape
    inputs = [_randn(batch, dim, seed=seed + k) for k in range(4)]
    _assert_twins_equal(lambda *x: cd_loss(*x, scale, temperature),
                        lambda *x: cd_loss_reference(*x, scale, temperature), inputs[:2], *inputs[2:])


@settings(max_examples=30, deadline=None)
@given(_shapes, _scales, _smoothing)
def test_map_loss_equals_reference(shape, scale, eps):
    batch, classes, dim, seed = shape
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed))
    inputs = [_randn(batch, dim, seed=seed), _randn(batch, dim, seed=seed + 1)]
    _assert_twins_equal(lambda i, t: map_loss(i, t, labels, scale, eps),
                        lambda i, t: map_loss_reference(i, t, labels, scale, eps), inputs)


def test_ce_loss_hand_case():
    # orthogonal unit features: logits are s on the true class and 0 elsewhere
    image, text, labels = torch.eye(3)[:2], torch.eye(3), torch.tensor([0, 1])
    log_z = math.log(math.exp(2.0) + 2)
    expected = (1 - 0.2) * (log_z - 2.0) + 0.2 * (log_z - 2.0 / 3)
    assert math.isclose(float(ce_loss(image, text, labels, 2.0)), expected, rel_tol=1e-6)


def test_losses_normalise_features_inside():
    img, txt, labels = _randn(5, 4, seed=0).detach(), _randn(5, 4, seed=1).detach(), torch.tensor([0, 1, 1, 2, 0])
    scaled_img, scaled_txt = img * torch.rand(5, 1) * 10, txt * 3
    assert torch.allclose(ce_loss(img, txt, labels, 50.0), ce_loss(scaled_img, scaled_txt, labels, 50.0))
    assert torch.allclose(map_loss(img, txt, labels, 50.0), map_loss(scaled_img, scaled_txt, labels, 50.0))
    assert torch.allclose(cd_loss(img, txt, img, txt, 50.0), cd_loss(scaled_img, scaled_txt, img, txt, 50.0))


def test_cd_loss_is_stationary_at_the_frozen_model_and_does_not_train_it():
    img, txt = _randn(6, 5, seed=2), _randn(6, 5, seed=3)
    img0, txt0 = img.detach().clone().requires_grad_(True), txt.detach().clone().requires_grad_(True)
    loss = cd_loss(img, txt, img0, txt0, 100.0)
    loss.backward()
    assert img.grad.abs().max() < 1e-10 and txt.grad.abs().max() < 1e-10
    assert img0.grad is None and txt0.grad is None
    moved = cd_loss(img + 0.3 * _randn(6, 5, seed=4).detach(), txt, img0, txt0, 100.0)
    assert moved > loss  # soft-target CE is minimised when A = A0


def test_map_loss_with_distinct_labels_and_no_smoothing_is_clip_loss():
    img, txt = _randn(5, 4, seed=5), _randn(5, 4, seed=6)
    logits = 30.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    clip = F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))  # both summed
    torch.testing.assert_close(map_loss(img, txt, torch.arange(5), 30.0, 0.0), clip)


def test_map_loss_shares_mass_between_same_class_pairs():
    # two pairs of one class with identical features: every logit is equal, Q is uniform: log 2 per direction
    feats = torch.ones(2, 3)
    assert math.isclose(float(map_loss(feats, feats, torch.tensor([4, 4]), 100.0)), 2 * math.log(2), rel_tol=1e-6)
    # separated pairs (logits 10 I): rewarded when the labels differ, penalised when they are one class
    img, txt = torch.eye(2), torch.eye(2)
    same = float(map_loss(img, txt, torch.tensor([0, 0]), 10.0, 0.0))
    different = float(map_loss(img, txt, torch.tensor([0, 1]), 10.0, 0.0))
    assert different < same
    # per direction: half the target on each pair (0.5 (log(e^10 + 1) - 10) + 0.5 log(e^10 + 1)); both summed
    assert math.isclose(same, 2 * (0.5 * (math.log(math.exp(10) + 1) - 10) + 0.5 * math.log(math.exp(10) + 1)),
                        rel_tol=1e-6)


@pytest.mark.parametrize("fn", [ce_loss, map_loss])
def test_logit_scale_tensor_gets_gradient(fn):
    scale = torch.tensor(math.log(100.0), requires_grad=True)
    img, txt = _randn(4, 3, seed=7), _randn(4, 3, seed=8)
    fn(img, txt, torch.tensor([0, 1, 2, 3]), scale.exp()).backward()
    assert scale.grad is not None and scale.grad != 0
