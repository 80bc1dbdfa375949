"""Loaders for the 11 MTIL datasets from a local data root, in the layouts torchvision's downloads produce.

Nothing downloads. Images are decoded lazily with Pillow (file paths) or held in memory (CIFAR100, MNIST
arrays). Label order follows torchvision; class names are the CLIP zero-shot names (:mod:`.classnames`).

Splits (method.md sec. 4; the ZSCL code GNSP builds on uses the same torchvision splits):

* official train/test: Aircraft ``images_variant_train.txt`` / ``_test.txt`` (variant level, 3334 / 3333),
  CIFAR100, DTD partition 1 ``train1.txt`` / ``test1.txt``, Flowers ``trnid`` / ``tstid``, Food101,
  MNIST, Pets ``trainval.txt`` / ``test.txt``, Stanford Cars train / test.
  (Aircraft ``"val"``/``"trainval"``, DTD ``"val"`` and Flowers ``"val"`` are loadable too.)
* no official split (Caltech101, EuroSAT, SUN397): 80/20 random split, seed 42 (ZSCL convention), over the
  sorted listing (classes in label order, file names sorted within a class); see :func:`split_indices`.

Example:
    >>> from gnsp_optim.reference.data import load_mtil_dataset
    >>> ds = load_mtil_dataset("dtd", "/data", "train")  # doctest: +SKIP
    >>> image, label = ds[0]  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .classnames import CLASSNAMES, clean_classname
from .facts import (
    DATASET_FOLDERS,
    DATASETS,
    DISPLAY_NAMES,
    MTIL_DATASETS,
    MTIL_ORDER_I,
    MTIL_ORDER_II,
    NUM_CLASSES,
    SPLIT_SEED,
    TRAIN_FRACTION,
)
from .imagenet import check_imagenet
from .templates import TEMPLATES
from .types import ArraySamples, DataLayoutError, DataStatus, MTILDataset

__all__ = [
    "DISPLAY_NAMES",
    "MTIL_DATASETS",
    "MTIL_ORDER_I",
    "MTIL_ORDER_II",
    "NUM_CLASSES",
    "SPLIT_SEED",
    "TRAIN_FRACTION",
    "ArraySamples",
    "DataLayoutError",
    "DataStatus",
    "MTILDataset",
    "check_data",
    "format_check_report",
    "load_mtil_dataset",
    "split_indices",
]

_IMG_EXT = (".jpg", ".jpeg", ".png")


def split_indices(
    n: int, seed: int = SPLIT_SEED, train_fraction: float = TRAIN_FRACTION
) -> tuple[list[int], list[int]]:
    """The 80/20 random split of ``range(n)`` (ZSCL convention), deterministic.

    Exactly ``torch.utils.data.random_split(range(n), [k, n - k], generator=torch.Generator().manual_seed(seed))``
    with ``k = int(train_fraction * n)``: ``perm = torch.randperm(n, generator=g)``, train = ``perm[:k]``,
    test = ``perm[k:]`` (in permutation order). Applied to the sorted listing it reproduces ZSCL's split
    for Caltech101 and EuroSAT (torchvision lists them in the same order); for SUN397 torchvision's listing
    is unsorted (``rglob``), so no code reproduces it across machines; ours is sorted.

    Example:
        >>> tr, te = split_indices(10)
        >>> len(tr), len(te), sorted(tr + te) == list(range(10))
        (8, 2, True)
    """
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(int(n), generator=g).tolist()
    k = int(train_fraction * n)
    return perm[:k], perm[k:]


# --------------------------------------------------------------------------------------------- helpers
def _require(dataset: str, path: Path, kind: str = "file") -> Path:
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        hint = DATASETS[dataset].hint if dataset in DATASETS else ""
        raise DataLayoutError(dataset, path, f"{kind} not found", hint)
    return path


def _subdirs(dataset: str, folder: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    _require(dataset, folder, "folder")
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and e.name not in exclude)


def _image_files(folder: Path, prefix: str = "") -> list[str]:
    return sorted(
        e.name
        for e in os.scandir(folder)
        if e.is_file() and e.name.lower().endswith(_IMG_EXT) and e.name.startswith(prefix)
    )


def _read_lines(dataset: str, path: Path) -> list[str]:
    _require(dataset, path)
    with open(path, encoding="utf-8") as f:
        return [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]


def _loadmat(dataset: str, path: Path) -> dict[str, Any]:
    _require(dataset, path)
    try:
        import scipy.io
    except ImportError as exc:  # pragma: no cover - environment dependent
        raise ImportError(
            f"{DISPLAY_NAMES[dataset]} needs scipy to read {path.name}: pip install scipy "
            "(pip install gnsp_optim[reference])"
        ) from exc
    return scipy.io.loadmat(str(path), squeeze_me=True)


def _check_classes(dataset: str, classnames: Sequence[str], where: Path) -> None:
    want = NUM_CLASSES[dataset]
    if len(classnames) != want or len(set(classnames)) != want:
        raise DataLayoutError(
            dataset, where, f"found {len(set(classnames))} classes, expected {want} (incomplete or wrong layout)"
        )


def _check_split(dataset: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"{DISPLAY_NAMES[dataset]}: split must be one of {allowed}, got {split!r}")


def _spot_check(dataset: str, samples: Sequence[tuple[Any, int]], where: Path) -> None:
    if len(samples) == 0:
        raise DataLayoutError(dataset, where, "no samples found")
    if isinstance(samples, ArraySamples):
        return
    n = len(samples)
    for i in sorted({int(j) for j in np.linspace(0, n - 1, num=min(n, 8))}):
        p = samples[i][0]
        if not os.path.isfile(p):
            raise DataLayoutError(dataset, p, "image listed by the annotations is missing")


def _random_split(samples: list[tuple[str, int]], split: str, dataset: str) -> list[tuple[str, int]]:
    _check_split(dataset, split, ("train", "test"))
    tr, te = split_indices(len(samples))
    return [samples[i] for i in (tr if split == "train" else te)]


def _folder_listing(dataset: str, base: Path, classes: Sequence[str], prefix: str = "") -> list[tuple[str, int]]:
    samples: list[tuple[str, int]] = []
    for label, cls in enumerate(classes):
        folder = base / cls
        samples += [(str(folder / f), label) for f in _image_files(folder, prefix)]
    return samples


# --------------------------------------------------------------------------------------------- per dataset
def _aircraft(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    _check_split("aircraft", split, ("train", "test", "val", "trainval"))
    base = root / "fgvc-aircraft-2013b" / "data"
    classnames = [clean_classname("aircraft", v) for v in _read_lines("aircraft", base / "variants.txt")]
    index = {c: i for i, c in enumerate(classnames)}
    images = _require("aircraft", base / "images", "folder")
    samples = []
    ann = base / f"images_variant_{split}.txt"
    for line in _read_lines("aircraft", ann):
        image_id, variant = line.split(" ", 1)
        variant = clean_classname("aircraft", variant)
        if variant not in index:
            raise DataLayoutError("aircraft", ann, f"variant {variant!r} not in variants.txt")
        samples.append((str(images / f"{image_id}.jpg"), index[variant]))
    return samples, classnames, base


def _caltech101(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    base = root / "caltech101" / "101_ObjectCategories"
    folders = _subdirs("caltech101", base, exclude=("BACKGROUND_Google",))
    classnames = [clean_classname("caltech101", f) for f in folders]
    _check_classes("caltech101", classnames, base)
    return _random_split(_folder_listing("caltech101", base, folders), split, "caltech101"), classnames, base


def _unpickle(dataset: str, path: Path) -> dict[str, Any]:
    _require(dataset, path)
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar100(root: Path, split: str) -> tuple[ArraySamples, list[str], Path]:
    _check_split("cifar100", split, ("train", "test"))
    base = root / "cifar-100-python"
    meta = _unpickle("cifar100", base / "meta")
    if "fine_label_names" not in meta:
        raise DataLayoutError("cifar100", base / "meta", "no 'fine_label_names' in the meta pickle")
    classnames = [clean_classname("cifar100", c) for c in meta["fine_label_names"]]
    d = _unpickle("cifar100", base / split)
    if "data" not in d or "fine_labels" not in d:
        raise DataLayoutError("cifar100", base / split, "pickle lacks 'data'/'fine_labels'")
    data = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArraySamples(np.ascontiguousarray(data), d["fine_labels"]), classnames, base


def _dtd(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    _check_split("dtd", split, ("train", "test", "val"))
    base = root / "dtd" / "dtd"
    images = base / "images"
    folders = _subdirs("dtd", images)
    index = {c: i for i, c in enumerate(folders)}
    ann = base / "labels" / f"{split}1.txt"
    samples = []
    for line in _read_lines("dtd", ann):
        cls, fname = line.split("/")
        if cls not in index:
            raise DataLayoutError("dtd", images / cls, f"class folder of {line!r} missing")
        samples.append((str(images / cls / fname), index[cls]))
    return samples, [clean_classname("dtd", c) for c in folders], base


def _eurosat(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    base = root / "eurosat" / "2750"
    folders = _subdirs("eurosat", base)
    try:
        classnames = [clean_classname("eurosat", f) for f in folders]
    except KeyError as exc:
        raise DataLayoutError("eurosat", base, f"unexpected class folder ({exc})") from None
    _check_classes("eurosat", classnames, base)
    return _random_split(_folder_listing("eurosat", base, folders), split, "eurosat"), classnames, base


def _flowers(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    _check_split("flowers", split, ("train", "test", "val"))
    base = root / "flowers-102"
    labels = np.atleast_1d(_loadmat("flowers", base / "imagelabels.mat")["labels"]).astype(np.int64)
    setid = _loadmat("flowers", base / "setid.mat")
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[split]
    if key not in setid:
        raise DataLayoutError("flowers", base / "setid.mat", f"no {key!r} array")
    images = _require("flowers", base / "jpg", "folder")
    n_cls = len(np.unique(labels))
    if n_cls != NUM_CLASSES["flowers"]:
        raise DataLayoutError("flowers", base / "imagelabels.mat", f"found {n_cls} classes, expected 102")
    samples = [
        (str(images / f"image_{int(i):05d}.jpg"), int(labels[int(i) - 1]) - 1)
        for i in np.atleast_1d(setid[key])
    ]
    return samples, list(CLASSNAMES["flowers"]), base


def _food(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    _check_split("food", split, ("train", "test"))
    base = root / "food-101"
    meta = _require("food", base / "meta" / f"{split}.json")
    images = _require("food", base / "images", "folder")
    with open(meta, encoding="utf-8") as f:
        listing = json.load(f)
    raw = sorted(listing)
    samples = [(str(images / f"{rel}.jpg"), label) for label, c in enumerate(raw) for rel in sorted(listing[c])]
    return samples, [clean_classname("food", c) for c in raw], base


def _idx_path(base: Path, stem: str) -> Path:
    plain = base / stem
    return plain if plain.is_file() else base / f"{stem}.gz"


def _read_idx(dataset: str, path: Path, header_only: bool = False) -> Any:
    _require(dataset, path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(4)
        if len(head) != 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
            raise DataLayoutError(dataset, path, "not an unsigned-byte idx file")
        ndim = head[3]
        dims = tuple(int.from_bytes(f.read(4), "big") for _ in range(ndim))
        if header_only:
            return dims
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DataLayoutError(dataset, path, f"truncated idx file ({data.size} bytes for shape {dims})")
    return data.reshape(dims)


def _mnist(root: Path, split: str) -> tuple[ArraySamples, list[str], Path]:
    _check_split("mnist", split, ("train", "test"))
    base = root / "MNIST" / "raw"
    stem = "train" if split == "train" else "t10k"
    images = _read_idx("mnist", _idx_path(base, f"{stem}-images-idx3-ubyte"))
    labels = _read_idx("mnist", _idx_path(base, f"{stem}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataLayoutError("mnist", base, f"idx shapes {images.shape} / {labels.shape} do not match")
    return ArraySamples(images, labels.astype(np.int64)), list(CLASSNAMES["mnist"]), base


def _pets_rows(path: Path) -> list[tuple[str, int]]:
    rows = []
    for line in _read_lines("pets", path):
        parts = line.split()
        rows.append((parts[0], int(parts[1]) - 1))
    return rows


def _pets(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    _check_split("pets", split, ("train", "test"))
    base = root / "oxford-iiit-pet"
    images = _require("pets", base / "images", "folder")
    ann = base / "annotations" / ("trainval.txt" if split == "train" else "test.txt")
    rows = _pets_rows(ann)
    breed: dict[int, str] = {}
    for image_id, label in rows:
        breed.setdefault(label, image_id.rsplit("_", 1)[0])
    n = NUM_CLASSES["pets"]
    if sorted(breed) != list(range(n)):
        raise DataLayoutError("pets", ann, f"found {len(breed)} class ids, expected 1..{n}")
    classnames = [clean_classname("pets", breed[i]) for i in range(n)]
    return [(str(images / f"{i}.jpg"), label) for i, label in rows], classnames, base


def _cars(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    _check_split("cars", split, ("train", "test"))
    base = root / "stanford_cars"
    names = np.atleast_1d(_loadmat("cars", base / "devkit" / "cars_meta.mat")["class_names"]).tolist()
    classnames = [clean_classname("cars", str(c)) for c in names]
    if split == "train":
        ann, images = base / "devkit" / "cars_train_annos.mat", base / "cars_train"
    else:
        ann, images = base / "cars_test_annos_withlabels.mat", base / "cars_test"
        if not ann.is_file() and (base / "devkit" / ann.name).is_file():
            ann = base / "devkit" / ann.name
    _require("cars", images, "folder")
    annos = np.atleast_1d(_loadmat("cars", ann)["annotations"])
    if annos.dtype.names is None or "fname" not in annos.dtype.names or "class" not in annos.dtype.names:
        raise DataLayoutError("cars", ann, "annotations lack 'fname'/'class' (the test file must be *_withlabels)")
    samples = [(str(images / str(a["fname"])), int(a["class"]) - 1) for a in annos]
    return samples, classnames, base


def _sun397(root: Path, split: str) -> tuple[list[tuple[str, int]], list[str], Path]:
    base = root / "SUN397"
    raw = _read_lines("sun397", base / "ClassName.txt")
    classnames = [clean_classname("sun397", c) for c in raw]
    _check_classes("sun397", classnames, base / "ClassName.txt")
    folders = [c.strip("/") for c in raw]
    for f in folders:
        _require("sun397", base / f, "folder")
    samples = _folder_listing("sun397", base, folders, prefix="sun_")
    return _random_split(samples, split, "sun397"), classnames, base


_LOADERS: dict[str, Callable[[Path, str], tuple[Any, list[str], Path]]] = {
    "aircraft": _aircraft,
    "caltech101": _caltech101,
    "cifar100": _cifar100,
    "dtd": _dtd,
    "eurosat": _eurosat,
    "flowers": _flowers,
    "food": _food,
    "mnist": _mnist,
    "pets": _pets,
    "cars": _cars,
    "sun397": _sun397,
}

def load_mtil_dataset(
    name: str,
    root: str | os.PathLike,
    split: str,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> MTILDataset:
    """Load one MTIL dataset split from ``root`` (no download).

    ``name`` is one of :data:`MTIL_DATASETS`; ``split`` ``"train"`` or ``"test"`` (see the module docstring for
    which official split that is). Raises :class:`DataLayoutError` naming the dataset and path when the layout
    is wrong or incomplete, including a class count different from :data:`NUM_CLASSES`.

    Example:
        >>> ds = load_mtil_dataset("mnist", "/data", "test")  # doctest: +SKIP
        >>> len(ds), ds.classnames[:3], ds.templates[0]  # doctest: +SKIP
        (10000, ['0', '1', '2'], 'a photo of the number: "{}".')
    """
    if name not in _LOADERS:
        raise KeyError(f"unknown MTIL dataset {name!r}; expected one of {list(MTIL_DATASETS)}")
    root = Path(root)
    samples, classnames, where = _LOADERS[name](root, split)
    _check_classes(name, classnames, where)
    labels = np.asarray(
        samples.labels if isinstance(samples, ArraySamples) else [s[1] for s in samples], dtype=np.int64
    )
    if labels.size and (labels.min() < 0 or labels.max() >= len(classnames)):
        raise DataLayoutError(name, where, f"labels outside 0..{len(classnames) - 1}")
    _spot_check(name, samples, where)
    return MTILDataset(samples, classnames, TEMPLATES[name], transform, name)


# --------------------------------------------------------------------------------------------- check_data
def _count_folder_tree(dataset: str, base: Path, classes: Sequence[str], prefix: str = "") -> int:
    return sum(len(_image_files(base / c, prefix)) for c in classes)


def _split_counts(n: int) -> dict[str, int]:
    k = int(TRAIN_FRACTION * n)
    return {"train": k, "test": n - k}


def _probe(name: str, root: Path) -> tuple[dict[str, int], int | None, str]:
    """Cheap presence check: files exist, annotation lines / folder entries counted, no image decoded."""
    note = ""
    if name == "aircraft":
        base = root / "fgvc-aircraft-2013b" / "data"
        _require(name, base / "images", "folder")
        ncls = len(_read_lines(name, base / "variants.txt"))
        counts = {s: len(_read_lines(name, base / f"images_variant_{s}.txt")) for s in ("train", "test")}
    elif name in ("caltech101", "eurosat"):
        base = root / DATASET_FOLDERS[name]
        folders = _subdirs(name, base, exclude=("BACKGROUND_Google",))
        ncls = len(folders)
        counts = _split_counts(_count_folder_tree(name, base, folders))
    elif name == "sun397":
        base = root / "SUN397"
        folders = [c.strip("/") for c in _read_lines(name, base / "ClassName.txt")]
        for f in folders:
            _require(name, base / f, "folder")
        ncls = len(folders)
        counts = _split_counts(_count_folder_tree(name, base, folders, prefix="sun_"))
    elif name == "cifar100":
        base = root / "cifar-100-python"
        for f in ("meta", "train", "test"):
            _require(name, base / f)
        ncls, counts, note = None, {}, "pickles present (not opened)"
    elif name == "dtd":
        base = root / "dtd" / "dtd"
        ncls = len(_subdirs(name, base / "images"))
        counts = {s: len(_read_lines(name, base / "labels" / f"{s}1.txt")) for s in ("train", "test")}
    elif name == "flowers":
        base = root / "flowers-102"
        _require(name, base / "jpg", "folder")
        for f in ("imagelabels.mat", "setid.mat"):
            _require(name, base / f)
        try:
            setid = _loadmat(name, base / "setid.mat")
            labels = _loadmat(name, base / "imagelabels.mat")["labels"]
            counts = {"train": int(np.size(setid["trnid"])), "test": int(np.size(setid["tstid"]))}
            ncls = len(np.unique(labels))
        except ImportError:
            counts, ncls, note = {}, None, "scipy missing: counts not read"
    elif name == "food":
        base = root / "food-101"
        _require(name, base / "images", "folder")
        counts, ncls = {}, None
        for s in ("train", "test"):
            with open(_require(name, base / "meta" / f"{s}.json"), encoding="utf-8") as f:
                listing = json.load(f)
            counts[s] = sum(len(v) for v in listing.values())
            ncls = len(listing)
    elif name == "mnist":
        base = root / "MNIST" / "raw"
        counts = {}
        for s, stem in (("train", "train"), ("test", "t10k")):
            counts[s] = _read_idx(name, _idx_path(base, f"{stem}-images-idx3-ubyte"), header_only=True)[0]
            _read_idx(name, _idx_path(base, f"{stem}-labels-idx1-ubyte"), header_only=True)
        ncls = 10
    elif name == "pets":
        base = root / "oxford-iiit-pet"
        _require(name, base / "images", "folder")
        rows = {s: _pets_rows(base / "annotations" / f) for s, f in (("train", "trainval.txt"), ("test", "test.txt"))}
        counts = {s: len(r) for s, r in rows.items()}
        ncls = len({lab for r in rows.values() for _, lab in r})
    elif name == "cars":
        base = root / "stanford_cars"
        for p, kind in ((base / "cars_train", "folder"), (base / "cars_test", "folder"),
                        (base / "devkit" / "cars_meta.mat", "file"),
                        (base / "devkit" / "cars_train_annos.mat", "file")):
            _require(name, p, kind)
        test_ann = base / "cars_test_annos_withlabels.mat"
        if not test_ann.is_file() and (base / "devkit" / test_ann.name).is_file():
            test_ann = base / "devkit" / test_ann.name
        _require(name, test_ann)
        try:
            ncls = int(np.size(_loadmat(name, base / "devkit" / "cars_meta.mat")["class_names"]))
            counts = {
                "train": int(np.size(_loadmat(name, base / "devkit" / "cars_train_annos.mat")["annotations"])),
                "test": int(np.size(_loadmat(name, test_ann)["annotations"])),
            }
        except ImportError:
            counts, ncls, note = {}, None, "scipy missing: counts not read"
    else:  # pragma: no cover
        raise KeyError(name)
    if ncls is not None and ncls != NUM_CLASSES[name]:
        raise DataLayoutError(name, root / DATASET_FOLDERS[name], f"found {ncls} classes, expected {NUM_CLASSES[name]}")
    return {k: int(v) for k, v in counts.items()}, ncls, note


def check_data(root: str | os.PathLike) -> list[DataStatus]:
    """One :class:`DataStatus` per MTIL dataset (Order I) plus one for the ImageNet reference set.

    Cheap: checks files exist, counts annotation lines and folder entries; decodes no image.

    Example:
        >>> rows = check_data("/nonexistent")
        >>> len(rows), rows[0].present, rows[-1].key
        (12, False, 'imagenet')
    """
    root = Path(root)
    rows = []
    for name in MTIL_DATASETS:
        loc = str(root / DATASET_FOLDERS[name])
        try:
            counts, ncls, note = _probe(name, root)
            rows.append(DataStatus(name, DISPLAY_NAMES[name], True, loc, counts, ncls, note=note))
        except (DataLayoutError, OSError, ValueError, KeyError) as exc:
            problem = (f"{exc.problem}: {exc.path}" if isinstance(exc, DataLayoutError)
                       else f"{type(exc).__name__}: {exc}")
            rows.append(DataStatus(name, DISPLAY_NAMES[name], False, loc, problem=problem,
                                   hint=DATASETS[name].hint))
    rows.append(check_imagenet(root))
    return rows


def format_check_report(rows: Sequence[DataStatus]) -> str:
    """A plain-text report of :func:`check_data` rows: one line per dataset, plus a hint line if missing.

    Example:
        >>> print(format_check_report([DataStatus("mnist", "MNIST", True, "/d/MNIST/raw",
        ...                                       {"train": 60000, "test": 10000}, 10)]))
        [ok]      MNIST           10 classes, train 60000, test 10000  (/d/MNIST/raw)
        1/1 present
    """
    lines = []
    for r in rows:
        if r.present:
            parts = [f"{r.num_classes} classes"] if r.num_classes is not None else []
            parts += [f"{k} {v}" for k, v in r.counts.items()]
            if r.note:
                parts.append(r.note)
            lines.append(f"[ok]      {r.display_name:<15} {', '.join(parts)}  ({r.location})")
        else:
            lines.append(f"[missing] {r.display_name:<15} {r.problem}")
            if r.hint:
                lines.append(f"          {'':<15} hint: {r.hint}")
    lines.append(f"{sum(r.present for r in rows)}/{len(rows)} present")
    return "\n".join(lines)
