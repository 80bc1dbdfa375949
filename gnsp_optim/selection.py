r"""Which parameters are protected, what input each one sees, and how its tensor reads as a matrix.

A :class:`Block` is one weight (and optionally its bias) together with the statistic of its input. The
weight reads as a ``(G, rows, d)`` matrix acting on ``d``-dimensional inputs (``G`` groups: grouped conv
channels, or the query/key/value rows of attention). Supported out of the box:

- ``nn.Linear``: the input of the layer (all leading dimensions flattened: every token counts);
- ``nn.Conv1d`` / ``nn.Conv2d``: the unfolded patches (any stride, padding, dilation, groups, padding mode);
- ``nn.MultiheadAttention``: ``in_proj_weight`` (or ``q/k/v_proj_weight``) row blocks see query, key and
  value; ``out_proj`` (never called through its ``forward``) sees the heads' concatenated output, recomputed
  during collection with the output projection replaced by the identity;
- any 2-D parameter used as a bare matmul, through an explicit :class:`FeatureSource`.

Selection is by parameter-name glob patterns (``fnmatch``); e.g. GNSP's 25 CLIP tensors::

    protect=GNSP_CLIP_VISUAL  # visual.transformer.resblocks.*.mlp.c_fc.weight, ...c_proj.weight, visual.proj

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> [b.name for b in discover_blocks(m, feature_sources={})]
    ['0', '2']
"""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .statistics import CovarianceStat, conv_patches

