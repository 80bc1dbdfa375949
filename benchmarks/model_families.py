"""Issue 13's family table: per family and configuration, the old outputs' drift, the task-2 loss and coverage.

Runs the acceptance checker of ``tests/test_model_families.py`` (``one_line_run``: default selection,
``rho=0``, float64, tiny random-init configs) and prints one line per case, or why it was refused. Families
whose package is missing are reported as such (open_clip: run with the interpreter that has it).

Run::

    python benchmarks/model_families.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_model_families as fam  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    print(f"{'family':18s} {'config':13s} {'drift':>9s} {'loss before -> after':>22s} {'protected':>9s} "
          f"{'frozen':>6s} {'s':>5s}")
    for name in fam.FAMILIES:
        for cfg in fam.CONFIGS:
            t0 = time.perf_counter()
            try:
                drift, before, after, opt = fam.one_line_run(name, cfg)
            except Exception as err:  # a refusal is a result here
                print(f"{name:18s} {cfg:13s} {type(err).__name__}: {str(err)[:110]}")
                continue
            protected = len({n for row in opt.report() for n in row["params"]})
            print(f"{name:18s} {cfg:13s} {drift:9.2e} {before:10.4f} -> {after:8.4f} {protected:9d} "
                  f"{len(opt.frozen):6d} {time.perf_counter() - t0:5.1f}")


if __name__ == "__main__":
    main()
