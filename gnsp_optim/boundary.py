r"""Helpers for the wrapper's boundary with models nobody here wrote (issue 13), standalone until wired in.

- :func:`input_rows`: a layer input as ``(n, d)`` rows; a ``NestedTensor`` (what ``nn.TransformerEncoder``
  passes in eval + no-grad with a padding mask) gives its real positions only, padded ones excluded.
- :class:`RunningStatsFreeze`: normalisation running statistics (BatchNorm, InstanceNorm with
  ``track_running_stats``) kept at their values of the last ``end_task()`` even when task 2 trains in train
  mode; ``mode="track"`` lets them move (and says once that old outputs then move).
- :func:`check_not_meta`, :func:`check_no_dora`: clear refusals at construction.
- :func:`is_hf_conv1d`, :func:`conv1d_read`, :func:`conv1d_write`: transformers' ``Conv1D`` (GPT-2's
  layers: ``y = x @ W + b`` with ``W`` stored ``(in, out)``) read as a transposed ``nn.Linear`` with its bias.
- :class:`WeakHook`: a forward hook that holds its owner by weak reference, fires only for the module object
  it was made for (a ``copy.deepcopy`` of the model never feeds the original), deep-copies as itself and
  pickles as an inert hook (``torch.save(model)`` works); :func:`release_with` removes hooks when the owner
  is garbage-collected.

Example:
    >>> import torch
    >>> rows = input_rows(torch.nested.nested_tensor([torch.ones(2, 3), torch.zeros(1, 3)]), 3)
    >>> rows.shape                          # 2 + 1 real positions; nothing padded
    torch.Size([3, 3])
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["input_rows", "RunningStatsFreeze", "running_stat_layers", "check_not_meta", "check_no_dora",
           "is_hf_conv1d", "conv1d_read", "conv1d_write", "WeakHook", "release_with", "to_float64_"]


# ------------------------------------------------------------------------------------ layer inputs
def input_rows(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` as ``(n, dim)`` rows: every leading position counts; a NestedTensor's padded positions do not.

    Example:
        >>> input_rows(torch.zeros(2, 5, 4), 4).shape
        torch.Size([10, 4])
    """
    if x.is_nested:
        parts = [t.reshape(-1, dim) for t in x.unbind()]
        return torch.cat(parts) if parts else x.new_zeros(0, dim)
    return x.reshape(-1, dim)


