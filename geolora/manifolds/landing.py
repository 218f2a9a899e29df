"""The landing field on the Stiefel manifold: a retraction-free move towards ``XᵀX = I``.

Ablin & Peyré, "Fast and accurate optimization on the orthogonal manifold without retraction",
AISTATS 2022 (arXiv:2102.07432); Ablin, Vary, Gao & Absil, "Infeasible deterministic, stochastic,
and variance-reduction algorithms for optimization under orthogonality constraints", JMLR 2024
(arXiv:2303.16510), for ``n × r`` matrices. For ``X: (n, r)`` (not necessarily orthonormal) and
the Euclidean gradient ``G = ∇f(X)``::

    ψ(X) = G Xᵀ − X Gᵀ                        (n × n, skew-symmetric; never formed here)
    N(X) = ¼ ‖XᵀX − I‖²_F,   ∇N(X) = X (XᵀX − I)
    Λ(X) = ψ(X) X + λ ∇N(X) = G (XᵀX) − X (GᵀX) + λ X (XᵀX − I)

Convention: the papers write ``ψ = skew(G Xᵀ) = ½ (G Xᵀ − X Gᵀ)``; PoLAR's authors (and this
module) use ``G Xᵀ − X Gᵀ`` without the ½, so ``Λ_here(λ) = 2 Λ_paper(λ/2)``. On the manifold
(``XᵀX = I``) the first term is ``G − X Gᵀ X``, the Riemannian gradient of the *canonical*
metric ``⟨U, W⟩_X = tr(Uᵀ(I − ½ X Xᵀ) W)`` (Edelman, Arias & Smith 1998, eq. 2.53;
:func:`canonical_rgrad`), which StelLA also uses. The two terms are orthogonal in ``⟨·,·⟩_F``
(``Xᵀψ X`` is skew, ``XᵀX − I`` symmetric): the first is tangent to the level set of ``N``
through ``X`` and decreases ``f`` (``⟨G, ψ X⟩ = ½ ‖ψ‖²_F``), the second is ``λ ∇N``.

Safe step (:func:`landing_safe_step`; Ablin et al. 2024, as in Ablin's reference
implementation pierreablin/landing). With ``Δ = XᵀX − I``, ``d = ‖Δ‖_F < 1`` and
``X̃ = X − η Λ(X)``: ``X̃ᵀX̃ − I = Δ − 2ηλ(Δ + Δ²) + η² ΛᵀΛ`` (the terms in ``ψ`` cancel because it
is skew), and for ``ηλ ≤ ½`` (eigenvalues of ``Δ`` in ``[−d, d]``)
``‖X̃ᵀX̃ − I‖_F ≤ d (1 − 2ηλ(1 − d)) + η² ‖Λ‖²_F``. So ``‖X̃ᵀX̃ − I‖_F ≤ ε`` whenever
``η ≤ min(1/(2λ), η*)``, ``η* = (β + √(β² + α(ε − d))) / α`` the positive root of
``α η² − 2β η + (d − ε) = 0`` with ``α = ‖Λ(X)‖²_F``, ``β = λ d (1 − d)``; ``tests/test_polar.py``
checks it on random points. Outside the ``ε``-region (``d > ε``) the vertex ``η = β / α`` of the
quadratic strictly decreases the bound on ``d`` (the reference implementation takes ``2β/α``,
where the bound equals ``d``).

All functions take leading batch dimensions; shapes ``X, G: (..., n, r)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geolora.linalg import transpose

__all__ = [
    "canonical_rgrad",
    "landing_distance",
    "landing_field",
    "landing_safe_step",
]


def canonical_rgrad(x: Tensor, g: Tensor) -> Tensor:
    """``G − X Gᵀ X``: the Riemannian gradient on ``St(n, r)`` under the canonical metric
    (Edelman, Arias & Smith 1998, eq. 2.53); ``= ψ(X) X`` of the landing field when
    ``XᵀX = I``. Shapes ``(..., n, r)``; cost ``O(n r²)``."""
    return g - x @ (transpose(g) @ x)


def landing_field(x: Tensor, g: Tensor, lam: float) -> Tensor:
    """``Λ(X) = (G Xᵀ − X Gᵀ) X + λ X (XᵀX − I)`` (module docstring), evaluated as
    ``G (XᵀX) − X (GᵀX) + λ (X (XᵀX) − X)`` in ``O(n r²)`` without the ``n × n`` matrix ``ψ``.
    Shapes ``(..., n, r)``."""
    xtx = transpose(x) @ x
    field = g @ xtx - x @ (transpose(g) @ x)
    if lam:
        field = field + lam * (x @ xtx - x)
    return field


def landing_distance(x: Tensor) -> Tensor:
    """``‖XᵀX − I‖_F`` (the infeasibility; ``N(X) = ¼ d²``); shape = batch shape."""
    r = x.shape[-1]
    eye = torch.eye(r, dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(transpose(x) @ x - eye)


def landing_safe_step(
    x: Tensor, g: Tensor, lam: float, eps: float, field: Tensor | None = None
) -> Tensor:
    """The largest step ``η`` for which the bound of the module docstring keeps
    ``‖X̃ᵀX̃ − I‖_F ≤ ε`` for ``X̃ = X − η Λ(X)`` (``d ≤ ε < 1``), or the bound-minimising step when
    ``d > ε``; ``1/(2λ)`` where ``Λ(X) = 0``. Computed in float64; shape = batch shape.

    ``field``: ``Λ(X)`` if already computed. Raises ``ValueError`` for ``λ ≤ 0``, ``ε ∉ (0, 1)``
    or a point with ``d ≥ 1`` (no safe step exists there: re-orthonormalise ``X``).
    """
    if not lam > 0:
        raise ValueError(f"the safe step needs landing_lambda > 0, got {lam!r}")
    if not 0 < eps < 1:
        raise ValueError(f"safe_eps must be in (0, 1), got {eps!r}")
    x64 = x.to(torch.float64)
    d = landing_distance(x64)
    if bool((d >= 1).any()):
        raise ValueError(
            f"a factor is too far from the Stiefel manifold for the landing safe step: "
            f"‖XᵀX − I‖_F = {float(d.max()):.3g} >= 1; re-orthonormalise it"
        )
    if field is None:
        field = landing_field(x64, g.to(torch.float64), lam)
    field = field.to(torch.float64)
    alpha = torch.linalg.matrix_norm(field) ** 2
    beta = lam * d * (1 - d)
    disc = (beta * beta + alpha * (eps - d)).clamp_min(0)
    root = torch.where(d <= eps, (beta + disc.sqrt()) / alpha, beta / alpha)
    root = torch.where(alpha > 0, root, torch.full_like(root, torch.inf))
    return torch.minimum(root, torch.full_like(root, 0.5 / lam))
