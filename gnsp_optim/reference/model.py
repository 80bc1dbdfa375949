r"""A compact CLIP (ViT image tower + causal text transformer) with OpenAI / open_clip parameter names.

Parameter names match OpenAI CLIP and open_clip exactly (``visual.transformer.resblocks.0.mlp.c_fc.weight``,
``visual.proj``, ``text_projection``, ...), so their checkpoints load with :func:`load_clip_state_dict` and
the GNSP parameter selection (method.md sec. 1) addresses the same tensors in either implementation.

Example:
    >>> model = CLIP(CLIPConfig.tiny())
    >>> img, txt, scale = model(torch.randn(2, 3, 32, 32), torch.randint(1, 999, (2, 16)))
    >>> img.shape, txt.shape
    (torch.Size([2, 64]), torch.Size([2, 64]))
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data.images import CLIP_MEAN, CLIP_STD, CLIPImageTransform  # the one copy of CLIP's transform

__all__ = ["CLIP", "CLIPConfig", "CLIP_MEAN", "CLIP_STD", "create_open_clip", "infer_config", "load_clip_state_dict",
           "make_preprocess", "open_clip_as_reference", "preprocess_image"]


@dataclass
class CLIPConfig:
    """Shape of a CLIP model.

    Example:
        >>> CLIPConfig.vit_b16().vision_width
        768
        >>> CLIPConfig.tiny(vision_layers=1).vision_layers
        1
    """

    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    context_length: int
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    quick_gelu: bool = True

    @classmethod
    def vit_b16(cls) -> CLIPConfig:
        """OpenAI CLIP ViT-B/16 (QuickGELU). Example: ``CLIP(CLIPConfig.vit_b16())``."""
        return cls(512, 224, 16, 768, 12, 12, 77, 49408, 512, 12, 8)

    @classmethod
    def tiny(cls, **overrides: Any) -> CLIPConfig:
        """A few-thousand-parameter CLIP for tests and demos. Example: ``CLIPConfig.tiny(embed_dim=32)``."""
        base = cls(embed_dim=64, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                   context_length=16, vocab_size=1000, text_width=64, text_layers=2, text_heads=2)
        return replace(base, **overrides)


def _tracing() -> bool:
    """True under ``torch.jit.trace``, ``torch.compile`` or ``torch.export`` (no data-dependent shapes there)."""
    if torch.jit.is_tracing():
        return True
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is None:  # torch < 2.3
        try:
            from torch._dynamo import is_compiling
        except ImportError:
            return False
    return bool(is_compiling())


class QuickGELU(nn.Module):
    """OpenAI CLIP's GELU approximation ``x * sigmoid(1.702 x)``. Example: ``QuickGELU()(torch.ones(2))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (batch-first).

    Example:
        >>> ResidualAttentionBlock(64, 2)(torch.randn(2, 5, 64)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, width: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(4 * width, width)),
        ]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of :class:`ResidualAttentionBlock` under ``resblocks``.

    Example:
        >>> Transformer(64, 2, 2)(torch.randn(1, 3, 64)).shape
        torch.Size([1, 3, 64])
    """

    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = True) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    """CLIP's ViT: patchify (no bias), CLS + positions, ``ln_pre``, blocks, ``ln_post`` on CLS, ``@ proj``.

    Example:
        >>> VisionTransformer(32, 8, 64, 1, 2, 16)(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 16])
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, embed_dim: int,
                 quick_gelu: bool = True) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        scale = width ** -0.5
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


