"""The LoRA-S lifted optimizers: AdamS, LRACS, LiftedSGD, LiftedShampoo and Lifted(torch.optim.X).

* invariance: the ``X = B A`` trajectory from ``(B, A)`` equals the one from ``(B R, R⁻¹ A)``;
* exactness: step-by-step agreement with dense single-pair references written here from the
  algorithm boxes (Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester
  Equation", ICLR 2026, OpenReview Guo2XGgxZA, Alg. 2, 3, 4; Gupta et al. 2018 for Shampoo);
* convergence on planted low-rank matrix sensing and a stochastic LoRA least-squares problem;
* batched (``foreach=True``) == per-pair (``foreach=False``), state round trips, validation.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from geolora.manifolds.frame import make_frame, project_dense
from geolora.manifolds.metrics import get_metric
from geolora.manifolds.quotient import assemble_lift
from geolora.manifolds.types import FactorPoint
from geolora.optim.lifted import AdamS
from geolora.optim.lifted_sgd import LiftedSGD
from geolora.optim.lracs import LRACS, balanced_representative_norm
from geolora.optim.preconditioners.racs import racs_scalings
from geolora.optim.shampoo import LiftedShampoo, fd_update
from geolora.optim.wrap import Lifted

F64 = torch.float64


def pair(B: torch.Tensor, A: torch.Tensor, name: str) -> dict:
    return {"params": [B, A], "lora_pair": True, "scaling": 1.0, "name": name}


CONFIGS: dict[str, tuple[type, dict]] = {
    "adams": (AdamS, {"lr": 1e-2}),
    "adams_low_memory": (AdamS, {"lr": 1e-2, "low_memory": True}),
    "adams_riemannian_v": (AdamS, {"lr": 1e-2, "riemannian_second_moment": True}),
    "lracs": (LRACS, {"lr": 1e-2}),
    "lifted_sgd": (LiftedSGD, {"lr": 5e-2}),
    "lifted_sgd_momentum": (LiftedSGD, {"lr": 2e-2, "momentum": 0.9}),
    "lifted_sgd_nesterov": (LiftedSGD, {"lr": 2e-2, "momentum": 0.9, "nesterov": True}),
    "shampoo": (LiftedShampoo, {"lr": 5e-2}),
    "shampoo_sketch": (LiftedShampoo, {"lr": 5e-2, "sketch_rank": 5, "beta2": 0.9}),
    "wrap_sgd": (Lifted(torch.optim.SGD, momentum=0.9), {"lr": 2e-2}),
    "wrap_adam": (Lifted(torch.optim.Adam), {"lr": 1e-2}),
    "wrap_adamw": (Lifted(torch.optim.AdamW), {"lr": 1e-2, "weight_decay": 0.5}),
    "wrap_adagrad": (Lifted(torch.optim.Adagrad), {"lr": 1e-1}),
    "wrap_rmsprop": (Lifted(torch.optim.RMSprop), {"lr": 1e-2}),
}


def build(name: str, groups: list[dict], **over) -> torch.optim.Optimizer:
    cls, kw = CONFIGS[name]
    return cls(groups, **{**kw, "robust_steps": 0, **over})


# --- shared problem: f_t(X) = ½‖C ∘ (X − T_t)‖², T_t a deterministic "minibatch" target --------
def weighted_problem(m: int, n: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    C = 0.5 + rng.random((m, n))
    T = rng.standard_normal((m, n))
    return C, [T + 0.3 * rng.standard_normal((m, n)) for _ in range(60)]


def torch_loss(C, Ts, t: int, B, A) -> torch.Tensor:
    C_ = torch.as_tensor(C, dtype=B.dtype)
    T_ = torch.as_tensor(Ts[t], dtype=B.dtype)
    return 0.5 * ((C_ * (B @ A - T_)) ** 2).sum()


def gauges(r: int) -> list[torch.Tensor]:
    """I, diag(10^k) with k spread over [−3, 3], and a random R of condition 10."""
    g = torch.Generator().manual_seed(5)
    q1, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    q2, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=F64))
    rand = q1 @ torch.diag(torch.logspace(-0.5, 0.5, r, dtype=F64)) @ q2
    return [torch.eye(r, dtype=F64), torch.diag(10.0 ** torch.linspace(-3, 3, r, dtype=F64)), rand]


def gauge_trajectories(name: str, steps: int = 50, **over) -> list[list[torch.Tensor]]:
    """The ``X = B A`` trajectories of one optimizer from every gauge of the same point (each
    gauge is its own pair of one optimizer; the pairs share nothing but the batch)."""
    m, n, r = 12, 10, 4
    g = torch.Generator().manual_seed(1)
    B0 = torch.randn(m, r, generator=g, dtype=F64)
    A0 = torch.randn(r, n, generator=g, dtype=F64)
    pairs = [(nn.Parameter(B0 @ R), nn.Parameter(torch.linalg.inv(R) @ A0)) for R in gauges(r)]
    opt = build(name, [pair(B, A, f"g{i}") for i, (B, A) in enumerate(pairs)], **over)
    C, Ts = weighted_problem(m, n)
    trajs: list[list[torch.Tensor]] = [[] for _ in pairs]
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        sum(torch_loss(C, Ts, t, B, A) for B, A in pairs).backward()
        opt.step()
        for traj, (B, A) in zip(trajs, pairs):
            traj.append((B @ A).detach().clone())
    return trajs


def max_rel_dev(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm() / y.norm()).item() for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_invariance_under_gauge(name: str) -> None:
    """50 float64 steps from (B, A), (B D, D⁻¹ A) with D = diag(10^k), k ∈ [−3, 3], and
    (B R, R⁻¹ A) with a random R of condition 10: the same B A at every step to 1e-9."""
    ref, *others = gauge_trajectories(name)
    assert (ref[-1] - ref[0]).norm() > 1e-2 * ref[0].norm(), "the optimizer did not move"
    for traj in others:
        assert max_rel_dev(traj, ref) < 1e-9


def test_adamw_decay_changes_the_trajectory() -> None:
    """Lifted(AdamW)'s decoupled decay acts (its trajectory differs from Lifted(Adam)'s) and
    the gauge invariance above holds with it."""
    adamw = gauge_trajectories("wrap_adamw", steps=20)[0]
    adam = gauge_trajectories("wrap_adam", steps=20)[0]
    assert max_rel_dev(adamw, adam) > 1e-3


def test_lifted_adamw_decay_acts_on_x() -> None:
    """With a zero gradient AdamW's descent is ``λ X``, whose balanced lift is ``λ (M/2, N/2)``:
    one step gives exactly ``X⁺ = (1 − lr λ / 2)² X``."""
    g = torch.Generator().manual_seed(2)
    B = nn.Parameter(torch.randn(9, 3, generator=g, dtype=F64))
    A = nn.Parameter(torch.randn(3, 7, generator=g, dtype=F64))
    X0 = (B @ A).detach().clone()
    lr, lam = 0.1, 0.3
    opt = Lifted(torch.optim.AdamW)([pair(B, A, "l0")], lr=lr, weight_decay=lam)
    B.grad, A.grad = torch.zeros_like(B), torch.zeros_like(A)
    opt.step()
    expected = (1 - lr * lam / 2) ** 2 * X0
    assert ((B @ A).detach() - expected).norm() < 1e-13 * X0.norm()


# --- dense references from the algorithm boxes -------------------------------------------------
def ref_tangent_projection(M: np.ndarray, N: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """P_T(Z) = P_M Z + Z P_N − P_M Z P_N with P_M = M (MᵀM)⁻¹ Mᵀ."""
    PM = M @ np.linalg.inv(M.T @ M) @ M.T
    PN = N @ np.linalg.inv(N.T @ N) @ N.T
    return PM @ Z + Z @ PN - PM @ Z @ PN


def ref_lift(M: np.ndarray, N: np.ndarray, Xd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LoRA-S Alg. 1 lines 3–5 verbatim (Sylvester eq. 9 by scipy, explicit inverses)."""
    GM, GN = M.T @ M, N.T @ N
    S = GM @ GN
    K = scipy.linalg.solve_sylvester(S, S, M.T @ Xd @ N)
    Md = (Xd @ N - M @ GN @ K) @ np.linalg.inv(GN)
    Nd = (Xd.T @ M - N @ GM @ K.T) @ np.linalg.inv(GM)
    return Md, Nd


