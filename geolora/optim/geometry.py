"""Geometries and moves of the template for optimizers that keep the LoRA factors as the point.

A *geometry* says how a stack of pairs ``(M, N)`` (``M = B``, ``N = Aᵀ``, ``X = M Nᵀ``) is read:
its point object, the coordinates of the gradient, the projection onto the tangent space and the
metric norm. A *move* turns the preconditioner's direction into new factors. (Geometries whose
point is owned by the optimizer — fixed rank, bounded rank, Stiefel — are in
:mod:`geolora.optim.manifold_pair`.)

Geometries:

* :class:`QuotientGeometry` — the quotient ``R*^{m×r} × R*^{n×r} / GL(r)`` with a metric
  (:mod:`geolora.manifolds.metrics`), read in the orthonormal frame ``M = U R_M``, ``N = V R_N``:
  the gradient is ``ξ = P_T(∇_X f)`` (Zheng & Wu, "LoRA-S", ICLR 2026, OpenReview Guo2XGgxZA,
  eq. 12), or the unmagnified factor gradients ``(∇_X f V, ∇_X fᵀ U)`` (Yen et al., "LoRA Done
  RITE", ICLR 2025, arXiv:2410.20625, eq. 11) for preconditioners that want ``"products"``.
* :class:`FactorGeometry` — the factors themselves under a total-space metric: Euclidean (plain
  gradients) or the preconditioned metric ``tr(G_N ṀᵀṀ) + tr(G_M ṄᵀṄ)`` (Mishra & Sepulchre
  2016; Tong, Ma & Chi, "Accelerating Ill-Conditioned Low-Rank Matrix Estimation via Scaled
  Gradient Descent", JMLR 2021, arXiv:2005.08898), whose Riemannian gradient is
  ``(∇_M G_N⁻¹, ∇_N G_M⁻¹)``.

Moves:

* :class:`Lift` — the horizontal lift of ``P_T(Ẋ)`` under the quotient metric and the factor
  update ``(M, N) ← (s M − η Ṁ, s N − η Ṅ)`` (LoRA-S Alg. 1), ``s = 1 − ηλ`` for decoupled decay;
* :class:`OneSidedStep` — ``Ṁ = DM R_N⁻ᵀ``, ``Ṅ = DN R_M⁻ᵀ`` from the one-sided split of ``Ẋ``
  (LoRA-RITE eq. 17; ScaledGD's step, since ``∇_M G_N⁻¹ = (∇_X V) R_N⁻ᵀ``);
* :class:`FactorStep` — ``(M, N) ← (s M − η Ṁ, s N − η Ṅ)`` in factor coordinates, with Adam's
  quotient applied in ``torch.optim.AdamW``'s arithmetic.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from geolora.linalg import (
    addmm_t,
    gram64,
    mm_t,
    qr_pos,
    svd_small,
    sym,
    transpose,
    tri_solve_right,
)
from geolora.manifolds.frame import (
    Frame,
    addmm,
    lowrank_tangent,
    project_dense,
    project_factor_grads,
    project_lowrank,
    project_products,
)
from geolora.manifolds.metrics import FrameCore, QuotientMetric, get_metric, tangent_grams
from geolora.manifolds.quotient import assemble_lift
from geolora.manifolds.types import FactorPoint, FactorTangent, FixedRankTangent
from geolora.optim.preconditioners.base import (
    FactorDirection,
    LowRank,
    OneSided,
    Products,
)
from geolora.optim.sharding import LOCAL, RowSum, gram_qr_pair
from geolora.optim.validation import check_bool, check_choice, check_range

__all__ = [
    "DECAY_MODES",
    "FactorGeometry",
    "FactorStep",
    "Lift",
    "OneSidedStep",
    "QuotientGeometry",
    "QuotientPoint",
    "balanced_representative_norm",
    "to_tangent",
]

DECAY_MODES = ("decoupled", "l2")


class QuotientPoint:
    """The point of a stack of pairs in a :class:`QuotientGeometry`: the factors ``x``, their
    frame, the bucket's row-shard reducer (:class:`~geolora.optim.sharding.RowSum`; for
    row-sharded factors ``x`` and the frame's ``U``, ``V`` are the local rows) and, computed on
    first use and then shared by the gradient, the preconditioner, the metric norm and the move,
    the float64 core (:class:`~geolora.manifolds.metrics.FrameCore`) and the inverses of
    ``R_M``, ``R_N``."""

    __slots__ = ("x", "frame", "_geometry", "_core", "_inv", "reduce")

    def __init__(
        self, x: FactorPoint, frame: Frame, geometry: QuotientGeometry, reduce: RowSum = LOCAL
    ) -> None:
        self.x, self.frame, self._geometry, self.reduce = x, frame, geometry, reduce
        self._core: FrameCore | None = None
        self._inv: tuple[Tensor, Tensor] | None = None

    @property
    def core(self) -> FrameCore | None:
        """The frame's float64 ``r x r`` part (``None`` for a metric without closed-form core
        coefficients)."""
        if self._core is None and self._geometry.metric.has_core:
            self._core = FrameCore.of(self.frame)
        return self._core

    def inverses(self, pinv: bool = False) -> tuple[Tensor, Tensor]:
        """``(R_N⁻¹, R_M⁻¹)`` (float64 from one triangular solve of both; Moore–Penrose
        pseudo-inverses in the factors' dtype with ``pinv``)."""
        if self._inv is None:
            RM, RN = self.frame.RM, self.frame.RN
            if pinv:
                self._inv = (torch.linalg.pinv(RN), torch.linalg.pinv(RM))
            else:
                R64 = torch.stack([RN, RM]).to(torch.float64)
                eye = torch.eye(R64.shape[-1], dtype=R64.dtype, device=R64.device)
                inv_RN, inv_RM = torch.linalg.solve_triangular(R64, eye, upper=True).unbind(0)
                self._inv = (inv_RN, inv_RM)
        return self._inv


class QuotientGeometry:
    """``(M, N) / GL(r)`` with a quotient metric, read in an orthonormal frame (module docstring).

    Args:
        metric: ``"balanced"`` (LoRA-S), ``"preconditioned"``, ``"flat"`` or a
            :class:`~geolora.manifolds.metrics.QuotientMetric`.
        damping: δ ≥ 0 for a metric given by name.
        qr_method: orthonormalisation of the frames (``"auto"``, ``"householder"``,
            ``"cholesky"``).
        sign_fix: sign-fixed QR (``diag R ≥ 0``); ``False`` for preconditioners that are exactly
            covariant under the sign flips ``U → U D`` (LoRA-RITE), which saves a pass.

    Per-group hyperparameters it reads: ``weight_decay`` and ``decay`` (``"l2"`` adds ``λ X`` to
    ``ξ`` before the preconditioner), ``pinv`` (pseudo-inverses of ``R`` for the unmagnified
    gradients; then rank-deficient factors need no robust start).

    Row-sharded factors (FSDP2, :mod:`geolora.optim.sharding`): the frame is the QR from the
    all-reduced float64 Grams (:func:`~geolora.optim.sharding.gram_qr_sides`, CholeskyQR2: two
    ``r x r`` reductions for ``M`` and ``N`` together), so ``U``, ``V`` are the local rows and
    ``R_M``, ``R_N`` the same on every rank; the unmagnified gradients ``∇_M R_N⁻¹`` are then
    row-local. The projected gradient, :meth:`project` (:func:`sharded_tangent`) and
    :meth:`norm` (from the reduced Grams ``UpᵀUp``, ``VpᵀVp``) take one reduction each; a
    dense direction and metrics without closed-form core coefficients refuse row shards.
    """

    functional_state = True
    row_shards = True  # the frame through the reducer; see the class docstring for the rest

    def __init__(
        self,
        metric: str | QuotientMetric = "balanced",
        *,
        damping: float = 0.0,
        qr_method: str = "auto",
        sign_fix: bool = True,
    ) -> None:
        check_choice("qr_method", qr_method, ("auto", "householder", "cholesky"))
        self.metric = get_metric(metric, damping)
        self.qr_method = qr_method
        self.sign_fix = sign_fix
        self.defaults: dict[str, Any] = {}

    def validate(self, group: dict[str, Any]) -> None:
        if "decay" in group:
            check_choice("decay", group["decay"], DECAY_MODES)
        if "pinv" in group:
            check_bool("pinv", group["pinv"])

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        return not group.get("pinv", False)

    def init_state(self, group: dict[str, Any], B: Tensor, A: Tensor) -> dict[str, Tensor]:
        return {}

    def point(
        self, x: FactorPoint, state: dict, group: dict, step: int, reduce: RowSum = LOCAL
    ) -> QuotientPoint:
        if reduce.sharded:
            if group.get("pinv", False):
                raise NotImplementedError(
                    "pinv=True on row-sharded factors: the pseudo-inverse of a rank-deficient "
                    "R has no Gram form here; use the default robust start (pinv=False)"
                )
            (U, RM), (V, RN) = gram_qr_pair(x.M, x.N, reduce)
            dt = x.M.dtype
            return QuotientPoint(x, Frame(U.to(dt), RM.to(dt), V.to(dt), RN.to(dt)), self, reduce)
        U, RM = qr_pos(x.M, self.qr_method, sign_fix=self.sign_fix)
        V, RN = qr_pos(x.N, self.qr_method, sign_fix=self.sign_fix)
        return QuotientPoint(x, Frame(U, RM, V, RN), self)

    def gradient(
        self, p: QuotientPoint, g: FactorTangent, group: dict, step: int, wants: str = "tangent"
    ) -> FixedRankTangent | Products:
        """``ξ = P_T(∇_X f)`` from autograd's ``(∇_M, ∇_N) = (∇_X N, ∇_Xᵀ M)`` (plus ``λ X`` for
        ``decay="l2"``), or with ``wants="products"`` the unmagnified gradients
        ``(∇_M R_N⁻¹, ∇_N R_M⁻¹) = (∇_X V, ∇_Xᵀ U)`` as :class:`Products`."""
        if wants == "products":
            inv_RN, inv_RM = p.inverses(group.get("pinv", False))
            dt = g.M.dtype
            return Products(mm_t(g.M, inv_RN.to(dt)), mm_t(g.N, inv_RM.to(dt)))
        if wants != "tangent":
            raise ValueError(f"QuotientGeometry: unknown gradient form {wants!r}")
        if p.reduce.sharded:  # ∇_X V = ∇_M R_N⁻¹ and ∇_Xᵀ U = ∇_N R_M⁻¹ are row-local
            GV = tri_solve_right(g.M, p.frame.RN)
            GtU = tri_solve_right(g.N, p.frame.RM)
            xi = sharded_tangent(p, Products(GV, GtU))
        else:
            xi = project_factor_grads(p.frame, g.M, g.N)
        lam = group.get("weight_decay", 0.0)
        if lam and group.get("decay") == "l2":
            # ∇_X (λ/2 ‖X‖²) = λ X = U W Vᵀ, already tangent.
            xi = FixedRankTangent(xi.M + lam * p.frame.W, xi.Up, xi.Vp)
        return xi

    def project(self, p: QuotientPoint, d: Any) -> FixedRankTangent:
        """``P_T(Ẋ)`` of a direction in any of the forms of
        :mod:`geolora.optim.preconditioners.base`, as a tangent relative to ``p.frame``
        (on row shards: :func:`sharded_tangent`)."""
        if p.reduce.sharded:
            return sharded_tangent(p, d)
        return to_tangent(p.frame, d)

    def norm(self, p: QuotientPoint, t: FixedRankTangent, group: dict | None = None) -> Tensor:
        """``‖lift(t)‖_g``: ``r x r`` work for the built-in metrics, gauge-free for invariant
        ones (:func:`balanced_representative_norm`), else the assembled lift's inner product.
        On row shards the Grams ``UpᵀUp``, ``VpᵀVp`` are reduced (one round); metrics without
        closed-form core coefficients refuse row shards."""
        metric = self.metric
        grams = None
        if p.reduce.sharded:
            if not metric.has_core:
                _whole_rows(p, f"the norm under {type(metric).__name__} (no core coefficients)")
            Pu, Pv = tangent_grams(t)
            (Pu,), (Pv,) = p.reduce(M=[Pu], N=[Pv])
            grams = (Pu, Pv)
            if not metric.invariant:
                sq = metric.sqnorm_from_grams(p.core, t.M.to(torch.float64), Pu, Pv)
                return sq.clamp_min(0).sqrt().to(p.x.M.dtype)
        if metric.invariant:
            return balanced_representative_norm(metric, p.frame, t, p.core, grams)
        if metric.has_core:
            return metric.lift_sqnorm(p.frame, t, p.core).clamp_min(0).sqrt().to(p.x.M.dtype)
        u = assemble_lift(p.frame, t, metric.lift_coefficients(p.frame, t.M))
        return metric.inner(p.x, u, u).clamp_min(0).sqrt()


def _whole_rows(p: QuotientPoint, what: str) -> None:
    if p.reduce.sharded:
        raise NotImplementedError(
            f"QuotientGeometry: {what} sums over the factors' rows and has no row-sharded form"
        )


def sharded_tangent(p: QuotientPoint, d: Any) -> FixedRankTangent:
    """:func:`to_tangent` on row shards: ``p.frame``'s ``U``, ``V`` and the direction's tall
    factors are local rows, and the ``r x r`` products that sum over rows go through
    ``p.reduce`` in one round. ``Products``: ``S = Σ Uᵀ(ZV)``; ``LowRank``: ``S = (UᵀA)(BᵀV)``
    from ``Σ UᵀA``, ``Σ BᵀV``; ``OneSided`` (``Ẋ = DM Vᵀ + U DNᵀ``): ``a = Σ UᵀDM``,
    ``b = Σ DNᵀV``, ``S = a + b``, ``Up = DM − U a``, ``Vp = DN − V bᵀ``. A dense ``m x n``
    direction has no row-sharded form."""
    U, V = p.frame.U, p.frame.V
    if isinstance(d, FixedRankTangent):
        return d
    if isinstance(d, Products):
        (S,), _ = p.reduce(M=[transpose(U) @ d.ZV])
        t = FixedRankTangent(
            S, addmm(d.ZV, U, S, alpha=-1.0), addmm(d.ZtU, V, transpose(S), alpha=-1.0)
        )
        return _scaled_tangent(t, d.scale)
    if isinstance(d, OneSided):
        (a,), (b,) = p.reduce(M=[transpose(U) @ d.DM], N=[transpose(d.DN) @ V])
        t = FixedRankTangent(
            a + b, addmm(d.DM, U, a, alpha=-1.0), addmm(d.DN, V, transpose(b), alpha=-1.0)
        )
        return _scaled_tangent(t, 1.0 / d.divisor)
    if isinstance(d, LowRank):
        (UtA,), (BtV,) = p.reduce(M=[transpose(U) @ d.A], N=[transpose(d.B) @ V])
        return lowrank_tangent(p.frame, d.A, d.B, UtA, BtV)
    _whole_rows(p, f"the projection of a {type(d).__name__} direction")
    raise AssertionError("unreachable")  # pragma: no cover


def _scaled_tangent(t: FixedRankTangent, c: Any) -> FixedRankTangent:
    if isinstance(c, (int, float)) and c == 1.0:
        return t
    if isinstance(c, Tensor):
        c = c[..., None, None]
    return FixedRankTangent(c * t.M, c * t.Up, c * t.Vp)


def to_tangent(frame: Frame, d: Any) -> FixedRankTangent:
    """A direction (:mod:`geolora.optim.preconditioners.base`) as its projection onto ``T_X``,
    relative to ``frame``."""
    if isinstance(d, FixedRankTangent):
        return d
    if isinstance(d, Products):
        t = project_products(frame, d.ZV, d.ZtU)
        c = d.scale
        if isinstance(c, (int, float)) and c == 1.0:
            return t
        if isinstance(c, Tensor):
            c = c[..., None, None]
        return FixedRankTangent(c * t.M, c * t.Up, c * t.Vp)
    if isinstance(d, OneSided):
        # Ẋ = DM Vᵀ + U DNᵀ: Ẋ V = DM + U (DNᵀ V), Ẋᵀ U = DN + V (DMᵀ U).
        ZV = addmm(d.DM, frame.U, transpose(d.DN) @ frame.V)
        ZtU = addmm(d.DN, frame.V, transpose(d.DM) @ frame.U)
        return to_tangent(frame, Products(ZV, ZtU, 1.0 / d.divisor))
    if isinstance(d, LowRank):
        return project_lowrank(frame, d.A, d.B)
    if isinstance(d, Tensor):
        return project_dense(frame, d)
    raise TypeError(
        f"preconditioner returned {type(d).__name__}; expected a tangent, a dense tensor, "
        f"LowRank, Products or OneSided"
    )


def balanced_representative_norm(
    metric: QuotientMetric,
    frame: Frame,
    t: FixedRankTangent,
    core: FrameCore | None = None,
    grams: tuple[Tensor, Tensor] | None = None,
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
    if grams is not None:  # the Grams UpᵀUp, VpᵀVp given (reduced over row shards)
        core = FrameCore.of(frame) if core is None else core
    if metric.has_core and metric.gauge_free_sqnorm:
        # closed form in gauge-free quantities: no change of representative needed (and no SVD
        # with an SVD-free core solver, see FrameCore)
        if grams is not None:
            sq = metric.sqnorm_from_grams(core, t.M.to(torch.float64), *grams)
            return sq.clamp_min(0).sqrt().to(dt)
        return metric.lift_sqnorm(frame, t, core).clamp_min(0).sqrt().to(dt)
    if metric.has_core:
        core = FrameCore.of(frame) if core is None else core
        phi, sig, psi = core.svd()
        f64 = torch.float64
        Pu, Pv = tangent_grams(t) if grams is None else grams
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


def _shrink(group: dict, lr: float, decoupled: bool = True) -> float:
    lam = group.get("weight_decay", 0.0)
    return 1.0 - lr * lam if decoupled else 1.0


class Lift:
    """Horizontal lift under the geometry's metric + factor update (LoRA-S Alg. 1)::

        t = P_T(Ẋ);  (Ṁ, Ṅ) = lift(t) = (U A_M + Up D_N, V A_N + Vp D_M)
        (M, N) ← (s M − η Ṁ, s N − η Ṅ)

    in two fused products per factor, without forming ``(Ṁ, Ṅ)``. ``s = 1 − ηλ`` for
    ``decay="decoupled"`` (the LoRA-S regularised Sylvester matrix ``K + λI``, A.11 eq. 22), 1
    for ``"l2"`` (the geometry added ``λX`` to the gradient) and with ``decay=False`` (the decay
    belongs to the preconditioner, as in :func:`~geolora.optim.wrap.Lifted`).
    """

    functional_state = True
    #: the lift's coefficients are r×r (metrics with a core) and the update row-local
    row_shards = True

    def __init__(self, *, decay: bool = True, weight_decay: float = 0.0) -> None:
        self.decay = decay
        self.defaults: dict[str, Any] = (
            {"weight_decay": weight_decay, "decay": "decoupled"} if decay else {}
        )

    def validate(self, group: dict[str, Any]) -> None:
        if self.decay:
            check_choice("decay", group["decay"], DECAY_MODES)

    def apply(
        self, geometry: QuotientGeometry, p: QuotientPoint, d: Any, state, group, step, pre
    ) -> FactorPoint:
        t = geometry.project(p, d)
        if p.reduce.sharded and not geometry.metric.has_core:
            _whole_rows(p, f"the lift under {type(geometry.metric).__name__} (no core coefficients)")
        lr = group["lr"]
        shrink = _shrink(group, lr, self.decay and group.get("decay") == "decoupled")
        coeffs = geometry.metric.coefficients(p.frame, t.M, p.core)
        dt = p.x.M.dtype
        AM, DN, AN, DM = (c.to(dt) for c in coeffs)
        U, V = p.frame.U, p.frame.V
        M = addmm(addmm(p.x.M, U, AM, beta=shrink, alpha=-lr), t.Up, DN, alpha=-lr)
        N = addmm(addmm(p.x.N, V, AN, beta=shrink, alpha=-lr), t.Vp, DM, alpha=-lr)
        return FactorPoint(M, N)


class OneSidedStep:
    """``M ← (1 − ηλ) M − (η / c) DM R_N⁻ᵀ``, ``N ← (1 − ηλ) N − (η / c) DN R_M⁻ᵀ`` for the
    direction ``Ẋ = (DM Vᵀ + U DNᵀ) / c`` (:class:`OneSided`): one fused product per factor
    (LoRA-RITE Alg. 1 line 10). A tangent in another form is split as ``DM = Ẋ V``,
    ``DN = (I − VVᵀ) Ẋᵀ U``. Transformation invariant: at ``(M R, N R⁻ᵀ)`` the frame changes by
    orthogonal matrices and ``R_N⁻ᵀ`` by ``R``, so ``X`` moves the same way."""

    functional_state = True
    row_shards = True  # row-local products with r×r matrices (a tangent is split by project)

    def __init__(self, *, weight_decay: float = 0.0) -> None:
        self.defaults: dict[str, Any] = {"weight_decay": weight_decay}

    def apply(
        self, geometry: QuotientGeometry, p: QuotientPoint, d: Any, state, group, step, pre
    ) -> FactorPoint:
        if not isinstance(d, OneSided):
            t = geometry.project(p, d)
            d = OneSided(addmm(t.Up, p.frame.U, t.M), t.Vp)
        inv_RN, inv_RM = p.inverses(group.get("pinv", False))
        lr = group["lr"]
        shrink = _shrink(group, lr)
        dt = p.x.M.dtype
        alpha = -lr / d.divisor
        M = addmm_t(p.x.M, d.DM, transpose(inv_RN).to(dt), beta=shrink, alpha=alpha)
        N = addmm_t(p.x.N, d.DN, transpose(inv_RM).to(dt), beta=shrink, alpha=alpha)
        return FactorPoint(M, N)


def _damped_inverse(G: Tensor, damping: float) -> Tensor:
    """``(sym(G) + δI)⁻¹`` by Cholesky; NaN where it is not numerically positive definite (the
    step's finiteness check raises)."""
    from geolora.linalg import spd_inverse

    G = sym(G)
    if damping:
        G = G + damping * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return spd_inverse(G)


def scaled_gradients(
    x: FactorPoint, g: FactorTangent, damping: float = 0.0, reduce: RowSum = LOCAL
) -> FactorTangent:
    """``(∇_M (NᵀN + δI)⁻¹, ∇_N (MᵀM + δI)⁻¹)`` — the Riemannian gradient of the preconditioned
    metric (Tong et al. 2021; Zhang & Pilanci, "Riemannian Preconditioned LoRA for Fine-Tuning
    Foundation Models", ICML 2024, arXiv:2402.02347).

    Shapes: ``x.M, g.M: (..., m, r)``, ``x.N, g.N: (..., n, r)``; the r×r inverses are formed in
    float64, the result has ``g``'s dtype. With ``δ = 0`` it is gauge covariant: at
    ``(M R, N R⁻ᵀ)`` the result is ``(Ṁ R, Ṅ R⁻ᵀ)``. Row-sharded factors (``x``, ``g`` the local
    rows): the two Grams are the only sums over rows, reduced together in one round
    (``reduce``, :class:`~geolora.optim.sharding.RowSum`); the rest is row-local.
    """
    (G_M,), (G_N,) = reduce(M=[gram64(x.M)], N=[gram64(x.N)])
    inv_N = _damped_inverse(G_N, damping).to(g.M.dtype)
    inv_M = _damped_inverse(G_M, damping).to(g.N.dtype)
    return FactorTangent(mm_t(g.M, inv_N), mm_t(g.N, inv_M))


class FactorPair(NamedTuple):
    """The point of :class:`FactorGeometry`: the factors and the row-shard reducer of the
    bucket."""

    M: Tensor
    N: Tensor
    reduce: RowSum = LOCAL


FACTOR_METRICS = ("euclidean", "preconditioned")


class FactorGeometry:
    """The factors ``(M, N)`` as the point, under a total-space metric (module docstring):
    ``"euclidean"`` (the gradient is autograd's) or ``"preconditioned"`` (the gradient is
    ``(∇_M (NᵀN + δI)⁻¹, ∇_N (MᵀM + δI)⁻¹)``, δ the group's ``damping``; with δ = 0 a
    rank-deficient pair takes the robust start)."""

    functional_state = True
    row_shards = True  # the only sums over rows are the two Grams, through the reducer

    def __init__(self, metric: str = "euclidean", *, damping: float = 0.0) -> None:
        check_choice("metric", metric, FACTOR_METRICS)
        self.metric = metric
        self.defaults: dict[str, Any] = {"damping": damping} if metric == "preconditioned" else {}

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        return self.metric == "preconditioned" and not group.get("damping", 0.0) > 0

    def init_state(self, group: dict[str, Any], B: Tensor, A: Tensor) -> dict[str, Tensor]:
        return {}

    def point(
        self, x: FactorPoint, state: dict, group: dict, step: int, reduce: RowSum = LOCAL
    ) -> FactorPair:
        return FactorPair(x.M, x.N, reduce)

    def gradient(
        self, x: FactorPair, g: FactorTangent, group: dict, step: int, wants: str = "tangent"
    ) -> FactorTangent:
        if self.metric == "preconditioned":
            return scaled_gradients(x, g, group["damping"], x.reduce)
        return g

    def project(self, x: FactorPoint, d: Any) -> Any:
        return d  # every factor direction is tangent to the total space

    def norm(self, x: FactorPair, t: FactorTangent, group: dict | None = None) -> Tensor:
        """``sqrt(tr(G_N ṀᵀṀ) + tr(G_M ṄᵀṄ))`` (preconditioned, δ added to the Grams) or the
        Frobenius norm (Euclidean), batch shape."""
        if self.metric == "euclidean":
            return (t.M.pow(2).sum(dim=(-2, -1)) + t.N.pow(2).sum(dim=(-2, -1))).sqrt()
        delta = (group or {}).get("damping", 0.0)
        GN = transpose(x.N) @ x.N
        GM = transpose(x.M) @ x.M
        a = ((t.M @ GN) * t.M).sum(dim=(-2, -1)) + delta * t.M.pow(2).sum(dim=(-2, -1))
        b = ((t.N @ GM) * t.N).sum(dim=(-2, -1)) + delta * t.N.pow(2).sum(dim=(-2, -1))
        return (a + b).clamp_min(0).sqrt()


class FactorStep:
    """``(M, N) ← (s M − η_M Ṁ, s N − η_N Ṅ)`` with ``s = 1 − η λ`` (decoupled weight decay,
    ``λ`` the group's ``weight_decay``) and ``η_M, η_N = lr · lr_scale``. An Adam direction
    (``FactorDirection`` with ``den``) is applied as ``torch.optim.AdamW`` does:
    ``p ← p (1 − η λ)``, ``p ← p − (η / divisor) num / den`` (``addcdiv``), so that plain AdamW on
    the factors is ``torch.optim.AdamW`` to the bit."""

    functional_state = True
    row_shards = True  # element-wise

    def __init__(self, *, weight_decay: float = 0.0) -> None:
        self.defaults: dict[str, Any] = {"weight_decay": weight_decay}

    def apply(self, geometry: Any, x: FactorPoint, d: Any, state, group, step, pre) -> FactorPoint:
        if isinstance(d, FactorTangent):
            d = FactorDirection(d.M, d.N)
        lr, lam = group["lr"], group.get("weight_decay", 0.0)
        if d.den is None and d.lr_scale == (1.0, 1.0):
            shrink = 1.0 - lr * lam
            if shrink == 1.0:
                return FactorPoint(torch.add(x.M, d.M, alpha=-lr), torch.add(x.N, d.N, alpha=-lr))
            return FactorPoint(
                torch.add(x.M * shrink, d.M, alpha=-lr), torch.add(x.N * shrink, d.N, alpha=-lr)
            )
        out = []
        for i, (p, num) in enumerate(((x.M, d.M), (x.N, d.N))):
            lr_i = d.lr_scale[i] * lr if d.lr_scale[i] != 1.0 else lr
            if lam:  # (a factor 1 would leave p as it is: no pass for it)
                p = p * (1 - lr_i * lam)
            if d.den is None:
                p = torch.add(p, num, alpha=-lr_i / d.divisor)
            else:
                p = torch.addcdiv(p, num, d.den[i], value=-(lr_i / d.divisor))
            out.append(p)
        return FactorPoint(*out)


def validate_weight_decay(group: dict[str, Any]) -> None:
    check_range("weight_decay", group["weight_decay"], 0.0)
