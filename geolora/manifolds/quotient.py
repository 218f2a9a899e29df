"""The quotient manifold ``R*^{m×r} × R*^{n×r} / GL(r)`` of LoRA factors.

A point of the total space is a pair ``(M, N)`` of full-rank factors representing the rank-r
matrix ``X = π(M, N) = M Nᵀ``; ``(M, N)`` and ``(M R, N R⁻ᵀ)`` (``R ∈ GL(r)``) are the same
point of the quotient. For LoRA ``ΔW = s·B A``: ``M = B``, ``N = Aᵀ``.

* Vertical space (tangent to the fibre): ``V_{(M,N)} = {(M Ω, −N Ωᵀ) : Ω ∈ R^{r×r}}``.
* Horizontal space: its orthogonal complement under the chosen metric
  (:mod:`geolora.manifolds.metrics`).
* Differential: ``Dπ(M, N)[(Ṁ, Ṅ)] = Ṁ Nᵀ + M Ṅᵀ ∈ T_X``.
* Horizontal lift of ``Ẋ``: the unique horizontal ``(Ṁ, Ṅ)`` with ``Dπ[(Ṁ, Ṅ)] = P_T(Ẋ)``.

References: Absil, Mahony & Sepulchre 2008 (ch. 3.5); Mishra, Meyer, Bonnabel & Sepulchre 2014;
Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR 2026,
OpenReview Guo2XGgxZA, Alg. 1, eqs. 7, 9, 12.
"""

from __future__ import annotations

import torch
from torch import Tensor

from geolora.linalg import transpose
from geolora.manifolds.base import Manifold, check_finite_tree, check_shape
from geolora.manifolds.frame import (
    Frame,
    make_frame,
    project_dense,
    project_factor_grads,
    tangent_to_dense,
)
from geolora.manifolds.metrics import QuotientMetric, get_metric
from geolora.manifolds.types import FactorPoint, FactorTangent, FixedRankTangent


def assemble_lift(frame: Frame, t: FixedRankTangent, coeffs) -> FactorTangent:
    """``Ṁ = U A_M + Up D_N``, ``Ṅ = V A_N + Vp D_M`` in the factors' dtype."""
    dt = frame.U.dtype
    AM, DN, AN, DM = (c.to(dt) for c in coeffs)
    return FactorTangent(frame.U @ AM + t.Up @ DN, frame.V @ AN + t.Vp @ DM)


