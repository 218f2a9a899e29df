"""Metrics on the factor space ``R*^{m×r} × R*^{n×r}`` and their horizontal lifts.

A metric on the total space fixes the *horizontal space* (the metric-orthogonal complement of the
vertical space ``{(M Ω, −N Ωᵀ)}``) and so the horizontal lift of a matrix tangent vector
``Ẋ ∈ T_X``: the unique horizontal ``(Ṁ, Ṅ)`` with ``Ṁ Nᵀ + M Ṅᵀ = P_T(Ẋ)``.

Every lift here has the same shape in the orthonormal frame ``M = U R_M``, ``N = V R_N``
(:mod:`geolora.manifolds.frame`) with ``Ẋ = U S Vᵀ + Up Vᵀ + U Vpᵀ``::

    Ṁ = U A_M + Up D_N,      Ṅ = V A_N + Vp D_M,

with ``r x r`` coefficients ``(A_M, D_N, A_N, D_M)`` that each metric computes in float64 from
``(S, R_M, R_N)``. Only the final assembly touches ``m x r`` / ``n x r`` matrices.

The balanced metric and its Sylvester lift are those of Zheng & Wu, "LoRA-S: An Efficient Low
Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview Guo2XGgxZA (LoRA-S below).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from geolora.linalg import (
    SignIteration,
    apply_lyapunov_sequence,
    lyapunov_sequence,
    solve_lyapunov_core,
    solve_sylvester,
    solve_sylvester_gram,
    svd_small,
    transpose,
)
from geolora.manifolds.frame import Frame
from geolora.manifolds.types import FactorPoint, FactorTangent, FixedRankTangent


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


def _trace(A: Tensor) -> Tensor:
    return torch.diagonal(A, dim1=-2, dim2=-1).sum(-1)


#: How :class:`FrameCore` solves the gauge-free Lyapunov equation of the balanced lift:
#: ``"svd"`` (closed form from the SVD of the core, most accurate), ``"newton"`` / ``"schulz"``
#: (sign-function iterations on ``A = W Wᵀ``, :func:`geolora.linalg.lyapunov_sequence`).
CORE_SOLVERS = ("auto", "svd", "newton", "schulz")
#: The iteration used on accelerators for ``r > 32``, where cuSOLVER's batched SVD / ``eigh``
#: leave their fast batched kernels. Measured on an H100 for 224 float64 cores of 64×64
#: (docs/benchmarks/gpu.md): SVD 360 ms, ``eigh`` 172 ms, Newton 5.9 ms (a second right-hand
#: side 0.7 ms), Newton–Schulz 10.5 ms.
ACCELERATOR_SOLVER = "newton"
_solver_override: str | None = os.environ.get("GEOLORA_CORE_SOLVER") or None


def core_solver(device: torch.device, r: int) -> str:
    """The Lyapunov solver :class:`FrameCore` uses for rank ``r`` on ``device``: ``"svd"`` on
    CPU and for ``r <= 32``, :data:`ACCELERATOR_SOLVER` otherwise, unless overridden by
    :func:`use_core_solver` or the environment variable ``GEOLORA_CORE_SOLVER``."""
    if _solver_override not in (None, "auto"):
        if _solver_override not in CORE_SOLVERS:
            raise ValueError(
                f"GEOLORA_CORE_SOLVER={_solver_override!r} is not a core solver; "
                f"choose from {CORE_SOLVERS}"
            )
        return _solver_override
    return "svd" if device.type == "cpu" or r <= 32 else ACCELERATOR_SOLVER


@contextmanager
def use_core_solver(name: str) -> Iterator[None]:
    """Force the :class:`FrameCore` Lyapunov solver (one of :data:`CORE_SOLVERS`) within the
    block, e.g. to compare them (``benchmarks/gpu_perf.py``, tests)."""
    global _solver_override
    if name not in CORE_SOLVERS:
        raise ValueError(f"core solver must be one of {CORE_SOLVERS}, got {name!r}")
    old, _solver_override = _solver_override, name
    try:
        yield
    finally:
        _solver_override = old


class FrameCore:
    """The float64 ``r x r`` part of a frame, each piece computed once and then reused.

    ``R_M``, ``R_N``, the core ``W = R_M R_Nᵀ``, its SVD ``W = Φ Σ Ψᵀ`` (``svd()``) and the
    damped inverses ``R (RᵀR + δI)⁻¹`` (``inv_t``). One optimizer step needs them for the lift
    and again for the metric norm (LRACS, AdamS with the Riemannian second moment); a
    ``FrameCore`` shared between the calls makes the second use free. ``svd`` may be given when
    it is known in closed form (e.g. the balanced representative, ``W = Σ``).
    Shapes ``(..., r, r)``.
    """

    def __init__(
        self, RM: Tensor, RN: Tensor, svd: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> None:
        self.RM = RM.to(torch.float64)
        self.RN = RN.to(torch.float64)
        self._svd = svd
        self._W: Tensor | None = None
        self._W_inv: Tensor | None = None
        self._inv: dict[tuple[str, float], Tensor] = {}
        self.solver = "svd" if svd is not None else core_solver(self.RM.device, RM.shape[-1])
        self._seq: SignIteration | None = None

    @classmethod
    def of(cls, frame: Frame) -> FrameCore:
        """The core of ``frame`` (only ``R_M``, ``R_N`` are read)."""
        return cls(frame.RM, frame.RN)

    @property
    def W(self) -> Tensor:
        """``W = R_M R_Nᵀ`` (``X = U W Vᵀ``)."""
        if self._W is None:
            self._W = self.RM @ transpose(self.RN)
        return self._W

    def svd(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(Φ, σ, Ψ)`` with ``W = Φ diag(σ) Ψᵀ`` (σ descending)."""
        if self._svd is None:
            phi, sig, psi_h = svd_small(self.W)
            self._svd = (phi, sig, transpose(psi_h))
        return self._svd

    def W_inv(self) -> Tensor:
        """``W⁻¹`` (LU; depends on X's conditioning only, not on the gauge)."""
        if self._W_inv is None:
            self._W_inv = torch.linalg.inv(self.W)
        return self._W_inv

    def lyapunov(self, S: Tensor) -> Tensor:
        """``K'`` with ``W Wᵀ K' + K' W Wᵀ = S Wᵀ`` (float64; :func:`solve_lyapunov_core`
        with the shared SVD, or the cached sign iteration on ``A = W Wᵀ``)."""
        S = S.to(torch.float64)
        if self.solver == "svd":
            return solve_lyapunov_core(self.W, S, svd=self.svd())
        W = self.W
        if self._seq is None:
            self._seq = lyapunov_sequence(W @ transpose(W), self.solver)
        return apply_lyapunov_sequence(self._seq, S @ transpose(W))

    def inv_t(self, side: str, damping: float = 0.0) -> Tensor:
        """``R (RᵀR + δI)⁻¹`` of ``R_M`` (``side="M"``) or ``R_N`` (``"N"``); ``R⁻ᵀ`` for δ = 0."""
        key = (side, float(damping))
        if key not in self._inv:
            self._inv[key] = damped_inv_t(self.RM if side == "M" else self.RN, damping)
        return self._inv[key]

    def grams(self) -> tuple[Tensor, Tensor]:
        """``(G_M, G_N) = (R_MᵀR_M, R_NᵀR_N)`` — the factors' Gram matrices ``MᵀM``, ``NᵀN``."""
        return _gram(self.RM), _gram(self.RN)


