"""Write tiny fake versions of every MTIL layout (and the ImageNet reference layout) for tests.

Every dataset gets its full class count with 1-5 images per class (8x8 JPEGs or in-memory arrays). The
pixel colour encodes the class's index in ``CLASSNAMES[name]`` (:func:`color_of` / :func:`index_of_color`),
so a test can check that a loader's label, its class name and the image content agree.

Example:
    >>> import tempfile
    >>> counts = fabricate_all(tempfile.mkdtemp())  # doctest: +SKIP
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from pathlib import Path

import numpy as np

from gnsp_optim.reference.data.classnames import CALTECH101_FOLDERS, CLASSNAMES, EUROSAT_FOLDER_TO_NAME

IMAGENET_SYNSETS = (
    ("n00000001", "tench, Tinca tinca"),
    ("n00000002", "English springer, English springer spaniel"),
    ("n00000003", "apple"),
    ("n00000004", "goldfinch, Carduelis carduelis"),
    ("n00000005", "umbrella"),
)
IMAGENET_PER_CLASS = 4

_JPEG_CACHE: dict[int, bytes] = {}


def color_of(k: int) -> tuple[int, int, int]:
    """RGB colour coding class index ``k`` (0..447), levels 32 apart so JPEG noise cannot confuse them."""
    return (16 + 32 * (k % 8), 16 + 32 * ((k // 8) % 8), 16 + 32 * (k // 64))


def index_of_color(rgb: tuple[float, float, float]) -> int:
    """Inverse of :func:`color_of` (rounding)."""
    r, g, b = (round((v - 16) / 32) for v in rgb)
    return r + 8 * g + 64 * b


def _jpeg(k: int) -> bytes:
    if k not in _JPEG_CACHE:
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color_of(k)).save(buf, format="JPEG", quality=95)
        _JPEG_CACHE[k] = buf.getvalue()
    return _JPEG_CACHE[k]


def _img(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_jpeg(k))


def _text(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{ln}\n" for ln in lines), encoding="utf-8")


def aircraft(root: Path) -> dict[str, int]:
    base = root / "fgvc-aircraft-2013b" / "data"
    names = CLASSNAMES["aircraft"]
    _text(base / "variants.txt", list(names))
    for split, offset in (("train", 0), ("test", 1)):
        lines = []
        for k in reversed(range(len(names))):  # annotation order differs from class order on purpose
            image_id = f"{1000000 + 2 * k + offset:07d}"
            _img(base / "images" / f"{image_id}.jpg", k)
            lines.append(f"{image_id} {names[k]}")
        _text(base / f"images_variant_{split}.txt", lines)
    return {"train": 100, "test": 100}


def caltech101(root: Path) -> dict[str, int]:
    base = root / "caltech101" / "101_ObjectCategories"
    for k, folder in enumerate(CALTECH101_FOLDERS):
        for j in (1, 2):
            _img(base / folder / f"image_{j:04d}.jpg", k)
    _img(base / "BACKGROUND_Google" / "image_0001.jpg", 447)
    n = 2 * 101
    return {"train": int(0.8 * n), "test": n - int(0.8 * n)}


def cifar100(root: Path) -> dict[str, int]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True, exist_ok=True)
    raw = [c.replace(" ", "_") for c in CLASSNAMES["cifar100"]]
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": raw, "coarse_label_names": ["x"] * 20}, f, protocol=2)
    counts = {}
    for split, per in (("train", 2), ("test", 1)):
        labels = [k for _ in range(per) for k in range(100)]
        data = np.zeros((len(labels), 3, 32, 32), dtype=np.uint8)
        for i, k in enumerate(labels):
            data[i] = np.asarray(color_of(k), dtype=np.uint8)[:, None, None]
        with open(base / split, "wb") as f:
            pickle.dump({"data": data.reshape(len(labels), -1), "fine_labels": labels}, f, protocol=2)
        counts[split] = len(labels)
    return counts


def dtd(root: Path) -> dict[str, int]:
    base = root / "dtd" / "dtd"
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for k, cls in enumerate(CLASSNAMES["dtd"]):
        for j, split in enumerate(splits, start=1):
            _img(base / "images" / cls / f"{cls}_{j:04d}.jpg", k)
            splits[split].append(f"{cls}/{cls}_{j:04d}.jpg")
    for split, lines in splits.items():
        _text(base / "labels" / f"{split}1.txt", lines)
        _text(base / "labels" / f"{split}2.txt", lines[:1])
    return {"train": 47, "test": 47}


def eurosat(root: Path) -> dict[str, int]:
    base = root / "eurosat" / "2750"
    names = CLASSNAMES["eurosat"]
    for folder, name in EUROSAT_FOLDER_TO_NAME.items():
        for j in range(1, 6):
            _img(base / folder / f"{folder}_{j}.jpg", names.index(name))
    return {"train": 40, "test": 10}


def flowers(root: Path) -> dict[str, int]:
    import scipy.io

    base = root / "flowers-102"
    n_img = 3 * 102
    labels = np.array([(i % 102) + 1 for i in range(n_img)], dtype=np.uint8)  # image i+1 has label labels[i]
    for i in range(n_img):
        _img(base / "jpg" / f"image_{i + 1:05d}.jpg", int(labels[i]) - 1)
    scipy.io.savemat(str(base / "imagelabels.mat"), {"labels": labels[None, :]})
    ids = np.arange(1, n_img + 1, dtype=np.uint16)
    scipy.io.savemat(
        str(base / "setid.mat"), {"trnid": ids[None, :102], "valid": ids[None, 102:204], "tstid": ids[None, 204:]}
    )
    return {"train": 102, "test": 102}


def food(root: Path) -> dict[str, int]:
    base = root / "food-101"
    raw = [c.replace(" ", "_") for c in CLASSNAMES["food"]]
    listing: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    for k, cls in enumerate(raw):
        for j, split in enumerate(("train", "test")):
            _img(base / "images" / cls / f"{100 + j}.jpg", k)
            listing[split][cls] = [f"{cls}/{100 + j}"]
    for split, d in listing.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(d), encoding="utf-8")
    _text(base / "meta" / "classes.txt", raw)
    return {"train": 101, "test": 101}


def _idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    payload = header + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def mnist_grey(k: int) -> int:
    """Grey level coding digit ``k``."""
    return 16 + 25 * k


def mnist(root: Path) -> dict[str, int]:
    base = root / "MNIST" / "raw"
    counts = {}
    for split, stem, per, gz in (("train", "train", 2, True), ("test", "t10k", 1, False)):
        labels = np.array([k for _ in range(per) for k in range(10)], dtype=np.uint8)
        images = np.stack([np.full((28, 28), mnist_grey(int(k)), dtype=np.uint8) for k in labels])
        _idx(base / f"{stem}-images-idx3-ubyte", images, gz)
        _idx(base / f"{stem}-labels-idx1-ubyte", labels, gz)
        counts[split] = len(labels)
    return counts


def pets(root: Path) -> dict[str, int]:
    base = root / "oxford-iiit-pet"
    for split, j in (("trainval", 1), ("test", 2)):
        lines = []
        for k, name in enumerate(CLASSNAMES["pets"]):
            image_id = f"{name.replace(' ', '_')}_{j}"
            _img(base / "images" / f"{image_id}.jpg", k)
            species = 1 if name[0].isupper() else 2
            lines.append(f"{image_id} {k + 1} {species} {k + 1}")
        _text(base / "annotations" / f"{split}.txt", lines)
    return {"train": 37, "test": 37}


def _annotations(fnames: list[str], classes: list[int]) -> np.ndarray:
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]
    arr = np.zeros((1, len(fnames)), dtype=[(f, "O") for f in fields])
    for i, (fn, c) in enumerate(zip(fnames, classes)):
        arr[0, i] = (np.uint8(0), np.uint8(0), np.uint8(7), np.uint8(7), np.uint8(c), fn)
    return arr


def cars(root: Path) -> dict[str, int]:
    import scipy.io

    base = root / "stanford_cars"
    names = CLASSNAMES["cars"]
    meta = np.empty((1, len(names)), dtype=object)
    meta[0, :] = list(names)
    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(base / "devkit" / "cars_meta.mat"), {"class_names": meta})
    for split, ann in (("train", base / "devkit" / "cars_train_annos.mat"),
                       ("test", base / "cars_test_annos_withlabels.mat")):
        fnames, classes = [], []
        for k in reversed(range(len(names))):
            fn = f"{len(fnames) + 1:05d}.jpg"
            _img(base / f"cars_{split}" / fn, k)
            fnames.append(fn)
            classes.append(k + 1)
        scipy.io.savemat(str(ann), {"annotations": _annotations(fnames, classes)})
    return {"train": 196, "test": 196}


def sun397_raw(name: str) -> str:
    """A ClassName.txt-style entry for a clean name (``/a/airplane_cabin``)."""
    return f"/{name[0]}/{name.replace(' ', '_')}"


def sun397(root: Path) -> dict[str, int]:
    base = root / "SUN397"
    raw = [sun397_raw(c) for c in CLASSNAMES["sun397"]]
    _text(base / "ClassName.txt", raw)
    for k, r in enumerate(raw):
        for j in (1, 2):
            _img(base / r.strip("/") / f"sun_{k:04d}{j}.jpg", k)
    n = 2 * 397
    return {"train": int(0.8 * n), "test": n - int(0.8 * n)}


def imagenet(root: Path) -> dict[str, int]:
    base = root / "imagenet"
    _text(base / "LOC_synset_mapping.txt", [f"{w} {names}" for w, names in IMAGENET_SYNSETS])
    for k, (w, _) in enumerate(IMAGENET_SYNSETS):
        for j in range(IMAGENET_PER_CLASS):
            _img(base / "train" / w / f"{w}_{j}.JPEG", k)
    return {"images": len(IMAGENET_SYNSETS) * IMAGENET_PER_CLASS}


FABRICATORS = {
    "aircraft": aircraft,
    "caltech101": caltech101,
    "cifar100": cifar100,
    "dtd": dtd,
    "eurosat": eurosat,
    "flowers": flowers,
    "food": food,
    "mnist": mnist,
    "pets": pets,
    "cars": cars,
    "sun397": sun397,
}


def fabricate_all(root: str | Path) -> dict[str, dict[str, int]]:
    """Fabricate every MTIL layout plus ImageNet under ``root``; returns expected split sizes per dataset."""
    root = Path(root)
    counts = {name: fn(root) for name, fn in FABRICATORS.items()}
    counts["imagenet"] = imagenet(root)
    return counts
