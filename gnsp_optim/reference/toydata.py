"""Offline toy data for a tiny-CLIP continual-learning benchmark (MTIL in miniature).

Everything here is generated on the fly or read from data that ships inside PyPI wheels, so nothing is
downloaded at run time:

* ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 handwritten digits), upscaled, coloured, placed.
* ``animals``: ``animal-mnist`` 0.4 (10,000 28x28 silhouettes of 10 animals), read straight from the two
  gzipped pickles inside the installed package (its module is never imported: it needs TensorFlow).
* procedural: ``shapes``, ``colors``, ``textures``, ``counts``, ``positions`` (and ``sizes``, a spare).

Three products, all deterministic for a seed:

* :func:`build_tasks` -> classification tasks (:class:`ToyTask`) with class names and prompt templates;
* :func:`build_pretraining_pairs` -> an image-caption corpus for contrastive pre-training, whose captions
  are written from each image's attributes with varied phrasing; it uses its own disjoint share of each
  real source and a different rendering style (plain backgrounds, milder jitter) than the tasks, so the
  tasks are a distribution shift away from pre-training;
* :func:`build_caption_set` -> a held-out image-caption set (its own share of the real sources) for
  retrieval R@K and modality-gap measurements.

Images are ``uint8`` tensors of shape ``(N, 3, S, S)``; divide by 255 for floats in [0, 1].
Real sources are split once, by a fixed seed that no argument changes (see :func:`real_source_split`),
into ``pretrain`` / ``caption`` / ``task_train`` / ``task_test`` index sets, so products built with
different seeds never share a real image across roles.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import pickle
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "ANIMALS",
    "COLORS",
    "DIGIT_WORDS",
    "EXTRA_TASK_NAMES",
    "SHAPES",
    "TASK_NAMES",
    "TEXTURES",
    "ToyTask",
    "all_texts",
    "build_caption_set",
    "build_pretraining_pairs",
    "build_reference_set",
    "reference_caption",
    "reference_classnames",
    "build_tasks",
    "load_animals_source",
    "load_digits_source",
    "real_source_split",
    "render_shapes",
    "render_shapes_slow",
    "save_grid_png",
]

ANIMAL_MNIST_HINT = "pip install --no-deps animal-mnist==0.4"
SPLIT_SEED = 20250726  # fixed: the real-source split never depends on a caller's seed

# ----------------------------------------------------------------------------------------------------------
# Vocabulary of attributes
# ----------------------------------------------------------------------------------------------------------
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# animal-mnist label order (checked by eye on the raw data: 0 = bear ... 9 = zebra)
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring"]
SHAPE_PLURALS = ["circles", "squares", "triangles", "stars", "crosses", "rings"]
COLORS = ["red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink"]
_PALETTE = torch.tensor(
    [
        [0.90, 0.10, 0.10],
        [1.00, 0.55, 0.05],
        [0.95, 0.90, 0.10],
        [0.10, 0.72, 0.20],
        [0.10, 0.85, 0.90],
        [0.15, 0.30, 0.95],
        [0.58, 0.20, 0.80],
        [1.00, 0.50, 0.75],
    ]
)
TEXTURES = ["stripes", "checkerboard", "dots", "noise", "grid", "waves"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
_POSITION_PHRASES = ["on the left", "on the right", "at the top", "at the bottom", "in the center"]
_POSITION_XY = torch.tensor([[-0.55, 0.0], [0.55, 0.0], [0.0, -0.55], [0.0, 0.55], [0.0, 0.0]])
COUNT_NAMES = ["one shape", "two shapes", "three shapes", "four shapes", "five shapes"]
SIZES = ["small", "medium", "large"]
_SIZE_RANGES = [(0.16, 0.22), (0.30, 0.38), (0.50, 0.62)]

TASK_NAMES = ["shapes", "digits", "colors", "animals", "textures", "counts", "positions"]
EXTRA_TASK_NAMES = ["sizes"]

_TEMPLATES = {
    "digits": ["a photo of the digit {}.", "a handwritten digit {}.", "the number {}.",
               "a picture of the number {}."],
    "animals": ["a silhouette of the {}.", "a photo of the {}.", "a drawing of the {}.",
                "the shape of the {}."],
    "shapes": ["a drawing of the {} shape.", "a photo of a {}.", "a {} shape.", "a picture of the {}."],
    "colors": ["a photo of a {} object.", "something {}.", "a {} shape.", "the color {}."],
    "textures": ["a photo of a {} texture.", "a pattern of {}.", "a {} pattern.", "a close-up of {}."],
    "counts": ["a photo of {}.", "a picture with {}.", "an image of exactly {}.", "a drawing of {}."],
    "positions": ["a shape on the {} of the image.", "an object at the {}.",
                  "something in the {} of the picture.", "a photo of a shape on the {}."],
    "sizes": ["a photo of a {} shape.", "a {} object.", "a drawing of a {} thing.", "something {}."],
}
_CLASSNAMES = {
    "digits": DIGIT_WORDS, "animals": ANIMALS, "shapes": SHAPES, "colors": COLORS, "textures": TEXTURES,
    "counts": COUNT_NAMES, "positions": POSITIONS, "sizes": SIZES,
}


@dataclass
class ToyTask:
    """One classification task of the toy continual benchmark.

    ``train_images`` / ``test_images`` are ``uint8`` ``(N, 3, S, S)``; labels are ``int64`` in
    ``[0, len(classnames))``. ``templates[0]`` is the prompt used for fine-tuning; zero-shot evaluation
    may ensemble all of them. ``*_source_index`` give, for real-image tasks, the index of each image in
    its source data set (``-1`` for procedural images), for disjointness bookkeeping.

    Example:
        >>> task = build_tasks(names=["shapes"], n_train=60, n_test=30)[0]
        >>> task.prompts()[:2]
        ['a drawing of the circle shape.', 'a drawing of the square shape.']
    """

    name: str
    classnames: list[str]
    templates: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str = "procedural"
    train_source_index: torch.Tensor | None = field(default=None, repr=False)
    test_source_index: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        """Number of classes.

        Example:
            >>> build_tasks(names=["counts"], n_train=50, n_test=25)[0].num_classes
            5
        """
        return len(self.classnames)

    def prompts(self, template_index: int = 0) -> list[str]:
        """The class prompts for one template (default: the training template).

        Example:
            >>> build_tasks(names=["colors"], n_train=16, n_test=8)[0].prompts(3)[0]
            'the color red.'
        """
        return [self.templates[template_index].format(c) for c in self.classnames]


# ----------------------------------------------------------------------------------------------------------
# Randomness helpers
# ----------------------------------------------------------------------------------------------------------
def _gen(seed: int, *tags: str) -> torch.Generator:
    """A torch generator keyed by (seed, tags), stable across runs and platforms."""
    key = zlib.crc32("/".join(tags).encode()) ^ (int(seed) * 0x9E3779B1)
    g = torch.Generator()
    g.manual_seed(key % (2**62))
    return g


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _pick(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=g)


def _balanced_labels(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    lab = torch.arange(n) % k
    return lab[torch.randperm(n, generator=g)]


# ----------------------------------------------------------------------------------------------------------
# Real sources
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def load_digits_source() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(uint8 (1797, 8, 8) in 0..255, int64 labels)``.

    Example:
        >>> x, y = load_digits_source()
        >>> tuple(x.shape), int(y.max())
        ((1797, 8, 8), 9)
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits task needs scikit-learn: pip install gnsp_optim[reference]") from e
    d = load_digits()
    x = torch.from_numpy(np.round(d.images * (255.0 / 16.0)).astype(np.uint8))
    y = torch.from_numpy(d.target.astype(np.int64))
    return x, y


def _animal_dir() -> str:
    spec = importlib.util.find_spec("animal_mnist")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the animals task needs the animal-mnist silhouettes: {ANIMAL_MNIST_HINT}")
    return os.path.join(next(iter(spec.submodule_search_locations)), "data", "Animal_MNIST")


def animals_available() -> bool:
    """Whether the animal-mnist data files are installed.

    Example:
        >>> isinstance(animals_available(), bool)
        True
    """
    try:
        d = _animal_dir()
    except ImportError:
        return False
    return os.path.exists(os.path.join(d, "animal_data_version_3.gz"))


@functools.lru_cache(maxsize=1)
def load_animals_source() -> tuple[torch.Tensor, torch.Tensor]:
    """animal-mnist 0.4 silhouettes as ``(uint8 (10000, 28, 28), int64 labels)``, labels in ``ANIMALS`` order.

    Reads the package's two gzipped pickles directly (importing ``animal_mnist`` would need TensorFlow).

    Example:
        >>> x, y = load_animals_source()  # doctest: +SKIP
        >>> tuple(x.shape)  # doctest: +SKIP
        (10000, 28, 28)
    """
    d = _animal_dir()
    paths = [os.path.join(d, f) for f in ("animal_data_version_3.gz", "animal_label_version_3.gz")]
    if not all(os.path.exists(p) for p in paths):
        raise ImportError(f"animal-mnist data files not found in {d}: {ANIMAL_MNIST_HINT}")
    with gzip.open(paths[0], "rb") as f:
        x = np.asarray(pickle.load(f), dtype=np.uint8)
    with gzip.open(paths[1], "rb") as f:
        y = np.asarray(pickle.load(f), dtype=np.int64)
    if x.shape != (10000, 28, 28) or y.shape != (10000,):
        raise ValueError(f"unexpected animal-mnist arrays {x.shape} {y.shape}; expected version 0.4")
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


_SPLIT_KEYS = ("task_train", "task_test", "pretrain", "caption", "reference")
_SPLIT_FRACTIONS = {  # task_train, task_test, caption, reference (per class); the rest goes to pretrain
    "digits": (0.40, 0.25, 0.08, 0.10),
    "animals": (0.35, 0.15, 0.08, 0.10),
}


@functools.lru_cache(maxsize=4)
def real_source_split(source: str) -> dict[str, torch.Tensor]:
    """Fixed stratified split of a real source into disjoint index sets.

    Keys ``task_train``, ``task_test``, ``pretrain``, ``caption`` (held-out pairs for retrieval and the
    modality gap) and ``reference`` (the CD / MAP reference pairs: never pre-trained on, like GNSP's ImageNet
    images); each a sorted-by-class, shuffled-within-class ``int64`` index tensor into the source. The split
    uses a constant seed, so every product agrees on it.

    Example:
        >>> s = real_source_split("digits")
        >>> sum(len(v) for v in s.values())
        1797
    """
    if source not in _SPLIT_FRACTIONS:
        raise ValueError(f"unknown real source {source!r}")
    _, y = load_digits_source() if source == "digits" else load_animals_source()
    fr = _SPLIT_FRACTIONS[source]
    g = _gen(SPLIT_SEED, "split", source)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in _SPLIT_KEYS}
    for c in range(int(y.max()) + 1):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = len(idx)
        a, b, d, e = (round(f * n) for f in fr)
        parts["task_train"].append(idx[:a])
        parts["task_test"].append(idx[a:a + b])
        parts["caption"].append(idx[a + b:a + b + d])
        parts["reference"].append(idx[a + b + d:a + b + d + e])
        parts["pretrain"].append(idx[a + b + d + e:])
    return {k: torch.cat(v) for k, v in parts.items()}


def _balanced_subset(idx: torch.Tensor, labels: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    """Up to ``n`` indices from ``idx``, as class-balanced as availability allows, in shuffled order."""
    y = labels[idx]
    k = int(labels.max()) + 1
    per = [idx[y == c] for c in range(k)]
    quota = [n // k + (1 if c < n % k else 0) for c in range(k)]
    out = torch.cat([p[:q] for p, q in zip(per, quota)])
    return out[torch.randperm(len(out), generator=g)]


# ----------------------------------------------------------------------------------------------------------
# Rendering primitives (all vectorised over the batch)
# ----------------------------------------------------------------------------------------------------------
def _coords(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    lin = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2.0 - 1.0
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    return yy, xx  # y grows downwards ("top" is y < 0)


def _shape_sdf(kind: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance (positive outside) of shape ``kind`` of radius ``r`` at local (u, v)."""
    if kind == 0:  # circle
        return torch.sqrt(u * u + v * v) - r
    if kind == 1:  # square
        return torch.maximum(u.abs(), v.abs()) - 0.8 * r
    if kind == 2:  # triangle, vertex up, circumradius 1.15 r
        d = None
        for j in range(3):
            a = math.pi / 2 + j * 2 * math.pi / 3
            e = u * math.cos(a) + v * math.sin(a)
            d = e if d is None else torch.maximum(d, e)
        return d - 0.575 * r
    if kind == 3:  # five-pointed star, tip up
        rho = torch.sqrt(u * u + v * v)
        th = torch.atan2(v, u)
        t = torch.remainder((th + math.pi / 2) / (2 * math.pi / 5), 1.0)
        tri = (2 * t - 1).abs()
        return rho - 1.1 * r * (0.4 + 0.6 * tri**2)
    if kind == 4:  # plus-shaped cross
        w, ln = 0.3 * r, 0.95 * r
        a = torch.maximum(u.abs() - w, v.abs() - ln)
        b = torch.maximum(v.abs() - w, u.abs() - ln)
        return torch.minimum(a, b)
    if kind == 5:  # ring
        return (torch.sqrt(u * u + v * v) - 0.72 * r).abs() - 0.26 * r
    raise ValueError(kind)


