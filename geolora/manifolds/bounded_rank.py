"""The desingularized manifold of bounded-rank matrices (LoRAM-BR geometry)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geolora.linalg import qf, transpose
from geolora.manifolds.base import Manifold, check_finite_tree, check_shape, first_shape_error
from geolora.manifolds.types import BoundedRankPoint, BoundedRankTangent
from geolora.retractions.bounded_rank import (
    NUCLEAR_MODES,
    bounded_rank_retraction,
    bounded_rank_transport,
    nuclear_polar_factor,
    project_products,
)

__all__ = ["BoundedRank"]


class BoundedRank(Manifold):
    r"""Desingularization of ``{X ∈ R^{m×n} : rank X ≤ r}`` (Khrulkov–Oseledets 2018;
    Rebjock–Boumal 2024; Jiang, Wang & Stich, "LoRAM: Low-Rank Adaptation of Large Language Models
    on Manifold", ICLR 2025 Workshop on Sparsity in LLMs, OpenReview 6cLPObfitT (LoRAM below),
    §2, Alg. 5–8).

    Set: ``M = {(X, P) ∈ R^{m×n} × Gr(n, n−r) : X P = 0}`` (``P`` an orthogonal projector of rank
    ``n − r``), a smooth manifold of dimension ``(m + n − r) r`` that maps onto *all* matrices of
    rank ≤ r — rank drops are allowed, unlike :class:`FixedRank`.

    Points: :class:`BoundedRankPoint` ``(K, V)``, ``K: (..., m, r)``, ``V: (..., n, r)`` with
    ``VᵀV = I``; ``X = K Vᵀ``, ``P = I − VVᵀ``. ``K`` may be rank deficient, also ``K = 0``
    (with any orthonormal ``V``): this is a valid point, which is how a zero-initialised LoRA
    ``B = 0`` is represented (:meth:`from_factors`). ``(K Q, V Q)``, ``Q ∈ O(r)``, is the same point.

    Tangent vectors: :class:`BoundedRankTangent` ``(K̇, V̇p)`` with ``Vᵀ V̇p = 0``; they are
    ``(Ẋ, Ṗ) = (K̇Vᵀ + K V̇pᵀ, −(V̇pVᵀ + VV̇pᵀ))`` and the velocity of the curve
    ``(K + tK̇, V + tV̇p)`` at ``t = 0``.

    Metric (ambient ``‖Ẋ‖² + α‖Ṗ‖²`` on ``R^{m×n} × Sym(n)``, Rebjock–Boumal; with
    ``‖Ṗ‖² = 2‖V̇p‖²`` and ``tr(K̇ᵀ K V̇pᵀ V) = 0``)::

        ⟨(K̇, V̇p), (K̇', V̇p')⟩ = tr(K̇ᵀK̇') + tr(V̇p (KᵀK + 2αI) V̇p'ᵀ),

    positive definite also at ``K = 0`` because ``α > 0``. LoRAM's ``S(α) = 2αI + S²`` (§2) with
    ``K = U S`` is the same matrix ``KᵀK + 2αI``.

    Projection of a parameter-space vector ``(A, B) ∈ R^{m×r} × R^{n×r}``: ``(A, (I − VVᵀ) B)``
    (orthogonal for both the Euclidean and the metric-weighted inner product).
    Projection of an ambient vector ``(Z, W) ∈ R^{m×n} × Sym(n)`` (:meth:`proj_ambient`):
    ``(Z V, (I − VVᵀ)(ZᵀK − 2αWV)(KᵀK + 2αI)⁻¹)``.

    Riemannian gradient of ``f(X)`` (LoRAM Alg. 6), from ``∇_X f V`` and ``∇_X fᵀ K`` (what
    autograd gives for ``X = K Vᵀ``: ``∂f/∂K = ∇_X f V``, ``∂f/∂V = ∇_X fᵀ K``)::

        grad f = (∇_X f V,  (I − VVᵀ) ∇_X fᵀ K (KᵀK + 2αI)⁻¹).

    Retraction (Q-factor; Rebjock–Boumal; LoRAM Alg. 7): ``V⁺ = qf(V + V̇p)``,
    ``K⁺ = (KVᵀ + K̇Vᵀ + KV̇pᵀ) V⁺ = (K + K̇)(VᵀV⁺) + K(V̇pᵀV⁺)``; optional nuclear-norm term, see
    :meth:`retr`. Transport: orthogonal projection of ``(Ẋ, Ṗ)`` onto the new tangent space
    (LoRAM Alg. 8). All operations cost ``O((m + n) r²)`` and accept batch dimensions.

    Args:
        m, n: matrix shape. r: rank bound, ``1 ≤ r ≤ min(m, n)``.
        alpha: weight ``α > 0`` of the Grassmann part of the metric (LoRAM §2: usually 0.5).
        qr_method: QR used by the retraction (:func:`geolora.linalg.qr_pos`).
    """

    name = "BoundedRank"

    def __init__(self, m: int, n: int, r: int, alpha: float = 0.5, qr_method: str = "auto") -> None:
        for pname, val in (("m", m), ("n", n), ("r", r)):
            if isinstance(val, bool) or not isinstance(val, int):
                raise TypeError(f"{pname} must be an int, got {type(val).__name__}")
            if val < 1:
                raise ValueError(f"{pname} must be >= 1, got {val}")
        if r > min(m, n):
            raise ValueError(f"r must be <= min(m, n) = {min(m, n)}, got {r}")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
        if qr_method not in ("auto", "householder", "cholesky"):
            raise ValueError(
                f"qr_method must be 'auto', 'householder' or 'cholesky', got {qr_method!r}"
            )
        self.m, self.n, self.r = m, n, r
        self.alpha = float(alpha)
        self.qr_method = qr_method

    def __repr__(self) -> str:
        return f"BoundedRank(m={self.m}, n={self.n}, r={self.r}, alpha={self.alpha})"

    @property
    def dim(self) -> int:
        """``(m + n − r) r``: ``m r`` for ``K`` plus ``(n − r) r`` for the row space."""
        return (self.m + self.n - self.r) * self.r

    # --- input normalisation ----------------------------------------------------------------
    def _point(self, x, name: str = "x") -> BoundedRankPoint:
        if isinstance(x, BoundedRankPoint):
            return x
        if isinstance(x, tuple) and len(x) == 2 and all(isinstance(t, Tensor) for t in x):
            return BoundedRankPoint(*x)
        raise TypeError(f"{name} must be a BoundedRankPoint(K, V), got {type(x).__name__}")

    def _tangent(self, u, name: str = "u") -> BoundedRankTangent:
        if isinstance(u, BoundedRankTangent):
            return u
        if isinstance(u, tuple) and len(u) == 2 and all(isinstance(t, Tensor) for t in u):
            return BoundedRankTangent(*u)
        raise TypeError(f"{name} must be a BoundedRankTangent(K, Vp), got {type(u).__name__}")

    # --- geometry ---------------------------------------------------------------------------
    def proj(self, x: BoundedRankPoint, u: BoundedRankTangent) -> BoundedRankTangent:
        """``(A, B) ↦ (A, (I − VVᵀ) B)``: projection of a parameter-space vector onto ``T_x``."""
        x, u = self._point(x), self._tangent(u)
        V = x.V
        return BoundedRankTangent(u.K, u.Vp - V @ (transpose(V) @ u.Vp))

    def proj_ambient(
        self, x: BoundedRankPoint, z: tuple[Tensor, Tensor] | Tensor
    ) -> BoundedRankTangent:
        """Metric-orthogonal projection of an ambient ``(Z, W)`` (or ``Z`` alone, ``W = 0``).

        ``Z: (..., m, n)``, ``W: (..., n, n)`` symmetric; returns
        ``(Z V, (I − VVᵀ)(ZᵀK − 2αWV)(KᵀK + 2αI)⁻¹)``. Forms no new ``m × n`` matrix, but takes
        one: for checks and small problems.
        """
        x = self._point(x)
        K, V = x
        Z, W = (z, None) if isinstance(z, Tensor) else z
        Y = transpose(Z) @ K
        if W is not None:
            Y = Y - (2.0 * self.alpha) * (W @ V)
        return BoundedRankTangent(*project_products(K, V, Z @ V, Y, self.alpha))

    def rgrad_factored(self, x: BoundedRankPoint, GV: Tensor, GtK: Tensor) -> BoundedRankTangent:
        """Riemannian gradient from ``GV = ∇_X f V: (..., m, r)`` and ``GtK = ∇_X fᵀ K: (..., n, r)``.

        ``(GV, (I − VVᵀ) GtK (KᵀK + 2αI)⁻¹)`` (LoRAM Alg. 6). These are exactly the autograd
        gradients of ``f(K Vᵀ)`` with respect to ``K`` and ``V``.
        """
        x = self._point(x)
        return BoundedRankTangent(*project_products(x.K, x.V, GV, GtK, self.alpha))

    def egrad2rgrad(self, x: BoundedRankPoint, g) -> BoundedRankTangent:
        """Riemannian gradient from a Euclidean gradient.

        ``g`` is either the dense ``∇_X f: (..., m, n)`` or the pair of autograd gradients
        ``(∂f/∂K, ∂f/∂V) = (∇_X f V, ∇_X fᵀ K)`` (any 2-tuple, e.g. a :class:`BoundedRankPoint`
        holding ``K.grad, V.grad``); see :meth:`rgrad_factored`.
        """
        x = self._point(x)
        if isinstance(g, Tensor):
            err = check_shape("g", g, (self.m, self.n))
            if err:
                raise ValueError(err)
            return self.proj_ambient(x, g)
        if isinstance(g, tuple) and len(g) == 2:
            return self.rgrad_factored(x, g[0], g[1])
        raise TypeError(
            "g must be a dense gradient tensor (..., m, n) or a pair (grad_K, grad_V), "
            f"got {type(g).__name__}"
        )

    def inner(
        self, x: BoundedRankPoint, u: BoundedRankTangent, v: BoundedRankTangent | None = None
    ) -> Tensor:
        """``tr(K̇ᵀK̇') + tr(V̇p (KᵀK + 2αI) V̇p'ᵀ)``; shape = batch shape."""
        x, u = self._point(x), self._tangent(u)
        v = u if v is None else self._tangent(v, "v")
        K = x.K
        GVp = u.Vp @ (transpose(K) @ K) + (2.0 * self.alpha) * u.Vp
        return (u.K * v.K).sum(dim=(-2, -1)) + (GVp * v.Vp).sum(dim=(-2, -1))

    def retr(
        self,
        x: BoundedRankPoint,
        u: BoundedRankTangent,
        *,
        nuclear_lambda: Tensor | float = 0.0,
        nuclear_mode: str = "subgradient",
    ) -> BoundedRankPoint:
        """Q-factor retraction, optionally with a nuclear-norm step (LoRAM Alg. 7).

        ``V⁺ = qf(V + V̇p)``, ``K⁺ = (K + K̇)(VᵀV⁺) + K(V̇pᵀV⁺)`` (``X⁺ = (X + Ẋ) V⁺V⁺ᵀ``).
        With ``nuclear_lambda = λ > 0`` (the whole step's amount, e.g. ``lr · λ``):

        * ``nuclear_mode="subgradient"`` (paper): adds ``−λ Q Vᵀ`` to ``X + Ẋ`` before the
          projection, ``Q`` the polar factor of ``K`` — the same as retracting along
          ``u − λ·(Q, 0)``, where ``(Q, 0)`` is the Riemannian gradient of ``‖X‖_*`` at a
          point of rank r (:meth:`nuclear_subgradient`).
        * ``nuclear_mode="prox"``: soft-thresholds the singular values of ``K⁺`` by ``λ``
          (the proximal map of ``λ‖X⁺‖_*``; ``V⁺`` unchanged).
        """
        x, u = self._point(x), self._tangent(u)
        if nuclear_mode not in NUCLEAR_MODES:
            raise ValueError(f"nuclear_mode must be one of {NUCLEAR_MODES}, got {nuclear_mode!r}")
        if isinstance(nuclear_lambda, Tensor):
            if bool((nuclear_lambda < 0).any()):
                raise ValueError("nuclear_lambda must be >= 0")
        elif not nuclear_lambda >= 0:
            raise ValueError(f"nuclear_lambda must be >= 0, got {nuclear_lambda}")
        return bounded_rank_retraction(
            x, u, nuclear_lambda=nuclear_lambda, nuclear_mode=nuclear_mode, qr_method=self.qr_method
        )

    def transp(
        self, x: BoundedRankPoint, y: BoundedRankPoint, v: BoundedRankTangent
    ) -> BoundedRankTangent:
        """Projection transport of ``v ∈ T_x`` to ``T_y`` (LoRAM Alg. 8)."""
        x, y, v = self._point(x), self._point(y, "y"), self._tangent(v, "v")
        return bounded_rank_transport(x, y, v, self.alpha)

    def retr_transp(
        self,
        x: BoundedRankPoint,
        u: BoundedRankTangent,
        v: BoundedRankTangent,
        *,
        nuclear_lambda: Tensor | float = 0.0,
        nuclear_mode: str = "subgradient",
    ) -> tuple[BoundedRankPoint, BoundedRankTangent]:
        """:meth:`retr` along ``u`` (with the optional nuclear-norm step), then :meth:`transp` ``v``."""
        y = self.retr(x, u, nuclear_lambda=nuclear_lambda, nuclear_mode=nuclear_mode)
        return y, self.transp(x, y, v)

    def nuclear_subgradient(self, x: BoundedRankPoint) -> BoundedRankTangent:
        """``(Q, 0)`` with ``Q`` the polar factor of ``K``: the Riemannian (sub)gradient of ``‖X‖_*``.

        ``Q Vᵀ = U Vᵀ`` (SVD of X) is a subgradient of ``‖X‖_*``; its Riemannian gradient is
        ``(U Vᵀ V, (I − VVᵀ) V Qᵀ K G⁻¹) = (Q, 0)``, exact where ``rank X = r``.
        """
        x = self._point(x)
        return BoundedRankTangent(nuclear_polar_factor(x.K), torch.zeros_like(x.V))

    # --- matrices and embeddings ------------------------------------------------------------
    def to_matrix(self, x: BoundedRankPoint) -> Tensor:
        """``X = K Vᵀ``, ``(..., m, n)`` (dense: for small problems and tests)."""
        x = self._point(x)
        return x.K @ transpose(x.V)

    def tangent_to_matrix(self, x: BoundedRankPoint, u: BoundedRankTangent) -> Tensor:
        """``Ẋ = K̇ Vᵀ + K V̇pᵀ``, ``(..., m, n)`` (the differential of ``(K, V) ↦ K Vᵀ``)."""
        x, u = self._point(x), self._tangent(u)
        return u.K @ transpose(x.V) + x.K @ transpose(u.Vp)

    def embed(self, x: BoundedRankPoint) -> tuple[Tensor, Tensor]:
        """``(X, P) = (K Vᵀ, I − VVᵀ) ∈ R^{m×n} × Sym(n)`` (dense; used by :mod:`geolora.checks`)."""
        x = self._point(x)
        eye = torch.eye(self.n, dtype=x.V.dtype, device=x.V.device)
        return self.to_matrix(x), eye - x.V @ transpose(x.V)

    def embed_tangent(self, x: BoundedRankPoint, u: BoundedRankTangent) -> tuple[Tensor, Tensor]:
        """``(Ẋ, Ṗ) = (K̇Vᵀ + KV̇pᵀ, −(V̇pVᵀ + VV̇pᵀ))`` (dense; used by :mod:`geolora.checks`)."""
        x, u = self._point(x), self._tangent(u)
        A = u.Vp @ transpose(x.V)
        return self.tangent_to_matrix(x, u), -(A + transpose(A))

    def ambient_inner(self, z1: tuple[Tensor, Tensor], z2: tuple[Tensor, Tensor]) -> Tensor:
        """``⟨Z, Z'⟩ + α⟨W, W'⟩`` on ``R^{m×n} × Sym(n)``; ``inner`` is its restriction."""
        return (z1[0] * z2[0]).sum(dim=(-2, -1)) + self.alpha * (z1[1] * z2[1]).sum(dim=(-2, -1))

    def from_factors(self, B: Tensor, A: Tensor) -> BoundedRankPoint:
        """The point with ``X = B A`` for LoRA factors ``B: (..., m, r)``, ``A: (..., r, n)``.

        ``V = qf(Aᵀ)`` (sign-fixed QR; its span contains the row space of ``A`` even when ``A`` is
        rank deficient), ``K = B (A V)``. ``B = 0`` (standard LoRA init) gives ``K = 0``, a valid
        point; so does ``A = 0`` (then ``V`` is the QR's orthonormal completion).
        """
        err = first_shape_error(("B", B, (self.m, self.r)), ("A", A, (self.r, self.n)))
        if err:
            raise ValueError(err)
        if B.shape[:-2] != A.shape[:-2]:
            raise ValueError(
                f"B and A have different batch shapes {tuple(B.shape[:-2])} and {tuple(A.shape[:-2])}"
            )
        V = qf(transpose(A), "householder")
        return BoundedRankPoint(B @ (A @ V), V)

    def from_matrix(self, X: Tensor) -> BoundedRankPoint:
        """Best rank-≤r approximation of a dense ``X: (..., m, n)`` as a point: ``K = U_r Σ_r``,
        ``V = V_r`` from the thin SVD."""
        err = check_shape("X", X, (self.m, self.n))
        if err:
            raise ValueError(err)
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        r = self.r
        return BoundedRankPoint(U[..., :r] * S[..., None, :r], transpose(Vh[..., :r, :]))

    # --- sampling ---------------------------------------------------------------------------
    def random_point(
        self,
        *batch: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> BoundedRankPoint:
        """``K`` standard Gaussian, ``V = qf(Gaussian n × r)``; batch shape ``batch``."""
        kw = dict(dtype=dtype, device=device, generator=generator)
        K = torch.randn(*batch, self.m, self.r, **kw)
        V = qf(torch.randn(*batch, self.n, self.r, **kw), "householder")
        return BoundedRankPoint(K, V)

    # --- validation -------------------------------------------------------------------------
    def _check_point(self, x, atol: float, rtol: float) -> tuple[bool, str | None]:
        try:
            x = self._point(x)
        except TypeError as e:
            return False, str(e)
        err = first_shape_error(("K", x.K, (self.m, self.r)), ("V", x.V, (self.n, self.r)))
        if err:
            return False, err
        if x.K.shape[:-2] != x.V.shape[:-2]:
            return (
                False,
                f"K and V have different batch shapes {tuple(x.K.shape[:-2])}, {tuple(x.V.shape[:-2])}",
            )
        try:
            check_finite_tree("x", x)
        except ValueError as e:
            return False, str(e)
        eye = torch.eye(self.r, dtype=x.V.dtype, device=x.V.device)
        dev = (transpose(x.V) @ x.V - eye).abs().max().item()
        if dev > atol + rtol:
            return False, f"VᵀV deviates from I by {dev:.3e} (tolerance {atol + rtol:.1e})"
        return True, None

    def _check_tangent(self, x, u, atol: float, rtol: float) -> tuple[bool, str | None]:
        x = self._point(x)
        try:
            u = self._tangent(u)
        except TypeError as e:
            return False, str(e)
        err = first_shape_error(("K", u.K, (self.m, self.r)), ("Vp", u.Vp, (self.n, self.r)))
        if err:
            return False, err
        try:
            check_finite_tree("u", u)
        except ValueError as e:
            return False, str(e)
        dev = (transpose(x.V) @ u.Vp).abs().max().item()
        scale = u.Vp.abs().max().item()
        if dev > atol + rtol * scale:
            return False, f"VᵀVp deviates from 0 by {dev:.3e} (tolerance {atol + rtol * scale:.1e})"
        return True, None
