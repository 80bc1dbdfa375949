"""Tests for gnsp_optim.reference.model: names, a slow per-head twin of the forward pass, loading, preprocessing."""
from __future__ import annotations

import math
import pickle
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gnsp_optim.reference.model import (
    CLIP,
    CLIP_MEAN,
    CLIP_STD,
    CLIPConfig,
    QuickGELU,
    create_open_clip,
    infer_config,
    load_clip_state_dict,
    make_preprocess,
    preprocess_image,
)

TINY_HEADS = {"vision_heads": 2, "text_heads": 2}  # 64 // 64 = 1 would be inferred


def _tiny_model(**overrides) -> CLIP:
    torch.manual_seed(0)
    return CLIP(CLIPConfig.tiny(**overrides)).double().eval()


_SHARED_MODEL = _tiny_model()


def _inputs(config: CLIPConfig, batch: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=g, dtype=torch.float64)
    tokens = torch.randint(1, config.vocab_size - 1, (batch, config.context_length), generator=g)
    eot_positions = torch.tensor([3, config.context_length - 1, 5])[:batch]
    tokens[torch.arange(batch), eot_positions] = config.vocab_size - 1
    return images, tokens


# --- the slow twin: explicit per-head attention, hand-written LayerNorm, patches cut out one by one ----------


def _layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def _block_reference(block: nn.Module, x: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    length, width = x.shape
    head_dim = width // heads
    q, k, v = (_layer_norm(x, block.ln_1) @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, -1)
    outputs = []
    for h in range(heads):
        cols = slice(h * head_dim, (h + 1) * head_dim)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(head_dim)
        if causal:
            scores = scores.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v[:, cols])
    x = x + torch.cat(outputs, dim=-1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
    hidden = _layer_norm(x, block.ln_2) @ block.mlp.c_fc.weight.T + block.mlp.c_fc.bias
    if isinstance(block.mlp.gelu, QuickGELU):
        hidden = hidden * torch.sigmoid(1.702 * hidden)
    else:
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
    return x + hidden @ block.mlp.c_proj.weight.T + block.mlp.c_proj.bias


def _encode_image_reference(model: CLIP, image: torch.Tensor) -> torch.Tensor:
    c, v = model.config, model.visual
    p, grid = c.patch_size, c.image_size // c.patch_size
    kernel = v.conv1.weight.reshape(c.vision_width, -1)
    patches = [kernel @ image[:, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(-1)
               for i in range(grid) for j in range(grid)]
    x = torch.stack([v.class_embedding, *patches]) + v.positional_embedding
    x = _layer_norm(x, v.ln_pre)
    for block in v.transformer.resblocks:
        x = _block_reference(block, x, c.vision_heads, causal=False)
    return _layer_norm(x[0], v.ln_post) @ v.proj


def _encode_text_reference(model: CLIP, tokens: torch.Tensor) -> torch.Tensor:
    c = model.config
    x = model.token_embedding.weight[tokens] + model.positional_embedding[:len(tokens)]
    for block in model.transformer.resblocks:
        x = _block_reference(block, x, c.text_heads, causal=True)
    eot = max(range(len(tokens)), key=lambda i: int(tokens[i]))
    return _layer_norm(x[eot], model.ln_final) @ model.text_projection


# --- structure ---------------------------------------------------------------------------------------------


def _expected_names(prefix: str) -> list[str]:
    names = []
    for sub in ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                "mlp.c_proj.weight", "mlp.c_proj.bias"):
        names.append(f"{prefix}transformer.resblocks.0.{sub}")
    return names


def test_parameter_names_are_openai_and_open_clip_names():
    model = CLIP(CLIPConfig.tiny(vision_layers=1, text_layers=1))
    expected = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
                "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
                "visual.proj", "token_embedding.weight", "positional_embedding", "ln_final.weight",
                "ln_final.bias", "text_projection", "logit_scale", *_expected_names("visual."), *_expected_names("")}
    assert set(model.state_dict()) == expected
    assert {n for n, _ in model.named_parameters()} == expected


