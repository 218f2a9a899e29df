"""Metrics on the factor space ``R*^{m×r} × R*^{n×r}`` and their horizontal lifts.

A metric on the total space fixes the *horizontal space* (the metric-orthogonal complement of the
vertical space ``{(M Ω, −N Ωᵀ)}``) and so the horizontal lift of a matrix tangent vector
``Ẋ ∈ T_X``: the unique horizontal ``(Ṁ, Ṅ)`` with ``Ṁ Nᵀ + M Ṅᵀ = P_T(Ẋ)``.

Every lift here has the same shape in the orthonormal frame ``M = U R_M``, ``N = V R_N``
(:mod:`geolora.manifolds.frame`) with ``Ẋ = U S Vᵀ + Up Vᵀ + U Vpᵀ``::

    Ṁ = U A_M + Up D_N,      Ṅ = V A_N + Vp D_M,

with ``r x r`` coefficients ``(A_M, D_N, A_N, D_M)`` that each metric computes in float64 from
``(S, R_M, R_N)``. Only the final assembly touches ``m x r`` / ``n x r`` matrices.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import NamedTuple

import torch
from torch import Tensor

from geolora.linalg import solve_lyapunov_core, solve_sylvester, solve_sylvester_gram, transpose
from geolora.manifolds.frame import Frame
from geolora.manifolds.types import FactorPoint, FactorTangent


class LiftCoefficients(NamedTuple):
    """``Ṁ = U A_M + Up D_N``, ``Ṅ = V A_N + Vp D_M`` (all ``(..., r, r)``, float64)."""

    AM: Tensor
    DN: Tensor
    AN: Tensor
    DM: Tensor


def _eye(r: int, like: Tensor) -> Tensor:
    return torch.eye(r, dtype=like.dtype, device=like.device)


def damped_inv_t(R: Tensor, damping: float) -> Tensor:
    """``R (RᵀR + δI)⁻¹`` in float64 (``= R⁻ᵀ`` for δ = 0, computed by a triangular solve)."""
    R = R.to(torch.float64)
    eye = _eye(R.shape[-1], R)
    if damping == 0.0:
        return transpose(torch.linalg.solve_triangular(R, eye, upper=True))
    G = transpose(R) @ R + damping * eye
    return transpose(torch.linalg.solve(G, transpose(R)))


def _gram(A: Tensor) -> Tensor:
    return transpose(A) @ A


class QuotientMetric(ABC):
    """A metric on the factor space; defines the horizontal space and the lift.

    ``damping`` δ ≥ 0 replaces the Gram matrices ``G = RᵀR`` by ``G + δI`` in the lift, which
    keeps it finite for rank-deficient factors (e.g. zero-initialised LoRA) at the price of an
    ``O(δ)`` error in ``Dπ[lift] = P_T(Ẋ)``.
    """

    name: str = "metric"
    #: ``True`` if the lift is GL(r)-equivariant, i.e. optimizers built on it are invariant.
    invariant: bool = True

    def __init__(self, damping: float = 0.0) -> None:
        if not damping >= 0.0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.damping = float(damping)

    @abstractmethod
    def lift_coefficients(self, frame: Frame, S: Tensor) -> LiftCoefficients:
        """The ``r x r`` coefficients of the horizontal lift of ``Ẋ`` with core ``S = Uᵀ Ẋ V``."""

    @abstractmethod
    def inner(self, x: FactorPoint, u: FactorTangent, v: FactorTangent) -> Tensor:
        """``ḡ_{(M, N)}(u, v)``, shape = batch shape."""

    @abstractmethod
    def egrad2rgrad(self, x: FactorPoint, g: FactorTangent) -> FactorTangent:
        """Riemannian gradient on the total space from the Euclidean factor gradients."""

    @abstractmethod
    def vertical_coefficient(self, x: FactorPoint, u: FactorTangent) -> Tensor:
        """``Ω`` such that ``u − (M Ω, −N Ωᵀ)`` is horizontal (metric-orthogonal projection)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(damping={self.damping})"


