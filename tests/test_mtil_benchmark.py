"""``benchmarks/mtil_clip.py``: the offline pipeline end to end (--quick), its output contract, pre-training,
--check-data's exit codes, the real-data path, kill-and-resume, torchrun, and the aggregation arithmetic."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mtil_clip.py"

pytest.importorskip("sklearn")


def _se(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def test_quick_offline_run_writes_every_output_in_the_contract(tmp_path):
    out = tmp_path / "run"
    methods = "zeroshot,finetune,gnsp+cd+map,gnsp+cd+map/update"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out),
                           "--methods", methods], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"tasks", "methods", "config", "seconds"}
    assert set(res["methods"]) == set(methods.split(","))
    t = len(res["tasks"])
    assert t == 7 and all(set(x) == {"name", "n_test", "chance"} for x in res["tasks"])
    from gnsp_optim.reference.experiment import QUICK

    assert res["tasks"][1] == {"name": "digits", "n_test": QUICK["n_test"], "chance": 10.0}
    for name, m in res["methods"].items():
        seeds = m["seeds"]
        assert [s["seed"] for s in seeds] == [1, 2]
        for s in seeds:
            assert set(s) >= {"seed", "matrix", "transfer", "average", "last"}
            assert len(s["matrix"]) == t and all(len(r) == t for r in s["matrix"])
            assert s["average"] == pytest.approx(sum(map(sum, s["matrix"])) / t / t)
        for k in ("transfer", "average", "last"):
            vals = [s[k] for s in seeds]
            assert m[k] == pytest.approx(sum(vals) / len(vals))
            assert m[f"{k}_se"] == pytest.approx(_se(vals), abs=1e-9)
        assert len(m["modality_gap"]) == t and len(m["retrieval_r1"]) == t
        assert m["modality_gap_before"] is not None and all(0 <= v <= 2 for v in m["modality_gap"])
        assert all(0 <= v <= 100 for v in m["retrieval_r1"])
        safe = name.replace("/", "_")
        assert (out / safe / "matrix.csv").exists() and (out / safe / "heatmap.png").exists()
        assert (out / safe / "seed1" / "log.jsonl").exists()
        if name != "finetune":
            d = m["vs_finetune"]
            ft = {s["seed"]: s["last"] for s in res["methods"]["finetune"]["seeds"]}
            diffs = [s["last"] - ft[s["seed"]] for s in seeds]
            assert d["last"] == pytest.approx(sum(diffs) / 2) and d["last_se"] == pytest.approx(_se(diffs), abs=1e-9)
        if name != "gnsp+cd+map":
            assert "vs_gnsp+cd+map" in m
    zs = res["methods"]["zeroshot"]["seeds"]
    assert zs[0]["matrix"] == zs[1]["matrix"]  # evaluated once, stands for every seed
    assert (out / "summary.png").exists()
    assert "+-" in done.stdout and "paired difference to finetune" in done.stdout
    assert res["config"]["checkpoint_sha256"] and res["config"]["seeds"] == [1, 2]
    # a rerun with --resume finds every job finished and writes the same numbers
    again = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out),
                            "--methods", "finetune", "--resume"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after task 7 of 7" in again.stdout
    assert json.loads((out / "results.json").read_text())["methods"]["finetune"]["seeds"] == \
        res["methods"]["finetune"]["seeds"]


def test_pretrain_command_writes_a_verified_checkpoint_that_runs(tmp_path):
    ckpt = tmp_path / "tiny.pt"
    done = subprocess.run([sys.executable, str(SCRIPT), "--pretrain", "--quick", "--no-progress", "--checkpoint",
                           str(ckpt)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    record = json.loads(ckpt.with_suffix(".json").read_text())
    assert record["sha256"] and record["command"].startswith("python benchmarks/mtil_clip.py --pretrain")
    assert record["recipe"]["phase1_steps"] == 10 and len(record["report"]["tasks"]) == 7
    assert "zero-shot mean" in done.stdout
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--checkpoint", str(ckpt),
                          "--methods", "finetune", "--seeds", "1", "--workers", "1", "--out", str(tmp_path / "r")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert res["config"]["checkpoint_sha256"] == record["sha256"]
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF  # corrupt one byte: the run refuses the file
    ckpt.write_bytes(bytes(data))
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--checkpoint", str(ckpt),
                          "--methods", "finetune", "--seeds", "1", "--workers", "1", "--out", str(tmp_path / "b")],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert bad.returncode != 0 and "differs from the recorded" in bad.stderr


def test_shipped_checkpoint_matches_its_record():
    from gnsp_optim.reference.tinyclip import CHECKPOINT_PATH, file_sha256, load_tiny_clip

    record = json.loads(CHECKPOINT_PATH.with_suffix(".json").read_text())
    assert file_sha256(CHECKPOINT_PATH) == record["sha256"]
    assert CHECKPOINT_PATH.stat().st_size < 5_000_000
    model, tok, _ = load_tiny_clip()
    assert model.config.vision_width == record["recipe"]["vision_width"] and tok.vocab_size == model.config.vocab_size
    assert 1.0 < float(model.logit_scale.exp()) <= 100.0 + 1e-3


def test_check_data_reports_missing_datasets(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--check-data"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert "aircraft" in done.stdout.lower() and "imagenet" in done.stdout.lower()
    assert "missing" in done.stdout.lower()


def _fabricated(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    try:
        from fabricate import fabricate_all
    finally:
        sys.path.pop(0)
    fabricate_all(tmp_path)


def test_check_data_exits_zero_when_every_dataset_is_present(tmp_path):
    _fabricated(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--check-data"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout
    assert "12/12 present" in done.stdout and done.stdout.count("[ok]") == 12


def test_real_mtil_path_runs_on_fabricated_data(tmp_path):
    """--data-root + --clip + --bpe: real loaders, checkpoint loading, BPE tokenizer, the loop, the outputs."""
    import gzip

    import torch

    from gnsp_optim.reference.model import CLIP, CLIPConfig

    data = tmp_path / "data"
    _fabricated(data)
    merges = ["t h", "th e</w>", "a </w>", "o f</w>", "p h", "ph o"]
    bpe = tmp_path / "merges.txt.gz"
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("#version: test\n" + "\n".join(merges) + "\n")
    vocab = 512 + len(merges) + 2
    torch.manual_seed(0)
    clip = CLIP(CLIPConfig.tiny(vocab_size=vocab, context_length=24, image_size=16, patch_size=8,
                                vision_width=32, text_width=32, embed_dim=16, vision_heads=1, text_heads=1))
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    out = tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--data-root", str(data), "--clip", str(tmp_path / "clip.pt"),
           "--bpe", str(bpe), "--tasks", "eurosat,mnist", "--iterations", "2", "--warmup", "1", "--ref-size", "8",
           "--methods", "finetune,gnsp+cd+map", "--seeds", "1", "--out", str(out), "--no-progress",
           "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [t["name"] for t in res["tasks"]] == ["eurosat", "mnist"]
    assert res["config"]["mode"] == "mtil"
    m = res["methods"]["gnsp+cd+map"]
    assert len(m["seeds"][0]["matrix"]) == 2 and m["modality_gap"] is not None


def test_killed_quick_run_resumes_to_the_uninterrupted_results(tmp_path):
    """SIGKILL the parent mid-run (two worker processes, after at least one finished task), restart with
    --resume: the workers died with it, and the run ends with the same results as an uninterrupted one."""
    import signal
    import time

    base = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--methods", "gnsp+cd+map/update"]
    full = subprocess.run(base + ["--out", str(tmp_path / "full")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    log = out / "gnsp+cd+map_update" / "seed1" / "log.jsonl"
    proc = subprocess.Popen(base + ["--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            cwd=ROOT)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    finished_before_kill = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not finished_before_kill, "the run ended before it could be killed"
    assert not (out / "results.json").exists()
    time.sleep(3)
    frozen = log.read_text()
    time.sleep(3)
    assert log.read_text() == frozen, "a worker kept running after its parent was killed"
    again = subprocess.run(base + ["--out", str(out), "--resume"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after task" in again.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())["methods"]["gnsp+cd+map/update"]
    b = json.loads((out / "results.json").read_text())["methods"]["gnsp+cd+map/update"]
    for x, y in zip(a["seeds"], b["seeds"], strict=True):  # same seed, same matrix, across processes and a kill
        assert x["matrix"] == y["matrix"] and x["alignment"] == y["alignment"]


def test_quick_run_under_torchrun_with_two_gloo_processes(tmp_path):
    """2 CPU processes: sharded batches and statistics, averaged gradients, rank 0 alone writes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--quick", "--no-progress", "--out", str(out), "--seeds", "1", "--methods", "finetune,gnsp+cd+map/update"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("seed 1: Transfer") == 2  # one line per job, from rank 0 only
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["processes"] == 2
    m = res["methods"]["gnsp+cd+map/update"]
    assert len(m["seeds"][0]["matrix"]) == len(res["tasks"])
    lines = (out / "gnsp+cd+map_update" / "seed1" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == list(range(len(res["tasks"])))  # written once per task


def test_aggregate_computes_means_standard_errors_and_paired_differences():
    from gnsp_optim.reference.experiment import aggregate, diagnostics, format_table

    def res(matrix):
        from gnsp_optim.reference.metrics import continual_metrics

        return {"matrix": matrix, **continual_metrics(matrix), "train_seconds": 1.0,
                "alignment": [{"modality_gap": 0.2, "retrieval_R@1": 50.0}] * (len(matrix) + 1)}

    zs = [[30.0, 60.0, 12.0]] * 3
    ft1 = [[80.0, 50.0, 10.0], [40.0, 90.0, 11.0], [50.0, 70.0, 95.0]]
    ft2 = [[70.0, 50.0, 10.0], [40.0, 80.0, 11.0], [60.0, 60.0, 85.0]]
    results = {"zeroshot": {1: res(zs), 2: res(zs)}, "finetune": {1: res(ft1), 2: res(ft2)}}
    tasks = [{"name": n, "n_test": 10, "chance": c} for n, c in (("a", 50.0), ("b", 25.0), ("c", 10.0))]
    p = aggregate(results, tasks, {}, 1.0)
    ft = p["methods"]["finetune"]
    last = [(50 + 70 + 95) / 3, (60 + 60 + 85) / 3]
    assert ft["last"] == pytest.approx(sum(last) / 2) and ft["last_se"] == pytest.approx(_se(last))
    assert ft["learning"] == pytest.approx(((80 + 90 + 95) / 3 + (70 + 80 + 85) / 3) / 2)
    # forgetting: seed 1 (80-50, 90-70) -> 25, seed 2 (70-60, 80-60) -> 15
    assert ft["forgetting"] == pytest.approx(20.0) and ft["forgetting_se"] == pytest.approx(5.0)
    d = p["methods"]["zeroshot"]["vs_finetune"]
    assert d["last"] == pytest.approx(34.0 - sum(last) / 2) and d["seeds"] == 2
    assert ft["matrix"][2][2] == pytest.approx(90.0)
    assert ft["modality_gap"] == [0.2] * 3 and ft["modality_gap_before"] == 0.2
    text = format_table(p)
    assert "finetune" in text and "+-" in text and "*" in text  # zero-shot's Last gap is far beyond 2 SE
    lines = diagnostics(p)
    assert lines[0] == "zero-shot vs chance: a 30.0 (50.0), b 60.0 (25.0), c 12.0 (10.0)"
    assert lines[1].startswith("finetune: learning 83.3") and "forgetting 20.0" in lines[1]


def test_merge_results_pairs_methods_of_separate_runs(tmp_path):
    from gnsp_optim.reference.experiment import aggregate, merge_results
    from gnsp_optim.reference.metrics import continual_metrics

    def res(matrix):
        return {"matrix": matrix, **continual_metrics(matrix), "train_seconds": 1.0,
                "alignment": [{"modality_gap": 0.3, "retrieval_R@1": 40.0}] * 3}

    tasks = [{"name": "a", "n_test": 4, "chance": 50.0}, {"name": "b", "n_test": 4, "chance": 50.0}]
    a = aggregate({"finetune": {1: res([[60.0, 50.0], [40.0, 80.0]]), 2: res([[70.0, 50.0], [50.0, 90.0]])}},
                  tasks, {}, 1.0)
    b = aggregate({"gnsp": {1: res([[60.0, 50.0], [55.0, 70.0]]), 2: res([[70.0, 50.0], [70.0, 80.0]])}},
                  tasks, {}, 2.0)
    for name, p in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(p))
    merged = merge_results([tmp_path / "a.json", tmp_path / "b.json"])
    assert set(merged["methods"]) == {"finetune", "gnsp"} and merged["seconds"] == 3.0
    d = merged["methods"]["gnsp"]["vs_finetune"]  # last: seed 1 62.5 - 60, seed 2 75 - 70
    assert d["last"] == pytest.approx(3.75) and d["last_se"] == pytest.approx(1.25) and d["seeds"] == 2
    with pytest.raises(ValueError, match="other tasks"):
        (tmp_path / "c.json").write_text(json.dumps({**b, "tasks": tasks[:1]}))
        merge_results([tmp_path / "a.json", tmp_path / "c.json"])
