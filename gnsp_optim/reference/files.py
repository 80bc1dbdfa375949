"""Crash-safe file writes for runs that may be killed at any moment: nothing is ever half-written.

Example:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.txt")
    >>> atomic_write_text(path, "done")
    >>> open(path).read()
    'done'
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

__all__ = ["append_log", "atomic_save", "atomic_write_text"]


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through a temporary file and a rename."""
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def append_log(path: str, record: dict, keep_before: int) -> None:
    """Append one JSON line, first dropping lines of tasks >= ``keep_before`` left by a killed run.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "log.jsonl")
        >>> append_log(p, {"task": 0}, 0); append_log(p, {"task": 1}, 1); append_log(p, {"task": 1}, 1)
        >>> open(p).read().count("task")
        2
    """
    lines = []
    if os.path.exists(path):
        with open(path) as f:
            lines = [ln for ln in f.read().splitlines() if ln.strip() and json.loads(ln)["task"] < keep_before]
    lines.append(json.dumps(record))
    atomic_write_text(path, "\n".join(lines) + "\n")
