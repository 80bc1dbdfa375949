"""Tests for gnsp_optim.reference.toydata (offline toy data for the tiny-CLIP continual benchmark)."""

from __future__ import annotations

import math
import re

import pytest
import torch

pytest.importorskip("sklearn")
from hypothesis import given, settings
from hypothesis import strategies as st

from gnsp_optim.reference import toydata as td

HAVE_ANIMALS = td.animals_available()
needs_animals = pytest.mark.skipif(not HAVE_ANIMALS, reason=f"animal-mnist missing: {td.ANIMAL_MNIST_HINT}")
N_TRAIN, N_TEST = 120, 60


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


@pytest.fixture(scope="module")
def tasks() -> list[td.ToyTask]:
    return td.build_tasks(n_train=N_TRAIN, n_test=N_TEST, substitute_missing=not HAVE_ANIMALS)


@pytest.fixture(scope="module")
def pretrain():
    return td.build_pretraining_pairs(n=4000, return_meta=True, substitute_missing=not HAVE_ANIMALS)


@pytest.fixture(scope="module")
def capset():
    return td.build_caption_set(n=600, return_meta=True, substitute_missing=not HAVE_ANIMALS)


def test_tasks_shapes_dtypes_labels(tasks):
    assert len(tasks) >= 6
    assert len({t.name for t in tasks}) == len(tasks)
    for t in tasks:
        assert t.num_classes == len(t.classnames) == len(set(t.classnames)) >= 2
        assert all("{}" in tpl for tpl in t.templates) and len(t.templates) >= 2
        for x, y, n in ((t.train_images, t.train_labels, N_TRAIN), (t.test_images, t.test_labels, N_TEST)):
            assert x.dtype == torch.uint8 and tuple(x.shape) == (n, 3, 32, 32)
            assert y.dtype == torch.int64 and y.shape == (n,)
            assert int(y.min()) >= 0 and int(y.max()) < t.num_classes
            assert float(x.float().std()) > 5.0  # not blank
    real = [t for t in tasks if t.source != "procedural"]
    assert len(real) >= (2 if HAVE_ANIMALS else 1)


def test_tasks_class_balance(tasks):
    for t in tasks:
        for y in (t.train_labels, t.test_labels):
            c = torch.bincount(y, minlength=t.num_classes)
            assert int(c.max() - c.min()) <= 1, (t.name, c.tolist())


def test_digits_capped_and_nearly_balanced():
    t = td.build_tasks(names=["digits"], n_train=5000, n_test=5000)[0]
    split = td.real_source_split("digits")
    assert len(t.train_labels) == len(split["task_train"]) and len(t.test_labels) == len(split["task_test"])
    c = torch.bincount(t.train_labels, minlength=10).float()
    assert float(c.max() / c.min()) < 1.15


def test_tasks_deterministic_and_seed_dependent():
    a = td.build_tasks(names=["shapes", "digits", "textures"], n_train=40, n_test=20, seed=3)
    b = td.build_tasks(names=["shapes", "digits", "textures"], n_train=40, n_test=20, seed=3)
    c = td.build_tasks(names=["shapes", "digits", "textures"], n_train=40, n_test=20, seed=4)
    for ta, tb, tc in zip(a, b, c):
        assert torch.equal(ta.train_images, tb.train_images) and torch.equal(ta.test_labels, tb.test_labels)
        assert not torch.equal(ta.train_images, tc.train_images)


def test_corpora_deterministic():
    i1, c1 = td.build_pretraining_pairs(n=300, seed=5, substitute_missing=True)
    i2, c2 = td.build_pretraining_pairs(n=300, seed=5, substitute_missing=True)
    i3, c3 = td.build_pretraining_pairs(n=300, seed=6, substitute_missing=True)
    assert torch.equal(i1, i2) and c1 == c2
    assert not torch.equal(i1, i3) and c1 != c3


