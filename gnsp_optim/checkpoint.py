r"""Checkpoints of the protection state: packing, and validation before anything is restored.

:meth:`NullSpaceOptimizer.state_dict` stores, next to the base optimizer's state dict, a ``"gnsp"`` entry
keyed by layer and parameter *names* (never ids), so a checkpoint moves between processes, DDP and a single
process. :func:`check_protection_state` compares it with the blocks of the model at hand and raises
``ValueError`` naming the first mismatch before anything changes. A bounded (sketch) statistic is stored as
its :meth:`~.sketch.SketchStat.state_dict` under ``"sketch"`` (``"memory"`` is then None).

Under FSDP2 the base optimizer's state is sharded: :func:`base_state_dict` gathers it into a *full*,
name-keyed state dict (every rank must call it; save from rank 0) and :func:`load_base_state_dict` loads
either kind (id-keyed from one process, name-keyed from a sharded run) into either kind of run, so a
checkpoint moves from FSDP2 to one process and back.

Example:
    >>> import torch
    >>> from gnsp_optim import NullSpaceOptimizer
    >>> model = torch.nn.Linear(3, 2)
    >>> opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    >>> sorted(pack_protection_state(opt.blocks, {}, tasks_seen=0, mode="grad", frozen=[]))
    ['base_keys', 'blocks', 'format_version', 'frozen', 'mode', 'projectors', 'tasks_seen']
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .fsdp import is_dtensor
from .kinds import Block
from .projector import Projector
from .selection import clean_name
from .sketch import SketchStat

__all__ = ["FORMAT_VERSION", "pack_protection_state", "check_protection_state", "restore_protection_state",
           "base_state_dict", "load_base_state_dict"]

#: 2: bounded (sketch) statistics and name-keyed base state (FSDP2); version 1 checkpoints still load
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


def _pack_block(b: Block) -> dict[str, Any]:
    rec = {"weight": b.weight_name, "bias": b.bias_name, "dim": b.stat.dim, "groups": b.groups,
           "memory": b.stat.memory, "tasks_folded": b.stat.tasks_folded}
    if isinstance(b.stat, SketchStat):
        rec["memory"], rec["sketch"] = None, b.stat.state_dict()
    return rec


def pack_protection_state(blocks: list[Block], projectors: dict[str, Projector], *, tasks_seen: int, mode: str,
                          frozen: list[str], base_keys: str = "ids") -> dict[str, Any]:
    """The ``"gnsp"`` entry of a state dict: per block its names, memory and projector (tensors, not copies).

    ``base_keys``: how the base optimizer's state next to it is keyed (``"ids"``: ``Optimizer.state_dict``;
    ``"names"``: the full, name-keyed state of a sharded run, :func:`base_state_dict`).
    """
    stats = {b.name: _pack_block(b) for b in blocks}
    projs = {name: {"form": p.form, "basis": p.basis, "kept_ranks": list(p.kept_ranks), "dim": p.dim,
                    "eigenvalues": p.eigenvalues} for name, p in projectors.items()}
    return {"format_version": FORMAT_VERSION, "tasks_seen": tasks_seen, "mode": mode, "blocks": stats,
            "projectors": projs, "frozen": list(frozen), "base_keys": base_keys}


def check_protection_state(state: dict[str, Any], blocks: list[Block], param_names: set[str]) -> None:
    """Raise ``ValueError`` naming the first way ``state`` does not fit these blocks (or an unknown version)."""
    version = state.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unknown gnsp state format version {version!r} (this library reads "
                         f"{', '.join(map(str, READABLE_VERSIONS))})")
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
    saved_sketch, sketch_here = rec.get("sketch") is not None, isinstance(b.stat, SketchStat)
    if saved_sketch != sketch_here:
        kinds = ("exact", "sketch")
        raise ValueError(f"layer {name!r}: saved with statistics={kinds[saved_sketch]!r}, this optimizer keeps "
                         f"statistics={kinds[sketch_here]!r} for it (build it with the statistics= and "
                         "sketch_min_width= the checkpoint was written with)")
    if sketch_here:
        mine = ("frequent_directions", b.stat.dim, b.stat.rank, b.stat.groups)
        theirs = tuple(rec["sketch"].get(k) for k in ("kind", "dim", "rank", "groups"))
        if mine != theirs:
            raise ValueError(f"layer {name!r}: saved sketch (kind, dim, rank, groups) = {theirs}, this one {mine} "
                             "(sketch_rank= differs?)")
        return
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
        if isinstance(st, SketchStat):
            st.load_state_dict(rec["sketch"])
            continue
        st.memory = None if rec["memory"] is None else rec["memory"].to(st.dtype).clone()
        st.tasks_folded = rec["tasks_folded"]
        st.clear_task()
    projectors = {}
    for name, rec in state["projectors"].items():
        w = mine[name].weight
        projectors[name] = Projector(rec["form"], rec["basis"].to(device=w.device, dtype=w.dtype),
                                     list(rec["kept_ranks"]), rec["dim"], rec.get("eigenvalues"))
    return projectors


# ---------------------------------------------------------------------------------------- base optimizer state
def _is_sharded(base: torch.optim.Optimizer) -> bool:
    return any(is_dtensor(p) for g in base.param_groups for p in g["params"])


def _group_names(model: nn.Module, base: torch.optim.Optimizer) -> list[list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in base.param_groups]


def _rekeyed(state: dict[str, Any], groups: list[list], mine: list[list]) -> dict[str, Any]:
    """``state`` keyed as ``mine`` instead of ``groups`` (the same parameters, group by group, in order)."""
    if [len(g) for g in groups] != [len(g) for g in mine]:
        raise ValueError(f"base optimizer state has parameter groups of sizes {[len(g) for g in groups]}, this "
                         f"optimizer {[len(g) for g in mine]}")
    new_key = {k: m for g, gm in zip(groups, mine, strict=True) for k, m in zip(g, gm, strict=True)}
    return {"state": {new_key[k]: v for k, v in state["state"].items()},
            "param_groups": [dict(pg, params=gm) for pg, gm in zip(state["param_groups"], mine, strict=True)]}


def _ids_from_names(state: dict[str, Any], names: list[list[str]]) -> dict[str, Any]:
    """A name-keyed (FSDP2 full) state dict as ``Optimizer.load_state_dict`` reads it, matched by name."""
    flat = [clean_name(n) for g in names for n in g]
    index = {n: i for i, n in enumerate(flat)}
    unknown = sorted(set(map(clean_name, state["state"])) - set(index))
    if unknown:
        raise ValueError(f"base optimizer state names parameters this optimizer does not train: {unknown[:5]}")
    ids, start = [], 0
    for g in names:
        ids.append(list(range(start, start + len(g))))
        start += len(g)
    if len(state["param_groups"]) != len(ids):
        raise ValueError(f"base optimizer state has {len(state['param_groups'])} parameter groups, this "
                         f"optimizer {len(ids)}")
    return {"state": {index[clean_name(k)]: v for k, v in state["state"].items()},
            "param_groups": [dict(pg, params=g) for pg, g in zip(state["param_groups"], ids, strict=True)]}


def _full_options(strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, strict=strict)


def base_state_dict(model: nn.Module, base: torch.optim.Optimizer) -> tuple[dict[str, Any], str]:
    """``(state dict, keys)`` of the base optimizer: ``Optimizer.state_dict()`` (``"ids"``) in a plain run; under
    FSDP2 the full state gathered into plain tensors, keyed by parameter names (``"names"``; a collective:
    every rank calls it)."""
    if not _is_sharded(base):
        return base.state_dict(), "ids"
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, base, options=_full_options()), "names"


def load_base_state_dict(model: nn.Module, base: torch.optim.Optimizer, state: dict[str, Any], keys: str) -> None:
    """Load :func:`base_state_dict`'s output of either kind into a plain or an FSDP2 run (there a collective)."""
    if keys not in ("ids", "names"):
        raise ValueError(f"unknown base_keys {keys!r} (expected 'ids' or 'names')")
    names = _group_names(model, base)
    if _is_sharded(base):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if keys == "ids":
            state = _rekeyed(state, [g["params"] for g in state["param_groups"]], names)
        # a copy: the shards set_optimizer_state_dict keeps are views of the tensors it is given (which may be
        # another optimizer's live state: Optimizer.load_state_dict copies for the same reason)
        # strict=False: a parameter that never had a step (frozen: no gradient) has no state, as in one process
        set_optimizer_state_dict(model, base, copy.deepcopy(state), options=_full_options(strict=False))
        return
    if keys == "names":
        state = _ids_from_names(state, names)
    base.load_state_dict(state)