# ------------------------------------------------------------------------------------ running statistics
RUNNING_STATS = ("freeze", "track")


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every sub-module with running statistics (``_NormBase`` with ``track_running_stats``).

    Example:
        >>> [n for n, _ in running_stat_layers(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2)))]
        ['1']
    """
    from torch.nn.modules.batchnorm import _NormBase

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, _NormBase) and m.track_running_stats and m.running_mean is not None]


class RunningStatsFreeze:
    r"""Keep normalisation running statistics fixed from :meth:`snapshot` on (``mode="freeze"``).

    The old outputs in eval mode depend on the weights and on ``running_mean`` / ``running_var``; a training
    forward in train mode moves the latter with no gradient, so no projection can stop it (measured: relative
    drift 0.52 of a Conv-BN model's old eval outputs after 10 SGD steps in train mode). After each training
    forward of such a layer the buffers are restored to the snapshot (the forward itself still normalises by
    the batch statistics, as train mode does); ``num_batches_tracked`` is restored too.
    ``mode="track"`` leaves them moving and warns once, naming the layers.

    Example:
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> keep = RunningStatsFreeze(bn)
        >>> keep.snapshot()                   # what end_task() will call
        >>> _ = bn(torch.randn(8, 3) + 5)     # train mode
        >>> float(bn.running_mean.abs().max())
        0.0
        >>> keep.remove()
    """

    def __init__(self, model: nn.Module, mode: str = "freeze") -> None:
        if mode not in RUNNING_STATS:
            raise ValueError(f"running_stats must be one of {RUNNING_STATS}, got {mode!r}")
        self.mode = mode
        self.layers = running_stat_layers(model)
        self._saved: dict[int, dict[str, torch.Tensor]] = {}
        self._handles: list = []
        self._warned = False

    def snapshot(self) -> None:
        """Record the current buffers as the values to keep (call at every ``end_task()``)."""
        if self.mode == "removed":
            return
        if self.mode == "track":
            if self.layers and not self._warned:
                self._warned = True
                warnings.warn(f"GNSP: running_stats='track': the running statistics of {[n for n, _ in self.layers]}"
                              " will move when training in train mode, and old eval outputs with them",
                              UserWarning, stacklevel=2)
            return
        for _, m in self.layers:
            self._saved[id(m)] = {k: b.detach().clone() for k, b in m.named_buffers(recurse=False)
                                  if b is not None}
        if not self._handles:
            # WeakHook: fires for these modules only (a deep copy of the model keeps its own statistics
            # moving), pickles as an inert hook, never keeps this object alive
            self._handles = [m.register_forward_hook(WeakHook(self, "_restore", m), with_kwargs=True)
                             for _, m in self.layers]

    @torch.no_grad()
    def _restore(self, mod: nn.Module, *_: Any) -> None:
        if not mod.training:
            return
        for k, v in self._saved.get(id(mod), {}).items():
            # through .data: batch_norm saved the buffer for its backward, and a tracked in-place write would
            # fail that backward (version counter); the values it reads there are the batch statistics
            getattr(mod, k).data.copy_(v)

    def remove(self) -> None:
        """Stop keeping them fixed (for good: a later :meth:`snapshot` installs nothing)."""
        self.mode = "removed"
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------------------------ refusals
def active_dropout(model: nn.Module) -> list[str]:
    """Names of the modules that would drop activations in a forward now: ``nn.Dropout*`` /
    ``nn.AlphaDropout`` with ``p > 0`` and ``nn.MultiheadAttention`` with ``dropout > 0``, in training mode.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1))
        >>> active_dropout(m), active_dropout(m.eval())
        (['1'], [])
    """
    out = []
    for name, mod in model.named_modules():
        if not mod.training:
            continue
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            out.append(name)
        elif isinstance(mod, nn.MultiheadAttention) and mod.dropout > 0:
            out.append(name)
    return out


def warn_if_dropout_active(model: nn.Module) -> None:
    """``collect()`` in training mode with dropout on records a random sample of the inputs, not the inputs
    evaluation (or an old task's use) sees: warn naming the modules."""
    names = active_dropout(model)
    if names:
        shown = names[:5] + ([f"... ({len(names) - 5} more)"] if len(names) > 5 else [])
        warnings.warn(f"GNSP: collect() with dropout active in training mode ({shown}): the statistics record "
                      "randomly dropped inputs, so the inputs of eval-mode calls are not protected exactly; call "
                      "model.eval() before collect()", UserWarning, stacklevel=4)


def check_not_meta(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer on the ``meta`` device.

    Example (the message continues with how to materialise the model):
        >>> with torch.device("meta"):
        ...     m = torch.nn.Linear(2, 2)
        >>> check_not_meta(m)
        Traceback (most recent call last):
        ValueError: parameter 'weight' is on the meta device (no data): materialise the model first ...
    """
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in items:
            if t.is_meta:
                raise ValueError(f"{kind} {name!r} is on the meta device (no data): materialise the model first "
                                 "(e.g. model.to_empty(device=...) and load its weights, or from_pretrained "
                                 "without device_map='meta') and wrap it after")


def check_no_dora(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first PEFT DoRA layer.

    DoRA rescales ``W + B A`` by a learnt magnitude over its column norm, and computes that norm by running
    ``lora_B(lora_A(I))``: the hooks would record an identity (every adapter block fully occupied, nothing
    trains), and the column norm is not linear in ``B A``, so no input null space keeps the outputs exact.
    Detected by PEFT's ``lora_magnitude_vector`` (non-empty) or ``use_dora`` flags on a module.
    """
    for name, m in model.named_modules():
        mags = getattr(m, "lora_magnitude_vector", None)
        flags = getattr(m, "use_dora", None)
        uses = (isinstance(mags, (nn.ModuleDict, nn.ParameterDict, dict)) and len(mags) > 0) or (
            isinstance(flags, dict) and any(flags.values()))
        if uses:
            raise ValueError(f"layer {name!r} is a PEFT DoRA adapter (use_dora=True), which gnsp_optim does not "
                             "support: DoRA divides W + BA by its column norm, which is not linear in BA, so no "
                             "input null space keeps old outputs exact (and its norm pass would record an "
                             "identity). Use plain LoRA (use_dora=False)")


# ------------------------------------------------------------------------------------ transformers Conv1D
def is_hf_conv1d(mod: nn.Module) -> bool:
    """Whether ``mod`` is transformers' ``Conv1D`` (duck-typed: no import of transformers).

    Example:
        >>> is_hf_conv1d(torch.nn.Linear(2, 2))
        False
    """
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers")
            and isinstance(w, torch.Tensor) and w.dim() == 2 and getattr(mod, "nf", None) == w.shape[1])


def conv1d_read(w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``Conv1D`` tensors (``w``: ``(in, out)``, ``b``: ``(out,)``) as ``(1, out, in)`` and ``(1, out, 1)``.

    The layer computes ``x @ w + b = F.linear(x, w.T, b)``: the matrix is ``w.T``, acting on the
    ``in``-dimensional input, and a projector ``P`` on the input side acts as ``w.T <- w.T P`` i.e.
    ``w <- P w``. The returned weight matrix is a view (writing into it writes the tensor).

    Example:
        >>> wm, bm = conv1d_read(torch.arange(6.0).reshape(3, 2), torch.zeros(2))
        >>> wm.shape, bm.shape
        (torch.Size([1, 2, 3]), torch.Size([1, 2, 1]))
    """
    return w.t().unsqueeze(0), (None if b is None else b.reshape(1, -1, 1))


def conv1d_write(w: torch.Tensor, b: torch.Tensor | None, wm: torch.Tensor, bm: torch.Tensor | None) -> None:
    """Copy :func:`conv1d_read`-layout matrices back into ``w`` (``(in, out)``) and ``b``, in place."""
    w.copy_(wm[0].t())
    if b is not None and bm is not None:
        b.copy_(bm.reshape(b.shape))


# ------------------------------------------------------------------------------------ hook lifecycle
class _InertHook:
    """What a :class:`WeakHook` becomes when pickled: a hook that does nothing."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        return None


class WeakHook:
    r"""A forward hook that forwards to ``owner.<method>(module, args, kwargs, output)`` while the owner lives.

    - holds the owner by weak reference: hooks never keep a dropped wrapper (and its optimizer state) alive;
    - fires only for the module object it was registered on: a ``copy.deepcopy(model)`` carries the hook,
      but the copy's calls are ignored, so a teacher copy never feeds the student's statistics;
    - ``copy.deepcopy`` returns the hook itself (no copy of the owner), pickling gives an inert hook, so
      ``torch.save(model)`` works (loading needs ``gnsp_optim`` importable).

    Example:
        >>> class Owner:
        ...     seen = 0
        ...     def record(self, mod, args, kwargs, out):
        ...         self.seen += 1
        >>> import copy, io
        >>> lin, owner = torch.nn.Linear(2, 2), Owner()
        >>> h = lin.register_forward_hook(WeakHook(owner, "record", lin), with_kwargs=True)
        >>> _ = lin(torch.ones(1, 2)); _ = copy.deepcopy(lin)(torch.ones(1, 2))
        >>> owner.seen                    # the copy's call was ignored
        1
        >>> torch.save(lin, io.BytesIO())  # picklable
    """

    __slots__ = ("_owner", "_method", "_module", "__weakref__")

    def __init__(self, owner: Any, method: str, module: nn.Module) -> None:
        self._owner = weakref.ref(owner)
        self._method = method
        self._module = weakref.ref(module)

    def __call__(self, mod: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        owner = self._owner()
        if owner is None or mod is not self._module():
            return None
        return getattr(owner, self._method)(mod, args, kwargs, output)

    def __deepcopy__(self, memo: dict) -> WeakHook:
        return self

    def __reduce__(self) -> tuple[Callable[[], _InertHook], tuple]:
        return _InertHook, ()


def release_with(owner: Any, handles: list) -> weakref.finalize:
    """Remove ``handles`` (hook handles) when ``owner`` is garbage-collected; returns the finalizer.

    The callback holds the handles, never the owner, so it does not keep the owner alive.

    Example:
        >>> class Owner: pass
        >>> lin, owner = torch.nn.Linear(2, 2), Owner()
        >>> fin = release_with(owner, [lin.register_forward_hook(lambda *a: None)])
        >>> del owner; len(lin._forward_hooks)
        0
    """
    def remove(hs: list = handles) -> None:
        for h in hs:
            h.remove()
        hs.clear()

    return weakref.finalize(owner, remove)


def to_float64_(stat: Any) -> None:
    """Switch a covariance statistic (memory and open collection) to float64, exactly."""
    if getattr(stat, "dtype", None) != torch.float32:
        return  # token counts, or already float64
    stat.dtype = torch.float64
    for attr in ("memory", "task_sum"):
        t = getattr(stat, attr, None)
        if t is not None:
            setattr(stat, attr, t.to(torch.float64))
