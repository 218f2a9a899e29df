"""Q-factor retraction, nuclear-norm step and projection transport of the bounded-rank manifold.

Functions on the factored representation ``(K, V)`` of the desingularization of
``{X ∈ R^{m×n} : rank X ≤ r}`` (Khrulkov–Oseledets 2018; Rebjock–Boumal 2024; Jiang, Wang &
Stich, "LoRAM: Low-Rank Adaptation of Large Language Models on Manifold", ICLR 2025 Workshop on
Sparsity in LLMs, OpenReview 6cLPObfitT, Algorithms 6–8, "LoRAM" below):
``X = K Vᵀ``, ``VᵀV = I``, tangent vectors ``(K̇, V̇p)`` with ``Vᵀ V̇p = 0`` (see
:class:`geolora.manifolds.bounded_rank.BoundedRank` for the full geometry). Every function accepts
leading batch dimensions and costs ``O((m + n) r²)``; none forms an ``m × n`` matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from geolora.linalg import addmm_t, mm_t, polar, qf, svd_small, transpose
from geolora.manifolds.types import BoundedRankPoint, BoundedRankTangent
from geolora.retractions.fixed_rank import _qr_r, _qr_signed, thin_qr

__all__ = [
    "NUCLEAR_MODES",
    "canonical_bounded_rank",
    "canonical_qfactor_retraction",
    "canonical_transport",
    "metric_inverse_diag",
    "nuclear_subgradient",
    "metric_gram_inverse",
    "project_products",
    "nuclear_polar_factor",
    "singular_value_threshold",
    "qfactor_retraction",
    "projection_transport",
    "bounded_rank_retraction",
    "bounded_rank_transport",
]

#: Ways :func:`qfactor_retraction` applies the nuclear-norm term ``λ‖X‖_*``.
NUCLEAR_MODES = ("subgradient", "prox")


def metric_gram_inverse(K: Tensor, alpha: float) -> Tensor:
    """``(KᵀK + 2αI)⁻¹`` — the inverse weight of ``V̇p`` in the bounded-rank metric.

    Symmetric positive definite for every finite ``K`` (also ``K = 0``) when ``α > 0``. Computed
    by a Cholesky factorization in float64 (``docs/design.md``: small ``r × r`` work in float64) and
    returned in ``K``'s dtype. Shapes ``(..., m, r) -> (..., r, r)``.

    Raises ``FloatingPointError`` if the factorization fails, which happens only for a diverged
    ``K``: non-finite entries, or ``‖K‖² ≳ 2α / eps`` so that ``2αI`` is lost in rounding.
    """
    k64 = K.to(torch.float64)
    r = K.shape[-1]
    g = transpose(k64) @ k64 + (2.0 * alpha) * torch.eye(r, dtype=k64.dtype, device=K.device)
    chol, info = torch.linalg.cholesky_ex(g)
    if bool((info != 0).any()):
        kmax = float(k64.abs().amax())
        raise FloatingPointError(
            "BoundedRank: the metric Gram matrix KᵀK + 2αI is not positive definite, so K has "
            f"diverged (max |K| = {kmax:.3g}; non-finite, or too large for 2α = {2 * alpha:g} to "
            "survive rounding). Lower the learning rate (LoRAM-BR: coordinate_wise=False is the "
            "stable variant)."
        )
    return torch.cholesky_inverse(chol).to(K.dtype)


def project_products(
    K: Tensor, V: Tensor, ZV: Tensor, Y: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """Orthogonal projection of an ambient vector onto the tangent space, from two products.

    The ambient space of the desingularization is ``R^{m×n} × Sym(n)`` with the metric
    ``⟨Z, Z'⟩ + α⟨W, W'⟩`` (Rebjock–Boumal 2024). The metric-orthogonal projection of ``(Z, W)``
    onto ``T_{(X, P)}`` is, in ``(K̇, V̇p)`` coordinates,
    ``K̇ = Z V``, ``V̇p = (I − VVᵀ) (Zᵀ K − 2α W V) (KᵀK + 2αI)⁻¹``
    (set the ``K̇``- and ``V̇p``-derivatives of ``‖K̇Vᵀ + KV̇pᵀ − Z‖² + α‖−(V̇pVᵀ + VV̇pᵀ) − W‖²``
    to zero). The caller passes ``ZV = Z V: (..., m, r)`` and ``Y = Zᵀ K − 2α W V: (..., n, r)``.
    ``W = 0`` gives the Riemannian gradient (LoRAM Alg. 6), the transported vector gives the
    projection transport (Alg. 8).
    """
    Yp = Y - V @ (transpose(V) @ Y)
    return ZV, Yp @ metric_gram_inverse(K, alpha)


def nuclear_polar_factor(K: Tensor) -> Tensor:
    """Orthonormal polar factor ``Q = Φ Ψᵀ`` of ``K = Φ Σ Ψᵀ`` (thin SVD), ``(..., m, r)``.

    ``Q Vᵀ`` is a subgradient of ``‖X‖_*`` at ``X = K Vᵀ`` (it is ``U Vᵀ`` of the SVD of ``X``;
    for rank-deficient ``K`` the columns belonging to zero singular values are some orthonormal
    completion, still a valid subgradient since ``‖Q Vᵀ‖₂ = 1``).
    """
    return polar(K)


def singular_value_threshold(K: Tensor, lam: Tensor | float) -> Tensor:
    """``Φ max(Σ − λ, 0) Ψᵀ`` for ``K = Φ Σ Ψᵀ``: the proximal map of ``λ‖·‖_*`` on ``(..., m, r)``.

    With orthonormal ``V``, ``‖K Vᵀ‖_* = ‖K‖_*`` and ``prox(K Vᵀ) = prox(K) Vᵀ``, so thresholding
    ``K`` applies the proximal map of ``λ‖X‖_*`` to ``X = K Vᵀ`` without forming ``X``.
    """
    phi, sig, psi_h = svd_small(K, full_matrices=False)
    lam_t = torch.as_tensor(lam, dtype=sig.dtype, device=sig.device)
    if lam_t.dim() > 0:
        lam_t = lam_t.unsqueeze(-1)
    return (phi * (sig - lam_t).clamp_min(0).unsqueeze(-2)) @ psi_h


def _lam_matrix(lam: Tensor | float, like: Tensor) -> Tensor | float:
    # Batch-shaped λ (...,) broadcasts over the trailing matrix dimensions.
    if isinstance(lam, Tensor):
        return lam.to(dtype=like.dtype, device=like.device).unsqueeze(-1).unsqueeze(-1)
    return lam


def qfactor_retraction(
    K: Tensor,
    V: Tensor,
    Kdot: Tensor,
    Vp: Tensor,
    *,
    nuclear_lambda: Tensor | float = 0.0,
    nuclear_mode: str = "subgradient",
    qr_method: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Q-factor retraction ``R_{(K, V)}(K̇, V̇p)`` with an optional nuclear-norm term (LoRAM
    Alg. 7).

    ``V⁺ = qf(V + V̇p)``, ``K⁺ = (X + Ẋ) V⁺`` with ``X + Ẋ = (K + K̇) Vᵀ + K V̇pᵀ``, evaluated as
    ``K⁺ = (K + K̇)(Vᵀ V⁺) + K (V̇pᵀ V⁺)`` (two ``r × r`` products; no ``m × n`` matrix). So
    ``X⁺ = (X + Ẋ) V⁺V⁺ᵀ``: the tangent step projected onto the new row space.

    Nuclear-norm term ``λ‖X‖_*`` (``λ = nuclear_lambda ≥ 0``, the step's own scale: an optimizer
    passes ``lr · λ``), applied decoupled from ``(K̇, V̇p)`` like AdamW's weight decay:

    * ``"subgradient"`` (Alg. 7 line 4): ``X⁺ = (X + Ẋ − λ Q Vᵀ) V⁺V⁺ᵀ`` with ``Q`` the polar
      factor of ``K`` (``Q Vᵀ = U Vᵀ``, a subgradient of ``‖X‖_*``); identical to the plain
      retraction along ``(K̇ − λQ, V̇p)``.
    * ``"prox"``: ``X⁺ = prox_{λ‖·‖_*}((X + Ẋ) V⁺V⁺ᵀ)``, i.e. soft-thresholding of the singular
      values of ``K⁺`` by ``λ`` (``V⁺`` unchanged); never moves ``X = 0`` away from 0.

    Shapes: ``K, K̇: (..., m, r)``, ``V, V̇p: (..., n, r)``; ``nuclear_lambda`` a float or a
    batch-shaped tensor. Returns ``(K⁺, V⁺)``.
    """
    if nuclear_mode not in NUCLEAR_MODES:
        raise ValueError(f"nuclear_mode must be one of {NUCLEAR_MODES}, got {nuclear_mode!r}")
    use_nuclear = isinstance(nuclear_lambda, Tensor) or nuclear_lambda != 0.0
    if use_nuclear and nuclear_mode == "subgradient":
        Kdot = Kdot - _lam_matrix(nuclear_lambda, K) * nuclear_polar_factor(K)
    V_new = qf(V + Vp, qr_method)
    K_new = (K + Kdot) @ (transpose(V) @ V_new) + K @ (transpose(Vp) @ V_new)
    if use_nuclear and nuclear_mode == "prox":
        K_new = singular_value_threshold(K_new, nuclear_lambda)
    return K_new, V_new


