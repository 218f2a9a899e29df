"""Retraction-based optimizers: LoRAM-FR / LoRAM-BR, Stiefel-LoRA, RiemannianAdam / SGD.

The LoRAM references below are written straight from the algorithm boxes of Jiang, Wang & Stich,
"LoRAM: Low-Rank Adaptation of Large Language Models on Manifold", ICLR 2025 Workshop on Sparsity in
LLMs, OpenReview 6cLPObfitT (Alg. 1–4 and 5–8) with dense matrices and explicit SVD / QR; with
``BOX`` (second moment left in place, no momentum bound) the optimizers must follow them step by
step. The defaults add the second-moment rules of :mod:`geolora.optim.loram` (masking, cluster
averaging, transport, Adam's bound), tested below against their own invariants and with negative
controls.
"""

import copy
import math
import pickle

import geoopt
import pytest
import torch

from geolora.manifolds.bounded_rank import BoundedRank
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.stiefel import Stiefel
from geolora.optim import manifold_pair
from geolora.optim.loram import (
    LoRAMBoundedRank,
    LoRAMFixedRank,
    adam_ratio_bound,
    bound_momentum,
    cluster_average,
    frame_alignment,
)
from geolora.optim.manifold_pair import BoundedRankGeometry, FixedRankGeometry
from geolora.optim.riemannian import ManifoldParameter, RiemannianAdam, RiemannianSGD
from geolora.optim.stiefel_lora import StiefelLoRA

f64 = torch.float64
M_, N_, R_ = 12, 10, 3
BOX = {"second_moment_transport": "none", "momentum_bound": False}  # LoRAM's boxes verbatim


def planted(m=M_, n=N_, r=R_, seed=0, sv=(2.0, 1.5, 1.0)):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, r, dtype=f64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(n, r, dtype=f64, generator=g))[0]
    return U @ torch.diag(torch.tensor(sv[:r], dtype=f64)) @ V.T


