"""The continual loop: matrix shape and metrics, files, determinism, kill-and-resume equal to one run."""

import json

import pytest
import torch

from gnsp_optim.reference import continual
from gnsp_optim.reference.continual import METHODS, ContinualTask, Method, run_continual, warmup_cosine
from gnsp_optim.reference.model import CLIP, CLIPConfig
from gnsp_optim.reference.pretrain import CaptionedImages, TensorImageDataset
from gnsp_optim.reference.tokenizer import WordTokenizer

WORDS = ["red", "green", "blue", "dark", "light"]


def make_setup():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t, names in enumerate((WORDS[:2], WORDS[2:4], [WORDS[4], WORDS[0]])):
        imgs = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=g)
        labels = torch.arange(24) % 2
        imgs[labels == 1, t % 3] = 255  # a learnable cue
        tasks.append(ContinualTask(f"task{t}", names, ["a {} image.", "a photo of {}."],
                                   TensorImageDataset(imgs[:16], labels[:16]),
                                   TensorImageDataset(imgs[16:], labels[16:]),
                                   lr=1e-3, iterations=4))
    captions = [f"a {w} image." for w in WORDS] * 4
    ref = CaptionedImages(torch.randint(0, 256, (20, 3, 16, 16), dtype=torch.uint8, generator=g), captions)
    tok = WordTokenizer.from_texts(captions + [f"a photo of {w}." for w in WORDS], 12)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size, context_length=12, image_size=16, patch_size=8,
                                 vision_width=32, text_width=32, embed_dim=16))
    return tasks, tok, model, ref


def run(method, tmp_path=None, resume=False, **kw):
    tasks, tok, model, ref = make_setup()
    return run_continual(model, tok, tasks, method, reference=ref, pairs=ref, out_dir=tmp_path, resume=resume,
                         batch_size=8, ref_batch_size=8, stats_batch_size=8, warmup=2, progress=False,
                         log=lambda s: None, **kw)


def test_warmup_cosine():
    assert warmup_cosine(0, 10, 2) == 0.5 and warmup_cosine(1, 10, 2) == 1.0
    assert warmup_cosine(10, 10, 2) == pytest.approx(0.0)


@pytest.mark.parametrize("name", ["zeroshot", "finetune", "gnsp+cd+map", "gnsp+cd+map/update", "l2init"])
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
        run_continual(model, tok, tasks, METHODS["gnsp+cd+map/update"], reference=ref, batch_size=8,
                      ref_batch_size=8, warmup=2, progress=False, log=lambda s: None)
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


def test_cd_needs_a_reference_set():
    tasks, tok, model, _ = make_setup()
    with pytest.raises(ValueError, match="reference"):
        run_continual(model, tok, tasks, Method("x", cd_weight=1.0), progress=False)
