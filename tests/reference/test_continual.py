"""The continual loop: matrix shape and metrics, files, determinism, kill-and-resume equal to one run."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gnsp_optim.reference import continual
from gnsp_optim.reference.continual import (
    METHODS,
    ContinualTask,
    Method,
    RunConfig,
    run_continual,
    warmup_cosine,
    with_overrides,
)
from gnsp_optim.reference.model import CLIP, CLIPConfig
from gnsp_optim.reference.pretrain import CaptionedImages, TensorImageDataset
from gnsp_optim.reference.tokenizer import WordTokenizer

WORDS = ["red", "green", "blue", "dark", "light"]


def make_setup(n_train: int = 16):
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t, names in enumerate((WORDS[:2], WORDS[2:4], [WORDS[4], WORDS[0]])):
        imgs = torch.randint(0, 256, (n_train + 8, 3, 16, 16), dtype=torch.uint8, generator=g)
        labels = torch.arange(n_train + 8) % 2
        imgs[labels == 1, t % 3] = 255  # a learnable cue
        tasks.append(ContinualTask(f"task{t}", names, ["a {} image.", "a photo of {}."],
                                   TensorImageDataset(imgs[:n_train], labels[:n_train]),
                                   TensorImageDataset(imgs[n_train:], labels[n_train:]),
                                   lr=1e-3, iterations=4))
    captions = [f"a {w} image." for w in WORDS] * 4
    ref = CaptionedImages(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g), captions)
    tok = WordTokenizer.from_texts(captions + [f"a photo of {w}." for w in WORDS], 12)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size, context_length=12, image_size=16, patch_size=8,
                                 vision_width=32, text_width=32, embed_dim=16))
    return tasks, tok, model, ref


CONFIG = RunConfig(batch_size=8, ref_batch_size=8, warmup=2, progress=False)


def run(method, tmp_path=None, resume=False, seed=42):
    tasks, tok, model, ref = make_setup()
    config = RunConfig(seed=seed, batch_size=8, ref_batch_size=8, warmup=2, progress=False, out_dir=tmp_path,
                       resume=resume)
    return run_continual(model, tok, tasks, method, config, references=ref, pairs=ref, log=lambda s: None)


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 2) == 0.5 and warmup_cosine(1, 10, 2) == 1.0
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["zeroshot", "finetune", "gnsp+cd+map", "gnsp+cd+map/update", "l2init",
                                  "gnsp+cd+map/all", "finetune/visual", "gnsp/noproj"])
def test_every_method_runs_and_reports(name, tmp_path):
    r = run(METHODS[name], str(tmp_path))
    assert len(r["matrix"]) == 3 and all(len(row) == 3 for row in r["matrix"])
    m = torch.tensor(r["matrix"])
    assert r["average"] == pytest.approx(m.mean().item())
    assert r["last"] == pytest.approx(m[-1].mean().item())
    assert r["transfer"] == pytest.approx(((m[0, 1] + (m[0, 2] + m[1, 2]) / 2) / 2).item())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["matrix"] == r["matrix"]
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == [0, 1, 2]
    assert len(r["alignment"]) == 4 and "modality_gap" in r["alignment"][0]
    if name == "zeroshot":
        assert r["matrix"][0] == r["matrix"][1] == r["matrix"][2]


def test_gnsp_trains_only_the_preset_after_task_one():
    tasks, tok, model, ref = make_setup()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = {}
    orig = continual._train_task

    def spy(model, tokenizer, task, i, *a, **k):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = orig(model, tokenizer, task, i, *a, **k)
        seen[i] = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        return out

    continual._train_task = spy
    try:
        run_continual(model, tok, tasks, METHODS["gnsp+cd+map/update"], CONFIG, references=ref,
                      log=lambda s: None)
    finally:
        continual._train_task = orig
    assert "logit_scale" not in seen[0] and "transformer.resblocks.0.mlp.c_fc.weight" in seen[0]
    for i in (1, 2):
        assert seen[i] and all(n.startswith("visual.transformer.resblocks.") and ".mlp.c_" in n or n == "visual.proj"
                               for n in seen[i]), seen[i]
    assert start  # the model started from its initial weights


def test_same_seed_same_matrix():
    a = run(METHODS["gnsp+cd+map"])
    b = run(METHODS["gnsp+cd+map"])
    assert a["matrix"] == b["matrix"]


def test_killed_run_resumes_to_the_same_results(tmp_path, monkeypatch):
    full = run(METHODS["gnsp+cd+map/update"], str(tmp_path / "full"))
    calls = {"n": 0}
    orig = continual.evaluate

    def crash_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second task's evaluation dies: only the first task is checkpointed
            raise KeyboardInterrupt("simulated kill")
        return orig(*a, **k)

    monkeypatch.setattr(continual, "evaluate", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        run(METHODS["gnsp+cd+map/update"], str(tmp_path / "killed"))
    assert not (tmp_path / "killed" / "results.json").exists()
    monkeypatch.setattr(continual, "evaluate", orig)
    resumed = run(METHODS["gnsp+cd+map/update"], str(tmp_path / "killed"), resume=True)
    assert resumed["matrix"] == full["matrix"]
    for a, b in zip(resumed["alignment"], full["alignment"]):
        assert a == pytest.approx(b)


def test_resume_refuses_another_method(tmp_path):
    run(METHODS["finetune"], str(tmp_path))
    with pytest.raises(ValueError, match="another method"):
        run(METHODS["gnsp"], str(tmp_path), resume=True)
    with pytest.raises(ValueError, match="another method, seed"):
        run(METHODS["finetune"], str(tmp_path), resume=True, seed=7)


def test_cd_needs_a_reference_set():
    tasks, tok, model, _ = make_setup()
    with pytest.raises(ValueError, match="reference"):
        run_continual(model, tok, tasks, Method("x", cd_weight=1.0), CONFIG)


def test_references_can_differ_per_task():
    """A sequence (or function) of reference sets: task i trains with its own; other sets give other numbers."""
    tasks, tok, model, ref = make_setup()
    g = torch.Generator().manual_seed(5)
    other = CaptionedImages(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g), ref.captions)
    seen = []

    def pick(i):
        seen.append(i)
        return ref if i == 0 else other

    a = run_continual(model, tok, tasks, METHODS["finetune+cd"], CONFIG, references=pick, log=lambda s: None)
    assert seen == [0, 1, 2]
    _, _, model2, _ = make_setup()
    b = run_continual(model2, tok, tasks, METHODS["finetune+cd"], CONFIG, references=[ref, ref, ref],
                      log=lambda s: None)
    assert a["matrix"][0] == b["matrix"][0]
    assert not torch.equal(model.visual.proj, model2.visual.proj)  # tasks 2-3 trained on other references


def test_paper_preset_renormalises_the_visual_proj_history(monkeypatch):
    """The public code's rule: before task t's statistics are added, visual.proj's memory is scaled to unit
    Frobenius norm (the MLPs' memory is not): after three tasks its norm is at most 2, the MLPs' reach 3."""
    tasks, tok, model, ref = make_setup()
    captured = {}
    orig = continual._gather_statistics

    def spy(*a, **k):
        opt = orig(*a, **k)
        captured[opt.tasks_seen] = {rec["weight"]: rec["memory"].clone()
                                    for rec in opt.state_dict()["gnsp"]["blocks"].values()}
        return opt

    monkeypatch.setattr(continual, "_gather_statistics", spy)
    tasks = tasks + [tasks[0]]  # statistics after tasks 1, 2, 3
    run_continual(model, tok, tasks, METHODS["gnsp"], CONFIG, log=lambda s: None)

    def fro(m):
        d = m.shape[-1] - 1
        return float(torch.linalg.matrix_norm(m[:, :d, :d]).max())

    mlp = "visual.transformer.resblocks.0.mlp.c_fc.weight"
    assert fro(captured[1]["visual.proj"]) == pytest.approx(1.0, rel=1e-5)
    assert fro(captured[3][mlp]) > 2.2 and fro(captured[3]["visual.proj"]) <= 2.0 + 1e-5
    assert fro(captured[3]["visual.proj"]) < fro(captured[3][mlp]) - 0.2
    # accumulate (our presets' rule): visual.proj grows like the MLPs
    captured.clear()
    _, _, model, _ = make_setup()
    run_continual(model, tok, tasks, with_overrides(METHODS["gnsp"], visual_proj_history="accumulate"), CONFIG,
                  log=lambda s: None)
    assert fro(captured[3]["visual.proj"]) > 2.2


def test_every_layer_preset_keeps_old_outputs_of_both_towers():
    """gnsp+cd+map/all at rho=0 (exact null spaces, update mode): after later tasks, task 1's image features and
    class-prompt features are unchanged although attention, MLPs, biases and both projections trained on."""
    tasks, tok, model, ref = make_setup(n_train=4)  # 4 images x 5 tokens: a real null space at width 32
    method = with_overrides(METHODS["gnsp+cd+map/all"], rho=0.0)
    snapshots = []
    orig = continual._gather_statistics

    def spy(model, tokenizer, task, *a, **k):
        with torch.no_grad():
            x = task.train.batch(torch.arange(len(task.train)))[0]
            prompts = tokenizer([t.format(c) for t in task.templates for c in task.classnames])
            snapshots.append((x, prompts, model.encode_image(x).clone(), model.encode_text(prompts).clone(),
                              {n: p.detach().clone() for n, p in model.named_parameters()}))
        return orig(model, tokenizer, task, *a, **k)

    continual._gather_statistics = spy
    try:
        run_continual(model, tok, tasks, method, CONFIG, references=ref, log=lambda s: None)
    finally:
        continual._gather_statistics = orig
    x, prompts, img0, txt0, params0 = snapshots[0]
    with torch.no_grad():
        drift = [float((model.encode_image(x) - img0).abs().max()),
                 float((model.encode_text(prompts) - txt0).abs().max())]
    # the same tasks without protection move those outputs by orders of magnitude more
    _, _, plain, _ = make_setup(n_train=4)
    run_continual(plain, tok, tasks, with_overrides(method, projection=False), CONFIG, references=ref,
                  log=lambda s: None)
    with torch.no_grad():
        plain_drift = [float((plain.encode_image(x) - img0).abs().max()),
                       float((plain.encode_text(prompts) - txt0).abs().max())]
    assert max(drift) < 1e-3 and min(plain_drift) > 50 * max(drift), (drift, plain_drift)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, params0[n])}
    assert any(".attn." in n for n in moved) and "text_projection" in moved and "visual.proj" in moved
    assert any(n.startswith("transformer.") for n in moved)  # the text tower trained, protected
    assert not any("ln_" in n for n in moved), moved  # LayerNorms are not protectable: frozen
    assert "token_embedding.weight" in moved, moved  # an nn.Embedding trains protected (old tokens' rows fixed)


def test_evaluate_cache_reuses_only_while_the_text_tower_is_unchanged():
    tasks, tok, model, _ = make_setup()
    cache: dict = {}
    fresh = continual.evaluate(model, tok, tasks, "cpu")
    assert continual.evaluate(model, tok, tasks, "cpu", cache=cache) == fresh
    assert len(cache) == len(tasks)
    # a visual-only change keeps the cached class embeddings (and gives the uncached numbers)
    with torch.no_grad():
        model.visual.proj.mul_(-1.0)
    assert continual.evaluate(model, tok, tasks, "cpu", cache=cache) == continual.evaluate(model, tok, tasks, "cpu")
    # an in-place change of a text-tower parameter (what an optimizer step does) invalidates them
    keys_before = {k: v[0] for k, v in cache.items()}
    with torch.no_grad():
        model.text_projection.copy_(torch.randn_like(model.text_projection))
    changed = continual.evaluate(model, tok, tasks, "cpu", cache=cache)
    assert changed == continual.evaluate(model, tok, tasks, "cpu")
    assert all(cache[k][0] != keys_before[k] for k in cache)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_weight_ensemble_is_the_mean_of_the_start_and_the_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(3, 2, generator=g, dtype=torch.float64))
    samples = [p.detach().clone()]
    we = continual.WeightEnsemble([p])
    for _ in range(n):
        with torch.no_grad():
            p.copy_(torch.randn(3, 2, generator=g, dtype=torch.float64))
        samples.append(p.detach().clone())
        we.add()
    we.load()
    torch.testing.assert_close(p.detach(), torch.stack(samples).mean(0), rtol=0, atol=1e-12)


def test_weight_ensemble_preset_trains_and_differs_from_plain_cd():
    we, cd = run(METHODS["finetune+cd/we"]), run(METHODS["finetune+cd"])
    assert len(we["matrix"]) == 3 and we["config"]["weight_ensemble_every"] == 5
    # 4 iterations per task, every=5: the final weights still join the mean (start + final) / 2, so the
    # preset trains (its alignment moves from the start) and ends elsewhere than plain CD
    assert we["alignment"][-1] != we["alignment"][0]
    assert we["alignment"][-1] != cd["alignment"][-1]