def factors(m=M_, n=N_, r=R_, seed=1, zero_B=False, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(m, r, dtype=f64, generator=g) * scale
    A = torch.randn(r, n, dtype=f64, generator=g) * scale
    return (torch.zeros_like(B) if zero_B else B), A


def pair_group(B, A, name="l0", **kw):
    return {"params": [B, A], "lora_pair": True, "name": name, **kw}


def run(cls, B0, A0, target, steps, lr_schedule=None, **kw):
    """Train ``0.5‖B A − target‖²``; return the list of ``B A`` after each step and the params."""
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    opt = cls([pair_group(B, A)], **kw)
    traj, losses = [], []
    for k in range(steps):
        if lr_schedule is not None:
            opt.param_groups[0]["lr"] = lr_schedule(k)
        opt.zero_grad()
        loss = 0.5 * ((B @ A - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        traj.append((B @ A).detach().clone())
    return traj, losses, (B, A, opt)


# --- references from the algorithm boxes (dense, one pair) -------------------------------------
def svd_r(X, r):
    U, S, Vh = torch.linalg.svd(X)
    return U[:, :r], S[:r], Vh[:r].T


def reference_loram_fr(X0, target, steps, lr, betas=(0.9, 0.999), eps=1e-8):
    """LoRAM Alg. 1 with Alg. 2 (gradient), 3 (retraction), 4 (transport), dense."""
    b1, b2 = betas
    m, n = X0.shape
    r = R_
    U, S, V = svd_r(X0, r)
    w = [torch.zeros(m, r, dtype=f64), torch.zeros(r, r, dtype=f64), torch.zeros(n, r, dtype=f64)]
    v = [torch.zeros_like(t) for t in w]
    out = []
    for _ in range(steps):
        G = U @ torch.diag(S) @ V.T - target  # ∇f for f = 0.5‖X − target‖²
        Mg = U.T @ G @ V
        g = [G @ V - U @ Mg, Mg, G.T @ U - V @ Mg.T]  # (Up, M, Vp), Alg. 2
        mom = [b1 * a + (1 - b1) * c for a, c in zip(w, g)]
        v = [b2 * a + (1 - b2) * c * c for a, c in zip(v, g)]
        dUp, dM, dVp = [-lr * a / (s.sqrt() + eps) for a, s in zip(mom, v)]
        # Alg. 3: rank-r truncated SVD of X + Ẋ (explicit, dense)
        Y = U @ (torch.diag(S) + dM) @ V.T + dUp @ V.T + U @ dVp.T
        U1, S1, V1 = svd_r(Y, r)
        Up, Mm, Vp = mom  # Alg. 4 verbatim
        T = (U @ Mm + Up) @ V.T @ V1 + U @ Vp.T @ V1
        Mp = U1.T @ T
        Vpt = U1.T @ (U @ Mm + Up) @ V.T + U1.T @ U @ Vp.T - Mp @ V1.T
        w = [T - U1 @ Mp, Mp, Vpt.T]
        U, S, V = U1, S1, V1
        out.append(U @ torch.diag(S) @ V.T)
    return out


def reference_loram_br(X0, target, steps, lr, lam, alpha=0.5, betas=(0.9, 0.999), eps=1e-8):
    """LoRAM Alg. 5 with Alg. 6 (gradient), 7 (Q-factor retraction, nuclear norm), 8."""
    b1, b2 = betas
    m, n = X0.shape
    r = R_
    I_n, I_r = torch.eye(n, dtype=f64), torch.eye(r, dtype=f64)
    U, S, V = svd_r(X0, r)
    wK, wV = torch.zeros(m, r, dtype=f64), torch.zeros(n, r, dtype=f64)
    vK, vV = torch.zeros_like(wK), torch.zeros_like(wV)
    out = []
    for _ in range(steps):
        Sd = torch.diag(S)
        G = U @ Sd @ V.T - target
        K = G @ V  # Alg. 6
        Vp = (I_n - V @ V.T) @ G.T @ U @ Sd @ torch.linalg.inv(2 * alpha * I_r + Sd @ Sd)
        mK, mV = b1 * wK + (1 - b1) * K, b1 * wV + (1 - b1) * Vp
        vK, vV = b2 * vK + (1 - b2) * K * K, b2 * vV + (1 - b2) * Vp * Vp
        dK, dV = lr * mK / (vK.sqrt() + eps), lr * mV / (vV.sqrt() + eps)  # vector (−dK, −dV)
        Q, _ = torch.linalg.qr(V - dV)  # Alg. 7
        W = (U @ Sd - dK - lam * U) @ V.T @ Q - (U @ Sd) @ dV.T @ Q
        Ub, Sb, Hh = torch.linalg.svd(W, full_matrices=False)
        U1, S1, V1 = Ub, Sb, Q @ Hh.T
        KK, VV = torch.cat([mK, U @ Sd], 1), torch.cat([V, mV], 1)  # Alg. 8
        S1d = torch.diag(S1)
        wK = KK @ VV.T @ V1
        inner = VV @ KK.T @ U1 @ S1d + 2 * alpha * (mV @ V.T + V @ mV.T) @ V1
        wV = (I_n - V1 @ V1.T) @ inner @ torch.linalg.inv(2 * alpha * I_r + S1d @ S1d)
        U, S, V = U1, S1, V1
        out.append(U @ torch.diag(S) @ V.T)
    return out


def max_rel_dev(traj1, traj2):
    return max(((a - b).norm() / a.norm()).item() for a, b in zip(traj1, traj2))


def test_loram_fr_follows_algorithm_box():
    B0, A0 = factors()
    target = planted()
    ref = reference_loram_fr(B0 @ A0, target, 20, lr=1e-2)
    traj, losses, _ = run(LoRAMFixedRank, B0, A0, target, 20, lr=1e-2, **BOX)
    assert max_rel_dev(ref, traj) < 1e-10
    assert losses[-1] < losses[0]


def test_loram_br_follows_algorithm_box():
    B0, A0 = factors()
    target = planted()
    ref = reference_loram_br(B0 @ A0, target, 20, lr=2e-3, lam=1e-3)
    traj, losses, _ = run(LoRAMBoundedRank, B0, A0, target, 20, lr=2e-3, nuclear_norm=1e-3, **BOX)
    assert max_rel_dev(ref, traj) < 1e-10
    assert losses[-1] < losses[0]


def test_loram_br_prox_soft_thresholds_the_retracted_point():
    B0, A0 = factors()
    target, lam = planted(), 0.05
    x0, _, _ = run(LoRAMBoundedRank, B0, A0, target, 1, lr=1e-2, nuclear_norm=0.0)
    x1, _, _ = run(
        LoRAMBoundedRank, B0, A0, target, 1, lr=1e-2, nuclear_norm=lam, nuclear_mode="prox"
    )
    s0, s1 = torch.linalg.svdvals(x0[0])[:R_], torch.linalg.svdvals(x1[0])[:R_]
    assert torch.allclose(s1, (s0 - lam).clamp_min(0), atol=1e-12)


@pytest.mark.parametrize("cls", [LoRAMFixedRank, LoRAMBoundedRank])
def test_loram_iterates_depend_on_X_only(cls):
    B0, A0 = factors()
    target = planted()
    R = torch.diag(10.0 ** torch.tensor([-3.0, 0.0, 3.0], dtype=f64))
    kw = {"lr": 2e-3} if cls is LoRAMBoundedRank else {"lr": 1e-2}
    t1, _, _ = run(cls, B0, A0, target, 25, **kw)
    t2, _, _ = run(cls, B0 @ R, torch.linalg.inv(R) @ A0, target, 25, **kw)
    assert max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(t1, t2)) < 1e-9


def sensing_problem(m=8, n=6, r=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = 4 * (m + n - r) * r
    ops = torch.randn(p, m * n, dtype=f64, generator=g)
    target = planted(m, n, r, seed=seed, sv=(2.0, 1.0))
    return ops, ops @ target.reshape(-1), target


@pytest.mark.parametrize("cls", [LoRAMFixedRank, LoRAMBoundedRank])
def test_loram_converges_on_planted_matrix_sensing(cls):
    # Constant lr 1e-2: the coordinate-wise second moment (β₂ = 0.999) remembers the larger
    # early gradients, so the steps shrink with the gradient and the iteration converges
    # linearly (measured rel. error ~1e-9 after 400 steps for both; exponential lr decay is
    # worse). LoRAM-BR without the nuclear-norm term (it biases the solution).
    ops, y, target = sensing_problem()
    B0, A0 = factors(8, 6, 2, seed=1, scale=0.3)
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    kw = {"nuclear_norm": 0.0} if cls is LoRAMBoundedRank else {}
    opt = cls([pair_group(B, A)], lr=1e-2, **kw)
    for _ in range(380):
        opt.zero_grad()
        (0.5 * ((ops @ (B @ A).reshape(-1) - y) ** 2).mean()).backward()
        opt.step()
    rel = ((B @ A - target).norm() / target.norm()).item()
    assert rel < 1e-6


@pytest.mark.parametrize("cls", [LoRAMFixedRank, LoRAMBoundedRank])
def test_loram_norm_based_second_moment_is_stable(cls):
    # From a random start larger than the target the coordinate-wise box diverges at lr 1e-2
    # (transported momentum meets coordinates of tiny second moment); the single step size of
    # Bécigneul & Ganea (coordinate_wise=False) converges even at lr 0.1.
    B0, A0 = factors(scale=0.5)
    kw = {"nuclear_norm": 0.0} if cls is LoRAMBoundedRank else {}
    _, losses, _ = run(cls, B0, A0, planted(), 120, lr=0.1, coordinate_wise=False, **kw)
    assert losses[-1] < 1e-4 * losses[0]


# --- second moments in a moving frame (geolora.optim.loram, rules 1–4) --------------------------
@pytest.mark.parametrize("cls,lr", [(LoRAMFixedRank, 1e-2), (LoRAMBoundedRank, 3e-3)])
def test_loram_defaults_are_stable_where_the_box_diverges(cls, lr):
    # Start larger than the target: the box's transported momentum meets coordinates of tiny
    # second moment (|m|/sqrt(v) ~ 1e3) and the loss grows (measured: FR 14.5 -> 394, BR -> 1e30
    # in 100 steps); Adam's bound keeps every step within c_t·lr per coordinate (measured:
    # FR -> 0.063, BR -> 4.1, never above the start).
    B0, A0 = factors(scale=0.5)
    kw = {"nuclear_norm": 0.0} if cls is LoRAMBoundedRank else {}
    _, box, _ = run(cls, B0, A0, planted(), 100, lr=lr, **BOX, **kw)
    _, dflt, _ = run(cls, B0, A0, planted(), 100, lr=lr, **kw)
    assert box[-1] > box[0]
    assert max(dflt) <= dflt[0] and dflt[-1] < 0.5 * dflt[0]


def orthonormal(rows, r, g):
    return torch.linalg.qr(torch.randn(rows, r, dtype=f64, generator=g))[0]


def gauge_pair(B0, A0, g, log_cond=3.0):
    """``(B0 R, R⁻¹ A0)`` for a random ``R`` with ``cond(R) = 10^log_cond``."""
    r = B0.shape[1]
    R = (orthonormal(r, r, g) * torch.logspace(0, log_cond, r, dtype=f64)) @ orthonormal(r, r, g)
    return B0 @ R, torch.linalg.solve(R, A0)


def gauge_deviation(cls, B0, A0, target, g, steps=6, lr=1e-2):
    """Largest relative difference of the ``B A`` trajectories from ``(B0, A0)`` and a gauge."""
    t1, _, _ = run(cls, B0, A0, target, steps, lr=lr)
    t2, _, _ = run(cls, *gauge_pair(B0, A0, g), target, steps, lr=lr)
    return max_rel_dev(t1, t2)


def identity_clusters(s, rtol):
    r = s.shape[-1]
    return torch.eye(r, dtype=s.dtype).expand(*s.shape, r)


@pytest.mark.parametrize("shape", [(7, 5, 3), (3, 6, 3), (6, 3, 3), (4, 4, 4)])
@pytest.mark.parametrize("cls", [LoRAMFixedRank, LoRAMBoundedRank])
def test_loram_gauge_invariant_at_repeated_singular_values(cls, shape, monkeypatch):
    # X = 2 Q_B Q_Aᵀ: all singular values equal, so the SVD frame is any rotation of itself.
    # Averaging v over the cluster makes the step depend on X only (measured 2e-12); without
    # it the trajectories differ by 5e-2 .. 0.15.
    m, n, r = shape
    g = torch.Generator().manual_seed(0)
    B0, A0 = 2.0 * orthonormal(m, r, g), orthonormal(n, r, g).T
    target = torch.randn(m, n, dtype=f64, generator=g)
    assert gauge_deviation(cls, B0, A0, target, torch.Generator().manual_seed(1)) < 1e-9
    monkeypatch.setattr(manifold_pair, "cluster_average", identity_clusters)
    assert gauge_deviation(cls, B0, A0, target, torch.Generator().manual_seed(1)) > 1e-3


def test_loram_br_zero_init_is_gauge_invariant(monkeypatch):
    # K = 0: all singular values are 0, one cluster; V is any orthonormal basis of A's row
    # space. Measured 1e-14 (0.66 without the cluster average).
    B0, A0 = factors(zero_B=True)
    dev = gauge_deviation(LoRAMBoundedRank, B0, A0, planted(), torch.Generator().manual_seed(3))
    assert dev < 1e-9
    monkeypatch.setattr(manifold_pair, "cluster_average", identity_clusters)
    dev = gauge_deviation(LoRAMBoundedRank, B0, A0, planted(), torch.Generator().manual_seed(3))
    assert dev > 1e-3


@pytest.mark.parametrize(
    "cls,shape",
    [
        (LoRAMFixedRank, (3, 6, 3)),
        (LoRAMFixedRank, (6, 3, 3)),
        (LoRAMFixedRank, (4, 4, 4)),
        (LoRAMBoundedRank, (6, 3, 3)),
        (LoRAMBoundedRank, (4, 4, 4)),
    ],
)
def test_loram_identically_zero_blocks_are_masked(cls, shape, monkeypatch):
    # r = m: Up ∈ range(I − UUᵀ) = {0}; r = n: Vp = 0 (FR and BR). Their rounding noise must
    # not be normalised into lr-sized steps: float32 follows float64 to 5.5e-7 (measured), and
    # to 1e-2 .. 4e-2 without the mask.
    m, n, r = shape
    g = torch.Generator().manual_seed(0)
    B0 = torch.randn(m, r, dtype=f64, generator=g)
    A0 = torch.randn(r, n, dtype=f64, generator=g) / 3
    target = torch.randn(m, n, dtype=f64, generator=g)

    def fp32_deviation():
        t64, _, (B, _, opt) = run(cls, B0, A0, target, 3, lr=1e-2)
        t32, _, _ = run(cls, B0.float(), A0.float(), target.float(), 3, lr=1e-2)
        return max_rel_dev(t64, [t.double() for t in t32]), opt.state[B]

    dev, st = fp32_deviation()
    assert dev < 1e-5
    blocks = (["Up"] if cls is LoRAMFixedRank and r == m else []) + (["Vp"] if r == n else [])
    assert blocks  # the moments of a masked block stay exactly 0
    assert all(not st[f"{p}_{f}"].any() for p in ("exp_avg", "exp_avg_sq") for f in blocks)
    geometry = FixedRankGeometry if cls is LoRAMFixedRank else BoundedRankGeometry
    monkeypatch.setattr(geometry, "mask", staticmethod(lambda t, p: t))
    assert fp32_deviation()[0] > 1e-3


def test_cluster_average():
    s = torch.tensor(
        [[3.0, 2.0, 1.0], [2.0, 2.0, 1.0], [2.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=f64
    )
    W = cluster_average(s, 1e-8)
    assert torch.equal(W[0], torch.eye(3, dtype=f64))  # distinct: exactly the identity
    assert torch.allclose(
        W[1], torch.tensor([[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1.0]], dtype=f64)
    )
    assert torch.allclose(
        W[2], torch.tensor([[1.0, 0, 0], [0, 0.5, 0.5], [0, 0.5, 0.5]], dtype=f64)
    )
    assert torch.allclose(W[3], torch.full((3, 3), 1 / 3, dtype=f64))
    assert torch.allclose(W @ W, W) and torch.allclose(W.sum(-1), torch.ones(4, 3, dtype=f64))
    chain = cluster_average(torch.tensor([1.0, 1.0 - 0.6e-8, 1.0 - 1.2e-8], dtype=f64), 1e-8)
    assert torch.allclose(chain, torch.full((3, 3), 1 / 3, dtype=f64))  # gaps chain


def test_frame_alignment_is_exact_for_signed_permutations():
    g = torch.Generator().manual_seed(0)
    F = orthonormal(9, 4, g)
    P = torch.eye(4, dtype=f64)[[2, 0, 3, 1]]
    D = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=f64))
    assert (frame_alignment(F, F @ P @ D) - P).abs().max() < 1e-15
    # A small rotation: Q ∘ Q is doubly stochastic and I + O(θ²).
    Om = 1e-2 * torch.randn(4, 4, dtype=f64, generator=g)
    S = Om - Om.T
    Q2 = frame_alignment(F, F @ torch.linalg.matrix_exp(S))
    ones = torch.ones(4, dtype=f64)
    assert torch.allclose(Q2.sum(0), ones) and torch.allclose(Q2.sum(1), ones)
    dev = (Q2 - torch.eye(4, dtype=f64)).abs().max()
    assert 0 < dev <= 4 * S.abs().max() ** 2  # second order in the angle


def adam_moments(grads, betas):
    b1, b2 = betas
    m = v = torch.zeros_like(grads[0])
    for gk in grads:
        m, v = b1 * m + (1 - b1) * gk, b2 * v + (1 - b2) * gk * gk
    return m, v


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.5, 0.6), (0.0, 0.99)])
def test_adam_ratio_bound_is_tight_and_never_binds_plain_adam(betas):
    b1, b2 = betas
    t = 30
    g = torch.Generator().manual_seed(0)
    grads = (
        torch.randn(t, 1000, dtype=f64, generator=g) * torch.logspace(-3, 3, t, dtype=f64)[:, None]
    )
    m, v = adam_moments(grads, betas)
    c2 = adam_ratio_bound(t, betas)
    assert (m * m <= c2 * v * (1 + 1e-12)).all()
    worst = torch.tensor([(b1 / b2) ** (t - k) for k in range(1, t + 1)], dtype=f64)[:, None]
    m, v = adam_moments(worst, betas)  # the Cauchy–Schwarz equality case
    assert abs(float(m * m / v) / c2 - 1) < 1e-12
    # Plain Adam's moments go through bound_momentum unchanged (up to rounding at equality).
    m, v = adam_moments(grads, betas)
    assert torch.allclose(bound_momentum(m, v, t, betas), m, rtol=1e-14, atol=0)


