"""Glue between :class:`~gnsp_optim.NullSpaceOptimizer` and training frameworks.

Each integration lives in its own module and imports its framework only when that module is imported, so
``import gnsp_optim.integrations`` never pulls in Lightning, transformers or accelerate:

- :mod:`gnsp_optim.integrations.distributed`: :func:`check_model_supported` (refuses FSDP / DTensor models);
- :mod:`gnsp_optim.integrations.lightning`: ``GNSPCallback`` for PyTorch Lightning;
- :mod:`gnsp_optim.integrations.huggingface`: ``GNSPTrainer`` and ``collect_and_end_task`` for the
  Hugging Face ``Trainer``.

Example:
    >>> import torch
    >>> from gnsp_optim.integrations.distributed import check_model_supported
    >>> check_model_supported(torch.nn.Linear(2, 2))
"""

from .distributed import check_model_supported

__all__ = ["check_model_supported"]
