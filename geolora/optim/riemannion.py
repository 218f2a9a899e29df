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

from geolora.optim.base import PairOptimizer
from geolora.optim.manifold_pair import (
    ORTHOGONALIZERS,
    FixedRankGeometry,
    Retraction,
    SpectralMomentum,
    msign,
    tangent_msign,
)

__all__ = ["ORTHOGONALIZERS", "Riemannion", "msign", "riemannion_init", "tangent_msign"]


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


class Riemannion(PairOptimizer):
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

    Memory per pair: ``2 (m + n) r + r² + r``. Transformation invariant. Steps on row-sharded
    factors (FSDP2): seven ``r x r`` all-reduce rounds per bucket (docs/distributed.md).
    """

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
        pre = SpectralMomentum(
            momentum=momentum, nesterov=nesterov, orthogonalize=orthogonalize, ns_steps=ns_steps
        )
        super().__init__(
            params,
            pre,
            FixedRankGeometry(lr_units="dW"),
            Retraction(),
            lr=lr,
            defaults={"weight_decay": weight_decay},
            robust_steps=robust_steps,
            **kwargs,
        )