def test_bound_momentum_scales_violations_to_the_bound_and_respects_clusters():
    betas, t = (0.9, 0.999), 5
    c2 = adam_ratio_bound(t, betas)
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 3, dtype=f64, generator=g)
    v = torch.rand(6, 3, dtype=f64, generator=g) * m * m / c2 * 4  # some entries violate
    out = bound_momentum(m, v, t, betas)
    over = m * m > c2 * v
    assert over.any() and (~over).any()
    assert torch.equal(out[~over], m[~over])
    assert torch.allclose(out[over].abs(), (c2 * v[over]).sqrt(), rtol=1e-14)
    # Cluster {0, 1}: v averaged (invariant), the scale is one number per row of the cluster,
    # so bound(m Q) = bound(m) Q for a rotation Q of the cluster's columns.
    W = cluster_average(torch.tensor([1.0, 1.0, 0.5], dtype=f64), 1e-8)
    v = v @ W
    th = 0.7
    Q = torch.eye(3, dtype=f64)
    Q[:2, :2] = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    avg = lambda t_: t_ @ W  # noqa: E731
    lhs = bound_momentum(m @ Q, v, t, betas, avg)
    rhs = bound_momentum(m, v, t, betas, avg) @ Q
    assert torch.allclose(lhs, rhs, atol=1e-14)


