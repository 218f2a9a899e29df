"""Learning rates transfer from each method's reference implementation (float64).

Each test runs geolora's optimizer with its *default* hyperparameters next to an independent
transcription of the reference implementation's update (written here from the published
algorithm and the authors' code's conventions, not imported), from the same point and at the same
learning rate, and checks that the iterates agree:

* LoRA-RITE: the authors' PyTorch reimplementation (second moment ``ḡᵀḡ / rows``, bias-corrected
  decay rates, pseudo-inverses, ``eps=1e-6`` added to ``√λ``, escaped mass off, update clipping
  and skipping only above an RMS of 1, which these problems stay below);
* Riemannian-preconditioned AdamW (Zhang & Pilanci 2024): their ``AdamWr`` (GPT-2 recipe:
  bias correction in the step size, ``eps`` on ``√v``, decay after the step, ``A`` updated first
  and ``B`` preconditioned with the new ``A``) — equal to first order in ``lr``;
* ScaledGD: their ``SGDr`` with ``reg=1e-6``;
* LoRA+: peft's ``create_loraplus_optimizer`` with ``torch.optim.AdamW`` (called, not copied);
* LoRAM-FR: the first step of Algorithm 1 (Alg. 2 gradient, Alg. 3 retraction) of Jiang, Wang &
  Stich, "LoRAM: Low-Rank Adaptation of Large Language Models on Manifold", ICLR 2025 Workshop on
  Sparsity in LLMs, OpenReview 6cLPObfitT;
* Stiefel-LoRA: geoopt's ``RiemannianAdam`` on the Stiefel manifold for ``B`` and
  ``torch.optim.AdamW`` for ``A`` (called, not copied).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geolora.optim import (
    LoRAMFixedRank,
    LoRAPlus,
    LoRARite,
    RiemannianPreconditionedAdamW,
    ScaledGD,
    StiefelLoRA,
)

DT = torch.float64
M, N, R = 12, 9, 3


def _problem(seed: int = 0, scale: float = 0.05):
    """``f(X) = ½‖C ⊙ (X − X*)‖²`` scaled so that ``‖∇_X f‖_F < 1`` at the start, and a
    full-rank starting pair ``(B, A)``."""
    g = torch.Generator().manual_seed(seed)
    Xs = torch.randn(M, R, dtype=DT, generator=g) @ torch.randn(R, N, dtype=DT, generator=g)
    C = scale * (0.5 + torch.rand(M, N, dtype=DT, generator=g))
    B0 = torch.randn(M, R, dtype=DT, generator=g)
    A0 = torch.randn(R, N, dtype=DT, generator=g) / 2

    def grad_X(X: torch.Tensor) -> torch.Tensor:
        return C**2 * (X - Xs)

    return B0, A0, grad_X


def _run(make, B0, A0, grad_X, steps):
    """Iterates ``(B, A)`` of a geolora optimizer fed the exact factor gradients of ``f``."""
    B, A = torch.nn.Parameter(B0.clone()), torch.nn.Parameter(A0.clone())
    opt = make([{"params": [B, A], "lora_pair": True, "name": "l0"}])
    out = []
    for _ in range(steps):
        G = grad_X(B.detach() @ A.detach())
        B.grad, A.grad = G @ A.detach().T, B.detach().T @ G
        opt.step()
        out.append((B.detach().clone(), A.detach().clone()))
    return out


# --- LoRA-RITE ---------------------------------------------------------------------------------


def _rite_authors(B0, A0, grad_X, steps, lr, betas=(0.9, 0.999), eps=1e-6):
    """The authors' PyTorch LoRA-RITE update, one pair ``(lora_A, lora_B)``, default options.

    Their factors are ``l = lora_Aᵀ`` (``n × r``, LoRA dim moved last) and ``r = lora_B``;
    each side uses the other side's QR. Decay rates are bias corrected,
    ``β̂ₜ = β (1 − β^{t−1}) / (1 − βᵗ)``, and every EMA is ``(1 − β̂) new + β̂ old``.
    """
    b1, b2 = betas
    side = {"l": A0.T.clone(), "r": B0.clone()}
    other = {"l": "r", "r": "l"}
    st = {  # "basis": the other side's basis at the previous step
        k: dict(v=torch.zeros(R, R, dtype=DT), m=torch.zeros_like(x),
                basis=torch.zeros_like(side[other[k]]))
        for k, x in side.items()
    }
    out = []
    for t in range(1, steps + 1):
        G = grad_X(side["r"] @ side["l"].T)  # ∇_X, X = lora_B lora_A
        g = {"l": G.T @ side["r"], "r": G @ side["l"]}
        qr = {k: torch.linalg.qr(x) for k, x in side.items()}
        rinv = {k: torch.linalg.pinv(qr[k][1]) for k in side}
        u = {k: g[k] @ rinv[other[k]] for k in side}  # unmagnified gradients
        norm = math.sqrt(sum(float((x**2).sum()) for x in u.values()))
        rms = max(float(x.pow(2).mean().sqrt()) for x in u.values())
        assert norm <= 1.0 and rms <= 1.0, "the authors' clipping / skipping would act"
        d1 = b1 * (1 - b1 ** (t - 1)) / (1 - b1**t)
        d2 = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        step = {}
        for k in side:
            P = qr[other[k]][0].T @ st[k]["basis"]  # new basis of the other side vs old
            V = d2 * (P @ st[k]["v"] @ P.T) + (1 - d2) * (u[k].T @ u[k]) / u[k].shape[0]
            V = (V + V.T) / 2
            w, Q = torch.linalg.eigh(V)
            S = u[k] @ (Q * (1 / (w.sqrt() + eps))) @ Q.T
            mom = d1 * (st[k]["m"] @ P.T) + (1 - d1) * S
            st[k].update(v=V, m=mom)
            step[k] = mom @ rinv[other[k]].T
        for k in side:
            st[k]["basis"] = qr[other[k]][0]
            side[k] = side[k] - lr * step[k]
        out.append((side["r"].clone(), side["l"].T.clone()))
    return out


def test_lora_rite_default_step_is_the_authors_code() -> None:
    """One step of ``LoRARite()`` at the authors' learning rate equals their code's step; with
    their code's ``apply_escape=False`` the two agree for 10 steps (bases turning)."""
    B0, A0, grad_X = _problem()
    lr = 1e-2
    ref = _rite_authors(B0, A0, grad_X, 10, lr)
    (got,) = _run(lambda p: LoRARite(p, lr=lr), B0, A0, grad_X, 1)
    for x, y in zip(got, ref[0]):
        assert (x - y).abs().max() <= 1e-12 * y.abs().max()
    traj = _run(lambda p: LoRARite(p, lr=lr, escaped_mass=False), B0, A0, grad_X, 10)
    for t, (g_t, r_t) in enumerate(zip(traj, ref)):
        for x, y in zip(g_t, r_t):
            err = ((x - y).abs().max() / y.abs().max()).item()
            assert err <= 1e-10, f"step {t + 1}: {err:.2e}"
    # the trajectory moved and turned the bases (else this would test one step only)
    assert (traj[-1][0] - B0).norm() > 0.02 * B0.norm()


