"""Manifolds: Euclidean, Stiefel, FixedRank, BoundedRank and the factor quotient (M, N)/GL(r)."""

from geolora.manifolds.base import Manifold
from geolora.manifolds.bounded_rank import BoundedRank
from geolora.manifolds.euclidean import Euclidean
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.metrics import (
    BalancedMetric,
    FlatMetric,
    PreconditionedMetric,
    QuotientMetric,
)
from geolora.manifolds.quotient import FactorQuotient
from geolora.manifolds.stiefel import Stiefel, from_geoopt
from geolora.manifolds.types import (
    BoundedRankPoint,
    BoundedRankTangent,
    FactorPoint,
    FactorTangent,
    FixedRankPoint,
    FixedRankTangent,
)

__all__ = [
    "BalancedMetric",
    "BoundedRank",
    "BoundedRankPoint",
    "BoundedRankTangent",
    "Euclidean",
    "FactorPoint",
    "FactorQuotient",
    "FactorTangent",
    "FixedRank",
    "FixedRankPoint",
    "FixedRankTangent",
    "FlatMetric",
    "Manifold",
    "PreconditionedMetric",
    "QuotientMetric",
    "Stiefel",
    "from_geoopt",
]
