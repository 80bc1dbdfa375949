r"""Issue 14's statistics options on the offline mini-MTIL: bounded memory (sketch) and early stop vs one exact pass.

Runs ``gnsp+cd+map/update`` (one full exact statistics pass per task, the comparator), ``/update/sketch``
(every protected input summarised by a 64-row frequent-directions sketch: the tiny CLIP's statistics are
129 (``visual.proj``, ``c_fc``; the constant column counted) and 513 (``c_proj``) wide, so it keeps 50% and
12.5% of the width) and ``/update/early`` (the pass stops once the
``ConvergenceMonitor`` sees the protected subspaces stop changing: a check every 10 batches of 16 images,
tol 0.02, patience 2) on the offline benchmark (7 tasks, the shipped tiny CLIP) over seeds, and reports,
mean +- standard error over seeds:

- Transfer / Average / Last / forgetting (accuracy, percent) and the paired differences to the exact preset;
- statistics samples used against a full pass (all six passes summed);
- seconds of the statistics passes and of ``end_task`` (summed over the six passes), and their ratio to the
  exact preset's (the jobs run side by side in ``--workers`` processes, one thread each, so these are
  ratios within one run on a shared machine, not absolute costs);
- statistics memory: bytes of the memory kept between tasks, summed over the protected layers (after the last
  pass), and the most held while collecting (memory plus the task's Gram matrix / sketch buffer);
- old-output drift: the relative change ``||f_end - f_i|| / ||f_i||`` of the image features of each finished
  task's first 64 test images, from its statistics pass to the end of the run (``ProtectionMonitor``), mean
  over the six remembered tasks and for the first task;
- sketch saturation: layer-passes where the rank rule wanted at least as many directions as the sketch holds
  (there the tail-energy promise does not hold; the optimizer warns).

Usage::

    python benchmarks/offline_statistics.py --workers 2              # 3 presets x seeds 1,2,3 (~20-30 min here)
    python benchmarks/offline_statistics.py --quick --seeds 1        # smoke test of the pipeline (~1 min)
    python benchmarks/offline_statistics.py --timing-only            # only the side-by-side pass timing

Writes the experiment's ``results.json`` / matrices / plots to ``--out`` and this report (text and JSON) to
``--report`` (default ``<out>/offline_statistics.{txt,json}``). The jobs' own seconds are ratios within one
run only while the machine's load stays the same (on a shared box it need not: the jobs run at different
times), so the script also times each preset's pass on the first task side by side in one process
(``--timing-rounds``, interleaved; ``--timing-only`` runs just that).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gnsp_optim.reference.experiment import (  # noqa: E402
    ExperimentSpec,
    aggregate,
    build_setup,
    mean_se,
    paired_difference,
    run_jobs,
    write_outputs,
)

EXACT = "gnsp+cd+map/update"
METHODS = (EXACT, "gnsp+cd+map/update/sketch", "gnsp+cd+map/update/early")


def per_seed(results: dict[int, dict]) -> dict[str, dict[int, float]]:
    """The statistics numbers of one method, per seed."""
    out: dict[str, dict[int, float]] = {k: {} for k in (
        "samples_share", "collect_seconds", "end_task_seconds", "memory_bytes", "collecting_bytes",
        "drift_mean", "drift_first", "saturated", "layer_passes", "stopped_early")}
    for seed, r in results.items():
        st = r["statistics"]
        passes = st["passes"]
        out["samples_share"][seed] = st["samples"] / st["samples_full"]
        out["collect_seconds"][seed] = st["collect_seconds"]
        out["end_task_seconds"][seed] = st["end_task_seconds"]
        out["memory_bytes"][seed] = st["memory_bytes"]
        out["collecting_bytes"][seed] = st["collecting_bytes"]
        drift = st["final_drift"]
        out["drift_mean"][seed] = sum(drift.values()) / len(drift) if drift else math.nan
        out["drift_first"][seed] = drift.get(passes[0]["task"], math.nan) if passes else math.nan
        sat = total = 0
        for p in passes:
            for layer, kept in p["kept_rank"].items():
                total += 1
                if layer in p["sketched"] and kept is not None and kept >= p["sketched"][layer][0]:
                    sat += 1
        out["saturated"][seed], out["layer_passes"][seed] = sat, total
        out["stopped_early"][seed] = sum(p["stopped_early"] for p in passes)
    return out


def pm(values: dict[int, float], fmt: str = ".2f") -> str:
    m, se = mean_se(list(values.values()))
    return f"{m:{fmt}} +- {se:{fmt}}" if not math.isnan(se) else f"{m:{fmt}}"


def ratio(a: dict[int, float], b: dict[int, float]) -> dict[int, float]:
    return {s: a[s] / b[s] for s in sorted(set(a) & set(b)) if b[s] > 0}


def report(results: dict[str, dict[int, dict]], payload: dict, log) -> dict:
    stats = {m: per_seed(r) for m, r in results.items()}
    acc = {m: {k: {s: r[k] for s, r in runs.items()} for k in ("transfer", "average", "last")}
           for m, runs in results.items()}
    summary: dict = {"methods": {}}
    log("\naccuracy (percent), mean +- SE over seeds; paired difference to the exact preset")
    log(f"{'method':<28} {'Transfer':>15} {'Average':>15} {'Last':>15} {'forgetting':>13}   "
        f"{'d Transfer':>14} {'d Average':>14} {'d Last':>14}")
    for m in results:
        rec = payload["methods"][m]
        cells = [pm(acc[m][k]) for k in ("transfer", "average", "last")]
        diffs = []
        for k in ("transfer", "average", "last"):
            d, se, _ = paired_difference(acc[m][k], acc[EXACT][k]) if m != EXACT else (math.nan, math.nan, 0)
            diffs.append("-" if m == EXACT else f"{d:+.2f} +- {se:.2f}")
        forget = f"{rec['forgetting']:.2f} +- {rec['forgetting_se'] or math.nan:.2f}"
        log(f"{m:<28} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} {forget:>13}   "
            f"{diffs[0]:>14} {diffs[1]:>14} {diffs[2]:>14}")
    log("\nstatistics passes (six per run, summed), mean +- SE over seeds; ratios to the exact preset per seed")
    log(f"{'method':<28} {'samples/full':>14} {'early stops':>11} {'collect s':>14} {'ratio':>13} "
        f"{'end_task s':>13} {'ratio':>13} {'kept KB':>9} {'collect KB':>10} {'drift mean':>17} "
        f"{'drift task 1':>17} {'saturated':>9}")
    for m in results:
        s = stats[m]
        rc = ratio(s["collect_seconds"], stats[EXACT]["collect_seconds"])
        re = ratio(s["end_task_seconds"], stats[EXACT]["end_task_seconds"])
        kb = mean_se([v / 1024 for v in s["memory_bytes"].values()])[0]
        ckb = mean_se([v / 1024 for v in s["collecting_bytes"].values()])[0]
        sat = f"{sum(s['saturated'].values())}/{sum(s['layer_passes'].values())}"
        early = f"{sum(s['stopped_early'].values())}/{6 * len(s['stopped_early'])}"
        log(f"{m:<28} {pm(s['samples_share'], '.3f'):>14} {early:>11} {pm(s['collect_seconds'], '.1f'):>14} "
            f"{pm(rc, '.2f'):>13} {pm(s['end_task_seconds'], '.2f'):>13} {pm(re, '.2f'):>13} {kb:>9.1f} "
            f"{ckb:>10.1f} {pm(s['drift_mean'], '.4f'):>17} {pm(s['drift_first'], '.4f'):>17} {sat:>9}")
        dd = paired_difference(s["drift_mean"], stats[EXACT]["drift_mean"])
        summary["methods"][m] = {
            **{k: dict(zip(("mean", "se"), mean_se(list(acc[m][k].values())), strict=True)) for k in acc[m]},
            "forgetting": rec_pair(payload["methods"][m], "forgetting"),
            **{f"d_{k}": dict(zip(("mean", "se", "seeds"), paired_difference(acc[m][k], acc[EXACT][k]),
                                  strict=True)) for k in acc[m]},
            "collect_ratio": dict(zip(("mean", "se"), mean_se(list(rc.values())), strict=True)),
            "end_task_ratio": dict(zip(("mean", "se"), mean_se(list(re.values())), strict=True)),
            "d_drift_mean": dict(zip(("mean", "se", "seeds"), dd, strict=True)),
            "per_seed": s}
    sketched = next((p["sketched"] for r in results.values() for run in r.values()
                     for p in run["statistics"]["passes"] if p["sketched"]), {})
    if sketched:
        log("sketched inputs (rows kept / width): " + ", ".join(
            f"{n.replace('visual.transformer.resblocks.', 'b')}: {k}/{w} ({k / w:.0%})"
            for n, (k, w) in sketched.items()))
    log("drift: ||f_end - f_i|| / ||f_i|| of task i's first test images' image features, from its statistics "
        "pass to the end; kept KB: statistics memory after the last pass, summed over the protected layers")
    return summary


def time_passes(setup, methods: tuple[str, ...], rounds: int, log) -> dict:
    """The statistics pass + ``end_task`` of each preset on the first task's training data from the pre-trained
    model, interleaved in one process (the order rotates every round): timings comparable side by side, which
    the jobs' own seconds are not when the machine's load changes during the run."""
    from gnsp_optim.reference import continual

    task = setup.tasks[0]
    times: dict[str, dict[str, list[float]]] = {m: {"collect": [], "end_task": [], "samples": []} for m in methods}
    for r in range(rounds):
        order = methods[r % len(methods):] + methods[:r % len(methods)]
        for m in order:
            method = continual.METHODS[m]
            opt = continual._gather_statistics(setup.model, setup.tokenizer, task, method, None, "cpu", 0)
            rec = continual._statistics_record(opt, 0)["statistics"]
            times[m]["collect"].append(rec["collect_seconds"])
            times[m]["end_task"].append(rec["end_task_seconds"])
            times[m]["samples"].append(rec["samples"])
            opt.remove_hooks()
    log(f"\nside by side in one process ({rounds} interleaved rounds, task {task.name!r}, {len(task.train)} "
        "images, the pre-trained model), mean +- SE over rounds; ratios to the exact preset per round")
    log(f"{'method':<28} {'samples':>8} {'collect s':>14} {'ratio':>13} {'end_task s':>14} {'ratio':>13}")
    out = {}
    for m in methods:
        t = times[m]
        rc = {i: a / b for i, (a, b) in enumerate(zip(t["collect"], times[EXACT]["collect"], strict=True))}
        re = {i: a / b for i, (a, b) in enumerate(zip(t["end_task"], times[EXACT]["end_task"], strict=True))}
        log(f"{m:<28} {int(t['samples'][0]):>8} {pm(dict(enumerate(t['collect'])), '.2f'):>14} {pm(rc, '.3f'):>13} "
            f"{pm(dict(enumerate(t['end_task'])), '.3f'):>14} {pm(re, '.3f'):>13}")
        out[m] = {**t, "collect_ratio": list(rc.values()), "end_task_ratio": list(re.values())}
    return out


def rec_pair(rec: dict, key: str) -> dict:
    return {"mean": rec[key], "se": rec.get(f"{key}_se")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced data and iterations (a smoke test)")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated; the first is compared to ({EXACT})")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="results/offline_statistics")
    p.add_argument("--report", default=None, help="path stem of the report (.txt and .json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--timing-rounds", type=int, default=3, help="interleaved side-by-side passes after the jobs")
    p.add_argument("--timing-only", action="store_true", help="only the side-by-side timing (no training jobs)")
    args = p.parse_args()
    torch.set_num_threads(1)
    methods = tuple(args.methods.split(","))
    if EXACT not in methods:
        raise SystemExit(f"--methods must include the comparator {EXACT}")
    spec = ExperimentSpec(mode="offline", methods=methods, seeds=tuple(int(s) for s in args.seeds.split(",")),
                          out=args.out, workers=args.workers, quick=args.quick, progress=not args.no_progress)
    lines: list[str] = []

    def log(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    t0 = time.time()
    setup = build_setup(spec)
    log(f"offline mini-MTIL{' (--quick)' if args.quick else ''}: {len(setup.tasks)} tasks, "
        f"{len(setup.tasks[0].train)} training images per task, seeds {list(spec.seeds)}, {spec.workers} workers")
    config = {"mode": "offline", "quick": args.quick, "methods": list(methods), "seeds": list(spec.seeds),
              "workers": spec.workers, "threads_per_worker": 1, **setup.info}
    summary: dict = {}
    if not args.timing_only:
        results = run_jobs(spec, setup if spec.workers <= 1 else None, log=log)
        payload = aggregate(results, setup.task_records, config, time.time() - t0)
        write_outputs(args.out, payload, log=log)
        summary = report(results, payload, log)
    if args.timing_rounds:
        summary["side_by_side"] = time_passes(setup, methods, args.timing_rounds, log)
    log(f"\ntotal {time.time() - t0:.0f} s; results in {args.out}")
    stem = args.report or os.path.join(args.out, "offline_statistics")
    os.makedirs(os.path.dirname(stem) or ".", exist_ok=True)
    Path(stem + ".txt").write_text("\n".join(lines) + "\n")
    Path(stem + ".json").write_text(json.dumps({"config": config, **summary}, indent=2, default=str))


if __name__ == "__main__":
    main()