def test_shapes_and_module_types():
    c = CLIPConfig.tiny()
    model = CLIP(c)
    sd = model.state_dict()
    assert sd["visual.proj"].shape == (c.vision_width, c.embed_dim)
    assert sd["text_projection"].shape == (c.text_width, c.embed_dim)
    assert sd["visual.positional_embedding"].shape == ((c.image_size // c.patch_size) ** 2 + 1, c.vision_width)
    assert sd["visual.transformer.resblocks.1.mlp.c_fc.weight"].shape == (4 * c.vision_width, c.vision_width)
    assert model.visual.conv1.bias is None
    block = model.visual.transformer.resblocks[0]
    assert isinstance(block.attn, nn.MultiheadAttention) and block.attn.batch_first
    assert [n for n, _ in block.mlp.named_children()] == ["c_fc", "gelu", "c_proj"]
    assert isinstance(block.mlp.gelu, QuickGELU)
    assert isinstance(CLIP(CLIPConfig.tiny(quick_gelu=False)).transformer.resblocks[0].mlp.gelu, nn.GELU)
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)


def test_vit_b16_config_and_parameter_count():
    c = CLIPConfig.vit_b16()
    assert (c.embed_dim, c.image_size, c.patch_size, c.vision_width, c.vision_layers, c.vision_heads) == (
        512, 224, 16, 768, 12, 12)
    assert (c.context_length, c.vocab_size, c.text_width, c.text_layers, c.text_heads, c.quick_gelu) == (
        77, 49408, 512, 12, 8, True)
    with torch.device("meta"):
        model = CLIP(c)
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # OpenAI ViT-B/16
    assert infer_config(model.state_dict()) == c


# --- forward pass --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_encoders_equal_slow_reference(quick_gelu):
    model = _tiny_model(quick_gelu=quick_gelu)
    images, tokens = _inputs(model.config)
    with torch.no_grad():
        fast_img, fast_txt = model.encode_image(images), model.encode_text(tokens)
        ref_img = torch.stack([_encode_image_reference(model, im) for im in images])
        ref_txt = torch.stack([_encode_text_reference(model, t) for t in tokens])
    assert fast_img.shape == (3, 64) and fast_txt.shape == (3, 64)
    torch.testing.assert_close(fast_img, ref_img, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast_txt, ref_txt, rtol=1e-10, atol=1e-10)


def test_forward_returns_normalised_features_and_scale():
    model = _tiny_model()
    images, tokens = _inputs(model.config)
    img, txt, scale = model(images, tokens)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(img, torch.nn.functional.normalize(model.encode_image(images), dim=-1))
    assert math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-6)
    (img.sum() + txt.sum()).backward()
    assert model.visual.proj.grad is not None and model.text_projection.grad is not None


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 14), st.integers(0, 2**31 - 1))
def test_text_is_causal_and_pooled_at_eot(eot_position, seed):
    model = _SHARED_MODEL
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 998, (1, 16), generator=g)
    tokens[0, eot_position] = 999
    changed = tokens.clone()
    changed[0, eot_position + 1:] = torch.randint(0, 998, (15 - eot_position,), generator=g)
    with torch.no_grad():
        base = model.encode_text(tokens)
        torch.testing.assert_close(model.encode_text(changed), base)  # positions after EOT are invisible
        torch.testing.assert_close(model.encode_text(tokens[:, :eot_position + 1]), base)  # shorter input
        before = tokens.clone()
        before[0, eot_position - 1] = (before[0, eot_position - 1] + 1) % 998 + 1
        assert not torch.allclose(model.encode_text(before), base)


def test_too_long_text_raises():
    model = _tiny_model()
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.ones(1, 17, dtype=torch.long))


# --- loading --------------------------------------------------------------------------------------------------