class FactorQuotient(Manifold):
    """``R*^{m×r} × R*^{n×r} / GL(r)`` with a pluggable metric.

    Args:
        m, n, r: matrix shape ``m x n`` and rank ``r ≤ min(m, n)``.
        metric: ``"balanced"`` (LoRA-S, default), ``"preconditioned"`` (ScaledGD /
            Riemannian-preconditioned LoRA), ``"flat"`` (Euclidean, not invariant) or an instance.
        damping: δ ≥ 0 passed to a metric given by name (see :class:`QuotientMetric`).
        qr_method: orthonormalisation used for frames (``"auto"``, ``"householder"``,
            ``"cholesky"``).

    Points are :class:`FactorPoint` ``(M, N)``; tangent vectors :class:`FactorTangent`
    ``(Ṁ, Ṅ)``; matrix tangent vectors at ``X`` are dense ``(..., m, n)`` tensors or
    :class:`FixedRankTangent` ``(S, Up, Vp)`` relative to ``frame(x)``.
    ``proj`` is the metric-orthogonal projection onto the horizontal space, ``retr`` is
    ``(M + Ṁ, N + Ṅ)`` and ``transp`` re-projects onto the new horizontal space.
    """

    def __init__(
        self,
        m: int,
        n: int,
        r: int,
        metric: str | QuotientMetric = "balanced",
        damping: float = 0.0,
        qr_method: str = "auto",
    ) -> None:
        for name, v in (("m", m), ("n", n), ("r", r)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if r > min(m, n):
            raise ValueError(f"rank r={r} exceeds min(m, n)={min(m, n)} for a {m}x{n} matrix")
        self.m, self.n, self.r = m, n, r
        self.metric = get_metric(metric, damping)
        self.qr_method = qr_method
        self.name = f"FactorQuotient({m}, {n}, {r}, {self.metric.name})"

    # --- structure --------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return (self.m + self.n - self.r) * self.r

    def frame(self, x: FactorPoint) -> Frame:
        """Orthonormal frame ``M = U R_M``, ``N = V R_N`` (compute once per step and reuse)."""
        return make_frame(x.M, x.N, self.qr_method)

    def to_matrix(self, x: FactorPoint) -> Tensor:
        """``X = M Nᵀ`` (dense ``(..., m, n)``)."""
        return x.M @ transpose(x.N)

    def differential(self, x: FactorPoint, u: FactorTangent) -> Tensor:
        """``Dπ(M, N)[(Ṁ, Ṅ)] = Ṁ Nᵀ + M Ṅᵀ`` (dense)."""
        return u.M @ transpose(x.N) + x.M @ transpose(u.N)

    # --- gradients and lifts -----------------------------------------------------------------
    def project_gradient(
        self, x: FactorPoint, grad_M: Tensor, grad_N: Tensor, frame: Frame | None = None
    ) -> FixedRankTangent:
        """``P_T(∇_X f)`` in factored form from ``∇_M = ∇_X f N``, ``∇_N = ∇_X fᵀ M``
        (LoRA-S eq. 12), in O((m + n) r²) without forming ``m x n``."""
        frame = self.frame(x) if frame is None else frame
        return project_factor_grads(frame, grad_M, grad_N)

    def to_tangent(
        self, x: FactorPoint, xdot: Tensor | FixedRankTangent, frame: Frame | None = None
    ) -> FixedRankTangent:
        """Factored ``P_T(Ẋ)`` of a dense ``Ẋ`` (or pass a factored one through)."""
        if isinstance(xdot, FixedRankTangent):
            return xdot
        if (err := check_shape("xdot", xdot, (self.m, self.n))) is not None:
            raise ValueError(err)
        frame = self.frame(x) if frame is None else frame
        return project_dense(frame, xdot)

    def lift(
        self, x: FactorPoint, xdot: Tensor | FixedRankTangent, frame: Frame | None = None
    ) -> FactorTangent:
        """Horizontal lift of ``Ẋ`` (dense ``(..., m, n)`` or factored relative to ``frame``):
        the horizontal ``(Ṁ, Ṅ)`` with ``Ṁ Nᵀ + M Ṅᵀ = P_T(Ẋ)``."""
        frame = self.frame(x) if frame is None else frame
        t = self.to_tangent(x, xdot, frame)
        return assemble_lift(frame, t, self.metric.lift_coefficients(frame, t.M))

    def tangent_to_dense(self, frame: Frame, t: FixedRankTangent) -> Tensor:
        """Dense ``U S Vᵀ + Up Vᵀ + U Vpᵀ``."""
        return tangent_to_dense(frame, t)

    def vertical_proj(self, x: FactorPoint, u: FactorTangent) -> FactorTangent:
        """Metric-orthogonal projection onto the vertical space ``{(M Ω, −N Ωᵀ)}``."""
        om = self.metric.vertical_coefficient(x, u)
        return FactorTangent(x.M @ om, -x.N @ transpose(om))

    def horizontal_proj(self, x: FactorPoint, u: FactorTangent) -> FactorTangent:
        """Metric-orthogonal projection onto the horizontal space."""
        v = self.vertical_proj(x, u)
        return FactorTangent(u.M - v.M, u.N - v.N)

    # --- Manifold interface ------------------------------------------------------------------
    def proj(self, x: FactorPoint, u: FactorTangent) -> FactorTangent:
        return self.horizontal_proj(x, FactorTangent(*u))

    def egrad2rgrad(self, x: FactorPoint, g: FactorTangent) -> FactorTangent:
        return self.metric.egrad2rgrad(x, FactorTangent(*g))

    def inner(self, x: FactorPoint, u: FactorTangent, v: FactorTangent | None = None) -> Tensor:
        return self.metric.inner(x, u, u if v is None else v)

    def retr(self, x: FactorPoint, u: FactorTangent) -> FactorPoint:
        check_finite_tree("retr: point", x)
        check_finite_tree("retr: tangent vector", u)
        return FactorPoint(x.M + u.M, x.N + u.N)

    def transp(self, x: FactorPoint, y: FactorPoint, v: FactorTangent) -> FactorTangent:
        return self.horizontal_proj(y, FactorTangent(*v))

    def random_point(
        self,
        *batch: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> FactorPoint:
        kw = {"dtype": dtype, "device": device, "generator": generator}
        return FactorPoint(
            torch.randn(*batch, self.m, self.r, **kw), torch.randn(*batch, self.n, self.r, **kw)
        )

    def _check_point(self, x, atol: float, rtol: float) -> tuple[bool, str | None]:
        if not (isinstance(x, tuple) and len(x) == 2):
            return False, "a point is a pair (M, N)"
        M, N = x
        for name, t, shape in (("M", M, (self.m, self.r)), ("N", N, (self.n, self.r))):
            if (err := check_shape(name, t, shape)) is not None:
                return False, err
            if not bool(torch.isfinite(t).all()):
                return False, f"{name} contains non-finite values"
        if M.shape[:-2] != N.shape[:-2]:
            return False, f"batch shapes differ: M {tuple(M.shape[:-2])}, N {tuple(N.shape[:-2])}"
        for name, t in (("M", M), ("N", N)):
            s = torch.linalg.svdvals(t)
            if bool((s[..., -1] <= rtol * s[..., 0]).any()):
                return False, f"{name} is rank deficient (smallest/largest singular value <= {rtol})"
        return True, None

    def _check_tangent(self, x, u, atol: float, rtol: float) -> tuple[bool, str | None]:
        if not (isinstance(u, tuple) and len(u) == 2):
            return False, "a tangent vector is a pair (Ṁ, Ṅ)"
        for name, t, ref in (("Ṁ", u[0], x[0]), ("Ṅ", u[1], x[1])):
            if not isinstance(t, Tensor) or t.shape != ref.shape:
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                return False, f"{name} has shape {got}, expected {tuple(ref.shape)}"
        return True, None

    def __repr__(self) -> str:
        return f"FactorQuotient(m={self.m}, n={self.n}, r={self.r}, metric={self.metric!r})"