def test_lora_rite_paper_scale_is_sqrt_rows_smaller() -> None:
    """``row_normalize=False`` (the paper's eq. 14) takes a step exactly ``√rows`` times
    smaller at step 1 (``eps=0``): ``√m`` for ``B``, ``√n`` for ``A``."""
    B0, A0, grad_X = _problem()
    steps = {}
    for rn in (True, False):
        make = lambda p, rn=rn: LoRARite(p, lr=1e-3, eps=0.0, row_normalize=rn)  # noqa: E731
        ((B1, A1),) = _run(make, B0, A0, grad_X, 1)
        steps[rn] = (B1 - B0, A1 - A0)
    for i, rows in enumerate((M, N)):
        ratio = steps[True][i].norm() / steps[False][i].norm()
        assert abs(ratio.item() - math.sqrt(rows)) <= 1e-9 * math.sqrt(rows)


# --- Zhang & Pilanci: scaled AdamW and scaled GD --------------------------------------------


def _adamwr_authors(B0, A0, grad_X, steps, lr, betas=(0.9, 0.999), eps=1e-6, wd=0.01,
                    reg=1e-6):
    """The authors' ``AdamWr`` (GPT-2 recipe, ``correct_bias=True``) for one pair."""
    B, A = B0.clone(), A0.clone()
    st = {k: [torch.zeros_like(x), torch.zeros_like(x)] for k, x in (("A", A), ("B", B))}
    eye = torch.eye(R, dtype=DT)
    out = []
    for t in range(1, steps + 1):
        G = grad_X(B @ A)
        gA, gB = B.T @ G, G @ A.T
        bc = math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
        for k, g in (("A", torch.linalg.solve(B.T @ B + reg * eye, gA)), ("B", None)):
            if k == "B":  # B's preconditioner reads the A just updated
                g = torch.linalg.solve(A @ A.T + reg * eye, gB.T).T
            m, v = st[k]
            m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
            x = A if k == "A" else B
            x = x - lr * bc * m / (v.sqrt() + eps)
            x = x - lr * wd * x
            A, B = (x, B) if k == "A" else (A, x)
        out.append((B.clone(), A.clone()))
    return out


