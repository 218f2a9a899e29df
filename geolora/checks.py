"""Numerical checks of Riemannian geometry and optimizers, in the style of Manopt.

Each check evaluates an error along a curve ``t ↦ …`` for step sizes ``t`` on a log scale, fits
the slope of ``log(error)`` against ``log(t)`` on the piece of the curve that is a straight line
(like Manopt's ``identify_linear_piece``), and returns a dataclass with the numbers and a
``plot(path)`` method. The slope is the order of the error: a check passes when it is at least
the expected one. They work on any :class:`~geolora.manifolds.base.Manifold`, also your own:

* :func:`check_gradient` — ``|f(R_x(t u)) − f(x) − t⟨grad f(x), u⟩_x|`` is ``O(t²)`` (slope 2)
  iff the Riemannian gradient is right; a wrong one gives slope 1.
* :func:`check_retraction` — distance in the embedding between ``R_x(t u)`` and ``x + t u``:
  slope 2 for a retraction (``R_x(0) = x``, ``DR_x(0) = id``); the tangential part of that
  difference has slope 3 for a second-order retraction.
* :func:`check_transport` — the transported vector is tangent at the new point, the transport is
  linear, and ``T_{x→R_x(tu)}(v) → v`` as ``t → 0`` (slope 1).
* :func:`check_lift` — horizontal lift of a factor quotient: ``Dπ[lift(Ẋ)] = P_T(Ẋ)``, the lift
  is horizontal, and it is equivariant under ``(M, N) ↦ (M R, N R⁻ᵀ)``.
* :func:`check_invariance` — an optimizer on LoRA factors follows the same ``X = M Nᵀ``
  trajectory from ``(M, N)`` and ``(M R, N R⁻ᵀ)``.

Embeddings. :func:`check_retraction` and :func:`check_transport` compare points and tangent
vectors at different points, so they need coordinates in the ambient space. They use, in order:
the manifold's ``embed(x)`` / ``embed_tangent(x, u)`` / ``proj_ambient(x, z)`` (e.g.
``BoundedRank``); ``to_matrix(x)`` / ``tangent2ambient(x, u)`` / ``proj(x, Z)`` (e.g.
``FixedRank``); or the fields themselves when tangent vectors have the points' shapes
(``Euclidean``, ``Stiefel``, factor pairs), with ``proj`` as the tangent projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from geolora.manifolds.base import Manifold, tree_leaves, tree_map

__all__ = [
    "SlopeFit",
    "GradientCheck",
    "RetractionCheck",
    "TransportCheck",
    "LiftCheck",
    "InvarianceCheck",
    "fit_slope",
    "autograd_egrad",
    "random_gl",
    "check_gradient",
    "check_retraction",
    "check_transport",
    "check_lift",
    "check_invariance",
]

Point = Any
Tangent = Any


# --- slope fitting --------------------------------------------------------------------------
@dataclass
class SlopeFit:
    """Errors ``e(t)`` over step sizes ``t`` and the log–log slope of their straight piece.

    ``slope`` is fitted on ``ts[window[0]:window[1]]``; ``floor`` is the round-off level below
    which errors are ignored. ``exact`` means fewer than two errors exceed the floor (the quantity
    is exact to round-off, e.g. a retraction that *is* ``x + t u``); then ``slope = inf``.
    ``expected`` is the slope a correct implementation gives.
    """

    ts: np.ndarray
    errors: np.ndarray
    floor: np.ndarray
    slope: float
    intercept: float
    window: tuple[int, int]
    exact: bool
    expected: float
    label: str = "error"

    @property
    def passed(self) -> bool:
        """``slope ≥ expected − 0.1`` (or exact)."""
        return self.exact or self.slope >= self.expected - 0.1

    def plot(self, path: str | None = None, ax: Any = None, title: str | None = None) -> Any:
        """Log–log plot of the errors, the fitted line and a reference line of slope ``expected``.

        Uses matplotlib's Agg canvas (no display, no global backend change). With ``path`` the
        figure is saved there; returns the figure (or ``ax``'s figure).
        """
        if ax is None:
            ax = _new_axes()
        fig = ax.figure
        ts, err = self.ts, np.maximum(self.errors, 1e-300)
        ax.loglog(ts, err, ".-", label=self.label)
        ax.loglog(ts, self.floor, ":", color="gray", label="round-off floor")
        if not self.exact:
            lo, hi = self.window
            seg = ts[lo:hi]
            ax.loglog(
                seg,
                np.exp(self.intercept) * seg**self.slope,
                "r-",
                lw=2,
                label=f"fit: slope {self.slope:.2f}",
            )
            t0, e0 = ts[hi - 1], np.exp(self.intercept) * ts[hi - 1] ** self.slope
            ax.loglog(
                ts,
                e0 * (ts / t0) ** self.expected,
                "k--",
                lw=0.8,
                label=f"slope {self.expected:g} (expected)",
            )
        ax.set_xlabel("t")
        ax.set_ylabel(self.label)
        ax.set_title(
            title or f"{self.label}: slope {self.slope:.2f} (expected ≥ {self.expected:g})"
        )
        ax.legend(fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=100, bbox_inches="tight")
        return fig


def _new_axes() -> Any:
    # Agg canvas on a bare Figure: no display and no change to the user's pyplot backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.0))
    FigureCanvasAgg(fig)
    return fig.add_subplot(1, 1, 1)


def fit_slope(
    ts: Sequence[float] | np.ndarray,
    errors: Sequence[float] | np.ndarray,
    floor: Sequence[float] | np.ndarray | float = 0.0,
    *,
    expected: float = 2.0,
    window_length: int | None = None,
    tol: float = 0.02,
    label: str = "error",
) -> SlopeFit:
    """Fit the log–log slope of ``errors(ts)`` on its straight piece.

    Windows of ``window_length`` consecutive points (default ``max(4, len(ts) // 6)``) whose
    errors all exceed ``floor`` get a least-squares line in ``(log t, log e)``; the straight ones
    (RMS residual ≤ ``tol`` in ``log10`` units, i.e. within ~5 %) compete and the one at the
    *smallest* ``t`` wins: it shows the asymptotic order as ``t → 0`` (at large ``t`` higher-order
    terms bend the curve, below the floor round-off dominates). If no window is straight, the
    straightest one is used (Manopt's ``identify_linear_piece`` rule). With fewer valid points than
    a window the longest run of valid points is fitted; with fewer than two, ``exact`` is set.
    """
    ts = np.asarray(ts, dtype=float)
    errors = np.asarray(errors, dtype=float)
    if ts.ndim != 1 or ts.shape != errors.shape or len(ts) < 3:
        raise ValueError("ts and errors must be 1-d arrays of the same length >= 3")
    if not np.all(ts > 0):
        raise ValueError("ts must be positive")
    floor_arr = np.broadcast_to(np.asarray(floor, dtype=float), ts.shape).copy()
    valid = np.isfinite(errors) & (errors > floor_arr)
    L = window_length or max(4, len(ts) // 6)
    if L < 2:
        raise ValueError(f"window_length must be >= 2, got {window_length}")
    lt = np.log(ts)
    le = np.log(np.where(valid, errors, 1.0))

    def line(lo: int, hi: int) -> tuple[float, float, float]:
        x, y = lt[lo:hi], le[lo:hi]
        slope, icpt = np.polyfit(x, y, 1)
        res = y - (slope * x + icpt)
        return float(slope), float(icpt), float(np.sqrt(np.mean(res**2)) / math.log(10))

    fits = []
    for lo in range(0, len(ts) - L + 1):
        if valid[lo : lo + L].all():
            fits.append((lo, lo + L, *line(lo, lo + L)))
    if fits:
        straight = [f for f in fits if f[4] <= tol]
        lo, hi, slope, icpt, _ = straight[0] if straight else min(fits, key=lambda f: f[4])
        return SlopeFit(ts, errors, floor_arr, slope, icpt, (lo, hi), False, expected, label)
    # Shorter than a window: fit the longest run of valid points.
    best, start = (0, 0), None
    for i, ok in enumerate(list(valid) + [False]):
        if ok and start is None:
            start = i
        elif not ok and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    if best[1] - best[0] >= 2:
        slope, icpt, _ = line(*best)
        return SlopeFit(ts, errors, floor_arr, slope, icpt, best, False, expected, label)
    return SlopeFit(ts, errors, floor_arr, math.inf, 0.0, (0, 0), True, expected, label)


# --- small tree helpers ---------------------------------------------------------------------
def _scale(a: float, u: Any) -> Any:
    return tree_map(lambda t: a * t, u)


def _axpy(a: float, u: Any, v: Any) -> Any:
    return tree_map(lambda p, q: a * p + q, u, v)


def _sub(u: Any, v: Any) -> Any:
    return tree_map(lambda p, q: p - q, u, v)


def _fnorm(u: Any) -> float:
    return math.sqrt(sum(float((t.detach().to(torch.float64) ** 2).sum()) for t in tree_leaves(u)))


def _eps(x: Any) -> float:
    return float(torch.finfo(tree_leaves(x)[0].dtype).eps)


def _ts(ts: Sequence[float] | np.ndarray | None, lo: float = -8.0) -> np.ndarray:
    return np.logspace(lo, 0.0, 51) if ts is None else np.asarray(ts, dtype=float)


def _rebuild(x: Any, leaves: Sequence[Tensor]) -> Any:
    if isinstance(x, Tensor):
        return leaves[0]
    return type(x)(*leaves) if hasattr(x, "_fields") else type(x)(leaves)


def _unit_tangent(manifold: Manifold, x: Point, generator: torch.Generator | None) -> Tangent:
    u = manifold.random_tangent(x, generator=generator)
    nrm = float(manifold.norm(x, u).pow(2).sum().sqrt())
    return _scale(1.0 / nrm, u)


class _Embedding:
    """Ambient coordinates of points / tangent vectors and the tangent projection from them."""

    def __init__(self, manifold: Manifold, x: Point, u: Tangent) -> None:
        m = manifold
        self.manifold = m
        # Tangent vectors shaped like points: ``proj`` takes them directly (Manifold contract).
        self.fieldwise = [tuple(t.shape) for t in tree_leaves(x)] == [
            tuple(t.shape) for t in tree_leaves(u)
        ]
        if all(hasattr(m, a) for a in ("embed", "embed_tangent", "proj_ambient")):
            self.point = m.embed
            self.tangent = m.embed_tangent
            self.proj = m.proj_ambient
        elif all(hasattr(m, a) for a in ("to_matrix", "tangent2ambient")):
            self.point = m.to_matrix
            self.tangent = m.tangent2ambient
            self.proj = m.proj
        elif self.fieldwise:
            self.point = lambda p: p
            self.tangent = lambda p, v: v
            self.proj = m.proj
        else:
            raise TypeError(
                f"cannot embed points of {m!r}: define embed(x), embed_tangent(x, u) and "
                "proj_ambient(x, z) on the manifold (see geolora.checks)"
            )

    def tangent_residual(self, x: Point, w: Tangent) -> float:
        """``‖w − P_x(w)‖ / ‖w‖`` (fields, or ambient coordinates for factored tangents)."""
        if self.fieldwise:
            d, ref = _sub(w, self.manifold.proj(x, w)), w
        else:
            ref = self.tangent(x, w)
            d = _sub(ref, self.tangent(x, self.proj(x, ref)))
        nrm = _fnorm(ref)
        return _fnorm(d) / nrm if nrm > 0 else 0.0


# --- gradient -------------------------------------------------------------------------------
@dataclass
class GradientCheck(SlopeFit):
    """Result of :func:`check_gradient`: the slope fit plus diagnostics.

    ``directional_derivative`` is ``⟨grad f(x), u⟩_x``; ``tangent_residual`` is
    ``‖grad − proj_x(grad)‖ / ‖grad‖`` (0 if the gradient is a tangent vector).
    """

    directional_derivative: float = 0.0
    tangent_residual: float = 0.0


def autograd_egrad(f: Callable[[Point], Tensor], x: Point) -> Any:
    """Gradient of ``f`` with respect to the fields of ``x`` by autograd (same structure as ``x``).

    This is the "Euclidean gradient" that ``egrad2rgrad`` of ``Euclidean``, ``Stiefel``,
    ``BoundedRank`` (``(∇_X f V, ∇_X fᵀ K)``) and ``FactorQuotient`` (``(∇_X f N, ∇_X fᵀ M)``)
    accept.
    """
    leaves = [t.detach().clone().requires_grad_(True) for t in tree_leaves(x)]
    with torch.enable_grad():
        val = f(_rebuild(x, leaves))
        if not isinstance(val, Tensor) or val.numel() != 1:
            raise TypeError("f must return a scalar torch.Tensor")
        grads = torch.autograd.grad(val, leaves, allow_unused=True)
    return _rebuild(x, [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)])


def check_gradient(
    manifold: Manifold,
    f: Callable[[Point], Tensor],
    x: Point,
    rgrad: Tangent | None = None,
    *,
    egrad: Callable[[Point], Any] | None = None,
    u: Tangent | None = None,
    ts: Sequence[float] | np.ndarray | None = None,
    generator: torch.Generator | None = None,
    noise: float = 100.0,
) -> GradientCheck:
    """Check a Riemannian gradient by the Taylor expansion along a retraction (Manopt
    ``checkgradient``).

    ``e(t) = |f(R_x(t u)) − f(x) − t ⟨grad f(x), u⟩_x|`` is ``O(t²)`` for every retraction iff
    ``grad f(x)`` is the Riemannian gradient; otherwise the ``t``-term survives and the slope is 1.

    Args:
        manifold: any :class:`Manifold`.
        f: ``point -> scalar tensor``.
        x: the point (batched points are fine: ``f`` sums over the batch).
        rgrad: the gradient to check. Default: ``manifold.egrad2rgrad(x, egrad(x))``.
        egrad: ``point -> Euclidean gradient`` in the form ``egrad2rgrad`` accepts. Default:
            autograd with respect to the point's fields (:func:`autograd_egrad`); for manifolds
            whose ``egrad2rgrad`` wants ``∇_X f`` (``FixedRank``), pass it.
        u: direction; default a random tangent vector of unit norm.
        ts: step sizes; default ``logspace(-8, 0, 51)``.
        noise: errors below ``noise · eps · (|f(x)| + |f(R_x(t u))|)`` count as round-off.

    Returns a :class:`GradientCheck` with ``expected = 2``.
    """
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    ts = _ts(ts)
    if rgrad is None:
        with torch.enable_grad():
            g = egrad(x) if egrad is not None else autograd_egrad(f, x)
        with torch.no_grad():
            rgrad = manifold.egrad2rgrad(x, g)
    with torch.no_grad():
        if u is None:
            u = _unit_tangent(manifold, x, generator)
        f0 = float(f(x))
        df = float(manifold.inner(x, rgrad, u).sum())
        errs, floor = [], []
        for t in ts:
            ft = float(f(manifold.retr(x, _scale(float(t), u))))
            errs.append(abs(ft - f0 - t * df))
            floor.append(noise * _eps(x) * (abs(f0) + abs(ft)))
        tres = _Embedding(manifold, x, rgrad).tangent_residual(x, rgrad)
    fit = fit_slope(ts, errs, floor, expected=2.0, label="|f(R(tu)) − f(x) − t⟨grad, u⟩|")
    return GradientCheck(**vars(fit), directional_derivative=df, tangent_residual=tres)


# --- retraction -----------------------------------------------------------------------------
@dataclass
class RetractionCheck(SlopeFit):
    """Result of :func:`check_retraction`.

    The main fit is ``‖ι(R_x(t u)) − ι(x) − t ι_x(u)‖`` (``ι`` the embedding; expected slope 2:
    first-order agreement). ``tangential`` fits ``‖P_x(ι(R_x(t u)) − ι(x) − t ι_x(u))‖_x``:
    slope 3 (or exact) for a second-order retraction, 2 for a first-order one.
    """

    tangential: SlopeFit | None = None

    def plot(self, path: str | None = None, ax: Any = None, title: str | None = None) -> Any:
        """The main errors and fit (see :meth:`SlopeFit.plot`) plus the tangential errors."""
        if ax is None:
            ax = _new_axes()
        fig = super().plot(None, ax, title)
        if self.tangential is not None:
            tg = self.tangential
            slope = "exact" if tg.exact else f"slope {tg.slope:.2f}"
            errs = np.maximum(tg.errors, 1e-300)
            ax.loglog(tg.ts, errs, "x-", ms=3, label=f"{tg.label}: {slope}")
            ax.legend(fontsize=8)
        if path is not None:
            fig.savefig(path, dpi=100, bbox_inches="tight")
        return fig


def check_retraction(
    manifold: Manifold,
    x: Point,
    u: Tangent | None = None,
    *,
    ts: Sequence[float] | np.ndarray | None = None,
    generator: torch.Generator | None = None,
    noise: float = 100.0,
) -> RetractionCheck:
    """Order of agreement of ``R_x(t u)`` with the straight line ``x + t u`` in the embedding.

    Fits the log–log slope of ``e(t) = ‖ι(R_x(t u)) − ι(x) − t ι_x(u)‖`` (Frobenius norm over the
    ambient coordinates, see the module docstring). For any retraction ``R_x(0) = x`` and
    ``DR_x(0)[u] = u`` give ``e(t) = O(t²)``: slope ≥ 2 means first-order agreement. The
    ``t²``-term of an embedded submanifold's geodesic is normal, so a *second-order* retraction
    also has ``e_T(t) = ‖P_x(…)‖_x = O(t³)`` — fitted as ``tangential`` (the analogue of Manopt
    ``checkretraction``'s comparison with the exponential map). Default ``ts = logspace(-5, 0,
    51)``; ``u`` default: a random unit tangent vector.
    """
    ts = _ts(ts, lo=-5.0)
    with torch.no_grad():
        if u is None:
            u = _unit_tangent(manifold, x, generator)
        emb = _Embedding(manifold, x, u)
        ex, eu = emb.point(x), emb.tangent(x, u)
        nx, nu = _fnorm(ex), _fnorm(eu)
        errs, terrs, floor = [], [], []
        for t in ts:
            d = _sub(emb.point(manifold.retr(x, _scale(float(t), u))), _axpy(float(t), eu, ex))
            errs.append(_fnorm(d))
            terrs.append(float(manifold.norm(x, emb.proj(x, d)).pow(2).sum().sqrt()))
            floor.append(noise * _eps(x) * (nx + t * nu))
    main = fit_slope(ts, errs, floor, expected=2.0, label="‖R_x(tu) − x − tu‖")
    tang = fit_slope(ts, terrs, floor, expected=3.0, label="‖P_x(R_x(tu) − x − tu)‖")
    return RetractionCheck(**vars(main), tangential=tang)


# --- transport ------------------------------------------------------------------------------
@dataclass
class TransportCheck(SlopeFit):
    """Result of :func:`check_transport`.

    Main fit: ``‖ι_y(T_{x→y}(v)) − ι_x(v)‖`` with ``y = R_x(t u)`` (expected slope 1: the transport
    tends to the identity). ``tangent_residual``: max over ``t`` of
    ``‖w − proj_y(w)‖ / ‖w‖`` for ``w = T_{x→y}(v)``. ``linearity_residual``:
    ``‖T(a v + b v₂) − a T(v) − b T(v₂)‖ / ‖T(a v + b v₂)‖`` at the largest ``t``.
    """

    tangent_residual: float = 0.0
    linearity_residual: float = 0.0


def check_transport(
    manifold: Manifold,
    x: Point,
    u: Tangent | None = None,
    v: Tangent | None = None,
    *,
    ts: Sequence[float] | np.ndarray | None = None,
    generator: torch.Generator | None = None,
    noise: float = 100.0,
) -> TransportCheck:
    """Check ``manifold.transp`` along ``y = R_x(t u)``: tangency, linearity, limit ``t → 0``.

    Default ``ts = logspace(-6, 0, 31)``; ``u``, ``v`` default to random unit tangent vectors.
    """
    ts = np.logspace(-6.0, 0.0, 31) if ts is None else np.asarray(ts, dtype=float)
    with torch.no_grad():
        if u is None:
            u = _unit_tangent(manifold, x, generator)
        if v is None:
            v = _unit_tangent(manifold, x, generator)
        emb = _Embedding(manifold, x, u)
        ev = emb.tangent(x, v)
        nv = _fnorm(ev)
        errs, tres = [], 0.0
        for t in ts:
            y = manifold.retr(x, _scale(float(t), u))
            w = manifold.transp(x, y, v)
            errs.append(_fnorm(_sub(emb.tangent(y, w), ev)))
            tres = max(tres, emb.tangent_residual(y, w))
        y = manifold.retr(x, _scale(float(ts.max()), u))
        v2 = _unit_tangent(manifold, x, generator)
        a, b = 0.7, -1.3
        w_comb = manifold.transp(x, y, _axpy(a, v, _scale(b, v2)))
        w_sep = _axpy(a, manifold.transp(x, y, v), _scale(b, manifold.transp(x, y, v2)))
        lin = _fnorm(_sub(w_comb, w_sep)) / max(_fnorm(w_comb), 1e-300)
    floor = noise * _eps(x) * nv
    fit = fit_slope(ts, errs, floor, expected=1.0, window_length=6, label="‖T_{x→y}(v) − v‖")
    return TransportCheck(**vars(fit), tangent_residual=tres, linearity_residual=lin)


# --- quotient lift --------------------------------------------------------------------------
@dataclass
class LiftCheck:
    """Result of :func:`check_lift` (all relative residuals; ≈ 1e-15…1e-12 in float64 if right).

    * ``differential_residual``: ``‖Ṁ Nᵀ + M Ṅᵀ − P_T(Ẋ)‖ / ‖P_T(Ẋ)‖``;
    * ``horizontal_residual``: ``max_Ω |⟨lift, (MΩ, −NΩᵀ)⟩_x| / (‖lift‖_x ‖(MΩ, −NΩᵀ)‖_x)`` over
      random ``Ω``;
    * ``equivariance_residual``: ``max_R ‖lift_{(MR, NR⁻ᵀ)}(Ẋ) − (Ṁ R, Ṅ R⁻ᵀ)‖ / ‖(Ṁ R, Ṅ R⁻ᵀ)‖``
      over random ``R ∈ GL(r)`` (0 for a GL(r)-invariant metric, not for ``FlatMetric``).
    """

    differential_residual: float
    horizontal_residual: float
    equivariance_residual: float

    def passed(self, tol: float = 1e-8) -> bool:
        """All three residuals below ``tol``."""
        return (
            max(self.differential_residual, self.horizontal_residual, self.equivariance_residual)
            < tol
        )


def _dense_tangent_projection(M: Tensor, N: Tensor, Z: Tensor) -> Tensor:
    # P_T(Z) = P_U Z + Z P_V − P_U Z P_V with U = qf(M), V = qf(N): an independent reference.
    U = torch.linalg.qr(M)[0]
    V = torch.linalg.qr(N)[0]
    UZ = U @ (U.transpose(-1, -2) @ Z)
    return UZ + (Z - UZ) @ V @ V.transpose(-1, -2)


def random_gl(
    r: int, like: Tensor, cond: float = 10.0, generator: torch.Generator | None = None
) -> Tensor:
    """A random ``R ∈ GL(r)`` with condition number ``cond``: ``Q₁ diag(cond^{s}) Q₂``, ``s ∈ [0, 1]``.

    Shape ``like.shape[:-2] + (r, r)``, ``like``'s dtype and device.
    """
    kw = {"dtype": like.dtype, "device": like.device, "generator": generator}
    batch = tuple(like.shape[:-2])
    q1 = torch.linalg.qr(torch.randn(*batch, r, r, **kw))[0]
    q2 = torch.linalg.qr(torch.randn(*batch, r, r, **kw))[0]
    s = cond ** torch.linspace(0.0, 1.0, r, dtype=like.dtype, device=like.device)
    return (q1 * s.unsqueeze(-2)) @ q2


def check_lift(
    quotient: Any,
    x: Any,
    xdot: Tensor | Any,
    *,
    trials: int = 5,
    cond: float = 10.0,
    generator: torch.Generator | None = None,
) -> LiftCheck:
    """Check the horizontal lift of a factor quotient (``FactorQuotient`` or alike).

    Uses ``quotient.lift(x, Ẋ)``, ``quotient.inner`` and, if ``Ẋ`` is factored,
    ``quotient.tangent_to_dense(quotient.frame(x), Ẋ)``. ``P_T`` is recomputed here from QR
    factors of ``M``, ``N`` (an independent reference). ``x = (M, N)``; ``Ẋ`` a dense
    ``(..., m, n)`` matrix; ``trials`` random ``Ω`` and ``R`` (condition number ``cond``).
    """
    M, N = x
    with torch.no_grad():
        if not isinstance(xdot, Tensor):
            xdot = quotient.tangent_to_dense(quotient.frame(x), xdot)
        lift = quotient.lift(x, xdot)
        Ml, Nl = lift
        pt = _dense_tangent_projection(M, N, xdot)
        diff = Ml @ N.transpose(-1, -2) + M @ Nl.transpose(-1, -2)
        dres = _fnorm(diff - pt) / max(_fnorm(pt), 1e-300)
        ln = quotient.norm(x, lift)
        r = M.shape[-1]
        hres, eres = 0.0, 0.0
        kw = {"dtype": M.dtype, "device": M.device, "generator": generator}
        for _ in range(trials):
            om = torch.randn(*M.shape[:-2], r, r, **kw)
            vert = type(lift)(M @ om, -N @ om.transpose(-1, -2))
            ip = quotient.inner(x, lift, vert).abs()
            denom = (ln * quotient.norm(x, vert)).clamp_min(1e-300)
            hres = max(hres, float((ip / denom).max()))
            R = random_gl(r, M, cond, generator)
            Rit = torch.linalg.inv(R).transpose(-1, -2)
            y = type(x)(M @ R, N @ Rit)
            ly = quotient.lift(y, xdot)
            expect = (Ml @ R, Nl @ Rit)
            eres = max(eres, _fnorm(_sub(tuple(ly), expect)) / max(_fnorm(expect), 1e-300))
    return LiftCheck(dres, hres, eres)


# --- optimizer invariance -------------------------------------------------------------------
@dataclass
class InvarianceCheck:
    """Result of :func:`check_invariance`.

    ``deviations[k] = ‖X_k − X'_k‖_F / ‖X_k‖_F`` after ``k`` steps (``k = 0`` is the start),
    ``X = M Nᵀ`` from ``(M₀, N₀)`` and ``X'`` from ``(M₀ R, N₀ R⁻ᵀ)``; ``losses`` of the first run.
    """

    deviations: list[float]
    losses: list[float] = field(default_factory=list)

    @property
    def max_deviation(self) -> float:
        """Largest relative deviation over the steps."""
        return max(self.deviations)


_LAYOUTS = ("MN", "BA")


def _product(P: Tensor, Q: Tensor, layout: str) -> Tensor:
    return P @ Q.transpose(-1, -2) if layout == "MN" else P @ Q


def _run_trajectory(
    optimizer_factory: Callable[[torch.nn.Parameter, torch.nn.Parameter], Any],
    P0: Tensor,
    Q0: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    steps: int,
    layout: str,
) -> tuple[list[Tensor], list[float]]:
    P = torch.nn.Parameter(P0.detach().clone())
    Q = torch.nn.Parameter(Q0.detach().clone())
    opt = optimizer_factory(P, Q)
    xs = [_product(P, Q, layout).detach().clone()]
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(P, Q)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        xs.append(_product(P, Q, layout).detach().clone())
    return xs, losses


def check_invariance(
    optimizer_factory: Callable[[torch.nn.Parameter, torch.nn.Parameter], Any],
    make_problem: Callable[[], tuple[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]],
    R: Tensor,
    steps: int = 10,
    *,
    layout: str = "MN",
) -> InvarianceCheck:
    """Compare the ``X`` trajectories of an optimizer from ``(M₀, N₀)`` and ``(M₀R, N₀R⁻ᵀ)``.

    Args:
        optimizer_factory: ``(P, Q) -> optimizer`` for the two ``nn.Parameter`` factors; the
            optimizer needs ``zero_grad()`` and ``step()`` (any ``torch.optim.Optimizer``), e.g.
            ``lambda B, A: Opt([{"params": [B, A], "lora_pair": True}], lr=...)``.
        make_problem: ``() -> (P₀, Q₀, loss)`` with ``loss(P, Q)`` a scalar tensor that depends
            on ``X`` only; called once, both runs use the same ``loss``.
        R: ``(..., r, r)`` invertible.
        steps: optimizer steps.
        layout: ``"MN"``: ``X = M Nᵀ`` (``M: m×r``, ``N: n×r``), gauge ``(M R, N R⁻ᵀ)``;
            ``"BA"``: LoRA's ``X = B A`` (``B: m×r``, ``A: r×n``), gauge ``(B R, R⁻¹ A)`` — the
            same transformation with ``N = Aᵀ``.

    A transformation-invariant optimizer gives deviations at round-off level (growing slowly with
    the steps); plain SGD/Adam on the factors give deviations of order 1.
    """
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not callable(optimizer_factory):
        raise TypeError("optimizer_factory must be callable: (P, Q) -> optimizer")
    P0, Q0, loss_fn = make_problem()
    r = P0.shape[-1]
    if not isinstance(R, Tensor) or R.dim() < 2 or R.shape[-1] != R.shape[-2] or R.shape[-1] != r:
        raise ValueError(f"R must be an (r, r) tensor with r = {r}")
    R = R.to(P0.dtype)
    Rinv = torch.linalg.inv(R)
    Q1 = Q0 @ Rinv.transpose(-1, -2) if layout == "MN" else Rinv @ Q0
    xa, losses = _run_trajectory(optimizer_factory, P0, Q0, loss_fn, steps, layout)
    xb, _ = _run_trajectory(optimizer_factory, P0 @ R, Q1, loss_fn, steps, layout)
    devs = [_fnorm(a - b) / max(_fnorm(a), 1e-300) for a, b in zip(xa, xb)]
    return InvarianceCheck(devs, losses)
