"""The MTIL loop under FSDP2 (``RunConfig(fsdp=True)``): two gloo CPU processes, sharded against unsharded.

One spawn of two ranks (module fixture; spawning costs seconds). On each rank a tiny CLIP goes through two
tasks (3 iterations each) twice per method: once unsharded in the process group (the data-parallel path:
each rank its share of every batch, gradients all-reduced) and once with ``fsdp=True`` (``fully_shard`` per
residual block and the root; FSDP2 reduce-scatters the gradients). The two see the same data, so their
accuracy matrices, alignment metrics and final weights agree to float32 round-off. Then a sharded run is
killed during the second task's evaluation and resumed from the checkpoint written after the first task
(a full state dict, written by rank 0): the same final numbers as the uninterrupted sharded run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from gnsp_optim.reference import continual
from gnsp_optim.reference.continual import METHODS, ContinualTask, RunConfig, check_fsdp_method, run_continual
from gnsp_optim.reference.model import CLIP, CLIPConfig
from gnsp_optim.reference.pretrain import CaptionedImages, TensorImageDataset
from gnsp_optim.reference.tokenizer import WordTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from helpers import gloo_rank, spawn_ranks  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2
WORDS = ["red", "green", "blue", "dark"]
#: the presets run sharded here: plain fine-tuning, the paper's grad-projection preset (Frobenius rule,
#: visual.proj renormalised, CD + MAP), ours (update mode), and every layer protected (both towers, the
#: token embedding's row mask included)
NAMES = ("finetune", "gnsp+cd+map", "gnsp+cd+map/update", "gnsp+cd+map/all")
RESUMED = "gnsp+cd+map/update"


def make_setup():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for t, names in enumerate((WORDS[:2], WORDS[2:])):
        imgs = torch.randint(0, 256, (24, 3, 16, 16), dtype=torch.uint8, generator=g)
        labels = torch.arange(24) % 2
        imgs[labels == 1, t] = 255  # a learnable cue
        tasks.append(ContinualTask(f"task{t}", names, ["a {} image.", "a photo of {}."],
                                   TensorImageDataset(imgs[:16], labels[:16]),
                                   TensorImageDataset(imgs[16:], labels[16:]), lr=1e-3, iterations=2))
    captions = [f"a {w} image." for w in WORDS] * 3
    ref = CaptionedImages(torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g), captions)
    tok = WordTokenizer.from_texts(captions + [f"a photo of {w}." for w in WORDS], 8)
    torch.manual_seed(0)
    model = CLIP(CLIPConfig.tiny(vocab_size=tok.vocab_size, context_length=8, image_size=16, patch_size=8,
                                 vision_width=16, vision_layers=1, vision_heads=2, text_width=16, text_layers=1,
                                 text_heads=2, embed_dim=8))
    return tasks, tok, model, ref


def run(name: str, fsdp: bool, out_dir: str | None = None, resume: bool = False):
    tasks, tok, model, ref = make_setup()
    config = RunConfig(seed=3, batch_size=4, ref_batch_size=4, warmup=1, eval_batch_size=8, progress=False,
                       out_dir=out_dir, resume=resume, fsdp=fsdp)
    result = run_continual(model, tok, tasks, METHODS[name], config, references=ref, pairs=ref,
                           log=lambda s: None)
    kinds = {type(p).__name__ if not hasattr(p, "full_tensor") else "DTensor" for p in model.parameters()}
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in model.named_parameters()}  # full_tensor: a collective, every rank calls it
    return result, weights, kinds


def _worker(rank: int, tmp: str) -> None:
    with gloo_rank(rank, tmp, WORLD):
        out: dict = {}
        w_full = None
        for name in NAMES:
            plain, w_plain, _ = run(name, fsdp=False)
            sharded, w_sharded, kinds = run(name, fsdp=True, out_dir=f"{tmp}/{name.replace('/', '_')}")
            out[name] = {"plain": plain, "sharded": sharded, "kinds": kinds,
                         "weights": max(float((w_plain[k] - w_sharded[k]).abs().max()) for k in w_plain),
                         "moved": max(float((w_plain[k] - v).abs().max())
                                      for k, v in make_setup()[2].named_parameters())}
            w_full = w_sharded if name == RESUMED else w_full
        # kill during the second task's evaluation (after its training): only task 1's checkpoint exists
        folder = f"{tmp}/killed"
        orig, calls = continual.evaluate, {"n": 0}

        def dies_on_second(*a, **k):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")
            return orig(*a, **k)

        continual.evaluate = dies_on_second
        try:
            run(RESUMED, fsdp=True, out_dir=folder)
        except KeyboardInterrupt:
            pass
        finally:
            continual.evaluate = orig
        dist.barrier()
        saved = torch.load(f"{folder}/checkpoint.pt", weights_only=False)
        resumed, w_resumed, _ = run(RESUMED, fsdp=True, out_dir=folder, resume=True)
        out["resume"] = {"next_task": saved["next_task"], "keys": sorted(saved["model"]),
                         "unsharded_keys": sorted(make_setup()[2].state_dict()), "result": resumed,
                         "weights": max(float((w_full[k] - w_resumed[k]).abs().max()) for k in w_full)}
        torch.save(out, f"{tmp}/rank{rank}.pt")
        dist.barrier()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("mtil_fsdp"), WORLD)


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))


@pytest.mark.parametrize("name", NAMES)
def test_sharded_run_equals_the_unsharded_run(results, name):
    for r in results:
        out = r[name]
        assert out["kinds"] == {"DTensor", "Parameter"}  # sharded, logit_scale left out of sharding
        assert out["moved"] > 1e-3  # training did something
        assert out["weights"] < 1e-5, out["weights"]  # float32 round-off (measured: see the report)
        plain, sharded = out["plain"], out["sharded"]
        assert len(sharded["matrix"]) == 2
        assert _max_diff(plain["matrix"], sharded["matrix"]) == 0.0
        for a, b in zip(plain["alignment"], sharded["alignment"], strict=True):
            assert set(a) == set(b) and all(abs(a[k] - b[k]) < 1e-4 for k in a), (a, b)
    assert results[0][name]["sharded"]["matrix"] == results[1][name]["sharded"]["matrix"]


def test_killed_sharded_run_resumes_to_the_same_results(results):
    for r in results:
        res = r["resume"]
        assert res["next_task"] == 1  # the checkpoint after the first task
        assert res["keys"] == res["unsharded_keys"]  # a full state dict: loads into an unsharded model
        assert res["result"]["matrix"] == r[RESUMED]["sharded"]["matrix"]
        assert res["weights"] < 1e-6, res["weights"]


def test_fsdp_refuses_what_it_cannot_run_correctly():
    model = make_setup()[2]
    for name in ("finetune", "gnsp", "gnsp+cd+map", "gnsp+cd+map/update", "gnsp+cd+map/all", "zeroshot"):
        check_fsdp_method(model, METHODS[name])
    with pytest.raises(NotImplementedError, match="l2init.*L2"):
        check_fsdp_method(model, METHODS["l2init"])
    with pytest.raises(NotImplementedError, match="finetune\\+cd/we.*weight ensemble"):
        check_fsdp_method(model, METHODS["finetune+cd/we"])


def test_fsdp_without_a_process_group_says_how_to_launch():
    tasks, tok, model, ref = make_setup()
    with pytest.raises(RuntimeError, match="torchrun"):
        run_continual(model, tok, tasks, METHODS["finetune"], RunConfig(progress=False, fsdp=True),
                      log=lambda s: None)
