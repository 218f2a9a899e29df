"""LoRA-Pro (geolora.optim.lora_pro): the paper's closed forms, the authors' zero-init branch,
convergence, resume, degenerate starts and bf16.

The reference below is written from the paper's Theorem 2.1 / 2.3 and Algorithm 1 as the
authors' code evaluates them (peft layout ``B: (m, r)``, ``A: (r, n)``, ``ΔW = s B A``; dense
``m x n`` Adam moments; explicit inverses; the Sylvester equation by SciPy's Bartels–Stewart
solver), independently of the optimizer's frame-based flat-metric lift.
"""

from __future__ import annotations

import math

import pytest
import scipy.linalg
import torch
from pair_problems import assert_resume_exact, planted

from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim import LoRAPro
from geolora.optim.lora_pro import lora_pro_step

f64 = torch.float64
M_, N_, R_ = 12, 10, 3



def factors(seed: int = 1, zero_B: bool = False, dtype=f64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = 0.5 * torch.randn(M_, R_, dtype=f64, generator=g)
    A = torch.randn(R_, N_, dtype=f64, generator=g) / math.sqrt(N_)
    return (torch.zeros_like(B) if zero_B else B).to(dtype), A.to(dtype)


def loss_fn(B, A, target, s):
    return 0.5 * ((s * B @ A - target) ** 2).sum()


def factor_grads(B, A, target, s):
    Bq, Aq = B.clone().requires_grad_(), A.clone().requires_grad_()
    loss_fn(Bq, Aq, target, s).backward()
    return Bq.grad, Aq.grad


def reference_trajectory(
    B, A, target, s, lr, steps, delta, zero_branch, betas=(0.9, 0.999), delta_after=None
):
    """The authors' update, dense: equivalent gradient, Adam, adjusted gradients, SGD; their
    ``(G + δI)⁻¹`` with ``δ = delta`` (``delta_after`` from the second step on, if given)."""
    b1, b2 = betas
    eye_r = torch.eye(R_, dtype=f64)
    m = v = None
    out = []
    for t in range(steps):
        if t == 1 and delta_after is not None:
            delta = delta_after
        gB, gA = factor_grads(B, A, target, s)
        iA = torch.linalg.inv(A @ A.T + delta * eye_r)
        first = zero_branch and t == 0
        if first:
            adjA, adjB = gA, gB @ iA / s**2
        else:
            iB = torch.linalg.inv(B.T @ B + delta * eye_r)
            PB = B @ iB @ B.T
            adjA = iB @ gA / s**2
            adjB = (torch.eye(M_, dtype=f64) - PB) @ gB @ iA / s**2
        equiv = s * B @ adjA + s * adjB @ A
        m = (1 - b1) * equiv if m is None else b1 * m + (1 - b1) * equiv
        v = (1 - b2) * equiv**2 if v is None else b2 * v + (1 - b2) * equiv**2
        D = (m / (1 - b1 ** (t + 1))) / ((v / (1 - b2 ** (t + 1))).sqrt() + 1e-8)
        hA, hB = s * B.T @ D, s * D @ A.T
        if first:
            dA, dB = hA, hB @ iA / s**2
        else:
            C = -(iB @ hA @ A.T) / s**2
            X = torch.from_numpy(
                scipy.linalg.solve_sylvester((B.T @ B).numpy(), (A @ A.T).numpy(), C.numpy())
            )
            dA = iB @ hA / s**2 + X @ A
            dB = (torch.eye(M_, dtype=f64) - PB) @ hB @ iA / s**2 - B @ X
        B, A = B - lr * dB, A - lr * dA
        out.append((B.clone(), A.clone()))
    return out


def pair(B, A, s=1.0, name="p"):
    return {"params": [B, A], "lora_pair": True, "scaling": s, "name": name}


def optimizer_trajectory(B0, A0, target, s, steps, **kw):
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    opt = LoRAPro([pair(B, A, s)], **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(B, A, target, s).backward()
        opt.step()
        out.append((B.detach().clone(), A.detach().clone()))
    return out, opt, (B, A)


def max_rel(traj, ref):
    return max(
        max(((b - rb).abs().max() / rb.abs().max()).item(), ((a - ra).abs().max() / ra.abs().max()).item())
        for (b, a), (rb, ra) in zip(traj, ref)
    )


@pytest.mark.parametrize("s", [1.0, 2.0])
def test_full_rank_steps_equal_the_papers_closed_form(s: float) -> None:
    """From a full-rank start the factors follow Thm. 2.1 / 2.3 with Adam (Alg. 1), δ = 0, to
    1e-10 (fp64) — the frame-based flat-metric lift is the same update (measured ~1e-15)."""
    target = planted()
    B0, A0 = factors()
    ref = reference_trajectory(B0, A0, target, s, 1e-2, 8, delta=0.0, zero_branch=False)
    got, _, _ = optimizer_trajectory(B0, A0, target, s, 8, lr=1e-2)
    assert max_rel(got, ref) < 1e-10


def test_zero_init_follows_the_authors_code() -> None:
    """From ``B = 0`` the first step is the authors' zero-init branch (only ``B`` moves,
    ``g̃ = G P_A``, their ``(A Aᵀ + 1e-8 I)⁻¹``) to 1e-12; from the second step (``B A`` of full
    rank) the optimizer uses exact inverses: it equals the authors' formulas with ``δ = 0`` to
    1e-10, and differs from their ``δ = 1e-8`` by O(δ / σ_min(B)²) (measured 2.2e-4 relative:
    ``σ_min(B) = 6e-3`` after one step)."""
    target, s = planted(), 2.0
    B0, A0 = factors(zero_B=True)
    exact = reference_trajectory(
        B0, A0, target, s, 1e-2, 10, delta=1e-8, zero_branch=True, delta_after=0.0
    )
    authors = reference_trajectory(B0, A0, target, s, 1e-2, 10, delta=1e-8, zero_branch=True)
    got, opt, (B, _) = optimizer_trajectory(B0, A0, target, s, 10, lr=1e-2)
    assert torch.equal(got[0][1], A0)  # the zero-init branch does not move A
    assert max_rel(got[:1], authors[:1]) < 1e-12
    assert max_rel(got, exact) < 1e-10
    assert max_rel(got, authors) < 5e-4
    assert int(opt.state[B]["step"]) == 10 and "robust_exp_avg_B" not in opt.state[B]


def test_lora_pro_step_solves_theorems_2_1_and_2_3() -> None:
    """``lora_pro_step`` (δ = 0) returns the minimal-norm factor velocities whose equivalent
    gradient is ``P_T(D)``: ``s (B g^A + g^B A) = P_T(D)`` and ``g^A Aᵀ = Bᵀ g^B`` (the
    stationarity condition of Thm. 2.3's problem), to 1e-12 (fp64)."""
    target, s = planted(), 2.0
    B, A = factors()
    gB, gA = factor_grads(B, A, target, s)
    zeros = torch.zeros(M_, N_, dtype=f64)
    vel, m, v = lora_pro_step(
        FactorPoint(B, A.T), FactorTangent(gB, gA.T), s, zeros, zeros, 1, (0.9, 0.999), 1e-8, 0.0
    )
    vB, vA = vel.M, vel.N.T
    D = (m / 0.1) / ((v / 1e-3).sqrt() + 1e-8)
    PB = B @ torch.linalg.pinv(B)
    PA = torch.linalg.pinv(A) @ A
    PT = PB @ D + D @ PA - PB @ D @ PA
    assert ((s * (B @ vA + vB @ A) - PT).abs().max() / PT.abs().max()).item() < 1e-12
    assert (vA @ A.T - B.T @ vB).abs().max().item() < 1e-12 * vA.abs().max().item() * 10
    # the moments are those of the equivalent gradient P_T(G)
    G = (s * B @ A - target) * s / s  # ∇_{ΔW} of 0.5‖ΔW − target‖², ΔW = s B A
    PG = PB @ G + G @ PA - PB @ G @ PA
    assert ((m - 0.1 * PG).abs().max()).item() < 1e-12


def test_converges_on_a_planted_problem_from_zero_init() -> None:
    """``0.5‖s B A − X*‖²`` with ``rank X* = 3``, ``B = 0``, ``s = 2``: the loss falls by more
    than 10¹² in 300 steps (lr 5e-2, cosine decay to 0)."""
    target, s = planted(), 2.0
    B0, A0 = factors(zero_B=True)
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    opt = LoRAPro([pair(B, A, s)], lr=5e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    first = loss_fn(B, A, target, s).item()
    for _ in range(300):
        opt.zero_grad()
        loss_fn(B, A, target, s).backward()
        opt.step()
        sched.step()
    last = loss_fn(B, A, target, s).item()
    print(f"LoRA-Pro planted: {first:.3g} -> {last:.3g}")
    assert last < 1e-12 * first, (first, last)


@pytest.mark.parametrize("split", [1, 6])
def test_state_dict_resume_is_exact(split: int) -> None:
    """Resume after ``split`` steps (1: inside the rank-deficient phase) equals the
    uninterrupted run bitwise (fp32)."""
    target = planted(dtype=torch.float32)
    B0, A0 = factors(zero_B=True, dtype=torch.float32)

    def make():
        B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
        return B, A, LoRAPro([pair(B, A, 2.0)], lr=1e-2)

    assert_resume_exact(make, lambda B, A: loss_fn(B, A, target, 2.0), split)


def test_zero_factors_stay_finite() -> None:
    """``B = 0`` and ``A = 0`` (a saddle: all gradients vanish) give zero steps, no NaN."""
    target = planted()
    B = torch.nn.Parameter(torch.zeros(M_, R_, dtype=f64))
    A = torch.nn.Parameter(torch.zeros(R_, N_, dtype=f64))
    opt = LoRAPro([pair(B, A)], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(B, A, target, 1.0).backward()
        opt.step()
    assert torch.equal(B, torch.zeros_like(B)) and torch.equal(A, torch.zeros_like(A))
    assert all(bool(torch.isfinite(v).all()) for v in opt.state[B].values() if torch.is_tensor(v))


def test_bf16_parameters_keep_fp32_state() -> None:
    """bf16 factors: the dense moments are fp32 and the fit reaches bf16 resolution."""
    target = planted(dtype=torch.float32)
    B0, A0 = factors(zero_B=True, dtype=torch.float32)
    B = torch.nn.Parameter(B0.bfloat16())
    A = torch.nn.Parameter(A0.bfloat16())
    opt = LoRAPro([pair(B, A)], lr=1e-2)
    first = loss_fn(B.float(), A.float(), target, 1.0).item()
    for _ in range(400):
        opt.zero_grad()
        loss_fn(B.float(), A.float(), target, 1.0).backward()
        opt.step()
    last = loss_fn(B.float(), A.float(), target, 1.0).item()
    st = opt.state[B]
    assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    assert B.dtype == torch.bfloat16 and math.isfinite(last) and last < 1e-2 * first


def test_metric_cannot_be_changed() -> None:
    B, A = factors()
    with pytest.raises(TypeError, match="flat"):
        LoRAPro([pair(torch.nn.Parameter(B), torch.nn.Parameter(A))], metric="balanced")
