"""Pillow-only image decoding and a small CLIP eval transform (resize, center crop, to tensor, normalise).

No torchvision: Pillow is imported lazily inside the functions. The model package may pass its own
``transform`` (any callable ``PIL.Image -> Tensor``) to the datasets instead of :class:`CLIPImageTransform`.

Example:
    >>> import numpy as np
    >>> from gnsp_optim.reference.data.images import CLIPImageTransform, to_pil
    >>> x = CLIPImageTransform(image_size=16)(to_pil(np.zeros((8, 8, 3), dtype=np.uint8)))
    >>> tuple(x.shape)
    (3, 16, 16)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

__all__ = ["CLIP_MEAN", "CLIP_STD", "CLIPImageTransform", "import_pil", "load_image", "to_pil"]

#: OpenAI CLIP normalisation constants (RGB).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def import_pil() -> Any:
    """Import ``PIL.Image`` lazily, with an install hint when Pillow is missing.

    Example:
        >>> import_pil().__name__
        'PIL.Image'
    """
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Pillow is needed to decode images: pip install gnsp_optim[reference] (or pip install pillow)"
        ) from exc
    return Image


def load_image(path: str | os.PathLike) -> Any:
    """Decode an image file into an RGB ``PIL.Image`` (file closed afterwards).

    Example:
        >>> load_image("imagenet/train/n01440764/n01440764_10026.JPEG").size  # doctest: +SKIP
        (250, 250)
    """
    image_mod = import_pil()
    with open(path, "rb") as f:
        img = image_mod.open(f)
        return img.convert("RGB")


def to_pil(array: np.ndarray) -> Any:
    """An in-memory uint8 array (H x W grey or H x W x 3 RGB) as an RGB ``PIL.Image``.

    Example:
        >>> to_pil(np.zeros((28, 28), dtype=np.uint8)).mode
        'RGB'
    """
    image_mod = import_pil()
    arr = np.ascontiguousarray(array, dtype=np.uint8)
    return image_mod.fromarray(arr).convert("RGB")


class CLIPImageTransform:
    """CLIP's eval preprocessing, the project's only copy: bicubic resize of the short side, center crop,
    RGB, [0,1] CHW float, normalise with :data:`CLIP_MEAN` / :data:`CLIP_STD`.

    The same arithmetic as OpenAI CLIP / open_clip's torchvision pipeline without torchvision: the long side
    becomes ``int(S * long / short)`` (truncated, as ``transforms.Resize``), the crop offsets are
    ``round((size - S) / 2)`` (as ``CenterCrop``), and the RGB conversion comes after resizing and cropping
    (``_convert_image_to_rgb`` follows ``CenterCrop`` there). A picklable class (works with
    ``DataLoader(num_workers>0)``); ``image_size`` is configurable so tests can use tiny images.

    Example:
        >>> t = CLIPImageTransform(image_size=4)
        >>> img = to_pil(np.full((6, 10, 3), 255, dtype=np.uint8))
        >>> y = t(img)
        >>> tuple(y.shape), round(float(y[0, 0, 0]), 4) == round((1 - CLIP_MEAN[0]) / CLIP_STD[0], 4)
        ((3, 4, 4), True)
    """

    def __init__(
        self,
        image_size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

    def resize_and_crop(self, img: Any) -> Any:
        """Resize (bicubic) so the short side is ``image_size``, then center-crop a square; then RGB.

        Example:
            >>> CLIPImageTransform(4).resize_and_crop(to_pil(np.zeros((6, 10, 3), np.uint8))).size
            (4, 4)
        """
        image_mod = import_pil()
        w, h = img.size
        s = self.image_size
        short, long = min(w, h), max(w, h)
        new_long = int(s * long / short)
        new_size = (s, new_long) if w <= h else (new_long, s)
        if new_size != (w, h):
            img = img.resize(new_size, resample=image_mod.BICUBIC)
        w, h = img.size
        left, top = round((w - s) / 2.0), round((h - s) / 2.0)
        return img.crop((left, top, left + s, top + s)).convert("RGB")

    def __call__(self, img: Any) -> torch.Tensor:
        """Transform one PIL image into a normalised ``(3, image_size, image_size)`` float32 tensor."""
        img = self.resize_and_crop(img)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # H x W x 3
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        arr = (arr - mean) / std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def __repr__(self) -> str:
        return f"CLIPImageTransform(image_size={self.image_size})"