@pytest.mark.parametrize("source", ["digits"] + (["animals"] if HAVE_ANIMALS else []))
def test_real_split_disjoint_and_complete(source):
    split = td.real_source_split(source)
    n = 1797 if source == "digits" else 10000
    allidx = torch.cat(list(split.values()))
    assert len(allidx) == n and len(torch.unique(allidx)) == n
    _, y = td.load_digits_source() if source == "digits" else td.load_animals_source()
    for part in split.values():  # every class present in every part (stratified)
        assert len(torch.unique(y[part])) == 10


def test_task_images_come_from_task_splits(tasks):
    for t in tasks:
        if t.source == "procedural":
            assert bool((t.train_source_index == -1).all())
            continue
        split = td.real_source_split(t.source)
        tr, te = set(t.train_source_index.tolist()), set(t.test_source_index.tolist())
        assert tr <= set(split["task_train"].tolist()) and te <= set(split["task_test"].tolist())
        assert not tr & te
        _, y = td.load_digits_source() if t.source == "digits" else td.load_animals_source()
        assert torch.equal(y[t.train_source_index], t.train_labels)


def test_pretraining_and_caption_sets_use_only_their_share(tasks, pretrain, capset):
    for (images, caps, meta), part in ((pretrain, "pretrain"), (capset, "caption")):
        assert len(caps) == images.shape[0] == len(meta["source"]) == len(meta["source_index"])
        for source in ("digits", "animals"):
            sel = torch.tensor([s == source for s in meta["source"]])
            if source == "animals" and not HAVE_ANIMALS:
                assert not bool(sel.any())
                continue
            assert bool(sel.any())
            used = set(meta["source_index"][sel].tolist())
            split = td.real_source_split(source)
            assert used <= set(split[part].tolist())
            others = set().union(*(set(v.tolist()) for k, v in split.items() if k != part))
            assert not used & others


def test_caption_set_disjoint_from_pretraining_and_tasks(tasks, pretrain, capset):
    def keys(x: torch.Tensor) -> set[bytes]:
        return {bytes(im.numpy().tobytes()) for im in x}

    cap = keys(capset[0])
    assert not cap & keys(pretrain[0])
    for t in tasks:
        assert not cap & keys(t.train_images) and not cap & keys(t.test_images)
        assert not keys(pretrain[0]) & keys(t.test_images)


def test_every_class_word_in_pretraining_captions(tasks, pretrain):
    vocab = set().union(*(_words(c) for c in pretrain[1]))
    for t in tasks:
        for name in t.classnames:
            missing = _words(name) - vocab
            assert not missing, (t.name, name, missing)
    assert len(set(pretrain[1])) > 300  # varied phrasing


def test_captions_describe_their_images(pretrain):
    _images, caps, meta = pretrain
    for cap, src, idx in zip(caps[:400], meta["source"][:400], meta["source_index"][:400].tolist()):
        if src == "digits":
            _, y = td.load_digits_source()
            assert td.DIGIT_WORDS[int(y[idx])] in _words(cap)
        elif src == "animals":
            _, y = td.load_animals_source()
            assert td.ANIMALS[int(y[idx])] in _words(cap)


def test_all_texts(tasks, pretrain):
    caps = pretrain[1][:50]
    texts = td.all_texts(tasks, caps)
    assert len(texts) == len(set(texts))
    assert set(caps) <= set(texts)
    for t in tasks:
        for i in range(len(t.templates)):
            assert set(t.prompts(i)) <= set(texts)


def test_missing_animals_raises_or_substitutes(monkeypatch):
    monkeypatch.setattr(td, "animals_available", lambda: False)
    with pytest.raises(ImportError, match="animal-mnist==0.4"):
        td.build_tasks(names=["animals"], n_train=10, n_test=10)
    with pytest.raises(ImportError, match="animal-mnist==0.4"):
        td.build_pretraining_pairs(n=10)
    t = td.build_tasks(names=["animals"], n_train=12, n_test=6, substitute_missing=True)[0]
    assert t.name == "sizes (substitute for animals)" and t.classnames == td.SIZES
    _, caps, meta = td.build_pretraining_pairs(n=200, substitute_missing=True, return_meta=True)
    assert "animals" not in meta["source"] and len(caps) == 200


