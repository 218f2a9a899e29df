"""Stiefel manifold: identities, retraction orders, geoopt cross-checks, batching, bad input."""

from __future__ import annotations

import geoopt
import pytest
import torch

from geolora.checks import fit_slope
from geolora.linalg import sym
from geolora.manifolds.stiefel import Stiefel, from_geoopt
from geolora.retractions import (
    RETRACTIONS,
    get_retraction,
    get_transport,
    projection_transport,
    stiefel_cayley,
    stiefel_polar,
    stiefel_qr,
)

DT = torch.float64
N, R = 8, 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


TS = [10.0 ** (-3 + 0.5 * k) for k in range(5)]  # 1e-3 ... 1e-1


def setup(seed: int = 0, *batch: int):
    St = Stiefel(N, R)
    g = gen(seed)
    x = St.random_point(*batch, dtype=DT, generator=g)
    u = St.random_tangent(x, generator=g)
    u = u / St.norm(x, u)[..., None, None]
    return St, x, u, g


def test_constructor_and_dim():
    assert Stiefel(5, 2).dim == 5 * 2 - 3
    assert Stiefel(4, 4).dim == 16 - 10
    with pytest.raises(ValueError, match="r=5"):
        Stiefel(4, 5)
    with pytest.raises(ValueError, match="r=0"):
        Stiefel(4, 0)
    with pytest.raises(ValueError, match="retraction"):
        Stiefel(4, 2, retraction="exp")
    assert "cayley" in repr(Stiefel(4, 2, retraction="cayley"))


def test_projection_identities():
    St, x, _, g = setup(1)
    St.check_point(x)
    eye = torch.eye(R, dtype=DT)
    assert (x.T @ x - eye).abs().max() < 1e-12
    z, w = (torch.randn(N, R, dtype=DT, generator=g) for _ in range(2))
    pz = St.proj(x, z)
    assert sym(x.T @ pz).abs().max() < 1e-12  # tangent
    St.check_tangent(x, pz)
    assert (St.proj(x, pz) - pz).abs().max() < 1e-12  # idempotent
    # orthogonal projection: the residual is normal to T_X
    assert abs(float(St.inner(x, z - pz, St.proj(x, w)))) < 1e-12
    assert torch.equal(St.egrad2rgrad(x, z), pz)
    # a normal vector X S (S symmetric) projects to 0
    s = sym(torch.randn(R, R, dtype=DT, generator=g))
    assert St.proj(x, x @ s).abs().max() < 1e-12


@pytest.mark.parametrize("name", ["qr", "polar", "cayley"])
def test_retraction_on_manifold_and_first_order(name):
    St, x, u, _ = setup(2)
    St = Stiefel(N, R, retraction=name)
    y = St.retr(x, 0.7 * u)
    St.check_point(y)
    assert (y.T @ y - torch.eye(R, dtype=DT)).abs().max() < 1e-10
    assert (St.retr(x, torch.zeros_like(u)) - x).abs().max() < 1e-12  # R_X(0) = X
    # ‖R_X(tU) − (X + tU)‖ = O(t²): every retraction agrees with the line to first order
    errs = [float((St.retr(x, t * u) - x - t * u).norm()) for t in TS]
    assert fit_slope(TS, errs, window_length=len(TS)).slope >= 1.9
    # central difference of the curve recovers U: (R(tU) − R(−tU)) / 2t = U + O(t²)
    t = 1e-4
    d = (St.retr(x, t * u) - St.retr(x, -t * u)) / (2 * t)
    assert (d - u).abs().max() < 1e-6


def test_retraction_second_order():
    """Geodesic: X + tU − (t²/2) X UᵀU + O(t³).

    Polar matches it (second order); QR and Cayley do not.
    """
    St, x, u, _ = setup(3)

    def second_order_error(f, t):
        return float((f(x, t * u) - x - t * u + 0.5 * t * t * x @ (u.T @ u)).norm())

    def slope(f) -> float:  # one least-squares line through all of TS
        return fit_slope(TS, [second_order_error(f, t) for t in TS], window_length=len(TS)).slope

    assert slope(stiefel_polar) >= 2.9
    for f in (stiefel_qr, stiefel_cayley):
        assert 1.9 <= slope(f) <= 2.2  # a genuine t² term remains: first-order retractions


