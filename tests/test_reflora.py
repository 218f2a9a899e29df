"""RefLoRA and the gauge mechanism (geolora.optim.reflora, geolora.optim.gauge).

References written from the authors' code (their ``Refactorer``), in their peft layout
``A: (r, n)``, ``B: (m, r)``: the closed form ``S*`` from two ``eigh``, the full variant as
gradient preconditioning in front of ``torch.optim.AdamW``, RefLoRA-S as a scalar refactoring of
the weights and of AdamW's state after each step. Plus the gauge functions' identities, the state
rules, invariance, and the rebalancing of an invariant optimizer with its ``X`` trajectory
unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch
from pair_problems import assert_resume_exact, planted

from geolora.optim import AdamS, LiftedSGD, LoRAMFixedRank, LoRARite, RefLoRA
from geolora.optim.gauge import (
    Gauge,
    balanced_factors,
    imbalance,
    move_factor_moments,
    rebalance_,
    reflora_preconditioner,
    scalar_factors,
)
from geolora.optim.sharding import RowSum

f64 = torch.float64
M_, N_, R_ = 12, 10, 3



def unbalanced(seed: int = 1, L: int | None = None, cond: float = 1e3):
    """Factors ``(M, N)`` (``M = B``, ``N = Aᵀ``) moved by a gauge of condition ``cond``."""
    g = torch.Generator().manual_seed(seed)
    lead = () if L is None else (L,)
    M = torch.randn(*lead, M_, R_, dtype=f64, generator=g)
    N = torch.randn(*lead, N_, R_, dtype=f64, generator=g) / math.sqrt(N_)
    Q1 = torch.linalg.qr(torch.randn(R_, R_, dtype=f64, generator=g))[0]
    Q2 = torch.linalg.qr(torch.randn(R_, R_, dtype=f64, generator=g))[0]
    R = Q1 @ torch.diag(torch.logspace(0, math.log10(cond), R_, dtype=f64)) @ Q2
    return M @ R, N @ torch.linalg.inv(R).T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# --- the gauge functions -----------------------------------------------------------------------
def test_balanced_factors_keep_x_and_balance_the_pair() -> None:
    """``M' N'ᵀ = X`` (1e-12), ``M'ᵀM' = N'ᵀN' = diag σ(X)`` (1e-10), ``M R = M'``,
    ``N R⁻ᵀ = N'``, ``R (R⁻ᵀ)ᵀ = I`` — on a batch of pairs unbalanced by ``cond(R) = 1e3``."""
    M, N = unbalanced(L=4)
    X = M @ N.mT
    (Mb, Nb), (R, Rit) = balanced_factors(M, N)
    sig = torch.linalg.svdvals(X)[..., :R_]
    assert rel(Mb @ Nb.mT, X) < 1e-12
    assert rel(Mb.mT @ Mb, torch.diag_embed(sig)) < 1e-10
    assert rel(Nb.mT @ Nb, torch.diag_embed(sig)) < 1e-10
    assert rel(M @ R, Mb) < 1e-10 and rel(N @ Rit, Nb) < 1e-10
    assert rel(R @ Rit.mT, torch.eye(R_, dtype=f64).expand(4, R_, R_)) < 1e-10