def _shape_args(draw_kind, cx, cy, r, rot):
    return (torch.tensor([draw_kind]), torch.tensor([cx]), torch.tensor([cy]), torch.tensor([r]),
            torch.tensor([rot]))


@settings(max_examples=25, deadline=None)
@given(st.integers(0, len(td.SHAPES) - 1), st.floats(-0.5, 0.5), st.floats(-0.5, 0.5), st.floats(0.15, 0.7),
       st.floats(-math.pi, math.pi))
def test_render_shapes_matches_slow_reference(kind, cx, cy, r, rot):
    args = _shape_args(kind, cx, cy, r, rot)
    fast, slow = td.render_shapes(*args, 12), td.render_shapes_slow(*args, 12)
    assert torch.allclose(fast, slow, atol=1e-4)
    assert float(fast.min()) >= 0.0 and float(fast.max()) <= 1.0


@settings(max_examples=20, deadline=None)
@given(st.floats(-0.3, 0.3), st.floats(-0.3, 0.3), st.floats(0.3, 0.6))
def test_circle_centroid_and_area(cx, cy, r):
    m = td.render_shapes(*_shape_args(0, cx, cy, r, 0.0), 48)[0]
    yy, xx = td._coords(48)
    mass = float(m.sum())
    assert abs(float((m * xx).sum()) / mass - cx) < 0.02 and abs(float((m * yy).sum()) / mass - cy) < 0.02
    area = mass * (2 / 48) ** 2
    assert abs(area - math.pi * r * r) / (math.pi * r * r) < 0.05


def test_place_sprites_identity_and_rotation():
    g = torch.Generator().manual_seed(0)
    sprite = torch.rand(2, 16, 16, generator=g)
    zero, one = torch.zeros(2), torch.ones(2)
    same = td._place_sprites(sprite, zero, zero, one, zero, 16)
    assert torch.allclose(same, sprite, atol=1e-5)
    rot = td._place_sprites(sprite, zero, zero, one, torch.full((2,), math.pi / 2), 16)
    # y points down, so a +90 degree turn maps sprite[a, b] to output[b, 15 - a]: torch.rot90 with k=-1
    assert torch.allclose(rot, torch.rot90(sprite, k=-1, dims=(1, 2)), atol=1e-4)
    shifted = td._place_sprites(sprite, torch.full((2,), 0.25), zero, one, zero, 16)  # 2 pixels right
    assert torch.allclose(shifted[:, :, 2:], sprite[:, :, :-2], atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(1, 12), st.integers(0, 1000))
def test_balanced_labels(n, k, seed):
    y = td._balanced_labels(n, k, torch.Generator().manual_seed(seed))
    c = torch.bincount(y, minlength=k)
    assert len(y) == n and int(c.max() - c.min()) <= 1


def test_positions_task_places_objects_in_their_region():
    t = td.build_tasks(names=["positions"], n_train=100, n_test=10, shift=0.0)[0]
    x = t.train_images.float()
    bg = x[:, :, :2, :2].mean(dim=(2, 3), keepdim=True)  # corners are always background
    fg = ((x - bg).abs().sum(1) > 60).float()  # (N, S, S)
    yy, xx = td._coords(32)
    mass = fg.sum(dim=(1, 2)).clamp_min(1)
    mx, my = (fg * xx).sum(dim=(1, 2)) / mass, (fg * yy).sum(dim=(1, 2)) / mass
    pred = torch.stack([-mx, mx, -my, my, 0.35 - torch.maximum(mx.abs(), my.abs())], 1).argmax(1)
    assert float((pred == t.train_labels).float().mean()) > 0.9


def test_save_grid_png(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    imgs = td.build_caption_set(n=10, substitute_missing=True)[0]
    path = tmp_path / "grid.png"
    td.save_grid_png(imgs, str(path), nrow=4, scale=2, pad=1)
    im = pil.open(path)
    assert im.size == ((4 * 33 + 1) * 2, (3 * 33 + 1) * 2)
    td.save_grid_png(imgs.float() / 255, str(path), nrow=5, scale=1)
    assert pil.open(path).size == (5 * 33 + 1, 2 * 33 + 1)