__all__ = ["FeatureSource", "Block", "discover_blocks", "select_blocks", "GNSP_CLIP_VISUAL", "clean_name",
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


@dataclass(frozen=True)
class FeatureSource:
    r"""Where the input of a bare-matmul parameter comes from.

    ``module``: the name of the sub-module whose output (``use="output"``) or first positional input
    (``use="input"``) feeds the matmul; ``select``: an optional function applied to that tensor (e.g. take
    the CLS token); ``layout``: ``"x@W"`` for ``x @ W`` (``W`` is ``d x out``, the case of CLIP's
    ``visual.proj``) or ``"x@W.T"`` for ``x @ W.T`` (``W`` is ``out x d``, like ``nn.Linear``).

    Example (open_clip / OpenAI CLIP's image projection)::

        FeatureSource("visual.ln_post", select=lambda t: t[:, 0] if t.dim() == 3 else t)
    """

    module: str
    select: Callable[[torch.Tensor], torch.Tensor] | None = None
    use: str = "output"
    layout: str = "x@W"

    def __post_init__(self) -> None:
        if self.use not in ("output", "input"):
            raise ValueError(f"FeatureSource.use must be 'output' or 'input', got {self.use!r}")
        if self.layout not in ("x@W", "x@W.T"):
            raise ValueError(f"FeatureSource.layout must be 'x@W' or 'x@W.T', got {self.layout!r}")


@dataclass
class Block:
    """One protected weight (+ optional bias) and the statistic of its input."""

    name: str
    weight_name: str
    weight: nn.Parameter
    stat: CovarianceStat
    groups: int = 1
    bias_name: str | None = None
    bias: nn.Parameter | None = None
    bias_rows: slice | None = None  # which entries of a shared bias belong to this block (q/k/v of attention)
    transpose: bool = False  # weight is stored (d, out): the layer computes x @ W
    hooks: list = field(default_factory=list)

    @property
    def params(self) -> list[tuple[str, nn.Parameter]]:
        out = [(self.weight_name, self.weight)]
        if self.bias is not None:
            out.append((self.bias_name, self.bias))
        return out

    @property
    def dim(self) -> int:
        """Input dimension of the projector (the bias column included when the bias is protected)."""
        return self.stat.dim + (1 if self.bias is not None else 0)

    def read(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """View tensors shaped like (weight, bias) as ``(G, rows, d)`` and ``(G, rows, 1)`` matrices."""
        if b is not None and self.bias_rows is not None:
            b = b[self.bias_rows]
        if self.transpose:
            w = w.t()
        g = self.groups
        wm = w.reshape(g, w.shape[0] // g, -1)
        bm = None if b is None else b.reshape(g, -1, 1)
        return wm, bm

    def write(self, w: torch.Tensor, b: torch.Tensor | None, wm: torch.Tensor, bm: torch.Tensor | None) -> None:
        """Copy matrices from :meth:`read`'s layout back into tensors shaped like (weight, bias), in place."""
        if self.transpose:
            w.copy_(wm.reshape(w.shape[1], w.shape[0]).t())
        else:
            w.copy_(wm.reshape(w.shape))
        if b is not None and bm is not None:
            tb = b if self.bias_rows is None else b[self.bias_rows]
            tb.copy_(bm.reshape(tb.shape))


def _flat_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.reshape(-1, dim)


def discover_blocks(model: nn.Module, feature_sources: dict[str, FeatureSource], *,
                    dtype: torch.dtype = torch.float32, normalize: str = "mean") -> list[Block]:
    """Every block the model offers: its Linear, Conv1d/2d and MultiheadAttention layers plus feature sources.

    Statistics are created here but no hook is installed (see :func:`install_hooks`).

    Example:
        >>> [b.name for b in discover_blocks(torch.nn.Conv2d(3, 8, 3), {})]
        ['']
    """
    params = dict(model.named_parameters())
    blocks: list[Block] = []

    def stat(name: str, dim: int, groups: int = 1) -> CovarianceStat:
        return CovarianceStat(name, dim, groups, dtype=dtype, normalize=normalize)

    for mname, mod in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(mod, nn.Linear):
            blocks.append(Block(mname, prefix + "weight", mod.weight, stat(mname, mod.in_features),
                                bias_name=prefix + "bias" if mod.bias is not None else None, bias=mod.bias))
            blocks[-1].module = mod  # type: ignore[attr-defined]
            blocks[-1].kind = "linear"  # type: ignore[attr-defined]
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            d = mod.in_channels // mod.groups
            for k in mod.kernel_size:
                d *= k
            blocks.append(Block(mname, prefix + "weight", mod.weight, stat(mname, d, mod.groups),
                                groups=mod.groups, bias_name=prefix + "bias" if mod.bias is not None else None,
                                bias=mod.bias))
            blocks[-1].module = mod  # type: ignore[attr-defined]
            blocks[-1].kind = "conv"  # type: ignore[attr-defined]
        elif isinstance(mod, nn.MultiheadAttention):
            e = mod.embed_dim
            bias = mod.in_proj_bias
            bname = prefix + "in_proj_bias" if bias is not None else None
            if mod._qkv_same_embed_dim:
                blocks.append(Block(f"{prefix}in_proj", prefix + "in_proj_weight", mod.in_proj_weight,
                                    stat(f"{prefix}in_proj", e, 3), groups=3, bias_name=bname, bias=bias))
                blocks[-1].module, blocks[-1].kind = mod, "mha_in"  # type: ignore[attr-defined]
            else:
                for i, (tag, dim) in enumerate((("q", e), ("k", mod.kdim), ("v", mod.vdim))):
                    w = getattr(mod, f"{tag}_proj_weight")
                    blocks.append(Block(f"{prefix}{tag}_proj", f"{prefix}{tag}_proj_weight", w,
                                        stat(f"{prefix}{tag}_proj", dim), bias_name=bname, bias=bias,
                                        bias_rows=slice(i * e, (i + 1) * e)))
                    blocks[-1].module, blocks[-1].kind = mod, f"mha_{tag}"  # type: ignore[attr-defined]
            out = mod.out_proj
            blocks.append(Block(f"{prefix}out_proj", f"{prefix}out_proj.weight", out.weight,
                                stat(f"{prefix}out_proj", e),
                                bias_name=f"{prefix}out_proj.bias" if out.bias is not None else None,
                                bias=out.bias))
            blocks[-1].module, blocks[-1].kind = mod, "mha_out"  # type: ignore[attr-defined]
    # NonDynamicallyQuantizableLinear (MHA's out_proj) is an nn.Linear whose forward never runs: drop the
    # Linear block discovered for it, the MHA's own "mha_out" block replaces it.
    mha_out = {b.weight_name for b in blocks if getattr(b, "kind", "") == "mha_out"}
    blocks = [b for b in blocks if not (b.kind == "linear" and b.weight_name in mha_out)]  # type: ignore

    modules = dict(model.named_modules())
    for pname, src in feature_sources.items():
        if pname not in params:
            raise ValueError(f"feature_sources names {pname!r}, which is not a parameter of the model")
        if src.module not in modules:
            raise ValueError(f"feature source for {pname!r}: the model has no module named {src.module!r}")
        p = params[pname]
        if p.dim() != 2:
            raise ValueError(f"feature source for {pname!r}: only 2-D parameters can be bare matmul weights, "
                             f"got shape {tuple(p.shape)}")
        d = p.shape[0] if src.layout == "x@W" else p.shape[1]
        blocks = [b for b in blocks if b.weight_name != pname]
        blocks.append(Block(pname, pname, p, stat(pname, d), transpose=src.layout == "x@W"))
        blocks[-1].module, blocks[-1].kind, blocks[-1].source = (  # type: ignore[attr-defined]
            modules[src.module], "feature", src)
    return blocks


def parameter_owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> names of the modules that hold it directly`` (more than one: a tied parameter).

    Example:
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


def select_blocks(blocks: list[Block], named_params: dict[str, nn.Parameter], trainable: set[int],
                  protect: list[str] | tuple[str, ...] | None,
                  owners: dict[int, list[str]] | None = None) -> list[Block]:
    """Keep the blocks whose weight is trained and matches ``protect`` (None: all).

    A bias stays in its block only when it is trained too and (with patterns) matches a pattern itself.
    Raises ``ValueError`` for a pattern that matches nothing, for a matched parameter that no block
    understands, and for a parameter claimed by two blocks (e.g. a weight tied between two layers).
    """
    chosen: list[Block] = []
    claimed: dict[int, str] = {}
    patterns = None if protect is None else list(protect)
    if patterns is not None:
        if len(set(patterns)) != len(patterns):
            dup = sorted({p for p in patterns if patterns.count(p) > 1})
            raise ValueError(f"protect lists the same pattern twice: {dup}")
        for pat in patterns:
            if not any(fnmatch.fnmatchcase(n, pat) for n in named_params):
                raise ValueError(f"protect pattern {pat!r} matches no parameter of the model")

    def wanted(name: str | None) -> bool:
        return name is not None and (patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns))

    for b in blocks:
        if id(b.weight) not in trainable or not wanted(b.weight_name):
            continue
        if not (b.bias is not None and id(b.bias) in trainable and wanted(b.bias_name)):
            b.bias, b.bias_name = None, None
        chosen.append(b)
    # attention's separate q/k/v weights share in_proj_bias: keep it only when all three row blocks are chosen
    # (otherwise the rows of the unchosen block would count as covered without any protection)
    shared: dict[int, list[Block]] = {}
    for b in chosen:
        if b.bias_rows is not None and b.bias is not None:
            shared.setdefault(id(b.bias), []).append(b)
    for group in shared.values():
        if len(group) != 3:
            for b in group:
                b.bias, b.bias_name, b.bias_rows = None, None, None
    for b in chosen:
        for pname, p in [(b.weight_name, b.weight)] + ([(b.bias_name, b.bias)] if b.bias_rows is None and b.bias
                                                        is not None else []):
            if id(p) in claimed and claimed[id(p)] != b.name:
                raise ValueError(f"parameter {pname!r} is used by two protected layers ({claimed[id(p)]!r} and "
                                 f"{b.name!r}); tied weights cannot be protected by one input statistic")
            claimed[id(p)] = b.name
            if owners is not None and len(owners.get(id(p), ())) > 1:
                raise ValueError(f"parameter {pname!r} is shared by several modules ({owners[id(p)]}); a tied "
                                 f"weight cannot be protected by the input statistic of one of its uses")
    if patterns is not None:
        covered = {n for b in chosen for n, _ in b.params}
        for name, p in named_params.items():
            if wanted(name) and name not in covered:
                why = "is not trained by the base optimizer" if id(p) not in trainable else (
                    "is not the weight or bias of a Linear, Conv1d/2d or MultiheadAttention layer; give it a "
                    "FeatureSource if it is a bare matmul weight" if p.dim() == 2 else
                    f"has shape {tuple(p.shape)}, which no projection rule understands")
                if id(p) in trainable and p.dim() != 2 and name.endswith("bias"):
                    why = "is a bias whose weight is not protected: protect the weight and the bias together"
                raise ValueError(f"protected parameter {name!r} {why}")
    return chosen


def _mha_call(mod: nn.MultiheadAttention, args: tuple, kwargs: dict) -> inspect.BoundArguments:
    """The call's arguments bound to ``MultiheadAttention.forward``'s names, positional or keyword."""
    return inspect.signature(mod.forward).bind(*args, **kwargs)


def install_hooks(blocks: list[Block], gate: Callable[[], bool]) -> list:
    """Register one forward hook per observed module; each returns at once unless ``gate()`` is true.

    Returns the hook handles (call ``.remove()`` on each to uninstall).
    """
    by_module: dict[int, list[Block]] = {}
    for b in blocks:
        by_module.setdefault(id(b.module), []).append(b)  # type: ignore[attr-defined]
    handles = []
    for group in by_module.values():
        mod = group[0].module  # type: ignore[attr-defined]
        kinds = {b.kind: b for b in group}  # type: ignore[attr-defined]
        if isinstance(mod, nn.MultiheadAttention) and any(k.startswith("mha_") for k in kinds):
            handles.append(mod.register_forward_hook(_mha_hook(mod, kinds, gate), with_kwargs=True))
        for b in group:
            if not b.kind.startswith("mha_"):  # type: ignore[attr-defined]
                handles.append(mod.register_forward_hook(_plain_hook(b, gate), with_kwargs=True))
    return handles


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The module's input tensor, passed positionally or as ``input=`` / the first keyword."""
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    return next(iter(kwargs.values()))


def _plain_hook(block: Block, gate: Callable[[], bool]):
    kind = block.kind  # type: ignore[attr-defined]
    stat = block.stat

    def hook(mod, args, kwargs, output):
        if not gate() or getattr(mod, "_gnsp_recomputing", False):  # skip MHA's own out_proj recomputation
            return
        if kind == "linear":
            stat.update(_flat_rows(_first_input(args, kwargs), stat.dim))
        elif kind == "conv":
            stat.update(conv_patches(mod, _first_input(args, kwargs)))
        else:  # feature source
            src: FeatureSource = block.source  # type: ignore[attr-defined]
            t = output if src.use == "output" else _first_input(args, kwargs)
            if isinstance(t, (tuple, list)):
                t = t[0]
            if src.select is not None:
                t = src.select(t)
            stat.update(_flat_rows(t, stat.dim))

    return hook


def _mha_hook(mod: nn.MultiheadAttention, kinds: dict[str, Block], gate: Callable[[], bool]):
    busy = [False]  # re-entrancy guard: the out_proj recomputation calls the module again

    def hook(module, args, kwargs, output):
        if busy[0] or not gate():
            return
        call = _mha_call(module, args, kwargs)
        q, k, v = call.arguments["query"], call.arguments["key"], call.arguments["value"]
        if "mha_in" in kinds:
            st = kinds["mha_in"].stat
            if k is q and v is q:  # self-attention: one Gram matrix serves the three row blocks
                st.update(_flat_rows(q, st.dim))
            else:
                rows = [_flat_rows(t, st.dim) for t in (q, k, v)]
                if len({r.shape[0] for r in rows}) == 1:
                    st.update(torch.stack(rows))
                else:  # different sequence lengths for query and key/value: one group at a time
                    for g, r in enumerate(rows):
                        st.update(r, group=g)
        for tag, t in (("q", q), ("k", k), ("v", v)):
            if f"mha_{tag}" in kinds:
                st = kinds[f"mha_{tag}"].stat
                st.update(_flat_rows(t, st.dim))
        if "mha_out" in kinds:
            st = kinds["mha_out"].stat
            e = module.embed_dim
            out_w = module.out_proj.weight
            swap = {"out_proj.weight": torch.eye(e, dtype=out_w.dtype, device=out_w.device)}
            if module.out_proj.bias is not None:
                swap["out_proj.bias"] = torch.zeros_like(module.out_proj.bias)
            call.arguments["need_weights"] = False
            busy[0] = module._gnsp_recomputing = True
            try:
                with torch.no_grad():
                    heads = torch.func.functional_call(module, swap, call.args, call.kwargs)[0]
            finally:
                busy[0] = module._gnsp_recomputing = False
            st.update(_flat_rows(heads, e))

    return hook