def authors_S(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' ``S`` and ``S⁻¹`` (peft layout), from ``eigh`` of ``A Aᵀ`` and of
    ``(B V_A Σ_A)ᵀ (B V_A Σ_A)``, with their ``ε = finfo.eps`` in the inverses."""
    eps = torch.finfo(A.dtype).eps
    sA2, VA = torch.linalg.eigh(A @ A.T)
    sA = sA2.sqrt()
    Mr = B @ (VA * sA)
    sM2, VM = torch.linalg.eigh(Mr.T @ Mr)
    sM = sM2.sqrt()
    left = (VA * (1 / (sA + eps))) @ VM
    S = (left * sM) @ left.T
    ileft = (VA * sA) @ VM
    S_inv = (ileft * (1 / (sM + eps))) @ ileft.T
    return S, S_inv


def authors_P(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """The authors' refactoring matrix ``P`` (``A' = Pᵀ A``, ``B' = B P⁻ᵀ``)."""
    sA2, VA = torch.linalg.eigh(A @ A.T)
    sA = sA2.sqrt()
    Mr = B @ (VA * sA)
    sM2, VM = torch.linalg.eigh(Mr.T @ Mr)
    return (VA * (1 / sA)) @ (VM * sM2.pow(0.25))


def test_reflora_preconditioner_is_the_authors_closed_form() -> None:
    """``S*`` and ``S*⁻¹`` equal the authors' ``eigh`` formulas to 1e-10 and solve
    ``S G_N S = G_M`` (peft: ``S (A Aᵀ) S = BᵀB``)."""
    M, N = unbalanced(cond=30.0)
    S, S_inv = reflora_preconditioner(M, N)
    Sa, Sa_inv = authors_S(N.T, M)
    assert rel(S, Sa) < 1e-10 and rel(S_inv, Sa_inv) < 1e-10
    assert rel(S @ (N.T @ N) @ S, M.T @ M) < 1e-10


def test_authors_refactoring_is_the_balanced_pair_up_to_a_signed_permutation() -> None:
    """The authors' ``(B P⁻ᵀ, Pᵀ A)`` is balanced and equals :func:`balanced_factors` up to the
    order and signs of the columns (their ``eigh`` sorts ascending)."""
    M, N = unbalanced(cond=30.0)
    P = authors_P(N.T, M)
    Ma, Na = M @ torch.linalg.inv(P).T, N @ P
    (Mb, Nb), _ = balanced_factors(M, N)
    assert rel(Ma.T @ Ma, Na.T @ Na) < 1e-10
    flip = torch.sign((Ma.flip(-1) * Mb).sum(0))
    assert rel(Ma.flip(-1) * flip, Mb) < 1e-10 and rel(Na.flip(-1) * flip, Nb) < 1e-10


def test_sgd_on_the_refactored_pair_is_preconditioned_sgd() -> None:
    """The identity behind the authors' implementation: an SGD step on the refactored pair and
    the step with ``(∇_M S*, ∇_N S*⁻¹)`` on the original pair give the same ``X`` (1e-12)."""
    M, N = unbalanced(cond=30.0)
    target, eta = planted(), 0.05
    gM, gN = (M @ N.T - target) @ N, (M @ N.T - target).T @ M
    S, S_inv = reflora_preconditioner(M, N)
    X1 = (M - eta * gM @ S) @ (N - eta * gN @ S_inv).T
    (Mb, Nb), _ = balanced_factors(M, N)
    gMb, gNb = (Mb @ Nb.T - target) @ Nb, (Mb @ Nb.T - target).T @ Mb
    assert rel((Mb - eta * gMb) @ (Nb - eta * gNb).T, X1) < 1e-12


def test_scalar_policy_and_state_rule_are_the_authors_reflora_s() -> None:
    """RefLoRA-S: ``‖M'‖ = ‖N'‖``; the moments move as in the authors' code (``exp_avg_A /= P``,
    ``exp_avg_sq_A /= S``, ``exp_avg_B *= P``, ``exp_avg_sq_B *= S``, ``S = ‖B‖ / ‖A‖``,
    ``P = √S``) — exactly."""
    M, N = unbalanced(cond=30.0)
    g = torch.Generator().manual_seed(4)
    mM, mN = torch.randn(M_, R_, dtype=f64, generator=g), torch.randn(N_, R_, dtype=f64, generator=g)
    vM, vN = mM.square(), mN.square()
    (Ms, Ns), gauge = scalar_factors(M, N)
    assert abs(Ms.norm() - Ns.norm()).item() < 1e-12 * Ms.norm().item()
    S = M.norm() / N.norm()
    P = S.sqrt()
    assert rel(Ms, M / P) < 1e-15 and rel(Ns, N * P) < 1e-15
    got = move_factor_moments(mM, mN, vM, vN, gauge)
    for a, b in zip(got, (mM * P, mN / P, vM * S, vN / S)):
        assert rel(a, b) < 1e-14


@pytest.mark.parametrize("kind", ["diagonal", "signed_permutation"])
def test_second_moment_rule_is_exact_for_diagonal_and_signed_permutation_gauges(kind) -> None:
    """Moving EMA moments by the rule equals accumulating the moved gradients from the start
    (1e-14) when ``R`` is diagonal or a signed permutation."""
    g = torch.Generator().manual_seed(2)
    if kind == "diagonal":
        R = torch.diag(torch.tensor([3.0, 0.5, -2.0], dtype=f64))
    else:
        R = torch.eye(R_, dtype=f64)[[2, 0, 1]] * torch.tensor([1.0, -1.0, 1.0], dtype=f64)
    gauge = Gauge(R, torch.linalg.inv(R).T)
    mM = mN = vM = vN = None
    mM2 = mN2 = vM2 = vN2 = None
    for _ in range(5):
        gM = torch.randn(M_, R_, dtype=f64, generator=g)
        gN = torch.randn(N_, R_, dtype=f64, generator=g)
        hM, hN = gM @ gauge.R_inv_t, gN @ gauge.R

        def ema(old, new, b):
            return (1 - b) * new if old is None else b * old + (1 - b) * new

        mM, mN = ema(mM, gM, 0.9), ema(mN, gN, 0.9)
        vM, vN = ema(vM, gM**2, 0.999), ema(vN, gN**2, 0.999)
        mM2, mN2 = ema(mM2, hM, 0.9), ema(mN2, hN, 0.9)
        vM2, vN2 = ema(vM2, hM**2, 0.999), ema(vN2, hN**2, 0.999)
    for a, b in zip(move_factor_moments(mM, mN, vM, vN, gauge), (mM2, mN2, vM2, vN2)):
        assert rel(a, b) < 1e-14


def test_imbalance_measure() -> None:
    """0 at a balanced pair, invariant under ``(M Q, N Q)`` and ``(c M, c N)``, large along the
    orbit, inf at ``X = 0`` with a nonzero factor."""
    M, N = unbalanced(cond=1e2)
    (Mb, Nb), _ = balanced_factors(M, N)
    Q = torch.linalg.qr(torch.randn(R_, R_, dtype=f64, generator=torch.Generator().manual_seed(9)))[0]
    assert abs(imbalance(Mb, Nb).item()) < 1e-12
    assert abs(imbalance(Mb @ Q, Nb @ Q).item()) < 1e-12
    base = imbalance(M, N).item()
    assert base > 10.0
    assert abs(imbalance(M @ Q, N @ Q).item() - base) < 1e-10 * base
    assert abs(imbalance(3 * M, 3 * N).item() - base) < 1e-10 * base
    assert imbalance(torch.zeros(M_, R_, dtype=f64), N).item() == math.inf


def test_rank_deficient_pairs_keep_the_identity_gauge() -> None:
    """``B = 0``: the balanced policy returns the factors unchanged with ``R = I``."""
    M, N = unbalanced()
    Z = torch.zeros_like(M)
    (Mz, Nz), (R, Rit) = balanced_factors(Z, N)
    assert torch.equal(Mz, Z) and torch.equal(Nz, N)
    assert torch.equal(R, torch.eye(R_, dtype=f64)) and torch.equal(Rit, R)


class _OneRank(RowSum):
    """A reducer of row shards over a world of one: the row-sharded code paths in one process."""

    def __init__(self) -> None:
        super().__init__(None, m_rows=True, n_rows=True, shape=(M_, N_))

    def _all_reduce(self, pieces: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
        return list(pieces)


def test_row_shard_gauges_equal_the_whole_factor_ones() -> None:
    """The row-shard forms (CholeskyQR2 frames, reduced Frobenius norms) give the whole-factor
    gauges to rounding; ``B = 0`` keeps the identity gauge there too (tests/test_sharded.py runs
    them on 2 and 4 processes)."""
    M, N = unbalanced(L=2)
    for policy in (balanced_factors, scalar_factors):
        want, wg = policy(M, N)
        got, gg = policy(M, N, _OneRank())
        for a, b in zip((*got, *gg), (*want, *wg)):
            assert rel(a, b) < 1e-13, policy.__name__
    S, S_inv = reflora_preconditioner(M, N, _OneRank())
    for a, b in zip((S, S_inv), reflora_preconditioner(M, N)):
        assert rel(a, b) < 1e-13
    Z = M.clone()
    Z[0] = 0.0  # rank deficient: NaN from CholeskyQR, identity gauge
    (Mz, Nz), (R, Rit) = balanced_factors(Z, N, _OneRank())
    assert torch.equal(Mz[0], Z[0]) and torch.equal(Nz[0], N[0])
    assert torch.equal(R[0], torch.eye(R_, dtype=f64)) and torch.equal(Rit[0], R[0])
    assert torch.isfinite(R).all() and rel(Mz[1] @ Nz[1].mT, M[1] @ N[1].mT) < 1e-13


# --- the optimizer against the authors' code ---------------------------------------------------
def pair(B, A, name="p"):
    return {"params": [B, A], "lora_pair": True, "scaling": 1.0, "name": name}


def loss_of(B, A, target):
    return 0.5 * ((B @ A - target) ** 2).sum()


def authors_run(B0, A0, target, steps, lr, warmup, scalar):
    """``torch.optim.AdamW`` on ``[A, B]`` with the authors' refactorer: full variant as a
    pre-step gradient preconditioning, RefLoRA-S as a post-step refactoring (and one call at
    integration), both skipping their first ``warmup`` calls."""
    A = torch.nn.Parameter(A0.clone())
    B = torch.nn.Parameter(B0.clone())
    opt = torch.optim.AdamW([A, B], lr=lr, weight_decay=0.0)
    skip = warmup

    def refactor_scalar():
        nonlocal skip
        if skip > 0:
            skip -= 1
            return
        with torch.no_grad():
            S = B.norm() / A.norm()
            P = S.sqrt()
            A.mul_(P)
            B.mul_(1 / P)
            if opt.state:
                opt.state[A]["exp_avg"].mul_(1 / P)
                opt.state[A]["exp_avg_sq"].mul_(1 / S)
                opt.state[B]["exp_avg"].mul_(P)
                opt.state[B]["exp_avg_sq"].mul_(S)

    if scalar:
        refactor_scalar()
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(B, A, target).backward()
        if not scalar:
            if skip > 0:
                skip -= 1
            else:
                with torch.no_grad():
                    S, S_inv = authors_S(A, B)
                    A.grad = S_inv @ A.grad
                    B.grad = B.grad @ S
        opt.step()
        if scalar:
            refactor_scalar()
        out.append((B @ A).detach().clone())
    return out


def reflora_run(B0, A0, target, steps, **kw):
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    opt = RefLoRA([pair(B, A)], **kw)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss_of(B, A, target).backward()
        opt.step()
        out.append((B @ A).detach().clone())
    return out


@pytest.mark.parametrize("scalar", [False, True])
def test_matches_the_authors_code(scalar: bool) -> None:
    """``mode="precondition"`` is the authors' full variant and ``policy="scalar"`` their
    RefLoRA-S: 10 steps (3 of warm-up) equal their AdamW runs to 1e-10 (fp64)."""
    M, N = unbalanced(cond=10.0)
    target = planted()
    kw = {"policy": "scalar"} if scalar else {"mode": "precondition"}
    ref = authors_run(M, N.T, target, 10, 1e-2, 3, scalar)
    got = reflora_run(M, N.T, target, 10, lr=1e-2, warmup_steps=3, **kw)
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-10


def test_refactor_mode_is_transformation_invariant() -> None:
    """Balanced refactoring from step 1 (``warmup_steps=0``): ``(B R, R⁻¹ A)`` gives the same
    ``X`` trajectory (1e-10), also when ``X`` has a repeated singular value (clusters: the second
    moments are averaged there)."""
    target = planted()
    g = torch.Generator().manual_seed(7)
    R = torch.randn(R_, R_, dtype=f64, generator=g)
    M, N = unbalanced(cond=3.0)
    U = torch.linalg.qr(torch.randn(M_, R_, dtype=f64, generator=g))[0]
    V = torch.linalg.qr(torch.randn(N_, R_, dtype=f64, generator=g))[0]
    Mc, Nc = U * torch.tensor([1.0, 1.0, 0.5], dtype=f64), V  # σ(X) = (1, 1, 0.5)
    for M0, N0 in ((M, N), (Mc, Nc)):
        a = reflora_run(M0, N0.T, target, 10, lr=1e-2, warmup_steps=0)
        b = reflora_run(M0 @ R, torch.linalg.solve(R, N0.T), target, 10, lr=1e-2, warmup_steps=0)
        assert max(rel(x, y) for x, y in zip(a, b)) < 1e-10


def test_converges_on_a_planted_problem() -> None:
    """``0.5‖B A − X*‖²`` (rank 3) from LoRA's ``B = 0`` (plain AdamW until ``B A`` has rank r,
    then refactoring): the loss falls by more than 10¹⁰ in 400 steps (lr 3e-2, cosine)."""
    target = planted()
    _, N = unbalanced()
    B = torch.nn.Parameter(torch.zeros(M_, R_, dtype=f64))
    A = torch.nn.Parameter(N.T.clone())
    opt = RefLoRA([pair(B, A)], lr=3e-2, warmup_steps=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 400)
    first = loss_of(B, A, target).item()
    for _ in range(400):
        opt.zero_grad()
        loss_of(B, A, target).backward()
        opt.step()
        sched.step()
    last = loss_of(B, A, target).item()
    print(f"RefLoRA planted: {first:.3g} -> {last:.3g}")
    assert last < 1e-10 * first, (first, last)


@pytest.mark.parametrize("split", [2, 6])
@pytest.mark.parametrize("policy", ["balanced", "scalar"])
def test_state_dict_resume_is_exact(split: int, policy: str) -> None:
    """Resume after ``split`` steps (2: inside the warm-up) equals the uninterrupted run
    bitwise (fp32)."""
    target = planted(dtype=torch.float32)
    M, N = unbalanced(cond=10.0)

    def make():
        B, A = torch.nn.Parameter(M.float()), torch.nn.Parameter(N.T.float().contiguous())
        return B, A, RefLoRA([pair(B, A)], lr=1e-2, warmup_steps=3, policy=policy)

    assert_resume_exact(make, lambda B, A: loss_of(B, A, target), split)


@pytest.mark.parametrize("policy", ["balanced", "scalar"])
def test_zero_factors_stay_finite(policy: str) -> None:
    """``B = 0`` and ``B = A = 0`` with refactoring from step 1: identity gauge, no NaN."""
    target = planted()
    for A0 in (torch.randn(R_, N_, dtype=f64), torch.zeros(R_, N_, dtype=f64)):
        B = torch.nn.Parameter(torch.zeros(M_, R_, dtype=f64))
        A = torch.nn.Parameter(A0.clone())
        opt = RefLoRA([pair(B, A)], lr=1e-2, warmup_steps=0, policy=policy)
        for _ in range(5):
            opt.zero_grad()
            loss_of(B, A, target).backward()
            opt.step()
        assert bool(torch.isfinite(B).all() and torch.isfinite(A).all())
        assert all(bool(torch.isfinite(v).all()) for v in opt.state[B].values() if torch.is_tensor(v))


def test_bf16_parameters_keep_fp32_state() -> None:
    target = planted(dtype=torch.float32)
    M, N = unbalanced(cond=3.0)
    B = torch.nn.Parameter(M.bfloat16())
    A = torch.nn.Parameter(N.T.contiguous().bfloat16())
    opt = RefLoRA([pair(B, A)], lr=3e-2, warmup_steps=0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    first = loss_of(B.float(), A.float(), target).item()
    for _ in range(300):
        opt.zero_grad()
        loss_of(B.float(), A.float(), target).backward()
        opt.step()
        sched.step()
    assert B.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for k, v in opt.state[B].items() if k.startswith("exp_"))
    assert loss_of(B.float(), A.float(), target).item() < 1e-3 * first


@pytest.mark.parametrize(
    "kw, match",
    [({"policy": "qr"}, "policy"), ({"mode": "both"}, "mode"),
     ({"mode": "precondition", "policy": "scalar"}, "precondition"),
     ({"warmup_steps": -1}, "warmup_steps"), ({"warmup_steps": True}, "warmup_steps")],
)
def test_bad_options(kw, match) -> None:
    M, N = unbalanced()
    with pytest.raises(ValueError, match=match):
        RefLoRA([pair(torch.nn.Parameter(M), torch.nn.Parameter(N.T.contiguous()))], **kw)


# --- rebalancing a live invariant optimizer ------------------------------------------------------
REBALANCED = {
    "adams": lambda g: AdamS(g, lr=1e-2, robust_steps=0),
    "adams_low_memory": lambda g: AdamS(g, lr=1e-2, robust_steps=0, low_memory=True),
    "lifted_sgd_momentum": lambda g: LiftedSGD(g, lr=5e-2, momentum=0.9),
}


@pytest.mark.parametrize("name", list(REBALANCED))
def test_rebalancing_keeps_the_x_trajectory(name: str) -> None:
    """An invariant lifted optimizer from a pair unbalanced by ``cond = 1e3``: rebalancing after
    every step (``threshold=0``) leaves the ``X`` trajectory of 30 steps unchanged to 1e-10
    (fp64; its state lives in matrix space and is not touched), while the factors end balanced."""
    target = planted()
    M, N = unbalanced(cond=1e3)

    def run(rebalance: bool):
        B, A = torch.nn.Parameter(M.clone()), torch.nn.Parameter(N.T.contiguous())
        opt = REBALANCED[name]([pair(B, A)])
        out, changed = [], 0
        for _ in range(30):
            opt.zero_grad()
            loss_of(B, A, target).backward()
            opt.step()
            if rebalance:
                changed += rebalance_(opt, threshold=0.0)
            out.append((B @ A).detach().clone())
        return out, changed, imbalance(B.detach(), A.detach().T).item()

    ref, _, drift = run(False)
    got, changed, bal = run(True)
    assert changed == 30 and bal < 1e-10 < drift
    assert max(rel(a, b) for a, b in zip(got, ref)) < 1e-10


def test_rebalance_threshold_and_refusals() -> None:
    """Below the threshold nothing changes; optimizers whose state rule is not declared
    (a manifold point, LoRA-RITE's statistics) are refused with ``TypeError``."""
    target = planted()
    M, N = unbalanced(cond=10.0)
    for make, ok in (
        (lambda g: AdamS(g, lr=1e-2, robust_steps=0), True),
        (lambda g: LoRAMFixedRank(g, lr=1e-3), False),
        (lambda g: LoRARite(g, lr=1e-2), False),
    ):
        B, A = torch.nn.Parameter(M.clone()), torch.nn.Parameter(N.T.contiguous())
        opt = make([pair(B, A)])
        opt.zero_grad()
        loss_of(B, A, target).backward()
        opt.step()
        if ok:
            before = B.detach().clone()
            assert rebalance_(opt, threshold=1e12) == 0 and torch.equal(B, before)
            assert rebalance_(opt, threshold=0.0) == 1
        else:
            with pytest.raises(TypeError, match="rule"):
                rebalance_(opt)
    with pytest.raises(ValueError, match="policy"):
        rebalance_(opt, policy="svd")
