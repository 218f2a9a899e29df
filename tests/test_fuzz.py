"""Property-based tests (hypothesis, derandomized): quotient-lift identities and the
transformation invariance of the invariant zoo optimizers over random shapes, ranks, batch
sizes, dtypes and gauge conditioning.

Tolerances are relative errors proportional to the conditioning of the factors:
``C · eps(dtype) · (κ(M) + κ(N))`` with ``C = 100`` (measured worst ratio over 900 random cases:
3.2, for every metric and both dtypes; random square factors reach κ ~ 1e3, the drawn gauge R
up to 1e3 in float64 and ~30 in float32). Every drawn case must pass: a failure is a bug with a
minimal example.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optim_zoo import ZOO, ZooEntry, zoo_ids  # noqa: E402

from geolora.manifolds.quotient import FactorQuotient  # noqa: E402
from geolora.manifolds.types import FactorPoint, FactorTangent  # noqa: E402

F64 = torch.float64
C_TOL = 100.0
MAX_LOG10_COND = {torch.float64: 3.0, torch.float32: 1.5}


def fuzz_settings(n: int):
    return settings(
        max_examples=n,
        derandomize=True,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
        print_blob=True,
    )


# --- random problems ------------------------------------------------------------------------
@st.composite
def lift_cases(draw, max_dim: int = 64):
    """(m, n, r, batch, dtype, log10 cond(R), seed) for a lift problem."""
    m = draw(st.integers(1, max_dim))
    n = draw(st.integers(1, max_dim))
    r = draw(st.integers(1, min(m, n)))
    batch = draw(st.sampled_from([(), (1,), (3,)]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    log_cond = draw(st.floats(0.0, MAX_LOG10_COND[dtype]))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, n, r, batch, dtype, log_cond, seed


def gauge(r: int, log_cond: float, g: torch.Generator) -> torch.Tensor:
    """``R = Q₁ diag(s) Q₂`` with ``cond(R) = 10^log_cond`` (float64)."""
    Q1 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0]
    Q2 = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))[0]
    s = torch.logspace(0.0, log_cond, r, dtype=F64) if r > 1 else torch.ones(1, dtype=F64)
    return (Q1 * s) @ Q2


def make_point(m, n, r, batch, log_cond, seed):
    """Gaussian factors ``(M₀, N₀)``, the gauge ``R``, ``(M₀R, N₀R⁻ᵀ)`` and a dense ``Ẋ``
    (float64)."""
    g = torch.Generator().manual_seed(seed)
    M0 = torch.randn(*batch, m, r, generator=g, dtype=F64)
    N0 = torch.randn(*batch, n, r, generator=g, dtype=F64)
    R = gauge(r, log_cond, g)
    Z = torch.randn(*batch, m, n, generator=g, dtype=F64)
    return M0, N0, R, M0 @ R, N0 @ torch.linalg.inv(R).mT, Z


def proj_tangent(M: torch.Tensor, N: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """Dense reference ``P_T(Z) = P_M Z + Z P_N − P_M Z P_N`` (float64)."""
    U = torch.linalg.qr(M)[0]
    V = torch.linalg.qr(N)[0]
    ZV = Z @ V
    return U @ (U.mT @ Z) + ZV @ V.mT - U @ ((U.mT @ ZV) @ V.mT)


def lift_tol(dtype: torch.dtype, *factors: torch.Tensor, squared: bool = False) -> float:
    """``C · eps · (κ(M) + κ(N))`` for the factor pair(s) given (max over batch and pairs);
    ``squared``: ``κ(M)² + κ(N)²`` (for solves with Gram matrices)."""
    conds = [float(torch.linalg.cond(f.to(F64)).max()) ** (2 if squared else 1) for f in factors]
    kappa = max(conds[i] + conds[i + 1] for i in range(0, len(conds), 2))
    return C_TOL * torch.finfo(dtype).eps * kappa


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over the batch of ``‖a − b‖_F / ‖b‖_F`` (float64)."""
    a, b = a.to(F64), b.to(F64)
    num = (a - b).flatten(-2).norm(dim=-1)
    den = b.flatten(-2).norm(dim=-1).clamp_min(torch.finfo(F64).tiny)
    return float((num / den).max())


METRICS = ("balanced", "preconditioned", "flat")


# --- lift identities --------------------------------------------------------------------------
@fuzz_settings(120)
@given(case=lift_cases(), metric=st.sampled_from(METRICS))
def test_lift_differential_is_tangent_projection(case, metric) -> None:
    """``Dπ(M, N)[lift(Ẋ)] = Ṁ Nᵀ + M Ṅᵀ = P_T(Ẋ)`` for every metric."""
    m, n, r, batch, dtype, log_cond, seed = case
    _, _, _, M, N, Z = make_point(m, n, r, batch, log_cond, seed)
    q = FactorQuotient(m, n, r, metric)
    x = FactorPoint(M.to(dtype), N.to(dtype))
    u = q.lift(x, Z.to(dtype))
    assert u.M.dtype == dtype and u.M.shape == x.M.shape and u.N.shape == x.N.shape
    D = q.differential(FactorPoint(M, N), FactorTangent(u.M.to(F64), u.N.to(F64)))
    err = rel(D, proj_tangent(M, N, Z))
    tol = lift_tol(dtype, M, N)
    assert err <= tol, f"{metric} {dtype}: ‖Dπ[lift] − P_T(Ẋ)‖/‖P_T(Ẋ)‖ = {err:.3g} (tol {tol:.3g})"


