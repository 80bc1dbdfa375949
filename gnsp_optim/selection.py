r"""Which blocks are protected: parameter-name patterns, presets, and the checks that keep protection honest.

Selection sits between discovery (:mod:`.kinds`: every block the model offers) and the hooks: it keeps the
blocks whose weight the base optimizer trains and a pattern matches, decides which biases stay in their
blocks, and refuses what one input statistic cannot protect (a weight tied between two layers of the same
side, a pattern that matches nothing, an exact name no kind understands). A weight tied between an
embedding and an output layer is protected by its two blocks (:mod:`.kinds`). A broad pattern
(``model.layers.*``) protects what it can; the parameters it matches that no kind understands are named in
one warning. Parameters left over are *uncovered*; the optimizer's ``uncovered`` policy decides what happens
to them.

Selection is by parameter-name glob patterns (``fnmatch``); e.g. GNSP's 25 CLIP tensors::

    protect=GNSP_CLIP_VISUAL  # visual.transformer.resblocks.*.mlp.c_fc.weight, ...c_proj.weight, visual.proj

Example:
    >>> import torch
    >>> from gnsp_optim.kinds import discover_blocks
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> named = dict(m.named_parameters())
    >>> chosen = select_blocks(discover_blocks(m, {}), named, {id(p) for p in named.values()}, ["2.*"])
    >>> [n for b in chosen for n, _ in b.params]
    ['2.weight', '2.bias']
"""

from __future__ import annotations

import fnmatch
import warnings

from torch import nn

from .kinds import Block, Embedding, FeatureSource, Linear, discover_blocks  # noqa: F401  (FeatureSource: old home)

__all__ = ["FeatureSource", "GNSP_CLIP_VISUAL", "select_blocks", "clean_name", "unwrap_model",
           "parameter_owners"]

#: The 25 tensors GNSP trains after the first task on a CLIP ViT (open_clip / OpenAI names).
GNSP_CLIP_VISUAL = (
    "visual.transformer.resblocks.*.mlp.c_fc.weight",
    "visual.transformer.resblocks.*.mlp.c_proj.weight",
    "visual.proj",
)


