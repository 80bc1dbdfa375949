r"""``NullSpaceOptimizer``: wrap any torch optimizer so that training a new task leaves old outputs unchanged.

The class is a shell (argument checks, delegation to the base optimizer, the public verbs) over plain
functions. The data path, in one reading:

1. **hook** (:mod:`.hooks`, :mod:`.kinds`): while :meth:`~NullSpaceOptimizer.collect` is open, one forward
   hook per observed module hands each protected block the rows its weight multiplies;
2. **statistics** (:mod:`.statistics`): each block's :class:`~.statistics.CovarianceStat` accumulates
   ``[X | 1]^T [X | 1]``;
3. **end_task** (:meth:`~NullSpaceOptimizer.end_task`): folds the task into the memory of earlier tasks;
4. **rule + eigh** (:mod:`.subspace`, :func:`.projector.projector_from_memory`): the memory's eigenvectors,
   split by the rank rule into occupied and null directions;
5. **projector -> step** (:mod:`.projector`, :mod:`.projection`): every :meth:`~NullSpaceOptimizer.step`
   projects the gradients (and in update mode the change the base step made) onto the null space.

Which blocks exist and which are protected: :mod:`.kinds` (discovery) and :mod:`.selection` (patterns,
presets, ties). Checkpoints: :mod:`.checkpoint`; the report: :mod:`.report`.

Words, one meaning each: a **block** is one protected weight (+ bias) with its input statistic; a
direction is **occupied** when earlier tasks' inputs live there (a block whose projector occupies every
direction is *fully occupied*: it cannot move); a trained parameter is **uncovered** when no block protects
it; **frozen** names only the uncovered parameters that the ``uncovered="freeze"`` policy holds still.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .boundary import (
    RUNNING_STATS,
    RunningStatsFreeze,
    check_no_dora,
    check_not_meta,
    to_float64_,
    warn_if_dropout_active,
)
from .checkpoint import (
    FORMAT_VERSION,
    base_state_dict,
    check_protection_state,
    load_base_state_dict,
    pack_protection_state,
    restore_protection_state,
)
from .convergence import ConvergenceMonitor, run_until_converged
from .hooks import Gate, Hooks
from .kinds import Block, FeatureSource, StatFactory, discover_blocks
from .outside_use import report_outside_use, watch_outside_use
from .projection import LINEAR_STATE_KEYS, project_gradients, project_moments, projected_change
from .projector import Projector
from .report import format_summary, report_rows, warn_newly_full
from .selection import clean_name, parameter_owners, select_blocks, unwrap_model
from .sharding import check_model_supported, reshard_fsdp_modules
from .sketch import SketchMemory, SketchStat
from .statistics import NORMALIZE_MODES
from .subspace import RankRule, TailEnergy

__all__ = ["NullSpaceOptimizer", "FORMAT_VERSION", "LINEAR_STATE_KEYS"]

MODES = ("grad", "update")
UNCOVERED = ("freeze", "train", "raise")
OUTSIDE_USE = ("warn", "raise", "ignore")
STATISTICS = ("exact", "sketch")


def _checked_stats_dtype(model: nn.Module, stats_dtype: torch.dtype | None) -> torch.dtype:
    if stats_dtype is None:  # float32, or float64 for a float64 model
        dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
        stats_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
    if stats_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype}")
    return stats_dtype


def _check_arguments(base_optim: Any, model: Any, rho: Any, mode: str, uncovered: str, normalize: str,
                     running_stats: str = "freeze", outside_use: str = "warn") -> None:
    if isinstance(base_optim, NullSpaceOptimizer):
        raise TypeError("base_optim is already a NullSpaceOptimizer; wrap the inner optimizer once")
    if not isinstance(base_optim, torch.optim.Optimizer):
        raise TypeError(f"base_optim must be a torch.optim.Optimizer, got {type(base_optim).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(rho, numbers.Real) or not (0.0 <= float(rho) < 1.0):  # numpy scalars welcome
        raise ValueError(f"rho must be a number in [0, 1), got {rho!r}")
    for name, value, allowed in (("mode", mode, MODES), ("uncovered", uncovered, UNCOVERED),
                                 ("normalize", normalize, NORMALIZE_MODES), ("running_stats", running_stats,
                                                                             RUNNING_STATS),
                                 ("outside_use", outside_use, OUTSIDE_USE)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    check_not_meta(model)  # fails late (inside autocast) otherwise
    check_no_dora(model)  # its column norm is not linear in the adapter: no null space keeps it exact


def _is_compiled(model: nn.Module) -> bool:
    """Whether a ``torch.compile`` wrapper sits anywhere in the DDP / compile wrapper chain."""
    while True:
        if hasattr(model, "_orig_mod"):
            return True
        inner = getattr(model, "module", None)
        if not isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) or inner is None:
            return False
        model = inner


def _release(*owned: Any) -> None:
    """Finalizer of a dropped wrapper: uninstall what it installed on the model (holds no wrapper)."""
    for thing in owned:
        thing.remove()


def _check_statistics_options(statistics: str, sketch_rank: Any, sketch_min_width: Any,
                              stats_chunk_rows: Any) -> None:
    if statistics not in STATISTICS:
        raise ValueError(f"statistics must be one of {STATISTICS}, got {statistics!r}")
    for name, value, low in (("sketch_rank", sketch_rank, 1), ("sketch_min_width", sketch_min_width, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if stats_chunk_rows is not None and (isinstance(stats_chunk_rows, bool) or not isinstance(stats_chunk_rows, int)
                                         or stats_chunk_rows < 1):
        raise ValueError(f"stats_chunk_rows must be a positive int or None, got {stats_chunk_rows!r}")


class NullSpaceOptimizer(torch.optim.Optimizer):
    r"""Project a base optimizer's steps onto the null space of earlier tasks' layer inputs (GNSP).

    If a weight change ``dW`` satisfies ``dW x = 0`` for every input ``x`` an earlier task fed the layer, the
    layer's outputs on that task cannot move. After :meth:`end_task`, every step keeps ``dW`` (and ``db`` of a
    protected bias, the weight of a constant-1 input) inside that null space.

    Args:
        base_optim: any already-built ``torch.optim.Optimizer`` (SGD, Adam, AdamW, RMSprop, ... any number of
            parameter groups). The wrapper reads and writes its ``param_groups`` / ``state`` directly, so LR
            schedulers, ``GradScaler``, gradient clipping and checkpoints work unchanged.
        model: the ``nn.Module`` whose layers are observed (DDP / ``torch.compile`` wrappers are unwrapped).
        rho: share of eigenvalue mass allowed in the null space (GNSP's tail-energy rule, default 0.15);
            ``rho = 0`` gives the numerical null space (eigenvalues under ``d * eps * largest`` of the
            decomposition's dtype count as zero). Ignored when ``rule`` is given.
        mode: ``"grad"`` projects ``.grad`` before the base step (the paper's method: exact for SGD with
            momentum / Nesterov and no weight decay; **approximate** under Adam-like optimizers, whose
            per-coordinate scaling and weight decay take the step out of the null space).
            ``"update"`` also projects the gradient, then projects the parameter change the base optimizer
            made: **exact for any optimizer**, decoupled weight decay and stale moments included, at the cost
            of one copy of the protected parameters per step.
        rule: a rank rule (``eigenvalues -> k``), e.g. :class:`~gnsp_optim.subspace.RelativeEigenvalue`.
        protect: parameter-name glob patterns to protect (``None``: every Linear, transformers ``Conv1D``,
            Conv1d/2d, MultiheadAttention and Embedding weight and bias the base optimizer holds, plus
            ``feature_sources``). Parameters a wildcard pattern matches that no layer kind protects follow
            ``uncovered`` (one warning names them); an exact name that cannot be protected is an error.
        feature_sources: ``{param_name: FeatureSource}`` for bare matmul weights such as CLIP's ``visual.proj``.
        uncovered: what happens after the first :meth:`end_task` to trained parameters no block protects:
            ``"freeze"`` (default; one warning names them), ``"train"`` (left free: old outputs may move),
            ``"raise"``.
        normalize: how a task's statistics enter memory: ``"mean"`` (default), ``"sum"``, ``"frobenius"``
            (the public GNSP code's per-batch Frobenius rule); see :mod:`gnsp_optim.statistics`.
        stats_dtype: accumulation (and eigendecomposition) dtype of the statistics: ``torch.float32`` or
            ``torch.float64``; default float32, or float64 when the model has float64 parameters.
        project_state: at :meth:`end_task`, project the base optimizer's linear moment buffers
            (``momentum_buffer``, ``exp_avg``) onto the new null space so stale momentum cannot
            leak into old directions (default True).
        sync: all-reduce statistics over ``torch.distributed`` before :meth:`end_task` builds projectors
            (``None``: when a process group with more than one rank is initialised).
        batch_layers: project layers of equal shape and projector form together, one batched product per
            shape (bases zero-padded to the widest, which changes nothing), instead of one product per layer.
            Same result to round-off; it saves per-layer launch overhead but costs a stack and a copy back
            of every gradient, so it pays only where launches dominate (default False: on a CPU it measured
            slower, see ``benchmarks/overhead.py``).
        running_stats: normalisation running statistics (BatchNorm, InstanceNorm with running stats) from the
            last :meth:`end_task` on: ``"freeze"`` (default) keeps them at their values then, even when you
            train in train mode (the batch still normalises by its own statistics), so old eval outputs stay
            exact; ``"track"`` lets them move (and old eval outputs with them; one warning names the layers).
        outside_use: a protected parameter used outside the module whose hook records its input (e.g.
            ``F.linear(h, fc.weight)`` in a parent's forward) is detected during :meth:`collect` (a torch
            function mode sees every op): ``"warn"`` (default) names it, ``"raise"`` refuses the collection,
            ``"ignore"`` skips the check. It watches the first call of the model in each ``collect()`` (a
            Python call per op during that call only). Not checked for ``torch.compile``d models: run one
            eager ``collect()`` to check one.

    The hooks stay on the model until :meth:`remove_hooks` (or the end of a ``with NullSpaceOptimizer(...) as
    opt:`` block, or the wrapper being garbage-collected). ``torch.save(model)`` and ``copy.deepcopy(model)``
    work while they are installed; a copy's forward passes never feed this wrapper's statistics.

        statistics: ``"exact"`` (default): a ``(d+1) x (d+1)`` Gram matrix per protected input;
            ``"sketch"``: a frequent-directions sketch of ``sketch_rank`` rows (memory ``O(d * sketch_rank)``,
            the exact total mass kept, so the tail-energy rule stays safe unless a layer is *saturated*, which
            is warned about by name; :mod:`gnsp_optim.sketch`) for inputs at least ``sketch_min_width`` wide
            (the bias column counted); narrower ones stay exact.
        sketch_rank: rows of each sketch (default 256); must exceed the rank the rule keeps.
        sketch_min_width: the narrowest input (``d + 1``) that gets a sketch (default 2048; the sketch pays
            where ``3 * sketch_rank`` is well below ``d``).
        stats_chunk_rows: upcast bf16 / fp16 layer inputs this many rows at a time while collecting (the
            float32 accumulation is unchanged; the transient copy is ``chunk x d`` instead of the batch's
            ``n x d``); None (default): one copy per batch. Not applied under ``normalize="frobenius"``.

    FSDP2 (``fully_shard``) models are supported (projection on the local row shards, statistics
    all-reduced as under DDP, :meth:`state_dict` then a collective: see :mod:`gnsp_optim.sharding`); FSDP1 is
    refused with the reason.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
        >>> opt = NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, rho=0.0)
        >>> old = torch.randn(4, 8)
        >>> with opt.collect(), torch.no_grad():
        ...     before = model(old)
        >>> opt.end_task()
        >>> model(torch.randn(32, 8)).square().mean().backward(); opt.step()
        >>> torch.allclose(model(old), before, atol=1e-5)
        True
    """

    def __init__(
        self,
        base_optim: torch.optim.Optimizer,
        model: nn.Module,
        rho: float = 0.15,
        mode: str = "grad",
        *,
        rule: RankRule | None = None,
        protect: list[str] | tuple[str, ...] | None = None,
        feature_sources: dict[str, FeatureSource] | None = None,
        uncovered: str = "freeze",
        normalize: str = "mean",
        stats_dtype: torch.dtype | None = None,
        project_state: bool = True,
        sync: bool | None = None,
        batch_layers: bool = False,
        running_stats: str = "freeze",
        outside_use: str = "warn",
        statistics: str = "exact",
        sketch_rank: int = 256,
        sketch_min_width: int = 2048,
        stats_chunk_rows: int | None = None,
    ) -> None:
        _check_arguments(base_optim, model, rho, mode, uncovered, normalize, running_stats, outside_use)
        _check_statistics_options(statistics, sketch_rank, sketch_min_width, stats_chunk_rows)
        self._stats_dtype_auto = stats_dtype is None  # then follows a later .double() of the model
        stats_dtype = _checked_stats_dtype(model, stats_dtype)
        # torch.optim.Optimizer bookkeeping, without its __init__ (which would build param_groups anew)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()
        check_model_supported(model, [p for g in base_optim.param_groups for p in g["params"]])  # FSDP: refused

        self.base = base_optim
        self.outside_use = "ignore" if _is_compiled(model) else outside_use  # dynamo inlines the module calls
        self.model = unwrap_model(model)
        self.rho, self.mode, self.uncovered, self.normalize = float(rho), mode, uncovered, normalize
        self.rule: RankRule = rule if rule is not None else TailEnergy(float(rho))
        self.protect = None if protect is None else ((protect,) if isinstance(protect, str) else tuple(protect))
        self.feature_sources = dict(feature_sources or {})
        self.stats_dtype, self.project_state, self.sync = stats_dtype, project_state, sync
        self.batch_layers = bool(batch_layers)
        self.statistics, self.sketch_rank, self.sketch_min_width = statistics, sketch_rank, sketch_min_width
        self.stats_chunk_rows = stats_chunk_rows
        #: the ConvergenceMonitor of the current / last ``collect(stop_when_converged=...)`` (None otherwise)
        self.convergence: ConvergenceMonitor | None = None
        self.tasks_seen = 0
        self.projectors: dict[str, Projector] = {}
        #: names of the uncovered parameters the ``"freeze"`` policy holds still (set at the first end_task)
        self.frozen: list[str] = []
        self.blocks: list[Block] = []
        self._stacked: dict = {}  # batch_layers: stacked bases per member list (cleared when projectors change)
        self._gate = Gate()  # open while collect() is
        self._hooks = Hooks()
        self._live_views: dict[tuple[str, bool, bool], tuple[Block, Projector]] = {}
        self._protection_monitor: Any = None
        self._protection_inputs: Any = None
        self._hooks_removed = False
        self._build_blocks()
        self._running_stats = RunningStatsFreeze(self.model, running_stats)
        self._release = weakref.finalize(self, _release, self._hooks, self._running_stats)

    # ------------------------------------------------------------------ hook lifecycle
    def remove_hooks(self) -> None:
        """Uninstall every hook the wrapper put on the model (statistics, running-statistics freeze);
        idempotent. Projection still works; running statistics are no longer held; :meth:`collect` then
        refuses (build a new wrapper to collect).

        Example:
            >>> model = torch.nn.Linear(3, 2)
            >>> with NullSpaceOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model) as opt:
            ...     len(model._forward_hooks)
            1
            >>> len(model._forward_hooks)   # removed on leaving the with block
            0
        """
        self._release()  # runs once: the finalizer is then dead
        self._hooks_removed = True

    def __enter__(self) -> NullSpaceOptimizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove_hooks()

    # ------------------------------------------------------------------ delegation (accelerate's pattern)
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.base.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.base.state

    @state.setter
    def state(self, value: Any) -> None:
        self.base.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.base.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.base.defaults = value

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero (or drop) the gradients of every parameter, as the base optimizer does."""
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the base optimizer; its layers become protectable from the next task."""
        if not hasattr(self, "base"):  # pragma: no cover - torch internals calling before __init__ ends
            return
        self.base.add_param_group(param_group)
        self._build_blocks()

    def __repr__(self) -> str:
        return (f"NullSpaceOptimizer(mode={self.mode!r}, rule={self.rule!r}, blocks={len(self.blocks)}, "
                f"tasks_seen={self.tasks_seen}, base={self.base!r})")

    # ------------------------------------------------------------------ selection
    def _named_params(self) -> dict[str, nn.Parameter]:
        return {clean_name(n): p for n, p in self.model.named_parameters()}

    def _trained_params(self, named: dict[str, nn.Parameter]) -> list[nn.Parameter]:
        trained = [p for g in self.base.param_groups for p in g["params"]]
        ids = [id(p) for p in trained]
        if len(set(ids)) != len(ids):
            raise ValueError("the base optimizer lists a parameter twice")
        known = {id(p) for p in named.values()}
        if not any(i in known for i in ids):
            raise ValueError("the base optimizer shares no parameter with the model")
        return trained

    def _build_blocks(self) -> None:
        """Discover and select the blocks, keep the memory of blocks that existed before, install the hooks.

        Every parameter the base optimizer holds is selectable, ``requires_grad`` or not: one frozen now and
        unfrozen later (staged unfreezing) then has the statistics of the tasks it sat through. While a
        block's weight or bias is frozen, :meth:`_live` projects only what trains.
        """
        named = self._named_params()
        trained = self._trained_params(named)
        earlier = {b.name: b.stat for b in self.blocks}  # add_param_group: keep what earlier tasks left
        trainable = {id(p) for p in trained}
        candidates = discover_blocks(self.model, self.feature_sources, stat_factory=self._stat_factory())
        self.blocks = select_blocks(candidates, named, trainable, self.protect, owners=parameter_owners(self.model))
        for b in self.blocks:
            b.stat = earlier.get(b.name, b.stat)
        covered = {id(p) for b in self.blocks for _, p in b.params}
        name_of = {id(p): n for n, p in named.items()}
        uncovered = [(name_of.get(id(p), f"<parameter #{i} not in model>"), p)
                     for i, p in enumerate(trained) if id(p) not in covered]
        self._uncovered = [(n, p) for n, p in uncovered if p.requires_grad]
        self._dormant = [(n, p) for n, p in uncovered if not p.requires_grad]  # frozen by the user, for now
        # blocks whose weight and bias sit in different parameter groups (other lr / momentum): projecting the
        # joint gradient is not enough in grad mode, their change is projected after the step as well
        group_of = {id(p): gi for gi, g in enumerate(self.base.param_groups) for p in g["params"]}
        self._split_groups = {b.name for b in self.blocks
                              if b.bias is not None and group_of.get(id(b.bias)) != group_of.get(id(b.weight))}
        if not self._hooks_removed:
            self._hooks.replace(self.blocks, self._gate)
        self._live_views.clear()
        if self.tasks_seen > 0:  # add_param_group after a task boundary
            self._refit_after_rebuild()

    def _stat_factory(self) -> StatFactory:
        """How each block's input statistic is made: a sketch for wide inputs under ``statistics="sketch"``."""
        return StatFactory(self.stats_dtype, self.normalize, self.statistics, self.sketch_rank,
                           self.sketch_min_width, self.stats_chunk_rows)

    def _refit_after_rebuild(self) -> None:
        """After ``add_param_group`` past the first task: projectors must fit the new blocks, layers with no
        statistics are frozen (they never saw the old tasks), and the uncovered policy applies to newcomers."""
        self._stacked.clear()
        for b in self.blocks:
            proj = self.projectors.get(b.name)
            if proj is not None and proj.dim == b.projector_dim:
                continue
            if b.stat.memory is None:
                warnings.warn(f"GNSP: layer {b.name!r} was added after a task boundary and has no statistics of "
                              "earlier tasks; it is frozen until the next end_task()", stacklevel=4)
            stored = b.stat.stored_memory() if isinstance(b.stat, SketchStat) else b.stat.memory
            self.projectors[b.name] = self._projector(b, stored)
        if not self._uncovered:
            return
        if self.uncovered == "raise":
            raise ValueError(f"trained parameters not covered by any protection rule: {self.uncovered_parameters}")
        if self.uncovered == "freeze":
            new = [n for n in self.uncovered_parameters if n not in self.frozen]
            self.frozen = self.uncovered_parameters
            if new:
                warnings.warn(f"GNSP: parameter(s) {new} are not covered by any protection rule and are frozen",
                              stacklevel=4)

    def _check_newly_trainable(self) -> None:
        """Uncovered parameters the user unfroze since construction join the uncovered policy, with a warning."""
        woken = [(n, p) for n, p in self._dormant if p.requires_grad]
        if not woken:
            return
        self._dormant = [(n, p) for n, p in self._dormant if not p.requires_grad]
        self._uncovered += woken
        names = [n for n, _ in woken]
        if self.tasks_seen == 0:
            return  # the policy applies at the first end_task(), with its warning
        if self.uncovered == "raise":
            raise ValueError(f"parameter(s) {names} were unfrozen after the wrapper was built and no block "
                             "protects them")
        if self.uncovered == "freeze":
            self.frozen = self.uncovered_parameters
        warnings.warn(f"GNSP: parameter(s) {names} were unfrozen after the wrapper was built; no block protects "
                      f"them, so uncovered={self.uncovered!r} applies: "
                      f"{'they are held still' if self.uncovered == 'freeze' else 'they train unprotected'}",
                      stacklevel=4)

    @property
    def uncovered_parameters(self) -> list[str]:
        """Names of trained parameters that no block protects (frozen after task 1 unless ``uncovered``)."""
        return [n for n, _ in self._uncovered]

    # ------------------------------------------------------------------ statistics
    @contextlib.contextmanager
    def collect(self, row_fraction: float = 1.0, seed: int = 0,
                stop_when_converged: bool | dict[str, Any] = False) -> Iterator[NullSpaceOptimizer]:
        """Open a collection: every forward pass of the model adds to the protected layers' input statistics.

        Run the model on the finished task's data inside it (usually under ``torch.no_grad()`` and
        ``model.eval()``), then call :meth:`end_task`. Outside it the hooks return at once.

        ``row_fraction < 1`` keeps that share of each batch's rows (tokens, conv patches) at random (seeded by
        ``seed``): the Gram cost falls in proportion, the covariance becomes an estimate, and inputs that were
        not sampled are protected only as far as they lie in the span of those that were
        (``benchmarks/overhead.py`` measures the trade-off).

        ``stop_when_converged``: ``True`` or a dict of :class:`~gnsp_optim.convergence.ConvergenceMonitor`
        options (``every``, ``tol``, ``patience``, ``criterion``, ``min_samples``, ...; the rank rule is the
        optimizer's) attaches a monitor (:attr:`monitor`); call :meth:`collection_converged` after each batch
        and stop feeding batches once it returns True. ``monitor.report()`` gives the samples used. Off by
        default: the paper's protocol is one full pass. (:meth:`collect_until_converged` runs the loop.)

        Example::

            with opt.collect(), torch.no_grad():
                for x, _ in old_task_loader:
                    model(x)
            opt.end_task()

            with opt.collect(stop_when_converged={"every": 10, "tol": 0.02}), torch.no_grad():
                for x, _ in old_task_loader:
                    model(x)
                    if opt.collection_converged(len(x)):
                        break
            opt.end_task()
            print(opt.convergence.report())  # {'converged': True, 'samples': ..., 'batches': ..., ...}
        """
        if self._gate.open:
            raise RuntimeError("collect() is already open")
        if not (0.0 < row_fraction <= 1.0):
            raise ValueError(f"row_fraction must lie in (0, 1], got {row_fraction!r}")
        if self._hooks_removed:
            raise RuntimeError("collect(): the hooks were removed (remove_hooks()); build a new wrapper to collect")
        self._check_same_parameters()
        self._follow_model_dtype()
        warn_if_dropout_active(self.model)
        self.convergence = self._convergence_monitor(stop_when_converged)
        gen = torch.Generator().manual_seed(seed)
        for b in self.blocks:
            b.stat.row_fraction, b.stat.generator = float(row_fraction), gen
        watch = watch_outside_use(self.model, self.blocks, self.outside_use)
        self._gate.open = True
        try:
            with watch, self._recording_monitor_inputs():
                yield self
        finally:
            self._gate.open = False
            for b in self.blocks:
                b.stat.row_fraction, b.stat.generator = 1.0, None
            reshard_fsdp_modules(self.model)  # FSDP2: a no_grad pass leaves the root's full weights gathered
        report_outside_use(watch, self.outside_use)

    def _convergence_monitor(self, options: bool | dict[str, Any]) -> ConvergenceMonitor | None:
        if options is False or options is None:
            return None
        if options is not True and not isinstance(options, dict):
            raise TypeError(f"stop_when_converged must be a bool or a dict of ConvergenceMonitor options, got "
                            f"{type(options).__name__}")
        kw = {} if options is True else dict(options)
        kw.setdefault("rule", self.rule)
        kw.setdefault("sync", self.sync)
        return ConvergenceMonitor({b.name: b.stat for b in self.blocks}, **kw)

    def collection_converged(self, samples: int) -> bool:
        """Inside ``collect(stop_when_converged=...)``: count one batch of ``samples``; True once the protected
        subspaces stopped changing (every ``every`` batches the monitor checks; under ``torch.distributed``
        all ranks decide together, so every rank must call this once per batch). False without a monitor."""
        if not self._gate.open:
            raise RuntimeError("collection_converged() must be called inside collect()")
        return self.convergence is not None and self.convergence.update(samples)

    def collect_until_converged(self, batches: Any, forward: Callable[[Any], int], *, row_fraction: float = 1.0,
                                seed: int = 0, progress: bool = False, **monitor_options: Any) -> dict[str, Any]:
        """Run ``forward(batch)`` (it calls the model and returns the batch's sample count) inside
        ``collect(stop_when_converged=monitor_options)`` and ``torch.no_grad()`` until the monitor converges or
        ``batches`` run out; returns the monitor's report plus ``"exhausted"``. Call :meth:`end_task` after.

        Example::

            out = opt.collect_until_converged(loader, lambda b: len(model(b[0])), every=10, tol=0.02)
            opt.end_task()
            out["samples"], out["converged"]
        """
        with self.collect(row_fraction, seed, stop_when_converged=dict(monitor_options)), torch.no_grad():
            assert self.convergence is not None
            return run_until_converged(batches, forward, self.convergence, progress=progress)


    def _check_same_parameters(self) -> None:
        """Refuse to collect for parameters the model no longer holds (replaced, not converted in place)."""
        held = {id(p) for p in self.model.parameters()}
        gone = next((b.weight_name for b in self.blocks if id(b.weight) not in held), None)
        if gone is not None:
            raise RuntimeError(f"parameter {gone!r} was replaced by a new tensor after the wrapper was built (e.g. "
                               "a conversion under torch.__future__.set_overwrite_module_params_on_conversion(True)"
                               ", or load_state_dict(assign=True)): the base optimizer and the wrapper hold the old "
                               "one; build both again for the converted model")

    def _follow_model_dtype(self) -> None:
        """A float32 model converted with ``.double()`` after wrapping: automatic statistics follow it
        (float32 -> float64 is exact); statistics the user fixed at float32 are kept, with a warning."""
        if self.stats_dtype == torch.float64 or not any(b.weight.dtype == torch.float64 for b in self.blocks):
            return
        if not self._stats_dtype_auto:
            warnings.warn("GNSP: the model has float64 weights but stats_dtype=torch.float32 was given: the "
                          "statistics stay float32, so rho=0 protects only to float32 round-off", stacklevel=4)
            return
        warnings.warn("GNSP: the model was converted to float64 after wrapping: the statistics switch to float64 "
                      "too (exactly)", stacklevel=4)
        self.stats_dtype = torch.float64
        for b in self.blocks:
            to_float64_(b.stat)

    def discard_collection(self) -> None:
        """Drop what the current collection gathered (the memory of earlier tasks is untouched)."""
        for b in self.blocks:
            b.stat.clear_task()

    def end_task(self) -> None:
        """Fold the collected statistics into the memory of earlier tasks and rebuild every projector.

        Also projects the base optimizer's linear moment buffers onto the new null spaces
        (``project_state``), and on the first call applies the ``uncovered`` policy.

        Raises ``ValueError`` (nothing changed) when a NaN / Inf reached the collection, naming the layers.
        A protected layer that saw no input is warned about by name and frozen (never left unprotected).
        Every projector is built before any memory changes: an error (e.g. ``eigh`` failing) leaves the
        memory, the collection and the projectors as they were.
        """
        self._check_newly_trainable()
        self._check_collection()
        unseen = [b.name for b in self.blocks if not b.stat.seen]
        if unseen:
            warnings.warn(f"GNSP: protected layer(s) {unseen} saw no input during collect(); they are frozen "
                          "(treated as fully occupied)", stacklevel=2)
        merged = {b.name: b.stat.merged_memory() for b in self.blocks if b.stat.seen}
        projectors = {b.name: self._projector(b, merged.get(b.name)) for b in self.blocks}
        warn_newly_full(self.blocks, self.projectors, projectors)
        for b in self.blocks:
            b.stat.fold(merged.get(b.name))
        self.projectors = projectors
        self._stacked.clear()
        self._live_views.clear()
        self._running_stats.snapshot()
        if self._protection_monitor is not None and self._protection_inputs not in (None, ...):
            self._protection_monitor.add_task(self._protection_inputs, name=f"task {self.tasks_seen}")
            self._protection_inputs = None
        if self.project_state:
            self._project_moments()
        if self.tasks_seen == 0 and self.uncovered == "freeze" and self._uncovered:
            self.frozen = self.uncovered_parameters
            warnings.warn(f"GNSP: {len(self.frozen)} trained parameter(s) are not covered by any protection "
                          f"rule and are frozen from now on: {self.frozen}", stacklevel=2)
        self.tasks_seen += 1

    def _check_collection(self) -> None:
        """end_task's preconditions: collection closed, statistics synchronised and finite, policy satisfied."""
        if self._gate.open:
            raise RuntimeError("end_task() called while collect() is still open")
        self._sync_statistics()
        if self.blocks and not any(b.stat.seen for b in self.blocks):
            raise RuntimeError("end_task() found nothing collected: run the model on the finished task's data "
                               "inside opt.collect() first; nothing was changed")
        bad = [b.name for b in self.blocks if not b.stat.task_is_finite()]
        if bad:
            raise ValueError(f"non-finite values (NaN/Inf) reached collect() in layer(s) {bad}; the collection "
                             "was refused and the memory of earlier tasks is unchanged (call "
                             "discard_collection() and collect again)")
        if self.tasks_seen == 0 and self.uncovered == "raise" and self._uncovered:
            raise ValueError(f"trained parameters not covered by any protection rule: {self.uncovered_parameters}")

    def _sync_statistics(self) -> None:
        import torch.distributed as dist

        sync = self.sync
        if sync is None:
            sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if sync:
            for b in self.blocks:
                b.stat.all_reduce_()

    def _projector(self, b: Block, memory: torch.Tensor | SketchMemory | None) -> Projector:
        """The block's projector from its memory (built by its kind; a bounded sketch builds its own);
        no memory: fully occupied (frozen)."""
        where = dict(device=b.weight.device, dtype=b.weight.dtype)
        if isinstance(memory, SketchMemory):
            return memory.projector(self.rule, with_bias=b.bias is not None, **where)
        return b.kind.projector(b, memory, self.rule, **where)

    def _project_moments(self) -> None:
        if isinstance(self.base, torch.optim.LBFGS):
            # LBFGS's curvature history is one flat vector over all parameters: it cannot be projected per
            # layer, so it is dropped at the task boundary
            self.base.state.clear()
        project_moments(self.base.state, list(self._active()))

    # ------------------------------------------------------------------ projection
    def _active(self) -> Iterator[tuple[Block, Projector]]:
        """The blocks whose projector restricts anything, with it (as far as they train: :meth:`_live`)."""
        for b in self.blocks:
            p = self.projectors.get(b.name)
            if p is not None and p.basis.device != b.weight.device:  # model.to(device) after end_task()
                p = self.projectors[b.name] = p.to(device=b.weight.device)
                self._stacked.clear()
                self._live_views.clear()
            if p is not None:
                b, p = self._live(b, p)
            if p is not None and not p.is_identity:
                yield b, p

    def _live(self, b: Block, proj: Projector) -> tuple[Block, Projector]:
        """The block as far as it trains now (``requires_grad``), with its projector.

        A frozen weight holds the whole block still: with ``dW = 0`` the bias change must meet every old
        input's constant 1 with zero, so ``db = 0`` (the gradients are dropped, never zeroed). A frozen bias
        leaves the weight-only block, projected by the weight part of the memory (refit once per change).
        """
        w_live, b_live = b.weight.requires_grad, b.bias is not None and b.bias.requires_grad
        if w_live and (b_live or b.bias is None):
            return b, proj
        key = (b.name, w_live, b_live)
        if key not in self._live_views:
            view = b if not w_live else dataclasses.replace(b, bias=None, bias_name=None, bias_rows=None)
            memory = b.stat.memory if w_live and not proj.is_zero else None
            self._live_views[key] = (view, self._projector(view, memory))
        return self._live_views[key]

    def _held_still(self) -> list[nn.Parameter]:
        """The uncovered parameters the ``"freeze"`` policy holds still (none before the first end_task)."""
        return [p for _, p in self._uncovered] if self.frozen else []

    def _project_gradients(self) -> None:
        project_gradients(list(self._active()), batched=self.batch_layers, cache=self._stacked)
        for p in self._held_still():
            p.grad = None

    def _change_projection(self) -> contextlib.AbstractContextManager:
        """What is projected after the base step: in update mode every block's change (and the frozen
        parameters restored), in grad mode only blocks split over parameter groups."""
        pairs = [(b, p) for b, p in self._active()
                 if (self.mode == "update" or b.name in self._split_groups) and (not p.is_zero or b.shares_bias)]
        # (a frozen block owning its tensors has no gradient, hence no change; one sharing a bias does)
        if self.mode == "grad" and not pairs:
            return contextlib.nullcontext()
        held = self._held_still() if self.mode == "update" else []  # LBFGS moves parameters without gradient
        return projected_change(pairs, held, batched=self.batch_layers, cache=self._stacked)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Project, then take the base optimizer's step (``mode="update"``: project the change it made too)."""
        if self._dormant:
            self._check_newly_trainable()
        if not self.projectors and not self.frozen:
            return self.base.step() if closure is None else self.base.step(self._projecting(closure))
        with self._change_projection():
            if closure is not None:
                return self.base.step(self._projecting(closure))
            self._project_gradients()
            return self.base.step()

    def _projecting(self, closure: Callable[[], float]) -> Callable[[], float]:
        """``closure`` followed by the gradient projection (closure-based optimizers: LBFGS, Lightning)."""
        def projected_closure():
            with torch.enable_grad():
                loss = closure()
            if self.projectors or self.frozen:
                self._project_gradients()
            return loss

        return projected_closure

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus the protection state, keyed by parameter names.

        Under FSDP2 the base optimizer's sharded state is gathered into a full, name-keyed state dict (a
        collective: call it on every rank, save from rank 0); it loads into one process and back.

        Example:
            >>> sd = opt.state_dict()        # doctest: +SKIP
            >>> sorted(sd)                   # doctest: +SKIP
            ['base', 'gnsp']
        """
        reshard_fsdp_modules(self.model)  # after an eval forward FSDP2 would name the gathered weights
        base, keys = base_state_dict(self.model, self.base)
        return {"base": base,
                "gnsp": pack_protection_state(self.blocks, self.projectors, tasks_seen=self.tasks_seen,
                                              mode=self.mode, frozen=self.frozen, base_keys=keys)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict`'s output. Everything is checked before anything changes.

        Raises ``ValueError`` naming the first mismatch (another model, other protected parameters, shapes)
        and for an unknown format version.
        """
        if not isinstance(state_dict, dict) or "gnsp" not in state_dict or "base" not in state_dict:
            raise ValueError("not a NullSpaceOptimizer state dict (expected keys 'base' and 'gnsp'); to load a "
                             "plain optimizer's state use opt.base.load_state_dict(...)")
        g = state_dict["gnsp"]
        check_protection_state(g, self.blocks, set(self._named_params()))
        load_base_state_dict(self.model, self.base, state_dict["base"], g.get("base_keys", "ids"))
        self.projectors = restore_protection_state(g, self.blocks)
        self._stacked.clear()
        self._live_views.clear()
        self.frozen = list(g["frozen"])
        self.tasks_seen = int(g["tasks_seen"])

    # ------------------------------------------------------------------ monitor
    def monitor(self, inputs: Any = None, *, every: int = 100, tol: float = 1e-4, sample: int = 64,
                forward: Callable[[nn.Module, Any], Any] | None = None) -> Any:
        """Watch the old outputs: every ``every`` steps re-run the model on a sample of old inputs, log the
        relative drift, and warn above ``tol`` (a :class:`~gnsp_optim.monitor.ProtectionMonitor`, attached
        once; later calls return it and may add inputs).

        ``inputs`` given: their first ``sample`` rows are remembered now, as the last finished task, with the
        outputs the model gives on them now. ``inputs=None``: the next :meth:`collect` remembers the first
        ``sample`` rows of the first call of the model itself (``model(x)`` / ``model(**batch)``) and
        :meth:`end_task` registers them; calls like ``model.get_image_features(...)`` bypass that, so pass
        ``inputs`` and ``forward(model, inputs)`` then. Cost: one no-grad forward over ``sample`` rows per
        remembered task every ``every`` steps (``benchmarks/boundary_overhead.py``: about 1% of training
        compute per task at ``every=100``).

        Example:
            >>> mon = opt.monitor(old_inputs, every=50, tol=1e-6)   # doctest: +SKIP
            >>> mon.history[-1]                                       # doctest: +SKIP
            {'step': 50, 'task': 'task 0', 'drift': 3.1e-16}
        """
        from .monitor import ProtectionMonitor

        if self._protection_monitor is None:
            self._protection_monitor = ProtectionMonitor(self.model, every=every, tol=tol, sample=sample,
                                                         forward=forward)
            self._protection_monitor.attach(self)
        if inputs is not None:
            self._protection_monitor.add_task(inputs, name=f"task {max(self.tasks_seen - 1, 0)}")
        else:
            self._protection_inputs = ...  # the next collect() records them
        return self._protection_monitor

    @contextlib.contextmanager
    def _recording_monitor_inputs(self) -> Iterator[None]:
        if self._protection_monitor is None or self._protection_inputs is not ...:
            yield
            return
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._protection_inputs is ...:
                self._protection_inputs = dict(kwargs) if kwargs and not args else (args[0] if len(args) == 1
                                                                                  else tuple(args))
        handle = self.model.register_forward_pre_hook(record, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------ introspection
    def report(self) -> list[dict[str, Any]]:
        """One row per protected layer: parameters, projector dimension ``input_dim`` (inputs plus the bias
        column when the bias is protected), kept rank, null dimension, the share of eigenvalue mass left in
        the null space, projector form and memory (see :func:`gnsp_optim.report.report_rows`).

        Example:
            >>> rows = opt.report()          # doctest: +SKIP
            >>> rows[0]["kept_rank"]         # doctest: +SKIP
        """
        return report_rows(self.blocks, self.projectors)

    def summary(self) -> str:
        """A readable table of :meth:`report` plus the frozen parameters.

        Example:
            >>> print(opt.summary())         # doctest: +SKIP
        """
        title = f"NullSpaceOptimizer: mode={self.mode}, rule={self.rule}, tasks seen={self.tasks_seen}"
        return format_summary(self.report(), title, self.frozen)