@pytest.mark.parametrize("retraction", ["qr", "polar"])
@pytest.mark.parametrize("coordinate_wise", [False, True])
def test_stiefel_lora_keeps_B_orthonormal_and_descends(retraction, coordinate_wise):
    B0, A0 = factors()
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    target = planted()
    opt = StiefelLoRA(
        [pair_group(B, A)], lr=1e-2, retraction=retraction, coordinate_wise=coordinate_wise
    )
    eye = torch.eye(R_, dtype=f64)
    losses = []
    for _ in range(60):
        opt.zero_grad()
        loss = 0.5 * ((B @ A - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert (B.T @ B - eye).abs().max().item() < 1e-10
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("cls", [LoRAMFixedRank, LoRAMBoundedRank, StiefelLoRA])
def test_entering_the_manifold_keeps_the_model_function(cls):
    B0, A0 = factors()
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    kw = {"nuclear_norm": 0.0} if cls is LoRAMBoundedRank else {}
    opt = cls([pair_group(B, A)], lr=0.0, **kw)
    (0.5 * ((B @ A - planted()) ** 2).sum()).backward()
    opt.step()  # lr = 0: the step only re-factors
    assert (B @ A - B0 @ A0).abs().max().item() < 1e-12
    G = B.T @ B
    if cls is StiefelLoRA:
        assert (G - torch.eye(R_, dtype=f64)).abs().max().item() < 1e-12
    else:  # B = U diag(S): orthogonal columns; A = Vᵀ orthonormal rows
        assert (G - torch.diag(torch.diagonal(G))).abs().max().item() < 1e-12
        assert (A @ A.T - torch.eye(R_, dtype=f64)).abs().max().item() < 1e-12


@pytest.mark.parametrize("cls", [LoRAMFixedRank, LoRAMBoundedRank, StiefelLoRA])
def test_zero_init(cls):
    B0, A0 = factors(zero_B=True)
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    target = planted()
    kw = {"lr": 1e-2}
    if cls is StiefelLoRA:
        kw["coordinate_wise"] = True
    opt = cls([pair_group(B, A)], **kw)
    losses, entered = [], None
    for k in range(150):
        opt.zero_grad()
        loss = 0.5 * ((B @ A - target) ** 2).sum()
        loss.backward()
        before = (B @ A).detach().clone()
        # LoRAM-FR takes robust AdamW steps while B = 0; the others enter at once. Make the
        # entering step lr = 0 to see that re-factoring alone keeps B A.
        enters = entered is None and (cls is not LoRAMFixedRank or bool(B.detach().any()))
        opt.param_groups[0]["lr"] = 0.0 if enters else kw["lr"]
        opt.step()
        if enters:
            entered = k
            assert "pair" in opt.state[B]
            assert (B @ A - before).abs().max().item() < 1e-12
        losses.append(loss.item())
    assert entered == (1 if cls is LoRAMFixedRank else 0)
    if cls is StiefelLoRA:
        assert (B.T @ B - torch.eye(R_, dtype=f64)).abs().max().item() < 1e-10
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.1 * losses[0]


def make_model(dtype=f64, seed=0, shapes=((9, 3, 7), (9, 3, 7), (5, 2, 6))):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for mm, rr, nn_ in shapes:
        B = torch.nn.Parameter(0.5 * torch.randn(mm, rr, dtype=dtype, generator=g))
        A = torch.nn.Parameter(0.5 * torch.randn(rr, nn_, dtype=dtype, generator=g))
        pairs.append((B, A))
    targets = [torch.randn(B.shape[0], A.shape[1], dtype=dtype, generator=g) for B, A in pairs]
    other = torch.nn.Parameter(torch.randn(4, dtype=dtype, generator=g))
    return pairs, other, targets


def train(opt, pairs, other, targets, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = sum(0.5 * ((B @ A - T) ** 2).sum() for (B, A), T in zip(pairs, targets))
        (loss + (other**2).sum()).backward()
        opt.step()


def model_groups(pairs, other):
    gs = [pair_group(B, A, f"layer{i}") for i, (B, A) in enumerate(pairs)]
    return gs + [{"params": [other]}]


OPTIMIZERS = [
    (LoRAMFixedRank, {"lr": 1e-2}),
    (LoRAMBoundedRank, {"lr": 2e-3}),
    (StiefelLoRA, {"lr": 1e-2, "coordinate_wise": True}),
]


@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_batched_equals_per_pair(cls, kw):
    pairs1, other1, targets = make_model()
    pairs2, other2, _ = make_model()
    o1 = cls(model_groups(pairs1, other1), foreach=True, **kw)
    o2 = cls(model_groups(pairs2, other2), foreach=False, **kw)
    train(o1, pairs1, other1, targets, 8)
    train(o2, pairs2, other2, targets, 8)
    for (B1, A1), (B2, A2) in zip(pairs1, pairs2):
        assert (B1 - B2).abs().max() < 1e-12 and (A1 - A2).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_state_dict_resume_is_bitwise(cls, kw, dtype):
    pairs, other, targets = make_model(dtype)
    opt = cls(model_groups(pairs, other), **kw)
    train(opt, pairs, other, targets, 3)
    params = [p for pair in pairs for p in pair] + [other]
    snap = [p.detach().clone() for p in params]
    sd = copy.deepcopy(opt.state_dict())
    train(opt, pairs, other, targets, 3)
    final = [p.detach().clone() for p in params]

    pairs2, other2, _ = make_model(dtype, seed=5)
    params2 = [p for pair in pairs2 for p in pair] + [other2]
    with torch.no_grad():
        for p, v in zip(params2, snap):
            p.copy_(v)
    opt2 = cls(model_groups(pairs2, other2), **kw)
    opt2.load_state_dict(sd)
    train(opt2, pairs2, other2, targets, 3)
    for p, q in zip(params2, final):
        assert torch.equal(p.detach(), q)


@pytest.mark.parametrize("cls,kw", OPTIMIZERS)
def test_low_precision_parameters_keep_an_fp32_point(cls, kw):
    pairs, other, targets = make_model(torch.bfloat16)
    opt = cls(model_groups(pairs, other), **kw)
    train(opt, pairs, other, targets, 4)
    B, A = pairs[0]
    st = opt.state[B]
    point = [v for k, v in st.items() if k in ("U", "S", "V", "K", "B", "N")]
    assert point and all(t.dtype == torch.float32 for t in point)
    f = opt.geometry.point_factors(st)
    assert torch.equal(B.detach(), f.M.to(torch.bfloat16))
    assert torch.equal(A.detach(), f.N.T.to(torch.bfloat16))
    if cls is StiefelLoRA:
        assert (st["B"].T @ st["B"] - torch.eye(3)).abs().max().item() < 1e-6


def test_pair_optimizers_validate_hyperparameters():
    B, A = (torch.nn.Parameter(t) for t in factors())
    with pytest.raises(ValueError, match="nuclear_mode"):
        LoRAMBoundedRank([pair_group(B, A)], nuclear_mode="svt")
    with pytest.raises(ValueError, match="alpha"):
        LoRAMBoundedRank([pair_group(B, A)], alpha=0.0)
    with pytest.raises(ValueError, match="nuclear_norm"):
        LoRAMBoundedRank([pair_group(B, A)], nuclear_norm=-1.0)
    with pytest.raises(ValueError, match="betas"):
        LoRAMFixedRank([pair_group(B, A)], betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="bias_correction"):
        LoRAMFixedRank([pair_group(B, A)], bias_correction="yes")
    with pytest.raises(ValueError, match="second_moment_transport"):
        LoRAMFixedRank([pair_group(B, A)], second_moment_transport="parallel")
    with pytest.raises(ValueError, match="momentum_bound"):
        LoRAMBoundedRank([pair_group(B, A)], momentum_bound=1)
    with pytest.raises(ValueError, match="retraction"):
        StiefelLoRA([pair_group(B, A)], retraction="exp")
    with pytest.raises(ValueError, match="weight_decay"):
        StiefelLoRA([pair_group(B, A)], weight_decay=-0.1)


# --- generic Riemannian optimizers -------------------------------------------------------------
def rayleigh_setup(n=10, p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, dtype=f64, generator=g))[0]
    evals = torch.arange(1, n + 1, dtype=f64)
    C = Q @ torch.diag(evals) @ Q.T
    X0 = torch.linalg.qr(torch.randn(n, p, dtype=f64, generator=g))[0]
    return C, X0, evals[:p].sum().item()


def minimize(opt, X, C, steps):
    for _ in range(steps):
        opt.zero_grad()
        torch.trace(X.T @ C @ X).backward()
        opt.step()
    return torch.trace(X.T @ C @ X).item()


@pytest.mark.parametrize("coordinate_wise", [False, True])
def test_riemannian_adam_finds_smallest_eigenvalues_on_stiefel(coordinate_wise):
    C, X0, best = rayleigh_setup()
    X = ManifoldParameter(X0.clone(), Stiefel(10, 3))
    opt = RiemannianAdam([X], lr=5e-2, coordinate_wise=coordinate_wise)
    val = minimize(opt, X, C, 300)
    assert abs(val - best) < 1e-8
    assert (X.T @ X - torch.eye(3, dtype=f64)).abs().max().item() < 1e-12


def test_riemannian_adam_accepts_geoopt_parameters_and_matches_geoopt():
    C, X0, _ = rayleigh_setup()
    X = geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.EuclideanStiefel())
    Y = geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.EuclideanStiefel())
    ours = RiemannianAdam([X], lr=2e-2)
    theirs = geoopt.optim.RiemannianAdam([Y], lr=2e-2)
    for _ in range(30):
        minimize(ours, X, C, 1)
        minimize(theirs, Y, C, 1)
    assert (X - Y).abs().max().item() < 1e-12
    Z = geoopt.ManifoldParameter(X0.clone(), manifold=geoopt.Stiefel())  # canonical Stiefel
    RiemannianAdam([Z], lr=2e-2).step()  # no grad yet: nothing happens
    assert torch.equal(Z.detach(), X0)
    _, _, best = rayleigh_setup()
    assert abs(minimize(RiemannianAdam([Z], lr=5e-2), Z, C, 300) - best) < 1e-8