class BalancedMetric(QuotientMetric):
    """LoRA-S metric ``tr(G_M⁻¹ ṀᵀṀ') + tr(G_N⁻¹ ṄᵀṄ')`` (lora-s.txt eq. 7; Absil et al. 2007).

    Lift (lora-s.txt Alg. 1, eq. 9): ``G_M G_N K + K G_M G_N = Mᵀ Ẋ N``,
    ``Ṁ = (Ẋ N − M G_N K) G_N⁻¹``, ``Ṅ = (Ẋᵀ M − N G_M Kᵀ) G_M⁻¹``; it satisfies
    ``MᵀṀ = K G_M`` and ``ṄᵀN = G_N K``.

    Gauge-free evaluation (DESIGN.md): with ``W = R_M R_Nᵀ`` and ``K = R_Mᵀ K' R_M⁻ᵀ`` the
    equation becomes ``W Wᵀ K' + K' W Wᵀ = S Wᵀ`` and the lift simplifies to
    ``Ṁ = U K' R_M + Up R_N⁻ᵀ``, ``Ṅ = V (S − K' W)ᵀ R_M⁻ᵀ + Vp R_M⁻ᵀ``
    (using ``S − W Wᵀ K' W⁻ᵀ = K' W``). Its conditioning depends on X's singular values only.
    With damping δ > 0 the Gram-matrix route with ``G + δI`` is used instead.
    """

    name = "balanced"

    def lift_coefficients(self, frame: Frame, S: Tensor) -> LiftCoefficients:
        f64 = torch.float64
        RM, RN, S = frame.RM.to(f64), frame.RN.to(f64), S.to(f64)
        if self.damping == 0.0:
            W = RM @ transpose(RN)
            Kp = solve_lyapunov_core(W, S)
            DM, DN = damped_inv_t(RM, 0.0), damped_inv_t(RN, 0.0)
            return LiftCoefficients(Kp @ RM, DN, transpose(S - Kp @ W) @ DM, DM)
        GM, GN = _gram(RM), _gram(RN)
        K = solve_sylvester_gram(GM, GN, transpose(RM) @ S @ RN, damping=self.damping)
        eye = _eye(S.shape[-1], S)
        iGN = torch.linalg.inv(GN + self.damping * eye)
        iGM = torch.linalg.inv(GM + self.damping * eye)
        AM = (S @ RN - RM @ GN @ K) @ iGN
        AN = (transpose(S) @ RM - RN @ GM @ transpose(K)) @ iGM
        return LiftCoefficients(AM, RN @ iGN, AN, RM @ iGM)

    def inner(self, x: FactorPoint, u: FactorTangent, v: FactorTangent) -> Tensor:
        GM, GN = _gram(x.M), _gram(x.N)
        a = torch.linalg.solve(GM, transpose(u.M) @ v.M)
        b = torch.linalg.solve(GN, transpose(u.N) @ v.N)
        return torch.diagonal(a, dim1=-2, dim2=-1).sum(-1) + torch.diagonal(b, dim1=-2, dim2=-1).sum(-1)

    def egrad2rgrad(self, x: FactorPoint, g: FactorTangent) -> FactorTangent:
        return FactorTangent(g.M @ _gram(x.M), g.N @ _gram(x.N))

    def vertical_coefficient(self, x: FactorPoint, u: FactorTangent) -> Tensor:
        # Horizontal iff Mᵀ Ṁ G_M⁻¹ = G_N⁻¹ Ṅᵀ N; for u − (MΩ, −NΩᵀ), multiplying by G_N on
        # the left and G_M on the right: G_N G_M Ω + Ω G_N G_M = G_N MᵀṀ − ṄᵀN G_M.
        GM, GN = _gram(x.M), _gram(x.N)
        C = GN @ transpose(x.M) @ u.M - transpose(u.N) @ x.N @ GM
        return solve_sylvester_gram(GN, GM, C)


