"""Real-data layer of the MTIL benchmark: the 11 datasets, class names, prompt templates, ImageNet reference set.

Everything reads a local data root in torchvision's on-disk layouts (see ``LAYOUTS.md`` beside this file);
nothing downloads. Pillow and scipy are imported lazily.

Example:
    >>> from gnsp_optim.reference.data import check_data, format_check_report
    >>> print(format_check_report(check_data("/data")))  # doctest: +SKIP
"""

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
    DatasetFacts,
)
from .imagenet import ReferenceSet, caption_for, check_imagenet, imagenet_reference_set, read_synset_mapping
from .images import CLIP_MEAN, CLIP_STD, CLIPImageTransform, load_image
from .mtil import check_data, format_check_report, load_mtil_dataset, split_indices
from .templates import TEMPLATES, format_prompts, train_prompt
from .types import ArraySamples, DataLayoutError, DataStatus, MTILDataset

__all__ = [
    "CLASSNAMES",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DATASET_FOLDERS",
    "DatasetFacts",
    "DISPLAY_NAMES",
    "MTIL_DATASETS",
    "MTIL_ORDER_I",
    "MTIL_ORDER_II",
    "NUM_CLASSES",
    "SPLIT_SEED",
    "TEMPLATES",
    "TRAIN_FRACTION",
    "ArraySamples",
    "CLIPImageTransform",
    "DataLayoutError",
    "DataStatus",
    "MTILDataset",
    "ReferenceSet",
    "caption_for",
    "check_data",
    "check_imagenet",
    "clean_classname",
    "format_check_report",
    "format_prompts",
    "imagenet_reference_set",
    "load_image",
    "load_mtil_dataset",
    "read_synset_mapping",
    "split_indices",
    "train_prompt",
]