def projection_transport(
    K: Tensor,
    V: Tensor,
    K_new: Tensor,
    V_new: Tensor,
    Kdot: Tensor,
    Vp: Tensor,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """Vector transport by projection from ``(K, V)`` to ``(K⁺, V⁺)`` (LoRAM Alg. 8).

    The tangent vector ``(K̇, V̇p)`` at ``(K, V)`` is the ambient vector
    ``(Ẋ, Ṗ) = (K̇Vᵀ + KV̇pᵀ, −(V̇pVᵀ + VV̇pᵀ))``; it is projected onto the tangent space at the new
    point (:func:`project_products`):
    ``K̇⁺ = Ẋ V⁺ = K̇ (VᵀV⁺) + K (V̇pᵀV⁺)``,
    ``V̇p⁺ = (I − V⁺V⁺ᵀ) (ẊᵀK⁺ + 2α (V̇pVᵀ + VV̇pᵀ) V⁺) (K⁺ᵀK⁺ + 2αI)⁻¹``.
    Cost ``O((m + n) r²)``. Returns ``(K̇⁺, V̇p⁺)``.
    """
    A = transpose(V) @ V_new  # (..., r, r)
    B = transpose(Vp) @ V_new
    ZV = Kdot @ A + K @ B
    Y = (
        V @ (transpose(Kdot) @ K_new)
        + Vp @ (transpose(K) @ K_new)
        + (2.0 * alpha) * (Vp @ A + V @ B)
    )
    return project_products(K_new, V_new, ZV, Y, alpha)


def bounded_rank_retraction(
    x: BoundedRankPoint,
    u: BoundedRankTangent,
    *,
    nuclear_lambda: Tensor | float = 0.0,
    nuclear_mode: str = "subgradient",
    qr_method: str = "auto",
) -> BoundedRankPoint:
    """:func:`qfactor_retraction` on a :class:`BoundedRankPoint` and :class:`BoundedRankTangent`."""
    K, V = qfactor_retraction(
        x.K,
        x.V,
        u.K,
        u.Vp,
        nuclear_lambda=nuclear_lambda,
        nuclear_mode=nuclear_mode,
        qr_method=qr_method,
    )
    return BoundedRankPoint(K, V)


def bounded_rank_transport(
    x: BoundedRankPoint, y: BoundedRankPoint, v: BoundedRankTangent, alpha: float = 0.5
) -> BoundedRankTangent:
    """:func:`projection_transport` of ``v ∈ T_x`` to ``T_y`` (metric weight ``alpha``)."""
    return BoundedRankTangent(*projection_transport(x.K, x.V, y.K, y.V, v.K, v.Vp, alpha))


def canonical_bounded_rank(x: BoundedRankPoint) -> BoundedRankPoint:
    """The representative ``(K Ψ, V Ψ)`` of ``(K, V)`` with ``K Ψ = Ū diag(S̄)`` (LoRAM Alg. 7
    lines 5–6: ``U⁺ S⁺ = Ū S̄``, ``V⁺ = Q H``), columns by decreasing singular value.

    ``Ψ`` are the right singular vectors of ``K`` (from the r×r factor of a QR of ``K``, SVD in
    float64); ``X = K Vᵀ`` is unchanged. The coordinate-wise second moment of LoRAM-BR is taken in
    this basis. Shapes ``(..., m, r)``, ``(..., n, r)``.
    """
    _, rk = thin_qr(x.K)
    _, _, psi_h = svd_small(rk.to(torch.float64))
    psi = transpose(psi_h).to(x.K.dtype)
    return BoundedRankPoint(x.K @ psi, x.V @ psi)


def nuclear_subgradient(K: Tensor) -> Tensor:
    """``U₊ = K diag(S)⁺`` for canonical ``K = U diag(S)``: ``U₊ Vᵀ`` is the minimal-norm
    subgradient of ``‖X‖_*`` (columns with ``S_i = 0`` are 0).

    Where ``rank X = r`` it is the paper's ``U`` (Alg. 7 line 4) and the manifold's
    :meth:`~geolora.manifolds.bounded_rank.BoundedRank.nuclear_subgradient`; at a rank-deficient
    ``X`` (e.g. the ``K = 0`` start) it does not push ``X`` along arbitrary directions.
    """
    s = K.norm(dim=-2, keepdim=True)
    nz = s > 0
    return torch.where(nz, K / torch.where(nz, s, torch.ones_like(s)), 0.0)


def metric_inverse_diag(s64: Tensor, alpha: float, like: Tensor) -> Tensor:
    """``1 / (s² + 2α)``: the diagonal of ``(KᵀK + 2αI)⁻¹`` for a canonical ``K = U diag(s)``
    (``s: (..., r)`` float64), in ``like``'s dtype.

    ``FloatingPointError`` where :func:`~geolora.retractions.bounded_rank.metric_gram_inverse`'s
    Cholesky factorization fails for such a ``K``: ``s² + 2α`` not finite (a diverged ``K``).
    """
    den = s64 * s64 + 2.0 * alpha
    if not bool(torch.isfinite(den).all()):
        raise FloatingPointError(
            "BoundedRank: the metric Gram matrix KᵀK + 2αI is not positive definite, so K has "
            f"diverged (max |K| = {float(like.abs().amax()):.3g}; non-finite, or too large for "
            f"2α = {2 * alpha:g} to survive rounding). Lower the learning rate (LoRAM-BR: "
            "coordinate_wise=False is the stable variant)."
        )
    return (1.0 / den).to(like.dtype)


def canonical_qfactor_retraction(
    x: BoundedRankPoint,
    s: Tensor,
    d: BoundedRankTangent,
    c: float,
    lam: float,
    nuclear_mode: str = "subgradient",
    qr: Callable[[Tensor, str], tuple[Tensor, Tensor]] | None = None,
    sums: Callable | None = None,
) -> tuple[BoundedRankPoint, Tensor, Tensor]:
    """Q-factor retraction with the nuclear-norm term (LoRAM Alg. 7) along ``c·d``, then the
    canonical representative (:func:`canonical_bounded_rank`), for stacked ``(L, ·, ·)`` operands.

    ``V⁺ = qf(V + c V̇p)``; with ``Q = qf(V + c V̇p)`` (signs folded into the small matrices) and
    ``U₊ = K diag(s)⁺`` (:func:`nuclear_subgradient`, ``s`` the column norms of the canonical
    ``K``): ``K⁺ = (K + c K̇ − λU₊)(VᵀV⁺) + c K (V̇pᵀV⁺)
    = K (VᵀV⁺ + c V̇pᵀV⁺ − λ diag(s)⁺ VᵀV⁺) + K̇ (c VᵀV⁺)`` (``"subgradient"``, λ = 0 without
    the term; ``"prox"`` soft-thresholds the singular values of ``K⁺`` instead). ``VᵀQ =
    R_Qᵀ − c V̇pᵀQ`` from ``V + cV̇p = Q R_Q``: one ``n × r × r`` product for both. Then
    ``K⁺ = Ū S̄ Hᵀ`` (QR of ``K⁺``, SVD of its ``R`` in float64) gives ``(K⁺H, V⁺H)``.
    Returns ``((K⁺H, V⁺H), σ, VᵀV⁺H)`` with ``σ`` (float64) the singular values of ``K⁺``.

    Row-sharded factors: ``qr(F, side)`` gives the float64 QR of a factor's local rows through
    the shards' reducer and ``sums(M=[...], N=[...])`` reduces ``V̇pᵀq`` (``"prox"`` is not
    available there: it needs the SVD of the whole ``K⁺``).
    """
    k, v = x
    dk, dvp = d
    if qr is None:
        q, rq, dq = _qr_signed(torch.add(v, dvp, alpha=c))  # V⁺ = q diag(dq)
    else:
        if lam and nuclear_mode != "subgradient":
            raise NotImplementedError(
                "nuclear_mode='prox' does not run on row-sharded factors (it soft-thresholds "
                "the singular values of the whole K⁺); use nuclear_mode='subgradient' or "
                "sharded='gather'"
            )
        q64, rq64 = qr(torch.add(v, dvp, alpha=c), "N")
        q, rq = q64.to(v.dtype), rq64.to(v.dtype)
        dq = torch.ones(rq.shape[:-1], dtype=rq.dtype, device=rq.device)
    e = transpose(dvp) @ q  # V̇pᵀ q
    if sums is not None:
        _, (e,) = sums(N=[e])
    vq = transpose(rq) * dq.unsqueeze(-2) - c * e  # Vᵀ q = R₀ᵀ − c V̇pᵀ q  (R₀ = diag(dq) R)
    cq = vq * dq.unsqueeze(-2)  # VᵀV⁺
    a1 = cq + (c * e) * dq.unsqueeze(-2)  # VᵀV⁺ + c V̇pᵀV⁺
    if lam and nuclear_mode == "subgradient":
        inv_s = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
        a1 = a1 - lam * inv_s.unsqueeze(-1) * cq
    k_new = addmm_t(mm_t(k, a1), dk, cq, alpha=c)
    if lam and nuclear_mode != "subgradient":
        k_new = singular_value_threshold(k_new, lam)
    rk = _qr_r(k_new) if qr is None else qr(k_new, "M")[1]
    _, sig, psi_h = svd_small(rk.to(torch.float64))
    psi64 = transpose(psi_h)
    psi = psi64.to(k.dtype)
    k1 = mm_t(k_new, psi)
    v1 = mm_t(q, (dq.unsqueeze(-1) * psi64).to(v.dtype))
    return BoundedRankPoint(k1, v1), sig, cq @ psi


def canonical_transport(
    x: BoundedRankPoint,
    y: BoundedRankPoint,
    sig: Tensor,
    a: Tensor,
    t: BoundedRankTangent,
    alpha: float,
    sums: Callable | None = None,
) -> BoundedRankTangent:
    """Projection transport (LoRAM Alg. 8,
    :func:`~geolora.retractions.bounded_rank.projection_transport`) of ``t = (K̇, V̇p)`` at ``x``
    to the canonical ``y = (K⁺, V⁺)`` with singular values ``sig`` (float64), given
    ``A = VᵀV⁺``; stacked ``(L, ·, ·)`` operands.

    With ``B = V̇pᵀV⁺``: ``K̇⁺ = K̇A + KB`` and ``Y = ẊᵀK⁺ + 2α(V̇pVᵀ + VV̇pᵀ)V⁺ = V T₁ + V̇p T₂``
    (``T₁ = K̇ᵀK⁺ + 2αB``, ``T₂ = KᵀK⁺ + 2αA``), ``V⁺ᵀY = AᵀT₁ + BᵀT₂``, so
    ``V̇p⁺ = (V T₁ + V̇p T₂ − V⁺(AᵀT₁ + BᵀT₂)) diag(1/(σ² + 2α))``: three ``n × r × r``
    products, the metric inverse (diagonal at the canonical ``K⁺``) folded into the ``r × r``
    factors. ``sums``: the reducer of ``V̇pᵀV⁺``, ``K̇ᵀK⁺``, ``KᵀK⁺`` for row-sharded factors.
    """
    k, v = x
    kd, vp = t
    b, kdk, kk = transpose(vp) @ y.V, transpose(kd) @ y.K, transpose(k) @ y.K
    if sums is not None:
        (kdk, kk), (b,) = sums(M=[kdk, kk], N=[b])
    zv = addmm_t(mm_t(kd, a), k, b)
    t1 = torch.add(kdk, b, alpha=2.0 * alpha)
    t2 = torch.add(kk, a, alpha=2.0 * alpha)
    t3 = torch.baddbmm(transpose(b) @ t2, transpose(a), t1)
    g1 = metric_inverse_diag(sig, alpha, y.K).unsqueeze(-2)
    vp1 = addmm_t(addmm_t(mm_t(v, t1 * g1), vp, t2 * g1), y.V, t3 * g1, alpha=-1.0)
    return BoundedRankTangent(zv, vp1)
