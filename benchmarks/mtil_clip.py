r"""The main job: continual fine-tuning of CLIP, GNSP against fine-tuning and baselines.

With no arguments: an offline mini-MTIL on the CPU. A tiny CLIP (the same model code as ViT-B/16, a small
config) is pre-trained contrastively on generated image-caption pairs (cached: a rerun does not pre-train
again), then fine-tuned through 7 classification tasks (two of them real images shipped in PyPI wheels:
scikit-learn digits and animal-mnist silhouettes) by every method, same tasks, same seed.

With ``--data-root DIR --clip PATH``: the real MTIL protocol (11 datasets, Order I or II) through
``gnsp_optim.reference``. ``--check-data`` only reports which datasets are present.

    python benchmarks/mtil_clip.py                   # offline default (~12 min on 2 CPU cores)
    python benchmarks/mtil_clip.py --quick           # the same pipeline, reduced (smoke test)
    python benchmarks/mtil_clip.py --data-root /data --check-data
    python benchmarks/mtil_clip.py --data-root /data --clip ViT-B-16.pt --order I --methods gnsp+cd+map/update

Outputs in ``--out`` (default ``results/<timestamp>``): ``results.json``, ``<method>/matrix.csv``,
``<method>/heatmap.png``, ``summary.png``, per-method ``log.jsonl`` and checkpoints (``--resume``).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from gnsp_optim.reference.continual import (  # noqa: E402
    METHODS,
    ContinualTask,
    atomic_write_text,
    run_continual,
)

OFFLINE_METHODS = ["zeroshot", "finetune", "l2init", "finetune+cd", "gnsp", "gnsp+cd", "gnsp+cd+map",
                   "gnsp+cd+map/update"]

# offline configurations: (model, data, schedule)
PRESETS = {
    "default": dict(width=128, layers=3, heads=4, embed=64, pretrain_steps=1500, n_pairs=20000, n_train=600,
                    n_test=200, n_ref=1000, n_caption=500, iterations=100, lr=2e-4, warmup=10, batch=64,
                    ref_batch=32, shift=1.0),
    "quick": dict(width=64, layers=2, heads=2, embed=32, pretrain_steps=150, n_pairs=4000, n_train=120,
                  n_test=60, n_ref=128, n_caption=128, iterations=8, lr=5e-4, warmup=2, batch=32, ref_batch=32,
                  shift=1.0),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced pipeline for smoke tests (< 3 min)")
    p.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    p.add_argument("--out", default=None, help="output folder (default results/<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue each method from its last finished task")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--rho", type=float, default=None, help="override GNSP's rho (default 0.15)")
    p.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "gnsp_optim"))
    p.add_argument("--iterations", type=int, default=None, help="override iterations per task")
    p.add_argument("--lr", type=float, default=None, help="offline: override the fine-tuning lr")
    p.add_argument("--batch", type=int, default=None, help="offline: override the fine-tuning batch size")
    p.add_argument("--pretrain-steps", type=int, default=None, help="offline: override pre-training steps")
    p.add_argument("--shift", type=float, default=None,
                   help="offline: how far task images are rendered from the pre-training style (default 1)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--data-root", default=None, help="real MTIL data root (see gnsp_optim/reference/data/LAYOUTS.md)")
    p.add_argument("--check-data", action="store_true", help="report which MTIL datasets are present and exit")
    p.add_argument("--clip", default=None, help="real CLIP weights: a local OpenAI/open_clip checkpoint file")
    p.add_argument("--bpe", default=None, help="CLIP BPE vocabulary file (default: from an installed open_clip)")
    p.add_argument("--order", default="I", choices=["I", "II"], help="MTIL task order")
    p.add_argument("--tasks", default=None, help="real MTIL: a comma-separated subset of the order's tasks")
    p.add_argument("--ref-size", type=int, default=1000, help="real MTIL: ImageNet reference images")
    p.add_argument("--warmup", type=int, default=None, help="override warm-up steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def _rank_world() -> tuple[int, int]:
    from gnsp_optim.reference.continual import dist_info

    return dist_info()


# ------------------------------------------------------------------------------------------ offline data
def offline_setup(cfg: dict, seed: int, cache_dir: str, progress: bool, log=print):
    """Tasks, tokenizer, pre-trained tiny CLIP (cached), reference set and caption set."""
    from gnsp_optim.reference import toydata
    from gnsp_optim.reference.model import CLIP, CLIPConfig
    from gnsp_optim.reference.pretrain import CaptionedImages, TensorImageDataset, pretrain_clip
    from gnsp_optim.reference.tokenizer import WordTokenizer

    t0 = time.time()
    toy = toydata.build_tasks(n_train=cfg["n_train"], n_test=cfg["n_test"], seed=0, shift=cfg["shift"])
    images, captions = toydata.build_pretraining_pairs(n=cfg["n_pairs"], seed=0)
    cap_images, cap_texts = toydata.build_caption_set(n=cfg["n_caption"], seed=1)
    tok = WordTokenizer.from_texts(toydata.all_texts(toy, captions + cap_texts), 20)
    log(f"data: {len(toy)} tasks, {len(captions)} pre-training pairs, vocabulary {tok.vocab_size} "
        f"({time.time() - t0:.1f}s)")
    tasks = [ContinualTask(t.name, t.classnames, t.templates, TensorImageDataset(t.train_images, t.train_labels),
                           TensorImageDataset(t.test_images, t.test_labels), lr=cfg["lr"],
                           iterations=cfg["iterations"]) for t in toy]
    pairs = CaptionedImages(images, captions)
    g = torch.Generator().manual_seed(seed)
    ref_idx = torch.randperm(len(captions), generator=g)[: cfg["n_ref"]]
    reference = CaptionedImages(images[ref_idx], [captions[int(i)] for i in ref_idx])
    caption_set = CaptionedImages(cap_images, cap_texts)

    config = CLIPConfig.tiny(vocab_size=tok.vocab_size, context_length=20, vision_width=cfg["width"],
                             vision_layers=cfg["layers"], vision_heads=cfg["heads"], text_width=cfg["width"],
                             text_layers=cfg["layers"], text_heads=cfg["heads"], embed_dim=cfg["embed"])
    key = hashlib.sha256(json.dumps([repr(config), cfg["pretrain_steps"], cfg["n_pairs"], seed, tok.vocab_size],
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"tiny_clip_{key}.pt")
    torch.manual_seed(seed)
    model = CLIP(config)
    rank, world = _rank_world()
    if world > 1 and rank != 0:  # rank 0 pre-trains (or finds the cache); the others load its file
        import torch.distributed as dist

        dist.barrier()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        log(f"pre-trained tiny CLIP loaded from cache {path}")
        pretrain_seconds = 0.0
    else:
        t1 = time.time()
        losses = pretrain_clip(model, tok, pairs, steps=cfg["pretrain_steps"], batch_size=128, lr=1e-3,
                               seed=seed, progress=progress)
        pretrain_seconds = time.time() - t1
        os.makedirs(cache_dir, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        log(f"pre-trained tiny CLIP in {pretrain_seconds:.0f}s (loss {losses[0]:.2f} -> {losses[-1]:.2f}); "
            f"cached at {path}")
    if world > 1 and rank == 0:
        import torch.distributed as dist

        dist.barrier()
    model.eval()
    return tasks, tok, model, reference, caption_set, pretrain_seconds


# ------------------------------------------------------------------------------------------ real MTIL
def real_setup(args, log=print):
    """Tasks from the 11 MTIL datasets, ImageNet reference set, real CLIP and its BPE tokenizer."""
    from gnsp_optim.reference.data import imagenet_reference_set, load_mtil_dataset
    from gnsp_optim.reference.model import load_clip_state_dict, make_preprocess
    from gnsp_optim.reference.tokenizer import load_bpe_tokenizer

    cfg_path = os.path.join(ROOT, "gnsp_optim", "reference", "configs", f"mtil_order_{args.order}.json")
    with open(cfg_path) as f:
        order_cfg = json.load(f)
    model = load_clip_state_dict(args.clip)
    tok = load_bpe_tokenizer(args.bpe, context_length=model.config.context_length)
    if tok.vocab_size != model.config.vocab_size:
        raise ValueError(f"the BPE vocabulary has {tok.vocab_size} tokens but the model expects "
                         f"{model.config.vocab_size}: wrong --bpe file for these weights")
    transform = make_preprocess(model.config.image_size)
    wanted = args.tasks.split(",") if args.tasks else order_cfg["tasks"]
    unknown = [t for t in wanted if t not in order_cfg["tasks"]]
    if unknown:
        raise ValueError(f"--tasks: {unknown} are not MTIL tasks {order_cfg['tasks']}")
    tasks = []
    for name, lr, iters in zip(order_cfg["tasks"], order_cfg["lr"], order_cfg["iterations"]):
        if name not in wanted:
            continue
        iters = args.iterations or iters
        train = load_mtil_dataset(name, args.data_root, "train", transform)
        test = load_mtil_dataset(name, args.data_root, "test", transform)
        tasks.append(ContinualTask(name, list(train.classnames), list(train.templates), train, test, lr, iters))
    reference = imagenet_reference_set(args.data_root, n=args.ref_size, seed=args.seed, transform=transform)
    # the captioned reference images double as the paired set for the modality gap and retrieval
    return tasks, tok, model, reference, reference, 0.0


# ------------------------------------------------------------------------------------------ output
def write_outputs(out: str, tasks: list[str], results: dict, config: dict, seconds: float) -> None:
    payload = {"tasks": tasks, "methods": {}, "config": config, "seconds": seconds}
    for name, r in results.items():
        safe = name.replace("/", "_")
        os.makedirs(os.path.join(out, safe), exist_ok=True)
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["after \\ test"] + tasks)
        for i, row in enumerate(r["matrix"]):
            w.writerow([tasks[i]] + [f"{v:.2f}" for v in row])
        atomic_write_text(os.path.join(out, safe, "matrix.csv"), buf.getvalue())
        payload["methods"][name] = {k: r[k] for k in ("matrix", "transfer", "average", "last", "alignment",
                                                      "train_seconds")}
        payload["methods"][name]["modality_gap"] = r["alignment"][-1].get("modality_gap")
        payload["methods"][name]["retrieval_r1"] = _r1(r["alignment"][-1])
    atomic_write_text(os.path.join(out, "results.json"), json.dumps(payload, indent=2))
    try:
        plot(out, tasks, results)
    except ImportError as err:
        print(f"(plots skipped: {err}; pip install matplotlib)")


def _r1(align: dict) -> float | None:
    keys = [k for k in align if k.endswith("R@1")]
    return sum(align[k] for k in keys) / len(keys) if keys else None


def _savefig(fig, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fig.savefig(tmp, dpi=100, format="png")
    os.replace(tmp, path)


def plot(out: str, tasks: list[str], results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, r in results.items():
        fig, ax = plt.subplots(figsize=(1 + 0.7 * len(tasks), 1 + 0.6 * len(tasks)))
        im = ax.imshow(r["matrix"], vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
        ax.set_yticks(range(len(tasks)), [f"after {t}" for t in tasks])
        for i, row in enumerate(r["matrix"]):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        ax.set_title(f"{name}: Avg {r['average']:.1f} / Last {r['last']:.1f}")
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        _savefig(fig, os.path.join(out, name.replace("/", "_"), "heatmap.png"))
        plt.close(fig)
    names = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    width = 0.27
    xs = range(len(names))
    for k, key in enumerate(("transfer", "average", "last")):
        axes[0].bar([x + (k - 1) * width for x in xs], [results[n][key] for n in names], width, label=key)
    axes[0].set_xticks(list(xs), names, rotation=45, ha="right")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[0].set_title("Transfer / Average / Last")
    for n in names:
        gaps = [a.get("modality_gap") for a in results[n]["alignment"]]
        r1 = [_r1(a) for a in results[n]["alignment"]]
        axes[1].plot(range(len(gaps)), gaps, marker="o", label=n)
        axes[2].plot(range(len(r1)), r1, marker="o", label=n)
    for ax, t in ((axes[1], "modality gap (0 = before training)"), (axes[2], "retrieval R@1, mean of both ways")):
        ax.set_xlabel("tasks learnt")
        ax.set_title(t)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    _savefig(fig, os.path.join(out, "summary.png"))
    plt.close(fig)


def table(results: dict) -> str:
    head = f"{'method':<22} {'Transfer':>8} {'Average':>8} {'Last':>8} {'gap':>6} {'R@1':>6} {'train s':>8}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        gap = r["alignment"][-1].get("modality_gap")
        r1 = _r1(r["alignment"][-1])
        lines.append(f"{name:<22} {r['transfer']:>8.1f} {r['average']:>8.1f} {r['last']:>8.1f} "
                     f"{gap if gap is None else format(gap, '.3f'):>6} {r1 if r1 is None else format(r1, '.1f'):>6} "
                     f"{r['train_seconds']:>8.0f}")
    return "\n".join(lines)


def init_distributed(device: str) -> tuple[int, int]:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def diagnostics(tasks: list[str], n_classes: list[int], results: dict) -> list[str]:
    """Lines that say whether the benchmark can tell methods apart: zero-shot against chance, and forgetting
    (best accuracy on a task while training on later ones, minus the final one) per method."""
    lines = []
    if "zeroshot" in results:
        zs = results["zeroshot"]["matrix"][0]
        lines.append("zero-shot vs chance: " + ", ".join(f"{t} {a:.1f} ({100 / c:.1f})"
                                                          for t, a, c in zip(tasks, zs, n_classes)))
    for name, r in results.items():
        m = r["matrix"]
        if name == "zeroshot" or len(m) < 2:
            continue
        drops = [max(m[i][j] for i in range(j, len(m))) - m[-1][j] for j in range(len(m) - 1)]
        lines.append(f"forgetting, {name}: mean {sum(drops) / len(drops):.1f}, max {max(drops):.1f} points "
                     f"(best after learning a task minus final, tasks 1..{len(m) - 1})")
    for name, r in results.items():  # plasticity: how much each method learns at all
        m = r["matrix"]
        if name == "zeroshot" or len(m) != len(m[0]):
            continue
        learnt = sum(m[i][i] for i in range(len(m))) / len(m)
        base = ""
        if "zeroshot" in results:
            zs = results["zeroshot"]["matrix"][0]
            base = f" (zero-shot {sum(zs) / len(zs):.1f})"
        lines.append(f"learning, {name}: mean accuracy on each task right after training on it {learnt:.1f}{base}")
    return lines


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
    t0 = time.time()
    out = args.out or os.path.join("results", time.strftime("%Y%m%d-%H%M%S"))
    if world > 1 and args.out is None:
        raise SystemExit("under torchrun give --out explicitly (every rank must agree on it)")
    if rank == 0:
        os.makedirs(out, exist_ok=True)
    progress = not args.no_progress and rank == 0
    if args.data_root:
        if not args.clip:
            print("the real MTIL run needs --clip PATH (OpenAI or open_clip ViT-B/16 weights)", file=sys.stderr)
            return 2
        tasks, tok, model, reference, pairs, pre_s = real_setup(args, log)
        names = (args.methods or "zeroshot,finetune,gnsp+cd+map,gnsp+cd+map/update").split(",")
        run_kw = dict(batch_size=64, ref_batch_size=64, stats_batch_size=16,
                      warmup=100 if args.warmup is None else args.warmup)
        config = {"mode": "mtil", "order": args.order, "seed": args.seed, "clip": args.clip}
    else:
        preset = dict(PRESETS["quick" if args.quick else "default"])
        for key in ("iterations", "lr", "pretrain_steps", "shift", "batch"):
            if getattr(args, key) is not None:
                preset[key] = getattr(args, key)
        tasks, tok, model, reference, pairs, pre_s = offline_setup(preset, args.seed, args.cache_dir, progress,
                                                                   log)
        names = (args.methods or ",".join(OFFLINE_METHODS)).split(",")
        run_kw = dict(batch_size=preset["batch"], ref_batch_size=preset["ref_batch"], stats_batch_size=128,
                      warmup=preset["warmup"])
        config = {"mode": "offline", "preset": "quick" if args.quick else "default", **preset, "seed": args.seed,
                  "pretrain_seconds": pre_s}
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    results = {}
    for name in names:
        method = METHODS[name]
        if args.rho is not None:
            from dataclasses import replace

            method = replace(method, rho=args.rho)
        model.load_state_dict(initial_state)
        results[name] = run_continual(model, tok, tasks, method, reference=reference, pairs=pairs,
                                      out_dir=os.path.join(out, name.replace("/", "_")), resume=args.resume,
                                      seed=args.seed, device=args.device, progress=progress, log=log, **run_kw)
        r = results[name]
        log(f"{name:<22} Transfer {r['transfer']:5.1f}  Average {r['average']:5.1f}  Last {r['last']:5.1f}  "
              f"({r['train_seconds']:.0f}s)", flush=True)
    seconds = time.time() - t0
    config["methods"] = names
    config["processes"] = world
    if rank == 0:
        write_outputs(out, [t.name for t in tasks], results, config, seconds)
    log()
    log(table(results))
    for line in diagnostics([t.name for t in tasks], [len(t.classnames) for t in tasks], results):
        log(line)
    log(f"\n{len(tasks)} tasks; total {seconds:.0f}s (pre-training {pre_s:.0f}s); results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
