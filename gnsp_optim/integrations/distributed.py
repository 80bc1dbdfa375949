r"""``torch.distributed`` support: DDP works, sharded parameters are refused (see :mod:`gnsp_optim.sharding`).

The check lives in the core (the optimizer's constructor runs it, and the core imports nothing from
``integrations``); this module keeps its public home for framework glue.

Example:
    >>> import torch
    >>> check_model_supported(torch.nn.Sequential(torch.nn.Linear(4, 4)))
"""

from ..sharding import check_model_supported, is_sharded_parameter

__all__ = ["check_model_supported", "is_sharded_parameter"]
