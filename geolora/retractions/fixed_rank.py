"""Projection, retraction and vector transport of the embedded fixed-rank manifold.

Points ``X = U diag(S) Vᵀ`` are :class:`~geolora.manifolds.types.FixedRankPoint` ``(U, S, V)``
with ``U: (..., m, r)``, ``S: (..., r)``, ``V: (..., n, r)``; tangent vectors are
:class:`~geolora.manifolds.types.FixedRankTangent` ``(M, Up, Vp)`` with ``M: (..., r, r)``,
``Up: (..., m, r)``, ``Vp: (..., n, r)``, representing ``Ẋ = U M Vᵀ + Up Vᵀ + U Vpᵀ``,
``UᵀUp = 0``, ``VᵀVp = 0`` (Vandereycken 2013, Prop. 2.1). No function here forms an ``m×n``
matrix: everything costs O((m + n) r²) plus ``2r×2r`` work done in float64. The manifold class
:class:`geolora.manifolds.fixed_rank.FixedRank` validates inputs and calls these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geolora.linalg import qr_pos, svd_small, transpose
from geolora.manifolds.types import FixedRankPoint, FixedRankTangent

__all__ = [
    "fixed_rank_project",
    "fixed_rank_tangent_factors",
    "fixed_rank_retraction",
    "fixed_rank_transport",
    "thin_qr",
]


def fixed_rank_project(x: FixedRankPoint, zv: Tensor, ztu: Tensor) -> FixedRankTangent:
    """Tangent projection ``P_T(Z) = P_U Z + Z P_V − P_U Z P_V`` from ``Z V`` and ``Zᵀ U``.

    ``M = Uᵀ(ZV)``, ``Up = ZV − U M``, ``Vp = ZᵀU − V Mᵀ`` (loram.txt Alg. 2 line 6;
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
    """Metric-projection retraction ``R_X(Ẋ) = rank-r truncated SVD of X + Ẋ`` (loram.txt Alg. 3).

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
    """Vector transport by projection ``T_{X→Y}(Ẋ) = P_{T_Y}(Ẋ)`` (loram.txt Alg. 4).

    ``Ẋ = A Bᵀ`` (:func:`fixed_rank_tangent_factors`), so ``Ẋ V_Y = A (Bᵀ V_Y)`` and
    ``Ẋᵀ U_Y = B (Aᵀ U_Y)`` feed :func:`fixed_rank_project` at ``Y``: O((m + n) r²), no ``m×n``
    matrix. ``x``, ``y`` points, ``t`` tangent at ``x``; returns a tangent vector at ``y``.
    """
    a, b = fixed_rank_tangent_factors(x, t)
    return fixed_rank_project(y, a @ (transpose(b) @ y.V), b @ (transpose(a) @ y.U))
