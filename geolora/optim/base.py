"""The base class of every geolora LoRA optimizer and its contract.

A LoRA pair is a param group ``{"params": [B, A], "lora_pair": True, "scaling": s, "name": ...}``
with ``B: (out, r)``, ``A: (r, in)``, ``ΔW = s·B A`` (convolution factors are viewed as matrices,
:func:`~geolora.optim.validation.matrix_view`). Conventions: ``M = B``, ``N = Aᵀ``,
``X = M Nᵀ``; autograd's factor gradients are exactly ``∇_M = ∇_X f N`` and
``∇_N = ∇_X fᵀ M`` with ``∇_X f = s ∇_{ΔW} f``. Groups without ``lora_pair`` are ordinary
parameters, updated with AdamW, so one optimizer object trains a whole model.

The contract of a subclass (everything else — validation, the robust start, AdamW for ordinary
groups, batching of same-shape pairs, step plans, atomic commit — is shared):

* :meth:`LoRAOptimizer._update_pairs` ``(group, x, g, state, step) -> FactorPoint``: the new
  factors of a *stack* of pairs (leading dim L) from the stacked factors ``x``, factor gradients
  ``g`` and states. It must not write anything but the ``state`` dict it is given (assign new
  tensors to keys; set :attr:`functional_state` if it never modifies a state tensor in place).
* :meth:`LoRAOptimizer._init_pair_state` ``(group, B, A) -> dict``: the fresh state of one pair.
* Declared needs: :meth:`requires_full_rank` (pairs with rank-deficient ``X`` take the robust
  start until ``X`` is well conditioned), :meth:`_entry_policy` (optimizers that own a manifold
  point decide how a pair enters it), :attr:`functional_state`.
* :meth:`_validate_hyperparameters` for the subclass's own hyperparameters (call ``super()``).
* Sharded factors (FSDP2 ``DTensor`` s, :mod:`geolora.optim.sharding`): an optimizer whose
  step runs on row shards sets :attr:`supports_row_shards`. Its ``_update_pairs`` then receives
  the *local rows* of ``M`` and ``N`` (and of their gradients and ``_M``/``_N`` states) and must
  take every sum over rows — ``MᵀM``, ``NᵀN``, ``Mᵀ∇_M``, cross products with stored factors —
  through :attr:`shard_sum`: ``(sums_M, sums_N) = self.shard_sum(M=[...], N=[...])``, one call
  per round (one all-reduce for the whole bucket; the identity when nothing is sharded). All
  other work must be row-local or on the reduced ``r x r`` matrices, and every rank must take
  the same branches (decide on reduced quantities only). :meth:`_state_side` says which state
  tensors hold a factor's rows. For such pairs :meth:`_entry_policy` and :meth:`_robust_update`
  receive the ``DTensor`` factors (the default AdamW robust start is element-wise and runs on
  them as is). Other optimizers refuse sharded pairs unless ``sharded="gather"``, where they see
  the whole pair as ordinary tensors in every phase.

The step itself is run by :class:`~geolora.optim.engine.StepEngine`: it computes every update
(robust, bucketed pairs, ordinary groups), checks that all results are finite, and only then
writes any of them.

The template
------------
Every built-in pair optimizer is a :class:`PairOptimizer`, declared by three parts (Zheng & Wu,
"LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview
Guo2XGgxZA, Alg. 1, generalised; structured like geoopt's ``RiemannianAdam`` and optax's
``GradientTransformation``):

* a **geometry** (:mod:`geolora.optim.geometry`, :mod:`geolora.optim.manifold_pair`): how the
  pair's point is represented and in which coordinates its gradient is read — an orthonormal
  frame of ``X = M Nᵀ`` with the projected gradient ``ξ = P_T(∇_X f)`` (the quotient
  ``(M, N)/GL(r)`` with a metric), the factors themselves under a total-space metric, or a
  manifold point owned by the optimizer (fixed rank, bounded rank, Stiefel);
* a **preconditioner** (:mod:`geolora.optim.preconditioners`): a self-contained transform with
  its own state and defaults that maps the gradient coordinates to a raw direction;
* a **move** (in the geometry modules): turns the direction into new factors — the horizontal
  lift and a factor update, a one-sided factor update, a plain factor step, or a retraction with
  vector transport of the preconditioner's state.

One step for a stack of pairs (:meth:`PairOptimizer._update_pairs`)::

    x, g, extra = gauge(x, g, state)                # optional change of representative
    p = geometry.point(x, state, group, step)       # frame / owned point
    grad = geometry.gradient(p, g, group, step, wants=preconditioner.wants)
    d = preconditioner.update(state, grad, StepContext(geometry, p, group), group, step)
    (M, N) = move.apply(geometry, p, d, state, group, step, preconditioner)

The projection onto the tangent space happens once, in the geometry (``StepContext.project``
offers it to preconditioners that need a tangent vector early, e.g. for a metric norm).
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, rank_deficient
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.adamw import (
    ADAMW_DEFAULTS,
    ROBUST_DEFAULTS,
    ROBUST_STATE_KEYS,
    PendingAdamW,
    robust_pair_update,
)
from geolora.optim.engine import StepEngine
from geolora.optim.sharding import (
    LOCAL,
    SHARDED_MODES,
    RowSum,
    dtensor_gram,
    gram_sqrt,
    is_dtensor,
)
from geolora.optim.validation import (
    GROUP_KIND_HINTS,
    GROUP_KINDS,
    check_lr,
    check_range,
    group_kind,
    matrix_view,
    param_label,
    prepare_group,
    validate_betas,
    validate_pair,
    validate_state_dict,
)

__all__ = [
    "GROUP_KINDS",
    "LoRAOptimizer",
    "NONFINITE_MODES",
    "PAIR_KEYS",
    "PairOptimizer",
    "StepContext",
    "group_kind",
    "rank_deficient_product",
]

PAIR_KEYS = frozenset({"params", "lora_pair", "scaling", "name", "adapter"})

NONFINITE_MODES = ("raise", "skip")
#: Entry policies of :meth:`LoRAOptimizer._entry_policy`.
ENTRY_POLICIES = ("enter", "refactor", "robust")


class LoRAOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Common machinery of geolora optimizers (see the module docstring for the contract).

    Args:
        params: iterable of param groups (LoRA pairs and ordinary groups) or of tensors (then
            all of them are ordinary parameters).
        defaults: the subclass's hyperparameters (``lr`` required).
        robust_steps: number of initial steps during which a LoRA pair is updated with AdamW on
            its factors (LoRA-S, A.16 "Robust training"); a pair whose
            factors are rank deficient (e.g. ``B = 0``) also takes the AdamW path until they
            have full rank (:meth:`requires_full_rank`).
        nonfinite: ``"raise"`` (default): a NaN/inf gradient, or an update or optimizer state
            that would become non-finite, raises ``FloatingPointError`` naming the parameter
            before anything is modified; ``"skip"``: the group's step is skipped and
            ``state["nonfinite_skips"]`` of its first parameter is incremented.
        foreach: batch same-shape LoRA pairs (default) or update them one at a time.
        robust_betas, robust_eps, robust_weight_decay: AdamW hyperparameters of the robust
            start (its learning rate is the pair's ``lr``).
        sharded: pairs whose factors are sharded ``DTensor`` s (FSDP2): ``"auto"`` (default)
            steps on row shards when the optimizer can (:attr:`supports_row_shards`; a factor
            sharded along its rank dimension is gathered every step) and refuses otherwise;
            ``"rows"`` never gathers (refuses rank-split factors); ``"gather"`` gathers every
            sharded factor each step, so any optimizer runs (its pair state then replicated).
            See :func:`~geolora.optim.sharding.pair_shards`.
        other_lr, other_betas, other_eps, other_weight_decay: AdamW hyperparameters of the
            ordinary groups (``other_lr=None`` means "same as ``lr``").
    """

    #: ``True`` if :meth:`_update_pairs` never modifies the tensors of the ``state`` dict it is
    #: given in place (it only assigns new tensors to keys). Then the persistent stacked state
    #: buffers are handed over as they are; otherwise they are cloned first, so that a step
    #: whose result is not finite leaves the state untouched.
    functional_state: bool = False

    #: Where a bucket's results are copied into persistent buffers whose per-pair views are made
    #: once, instead of making new views of the new tensors each step (``None``: on
    #: accelerators, where a copy kernel costs less host time than ~1 µs per view and pair;
    #: ``True``/``False`` force it). Costs one staging copy of the factors.
    commit_in_place: bool | None = None

    #: Hyperparameters a saved param group may lack (options added after states were saved;
    #: the optimizer treats their absence as the behaviour from before the option existed).
    optional_on_load: frozenset[str] = frozenset()

    #: Group kinds other than LoRA pairs and ordinary groups that the optimizer trains, by the
    #: group's flag key (``"lora_triple"``: a three-factor adapter; ``"dora_magnitude"``: a DoRA
    #: magnitude linked to its pair). A handler has ``validate(optimizer, group)`` and
    #: ``update(optimizer, group, label) -> PendingAdamW | None`` (the update computed on copies;
    #: it is checked and written with the rest of the step), optionally
    #: ``expected_state(optimizer, group, i, p, values)`` for ``load_state_dict``.
    group_kinds: dict[str, Any] = {}

    #: ``False`` for optimizers of other adapter shapes (three-factor), which refuse pair groups.
    trains_pairs: bool = True

    #: ``True`` if :meth:`_update_pairs` runs on row shards of ``M`` and ``N``, taking every sum
    #: over rows through :attr:`shard_sum` (module docstring); ``False``: sharded pairs are
    #: refused (or gathered whole with ``sharded="gather"``).
    supports_row_shards: bool = False

    #: The sums over the row shards of the bucket being computed, set by the engine around each
    #: :meth:`_update_pairs` call (:class:`~geolora.optim.sharding.RowSum`; the identity when the
    #: factors are not sharded).
    shard_sum: RowSum = LOCAL

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        *,
        robust_steps: int = 0,
        nonfinite: str = "raise",
        foreach: bool = True,
        robust_betas: tuple[float, float] = ROBUST_DEFAULTS["robust_betas"],
        robust_eps: float = ROBUST_DEFAULTS["robust_eps"],
        robust_weight_decay: float = ROBUST_DEFAULTS["robust_weight_decay"],
        sharded: str = "auto",
        **adamw_options: Any,
    ) -> None:
        unknown = set(adamw_options) - set(ADAMW_DEFAULTS)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {sorted(unknown)}; "
                f"valid: {sorted(set(defaults) | set(ADAMW_DEFAULTS) | {'robust_steps'})}"
            )
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if not isinstance(foreach, bool):
            raise TypeError(f"foreach must be a bool, got {foreach!r}")
        if sharded not in SHARDED_MODES:
            raise ValueError(f"sharded must be one of {SHARDED_MODES}, got {sharded!r}")
        _check_robust_steps(robust_steps)
        validate_betas("robust_betas", robust_betas)
        check_range("robust_eps", robust_eps, 0.0)
        check_range("robust_weight_decay", robust_weight_decay, 0.0)
        all_defaults = dict(ADAMW_DEFAULTS)
        all_defaults.update(adamw_options)
        all_defaults.update(defaults)
        all_defaults.update(
            robust_steps=robust_steps,
            robust_betas=tuple(robust_betas),
            robust_eps=robust_eps,
            robust_weight_decay=robust_weight_decay,
        )
        self.nonfinite = nonfinite
        self.foreach = foreach
        self.sharded = sharded
        self.engine = StepEngine(self)
        #: The hyperparameters every param group holds (a saved group must hold them too).
        self.hyperparameter_names = frozenset(all_defaults)
        super().__init__(params, all_defaults)

    # --- the contract ---------------------------------------------------------------------
    def _init_pair_state(self, group: dict[str, Any], B: Tensor, A: Tensor) -> dict[str, Tensor]:
        """Fresh optimizer state of one pair (``B: (m, r)``, ``A: (r, n)``; tensors in the
        compute dtype)."""
        return {}

    @abc.abstractmethod
    def _update_pairs(
        self,
        group: dict[str, Any],
        x: FactorPoint,
        g: FactorTangent,
        state: dict[str, Tensor],
        step: int,
    ) -> FactorPoint:
        """New factors ``(M, N)`` for a stack of pairs (leading dim L).

        ``x``/``g``: stacked factors and factor gradients in the compute dtype, ``state``: the
        pairs' states stacked along dim 0 (update them by reassigning keys, or in place when not
        :attr:`functional_state`), ``step``: the 1-based step number of these pairs (robust-start
        steps not counted).
        """

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        """``True`` if the update divides by ``X``'s small singular values, so that a pair with
        rank-deficient ``X = B A`` (e.g. ``B = 0``) takes the robust start until ``X`` is well
        conditioned (:func:`rank_deficient_product`). Override for optimizers with damping or
        pseudo-inverses, or plain factor coordinates."""
        return True

    def _entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        """What the first geometric step of a pair does, after its ``robust_steps``:
        ``"enter"`` (join a bucket and take the update), ``"robust"`` (stay on the AdamW robust
        start this step) or ``"refactor"`` (an optimizer that owns a manifold point enters it
        and rewrites ``B``, ``A`` without an update, :meth:`_refactor_update`)."""
        if self.requires_full_rank(group) and rank_deficient_product(B, A):
            return "robust"
        return "enter"

    def _robust_update(
        self,
        group: dict,
        st: dict,
        factors: tuple[Tensor, Tensor],
        grads: tuple[Tensor | None, Tensor | None],
        label: str,
    ) -> PendingAdamW:
        """The step of a pair inside its ``robust_steps`` or with rank-deficient ``X`` (when
        :meth:`requires_full_rank`): AdamW on the factors, computed on copies
        (:func:`~geolora.optim.adamw.robust_pair_update`). An optimizer with its own update for
        rank-deficient factors (e.g. LoRA-Pro's damped closed form) overrides this; the result
        is written only after every update of the step was checked."""
        return robust_pair_update(group, st, factors, grads, label)

    def _refactor_update(
        self, group: dict, B: Tensor, A: Tensor, work: dict, st: dict, label: str
    ) -> PendingAdamW:
        """The write of a ``"refactor"`` entry (optimizers that own a point override it)."""
        raise NotImplementedError(
            f"{type(self).__name__}._entry_policy returned 'refactor' but the optimizer does not "
            f"own a manifold point"
        )

    def _state_side(self, key: str, group: dict[str, Any] | None = None) -> str | None:
        """Which factor's rows a pair state tensor ``key`` holds along dim 0: ``"M"`` (``m``
        rows, like ``B``), ``"N"`` (``n`` rows, like ``Aᵀ``) or ``None`` (anything else: ``r x
        r`` statistics, scalars). Decides how the state of sharded factors is stored (a
        ``DTensor`` with the factor's placements for ``"M"``/``"N"``). ``group``: the pair's
        param group (for a side that depends on a hyperparameter). Default: keys ending in
        ``_M`` / ``_N``; override for other names."""
        if key.endswith("_M"):
            return "M"
        if key.endswith("_N"):
            return "N"
        return None

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        """Check the subclass's hyperparameters; override and call ``super()``."""
        label = repr(group.get("name") or "param group")
        check_lr("lr", group["lr"], label)
        if group["other_lr"] is not None:
            check_lr("other_lr", group["other_lr"], label)
        validate_betas("other_betas", group["other_betas"])
        check_range("other_eps", group["other_eps"], 0.0)
        check_range("other_weight_decay", group["other_weight_decay"], 0.0)
        _check_robust_steps(group["robust_steps"])
        validate_betas("robust_betas", group["robust_betas"])
        check_range("robust_eps", group["robust_eps"], 0.0)
        check_range("robust_weight_decay", group["robust_weight_decay"], 0.0)
        # Hyperparameters many optimizers share, checked once here when present.
        if "betas" in group:
            validate_betas("betas", group["betas"])
        for key in ("eps", "weight_decay", "damping"):
            if key in group:
                check_range(key, group[key], 0.0)
        if "momentum" in group:
            check_range("momentum", group["momentum"], 0.0, 1.0, hi_open=True)

    # --- groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group = prepare_group(self, param_group, PAIR_KEYS | set(GROUP_KINDS))
        params = param_group["params"]
        kind = group_kind(param_group)
        label = param_group.get("name", "param group")
        if kind is not None and kind not in self.group_kinds:
            raise ValueError(
                f"{type(self).__name__} does not train {kind!r} groups ({label!r}): "
                f"{GROUP_KIND_HINTS[kind]}"
            )
        if param_group.get("lora_pair", False):
            if not self.trains_pairs:
                raise ValueError(
                    f"{type(self).__name__} trains {sorted(self.group_kinds)} groups, not LoRA "
                    f"pairs: got lora_pair group {label!r}"
                )
            validate_pair(param_group)
        elif kind is not None:
            self.group_kinds[kind].validate(self, param_group)
        else:
            for i, p in enumerate(params):
                if isinstance(p, Tensor) and p.device.type == "meta":
                    raise ValueError(
                        f"parameter {param_label(param_group, i)} is on the meta device (no "
                        f"data): move the model to a real device before building the optimizer"
                    )
            # An ordinary group's own AdamW settings (as torch users write them) win over the
            # optimizer-wide other_* defaults.
            for k in ("weight_decay", "betas", "eps"):
                if k in param_group and f"other_{k}" not in param_group:
                    param_group[f"other_{k}"] = param_group[k]
        seen = {id(p): (g, i) for g in self.param_groups for i, p in enumerate(g["params"])}
        for i, p in enumerate(params):
            if id(p) in seen:
                g0, i0 = seen[id(p)]
                raise ValueError(
                    f"parameter {param_label(param_group, i)} is already in group "
                    f"{param_label(g0, i0)!r}: a parameter may appear in one group only"
                )
        super().add_param_group(param_group)
        try:
            self._validate_hyperparameters(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer unchanged
            raise

    # --- state dicts ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict()`` plus the optimizer's class name, so that a
        state from another optimizer is refused at load time."""
        sd = super().state_dict()
        sd["optimizer_class"] = type(self).__name__
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Validate, then load like ``torch.optim.Optimizer.load_state_dict`` but keep every
        state tensor's dtype.

        Validation (:func:`~geolora.optim.validation.validate_state_dict`) runs before anything
        changes: another optimizer class, another rank or shape, missing keys or wrongly shaped
        tensors, hyperparameters the constructor would reject → ``ValueError`` naming the
        parameter and key, with the optimizer unchanged and usable. torch casts floating-point
        state to the parameter's dtype; geolora keeps states in the compute dtype (fp32 for
        bf16 parameters, fp64 for the ``r x r`` statistics), so the cast would break bitwise
        resume.
        """
        validate_state_dict(self, state_dict)
        saved = state_dict["state"]
        plain = {k: v for k, v in state_dict.items() if k != "optimizer_class"}
        super().load_state_dict(plain)
        self.engine.reset()  # the loaded tensors replace the stacked buffers and the plan
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, values in saved.items():
            p = params[int(idx)]
            for k, v in values.items():
                cur = self.state[p].get(k)
                if isinstance(v, Tensor) and isinstance(cur, Tensor) and cur.dtype != v.dtype:
                    self.state[p][k] = v.detach().to(device=cur.device).clone()

    def _expected_state(
        self, group: dict, i: int, p: Tensor, values: dict
    ) -> dict[str, tuple[int, ...] | None] | None:
        """Keys (and tensor shapes, ``None``: any) a saved state of parameter ``i`` of ``group``
        must hold, given the saved ``values`` (``None``: nothing to check). Used by
        :meth:`load_state_dict` before anything is loaded."""
        if not values:
            return {}
        kind = group_kind(group)
        if kind is not None:
            check = getattr(self.group_kinds.get(kind), "expected_state", None)
            return None if check is None else check(self, group, i, p, values)
        if not group.get("lora_pair", False):
            if "exp_avg" not in values and set(values) <= {"nonfinite_skips"}:
                return {}
            return {"step": (), "exp_avg": tuple(p.shape), "exp_avg_sq": tuple(p.shape)}
        if i == 1:
            return {}
        B, A = (matrix_view(t) for t in group["params"])
        expected: dict[str, tuple[int, ...] | None] = {"step": (), "robust_step": ()}
        if any(k in values for k in ROBUST_STATE_KEYS):
            for nm, t in (("B", B), ("A", A)):
                expected[f"robust_exp_avg_{nm}"] = tuple(t.shape)
                expected[f"robust_exp_avg_sq_{nm}"] = tuple(t.shape)
        if values.get("pair"):
            if is_dtensor(B):  # the global shapes, from plain tensors of those shapes
                B, A = (torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (B, A))
            fresh = self._init_pair_state(group, B.detach(), A.detach())
            for k, v in fresh.items():
                expected[k] = tuple(v.shape) if isinstance(v, Tensor) else None
        return expected

    # --- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """One optimization step over all groups (``closure`` re-evaluates the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.engine.step()
        return loss

    def _pair_decision(
        self, group: dict[str, Any], B: Tensor, A: Tensor, st: dict
    ) -> tuple[str, dict[str, Any]]:
        """``("robust" | "refactor" | "bucket", state entries to add)`` for a pair with a
        gradient (``B``, ``A`` its matrix views, ``st`` its stored state; nothing is written)."""
        rs = int(st["robust_step"].item()) if "robust_step" in st else 0
        if rs < group["robust_steps"]:
            return "robust", {}
        if "full_rank" in st:
            return "bucket", {}
        policy = self._entry_policy(group, B, A)
        if policy not in ENTRY_POLICIES:
            raise ValueError(
                f"{type(self).__name__}._entry_policy returned {policy!r}; expected one of "
                f"{ENTRY_POLICIES}"
            )
        if policy == "robust":
            return "robust", {}
        return ("bucket" if policy == "enter" else "refactor"), {"full_rank": True}


def _check_robust_steps(value: Any) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        raise ValueError(f"robust_steps must be an integer >= 0, got {value!r}")


def rank_deficient_product(B: Tensor, A: Tensor) -> bool:
    """``True`` if ``X = B A`` is (nearly) rank deficient: ``σ_min(X) ≤ 10⁻³ σ_max(X)``.

    Lifts divide by X's small singular values, so a pair leaves the AdamW phase only once
    ``X`` is reasonably conditioned (e.g. after a zero-initialised ``B`` has grown). The test
    uses the singular values of the core ``W = R_B R_Aᵀ`` (those of ``X``), so it does not
    depend on the factor gauge and keeps optimizers invariant. For sharded (``DTensor``)
    factors ``R`` is replaced by the square roots ``S`` of the reduced Grams (``SᵀS = BᵀB``,
    ``A Aᵀ``): ``S_B S_Aᵀ`` has the singular values of ``X`` too.
    """
    dt = torch.float64
    if is_dtensor(B) or is_dtensor(A):  # sharded factors: from the reduced Grams
        sm, sn = gram_sqrt(dtensor_gram(B, 0)), gram_sqrt(dtensor_gram(A, 1))
        s = torch.linalg.svdvals(sm @ sn.T)
        return not (bool(s[0] > 0) and bool(s[-1] > 1e-3 * s[0]))
    rb = torch.linalg.qr(B.detach().to(dt), mode="r")[1]
    ra = torch.linalg.qr(A.detach().T.to(dt), mode="r")[1]
    return rank_deficient(rb @ ra.T, rtol=1e-3)


class StepContext:
    """What a preconditioner may use besides its state and its gradient: the geometry's point
    (``point``, e.g. the frame), the projection onto the tangent space and the metric norm —
    services of the geometry, not of the optimizer.

    Attributes: ``geometry``, ``point``, ``group`` (the param group), ``m``, ``n``, ``r`` (the
    pair's shape), ``frame`` (the orthonormal frame of quotient geometries), ``extra`` (what a
    gauge policy hands on, e.g. a cluster average).
    """

    __slots__ = ("geometry", "point", "group", "m", "n", "r", "extra")

    def __init__(
        self,
        geometry: Any,
        point: Any,
        group: dict,
        m: int,
        n: int,
        r: int,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.geometry, self.point, self.group = geometry, point, group
        self.m, self.n, self.r = m, n, r
        self.extra = {} if extra is None else extra

    @property
    def frame(self) -> Any:
        """The frame ``(U, R_M, V, R_N)`` of ``X`` (quotient geometries)."""
        return self.point.frame

    def project(self, d: Any) -> Any:
        """The descent ``d`` (any form the geometry accepts) as a tangent vector."""
        return self.geometry.project(self.point, d)

    def metric_norm(self, t: Any) -> Tensor:
        """The norm of the tangent vector ``t`` under the geometry's metric (for a quotient
        geometry: the metric norm of its horizontal lift), shape = batch shape."""
        return self.geometry.norm(self.point, t, self.group)


class PairOptimizer(LoRAOptimizer):
    """The template: a LoRA pair optimizer declared as ``(preconditioner, geometry, move)``
    (module docstring), with an optional gauge policy.

    Args:
        params: param groups (LoRA pairs and ordinary groups).
        preconditioner: maps gradient coordinates to a direction
            (:class:`~geolora.optim.preconditioners.Preconditioner`).
        geometry: point representation and gradient coordinates
            (:class:`~geolora.optim.geometry.Geometry`).
        move: direction → new factors (:class:`~geolora.optim.geometry.Move`).
        lr: learning rate.
        defaults: further hyperparameters of the optimizer (override the parts' own defaults).
        gauge: optional :class:`~geolora.optim.gauge.GaugePolicy` (a change of representative
            ``(M R, N R⁻ᵀ)`` before the step, with the state moved consistently).
        **options: :class:`LoRAOptimizer` options (``robust_steps``, ``nonfinite``, ``foreach``,
            ``other_*``, ``robust_*``).

    The optimizer's hyperparameters are the union of the parts' ``defaults`` (geometry, move,
    preconditioner, gauge — later ones win), ``lr`` and ``defaults``; every one can be
    overridden per param group. Each part validates its own (``validate(group)``).
    """

    def __init__(
        self,
        params: Iterable,
        preconditioner: Any,
        geometry: Any,
        move: Any,
        *,
        lr: float,
        defaults: dict[str, Any] | None = None,
        gauge: Any = None,
        **options: Any,
    ) -> None:
        self.preconditioner = preconditioner
        self.geometry = geometry
        self.move = move
        self.gauge = gauge
        if gauge is not None:
            gauge.bind(preconditioner)
        merged: dict[str, Any] = {}
        for part in self._parts():
            merged.update(getattr(part, "defaults", {}))
        merged["lr"] = lr
        merged.update(defaults or {})
        super().__init__(params, merged, **options)

    def _parts(self) -> list[Any]:
        return [p for p in (self.geometry, self.move, self.preconditioner, self.gauge) if p]

    @property
    def functional_state(self) -> bool:  # type: ignore[override]
        """Every part declares that it never modifies a state tensor in place."""
        return all(bool(getattr(p, "functional_state", False)) for p in self._parts())

    @property
    def supports_row_shards(self) -> bool:  # type: ignore[override]
        """Every part declares ``row_shards``: its sums over rows go through the reducer the
        point carries. A gauge hook runs on row shards when it declares ``row_shards`` too
        (RefLoRA's refactoring: its sums over rows through the reducer); one that is only
        maintenance (``skip_when_sharded``, :class:`~geolora.optim.gauge.Rebalance`) is skipped
        for row-sharded pairs; any other makes the optimizer refuse (or gather)."""
        parts = [self.geometry, self.move, self.preconditioner]
        gauge = self.gauge
        if gauge is not None and not (
            getattr(gauge, "row_shards", False) or getattr(gauge, "skip_when_sharded", False)
        ):
            return False
        return all(bool(getattr(p, "row_shards", False)) for p in parts)

    def _state_side(self, key: str, group: dict[str, Any] | None = None) -> str | None:
        """A part's ``state_sides`` (``key -> "M" | "N" | None``, or a callable ``group ->
        side`` for a key whose shape depends on a hyperparameter) where it declares one for
        ``key``, else the suffix rule of :meth:`LoRAOptimizer._state_side`."""
        for part in self._parts():
            sides = getattr(part, "state_sides", None)
            if sides is not None and key in sides:
                side = sides[key]
                return side(group or {}) if callable(side) else side
        return super()._state_side(key, group)

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        return bool(self.geometry.requires_full_rank(group))

    def _entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        policy = getattr(self.geometry, "entry_policy", None)
        return super()._entry_policy(group, B, A) if policy is None else policy(group, B, A)

    def _refactor_update(
        self, group: dict, B: Tensor, A: Tensor, work: dict, st: dict, label: str
    ) -> PendingAdamW:
        return self.geometry.refactor_update(group, B, A, work, st, label)

    def _init_pair_state(self, group: dict[str, Any], B: Tensor, A: Tensor) -> dict[str, Tensor]:
        geo_init = self.geometry.init_state
        # local rows: a geometry whose entry sums over rows takes the reducer (``reduce=``)
        if self.shard_sum.sharded and "reduce" in inspect.signature(geo_init).parameters:
            state = dict(geo_init(group, B, A, reduce=self.shard_sum))
        else:
            state = dict(geo_init(group, B, A))
        like = torch.empty((), dtype=compute_dtype(B.dtype), device=B.device)
        init = self.preconditioner.init_state
        params = inspect.signature(init).parameters
        kw: dict[str, Any] = {"hp": group} if "hp" in params else {}
        if "reduce" in params:  # local rows: the global row counts through the reducer
            kw["reduce"] = self.shard_sum
        pre = init(B.shape[0], A.shape[1], B.shape[1], like, **kw)
        clash = state.keys() & pre.keys()
        if clash:
            raise ValueError(
                f"{type(self).__name__}: geometry and preconditioner both use state key(s) "
                f"{sorted(clash)}"
            )
        state.update(pre)
        return state

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        for part in self._parts():
            check = getattr(part, "validate", None)
            if check is not None:
                check(group)

    def _update_pairs(
        self,
        group: dict[str, Any],
        x: FactorPoint,
        g: FactorTangent,
        state: dict[str, Tensor],
        step: int,
    ) -> FactorPoint:
        """The template (module docstring): gauge, point, gradient, precondition, move."""
        geometry, pre = self.geometry, self.preconditioner
        extra: dict[str, Any] = {}
        reduce = self.shard_sum
        if self.gauge is not None:
            if not reduce.sharded:
                x, g, extra = self.gauge.apply(x, g, state, group, step)
            elif getattr(self.gauge, "row_shards", False):  # its row sums through the reducer
                x, g, extra = self.gauge.apply(x, g, state, group, step, reduce)
            # (any other hook admitted by supports_row_shards is maintenance, skipped here)
        point = geometry.point(x, state, group, step, reduce)
        grad = geometry.gradient(point, g, group, step, getattr(pre, "wants", "tangent"))
        m, r = x.M.shape[-2:]
        ctx = StepContext(geometry, point, group, m, x.N.shape[-2], r, extra)
        d = pre.update(state, grad, ctx, group, step)
        return self.move.apply(geometry, point, d, state, group, step, pre)