def test_rpadamw_defaults_match_the_authors_adamwr() -> None:
    """Defaults (``eps=1e-6``, ``weight_decay=0.01``, ``damping=1e-6``) give the authors' step:
    the only differences are of second order in ``lr`` (ordering) and the placement of ``eps``.
    """
    B0, A0, grad_X = _problem(scale=10.0)
    lr = 1e-4  # measured: the iterates differ by <= 2.1e-5 of the distance moved in 20 steps
    ref = _adamwr_authors(B0, A0, grad_X, 20, lr)
    got = _run(lambda p: RiemannianPreconditionedAdamW(p, lr=lr), B0, A0, grad_X, 20)
    for t, ((Bg, Ag), (Br, Ar)) in enumerate(zip(got, ref)):
        step = (Br - B0).norm() + (Ar - A0).norm()
        diff = (Bg - Br).norm() + (Ag - Ar).norm()
        assert diff <= 1e-4 * step, f"step {t + 1}: {diff / step:.2e} of the distance moved"


def test_scaledgd_matches_the_authors_sgdr() -> None:
    """``ScaledGD(damping=1e-6)`` is the authors' ``SGDr`` (``reg=1e-6``) to rounding; the
    default ``damping=0`` differs from it by ``O(δ / σ_min²)`` only."""
    B0, A0, grad_X = _problem(scale=1.0)
    lr, reg, eye = 1e-2, 1e-6, torch.eye(R, dtype=DT)
    B, A = B0.clone(), A0.clone()
    ref = []
    for _ in range(5):
        G = grad_X(B @ A)
        gA = torch.linalg.solve(B.T @ B + reg * eye, B.T @ G)
        gB = torch.linalg.solve(A @ A.T + reg * eye, (G @ A.T).T).T
        B, A = B - lr * gB, A - lr * gA
        ref.append((B.clone(), A.clone()))
    for damping, tol in ((1e-6, 1e-12), (0.0, 1e-6)):
        got = _run(lambda p, d=damping: ScaledGD(p, lr=lr, damping=d), B0, A0, grad_X, 5)
        for (Bg, Ag), (Br, Ar) in zip(got, ref):
            assert (Bg - Br).abs().max() <= tol * Br.abs().max()
            assert (Ag - Ar).abs().max() <= tol * Ar.abs().max()


# --- LoRA+: peft's own helper -----------------------------------------------------------------


def test_loraplus_defaults_equal_peft_create_loraplus_optimizer() -> None:
    """``LoRAPlus(groups, lr)`` == peft ``create_loraplus_optimizer(model, AdamW, lr=lr,
    loraplus_lr_ratio=16)`` on a peft model, step for step (peft's ``lr`` is ``η_A`` too)."""
    peft = pytest.importorskip("peft")
    from peft.optimizers import create_loraplus_optimizer

    from geolora.optim import lora_param_groups

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
        return peft.get_peft_model(net.to(DT), cfg)

    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(16, 6, dtype=DT, generator=g), torch.randn(16, 3, dtype=DT, generator=g)
    lr, nets = 1e-2, (model(), model())
    opts = (
        LoRAPlus(lora_param_groups(nets[0]), lr=lr),
        create_loraplus_optimizer(nets[1], torch.optim.AdamW, lr=lr, loraplus_lr_ratio=16.0),
    )
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            ((net(x) - y) ** 2).mean().backward()
            opt.step()
    p0, p1 = dict(nets[0].named_parameters()), dict(nets[1].named_parameters())
    lora = [n for n in p0 if "lora_" in n]
    assert len(lora) == 4
    for n in lora:
        assert torch.allclose(p0[n], p1[n], rtol=0, atol=1e-13), n


# --- LoRAM-FR: the first step of Algorithm 1 --------------------------------------------------


