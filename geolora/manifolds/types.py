"""NamedTuples for points and tangent vectors of the multi-factor manifolds.

Every field may carry leading batch dimensions ``(..., rows, cols)``.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class FactorPoint(NamedTuple):
    """A point ``(M, N)`` of ``R*^{m×r} × R*^{n×r}``, representing ``X = M Nᵀ``."""

    M: Tensor  # (..., m, r)
    N: Tensor  # (..., n, r)


class FactorTangent(NamedTuple):
    """A tangent vector ``(Ṁ, Ṅ)`` at a :class:`FactorPoint`."""

    M: Tensor  # (..., m, r)
    N: Tensor  # (..., n, r)


class FixedRankPoint(NamedTuple):
    """A rank-r matrix ``X = U diag(S) Vᵀ`` (``U``, ``V`` orthonormal, ``S > 0``)."""

    U: Tensor  # (..., m, r)
    S: Tensor  # (..., r) singular values
    V: Tensor  # (..., n, r)


class FixedRankTangent(NamedTuple):
    """A tangent vector ``Ẋ = U M Vᵀ + Up Vᵀ + U Vpᵀ`` with ``Uᵀ Up = 0``, ``Vᵀ Vp = 0``.

    The same factored form represents matrix tangent vectors at ``X = M Nᵀ`` in the quotient
    geometry, with ``U = qf(M)``, ``V = qf(N)`` (Vandereycken 2013; ``docs/design.md``).
    """

    M: Tensor  # (..., r, r)
    Up: Tensor  # (..., m, r)
    Vp: Tensor  # (..., n, r)


class BoundedRankPoint(NamedTuple):
    """A point ``(K, V)`` of the desingularized bounded-rank manifold, ``X = K Vᵀ``, ``VᵀV = I``."""

    K: Tensor  # (..., m, r)
    V: Tensor  # (..., n, r)


class BoundedRankTangent(NamedTuple):
    """A tangent vector ``(K̇, V̇p)`` with ``Vᵀ V̇p = 0``."""

    K: Tensor  # (..., m, r)
    Vp: Tensor  # (..., n, r)
