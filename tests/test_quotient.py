"""FactorQuotient: lifts, horizontality, equivariance, projected gradients, gauge-free numerics."""

import pytest
import torch

from geolora.manifolds.frame import tangent_to_dense
from geolora.manifolds.metrics import BalancedMetric, FlatMetric, PreconditionedMetric
from geolora.manifolds.quotient import FactorQuotient
from geolora.manifolds.types import FactorPoint, FactorTangent, FixedRankTangent

f64 = torch.float64
METRICS = ["balanced", "preconditioned", "flat"]
m, n, r = 17, 11, 4


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def gauges(gen):
    d = torch.diag(torch.tensor([1e3] + [1.0] * (r - 2) + [1e-3], dtype=f64))
    q, _ = torch.linalg.qr(torch.randn(r, r, dtype=f64, generator=gen))
    well = q @ torch.diag(torch.linspace(0.5, 2.0, r, dtype=f64))
    return {"diag1e3": d, "random": well}


@pytest.mark.parametrize("metric", METRICS)
def test_lift_differential_equals_projection(metric, gen):
    Q = FactorQuotient(m, n, r, metric)
    x = Q.random_point(3, generator=gen)
    Z = torch.randn(3, m, n, dtype=f64, generator=gen)
    fr = Q.frame(x)
    PZ = tangent_to_dense(fr, Q.to_tangent(x, Z, fr))
    # P_T is the orthogonal projector: idempotent and Z − P_T Z ⟂ T_X.
    assert rel(tangent_to_dense(fr, Q.to_tangent(x, PZ, fr)), PZ) < 1e-12
    u = Q.lift(x, Z)
    assert rel(Q.differential(x, u), PZ) < 1e-10


@pytest.mark.parametrize("metric", METRICS)
def test_lift_is_horizontal(metric, gen):
    Q = FactorQuotient(m, n, r, metric)
    x = Q.random_point(2, generator=gen)
    u = Q.lift(x, torch.randn(2, m, n, dtype=f64, generator=gen))
    for _ in range(5):
        om = torch.randn(2, r, r, dtype=f64, generator=gen)
        v = FactorTangent(x.M @ om, -x.N @ om.mT)
        cos = Q.inner(x, u, v) / (Q.norm(x, u) * Q.norm(x, v))
        assert cos.abs().max().item() < 1e-10
    # the vertical projection of a horizontal vector vanishes
    vp = Q.vertical_proj(x, u)
    assert (Q.norm(x, vp) / Q.norm(x, u)).max().item() < 1e-10


@pytest.mark.parametrize("metric", METRICS)
def test_horizontal_projection_is_an_orthogonal_projector(metric, gen):
    Q = FactorQuotient(m, n, r, metric)
    x = Q.random_point(2, generator=gen)
    u = FactorTangent(
        torch.randn(2, m, r, dtype=f64, generator=gen),
        torch.randn(2, n, r, dtype=f64, generator=gen),
    )
    h = Q.horizontal_proj(x, u)
    hh = Q.horizontal_proj(x, h)
    assert rel(hh.M, h.M) < 1e-10 and rel(hh.N, h.N) < 1e-10
    v = Q.vertical_proj(x, u)
    assert (Q.inner(x, h, v).abs() / (Q.norm(x, h) * Q.norm(x, v))).max().item() < 1e-10
    # the vertical part really is vertical: (M Ω, −N Ωᵀ) for some Ω
    om = torch.linalg.lstsq(x.M, v.M).solution
    assert rel(v.N, -x.N @ om.mT) < 1e-9


@pytest.mark.parametrize("metric", ["balanced", "preconditioned"])
@pytest.mark.parametrize("gauge", ["diag1e3", "random"])
def test_lift_is_equivariant(metric, gauge, gen):
    Q = FactorQuotient(m, n, r, metric)
    x = Q.random_point(generator=gen)
    Z = torch.randn(m, n, dtype=f64, generator=gen)
    R = gauges(gen)[gauge]
    Rit = torch.linalg.inv(R).mT
    u = Q.lift(x, Z)
    u2 = Q.lift(FactorPoint(x.M @ R, x.N @ Rit), Z)
    assert rel(u2.M, u.M @ R) < 1e-9
    assert rel(u2.N, u.N @ Rit) < 1e-9


def test_flat_lift_is_not_equivariant(gen):
    Q = FactorQuotient(m, n, r, "flat")
    x = Q.random_point(generator=gen)
    Z = torch.randn(m, n, dtype=f64, generator=gen)
    R = gauges(gen)["diag1e3"]
    u = Q.lift(x, Z)
    u2 = Q.lift(FactorPoint(x.M @ R, x.N @ torch.linalg.inv(R).mT), Z)
    assert rel(u2.M, u.M @ R) > 1e-3


def test_balanced_lift_identities(gen):
    """LoRA-S: MᵀṀ = K G_M and ṄᵀN = G_N K with K from eq. 9."""
    from geolora.linalg import solve_sylvester_gram

    Q = FactorQuotient(m, n, r, "balanced")
    x = Q.random_point(generator=gen)
    Z = torch.randn(m, n, dtype=f64, generator=gen)
    u = Q.lift(x, Z)
    GM, GN = x.M.T @ x.M, x.N.T @ x.N
    K = solve_sylvester_gram(GM, GN, x.M.T @ Z @ x.N)
    assert rel(x.M.T @ u.M, K @ GM) < 1e-10
    assert rel(u.N.T @ x.N, GN @ K) < 1e-10
    # and equals the textbook formula of Alg. 1
    Mdot = (Z @ x.N - x.M @ GN @ K) @ torch.linalg.inv(GN)
    Ndot = (Z.T @ x.M - x.N @ GM @ K.T) @ torch.linalg.inv(GM)
    assert rel(u.M, Mdot) < 1e-10 and rel(u.N, Ndot) < 1e-10


