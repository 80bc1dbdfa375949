r"""Forward hooks: while a collection is open, every call of an observed module feeds its blocks' statistics.

Data path, step 1 of 5 (**hook** -> statistics -> end_task -> rule + eigh -> projector -> step): one forward
hook per observed module (:class:`ModuleObserver`); it wraps the call in a :class:`~.kinds.Call` and asks each
block's kind to :meth:`~.kinds.LayerKind.observe` it. Outside a collection (the :class:`Gate` closed) a hook
returns at once. The hooks hold the blocks and the gate, never the optimizer.

Example:
    >>> import torch
    >>> from gnsp_optim.kinds import discover_blocks
    >>> lin = torch.nn.Linear(3, 2)
    >>> blocks, gate = discover_blocks(lin, {}), Gate()
    >>> hooks = Hooks.install(blocks, gate)
    >>> gate.open = True
    >>> _ = lin(torch.ones(4, 3))
    >>> blocks[0].stat.task_count
    4
    >>> hooks.remove()
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from torch.utils.hooks import RemovableHandle

from .kinds import Block, Call, is_recomputing

__all__ = ["Gate", "ModuleObserver", "Hooks"]


@dataclass
class Gate:
    """Whether a collection is open (``open``); shared by the optimizer and its hooks."""

    open: bool = False


class ModuleObserver:
    """The forward hook of one module: feeds the statistics of the blocks that module's calls observe."""

    def __init__(self, blocks: list[Block], gate: Gate) -> None:
        self.blocks, self.gate = blocks, gate

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.gate.open or is_recomputing(module):  # attention replaying a call for out_proj's input
            return
        call = Call(module, args, kwargs, output)
        for b in self.blocks:
            b.kind.observe(b, call)


@dataclass
class Hooks:
    """The installed observers and their handles; :meth:`remove` uninstalls them all."""

    handles: list[RemovableHandle] = field(default_factory=list)

    @classmethod
    def install(cls, blocks: list[Block], gate: Gate) -> Hooks:
        """One :class:`ModuleObserver` per distinct ``block.module`` (blocks keep their order within it)."""
        by_module: dict[int, tuple[nn.Module, list[Block]]] = {}
        for b in blocks:
            by_module.setdefault(id(b.module), (b.module, []))[1].append(b)
        # prepend: run before FSDP2's post-forward reshard of a fully_shard-ed module, so attention's
        # recomputation of out_proj's input sees whole parameters, not DTensor shards
        return cls([mod.register_forward_hook(ModuleObserver(group, gate), with_kwargs=True, prepend=True)
                    for mod, group in by_module.values()])

    def remove(self) -> None:
        """Uninstall every hook (idempotent)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
