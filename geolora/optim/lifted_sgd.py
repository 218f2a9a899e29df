"""LiftedSGD — (heavy-ball / Nesterov) gradient descent lifted to the quotient.

Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026,
OpenReview Guo2XGgxZA, Appendix A.18.1 with the general scheme of Alg. 1.
"""

from __future__ import annotations

from typing import Any

from geolora.manifolds.metrics import QuotientMetric
from geolora.optim.lifted import LiftedOptimizer
from geolora.optim.preconditioners import HeavyBall, IdentityPreconditioner
from geolora.optim.validation import check_range as _check_range


class LiftedSGD(LiftedOptimizer):
    """SGD lifted to the horizontal space (LoRA-S A.18.1 with Alg. 1).

    ``ξ = P_T(∇_X f)`` (eq. 12); descent ``Ẋ = ξ`` (``momentum=0``), the heavy-ball
    ``m_t = β T(m_{t−1}) + ξ_t``, ``Ẋ = m_t`` or Nesterov ``Ẋ = ξ_t + β m_t`` (``m`` stored
    factored and transported by projection, :class:`~geolora.optim.preconditioners.HeavyBall`);
    lift under the metric (Sylvester ``K`` for ``"balanced"``) and
    ``(M, N) ← (M − lr Ṁ, N − lr Ṅ)``.

    Geometry: ``ξ`` is the Riemannian gradient of ``f`` on the fixed-rank manifold with the
    embedded (Euclidean) metric, so to first order every metric gives
    ``X⁺ = X − lr P_T(∇_X f)``; the metric only shapes the curve (second order). This is not
    the quotient Riemannian gradient of Mishra et al. 2014 (GHᵀ; ``(∇_M G_M, ∇_N G_N)``) nor
    ScaledGD (Tong et al. 2021; ``(∇_M G_N⁻¹, ∇_N G_M⁻¹)``, pushing forward to
    ``P_M ∇ + ∇ P_N``, which counts the core ``P_M ∇ P_N`` twice); those are separate optimizers.

    Args:
        lr: learning rate (the paper gives no value; 1e-2 is a conservative default).
        momentum: heavy-ball β ∈ [0, 1) (0: plain lifted gradient descent, no state).
        weight_decay, decay: see :class:`~geolora.optim.lifted.LiftedOptimizer`.
        nesterov: Nesterov momentum (needs ``momentum > 0``). No ``dampening``.
        robust_steps: AdamW warm-up steps (default 0: the warm-up runs AdamW with this ``lr``,
            which is far too large for AdamW at SGD learning rates).
        metric: quotient metric of the lift (default LoRA-S ``"balanced"``).

    Memory: none (``momentum=0``) or ``2(m + n) r + r²`` per pair. Invariant under
    ``(B, A) → (B R, R⁻¹ A)`` with an invariant metric.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        robust_steps: int = 0,
        metric: str | QuotientMetric = "balanced",
        **kwargs: Any,
    ) -> None:
        _check_range("momentum", momentum, 0.0, 1.0, hi_open=True)
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True requires momentum > 0")
        self._has_momentum = momentum > 0
        pre = HeavyBall(momentum, nesterov) if momentum > 0 else IdentityPreconditioner()
        super().__init__(
            params,
            pre,
            metric=metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            extra_defaults={"momentum": momentum},
            **kwargs,
        )

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        if (group["momentum"] > 0) != self._has_momentum:
            raise ValueError(
                f"momentum={group['momentum']!r} in param group {group.get('name', '')!r}: a "
                f"LiftedSGD built with momentum={self.defaults['momentum']!r} cannot switch "
                f"momentum on or off per group"
            )


__all__ = ["LiftedSGD"]
