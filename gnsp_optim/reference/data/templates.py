"""Prompt-template ensembles per MTIL dataset (the CLIP paper's per-dataset templates).

Each template is a ``str.format`` pattern with one ``{}``. The **first** template of each list is the one
used for training text (method.md sec. 2: class texts from the dataset's first prompt template); evaluation
averages the normalised text embeddings of all templates (method.md sec. 4).

Source: ``openai/CLIP`` ``data/prompts.md``. ZSCL's code (on which GNSP builds) differs in two places, kept
out of here on purpose: Food101 ``'a photo of a {}, a type of food.'`` and Stanford Cars with an extra first
template ``'a photo of a {}, a type of car.'``.

Example:
    >>> from gnsp_optim.reference.data.templates import TEMPLATES, format_prompts
    >>> TEMPLATES["aircraft"][0]
    'a photo of a {}, a type of aircraft.'
    >>> format_prompts("mnist", "7")
    ['a photo of the number: "7".']
"""

from __future__ import annotations

__all__ = ["TEMPLATES", "format_prompts", "train_prompt"]

_GENERIC_18 = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)

_CALTECH101 = (
    "a photo of a {}.",
    "a painting of a {}.",
    "a plastic {}.",
    "a sculpture of a {}.",
    "a sketch of a {}.",
    "a tattoo of a {}.",
    "a toy {}.",
    "a rendition of a {}.",
    "a embroidered {}.",
    "a cartoon {}.",
    "a {} in a video game.",
    "a plushie {}.",
    "a origami {}.",
    "art of a {}.",
    "graffiti of a {}.",
    "a drawing of a {}.",
    "a doodle of a {}.",
    "a photo of the {}.",
    "a painting of the {}.",
    "the plastic {}.",
    "a sculpture of the {}.",
    "a sketch of the {}.",
    "a tattoo of the {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "the embroidered {}.",
    "the cartoon {}.",
    "the {} in a video game.",
    "the plushie {}.",
    "the origami {}.",
    "art of the {}.",
    "graffiti of the {}.",
    "a drawing of the {}.",
    "a doodle of the {}.",
)

#: Dataset key -> template tuple; ``TEMPLATES[name][0]`` is the training template.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "aircraft": ("a photo of a {}, a type of aircraft.", "a photo of the {}, a type of aircraft."),
    "caltech101": _CALTECH101,
    "cifar100": _GENERIC_18,
    "dtd": (
        "a photo of a {} texture.",
        "a photo of a {} pattern.",
        "a photo of a {} thing.",
        "a photo of a {} object.",
        "a photo of the {} texture.",
        "a photo of the {} pattern.",
        "a photo of the {} thing.",
        "a photo of the {} object.",
    ),
    "eurosat": (
        "a centered satellite photo of {}.",
        "a centered satellite photo of a {}.",
        "a centered satellite photo of the {}.",
    ),
    "flowers": ("a photo of a {}, a type of flower.",),
    "food": ("a photo of {}, a type of food.",),
    "mnist": ('a photo of the number: "{}".',),
    "pets": ("a photo of a {}, a type of pet.",),
    "cars": (
        "a photo of a {}.",
        "a photo of the {}.",
        "a photo of my {}.",
        "i love my {}!",
        "a photo of my dirty {}.",
        "a photo of my clean {}.",
        "a photo of my new {}.",
        "a photo of my old {}.",
    ),
    "sun397": ("a photo of a {}.", "a photo of the {}."),
}


def format_prompts(dataset: str, classname: str) -> list[str]:
    """All prompts of ``dataset``'s template ensemble for one class name.

    Example:
        >>> format_prompts("sun397", "abbey")
        ['a photo of a abbey.', 'a photo of the abbey.']
    """
    return [t.format(classname) for t in TEMPLATES[dataset]]


def train_prompt(dataset: str, classname: str) -> str:
    """The training text of one class: the dataset's first template filled in.

    Example:
        >>> train_prompt("pets", "Abyssinian")
        'a photo of a Abyssinian, a type of pet.'
    """
    return TEMPLATES[dataset][0].format(classname)