def _init_blocks(transformer: Transformer, width: int, layers: int) -> None:
    # OpenAI CLIP's scheme: residual-branch outputs shrink with depth.
    attn_std, proj_std, fc_std = width ** -0.5, (width ** -0.5) * (2 * layers) ** -0.5, (2 * width) ** -0.5
    for block in transformer.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class CLIP(nn.Module):
    r"""CLIP with OpenAI / open_clip parameter names.

    ``encode_image`` / ``encode_text`` return unnormalised ``(B, embed_dim)`` features; ``forward`` returns
    ``(normalised image features, normalised text features, logit_scale.exp())``. Text features are taken at
    the position of the largest token id (the EOT token, as in OpenAI CLIP); tokens may be shorter than
    ``context_length``.

    Example:
        >>> model = CLIP(CLIPConfig.tiny())
        >>> model.encode_text(torch.tensor([[1, 5, 999, 0]])).shape
        torch.Size([1, 64])
    """

    def __init__(self, config: CLIPConfig) -> None:
        super().__init__()
        c = self.config = config
        self.visual = VisionTransformer(c.image_size, c.patch_size, c.vision_width, c.vision_layers,
                                        c.vision_heads, c.embed_dim, c.quick_gelu)
        self.transformer = Transformer(c.text_width, c.text_layers, c.text_heads, c.quick_gelu)
        self.token_embedding = nn.Embedding(c.vocab_size, c.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length, c.text_width))
        self.ln_final = nn.LayerNorm(c.text_width)
        self.text_projection = nn.Parameter(torch.empty(c.text_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mask = torch.full((c.context_length, c.context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self._init_parameters()

    def _init_parameters(self) -> None:
        c = self.config
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=c.text_width ** -0.5)
        _init_blocks(self.transformer, c.text_width, c.text_layers)
        _init_blocks(self.visual.transformer, c.vision_width, c.vision_layers)

    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (fp32 unless converted)."""
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` normalised pixels -> unnormalised ``(B, embed_dim)``."""
        return self.visual(images)

    def encode_text(self, tokens: torch.Tensor, trim: bool = True) -> torch.Tensor:
        """``(B, L)`` token ids (``L <= context_length``) -> unnormalised ``(B, embed_dim)``.

        The features are read at each row's EOT token (its largest id) and attention is causal, so the padding
        after the last EOT of the batch cannot change them: ``trim=True`` (default) drops it before the
        transformer (the same numbers up to round-off, for a fraction of the cost on short captions). Forward
        hooks then see only the kept positions, so statistics collected through ``encode_text`` leave out
        padding that cannot affect the features; ``trim=False`` records the full context. Under
        ``torch.compile`` / ``torch.export`` / tracing nothing is trimmed (the length would depend on data).

        Example:
            >>> m = CLIP(CLIPConfig.tiny(vocab_size=10, context_length=8)).eval()
            >>> t = torch.tensor([[8, 3, 9, 0, 0, 0, 0, 0]])
            >>> torch.allclose(m.encode_text(t), m.encode_text(t, trim=False), atol=1e-6)
            True
        """
        length = tokens.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"{length} tokens > context_length {self.config.context_length}")
        if trim and length > 1 and tokens.numel() and not _tracing():
            length = int(tokens.argmax(dim=-1).max()) + 1
            tokens = tokens[:, :length]
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        mask = self.attn_mask[:length, :length].to(x.dtype)
        x = self.ln_final(self.transformer(x, mask))
        eot = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = F.normalize(self.encode_image(images), dim=-1)
        text_features = F.normalize(self.encode_text(tokens), dim=-1)
        return image_features, text_features, self.logit_scale.exp()


# Entries found in some checkpoints that are not parameters of this module (OpenAI's TorchScript archive
# keeps hyper-parameters as tensors; old open_clip versions persisted the causal mask).
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")


def _count_blocks(state_dict: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {k[len(prefix):].split(".")[0] for k in state_dict if k.startswith(prefix)}
    return len(indices)


def infer_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> CLIPConfig:
    """Read a :class:`CLIPConfig` off tensor shapes; heads default to ``width // 64`` (as in OpenAI CLIP).

    Example:
        >>> infer_config(CLIP(CLIPConfig.tiny()).state_dict(), vision_heads=2, text_heads=2) == CLIPConfig.tiny()
        True
    """
    sd = state_dict
    vision_width, _, patch_size, _ = sd["visual.conv1.weight"].shape
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    fields: dict[str, Any] = {
        "embed_dim": sd["text_projection"].shape[1],
        "image_size": patch_size * grid,
        "patch_size": patch_size,
        "vision_width": vision_width,
        "vision_layers": _count_blocks(sd, "visual.transformer.resblocks."),
        "vision_heads": max(1, vision_width // 64),
        "context_length": sd["positional_embedding"].shape[0],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "text_width": text_width,
        "text_layers": _count_blocks(sd, "transformer.resblocks."),
        "text_heads": max(1, text_width // 64),
    }
    return CLIPConfig(**{**fields, **overrides})


def _read_checkpoint(path: str | Path) -> dict[str, Any]:
    try:  # OpenAI's released .pt files are TorchScript archives
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but still the format
            return torch.jit.load(str(path), map_location="cpu").state_dict()
    except RuntimeError:
        return torch.load(str(path), map_location="cpu", weights_only=True)


def load_clip_state_dict(path_or_state_dict: str | Path | dict[str, Any], **config_overrides: Any) -> CLIP:
    """Build a float32 :class:`CLIP` from an OpenAI (TorchScript or plain) or open_clip checkpoint.

    Accepts a path or an already loaded dict; unwraps a ``"state_dict"`` entry and ``module.`` prefixes; infers
    the config from shapes (:func:`infer_config`). Head counts cannot be read off shapes: they default to
    ``width // 64`` (right for every OpenAI model); pass ``vision_heads=`` / ``text_heads=`` /
    ``quick_gelu=`` to override. Loading is strict: unknown tensors (e.g. open_clip's ``attn_pool``) raise.

    Example:
        >>> sd = CLIP(CLIPConfig.tiny()).state_dict()
        >>> load_clip_state_dict({"state_dict": sd}, vision_heads=2, text_heads=2).config.vision_width
        64
    """
    sd = path_or_state_dict
    if isinstance(sd, (str, Path)):
        sd = _read_checkpoint(sd)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if k not in _IGNORED_KEYS and isinstance(v, torch.Tensor)}
    model = CLIP(infer_config(sd, **config_overrides))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model


def create_open_clip(name: str, pretrained: str | None = None) -> tuple[nn.Module, Callable, Callable]:
    """Optional backend: ``(model, tokenizer, eval preprocess)`` from open_clip (imported lazily).

    ``pretrained`` may be a local checkpoint path; an open_clip tag would download (not done in tests).

    Example:
        >>> model, tokenizer, preprocess = create_open_clip("ViT-B-16", "/ckpt/ViT-B-16.pt")  # doctest: +SKIP
    """
    try:
        import open_clip
    except ImportError as err:
        raise ImportError("create_open_clip needs open_clip: pip install open_clip_torch "
                          "(or pip install gnsp_optim[openclip])") from err
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return model, open_clip.get_tokenizer(name), preprocess


def preprocess_image(image: Any, image_size: int) -> torch.Tensor:
    """CLIP's eval transform without torchvision: ``(3, S, S)`` float tensor (:class:`CLIPImageTransform`).

    Example:
        >>> from PIL import Image
        >>> preprocess_image(Image.new("RGB", (64, 48)), 32).shape
        torch.Size([3, 32, 32])
    """
    return CLIPImageTransform(image_size)(image)


def make_preprocess(image_size: int) -> Callable[[Any], torch.Tensor]:
    """``image -> preprocess_image(image, image_size)`` as a picklable callable (a :class:`CLIPImageTransform`).

    Example:
        >>> transform = make_preprocess(224)  # use as a dataset transform
    """
    return CLIPImageTransform(image_size)


class _OpenCLIPTokenizer:
    """An open_clip tokenizer as a ``texts -> (N, L) LongTensor`` callable with ``vocab_size``."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def __call__(self, texts: Any) -> torch.Tensor:
        return self.tokenizer(list(texts) if not isinstance(texts, str) else [texts])


def open_clip_as_reference(name: str, pretrained: str | None = None) -> tuple[CLIP, Callable]:
    """An open_clip model (random init, or local weights ``pretrained``) converted into this package's
    :class:`CLIP` (same parameter names, strict load), with open_clip's own tokenizer.

    open_clip's ``CLIP`` stores exactly the tensors of OpenAI's layout; this loads them into the reference model
    (so the loop, the presets and the feature sources are the ones tested here) and checks on a random batch
    that both compute the same features.

    ``name`` may also be the path of an open_clip model-config JSON file (registered under its file stem), e.g.
    a tiny architecture for tests.

    Example:
        >>> model, tok = open_clip_as_reference("ViT-B-16")  # doctest: +SKIP
    """
    if str(name).endswith(".json"):
        import open_clip

        open_clip.add_model_config(str(name))
        name = Path(name).stem
    oc_model, oc_tok, _ = create_open_clip(name, pretrained)
    cfg = getattr(oc_model, "visual", None)
    heads = getattr(getattr(cfg, "transformer", None), "resblocks", [None])[0]
    v_heads = heads.attn.num_heads if heads is not None else None
    t_heads = oc_model.transformer.resblocks[0].attn.num_heads
    quick = isinstance(oc_model.transformer.resblocks[0].mlp.gelu, nn.Module) and \
        type(oc_model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    model = load_clip_state_dict(oc_model.state_dict(), vision_heads=v_heads, text_heads=t_heads, quick_gelu=quick)
    model.eval()
    oc_model.eval()
    size = model.config.image_size
    with torch.no_grad():
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        tokens = oc_tok(["a photo of a cat.", "a diagram"])
        ours = (model.encode_image(x), model.encode_text(tokens))
        theirs = (oc_model.encode_image(x), oc_model.encode_text(tokens))
    for a, b, what in ((ours[0], theirs[0], "image"), (ours[1], theirs[1], "text")):
        if not torch.allclose(a, b, atol=1e-4, rtol=1e-4):
            raise ValueError(f"open_clip {name}: {what} features differ from the reference model's by "
                             f"{float((a - b).abs().max()):.2e}")
    return model, _OpenCLIPTokenizer(oc_tok, model.config.vocab_size)
