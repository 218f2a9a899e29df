"""The LoRA-S template as a class: a preconditioner on ``T_X``, the horizontal lift, a factor
update — and AdamS, its best-known instance.

Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026
(OpenReview Guo2XGgxZA), Alg. 1, generalised: one step for a stack of LoRA pairs is

1. frame ``M = U R_M``, ``N = V R_N`` and projected gradient ``ξ = P_T(∇_X f)`` from the factor
   gradients (eq. 12), optionally plus ``λ X`` (``decay="l2"``);
2. preconditioner: ``ξ ↦ Ẋ`` with its own state (:mod:`geolora.optim.preconditioners`);
3. lift: the horizontal ``(Ṁ, Ṅ)`` of ``P_T(Ẋ)`` under the metric
   (:mod:`geolora.manifolds.metrics`);
4. move: ``(M, N) ← (M − η(Ṁ + λM), N − η(Ṅ + λN))``. The decoupled decay ``λ`` is exactly the
   LoRA-S regularised Sylvester matrix ``K ← K + λI`` (A.11 eq. 22): adding ``λI`` to ``K`` adds
   ``λM`` and ``λN`` to the lift. LoRA-S's default is ``λ = 0``: the Sylvester ``K`` itself is the
   decay.

:class:`LiftedOptimizer` is :class:`~geolora.optim.base.PairOptimizer` with
:class:`~geolora.optim.geometry.QuotientGeometry` and :class:`~geolora.optim.geometry.Lift`.
Every optimizer built from it is transformation invariant when the metric is (balanced or
preconditioned): from ``(M R, N R⁻ᵀ)`` it produces the same ``X`` trajectory (Theorem 1).
"""

from __future__ import annotations

from typing import Any

from geolora.manifolds.metrics import QuotientMetric
from geolora.optim.base import PairOptimizer
from geolora.optim.gauge import Rebalance
from geolora.optim.geometry import (
    DECAY_MODES,
    Lift,
    QuotientGeometry,
    balanced_representative_norm,
    to_tangent,
)
from geolora.optim.preconditioners import AdamPreconditioner, Preconditioner
from geolora.optim.validation import check_choice, validate_betas

__all__ = ["AdamS", "LiftedOptimizer", "balanced_representative_norm", "to_tangent"]


def rebalance_hook(
    geometry: QuotientGeometry, preconditioner: Any, every: int, threshold: float
) -> Rebalance | None:
    """The default gauge hook of the invariant lifted optimizers: :class:`Rebalance` when the
    metric is invariant and the preconditioner declares how its state moves (else ``None``: the
    representative is left alone)."""
    if not geometry.metric.invariant or getattr(preconditioner, "gauge_rules", None) is None:
        return None
    return Rebalance(every, threshold)


class LiftedOptimizer(PairOptimizer):
    """Preconditioner + horizontal lift under ``metric`` (LoRA-S Alg. 1 template).

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        preconditioner: a :class:`~geolora.optim.preconditioners.Preconditioner` on ``T_X``.
        metric: ``"balanced"`` (LoRA-S), ``"preconditioned"``, ``"flat"`` or a metric instance.
        lr: learning rate η.
        weight_decay: λ ≥ 0 (0 = LoRA-S default).
        decay: ``"decoupled"`` (≡ ``K + λI``) or ``"l2"`` (``ξ ← ξ + λX`` before preconditioning).
        damping: δ ≥ 0 for a metric given by name.
        qr_method: orthonormalisation for frames (``"auto"``, ``"householder"``, ``"cholesky"``).
        rebalance_every, rebalance_threshold: function-preserving rebalancing of drifted pairs
            (:class:`~geolora.optim.gauge.Rebalance`; invariant metrics only, where it leaves the
            ``X`` trajectory unchanged to rounding); ``rebalance_every=0`` switches it off.
        extra_defaults: further per-group hyperparameters (the preconditioner's own ``defaults``
            are added automatically).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options (``robust_steps``,
            ``nonfinite``, ``foreach``, ``other_*``).
    """

    def __init__(
        self,
        params,
        preconditioner: Preconditioner,
        *,
        metric: str | QuotientMetric = "balanced",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        decay: str = "decoupled",
        damping: float = 0.0,
        qr_method: str = "auto",
        rebalance_every: int = 100,
        rebalance_threshold: float = 10.0,
        extra_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("decay", decay, DECAY_MODES)
        geometry = QuotientGeometry(metric, damping=damping, qr_method=qr_method)
        super().__init__(
            params,
            preconditioner,
            geometry,
            Lift(),
            lr=lr,
            defaults={"weight_decay": weight_decay, "decay": decay, **(extra_defaults or {})},
            gauge=rebalance_hook(geometry, preconditioner, rebalance_every, rebalance_threshold),
            **kwargs,
        )

    @property
    def metric(self) -> QuotientMetric:
        """The quotient metric of the lift."""
        return self.geometry.metric


class AdamS(LiftedOptimizer):
    """AdamS — Adam lifted to the horizontal space of the LoRA-S metric (LoRA-S §4.2, Alg. 2;
    low-memory variant Alg. 4).

    ``ξ = P_T(∇_X f)``; ``m ← β₁ m + (1−β₁) ξ``; ``v ← β₂ v + (1−β₂) ξ²``;
    ``Ẋ = m̂ / (sqrt(v̂) + ε)``; solve ``G_M G_N K + K G_M G_N = Mᵀ Ẋ N``;
    ``Ṁ = (Ẋ N − M G_N K) G_N⁻¹``, ``Ṅ = (Ẋᵀ M − N G_M Kᵀ) G_M⁻¹``;
    ``(M, N) ← (M − η Ṁ, N − η Ṅ)``.

    Declared as ``(AdamPreconditioner, QuotientGeometry(metric), Lift)``. Defaults from the
    paper: ``betas=(0.9, 0.999)``, no weight decay (the Sylvester K is the decay), robust start
    with AdamW for ``robust_steps=100`` steps from zero-initialised LoRA (A.16). Memory: ``2mn``
    per pair (``mn + 2(m+n)r + r²`` with ``low_memory=True``).
    """

    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        low_memory: bool = False,
        riemannian_second_moment: bool = False,
        bias_correction: bool = True,
        robust_steps: int = 100,
        metric: str | QuotientMetric = "balanced",
        **kwargs: Any,
    ) -> None:
        validate_betas("betas", betas)
        pre = AdamPreconditioner(
            low_memory, riemannian_second_moment, bias_correction, betas=betas, eps=eps
        )
        super().__init__(
            params,
            pre,
            metric=metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            **kwargs,
        )