def tangent_grams(t: FixedRankTangent) -> tuple[Tensor, Tensor]:
    """``(Upᵀ Up, Vpᵀ Vp)`` in float64, ``(..., r, r)`` (two ``O((m + n) r²)`` products)."""
    return _gram(t.Up).to(torch.float64), _gram(t.Vp).to(torch.float64)


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

    def core_coefficients(self, core: FrameCore, S: Tensor) -> LiftCoefficients:
        """:meth:`lift_coefficients` from the frame's ``r x r`` part only (with a shared
        :class:`FrameCore`). The built-in metrics implement it; the default raises
        ``NotImplementedError`` (then the lift goes through :meth:`lift_coefficients`)."""
        raise NotImplementedError

    def gram_inner(self, GM: Tensor, GN: Tensor, MtM: Tensor, NtN: Tensor) -> Tensor:
        """``ḡ(u, u)`` from ``r x r`` Grams: ``G_M = MᵀM``, ``G_N = NᵀN``, ``ṀᵀṀ``, ``ṄᵀṄ``
        (every metric here depends on ``u`` only through them). Default: ``NotImplementedError``."""
        raise NotImplementedError

    @property
    def gauge_free_sqnorm(self) -> bool:
        """``True`` if :meth:`sqnorm_from_grams` is a closed form in gauge-free quantities
        (``S``, ``W``, ``Pu``, ``Pv``), so evaluating it at any representative is as accurate as
        at the balanced one. Default ``False``."""
        return False

    @property
    def has_core(self) -> bool:
        """``True`` if :meth:`core_coefficients` and :meth:`gram_inner` are implemented."""
        cls = type(self)
        return (
            cls.core_coefficients is not QuotientMetric.core_coefficients
            and cls.gram_inner is not QuotientMetric.gram_inner
        )

    def coefficients(
        self, frame: Frame, S: Tensor, core: FrameCore | None = None
    ) -> LiftCoefficients:
        """:meth:`core_coefficients` with ``core`` (built from ``frame`` if ``None``) where
        implemented, else :meth:`lift_coefficients`."""
        if type(self).core_coefficients is QuotientMetric.core_coefficients:
            return self.lift_coefficients(frame, S)
        return self.core_coefficients(FrameCore.of(frame) if core is None else core, S)

    def sqnorm_from_grams(self, core: FrameCore, S: Tensor, Pu: Tensor, Pv: Tensor) -> Tensor:
        """``‖lift(Ẋ)‖²_g`` in ``r x r`` work from ``S`` and ``Pu = UpᵀUp``, ``Pv = VpᵀVp``.

        With ``Ṁ = U A_M + Up D_N``, ``Ṅ = V A_N + Vp D_M`` and ``Uᵀ Up = 0``, ``Vᵀ Vp = 0``:
        ``ṀᵀṀ = A_MᵀA_M + D_Nᵀ Pu D_N`` and ``ṄᵀṄ = A_NᵀA_N + D_Mᵀ Pv D_M``, then
        :meth:`gram_inner`. Float64, shape = batch shape.
        """
        AM, DN, AN, DM = self.core_coefficients(core, S)
        MtM = _gram(AM) + transpose(DN) @ Pu @ DN
        NtN = _gram(AN) + transpose(DM) @ Pv @ DM
        GM, GN = core.grams()
        return self.gram_inner(GM, GN, MtM, NtN)

    def lift_sqnorm(
        self, frame: Frame, t: FixedRankTangent, core: FrameCore | None = None
    ) -> Tensor:
        """``ḡ(u, u)`` of the horizontal lift ``u`` of ``t`` at the factors of ``frame``, without
        forming ``u``: ``O((m + n) r²)`` for the Grams of ``Up``, ``Vp`` and ``r x r`` work
        (:meth:`sqnorm_from_grams`). Equals ``inner(x, u, u)`` up to rounding. Float64."""
        core = FrameCore.of(frame) if core is None else core
        Pu, Pv = tangent_grams(t)
        return self.sqnorm_from_grams(core, t.M.to(torch.float64), Pu, Pv)

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
    """LoRA-S metric ``tr(G_M⁻¹ ṀᵀṀ') + tr(G_N⁻¹ ṄᵀṄ')`` (LoRA-S eq. 7; Absil et al. 2007).

    Lift (LoRA-S Alg. 1, eq. 9): ``G_M G_N K + K G_M G_N = Mᵀ Ẋ N``,
    ``Ṁ = (Ẋ N − M G_N K) G_N⁻¹``, ``Ṅ = (Ẋᵀ M − N G_M Kᵀ) G_M⁻¹``; it satisfies
    ``MᵀṀ = K G_M`` and ``ṄᵀN = G_N K``.

    Gauge-free evaluation (``docs/design.md``, "Gauge-free lift"): with ``W = R_M R_Nᵀ`` and
    ``K = R_Mᵀ K' R_M⁻ᵀ`` the equation becomes ``W Wᵀ K' + K' W Wᵀ = S Wᵀ`` and the lift
    simplifies to ``Ṁ = U K' R_M + Up R_N⁻ᵀ``, ``Ṅ = V (S − K' W)ᵀ R_M⁻ᵀ + Vp R_M⁻ᵀ``
    (using ``S − W Wᵀ K' W⁻ᵀ = K' W``). Its conditioning depends on X's singular values only.
    With damping δ > 0 the Gram-matrix route with ``G + δI`` is used instead.
    """

    name = "balanced"

    def lift_coefficients(self, frame: Frame, S: Tensor) -> LiftCoefficients:
        return self.core_coefficients(FrameCore.of(frame), S)

    def core_coefficients(self, core: FrameCore, S: Tensor) -> LiftCoefficients:
        S = S.to(torch.float64)
        RM, RN = core.RM, core.RN
        if self.damping == 0.0:
            Kp = core.lyapunov(S)
            DM, DN = core.inv_t("M"), core.inv_t("N")
            return LiftCoefficients(Kp @ RM, DN, transpose(S - Kp @ core.W) @ DM, DM)
        GM, GN = core.grams()
        K = solve_sylvester_gram(GM, GN, transpose(RM) @ S @ RN, damping=self.damping)
        eye = _eye(S.shape[-1], S)
        iGN = torch.linalg.inv(GN + self.damping * eye)
        iGM = torch.linalg.inv(GM + self.damping * eye)
        AM = (S @ RN - RM @ GN @ K) @ iGN
        AN = (transpose(S) @ RM - RN @ GM @ transpose(K)) @ iGM
        return LiftCoefficients(AM, RN @ iGN, AN, RM @ iGM)

    def gram_inner(self, GM: Tensor, GN: Tensor, MtM: Tensor, NtN: Tensor) -> Tensor:
        return _trace(torch.linalg.solve(GM, MtM)) + _trace(torch.linalg.solve(GN, NtN))

    @property
    def gauge_free_sqnorm(self) -> bool:
        return self.damping == 0.0

    def sqnorm_from_grams(self, core: FrameCore, S: Tensor, Pu: Tensor, Pv: Tensor) -> Tensor:
        """Gauge-free closed form for δ = 0 (``W = Φ Σ Ψᵀ``, ``K'`` the Lyapunov solution,
        ``Z = S − K'W``): ``‖u‖²_g = ‖K'‖² + tr(Σ⁻² ΨᵀPuΨ) + ‖Σ⁻¹ΦᵀZ‖² + tr(Σ⁻² ΦᵀPvΦ)`` —
        the ``R_M``, ``R_N`` of the gauge cancel (``tr(G_M⁻¹ A_MᵀA_M) = ‖K'‖²``,
        ``D_N G_M⁻¹ D_Nᵀ = (WᵀW)⁻¹``, ...), so only X's singular values enter. Without the SVD
        (``core.solver != "svd"``) the same terms are ``tr(Pu W⁻¹W⁻ᵀ) + ‖W⁻¹Z‖² + tr(Pv W⁻ᵀW⁻¹)``."""
        if self.damping != 0.0:
            return super().sqnorm_from_grams(core, S, Pu, Pv)
        S = S.to(torch.float64)
        W = core.W
        Kp = core.lyapunov(S)
        if core.solver != "svd":
            Wi = core.W_inv()
            Z = Wi @ (S - Kp @ W)
            return (
                (Kp * Kp).sum(dim=(-2, -1))
                + ((Pu @ Wi) * Wi).sum(dim=(-2, -1))
                + (Z * Z).sum(dim=(-2, -1))
                + ((Wi @ Pv) * Wi).sum(dim=(-2, -1))
            )
        phi, sig, psi = core.svd()
        inv2 = 1.0 / (sig * sig)
        Z = transpose(phi) @ (S - Kp @ W)
        pu = torch.diagonal(transpose(psi) @ Pu @ psi, dim1=-2, dim2=-1)
        pv = torch.diagonal(transpose(phi) @ Pv @ phi, dim1=-2, dim2=-1)
        return (
            (Kp * Kp).sum(dim=(-2, -1))
            + ((pu + pv) * inv2).sum(-1)
            + ((Z * Z).sum(-1) * inv2).sum(-1)
        )

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
    Riemannian-preconditioned LoRA, Zhang & Pilanci 2024; LoRA-S eq. 6).

    Closed-form lift: ``Ṁ = (I − ½P_M) Ẋ N G_N⁻¹``, ``Ṅ = (I − ½P_N) Ẋᵀ M G_M⁻¹``, i.e. in the
    frame ``Ṁ = (½ U S + Up) R_N⁻ᵀ``, ``Ṅ = (½ V Sᵀ + Vp) R_M⁻ᵀ``.
    """

    name = "preconditioned"

    def lift_coefficients(self, frame: Frame, S: Tensor) -> LiftCoefficients:
        return self.core_coefficients(FrameCore.of(frame), S)

    def core_coefficients(self, core: FrameCore, S: Tensor) -> LiftCoefficients:
        S = S.to(torch.float64)
        DM, DN = core.inv_t("M", self.damping), core.inv_t("N", self.damping)
        return LiftCoefficients(0.5 * S @ DN, DN, 0.5 * transpose(S) @ DM, DM)

    def gram_inner(self, GM: Tensor, GN: Tensor, MtM: Tensor, NtN: Tensor) -> Tensor:
        return (GN * MtM).sum(dim=(-2, -1)) + (GM * NtN).sum(dim=(-2, -1))

    @property
    def gauge_free_sqnorm(self) -> bool:
        return self.damping == 0.0

    def sqnorm_from_grams(self, core: FrameCore, S: Tensor, Pu: Tensor, Pv: Tensor) -> Tensor:
        """Closed form for δ = 0: ``‖u‖²_g = ½‖S‖² + tr(Pu) + tr(Pv)`` (gauge-free)."""
        if self.damping != 0.0:
            return super().sqnorm_from_grams(core, S, Pu, Pv)
        return 0.5 * (S * S).sum(dim=(-2, -1)) + _trace(Pu) + _trace(Pv)

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
        return self.core_coefficients(FrameCore.of(frame), S)

    def core_coefficients(self, core: FrameCore, S: Tensor) -> LiftCoefficients:
        RM, RN, S = core.RM, core.RN, S.to(torch.float64)
        DM, DN = core.inv_t("M", self.damping), core.inv_t("N", self.damping)
        AM0, AN0 = 0.5 * S @ DN, 0.5 * transpose(S) @ DM
        # Mᵀ Ṁ₀ = R_Mᵀ A_M0 ;  Ṅ₀ᵀ N = A_N0ᵀ R_N.
        C = transpose(AN0) @ RN - transpose(RM) @ AM0
        eye = _eye(S.shape[-1], S)
        Om = solve_sylvester(_gram(RM) + self.damping * eye, _gram(RN) + self.damping * eye, C)
        return LiftCoefficients(AM0 + RM @ Om, DN, AN0 - RN @ transpose(Om), DM)

    def gram_inner(self, GM: Tensor, GN: Tensor, MtM: Tensor, NtN: Tensor) -> Tensor:
        return _trace(MtM) + _trace(NtN)

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
