"""``Lifted(torch.optim.X)``: any torch optimizer as a transformation-invariant LoRA optimizer.

The LoRA-S scheme (lora-s.txt Alg. 1, §4.1) accepts any preconditioner that acts on the matrix
``X = M Nᵀ``; an element-wise torch optimizer is such a preconditioner when it runs on a dense
*shadow* of ``X``. Per LoRA pair and step:

1. ``ξ = P_T(∇_X f)`` in factored form (eq. 12), densified to ``m x n``;
2. the shadow ``X̃ ← X`` (dense, from the gauge-free frame ``X = U W Vᵀ``) gets ``.grad = ξ``
   and the wrapped optimizer takes one ordinary step on it with its own code and its own
   state (restored from, and stored back into, this optimizer's per-pair state under the
   prefix ``shadow_``, so ``state_dict()`` round-trips);
3. descent ``Ẋ = (X̃_before − X̃_after) / lr``; lift of ``P_T(Ẋ)`` under the metric and
   ``(M, N) ← (M − lr Ṁ, N − lr Ṅ)``, i.e. ``X⁺ = X − P_T(X̃_before − X̃_after) + O(lr²)``.

Since the shadow is reset to ``X`` every step, the wrapped optimizer's weight decay acts on
``X`` itself: L2 decay (``Adam(weight_decay=λ)``) adds ``λ X`` to ``ξ`` and decoupled decay
(``AdamW``) adds ``λ X`` to ``Ẋ``, whose balanced lift is ``λ (M/2, N/2)``, so a step with zero
gradient gives ``X⁺ = (1 − lr λ / 2)² X`` (``≈ (1 − lr λ) X``, AdamW's shrink of ``X``). Both are
functions of ``X`` alone, so invariance is kept. The template's own decoupled ``K + λI`` decay is
not applied (``weight_decay`` belongs to the wrapped optimizer).

Everything the wrapped optimizer sees (``X``, ``ξ``, its state) lives in matrix space, hence the
``X`` trajectory is invariant under ``(B, A) → (B R, R⁻¹ A)`` for an invariant metric. Each pair
gets its own shadow tensor, so per-tensor statistics (e.g. Adafactor's RMS) are per layer.

Precision: the descent is a difference of two shadows, so it carries an absolute rounding
error ``≈ u |X_ij| / lr`` (``u`` the unit roundoff of the compute dtype: 6e-8 in float32); for
LoRA's small ``X`` and usual learning rates this is far below the descent itself.

Memory per pair: one ``m x n`` tensor per ``m x n`` state tensor of the wrapped optimizer (Adam:
``2mn``; SGD with momentum / Adagrad / RMSprop: ``mn``), plus transient ``m x n`` shadow,
gradient and descent during the step.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import mm_t, transpose
from geolora.manifolds.frame import project_dense, project_factor_grads, tangent_to_dense
from geolora.manifolds.metrics import QuotientMetric, get_metric
from geolora.manifolds.types import FactorPoint, FixedRankTangent
from geolora.optim.base import LoRAOptimizer
from geolora.optim.lifted import LiftedOptimizer, _to_tangent
from geolora.optim.preconditioners import StepContext

#: Constructor arguments of the wrapped optimizer that are not forwarded: implementation
#: switches (the shadow step always runs the default implementation) and ``params``.
NOT_FORWARDED = frozenset({"self", "params", "foreach", "fused", "capturable", "differentiable"})
#: Options of the LoRA optimizer itself (not of the wrapped one).
OWN_OPTIONS = frozenset(
    {
        "nonfinite",
        "foreach",
        "sharded",
        "robust_steps",
        "robust_betas",
        "robust_eps",
        "robust_weight_decay",
        "other_lr",
        "other_betas",
        "other_eps",
        "other_weight_decay",
        "damping",
        "qr_method",
        "metric",
    }
)
STATE_PREFIX = "shadow_"


def _hyperparameters(optimizer_class: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """Forwardable constructor arguments of ``optimizer_class`` and their defaults
    (``inspect.Parameter.empty`` for required ones)."""
    sig = inspect.signature(optimizer_class.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name: p.default
        for name, p in sig.parameters.items()
        if name not in NOT_FORWARDED and p.kind in kinds
    }


class TorchOptimizerPreconditioner:
    """Runs a torch optimizer on dense shadows ``X̃ = X`` with ``.grad = ξ`` (module docstring).

    Returns ``P_T`` of the descent ``(X̃_before − X̃_after) / lr`` (zero for ``lr = 0``). The wrapped
    optimizer's state starts empty and is stored under ``shadow_<key>`` after the first step;
    its hyperparameters ``hp_names`` are read from the param group.
    """

    name = "torch"

    def __init__(self, optimizer_class: type[torch.optim.Optimizer], hp_names: tuple[str, ...]):
        self.optimizer_class = optimizer_class
        self.hp_names = hp_names

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: StepContext, hp: dict, step: int
    ) -> FixedRankTangent:
        frame = ctx.frame
        # The shadows are views of one stacked X = U W Vᵀ, which after the step *is* the
        # stacked X̃_after; their gradients are views of the stacked ξ.
        UW = mm_t(frame.U, frame.W)
        after = UW @ transpose(frame.V)
        grad = tangent_to_dense(frame, xi)
        shadows = list(after.unbind(0))
        for sh, g in zip(shadows, grad.unbind(0)):
            sh.grad = g
        opt = self.optimizer_class(shadows, **{k: hp[k] for k in self.hp_names})
        keys = [k[len(STATE_PREFIX) :] for k in state if k.startswith(STATE_PREFIX)]
        given: dict[str, list[Tensor]] = {}
        if keys:
            # Per-shadow state = views of the stacked state buffers (updated in place by most
            # torch optimizers, which then need no re-stacking).
            given = {k: list(state[STATE_PREFIX + k].unbind(0)) for k in keys}
            for i, sh in enumerate(shadows):
                opt.state[sh] = {k: given[k][i] for k in keys}
        opt.step()
        for k, v in opt.state[shadows[0]].items():
            if v is None:
                continue
            if not isinstance(v, Tensor):
                raise TypeError(
                    f"{self.optimizer_class.__name__} keeps a non-tensor state entry {k!r} "
                    f"({type(v).__name__}); Lifted() supports optimizers whose state is tensors"
                )
            vals = [opt.state[sh][k] for sh in shadows]
            if k in given and all(a is b for a, b in zip(vals, given[k])):
                if not v.is_floating_point() or v.dtype == after.dtype:
                    continue  # updated in place in the stacked buffer
            if v.is_floating_point():
                vals = [t.to(after.dtype) for t in vals]
            state[STATE_PREFIX + k] = torch.stack(vals)
        for sh in shadows:
            sh.grad = None
        lr = hp["lr"]
        if not lr > 0:
            z = torch.zeros_like(xi.M)
            return FixedRankTangent(z, torch.zeros_like(xi.Up), torch.zeros_like(xi.Vp))
        # X − X̃_after in X̃_after's buffer, with X = (U W) Vᵀ recomputed by the same product
        # (no dense copy of X is kept; the difference of the nearby X and X̃_after is exact).
        if after.dim() == 3:
            diff = after.baddbmm_(UW, transpose(frame.V), beta=-1.0)
        else:
            diff = torch.sub(UW @ transpose(frame.V), after, out=after)
        t = project_dense(frame, diff)
        return FixedRankTangent(t.M / lr, t.Up / lr, t.Vp / lr)


class LiftedTorchOptimizer(LiftedOptimizer):
    """Base of the classes returned by :func:`Lifted` (see the module docstring).

    Args:
        params: param groups (LoRA pairs and ordinary groups, see :mod:`geolora.optim.base`).
        lr: learning rate (default: the wrapped optimizer's).
        metric: quotient metric of the lift (default: the one given to :func:`Lifted`).
        damping, qr_method: see :class:`~geolora.optim.lifted.LiftedOptimizer`.
        robust_steps: AdamW warm-up steps (default 0).
        **kwargs: hyperparameters of the wrapped optimizer (per group overridable) and the
            :class:`~geolora.optim.base.LoRAOptimizer` options (``nonfinite``, ``foreach``,
            ``robust_*``, ``other_*``).
    """

    wrapped: type[torch.optim.Optimizer] = torch.optim.SGD
    wrapped_defaults: dict[str, Any] = {}
    default_metric: str | QuotientMetric = "balanced"

    def __init__(
        self,
        params,
        lr: float | None = None,
        *,
        metric: str | QuotientMetric | None = None,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in OWN_OPTIONS}
        unknown = set(kwargs) - set(self.wrapped_defaults)
        if unknown:
            raise TypeError(
                f"{type(self).__name__} got unknown option(s) {sorted(unknown)}; the wrapped "
                f"{self.wrapped.__name__} accepts {sorted(self.wrapped_defaults)}, the LoRA "
                f"optimizer {sorted(OWN_OPTIONS)}"
            )
        hp = {**self.wrapped_defaults, **kwargs}
        if lr is not None:
            hp["lr"] = lr
        missing = [k for k, v in hp.items() if v is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{type(self).__name__} missing required option(s) {missing}")
        lr = hp.pop("lr")
        weight_decay = hp.pop("weight_decay", 0.0)
        names = tuple(self.wrapped_defaults)
        super().__init__(
            params,
            TorchOptimizerPreconditioner(self.wrapped, names),
            metric=self.default_metric if metric is None else metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            extra_defaults=hp,
            **own,
        )

    def _expected_state(self, group, i, p, values):
        """The base class's keys plus, after a pair's first update, the wrapped optimizer's
        state (``shadow_<key>``, shapes from one probe step of the wrapped optimizer on an
        ``m x n`` zero tensor)."""
        expected = super()._expected_state(group, i, p, values)
        step = values.get("step")
        if not (expected and values.get("pair") and torch.is_tensor(step) and float(step) >= 1):
            return expected
        B, A = group["params"]
        probe = torch.zeros(B.shape[0], A.reshape(A.shape[0], -1).shape[1], requires_grad=True)
        probe.grad = torch.zeros_like(probe)
        opt = self.wrapped([probe], **{k: group[k] for k in self.preconditioner.hp_names})
        opt.step()
        for k, v in opt.state[probe].items():
            if isinstance(v, Tensor):
                expected[STATE_PREFIX + k] = tuple(v.shape)
        return expected

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        # The wrapped optimizer validates its own hyperparameters (its ValueError names them).
        LoRAOptimizer._validate_hyperparameters(self, group)
        hp = {k: group[k] for k in self.preconditioner.hp_names}
        try:
            self.wrapped([torch.zeros(1)], **hp)
        except (ValueError, TypeError) as exc:
            raise type(exc)(
                f"{type(self).__name__}: invalid hyperparameter for the wrapped "
                f"{self.wrapped.__name__} in param group {group.get('name', '')!r}: {exc}"
            ) from exc

    def _update_pairs(self, group, x: FactorPoint, g, state, step: int) -> FactorPoint:
        frame = self._frame(x)
        core = self._core(frame)
        xi = project_factor_grads(frame, g.M, g.N)
        m, r = x.M.shape[-2:]
        ctx = StepContext(
            frame, m, x.N.shape[-2], r, lambda t: self._metric_norm(x, frame, t, core)
        )
        d = self.preconditioner.update(state, xi, ctx, group, step)
        t = _to_tangent(frame, d)
        # (M, N) ← (M − lr Ṁ, N − lr Ṅ): no decay of the template (it is the wrapped optimizer's).
        coeffs = self.metric.coefficients(frame, t.M, core)
        return self._lift_move(group, x, frame, t, coeffs, shrink=1.0)


def Lifted(  # noqa: N802 - a class factory, named like the classes it returns
    torch_optimizer_class: type[torch.optim.Optimizer],
    metric: str | QuotientMetric = "balanced",
    **opt_kwargs: Any,
) -> type[LiftedTorchOptimizer]:
    """Turn a torch optimizer class into a transformation-invariant LoRA optimizer class.

    ``Lifted(torch.optim.Adam)(groups, lr=1e-3)`` runs Adam on a dense shadow of each
    ``X = B A`` (fed ``ξ = P_T(∇_X f)``) and lifts its step to the factors with the LoRA-S
    Sylvester lift (lora-s.txt Alg. 1, §4.1; details in :mod:`geolora.optim.wrap`).
    ``opt_kwargs`` become the class's defaults for the wrapped optimizer's hyperparameters.

    Supported: optimizers whose ``step()`` needs no closure and whose per-parameter state is
    tensors (SGD, Adam, AdamW, Adagrad, RMSprop, Adamax, NAdam, RAdam, Adadelta, ASGD, Rprop,
    Adafactor, ...). The returned class is named ``"Lifted" + torch_optimizer_class.__name__``.
    """
    cls = torch_optimizer_class
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise TypeError(
            f"torch_optimizer_class must be a torch.optim.Optimizer subclass, got "
            f"{torch_optimizer_class!r}"
        )
    if issubclass(torch_optimizer_class, LoRAOptimizer):
        raise TypeError(
            f"torch_optimizer_class {torch_optimizer_class.__name__} is already a geolora LoRA "
            f"optimizer; Lifted() wraps plain torch optimizers"
        )
    if issubclass(torch_optimizer_class, torch.optim.LBFGS):
        raise TypeError(
            "torch_optimizer_class LBFGS needs a closure per step; Lifted() cannot wrap it"
        )
    defaults = _hyperparameters(torch_optimizer_class)
    if "lr" not in defaults:
        raise TypeError(
            f"torch_optimizer_class {torch_optimizer_class.__name__} has no 'lr' argument; "
            f"Lifted() needs it to scale the descent"
        )
    unknown = set(opt_kwargs) - set(defaults)
    if unknown:
        raise TypeError(
            f"Lifted({torch_optimizer_class.__name__}): unknown option(s) {sorted(unknown)}; "
            f"valid: {sorted(defaults)}"
        )
    defaults.update(opt_kwargs)
    get_metric(metric)  # ValueError for an unknown metric name, now rather than at first use
    name = f"Lifted{torch_optimizer_class.__name__}"
    return type(
        name,
        (LiftedTorchOptimizer,),
        {
            "wrapped": torch_optimizer_class,
            "wrapped_defaults": defaults,
            "default_metric": metric,
            "__module__": __name__,
            "__qualname__": name,
            "__doc__": (
                f"{torch_optimizer_class.__name__} lifted to the horizontal space of the "
                f"{metric if isinstance(metric, str) else type(metric).__name__} quotient metric "
                f"(see :func:`geolora.optim.wrap.Lifted`). Defaults of the wrapped optimizer: "
                f"{defaults!r}."
            ),
        },
    )


__all__ = ["Lifted", "LiftedTorchOptimizer", "TorchOptimizerPreconditioner"]