def test_preconditioned_lift_closed_form(gen):
    Q = FactorQuotient(m, n, r, "preconditioned")
    x = Q.random_point(generator=gen)
    Z = torch.randn(m, n, dtype=f64, generator=gen)
    u = Q.lift(x, Z)
    PM = x.M @ torch.linalg.solve(x.M.T @ x.M, x.M.T)
    PN = x.N @ torch.linalg.solve(x.N.T @ x.N, x.N.T)
    I_m, I_n = torch.eye(m, dtype=f64), torch.eye(n, dtype=f64)
    Mdot = (I_m - 0.5 * PM) @ Z @ x.N @ torch.linalg.inv(x.N.T @ x.N)
    Ndot = (I_n - 0.5 * PN) @ Z.T @ x.M @ torch.linalg.inv(x.M.T @ x.M)
    assert rel(u.M, Mdot) < 1e-10 and rel(u.N, Ndot) < 1e-10


def test_project_gradient_from_factor_grads(gen):
    """P_T(∇_X f) from ∇_M = G N, ∇_N = Gᵀ M equals the dense projection (LoRA-S eq. 12)."""
    Q = FactorQuotient(m, n, r)
    x = Q.random_point(4, generator=gen)
    G = torch.randn(4, m, n, dtype=f64, generator=gen)
    fr = Q.frame(x)
    t = Q.project_gradient(x, G @ x.N, G.mT @ x.M, fr)
    assert isinstance(t, FixedRankTangent)
    assert rel(tangent_to_dense(fr, t), tangent_to_dense(fr, Q.to_tangent(x, G, fr))) < 1e-10
    assert (fr.U.mT @ t.Up).abs().max() < 1e-12 and (fr.V.mT @ t.Vp).abs().max() < 1e-12


@pytest.mark.parametrize("metric", METRICS)
def test_batched_equals_loop(metric, gen):
    Q = FactorQuotient(m, n, r, metric)
    x = Q.random_point(5, generator=gen)
    Z = torch.randn(5, m, n, dtype=f64, generator=gen)
    u = Q.lift(x, Z)
    for i in range(5):
        ui = Q.lift(FactorPoint(x.M[i], x.N[i]), Z[i])
        assert (ui.M - u.M[i]).abs().max() < 1e-12 and (ui.N - u.N[i]).abs().max() < 1e-12


def test_fp32_lift_error_independent_of_gauge(gen):
    """Gauge-free numerics (``docs/design.md``, "Gauge-free lift"): the fp32 balanced lift's error
    (vs fp64) does not grow with an ill-conditioned factor balance R = diag(1 … 10⁴)."""
    Q = FactorQuotient(120, 90, 8, "balanced")
    x = Q.random_point(generator=gen)
    Z = torch.randn(120, 90, dtype=f64, generator=gen)
    errs = {}
    for k in (0, 2, 4):
        R = torch.diag(torch.logspace(0, k, 8, dtype=f64))
        xr = FactorPoint(x.M @ R, x.N @ torch.linalg.inv(R).mT)
        ref = Q.differential(xr, Q.lift(xr, Z))
        x32 = FactorPoint(xr.M.float(), xr.N.float())
        u32 = Q.lift(x32, Z.float())
        # compare the induced matrix step, the gauge-independent quantity
        d32 = Q.differential(FactorPoint(xr.M, xr.N), FactorTangent(u32.M.double(), u32.N.double()))
        errs[k] = rel(d32, ref)
    assert max(errs.values()) < 1e-4, errs
    assert errs[4] < 20 * max(errs[0], 1e-7), errs


def test_riemannian_gradient_matches_directional_derivative(gen):
    for metric in (BalancedMetric(), PreconditionedMetric(), FlatMetric()):
        Q = FactorQuotient(m, n, r, metric)
        x = Q.random_point(generator=gen)
        A = torch.randn(m, n, dtype=f64, generator=gen)
        M = x.M.clone().requires_grad_()
        N = x.N.clone().requires_grad_()
        f = 0.5 * ((M @ N.T - A) ** 2).sum()
        gM, gN = torch.autograd.grad(f, (M, N))
        rg = Q.egrad2rgrad(x, FactorTangent(gM, gN))
        u = FactorTangent(
            torch.randn(m, r, dtype=f64, generator=gen), torch.randn(n, r, dtype=f64, generator=gen)
        )
        df = (gM * u.M).sum() + (gN * u.N).sum()
        assert abs(Q.inner(x, rg, u).item() - df.item()) < 1e-10 * abs(df.item()) + 1e-12


def test_bad_input():
    with pytest.raises(ValueError, match="rank r=5 exceeds"):
        FactorQuotient(4, 6, 5)
    with pytest.raises(ValueError, match="unknown metric"):
        FactorQuotient(4, 6, 2, metric="nope")
    Q = FactorQuotient(6, 5, 2)
    x = Q.random_point()
    with pytest.raises(ValueError, match="xdot has shape"):
        Q.lift(x, torch.randn(5, 6, dtype=f64))
    with pytest.raises(ValueError, match="rank deficient"):
        Q.check_point(FactorPoint(torch.zeros(6, 2, dtype=f64), x.N))
    with pytest.raises(ValueError, match="shape"):
        Q.check_point(FactorPoint(torch.zeros(5, 2, dtype=f64), x.N))
    with pytest.raises(ValueError, match="non-finite"):
        Q.retr(x, FactorTangent(torch.full((6, 2), float("nan"), dtype=f64), x.N))
    with pytest.raises(ValueError, match="damping"):
        FactorQuotient(6, 5, 2, damping=-1.0)
    assert Q.dim == (6 + 5 - 2) * 2