def test_riemannian_sgd_with_momentum_on_stiefel_and_plain_tensors():
    C, X0, best = rayleigh_setup()
    X = ManifoldParameter(X0.clone(), Stiefel(10, 3, retraction="polar"))
    w = torch.nn.Parameter(torch.ones(3, dtype=f64))
    opt = RiemannianSGD([X, w], lr=2e-2, momentum=0.9, nesterov=True)
    for _ in range(300):
        opt.zero_grad()
        (torch.trace(X.T @ C @ X) + (w**2).sum()).backward()
        opt.step()
    assert abs(torch.trace(X.T @ C @ X).item() - best) < 1e-8
    assert w.abs().max().item() < 1e-6


def test_riemannian_adam_on_tuple_manifolds():
    target = planted()
    g = torch.Generator().manual_seed(3)
    fr = FixedRank(M_, N_, R_)
    x = fr.random_point(generator=g)
    U, S, V = (torch.nn.Parameter(t.clone()) for t in x)
    br = BoundedRank(M_, N_, R_)
    y = br.random_point(generator=g)
    K, W = (torch.nn.Parameter(t.clone()) for t in y)
    opt = RiemannianAdam(
        [{"params": [U, S, V], "manifold": fr}, {"params": [K, W], "manifold": br}], lr=0.2
    )
    first = None
    for _ in range(200):
        opt.zero_grad()
        l1 = 0.5 * ((U @ torch.diag(S) @ V.T - target) ** 2).sum()
        l2 = 0.5 * ((K @ W.T - target) ** 2).sum()
        (l1 + l2).backward()
        opt.step()
        first = first or (l1.item(), l2.item())
    assert l1.item() < 1e-3 * first[0] and l2.item() < 1e-3 * first[1]
    fr.check_point(tuple(t.detach() for t in (U, S, V)))
    br.check_point(tuple(t.detach() for t in (K, W)))


