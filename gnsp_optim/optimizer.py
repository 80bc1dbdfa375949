r"""``NullSpaceOptimizer``: wrap any torch optimizer so that training a new task leaves old outputs unchanged.

The data path, in one reading: forward hooks (:mod:`.selection`) feed each protected layer's inputs to its
statistic (:mod:`.statistics`) while :meth:`NullSpaceOptimizer.collect` is open; :meth:`~NullSpaceOptimizer.end_task`
folds them into the memory of earlier tasks, eigendecomposes it and applies a rank rule (:mod:`.subspace`) to
get a projector (:mod:`.projector`); :meth:`~NullSpaceOptimizer.step` applies it.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from .projector import Projector
from .selection import (
    Block,
    FeatureSource,
    clean_name,
    discover_blocks,
    install_hooks,
    parameter_owners,
    select_blocks,
    unwrap_model,
)
from .statistics import NORMALIZE_MODES
from .subspace import RankRule, TailEnergy, eigh_descending

__all__ = ["NullSpaceOptimizer", "FORMAT_VERSION"]

FORMAT_VERSION = 1
MODES = ("grad", "update")
UNCOVERED = ("freeze", "train", "raise")
#: optimizer-state entries that are linear in past gradients: projected onto the new null space at end_task.
#: (Centred RMSprop's ``grad_avg`` is linear too but must stay below ``square_avg``; it is left alone.)
LINEAR_STATE_KEYS = ("momentum_buffer", "exp_avg")


def _is_view_of(view: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether ``view`` shares the storage of a contiguous ``base`` (writing into it writes into ``base``)."""
    return base.is_contiguous() and view.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()


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
        protect: parameter-name glob patterns to protect (``None``: every Linear, Conv1d/2d and
            MultiheadAttention weight and bias the base optimizer trains, plus ``feature_sources``).
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
    ) -> None:
        if isinstance(base_optim, NullSpaceOptimizer):
            raise TypeError("base_optim is already a NullSpaceOptimizer; wrap the inner optimizer once")
        if not isinstance(base_optim, torch.optim.Optimizer):
            raise TypeError(f"base_optim must be a torch.optim.Optimizer, got {type(base_optim).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(rho, numbers.Real) or not (0.0 <= float(rho) < 1.0):  # numpy scalars welcome
            raise ValueError(f"rho must be a number in [0, 1), got {rho!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if uncovered not in UNCOVERED:
            raise ValueError(f"uncovered must be one of {UNCOVERED}, got {uncovered!r}")
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if stats_dtype is None:  # float32, or float64 for a float64 model
            dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
            stats_dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        if stats_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"stats_dtype must be torch.float32 or torch.float64, got {stats_dtype}")
        if isinstance(protect, str):
            protect = [protect]

        # torch.optim.Optimizer bookkeeping, without its __init__ (which would build param_groups anew)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._patch_step_function()

        from .integrations.distributed import check_model_supported  # FSDP shards: refused with the reason

        check_model_supported(model, [p for g in base_optim.param_groups for p in g["params"]])
        self.base = base_optim
        self.model = unwrap_model(model)
        self.rho, self.mode, self.uncovered, self.normalize = float(rho), mode, uncovered, normalize
        self.rule: RankRule = rule if rule is not None else TailEnergy(float(rho))
        self.protect = None if protect is None else tuple(protect)
        self.feature_sources = dict(feature_sources or {})
        self.stats_dtype, self.project_state, self.sync = stats_dtype, project_state, sync
        self.batch_layers = bool(batch_layers)
        self._stacked: dict[tuple, tuple[list[Projector], Projector]] = {}  # batch_layers: padded bases
        self.tasks_seen = 0
        self.projectors: dict[str, Projector] = {}
        self.frozen: list[str] = []  # names of trained parameters that no block protects (after task 1)
        self._collecting = False
        self._handles: list = []
        self._build_blocks()

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

    def _build_blocks(self) -> None:
        for h in self._handles:
            h.remove()
        named = self._named_params()
        trained = [p for g in self.base.param_groups for p in g["params"]]
        ids = [id(p) for p in trained]
        if len(set(ids)) != len(ids):
            raise ValueError("the base optimizer lists a parameter twice")
        by_id = {id(p): n for n, p in named.items()}
        if not any(i in by_id for i in ids):
            raise ValueError("the base optimizer shares no parameter with the model")
        old = getattr(self, "blocks", [])
        candidates = discover_blocks(self.model, self.feature_sources, dtype=self.stats_dtype,
                                     normalize=self.normalize)
        trainable = {id(p) for p in trained if p.requires_grad}  # requires_grad=False: the user froze it
        self.blocks: list[Block] = select_blocks(candidates, named, trainable, self.protect,
                                                 owners=parameter_owners(self.model))
        for b in self.blocks:  # keep the memory of blocks that existed before an add_param_group
            prev = next((o for o in old if o.name == b.name), None)
            if prev is not None:
                b.stat = prev.stat
        covered = {id(p) for b in self.blocks for _, p in b.params}
        self._uncovered = [(by_id.get(id(p), f"<parameter #{i} not in model>"), p)
                           for i, p in enumerate(trained) if id(p) not in covered and p.requires_grad]
        # blocks whose weight and bias sit in different parameter groups (other lr / momentum): projecting the
        # joint gradient is not enough in grad mode, their change is projected after the step as well
        group_of = {id(p): gi for gi, g in enumerate(self.base.param_groups) for p in g["params"]}
        self._split_groups = {b.name for b in self.blocks
                              if b.bias is not None and group_of.get(id(b.bias)) != group_of.get(id(b.weight))}
        self._handles = install_hooks(self.blocks, lambda: self._collecting)
        if getattr(self, "tasks_seen", 0) > 0:  # add_param_group after a task boundary
            self._refresh_after_rebuild()

    def _refresh_after_rebuild(self) -> None:
        """After ``add_param_group`` past the first task: projectors must fit the new blocks, layers with no
        statistics are frozen (they never saw the old tasks), and the uncovered policy applies to newcomers."""
        self._stacked.clear()
        for b in self.blocks:
            proj = self.projectors.get(b.name)
            if proj is not None and proj.dim == b.dim:
                continue
            if b.stat.memory is not None:
                self.projectors[b.name] = self._build_projector(b)
            else:
                warnings.warn(f"GNSP: layer {b.name!r} was added after a task boundary and has no statistics of "
                              "earlier tasks; it is frozen until the next end_task()", stacklevel=3)
                self.projectors[b.name] = self._frozen_projector(b)
        if self._uncovered:
            if self.uncovered == "raise":
                raise ValueError(f"trained parameters not covered by any protection rule: "
                                 f"{self.uncovered_parameters}")
            if self.uncovered == "freeze":
                new = [n for n in self.uncovered_parameters if n not in self.frozen]
                self.frozen = self.uncovered_parameters
                if new:
                    warnings.warn(f"GNSP: parameter(s) {new} are not covered by any protection rule and are "
                                  "frozen", stacklevel=3)

    @property
    def uncovered_parameters(self) -> list[str]:
        """Names of trained parameters that no block protects (frozen after task 1 unless ``uncovered``)."""
        return [n for n, _ in self._uncovered]

    # ------------------------------------------------------------------ statistics
    @contextlib.contextmanager
    def collect(self, row_fraction: float = 1.0, seed: int = 0) -> Iterator[NullSpaceOptimizer]:
        """Open a collection: every forward pass of the model adds to the protected layers' input statistics.

        Run the model on the finished task's data inside it (usually under ``torch.no_grad()`` and
        ``model.eval()``), then call :meth:`end_task`. Outside it the hooks return at once.

        ``row_fraction < 1`` keeps that share of each batch's rows (tokens, conv patches) at random (seeded by
        ``seed``): the Gram cost falls in proportion, the covariance becomes an estimate, and inputs that were
        not sampled are protected only as far as they lie in the span of those that were
        (``benchmarks/overhead.py`` measures the trade-off).

        Example::

            with opt.collect(), torch.no_grad():
                for x, _ in old_task_loader:
                    model(x)
            opt.end_task()
        """
        if self._collecting:
            raise RuntimeError("collect() is already open")
        if not (0.0 < row_fraction <= 1.0):
            raise ValueError(f"row_fraction must lie in (0, 1], got {row_fraction!r}")
        gen = torch.Generator().manual_seed(seed)
        for b in self.blocks:
            b.stat.row_fraction, b.stat.generator = float(row_fraction), gen
        self._collecting = True
        try:
            yield self
        finally:
            self._collecting = False
            for b in self.blocks:
                b.stat.row_fraction, b.stat.generator = 1.0, None

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
        """
        if self._collecting:
            raise RuntimeError("end_task() called while collect() is still open")
        self._maybe_sync()
        bad = [b.name for b in self.blocks if not b.stat.task_is_finite()]
        if bad:
            raise ValueError(f"non-finite values (NaN/Inf) reached collect() in layer(s) {bad}; the collection "
                             "was refused and the memory of earlier tasks is unchanged (call "
                             "discard_collection() and collect again)")
        if self.tasks_seen == 0 and self.uncovered == "raise" and self._uncovered:
            raise ValueError(f"trained parameters not covered by any protection rule: "
                             f"{self.uncovered_parameters}")
        unseen = [b.name for b in self.blocks if not b.stat.seen]
        if unseen:
            warnings.warn(f"GNSP: protected layer(s) {unseen} saw no input during collect(); they are frozen "
                          "(treated as fully occupied)", stacklevel=2)
        new: dict[str, Projector] = {}
        seen_stats = {id(b.stat) for b in self.blocks if b.stat.seen}
        for b in self.blocks:
            if id(b.stat) not in seen_stats:
                new[b.name] = self._frozen_projector(b)
        folded: set[int] = set()
        for b in self.blocks:
            if id(b.stat) in seen_stats and id(b.stat) not in folded:
                b.stat.fold()
                folded.add(id(b.stat))
        for b in self.blocks:
            if b.name not in new:
                new[b.name] = self._build_projector(b)
            else:
                b.stat.clear_task()
        self.projectors = new
        self._stacked.clear()
        if self.project_state:
            self._project_optimizer_state()
        if self.tasks_seen == 0 and self.uncovered == "freeze" and self._uncovered:
            self.frozen = self.uncovered_parameters
            warnings.warn(f"GNSP: {len(self.frozen)} trained parameter(s) are not covered by any protection "
                          f"rule and are frozen from now on: {self.frozen}", stacklevel=2)
        self.tasks_seen += 1

    def _maybe_sync(self) -> None:
        import torch.distributed as dist

        sync = self.sync
        if sync is None:
            sync = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if sync:
            for st in {id(b.stat): b.stat for b in self.blocks}.values():
                st.all_reduce_()

    def _frozen_projector(self, b: Block) -> Projector:
        d = b.dim
        eye = torch.eye(d, dtype=b.weight.dtype, device=b.weight.device).expand(b.groups, d, d)
        return Projector.from_bases(eye, eye[:, :, :0], [d] * b.groups)

    def _build_projector(self, b: Block) -> Projector:
        mem = b.stat.block(with_bias=b.bias is not None)
        lam, vec = eigh_descending(mem, label=b.name)
        if isinstance(self.rule, TailEnergy) and self.rule.rho == 0.0:
            # rho = 0 asks for the null space itself: eigenvalues under the decomposition's round-off floor
            # (d * eps * largest) are zero; any rho > 0 keeps every eigenvalue and lets the rule decide
            floor = lam.shape[-1] * torch.finfo(lam.dtype).eps * lam[:, :1]
            lam = torch.where(lam <= floor, torch.zeros_like(lam), lam)
        ranks = [int(self.rule(lam[g])) for g in range(b.groups)]
        null = torch.stack([vec[g].roll(-ranks[g], dims=1) for g in range(b.groups)])
        proj = Projector.from_bases(vec, null, ranks).to(device=b.weight.device, dtype=b.weight.dtype)
        proj.eigenvalues = lam.detach().cpu()
        return proj

    # ------------------------------------------------------------------ projection
    def _active(self) -> Iterator[tuple[Block, Projector]]:
        for b in self.blocks:
            p = self.projectors.get(b.name)
            if p is not None and not p.is_identity:
                yield b, p

    @torch.no_grad()
    def _project_pair(self, b: Block, proj: Projector, w: torch.Tensor, bias: torch.Tensor | None) -> None:
        wm, bm = b.read(w, bias)
        if _is_view_of(wm, w) and (bias is None or _is_view_of(bm, bias)):
            proj.apply_(wm, bm)  # fast path: in place, no copy back (twin: apply + write, test_math_twins)
            return
        nw, nb = proj.apply(wm, bm)
        b.write(w, bias, nw, nb)

    @torch.no_grad()
    def _project_pairs(self, items: list[tuple[Block, Projector, torch.Tensor, torch.Tensor | None]]) -> None:
        """Project every ``(block, projector, weight-like, bias-like)`` in place: one product per layer, or
        with ``batch_layers`` one batched product per group of equal shapes (twin: the per-layer loop)."""
        if not self.batch_layers or len(items) < 2:
            for item in items:
                self._project_pair(*item)
            return
        groups: dict[tuple, list] = {}
        for b, proj, w, bias in items:
            wm, bm = b.read(w, bias)
            key = (proj.form, proj.dim, tuple(wm.shape[1:]), bm is None, wm.dtype, wm.device)
            groups.setdefault(key, []).append((b, proj, w, bias, wm, bm))
        for key, members in groups.items():
            if len(members) == 1:
                self._project_pair(*members[0][:4])
                continue
            stacked = self._stacked_projector(key, [m[1] for m in members])
            big_w = torch.cat([m[4] for m in members])  # (sum of groups, rows, d): one copy in ...
            big_b = None if key[3] else torch.cat([m[5] for m in members])
            stacked.apply_(big_w, big_b)
            start = 0
            for b, _, w, bias, wm, bm in members:  # ... and one copy back
                stop = start + wm.shape[0]
                nw, nb = big_w[start:stop], None if big_b is None else big_b[start:stop]
                if _is_view_of(wm, w) and (bias is None or _is_view_of(bm, bias)):
                    wm.copy_(nw)
                    if bm is not None:
                        bm.copy_(nb)
                else:
                    b.write(w, bias, nw, nb)
                start = stop

    def _stacked_projector(self, key: tuple, projs: list[Projector]) -> Projector:
        """The projectors' bases stacked along the group axis, zero-padded to the widest (cached per member
        list until the projectors change: the gradient and the update pass may group different members)."""
        key = (key, tuple(id(p) for p in projs))  # the cache holds the projectors, so their ids stay unique
        cached = self._stacked.get(key)
        if cached is not None:
            return cached[1]
        width = max(p.basis.shape[-1] for p in projs)
        first = projs[0].basis
        basis = first.new_zeros(sum(p.basis.shape[0] for p in projs), first.shape[1], width, dtype=key[0][4])
        start = 0
        for p in projs:
            basis[start:start + p.basis.shape[0], :, : p.basis.shape[-1]] = p.basis
            start += p.basis.shape[0]
        stacked = Projector(projs[0].form, basis, [k for p in projs for k in p.kept_ranks], projs[0].dim)
        self._stacked[key] = (list(projs), stacked)
        return stacked

    @torch.no_grad()
    def _project_grads(self) -> None:
        items = []
        for b, proj in self._active():
            if proj.is_zero and b.bias_rows is None:  # frozen block owning its tensors: skip it entirely
                for _, p in b.params:
                    p.grad = None
                continue
            g_w = b.weight.grad
            g_b = b.bias.grad if b.bias is not None else None
            if g_w is None and g_b is None:
                continue
            if g_w is None:
                b.weight.grad = g_w = torch.zeros_like(b.weight)
            if b.bias is not None and g_b is None:
                b.bias.grad = g_b = torch.zeros_like(b.bias)
            items.append((b, proj, g_w, g_b))
        self._project_pairs(items)
        for _, p in self._frozen_params():
            p.grad = None

    def _frozen_params(self) -> list[tuple[str, nn.Parameter]]:
        return self._uncovered if self.frozen else []

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Project, then take the base optimizer's step (``mode="update"``: project the change it made too)."""
        if not self.projectors and not self.frozen:
            if closure is None:
                return self.base.step()
            return self.base.step(self._wrap_closure(closure))
        after: list[tuple[Block, Projector]] | None = None  # blocks whose change is projected after the step
        originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, copy before the step)
        frozen_snapshot = []
        if self.mode == "update" or self._split_groups:
            # frozen blocks whose grads are dropped need no snapshot; one sharing a bias (q/k/v rows) does; in
            # grad mode only blocks split over parameter groups are projected after the step
            after = [(b, proj) for b, proj in self._active()
                     if (self.mode == "update" or b.name in self._split_groups)
                     and (not proj.is_zero or b.bias_rows is not None)]
            for b, _ in after:  # q/k/v row blocks share one bias tensor: it is copied (and restored) once
                for t in (b.weight, b.bias):
                    if t is not None and id(t) not in originals:
                        originals[id(t)] = (t.detach(), t.detach().clone())
        if self.mode == "update":  # some optimizers (LBFGS) move parameters that have no gradient
            frozen_snapshot = [(p, p.detach().clone()) for _, p in self._frozen_params()]
        if closure is None:
            self._project_grads()
            loss = self.base.step()
        else:
            loss = self.base.step(self._wrap_closure(closure))
        if after is not None:  # W <- W0 + P(W - W0), in place in the parameters (no delta tensors)
            for t, t0 in originals.values():
                t.sub_(t0)
            self._project_pairs([(b, proj, b.weight.detach(), None if b.bias is None else b.bias.detach())
                                 for b, proj in after])
            for t, t0 in originals.values():
                t.add_(t0)
        for p, p0 in frozen_snapshot:
            p.detach().copy_(p0)
        return loss

    def _wrap_closure(self, closure: Callable[[], float]) -> Callable[[], float]:
        def projected_closure():
            with torch.enable_grad():
                loss = closure()
            if self.projectors or self.frozen:
                self._project_grads()
            return loss

        return projected_closure

    @torch.no_grad()
    def _project_optimizer_state(self) -> None:
        if isinstance(self.base, torch.optim.LBFGS):
            # LBFGS's curvature history is one flat vector over all parameters: it cannot be projected per
            # layer, so it is dropped at the task boundary
            self.base.state.clear()
        for b, proj in self._active():
            bufs_w = self.base.state.get(b.weight, {})
            bufs_b = self.base.state.get(b.bias, {}) if b.bias is not None else {}
            for key in LINEAR_STATE_KEYS:
                t_w = bufs_w.get(key)
                t_b = bufs_b.get(key)
                if not isinstance(t_w, torch.Tensor) or t_w.shape != b.weight.shape:
                    continue
                if b.bias is not None and not (isinstance(t_b, torch.Tensor) and t_b.shape == b.bias.shape):
                    # the bias has no buffer yet: project [t_w | 0]; SGD's momentum buffer for the bias can be
                    # created from the result (SGD reads it when present), other optimizers' cannot
                    t_b = torch.zeros_like(b.bias)
                    if key == "momentum_buffer" and not bufs_b:
                        self.base.state[b.bias]["momentum_buffer"] = t_b
                self._project_pair(b, proj, t_w, t_b)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """The base optimizer's state dict plus the protection state, keyed by parameter names.

        Example:
            >>> sd = opt.state_dict()        # doctest: +SKIP
            >>> sorted(sd)                   # doctest: +SKIP
            ['base', 'gnsp']
        """
        stats = {}
        for b in self.blocks:
            stats[b.name] = {"weight": b.weight_name, "bias": b.bias_name, "dim": b.stat.dim,
                             "groups": b.groups, "memory": b.stat.memory,
                             "tasks_folded": b.stat.tasks_folded}
        projs = {name: {"form": p.form, "basis": p.basis, "kept_ranks": list(p.kept_ranks), "dim": p.dim,
                        "eigenvalues": p.eigenvalues}
                 for name, p in self.projectors.items()}
        return {"base": self.base.state_dict(),
                "gnsp": {"format_version": FORMAT_VERSION, "tasks_seen": self.tasks_seen, "mode": self.mode,
                         "blocks": stats, "projectors": projs, "frozen": list(self.frozen)}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore :meth:`state_dict`'s output. Everything is checked before anything changes.

        Raises ``ValueError`` naming the first mismatch (another model, other protected parameters, shapes)
        and for an unknown format version.
        """
        if not isinstance(state_dict, dict) or "gnsp" not in state_dict or "base" not in state_dict:
            raise ValueError("not a NullSpaceOptimizer state dict (expected keys 'base' and 'gnsp'); to load a "
                             "plain optimizer's state use opt.base.load_state_dict(...)")
        g = state_dict["gnsp"]
        version = g.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"unknown gnsp state format version {version!r} (this library reads "
                             f"{FORMAT_VERSION})")
        mine = {b.name: b for b in self.blocks}
        theirs = g["blocks"]
        if set(theirs) != set(mine):
            missing, extra = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            raise ValueError(f"state dict protects other layers: missing {missing}, unexpected {extra}")
        for name, rec in theirs.items():
            b = mine[name]
            if (rec["weight"], rec["bias"], rec["dim"], rec["groups"]) != (b.weight_name, b.bias_name,
                                                                          b.stat.dim, b.groups):
                raise ValueError(f"layer {name!r}: saved as weight={rec['weight']!r} bias={rec['bias']!r} "
                                 f"dim={rec['dim']} groups={rec['groups']}, but this model has "
                                 f"weight={b.weight_name!r} bias={b.bias_name!r} dim={b.stat.dim} "
                                 f"groups={b.groups}")
            mem = rec["memory"]
            if mem is not None and tuple(mem.shape) != (b.groups, b.stat.dim + 1, b.stat.dim + 1):
                raise ValueError(f"layer {name!r}: saved memory has shape {tuple(mem.shape)}")
        for name, rec in g["projectors"].items():
            if name not in mine:
                raise ValueError(f"state dict has a projector for unknown layer {name!r}")
            if rec["dim"] != mine[name].dim:
                raise ValueError(f"layer {name!r}: saved projector acts on {rec['dim']} inputs, this model's "
                                 f"on {mine[name].dim}")
        named = self._named_params()
        unknown = [n for n in g["frozen"] if n not in named and not n.startswith("<")]
        if unknown:
            raise ValueError(f"state dict freezes parameters this model does not have: {unknown}")
        self.base.load_state_dict(state_dict["base"])
        for name, rec in theirs.items():
            st = mine[name].stat
            st.memory = None if rec["memory"] is None else rec["memory"].to(st.dtype).clone()
            st.tasks_folded = rec["tasks_folded"]
            st.clear_task()
        self.projectors = {}
        self._stacked.clear()
        for name, rec in g["projectors"].items():
            w = mine[name].weight
            self.projectors[name] = Projector(rec["form"], rec["basis"].to(device=w.device, dtype=w.dtype),
                                              list(rec["kept_ranks"]), rec["dim"], rec.get("eigenvalues"))
        self.frozen = list(g["frozen"])
        self.tasks_seen = int(g["tasks_seen"])

    # ------------------------------------------------------------------ introspection
    def report(self) -> list[dict[str, Any]]:
        """One row per protected layer: parameters, input dimension, kept rank, null dimension, the share of
        eigenvalue mass left in the null space, projector form and memory.

        Example:
            >>> rows = opt.report()          # doctest: +SKIP
            >>> rows[0]["kept_rank"]         # doctest: +SKIP
        """
        rows = []
        for b in self.blocks:
            p = self.projectors.get(b.name)
            row: dict[str, Any] = {"layer": b.name, "params": [n for n, _ in b.params], "groups": b.groups,
                                   "input_dim": b.dim, "kept_rank": None, "null_dim": None,
                                   "null_mass": None, "form": None, "projector_bytes": 0,
                                   "memory_bytes": 0 if b.stat.memory is None else
                                   b.stat.memory.numel() * b.stat.memory.element_size()}
            if p is not None:
                row["kept_rank"] = sum(p.kept_ranks)
                row["null_dim"] = b.groups * b.dim - sum(p.kept_ranks)
                row["form"] = "frozen" if p.is_zero else ("free" if p.is_identity else p.form)
                row["projector_bytes"] = p.nbytes
                lam = p.eigenvalues
                if lam is not None:
                    lam = lam.to(torch.float64)
                    tail = sum(float(lam[g, k:].sum()) for g, k in enumerate(p.kept_ranks))
                    total = float(lam.sum())
                    row["null_mass"] = tail / total if total > 0 else 0.0
            rows.append(row)
        return rows

    def summary(self) -> str:
        """A readable table of :meth:`report` plus the frozen parameters.

        Example:
            >>> print(opt.summary())         # doctest: +SKIP
        """
        head = f"{'layer':<44} {'in':>6} {'kept':>6} {'null':>6} {'null mass':>9} {'form':>6} {'proj MB':>8}"
        lines = [f"NullSpaceOptimizer: mode={self.mode}, rule={self.rule}, tasks seen={self.tasks_seen}",
                 head, "-" * len(head)]
        for r in self.report():
            def fmt(v: Any, spec: str = "") -> str:
                return "-" if v is None else format(v, spec)
            lines.append(f"{r['layer'][-44:]:<44} {r['input_dim'] * r['groups']:>6} {fmt(r['kept_rank']):>6} "
                         f"{fmt(r['null_dim']):>6} {fmt(r['null_mass'], '.2e'):>9} {fmt(r['form']):>6} "
                         f"{r['projector_bytes'] / 2**20:>8.2f}")
        total = sum(r["projector_bytes"] for r in self.report())
        lines.append(f"projectors: {total / 2**20:.2f} MB; frozen parameters: {len(self.frozen)}"
                     + (f" ({', '.join(self.frozen[:6])}{', ...' if len(self.frozen) > 6 else ''})"
                        if self.frozen else ""))
        return "\n".join(lines)