def test_loram_fr_first_step_is_the_paper_box() -> None:
    """The first ``LoRAMFixedRank()`` step from a full-rank pair is LoRAM Algorithm 1's:
    ``m = (1 − β₁) g``, ``v = (1 − β₂) g ⊙ g`` on ``g = (M, Up, Vp)`` (Alg. 2),
    ``X⁺ = trunc_r(X − lr m / (√v + ε))`` (Alg. 3), no bias correction."""
    B0, A0, grad_X = _problem(scale=1.0)
    lr, (b1, b2), eps = 5e-5, (0.9, 0.999), 1e-8
    X = B0 @ A0
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    U, V = U[:, :R], Vh[:R].T
    G = grad_X(X)
    Mc = U.T @ G @ V
    Up, Vp = G @ V - U @ Mc, G.T @ U - V @ Mc.T
    d = [-lr * (1 - b1) * c / (math.sqrt(1 - b2) * c.abs() + eps) for c in (Mc, Up, Vp)]
    Y = X + U @ d[0] @ V.T + d[1] @ V.T + U @ d[2].T
    u, s, vh = torch.linalg.svd(Y, full_matrices=False)
    want = u[:, :R] @ torch.diag(s[:R]) @ vh[:R]
    ((B1, A1),) = _run(LoRAMFixedRank, B0, A0, grad_X, 1)
    assert ((B1 @ A1 - want).norm() / (want - X).norm()).item() <= 1e-8
    assert (want - X).norm() > 0  # the step moved X


# --- Stiefel-LoRA: geoopt RiemannianAdam + torch AdamW ------------------------------------------


def test_stiefel_lora_defaults_equal_geoopt_and_torch() -> None:
    """From an orthonormal ``B``, ``StiefelLoRA()`` equals geoopt's ``RiemannianAdam`` on the
    Stiefel manifold (QR retraction, one second-moment number) for ``B`` and
    ``torch.optim.AdamW(weight_decay=0)`` for ``A``, at the same ``lr``, for 5 steps."""
    geoopt = pytest.importorskip("geoopt")
    B0, A0, grad_X = _problem(scale=1.0)
    B0 = torch.linalg.qr(B0)[0] * torch.linalg.qr(B0)[1].diagonal().sign()
    lr = 1e-3
    Bg = geoopt.ManifoldParameter(B0.clone(), manifold=geoopt.EuclideanStiefel())
    Ag = torch.nn.Parameter(A0.clone())
    opts = (geoopt.optim.RiemannianAdam([Bg], lr=lr), torch.optim.AdamW([Ag], lr=lr,
                                                                          weight_decay=0.0))
    got = _run(lambda p: StiefelLoRA(p, lr=lr), B0, A0, grad_X, 5)
    for t, (Bs, As) in enumerate(got):
        G = grad_X(Bg.detach() @ Ag.detach())
        Bg.grad, Ag.grad = G @ Ag.detach().T, Bg.detach().T @ G
        for opt in opts:
            opt.step()
        assert (Bs - Bg.detach()).abs().max() <= 1e-10, f"B, step {t + 1}"
        assert (As - Ag.detach()).abs().max() <= 1e-10 * Ag.abs().max(), f"A, step {t + 1}"


def test_lora_rite_reference_is_independent_of_qr_signs() -> None:
    """Sanity of the transcription: negating the starting factors' columns (which flips the QR
    signs) leaves the authors' update of ``X`` unchanged."""
    B0, A0, grad_X = _problem()
    D = torch.diag(torch.tensor([1.0, -1.0, 1.0], dtype=DT))
    a = _rite_authors(B0, A0, grad_X, 3, 1e-2)[-1]
    b = _rite_authors(B0 @ D, D @ A0, grad_X, 3, 1e-2)[-1]
    assert np.allclose((a[0] @ a[1]).numpy(), (b[0] @ b[1]).numpy(), rtol=0, atol=1e-12)


def test_every_optimizer_page_says_where_its_defaults_come_from() -> None:
    """Each docs/optimizers page has a "Where the defaults come from" paragraph that names the
    learning rate."""
    from pathlib import Path

    pages = sorted((Path(__file__).resolve().parents[1] / "docs" / "optimizers").glob("*.md"))
    assert len(pages) >= 11
    for page in pages:
        paragraphs = page.read_text(encoding="utf-8").split("\n\n")
        found = [p for p in paragraphs if p.startswith("**Where the defaults come from.**")]
        assert found, f"{page.name} does not say where its defaults come from"
        assert all("lr" in p for p in found), page.name
