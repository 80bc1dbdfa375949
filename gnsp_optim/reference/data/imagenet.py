"""The ImageNet reference set of GNSP: n ImageNet-1k training images captioned "a photo of a/an {name}".

Layout (ImageFolder + a synset mapping, e.g. Kaggle's ILSVRC "object localization" download)::

    root/imagenet/train/<wnid>/*.JPEG
    root/imagenet/LOC_synset_mapping.txt      # "n01440764 tench, Tinca tinca", one wnid per line

(``synset_words.txt``, same format, is accepted instead; so is the mapping file inside ``train/``.)
No 1000-name list is shipped: class names come from the mapping file.

Example:
    >>> from gnsp_optim.reference.data.imagenet import caption_for
    >>> caption_for("tench"), caption_for("English springer")
    ('a photo of a tench', 'a photo of an English springer')
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .types import DataLayoutError, DataStatus, MTILDataset

__all__ = [
    "IMAGENET_HINT",
    "ReferenceSet",
    "caption_for",
    "check_imagenet",
    "imagenet_reference_set",
    "read_synset_mapping",
]

MAPPING_NAMES = ("LOC_synset_mapping.txt", "synset_words.txt")
IMAGENET_HINT = (
    "ILSVRC2012 train images as root/imagenet/train/<wnid>/*.JPEG plus LOC_synset_mapping.txt "
    "(Kaggle 'imagenet-object-localization-challenge', or image-net.org) in root/imagenet/"
)
_EXT = (".jpeg", ".jpg", ".png")


def caption_for(classname: str) -> str:
    """``"a photo of a/an {classname}"``: "an" when the name starts with a vowel letter (a, e, i, o, u).

    Example:
        >>> caption_for("Egyptian cat")
        'a photo of an Egyptian cat'
    """
    article = "an" if classname[:1].lower() in "aeiou" and classname else "a"
    return f"a photo of {article} {classname}"


def _mapping_path(base: Path) -> Path:
    for folder in (base, base / "train"):
        for fname in MAPPING_NAMES:
            if (folder / fname).is_file():
                return folder / fname
    raise DataLayoutError("imagenet", base / MAPPING_NAMES[0], "synset mapping file not found", IMAGENET_HINT)


def read_synset_mapping(path: str | os.PathLike) -> dict[str, str]:
    """``wnid -> first class name`` from a ``LOC_synset_mapping.txt``-style file.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "m.txt"
        >>> _ = p.write_text("n01440764 tench, Tinca tinca\\n")
        >>> read_synset_mapping(p)
        {'n01440764': 'tench'}
    """
    out: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            wnid, _, names = line.partition(" ")
            first = names.split(",")[0].strip()
            if not wnid or not first:
                raise DataLayoutError("imagenet", path, f"malformed line {line!r}")
            out[wnid] = first
    return out


class ReferenceSet(MTILDataset):
    """An :class:`MTILDataset` of ImageNet images with a caption per sample.

    ``labels`` index ``classnames`` (first names of all wnids in the mapping, sorted by wnid); ``captions[i]``
    is sample i's caption; ``wnids`` the sorted wnids.

    Example:
        >>> rs = ReferenceSet([("x.JPEG", 0)], ["tench"], ["n01440764"])
        >>> rs.captions
        ['a photo of a tench']
    """

    def __init__(
        self,
        samples: Sequence[tuple[Any, int]],
        classnames: Sequence[str],
        wnids: Sequence[str],
        transform: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(samples, classnames, ["a photo of a {}."], transform, "imagenet_reference")
        self.wnids = list(wnids)
        self.class_captions = [caption_for(c) for c in self.classnames]
        self.captions = [self.class_captions[int(lab)] for _, lab in samples]


def _listing(base: Path) -> tuple[list[str], dict[str, str], list[tuple[str, int]]]:
    train = base / "train"
    if not train.is_dir():
        raise DataLayoutError("imagenet", train, "folder not found", IMAGENET_HINT)
    mapping = read_synset_mapping(_mapping_path(base))
    wnids = sorted(mapping)
    index = {w: i for i, w in enumerate(wnids)}
    folders = sorted(e.name for e in os.scandir(train) if e.is_dir())
    unknown = [f for f in folders if f not in index]
    if unknown:
        raise DataLayoutError("imagenet", train / unknown[0], "class folder not in the synset mapping", IMAGENET_HINT)
    samples = []
    for w in folders:
        names = sorted(e.name for e in os.scandir(train / w) if e.is_file() and e.name.lower().endswith(_EXT))
        samples += [(str(train / w / n), index[w]) for n in names]
    if not samples:
        raise DataLayoutError("imagenet", train, "no images found", IMAGENET_HINT)
    return wnids, mapping, samples


def imagenet_reference_set(
    root: str | os.PathLike,
    n: int = 1000,
    seed: int = 42,
    transform: Callable[[Any], torch.Tensor] | None = None,
) -> ReferenceSet:
    """Pick ``n`` ImageNet training images deterministically and caption each by its first class name.

    Selection: list every image under ``root/imagenet/train`` sorted by (wnid, file name); draw
    ``perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))`` and keep ``perm[:n]`` in that
    (random) order, so consecutive batches of 64 mix classes. Raises :class:`DataLayoutError` when the layout
    is wrong or fewer than ``n`` images exist.

    Example:
        >>> ref = imagenet_reference_set("/data", n=1000, seed=42)  # doctest: +SKIP
        >>> len(ref), ref.captions[0]  # doctest: +SKIP
        (1000, 'a photo of a goldfinch')
    """
    base = Path(root) / "imagenet"
    wnids, mapping, samples = _listing(base)
    if n > len(samples):
        raise DataLayoutError("imagenet", base / "train", f"only {len(samples)} images, {n} requested", IMAGENET_HINT)
    perm = torch.randperm(len(samples), generator=torch.Generator().manual_seed(int(seed)))[: int(n)].tolist()
    chosen = [samples[i] for i in perm]
    return ReferenceSet(chosen, [mapping[w] for w in wnids], wnids, transform)


def check_imagenet(root: str | os.PathLike) -> DataStatus:
    """The :class:`DataStatus` row of the ImageNet reference set (counts class folders, not images).

    Example:
        >>> check_imagenet("/nonexistent").present
        False
    """
    base = Path(root) / "imagenet"
    try:
        train = base / "train"
        if not train.is_dir():
            raise DataLayoutError("imagenet", train, "folder not found", IMAGENET_HINT)
        mapping = read_synset_mapping(_mapping_path(base))
        folders = [e.name for e in os.scandir(train) if e.is_dir()]
        unknown = [f for f in folders if f not in mapping]
        if unknown:
            raise DataLayoutError("imagenet", train / unknown[0], "class folder not in the synset mapping")
        if not folders:
            raise DataLayoutError("imagenet", train, "no class folders")
        return DataStatus(
            "imagenet", "ImageNet (ref)", True, str(base), {"class folders": len(folders)}, len(mapping),
            note="images not counted",
        )
    except (DataLayoutError, OSError) as exc:
        problem = f"{exc.problem}: {exc.path}" if isinstance(exc, DataLayoutError) else str(exc)
        return DataStatus("imagenet", "ImageNet (ref)", False, str(base), problem=problem, hint=IMAGENET_HINT)