def ref_metric_norm(M, N, Md, Nd) -> float:
    """Balanced metric (eq. 7): tr(G_M⁻¹ ṀᵀṀ) + tr(G_N⁻¹ ṄᵀṄ)."""
    a = np.trace(np.linalg.inv(M.T @ M) @ Md.T @ Md)
    b = np.trace(np.linalg.inv(N.T @ N) @ Nd.T @ Nd)
    return math.sqrt(a + b)


def run_reference(step_fn, M, N, C, Ts, steps: int) -> list[np.ndarray]:
    traj = []
    for t in range(steps):
        G = ref_tangent_projection(M, N, C * C * (M @ N.T - Ts[t]))
        M, N = step_fn(t + 1, M, N, G)
        traj.append(M @ N.T)
    return traj


def ref_adams(lr, betas, eps, low_memory):
    """AdamS, Alg. 2 (Alg. 4 with ``low_memory``: the first moment is the projection transport
    P_T(m) of the previous one) with Adam's bias corrections and ε."""
    b1, b2 = betas
    st = {"m": 0.0, "v": 0.0}

    def step(t, M, N, G):
        m_prev = ref_tangent_projection(M, N, st["m"]) if low_memory and t > 1 else st["m"]
        st["m"] = b1 * m_prev + (1 - b1) * G
        st["v"] = b2 * st["v"] + (1 - b2) * G * G
        Xd = (st["m"] / (1 - b1**t)) / (np.sqrt(st["v"] / (1 - b2**t)) + eps)
        Md, Nd = ref_lift(M, N, Xd)
        return M - lr * Md, N - lr * Nd

    return step


