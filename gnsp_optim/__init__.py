r"""gnsp_optim: continual fine-tuning without forgetting, for any PyTorch optimizer.

Wrap an optimizer in one line; after each task, show the wrapper the task's data and call ``end_task()``;
later steps cannot move the model's outputs on that data (GNSP, arXiv 2507.19839).

Example:
    >>> import torch
    >>> from gnsp_optim import NullSpaceOptimizer
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = NullSpaceOptimizer(torch.optim.AdamW(model.parameters()), model, mode="update")
"""

from .kinds import FeatureSource
from .monitor import ProtectionMonitor
from .optimizer import FORMAT_VERSION, NullSpaceOptimizer
from .projector import Projector
from .selection import GNSP_CLIP_VISUAL
from .subspace import CumulativeEnergy, FixedRank, RelativeEigenvalue, TailEnergy

__version__ = "0.1.0"

__all__ = [
    "NullSpaceOptimizer",
    "FeatureSource",
    "GNSP_CLIP_VISUAL",
    "TailEnergy",
    "CumulativeEnergy",
    "RelativeEigenvalue",
    "FixedRank",
    "Projector",
    "ProtectionMonitor",
    "FORMAT_VERSION",
    "__version__",
]
