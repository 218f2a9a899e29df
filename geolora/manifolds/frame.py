"""Orthonormal frames of a factored low-rank matrix and factored matrix tangent vectors.

For ``X = M Nᵀ`` of rank r, the thin QR factorizations ``M = U R_M``, ``N = V R_N`` give the *frame*
``(U, R_M, V, R_N)`` and the core ``W = R_M R_Nᵀ`` (``X = U W Vᵀ``). The matrix tangent space is
``T_X = {U S Vᵀ + Up Vᵀ + U Vpᵀ : Uᵀ Up = 0, Vᵀ Vp = 0}`` (``docs/design.md``, conventions) and a
tangent vector is stored as :class:`~geolora.manifolds.types.FixedRankTangent` ``(M=S, Up, Vp)``
relative to the frame. Nothing here forms an ``m x n`` matrix except :func:`tangent_to_dense`.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from geolora.linalg import addmm_t as addmm
from geolora.linalg import cat_columns, mm_t, qr_pos, transpose, tri_solve_right
from geolora.manifolds.types import FixedRankTangent


class Frame(NamedTuple):
    """``M = U R_M``, ``N = V R_N`` with ``U: (..., m, r)``, ``V: (..., n, r)`` orthonormal and
    ``R_M, R_N: (..., r, r)`` upper triangular with non-negative diagonals."""

    U: Tensor
    RM: Tensor
    V: Tensor
    RN: Tensor

    @property
    def W(self) -> Tensor:
        """Core ``W = R_M R_Nᵀ`` with ``X = U W Vᵀ``."""
        return self.RM @ transpose(self.RN)


def make_frame(M: Tensor, N: Tensor, qr_method: str = "auto") -> Frame:
    """Orthonormal frame of ``X = M Nᵀ``: ``M = U R_M``, ``N = V R_N`` (sign-fixed thin QR)."""
    U, RM = qr_pos(M, qr_method)
    V, RN = qr_pos(N, qr_method)
    return Frame(U, RM, V, RN)


def project_factor_grads(frame: Frame, grad_M: Tensor, grad_N: Tensor) -> FixedRankTangent:
    """``P_T(∇_X f)`` in factored form from the factor gradients (Zheng & Wu, "LoRA-S: An
    Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview
    Guo2XGgxZA, eq. 12, A.17 eq. 23).

    With ``∇_M = G N = G V R_N`` and ``∇_N = Gᵀ M = Gᵀ U R_M`` (``G = ∇_X f``, what autograd gives
    for ``X = M Nᵀ``): ``G V = ∇_M R_N⁻¹``, ``Gᵀ U = ∇_N R_M⁻¹``, ``S = Uᵀ G V``,
    ``Up = G V − U S``, ``Vp = Gᵀ U − V Sᵀ``. Cost O((m + n) r²); requires rank r.
    """
    GV = tri_solve_right(grad_M, frame.RN)
    GtU = tri_solve_right(grad_N, frame.RM)
    return project_products(frame, GV, GtU)


def project_products(frame: Frame, ZV: Tensor, ZtU: Tensor) -> FixedRankTangent:
    """``P_T(Z)`` from ``Z V: (..., m, r)`` and ``Zᵀ U: (..., n, r)`` (Vandereycken 2013):
    ``S = Uᵀ Z V``, ``Up = Z V − U S``, ``Vp = Zᵀ U − V Sᵀ``."""
    S = transpose(frame.U) @ ZV
    Up = addmm(ZV, frame.U, S, alpha=-1.0)
    Vp = addmm(ZtU, frame.V, transpose(S), alpha=-1.0)
    return FixedRankTangent(S, Up, Vp)


def project_dense(frame: Frame, Z: Tensor) -> FixedRankTangent:
    """``P_T(Z)`` for a dense ``Z: (..., m, n)``: ``P_M Z + Z P_N − P_M Z P_N`` in factored form."""
    return project_products(frame, mm_t(Z, frame.V), mm_t(transpose(Z), frame.U))


def project_lowrank(frame: Frame, A: Tensor, B: Tensor) -> FixedRankTangent:
    """``P_T(A Bᵀ)`` for ``A: (..., m, k)``, ``B: (..., n, k)`` in O((m + n) k r)."""
    return project_products(
        frame, mm_t(A, transpose(B) @ frame.V), mm_t(B, transpose(A) @ frame.U)
    )


def lowrank_tangent(frame: Frame, A: Tensor, B: Tensor, UtA: Tensor, BtV: Tensor) -> FixedRankTangent:
    """``P_T(A Bᵀ)`` from given ``UtA = Uᵀ A: (..., r, k)`` and ``BtV = Bᵀ V: (..., k, r)`` (e.g.
    reduced over row shards, ``A``, ``B``, ``U``, ``V`` the local rows): ``S = (UᵀA)(BᵀV)``,
    ``Up = A (BᵀV) − U S``, ``Vp = B (UᵀA)ᵀ − V Sᵀ``."""
    ZV, ZtU = mm_t(A, BtV), mm_t(B, transpose(UtA))
    S = UtA @ BtV
    return FixedRankTangent(
        S, addmm(ZV, frame.U, S, alpha=-1.0), addmm(ZtU, frame.V, transpose(S), alpha=-1.0)
    )


def tangent_to_dense(frame: Frame, t: FixedRankTangent) -> Tensor:
    """``U S Vᵀ + Up Vᵀ + U Vpᵀ`` as a dense ``(..., m, n)`` matrix, written once as
    ``A Bᵀ`` from :func:`tangent_to_factors` (dense preconditioners, tests)."""
    A, B = tangent_to_factors(frame, t)
    return A @ transpose(B)


def tangent_to_factors(frame: Frame, t: FixedRankTangent) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of width 2r with ``A Bᵀ = U S Vᵀ + Up Vᵀ + U Vpᵀ``: ``A = [U S + Up, U]``,
    ``B = [V, Vp]``."""
    return cat_columns(addmm(t.Up, frame.U, t.M), frame.U), cat_columns(frame.V, t.Vp)


def tangent_sqnorm(t: FixedRankTangent) -> Tensor:
    """``‖U S Vᵀ + Up Vᵀ + U Vpᵀ‖_F² = ‖S‖² + ‖Up‖² + ‖Vp‖²`` (orthogonal parts), batch shape."""
    return sum((a * a).sum(dim=(-2, -1)) for a in t)


def tangent_inner(u: FixedRankTangent, v: FixedRankTangent) -> Tensor:
    """Frobenius inner product of two factored tangent vectors at the same frame:
    ``tr(SᵀS') + tr(Upᵀ Up') + tr(Vpᵀ Vp')`` (the three parts are orthogonal)."""
    return sum((a * b).sum(dim=(-2, -1)) for a, b in zip(u, v))