def ref_lracs(lr, beta, gamma, eps, bias_correction, log):
    """LRACS, Alg. 3: dense eq.-14 power iteration (5 steps from q = 1) on G ∘ G, moments of
    s and q (optionally bias-corrected), X̃ = Diag(m_q)^{-1/2} G Diag(m_s)^{-1/2} (relative
    floor eps), limiter on ‖X̃‖_g."""
    st = {"ms": 0.0, "mq": 0.0, "phi": 0.0, "t": 0}

    def floor(v):
        v = v / (1 - beta ** st["t"]) if bias_correction else v
        return np.maximum(v, eps * v.max())

    def step(t, M, N, G):
        st["t"] = t
        E = G * G
        q = np.ones(G.shape[0])
        for _ in range(5):
            s = E.T @ q / (q @ q)
            q = E @ s / (s @ s)
        st["ms"] = beta * st["ms"] + (1 - beta) * s
        st["mq"] = beta * st["mq"] + (1 - beta) * q
        Xd = np.diag(floor(st["mq"]) ** -0.5) @ G @ np.diag(floor(st["ms"]) ** -0.5)
        Md, Nd = ref_lift(M, N, Xd)
        nrm = ref_metric_norm(M, N, Md, Nd)
        eta = 1.0 if t == 1 else gamma / max(nrm / st["phi"], gamma)
        st["phi"] = eta * nrm
        log.append(eta)
        return M - lr * eta * Md, N - lr * eta * Nd

    return step


def fractional_power(S: np.ndarray, p: float) -> np.ndarray:
    lam, Q = np.linalg.eigh(S)
    return Q @ np.diag(np.maximum(lam, 0.0) ** p) @ Q.T