def render_shapes(
    kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, rot: torch.Tensor, size: int
) -> torch.Tensor:
    """Anti-aliased coverage masks ``(N, size, size)`` in [0, 1] of one shape per image.

    Coordinates are in [-1, 1] with y downwards; ``kind`` indexes :data:`SHAPES`; ``r`` is the radius and
    ``rot`` a rotation in radians. Edges are blurred over one pixel.

    Example:
        >>> m = render_shapes(torch.tensor([0]), torch.zeros(1), torch.zeros(1), torch.ones(1) * 0.5,
        ...                   torch.zeros(1), 16)
        >>> round(float(m.sum()) / 64, 1)  # circle area / (pixel area * 64): pi * 0.25 * 64 / 64
        0.8
    """
    n = kind.shape[0]
    yy, xx = _coords(size)
    out = torch.zeros(n, size, size)
    px = 2.0 / size
    for k in range(len(SHAPES)):
        m = kind == k
        if not bool(m.any()):
            continue
        x = xx[None] - cx[m, None, None]
        y = yy[None] - cy[m, None, None]
        c, s = torch.cos(rot[m])[:, None, None], torch.sin(rot[m])[:, None, None]
        u, v = c * x + s * y, -s * x + c * y
        d = _shape_sdf(k, u, v, r[m, None, None])
        out[m] = (0.5 - d / px).clamp(0.0, 1.0)
    return out


