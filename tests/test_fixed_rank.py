"""FixedRank (embedded): identities, pymanopt checks, retraction order, batching, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pymanopt.manifolds import FixedRankEmbedded
from pymanopt.manifolds.fixed_rank import _FixedRankTangentVector

from geolora.checks import fit_slope
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.types import FixedRankPoint, FixedRankTangent
from geolora.retractions import (
    fixed_rank_retraction,
    fixed_rank_transport,
    get_retraction,
    projection_transport,
)

DT = torch.float64
M_, N_, R_ = 9, 7, 3
TS = [10.0 ** (-3 + 0.5 * k) for k in range(5)]  # 1e-3 ... 1e-1


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def maxdiff(a, b) -> float:
    if isinstance(a, tuple):
        return max(maxdiff(p, q) for p, q in zip(a, b))
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


def scale(t: FixedRankTangent, c: float) -> FixedRankTangent:
    return FixedRankTangent(*(c * a for a in t))


def setup(seed: int = 0, *batch: int, m: int = M_, n: int = N_, r: int = R_):
    F = FixedRank(m, n, r)
    g = gen(seed)
    x = F.random_point(*batch, dtype=DT, generator=g)
    u = F.random_tangent(x, generator=g)
    return F, x, u, g


def dense_proj(x: FixedRankPoint, z: torch.Tensor) -> torch.Tensor:
    pu, pv = x.U @ x.U.mT, x.V @ x.V.mT
    return pu @ z + z @ pv - pu @ z @ pv


def truncated_svd(a: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    return u[..., :r] * s[..., None, :r] @ vh[..., :r, :]


# --- construction ----------------------------------------------------------------------------
def test_constructor_and_dim():
    assert FixedRank(9, 7, 3).dim == (9 + 7 - 3) * 3
    for bad in (8, 0, -1):
        with pytest.raises(ValueError, match=f"r={bad}"):
            FixedRank(9, 7, bad)
    with pytest.raises(ValueError, match="m and n"):
        FixedRank(0, 7, 1)


def test_random_point_and_checks():
    F, x, u, _ = setup(0)
    F.check_point(x)
    F.check_tangent(x, u)
    assert maxdiff(x.U.mT @ x.U, torch.eye(R_, dtype=DT)) < 1e-12
    assert bool((x.S[:-1] >= x.S[1:]).all()) and bool((x.S > 0).all())
    assert maxdiff(x.U.mT @ u.Up, 0) < 1e-12 and maxdiff(x.V.mT @ u.Vp, 0) < 1e-12
    cases = [
        (FixedRankPoint(2 * x.U, x.S, x.V), "UᵀU"),
        (FixedRankPoint(x.U, x.S, x.V + 0.1), "VᵀV"),
        (FixedRankPoint(x.U, torch.cat([x.S[:-1], x.S.new_zeros(1)]), x.V), "positive"),
        (FixedRankPoint(x.U, -x.S, x.V), "positive"),
        (FixedRankPoint(x.U[:-1], x.S, x.V), "U has shape"),
        (FixedRankPoint(x.U, x.S[:-1], x.V), "S has shape"),
        (FixedRankPoint(x.U, x.S, x.V.expand(2, N_, R_)), "batch dims"),
        (FixedRankPoint(x.U.clone().fill_(float("nan")), x.S, x.V), "non-finite"),
        ((x.U, x.S), "FixedRankPoint"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            F.check_point(bad)
    with pytest.raises(ValueError, match="UᵀUp"):
        F.check_tangent(x, FixedRankTangent(u.M, u.Up + x.U, u.Vp))
    with pytest.raises(ValueError, match="VᵀVp"):
        F.check_tangent(x, FixedRankTangent(u.M, u.Up, u.Vp + x.V))
    with pytest.raises(ValueError, match="M has shape"):
        F.check_tangent(x, FixedRankTangent(u.M[:-1], u.Up, u.Vp))


# --- projection ------------------------------------------------------------------------------
def test_projection_identities():
    F, x, _, g = setup(1)
    z, w = (torch.randn(M_, N_, dtype=DT, generator=g) for _ in range(2))
    pz = F.proj(x, z)
    F.check_tangent(x, pz)
    assert maxdiff(x.U.mT @ pz.Up, 0) < 1e-12 and maxdiff(x.V.mT @ pz.Vp, 0) < 1e-12
    dz = F.tangent2ambient(x, pz)
    assert maxdiff(dz, dense_proj(x, z)) < 1e-12  # P_U Z + Z P_V − P_U Z P_V
    assert maxdiff(F.proj(x, dz), pz) < 1e-12  # idempotent
    pw = F.proj(x, w)
    # orthogonal projection: residual ⟂ T_X, and inner = Frobenius inner of the matrices
    assert abs(float((z - dz).mul(F.tangent2ambient(x, pw)).sum())) < 1e-12
    assert abs(float(F.inner(x, pz, pw) - (dz * F.tangent2ambient(x, pw)).sum())) < 1e-12
    assert abs(float(F.norm(x, pz) - torch.linalg.matrix_norm(dz))) < 1e-12
    assert maxdiff(F.egrad2rgrad(x, z), pz) == 0.0
    a, b = F.tangent2factors(x, pz)
    assert a.shape == (M_, 2 * R_) and b.shape == (N_, 2 * R_)
    assert maxdiff(a @ b.mT, dz) < 1e-12
    # X itself is tangent at X: P_X(X) = X
    X = F.to_matrix(x)
    assert maxdiff(F.tangent2ambient(x, F.proj(x, X)), X) < 1e-12


def test_project_factored_matches_autograd_trick():
    """LoRAM Alg. 2 (Jiang, Wang & Stich, ICLR 2025 Workshop on Sparsity in LLMs, OpenReview
    6cLPObfitT): W = A Vᵀ + U Bᵀ, A = U S, B = 0; A.grad = ∇f V, B.grad = ∇fᵀ U."""
    F, x, _, g = setup(2)
    target = torch.randn(M_, N_, dtype=DT, generator=g)

    def f(w):
        return 0.5 * ((torch.sin(w) - target) ** 2).sum()

    a = (x.U * x.S).requires_grad_()
    b = torch.zeros(N_, R_, dtype=DT, requires_grad=True)
    f(a @ x.V.mT + x.U @ b.mT).backward()
    w = F.to_matrix(x).requires_grad_()
    (egrad,) = torch.autograd.grad(f(w), w)
    got = F.project_factored(x, a.grad, b.grad)
    assert maxdiff(got, F.egrad2rgrad(x, egrad)) < 1e-12
    with pytest.raises(ValueError, match="ZtU"):
        F.project_factored(x, a.grad, b.grad[:-1])


# --- pymanopt cross-checks -------------------------------------------------------------------
def _pm(x: FixedRankPoint):
    return (x.U.numpy(), x.S.numpy(), x.V.numpy().T)


def _pm_tangent(u: FixedRankTangent):
    return _FixedRankTangentVector(u.Up.numpy(), u.M.numpy(), u.Vp.numpy())


def _from_pm_tangent(t) -> FixedRankTangent:
    return FixedRankTangent(*(torch.from_numpy(np.asarray(a)) for a in (t.M, t.Up, t.Vp)))


def test_pymanopt_crosschecks():
    F, x, u, g = setup(3)
    P = FixedRankEmbedded(M_, N_, R_)
    pt = _pm(x)
    z = torch.randn(M_, N_, dtype=DT, generator=g)
    pz = F.proj(x, z)
    assert maxdiff(pz, _from_pm_tangent(P.projection(pt, z.numpy()))) < 1e-10
    # pymanopt's egrad2rgrad takes the gradients w.r.t. its factors (u, s, vt) of f(u diag(s) vt)
    du = (z @ x.V * x.S).numpy()
    ds = torch.diagonal(x.U.mT @ z @ x.V).numpy()
    dvt = (x.S[:, None] * (x.U.mT @ z)).numpy()
    rg = P.euclidean_to_riemannian_gradient(pt, (du, ds, dvt))
    assert maxdiff(F.egrad2rgrad(x, z), _from_pm_tangent(rg)) < 1e-10
    assert (
        abs(float(F.inner(x, u, pz)) - P.inner_product(pt, _pm_tangent(u), _pm_tangent(pz))) < 1e-10
    )
    y = F.retr(x, u)
    yp = P.retraction(pt, _pm_tangent(u))
    dense_yp = torch.from_numpy(yp.u @ np.diag(yp.s) @ yp.vt)
    assert maxdiff(F.to_matrix(y), dense_yp) < 1e-10
    assert maxdiff(y.S, torch.from_numpy(yp.s)) < 1e-10  # pymanopt adds eps to S
    # transport: pymanopt returns coordinates w.r.t. its own (sign/rotation-free) y factors
    w = F.transp(x, y, u)
    wp = P.transport(pt, yp, _pm_tangent(u))
    ypu, ypv = torch.from_numpy(yp.u), torch.from_numpy(yp.vt.T)
    dense_wp = ypu @ torch.from_numpy(wp.M) @ ypv.mT
    dense_wp = dense_wp + torch.from_numpy(wp.Up) @ ypv.mT + ypu @ torch.from_numpy(wp.Vp).mT
    assert maxdiff(F.tangent2ambient(y, w), dense_wp) < 1e-10


# --- retraction ------------------------------------------------------------------------------
def test_retraction_is_truncated_svd():
    F, x, u, _ = setup(4)
    for c in (0.3, 1.0, 5.0):
        y = F.retr(x, scale(u, c))
        F.check_point(y)
        assert maxdiff(y.U.mT @ y.U, torch.eye(R_, dtype=DT)) < 1e-10
        assert maxdiff(y.V.mT @ y.V, torch.eye(R_, dtype=DT)) < 1e-10
        target = truncated_svd(F.to_matrix(x) + c * F.tangent2ambient(x, u), R_)
        assert maxdiff(F.to_matrix(y), target) < 1e-10
    assert maxdiff(F.to_matrix(F.retr(x, scale(u, 0.0))), F.to_matrix(x)) < 1e-12
    assert get_retraction("fixed_rank.svd") is fixed_rank_retraction


def test_retraction_second_order():
    """Metric projection ⇒ second order (Absil–Malick 2012). Precisely, with ‖Ẋ‖ = 1:

    * e₁(t) = ‖R_X(tẊ) − (X + tẊ)‖ = O(t²) and not smaller: slope in [1.9, 2.1];
    * e₂(t) = ‖R_X(tẊ) − (X + tẊ + t² Up S⁻¹ Vpᵀ)‖ = O(t³): slope ≥ 2.9, where
      Up S⁻¹ Vpᵀ = ½ X''(0) is the normal curvature term (second fundamental form).
    """
    F, x, u, _ = setup(5)
    u = scale(u, 1.0 / float(F.norm(x, u)))
    X, D = F.to_matrix(x), F.tangent2ambient(x, u)
    curv = (u.Up / x.S) @ u.Vp.mT
    ys = [F.to_matrix(F.retr(x, scale(u, t))) for t in TS]
    e1 = [float((y - X - t * D).norm()) for y, t in zip(ys, TS)]
    e2 = [float((y - X - t * D - t * t * curv).norm()) for y, t in zip(ys, TS)]
    assert 1.9 <= fit_slope(TS, e1, window_length=len(TS)).slope <= 2.1
    assert fit_slope(TS, e2, window_length=len(TS)).slope >= 2.9


def test_retraction_degenerate_cases():
    F, x, u, _ = setup(6)
    # rank-deficient Up, Vp (here zero): [U Up] is rank deficient, U⁺ must stay orthonormal
    t = FixedRankTangent(u.M, torch.zeros_like(u.Up), torch.zeros_like(u.Vp))
    y = F.retr(x, t)
    F.check_point(y)
    assert maxdiff(F.to_matrix(y), F.to_matrix(x) + F.tangent2ambient(x, t)) < 1e-10
    # the LoRAM start S = 0 (allow_zero): the retraction is the truncated SVD of Ẋ
    x0 = FixedRankPoint(x.U, torch.zeros_like(x.S), x.V)
    y0 = F.retr(x0, u)
    F.check_point(y0)
    assert maxdiff(F.to_matrix(y0), truncated_svd(F.tangent2ambient(x0, u), R_)) < 1e-10
    # wide [U Up] (m < 2r) and a step that lowers the rank: S⁺ gets a zero, U⁺, V⁺ orthonormal
    F2, x2, u2, _ = setup(7, m=3, n=5, r=2)
    y2 = F2.retr(x2, u2)
    F2.check_point(y2)
    target = truncated_svd(F2.to_matrix(x2) + F2.tangent2ambient(x2, u2), 2)
    assert maxdiff(F2.to_matrix(y2), target) < 1e-10
    kill = FixedRankTangent(-torch.diag(x.S), torch.zeros_like(u.Up), torch.zeros_like(u.Vp))
    yk = F.retr(x, kill)  # X + Ẋ = 0
    assert maxdiff(yk.S, 0) < 1e-12
    assert maxdiff(yk.U.mT @ yk.U, torch.eye(R_, dtype=DT)) < 1e-10


# --- transport -------------------------------------------------------------------------------
def test_transport():
    F, x, u, g = setup(8)
    y = F.retr(x, u)
    v = F.random_tangent(x, generator=g)
    w = F.transp(x, y, v)
    F.check_tangent(y, w)
    # factored (Alg. 4) = generic dense projection transport P_{T_Y}(Ẋ)
    assert maxdiff(w, projection_transport(F, x, y, v)) < 1e-12
    assert maxdiff(F.tangent2ambient(y, w), dense_proj(y, F.tangent2ambient(x, v))) < 1e-12
    assert maxdiff(F.transp(x, x, v), v) < 1e-12  # identity on T_X
    assert maxdiff(fixed_rank_transport(x, y, v), w) == 0.0
    y2, w2 = F.retr_transp(x, u, v)
    assert maxdiff(y2, y) == 0.0 and maxdiff(w2, w) == 0.0


# --- conversions -----------------------------------------------------------------------------
def test_from_matrix_and_factors():
    F, x, _, g = setup(9)
    X = F.to_matrix(x)
    for y in (F.from_matrix(X), F.from_factors(x.U * x.S, x.V.mT)):
        F.check_point(y)
        assert maxdiff(F.to_matrix(y), X) < 1e-12
        assert maxdiff(y.S, x.S) < 1e-12
    # k > r: the best rank-r approximation of B A, same as the dense truncated SVD
    B = torch.randn(M_, 5, dtype=DT, generator=g)
    A = torch.randn(5, N_, dtype=DT, generator=g)
    y = F.from_factors(B, A)
    assert maxdiff(F.to_matrix(y), F.to_matrix(F.from_matrix(B @ A))) < 1e-12
    assert maxdiff(F.to_matrix(y), truncated_svd(B @ A, R_)) < 1e-12
    # low precision factors are processed in float32
    y32 = F.from_factors(B.bfloat16(), A.bfloat16())
    assert y32.U.dtype == torch.float32
    # rank < r: rejected unless allow_zero
    for B0, A0 in ((torch.zeros(M_, R_, dtype=DT), A[:R_]), (B[:, :2], A[:2])):
        with pytest.raises(ValueError, match="rank < r"):
            F.from_factors(B0, A0)
    with pytest.raises(ValueError, match="rank < r"):
        F.from_matrix(torch.zeros(M_, N_, dtype=DT))
    # LoRA's B = 0 init: S = 0, U, V orthonormal, V spans the rows of A
    z = F.from_factors(torch.zeros(M_, R_, dtype=DT), A[:R_], allow_zero=True)
    assert maxdiff(z.S, 0) == 0.0
    assert maxdiff(z.U.mT @ z.U, torch.eye(R_, dtype=DT)) < 1e-12
    assert maxdiff(z.V.mT @ z.V, torch.eye(R_, dtype=DT)) < 1e-12
    assert maxdiff(z.V @ (z.V.mT @ A[:R_].mT), A[:R_].mT) < 1e-12
    with pytest.raises(ValueError, match="positive"):
        F.check_point(z)
    # k < r with allow_zero: padded, exact product, one zero singular value
    z2 = F.from_factors(B[:, :2], A[:2], allow_zero=True)
    assert maxdiff(F.to_matrix(z2), B[:, :2] @ A[:2]) < 1e-12
    assert float(z2.S[-1]) < 1e-12 and float(z2.S[-2]) > 1e-3
    assert maxdiff(z2.U.mT @ z2.U, torch.eye(R_, dtype=DT)) < 1e-12
    with pytest.raises(ValueError, match="B .* and A"):
        F.from_factors(B, A[:4])
    with pytest.raises(ValueError, match="batch dims"):
        F.from_factors(B.expand(2, M_, 5), A.expand(3, 5, N_))
    with pytest.raises(ValueError, match="X has shape"):
        F.from_matrix(X.mT)


# --- batching --------------------------------------------------------------------------------
def test_batched_matches_loop():
    F, x, u, g = setup(10, 2, 3)
    z = torch.randn(2, 3, M_, N_, dtype=DT, generator=g)
    v = F.random_tangent(x, generator=g)
    B = torch.randn(2, 3, M_, 4, dtype=DT, generator=g)
    A = torch.randn(2, 3, 4, N_, dtype=DT, generator=g)
    out = {
        "proj": F.proj(x, z),
        "pf": F.project_factored(x, z @ x.V, z.mT @ x.U),
        "inner": F.inner(x, u, v),
        "retr": F.retr(x, u),
        "amb": F.tangent2ambient(x, u),
        "mat": F.to_matrix(x),
        "ff": F.from_factors(B, A),
        "fm": F.from_matrix(z),
    }
    out["transp"] = F.transp(x, out["retr"], v)
    assert out["inner"].shape == (2, 3)
    for i in range(2):
        for j in range(3):
            xi = FixedRankPoint(*(t[i, j] for t in x))
            ui = FixedRankTangent(*(t[i, j] for t in u))
            vi = FixedRankTangent(*(t[i, j] for t in v))
            zi = z[i, j]
            yi = F.retr(xi, ui)
            ref = {
                "proj": F.proj(xi, zi),
                "pf": F.project_factored(xi, zi @ xi.V, zi.mT @ xi.U),
                "inner": F.inner(xi, ui, vi),
                "retr": yi,
                "amb": F.tangent2ambient(xi, ui),
                "mat": F.to_matrix(xi),
                "ff": F.from_factors(B[i, j], A[i, j]),
                "fm": F.from_matrix(zi),
                "transp": F.transp(xi, yi, vi),
            }
            for key, val in ref.items():
                got = out[key]
                got = tuple(t[i, j] for t in got) if isinstance(got, tuple) else got[i, j]
                assert maxdiff(got, val) < 1e-12, key


# --- bad input -------------------------------------------------------------------------------
def test_bad_input():
    F, x, u, _ = setup(11)
    bad = u.Up.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'Up'.*non-finite"):
        F.retr(x, FixedRankTangent(u.M, bad, u.Vp))
    with pytest.raises(ValueError, match="'S'.*non-finite"):
        F.retr(FixedRankPoint(x.U, x.S * float("inf"), x.V), u)
    with pytest.raises(ValueError, match="Vp has shape"):
        F.retr(x, FixedRankTangent(u.M, u.Up, u.Vp[:-1]))
    with pytest.raises(ValueError, match="M has shape"):  # batch dims differ from the point's
        F.retr(x, FixedRankTangent(u.M.expand(2, R_, R_), u.Up, u.Vp))
    with pytest.raises(ValueError, match="ambient Z"):
        F.proj(x, torch.zeros(N_, M_, dtype=DT))
    with pytest.raises(ValueError, match="FixedRankPoint"):
        F.retr(x.U, u)
    _, xb, _, _ = setup(12, 2)
    with pytest.raises(ValueError, match="batch dims"):
        F.transp(x, xb, u)
    with pytest.raises(ValueError, match="from_matrix: X"):
        F.from_matrix(torch.full((M_, N_), float("nan"), dtype=DT))
