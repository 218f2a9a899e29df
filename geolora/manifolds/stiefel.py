"""The Stiefel manifold of orthonormal frames, with the embedded (Euclidean) metric."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import check_finite, qf, sym, transpose
from geolora.manifolds.base import Manifold, check_shape, check_shapes_match
from geolora.retractions import stiefel as _retractions
from geolora.retractions import transport as _transport

__all__ = ["Stiefel", "from_geoopt"]


class Stiefel(Manifold):
    r"""Stiefel manifold ``St(n, r) = {X ∈ R^{n×r} : XᵀX = I_r}`` as a Riemannian submanifold.

    * metric: the embedded one, ``<U, V>_X = tr(UᵀV)`` (geoopt's ``EuclideanStiefel``;
      Absil et al. 2008 §3.6.1, Edelman et al. 1998 "Euclidean metric");
    * tangent space ``T_X = {U : XᵀU + UᵀX = 0}``, dimension ``n r − r(r+1)/2``;
    * projection ``P_X(Z) = Z − X sym(XᵀZ)``, and ``egrad2rgrad = P_X`` (embedded metric);
    * retraction by name (``retraction=``): ``"qr"`` ``qf(X + U)`` (default, O(n r²)),
      ``"polar"`` ``polar(X + U)`` (O(n r²), second order), ``"cayley"`` Wen–Yin Cayley transform
      (O(n³), an ``n×n`` solve — not the default for that reason);
      see :mod:`geolora.retractions.stiefel`;
    * transport by projection ``T_{X→Y}(V) = P_Y(V)``.

    Points and tangent vectors are tensors ``(..., n, r)`` with any leading batch dims.
    Interop with geoopt: :meth:`to_geoopt` gives ``geoopt.EuclideanStiefel()`` (same set, same
    metric, same projection, QR retraction) and :func:`from_geoopt` accepts a geoopt Stiefel
    manifold or a ``ManifoldParameter`` on one.
    """

    name = "Stiefel"

    def __init__(self, n: int, r: int, retraction: str = "qr") -> None:
        for label, val in (("n", n), ("r", r)):
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"{label} must be a positive int, got {label}={val!r}")
        if r > n:
            raise ValueError(f"Stiefel needs r <= n, got r={r} > n={n}")
        table = _retractions.STIEFEL_RETRACTIONS
        if retraction not in table:
            raise ValueError(
                f"unknown retraction={retraction!r}; choose one of {', '.join(sorted(table))}"
            )
        self.n, self.r = n, r
        self.retraction = retraction
        self._retr_fn = table[retraction]

    # --- validation helpers -------------------------------------------------------------------
    def _validate(self, **tensors: Tensor) -> None:
        shape = (self.n, self.r)
        check_shapes_match(
            self.name,
            tensors,
            lambda name, t: check_shape(name, t, shape),
            " (batch dims must match)",
        )

    # --- geometry -----------------------------------------------------------------------------
    def proj(self, x: Tensor, u: Tensor) -> Tensor:
        """``P_X(Z) = Z − X sym(XᵀZ)``."""
        self._validate(x=x, u=u)
        return u - x @ sym(transpose(x) @ u)

    def egrad2rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        """``grad f(X) = P_X(∇f(X))`` (embedded metric)."""
        return self.proj(x, g)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
        """``tr(UᵀV)``; shape = batch shape."""
        v = u if v is None else v
        self._validate(x=x, u=u, v=v)
        return (u * v).sum(dim=(-2, -1))

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """``R_X(U)`` with the retraction chosen at construction (``self.retraction``)."""
        self._validate(x=x, u=u)
        check_finite(f"{self.name}.retr: x", x)
        check_finite(f"{self.name}.retr: u", u)
        return self._retr_fn(x, u)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """Projection transport ``P_Y(V)``."""
        self._validate(x=x, y=y, v=v)
        return _transport.projection_transport(self, x, y, v)

    # --- sampling -----------------------------------------------------------------------------
    def random_point(
        self,
        *batch: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``qf(G)`` of a Gaussian ``G: (*batch, n, r)`` (uniform on St(n, r))."""
        g = torch.randn((*batch, self.n, self.r), dtype=dtype, device=device, generator=generator)
        return qf(g)

    # --- validation ---------------------------------------------------------------------------
    def _check_point(self, x: Tensor, atol: float, rtol: float) -> tuple[bool, str | None]:
        reason = check_shape("x", x, (self.n, self.r))
        if reason is not None:
            return False, reason
        x = x.detach()
        if not bool(torch.isfinite(x).all()):
            return False, "x contains non-finite values (NaN or inf)"
        eye = torch.eye(self.r, dtype=x.dtype, device=x.device)
        err = float((transpose(x) @ x - eye).abs().max())
        if err > atol + rtol:
            return False, f"XᵀX != I: max |XᵀX − I| = {err:.3e} > atol + rtol = {atol + rtol:.1e}"
        return True, None

    def _check_tangent(
        self, x: Tensor, u: Tensor, atol: float, rtol: float
    ) -> tuple[bool, str | None]:
        reason = check_shape("u", u, (self.n, self.r))
        if reason is None and u.shape != x.shape:
            reason = f"u has shape {tuple(u.shape)} but x has {tuple(x.shape)}"
        if reason is not None:
            return False, reason
        x, u = x.detach(), u.detach()
        if not bool(torch.isfinite(u).all()):
            return False, "u contains non-finite values (NaN or inf)"
        err = float(sym(transpose(x) @ u).abs().max())
        scale = float(u.abs().max())
        if err > atol + rtol * scale:
            return False, f"sym(XᵀU) != 0: max |sym(XᵀU)| = {err:.3e} (max |U| = {scale:.3e})"
        return True, None

    @property
    def dim(self) -> int:
        """``n r − r(r+1)/2``."""
        return self.n * self.r - self.r * (self.r + 1) // 2

    def __repr__(self) -> str:
        return f"Stiefel(n={self.n}, r={self.r}, retraction={self.retraction!r})"

    # --- geoopt interop -----------------------------------------------------------------------
    def to_geoopt(self) -> Any:
        """The matching geoopt manifold, ``geoopt.EuclideanStiefel()``.

        Same point set, embedded metric, projection and ``egrad2rgrad``; geoopt retracts with its
        own sign-fixed QR (identical to ``retraction="qr"``) whatever ``self.retraction`` is.
        geoopt manifolds carry no shape: ``n``, ``r`` come from the tensors.
        """
        import geoopt

        return geoopt.EuclideanStiefel()