def test_geoopt_crosschecks():
    """Our embedded-metric Stiefel is geoopt's ``EuclideanStiefel`` (not the canonical one)."""
    St, x, u, g = setup(4, 3)
    ge = geoopt.EuclideanStiefel()
    z = torch.randn(3, N, R, dtype=DT, generator=g)
    assert (St.proj(x, z) - ge.proju(x, z)).abs().max() < 1e-12
    assert (St.egrad2rgrad(x, z) - ge.egrad2rgrad(x, z)).abs().max() < 1e-12
    assert (St.inner(x, u, z) - ge.inner(x, u, z)).abs().max() < 1e-12
    y = St.retr(x, u)
    assert (y - ge.retr(x, u)).abs().max() < 1e-12  # same sign-fixed QR
    assert (St.transp(x, y, z) - ge.transp(x, y, z)).abs().max() < 1e-12
    # Cayley: for XᵀU = 0, Wen–Yin's W = U Xᵀ − X Uᵀ is geoopt CanonicalStiefel's A matrix
    un = z - x @ (x.transpose(-1, -2) @ z)
    gc = geoopt.CanonicalStiefel()
    assert (stiefel_cayley(x, un) - gc.retr(x, un)).abs().max() < 1e-12
    assert isinstance(St.to_geoopt(), geoopt.EuclideanStiefel)


def test_from_geoopt():
    for gm in (geoopt.Stiefel(), geoopt.EuclideanStiefel()):  # canonical (default) and euclidean
        p = geoopt.ManifoldParameter(gm.random(2, N, R, dtype=DT), manifold=gm)
        St = from_geoopt(p)
        assert (St.n, St.r) == (N, R)
        St.check_point(p)
        # our geometry works on geoopt parameters and agrees with EuclideanStiefel
        z = torch.randn(2, N, R, dtype=DT, generator=gen(5))
        assert (St.proj(p, z) - geoopt.EuclideanStiefel().proju(p.data, z)).abs().max() < 1e-12
        St.check_point(St.retr(p, St.proj(p, z)))
    St = from_geoopt(geoopt.Stiefel(), n=6, r=2, retraction="polar")
    assert (St.n, St.r, St.retraction) == (6, 2, "polar")
    with pytest.raises(ValueError, match="pass n and r"):
        from_geoopt(geoopt.EuclideanStiefel())
    with pytest.raises(ValueError, match="contradict"):
        from_geoopt(geoopt.ManifoldParameter(torch.eye(4, 2), manifold=geoopt.Stiefel()), n=5)
    with pytest.raises(TypeError, match="manifold_or_param"):
        from_geoopt(geoopt.Sphere())
    with pytest.raises(TypeError, match="manifold_or_param"):
        from_geoopt(torch.eye(4, 2))


def test_transport():
    St, x, u, g = setup(6)
    y = St.retr(x, u)
    v = St.random_tangent(x, generator=g)
    w = St.transp(x, y, v)
    St.check_tangent(y, w)
    assert (w - St.proj(y, v)).abs().max() < 1e-14
    assert (projection_transport(St, x, y, v) - w).abs().max() < 1e-14
    assert (St.transp(x, x, v) - v).abs().max() < 1e-12  # identity on T_X
    y2, w2 = St.retr_transp(x, u, v)
    assert torch.equal(y2, y) and torch.equal(w2, w)


@pytest.mark.parametrize("name", ["qr", "polar", "cayley"])
def test_batched_matches_loop(name):
    St = Stiefel(N, R, retraction=name)
    g = gen(7)
    x = St.random_point(2, 3, dtype=DT, generator=g)
    z, v = (torch.randn(2, 3, N, R, dtype=DT, generator=g) for _ in range(2))
    u = St.proj(x, z)
    y = St.retr(x, u)
    w = St.transp(x, y, v)
    ip = St.inner(x, u, v)
    assert ip.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            xi, ui, vi = x[i, j], u[i, j], v[i, j]
            assert (St.proj(xi, z[i, j]) - ui).abs().max() < 1e-12
            yi = St.retr(xi, ui)
            assert (yi - y[i, j]).abs().max() < 1e-12
            assert (St.transp(xi, yi, vi) - w[i, j]).abs().max() < 1e-12
            assert abs(float(St.inner(xi, ui, vi) - ip[i, j])) < 1e-12


def test_bad_input():
    St, x, u, _ = setup(8)
    bad = u.clone()
    bad[1, 1] = float("inf")
    with pytest.raises(ValueError, match="u.*non-finite"):
        St.retr(x, bad)
    with pytest.raises(ValueError, match="x.*non-finite"):
        St.retr(bad, u)
    with pytest.raises(ValueError, match="expected"):
        St.proj(x, torch.zeros(N, R + 1, dtype=DT))
    with pytest.raises(ValueError, match="batch dims"):
        St.retr(x, u.expand(2, N, R))
    with pytest.raises(ValueError, match="XᵀX != I"):
        St.check_point(2 * x)
    with pytest.raises(ValueError, match="not a valid point"):
        St.check_point(torch.zeros(N + 1, R, dtype=DT))
    with pytest.raises(ValueError, match="sym"):
        St.check_tangent(x, x)  # X is normal, not tangent
    assert not St.is_point(2 * x) and St.is_point(x)


def test_registry():
    assert get_retraction("stiefel.qr") is stiefel_qr
    assert RETRACTIONS["stiefel.polar"] is stiefel_polar
    assert get_transport("projection") is projection_transport
    with pytest.raises(ValueError, match="stiefel.qr"):
        get_retraction("stiefel.exp")
