r"""The main job: continual fine-tuning of CLIP, GNSP against fine-tuning and baselines, over several seeds.

With no arguments: the offline mini-MTIL on the CPU. The shipped tiny CLIP
(``gnsp_optim/reference/checkpoints/tiny_clip.pt``, hash-verified; ``--pretrain`` remakes it) is fine-tuned
through 7 classification tasks (two of them real images shipped in PyPI wheels: scikit-learn digits and
animal-mnist silhouettes) by every method, with 3 fine-tuning seeds, in two worker processes.

With ``--data-root DIR --clip PATH``: the real MTIL protocol (11 datasets, Order I or II).
``--check-data`` only reports which datasets are present.

    python benchmarks/mtil_clip.py                   # offline default (693 s measured on 2 idle CPU cores)
    python benchmarks/mtil_clip.py --quick           # the same pipeline, reduced (a smoke test, 35 s)
    python benchmarks/mtil_clip.py --pretrain        # remake the tiny CLIP checkpoint (and its record)
    python benchmarks/mtil_clip.py --merge a/results.json,b/results.json --out merged   # one table of both
    python benchmarks/mtil_clip.py --data-root /data --check-data
    torchrun --nproc_per_node 2 benchmarks/mtil_clip.py --quick --out DIR          # data-parallel (DDP-style)
    torchrun --nproc_per_node 2 benchmarks/mtil_clip.py --quick --fsdp --out DIR   # the model FSDP2-sharded
    python benchmarks/mtil_clip.py --data-root /data --clip ViT-B-16.pt --order I --methods gnsp+cd+map

Outputs in ``--out`` (default ``results/<timestamp>``): ``results.json`` (mean +- SE over seeds, paired
differences, per-seed matrices, modality gap and retrieval after every task), ``<method>/matrix.csv`` and
``heatmap.png`` (means), ``summary.png``, and per job ``<method>/seed<k>/`` a ``log.jsonl`` and a checkpoint
(``--resume``). The work itself is in :mod:`gnsp_optim.reference.experiment`.

Under ``torchrun`` (gloo on CPU, nccl on GPU) every rank trains on its share of each batch and the jobs run
one after another; ``--fsdp`` also shards each model with FSDP2 (``fully_shard`` per residual block of both
towers, then the root), giving the same numbers as the run without it to round-off. Under ``--fsdp``
``l2init`` and ``gnsp+cd+map/all`` (it protects the token embedding, which has no FSDP2 projection yet) are
refused.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gnsp_optim.reference.continual import METHODS  # noqa: E402
from gnsp_optim.reference.experiment import (  # noqa: E402
    DEFAULT_METHODS,
    ExperimentSpec,
    diagnostics,
    format_table,
    run_experiment,
)

MTIL_METHODS = ("zeroshot", "finetune", "gnsp+cd+map", "gnsp+cd+map/update")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced pipeline for smoke tests (< 1 min)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--seeds", default=None, help="comma-separated fine-tuning seeds (default 1,2,3; --quick 1,2)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running (method, seed) jobs, one thread each (default 2 on CPU)")
    p.add_argument("--out", default=None, help="output folder (default results/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue every job from its last finished task")
    p.add_argument("--rho", type=float, default=None, help="override GNSP's rho (default 0.15)")
    p.add_argument("--iterations", type=int, default=None, help="override iterations per task")
    p.add_argument("--warmup", type=int, default=None, help="override warm-up steps")
    p.add_argument("--checkpoint", default=None, help="offline: tiny CLIP checkpoint (default: the shipped one)")
    p.add_argument("--schedule", default=None, help="offline: per-task lr / iterations JSON (default: shipped)")
    p.add_argument("--pretrain", action="store_true",
                   help="pre-train the tiny CLIP from scratch and write --checkpoint (+ .json record)")
    p.add_argument("--pretrain-steps", default=None,
                   help="with --pretrain: 'PHASE1,PHASE2' steps (default the recipe's 1500,1250)")
    p.add_argument("--threads", type=int, default=1,
                   help="with --pretrain: torch threads (default 1: on a shared 2-core machine two threads\n"
                        "measured 6x the CPU time per step of one)")
    p.add_argument("--merge", default=None,
                   help="comma-separated results.json files of earlier runs (same tasks): re-aggregate them\n"
                        "into --out (paired differences across runs) and print the table")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--data-root", default=None, help="real MTIL data root (see gnsp_optim/reference/data/LAYOUTS.md)")
    p.add_argument("--check-data", action="store_true", help="report which MTIL datasets are present and exit")
    p.add_argument("--clip", default=None, help="real CLIP weights: a local OpenAI/open_clip checkpoint file")
    p.add_argument("--open-clip-model", default=None,
                   help="real MTIL: build this open_clip architecture (e.g. ViT-B-16; --clip = its weights, "
                        "optional: random init without)")
    p.add_argument("--bpe", default=None, help="CLIP BPE vocabulary file (default: from an installed open_clip)")
    p.add_argument("--order", default="I", choices=["I", "II"], help="MTIL task order")
    p.add_argument("--tasks", default=None, help="real MTIL: a comma-separated subset of the order's tasks")
    p.add_argument("--ref-size", type=int, default=1000, help="real MTIL: ImageNet reference images per task")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard each model with FSDP2 (fully_shard per residual block, then\n"
                        "the root); same numbers as the data-parallel run without it")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def init_distributed(device: str) -> tuple[int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def pretrain(args, log=print) -> int:
    from dataclasses import replace

    from gnsp_optim.reference.tinyclip import CHECKPOINT_PATH, TinyCLIPRecipe, build_offline_data, make_tiny_clip

    torch.set_num_threads(args.threads)
    recipe = TinyCLIPRecipe()
    if args.quick:  # a smoke test of the command: a tiny model, a few steps
        recipe = replace(recipe, n_pairs=1000, vision_width=32, layers=1, heads=1, embed_dim=16, phase1_steps=10,
                         phase2_steps=10, batch_size=32, warmup=2)
    if args.pretrain_steps:
        a, b = (int(x) for x in args.pretrain_steps.split(","))
        recipe = replace(recipe, phase1_steps=a, phase2_steps=b)
    data = build_offline_data(n_train=64, n_test=60) if args.quick else None
    command = "python benchmarks/mtil_clip.py " + " ".join(sys.argv[1:]) if sys.argv[1:] else \
        "python benchmarks/mtil_clip.py --pretrain"
    t0 = time.time()
    record = make_tiny_clip(recipe, args.checkpoint or CHECKPOINT_PATH, command=command,
                            progress=not args.no_progress, data=data, log=log)
    log(f"pre-training took {record['train_seconds']:.0f}s ({time.time() - t0:.0f}s with data and checks)")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    rank, world = init_distributed(args.device)
    if world > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
    if world > 1 and args.device == "cpu":  # share the cores instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    log = print if rank == 0 else (lambda *a, **k: None)
    try:
        return _main(args, rank, world, log)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _main(args, rank: int, world: int, log) -> int:
    if args.check_data:
        if not args.data_root:
            print("--check-data needs --data-root DIR", file=sys.stderr)
            return 2
        from gnsp_optim.reference.data import check_data, format_check_report

        rows = check_data(args.data_root)
        log(format_check_report(rows))
        return 0 if all(r.present for r in rows) else 1
    if args.pretrain:
        return pretrain(args, log)
    if args.merge:
        from gnsp_optim.reference.experiment import merge_results, write_outputs

        if not args.out:
            print("--merge needs --out DIR", file=sys.stderr)
            return 2
        payload = merge_results(args.merge.split(","))
        write_outputs(args.out, payload, log=log)
        log(format_table(payload))
        for line in diagnostics(payload):
            log(line)
        return 0
    if args.data_root and not (args.clip or args.open_clip_model):
        print("the real MTIL run needs --clip PATH (OpenAI or open_clip ViT-B/16 weights) or --open-clip-model",
              file=sys.stderr)
        return 2
    out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    if world > 1 and args.out is None:
        raise SystemExit("under torchrun give --out explicitly (every rank must agree on it)")
    if args.fsdp and world == 1:
        print("--fsdp shards over the ranks of a torchrun launch: torchrun --nproc_per_node N "
              "benchmarks/mtil_clip.py --fsdp ...", file=sys.stderr)
        return 2
    mode = "mtil" if args.data_root else "offline"
    names = tuple((args.methods or ",".join(MTIL_METHODS if mode == "mtil" else DEFAULT_METHODS)).split(","))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else ((1, 2) if args.quick else (1, 2, 3))
    workers = args.workers if args.workers is not None else (2 if args.device == "cpu" and world == 1 else 1)
    spec = ExperimentSpec(mode=mode, methods=names, seeds=seeds, out=out, workers=workers, resume=args.resume,
                          progress=not args.no_progress and rank == 0, quick=args.quick, device=args.device,
                          rho=args.rho, iterations=args.iterations, warmup=args.warmup, checkpoint=args.checkpoint,
                          schedule=args.schedule, data_root=args.data_root, clip=args.clip, bpe=args.bpe,
                          order=args.order, tasks=tuple(args.tasks.split(",")) if args.tasks else None,
                          ref_size=args.ref_size, open_clip_model=args.open_clip_model,
                          fsdp=args.fsdp)
    t0 = time.time()
    try:
        payload = run_experiment(spec, log=log)
    except NotImplementedError as err:  # --fsdp refuses some methods before any job starts
        if not args.fsdp:
            raise
        if rank == 0:
            print(f"--fsdp: {err}", file=sys.stderr)
        return 2
    log()
    log(format_table(payload))
    for line in diagnostics(payload):
        log(line)
    log(f"\n{len(payload['tasks'])} tasks x {len(names)} methods x {len(seeds)} seeds; total {time.time() - t0:.0f}s "
        f"with {workers} worker process(es); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