def from_geoopt(
    manifold_or_param: Any, n: int | None = None, r: int | None = None, retraction: str = "qr"
) -> Stiefel:
    """A :class:`Stiefel` for a geoopt Stiefel manifold or a ``ManifoldParameter`` / tensor on one.

    A parameter gives ``n, r = param.shape[-2:]``; a bare geoopt manifold has no shape, so pass
    ``n`` and ``r``. Both geoopt variants describe the same set ``XᵀX = I`` and are accepted:
    ``EuclideanStiefel`` has our metric exactly; for ``geoopt.Stiefel()`` (= ``CanonicalStiefel``,
    canonical metric ``tr(Uᵀ(I − ½XXᵀ)V)``) the returned manifold uses the embedded metric, the
    one geolora's optimizers are written for.
    """
    import geoopt

    manifold = getattr(manifold_or_param, "manifold", manifold_or_param)
    if not isinstance(manifold, geoopt.Stiefel):
        raise TypeError(
            "manifold_or_param must be a geoopt Stiefel manifold or a ManifoldParameter/"
            f"ManifoldTensor on one, got {type(manifold_or_param).__name__}"
            + (f" on {type(manifold).__name__}" if manifold is not manifold_or_param else "")
        )
    if isinstance(manifold_or_param, Tensor):
        if manifold_or_param.dim() < 2:
            raise ValueError(
                "manifold_or_param must have shape (..., n, r), got "
                f"{tuple(manifold_or_param.shape)}"
            )
        pn, pr = manifold_or_param.shape[-2:]
        if (n is not None and n != pn) or (r is not None and r != pr):
            raise ValueError(f"n={n}, r={r} contradict the parameter's shape (..., {pn}, {pr})")
        n, r = int(pn), int(pr)
    if n is None or r is None:
        raise ValueError("a bare geoopt manifold carries no shape: pass n and r")
    return Stiefel(n, r, retraction=retraction)
