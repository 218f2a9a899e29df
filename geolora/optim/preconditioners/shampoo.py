"""Shampoo on the matrix tangent space with Frequent-Directions sketches (quotient geometries).

Shampoo (Gupta, Koren & Singer 2018, Alg. 1) preconditions a matrix gradient with Kronecker
factors ``L_t = β L_{t−1} + G Gᵀ`` (m x m), ``R_t = β R_{t−1} + Gᵀ G`` (n x n):
``Ẋ = L_t^{-1/4} G R_t^{-1/4}`` (the paper's "Lift Shampoo", with ``G = ξ = P_T(∇_X f)``).
The statistics are built from ``ξ`` only, so they live in matrix space and the optimizer is
exactly transformation invariant.

Tractability: ``L`` and ``R`` are kept as Frequent-Directions sketches (Liberty 2013; the
"Sketchy" Shampoo of Feinberg et al. 2023): ``L ≈ Z Zᵀ + ρ I`` with ``Z: (m, k)`` of orthogonal
columns and the escaped mass ``ρ``. Each step ``ξ ξᵀ = Y Yᵀ`` with ``Y = A E``, ``ξ = A Bᵀ``
(width 2r), ``E Eᵀ = Bᵀ B``; ``[√β Z, Y]`` is diagonalised through its ``(k+2r)²`` Gram
matrix (float64), the top ``k`` directions are kept after subtracting the ``(k+1)``-th
eigenvalue ``δ`` (FD shrink) and ``ρ ← β ρ + δ``. FD guarantees ``Z Zᵀ ⪯ L ⪯ Z Zᵀ + ρ I``, so
``(Z Zᵀ + (ρ + ε) I)^{-1/4}`` never over-amplifies a direction the sketch lost. With
``sketch_rank=None`` the sketch is exact (``k = m`` for L, ``k = n`` for R; ``δ`` is rounding):
dense Shampoo at ``O(m² + n²)`` memory and ``O(m³ + n³)`` work per step, guarded by
``max_dim``. Damping ``ε = eps · λ_max(Z Zᵀ)`` (relative, so the step is scale-free).

Memory per pair: ``(m + n) k + 2`` floats (``k = sketch_rank``), ``m² + n² + 2`` when exact.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import eigh_small, sym, transpose
from geolora.manifolds.frame import tangent_to_factors
from geolora.manifolds.types import FixedRankTangent
from geolora.optim.preconditioners.base import LowRank
from geolora.optim.validation import check_range

__all__ = ["ShampooPreconditioner", "fd_update", "inv_root_apply", "psd_factor"]


def psd_factor(C: Tensor) -> Tensor:
    """``E`` with ``E Eᵀ = C`` for a symmetric PSD ``C: (..., k, k)`` (eigh in float64; negative
    rounding eigenvalues clipped). Returned in ``C``'s dtype."""
    lam, Q = eigh_small(sym(C.to(torch.float64)))
    return (Q * lam.clamp_min(0).sqrt().unsqueeze(-2)).to(C.dtype)


