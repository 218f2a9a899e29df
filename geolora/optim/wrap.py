"""``Lifted(torch.optim.X)``: any torch optimizer as a transformation-invariant LoRA optimizer.

The LoRA-S scheme (Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester
Equation", ICLR 2026, OpenReview Guo2XGgxZA, Alg. 1, §4.1) accepts any preconditioner that acts on
the matrix ``X = M Nᵀ``; an element-wise torch optimizer is such a preconditioner when it runs on a
dense *shadow* of ``X``. Per LoRA pair and step:

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

from geolora.manifolds.metrics import QuotientMetric, get_metric
from geolora.optim.base import LoRAOptimizer, PairOptimizer
from geolora.optim.geometry import Lift, QuotientGeometry
from geolora.optim.lifted import rebalance_hook
from geolora.optim.preconditioners.torch_wrapped import STATE_PREFIX, TorchOptimizerPreconditioner

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


class LiftedTorchOptimizer(PairOptimizer):
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
        rebalance_every: int = 100,
        rebalance_threshold: float = 10.0,
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
        names = tuple(self.wrapped_defaults)
        geometry = QuotientGeometry(
            self.default_metric if metric is None else metric,
            damping=own.pop("damping", 0.0),
            qr_method=own.pop("qr_method", "auto"),
        )
        pre = TorchOptimizerPreconditioner(self.wrapped, names, hp)
        super().__init__(
            params,
            pre,
            geometry,
            # no decay of the template: weight_decay belongs to the wrapped optimizer
            Lift(decay=False),
            lr=lr,
            robust_steps=robust_steps,
            gauge=rebalance_hook(geometry, pre, rebalance_every, rebalance_threshold),
            **own,
        )

    @property
    def metric(self) -> QuotientMetric:
        """The quotient metric of the lift."""
        return self.geometry.metric

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


def Lifted(  # noqa: N802 - a class factory, named like the classes it returns
    torch_optimizer_class: type[torch.optim.Optimizer],
    metric: str | QuotientMetric = "balanced",
    **opt_kwargs: Any,
) -> type[LiftedTorchOptimizer]:
    """Turn a torch optimizer class into a transformation-invariant LoRA optimizer class.

    ``Lifted(torch.optim.Adam)(groups, lr=1e-3)`` runs Adam on a dense shadow of each
    ``X = B A`` (fed ``ξ = P_T(∇_X f)``) and lifts its step to the factors with the LoRA-S
    Sylvester lift (LoRA-S Alg. 1, §4.1; details in :mod:`geolora.optim.wrap`).
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
