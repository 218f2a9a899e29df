"""BoundedRank: metric, gradient, Q-factor retraction, nuclear-norm term, transport (float64).

Algorithm numbers refer to Jiang, Wang & Stich, "LoRAM: Low-Rank Adaptation of Large Language
Models on Manifold", ICLR 2025 Workshop on Sparsity in LLMs, OpenReview 6cLPObfitT.
"""

from __future__ import annotations

import pytest
import torch

from geolora.checks import autograd_egrad, check_gradient, check_retraction, check_transport
from geolora.linalg import polar
from geolora.manifolds.bounded_rank import BoundedRank
from geolora.manifolds.types import BoundedRankPoint, BoundedRankTangent
from geolora.retractions.bounded_rank import (
    qfactor_retraction,
    singular_value_threshold,
)

F64 = torch.float64
M_, N_, R_ = 9, 7, 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=F64, generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def tree_rel(u, v) -> float:
    num = sum(float((a - b).norm() ** 2) for a, b in zip(u, v))
    den = sum(float(b.norm() ** 2) for b in v)
    return (num / max(den, 1e-300)) ** 0.5


@pytest.fixture
def man() -> BoundedRank:
    return BoundedRank(M_, N_, R_, alpha=0.3)


def smooth_f(A: torch.Tensor):
    """A non-quadratic function of X = K Vᵀ (so the test is not only about least squares)."""

    def fX(X: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((X - A) ** 2).sum() + torch.sin(X).sum() + 0.1 * (X**4).sum()

    return fX


# --- construction and basic structure ---------------------------------------------------------
def test_dim_repr_and_constructor_errors() -> None:
    man = BoundedRank(10, 6, 2)
    assert man.dim == (10 + 6 - 2) * 2
    assert man.alpha == 0.5
    assert "BoundedRank(m=10, n=6, r=2" in repr(man)
    with pytest.raises(ValueError, match="alpha"):
        BoundedRank(4, 3, 2, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        BoundedRank(4, 3, 2, alpha=float("nan"))
    with pytest.raises(ValueError, match="r must be"):
        BoundedRank(4, 3, 4)
    with pytest.raises(ValueError, match="m must be"):
        BoundedRank(0, 3, 1)
    with pytest.raises(TypeError, match="n must be an int"):
        BoundedRank(4, 3.0, 1)
    with pytest.raises(ValueError, match="qr_method"):
        BoundedRank(4, 3, 1, qr_method="svd")


def test_random_point_tangent_and_checks(man: BoundedRank) -> None:
    g = gen(1)
    x = man.random_point(2, generator=g)
    assert x.K.shape == (2, M_, R_) and x.V.shape == (2, N_, R_)
    man.check_point(x)
    u = man.random_tangent(x, generator=g)
    man.check_tangent(x, u)
    assert float((x.V.transpose(-1, -2) @ u.Vp).abs().max()) < 1e-13
    with pytest.raises(ValueError, match="VᵀV deviates"):
        man.check_point(BoundedRankPoint(x.K, 2 * x.V))
    with pytest.raises(ValueError, match="V has shape"):
        man.check_point(BoundedRankPoint(x.K, x.V[..., :-1, :]))
    with pytest.raises(ValueError, match="VᵀVp deviates"):
        man.check_tangent(x, BoundedRankTangent(u.K, u.Vp + x.V))
    with pytest.raises(ValueError, match="non-finite"):
        man.check_point(BoundedRankPoint(x.K * float("nan"), x.V))
    with pytest.raises(TypeError, match="x must be a BoundedRankPoint"):
        man.proj(x.K, u)
    with pytest.raises(TypeError, match="u must be a BoundedRankTangent"):
        man.inner(x, u.K)
    assert man.is_point(x) and not man.is_point((x.K,))


# --- metric and gradient ----------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.5, 0.05])
def test_metric_is_the_ambient_metric(alpha: float) -> None:
    """⟨u, v⟩_x = ⟨Ẋ, Ẋ'⟩ + α⟨Ṗ, Ṗ'⟩ with (Ẋ, Ṗ) = (K̇Vᵀ + KV̇pᵀ, −(V̇pVᵀ + VV̇pᵀ))."""
    man = BoundedRank(M_, N_, R_, alpha=alpha)
    g = gen(2)
    x = man.random_point(generator=g)
    u, v = man.random_tangent(x, g), man.random_tangent(x, g)
    lhs = man.inner(x, u, v)
    rhs = man.ambient_inner(man.embed_tangent(x, u), man.embed_tangent(x, v))
    assert abs(float(lhs - rhs)) <= 1e-12 * abs(float(rhs))
    assert float(man.inner(x, u)) > 0 and torch.allclose(man.norm(x, u) ** 2, man.inner(x, u))
    # proj_ambient inverts embed_tangent on tangent vectors.
    assert tree_rel(man.proj_ambient(x, man.embed_tangent(x, u)), u) < 1e-12


@pytest.mark.parametrize("zero_K", [False, True])
def test_rgrad_matches_directional_derivative(man: BoundedRank, zero_K: bool) -> None:
    """inner(x, grad f, u) = D f(x)[u] = ⟨∇_X f, Ẋ⟩ for random tangent u (rel 1e-10)."""
    g = gen(3)
    x = man.random_point(generator=g)
    if zero_K:  # the LoRA B = 0 start: K = 0 is a point, the metric is 2α‖V̇p‖² there
        x = BoundedRankPoint(torch.zeros_like(x.K), x.V)
    fX = smooth_f(randn(M_, N_, g=g))
    X = man.to_matrix(x).requires_grad_(True)
    G = torch.autograd.grad(fX(X), X)[0]
    rg_dense = man.egrad2rgrad(x, G)
    rg_fact = man.rgrad_factored(x, G @ x.V, G.T @ x.K)
    rg_auto = man.egrad2rgrad(x, autograd_egrad(lambda p: fX(p.K @ p.V.T), x))
    assert tree_rel(rg_fact, rg_dense) < 1e-13
    assert tree_rel(rg_auto, rg_dense) < 1e-13
    man.check_tangent(x, rg_dense)
    for _ in range(3):
        u = man.random_tangent(x, g)
        Xdot = man.tangent_to_matrix(x, u)
        _, dfu = torch.func.jvp(fX, (man.to_matrix(x),), (Xdot,))
        lhs = man.inner(x, rg_dense, u)
        assert abs(float(lhs - dfu)) <= 1e-10 * abs(float(dfu))
    # the closed form (∇f V, (I − VVᵀ) ∇fᵀ K (KᵀK + 2αI)⁻¹)
    Gram = x.K.T @ x.K + 2 * man.alpha * torch.eye(R_, dtype=F64)
    P = torch.eye(N_, dtype=F64) - x.V @ x.V.T
    assert rel(rg_dense.K, G @ x.V) < 1e-13
    if zero_K:  # Gᵀ K = 0: the row space does not move at K = 0
        assert float(rg_dense.Vp.abs().max()) == 0.0
    else:
        assert rel(rg_dense.Vp, P @ G.T @ x.K @ torch.linalg.inv(Gram)) < 1e-12


def test_egrad2rgrad_input_errors(man: BoundedRank) -> None:
    x = man.random_point(generator=gen(4))
    with pytest.raises(ValueError, match="g has shape"):
        man.egrad2rgrad(x, torch.zeros(M_, N_ + 1, dtype=F64))
    with pytest.raises(TypeError, match="g must be"):
        man.egrad2rgrad(x, [x.K])


def test_check_gradient_slope(man: BoundedRank) -> None:
    """Taylor test along the Q-factor retraction: slope 2 on f = ½‖X − A‖² and a smooth f."""
    g = gen(5)
    A = randn(M_, N_, g=g)
    x = man.random_point(generator=g)
    res = check_gradient(man, lambda p: 0.5 * ((p.K @ p.V.T - A) ** 2).sum(), x, generator=g)
    assert res.slope >= 1.9 and not res.exact and res.tangent_residual < 1e-12
    fX = smooth_f(A)
    res2 = check_gradient(man, lambda p: fX(p.K @ p.V.T), x, generator=g)
    assert res2.slope >= 1.9


# --- retraction -------------------------------------------------------------------------------
def test_retraction_formula_and_validity(man: BoundedRank) -> None:
    g = gen(6)
    x = man.random_point(4, generator=g)
    u = man.random_tangent(x, g)
    for scale in (1e-3, 1.0, 30.0):
        us = BoundedRankTangent(scale * u.K, scale * u.Vp)
        y = man.retr(x, us)
        assert y.K.shape == x.K.shape and y.V.shape == x.V.shape
        eye = torch.eye(R_, dtype=F64)
        assert float((y.V.transpose(-1, -2) @ y.V - eye).abs().max()) < 1e-12
        man.check_point(y)
        # X⁺ = (X + Ẋ) V⁺V⁺ᵀ with V⁺ = qf(V + V̇p) (dense reference)
        Xs = man.to_matrix(x) + man.tangent_to_matrix(x, us)
        ref = Xs @ y.V @ y.V.transpose(-1, -2)
        assert rel(man.to_matrix(y), ref) < 1e-12
        q, rr = torch.linalg.qr(x.V + us.Vp)
        s = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)
        assert rel(y.V, q * s) < 1e-12
    # R_x(0) = x
    y0 = man.retr(x, BoundedRankTangent(torch.zeros_like(u.K), torch.zeros_like(u.Vp)))
    assert rel(y0.K, x.K) < 1e-14 and rel(y0.V, x.V) < 1e-14


def test_retraction_first_order(man: BoundedRank) -> None:
    g = gen(7)
    x = man.random_point(generator=g)
    res = check_retraction(man, x, generator=g)
    assert res.slope >= 1.9
    # The Q-factor retraction is first order only: the tangential t²-term is (0, V̇p K̇ᵀK G⁻¹).
    assert 1.9 <= res.tangential.slope < 2.5


def test_retraction_from_zero_K(man: BoundedRank) -> None:
    g = gen(8)
    x = man.from_factors(torch.zeros(M_, R_, dtype=F64), randn(R_, N_, g=g))
    assert float(x.K.abs().max()) == 0.0
    man.check_point(x)
    u = man.random_tangent(x, g)
    y = man.retr(x, u)
    man.check_point(y)
    # K = 0: X + Ẋ = K̇ Vᵀ, so X⁺ = K̇ Vᵀ V⁺ V⁺ᵀ
    ref = u.K @ x.V.T @ y.V @ y.V.T
    assert rel(man.to_matrix(y), ref) < 1e-12


# --- nuclear-norm term ------------------------------------------------------------------------
def test_nuclear_subgradient_is_riemannian_gradient_of_nuclear_norm(man: BoundedRank) -> None:
    """(Q, 0) with Q = polar(K) is egrad2rgrad of ∇‖X‖_* = U Vᵀ at a rank-r point."""
    g = gen(9)
    x = man.random_point(generator=g)
    U, _, Vh = torch.linalg.svd(man.to_matrix(x), full_matrices=False)
    UVt = U[:, :R_] @ Vh[:R_]
    sub = man.nuclear_subgradient(x)
    assert tree_rel(man.egrad2rgrad(x, UVt), sub) < 1e-12
    assert rel(sub.K @ x.V.T, UVt) < 1e-12


def test_nuclear_subgradient_mode(man: BoundedRank) -> None:
    g = gen(10)
    x = man.random_point(generator=g)
    u = man.random_tangent(x, g)
    lam = 0.05
    y = man.retr(x, u, nuclear_lambda=lam)
    # exactly the plain retraction along u − λ (polar(K), 0)   (LoRAM Alg. 7, line 4)
    Q = polar(x.K)
    y_ref = man.retr(x, BoundedRankTangent(u.K - lam * Q, u.Vp))
    assert rel(y.K, y_ref.K) < 1e-13 and rel(y.V, y_ref.V) < 1e-13
    # and X⁺ = (X + Ẋ − λ U Vᵀ) V⁺V⁺ᵀ with the SVD U Σ Vᵀ of X
    U, S, Vh = torch.linalg.svd(man.to_matrix(x), full_matrices=False)
    Xs = man.to_matrix(x) + man.tangent_to_matrix(x, u) - lam * U[:, :R_] @ Vh[:R_]
    assert rel(man.to_matrix(y), Xs @ y.V @ y.V.T) < 1e-12
    # with u = 0 it shrinks every singular value by λ (λ < σ_min), V unchanged
    zero = BoundedRankTangent(torch.zeros_like(u.K), torch.zeros_like(u.Vp))
    y0 = man.retr(x, zero, nuclear_lambda=lam)
    s0 = torch.linalg.svdvals(x.K)
    assert float(s0.min()) > lam
    assert rel(torch.linalg.svdvals(y0.K), s0 - lam) < 1e-12
    assert rel(y0.V, x.V) < 1e-14


def test_nuclear_prox_mode(man: BoundedRank) -> None:
    g = gen(11)
    x = man.random_point(generator=g)
    u = man.random_tangent(x, g)
    plain = man.retr(x, u)
    s_plain = torch.linalg.svdvals(plain.K)
    lam = float(s_plain[1])  # kills the smallest singular values: the rank drops to 1
    y = man.retr(x, u, nuclear_lambda=lam, nuclear_mode="prox")
    assert rel(y.V, plain.V) < 1e-14
    expected = (s_plain - lam).clamp_min(0)
    assert float((torch.linalg.svdvals(y.K) - expected).abs().max()) < 1e-12
    assert int((torch.linalg.svdvals(man.to_matrix(y)) > 1e-10).sum()) == 1
    man.check_point(y)  # a rank-deficient point is still a point
    # the prox never moves X = 0 (unlike the subgradient step)
    z = BoundedRankPoint(torch.zeros_like(x.K), x.V)
    zero = BoundedRankTangent(torch.zeros_like(u.K), torch.zeros_like(u.Vp))
    assert float(man.retr(z, zero, nuclear_lambda=0.1, nuclear_mode="prox").K.abs().max()) == 0.0
    # prox = argmin ½‖K − K⁺‖² + λ‖K‖_*: optimality beats random perturbations
    Kp = plain.K

    def obj(K: torch.Tensor) -> float:
        return float(0.5 * ((K - Kp) ** 2).sum() + lam * torch.linalg.svdvals(K).sum())

    best = obj(y.K)
    for _ in range(20):
        assert obj(y.K + 1e-3 * randn(M_, R_, g=g)) >= best - 1e-12


def test_nuclear_batched_lambda_and_errors(man: BoundedRank) -> None:
    g = gen(12)
    x = man.random_point(3, generator=g)
    u = man.random_tangent(x, g)
    lam = torch.tensor([0.0, 0.01, 0.1], dtype=F64)
    for mode in ("subgradient", "prox"):
        yb = man.retr(x, u, nuclear_lambda=lam, nuclear_mode=mode)
        for i in range(3):
            xi = BoundedRankPoint(x.K[i], x.V[i])
            ui = BoundedRankTangent(u.K[i], u.Vp[i])
            yi = man.retr(xi, ui, nuclear_lambda=float(lam[i]), nuclear_mode=mode)
            assert rel(yb.K[i], yi.K) < 1e-12 and rel(yb.V[i], yi.V) < 1e-12
    with pytest.raises(ValueError, match="nuclear_lambda"):
        man.retr(x, u, nuclear_lambda=-1.0)
    with pytest.raises(ValueError, match="nuclear_lambda"):
        man.retr(x, u, nuclear_lambda=-lam)
    with pytest.raises(ValueError, match="nuclear_mode"):
        man.retr(x, u, nuclear_lambda=0.1, nuclear_mode="l1")
    with pytest.raises(ValueError, match="nuclear_mode"):
        qfactor_retraction(x.K, x.V, u.K, u.Vp, nuclear_mode="l1")
    assert rel(singular_value_threshold(x.K, 0.0), x.K) < 1e-13


# --- transport --------------------------------------------------------------------------------
def test_transport_is_projection_and_tangent(man: BoundedRank) -> None:
    g = gen(13)
    x = man.random_point(generator=g)
    u, v = man.random_tangent(x, g), man.random_tangent(x, g)
    y, w = man.retr_transp(x, u, v)
    man.check_tangent(y, w)
    assert float((y.V.T @ w.Vp).abs().max()) < 1e-12
    # = metric projection of the ambient (Ẋ, Ṗ) of v onto T_y (LoRAM Alg. 8)
    assert tree_rel(w, man.proj_ambient(y, man.embed_tangent(x, v))) < 1e-12
    # transport x → x is the identity
    assert tree_rel(man.transp(x, x, v), v) < 1e-12
    res = check_transport(man, x, u, v)
    assert res.slope >= 0.9 and res.tangent_residual < 1e-12 and res.linearity_residual < 1e-12


def test_retr_transp_passes_nuclear_term(man: BoundedRank) -> None:
    g = gen(14)
    x = man.random_point(generator=g)
    u, v = man.random_tangent(x, g), man.random_tangent(x, g)
    y, w = man.retr_transp(x, u, v, nuclear_lambda=0.1, nuclear_mode="prox")
    y_ref = man.retr(x, u, nuclear_lambda=0.1, nuclear_mode="prox")
    assert rel(y.K, y_ref.K) < 1e-14
    assert tree_rel(w, man.transp(x, y_ref, v)) < 1e-14


# --- batching ---------------------------------------------------------------------------------
def test_batched_equals_loop(man: BoundedRank) -> None:
    g = gen(15)
    x = man.random_point(2, 3, generator=g)
    u, v = man.random_tangent(x, g), man.random_tangent(x, g)
    G = randn(2, 3, M_, N_, g=g)
    y = man.retr(x, u)
    batched = {
        "proj": man.proj(x, BoundedRankTangent(u.K, u.Vp + x.V)),
        "egrad2rgrad": man.egrad2rgrad(x, G),
        "inner": man.inner(x, u, v),
        "retr": y,
        "transp": man.transp(x, y, v),
    }
    for i in range(2):
        for j in range(3):
            xi = BoundedRankPoint(x.K[i, j], x.V[i, j])
            ui = BoundedRankTangent(u.K[i, j], u.Vp[i, j])
            vi = BoundedRankTangent(v.K[i, j], v.Vp[i, j])
            yi = man.retr(xi, ui)
            loop = {
                "proj": man.proj(xi, BoundedRankTangent(ui.K, ui.Vp + xi.V)),
                "egrad2rgrad": man.egrad2rgrad(xi, G[i, j]),
                "inner": man.inner(xi, ui, vi),
                "retr": yi,
                "transp": man.transp(xi, yi, vi),
            }
            for key, val in loop.items():
                b = batched[key]
                if isinstance(val, torch.Tensor):
                    assert abs(float(b[i, j] - val)) <= 1e-12 * abs(float(val)), key
                else:
                    assert tree_rel([t[i, j] for t in b], list(val)) < 1e-12, key


# --- conversions ------------------------------------------------------------------------------
def test_from_factors_and_from_matrix(man: BoundedRank) -> None:
    g = gen(16)
    B, A = randn(M_, R_, g=g), randn(R_, N_, g=g)
    x = man.from_factors(B, A)
    man.check_point(x)
    assert rel(man.to_matrix(x), B @ A) < 1e-12
    # LoRA init B = 0: K = 0 and V spans the row space of A
    z = man.from_factors(torch.zeros(M_, R_, dtype=F64), A)
    man.check_point(z)
    assert float(z.K.abs().max()) == 0.0
    assert rel(A @ z.V @ z.V.T, A) < 1e-12
    # A = 0: V is still orthonormal, X = 0
    z2 = man.from_factors(B, torch.zeros(R_, N_, dtype=F64))
    man.check_point(z2)
    assert float(man.to_matrix(z2).abs().max()) == 0.0
    # batched
    xb = man.from_factors(randn(2, M_, R_, g=g), randn(2, R_, N_, g=g))
    man.check_point(xb)
    # from_matrix is the best rank-r approximation
    Xfull = randn(M_, N_, g=g)
    xm = man.from_matrix(Xfull)
    U, S, Vh = torch.linalg.svd(Xfull, full_matrices=False)
    assert rel(man.to_matrix(xm), U[:, :R_] * S[:R_] @ Vh[:R_]) < 1e-12
    with pytest.raises(ValueError, match="B has shape"):
        man.from_factors(randn(M_ + 1, R_, g=g), A)
    with pytest.raises(ValueError, match="A has shape"):
        man.from_factors(B, randn(R_, N_ + 1, g=g))
    with pytest.raises(ValueError, match="batch shapes"):
        man.from_factors(randn(2, M_, R_, g=g), A)
    with pytest.raises(ValueError, match="X has shape"):
        man.from_matrix(randn(N_, M_, g=g))


def test_float32_keeps_dtype() -> None:
    man = BoundedRank(M_, N_, R_)
    g = gen(17)
    x = man.random_point(dtype=torch.float32, generator=g)
    u = man.random_tangent(x, g)
    y, w = man.retr_transp(x, u, u)
    assert y.K.dtype == y.V.dtype == w.K.dtype == w.Vp.dtype == torch.float32
    man.check_point(y)
    man.check_tangent(y, w)


def test_cholesky_qr_path_matches_householder() -> None:
    """``qr_method="auto"`` picks CholeskyQR2 on accelerators; both give the same retraction."""
    g = gen(18)
    hh, ch = (
        BoundedRank(M_, N_, R_, qr_method="householder"),
        BoundedRank(M_, N_, R_, qr_method="cholesky"),
    )
    x = hh.random_point(2, generator=g)
    u = hh.random_tangent(x, g)
    y1, y2 = hh.retr(x, u), ch.retr(x, u)
    assert rel(y1.K, y2.K) < 1e-12 and rel(y1.V, y2.V) < 1e-12
