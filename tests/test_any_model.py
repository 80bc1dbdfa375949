"""A model nobody here wrote works unchanged: Hugging Face's CLIPModel, wrapped in one line."""

import pytest
import torch

from gnsp_optim import NullSpaceOptimizer

transformers = pytest.importorskip("transformers")


def tiny_hf_clip():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=12),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=4),
        projection_dim=16)
    torch.manual_seed(0)
    return transformers.CLIPModel(cfg).double().eval()


@pytest.mark.parametrize("mode,base", [("update", "adamw"), ("grad", "sgd")])
def test_hf_clip_keeps_old_image_and_text_embeddings(mode, base):
    model = tiny_hf_clip()
    params = model.parameters()
    base_opt = (torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1) if base == "adamw"
                else torch.optim.SGD(params, lr=0.05, momentum=0.9))
    opt = NullSpaceOptimizer(base_opt, model, rho=1e-15, mode=mode)  # default selection: one line
    g = torch.Generator().manual_seed(1)
    old_px = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=g)
    old_ids = torch.randint(0, 64, (3, 12), generator=g)
    with opt.collect(), torch.no_grad():
        img0 = model.get_image_features(pixel_values=old_px)
        txt0 = model.get_text_features(input_ids=old_ids)
    opt.end_task()
    img0 = getattr(img0, "pooler_output", img0)
    txt0 = getattr(txt0, "pooler_output", txt0)
    covered = {n for b in opt.blocks for n, _ in b.params}
    assert "vision_model.embeddings.patch_embedding.weight" in covered
    assert "text_model.encoder.layers.0.self_attn.q_proj.bias" in covered
    assert "visual_projection.weight" in covered
    # issue 13: the token embedding is protected (rows of old tokens held), no longer frozen
    assert "logit_scale" in opt.frozen and "text_model.embeddings.token_embedding.weight" not in opt.frozen
    assert "text_model.embeddings.token_embedding.weight" in covered
    losses = []
    for _ in range(8):
        opt.zero_grad()
        px = torch.randn(6, 3, 16, 16, dtype=torch.float64, generator=g)
        ids = torch.randint(0, 64, (6, 12), generator=g)
        out = model(input_ids=ids, pixel_values=px, return_loss=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    with torch.no_grad():
        img1 = model.get_image_features(pixel_values=old_px)
        txt1 = model.get_text_features(input_ids=old_ids)
    img1 = getattr(img1, "pooler_output", img1)
    txt1 = getattr(txt1, "pooler_output", txt1)
    assert (img1 - img0).abs().max() < 1e-8
    assert (txt1 - txt0).abs().max() < 1e-8
    moved = max((p.detach() - q).abs().max().item() for p, q in
                zip(model.parameters(), tiny_hf_clip().parameters(), strict=True))
    assert moved > 1e-4  # it did train