def render_shapes_slow(
    kind: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, r: torch.Tensor, rot: torch.Tensor, size: int
) -> torch.Tensor:
    """Pixel-by-pixel reference for :func:`render_shapes` (plain Python maths; for tests only).

    Example:
        >>> args = (torch.tensor([3]), torch.zeros(1), torch.zeros(1), torch.ones(1) * 0.6, torch.zeros(1))
        >>> bool(torch.allclose(render_shapes(*args, 8), render_shapes_slow(*args, 8), atol=1e-5))
        True
    """
    n = kind.shape[0]
    out = torch.zeros(n, size, size)
    px = 2.0 / size
    for i in range(n):
        k, r_ = int(kind[i]), float(r[i])
        c, s = math.cos(float(rot[i])), math.sin(float(rot[i]))
        for a in range(size):
            for b in range(size):
                x = (b + 0.5) / size * 2 - 1 - float(cx[i])
                y = (a + 0.5) / size * 2 - 1 - float(cy[i])
                u, v = c * x + s * y, -s * x + c * y
                if k == 0:
                    d = math.hypot(u, v) - r_
                elif k == 1:
                    d = max(abs(u), abs(v)) - 0.8 * r_
                elif k == 2:
                    d = max(u * math.cos(math.pi / 2 + j * 2 * math.pi / 3)
                            + v * math.sin(math.pi / 2 + j * 2 * math.pi / 3) for j in range(3)) - 0.575 * r_
                elif k == 3:
                    t = ((math.atan2(v, u) + math.pi / 2) / (2 * math.pi / 5)) % 1.0
                    d = math.hypot(u, v) - 1.1 * r_ * (0.4 + 0.6 * (2 * t - 1) ** 2)
                elif k == 4:
                    d = min(max(abs(u) - 0.3 * r_, abs(v) - 0.95 * r_), max(abs(v) - 0.3 * r_, abs(u) - 0.95 * r_))
                else:
                    d = abs(math.hypot(u, v) - 0.72 * r_) - 0.26 * r_
                out[i, a, b] = min(1.0, max(0.0, 0.5 - d / px))
    return out


def _place_sprites(
    sprites: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, scale: torch.Tensor, rot: torch.Tensor, size: int
) -> torch.Tensor:
    """Place grayscale sprites ``(N, h, w)`` in [0, 1] into ``(N, size, size)`` masks (bicubic, batched).

    ``scale`` is the sprite's side as a fraction of the image side; ``(cx, cy)`` its centre in [-1, 1].
    """
    n = sprites.shape[0]
    c, s = torch.cos(rot), torch.sin(rot)
    # output point p -> sprite coordinates q = R(-rot) (p - centre) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c / scale, s / scale
    theta[:, 1, 0], theta[:, 1, 1] = -s / scale, c / scale
    theta[:, 0, 2] = -(c * cx + s * cy) / scale
    theta[:, 1, 2] = (s * cx - c * cy) / scale
    grid = F.affine_grid(theta, [n, 1, size, size], align_corners=False)
    out = F.grid_sample(sprites[:, None].float(), grid, mode="bicubic", padding_mode="zeros",
                        align_corners=False)
    return out[:, 0].clamp(0.0, 1.0)


