"""Retractions of the Stiefel manifold ``St(n, r) = {X ∈ R^{n×r} : XᵀX = I}``.

All functions take a point ``x: (..., n, r)`` and a tangent vector ``u: (..., n, r)``
(``sym(Xᵀ U) = 0``) and return a point ``(..., n, r)``. Leading batch dimensions are processed
in one call. Which one to use:

* :func:`stiefel_qr` — ``qf(X + U)``, O(n r²), first order (``R_X(tU) = X + tU + O(t²)``).
  The default: cheapest, and CholeskyQR2 makes it fast on accelerators.
* :func:`stiefel_polar` — ``polar(X + U)``, O(n r²) (a thin SVD). It is the metric projection
  onto St(n, r), hence a second-order retraction (Absil & Malick 2012):
  ``R_X(tU) = X + tU − (t²/2) X UᵀU + O(t³)``, the same expansion as the geodesic.
* :func:`stiefel_cayley` — the Cayley transform of Wen & Yin (2013), O(n³) (dense n×n solve).
"""

from __future__ import annotations

import torch
from torch import Tensor

from geolora.linalg import polar, qf, transpose

__all__ = ["stiefel_qr", "stiefel_polar", "stiefel_cayley", "STIEFEL_RETRACTIONS"]


def stiefel_qr(x: Tensor, u: Tensor) -> Tensor:
    """QR retraction ``R_X(U) = qf(X + U)`` with ``diag(R) > 0`` (Absil et al. 2008, eq. 4.8).

    Shapes ``(..., n, r), (..., n, r) -> (..., n, r)``. Cost O(n r²): Householder QR on CPU,
    CholeskyQR2 on accelerators (:func:`geolora.linalg.qr_pos`). Identical to geoopt's
    ``EuclideanStiefel.retr``.
    """
    return qf(x + u)


def stiefel_polar(x: Tensor, u: Tensor) -> Tensor:
    """Polar retraction ``R_X(U) = (X + U)((X + U)ᵀ(X + U))^{-1/2}`` (Absil & Malick 2012).

    The closest point of St(n, r) to ``X + U`` in Frobenius norm (metric projection), computed
    from the thin SVD ``X + U = P Σ Qᵀ`` as ``P Qᵀ``; second order. Shapes as
    :func:`stiefel_qr`; cost O(n r²).
    """
    return polar(x + u)


def stiefel_cayley(x: Tensor, u: Tensor) -> Tensor:
    """Cayley retraction ``R_X(U) = (I − W/2)⁻¹ (I + W/2) X`` (Wen & Yin 2013, eq. 7).

    ``W = P_X U Xᵀ − X Uᵀ P_X`` with ``P_X = I − ½ X Xᵀ`` is skew-symmetric ``n×n``, so the
    Cayley transform is orthogonal and ``R_X(U)`` stays on St(n, r); ``W X = U`` for tangent
    ``U`` (for any ``U``, ``W X = Z − X sym(XᵀZ)``, its tangent projection), so
    ``d/dt R_X(tU)|₀ = U``.

    Cost O(n³): it forms and solves a dense ``n×n`` system, which is why it is not the default
    (QR and polar are O(n r²); for LoRA ``n`` is the layer width, thousands, while ``r`` ≤ 64).
    Wen & Yin's Woodbury form reduces the solve to ``2r×2r``; this function keeps the dense
    formula as the plain reference. Shapes as :func:`stiefel_qr`.
    """
    n = x.shape[-2]
    g_hat = u - 0.5 * x @ (transpose(x) @ u)  # P_X U
    w = g_hat @ transpose(x) - x @ transpose(g_hat)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    return torch.linalg.solve(eye - 0.5 * w, x + 0.5 * (w @ x))


STIEFEL_RETRACTIONS = {"qr": stiefel_qr, "polar": stiefel_polar, "cayley": stiefel_cayley}
"""Stiefel retractions by the short name :class:`geolora.manifolds.stiefel.Stiefel` accepts."""
