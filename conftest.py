"""Root pytest configuration: the package's docstring examples run as doctests beside tests/.

Modules whose optional framework is not installed are left out of doctest collection (their tests skip).
"""

import importlib.util

collect_ignore = ["benchmarks", "examples"]
if importlib.util.find_spec("lightning") is None and importlib.util.find_spec("pytorch_lightning") is None:
    collect_ignore.append("gnsp_optim/integrations/lightning.py")
if importlib.util.find_spec("transformers") is None:
    collect_ignore.append("gnsp_optim/integrations/huggingface.py")
