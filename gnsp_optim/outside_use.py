r"""Detect protected parameters used outside the module call whose hook records their input.

A block's statistic comes from a forward hook on the module that owns the weight. If the model also uses the
weight elsewhere (``F.linear(h, self.fc.weight)`` in a parent's ``forward``, a weight read by a custom
kernel, a tied head written as ``h @ emb.weight.T``), the inputs of that use are never recorded and its
outputs move under projected steps, silently. :class:`OutsideUseDetector` is a
:class:`torch.overrides.TorchFunctionMode`, open during ``collect()``, that sees every torch op; an op with a
protected parameter among its arguments while none of that parameter's owning modules is inside its
``forward`` is recorded as an outside use, by parameter name and op.

Which module calls count as "inside" for a parameter: the modules that hold it (two for a tied weight), and
for the ``out_proj`` of an ``nn.MultiheadAttention`` (whose ``forward`` never runs: the attention module
reads its parameters in its own ``forward``) the attention module. A mapping ``{name: [module names]}``
says it explicitly (what the core passes: the module whose hook records that block). Parameters of bare
matmul blocks (``FeatureSource``) are used outside their observed module by design: do not pass them.

Metadata reads (``.shape``, ``.dtype``, ``.device``, ``.size()``, ``.dim()``, ...) are not uses. Ops run by
the wrapper's own hooks happen inside the owning module's call (forward hooks run before the call is
popped), so they are not reported.

Cost: while open, every torch op pays one Python call plus a scan of its arguments (a few microseconds
per op; a forward of many small ops can be several times slower). ``first_calls=n`` bounds it: the mode
leaves after the model's ``n``-th forward call has finished (outside uses are a property of the code path,
which the first call of a collection already runs), so a long ``collect()`` pays it once. Under
``torch.compile`` the mode causes graph breaks; open it on the eager model.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.fc = torch.nn.Linear(3, 3)
    ...     def forward(self, x):
    ...         return F.linear(self.fc(x), self.fc.weight)   # fc.weight used a second time, outside fc
    >>> m = M()
    >>> with OutsideUseDetector(m, ["fc.weight", "fc.bias"]) as det, torch.no_grad():
    ...     _ = m(torch.randn(2, 3))
    >>> det.outside
    {'fc.weight': ['linear']}
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

__all__ = ["OutsideUseDetector", "watch_outside_use", "report_outside_use"]

#: Tensor methods that read metadata only: never a use of the values.
METADATA = frozenset({"__get__", "size", "dim", "numel", "ndimension", "nelement", "is_floating_point",
                      "is_complex", "element_size", "stride", "storage_offset", "is_contiguous", "data_ptr",
                      "untyped_storage", "get_device", "__len__", "__hash__", "__repr__", "__format__",
                      "is_shared", "is_pinned", "has_names", "__setstate__", "__reduce_ex__"})


#: Tensor properties that return a view of the values (``h @ emb.weight.T``): a use, named by the property.
VALUE_VIEWS = frozenset({"T", "mT", "H", "mH", "real", "imag"})


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":  # a property read: metadata (.shape, .grad, ...) unless it views the values
        prop = getattr(getattr(func, "__self__", None), "__name__", None)
        return prop if prop in VALUE_VIEWS else "__get__"
    return name


class OutsideUseDetector(TorchFunctionMode):
    r"""Record ops on protected parameters made outside every module that owns them.

    Args:
        model: the model (its module tree says which modules own which parameter).
        names: the protected parameter names (as ``model.named_parameters()`` spells them), or a mapping
            ``{name: [module names whose calls count as inside]}``.
        max_ops: how many distinct op names to keep per parameter.
        first_calls: stop watching after this many completed calls of ``model`` itself (``None``: watch
            until the ``with`` block ends). A loop that never calls ``model`` itself (CLIP's
            ``encode_image`` / ``encode_text``) is bounded too: the mode also leaves when, outside
            ``model``'s own ``forward`` and with no owning module inside its ``forward``, the first owning
            module entered is entered again after every owning module has finished ``first_calls`` calls
            (the code path has started over). The mode leaves only when it is the innermost one.

    After the ``with`` block, ``outside`` maps each parameter used outside to the op names seen (in order of
    first use); :meth:`warn` emits one ``UserWarning`` naming them (what ``collect()`` will do once wired).
    Forward pre-/post-hooks on the owning modules track which of them are inside ``forward``; they are
    removed on exit.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | Mapping[str, Iterable[str]],
                 max_ops: int = 4, first_calls: int | None = None) -> None:
        super().__init__()
        self._model, self.first_calls, self._calls, self._active = model, first_calls, 0, False
        self._in_root, self._first = 0, None  # model.forward call depth; the first owner entered at top level
        params = dict(model.named_parameters(remove_duplicate=False))
        modules = dict(model.named_modules(remove_duplicate=False))
        explicit = dict(names) if isinstance(names, Mapping) else None
        names = list(names)
        unknown = [n for n in names if n not in params]
        if unknown:
            raise ValueError(f"OutsideUseDetector: the model has no parameter(s) {unknown}")
        self.max_ops = max_ops
        self._name: dict[int, str] = {id(params[n]): n for n in names}
        self._owners: dict[int, set[int]] = {i: set() for i in self._name}
        self._owner_modules: dict[int, nn.Module] = {}
        self._inside: dict[int, int] = {}  # id(module) -> call depth (a module may be re-entered)
        self._finished: dict[int, int] = {}  # id(module) -> completed top-level calls
        self._handles: list = []
        self.outside: dict[str, list[str]] = {}

        if explicit is not None:
            for n, mnames in explicit.items():
                for mn in mnames:
                    if mn not in modules:
                        raise ValueError(f"OutsideUseDetector: {n!r} names module {mn!r}, which the model lacks")
                    self._own(id(params[n]), modules[mn])
            return
        for mod in modules.values():
            held = list(mod._parameters.values())
            if isinstance(mod, nn.MultiheadAttention):  # out_proj's forward never runs: MHA reads it itself
                held += list(mod.out_proj.parameters())
            for p in held:
                if p is not None and id(p) in self._owners:
                    self._own(id(p), mod)

    def _own(self, pid: int, mod: nn.Module) -> None:
        self._owners[pid].add(id(mod))
        self._owner_modules[id(mod)] = mod

    # module-call tracking ------------------------------------------------------------------------------
    def _enter(self, mod: nn.Module, *_: Any) -> None:
        if not self._inside and self._first is None:
            self._first = id(mod)
        if (self._active and self.first_calls is not None and not self._inside and not self._in_root
                and id(mod) == self._first and self._finished.get(id(mod), 0) >= self.first_calls
                and all(self._finished.get(i, 0) >= self.first_calls for i in self._owner_modules)):
            # every owner has run and the first one starts again: the code path repeats (inside the model's
            # own forward an owner may run many times, a recurrent cell or a shared layer: its hook decides)
            self._leave_mode()
        self._inside[id(mod)] = self._inside.get(id(mod), 0) + 1

    def _leave(self, mod: nn.Module, *_: Any) -> None:
        depth = self._inside.get(id(mod), 0) - 1
        if depth <= 0:
            self._inside.pop(id(mod), None)
            self._finished[id(mod)] = self._finished.get(id(mod), 0) + 1
        else:
            self._inside[id(mod)] = depth

    def _root_start(self, *_: Any) -> None:
        self._in_root += 1

    def _root_done(self, *_: Any) -> None:
        self._in_root = max(self._in_root - 1, 0)
        self._calls += 1
        if self._active and self.first_calls is not None and self._calls >= self.first_calls:
            self._leave_mode()

    def _leave_mode(self) -> None:
        top = torch._C._len_torch_function_stack() - 1
        if top >= 0 and torch._C._get_function_stack_at(top) is self:
            super().__exit__(None, None, None)  # leave the mode now: the rest of the collection runs bare
            self._active = False

    @property
    def active(self) -> bool:
        """Whether the mode is still watching (it leaves early with ``first_calls``, see above)."""
        return self._active

    def __enter__(self) -> OutsideUseDetector:
        self.outside = {}
        self._inside.clear()
        self._finished.clear()
        self._calls, self._active, self._in_root, self._first = 0, True, 0, None
        if self.first_calls is not None:
            self._handles.append(self._model.register_forward_pre_hook(self._root_start))
            self._handles.append(self._model.register_forward_hook(self._root_done, always_call=True))
        for mod in self._owner_modules.values():
            self._handles.append(mod.register_forward_pre_hook(self._enter))
            # always_call: the depth is popped even when forward raises
            self._handles.append(mod.register_forward_hook(self._leave, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._active:
                super().__exit__(*exc)
                self._active = False
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._inside.clear()

    # the mode ------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name not in METADATA:
            for t in tree_flatten((args, kwargs))[0]:
                if isinstance(t, torch.Tensor) and id(t) in self._name:
                    owners = self._owners[id(t)]
                    if not any(o in self._inside for o in owners):
                        ops = self.outside.setdefault(self._name[id(t)], [])
                        if name not in ops and len(ops) < self.max_ops:
                            ops.append(name)
        return func(*args, **kwargs)

    def warn(self, stacklevel: int = 2) -> None:
        """One ``UserWarning`` naming every parameter used outside its module (nothing when none was)."""
        if self.outside:
            uses = ", ".join(f"{n!r} (by {', '.join(ops)})" for n, ops in self.outside.items())
            warnings.warn(f"GNSP: protected parameter(s) used outside the module whose input is recorded: "
                          f"{uses}. Those uses are not protected and their outputs can move; give the use its "
                          "own module, a FeatureSource, or leave the parameter unprotected", UserWarning,
                          stacklevel=stacklevel)


def watch_outside_use(model: nn.Module, blocks: list, policy: str) -> contextlib.AbstractContextManager:
    """The outside-use detector for ``collect()``: each protected parameter (bare matmul weights excepted:
    they are used outside their observed module by design) counts as inside the modules whose hooks record
    its blocks; a null context with ``policy="ignore"``."""
    if policy == "ignore":
        return contextlib.nullcontext()
    from .kinds import BareMatmul

    pname = {id(p): n for n, p in model.named_parameters()}
    mname = {id(m): n for n, m in model.named_modules()}
    inside: dict[str, list[str]] = {}
    for b in blocks:
        if isinstance(b.kind, BareMatmul) or id(b.module) not in mname:
            continue
        for _, p in b.params:
            if id(p) in pname:
                owners = inside.setdefault(pname[id(p)], [])
                if mname[id(b.module)] not in owners:
                    owners.append(mname[id(b.module)])
    return OutsideUseDetector(model, inside, first_calls=1)  # the first model call runs the code path


def report_outside_use(watch: Any, policy: str) -> None:
    """After ``collect()``: name the protected parameters used outside their modules (warn or raise)."""
    outside = getattr(watch, "outside", None)
    if not outside:
        return
    if policy == "raise":
        uses = ", ".join(f"{n!r} (by {', '.join(ops)})" for n, ops in outside.items())
        raise RuntimeError(f"GNSP: protected parameter(s) used outside the module whose input is recorded: {uses}; "
                           "the collection is kept (call discard_collection() to drop it)")
    watch.warn(stacklevel=5)
