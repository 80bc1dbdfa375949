"""Issue 14 in the MTIL loop: the sketch and early-stop presets, and what the statistics pass records."""

import json
import warnings
from dataclasses import replace

import pytest
import torch
from test_continual import make_setup

from gnsp_optim.reference import continual
from gnsp_optim.reference.continual import METHODS, Method, RunConfig, run_continual, with_overrides

UPDATE, SKETCH, EARLY = (METHODS[k] for k in ("gnsp+cd+map/update", "gnsp+cd+map/update/sketch",
                                              "gnsp+cd+map/update/early"))
CONFIG = RunConfig(batch_size=8, ref_batch_size=8, warmup=2, progress=False)
C_PROJ = [f"visual.transformer.resblocks.{i}.mlp.c_proj" for i in range(2)]


def run(method, n_train=16, out_dir=None, tasks=3):
    """Two iterations per task (``tasks`` of them): the statistics passes are what is looked at."""
    all_tasks, tok, model, ref = make_setup(n_train)
    tasks = [replace(t, iterations=2) for t in all_tasks[:tasks]]
    config = CONFIG if out_dir is None else RunConfig(batch_size=8, ref_batch_size=8, warmup=2, progress=False,
                                                      out_dir=str(out_dir))
    return run_continual(model, tok, tasks, method, config, references=ref, log=lambda s: None)


def test_presets_differ_from_update_only_in_the_statistics_options():
    def options(m):
        return {k: v for k, v in vars(m).items() if k != "name"}

    assert options(with_overrides(SKETCH, statistics="exact", sketch_rank=256, sketch_min_width=2048)) == \
        options(UPDATE)
    assert options(with_overrides(EARLY, stop_when_converged=False)) == options(UPDATE)
    assert (SKETCH.statistics, SKETCH.sketch_rank, SKETCH.sketch_min_width) == ("sketch", 64, 128)
    for name, m in METHODS.items():  # the paper's presets stay one full exact pass
        if not name.endswith(("/sketch", "/early")):
            assert m.statistics == "exact" and not m.stop_when_converged, name


def test_presets_build_the_optimizer_with_their_options():
    _, _, model, _ = make_setup()
    opt = continual._make_optimizer(model, SKETCH, 1.0)
    assert (opt.statistics, opt.sketch_rank, opt.sketch_min_width) == ("sketch", 64, 128)
    kinds = {b.name: type(b.stat).__name__ for b in opt.blocks}
    # widths 33 (c_fc + bias), 129 (c_proj + bias), 32 (visual.proj): only c_proj reaches sketch_min_width
    assert {n for n, k in kinds.items() if k == "SketchStat"} == set(C_PROJ)
    _, _, model, _ = make_setup()
    opt = continual._make_optimizer(model, UPDATE, 1.0)
    assert opt.statistics == "exact" and {type(b.stat).__name__ for b in opt.blocks} == {"CovarianceStat"}


def test_sketch_run_records_smaller_statistics_memory():
    exact, sketch = run(UPDATE, tasks=2)["statistics"], run(SKETCH, tasks=2)["statistics"]
    assert sketch["passes"][0]["sketched"] == {n: [64, 129] for n in C_PROJ}
    assert exact["passes"][0]["sketched"] == {}
    # two 129 x 129 float32 Gram matrices become <= 64 x 129 sketches; the other blocks are the same
    saved = exact["memory_bytes"] - sketch["memory_bytes"]
    assert saved >= 2 * 4 * 129 * (129 - 64)
    assert exact["memory_bytes"] == sum(b * b * 4 for b in (33, 129) for _ in range(2)) + 33 * 33 * 4


def test_early_stop_uses_fewer_samples_than_the_full_pass(tmp_path):
    # the preset's monitor (every 10 batches, patience 2) cannot stop within 4 batches: a full pass
    preset = run(EARLY, n_train=64, tasks=2)["statistics"]
    assert [(p["samples"], p["samples_full"], p["stopped_early"]) for p in preset["passes"]] == [(64, 64, False)]
    loose = with_overrides(EARLY, convergence_every=1, convergence_tol=1.0, convergence_patience=2)
    stats = run(loose, n_train=64, out_dir=tmp_path)["statistics"]
    # checks after batches 1, 2, 3: the first has nothing to compare, two quiet ones stop it after 48 rows
    assert [p["samples"] for p in stats["passes"]] == [48, 48] and all(p["stopped_early"] for p in stats["passes"])
    assert stats["samples"] == 96 < stats["samples_full"] == 128
    assert stats["passes"][0]["convergence"]["batches"] == 3
    logged = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [r["statistics"]["samples"] for r in logged if "statistics" in r] == [48, 48]
    assert "statistics" not in logged[-1]  # no pass after the last task


def test_early_stop_still_feeds_the_text_prompts_of_a_text_training_preset():
    method = with_overrides(METHODS["gnsp+cd+map/all"], stop_when_converged=True, convergence_every=1,
                            convergence_tol=1.0, convergence_patience=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a text layer that saw no input would be warned about
        warnings.filterwarnings("ignore", message="GNSP: .* not covered")
        warnings.filterwarnings("ignore", message=".*frozen from now on")
        stats = run(method, n_train=64, tasks=2)["statistics"]
    assert all(p["stopped_early"] and p["samples"] < 64 for p in stats["passes"])
    assert all(p["text_samples"] == 4 for p in stats["passes"])  # 2 templates x 2 classes


def test_drift_probe_changes_no_number_and_reports_every_finished_task():
    a, b = run(UPDATE), run(with_overrides(UPDATE, drift_sample=0))
    assert a["matrix"] == b["matrix"] and a["alignment"] == b["alignment"]
    assert set(a["statistics"]["final_drift"]) == {"task0", "task1"} and b["statistics"]["final_drift"] == {}
    assert all(0 < v < float("inf") for v in a["statistics"]["final_drift"].values())
    assert set(a["statistics"]["passes"][1]["drift"]) == {"task0"}
    assert run(METHODS["zeroshot"])["statistics"] is None


def test_drift_is_the_relative_change_of_the_image_features(monkeypatch):
    """The final drift of task 1 equals ||f_end - f_1|| / ||f_1|| over its first test images, computed here."""
    tasks, tok, model, ref = make_setup()
    tasks = [replace(t, iterations=2) for t in tasks[:2]]
    snap = {}
    orig = continual._gather_statistics

    def spy(model, tokenizer, task, *a, **k):
        if task.name == "task0":
            x = task.test.batch(torch.arange(len(task.test)))[0]
            with torch.no_grad():
                snap["x"], snap["f"] = x, model.encode_image(x).clone()
        return orig(model, tokenizer, task, *a, **k)

    monkeypatch.setattr(continual, "_gather_statistics", spy)
    res = run_continual(model, tok, tasks, UPDATE, CONFIG, references=ref, log=lambda s: None)
    with torch.no_grad():
        f = model.eval().encode_image(snap["x"])
    want = float(torch.linalg.norm((f - snap["f"]).double()) / torch.linalg.norm(snap["f"].double()))
    assert res["statistics"]["final_drift"]["task0"] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("kw, match", [({"statistics": "dense"}, "statistics must be one of"),
                                       ({"statistics": "sketch", "visual_proj_history": "renormalise"},
                                        "renormalise"),
                                       ({"convergence_criterion": "angle"}, "convergence_criterion"),
                                       ({"drift_sample": -1}, "drift_sample")])
def test_bad_statistics_options_name_the_method(kw, match):
    with pytest.raises(ValueError, match=match):
        Method("m", projection=True, **kw)
