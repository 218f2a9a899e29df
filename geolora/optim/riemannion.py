"""Riemannion: Muon's orthogonalised momentum step on the manifold of rank-r matrices.

Bogachev, Aletov, Molozhavenko, Bobkov, Soboleva, Alanov & Rakhuba, "LoRA meets Riemannion: Muon
Optimizer for Parametrization-independent Low-Rank Adapters", ICLR 2026, arXiv:2507.12142
(v1 titled "RiemannLoRA: A Unified Riemannian Framework for Ambiguity-Free LoRA Optimization").
The authors' code was not available here, and the paper's algorithm boxes could not be read in
full: the update below is built from the paper's description (Muon generalised to the
fixed-rank manifold: orthogonalise the transported momentum in the ambient space, project it back
onto the tangent space, retract) and from geolora's fixed-rank geometry; see "What is and is not
verified" below.

The optimizer owns the point ``X = U diag(S) Vᵀ`` of :class:`~geolora.manifolds.fixed_rank.
FixedRank` (as LoRAM-FR: ``B = U diag(S)``, ``A = Vᵀ`` are written back after every step). One
step for a stack of pairs::

    ξ  = P_T(∇_X f) = U Mξ Vᵀ + Upξ Vᵀ + U Vpξᵀ         (Riemannian gradient, factored)
    m  = β T(m) + ξ                                      (heavy ball; T: projection transport)
    d  = m   (or ξ + β m with nesterov=True)
    D  = P_T(msign(d))                                   (msign(Z) = U_Z V_Zᵀ, the polar factor)
    X ← R_X((1 − ηλ) X − (η / s) D)                      (rank-r truncated SVD retraction)
    m ← T_{X→X⁺}(m)

``d`` is a tangent vector, so ``d = [U Up] C [V Vp]ᵀ`` with ``C = [[M, I], [I, 0]]``; with thin
QRs ``[U Up] = Q_L T_L``, ``[V Vp] = Q_R T_R`` its polar factor is ``Q_L msign(T_L C T_Rᵀ) Q_Rᵀ``,
so only a ``2r x 2r`` core is orthogonalised (:func:`tangent_msign`; ``orthogonalize="svd"``:
exact, the core's SVD in float64; ``"newton_schulz"``: Muon's quintic iteration on the core,
which equals Muon's iteration on the ``m x n`` matrix ``d`` in exact arithmetic). Singular values
of the core below ``√ε σ₁`` (ε of the compute dtype) count as zero: a numerically rank-deficient
momentum (e.g. ``r = m``, where ``Up = 0``) is not blown up to unit size. Then ``D`` is the
projection of that polar factor back onto ``T_X`` (from ``msign(d) V`` and ``msign(d)ᵀ U``).

The step is taken in the units of ``ΔW = s X`` (``s`` the pair's ``scaling``): ``ΔW`` moves by
``−lr · D`` (spectral norm ``≤ 2 lr``) whatever ``lora_alpha``, as Muon's step does on a weight
matrix. Decoupled weight decay shrinks ``X`` (``λ = weight_decay``). Retraction and transport are
geolora's fixed-rank ones (LoRAM-FR's batched forms of
:func:`~geolora.retractions.fixed_rank.fixed_rank_retraction` and
:func:`~geolora.retractions.fixed_rank.fixed_rank_transport`); everything depends on ``X`` only,
so the optimizer is transformation invariant (``(B R, R⁻¹ A)`` gives the same trajectory).

Gradient-informed initialisation (the paper's "locally optimal initialisation"):
:func:`riemannion_init` returns ``B = √c U_{:, :r}``, ``A = √c V_{:, r:2r}ᵀ`` from the SVD
``G = U Σ Vᵀ`` of the gradient of the base weight, the rank-r point whose tangent space holds the
largest part of ``G``: ``‖P_T(G)‖_F² = σ₁² + … + σ_{2r}²``, the maximum over all rank-r points
(``P_T(G)`` has rank ≤ 2r). ``⟨G, B A⟩ = 0``, so the loss does not change to first order.

What is and is not verified: the heavy-ball momentum of Riemannian gradients, transported by
projection, the orthogonalise-then-project step and the truncated-SVD retraction follow the
paper's description and independent re-implementations; its exact algorithm box (whether the
stored momentum is the orthogonalised direction, a momentum dampening, the learning-rate
scaling) and its hyperparameters could not be checked. The initialisation's choice of singular
vectors (``U`` from 1…r, ``V`` from r+1…2r) is derived above and matches an independent
implementation; whether the paper also subtracts ``s B A`` from the base weight is not verified
(:func:`riemannion_init` leaves that to the caller). Zero-initialised LoRA (``B = 0``) is not a
point of the manifold: the pair takes the base class's AdamW robust start until ``B A`` has
rank r (or use :func:`riemannion_init`).

Memory per pair: the point ``(m + n) r + r`` and the momentum ``(m + n) r + r²``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import svd_small, transpose
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.types import FactorPoint, FactorTangent, FixedRankPoint, FixedRankTangent
from geolora.optim.loram import (
    LoRAMFixedRank,
    ManifoldPairOptimizer,
    _fr_retraction,
    _fr_transport,
)
from geolora.optim.validation import check_range as _check_range
from geolora.retractions.fixed_rank import fixed_rank_project, thin_qr

__all__ = ["ORTHOGONALIZERS", "Riemannion", "msign", "riemannion_init", "tangent_msign"]

#: ``orthogonalize`` values: exact polar factor (SVD) or Muon's Newton–Schulz iteration.
ORTHOGONALIZERS = ("svd", "newton_schulz")
#: Muon's quintic Newton–Schulz coefficients (Jordan et al. 2024).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def msign(K: Tensor, method: str = "svd", *, rtol: float, ns_steps: int = 5) -> Tensor:
    """Polar factor ``U_K V_Kᵀ`` of ``K: (..., p, q)`` (float64 in, float64 out).

    ``"svd"``: exact, singular values ``≤ rtol · σ₁`` count as zero (their directions are
    dropped; ``K = 0`` gives 0). ``"newton_schulz"``: ``ns_steps`` steps of Muon's quintic
    iteration ``Y ← a Y + b (Y Yᵀ) Y + c (Y Yᵀ)² Y`` from ``Y = K / ‖K‖_F`` — an approximation
    whose singular values end in about ``[0.7, 1.2]`` (not 1), as Muon's.
    """
    if method == "svd":
        u, s, vh = svd_small(K, full_matrices=False)
        keep = (s > rtol * s[..., :1]).to(K.dtype)
        return (u * keep.unsqueeze(-2)) @ vh
    if method != "newton_schulz":
        raise ValueError(f"orthogonalize must be one of {ORTHOGONALIZERS}, got {method!r}")
    a, b, c = _NS_COEFFS
    norm = K.flatten(-2).norm(dim=-1)[..., None, None]
    Y = K / norm.clamp_min(torch.finfo(K.dtype).tiny)
    for _ in range(ns_steps):
        G = Y @ transpose(Y)
        Y = a * Y + (b * G + c * (G @ G)) @ Y
    return Y


def tangent_msign(
    pt: FixedRankPoint, t: FixedRankTangent, method: str = "svd", *, ns_steps: int = 5
) -> FixedRankTangent:
    """``P_T(msign(Ẋ))`` for the tangent vector ``t = (M, Up, Vp)`` at ``pt = (U, S, V)``.

    ``Ẋ = [U Up] C [V Vp]ᵀ``, ``C = [[M, I], [I, 0]]``; thin QRs ``[U Up] = Q_L T_L``,
    ``[V Vp] = Q_R T_R`` and ``O = msign(T_L C T_Rᵀ)`` (float64, ``2r x 2r``) give
    ``msign(Ẋ) = Q_L O Q_Rᵀ``; with ``Q_Lᵀ U = T_L[:, :r]``, ``Q_Rᵀ V = T_R[:, :r]`` the products
    ``msign(Ẋ) V = Q_L (O T_R[:, :r])`` and ``msign(Ẋ)ᵀ U = Q_R (Oᵀ T_L[:, :r])`` feed the
    tangent projection. Any QR sign convention gives the same result. Cost ``O((m + n) r²)``;
    shapes as :class:`~geolora.manifolds.types.FixedRankTangent`, stacked ``(..., ·, ·)``.
    """
    u, _, v = pt
    r = u.shape[-1]
    dt = u.dtype
    ql, tl = thin_qr(torch.cat([u, t.Up], dim=-1))
    qr_, tr = thin_qr(torch.cat([v, t.Vp], dim=-1))
    wd = torch.float64
    tl, tr = tl.to(wd), tr.to(wd)
    tl1, tl2 = tl[..., :r], tl[..., r:]
    tr1, tr2 = tr[..., :r], tr[..., r:]
    # T_L C T_Rᵀ = (T_L1 M + T_L2) T_R1ᵀ + T_L1 T_R2ᵀ
    core = (tl1 @ t.M.to(wd) + tl2) @ transpose(tr1) + tl1 @ transpose(tr2)
    O = msign(core, method, rtol=float(torch.finfo(dt).eps) ** 0.5, ns_steps=ns_steps)
    zv = ql @ (O @ tr1).to(dt)
    ztu = qr_ @ (transpose(O) @ tl1).to(dt)
    return fixed_rank_project(pt, zv, ztu)


def riemannion_init(grad: Tensor, rank: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """Gradient-informed LoRA factors ``(B, A)``: ``B = √c U[:, :r]``, ``A = √c V[:, r:2r]ᵀ``.

    ``grad: (..., m, n)``, the gradient of the loss with respect to the base weight (``G = U Σ
    Vᵀ``, float64 SVD); ``rank`` r with ``2r ≤ min(m, n)``; ``scale`` c > 0, ``‖B A‖₂ = c``.
    The tangent space at ``X₀ = B A`` holds the top-2r part of ``G``
    (``‖P_T(G)‖_F² = Σ_{i ≤ 2r} σ_i²``, the largest possible) and ``⟨G, X₀⟩ = 0``. Returns factors
    in ``grad``'s dtype, ``B: (..., m, r)``, ``A: (..., r, n)``.
    """
    if not isinstance(grad, Tensor) or grad.dim() < 2 or not grad.is_floating_point():
        raise ValueError("riemannion_init: grad must be a floating-point tensor (..., m, n)")
    m, n = grad.shape[-2:]
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank):
        raise ValueError(f"riemannion_init: rank must be an integer >= 1, got {rank!r}")
    if 2 * rank > min(m, n):
        raise ValueError(
            f"riemannion_init: 2 * rank = {2 * rank} exceeds min(m, n) = {min(m, n)} for a "
            f"gradient of shape {tuple(grad.shape)}"
        )
    if not (isinstance(scale, (int, float)) and 0 < scale < float("inf")):
        raise ValueError(f"riemannion_init: scale must be a finite number > 0, got {scale!r}")
    if not bool(torch.isfinite(grad).all()):
        raise ValueError("riemannion_init: grad contains non-finite values (NaN or inf)")
    U, _, Vh = torch.linalg.svd(grad.to(torch.float64), full_matrices=False)
    c = scale**0.5
    B = c * U[..., :, :rank]
    A = c * Vh[..., rank : 2 * rank, :]
    return B.to(grad.dtype), A.to(grad.dtype)


class Riemannion(ManifoldPairOptimizer):
    """Riemannion (module docstring): heavy-ball momentum of the Riemannian gradient,
    orthogonalised in the ambient space, projected onto ``T_X``, and a retraction.

    Args:
        params: param groups (see :mod:`geolora.optim.base`); a pair's ``scaling`` is ``s``.
        lr: step size in ``ΔW = s B A`` units (``ΔW`` moves by ``−lr P_T(msign(m))``).
        momentum: heavy-ball β ∈ [0, 1).
        weight_decay: decoupled decay λ ≥ 0 of ``X``.
        nesterov: orthogonalise ``ξ + β m`` instead of ``m``.
        orthogonalize: ``"svd"`` (exact polar factor) or ``"newton_schulz"`` (Muon's iteration).
        ns_steps: Newton–Schulz steps (``orthogonalize="newton_schulz"``).
        robust_steps: AdamW warm-up steps (rank-deficient pairs take them anyway).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.

    Memory per pair: ``2 (m + n) r + r² + r``. Transformation invariant.
    """

    functional_state = True  # _update_pairs only assigns new tensors to state keys

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        orthogonalize: str = "svd",
        ns_steps: int = 5,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "orthogonalize": orthogonalize,
            "ns_steps": ns_steps,
        }
        super().__init__(params, defaults, robust_steps=robust_steps, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        _check_range("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"invalid nesterov: {group['nesterov']!r} (expected a bool)")
        if group["orthogonalize"] not in ORTHOGONALIZERS:
            raise ValueError(
                f"invalid orthogonalize: {group['orthogonalize']!r} (expected one of "
                f"{ORTHOGONALIZERS})"
            )
        k = group["ns_steps"]
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"invalid ns_steps: {k!r} (expected an integer >= 1)")

    # The point and its entry are LoRAM-FR's: B = U diag(S), A = Vᵀ; rank-deficient factors
    # take the robust start, merely unbalanced ones enter at once.
    _entry_policy = LoRAMFixedRank._entry_policy
    _point_factors = LoRAMFixedRank._point_factors

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        m, r = B.shape
        n = A.shape[1]
        pt = FixedRank(m, n, r).from_factors(B.detach(), A.detach(), allow_zero=True)
        z = pt.U.new_zeros
        return {
            "U": pt.U,
            "S": pt.S,
            "V": pt.V,
            "momentum_M": z(r, r),
            "momentum_Up": z(m, r),
            "momentum_Vp": z(n, r),
        }

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        pt = FixedRankPoint(state["U"], state["S"], state["V"])
        m, r = pt.U.shape[-2:]
        n = pt.V.shape[-2]
        zv, ztu = LoRAMFixedRank._products(pt, x, g, step)
        xi = LoRAMFixedRank._mask(fixed_rank_project(pt, zv, ztu), m, n, r)
        beta = group["momentum"]
        if step == 1:
            mom = xi
        else:
            old = FixedRankTangent(state["momentum_M"], state["momentum_Up"], state["momentum_Vp"])
            mom = FixedRankTangent(*(torch.add(a, b, alpha=beta) for a, b in zip(xi, old)))
        d = mom
        if group["nesterov"]:
            d = FixedRankTangent(*(torch.add(a, b, alpha=beta) for a, b in zip(xi, mom)))
        D = LoRAMFixedRank._mask(
            tangent_msign(pt, d, group["orthogonalize"], ns_steps=group["ns_steps"]), m, n, r
        )
        lr, lam = group["lr"], group["weight_decay"]
        s = float(group.get("scaling", 1.0))
        base = pt if not lam else FixedRankPoint(pt.U, pt.S * (1.0 - lr * lam), pt.V)
        new, cu, cv = _fr_retraction(base, D.M, D.Up, D.Vp, -lr / s)
        dt = pt.U.dtype
        w = _fr_transport(pt, new, cu.to(dt), cv.to(dt), mom)
        w = LoRAMFixedRank._mask(w, m, n, r)
        state["U"], state["S"], state["V"] = new
        state["momentum_M"], state["momentum_Up"], state["momentum_Vp"] = w
        return self._point_factors(state)