@fuzz_settings(100)
@given(case=lift_cases(), metric=st.sampled_from(METRICS))
def test_lift_is_horizontal(case, metric) -> None:
    """The lift is metric-orthogonal to the vertical space: ``ḡ(lift, (MΩ, −NΩᵀ)) = 0`` for a
    random ``Ω``, and ``horizontal_proj(lift) = lift``."""
    m, n, r, batch, dtype, log_cond, seed = case
    _, _, _, M, N, Z = make_point(m, n, r, batch, log_cond, seed)
    q = FactorQuotient(m, n, r, metric)
    u = q.lift(FactorPoint(M.to(dtype), N.to(dtype)), Z.to(dtype))
    x64 = FactorPoint(M, N)
    u64 = FactorTangent(u.M.to(F64), u.N.to(F64))
    g = torch.Generator().manual_seed(seed + 1)
    Om = torch.randn(*batch, r, r, generator=g, dtype=F64)
    v = FactorTangent(M @ Om, -N @ Om.mT)
    met = q.metric
    tol = lift_tol(dtype, M, N)
    cos = float(
        (
            met.inner(x64, u64, v).abs() / (met.inner(x64, u64, u64) * met.inner(x64, v, v)).sqrt()
        ).max()
    )
    assert cos <= tol, f"{metric} {dtype}: |cos(lift, vertical)| = {cos:.3g} (tol {tol:.3g})"
    # horizontal_proj solves with the Gram matrices G = FᵀF: condition κ(F)².
    h = q.horizontal_proj(x64, u64)
    err = max(rel(h.M, u64.M), rel(h.N, u64.N))
    tol = lift_tol(dtype, M, N, squared=True)
    assert err <= tol, (
        f"{metric} {dtype}: horizontal_proj moved the lift by {err:.3g} (tol {tol:.3g})"
    )


@fuzz_settings(100)
@given(case=lift_cases(), metric=st.sampled_from(("balanced", "preconditioned")))
def test_lift_is_gauge_equivariant(case, metric) -> None:
    """For the invariant metrics ``lift_{(M R, N R⁻ᵀ)}(Ẋ) = (Ṁ R, Ṅ R⁻ᵀ)`` where
    ``(Ṁ, Ṅ) = lift_{(M, N)}(Ẋ)``."""
    m, n, r, batch, dtype, log_cond, seed = case
    M0, N0, R, M, N, Z = make_point(m, n, r, batch, log_cond, seed)
    q = FactorQuotient(m, n, r, metric)
    u0 = q.lift(FactorPoint(M0.to(dtype), N0.to(dtype)), Z.to(dtype))
    u1 = q.lift(FactorPoint(M.to(dtype), N.to(dtype)), Z.to(dtype))
    want_M = u0.M.to(F64) @ R
    want_N = u0.N.to(F64) @ torch.linalg.inv(R).mT
    tol = lift_tol(dtype, M0, N0, M, N)
    err = max(rel(u1.M, want_M), rel(u1.N, want_N))
    assert err <= tol, f"{metric} {dtype}: equivariance error {err:.3g} (tol {tol:.3g})"


# --- optimizer invariance ---------------------------------------------------------------------
INVARIANT = [e for e in ZOO if e.invariant]


