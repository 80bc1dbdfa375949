"""Types shared by the MTIL loaders and the ImageNet reference set (so neither module imports the other).

Example:
    >>> str(DataLayoutError("dtd", "/data/dtd/dtd/labels/train1.txt", "file not found"))
    'DTD: file not found: /data/dtd/dtd/labels/train1.txt'
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .facts import display_name
from .images import CLIPImageTransform, load_image, to_pil

__all__ = ["ArraySamples", "DataLayoutError", "DataStatus", "MTILDataset"]


class DataLayoutError(FileNotFoundError):
    """A dataset folder is missing, incomplete or not in the expected layout (message names dataset + path).

    Example:
        >>> str(DataLayoutError("dtd", "/data/dtd/dtd/labels/train1.txt", "file not found"))
        'DTD: file not found: /data/dtd/dtd/labels/train1.txt'
    """

    def __init__(self, dataset: str, path: str | os.PathLike, problem: str, hint: str = "") -> None:
        self.dataset = dataset
        self.path = str(path)
        self.problem = problem
        self.hint = hint
        msg = f"{display_name(dataset)}: {problem}: {self.path}"
        if hint:
            msg += f" (hint: {hint})"
        super().__init__(msg)


class ArraySamples(Sequence):
    """In-memory samples: ``images`` uint8 ``(N, H, W)`` or ``(N, H, W, 3)``, ``labels`` ``(N,)``.

    Indexing gives ``(image_array, label)`` like a list of pairs, without building N tuples.

    Example:
        >>> s = ArraySamples(np.zeros((2, 4, 4), np.uint8), np.array([3, 5]))
        >>> len(s), s[1][1], s[1][0].shape
        (2, 5, (4, 4))
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int] | np.ndarray) -> None:
        labels = np.asarray(labels, dtype=np.int64)
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:  # type: ignore[override]
        return self.images[i], int(self.labels[i])


class MTILDataset(torch.utils.data.Dataset):
    """A classification dataset: ``samples`` of ``(path_or_array, label)``, class names, prompt templates.

    ``__getitem__`` decodes lazily (path -> Pillow RGB, array -> RGB) and applies ``transform``
    (``PIL.Image -> Tensor``; default :class:`~.images.CLIPImageTransform` at 224).

    Example:
        >>> ds = MTILDataset(ArraySamples(np.zeros((1, 8, 8), np.uint8), [0]), ["0"], ["a photo of {}."],
        ...                  CLIPImageTransform(image_size=8))
        >>> x, y = ds[0]
        >>> tuple(x.shape), y, ds.num_classes
        ((3, 8, 8), 0, 1)
    """

    def __init__(
        self,
        samples: Sequence[tuple[Any, int]],
        classnames: Sequence[str],
        templates: Sequence[str],
        transform: Callable[[Any], torch.Tensor] | None = None,
        name: str = "",
    ) -> None:
        self.samples = samples
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.transform = transform if transform is not None else CLIPImageTransform()
        self.name = name

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classnames)``)."""
        return len(self.classnames)

    @property
    def targets(self) -> list[int]:
        """All labels, in sample order (no decoding).

        Example:
            >>> MTILDataset([("a.jpg", 1), ("b.jpg", 0)], ["x", "y"], ["{}"]).targets
            [1, 0]
        """
        if isinstance(self.samples, ArraySamples):
            return self.samples.labels.tolist()
        return [int(s[1]) for s in self.samples]

    def load_pil(self, index: int) -> Any:
        """The decoded RGB ``PIL.Image`` of sample ``index`` (before ``transform``)."""
        item, _ = self.samples[index]
        if isinstance(item, np.ndarray):
            return to_pil(item)
        return load_image(item)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        _, label = self.samples[index]
        return self.transform(self.load_pil(index)), int(label)

    def subset(self, indices: Sequence[int]) -> MTILDataset:
        """A dataset over ``samples[i] for i in indices`` (same names, templates, transform).

        Example:
            >>> MTILDataset([("a", 0), ("b", 1)], ["x", "y"], ["{}"]).subset([1]).targets
            [1]
        """
        idx = [int(i) for i in indices]
        if isinstance(self.samples, ArraySamples):
            new: Sequence[tuple[Any, int]] = ArraySamples(self.samples.images[idx], self.samples.labels[idx])
        else:
            new = [self.samples[i] for i in idx]
        return MTILDataset(new, self.classnames, self.templates, self.transform, self.name)

    def __repr__(self) -> str:
        return f"MTILDataset(name={self.name!r}, n={len(self)}, classes={self.num_classes})"


@dataclass
class DataStatus:
    """One row of :func:`check_data`: whether a dataset is usable under the root, with counts or a hint.

    Example:
        >>> DataStatus("mnist", "MNIST", False, "/d/MNIST/raw", problem="folder not found").present
        False
    """

    key: str
    display_name: str
    present: bool
    location: str
    counts: dict[str, int] = field(default_factory=dict)
    num_classes: int | None = None
    problem: str = ""
    hint: str = ""
    note: str = ""
