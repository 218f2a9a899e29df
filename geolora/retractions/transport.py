"""Vector transport by orthogonal projection, for manifolds embedded in a Euclidean space.

For a Riemannian submanifold of ``R^N`` the map ``T_{x→y}(v) = P_y(v)`` (project the ambient
vector ``v`` onto ``T_y``) is a vector transport (Absil et al. 2008, §8.1.3). It is the transport
of geoopt's ``EuclideanStiefel``, of Manopt's embedded factories and of LoRAM's fixed-rank
transport (Jiang, Wang & Stich, "LoRAM: Low-Rank Adaptation of Large Language Models on
Manifold", ICLR 2025 Workshop on Sparsity in LLMs, OpenReview 6cLPObfitT, Alg. 4).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # no runtime import: geolora.manifolds imports this package
    from geolora.manifolds.base import Manifold

__all__ = ["projection_transport"]


def projection_transport(manifold: Manifold, x: Any, y: Any, v: Any) -> Any:
    """``T_{x→y}(v) = P_y(ι_x(v))`` with ``ι_x`` the embedding of ``T_x`` in the ambient space.

    For manifolds whose tangent vectors already are ambient arrays (``Euclidean``, ``Stiefel``)
    ``ι_x`` is the identity and this is ``manifold.proj(y, v)``. A manifold with a factored
    tangent representation exposes ``tangent2ambient(x, v)`` (e.g. ``FixedRank``, which builds
    the dense ``m×n`` matrix): this generic route then serves as the reference its factored
    transport is tested against.
    """
    to_ambient = getattr(manifold, "tangent2ambient", None)
    ambient = v if to_ambient is None else to_ambient(x, v)
    return manifold.proj(y, ambient)
