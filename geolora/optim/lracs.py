"""LRACS — RACS lifted to the horizontal space of the LoRA-S metric (Zheng & Wu, "LoRA-S",
ICLR 2026, OpenReview Guo2XGgxZA, §4.3, Alg. 3)."""

from __future__ import annotations

from typing import Any

from geolora.manifolds.metrics import QuotientMetric
from geolora.optim.lifted import LiftedOptimizer, balanced_representative_norm
from geolora.optim.preconditioners.racs import RACSPreconditioner


class LRACS(LiftedOptimizer):
    """LRACS: row/column-scaled SGD on ``T_X`` + Sylvester lift (LoRA-S §4.3, eq. 14,
    Alg. 3, A.10; RACS of Gong et al. 2025).

    Per step: ``G = P_T(∇_X f)`` (eq. 12); one-sample ``(s_t, q_t)`` from eq. 14 by a 5-step
    power iteration from ``q = 1``, computed from the factored ``G`` in ``O((m + n) r²)``;
    ``m_s ← β m_s + (1−β) s_t``, ``m_q ← β m_q + (1−β) q_t``;
    ``X̃ = Diag(m_q)^{-1/2} G Diag(m_s)^{-1/2}``; lift of ``P_T(X̃)`` (Sylvester ``K``);
    limiter ``η_t = γ / max(‖X̃‖_g / φ_{t−1}, γ)`` (1 at ``t = 1``), ``φ_t = η_t ‖X̃‖_g``;
    ``(M, N) ← (M − lr η_t Ṁ, N − lr η_t Ṅ)``. ``‖·‖_g`` is evaluated gauge-free
    (:func:`balanced_representative_norm`). Details and the derivation of eq. 14's
    normalisation: :mod:`geolora.optim.preconditioners.racs`.

    Args:
        lr: learning rate (paper A.2: 1e-3 on GPT-2 r=4; 1e-3 / 3e-3 / 5e-3 on Mix-of-Show at
            r = 4 / 8 / 16, linear schedule).
        beta: β₁ of the scale moments (paper: 0.9).
        gamma: norm-growth limiter threshold γ ≥ 1 (the paper gives no value; 1.01, the value of
            the RACS reference implementations: the update norm grows by at most 1 % a step).
        eps: relative floor of the scales (entries below ``eps · max`` are raised to it).
        weight_decay, decay: see :class:`~geolora.optim.lifted.LiftedOptimizer` (paper: none,
            the Sylvester ``K`` is the decay).
        power_iters: iterations of the eq. 14 fixed point (paper: 5).
        bias_correction: divide ``m_s``, ``m_q`` by ``1 − βᵗ`` (default on, as geolora's AdamS).
            The box's zero-initialised moments make the first step ``1/(1 − β) = 10`` times the
            steady-state size, and the limiter cannot act at ``t = 1``; from a nearly
            rank-deficient start (B = 0 after the robust start) that step jumps far.
            ``bias_correction=False`` is Alg. 3 verbatim.
        robust_steps: AdamW warm-up steps (A.16; 100 as for AdamS).
        metric: quotient metric of the lift and of ``‖·‖_g`` (default LoRA-S ``"balanced"``).

    Memory: ``m + n + 1`` floats per pair (the paper's ``O(m + n + 1)``). Invariant under
    ``(B, A) → (B R, R⁻¹ A)`` with an invariant metric (everything lives in matrix space).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta: float = 0.9,
        gamma: float = 1.01,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        power_iters: int = 5,
        bias_correction: bool = True,
        robust_steps: int = 100,
        metric: str | QuotientMetric = "balanced",
        **kwargs: Any,
    ) -> None:
        pre = RACSPreconditioner(power_iters, bias_correction, beta=beta, gamma=gamma, eps=eps)
        super().__init__(
            params,
            pre,
            metric=metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            **kwargs,
        )


__all__ = ["LRACS", "balanced_representative_norm"]
