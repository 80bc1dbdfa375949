"""``benchmarks/offline_statistics.py``: the side-by-side timing runs end to end (``--quick``), and the per-seed
summary counts samples, saturation and drift as documented (no timing is asserted)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "offline_statistics.py"


def load_script():
    spec = importlib.util.spec_from_file_location("offline_statistics", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_timing_runs_and_writes_its_report(tmp_path):
    stem = tmp_path / "report"
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--timing-only", "--timing-rounds", "1",
                           "--no-progress", "--out", str(tmp_path / "run"), "--report", str(stem)],
                          capture_output=True, text=True, timeout=300, cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "side by side in one process" in done.stdout
    timing = json.loads(Path(f"{stem}.json").read_text())["side_by_side"]
    assert set(timing) == set(load_script().METHODS)
    assert timing["gnsp+cd+map/update"]["collect_ratio"] == [1.0]
    assert timing["gnsp+cd+map/update/early"]["samples"] == [64]  # 4 batches: too few to stop early


def test_per_seed_counts_saturated_layer_passes_and_the_samples_share():
    mod = load_script()

    def pas(task, samples, kept, sketched):
        return {"task": task, "samples": samples, "samples_full": 100, "stopped_early": samples < 100,
                "kept_rank": kept, "sketched": sketched}

    st = {"passes": [pas("a", 40, {"fc": 8, "proj": 3}, {"fc": [8, 33]}),
                     pas("b", 100, {"fc": 7, "proj": 3}, {"fc": [8, 33]})],
          "samples": 140, "samples_full": 200, "collect_seconds": 1.0, "end_task_seconds": 0.5,
          "memory_bytes": 10, "collecting_bytes": 30, "final_drift": {"a": 0.2, "b": 0.4}}
    out = mod.per_seed({1: {"statistics": st}})
    assert out["samples_share"] == {1: 0.7} and out["stopped_early"] == {1: 1}
    assert out["saturated"] == {1: 1} and out["layer_passes"] == {1: 4}  # fc kept all 8 rows in pass a only
    assert out["drift_first"] == {1: 0.2} and abs(out["drift_mean"][1] - 0.3) < 1e-12