def fd_update(Z: Tensor, rho: Tensor, Y: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """One Frequent-Directions step for ``L ← β L + Y Yᵀ`` with ``L ≈ Z Zᵀ + ρ I``.

    ``Z: (..., d, k)``, ``rho: (...)``, ``Y: (..., d, p)`` → new ``(Z, ρ)`` of the same shapes:
    ``[√β Z, Y] W = Q diag(√λ)`` (eigh of the Gram matrix, λ descending); keep the first k
    columns shrunk to norms ``√(λ_j − λ_{k+1})`` and ``ρ ← β ρ + λ_{k+1}``.
    """
    k = Z.shape[-1]
    Zc = torch.cat([math.sqrt(beta) * Z, Y], dim=-1)
    lam, W = eigh_small(sym(transpose(Zc).to(torch.float64) @ Zc.to(torch.float64)))
    lam, W = lam.flip(-1).clamp_min(0), W.flip(-1)
    delta = lam[..., k]
    keep = lam[..., :k]
    tiny = torch.finfo(keep.dtype).tiny
    ratio = (keep - delta.unsqueeze(-1)).clamp_min(0) / keep.clamp_min(tiny)
    shrink = torch.where(keep > 0, ratio.sqrt(), 0.0)
    Z_new = Zc @ (W[..., :k] * shrink.unsqueeze(-2)).to(Zc.dtype)
    return Z_new, beta * rho + delta.to(rho.dtype)


def inv_root_apply(Z: Tensor, damping: Tensor, A: Tensor, p: int = 4) -> Tensor:
    """``(Z Zᵀ + damping · I)^{-1/p} A`` for ``Z: (..., d, k)`` with orthogonal columns,
    ``damping: (...)`` > 0, ``A: (..., d, c)``: ``c₀ A + Z diag((f(λ) − c₀)/λ) Zᵀ A`` with
    ``λ_j = ‖z_j‖²``, ``f(λ) = (λ + damping)^{-1/p}``, ``c₀ = f(0)``. ``O(d k c)``."""
    lam = (Z * Z).sum(-2)
    d = damping.unsqueeze(-1)
    c0 = d.pow(-1.0 / p)
    tiny = torch.finfo(lam.dtype).tiny
    coef = torch.where(lam > 0, ((lam + d).pow(-1.0 / p) - c0) / lam.clamp_min(tiny), 0.0)
    return c0.unsqueeze(-1) * A + Z @ (coef.unsqueeze(-1) * (transpose(Z) @ A))


class ShampooPreconditioner:
    """``Ẋ = (L + ε_L I)^{-1/4} ξ (R + ε_R I)^{-1/4}`` with Frequent-Directions sketches of
    ``L = Σ β^{t−τ} ξ ξᵀ`` and ``R = Σ β^{t−τ} ξᵀ ξ`` (see the module docstring).

    ``ε = ρ + eps · λ_max(Z Zᵀ)`` (escaped mass plus relative damping). Hyperparameters read
    from the group: ``beta2``, ``eps``. Returns a :class:`LowRank` of width 2r.
    """

    name = "shampoo"
    gauge_rules: dict[str, str] = {}  # statistics of ξ: matrix space
    functional_state = True

    def __init__(
        self, sketch_rank: int | None = None, *, beta2: float = 1.0, eps: float = 1e-6
    ) -> None:
        if sketch_rank is not None and not (isinstance(sketch_rank, int) and sketch_rank >= 1):
            raise ValueError(f"sketch_rank must be None or an integer >= 1, got {sketch_rank!r}")
        self.sketch_rank = sketch_rank
        self.defaults = {"beta2": beta2, "eps": eps}

    def validate(self, hp: dict[str, Any]) -> None:
        check_range("beta2", hp["beta2"], 0.0, 1.0)
        if hp["beta2"] == 0:
            raise ValueError("invalid beta2: 0 (expected a number in (0, 1])")

    def _k(self, d: int) -> int:
        return d if self.sketch_rank is None else min(self.sketch_rank, d)

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {
            "shampoo_L": like.new_zeros(m, self._k(m)),
            "shampoo_L_rho": like.new_zeros(()),
            "shampoo_R": like.new_zeros(n, self._k(n)),
            "shampoo_R_rho": like.new_zeros(()),
        }

    def update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: Any, hp: dict, step: int
    ) -> LowRank:
        beta, eps = hp["beta2"], hp["eps"]
        A, B = tangent_to_factors(ctx.frame, xi)
        # ξ ξᵀ = A (BᵀB) Aᵀ and ξᵀ ξ = B (AᵀA) Bᵀ.
        YL = A @ psd_factor(transpose(B) @ B)
        YR = B @ psd_factor(transpose(A) @ A)
        out = []
        for side, Y, F in (("L", YL, A), ("R", YR, B)):
            Z, rho = fd_update(state[f"shampoo_{side}"], state[f"shampoo_{side}_rho"], Y, beta)
            state[f"shampoo_{side}"], state[f"shampoo_{side}_rho"] = Z, rho
            damping = rho + eps * (Z * Z).sum(-2).amax(-1)
            damping = torch.where(damping > 0, damping, torch.ones_like(damping))
            out.append(inv_root_apply(Z, damping, F))
        return LowRank(out[0], out[1])
