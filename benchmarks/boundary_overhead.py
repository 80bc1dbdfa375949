"""What the issue-13 safety nets cost, side by side in one run (ratios; absolute times for context only).

1. ``OutsideUseDetector`` open during a no-grad forward (the ``collect()`` pass) against the same forward;
2. a ``ProtectionMonitor`` check (a forward over ``sample`` old rows) against one AdamW training step on a
   batch, i.e. what ``every=N`` adds per step is (check / step) / N.

Model: a small pre-norm transformer encoder (``nn.TransformerEncoder``, width ``--width``, 4 layers) on
``--batch`` x 32 tokens, float32, one thread. Variants interleave round by round; the median is kept.

Run::

    python benchmarks/boundary_overhead.py            # width 256
    python benchmarks/boundary_overhead.py --quick    # width 64, seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gnsp_optim.monitor import ProtectionMonitor
from gnsp_optim.outside_use import OutsideUseDetector


def timed(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sample", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.width, args.rounds = 64, 5
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = args.width
    layer = nn.TransformerEncoderLayer(w, 4, 4 * w, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), nn.Linear(w, 10))
    x = torch.randn(args.batch, 32, w)
    names = [n for n, _ in model.named_parameters()]
    det = OutsideUseDetector(model, names)

    def plain():
        with torch.no_grad():
            model(x)

    def detected():
        with det, torch.no_grad():
            model(x)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    mon = ProtectionMonitor(model, every=1, tol=float("inf"), sample=args.sample)
    mon.add_task(torch.randn(args.sample, 32, w))
    rows = {"forward": [], "forward+detector": [], "train step": [], "monitor check": []}
    for r in range(args.rounds):
        order = [("forward", plain), ("forward+detector", detected), ("train step", step),
                 ("monitor check", mon.check)]
        order = order[r % 4:] + order[: r % 4]
        for name, fn in order:
            rows[name].append(timed(fn, 1))
    med = {k: statistics.median(v) for k, v in rows.items()}
    for k, v in med.items():
        print(f"{k:18s} {v * 1e3:9.2f} ms")
    print(f"detector / plain forward      : {med['forward+detector'] / med['forward']:.2f}x  (outside uses: "
          f"{len(det.outside)})")
    ratio = med["monitor check"] / med["train step"]
    print(f"monitor check / train step    : {ratio:.2f}  (sample {args.sample}, batch {args.batch}); "
          f"per step with every=100: +{ratio:.2f}%")


if __name__ == "__main__":
    main()
