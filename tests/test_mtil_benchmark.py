"""``benchmarks/mtil_clip.py``: the offline pipeline end to end (--quick), and --check-data's exit codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mtil_clip.py"

pytest.importorskip("sklearn")


def test_quick_offline_run_writes_every_output(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out),
                           "--cache-dir", str(tmp_path / "cache"), "--methods", "zeroshot,finetune,gnsp+cd+map/update"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["methods"]) == {"zeroshot", "finetune", "gnsp+cd+map/update"}
    t = len(res["tasks"])
    assert t >= 5
    for name, m in res["methods"].items():
        assert len(m["matrix"]) == t and all(len(r) == t for r in m["matrix"])
        assert 0 <= m["average"] <= 100 and m["modality_gap"] is not None
        safe = name.replace("/", "_")
        assert (out / safe / "matrix.csv").exists() and (out / safe / "heatmap.png").exists()
    assert (out / "summary.png").exists()
    assert "Transfer" in done.stdout and "Average" in done.stdout
    # a rerun uses the cached pre-trained model and resumes every finished method
    again = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--no-progress", "--out", str(out),
                            "--cache-dir", str(tmp_path / "cache"), "--methods", "finetune", "--resume"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "loaded from cache" in again.stdout and "resumed after task" in again.stdout
    assert json.loads((out / "results.json").read_text())["methods"]["finetune"]["matrix"] == \
        res["methods"]["finetune"]["matrix"]


def test_check_data_reports_missing_datasets(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--check-data"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert "aircraft" in done.stdout.lower() and "imagenet" in done.stdout.lower()
    assert "missing" in done.stdout.lower()


def test_check_data_exits_zero_when_every_dataset_is_present(tmp_path):
    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    try:
        from fabricate import fabricate_all
    finally:
        sys.path.pop(0)
    fabricate_all(tmp_path)
    done = subprocess.run([sys.executable, str(SCRIPT), "--data-root", str(tmp_path), "--check-data"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout
    assert "12/12 present" in done.stdout and done.stdout.count("[ok]") == 12


def test_real_mtil_path_runs_on_fabricated_data(tmp_path):
    """--data-root + --clip + --bpe: real loaders, checkpoint loading, BPE tokenizer, the loop, the outputs."""
    import gzip

    import torch

    sys.path.insert(0, str(ROOT / "tests" / "reference"))
    try:
        from fabricate import fabricate_all
    finally:
        sys.path.pop(0)
    from gnsp_optim.reference.model import CLIP, CLIPConfig

    data = tmp_path / "data"
    fabricate_all(data)
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
           "--methods", "finetune,gnsp+cd+map/update", "--out", str(out), "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["eurosat", "mnist"]
    assert res["config"]["mode"] == "mtil"
    m = res["methods"]["gnsp+cd+map/update"]
    assert len(m["matrix"]) == 2 and m["modality_gap"] is not None


def test_killed_quick_run_resumes_to_the_uninterrupted_results(tmp_path):
    """SIGKILL mid-run (after at least one finished task), restart with --resume: the same results.json."""
    import signal
    import time

    base = [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
            "--methods", "gnsp+cd+map/update"]
    full = subprocess.run(base + ["--out", str(tmp_path / "full")], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert full.returncode == 0, full.stderr[-3000:]
    out = tmp_path / "killed"
    log = out / "gnsp+cd+map_update" / "log.jsonl"
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
    again = subprocess.run(base + ["--out", str(out), "--resume"], capture_output=True, text=True, timeout=600,
                           cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed after task" in again.stdout
    a = json.loads((tmp_path / "full" / "results.json").read_text())["methods"]["gnsp+cd+map/update"]
    b = json.loads((out / "results.json").read_text())["methods"]["gnsp+cd+map/update"]
    assert a["matrix"] == b["matrix"]  # determinism: same seed, same matrix, across processes and a kill
    assert a["alignment"] == b["alignment"]


def test_quick_run_under_torchrun_with_two_gloo_processes(tmp_path):
    """2 CPU processes: sharded batches and statistics, averaged gradients, rank 0 alone writes."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--quick", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
           "--methods", "finetune,gnsp+cd+map/update"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("Transfer") == 3  # one line per method and the table header, from rank 0 only
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["processes"] == 2
    m = res["methods"]["gnsp+cd+map/update"]
    assert len(m["matrix"]) == len(res["tasks"])
    lines = (out / "gnsp+cd+map_update" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["task"] for x in lines] == list(range(len(res["tasks"])))  # written once per task


def test_diagnostics_compute_chance_forgetting_and_learning_from_the_matrices():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mtil_clip_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    zs = [[30.0, 60.0, 12.0]] * 3
    ft = [[80.0, 50.0, 10.0],   # task a learnt to 80
          [40.0, 90.0, 11.0],   # a forgotten to 40; b learnt to 90
          [50.0, 70.0, 95.0]]   # a 50 (best 80: -30), b 70 (best 90: -20); c 95
    lines = bench.diagnostics(["a", "b", "c"], [2, 4, 10], {"zeroshot": {"matrix": zs}, "finetune": {"matrix": ft}})
    assert lines[0] == "zero-shot vs chance: a 30.0 (50.0), b 60.0 (25.0), c 12.0 (10.0)"
    assert lines[1].startswith("forgetting, finetune: mean 25.0, max 30.0 points")
    assert lines[2] == ("learning, finetune: mean accuracy on each task right after training on it 88.3 "
                        "(zero-shot 34.0)")
