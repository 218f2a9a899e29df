"""The Euclidean space ``R^{d₁×…×d_k}`` with the trivial geometry."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geolora.linalg import check_finite
from geolora.manifolds.base import Manifold, check_shape, check_shapes_match

__all__ = ["Euclidean"]


class Euclidean(Manifold):
    r"""Euclidean space with the Frobenius metric: every Riemannian tool is the trivial one.

    * set: ``R^{shape}`` (``Euclidean(m, n)``: ``m×n`` matrices; ``Euclidean()``: any shape);
    * metric: ``<u, v>_x = Σ u ⊙ v`` over the last ``ndim`` dimensions (the earlier ones are
      batch dimensions);
    * projection ``P_x(z) = z``, Riemannian gradient = Euclidean gradient;
    * retraction ``R_x(u) = x + u`` (the exponential map), transport ``T_{x→y}(v) = v``.

    ``ndim`` defaults to ``len(shape)``, or to 2 (matrices, like every geolora manifold) when no
    shape is given; ``Euclidean(ndim=0)`` makes the inner product element-wise like geoopt's.
    Without a shape, ``dim`` and ``random_point`` are undefined (``ValueError``).
    """

    name = "Euclidean"

    def __init__(self, *shape: int, ndim: int | None = None) -> None:
        for d in shape:
            if not isinstance(d, int) or isinstance(d, bool) or d <= 0:
                raise ValueError(f"shape entries must be positive ints, got shape={shape}")
        if ndim is None:
            ndim = len(shape) if shape else 2
        if not isinstance(ndim, int) or ndim < 0:
            raise ValueError(f"ndim must be a non-negative int, got ndim={ndim!r}")
        if shape and ndim != len(shape):
            raise ValueError(f"ndim={ndim} contradicts shape={shape} (ndim must be len(shape))")
        self.shape: tuple[int, ...] = tuple(shape)
        self.ndim = ndim

    # --- validation helpers -------------------------------------------------------------------
    def _shape_reason(self, name: str, t: Tensor) -> str | None:
        if self.shape:
            return check_shape(name, t, self.shape)
        if not isinstance(t, Tensor):
            return f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.dim() < self.ndim:
            return f"{name} has {t.dim()} dims, expected at least ndim={self.ndim}"
        return None

    def _validate(self, **tensors: Tensor) -> None:
        check_shapes_match(self.name, tensors, self._shape_reason)

    def _reduce_dims(self) -> tuple[int, ...]:
        return tuple(range(-self.ndim, 0))

    # --- geometry -----------------------------------------------------------------------------
    def proj(self, x: Tensor, u: Tensor) -> Tensor:
        """``P_x(u) = u``."""
        self._validate(x=x, u=u)
        return u

    def egrad2rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        """Riemannian gradient = Euclidean gradient ``g``."""
        self._validate(x=x, g=g)
        return g

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
        """``Σ u ⊙ v`` over the last ``ndim`` dims; shape = batch shape."""
        v = u if v is None else v
        self._validate(x=x, u=u, v=v)
        prod = u * v
        return prod.sum(dim=self._reduce_dims()) if self.ndim else prod

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """``R_x(u) = x + u``."""
        self._validate(x=x, u=u)
        check_finite(f"{self.name}.retr: x", x)
        check_finite(f"{self.name}.retr: u", u)
        return x + u

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``T_{x→y}(v) = v``."""
        self._validate(x=x, y=y, v=v)
        return v

    # --- sampling -----------------------------------------------------------------------------
    def random_point(
        self,
        *batch: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """A standard Gaussian tensor of shape ``(*batch, *shape)``."""
        if not self.shape:
            raise ValueError("Euclidean() without a shape cannot sample: give Euclidean(*shape)")
        return torch.randn((*batch, *self.shape), dtype=dtype, device=device, generator=generator)

    # --- validation ---------------------------------------------------------------------------
    def _check_point(self, x: Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        reason = self._shape_reason("x", x)
        if reason is None and not bool(torch.isfinite(x).all()):
            reason = "x contains non-finite values (NaN or inf)"
        return reason is None, reason

    def _check_tangent(
        self, x: Tensor, u: Tensor, atol: float, rtol: float
    ) -> tuple[bool, str | None]:
        reason = self._shape_reason("u", u)
        if reason is None and u.shape != x.shape:
            reason = f"u has shape {tuple(u.shape)} but x has {tuple(x.shape)}"
        if reason is None and not bool(torch.isfinite(u).all()):
            reason = "u contains non-finite values (NaN or inf)"
        return reason is None, reason

    @property
    def dim(self) -> int:
        """``prod(shape)``."""
        if not self.shape:
            raise ValueError("Euclidean() without a shape has no fixed dimension")
        return math.prod(self.shape)

    def __repr__(self) -> str:
        args = ", ".join(map(str, self.shape)) if self.shape else f"ndim={self.ndim}"
        return f"Euclidean({args})"
