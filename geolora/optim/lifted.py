"""The LoRA-S template: preconditioner on ``T_X`` + horizontal lift + factor update.

One step for a stack of LoRA pairs (lora-s.txt Alg. 1, generalised; DESIGN.md "The optimizer
template"):

1. frame ``M = U R_M``, ``N = V R_N`` and projected gradient ``ξ = P_T(∇_X f)`` from the factor
   gradients (eq. 12), optionally plus ``λ X`` (``decay="l2"``);
2. preconditioner: ``ξ ↦ Ẋ`` with its own state (:mod:`geolora.optim.preconditioners`);
3. lift: the horizontal ``(Ṁ, Ṅ)`` of ``P_T(Ẋ)`` under the metric
   (:mod:`geolora.manifolds.metrics`);
4. move: ``(M, N) ← (M − η(Ṁ + λM), N − η(Ṅ + λN))``. The decoupled decay ``λ`` is exactly the
   LoRA-S regularised Sylvester matrix ``K ← K + λI`` (A.11 eq. 22): adding ``λI`` to ``K`` adds
   ``λM`` and ``λN`` to the lift. LoRA-S's default is ``λ = 0``: the Sylvester ``K`` itself is the
   decay.

Every optimizer here is transformation invariant when the metric is (balanced or
preconditioned): from ``(M R, N R⁻ᵀ)`` it produces the same ``X`` trajectory (Theorem 1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import svd_small, transpose
from geolora.manifolds.frame import (
    Frame,
    addmm,
    make_frame,
    project_dense,
    project_factor_grads,
    project_lowrank,
)
from geolora.manifolds.metrics import (
    FrameCore,
    LiftCoefficients,
    QuotientMetric,
    get_metric,
    tangent_grams,
)
from geolora.manifolds.quotient import assemble_lift
from geolora.manifolds.types import FactorPoint, FactorTangent, FixedRankTangent
from geolora.optim.base import LoRAOptimizer
from geolora.optim.preconditioners import (
    AdamPreconditioner,
    Descent,
    LowRank,
    Preconditioner,
    StepContext,
)
from geolora.optim.validation import validate_betas

DECAY_MODES = ("decoupled", "l2")


class LiftedOptimizer(LoRAOptimizer):
    """Preconditioner + horizontal lift under ``metric`` (LoRA-S Alg. 1 template).

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        preconditioner: a :class:`~geolora.optim.preconditioners.Preconditioner`.
        metric: ``"balanced"`` (LoRA-S), ``"preconditioned"``, ``"flat"`` or a metric instance.
        lr: learning rate η.
        weight_decay: λ ≥ 0 (0 = LoRA-S default).
        decay: ``"decoupled"`` (≡ ``K + λI``) or ``"l2"`` (``ξ ← ξ + λX`` before preconditioning).
        damping: δ ≥ 0 for a metric given by name.
        qr_method: orthonormalisation for frames (``"auto"``, ``"householder"``, ``"cholesky"``).
        extra_defaults: further per-group hyperparameters of the preconditioner.
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
        extra_defaults: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if decay not in DECAY_MODES:
            raise ValueError(f"decay must be one of {DECAY_MODES}, got {decay!r}")
        self.preconditioner = preconditioner
        self.metric = get_metric(metric, damping)
        self.qr_method = qr_method
        defaults = {"lr": lr, "weight_decay": weight_decay, "decay": decay}
        defaults.update(extra_defaults or {})
        super().__init__(params, defaults, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        if group["decay"] not in DECAY_MODES:
            raise ValueError(f"decay must be one of {DECAY_MODES}, got {group['decay']!r}")

    @property
    def functional_state(self) -> bool:  # type: ignore[override]
        """The preconditioner's ``functional_state`` (see :class:`LoRAOptimizer`)."""
        return bool(getattr(self.preconditioner, "functional_state", False))

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        from geolora.linalg import compute_dtype

        like = torch.empty((), dtype=compute_dtype(B.dtype), device=B.device)
        m, r = B.shape
        n = A.shape[1]
        return self.preconditioner.init_state(m, n, r, like)

    # --- the template -----------------------------------------------------------------------
    def _frame(self, x: FactorPoint) -> Frame:
        return make_frame(x.M, x.N, self.qr_method)

    def _lift(self, frame: Frame, d: Descent) -> tuple[FixedRankTangent, FactorTangent]:
        t = _to_tangent(frame, d)
        return t, assemble_lift(frame, t, self.metric.lift_coefficients(frame, t.M))

    def _core(self, frame: Frame) -> FrameCore | None:
        """The frame's shared ``r x r`` part (``None`` for a metric without ``core_coefficients``)."""
        return FrameCore.of(frame) if self.metric.has_core else None

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        frame = self._frame(x)
        core = self._core(frame)
        xi = project_factor_grads(frame, g.M, g.N)
        lam = group["weight_decay"]
        if lam and group["decay"] == "l2":
            # ∇_X (λ/2 ‖X‖²) = λ X = U W Vᵀ, already tangent.
            xi = FixedRankTangent(xi.M + lam * frame.W, xi.Up, xi.Vp)
        m, r = x.M.shape[-2:]
        ctx = StepContext(
            frame, m, x.N.shape[-2], r, lambda t: self._metric_norm(x, frame, t, core)
        )
        d = self.preconditioner.update(state, xi, ctx, group, step)
        cls = type(self)
        if cls._lift is LiftedOptimizer._lift and cls._move is LiftedOptimizer._move:
            t = _to_tangent(frame, d)
            return self._lift_move(group, x, frame, t, self.metric.coefficients(frame, t.M, core))
        _, u = self._lift(frame, d)
        return self._move(group, x, u)

    def _move(self, group, x: FactorPoint, u: FactorTangent) -> FactorPoint:
        """``(M, N) ← (M − η(Ṁ + λM), N − η(Ṅ + λN))`` (λ only with ``decay="decoupled"``)."""
        lr, lam = group["lr"], group["weight_decay"]
        shrink = 1.0 - lr * lam if group["decay"] == "decoupled" else 1.0
        return FactorPoint(shrink * x.M - lr * u.M, shrink * x.N - lr * u.N)

    def _lift_move(
        self,
        group,
        x: FactorPoint,
        frame: Frame,
        t: FixedRankTangent,
        coeffs: LiftCoefficients,
        shrink: float | None = None,
    ) -> FactorPoint:
        """:meth:`_lift` and :meth:`_move` in two fused products per factor:
        ``M⁺ = s M − η (U A_M) − η (Up D_N)``, ``N⁺ = s N − η (V A_N) − η (Vp D_M)``
        (``s = 1 − ηλ`` for decoupled decay unless ``shrink`` is given), without materialising
        ``(Ṁ, Ṅ)``."""
        lr, lam = group["lr"], group["weight_decay"]
        if shrink is None:
            shrink = 1.0 - lr * lam if group["decay"] == "decoupled" else 1.0
        dt = x.M.dtype
        AM, DN, AN, DM = (c.to(dt) for c in coeffs)
        M = addmm(addmm(x.M, frame.U, AM, beta=shrink, alpha=-lr), t.Up, DN, alpha=-lr)
        N = addmm(addmm(x.N, frame.V, AN, beta=shrink, alpha=-lr), t.Vp, DM, alpha=-lr)
        return FactorPoint(M, N)

    def _metric_norm(
        self, x: FactorPoint, frame: Frame, t: FixedRankTangent, core: FrameCore | None = None
    ) -> Tensor:
        """``‖lift(t)‖_g``: ``r x r`` work (:meth:`QuotientMetric.lift_sqnorm`) for the built-in
        metrics, else the assembled lift's :meth:`QuotientMetric.inner`."""
        if self.metric.invariant:
            # gauge-free: evaluated at the balanced representative of X
            return balanced_representative_norm(self.metric, frame, t, core)
        if self.metric.has_core:
            return self.metric.lift_sqnorm(frame, t, core).clamp_min(0).sqrt().to(x.M.dtype)
        u = assemble_lift(frame, t, self.metric.lift_coefficients(frame, t.M))
        return self.metric.inner(x, u, u).clamp_min(0).sqrt()


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
    if metric.has_core and metric.gauge_free_sqnorm:
        # closed form in gauge-free quantities: no change of representative needed (and no SVD
        # with an SVD-free core solver, see FrameCore)
        return metric.lift_sqnorm(frame, t, core).clamp_min(0).sqrt().to(dt)
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
    phi, sig, psi_h = svd_small(frame.W.to(torch.float64))
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


def _to_tangent(frame: Frame, d: Descent) -> FixedRankTangent:
    if isinstance(d, FixedRankTangent):
        return d
    if isinstance(d, LowRank):
        return project_lowrank(frame, d.A, d.B)
    if isinstance(d, Tensor):
        return project_dense(frame, d)
    raise TypeError(
        f"preconditioner returned {type(d).__name__}; expected a tangent, tensor or LowRank"
    )


class AdamS(LiftedOptimizer):
    """AdamS — Adam lifted to the horizontal space of the LoRA-S metric (lora-s.txt §4.2,
    Alg. 2; low-memory variant Alg. 4).

    ``ξ = P_T(∇_X f)``; ``m ← β₁ m + (1−β₁) ξ``; ``v ← β₂ v + (1−β₂) ξ²``;
    ``Ẋ = m̂ / (sqrt(v̂) + ε)``; solve ``G_M G_N K + K G_M G_N = Mᵀ Ẋ N``;
    ``Ṁ = (Ẋ N − M G_N K) G_N⁻¹``, ``Ṅ = (Ẋᵀ M − N G_M Kᵀ) G_M⁻¹``;
    ``(M, N) ← (M − η Ṁ, N − η Ṅ)``.

    Defaults from the paper: ``betas=(0.9, 0.999)``, no weight decay (the Sylvester K is the
    decay), robust start with AdamW for ``robust_steps=100`` steps from zero-initialised LoRA
    (A.16). Memory: ``2mn`` per pair (``mn + 2(m+n)r + r²`` with ``low_memory=True``).
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
        pre = AdamPreconditioner(low_memory, riemannian_second_moment, bias_correction)
        super().__init__(
            params,
            pre,
            metric=metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            extra_defaults={"betas": tuple(betas), "eps": eps},
            **kwargs,
        )
