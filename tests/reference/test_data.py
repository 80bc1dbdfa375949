"""Tests of gnsp_optim.reference.data: every MTIL layout fabricated tiny, loaded, split, checked, broken."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnsp_optim.reference.data import (
    CLASSNAMES,
    CLIP_MEAN,
    CLIP_STD,
    MTIL_DATASETS,
    MTIL_ORDER_II,
    NUM_CLASSES,
    TEMPLATES,
    CLIPImageTransform,
    DataLayoutError,
    check_data,
    clean_classname,
    format_check_report,
    imagenet_reference_set,
    load_mtil_dataset,
    split_indices,
)
from gnsp_optim.reference.data.classnames import CALTECH101_FOLDERS, EUROSAT_FOLDER_TO_NAME
from gnsp_optim.reference.data.images import to_pil

_spec = importlib.util.spec_from_file_location("_gnsp_fabricate", Path(__file__).with_name("fabricate.py"))
fab = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fab)

SMALL = CLIPImageTransform(image_size=8)
RANDOM_SPLIT = ("caltech101", "eurosat", "sun397")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mtil")
    counts = fab.fabricate_all(root)
    return root, counts


def _fresh(tmp_path: Path, name: str) -> Path:
    fab.FABRICATORS[name](tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------------ tables
def test_class_and_template_tables():
    assert set(CLASSNAMES) == set(TEMPLATES) == set(NUM_CLASSES) == set(MTIL_DATASETS) == set(MTIL_ORDER_II)
    assert NUM_CLASSES == {"aircraft": 100, "caltech101": 101, "cifar100": 100, "dtd": 47, "eurosat": 10,
                           "flowers": 102, "food": 101, "mnist": 10, "pets": 37, "cars": 196, "sun397": 397}
    for name, names in CLASSNAMES.items():
        assert len(names) == len(set(names)) == NUM_CLASSES[name], name
        assert all(n == n.strip() and "_" not in n and "  " not in n for n in names), name
        assert TEMPLATES[name] and all(t.count("{}") == 1 for t in TEMPLATES[name]), name
    assert TEMPLATES["aircraft"][0] == "a photo of a {}, a type of aircraft."
    assert CLASSNAMES["pets"][0] == "Abyssinian" and CLASSNAMES["mnist"][0] == "0"
    assert CLASSNAMES["eurosat"][0] == "annual crop land" and CLASSNAMES["caltech101"][:2] == (
        "off-center face", "centered face")
    assert "background" not in CLASSNAMES["caltech101"]


def test_clean_classname_maps_raw_files_to_table():
    # the raw names of the real files, in the datasets' own label order, clean to the tables
    assert [clean_classname("caltech101", f) for f in sorted(CALTECH101_FOLDERS)] == list(CLASSNAMES["caltech101"])
    assert [clean_classname("eurosat", f) for f in sorted(EUROSAT_FOLDER_TO_NAME)] == list(CLASSNAMES["eurosat"])
    assert clean_classname("pets", "Abyssinian") == "Abyssinian"
    assert clean_classname("pets", "american_pit_bull_terrier") == "american pit bull terrier"
    assert clean_classname("sun397", "/t/theater/indoor_procenium") == "theater indoor procenium"
    assert clean_classname("cifar100", "aquarium_fish") == "aquarium fish"
    with pytest.raises(KeyError):
        clean_classname("eurosat", "Desert")


# ------------------------------------------------------------------------------------------------ loading
def _true_index(name: str, ds, i: int) -> int:
    img = np.asarray(ds.load_pil(i), dtype=np.float64)
    if name == "mnist":
        return round((img[..., 0].mean() - 16) / 25)
    return fab.index_of_color(tuple(img.reshape(-1, 3).mean(0)))


@pytest.mark.parametrize("name", MTIL_DATASETS)
def test_load_every_dataset(fake_root, name):
    root, counts = fake_root
    for split in ("train", "test"):
        ds = load_mtil_dataset(name, root, split, transform=SMALL)
        assert len(ds) == counts[name][split]
        assert ds.classnames == list(CLASSNAMES[name])
        assert ds.templates == list(TEMPLATES[name]) and ds.name == name
        x, y = ds[0]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
        # label <-> image content <-> class name agree for every sample
        for i in range(len(ds)):
            label = ds.samples[i][1]
            assert ds.classnames[label] == CLASSNAMES[name][_true_index(name, ds, i)], (name, split, i)
        if split == "test" and name not in RANDOM_SPLIT:
            assert sorted(set(ds.targets)) == list(range(NUM_CLASSES[name]))


@pytest.mark.parametrize("name", RANDOM_SPLIT)
def test_random_splits_deterministic_disjoint_sized(fake_root, name):
    root, _counts = fake_root
    train1 = [s for s in load_mtil_dataset(name, root, "train").samples]
    train2 = [s for s in load_mtil_dataset(name, root, "train").samples]
    test = [s for s in load_mtil_dataset(name, root, "test").samples]
    assert train1 == train2
    n = len(train1) + len(test)
    assert len(train1) == int(0.8 * n) and len(test) == n - int(0.8 * n)
    assert not {p for p, _ in train1} & {p for p, _ in test}
    assert len({p for p, _ in train1} | {p for p, _ in test}) == n
    # independent of directory-enumeration order: the listing is sorted before the permutation
    assert sorted(train1) != train1  # permutation order, not listing order


def test_split_indices_equals_torch_random_split():
    for n in (5, 7, 202, 1000):
        tr, te = split_indices(n)
        k = int(0.8 * n)
        a, b = torch.utils.data.random_split(range(n), [k, n - k], generator=torch.Generator().manual_seed(42))
        assert tr == list(a.indices) and te == list(b.indices)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(0, 400), seed=st.integers(0, 2**31 - 1))
def test_split_indices_partition(n, seed):
    tr, te = split_indices(n, seed=seed)
    assert sorted(tr + te) == list(range(n))
    assert len(tr) == int(0.8 * n)
    assert split_indices(n, seed=seed) == (tr, te)


def test_unknown_name_and_split(fake_root):
    root, _ = fake_root
    with pytest.raises(KeyError, match="unknown MTIL dataset"):
        load_mtil_dataset("imagenet", root, "train")
    with pytest.raises(ValueError, match="split"):
        load_mtil_dataset("food", root, "val")
    assert len(load_mtil_dataset("dtd", root, "val")) == 47  # native extra split


# ------------------------------------------------------------------------------------------------ check_data
def test_check_data_all_present(fake_root):
    root, counts = fake_root
    rows = check_data(root)
    assert [r.key for r in rows] == [*MTIL_DATASETS, "imagenet"]
    assert all(r.present for r in rows), format_check_report(rows)
    for r in rows[:-1]:
        if r.key != "cifar100":
            assert r.counts == counts[r.key], r.key
            assert r.num_classes == NUM_CLASSES[r.key]
    assert rows[-1].counts == {"class folders": len(fab.IMAGENET_SYNSETS)}
    assert format_check_report(rows).endswith("12/12 present")


def test_check_data_missing(tmp_path):
    rows = check_data(tmp_path)
    assert len(rows) == 12 and not any(r.present for r in rows)
    assert all(r.problem and r.hint for r in rows)
    by_key = {r.key: r for r in rows}
    assert "torchvision.datasets.FGVCAircraft" in by_key["aircraft"].hint
    assert "fgvc-aircraft-2013b" in by_key["aircraft"].problem
    assert "LOC_synset_mapping" in by_key["imagenet"].hint
    report = format_check_report(rows)
    assert report.endswith("0/12 present") and report.count("[missing]") == 12 and "hint:" in report


# ------------------------------------------------------------------------------------------------ broken layouts
def test_broken_missing_split_file(tmp_path):
    root = _fresh(tmp_path, "dtd")
    (root / "dtd" / "dtd" / "labels" / "test1.txt").unlink()
    assert len(load_mtil_dataset("dtd", root, "train")) == 47
    with pytest.raises(DataLayoutError, match=r"DTD: file not found: .*test1\.txt"):
        load_mtil_dataset("dtd", root, "test")
    assert not check_data(root)[MTIL_DATASETS.index("dtd")].present


def test_broken_missing_class_folder(tmp_path):
    root = _fresh(tmp_path, "eurosat")
    shutil.rmtree(root / "eurosat" / "2750" / "River")
    with pytest.raises(DataLayoutError, match="EuroSAT: found 9 classes, expected 10"):
        load_mtil_dataset("eurosat", root, "train")
    row = check_data(root)[MTIL_DATASETS.index("eurosat")]
    assert not row.present and "expected 10" in row.problem


def test_broken_missing_image(tmp_path):
    root = _fresh(tmp_path, "pets")
    first = (root / "oxford-iiit-pet" / "annotations" / "test.txt").read_text().split()[0]
    (root / "oxford-iiit-pet" / "images" / f"{first}.jpg").unlink()
    with pytest.raises(DataLayoutError, match="OxfordPet: image listed by the annotations is missing"):
        load_mtil_dataset("pets", root, "test")


def test_broken_wrong_class_count(tmp_path):
    root = _fresh(tmp_path, "aircraft")
    variants = root / "fgvc-aircraft-2013b" / "data" / "variants.txt"
    variants.write_text("".join(f"{v}\n" for v in CLASSNAMES["aircraft"][:99]))
    with pytest.raises(DataLayoutError, match="Aircraft: "):
        load_mtil_dataset("aircraft", root, "train")


def test_broken_truncated_mnist(tmp_path):
    root = _fresh(tmp_path, "mnist")
    p = root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataLayoutError, match="MNIST: truncated idx"):
        load_mtil_dataset("mnist", root, "test")


# ------------------------------------------------------------------------------------------------ ImageNet
def test_imagenet_reference_set(fake_root):
    root, _counts = fake_root
    a = imagenet_reference_set(root, n=12, seed=42, transform=SMALL)
    b = imagenet_reference_set(root, n=12, seed=42, transform=SMALL)
    c = imagenet_reference_set(root, n=12, seed=7, transform=SMALL)
    assert a.samples == b.samples and a.samples != c.samples
    assert len(a) == 12 and len({p for p, _ in a.samples}) == 12
    names = [n.split(",")[0] for _, n in fab.IMAGENET_SYNSETS]
    assert a.classnames == names
    assert a.class_captions == ["a photo of a tench", "a photo of an English springer", "a photo of an apple",
                                "a photo of a goldfinch", "a photo of an umbrella"]
    for i, (path, label) in enumerate(a.samples):
        assert Path(path).parent.name == a.wnids[label]
        assert a.captions[i] == a.class_captions[label]
        assert fab.index_of_color(tuple(np.asarray(a.load_pil(i), float).reshape(-1, 3).mean(0))) == label
    x, _y = a[0]
    assert x.shape == (3, 8, 8)
    with pytest.raises(DataLayoutError, match="only 20 images"):
        imagenet_reference_set(root, n=21)


def test_imagenet_missing_mapping(tmp_path):
    fab.imagenet(tmp_path)
    (tmp_path / "imagenet" / "LOC_synset_mapping.txt").unlink()
    with pytest.raises(DataLayoutError, match="synset mapping file not found"):
        imagenet_reference_set(tmp_path, n=1)


# ------------------------------------------------------------------------------------------------ transform
def _slow_transform(img, size):
    """Reference: same resize/crop, then per-pixel loops for to-tensor + normalise."""
    cropped = CLIPImageTransform(size).resize_and_crop(img)
    px = cropped.load()
    out = torch.empty(3, size, size)
    for yy in range(size):
        for xx in range(size):
            for c in range(3):
                out[c, yy, xx] = (px[xx, yy][c] / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]
    return out


@pytest.mark.parametrize("shape", [(6, 10), (10, 6), (5, 5), (3, 4)])
def test_transform_matches_slow_reference(shape):
    rng = np.random.default_rng(0)
    img = to_pil(rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8))
    fast = CLIPImageTransform(4)(img)
    assert fast.shape == (3, 4, 4)
    torch.testing.assert_close(fast, _slow_transform(img, 4), atol=1e-5, rtol=0)


def test_transform_center_crop_is_centered():
    arr = np.zeros((4, 12, 3), dtype=np.uint8)
    arr[:, 4:8] = 255  # a white middle band, exactly the center crop of width 4
    out = CLIPImageTransform(4)(to_pil(arr))
    white = (1 - CLIP_MEAN[0]) / CLIP_STD[0]
    torch.testing.assert_close(out[0], torch.full((4, 4), white), atol=1e-5, rtol=0)