def ref_shampoo(lr, beta2, eps):
    """Shampoo (Gupta et al. 2018, Alg. 1) on G = P_T(∇f): dense L, R and
    X̃ = (L + ε_L I)^{-1/4} G (R + ε_R I)^{-1/4}, ε = eps · λ_max (geolora's damping)."""
    st = {"L": 0.0, "R": 0.0}

    def step(t, M, N, G):
        st["L"] = beta2 * st["L"] + G @ G.T
        st["R"] = beta2 * st["R"] + G.T @ G
        roots = []
        for S in (st["L"], st["R"]):
            damp = eps * np.linalg.eigvalsh(S)[-1]
            roots.append(fractional_power(S + damp * np.eye(len(S)), -0.25))
        Md, Nd = ref_lift(M, N, roots[0] @ G @ roots[1])
        return M - lr * Md, N - lr * Nd

    return step


def run_ours(cls, kw, B0, A0, C, Ts, steps: int) -> list[np.ndarray]:
    B, A = nn.Parameter(torch.tensor(B0)), nn.Parameter(torch.tensor(A0))
    opt = cls([pair(B, A, "l0")], robust_steps=0, **kw)
    traj = []
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        torch_loss(C, Ts, t, B, A).backward()
        opt.step()
        traj.append((B @ A).detach().numpy().copy())
    return traj


def start(m: int, n: int, r: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, r)), rng.standard_normal((r, n))


def assert_same_trajectory(ours, ref, tol: float) -> None:
    for t, (a, b) in enumerate(zip(ours, ref)):
        err = np.linalg.norm(a - b) / np.linalg.norm(b)
        assert err < tol, f"step {t + 1}: relative difference {err:.3e}"


@pytest.mark.parametrize("low_memory", [False, True], ids=["alg2", "alg4_low_memory"])
def test_adams_matches_algorithm_box(low_memory: bool) -> None:
    m, n, r = 9, 7, 3
    B0, A0 = start(m, n, r)
    C, Ts = weighted_problem(m, n, seed=1)
    kw = {"lr": 2e-2, "betas": (0.9, 0.99), "eps": 1e-8, "low_memory": low_memory}
    ours = run_ours(AdamS, kw, B0, A0, C, Ts, 20)
    ref = run_reference(ref_adams(2e-2, (0.9, 0.99), 1e-8, low_memory), B0, A0.T, C, Ts, 20)
    assert_same_trajectory(ours, ref, 1e-10)


@pytest.mark.parametrize("bias_correction", [False, True], ids=["verbatim", "bias_corrected"])
def test_lracs_matches_algorithm_box(bias_correction: bool) -> None:
    m, n, r = 9, 7, 3
    B0, A0 = start(m, n, r)
    C, Ts = weighted_problem(m, n, seed=2)
    kw = {"lr": 2e-2, "beta": 0.9, "gamma": 1.01, "eps": 1e-8, "bias_correction": bias_correction}
    etas: list[float] = []
    ours = run_ours(LRACS, kw, B0, A0, C, Ts, 20)
    ref_step = ref_lracs(2e-2, 0.9, 1.01, 1e-8, bias_correction, etas)
    ref = run_reference(ref_step, B0, A0.T, C, Ts, 20)
    assert_same_trajectory(ours, ref, 1e-10)
    # The limiter was both active and inactive along the way (both branches are checked).
    assert min(etas) < 0.999 and etas.count(1.0) >= 2


@pytest.mark.parametrize("beta2", [1.0, 0.9])
def test_shampoo_exact_statistics_match_dense_shampoo(beta2: float) -> None:
    m, n, r = 9, 7, 2
    B0, A0 = start(m, n, r, seed=4)
    C, Ts = weighted_problem(m, n, seed=3)
    kw = {"lr": 5e-2, "beta2": beta2, "eps": 1e-6}
    ours = run_ours(LiftedShampoo, kw, B0, A0, C, Ts, 10)
    ref = run_reference(ref_shampoo(5e-2, beta2, 1e-6), B0, A0.T, C, Ts, 10)
    assert_same_trajectory(ours, ref, 1e-10)


