"""Euclidean manifold: trivial geometry, shapes, batching and bad input."""

from __future__ import annotations

import pytest
import torch

from geolora.manifolds.euclidean import Euclidean

DT = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_trivial_geometry():
    E = Euclidean(4, 3)
    g = gen()
    x = E.random_point(dtype=DT, generator=g)
    u = torch.randn(4, 3, dtype=DT, generator=g)
    v = torch.randn(4, 3, dtype=DT, generator=g)
    assert x.shape == (4, 3) and x.dtype == DT
    assert torch.equal(E.proj(x, u), u)
    assert torch.equal(E.egrad2rgrad(x, u), u)
    assert torch.equal(E.retr(x, u), x + u)
    assert torch.equal(E.transp(x, E.retr(x, u), v), v)
    assert torch.allclose(E.inner(x, u, v), (u * v).sum(), atol=1e-14, rtol=0)
    assert torch.allclose(E.norm(x, u), torch.linalg.matrix_norm(u), atol=1e-14, rtol=0)
    y, w = E.retr_transp(x, u, v)
    assert torch.equal(y, x + u) and torch.equal(w, v)
    assert E.dim == 12
    E.check_point(x)
    E.check_tangent(x, u)


def test_batched_matches_loop():
    E = Euclidean(5, 2)
    g = gen(1)
    x = E.random_point(2, 3, dtype=DT, generator=g)
    u, v = (torch.randn(2, 3, 5, 2, dtype=DT, generator=g) for _ in range(2))
    inner = E.inner(x, u, v)
    retr = E.retr(x, u)
    assert inner.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert abs(float(inner[i, j] - E.inner(x[i, j], u[i, j], v[i, j]))) < 1e-12
            assert torch.allclose(retr[i, j], E.retr(x[i, j], u[i, j]), atol=1e-12, rtol=0)


def test_shapeless_and_ndim():
    E = Euclidean()  # any matrix shape, last two dims reduced
    x = torch.zeros(3, 4, 2, dtype=DT)
    u = torch.ones(3, 4, 2, dtype=DT)
    assert E.inner(x, u).shape == (3,)
    assert torch.allclose(E.inner(x, u), torch.full((3,), 8.0, dtype=DT))
    assert Euclidean(ndim=0).inner(x, u).shape == (3, 4, 2)  # element-wise, like geoopt
    assert Euclidean(ndim=3).inner(x, u).shape == ()
    with pytest.raises(ValueError, match="shape"):
        _ = E.dim
    with pytest.raises(ValueError, match="shape"):
        E.random_point()
    with pytest.raises(ValueError, match="ndim"):
        E.retr(torch.zeros(3), torch.zeros(3))  # fewer dims than ndim=2


def test_bad_input():
    with pytest.raises(ValueError, match="shape"):
        Euclidean(3, 0)
    with pytest.raises(ValueError, match="ndim"):
        Euclidean(3, 2, ndim=1)
    with pytest.raises(ValueError, match="ndim"):
        Euclidean(ndim=-1)
    E = Euclidean(3, 2)
    x = torch.zeros(3, 2, dtype=DT)
    with pytest.raises(ValueError, match="expected"):
        E.proj(x, torch.zeros(2, 3, dtype=DT))
    with pytest.raises(ValueError, match="u has shape"):
        E.retr(x, torch.zeros(4, 3, 2, dtype=DT))  # batch dims differ
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        E.retr(x, bad)
    with pytest.raises(ValueError, match="non-finite"):
        E.retr(bad, x)
    with pytest.raises(ValueError, match="not a valid point"):
        E.check_point(bad)
    with pytest.raises(ValueError, match="not a valid point"):
        E.check_point(torch.zeros(2, 2, dtype=DT))
    with pytest.raises(ValueError, match="not a valid tangent"):
        E.check_tangent(x, bad)
