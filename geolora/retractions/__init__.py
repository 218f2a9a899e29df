"""Retractions and vector transports, as plain functions the manifolds call.

Pick one by name from :data:`RETRACTIONS` (keys ``"<manifold>.<retraction>"``) or
:data:`TRANSPORTS`, or with :func:`get_retraction`::

    from geolora.retractions import get_retraction
    retr = get_retraction("stiefel.polar")   # retr(x, u) -> point

Every function takes ``(x, u)`` (retractions) or ``(x, y, v)`` (transports, plus the manifold for
:func:`projection_transport`) and accepts leading batch dimensions.
"""

from __future__ import annotations

from collections.abc import Callable

from geolora.retractions.bounded_rank import bounded_rank_retraction, bounded_rank_transport
from geolora.retractions.fixed_rank import (
    fixed_rank_project,
    fixed_rank_retraction,
    fixed_rank_tangent_factors,
    fixed_rank_transport,
)
from geolora.retractions.stiefel import (
    STIEFEL_RETRACTIONS,
    stiefel_cayley,
    stiefel_polar,
    stiefel_qr,
)
from geolora.retractions.transport import projection_transport

__all__ = [
    "RETRACTIONS",
    "TRANSPORTS",
    "get_retraction",
    "get_transport",
    "STIEFEL_RETRACTIONS",
    "stiefel_qr",
    "stiefel_polar",
    "stiefel_cayley",
    "fixed_rank_project",
    "fixed_rank_tangent_factors",
    "fixed_rank_retraction",
    "fixed_rank_transport",
    "projection_transport",
    "bounded_rank_retraction",
    "bounded_rank_transport",
]

RETRACTIONS: dict[str, Callable] = {
    "stiefel.qr": stiefel_qr,
    "stiefel.polar": stiefel_polar,
    "stiefel.cayley": stiefel_cayley,
    "fixed_rank.svd": fixed_rank_retraction,
    "bounded_rank.qfactor": bounded_rank_retraction,
}
"""Retractions by name: ``f(x, u) -> point``."""

TRANSPORTS: dict[str, Callable] = {
    "projection": projection_transport,  # f(manifold, x, y, v)
    "fixed_rank.projection": fixed_rank_transport,  # f(x, y, v), factored O((m+n) r²)
    "bounded_rank.projection": bounded_rank_transport,
}
"""Vector transports by name."""


def _lookup(table: dict[str, Callable], kind: str, name: str) -> Callable:
    try:
        return table[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} {name!r}; available: {', '.join(sorted(table))}"
        ) from None


def get_retraction(name: str) -> Callable:
    """The retraction registered as ``name`` in :data:`RETRACTIONS` (``ValueError`` if none)."""
    return _lookup(RETRACTIONS, "retraction", name)


def get_transport(name: str) -> Callable:
    """The transport registered as ``name`` in :data:`TRANSPORTS` (``ValueError`` if none)."""
    return _lookup(TRANSPORTS, "transport", name)