def _background(n: int, size: int, style: str, shift: float, g: torch.Generator) -> torch.Tensor:
    """Low-saturation backgrounds ``(N, 3, S, S)``: plain (pretrain/caption) or gradient+blotches (task)."""
    dark = torch.rand(n, generator=g) < 0.5
    base = torch.where(dark, _uniform(n, 0.0, 0.28, g), _uniform(n, 0.72, 1.0, g))
    col = base[:, None] + 0.06 * torch.randn(n, 3, generator=g)
    bg = col[:, :, None, None].expand(n, 3, size, size).clone()
    if style == "task" and shift > 0:
        yy, xx = _coords(size)
        ang = _uniform(n, 0, 2 * math.pi, g)
        ramp = torch.cos(ang)[:, None, None] * xx + torch.sin(ang)[:, None, None] * yy
        other = base[:, None] + (torch.where(dark, 1.0, -1.0)[:, None] * _uniform(n, 0.05, 0.25, g)[:, None]
                                 + 0.08 * torch.randn(n, 3, generator=g))
        bg = bg + 0.5 * (ramp[:, None] + 1) * (other - col)[:, :, None, None] * min(shift, 1.5)
        blot = F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear",
                             align_corners=False)
        bg = bg + 0.08 * shift * blot
    return bg


def _object_colors(idx: torch.Tensor, jitter: float, g: torch.Generator) -> torch.Tensor:
    return (_PALETTE[idx] + jitter * torch.randn(idx.shape[0], 3, generator=g)).clamp(0.0, 1.0)


def _composite(img: torch.Tensor, alpha: torch.Tensor, rgb: torch.Tensor) -> torch.Tensor:
    a = alpha[:, None]
    return img * (1 - a) + rgb[:, :, None, None] * a