def test_manifold_parameter_copy_pickle_and_validation():
    st = Stiefel(6, 2)
    p = ManifoldParameter(st.random_point(), st)
    for q in (copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert isinstance(q, ManifoldParameter) and isinstance(q.manifold, Stiefel)
        assert torch.equal(q.detach(), p.detach()) and q.requires_grad
    with pytest.raises(TypeError, match="manifold"):
        ManifoldParameter(torch.zeros(3))
    with pytest.raises(TypeError, match="manifold"):
        RiemannianAdam([{"params": [torch.zeros(2, 2)], "manifold": "stiefel"}])
    with pytest.raises(ValueError, match="params"):
        RiemannianAdam([{"params": [torch.zeros(2, 2)], "manifold": FixedRank(4, 3, 2)}])
    with pytest.raises(ValueError, match="params"):
        RiemannianAdam([ManifoldParameter(torch.zeros(4, 2), FixedRank(4, 3, 2))])
    with pytest.raises(ValueError, match="lr"):
        RiemannianSGD([p], lr=-1.0)
    with pytest.raises(ValueError, match="nesterov"):
        RiemannianSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        RiemannianAdam([p], betas=(1.0, 0.9))
    p.grad = torch.full_like(p, float("nan"))
    before = p.detach().clone()
    with pytest.raises(FloatingPointError, match="non-finite"):
        RiemannianAdam([p]).step()
    assert torch.equal(p.detach(), before)


def test_riemannian_rejected_group_leaves_optimizer_and_dict_unchanged():
    st = Stiefel(6, 2)
    opt = RiemannianSGD([ManifoldParameter(st.random_point(), st)], lr=0.1)
    q = torch.zeros(3, requires_grad=True)
    bad = {"params": q, "momentum": 1.5}
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group(bad)
    assert len(opt.param_groups) == 1 and bad == {"params": q, "momentum": 1.5}
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['betaz'\] in 'extra'"):
        opt.add_param_group({"params": [q], "betaz": 0.9, "name": "extra"})
    q.grad = torch.ones(3).to_sparse()
    opt.add_param_group({"params": [q], "name": "extra"})
    with pytest.raises(RuntimeError, match=r"param_groups\[1\]\['params'\]\[0\] \(extra\): sparse"):
        opt.step()


def test_loram_groups_saved_without_the_second_moment_options_resume_the_box():
    # A checkpoint from before the options existed: its groups lack the keys; it resumes the
    # algorithm it was saved with (the box), here step for step against the box reference.
    B0, A0 = factors()
    target = planted()
    ref = reference_loram_fr(B0 @ A0, target, 6, lr=1e-2)
    traj, _, (B, A, opt) = run(LoRAMFixedRank, B0, A0, target, 3, lr=1e-2, **BOX)
    sd = copy.deepcopy(opt.state_dict())
    for grp in sd["param_groups"]:
        del grp["second_moment_transport"], grp["momentum_bound"]
    opt2 = LoRAMFixedRank([pair_group(B, A)], lr=1e-2)
    opt2.load_state_dict(sd)
    for _ in range(3):
        opt2.zero_grad()
        (0.5 * ((B @ A - target) ** 2).sum()).backward()
        opt2.step()
        traj.append((B @ A).detach().clone())
    assert max_rel_dev(ref, traj) < 1e-10


def test_bounded_rank_gram_failure_names_the_divergence():
    # KᵀK + 2αI is positive definite for every finite K; the Cholesky factorization fails only
    # for a diverged K (non-finite, or so large that 2αI is lost in rounding).
    man = BoundedRank(6, 5, 3)
    x = man.random_point(generator=torch.Generator().manual_seed(0))
    grads = (torch.ones(6, 3, dtype=f64), torch.ones(5, 3, dtype=f64))
    assert torch.isfinite(man.egrad2rgrad(x, grads).Vp).all()
    for bad in (float("inf"), 1e160):
        with pytest.raises(FloatingPointError, match="K has diverged"):
            man.egrad2rgrad(type(x)(x.K * bad, x.V), grads)
