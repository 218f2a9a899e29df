"""Manifolds: Euclidean, Stiefel, FixedRank, BoundedRank and the factor quotient (M, N)/GL(r)."""

from geolora.manifolds.base import Manifold

__all__ = ["Manifold"]
