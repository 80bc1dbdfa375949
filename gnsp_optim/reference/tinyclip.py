r"""The offline benchmark's tiny CLIP: its recipe, the shipped checkpoint, and the checks it must pass.

The offline mini-MTIL cannot download CLIP, so the project pre-trains its own (the ViT-B/16 model code at
width 128, 3 layers, patch 8, 32x32 images) on generated image-caption pairs, in two phases:

1. ``phase1_steps`` steps on the plain-style corpus (:func:`~.toydata.build_pretraining_pairs`);
2. ``phase2_steps`` steps continued on the same kinds of scene rendered in the tasks' style, with
   ``template_share`` of the captions written from the tasks' prompt templates, and ``single_source_share``
   of the batches drawn from one kind of scene (hard negatives).

The logit scale is learnt, as CLIP's is, and clamped at 100; it learns at ``logit_scale_lr_mult`` times the
lr because these few thousand steps are a tiny fraction of CLIP's schedule. Nothing here uses a task's test
images or training images: real images come from their ``pretrain`` share (:func:`~.toydata.real_source_split`).

``python benchmarks/mtil_clip.py --pretrain`` runs :func:`pretrain_tiny_clip` and writes the checkpoint
(half precision) and a JSON record beside it (recipe, sha256, command, time, the checks below); the default
benchmark run loads it with :func:`load_tiny_clip`, which verifies the hash, so a fresh clone needs no
pre-training.

Example:
    >>> TinyCLIPRecipe().total_steps
    2750
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import toydata
from .model import CLIP, CLIPConfig
from .pretrain import CaptionedImages, TensorImageDataset, pretrain_clip
from .tokenizer import WordTokenizer

__all__ = ["CHECKPOINT_PATH", "OfflineData", "TinyCLIPRecipe", "build_offline_data", "checkpoint_report",
           "file_sha256", "format_report", "load_tiny_clip", "make_tiny_clip", "pretrain_tiny_clip",
           "save_tiny_clip"]

#: The shipped checkpoint (fp16 weights + vocabulary) and its record (same stem, ``.json``).
CHECKPOINT_PATH = Path(__file__).with_name("checkpoints") / "tiny_clip.pt"


@dataclass(frozen=True)
class TinyCLIPRecipe:
    """Everything that decides the pre-trained tiny CLIP (its seed is apart from every fine-tuning seed).

    Example:
        >>> TinyCLIPRecipe(phase2_steps=0).total_steps
        1500
    """

    seed: int = 0
    vision_width: int = 128
    layers: int = 3
    heads: int = 4
    embed_dim: int = 64
    context_length: int = 20
    n_pairs: int = 20000
    batch_size: int = 128
    weight_decay: float = 0.1
    warmup: int = 50
    phase1_steps: int = 1500
    phase1_lr: float = 1e-3
    phase2_steps: int = 1250
    phase2_lr: float = 5e-4
    template_share: float = 0.3
    single_source_share: float = 0.5
    logit_scale_lr_mult: float = 10.0

    @property
    def total_steps(self) -> int:
        """Pre-training steps over both phases."""
        return self.phase1_steps + self.phase2_steps

    def config(self, vocab_size: int) -> CLIPConfig:
        """The model shape. Example: ``TinyCLIPRecipe().config(300).vision_width == 128``."""
        return CLIPConfig.tiny(vocab_size=vocab_size, context_length=self.context_length,
                               vision_width=self.vision_width, vision_layers=self.layers, vision_heads=self.heads,
                               text_width=self.vision_width, text_layers=self.layers, text_heads=self.heads,
                               embed_dim=self.embed_dim)


@dataclass
class OfflineData:
    """The offline benchmark's data: 7 tasks, the held-out caption set, and how reference sets are drawn.

    ``tasks`` are :class:`~.toydata.ToyTask` s; :meth:`reference_set` gives the fresh CD / MAP reference pairs of
    one task (``n_reference`` images never pre-trained on, drawn with a per-task seed).
    """

    tasks: list[toydata.ToyTask]
    caption_set: CaptionedImages
    n_reference: int = 1000
    settings: dict[str, Any] = field(default_factory=dict)

    def reference_set(self, task_index: int, seed: int) -> CaptionedImages:
        """Reference pairs for task ``task_index`` of fine-tuning seed ``seed``.

        Example::

            ref = data.reference_set(0, seed=1)   # 1,000 pairs, 'a photo of a digit seven.' style
        """
        images, captions = toydata.build_reference_set(n=self.n_reference, seed=10_000 * (seed + 1) + task_index)
        return CaptionedImages(images, captions)


def build_offline_data(n_train: int = 600, n_test: int = 1000, n_caption: int = 500, n_reference: int = 1000,
                       shift: float = 1.0, task_seed: int = 0) -> OfflineData:
    """Tasks (``n_train`` / ``n_test`` per task; digits capped by its source at about 720 / 450), caption set.

    Example:
        >>> d = build_offline_data(n_train=20, n_test=20, n_caption=16, n_reference=8)
        >>> [t.name for t in d.tasks][:3], len(d.caption_set)
        (['shapes', 'digits', 'colors'], 16)
    """
    tasks = toydata.build_tasks(n_train=n_train, n_test=n_test, seed=task_seed, shift=shift)
    cap_images, cap_texts = toydata.build_caption_set(n=n_caption, seed=1)
    settings = dict(n_train=n_train, n_test=n_test, n_caption=n_caption, n_reference=n_reference, shift=shift,
                    task_seed=task_seed)
    return OfflineData(tasks, CaptionedImages(cap_images, cap_texts), n_reference, settings)


def _vocabulary_texts(recipe: TinyCLIPRecipe, corpora: list[list[str]]) -> list[str]:
    tasks = toydata.build_tasks(n_train=8, n_test=8, seed=0)  # only class names and templates are read
    reference = [toydata.reference_caption(name) for name in toydata.reference_classnames()]
    captions = [c for corpus in corpora for c in corpus]
    return toydata.all_texts(tasks, captions + reference + toydata.build_caption_set(n=500, seed=1)[1])


def pretrain_tiny_clip(recipe: TinyCLIPRecipe = TinyCLIPRecipe(), progress: bool = True,
                       log=print) -> tuple[CLIP, WordTokenizer, dict[str, Any]]:
    """Pre-train the tiny CLIP from scratch; returns ``(model, tokenizer, record)`` (record: curves, seconds).

    Example::

        model, tok, record = pretrain_tiny_clip()        # about 10-20 min on 2 CPU cores
    """
    t0 = time.time()
    img1, cap1, meta1 = toydata.build_pretraining_pairs(n=recipe.n_pairs, seed=recipe.seed, return_meta=True)
    img2, cap2, meta2 = toydata.build_pretraining_pairs(n=recipe.n_pairs, seed=recipe.seed, return_meta=True,
                                                        style="task", template_share=recipe.template_share)
    tok = WordTokenizer.from_texts(_vocabulary_texts(recipe, [cap1, cap2]), recipe.context_length)
    data_seconds = time.time() - t0
    log(f"pre-training data: 2 x {recipe.n_pairs} pairs, vocabulary {tok.vocab_size} ({data_seconds:.0f}s)")
    torch.manual_seed(recipe.seed)
    model = CLIP(recipe.config(tok.vocab_size))
    t1 = time.time()
    common = dict(batch_size=recipe.batch_size, weight_decay=recipe.weight_decay, warmup=recipe.warmup,
                  progress=progress)
    c1 = pretrain_clip(model, tok, CaptionedImages(img1, cap1, meta1["source"]), steps=recipe.phase1_steps,
                       lr=recipe.phase1_lr, logit_scale_lr=recipe.phase1_lr * recipe.logit_scale_lr_mult,
                       seed=recipe.seed, desc="pretrain 1/2 (plain)", **common)
    s1 = time.time() - t1
    log(f"phase 1: {recipe.phase1_steps} steps in {s1:.0f}s, loss {c1['loss'][0]:.2f} -> {c1['loss'][-1]:.2f}, "
        f"logit scale {c1['logit_scale'][-1]:.1f}")
    c2: dict[str, list[float]] = {"loss": [], "logit_scale": []}
    if recipe.phase2_steps:
        c2 = pretrain_clip(model, tok, CaptionedImages(img2, cap2, meta2["source"]), steps=recipe.phase2_steps,
                           lr=recipe.phase2_lr, logit_scale_lr=recipe.phase2_lr * recipe.logit_scale_lr_mult,
                           seed=recipe.seed + 1, single_source_share=recipe.single_source_share,
                           desc="pretrain 2/2 (task style)", **common)
        log(f"phase 2: {recipe.phase2_steps} steps, loss {c2['loss'][0]:.2f} -> {c2['loss'][-1]:.2f}, "
            f"logit scale {c2['logit_scale'][-1]:.1f}")
    seconds = time.time() - t1
    record = {"recipe": asdict(recipe), "train_seconds": seconds, "data_seconds": data_seconds,
              "threads": torch.get_num_threads(),
              "loss_curve": [round(x, 4) for x in c1["loss"][::25] + c2["loss"][::25]],
              "logit_scale_curve": [round(x, 3) for x in c1["logit_scale"][::25] + c2["logit_scale"][::25]]}
    return model.eval(), tok, record


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file. Example: ``file_sha256(CHECKPOINT_PATH)``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tiny_clip(model: CLIP, tok: WordTokenizer, record: dict[str, Any],
                   path: str | os.PathLike = CHECKPOINT_PATH) -> dict[str, Any]:
    """Write the fp16 checkpoint at ``path`` and its record (``record`` + sha256 + size) at ``path.json``.

    Written through temporary files and renames (never half-written). Returns the full record.

    Example::

        save_tiny_clip(model, tok, record, "/tmp/tiny_clip.pt")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state_dict": {k: v.detach().to(torch.float16) if v.is_floating_point() else v
                              for k, v in model.state_dict().items()},
               "vocab": list(tok.vocab), "context_length": tok.context_length, "config": asdict(model.config)}
    tmp = path.with_suffix(f".tmp.{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    full = {**record, "file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    meta_tmp = path.with_suffix(f".json.tmp.{os.getpid()}")
    meta_tmp.write_text(json.dumps(full, indent=2) + "\n")
    os.replace(meta_tmp, path.with_suffix(".json"))
    return full


def load_tiny_clip(path: str | os.PathLike = CHECKPOINT_PATH, verify: bool = True
                   ) -> tuple[CLIP, WordTokenizer, dict[str, Any]]:
    """The float32 model, its tokenizer and its record; ``verify`` checks the file against the recorded sha256.

    Raises ``FileNotFoundError`` (with the command that makes it) when the checkpoint is missing and
    ``ValueError`` when its hash differs from the record.

    Example:
        >>> model, tok, record = load_tiny_clip()  # doctest: +SKIP
        >>> record["sha256"][:8], model.config.vision_width  # doctest: +SKIP
    """
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(f"no tiny CLIP checkpoint at {path} (+ .json); make one with "
                                "`python benchmarks/mtil_clip.py --pretrain`")
    record = json.loads(meta_path.read_text())
    if verify:
        digest = file_sha256(path)
        if digest != record.get("sha256"):
            raise ValueError(f"{path}: sha256 {digest} differs from the recorded {record.get('sha256')} "
                             f"({meta_path.name}); the file is corrupt or was replaced")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = CLIP(CLIPConfig(**payload["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()})
    return model.eval(), WordTokenizer(payload["vocab"], payload["context_length"]), record


@torch.no_grad()
def _features(model: CLIP, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    ds = TensorImageDataset(images, torch.zeros(len(images), dtype=torch.long))
    out = [model.encode_image(ds.batch(torch.arange(s, min(len(ds), s + batch)))[0]) for s in range(0, len(ds), batch)]
    return F.normalize(torch.cat(out).float(), dim=-1)


@torch.no_grad()
def checkpoint_report(model: CLIP, tok: WordTokenizer, tasks: list[toydata.ToyTask],
                      probe: bool = True) -> dict[str, Any]:
    """What makes the checkpoint a usable stand-in for CLIP, measured on the tasks' held-out test sets.

    Per task: zero-shot top-1 (full template ensemble), chance, their ratio; the largest cosine between two
    class prompts (first template: near 1 means the text tower cannot tell the classes apart); a linear probe
    on the frozen image features (logistic regression fit on the task's training images; needs scikit-learn).

    Example::

        checkpoint_report(model, tok, build_offline_data().tasks)["zeroshot_mean"]
    """
    from .metrics import zeroshot_classifier

    model.eval()
    rows = []
    for t in tasks:
        classifier = zeroshot_classifier(model, tok, t.classnames, t.templates, "cpu")
        test = _features(model, t.test_images)
        acc = 100.0 * float(((test @ classifier.T).argmax(-1) == t.test_labels).float().mean())
        prompts = F.normalize(model.encode_text(tok(t.prompts(0))).float(), dim=-1)
        cos = prompts @ prompts.T
        cos.fill_diagonal_(-1.0)
        row = {"task": t.name, "n_test": len(t.test_labels), "zeroshot": acc, "chance": 100.0 / t.num_classes,
               "x_chance": acc * t.num_classes / 100.0, "max_prompt_cosine": float(cos.max())}
        if probe:
            try:
                from sklearn.linear_model import LogisticRegression
            except ImportError:
                probe = False
            else:
                clf = LogisticRegression(max_iter=2000, C=10.0)
                clf.fit(_features(model, t.train_images).numpy(), t.train_labels.numpy())
                row["linear_probe"] = 100.0 * float(clf.score(test.numpy(), t.test_labels.numpy()))
        rows.append(row)
    out: dict[str, Any] = {"tasks": rows, "zeroshot_mean": sum(r["zeroshot"] for r in rows) / len(rows),
                           "min_x_chance": min(r["x_chance"] for r in rows),
                           "logit_scale": float(model.logit_scale.detach().exp())}
    if probe:
        out["linear_probe_mean"] = sum(r["linear_probe"] for r in rows) / len(rows)
    return out


def format_report(report: dict[str, Any]) -> str:
    """The checks as a small table. Example: ``print(format_report(checkpoint_report(model, tok, tasks)))``."""
    lines = [f"{'task':<10} {'n_test':>6} {'zero-shot':>9} {'chance':>6} {'x chance':>8} {'max cos':>7} "
             f"{'probe':>6}"]
    for r in report["tasks"]:
        lines.append(f"{r['task']:<10} {r['n_test']:>6} {r['zeroshot']:>9.1f} {r['chance']:>6.1f} "
                     f"{r['x_chance']:>8.2f} {r['max_prompt_cosine']:>7.3f} "
                     f"{r.get('linear_probe', float('nan')):>6.1f}")
    lines.append(f"zero-shot mean {report['zeroshot_mean']:.1f}; every task >= {report['min_x_chance']:.2f}x chance; "
                 f"logit scale {report['logit_scale']:.1f}"
                 + (f"; linear probe mean {report['linear_probe_mean']:.1f}" if "linear_probe_mean" in report else ""))
    return "\n".join(lines)


def make_tiny_clip(recipe: TinyCLIPRecipe = TinyCLIPRecipe(), path: str | os.PathLike = CHECKPOINT_PATH,
                   command: str = "python benchmarks/mtil_clip.py --pretrain", progress: bool = True,
                   data: OfflineData | None = None, log=print) -> dict[str, Any]:
    """Pre-train, check on the benchmark's held-out test sets, write checkpoint + record; returns the record.

    Example::

        record = make_tiny_clip()             # what `python benchmarks/mtil_clip.py --pretrain` runs
        record["report"]["zeroshot_mean"]
    """
    model, tok, record = pretrain_tiny_clip(recipe, progress=progress, log=log)
    data = data if data is not None else build_offline_data()
    report = checkpoint_report(model, tok, data.tasks)
    log(format_report(report))
    record.update({"command": command, "torch": torch.__version__, "report": report,
                   "data": data.settings, "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    full = save_tiny_clip(model, tok, record, path)
    log(f"wrote {path} ({full['bytes'] / 1e6:.1f} MB, sha256 {full['sha256'][:16]}...)")
    return full