def test_lifted_adam_equals_adams() -> None:
    """Lifted(torch.optim.Adam) is AdamS (Alg. 2) by construction; with L2 decay it is AdamS
    with ``decay="l2"`` (both add λX to ξ before the moments)."""
    m, n, r = 9, 7, 3
    B0, A0 = start(m, n, r, seed=5)
    C, Ts = weighted_problem(m, n, seed=4)
    for wd, decay in ((0.0, "decoupled"), (0.2, "l2")):
        a = run_ours(Lifted(torch.optim.Adam), {"lr": 2e-2, "weight_decay": wd}, B0, A0, C, Ts, 20)
        kw = {"lr": 2e-2, "weight_decay": wd, "decay": decay}
        b = run_ours(AdamS, kw, B0, A0, C, Ts, 20)
        assert_same_trajectory(a, b, 1e-10)


# --- RACS scalings, metric norm, Frequent Directions ------------------------------------------------
@pytest.mark.parametrize("metric_name", ["balanced", "preconditioned"])
def test_metric_norm_at_balanced_representative(metric_name: str) -> None:
    """LRACS's gauge-free ‖lift(Ẋ)‖_g equals the metric evaluated at the current factors, and
    stays accurate at a badly conditioned gauge (M R, N R⁻ᵀ), cond(R) = 1e4 in float32 and
    1e6 in float64, where the Gram-matrix route loses digits (measured: 60 % in float32)."""
    g = torch.Generator().manual_seed(10)
    M = torch.randn(2, 12, 3, generator=g, dtype=F64)
    N = torch.randn(2, 10, 3, generator=g, dtype=F64)
    Z = torch.randn(2, 12, 10, generator=g, dtype=F64)
    q1 = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))[0]
    q2 = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=F64))[0]
    metric = get_metric(metric_name)

    def norm(scale: float, dtype: torch.dtype, direct: bool = False) -> torch.Tensor:
        R = q1 @ torch.diag(torch.tensor([scale, 1.0, 1 / scale], dtype=F64)) @ q2
        x = FactorPoint((M @ R).to(dtype), (N @ torch.linalg.inv(R).T).to(dtype))
        frame = make_frame(x.M, x.N)
        t = project_dense(frame, Z.to(dtype))
        if direct:
            u = assemble_lift(frame, t, metric.lift_coefficients(frame, t.M))
            return metric.inner(x, u, u).sqrt()
        return balanced_representative_norm(metric, frame, t).to(F64)

    ref = norm(1.0, F64)
    torch.testing.assert_close(ref, norm(1.0, F64, direct=True), rtol=1e-12, atol=0)
    torch.testing.assert_close(norm(1e3, F64), ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(norm(1e2, torch.float32), ref, rtol=2e-3, atol=0)


def test_racs_scalings_from_factors_match_dense() -> None:
    g = torch.Generator().manual_seed(6)
    A = torch.randn(2, 11, 6, generator=g, dtype=F64)
    B = torch.randn(2, 8, 6, generator=g, dtype=F64)
    s, q = racs_scalings(A, B, iters=5)
    for i in range(2):
        E = ((A[i] @ B[i].T) ** 2).numpy()
        q_ref = np.ones(11)
        for _ in range(5):
            s_ref = E.T @ q_ref / (q_ref @ q_ref)
            q_ref = E @ s_ref / (s_ref @ s_ref)
        np.testing.assert_allclose(s[i].numpy(), s_ref, rtol=1e-12)
        np.testing.assert_allclose(q[i].numpy(), q_ref, rtol=1e-12)
    # G ∘ G of rank one (G_ij = a_i b_j) is reproduced exactly by q sᵀ: eq. 14's fixed point.
    a, b = torch.randn(11, 1, generator=g, dtype=F64), torch.randn(8, 1, generator=g, dtype=F64)
    s, q = racs_scalings(a, b, iters=1)
    torch.testing.assert_close(torch.outer(q, s), (a @ b.T) ** 2, rtol=1e-12, atol=0)
    # A zero gradient gives zero scalings, not NaN.
    s, q = racs_scalings(torch.zeros(5, 2, dtype=F64), torch.zeros(4, 2, dtype=F64))
    assert not bool(s.any()) and not bool(q.any())


@pytest.mark.parametrize("beta", [1.0, 0.8])
def test_frequent_directions_bounds(beta: float) -> None:
    """FD: ``Z Zᵀ ⪯ L ⪯ Z Zᵀ + ρ I`` for ``L = Σ β^{t−τ} Y_τ Y_τᵀ``, and exact when k = d."""
    d, k, p = 10, 4, 3
    g = torch.Generator().manual_seed(7)
    Z, rho = torch.zeros(d, k, dtype=F64), torch.zeros((), dtype=F64)
    Zf, rhof = torch.zeros(d, d, dtype=F64), torch.zeros((), dtype=F64)
    L = torch.zeros(d, d, dtype=F64)
    for _ in range(6):
        Y = torch.randn(d, p, generator=g, dtype=F64) * torch.logspace(0, -2, d, dtype=F64)[:, None]
        L = beta * L + Y @ Y.T
        Z, rho = fd_update(Z, rho, Y, beta)
        Zf, rhof = fd_update(Zf, rhof, Y, beta)
    gap = torch.linalg.eigvalsh(L - Z @ Z.T)
    assert gap.min() > -1e-12 and gap.max() < rho + 1e-12 and rho > 0
    torch.testing.assert_close(Zf @ Zf.T, L, rtol=0, atol=1e-12)
    assert rhof < 1e-12


# --- batched == per pair ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_equals_per_pair(name: str) -> None:
    """foreach=True (three same-shape pairs stacked, plus another shape) == foreach=False."""
    shapes = [(12, 10, 4)] * 3 + [(8, 6, 2)]
    results = []
    for foreach in (True, False):
        g = torch.Generator().manual_seed(8)
        params = [
            (
                nn.Parameter(torch.randn(m, r, generator=g, dtype=F64)),
                nn.Parameter(torch.randn(r, n, generator=g, dtype=F64)),
            )
            for m, n, r in shapes
        ]
        targets = [torch.randn(m, n, generator=g, dtype=F64) for m, n, _ in shapes]
        opt = build(name, [pair(B, A, f"l{i}") for i, (B, A) in enumerate(params)], foreach=foreach)
        for t in range(8):
            opt.zero_grad(set_to_none=True)
            loss = sum(
                0.5 * ((B @ A - (1 + 0.1 * t) * X) ** 2).sum() for (B, A), X in zip(params, targets)
            )
            loss.backward()
            opt.step()
        results.append([p.detach().clone() for BA in params for p in BA])
    for a, b in zip(*results):
        assert (a - b).abs().max() < 1e-12 * max(1.0, b.abs().max().item())


# --- convergence ----------------------------------------------------------------------------------
def sensing_problem(dtype: torch.dtype, m: int = 10, n: int = 8, p: int = 120):
    """Planted rank-2 X* (singular values 2, 1), p Gaussian measurements ⟨S_i, X⟩/√p, random
    rank-2 start."""
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(m, 2, generator=g, dtype=F64))
    V, _ = torch.linalg.qr(torch.randn(n, 2, generator=g, dtype=F64))
    Xs = U @ torch.diag(torch.tensor([2.0, 1.0], dtype=F64)) @ V.T
    S = torch.randn(p, m * n, generator=g, dtype=F64) / math.sqrt(p)
    y = S @ Xs.reshape(-1)
    B = 0.5 * torch.randn(m, 2, generator=g, dtype=F64)
    A = 0.5 * torch.randn(2, n, generator=g, dtype=F64)
    cast = [t.to(dtype) for t in (Xs, S, y, B, A)]
    return cast[:3], nn.Parameter(cast[3]), nn.Parameter(cast[4])


