"""geolora.checks on every manifold: correct geometry passes, deliberately wrong geometry fails."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from geolora.checks import (
    autograd_egrad,
    check_gradient,
    check_invariance,
    check_lift,
    check_retraction,
    check_transport,
    fit_slope,
    random_gl,
)
from geolora.manifolds.base import Manifold, tree_map
from geolora.manifolds.bounded_rank import BoundedRank
from geolora.manifolds.euclidean import Euclidean
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.quotient import FactorQuotient
from geolora.manifolds.stiefel import Stiefel
from geolora.manifolds.types import FactorTangent

F64 = torch.float64
m, n, r = 8, 6, 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> Tensor:
    return torch.randn(*shape, dtype=F64, generator=g)


# --- fit_slope --------------------------------------------------------------------------------
def test_fit_slope_synthetic() -> None:
    ts = np.logspace(-8, 0, 51)
    assert abs(fit_slope(ts, 3 * ts**2).slope - 2) < 1e-10
    # t-term at small t, t²-term at large t: the asymptotic (small-t) order is reported
    res = fit_slope(ts, 1e-4 * ts + ts**2)
    assert abs(res.slope - 1) < 0.02 and ts[res.window[1] - 1] < 1e-4
    # round-off below the floor is ignored
    noisy = np.maximum(ts**2, 1e-13 * (1 + np.sin(np.arange(51))))
    res = fit_slope(ts, noisy, floor=1e-12)
    assert abs(res.slope - 2) < 1e-6 and ts[res.window[0]] >= 1e-6
    exact = fit_slope(ts, np.zeros_like(ts), floor=1e-14)
    assert exact.exact and exact.slope == float("inf") and exact.passed
    with pytest.raises(ValueError, match="ts and errors"):
        fit_slope(ts, ts[:-1])
    with pytest.raises(ValueError, match="positive"):
        fit_slope(-ts, ts)


# --- the manifolds ----------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    manifold: Manifold
    f: Callable[[Any], Tensor]
    egrad: Callable[[Any], Any] | None  # None: autograd of the fields
    second_order: bool | None  # retraction: True second order, False first order, None exact


def _cases() -> list[Case]:
    g = gen(0)
    A = randn(m, n, g=g)
    Sym = randn(m, m, g=g)
    Sym = Sym + Sym.T

    def fX(X: Tensor) -> Tensor:
        return 0.5 * ((X - A) ** 2).sum() + torch.sin(X).sum()

    def rayleigh(X: Tensor) -> Tensor:
        return -0.5 * (X * (Sym @ X)).sum() + 0.1 * (X**4).sum()

    def dense_egrad(man: Manifold) -> Callable[[Any], Tensor]:
        def eg(x: Any) -> Tensor:
            X = man.to_matrix(x).detach().requires_grad_(True)
            return torch.autograd.grad(fX(X), X)[0]

        return eg

    fr = FixedRank(m, n, r)
    br = BoundedRank(m, n, r)
    cases = [
        Case("euclidean", Euclidean(m, r), rayleigh, None, None),
        Case("stiefel_qr", Stiefel(m, r, "qr"), rayleigh, None, False),
        Case("stiefel_polar", Stiefel(m, r, "polar"), rayleigh, None, True),
        Case("fixed_rank", fr, lambda x: fX(fr.to_matrix(x)), dense_egrad(fr), True),
        Case("bounded_rank", br, lambda x: fX(br.to_matrix(x)), None, False),
    ]
    for metric in ("balanced", "preconditioned", "flat"):
        q = FactorQuotient(m, n, r, metric)
        cases.append(Case(f"quotient_{metric}", q, lambda x, q=q: fX(q.to_matrix(x)), None, None))
    return cases


CASES = _cases()
IDS = [c.name for c in CASES]


def _grad(case: Case, x: Any) -> Any:
    eg = case.egrad(x) if case.egrad is not None else autograd_egrad(case.f, x)
    return case.manifold.egrad2rgrad(x, eg)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_check_gradient_slopes(case: Case) -> None:
    g = gen(1)
    x = case.manifold.random_point(generator=g)
    res = check_gradient(case.manifold, case.f, x, egrad=case.egrad, generator=g)
    assert res.slope >= 1.9, res.slope
    assert res.passed and res.tangent_residual < 1e-12
    # a deliberately wrong gradient (scaled by 1.5): the t-term survives, slope ≈ 1
    wrong = tree_map(lambda t: 1.5 * t, _grad(case, x))
    bad = check_gradient(case.manifold, case.f, x, rgrad=wrong, generator=g)
    assert 0.9 <= bad.slope <= 1.1, bad.slope
    assert not bad.passed


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_check_retraction_orders(case: Case) -> None:
    g = gen(2)
    x = case.manifold.random_point(generator=g)
    res = check_retraction(case.manifold, x, generator=g)
    tang = res.tangential
    if case.second_order is None:  # R_x(u) = x + u
        assert res.exact and tang.exact
        return
    assert res.slope >= 1.9, res.slope
    if case.second_order:
        assert tang.slope >= 2.9, tang.slope
    else:  # first order only: the check tells the difference
        assert 1.9 <= tang.slope < 2.5, tang.slope


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_check_transport(case: Case) -> None:
    g = gen(3)
    x = case.manifold.random_point(generator=g)
    res = check_transport(case.manifold, x, generator=g)
    assert res.exact or res.slope >= 0.9, res.slope
    assert res.tangent_residual < 1e-12 and res.linearity_residual < 1e-12


def test_check_gradient_batched_point() -> None:
    br = BoundedRank(m, n, r)
    g = gen(4)
    A = randn(2, m, n, g=g)
    x = br.random_point(2, generator=g)
    res = check_gradient(br, lambda p: 0.5 * ((br.to_matrix(p) - A) ** 2).sum(), x, generator=g)
    assert res.slope >= 1.9


def test_check_gradient_input_errors() -> None:
    man = Euclidean(m, r)
    x = man.random_point(generator=gen(5))
    with pytest.raises(TypeError, match="scalar"):
        check_gradient(man, lambda X: X * 2, x)
    with pytest.raises(TypeError, match="f must be callable"):
        check_gradient(man, 3.0, x)


class Sphere(Manifold):
    """A user-defined manifold (unit sphere of R^{d×1}) to show the checks work on any subclass."""

    def __init__(self, d: int, wrong_retraction: bool = False) -> None:
        self.d, self.wrong = d, wrong_retraction

    def proj(self, x: Tensor, u: Tensor) -> Tensor:
        return u - x * (x * u).sum(dim=(-2, -1), keepdim=True)

    def egrad2rgrad(self, x: Tensor, g: Tensor) -> Tensor:
        return self.proj(x, g)

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
        return (u * (u if v is None else v)).sum(dim=(-2, -1))

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        y = x + (0.5 * u if self.wrong else u)  # the wrong one has DR_x(0) = ½ id
        return y / y.norm(dim=(-2, -1), keepdim=True)

    def transp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        return self.proj(y, v)

    def random_point(self, *batch: int, dtype=F64, device=None, generator=None) -> Tensor:
        z = torch.randn(*batch, self.d, 1, dtype=dtype, device=device, generator=generator)
        return z / z.norm(dim=(-2, -1), keepdim=True)

    def _check_point(self, x, atol, rtol):
        return True, None

    def _check_tangent(self, x, u, atol, rtol):
        return True, None

    @property
    def dim(self) -> int:
        return self.d - 1


def test_checks_on_a_user_manifold() -> None:
    g = gen(6)
    S = randn(5, 5, g=g)
    S = S + S.T
    sphere = Sphere(5)
    x = sphere.random_point(generator=g)

    def f(x: Tensor) -> Tensor:
        return (x * (S @ x)).sum()

    assert check_gradient(sphere, f, x, generator=g).slope >= 1.9
    res = check_retraction(sphere, x, generator=g)
    assert res.slope >= 1.9 and res.tangential.slope >= 2.9  # normalisation is second order
    # a retraction with the wrong differential fails both checks
    bad = Sphere(5, wrong_retraction=True)
    assert check_retraction(bad, x, generator=g).slope < 1.1
    assert check_gradient(bad, f, x, generator=g).slope < 1.1


# --- lifts --------------------------------------------------------------------------------------
@pytest.mark.parametrize("metric", ["balanced", "preconditioned"])
def test_check_lift_invariant_metrics(metric: str) -> None:
    g = gen(7)
    q = FactorQuotient(m, n, r, metric)
    x = q.random_point(generator=g)
    res = check_lift(q, x, randn(m, n, g=g), generator=g)
    assert res.differential_residual < 1e-12
    assert res.horizontal_residual < 1e-12
    assert res.equivariance_residual < 1e-10
    assert res.passed()
    # batched points and a factored Ẋ
    xb = q.random_point(2, generator=g)
    xd = q.to_tangent(xb, randn(2, m, n, g=g))
    assert check_lift(q, xb, xd, generator=g).passed()


def test_check_lift_detects_failures() -> None:
    g = gen(8)
    flat = FactorQuotient(m, n, r, "flat")
    x = flat.random_point(generator=g)
    xd = randn(m, n, g=g)
    res = check_lift(flat, x, xd, generator=g)
    assert res.differential_residual < 1e-12 and res.horizontal_residual < 1e-12
    assert res.equivariance_residual > 1e-2  # the flat metric is not GL(r)-invariant
    assert not res.passed()

    class VerticalNoise(FactorQuotient):
        """Adds a vertical vector: Dπ is unchanged, horizontality breaks."""

        def lift(self, x, xdot, frame=None):
            u = super().lift(x, xdot, frame)
            om = torch.ones(r, r, dtype=F64)
            return FactorTangent(u.M + x.M @ om, u.N - x.N @ om.T)

    res = check_lift(VerticalNoise(m, n, r), x, xd, generator=g)
    assert res.differential_residual < 1e-12 and res.horizontal_residual > 1e-3

    class Scaled(FactorQuotient):
        def lift(self, x, xdot, frame=None):
            u = super().lift(x, xdot, frame)
            return FactorTangent(1.1 * u.M, 1.1 * u.N)

    res = check_lift(Scaled(m, n, r), x, xd, generator=g)
    assert abs(res.differential_residual - 0.1) < 1e-10


# --- optimizer invariance -----------------------------------------------------------------------
class ScaledGD(torch.optim.Optimizer):
    """Tong et al. 2021: M ← M − η ∇_M (NᵀN)⁻¹, N ← N − η ∇_N (MᵀM)⁻¹ (GL(r)-invariant)."""

    def __init__(self, M: Tensor, N: Tensor, lr: float, layout: str = "MN") -> None:
        super().__init__([M, N], {"lr": lr})
        self.layout = layout

    @torch.no_grad()
    def step(self) -> None:
        P, Q = self.param_groups[0]["params"]
        lr = self.param_groups[0]["lr"]
        if self.layout == "MN":
            GP = torch.linalg.inv(Q.T @ Q)
            GQ = torch.linalg.inv(P.T @ P)
            dP, dQ = P.grad @ GP, Q.grad @ GQ
        else:  # B: m×r, A: r×n;  A ← A − η (BᵀB)⁻¹ ∇_A
            dP = P.grad @ torch.linalg.inv(Q @ Q.T)
            dQ = torch.linalg.inv(P.T @ P) @ Q.grad
        P.sub_(lr * dP)
        Q.sub_(lr * dQ)


def _problem(layout: str) -> Callable[[], tuple[Tensor, Tensor, Callable]]:
    def make():
        g = gen(9)
        target = randn(m, r, g=g) @ randn(r, n, g=g)
        P0 = randn(m, r, g=g)
        Q0 = randn(n, r, g=g) if layout == "MN" else randn(r, n, g=g)

        def loss(P: Tensor, Q: Tensor) -> Tensor:
            X = P @ Q.T if layout == "MN" else P @ Q
            return 0.5 * ((X - target) ** 2).sum() + 0.01 * (X**4).sum()

        return P0, Q0, loss

    return make


@pytest.mark.parametrize("layout", ["MN", "BA"])
def test_check_invariance(layout: str) -> None:
    R = random_gl(r, torch.zeros(1, 1, dtype=F64), cond=20.0, generator=gen(10))
    inv = check_invariance(
        lambda P, Q: ScaledGD(P, Q, 0.02, layout), _problem(layout), R, 10, layout=layout
    )
    assert len(inv.deviations) == 11 and inv.deviations[0] < 1e-13
    assert inv.max_deviation < 1e-9, inv.deviations
    assert inv.losses[-1] < inv.losses[0]  # the run did optimize
    sgd = check_invariance(
        lambda P, Q: torch.optim.SGD([P, Q], lr=0.002), _problem(layout), R, 10, layout=layout
    )
    assert sgd.max_deviation > 1e-2, sgd.deviations


def test_check_invariance_input_errors() -> None:
    R = torch.eye(r, dtype=F64)
    fac = lambda P, Q: torch.optim.SGD([P, Q], lr=0.1)  # noqa: E731
    with pytest.raises(ValueError, match="layout"):
        check_invariance(fac, _problem("MN"), R, layout="NM")
    with pytest.raises(ValueError, match="steps"):
        check_invariance(fac, _problem("MN"), R, 0)
    with pytest.raises(ValueError, match="R must be"):
        check_invariance(fac, _problem("MN"), torch.eye(r + 1, dtype=F64))


# --- plots --------------------------------------------------------------------------------------
def test_plots_are_written(tmp_path: Path) -> None:
    g = gen(11)
    br = BoundedRank(m, n, r)
    x = br.random_point(generator=g)
    A = randn(m, n, g=g)
    res = check_gradient(br, lambda p: 0.5 * ((br.to_matrix(p) - A) ** 2).sum(), x, generator=g)
    res.plot(tmp_path / "grad.png")
    check_retraction(br, x, generator=g).plot(tmp_path / "retr.png")
    e = Euclidean(m, r)
    check_retraction(e, e.random_point(generator=g), generator=g).plot(tmp_path / "exact.png")
    for name in ("grad.png", "retr.png", "exact.png"):
        assert (tmp_path / name).stat().st_size > 1000