def _assert_same_outputs(a: CLIP, b: CLIP) -> None:
    images, tokens = _inputs(a.config, seed=7)
    with torch.no_grad():
        for x, y in zip(a.float()(images.float(), tokens), b.eval()(images.float(), tokens)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_load_round_trip_from_file(tmp_path):
    model = _tiny_model().float()
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip_state_dict(path, **TINY_HEADS)
    assert loaded.config == model.config
    _assert_same_outputs(model, loaded)


def test_load_open_clip_style_checkpoint_with_module_prefix(tmp_path):
    model = _tiny_model().float()
    checkpoint = {"epoch": 3, "name": "run", "state_dict": {"module." + k: v for k, v in model.state_dict().items()}}
    path = tmp_path / "epoch_3.pt"
    torch.save(checkpoint, path)
    _assert_same_outputs(model, load_clip_state_dict(path, **TINY_HEADS))
    _assert_same_outputs(model, load_clip_state_dict(checkpoint, **TINY_HEADS))


def test_load_openai_style_fp16_state_dict_with_extra_entries():
    model = _tiny_model().float()
    sd = {k: v.half() for k, v in model.state_dict().items()}
    sd.update(input_resolution=torch.tensor(32), context_length=torch.tensor(16), vocab_size=torch.tensor(1000))
    loaded = load_clip_state_dict(sd, **TINY_HEADS)
    assert loaded.visual.proj.dtype == torch.float32
    torch.testing.assert_close(loaded.visual.proj, model.visual.proj.half().float(), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")
def test_load_torchscript_archive(tmp_path):
    model = _tiny_model().float()
    images, tokens = _inputs(model.config, seed=3)
    traced = torch.jit.trace(model, (images.float(), tokens), check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    traced.save(str(path))
    _assert_same_outputs(model, load_clip_state_dict(path, **TINY_HEADS))


def test_load_infers_default_heads_and_rejects_unknown_tensors():
    sd = CLIP(CLIPConfig.tiny(vision_width=128, text_width=128)).state_dict()
    assert load_clip_state_dict(sd).config.vision_heads == 2
    sd["visual.attn_pool.query"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match="attn_pool"):
        load_clip_state_dict(sd)


def test_create_open_clip_without_open_clip_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # makes `import open_clip` raise ImportError
    with pytest.raises(ImportError, match="pip install open_clip_torch"):
        create_open_clip("ViT-B-16")


# --- preprocessing --------------------------------------------------------------------------------------------


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


def test_preprocess_constant_image_is_normalised_colour():
    from PIL import Image

    out = preprocess_image(Image.new("RGB", (50, 70), (200, 100, 30)), 24)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    torch.testing.assert_close(out, _normalised((200, 100, 30))[:, None, None].expand(3, 24, 24))


def test_preprocess_center_crops_the_long_side():
    from PIL import Image

    image = Image.new("RGB", (64, 32), (255, 0, 0))  # already 32 high: no resize, crop columns 16..47
    image.paste((0, 255, 0), (16, 0, 48, 32))
    out = preprocess_image(image, 32)
    torch.testing.assert_close(out, _normalised((0, 255, 0))[:, None, None].expand(3, 32, 32))
    tall = preprocess_image(image.transpose(Image.Transpose.ROTATE_90), 32)
    torch.testing.assert_close(tall, out)


def test_preprocess_crop_offset_rounds_like_torchvision():
    from PIL import Image

    image = Image.new("L", (35, 32), 0)  # offset round(3 / 2) = 2: column 2 becomes column 0
    image.paste(255, (2, 0, 3, 32))
    out = preprocess_image(image, 32)
    torch.testing.assert_close(out[:, :, 0], _normalised((255, 255, 255))[:, None].expand(3, 32))
    torch.testing.assert_close(out[:, :, 1], _normalised((0, 0, 0))[:, None].expand(3, 32))


def test_preprocess_resizes_shorter_side_bicubic():
    from PIL import Image

    image = Image.linear_gradient("L").resize((100, 50))
    out = preprocess_image(image, 20)
    expected = image.resize((40, 20), Image.Resampling.BICUBIC).crop((10, 0, 30, 20)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(expected, dtype=np.float32).copy()).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(out, (pixels / 255 - mean) / std)


def test_make_preprocess_is_picklable_and_equal():
    from PIL import Image

    transform = pickle.loads(pickle.dumps(make_preprocess(16)))
    image = Image.new("RGB", (20, 30), (1, 2, 3))
    torch.testing.assert_close(transform(image), preprocess_image(image, 16))


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(0, 15), min_size=1, max_size=5), st.integers(0, 2**31 - 1))
def test_trimmed_text_padding_equals_full_length(eot_positions, seed):
    """``encode_text`` drops the padding after the batch's last EOT; ``trim=False`` (the full context) is its
    twin, including rows whose EOT sits at the last position and rows much shorter than the longest."""
    model = _SHARED_MODEL
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(len(eot_positions), 16, dtype=torch.long)
    for row, eot in enumerate(eot_positions):
        tokens[row, :eot] = torch.randint(1, 998, (eot,), generator=g)
        tokens[row, eot] = 999
    calls = []
    hook = model.transformer.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            fast, full = model.encode_text(tokens), model.encode_text(tokens, trim=False)
    finally:
        hook.remove()
    assert calls == [max(eot_positions) + 1, 16]  # the trimmed pass really is shorter
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-10)


def test_trimmed_encode_text_compiles_in_one_graph():
    """Under torch.compile nothing is trimmed (the length would be data-dependent), so ``fullgraph`` holds."""
    model = _SHARED_MODEL
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[0, :3] = torch.tensor([5, 6, 999])
    tokens[1, :5] = torch.tensor([5, 6, 7, 8, 999])
    compiled = torch.compile(model.encode_text, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model.encode_text(tokens), rtol=1e-10, atol=1e-10)