# Schedules: LiftedSGD converges linearly at a constant lr. AdamS and LRACS take normalised
# steps whose error floor scales with lr, so lr decays geometrically; LRACS keeps lr constant
# first: its norm-growth limiter (γ = 1.01) lets the preconditioned step grow by only 1 % a
# step after the early collapse of ‖X̃‖_g, and an lr that decays meanwhile would stall it.
SENSING = {
    "lifted_sgd": (LiftedSGD, {"lr": 0.5}, 200, lambda t: 1.0),
    "adams": (AdamS, {"lr": 3e-2}, 400, lambda t: 0.995**t),
    "lracs": (LRACS, {"lr": 3e-2}, 500, lambda t: 1.0 if t < 150 else 0.96 ** (t - 150)),
}
# float32: unit roundoff u = 6e-8 and every step rebuilds X from the factors, so the iterates
# stall at a few 1e-7 (measured ≤ 4e-7); 5e-6 ≈ 80 u is well above that stall and 5 orders of
# magnitude below the start.
TOL = {F64: 1e-6, torch.float32: 5e-6}


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(SENSING))
def test_matrix_sensing_converges(name: str, dtype: torch.dtype) -> None:
    (Xs, S, y), B, A = sensing_problem(dtype)
    cls, kw, steps, schedule = SENSING[name]
    opt = cls([pair(B, A, "l0")], robust_steps=0, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    err0 = ((B @ A - Xs).norm() / Xs.norm()).item()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        (0.5 * ((S @ (B @ A).reshape(-1) - y) ** 2).sum()).backward()
        opt.step()
        sched.step()
    err = ((B @ A - Xs).norm() / Xs.norm()).item()
    assert err0 > 0.5 and err < TOL[dtype], f"relative error {err0:.2e} -> {err:.2e}"


def test_adams_stochastic_lora_least_squares() -> None:
    """LoRA (B = 0 init, robust start) on y = (W0 + ΔW*) x + noise with minibatches of 32: the
    full-data loss ends within 1 % of the reduced-rank regression optimum."""
    din, dout, r, N = 12, 10, 2, 512
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(dout, din, generator=g, dtype=F64) / math.sqrt(din)
    dW = torch.randn(dout, r, generator=g, dtype=F64) @ torch.randn(r, din, generator=g, dtype=F64)
    X = torch.randn(N, din, generator=g, dtype=F64)
    Y = X @ (W0 + dW / math.sqrt(din)).T + 0.1 * torch.randn(N, dout, generator=g, dtype=F64)
    # Reduced-rank regression: project the OLS fit onto its top-r output directions.
    R = Y - X @ W0.T
    D_ols = torch.linalg.lstsq(X, R).solution.T
    U = torch.linalg.svd((X @ D_ols.T).T, full_matrices=False)[0][:, :r]
    D_opt = U @ U.T @ D_ols

    def full_loss(D: torch.Tensor) -> float:
        return ((R - X @ D.T) ** 2).sum(1).mean().item()

    B = nn.Parameter(torch.zeros(dout, r, dtype=F64))
    A = nn.Parameter(torch.randn(r, din, generator=g, dtype=F64) / math.sqrt(din))
    opt = AdamS([pair(B, A, "l0")], lr=1e-2)  # paper default robust_steps=100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 if t < 200 else 0.99 ** (t - 200))
    batches = torch.Generator().manual_seed(7)
    for _ in range(400):
        idx = torch.randint(0, N, (32,), generator=batches)
        opt.zero_grad(set_to_none=True)
        ((Y[idx] - X[idx] @ (W0 + B @ A).T) ** 2).sum(1).mean().backward()
        opt.step()
        sched.step()
    assert full_loss((B @ A).detach()) < 1.01 * full_loss(D_opt)


# --- state round trip, names, validation -----------------------------------------------------------
@pytest.mark.parametrize(
    "cls",
    [Lifted(torch.optim.RMSprop, momentum=0.5, centered=True), Lifted(torch.optim.NAdam)],
    ids=["rmsprop_centered", "nadam"],
)
def test_wrapped_state_dict_round_trip(cls) -> None:
    """The wrapped optimizer's state lives in ours: save after 3 steps, load into a fresh
    optimizer, and both continue bit for bit."""
    g = torch.Generator().manual_seed(9)
    B = nn.Parameter(torch.randn(9, 3, generator=g, dtype=F64))
    A = nn.Parameter(torch.randn(3, 7, generator=g, dtype=F64))
    T = torch.randn(9, 7, generator=g, dtype=F64)
    opt = cls([pair(B, A, "l0")], lr=1e-2)

    def steps(o, Bp, Ap, k):
        for _ in range(k):
            o.zero_grad(set_to_none=True)
            (0.5 * ((Bp @ Ap - T) ** 2).sum()).backward()
            o.step()

    steps(opt, B, A, 3)
    saved = copy.deepcopy(opt.state_dict())
    assert any(k.startswith("shadow_") for k in saved["state"][0])
    B2, A2 = nn.Parameter(B.detach().clone()), nn.Parameter(A.detach().clone())
    opt2 = cls([pair(B2, A2, "l0")], lr=1e-2)
    opt2.load_state_dict(saved)
    steps(opt, B, A, 3)
    steps(opt2, B2, A2, 3)
    assert torch.equal(B, B2) and torch.equal(A, A2)


def test_lifted_class_names_and_defaults() -> None:
    cls = Lifted(torch.optim.Adam, betas=(0.8, 0.99))
    assert cls.__name__ == "LiftedAdam" and cls.__qualname__ == "LiftedAdam"
    B, A = nn.Parameter(torch.randn(6, 2)), nn.Parameter(torch.randn(2, 5))
    opt = cls([pair(B, A, "l0")])
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert Lifted(torch.optim.RMSprop).__name__ == "LiftedRMSprop"


def _groups():
    B, A = nn.Parameter(torch.randn(6, 2)), nn.Parameter(torch.randn(2, 5))
    return [pair(B, A, "l0")]


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: LRACS(_groups(), beta=1.0), ValueError, "beta"),
        (lambda: LRACS(_groups(), gamma=0.5), ValueError, "gamma"),
        (lambda: LRACS(_groups(), eps=-1.0), ValueError, "eps"),
        (lambda: LRACS(_groups(), power_iters=0), ValueError, "power_iters"),
        (lambda: LiftedSGD(_groups(), momentum=-0.1), ValueError, "momentum"),
        (lambda: LiftedSGD(_groups(), nesterov=True), ValueError, "nesterov"),
        (lambda: LiftedSGD([{**_groups()[0], "momentum": 0.9}]), ValueError, "momentum"),
        (lambda: LiftedShampoo(_groups(), sketch_rank=0), ValueError, "sketch_rank"),
        (lambda: LiftedShampoo(_groups(), beta2=0.0), ValueError, "beta2"),
        (lambda: LiftedShampoo(_groups(), max_dim=4), ValueError, "sketch_rank"),
        (lambda: Lifted(int), TypeError, "torch_optimizer_class"),
        (lambda: Lifted(torch.optim.LBFGS), TypeError, "LBFGS"),
        (lambda: Lifted(AdamS), TypeError, "torch_optimizer_class"),
        (lambda: Lifted(torch.optim.Adam, bogus=1), TypeError, "bogus"),
        (lambda: Lifted(torch.optim.Adam, metric="nope"), ValueError, "nope"),
        (lambda: Lifted(torch.optim.Adam)(_groups(), bogus=1), TypeError, "bogus"),
        (lambda: Lifted(torch.optim.Adam)(_groups(), betas=(1.5, 0.9)), ValueError, "beta"),
        (lambda: Lifted(torch.optim.Adam)(_groups(), lr=-1.0), ValueError, "lr"),
    ],
)
def test_bad_hyperparameters(make, exc, words: str) -> None:
    with pytest.raises(exc, match=words):
        make()
