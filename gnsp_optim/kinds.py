r"""Layer kinds: which modules carry protectable weights, how a weight reads as a matrix, what its input is.

Data path, step 1 of 5 (**hook** -> statistics -> end_task -> rule + eigh -> projector -> step): a
:class:`Block` is one protected weight (and optionally its bias) with the statistic of its input; its
:class:`LayerKind` says how the weight reads as a ``(G, rows, d)`` matrix acting on ``d``-dimensional inputs
(:meth:`Block.read` / :meth:`Block.write`) and, in :meth:`LayerKind.observe`, which rows of a forward call
the statistic must see. :mod:`.hooks` calls ``observe`` from one forward hook per module.

=========================  ===========================================  =====================================
kind                       weight as ``(G, rows, d)``                   input rows the statistic sees
=========================  ===========================================  =====================================
:class:`Linear`            ``W`` ``(out, in)``, ``G = 1``; transformers the input, leading dims flattened
                           ``Conv1D``: ``W`` ``(in, out)``                (a NestedTensor: its real positions)
                           (``transposed``)
:class:`Embedding`         ``W`` ``(V, d)`` read as ``one_hot @ W``     the token ids (counts, not a Gram
                           (``transposed``, input dimension ``V``)      matrix: the covariance is diagonal)
:class:`Conv`              ``W.view(out, -1)`` per group, ``G=groups``  the unfolded patches
:class:`AttentionInProj`   packed ``in_proj_weight``, ``G = 3``         query / key / value rows
:class:`AttentionRowProj`  ``q/k/v_proj_weight``, rows of the shared    query, key or value
                           ``in_proj_bias``
:class:`AttentionOutProj`  ``out_proj.weight``                          the heads' concatenated output
                                                                        (recomputed: see attention_heads)
:class:`BareMatmul`        a 2-D parameter, stored ``(d, out)`` for     a :class:`FeatureSource`'s tensor
                           ``x @ W`` (``transposed``)
=========================  ===========================================  =====================================

A new kind is one small class: ``matches(module)``, ``discover(...)`` returning its blocks, and
``observe(block, call)``; list it in :data:`LAYER_KINDS` (before a kind it specialises). Two worked examples
in this file: transformers' ``Conv1D`` (weight stored ``(in, out)``, ``y = x @ W + b``) is :class:`Linear`
with ``transposed=True``, matched by class name so transformers is never imported; :class:`Embedding`
(``one_hot(ids) @ W``, ``d = num_embeddings``) shows a kind whose statistic is not a Gram matrix: it also says
how its projector is built (:meth:`LayerKind.projector`) and what its memory looks like
(:meth:`LayerKind.memory_shape`): token counts and a row mask.

A weight tied between an embedding and an output layer (GPT-2, tied LLaMA / Qwen) gets two blocks, one per
use: the embedding's (rows, ``transposed``) and the head's (inputs); :func:`discover_blocks` keeps one block
per weight *and side*, and :mod:`.selection` accepts exactly that pair. Projecting with both in turn gives
``D dW P``: the two projections act on opposite sides, so they commute and their product keeps both uses
exact (:mod:`gnsp_optim.embedding`).

A bias that several blocks share, each owning a slice of its entries (attention's separate q/k/v weights
share ``in_proj_bias``), is expressed once: :attr:`Block.bias_rows`. Everything else reads
:attr:`Block.shares_bias`.

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> [(b.name, type(b.kind).__name__) for b in discover_blocks(m, feature_sources={})]
    [('0', 'Linear'), ('2', 'Linear')]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .boundary import input_rows, is_hf_conv1d
from .embedding import TokenCountStat
from .projector import Projector, projector_from_counts, projector_from_memory
from .sketch import SketchStat
from .statistics import CovarianceStat
from .subspace import RankRule

__all__ = ["FeatureSource", "Block", "LayerKind", "Linear", "Conv", "MultiheadAttention", "AttentionInProj",
           "AttentionRowProj", "AttentionOutProj", "BareMatmul", "Embedding", "Call", "LAYER_KINDS",
           "discover_blocks", "conv_patches", "attention_heads", "flat_rows", "StatFactory"]


@dataclass(frozen=True)
class StatFactory:
    """``make_stat(name, dim, groups)``: one block's input statistic with the optimizer's dtype and
    normalisation: a :class:`~.statistics.CovarianceStat`, or under ``statistics="sketch"`` a bounded
    :class:`~.sketch.SketchStat` for inputs at least ``sketch_min_width`` wide (the bias column counted)."""

    dtype: torch.dtype = torch.float32
    normalize: str = "mean"
    statistics: str = "exact"
    sketch_rank: int = 256
    sketch_min_width: int = 2048
    chunk_rows: int | None = None

    def __call__(self, name: str, dim: int, groups: int) -> CovarianceStat | SketchStat:
        if self.statistics == "sketch" and dim + 1 >= self.sketch_min_width:
            return SketchStat(name, dim, self.sketch_rank, groups, dtype=self.dtype, normalize=self.normalize)
        return CovarianceStat(name, dim, groups, dtype=self.dtype, normalize=self.normalize,
                              chunk_rows=self.chunk_rows)


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


@dataclass(eq=False)
class Block:
    """One protected weight (+ optional bias), the module whose calls feed its statistic, and its kind.

    ``stat.dim`` is the input width ``d``; :attr:`projector_dim` adds the bias column when the bias is
    protected. ``transposed``: the weight is stored ``(d, rows)`` (the layer computes ``x @ W``).
    ``bias_rows``: only these entries of ``bias`` belong to this block (a bias shared between blocks).
    """

    name: str
    kind: LayerKind
    module: nn.Module
    weight_name: str
    weight: nn.Parameter
    stat: CovarianceStat | TokenCountStat
    groups: int = 1
    transposed: bool = False
    bias_name: str | None = None
    bias: nn.Parameter | None = None
    bias_rows: slice | None = None

    @property
    def params(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of the weight and, when protected, the bias."""
        out = [(self.weight_name, self.weight)]
        if self.bias is not None:
            out.append((self.bias_name, self.bias))
        return out

    @property
    def projector_dim(self) -> int:
        """Input dimension of the projector: ``stat.dim``, plus 1 for the bias column when it is protected."""
        return self.stat.dim + (1 if self.bias is not None else 0)

    @property
    def shares_bias(self) -> bool:
        """Whether the protected bias is a slice of a tensor other blocks hold rows of."""
        return self.bias is not None and self.bias_rows is not None

    def drop_bias(self) -> None:
        """Stop protecting the bias (it is left to the uncovered policy)."""
        self.bias, self.bias_name, self.bias_rows = None, None, None

    def read(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """View tensors shaped like (weight, bias) as ``(G, rows, d)`` and ``(G, rows, 1)`` matrices."""
        if b is not None and self.bias_rows is not None:
            b = b[self.bias_rows]
        if self.transposed:
            w = w.t()
        g = self.groups
        wm = w.reshape(g, w.shape[0] // g, -1)
        bm = None if b is None else b.reshape(g, -1, 1)
        return wm, bm

    def write(self, w: torch.Tensor, b: torch.Tensor | None, wm: torch.Tensor, bm: torch.Tensor | None) -> None:
        """Copy matrices from :meth:`read`'s layout back into tensors shaped like (weight, bias), in place."""
        if self.transposed:
            w.copy_(wm.reshape(w.shape[1], w.shape[0]).t())
        else:
            w.copy_(wm.reshape(w.shape))
        if b is not None and bm is not None:
            tb = b if self.bias_rows is None else b[self.bias_rows]
            tb.copy_(bm.reshape(tb.shape))


@dataclass
class Call:
    """One forward call of an observed module, as its hook sees it; ``memo`` shares work between the
    blocks of one module within the call (attention's bound arguments, its recomputed heads)."""

    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any
    memo: dict = field(default_factory=dict)

    def first_input(self) -> torch.Tensor:
        """The module's input tensor, passed positionally or as ``input=`` / the first keyword."""
        if self.args:
            return self.args[0]
        if "input" in self.kwargs:
            return self.kwargs["input"]
        return next(iter(self.kwargs.values()))


def flat_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` as ``(n, dim)`` rows: every leading position (batch, token, ...) is one input; a NestedTensor
    (``nn.TransformerEncoder``'s fast path with a padding mask) gives its real positions only."""
    return input_rows(x, dim)


def _bias_of(module: nn.Module, prefix: str, attr: str = "bias") -> tuple[str | None, nn.Parameter | None]:
    b = getattr(module, attr, None)
    return (prefix + attr, b) if isinstance(b, nn.Parameter) else (None, None)


class LayerKind:
    """How one kind of layer is protected. Subclasses set :meth:`matches`, :meth:`discover`, :meth:`observe`.

    ``matches(module)``: whether :func:`discover_blocks` asks this kind about ``module``;
    ``discover(name, module, make_stat)``: the blocks of that module;
    ``observe(block, call)``: feed ``block.stat`` with the inputs of one forward call.
    """

    def matches(self, module: nn.Module) -> bool:
        return False

    def discover(self, name: str, module: nn.Module, make_stat: StatFactory) -> list[Block]:
        raise NotImplementedError

    def observe(self, block: Block, call: Call) -> None:
        raise NotImplementedError

    def projector(self, block: Block, memory: torch.Tensor | None, rule: RankRule, *,
                  device: torch.device | None = None, dtype: torch.dtype | None = None) -> Projector:
        """The block's projector from its memory ``(G, d+1, d+1)`` (``eigh`` + the rule); ``None``: fully
        occupied. Only the leading ``block.projector_dim`` rows and columns are used (the bias column only
        when the block protects its bias)."""
        if memory is None:
            return Projector.occupying_all(block.projector_dim, block.groups, device=device, dtype=dtype)
        d = block.projector_dim
        return projector_from_memory(memory[:, :d, :d], rule, block.name, device=device, dtype=dtype)

    def memory_shape(self, block: Block) -> tuple[int, ...]:
        """The shape of the block's memory (checked when a checkpoint is loaded)."""
        return (block.groups, block.stat.dim + 1, block.stat.dim + 1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Linear(LayerKind):
    """``nn.Linear``: ``y = x W^T + b``; every leading position of the input is one row. Also transformers'
    ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W`` stored ``(in, out)``, i.e. a ``transposed`` Linear."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) or is_hf_conv1d(module)

    def discover(self, name: str, module: nn.Module, make_stat: StatFactory) -> list[Block]:
        prefix = f"{name}." if name else ""
        bias_name, bias = _bias_of(module, prefix)
        transposed = not isinstance(module, nn.Linear)
        d = module.weight.shape[0] if transposed else module.in_features
        return [Block(name, self, module, prefix + "weight", module.weight, make_stat(name, d, 1),
                      transposed=transposed, bias_name=bias_name, bias=bias)]

    def observe(self, block: Block, call: Call) -> None:
        block.stat.update(flat_rows(call.first_input(), block.stat.dim))


class Conv(LayerKind):
    """``nn.Conv1d`` / ``nn.Conv2d``: the weight of group ``g`` multiplies that group's unfolded patches."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, (nn.Conv1d, nn.Conv2d))

    def discover(self, name: str, module: nn.Module, make_stat: StatFactory) -> list[Block]:
        prefix = f"{name}." if name else ""
        d = module.in_channels // module.groups
        for k in module.kernel_size:
            d *= k
        bias_name, bias = _bias_of(module, prefix)
        return [Block(name, self, module, prefix + "weight", module.weight, make_stat(name, d, module.groups),
                      groups=module.groups, bias_name=bias_name, bias=bias)]

    def observe(self, block: Block, call: Call) -> None:
        block.stat.update(conv_patches(call.module, call.first_input()))


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patches a ``Conv1d`` / ``Conv2d`` multiplies its weight with: ``(G, n_patches, C/G * prod(k))``.

    Padding (any ``padding_mode``, string paddings included), stride and dilation are applied exactly as the
    convolution applies them; the feature order matches ``weight.view(out, -1)``.
    Twin: :func:`gnsp_optim.naive.conv_patches_loop`.

    Example:
        >>> conv = torch.nn.Conv2d(2, 4, 3, padding=1, groups=2)
        >>> tuple(conv_patches(conv, torch.randn(5, 2, 6, 6)).shape)
        (2, 180, 9)
    """
    spatial = len(module.kernel_size)
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = list(module._reversed_padding_repeated_twice)
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    if spatial == 1:
        x = x.unsqueeze(2)
        kernel, dilation, stride = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # (N, C*k, L)
    groups = module.groups
    n, ck, length = cols.shape
    cols = cols.view(n, groups, ck // groups, length).permute(1, 0, 3, 2)
    return cols.reshape(groups, n * length, ck // groups)


# ---------------------------------------------------------------------------------------- attention
def _qkv(call: Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bound = _bound_call(call)
    return bound.arguments["query"], bound.arguments["key"], bound.arguments["value"]


def _bound_call(call: Call) -> inspect.BoundArguments:
    """The call's arguments bound to ``MultiheadAttention.forward``'s names, positional or keyword (once)."""
    if "bound" not in call.memo:
        call.memo["bound"] = inspect.signature(call.module.forward).bind(*call.args, **call.kwargs)
    return call.memo["bound"]


#: ids of attention modules whose heads are being recomputed: their hooks ignore that inner call
_RECOMPUTING: set[int] = set()


def is_recomputing(module: nn.Module) -> bool:
    """Whether ``module``'s current forward call is :func:`attention_heads`' recomputation (not data)."""
    return id(module) in _RECOMPUTING


def attention_heads(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """What ``out_proj`` multiplies in this call: the heads' concatenated output, ``(..., embed_dim)``.

    ``MultiheadAttention`` never calls ``out_proj``'s forward (it passes its weight to a fused function), so
    the call is replayed with the output projection replaced by the identity (masks, ``batch_first``,
    ``bias_kv`` and all other arguments exactly as given). Twin: :func:`gnsp_optim.naive.attention_heads_loop`.

    Example:
        >>> m = torch.nn.MultiheadAttention(4, 2)
        >>> x = torch.randn(3, 1, 4)
        >>> tuple(attention_heads(m, (x, x, x), {}).shape)
        (3, 1, 4)
    """
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    out_w = module.out_proj.weight
    swap = {"inner.out_proj.weight": torch.eye(module.embed_dim, dtype=out_w.dtype, device=out_w.device)}
    if module.out_proj.bias is not None:
        swap["inner.out_proj.bias"] = torch.zeros_like(module.out_proj.bias)
    bound.arguments["need_weights"] = False
    _RECOMPUTING.add(id(module))
    try:
        with torch.no_grad():
            return torch.func.functional_call(_Replay(module), swap, bound.args, bound.kwargs)[0]
    finally:
        _RECOMPUTING.discard(id(module))


class _Replay(nn.Module):
    """Calls ``inner.forward`` directly, so the replay runs none of ``inner``'s hooks (FSDP2's pre-forward
    unshard / post-forward reshard would run a second time inside the first call's hook)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)


class AttentionInProj(LayerKind):
    """Packed ``in_proj_weight`` (``3E x E``): three row groups, fed by query, key and value."""

    def observe(self, block: Block, call: Call) -> None:
        q, k, v = _qkv(call)
        st = block.stat
        if k is q and v is q:  # self-attention: one Gram matrix serves the three row groups
            st.update(flat_rows(q, st.dim))
            return
        rows = [flat_rows(t, st.dim) for t in (q, k, v)]
        if len({r.shape[0] for r in rows}) == 1:
            st.update(torch.stack(rows))
        else:  # query and key/value of different lengths: one group at a time
            for g, r in enumerate(rows):
                st.update(r, group=g)


@dataclass(frozen=True)
class AttentionRowProj(LayerKind):
    """One of the separate ``q/k/v_proj_weight`` (``kdim`` / ``vdim`` attention), fed by argument ``index``
    (0 query, 1 key, 2 value); its bias is rows ``index * E : (index + 1) * E`` of ``in_proj_bias``."""

    index: int

    def observe(self, block: Block, call: Call) -> None:
        block.stat.update(flat_rows(_qkv(call)[self.index], block.stat.dim))


class AttentionOutProj(LayerKind):
    """``out_proj`` of a ``MultiheadAttention``: fed by the heads' output, recomputed (:func:`attention_heads`)."""

    def observe(self, block: Block, call: Call) -> None:
        if "heads" not in call.memo:
            call.memo["heads"] = attention_heads(call.module, call.args, call.kwargs)
        block.stat.update(flat_rows(call.memo["heads"], block.stat.dim))


class MultiheadAttention(LayerKind):
    """``nn.MultiheadAttention``: discovers its in-projection block(s) and ``out_proj`` (observed as above)."""

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.MultiheadAttention)

    def discover(self, name: str, module: nn.Module, make_stat: StatFactory) -> list[Block]:
        prefix = f"{name}." if name else ""
        e = module.embed_dim
        bias_name, bias = _bias_of(module, prefix, "in_proj_bias")
        if module._qkv_same_embed_dim:
            blocks = [Block(f"{prefix}in_proj", AttentionInProj(), module, prefix + "in_proj_weight",
                            module.in_proj_weight, make_stat(f"{prefix}in_proj", e, 3), groups=3,
                            bias_name=bias_name, bias=bias)]
        else:
            blocks = [Block(f"{prefix}{tag}_proj", AttentionRowProj(i), module, f"{prefix}{tag}_proj_weight",
                            getattr(module, f"{tag}_proj_weight"), make_stat(f"{prefix}{tag}_proj", dim, 1),
                            bias_name=bias_name, bias=bias,
                            bias_rows=None if bias is None else slice(i * e, (i + 1) * e))  # the shared bias
                      for i, (tag, dim) in enumerate((("q", e), ("k", module.kdim), ("v", module.vdim)))]
        out_bias_name, out_bias = _bias_of(module.out_proj, f"{prefix}out_proj.")
        blocks.append(Block(f"{prefix}out_proj", AttentionOutProj(), module, f"{prefix}out_proj.weight",
                            module.out_proj.weight, make_stat(f"{prefix}out_proj", e, 1),
                            bias_name=out_bias_name, bias=out_bias))
        return blocks


# ---------------------------------------------------------------------------------------- bare matmul
@dataclass(frozen=True)
class BareMatmul(LayerKind):
    """A 2-D parameter used as a bare matmul, fed by a :class:`FeatureSource` (never discovered by itself)."""

    source: FeatureSource

    def block(self, pname: str, param: nn.Parameter, module: nn.Module, make_stat: StatFactory) -> Block:
        if param.dim() != 2:
            raise ValueError(f"feature source for {pname!r}: only 2-D parameters can be bare matmul weights, "
                             f"got shape {tuple(param.shape)}")
        x_at_w = self.source.layout == "x@W"
        d = param.shape[0] if x_at_w else param.shape[1]
        return Block(pname, self, module, pname, param, make_stat(pname, d, 1), transposed=x_at_w)

    def observe(self, block: Block, call: Call) -> None:
        t = call.output if self.source.use == "output" else call.first_input()
        if isinstance(t, (tuple, list)):
            t = t[0]
        if self.source.select is not None:
            t = self.source.select(t)
        block.stat.update(flat_rows(t, block.stat.dim))


# ---------------------------------------------------------------------------------------- embedding
class Embedding(LayerKind):
    """``nn.Embedding``: ``out = W[t] = one_hot(t) @ W``, a ``transposed`` matmul over ``V`` one-hot inputs.

    The one-hot covariance is ``diag(counts)``, so the statistic is a :class:`~.embedding.TokenCountStat`
    and the projector a row mask (:func:`~.projector.projector_from_counts`): rows of tokens earlier tasks
    used are held, the others train. ``max_norm`` (rows renormalised inside ``forward``, a write no
    projection controls) and ``sparse`` gradients are not discovered: such an embedding is uncovered.
    """

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Embedding) and module.max_norm is None and not module.sparse

    def discover(self, name: str, module: nn.Module, make_stat: StatFactory) -> list[Block]:
        prefix = f"{name}." if name else ""
        stat = TokenCountStat(module.num_embeddings, module.padding_idx, normalize=make_stat.normalize, name=name)
        return [Block(name, self, module, prefix + "weight", module.weight, stat, transposed=True)]

    def observe(self, block: Block, call: Call) -> None:
        block.stat.update(call.first_input())

    def projector(self, block: Block, memory: torch.Tensor | None, rule: RankRule, *,
                  device: torch.device | None = None, dtype: torch.dtype | None = None) -> Projector:
        if memory is None:  # never saw a token: every row held
            return Projector.diagonal(torch.zeros(1, block.stat.dim, dtype=torch.bool)).to(device, dtype)
        return projector_from_counts(memory.reshape(1, -1), rule, device=device, dtype=dtype)

    def memory_shape(self, block: Block) -> tuple[int, ...]:
        return (block.stat.dim,)


#: the kinds :func:`discover_blocks` asks about every module, in this order (a new kind goes here)
LAYER_KINDS: tuple[LayerKind, ...] = (Linear(), Conv(), MultiheadAttention(), Embedding())


def discover_blocks(model: nn.Module, feature_sources: dict[str, FeatureSource], *,
                    dtype: torch.dtype = torch.float32, normalize: str = "mean",
                    kinds: tuple[LayerKind, ...] = LAYER_KINDS,
                    stat_factory: StatFactory | None = None) -> list[Block]:
    """Every block the model offers: each module's blocks by its kind, plus the feature sources.

    A weight gets one block per side (input side, or ``transposed``): the first discovered (a module before
    its children, so attention's own ``out_proj`` block wins over the plain ``Linear`` it is stored as, whose
    forward never runs); a weight tied between an embedding (rows) and a head (inputs) gets both. A feature
    source replaces any block of its parameter. Statistics are created here, hooks are not (:mod:`.hooks`):
    by ``stat_factory`` when given (e.g. bounded sketches for wide inputs), else a
    :class:`~.statistics.CovarianceStat` of ``dtype`` and ``normalize``.

    Example:
        >>> [b.name for b in discover_blocks(torch.nn.Conv2d(3, 8, 3), {})]
        ['']
    """
    make_stat = stat_factory if stat_factory is not None else StatFactory(dtype, normalize)
    blocks: list[Block] = []
    seen: set[tuple[int, bool]] = set()
    for mname, mod in model.named_modules():
        kind = next((k for k in kinds if k.matches(mod)), None)
        if kind is None:
            continue
        for b in kind.discover(mname, mod, make_stat):
            if (id(b.weight), b.transposed) not in seen:
                seen.add((id(b.weight), b.transposed))
                blocks.append(b)
    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    for pname, src in feature_sources.items():
        if pname not in params:
            raise ValueError(f"feature_sources names {pname!r}, which is not a parameter of the model")
        if src.module not in modules:
            raise ValueError(f"feature source for {pname!r}: the model has no module named {src.module!r}")
        blocks = [b for b in blocks if b.weight_name != pname]
        blocks.append(BareMatmul(src).block(pname, params[pname], modules[src.module], make_stat))
    return blocks