class PreconditionedMetric(QuotientMetric):
    """Metric ``tr(G_N ṀᵀṀ') + tr(G_M ṄᵀṄ')`` (Mishra–Sepulchre 2014; ScaledGD, Tong et al. 2021;
    Riemannian-preconditioned LoRA, Zhang & Pilanci 2024; lora-s.txt eq. 6).

    Closed-form lift: ``Ṁ = (I − ½P_M) Ẋ N G_N⁻¹``, ``Ṅ = (I − ½P_N) Ẋᵀ M G_M⁻¹``, i.e. in the
    frame ``Ṁ = (½ U S + Up) R_N⁻ᵀ``, ``Ṅ = (½ V Sᵀ + Vp) R_M⁻ᵀ``.
    """

    name = "preconditioned"

    def lift_coefficients(self, frame: Frame, S: Tensor) -> LiftCoefficients:
        S = S.to(torch.float64)
        DM, DN = damped_inv_t(frame.RM, self.damping), damped_inv_t(frame.RN, self.damping)
        return LiftCoefficients(0.5 * S @ DN, DN, 0.5 * transpose(S) @ DM, DM)

    def inner(self, x: FactorPoint, u: FactorTangent, v: FactorTangent) -> Tensor:
        GM, GN = _gram(x.M), _gram(x.N)
        a = (GN * (transpose(u.M) @ v.M)).sum(dim=(-2, -1))
        b = (GM * (transpose(u.N) @ v.N)).sum(dim=(-2, -1))
        return a + b

    def egrad2rgrad(self, x: FactorPoint, g: FactorTangent) -> FactorTangent:
        GM, GN = _gram(x.M), _gram(x.N)
        return FactorTangent(
            transpose(torch.linalg.solve(GN, transpose(g.M))),
            transpose(torch.linalg.solve(GM, transpose(g.N))),
        )

    def vertical_coefficient(self, x: FactorPoint, u: FactorTangent) -> Tensor:
        # Horizontal iff MᵀṀ G_N = G_M ṄᵀN  =>  Ω = ½ (G_M⁻¹ MᵀṀ − ṄᵀN G_N⁻¹).
        GM, GN = _gram(x.M), _gram(x.N)
        a = torch.linalg.solve(GM, transpose(x.M) @ u.M)
        b = transpose(torch.linalg.solve(GN, transpose(transpose(u.N) @ x.N)))
        return 0.5 * (a - b)


class FlatMetric(QuotientMetric):
    """Euclidean metric ``tr(ṀᵀṀ') + tr(ṄᵀṄ')`` — plain LoRA geometry, *not* GL(r)-invariant.

    Horizontal iff ``MᵀṀ = ṄᵀN``. Lift = the preconditioned lift ``(Ṁ₀, Ṅ₀)`` plus the vertical
    correction ``(M Ω, −N Ωᵀ)`` with ``G_M Ω + Ω G_N = Ṅ₀ᵀN − MᵀṀ₀`` (a Sylvester solve).
    Useful as the control in invariance experiments (Mishra et al. 2014, "MMMF").
    """

    name = "flat"
    invariant = False

    def lift_coefficients(self, frame: Frame, S: Tensor) -> LiftCoefficients:
        f64 = torch.float64
        RM, RN, S = frame.RM.to(f64), frame.RN.to(f64), S.to(f64)
        DM, DN = damped_inv_t(RM, self.damping), damped_inv_t(RN, self.damping)
        AM0, AN0 = 0.5 * S @ DN, 0.5 * transpose(S) @ DM
        # Mᵀ Ṁ₀ = R_Mᵀ A_M0 ;  Ṅ₀ᵀ N = A_N0ᵀ R_N.
        C = transpose(AN0) @ RN - transpose(RM) @ AM0
        eye = _eye(S.shape[-1], S)
        Om = solve_sylvester(_gram(RM) + self.damping * eye, _gram(RN) + self.damping * eye, C)
        return LiftCoefficients(AM0 + RM @ Om, DN, AN0 - RN @ transpose(Om), DM)

    def inner(self, x: FactorPoint, u: FactorTangent, v: FactorTangent) -> Tensor:
        return (u.M * v.M).sum(dim=(-2, -1)) + (u.N * v.N).sum(dim=(-2, -1))

    def egrad2rgrad(self, x: FactorPoint, g: FactorTangent) -> FactorTangent:
        return FactorTangent(g.M, g.N)

    def vertical_coefficient(self, x: FactorPoint, u: FactorTangent) -> Tensor:
        # MᵀṀ − G_M Ω = ṄᵀN + Ω G_N  =>  G_M Ω + Ω G_N = MᵀṀ − ṄᵀN.
        C = transpose(x.M) @ u.M - transpose(u.N) @ x.N
        return solve_sylvester(_gram(x.M), _gram(x.N), C)


METRICS: dict[str, type[QuotientMetric]] = {
    "balanced": BalancedMetric,
    "preconditioned": PreconditionedMetric,
    "flat": FlatMetric,
}


def get_metric(metric: str | QuotientMetric, damping: float = 0.0) -> QuotientMetric:
    """A metric instance from a name (``"balanced"``, ``"preconditioned"``, ``"flat"``) or instance."""
    if isinstance(metric, QuotientMetric):
        return metric
    try:
        return METRICS[metric](damping=damping)
    except KeyError:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(METRICS)}") from None
