r"""Checkpoints of the protection state: packing, and validation before anything is restored.

:meth:`NullSpaceOptimizer.state_dict` stores, next to the base optimizer's state dict, a ``"gnsp"`` entry
keyed by layer and parameter *names* (never ids), so a checkpoint moves between processes, DDP and a single
process. :func:`check_protection_state` compares it with the blocks of the model at hand and raises
``ValueError`` naming the first mismatch before anything changes.

Example:
    >>> import torch
    >>> from gnsp_optim import NullSpaceOptimizer
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    >>> sorted(pack_protection_state(opt.blocks, {}, tasks_seen=0, mode="grad", frozen=[]))
    ['blocks', 'format_version', 'frozen', 'mode', 'projectors', 'tasks_seen']
"""

from __future__ import annotations

from typing import Any

from .kinds import Block
from .projector import Projector

__all__ = ["FORMAT_VERSION", "pack_protection_state", "check_protection_state", "restore_protection_state"]

FORMAT_VERSION = 1


def pack_protection_state(blocks: list[Block], projectors: dict[str, Projector], *, tasks_seen: int, mode: str,
                          frozen: list[str]) -> dict[str, Any]:
    """The ``"gnsp"`` entry of a state dict: per block its names, memory and projector (tensors, not copies)."""
    stats = {b.name: {"weight": b.weight_name, "bias": b.bias_name, "dim": b.stat.dim, "groups": b.groups,
                      "memory": b.stat.memory, "tasks_folded": b.stat.tasks_folded} for b in blocks}
    projs = {name: {"form": p.form, "basis": p.basis, "kept_ranks": list(p.kept_ranks), "dim": p.dim,
                    "eigenvalues": p.eigenvalues} for name, p in projectors.items()}
    return {"format_version": FORMAT_VERSION, "tasks_seen": tasks_seen, "mode": mode, "blocks": stats,
            "projectors": projs, "frozen": list(frozen)}


def check_protection_state(state: dict[str, Any], blocks: list[Block], param_names: set[str]) -> None:
    """Raise ``ValueError`` naming the first way ``state`` does not fit these blocks (or an unknown version)."""
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"unknown gnsp state format version {version!r} (this library reads {FORMAT_VERSION})")
    mine = {b.name: b for b in blocks}
    theirs = state["blocks"]
    if set(theirs) != set(mine):
        missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
        raise ValueError(f"state dict protects other layers: missing {missing}, unexpected {extra}")
    for name, rec in theirs.items():
        _check_block(name, rec, mine[name])
    for name, rec in state["projectors"].items():
        if name not in mine:
            raise ValueError(f"state dict has a projector for unknown layer {name!r}")
        if rec["dim"] != mine[name].projector_dim:
            raise ValueError(f"layer {name!r}: saved projector acts on {rec['dim']} inputs, this model's "
                             f"on {mine[name].projector_dim}")
    unknown = [n for n in state["frozen"] if n not in param_names and not n.startswith("<")]
    if unknown:
        raise ValueError(f"state dict freezes parameters this model does not have: {unknown}")


def _check_block(name: str, rec: dict[str, Any], b: Block) -> None:
    if (rec["weight"], rec["bias"], rec["dim"], rec["groups"]) != (b.weight_name, b.bias_name, b.stat.dim,
                                                                  b.groups):
        raise ValueError(f"layer {name!r}: saved as weight={rec['weight']!r} bias={rec['bias']!r} "
                         f"dim={rec['dim']} groups={rec['groups']}, but this model has "
                         f"weight={b.weight_name!r} bias={b.bias_name!r} dim={b.stat.dim} groups={b.groups}")
    mem = rec["memory"]
    if mem is not None and tuple(mem.shape) != b.kind.memory_shape(b):
        raise ValueError(f"layer {name!r}: saved memory has shape {tuple(mem.shape)}")


def restore_protection_state(state: dict[str, Any], blocks: list[Block]) -> dict[str, Projector]:
    """Load memories into the blocks' statistics (current collections are dropped); returns the projectors.

    Call :func:`check_protection_state` first: this function assumes the state fits.
    """
    mine = {b.name: b for b in blocks}
    for name, rec in state["blocks"].items():
        st = mine[name].stat
        st.memory = None if rec["memory"] is None else rec["memory"].to(st.dtype).clone()
        st.tasks_folded = rec["tasks_folded"]
        st.clear_task()
    projectors = {}
    for name, rec in state["projectors"].items():
        w = mine[name].weight
        projectors[name] = Projector(rec["form"], rec["basis"].to(device=w.device, dtype=w.dtype),
                                     list(rec["kept_ranks"]), rec["dim"], rec.get("eigenvalues"))
    return projectors
