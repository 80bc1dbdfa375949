"""``benchmarks/statistics_memory.py`` runs end to end at toy sizes and prints both tables (no timing asserted)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "statistics_memory.py"


def test_statistics_memory_benchmark_runs_at_toy_sizes():
    args = ["--widths", "40", "300", "--samples", "512", "--batch", "128", "--rank", "16", "--topk", "16",
            "--exact-eigh-max-width", "100", "--alphas", "1.5", "--conv-width", "24", "--conv-batches", "20",
            "--conv-batch", "32", "--seeds", "2"]
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=SCRIPT.parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "== Part 1" in out and "== Part 2" in out
    table = [line.split() for line in out.splitlines() if line.strip().startswith(("40 ", "300 "))]
    assert [row[0] for row in table] == ["40", "300"]
    assert table[1][7].startswith("*")  # above --exact-eigh-max-width: ranks from the top eigenpairs
    crit = [line.split()[0] for line in out.splitlines() if line.strip().startswith(("subspace", "covariance"))]
    assert crit == ["subspace", "covariance"]
