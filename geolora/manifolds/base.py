"""The :class:`Manifold` interface shared by every geometry in geolora.

Method names follow geoopt (``proj``, ``egrad2rgrad``, ``retr``, ``transp``, ...). Points and
tangent vectors of single-factor manifolds are tensors; those of multi-factor manifolds are
NamedTuples of tensors (e.g. ``FixedRankPoint(U, S, V)``). Every method accepts leading batch
dimensions: a stack of same-shape points is processed in one call.

The optimizers only talk to a manifold through this seam, so a new manifold costs nothing in the
optimizers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Point = Any  # Tensor or NamedTuple of tensors
Tangent = Any


def tree_map(fn, *xs):
    """Apply ``fn`` leaf-wise to tensors or (Named)tuples of tensors with the same structure."""
    x0 = xs[0]
    if isinstance(x0, Tensor):
        return fn(*xs)
    vals = [fn(*parts) for parts in zip(*xs)]
    return type(x0)(*vals) if hasattr(x0, "_fields") else type(x0)(vals)


def tree_leaves(x) -> list[Tensor]:
    """The tensors of a point / tangent vector, in field order."""
    return [x] if isinstance(x, Tensor) else list(x)


def tree_sum_inner(u, v) -> Tensor:
    """Euclidean inner product summed over the fields, reduced over the last two dims."""
    return sum((a * b).sum(dim=(-2, -1)) for a, b in zip(tree_leaves(u), tree_leaves(v)))


class Manifold(ABC):
    """A Riemannian manifold embedded in (a product of) matrix spaces.

    Subclasses implement the geometry; the defaults here derive ``norm``, ``retr_transp``,
    ``random_tangent`` and the ``check_*`` wrappers from the abstract methods.
    """

    name: str = "Manifold"
    ndim: int = 2  # matrix manifolds: the last two dimensions of each field are the matrix

    # --- geometry ---------------------------------------------------------------------------
    @abstractmethod
    def proj(self, x: Point, u: Tangent) -> Tangent:
        """Orthogonal projection of an ambient vector onto the tangent space at ``x``."""

    @abstractmethod
    def egrad2rgrad(self, x: Point, g: Tangent) -> Tangent:
        """Riemannian gradient from the Euclidean gradient ``g`` of the embedding."""

    @abstractmethod
    def inner(self, x: Point, u: Tangent, v: Tangent | None = None) -> Tensor:
        """Riemannian metric ``<u, v>_x`` (``v = u`` if omitted); shape = batch shape."""

    def norm(self, x: Point, u: Tangent) -> Tensor:
        """Riemannian norm ``sqrt(<u, u>_x)``."""
        return self.inner(x, u).clamp_min(0).sqrt()

    @abstractmethod
    def retr(self, x: Point, u: Tangent) -> Point:
        """Retraction ``R_x(u)``."""

    @abstractmethod
    def transp(self, x: Point, y: Point, v: Tangent) -> Tangent:
        """Vector transport of ``v ∈ T_x`` to ``T_y``."""

    def retr_transp(self, x: Point, u: Tangent, v: Tangent) -> tuple[Point, Tangent]:
        """Retract along ``u`` and transport ``v`` to the new point in one call."""
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    # --- sampling ---------------------------------------------------------------------------
    @abstractmethod
    def random_point(
        self,
        *batch: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Point:
        """A random point (batch shape ``batch``)."""

    def random_tangent(self, x: Point, generator: torch.Generator | None = None) -> Tangent:
        """A random tangent vector at ``x``: the projection of a Gaussian ambient vector."""

        def randn_like(t: Tensor) -> Tensor:
            return torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=generator)

        return self.proj(x, tree_map(randn_like, x))

    # --- validation -------------------------------------------------------------------------
    @abstractmethod
    def _check_point(self, x: Point, atol: float, rtol: float) -> tuple[bool, str | None]:
        """Return ``(ok, reason)``; ``reason`` explains what is wrong."""

    @abstractmethod
    def _check_tangent(
        self, x: Point, u: Tangent, atol: float, rtol: float
    ) -> tuple[bool, str | None]:
        """Return ``(ok, reason)`` for ``u ∈ T_x``."""

    def check_point(self, x: Point, *, atol: float | None = None, rtol: float | None = None) -> None:
        """Raise ``ValueError`` with the reason if ``x`` is not a point of the manifold."""
        atol, rtol = _tols(x, atol, rtol)
        ok, reason = self._check_point(x, atol, rtol)
        if not ok:
            raise ValueError(f"{self.name}: not a valid point: {reason}")

    def check_tangent(
        self, x: Point, u: Tangent, *, atol: float | None = None, rtol: float | None = None
    ) -> None:
        """Raise ``ValueError`` with the reason if ``u`` is not tangent at ``x``."""
        self.check_point(x, atol=atol, rtol=rtol)
        atol, rtol = _tols(x, atol, rtol)
        ok, reason = self._check_tangent(x, u, atol, rtol)
        if not ok:
            raise ValueError(f"{self.name}: not a valid tangent vector: {reason}")

    def is_point(self, x: Point, *, atol: float | None = None, rtol: float | None = None) -> bool:
        """``True`` if ``x`` is a valid point (no exception)."""
        atol, rtol = _tols(x, atol, rtol)
        return self._check_point(x, atol, rtol)[0]

    @property
    @abstractmethod
    def dim(self) -> int:
        """Dimension of the manifold (of one batch element)."""

    def __repr__(self) -> str:
        return f"{self.name}()"


def _tols(x: Point, atol: float | None, rtol: float | None) -> tuple[float, float]:
    dt = tree_leaves(x)[0].dtype
    eps = 1e-10 if dt == torch.float64 else 1e-4
    return (eps if atol is None else atol), (eps if rtol is None else rtol)


def check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> str | None:
    """Reason string if ``t``'s trailing dims differ from ``shape``, else ``None``."""
    if not isinstance(t, Tensor):
        return f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if t.dim() < len(shape) or tuple(t.shape[-len(shape) :]) != tuple(shape):
        return f"{name} has shape {tuple(t.shape)}, expected (..., {', '.join(map(str, shape))})"
    return None


def first_shape_error(*items: tuple[str, Tensor, tuple[int, ...]]) -> str | None:
    """The first :func:`check_shape` objection among ``(name, t, shape)`` items, else ``None``."""
    return next((e for n, t, sh in items if (e := check_shape(n, t, sh)) is not None), None)


def check_shapes_match(
    manifold: str,
    tensors: dict[str, Tensor],
    reason: Callable[[str, Tensor], str | None],
    hint: str = "",
) -> None:
    """``ValueError`` prefixed with ``manifold`` if ``reason(name, t)`` objects to a tensor or two
    tensors differ in shape (``hint`` is appended to that message)."""
    first: tuple[str, Tensor] | None = None
    for name, t in tensors.items():
        why = reason(name, t)
        if why is not None:
            raise ValueError(f"{manifold}: {why}")
        if first is None:
            first = (name, t)
        elif t.shape != first[1].shape:
            raise ValueError(
                f"{manifold}: {name} has shape {tuple(t.shape)} but {first[0]} has "
                f"{tuple(first[1].shape)}{hint}"
            )


def check_finite_tree(name: str, x) -> None:
    """``ValueError`` naming ``name`` if any field of ``x`` holds NaN/inf."""
    for i, t in enumerate(tree_leaves(x)):
        if not bool(torch.isfinite(t).all()):
            field = x._fields[i] if hasattr(x, "_fields") else str(i)
            raise ValueError(f"{name}: field {field!r} contains non-finite values (NaN or inf)")
