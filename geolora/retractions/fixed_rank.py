"""Projection, retraction and vector transport of the embedded fixed-rank manifold.

Points ``X = U diag(S) Vᵀ`` are :class:`~geolora.manifolds.types.FixedRankPoint` ``(U, S, V)``
with ``U: (..., m, r)``, ``S: (..., r)``, ``V: (..., n, r)``; tangent vectors are
:class:`~geolora.manifolds.types.FixedRankTangent` ``(M, Up, Vp)`` with ``M: (..., r, r)``,
``Up: (..., m, r)``, ``Vp: (..., n, r)``, representing ``Ẋ = U M Vᵀ + Up Vᵀ + U Vpᵀ``,
``UᵀUp = 0``, ``VᵀVp = 0`` (Vandereycken 2013, Prop. 2.1; Jiang, Wang & Stich, "LoRAM: Low-Rank
Adaptation of Large Language Models on Manifold", ICLR 2025 Workshop on Sparsity in LLMs,
OpenReview 6cLPObfitT, Algorithms 2–4, "LoRAM" below). No function here forms an ``m×n``
matrix: everything costs O((m + n) r²) plus ``2r×2r`` work done in float64. The manifold class
:class:`geolora.manifolds.fixed_rank.FixedRank` validates inputs and calls these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from geolora.linalg import addmm_t, cat_columns, mm_t, qr_pos, svd_small, transpose
from geolora.manifolds.types import FixedRankPoint, FixedRankTangent

__all__ = [
    "fixed_rank_project",
    "retract_with_overlaps",
    "transport_with_overlaps",
    "fixed_rank_tangent_factors",
    "fixed_rank_retraction",
    "fixed_rank_transport",
    "thin_qr",
]


def fixed_rank_project(x: FixedRankPoint, zv: Tensor, ztu: Tensor) -> FixedRankTangent:
    """Tangent projection ``P_T(Z) = P_U Z + Z P_V − P_U Z P_V`` from ``Z V`` and ``Zᵀ U``.

    ``M = Uᵀ(ZV)``, ``Up = ZV − U M``, ``Vp = ZᵀU − V Mᵀ`` (LoRAM Alg. 2 line 6;
    Vandereycken 2013 eq. 2.5). ``zv: (..., m, r)``, ``ztu: (..., n, r)``. With LoRAM's trick
    ``W = A Vᵀ + U Bᵀ`` (``A = U diag(S)``, ``B = 0``), autograd returns exactly
    ``A.grad = ∇f V`` and ``B.grad = ∇fᵀ U``.
    """
    u, _, v = x
    m = transpose(u) @ zv
    return FixedRankTangent(m, zv - u @ m, ztu - v @ transpose(m))


def fixed_rank_tangent_factors(x: FixedRankPoint, t: FixedRankTangent) -> tuple[Tensor, Tensor]:
    """Factors ``(A, B)`` of width ``2r`` with ``Ẋ = A Bᵀ``: ``A = [U M + Up, U]``, ``B = [V, Vp]``.

    Shapes ``(..., m, 2r)`` and ``(..., n, 2r)`` (pymanopt's ``FixedRankEmbedded.embedding``).
    """
    u, _, v = x
    m, up, vp = t
    return torch.cat([u @ m + up, u], dim=-1), torch.cat([v, vp], dim=-1)


def thin_qr(a: Tensor) -> tuple[Tensor, Tensor]:
    """Sign-fixed thin QR ``(Q, R)`` of ``a: (..., p, k)``, also for wide or rank-deficient ``a``.

    Tall ``a`` uses :func:`geolora.linalg.qr_pos` ``"auto"`` (CholeskyQR2 on accelerators, which
    falls back to Householder where Cholesky fails, e.g. zero columns); a wide ``a`` (``p < k``)
    goes to Householder directly and returns ``Q: (..., p, p)``, ``R: (..., p, k)``. ``Q`` always
    has orthonormal columns.
    """
    method = "auto" if a.shape[-2] >= a.shape[-1] else "householder"
    return qr_pos(a, method)


def fixed_rank_retraction(x: FixedRankPoint, t: FixedRankTangent) -> FixedRankPoint:
    """Metric-projection retraction ``R_X(Ẋ) = rank-r truncated SVD of X + Ẋ`` (LoRAM Alg. 3).

    ``X + Ẋ = [U Up] C [V Vp]ᵀ`` with the core ``C = [[diag(S) + M, I], [I, 0]]`` (2r×2r).
    With thin QRs ``Q_U R_U = [U Up]`` and ``Q_V R_V = [V Vp]`` and the SVD
    ``R_U C R_Vᵀ = Ũ S̃ Ṽᵀ``: ``U⁺ = Q_U Ũ[:, :r]``, ``S⁺ = S̃[:r]``, ``V⁺ = Q_V Ṽ[:, :r]``.
    The joint QR of ``[U Up]`` keeps ``U⁺`` orthonormal even when ``Up`` is rank deficient
    (e.g. zero), and the identity ``X + Ẋ = [U Up] C [V Vp]ᵀ`` holds even if ``Up`` is not
    exactly orthogonal to ``U``. Being the metric projection it is second order
    (Absil & Malick 2012): ``R_X(tẊ) = X + tẊ + t² Up diag(S)⁻¹ Vpᵀ + O(t³)``.

    ``S = 0`` is allowed (LoRAM Alg. 1 starts there): the formula only needs ``U``, ``V``
    orthonormal. If ``X + Ẋ`` has rank < r the trailing ``S⁺`` are 0. Cost O((m + n) r²);
    the ``2r×2r`` SVD runs in float64. ``S⁺`` is sorted in decreasing order.
    """
    u, s, v = x
    m, up, vp = t
    r = s.shape[-1]
    qu, ru = thin_qr(torch.cat([u, up], dim=-1))
    qv, rv = thin_qr(torch.cat([v, vp], dim=-1))
    wd = torch.float64
    eye = torch.eye(r, dtype=wd, device=s.device).expand(m.shape)
    top = torch.cat([torch.diag_embed(s.to(wd)) + m.to(wd), eye], dim=-1)
    bottom = torch.cat([eye, torch.zeros_like(eye)], dim=-1)
    core = ru.to(wd) @ torch.cat([top, bottom], dim=-2) @ transpose(rv.to(wd))
    a, sig, bh = svd_small(core, full_matrices=False)
    u_new = qu @ a[..., :r].to(u.dtype)
    v_new = qv @ transpose(bh[..., :r, :]).to(v.dtype)
    return FixedRankPoint(u_new, sig[..., :r].to(s.dtype), v_new)


def fixed_rank_transport(
    x: FixedRankPoint, y: FixedRankPoint, t: FixedRankTangent
) -> FixedRankTangent:
    """Vector transport by projection ``T_{X→Y}(Ẋ) = P_{T_Y}(Ẋ)`` (LoRAM Alg. 4).

    ``Ẋ = A Bᵀ`` (:func:`fixed_rank_tangent_factors`), so ``Ẋ V_Y = A (Bᵀ V_Y)`` and
    ``Ẋᵀ U_Y = B (Aᵀ U_Y)`` feed :func:`fixed_rank_project` at ``Y``: O((m + n) r²), no ``m×n``
    matrix. ``x``, ``y`` points, ``t`` tangent at ``x``; returns a tangent vector at ``y``.
    """
    a, b = fixed_rank_tangent_factors(x, t)
    return fixed_rank_project(y, a @ (transpose(b) @ y.V), b @ (transpose(a) @ y.U))


#: Widths above which the Householder ``Q`` of a CPU QR is applied implicitly
#: (``geqrf`` + ``ormqr``) instead of formed (``orgqr``): LAPACK's blocked ``orgqr`` (more than
#: 32 columns) is 2–5x slower than applying the reflectors to the ``r`` columns needed
#: (measured, MKL, ``(24, 384, 64)``: 19.9 vs 4.0 ms with ``OMP_WAIT_POLICY=PASSIVE``).
_IMPLICIT_Q_MIN_COLS = 33


class _ImplicitQ(NamedTuple):
    """Householder reflectors and scalars of ``torch.geqrf`` (``Q`` never formed)."""

    h: Tensor
    tau: Tensor


def _qr_signed(a: Tensor, implicit: bool = False) -> tuple[Tensor | _ImplicitQ, Tensor, Tensor]:
    """The sign-fixed thin QR of :func:`thin_qr` as ``(Q₀, R, d)``: ``Q = Q₀ diag(d)`` and
    ``R = diag(d) R₀`` (``diag R ≥ 0``), ``d: (..., k)`` of ±1.

    The sign flips of ``Q`` are exact, so callers fold ``d`` into the small matrix that ``Q`` is
    multiplied with instead of making a pass over the tall ``Q₀``. Same method as
    :func:`thin_qr`: Householder on CPU and for wide ``a``, else its own route (``d = 1``).
    ``implicit``: a tall CPU ``a`` with at least ``_IMPLICIT_Q_MIN_COLS`` columns returns ``Q₀``
    as :class:`_ImplicitQ` (use :func:`_q_times`).
    """
    p, k = a.shape[-2:]
    if a.device.type == "cpu" or p < k:
        if implicit and p >= k >= _IMPLICIT_Q_MIN_COLS and a.device.type == "cpu":
            h, tau = torch.geqrf(a)
            q, r = _ImplicitQ(h, tau), torch.triu(h[..., :k, :])
        else:
            q, r = torch.linalg.qr(a)
        dg = torch.diagonal(r, dim1=-2, dim2=-1)
        d = torch.where(dg < 0, -1.0, 1.0).to(dg.dtype)
        return q, r * d.unsqueeze(-1), d
    q, r = thin_qr(a)
    return q, r, torch.ones(r.shape[:-1], dtype=r.dtype, device=r.device)


def _q_times(q: Tensor | _ImplicitQ, c: Tensor) -> Tensor:
    """``Q₀ c`` for ``Q₀`` from :func:`_qr_signed` (``(..., p, k)``) and ``c: (..., k, j)``."""
    if isinstance(q, _ImplicitQ):
        p, k = q.h.shape[-2], c.shape[-2]
        return torch.ormqr(q.h, q.tau, torch.nn.functional.pad(c, (0, 0, 0, p - k)))
    return mm_t(q, c)


def _qr_r(a: Tensor) -> Tensor:
    """``R`` of the sign-fixed thin QR of a tall ``a: (..., p, k)`` (:func:`thin_qr`), without
    forming ``Q`` where the method allows (Householder on CPU)."""
    if a.device.type != "cpu":
        return thin_qr(a)[1]
    r = torch.linalg.qr(a, mode="r")[1]
    dg = torch.diagonal(r, dim1=-2, dim2=-1)
    return r * torch.where(dg < 0, -1.0, 1.0).to(dg.dtype).unsqueeze(-1)


def retract_with_overlaps(
    x: FixedRankPoint, m: Tensor, up: Tensor, vp: Tensor, c: float, qr: Callable | None = None
) -> tuple[FixedRankPoint, Tensor, Tensor]:
    """The truncated-SVD retraction (LoRAM Alg. 3) along
    ``Ẋ = c (U M Vᵀ + Up Vᵀ + U Vpᵀ)`` for stacked ``(L, ·, ·)`` operands, with few passes
    over the tall factors (the implementation behind :func:`fixed_rank_retraction`).

    ``X + Ẋ = [U Up] C [V Vp]ᵀ``, ``C = [[diag(S) + cM, cI], [cI, 0]]`` (the scalar ``c`` goes
    into the core instead of a pass over ``Up``, ``Vp``); with the sign-fixed QRs
    ``[U Up] = Q_U R_U``, ``[V Vp] = Q_V R_V`` the core ``R_U C R_Vᵀ`` is formed blockwise as
    ``(R_U1 (diag(S) + cM) + c R_U2) R_V1ᵀ + c R_U1 R_V2ᵀ`` (float64), and its SVD ``Ũ S̃ Ṽᵀ``
    gives ``U⁺ = Q_U Ũ[:, :r]``, ``S⁺ = S̃[:r]``, ``V⁺ = Q_V Ṽ[:, :r]`` (the QR signs folded
    into ``Ũ``, ``Ṽ``). Cost: two QRs of ``(m or n) × 2r``, two ``(m or n) × 2r × r`` products.
    Also returns ``C_U = UᵀU⁺ = R_U1ᵀŨ``, ``C_V = VᵀV⁺ = R_V1ᵀṼ`` (float64, from ``U = Q_U R_U1``:
    no product of the tall factors).

    ``qr``: for factors whose rows are sharded, a function giving ``[(Q_U, R_U), (Q_V, R_V)]``
    (float64, ``Q R`` the block) for the blocks ``[[U Up], [V Vp]]`` through the shards'
    reducer (:func:`geolora.optim.sharding.gram_qr_blocks`); default the Householder QRs here.
    """
    u, s, v = x
    r = s.shape[-1]
    if qr is None:
        qu, ru, du = _qr_signed(cat_columns(u, up), implicit=True)
        qv, rv, dv = _qr_signed(cat_columns(v, vp), implicit=True)
    else:
        (qu, ru), (qv, rv) = qr([cat_columns(u, up), cat_columns(v, vp)])
        du = dv = None
    wd = torch.float64
    ru, rv = ru.to(wd), rv.to(wd)
    top = torch.diag_embed(s.to(wd)) + c * m.to(wd)
    ru1, rv1 = ru[..., :r], rv[..., :r]
    core = torch.baddbmm(
        ru1 @ transpose(rv[..., r:]),
        torch.baddbmm(ru[..., r:], ru1, top, beta=c),
        transpose(rv1),
        beta=c,
    )
    a, sig, bh = svd_small(core, full_matrices=False)
    a, b = a[..., :r], transpose(bh[..., :r, :])
    if du is None or dv is None:  # explicit Q with a positive diagonal of R (float64)
        u_new, v_new = (qu @ a).to(u.dtype), (qv @ b).to(v.dtype)
    else:
        u_new = _q_times(qu, (du.unsqueeze(-1) * a).to(u.dtype))
        v_new = _q_times(qv, (dv.unsqueeze(-1) * b).to(v.dtype))
    # UᵀU⁺ = R_U1ᵀ Ũ and VᵀV⁺ = R_V1ᵀ Ṽ (U = Q_U R_U1, Q_UᵀQ_U = I): r × r, float64.
    cu = transpose(ru1) @ a
    cv = transpose(rv1) @ b
    return FixedRankPoint(u_new, sig[..., :r].to(s.dtype), v_new), cu, cv


def transport_with_overlaps(
    x: FixedRankPoint,
    y: FixedRankPoint,
    cu: Tensor,
    cv: Tensor,
    t: FixedRankTangent,
    sums: Callable | None = None,
) -> FixedRankTangent:
    """Projection transport ``P_{T_Y}(Ẋ)`` (LoRAM Alg. 4) of
    ``t = (M, Up, Vp)`` at ``x``, given ``C_U = UᵀU_Y``, ``C_V = VᵀV_Y`` (stacked
    ``(L, ·, ·)``; the implementation behind :func:`fixed_rank_transport`).

    With ``D_U = UpᵀU_Y``, ``D_V = VpᵀV_Y``: ``ẊV_Y = U E + Up C_V`` (``E = M C_V + D_V``),
    ``ẊᵀU_Y = V F + Vp C_U`` (``F = Mᵀ C_U + D_U``), ``M_Y = U_YᵀẊV_Y = C_Uᵀ E + D_Uᵀ C_V``,
    ``Up_Y = ẊV_Y − U_Y M_Y``, ``Vp_Y = ẊᵀU_Y − V_Y M_Yᵀ``: the same vector as
    :func:`~geolora.retractions.fixed_rank.fixed_rank_transport` with ``M_Y`` from ``r × r``
    products (no orthogonality of ``Up``, ``Vp`` to ``U``, ``V`` assumed). ``sums``: for
    row-sharded factors, the reducer ``sums(M=[D_U], N=[D_V])`` of the two overlaps.
    """
    mt, upt, vpt = t
    du = transpose(upt) @ y.U
    dv = transpose(vpt) @ y.V
    if sums is not None:
        (du,), (dv,) = sums(M=[du], N=[dv])
    e = torch.baddbmm(dv, mt, cv)
    f = torch.baddbmm(du, transpose(mt), cu)
    m_y = torch.baddbmm(transpose(du) @ cv, transpose(cu), e)
    up_y = addmm_t(addmm_t(mm_t(x.U, e), upt, cv), y.U, m_y, alpha=-1.0)
    vp_y = addmm_t(addmm_t(mm_t(x.V, f), vpt, cu), y.V, transpose(m_y), alpha=-1.0)
    return FixedRankTangent(m_y, up_y, vp_y)