def clean_name(name: str) -> str:
    """Strip wrapper prefixes (``module.`` from DDP, ``_orig_mod.`` from ``torch.compile``) from a name.

    Example:
        >>> clean_name("module._orig_mod.fc.weight")
        'fc.weight'
    """
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> names of the modules that hold it directly`` (more than one: a tied parameter).

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 2)
        >>> seq = torch.nn.Sequential(lin, lin)
        >>> parameter_owners(seq)[id(lin.weight)]
        ['0']
    """
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules():  # (a module reused twice is listed once: not a tie)
        for p in mod._parameters.values():
            if p is not None:
                owners.setdefault(id(p), []).append(mname)
    return owners


class _Patterns:
    """Glob patterns over parameter names; ``None`` wants every name."""

    def __init__(self, protect: list[str] | tuple[str, ...] | None, names: list[str]) -> None:
        self.patterns = None if protect is None else list(protect)
        if self.patterns is None:
            return
        dup = sorted({p for p in self.patterns if self.patterns.count(p) > 1})
        if dup:
            raise ValueError(f"protect lists the same pattern twice: {dup}")
        for pat in self.patterns:
            if not any(fnmatch.fnmatchcase(n, pat) for n in names):
                raise ValueError(f"protect pattern {pat!r} matches no parameter of the model")

    def wanted(self, name: str | None) -> bool:
        return name is not None and (self.patterns is None
                                     or any(fnmatch.fnmatchcase(name, p) for p in self.patterns))

    def named_exactly(self, name: str) -> bool:
        """Whether a pattern without wildcards names ``name`` (then it must be protected or it is an error)."""
        return self.patterns is not None and any(p == name and not any(c in p for c in "*?[")
                                                 for p in self.patterns)


def select_blocks(blocks: list[Block], named_params: dict[str, nn.Parameter], trainable: set[int],
                  protect: list[str] | tuple[str, ...] | None,
                  owners: dict[int, list[str]] | None = None) -> list[Block]:
    """Keep the blocks whose weight is trained and matches ``protect`` (None: all).

    A bias stays in its block only when it is trained too and (with patterns) matches a pattern itself, and
    a bias shared between blocks only when every block sharing it is kept (otherwise the rows of the others
    would count as covered without any protection). Raises ``ValueError`` for a pattern that matches
    nothing, a parameter named exactly that no block understands, and a parameter claimed by two blocks or
    held by several modules (a weight tied between two layers), except an embedding and a head sharing one
    weight (two blocks, opposite sides: the head's bias, if any, is left uncovered). Parameters matched
    only by wildcard patterns that no block protects are named in one ``UserWarning``.
    """
    patterns = _Patterns(protect, list(named_params))
    chosen = [b for b in blocks if id(b.weight) in trainable and patterns.wanted(b.weight_name)]
    for b in chosen:
        if b.bias is not None and not (id(b.bias) in trainable and patterns.wanted(b.bias_name)):
            b.drop_bias()
    _drop_partly_chosen_shared_biases(blocks, chosen)
    _refuse_ties(chosen, owners or {}, _embedding_head_pairs(chosen))
    if patterns.patterns is not None:
        _explain_unprotected_matches(chosen, named_params, trainable, patterns)
    return chosen


def _drop_partly_chosen_shared_biases(discovered: list[Block], chosen: list[Block]) -> None:
    sharers: dict[int, int] = {}
    for b in discovered:
        if b.shares_bias:
            sharers[id(b.bias)] = sharers.get(id(b.bias), 0) + 1
    kept: dict[int, list[Block]] = {}
    for b in chosen:
        if b.shares_bias:
            kept.setdefault(id(b.bias), []).append(b)
    for key, group in kept.items():
        if len(group) != sharers[key]:
            for b in group:
                b.drop_bias()


def _embedding_head_pairs(chosen: list[Block]) -> set[int]:
    """Weights (ids) tied between exactly one embedding block and one head (a Linear on the input side).

    The head's bias leaves its block: the embedding's row mask would have to apply to it too, so it is left
    to the uncovered policy (held still by default), which keeps both uses exact.
    """
    by_weight: dict[int, list[Block]] = {}
    for b in chosen:
        by_weight.setdefault(id(b.weight), []).append(b)
    pairs = set()
    for wid, group in by_weight.items():
        kinds = sorted(type(b.kind).__name__ for b in group)
        if kinds == ["Embedding", "Linear"] and not next(b for b in group if isinstance(b.kind, Linear)).transposed:
            pairs.add(wid)
            for b in group:
                if b.bias is not None:
                    b.drop_bias()
    return pairs


def _refuse_ties(chosen: list[Block], owners: dict[int, list[str]], allowed: set[int]) -> None:
    claimed: dict[int, str] = {}
    for b in chosen:
        for pname, p in b.params:
            if (p is b.bias and b.shares_bias) or (id(p) in allowed and len(owners.get(id(p), ())) <= 2):
                continue  # rows of a shared bias: each block claims only its own; an embedding/head pair
            if id(p) in claimed and claimed[id(p)] != b.name:
                raise ValueError(f"parameter {pname!r} is used by two protected layers ({claimed[id(p)]!r} and "
                                 f"{b.name!r}); tied weights cannot be protected by one input statistic (only "
                                 "an embedding tied to an output layer is): untie them, or leave them out of "
                                 "protect")
            claimed[id(p)] = b.name
            if len(owners.get(id(p), ())) > 1:
                raise ValueError(f"parameter {pname!r} is shared by several modules ({owners[id(p)]}); a tied "
                                 f"weight cannot be protected by the input statistic of one of its uses")


def _explain_unprotected_matches(chosen: list[Block], named_params: dict[str, nn.Parameter],
                                 trainable: set[int], patterns: _Patterns) -> None:
    covered = {n for b in chosen for n, _ in b.params}
    broad = []
    for name, p in named_params.items():
        if not patterns.wanted(name) or name in covered:
            continue
        if not patterns.named_exactly(name):
            if id(p) in trainable:
                broad.append(name)
            continue
        if id(p) not in trainable:
            why = "is not trained by the base optimizer"
        elif p.dim() == 2:
            why = ("is not the weight or bias of a Linear (or transformers Conv1D), Conv1d/2d, "
                   "MultiheadAttention or Embedding layer; give it a "
                   "FeatureSource if it is a bare matmul weight")
        elif name.endswith("bias"):
            why = "is a bias whose weight is not protected: protect the weight and the bias together"
        else:
            why = f"has shape {tuple(p.shape)}, which no projection rule understands"
        raise ValueError(f"protected parameter {name!r} {why}")
    if broad:
        warnings.warn(f"GNSP: the protect pattern(s) also match {len(broad)} trained parameter(s) that no layer "
                      f"kind protects: {broad}; they follow the uncovered policy (held still after the first "
                      "end_task() with uncovered='freeze')", UserWarning, stacklevel=5)