def _finish(img: torch.Tensor, noise: float, g: torch.Generator) -> torch.Tensor:
    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=g)
    return (img.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def _style_params(style: str, shift: float) -> dict[str, float]:
    if style == "task":
        return {"noise": 0.02 + 0.04 * shift, "jitter": 0.06 + 0.04 * shift, "rot": 0.25 + 0.35 * shift,
                "pos": 0.25 + 0.1 * shift}
    return {"noise": 0.02, "jitter": 0.05, "rot": 0.2, "pos": 0.2}


# ----------------------------------------------------------------------------------------------------------
# Scene generators: each returns (uint8 images, attribute dict of per-image tensors)
# ----------------------------------------------------------------------------------------------------------
def _scene_single(n: int, size: int, style: str, shift: float, g: torch.Generator, *, kind=None, color=None,
                  position=None, size_class=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One shape per image; unspecified attributes are random. Position None -> near the centre."""
    p = _style_params(style, shift)
    kind = _pick(n, len(SHAPES), g) if kind is None else kind
    color = _pick(n, len(COLORS), g) if color is None else color
    sc = _pick(n, 3, g) if size_class is None else size_class
    lo = torch.tensor([a for a, _ in _SIZE_RANGES])[sc]
    hi = torch.tensor([b for _, b in _SIZE_RANGES])[sc]
    r = lo + (hi - lo) * torch.rand(n, generator=g)
    if position is None:
        cx = _uniform(n, -p["pos"], p["pos"], g) * (1 - r)
        cy = _uniform(n, -p["pos"], p["pos"], g) * (1 - r)
        pos = torch.full((n,), -1)
    else:
        pos = position
        r = torch.minimum(r, torch.full((n,), 0.3))
        xy = _POSITION_XY[pos]
        cx = xy[:, 0] + _uniform(n, -0.12, 0.12, g)
        cy = xy[:, 1] + _uniform(n, -0.12, 0.12, g)
    full_rot = (kind == 2) | (kind == 3)
    rot = torch.where(full_rot, _uniform(n, -math.pi, math.pi, g), _uniform(n, -p["rot"], p["rot"], g))
    if style != "task":
        rot = torch.where(full_rot, rot * 0.15, rot)  # pre-training: triangles and stars mostly upright
    img = _background(n, size, style, shift, g)
    img = _composite(img, render_shapes(kind, cx, cy, r, rot, size), _object_colors(color, p["jitter"], g))
    return _finish(img, p["noise"], g), {"kind": kind, "color": color, "position": pos, "size": sc}


def _scene_counts(n: int, size: int, style: str, shift: float, g: torch.Generator, *, count=None
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """1..5 small shapes in distinct cells of a 3x3 grid. Pre-training: all alike; task: mixed."""
    p = _style_params(style, shift)
    count = _pick(n, 5, g) + 1 if count is None else count
    cells = torch.argsort(torch.rand(n, 9, generator=g), dim=1)[:, :5]
    kind0, color0 = _pick(n, len(SHAPES), g), _pick(n, len(COLORS), g)
    img = _background(n, size, style, shift, g)
    for j in range(5):
        if style == "task":
            kind, color = _pick(n, len(SHAPES), g), _pick(n, len(COLORS), g)
        else:
            kind, color = kind0, color0
        cell = cells[:, j]
        cx = (cell % 3).float() * (2 / 3) - 2 / 3 + _uniform(n, -0.08, 0.08, g)
        cy = (cell // 3).float() * (2 / 3) - 2 / 3 + _uniform(n, -0.08, 0.08, g)
        r = _uniform(n, 0.15, 0.21, g)
        rot = _uniform(n, -p["rot"], p["rot"], g)
        alpha = render_shapes(kind, cx, cy, r, rot, size) * (count > j).float()[:, None, None]
        img = _composite(img, alpha, _object_colors(color, p["jitter"], g))
    return _finish(img, p["noise"], g), {"count": count, "kind": kind0, "color": color0}


def _texture_alpha(kind: torch.Tensor, size: int, style: str, g: torch.Generator) -> torch.Tensor:
    n = kind.shape[0]
    yy, xx = _coords(size)
    px = 2.0 / size
    ang = _uniform(n, -math.pi, math.pi, g)
    if style != "task":  # pre-training textures: near axis-aligned
        ang = torch.round(ang / (math.pi / 2)) * (math.pi / 2) + 0.1 * ang
    c, s = torch.cos(ang)[:, None, None], torch.sin(ang)[:, None, None]
    u, v = c * xx + s * yy, -s * xx + c * yy
    period = _uniform(n, 5.0, 9.0, g)[:, None, None] * px
    phase = _uniform(n, 0, 2 * math.pi, g)[:, None, None]
    w = 2 * math.pi / period
    out = torch.zeros(n, size, size)
    for k in range(len(TEXTURES)):
        m = kind == k
        if not bool(m.any()):
            continue
        um, vm, wm, pm, per = u[m], v[m], w[m], phase[m], period[m]
        if k == 0:  # stripes
            a = 0.5 + 2.5 * torch.sin(wm * um + pm)
        elif k == 1:  # checkerboard
            a = 0.5 + 8.0 * torch.sin(0.6 * wm * um + pm) * torch.sin(0.6 * wm * vm + pm)
        elif k == 2:  # dots on a lattice
            fu = torch.remainder(um / per + pm, 1.0) - 0.5
            fv = torch.remainder(vm / per + pm, 1.0) - 0.5
            a = 0.5 - (torch.sqrt(fu * fu + fv * fv) * per - 0.28 * per) / px
        elif k == 3:  # blocky random noise
            blk = int(m.sum())
            cells = torch.rand(blk, 1, size // 2, size // 2, generator=g)
            a = F.interpolate(cells, size=(size, size), mode="nearest")[:, 0] * 3.0 - 1.0
        elif k == 4:  # grid lines
            du = (0.5 - (torch.remainder(um / per + pm, 1.0) - 0.5).abs()) * per
            dv = (0.5 - (torch.remainder(vm / per + pm, 1.0) - 0.5).abs()) * per
            a = 0.5 - (torch.minimum(du, dv) - 0.5 * px) / px
        else:  # waves
            amp = _uniform(blk := int(m.sum()), 0.12, 0.2, g)[:, None, None]
            k2 = _uniform(blk, 1.0, 2.0, g)[:, None, None]
            a = 0.5 + 2.5 * torch.sin(wm * (vm + amp * torch.sin(k2 * math.pi * um)) + pm)
        out[m] = a.clamp(0.0, 1.0)
    return out


def _scene_textures(n: int, size: int, style: str, shift: float, g: torch.Generator, *, kind=None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A full-frame two-colour texture; the second colour is a background tone or another palette colour."""
    p = _style_params(style, shift)
    kind = _pick(n, len(TEXTURES), g) if kind is None else kind
    c1 = _pick(n, len(COLORS), g)
    c2 = (c1 + 1 + _pick(n, len(COLORS) - 1, g)) % len(COLORS)
    use_pal = torch.rand(n, generator=g) < 0.5
    bg = _background(n, size, style, shift, g)
    col2 = _object_colors(c2, p["jitter"], g)[:, :, None, None]
    bg = torch.where(use_pal[:, None, None, None], col2.expand_as(bg), bg)
    img = _composite(bg, _texture_alpha(kind, size, style, g), _object_colors(c1, p["jitter"], g))
    c2 = torch.where(use_pal, c2, torch.full_like(c2, -1))
    return _finish(img, p["noise"], g), {"kind": kind, "color": c1, "color2": c2}


def _scene_sprites(source: str, idx: torch.Tensor, size: int, style: str, shift: float, g: torch.Generator
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Real digit / animal sprites (given source indices), coloured and placed on a background."""
    p = _style_params(style, shift)
    x, y = load_digits_source() if source == "digits" else load_animals_source()
    n = idx.shape[0]
    sprites = x[idx].float() / 255.0
    if source == "digits":
        scale = _uniform(n, 0.62, 0.85, g) if style == "task" else _uniform(n, 0.7, 0.9, g)
    else:
        scale = _uniform(n, 0.75, 1.0, g) if style == "task" else _uniform(n, 0.85, 1.05, g)
    off = p["pos"] * 0.5
    cx, cy = _uniform(n, -off, off, g), _uniform(n, -off, off, g)
    rot = _uniform(n, -0.5 * p["rot"], 0.5 * p["rot"], g)
    color = _pick(n, len(COLORS), g)
    img = _background(n, size, style, shift, g)
    img = _composite(img, _place_sprites(sprites, cx, cy, scale, rot, size), _object_colors(color, p["jitter"], g))
    return _finish(img, p["noise"], g), {"label": y[idx], "color": color}


# ----------------------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------------------
def _procedural_task_images(name: str, labels: torch.Tensor, size: int, shift: float, g: torch.Generator
                            ) -> torch.Tensor:
    n = labels.shape[0]
    if name == "shapes":  # medium or large only: small triangles/stars are a few pixels at 32x32
        return _scene_single(n, size, "task", shift, g, kind=labels, size_class=_pick(n, 2, g) + 1)[0]
    if name == "colors":
        return _scene_single(n, size, "task", shift, g, color=labels, size_class=_pick(n, 2, g) + 1)[0]
    if name == "positions":
        return _scene_single(n, size, "task", shift, g, position=labels)[0]
    if name == "sizes":
        return _scene_single(n, size, "task", shift, g, size_class=labels)[0]
    if name == "counts":
        return _scene_counts(n, size, "task", shift, g, count=labels + 1)[0]
    if name == "textures":
        return _scene_textures(n, size, "task", shift, g, kind=labels)[0]
    raise ValueError(f"unknown task {name!r}")


def _build_task(name: str, size: int, seed: int, n_train: int, n_test: int, shift: float) -> ToyTask:
    classnames = list(_CLASSNAMES[name])
    templates = list(_TEMPLATES[name])
    if name in ("digits", "animals"):
        _, y = load_digits_source() if name == "digits" else load_animals_source()
        split = real_source_split(name)
        out = {}
        for part, n in (("train", n_train), ("test", n_test)):
            g = _gen(seed, "task", name, part)
            idx = _balanced_subset(split[f"task_{part}"], y, n, g)
            imgs, attrs = _scene_sprites(name, idx, size, "task", shift, g)
            out[part] = (imgs, attrs["label"].clone(), idx)
        return ToyTask(name, classnames, templates, out["train"][0], out["train"][1], out["test"][0],
                       out["test"][1], source=name, train_source_index=out["train"][2],
                       test_source_index=out["test"][2])
    out = {}
    for part, n in (("train", n_train), ("test", n_test)):
        g = _gen(seed, "task", name, part)
        labels = _balanced_labels(n, len(classnames), g)
        out[part] = (_procedural_task_images(name, labels, size, shift, g), labels)
    return ToyTask(name, classnames, templates, out["train"][0], out["train"][1], out["test"][0],
                   out["test"][1], train_source_index=torch.full((n_train,), -1),
                   test_source_index=torch.full((n_test,), -1))


def build_tasks(
    image_size: int = 32,
    seed: int = 0,
    n_train: int = 1000,
    n_test: int = 300,
    names: list[str] | None = None,
    shift: float = 1.0,
    substitute_missing: bool = False,
) -> list[ToyTask]:
    """Build the toy continual-learning tasks (default: all of :data:`TASK_NAMES`, in that order).

    ``n_train`` / ``n_test`` are per task; real-image tasks are capped by their split (digits: about
    800 train / 450 test available; animals 4000 / 1500), always class-balanced as far as possible.
    ``shift`` scales how far the task rendering is from the pre-training rendering (background gradients
    and blotches, pixel noise, colour jitter, rotations); 0 keeps backgrounds plain.
    If animal-mnist is not installed, an ``ImportError`` names the install command, unless
    ``substitute_missing=True``, which replaces ``animals`` by the procedural ``sizes`` task (whose name
    says so: the lead's reports must not call it animals).

    Example:
        >>> tasks = build_tasks(names=["shapes", "digits"], n_train=100, n_test=50)
        >>> [(t.name, t.num_classes, tuple(t.train_images.shape)) for t in tasks]
        [('shapes', 6, (100, 3, 32, 32)), ('digits', 10, (100, 3, 32, 32))]
    """
    names = list(TASK_NAMES) if names is None else list(names)
    tasks = []
    for name in names:
        if name not in _CLASSNAMES:
            raise ValueError(f"unknown task {name!r}; choose from {TASK_NAMES + EXTRA_TASK_NAMES}")
        if name == "animals" and not animals_available():
            if not substitute_missing:
                raise ImportError(f"the animals task needs the animal-mnist silhouettes: {ANIMAL_MNIST_HINT}")
            task = _build_task("sizes", image_size, seed, n_train, n_test, shift)
            task.name = "sizes (substitute for animals)"
            tasks.append(task)
            continue
        tasks.append(_build_task(name, image_size, seed, n_train, n_test, shift))
    return tasks


# ----------------------------------------------------------------------------------------------------------
# Captioned corpora
# ----------------------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _caption_digit(d: str, c: str, r: float) -> str:
    opts = [f"a photo of the digit {d}.", f"a handwritten {d}.", f"the number {d} in {c}.",
            f"a {c} digit {d}.", f"a picture of the number {d}.", f"the digit {d} written in {c}.",
            f"a {c} handwritten number {d}."]
    return opts[int(r * len(opts))]


def _caption_animal(a: str, c: str, r: float) -> str:
    art = _article(a)
    opts = [f"a silhouette of {art} {a}.", f"a {c} {a}.", f"a photo of {art} {a}.",
            f"the shape of {art} {a} in {c}.", f"a drawing of {art} {a}.", f"a {c} silhouette of {art} {a}.",
            f"{art} {a}."]
    return opts[int(r * len(opts))]


def _caption_single(s: str, c: str, z: str, pos: str | None, r: float) -> str:
    if pos is None:
        opts = [f"a {c} {s}.", f"a {z} {c} {s}.", f"a drawing of a {s}.", f"a {c} object.", f"a {z} {s}.",
                f"a {s} shape in {c}.", f"a {z} shape.", f"something {c}."]
    else:
        opts = [f"a {c} {s} {pos}.", f"a {s} {pos}.", f"a {z} {c} {s} {pos}.", f"a shape {pos}.",
                f"something {c} {pos}.", f"an object {pos} of the image.", f"a {c} {s}."]
    return opts[int(r * len(opts))]


def _caption_counts(k: int, s: str, sp: str, c: str, r: float, mixed: bool = False) -> str:
    w = DIGIT_WORDS[k]
    if mixed:  # task-style count scenes mix shapes and colours: only the number can be said
        shp = "shape" if k == 1 else "shapes"
        there = "there is" if k == 1 else "there are"
        opts = [f"{w} {shp}.", f"{there} {w} {shp}.", f"a picture of {w} {shp}.", f"exactly {w} {shp}.",
                f"{w} different {shp}.", f"an image with {w} {shp}."]
        return opts[int(r * len(opts))]
    noun, shp = (s, "shape") if k == 1 else (sp, "shapes")
    there = "there is" if k == 1 else "there are"
    opts = [f"{w} {c} {noun}.", f"{w} {shp}.", f"{there} {w} {shp}.", f"a picture of {w} {noun}.",
            f"{w} {shp} in {c}.", f"exactly {w} {c} {shp}.", f"{w} {noun}."]
    return opts[int(r * len(opts))]


_TEXTURE_ADJ = ["striped", "checkered", "dotted", "noisy", "grid", "wavy"]


def _caption_texture(t: int, c1: str, c2: str | None, r: float) -> str:
    name, adj = TEXTURES[t], _TEXTURE_ADJ[t]
    cc = f"{c1} and {c2}" if c2 is not None else c1
    opts = [f"a {name} texture.", f"a pattern of {cc} {name}.", f"{cc} {name}.", f"a {adj} {c1} pattern.",
            f"a texture of {name}.", f"a close-up of {name} in {c1}.", f"{name}."]
    return opts[int(r * len(opts))]


_MIX = [("digits", 0.16), ("animals", 0.16), ("single", 0.18), ("positioned", 0.12), ("counts", 0.18),
        ("textures", 0.20)]


# which task's templates may caption an image of each corpus kind, and the attribute naming the class
_TEMPLATE_TASKS = {"digits": [("digits", "label")], "animals": [("animals", "label")],
                   "single": [("shapes", "kind"), ("colors", "color")], "positioned": [("positions", "position")],
                   "counts": [("counts", "count")], "textures": [("textures", "kind")]}
# the class of a reference image (GNSP captions ImageNet images "a photo of a/an {first class name}")
_REFERENCE_CLASS = {"digits": ("label", lambda v: f"digit {DIGIT_WORDS[v]}"), "animals": ("label", ANIMALS.__getitem__),
                    "single": ("kind", SHAPES.__getitem__), "positioned": ("kind", SHAPES.__getitem__),
                    "counts": ("count", lambda v: "single shape" if v == 1 else f"group of {DIGIT_WORDS[v]} shapes"),
                    "textures": ("kind", lambda v: f"{TEXTURES[v]} texture")}


def reference_caption(classname: str) -> str:
    """GNSP's reference caption, ``"a photo of a/an {classname}."``.

    Example:
        >>> reference_caption("elephant"), reference_caption("digit two")
        ('a photo of an elephant.', 'a photo of a digit two.')
    """
    return f"a photo of {_article(classname)} {classname}."


def reference_classnames() -> list[str]:
    """Every class a reference caption can name, sorted (what :func:`build_reference_set` captions say).

    Example:
        >>> "digit seven" in reference_classnames(), "single shape" in reference_classnames()
        (True, True)
    """
    names = ([f"digit {w}" for w in DIGIT_WORDS] + ANIMALS + SHAPES + ["single shape"]
             + [f"group of {w} shapes" for w in DIGIT_WORDS[2:6]] + [f"{t} texture" for t in TEXTURES])
    return sorted(names)


def _template_caption(kind: str, at: dict[str, torch.Tensor], i: int, g: torch.Generator) -> str:
    options = _TEMPLATE_TASKS[kind]
    task, key = options[int(torch.randint(0, len(options), (1,), generator=g))]
    value = int(at[key][i]) - (1 if key == "count" else 0)
    templates = _TEMPLATES[task]
    template = templates[int(torch.randint(0, len(templates), (1,), generator=g))]
    return template.format(_CLASSNAMES[task][value])


def _corpus(purpose: str, size: int, seed: int, n: int, substitute_missing: bool, style: str = "plain",
            shift: float = 0.0, template_share: float = 0.0
            ) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor | list[str]]]:
    """``purpose``: ``pretrain`` / ``caption`` / ``reference`` (the real-source share used and the random stream).

    ``style="task"`` renders as the tasks do (``shift``); ``template_share`` of the captions are a task prompt
    template filled with the image's class; ``purpose="reference"`` captions every image with
    :func:`reference_caption` of its class instead.
    """
    have_animals = animals_available()
    if not have_animals and not substitute_missing:
        raise ImportError(f"the pre-training corpus needs the animal-mnist silhouettes: {ANIMAL_MNIST_HINT}")
    if purpose not in ("pretrain", "caption", "reference"):
        raise ValueError(f"unknown corpus purpose {purpose!r}")
    mix = [(k, w) for k, w in _MIX if have_animals or k != "animals"]
    tot = sum(w for _, w in mix)
    counts = [int(n * w / tot) for _, w in mix]
    counts[-1] = n - sum(counts[:-1])
    imgs, caps, srcs, sidx = [], [], [], []
    task_style = style == "task"
    tag = purpose if not task_style else f"{purpose}/task"
    for (kind, _), m in zip(mix, counts, strict=True):
        if m == 0:
            continue
        g = _gen(seed, tag, kind)
        rr = torch.rand(m, generator=g).tolist()
        if kind in ("digits", "animals"):
            pool = real_source_split(kind)[purpose]
            idx = pool[torch.randint(0, len(pool), (m,), generator=g)]
            im, at = _scene_sprites(kind, idx, size, style, shift, g)
            words = DIGIT_WORDS if kind == "digits" else ANIMALS
            fn = _caption_digit if kind == "digits" else _caption_animal
            kc = [fn(words[y], COLORS[c], r) for y, c, r in zip(at["label"].tolist(), at["color"].tolist(), rr,
                                                                 strict=True)]
            sidx.append(idx)
        elif kind in ("single", "positioned"):
            pos = _pick(m, len(POSITIONS), g) if kind == "positioned" else None
            sc = _pick(m, 2, g) + 1 if (task_style and pos is None) else None
            im, at = _scene_single(m, size, style, shift, g, position=pos, size_class=sc)
            ps = at["position"].tolist()
            kc = [_caption_single(SHAPES[s], COLORS[c], SIZES[z], _POSITION_PHRASES[p] if p >= 0 else None, r)
                  for s, c, z, p, r in zip(at["kind"].tolist(), at["color"].tolist(), at["size"].tolist(), ps, rr,
                                           strict=True)]
            sidx.append(torch.full((m,), -1))
        elif kind == "counts":
            im, at = _scene_counts(m, size, style, shift, g)
            kc = [_caption_counts(k, SHAPES[s], SHAPE_PLURALS[s], COLORS[c], r, mixed=task_style)
                  for k, s, c, r in zip(at["count"].tolist(), at["kind"].tolist(), at["color"].tolist(), rr,
                                        strict=True)]
            sidx.append(torch.full((m,), -1))
        else:
            im, at = _scene_textures(m, size, style, shift, g)
            kc = [_caption_texture(t, COLORS[c], COLORS[c2] if c2 >= 0 else None, r)
                  for t, c, c2, r in zip(at["kind"].tolist(), at["color"].tolist(), at["color2"].tolist(), rr,
                                         strict=True)]
            sidx.append(torch.full((m,), -1))
        if purpose == "reference":
            key, name = _REFERENCE_CLASS[kind]
            kc = [reference_caption(name(int(v))) for v in at[key].tolist()]
        elif template_share > 0:
            use = (torch.rand(m, generator=g) < template_share).tolist()
            kc = [_template_caption(kind, at, i, g) if u else c for i, (u, c) in enumerate(zip(use, kc, strict=True))]
        caps += kc
        imgs.append(im)
        srcs += [kind] * m
    images = torch.cat(imgs)
    source_index = torch.cat(sidx)
    perm = torch.randperm(n, generator=_gen(seed, tag, "shuffle"))
    meta = {"source": [srcs[i] for i in perm.tolist()], "source_index": source_index[perm]}
    return images[perm], [caps[i] for i in perm.tolist()], meta


def build_pretraining_pairs(
    image_size: int = 32, seed: int = 0, n: int = 20000, substitute_missing: bool = False,
    return_meta: bool = False, style: str = "plain", shift: float = 1.0, template_share: float = 0.0,
):
    """Image-caption pairs for contrastive pre-training of a tiny CLIP.

    The mix (by share): digits 16%, animal silhouettes 16%, single shapes 18%, shapes at one of five
    positions 12%, counts of 1..5 alike shapes 18%, two-colour textures 20%. Captions are written from each
    image's attributes with varied phrasing (e.g. 'a red star on the left.', 'three blue dots' style), and
    every class name of every task occurs in them. Real images come only from the ``pretrain`` share of
    :func:`real_source_split`; rendering is plainer than the tasks' (no background gradients or blotches,
    less jitter, upright triangles/stars, axis-aligned textures, count scenes with alike objects).
    With ``return_meta=True`` also returns ``{'source': list[str], 'source_index': int64 tensor}``
    (``-1`` for procedural images).

    ``style="task"`` renders the same kinds of scene the way the tasks are rendered (backgrounds, noise,
    rotations at ``shift``; count scenes with mixed shapes), still from the ``pretrain`` share and its own
    random stream; ``template_share`` of the captions are then one of the tasks' prompt templates filled with
    the image's class ('a photo of the digit seven.'), as web captions often read like CLIP's prompts.

    Example:
        >>> images, captions = build_pretraining_pairs(n=64)
        >>> images.dtype, tuple(images.shape), len(captions)
        (torch.uint8, (64, 3, 32, 32), 64)
    """
    if style not in ("plain", "task"):
        raise ValueError(f"style must be 'plain' or 'task', got {style!r}")
    if not 0.0 <= template_share <= 1.0:
        raise ValueError(f"template_share must lie in [0, 1], got {template_share!r}")
    images, caps, meta = _corpus("pretrain", image_size, seed, n, substitute_missing, style,
                                 shift if style == "task" else 0.0, template_share)
    return (images, caps, meta) if return_meta else (images, caps)


def build_caption_set(
    image_size: int = 32, seed: int = 1, n: int = 1000, substitute_missing: bool = False,
    return_meta: bool = False,
):
    """Held-out image-caption pairs (same style as pre-training) for retrieval R@K and the modality gap.

    Real images come only from the ``caption`` share of :func:`real_source_split`, disjoint from the
    pre-training corpus and from every task; procedural images use their own random stream.

    Example:
        >>> images, captions = build_caption_set(n=32)
        >>> len(captions), images.shape[1:]
        (32, torch.Size([3, 32, 32]))
    """
    images, caps, meta = _corpus("caption", image_size, seed, n, substitute_missing)
    return (images, caps, meta) if return_meta else (images, caps)


def build_reference_set(
    image_size: int = 32, seed: int = 0, n: int = 1000, substitute_missing: bool = False,
    return_meta: bool = False,
):
    """CD / MAP reference pairs in the role of GNSP's 1,000 ImageNet images: never pre-trained on, each
    captioned ``"a photo of a/an {class}."`` by its main object (a digit, an animal, a shape, a count, a texture).

    Real images come only from the ``reference`` share of :func:`real_source_split`; procedural images from
    their own random stream, so a different ``seed`` (one per task) gives a fresh set. Rendered in the
    pre-training style (the reference data stands for the pre-training distribution, as ImageNet does for CLIP).

    Example:
        >>> images, captions = build_reference_set(n=40, seed=3)
        >>> len(images), captions[0].startswith("a photo of")
        (40, True)
    """
    images, caps, meta = _corpus("reference", image_size, seed, n, substitute_missing)
    return (images, caps, meta) if return_meta else (images, caps)


def all_texts(tasks: list[ToyTask], captions: list[str]) -> list[str]:
    """Every string a tokenizer must know: the captions and every template filled with every class name.

    Order-preserving and de-duplicated.

    Example:
        >>> t = build_tasks(names=["counts"], n_train=10, n_test=5)
        >>> texts = all_texts(t, ["three red stars."])
        >>> texts[0], "a photo of five shapes." in texts
        ('three red stars.', True)
    """
    seen: dict[str, None] = {}
    for c in captions:
        seen.setdefault(c, None)
    for t in tasks:
        for tpl in t.templates:
            for name in t.classnames:
                seen.setdefault(tpl.format(name), None)
    return list(seen)


def save_grid_png(images: torch.Tensor, path: str, nrow: int = 8, scale: int = 3, pad: int = 1) -> None:
    """Save ``(N, 3, S, S)`` images (uint8, or float in [0, 1]) as a PNG grid, ``nrow`` images per row.

    Example:
        >>> save_grid_png(build_caption_set(n=16)[0], "/tmp/grid.png", nrow=4)  # doctest: +SKIP
    """
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover
        raise ImportError("save_grid_png needs Pillow: pip install gnsp_optim[reference]") from e
    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    n, _, h, w = x.shape
    ncol = nrow
    rows = (n + ncol - 1) // ncol
    canvas = torch.full((3, rows * (h + pad) + pad, ncol * (w + pad) + pad), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        canvas[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    img.save(path)
