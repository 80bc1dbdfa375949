"""The real-data path with an open_clip model (random init): conversion to the reference CLIP, then the whole
benchmark on fabricated MTIL files. Skips cleanly where open_clip does not import (CI runs it in a second
environment with torch 2.14.1 + torchvision 0.29.1 + open_clip_torch, see ``.ci/run``)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

open_clip = pytest.importorskip("open_clip")
torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "mtil_clip.py"

TINY = {"embed_dim": 32, "quick_gelu": True,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture()
def tiny_config(tmp_path):
    path = tmp_path / "gnsp-tiny-oc.json"
    path.write_text(json.dumps(TINY))
    return path


def test_open_clip_model_converts_to_the_reference_clip(tiny_config):
    from gnsp_optim.reference.continual import _feature_sources
    from gnsp_optim.reference.model import open_clip_as_reference

    torch.manual_seed(0)
    model, tok = open_clip_as_reference(str(tiny_config))  # raises if any feature differs from open_clip's
    oc = open_clip.create_model(tiny_config.stem)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in oc.named_parameters()}
    assert model.config.vision_heads == 2 and model.config.quick_gelu
    tokens = tok(["a photo of a cat."])
    assert tokens.shape == (1, 77) and int(tokens.argmax()) == int((tokens > 0).sum()) - 1  # EOT is the largest id
    assert set(_feature_sources(model)) == {"visual.proj", "text_projection"}


def test_benchmark_runs_end_to_end_with_open_clip_on_fabricated_data(tmp_path, tiny_config):
    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    try:
        from fabricate import fabricate_all
    finally:
        sys.path.pop(0)
    data = tmp_path / "data"
    fabricate_all(data)
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--data-root", str(data), "--open-clip-model", str(tiny_config),
           "--tasks", "eurosat,mnist", "--iterations", "2", "--warmup", "1", "--ref-size", "8",
           "--methods", "zeroshot,finetune,gnsp+cd+map,gnsp+cd+map/all", "--seeds", "1,2", "--out", str(out),
           "--no-progress", "--device", "cpu", "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in res["tasks"]] == ["eurosat", "mnist"] and res["config"]["mode"] == "mtil"
    assert res["config"]["open_clip_model"].endswith("gnsp-tiny-oc.json")
    for name in ("finetune", "gnsp+cd+map", "gnsp+cd+map/all"):
        m = res["methods"][name]
        assert [s["seed"] for s in m["seeds"]] == [1, 2] and len(m["modality_gap"]) == 2
        assert m["average_se"] is not None
