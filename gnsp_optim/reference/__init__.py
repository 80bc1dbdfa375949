"""The GNSP recipe for CLIP: models, tokenizers, losses, MTIL data, the continual loop and its metrics.

Nothing in the core package (:mod:`gnsp_optim`) imports this subpackage; heavier optional packages
(Pillow, tqdm, matplotlib, open_clip) are imported lazily inside the functions that need them.
"""
