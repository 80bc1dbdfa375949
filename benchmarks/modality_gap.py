r"""When and why does MAP enlarge the modality gap? Task 1 of the offline mini-MTIL under each loss combination.

Every preset trains task 1 the same way (all parameters but the logit scale), so the losses alone differ
there: CE, CE + CD, CE + MAP, CE + CD + MAP, and MAP without its label smoothing (``/ls0``). For each
combination and seed this prints the modality gap and retrieval R@1 on the held-out caption set after task
1, and the gap's change from the start (mean +- SE over seeds), and writes ``gap.json`` into ``--out``.

    python benchmarks/modality_gap.py --seeds 1,2,3          # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gnsp_optim.reference.continual import METHODS, run_continual, with_overrides  # noqa: E402
from gnsp_optim.reference.experiment import ExperimentSpec, mean_se, offline_setup  # noqa: E402

VARIANTS = {
    "CE": METHODS["finetune"],
    "CE+CD": METHODS["finetune+cd"],
    "CE+MAP": with_overrides(METHODS["finetune"], name="CE+MAP", map_weight=0.75),
    "CE+MAP (no label smoothing)": with_overrides(METHODS["finetune"], name="CE+MAP/ls0", map_weight=0.75,
                                                  map_label_smoothing=0.0),
    "CE+CD+MAP (the paper)": METHODS["gnsp+cd+map"],
    "CE+CD+MAP (no label smoothing)": METHODS["gnsp+cd+map/ls0"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--out", default="results/modality_gap")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    setup = offline_setup(ExperimentSpec(quick=args.quick, progress=False))
    task1 = [setup.tasks[0]]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}
    for label, method in VARIANTS.items():
        gaps, r1s, start = [], [], None
        for seed in seeds:
            r = run_continual(copy.deepcopy(setup.model), setup.tokenizer, task1, method,
                              replace(setup.run, seed=seed, progress=False),
                              references=lambda i, s=seed: setup.references(i, s), pairs=setup.pairs,
                              log=lambda s: None)
            start = r["alignment"][0]["modality_gap"]
            gaps.append(r["alignment"][1]["modality_gap"])
            r1s.append(r["alignment"][1]["retrieval_R@1"])
        g, g_se = mean_se(gaps)
        rows[label] = {"gap_before": start, "gap_after_task1": g, "gap_se": g_se, "r1": mean_se(r1s)[0],
                       "seeds": seeds, "per_seed_gap": gaps}
        print(f"{label:<32} gap {start:.3f} -> {g:.3f} +- {g_se:.3f} (change {g - start:+.3f}); "
              f"R@1 {mean_se(r1s)[0]:.1f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gap.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
