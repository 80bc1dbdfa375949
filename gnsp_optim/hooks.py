r"""Forward hooks: while a collection is open, every call of an observed module feeds its blocks' statistics.

Data path, step 1 of 5 (**hook** -> statistics -> end_task -> rule + eigh -> projector -> step): one forward
hook per observed module (:class:`ModuleObserver`); it wraps the call in a :class:`~.kinds.Call` and asks each
block's kind to :meth:`~.kinds.LayerKind.observe` it. Outside a collection (the :class:`Gate` closed) a hook
returns at once. The hooks hold the blocks and the gate, never the optimizer.

Lifecycle: :meth:`Hooks.remove` uninstalls them (the optimizer's ``remove_hooks()``, its ``with`` form, and a
finalizer when the optimizer is garbage-collected call it). An observer fires only for the module object it
was installed on, so a ``copy.deepcopy(model)`` (which copies the hook dicts) never feeds the original's
statistics; it deep-copies as itself and pickles as an inert hook, so ``torch.save(model)`` works.

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

import weakref
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from .boundary import _InertHook
from .kinds import Block, Call, is_recomputing

__all__ = ["Gate", "ModuleObserver", "Hooks"]


@dataclass
class Gate:
    """Whether a collection is open (``open``); shared by the optimizer and its hooks."""

    open: bool = False


class ModuleObserver:
    """The forward hook of one module: feeds the statistics of the blocks that module's calls observe."""

    def __init__(self, blocks: list[Block], gate: Gate, module: nn.Module) -> None:
        self.blocks, self.gate, self.module = blocks, gate, weakref.ref(module)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        if not self.gate.open or is_recomputing(module):  # attention replaying a call for out_proj's input
            return
        if module is not self.module():  # a deep copy of the model carries this hook: not our data
            return
        call = Call(module, args, kwargs, output)
        for b in self.blocks:
            b.kind.observe(b, call)

    def __deepcopy__(self, memo: dict) -> ModuleObserver:
        return self  # the copy's calls are ignored (identity check above); never copy the statistics

    def __reduce__(self) -> tuple[Any, tuple]:
        return _InertHook, ()  # torch.save(model): the hook is saved as one that does nothing


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
        return cls([mod.register_forward_hook(ModuleObserver(group, gate, mod), with_kwargs=True, prepend=True)
                    for mod, group in by_module.values()])

    def replace(self, blocks: list[Block], gate: Gate) -> None:
        """Uninstall these hooks and install those of ``blocks`` into the same object (finalizers keep it)."""
        self.remove()
        self.handles.extend(Hooks.install(blocks, gate).handles)

    def remove(self) -> None:
        """Uninstall every hook (idempotent)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
