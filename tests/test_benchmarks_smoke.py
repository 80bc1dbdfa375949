"""``benchmarks/overhead.py --quick`` runs end to end and prints its table (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


def test_overhead_quick_runs_and_prints_the_table():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                          timeout=120, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "| measurement | ours | other side | ratio (ours / other) | target | met |" in out
    for label in ("end_task", "projection per step", "collecting forward", "projector memory"):
        assert label in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "x |" in line]
    assert len(rows) >= 8


def test_overhead_kept_share_fixes_the_ranks_and_rejects_bad_values():
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--kept-share", "0.25,0.5"],
                          capture_output=True, text=True, timeout=120, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    layers = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith("  resblocks")}
    # --quick: width 64 (c_fc's input), hidden 256 (c_proj's input)
    assert "k=16" in layers["resblocks.0.c_fc"] and "k=128" in layers["resblocks.0.c_proj"]
    assert "kept shares 0.25,0.5" in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--kept-share", "0.3"], capture_output=True,
                         text=True, timeout=120, cwd=SCRIPT.parents[1])
    assert bad.returncode == 2 and "--kept-share" in bad.stderr


def test_overhead_clip_step_quick_times_a_whole_training_step():
    done = subprocess.run([sys.executable, str(SCRIPT), "--clip-step", "--quick", "--bf16"], capture_output=True,
                          text=True, timeout=120, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "bf16 autocast" in out and "CLIP tiny" in out
    for label in ("AdamW alone", "GNSP grad mode", "GNSP update mode", "collect() open", "end_task"):
        assert label in out
    assert "kept ranks: 0.mlp.c_fc" in out and "visual.proj" in out
    missing = subprocess.run([sys.executable, str(SCRIPT), "--clip-step", "--quick", "--device", "cuda"],
                             capture_output=True, text=True, timeout=120, cwd=SCRIPT.parents[1])
    import torch

    if not torch.cuda.is_available():
        assert missing.returncode == 2 and "no CUDA device" in missing.stderr


def test_modality_gap_experiment_quick_runs_every_loss_combination(tmp_path):
    script = SCRIPT.parent / "modality_gap.py"
    done = subprocess.run([sys.executable, str(script), "--quick", "--seeds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    import json

    rows = json.loads((tmp_path / "gap.json").read_text())
    assert set(rows) >= {"CE", "CE+CD", "CE+MAP", "CE+CD+MAP (the paper)"}
    assert all(0 <= r["gap_after_task1"] <= 2 and r["seeds"] == [1] for r in rows.values())
    assert "gap" in done.stdout and "CE+CD+MAP" in done.stdout
