"""r×r-preconditioned factor gradients: ScaledGD and Riemannian-preconditioned AdamW.

Both take the Riemannian gradient of the preconditioned metric ``tr(G_N ṀᵀṀ) + tr(G_M ṄᵀṄ)``
in factor coordinates (Mishra & Sepulchre 2016; the :class:`~geolora.optim.geometry.
FactorGeometry` with ``metric="preconditioned"``):

    ``Ṁ = ∇_M (NᵀN + δI)⁻¹``,  ``Ṅ = ∇_N (MᵀM + δI)⁻¹``,

i.e. ``∇_B (A Aᵀ + δI)⁻¹`` and ``(BᵀB + δI)⁻¹ ∇_A`` for ``B: (out, r)``, ``A: (r, in)``; ScaledGD
steps along it (with optional heavy ball), RP-AdamW feeds it to AdamW on the factors.
"""

from __future__ import annotations

from typing import Any

from geolora.optim.base import PairOptimizer
from geolora.optim.gauge import Rebalance
from geolora.optim.geometry import FactorGeometry, FactorStep, scaled_gradients
from geolora.optim.preconditioners.factor import FactorAdamW, FactorHeavyBall

__all__ = ["RiemannianPreconditionedAdamW", "ScaledGD", "scaled_gradients"]


class ScaledGD(PairOptimizer):
    """ScaledGD (Tong, Ma & Chi, JMLR 2021, arXiv:2005.08898; Zheng & Wu, "LoRA-S: An Efficient
    Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview Guo2XGgxZA, A.18.5
    "Scaled GD (RGD)"): Riemannian gradient descent on the factors under the metric
    ``tr(NᵀN ṀᵀṀ + MᵀM ṄᵀṄ)``.

    ``Ṁ = ∇_M (NᵀN + δI)⁻¹``, ``Ṅ = ∇_N (MᵀM + δI)⁻¹``; optional heavy-ball momentum
    ``b ← μ b + Ṁ`` (torch SGD convention, ``dampening = 0``; Nesterov: step ``Ṁ + μ b``);
    ``M ← (1 − ηλ) M − η b`` and likewise ``N``.

    Transformation invariant for ``δ = 0`` (the default, the method of Tong et al.): at
    ``(M R, N R⁻ᵀ)`` every factor quantity is right-multiplied by ``R`` resp. ``R⁻ᵀ``, momentum
    and the scalar decay included, so ``X = M Nᵀ`` follows the same trajectory. ``δ > 0``
    (Zhang & Pilanci use 1e-6) breaks invariance slightly but runs from ``B = 0`` without a
    robust start; with ``δ = 0`` a zero ``B`` takes the base class's AdamW robust start until
    both factors have full rank. Near-rank-deficient factors make the step large (``‖Ṅ‖`` up
    to ``‖∇_X‖ / (2√δ)``): use small learning rates or a robust start there.

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        lr: learning rate η.
        momentum: μ ∈ [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: decoupled decay λ ≥ 0 of both factors.
        damping: δ ≥ 0.
        rebalance_every, rebalance_threshold: function-preserving rebalancing of drifted pairs
            (:class:`~geolora.optim.gauge.Rebalance`, the momentum moves with the factors);
            ``rebalance_every=0`` switches it off.
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        damping: float = 0.0,
        rebalance_every: int = 100,
        rebalance_threshold: float = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            FactorHeavyBall(momentum=momentum, nesterov=nesterov),
            FactorGeometry("preconditioned", damping=damping),
            FactorStep(weight_decay=weight_decay),
            lr=lr,
            gauge=Rebalance(rebalance_every, rebalance_threshold),
            **kwargs,
        )


class RiemannianPreconditionedAdamW(PairOptimizer):
    """Riemannian-preconditioned AdamW ("scaled AdamW"; Zhang & Pilanci 2024, "Riemannian
    Preconditioned LoRA for Fine-Tuning Foundation Models", ICML 2024, arXiv:2402.02347;
    LoRA-S A.18.7 "Scaled AdamW").

    ``∇_B ← ∇_B (A Aᵀ + δI)⁻¹``, ``∇_A ← (BᵀB + δI)⁻¹ ∇_A`` (both from the current factors),
    then one ``torch.optim.AdamW`` step (same operations: decoupled decay ``p ← (1 − ηλ) p``,
    bias-corrected moments, ``m̂ / (√v̂ + ε)``) on each factor with these gradients.

    Not transformation invariant: Adam's element-wise second moment is taken in factor
    coordinates, which the gauge ``(B R, R⁻¹ A)`` mixes (LoRA-S A.18.7). Defaults: ``δ = 1e-6``,
    ``eps = 1e-6`` and ``betas = (0.9, 0.999)`` as in the authors' ``riemannian_AdamW``
    (``reg``, ``eps``), ``weight_decay = 0.01`` as ``torch.optim.AdamW``. Thanks to ``δ > 0`` it runs from ``B = 0`` (``∇_A = 0`` there, so
    ``A`` waits one step) with ``robust_steps = 0``. The authors apply the decay after the Adam
    step; here it comes first, as in ``torch.optim.AdamW`` (difference O(η²λ)).

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        lr: learning rate η.
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ε.
        weight_decay: decoupled decay λ ≥ 0.
        damping: δ ≥ 0 (0 = undamped inverse; then ``B = 0`` takes the robust start).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        damping: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            FactorAdamW(betas=betas, eps=eps),
            FactorGeometry("preconditioned", damping=damping),
            FactorStep(weight_decay=weight_decay),
            lr=lr,
            **kwargs,
        )
