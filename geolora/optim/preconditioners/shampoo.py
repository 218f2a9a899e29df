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
from geolora.manifolds.frame import lowrank_tangent, tangent_to_factors
from geolora.manifolds.types import FixedRankTangent
from geolora.optim.preconditioners.base import LowRank
from geolora.optim.sharding import LOCAL, RowSum
from geolora.optim.validation import check_range

__all__ = [
    "ShampooPreconditioner",
    "fd_directions",
    "fd_update",
    "inv_root_apply",
    "inv_root_coefficients",
    "psd_factor",
]


def psd_factor(C: Tensor) -> Tensor:
    """``E`` with ``E Eᵀ = C`` for a symmetric PSD ``C: (..., k, k)`` (eigh in float64; negative
    rounding eigenvalues clipped). Returned in ``C``'s dtype."""
    lam, Q = eigh_small(sym(C.to(torch.float64)))
    return (Q * lam.clamp_min(0).sqrt().unsqueeze(-2)).to(C.dtype)


def fd_directions(G: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The Frequent-Directions shrink of a sketch ``Zc: (..., d, k + p)`` from its Gram
    ``G = ZcᵀZc`` (float64): ``(W̃, δ)`` with ``Zc W̃`` the new ``(..., d, k)`` sketch —
    ``G = W diag(λ) Wᵀ`` (λ descending), ``W̃ = W_{:k} diag(√((λ_j − δ)⁺ / λ_j))``,
    ``δ = λ_{k+1}`` (0 where ``λ_j = 0``)."""
    lam, W = eigh_small(sym(G))
    lam, W = lam.flip(-1).clamp_min(0), W.flip(-1)
    delta = lam[..., k]
    keep = lam[..., :k]
    tiny = torch.finfo(keep.dtype).tiny
    ratio = (keep - delta.unsqueeze(-1)).clamp_min(0) / keep.clamp_min(tiny)
    shrink = torch.where(keep > 0, ratio.sqrt(), 0.0)
    return W[..., :k] * shrink.unsqueeze(-2), delta


def fd_update(Z: Tensor, rho: Tensor, Y: Tensor, beta: float) -> tuple[Tensor, Tensor]:
    """One Frequent-Directions step for ``L ← β L + Y Yᵀ`` with ``L ≈ Z Zᵀ + ρ I``.

    ``Z: (..., d, k)``, ``rho: (...)``, ``Y: (..., d, p)`` → new ``(Z, ρ)`` of the same shapes:
    ``[√β Z, Y] W = Q diag(√λ)`` (eigh of the Gram matrix, λ descending); keep the first k
    columns shrunk to norms ``√(λ_j − λ_{k+1})`` and ``ρ ← β ρ + λ_{k+1}``
    (:func:`fd_directions`).
    """
    k = Z.shape[-1]
    Zc = torch.cat([math.sqrt(beta) * Z, Y], dim=-1)
    Wt, delta = fd_directions(transpose(Zc).to(torch.float64) @ Zc.to(torch.float64), k)
    Z_new = Zc @ Wt.to(Zc.dtype)
    return Z_new, beta * rho + delta.to(rho.dtype)


def inv_root_coefficients(lam: Tensor, damping: Tensor, p: int = 4) -> tuple[Tensor, Tensor]:
    """``(c₀, coef)`` of ``(Z Zᵀ + damping · I)^{-1/p} = c₀ I + Z diag(coef) Zᵀ`` for ``Z`` of
    orthogonal columns with squared norms ``lam: (..., k)``: ``c₀ = damping^{-1/p}``,
    ``coef_j = ((λ_j + damping)^{-1/p} − c₀) / λ_j`` (0 where ``λ_j = 0``); ``c₀: (..., 1)``."""
    d = damping.unsqueeze(-1)
    c0 = d.pow(-1.0 / p)
    tiny = torch.finfo(lam.dtype).tiny
    coef = torch.where(lam > 0, ((lam + d).pow(-1.0 / p) - c0) / lam.clamp_min(tiny), 0.0)
    return c0, coef


def inv_root_apply(Z: Tensor, damping: Tensor, A: Tensor, p: int = 4) -> Tensor:
    """``(Z Zᵀ + damping · I)^{-1/p} A`` for ``Z: (..., d, k)`` with orthogonal columns,
    ``damping: (...)`` > 0, ``A: (..., d, c)``: ``c₀ A + Z diag((f(λ) − c₀)/λ) Zᵀ A`` with
    ``λ_j = ‖z_j‖²``, ``f(λ) = (λ + damping)^{-1/p}``, ``c₀ = f(0)``. ``O(d k c)``."""
    c0, coef = inv_root_coefficients((Z * Z).sum(-2), damping, p)
    return c0.unsqueeze(-1) * A + Z @ (coef.unsqueeze(-1) * (transpose(Z) @ A))


class ShampooPreconditioner:
    """``Ẋ = (L + ε_L I)^{-1/4} ξ (R + ε_R I)^{-1/4}`` with Frequent-Directions sketches of
    ``L = Σ β^{t−τ} ξ ξᵀ`` and ``R = Σ β^{t−τ} ξᵀ ξ`` (see the module docstring).

    ``ε = ρ + eps · λ_max(Z Zᵀ)`` (escaped mass plus relative damping). Hyperparameters read
    from the group: ``beta2``, ``eps``. Returns a :class:`LowRank` of width 2r.

    Row-sharded factors (FSDP2, a finite ``sketch_rank`` only): the sketches ``Z_L`` (rows of
    ``M``) and ``Z_R`` (rows of ``N``) are stored with the factors' rows, ``ρ`` whole; every sum
    over rows comes from one reduction per step (:meth:`_sharded_update`), and the projection
    onto ``T_X`` is folded into it (a :class:`FixedRankTangent` is returned).
    """

    name = "shampoo"
    gauge_rules: dict[str, str] = {}  # statistics of ξ: matrix space
    functional_state = True
    #: which factor's rows each state tensor holds (``None``: scalars)
    state_sides: dict[str, str | None] = {
        "shampoo_L": "M",
        "shampoo_R": "N",
        "shampoo_L_rho": None,
        "shampoo_R_rho": None,
    }

    def __init__(
        self, sketch_rank: int | None = None, *, beta2: float = 1.0, eps: float = 1e-6
    ) -> None:
        if sketch_rank is not None and not (isinstance(sketch_rank, int) and sketch_rank >= 1):
            raise ValueError(f"sketch_rank must be None or an integer >= 1, got {sketch_rank!r}")
        self.sketch_rank = sketch_rank
        self.defaults = {"beta2": beta2, "eps": eps}

    @property
    def row_shards(self) -> bool:
        """Sketched statistics run on row shards (their sums over rows through the point's
        reducer); the exact ``m x m`` and ``n x n`` ones (``sketch_rank=None``) do not."""
        return self.sketch_rank is not None

    def validate(self, hp: dict[str, Any]) -> None:
        check_range("beta2", hp["beta2"], 0.0, 1.0)
        if hp["beta2"] == 0:
            raise ValueError("invalid beta2: 0 (expected a number in (0, 1])")

    def _k(self, d: int) -> int:
        return d if self.sketch_rank is None else min(self.sketch_rank, d)

    def init_state(
        self, m: int, n: int, r: int, like: Tensor, reduce: RowSum = LOCAL
    ) -> dict[str, Tensor]:
        """Zero sketches ``(m, k_L)``, ``(n, k_R)`` (``m``, ``n``: this rank's rows; ``k`` from
        the global row counts, ``reduce.rows``) and escaped masses."""
        return {
            "shampoo_L": like.new_zeros(m, self._k(reduce.rows("M", m))),
            "shampoo_L_rho": like.new_zeros(()),
            "shampoo_R": like.new_zeros(n, self._k(reduce.rows("N", n))),
            "shampoo_R_rho": like.new_zeros(()),
        }

    def update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: Any, hp: dict, step: int
    ) -> LowRank | FixedRankTangent:
        reduce: RowSum = getattr(ctx.point, "reduce", LOCAL)
        if reduce.sharded:
            return self._sharded_update(state, xi, ctx, hp, reduce)
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

    def _sharded_update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: Any, hp: dict, reduce: RowSum
    ) -> FixedRankTangent:
        """:meth:`update` on row shards, with one reduction (float64, both sides together).

        Per side (``L``: ``F = A``, frame ``U``, rows of ``M``; ``R``: ``F = B``, ``V``, rows of
        ``N``; ``ξ = A Bᵀ``), with ``Y = F E``, ``E Eᵀ`` the other side's ``FᵀF`` and the sketch
        ``Zc = [√β Z, Y]``, every sum over rows is a product of the reduced ``ZᵀZ``, ``ZᵀF``,
        ``FᵀF``, ``UᵀZ``, ``UᵀF`` with ``r x r`` / ``k x k`` matrices:
        ``ZcᵀZc = [[β ZᵀZ, √β ZᵀF E], [·, Eᵀ FᵀF E]]`` (FD's Gram, :func:`fd_directions` gives
        ``Z' = Zc W̃``), ``Z'ᵀF = W̃ᵀ [√β ZᵀF; Eᵀ FᵀF]``, ``‖z'_j‖² = (W̃ᵀ ZcᵀZc W̃)_jj`` (and
        ``λ_max``), so ``F' = c₀ F + Z' diag(coef) Z'ᵀF`` (:func:`inv_root_coefficients`) is
        row-local and ``UᵀF' = c₀ UᵀF + [√β UᵀZ, UᵀF E] W̃ diag(coef) Z'ᵀF`` gives the
        projection of ``F'_L F'_Rᵀ`` onto ``T_X`` without another round. Every rank runs the
        same eigen-decompositions on the same reduced matrices."""
        beta, eps = hp["beta2"], hp["eps"]
        wd = torch.float64
        rb = math.sqrt(beta)
        U, V = ctx.frame.U, ctx.frame.V
        A, B = tangent_to_factors(ctx.frame, xi)
        sides = (("L", A.to(wd), U.to(wd)), ("R", B.to(wd), V.to(wd)))
        pieces = []
        for side, F, Q in sides:  # Q: the frame's U (side L) or V (side R)
            Z = state[f"shampoo_{side}"].to(wd)
            Zt, Qt = transpose(Z), transpose(Q)
            pieces.append([Zt @ Z, Zt @ F, transpose(F) @ F, Qt @ Z, Qt @ F])
        red_M, red_N = reduce(M=pieces[0], N=pieces[1])
        ffs = (red_M[2], red_N[2])
        outs, frame_products = [], []
        for i, ((side, F, _), (zz, zf, ff, wz, wf)) in enumerate(zip(sides, (red_M, red_N))):
            Z = state[f"shampoo_{side}"]
            k = Z.shape[-1]
            E = psd_factor(ffs[1 - i])  # E Eᵀ = the other side's FᵀF
            cross = rb * (zf @ E)
            top = torch.cat([beta * zz, cross], -1)
            bottom = torch.cat([transpose(cross), transpose(E) @ ff @ E], -1)
            G = torch.cat([top, bottom], -2)  # ZcᵀZc
            Wt, delta = fd_directions(G, k)
            Z_new = torch.cat([rb * Z.to(wd), F @ E], -1) @ Wt
            rho = beta * state[f"shampoo_{side}_rho"] + delta.to(Z.dtype)
            state[f"shampoo_{side}"], state[f"shampoo_{side}_rho"] = Z_new.to(Z.dtype), rho
            lam = ((G @ Wt) * Wt).sum(-2)  # ‖z'_j‖²
            damping = rho.to(wd) + eps * lam.amax(-1)
            damping = torch.where(damping > 0, damping, torch.ones_like(damping))
            c0, coef = inv_root_coefficients(lam, damping)
            core = coef.unsqueeze(-1) * (transpose(Wt) @ torch.cat([rb * zf, transpose(E) @ ff], -2))
            outs.append(c0.unsqueeze(-1) * F + Z_new @ core)
            frame_products.append(
                c0.unsqueeze(-1) * wf + torch.cat([rb * wz, wf @ E], -1) @ (Wt @ core)
            )
        dt = A.dtype
        return lowrank_tangent(
            ctx.frame, outs[0].to(dt), outs[1].to(dt), frame_products[0].to(dt),
            transpose(frame_products[1]).to(dt),
        )
