"""LRACS — RACS lifted to the horizontal space of the LoRA-S metric (lora-s.txt §4.3, Alg. 3)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import transpose
from geolora.manifolds.frame import Frame
from geolora.manifolds.metrics import FrameCore, QuotientMetric, tangent_grams
from geolora.manifolds.quotient import assemble_lift
from geolora.manifolds.types import FactorPoint, FixedRankTangent
from geolora.optim.base import _check_range
from geolora.optim.lifted import LiftedOptimizer
from geolora.optim.preconditioners_racs import RACSPreconditioner


class LRACS(LiftedOptimizer):
    """LRACS: row/column-scaled SGD on ``T_X`` + Sylvester lift (lora-s.txt §4.3, eq. 14,
    Alg. 3, A.10; RACS of Gong et al. 2025).

    Per step: ``G = P_T(∇_X f)`` (eq. 12); one-sample ``(s_t, q_t)`` from eq. 14 by a 5-step
    power iteration from ``q = 1``, computed from the factored ``G`` in ``O((m + n) r²)``;
    ``m_s ← β m_s + (1−β) s_t``, ``m_q ← β m_q + (1−β) q_t``;
    ``X̃ = Diag(m_q)^{-1/2} G Diag(m_s)^{-1/2}``; lift of ``P_T(X̃)`` (Sylvester ``K``);
    limiter ``η_t = γ / max(‖X̃‖_g / φ_{t−1}, γ)`` (1 at ``t = 1``), ``φ_t = η_t ‖X̃‖_g``;
    ``(M, N) ← (M − lr η_t Ṁ, N − lr η_t Ṅ)``. ``‖·‖_g`` is evaluated gauge-free
    (:func:`balanced_representative_norm`). Details and the derivation of eq. 14's
    normalisation: :mod:`geolora.optim.preconditioners_racs`.

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
        pre = RACSPreconditioner(power_iters, bias_correction)
        super().__init__(
            params,
            pre,
            metric=metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            extra_defaults={"beta": beta, "gamma": gamma, "eps": eps},
            **kwargs,
        )

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        _check_range("beta", group["beta"], 0.0, 1.0, hi_open=True)
        _check_range("gamma", group["gamma"], 1.0, math.inf, hi_open=True)

    def _metric_norm(
        self, x: FactorPoint, frame: Frame, t: FixedRankTangent, core: FrameCore | None = None
    ) -> Tensor:
        if not self.metric.invariant:
            return super()._metric_norm(x, frame, t, core)
        return balanced_representative_norm(self.metric, frame, t, core)


def balanced_representative_norm(
    metric: QuotientMetric, frame: Frame, t: FixedRankTangent, core: FrameCore | None = None
) -> Tensor:
    """``‖lift(Ẋ)‖_g`` for a gauge-invariant metric, evaluated at the balanced representative
    ``(U Φ Σ^{1/2}, V Ψ Σ^{1/2})`` of ``X = U W Vᵀ`` (``W = Φ Σ Ψᵀ``).

    Every representative ``(M R, N R⁻ᵀ)`` gives the same value, but ``metric.inner`` at the
    current factors solves with their Gram matrices, whose condition grows with the factor
    imbalance (in float32 it fails for ``‖N‖ / ‖M‖ ~ 1e5``); at the balanced representative
    ``G_M = G_N = Σ`` and only X's own conditioning enters. Its frame needs no QR:
    ``(U Φ, Σ^{1/2}, V Ψ, Σ^{1/2})``, and ``Ẋ``'s coordinates there are
    ``(Φᵀ S Ψ, Up Ψ, Vp Φ)``. Cost ``O((m + n) r²)``; shape = batch shape.

    For the built-in metrics (``metric.has_core``) everything after the Grams ``UpᵀUp``,
    ``VpᵀVp`` is ``r x r`` work (:meth:`QuotientMetric.sqnorm_from_grams` at the balanced core
    ``R_M = R_N = Σ^{1/2}``, whose SVD is known: ``W = Σ``), sharing the SVD of ``W`` with the
    lift through ``core``; no ``m x r`` product is formed. Returned in the factors' dtype.
    """
    dt = frame.U.dtype
    if metric.has_core:
        core = FrameCore.of(frame) if core is None else core
        phi, sig, psi = core.svd()
        f64 = torch.float64
        Pu, Pv = tangent_grams(t)
        root = torch.diag_embed(sig.sqrt())
        eye = torch.eye(sig.shape[-1], dtype=f64, device=sig.device).expand_as(root)
        bal_core = FrameCore(root, root, svd=(eye, sig, eye))
        Sb = transpose(phi) @ t.M.to(f64) @ psi
        Pub = transpose(psi) @ Pu @ psi
        Pvb = transpose(phi) @ Pv @ phi
        sq = metric.sqnorm_from_grams(bal_core, Sb, Pub, Pvb)
        return sq.clamp_min(0).sqrt().to(dt)
    phi, sig, psi_h = torch.linalg.svd(frame.W.to(torch.float64))
    psi = transpose(psi_h)
    root = torch.diag_embed(sig.sqrt())
    Ub, Vb = frame.U @ phi.to(dt), frame.V @ psi.to(dt)
    bal = Frame(Ub, root.to(dt), Vb, root.to(dt))
    tb = FixedRankTangent(
        (transpose(phi) @ t.M.to(torch.float64) @ psi).to(dt), t.Up @ psi.to(dt), t.Vp @ phi.to(dt)
    )
    u = assemble_lift(bal, tb, metric.lift_coefficients(bal, tb.M))
    xb = FactorPoint(Ub @ bal.RM, Vb @ bal.RN)
    return metric.inner(xb, u, u).clamp_min(0).sqrt()


__all__ = ["LRACS", "balanced_representative_norm"]