@st.composite
def invariance_cases(draw):
    m = draw(st.integers(2, 64))
    n = draw(st.integers(2, 64))
    r = draw(st.integers(1, min(m, n, 8)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    log_cond = draw(st.floats(0.0, 3.0 if dtype == torch.float64 else 2.0))
    log_cond_x = draw(st.floats(0.0, 2.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, n, r, dtype, log_cond, log_cond_x, seed


def conditioned(rows: int, r: int, log_cond: float, g: torch.Generator) -> torch.Tensor:
    """``Q diag(s) P`` (``rows x r``, float64) with ``Q`` orthonormal, ``P`` orthogonal and
    singular values ``s`` log-spaced in ``[10^-log_cond, 1]``."""
    Q = torch.linalg.qr(torch.randn(rows, r, generator=g, dtype=F64))[0]
    return (Q * torch.logspace(-log_cond, 0.0, r, dtype=F64)) @ gauge(r, 0.0, g)


INV_STEPS = 4
# Optimizer steps compound rounding errors and element-wise normalisations (Adam's
# m / (sqrt(v) + eps)) amplify them where gradient entries are small: measured worst
# deviation / (eps · κ) over the zoo ≈ 210 (LoRAM-FR, 4 steps, r = n and all singular values
# of X equal; 150 random cases), so C = 1000 here.
C_INV = 1000.0


def x_trajectory(
    entry: ZooEntry, B: torch.Tensor, A: torch.Tensor, target: torch.Tensor
) -> tuple[list[torch.Tensor], float]:
    """``X_t = B_t A_t`` for ``INV_STEPS`` steps of ``0.5‖B A − target‖²`` and the largest
    ``κ(B_t) + κ(A_t)`` met on the way (the rounding errors of a step scale with it)."""
    B = torch.nn.Parameter(B.clone())
    A = torch.nn.Parameter(A.clone())
    group = {"params": [B, A], "lora_pair": True, "scaling": 1.0, "name": "p"}
    opt = entry.factory([group], robust_steps=0)
    out, kappa = [], 0.0
    for _ in range(INV_STEPS):
        cond = torch.linalg.cond(B.detach().to(F64)) + torch.linalg.cond(A.detach().to(F64))
        kappa = max(kappa, float(cond))
        opt.zero_grad(set_to_none=True)
        (0.5 * ((B @ A - target) ** 2).sum()).backward()
        opt.step()
        out.append((B @ A).detach().to(F64))
    return out, kappa


@pytest.mark.parametrize("entry", INVARIANT, ids=zoo_ids(INVARIANT))
@fuzz_settings(20)
@given(case=invariance_cases())
def test_optimizer_is_transformation_invariant(entry: ZooEntry, case, device) -> None:
    """The ``X = B A`` trajectory from ``(B R, R⁻¹ A)`` equals the one from ``(B, A)`` for
    ``INV_STEPS`` steps (``robust_steps=0``), to ``C_INV · eps · max_t (κ(B_t) + κ(A_t))`` over both
    runs (a trajectory may pass near a rank-deficient ``X``, where the factors' conditioning and
    so the rounding errors grow).

    The start has ``κ(X) ≤ 10^log_cond_x ≤ 100``: pairs with ``κ(X) > 10³`` take the AdamW
    robust start (base class), which is not invariant by design.
    """
    m, n, r, dtype, log_cond, log_cond_x, seed = case
    g = torch.Generator().manual_seed(seed)
    B = conditioned(m, r, log_cond_x / 2, g)
    A = conditioned(n, r, log_cond_x / 2, g).T
    R = gauge(r, log_cond, g)
    target = torch.randn(m, n, generator=g, dtype=F64)
    B1, A1 = B @ R, torch.linalg.solve(R, A)
    B, A, B1, A1, target = (t.to(device=device, dtype=dtype) for t in (B, A, B1, A1, target))
    ref, k0 = x_trajectory(entry, B, A, target)
    got, k1 = x_trajectory(entry, B1, A1, target)
    tol = C_INV * torch.finfo(dtype).eps * max(k0, k1)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    assert max(errs) <= tol, (
        f"{entry.name} {dtype}: X-trajectory deviation per step {errs} (tol {tol:.3g})"
    )


# --- LoRAM: repeated singular values ------------------------------------------------------------
LORAM = [e for e in INVARIANT if e.name.startswith("loram")]


@st.composite
def clustered_cases(draw):
    """A start ``X = U diag(s) Vᵀ`` whose singular values come from three levels, so clusters of
    equal values (partial, full, or none) are common; ``r = min(m, n)`` is drawn too."""
    m = draw(st.integers(2, 24))
    n = draw(st.integers(2, 24))
    r = draw(st.integers(2, min(m, n, 6)))
    levels = draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=r, max_size=r))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    log_cond = draw(st.floats(0.0, 3.0 if dtype == torch.float64 else 2.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return m, n, r, sorted(levels, reverse=True), dtype, log_cond, seed


@pytest.mark.parametrize("entry", LORAM, ids=zoo_ids(LORAM))
@fuzz_settings(25)
@given(case=clustered_cases())
def test_loram_invariant_at_repeated_singular_values(entry: ZooEntry, case) -> None:
    """LoRAM's coordinates live in the SVD frame, which is only defined up to a rotation within
    a cluster of equal singular values; averaging the second moment over each cluster keeps the
    ``X`` trajectory gauge invariant there (same tolerance as above)."""
    m, n, r, levels, dtype, log_cond, seed = case
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=F64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=F64))[0]
    P = gauge(r, 0.0, g)  # a generic factorisation of X: B = U diag(s) P, A = Pᵀ Vᵀ
    B = (U * torch.tensor(levels, dtype=F64)) @ P
    A = P.T @ V.T
    R = gauge(r, log_cond, g)
    target = torch.randn(m, n, generator=g, dtype=F64)
    ref, k0 = x_trajectory(entry, B.to(dtype), A.to(dtype), target.to(dtype))
    got, k1 = x_trajectory(
        entry, (B @ R).to(dtype), torch.linalg.solve(R, A).to(dtype), target.to(dtype)
    )
    tol = C_INV * torch.finfo(dtype).eps * max(k0, k1)
    errs = [rel(a, b) for a, b in zip(got, ref)]
    assert max(errs) <= tol, (
        f"{entry.name} {dtype} s={levels}: X-trajectory deviation per step {errs} (tol {tol:.3g})"
    )
