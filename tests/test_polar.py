"""PoLAR (landing field on the Stiefel factors of ΔW = s·X Θ Yᵀ): the landing geometry, the safe
step, agreement with the authors' update, convergence, the distance to the manifold, resume,
degenerate starts and bf16."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from geolora.linalg import qf
from geolora.lora import ThreeFactorLinear, inject_three_factor
from geolora.manifolds.landing import (
    canonical_rgrad,
    landing_distance,
    landing_field,
    landing_safe_step,
)
from geolora.optim import PoLAR, lora_param_groups

F64 = torch.float64


def near_stiefel(n: int, r: int, d: float, gen: torch.Generator) -> torch.Tensor:
    x = qf(torch.randn(n, r, dtype=F64, generator=gen))
    return x + d * torch.randn(n, r, dtype=F64, generator=gen) / (n * r) ** 0.5


# --- geometry -------------------------------------------------------------------------------------
def test_landing_field_identities() -> None:
    gen = torch.Generator().manual_seed(0)
    x = near_stiefel(15, 4, 0.3, gen)
    g = torch.randn(15, 4, dtype=F64, generator=gen)
    lam = 0.7
    psi = g @ x.T - x @ g.T
    delta = x.T @ x - torch.eye(4, dtype=F64)
    field = landing_field(x, g, lam)
    torch.testing.assert_close(field, psi @ x + lam * x @ delta, rtol=0, atol=1e-13)
    # the two terms are orthogonal; the first decreases f: <G, ψX> = ½‖ψ‖²
    assert abs(float(((psi @ x) * (x @ delta)).sum())) < 1e-13
    assert float((g * (psi @ x)).sum()) == pytest.approx(0.5 * float((psi * psi).sum()), rel=1e-13)
    assert float(landing_distance(x)) == pytest.approx(float(delta.norm()), rel=1e-15)
    # on the manifold the tangent term is the canonical-metric Riemannian gradient
    q = qf(x)
    torch.testing.assert_close((g @ q.T - q @ g.T) @ q, canonical_rgrad(q, g), rtol=0, atol=1e-13)
    torch.testing.assert_close(landing_field(q, g, lam), canonical_rgrad(q, g), rtol=0, atol=1e-13)


def test_safe_step_keeps_the_factor_in_the_safe_region() -> None:
    """‖X̃ᵀX̃ − I‖_F ≤ ε for every step in (0, η*] (the bound of the landing module), on points
    at every distance d < ε, gradients and λ over 4 decades; outside the region d decreases."""
    gen = torch.Generator().manual_seed(1)
    eps = 0.5
    ratios = []
    for trial in range(200):
        d0 = 0.9 * torch.rand((), generator=gen).item()
        x = near_stiefel(20, 4, d0, gen)
        d = float(landing_distance(x))
        if d >= 0.95:
            continue
        scale = 10 ** (4 * torch.rand((), generator=gen).item() - 2)  # seeded: deterministic
        g = torch.randn(20, 4, dtype=F64, generator=gen) * scale
        lam = 10 ** (3 * torch.rand((), generator=gen).item() - 1.5)
        eta = float(landing_safe_step(x, g, lam, eps))
        field = landing_field(x, g, lam)
        for frac in (0.1, 0.5, 1.0):
            d_new = float(landing_distance(x - frac * eta * field))
            if d <= eps:
                assert d_new <= eps + 1e-12, (trial, d, d_new)
            else:
                assert d_new < d, (trial, d, d_new)
        if d <= eps:  # how far is η* from the largest step that stays within ε (bisection)?
            lo, hi = eta, 64 * eta
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (mid, hi) if float(landing_distance(x - mid * field)) <= eps else (lo, mid)
            ratios.append(eta / lo)
    assert len(ratios) > 50
    assert min(ratios) > 0.02  # conservative, not vacuous: measured min 0.044, median 0.58


def test_safe_step_errors() -> None:
    x = torch.eye(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="landing_lambda > 0"):
        landing_safe_step(x, x, 0.0, 0.5)
    with pytest.raises(ValueError, match="safe_eps must be in"):
        landing_safe_step(x, x, 1.0, 1.0)
    with pytest.raises(ValueError, match="too far from the Stiefel manifold"):
        landing_safe_step(2 * x, x, 1.0, 0.5)
    assert float(landing_safe_step(x, torch.zeros_like(x), 1.0, 0.5)) == 0.5  # Λ = 0: 1/(2λ)


# --- planted problem ------------------------------------------------------------------------------
def planted(dtype=F64, *, init: str = "polar", seed: int = 0, m: int = 14, n: int = 10, r: int = 3):
    """A bias-free linear layer adapted with rank r and the target ΔW* = T (rank r, ‖T‖₂ = 1)."""
    g = torch.Generator().manual_seed(seed)
    T = torch.randn(m, r, dtype=F64, generator=g) @ torch.randn(r, n, dtype=F64, generator=g)
    T = T / torch.linalg.matrix_norm(T, 2)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n, m, bias=False))
    nn.init.zeros_(model[0].weight)
    model = model.to(dtype)
    inject_three_factor(model, r=r, alpha=r, init=init, seed=seed)
    return model, T.to(dtype)


def loss_of(layer: ThreeFactorLinear, T: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((layer.delta_weight(torch.float32 if T.dtype != F64 else F64) - T) ** 2).sum()


def train(opt, layer, T, steps: int, track: bool = False) -> tuple[float, float]:
    dmax = 0.0
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(layer, T.to(torch.float32) if T.dtype == torch.bfloat16 else T)
        loss.backward()
        opt.step()
        if track:
            dmax = max(dmax, float(landing_distance(layer.lora_U.detach().to(F64))))
            dmax = max(dmax, float(landing_distance(layer.lora_V.detach().to(F64))))
    return loss.item(), dmax


def authors_landing(param: torch.Tensor, grad: torch.Tensor, lam: float) -> torch.Tensor:
    """The authors' landing callback, re-implemented: orient tall, form the n×n skew matrix
    G = ∇ Xᵀ − X ∇ᵀ, return G X + λ X (XᵀX − I) in the parameter's orientation."""
    wide = param.shape[1] > param.shape[0]
    X, D = (param.T, grad.T) if wide else (param, grad)
    G = D @ X.T
    G = G - G.T
    out = G @ X + lam * X @ (X.T @ X - torch.eye(X.shape[1], dtype=X.dtype))
    return out.T if wide else out


def test_agrees_with_the_authors_update() -> None:
    """The authors' loop (lora_B (out, r), lora_S (r, r), lora_A (r, in); landing field replaces
    the gradients of A and B; torch.optim.AdamW, weight decay 0) and PoLAR follow the same ΔW."""
    model, T = planted(init="stella", seed=3)
    layer = model[0]
    B = layer.lora_U.detach().clone().requires_grad_(True)
    S = layer.lora_S.detach().clone().requires_grad_(True)
    A = layer.lora_V.detach().T.clone().requires_grad_(True)
    ref = torch.optim.AdamW([B, S, A], lr=1e-2, weight_decay=0.0)
    opt = PoLAR(lora_param_groups(model), lr=1e-2, landing_lambda=0.3)
    for _ in range(30):
        ref.zero_grad()
        (0.5 * ((layer.scaling * B @ S @ A - T) ** 2).sum()).backward()
        with torch.no_grad():
            B.grad = authors_landing(B, B.grad, 0.3)
            A.grad = authors_landing(A, A.grad, 0.3)
        ref.step()
        train(opt, layer, T, 1)
    torch.testing.assert_close(layer.lora_U, B, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.lora_V, A.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.lora_S, S, rtol=0, atol=1e-12)


@pytest.mark.parametrize("direction,lr,steps", [("adam", 4e-3, 1500), ("sgd", 0.2, 400)])
def test_converges_on_a_planted_problem_near_the_manifold(direction: str, lr: float, steps: int):
    model, T = planted()
    layer = model[0]
    opt = PoLAR(lora_param_groups(model), lr=lr, direction=direction)
    loss, dmax = train(opt, layer, T, steps, track=True)
    assert loss < 1e-8  # measured: adam 4.5e-11, sgd 8.9e-12
    assert dmax < 0.2  # measured: adam 0.073, sgd 0.011
    for X in (layer.lora_U, layer.lora_V):
        assert float(landing_distance(X.detach())) < 1e-4


def test_sgd_landing_never_leaves_the_safe_region() -> None:
    """The landing theory: started within ‖XᵀX − I‖_F ≤ ε, the safe step keeps every iterate
    there, even at learning rates where the plain step would leave it."""
    for lr, eps in ((0.3, 0.5), (1.0, 0.2)):
        model, T = planted(init="stella", seed=4)
        layer = model[0]
        opt = PoLAR(
            lora_param_groups(model), lr=lr, direction="sgd", landing_lambda=1.0, safe_eps=eps
        )
        _, dmax = train(opt, layer, 3 * T, 300, track=True)
        assert dmax <= eps + 1e-12
    # without the cap the same run leaves the region
    model, T = planted(init="stella", seed=4)
    opt = PoLAR(lora_param_groups(model), lr=1.0, direction="sgd", safe_eps=None)
    with torch.no_grad(), pytest.raises((ValueError, FloatingPointError, AssertionError)):
        for _ in range(300):
            with torch.enable_grad():
                opt.zero_grad()
                loss_of(model[0], 3 * T).backward()
            opt.step()
            assert float(landing_distance(model[0].lora_U)) <= 0.2


def test_landing_attracts_to_the_manifold_without_gradient() -> None:
    """With a zero loss gradient the field is λ X (XᵀX − I): the factors land."""
    model, _ = planted(init="stella")
    layer = model[0]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.lora_U.add_(0.1 * torch.randn(layer.lora_U.shape, dtype=F64, generator=gen))
    d0 = float(landing_distance(layer.lora_U.detach()))
    assert 0.2 < d0 < 0.9
    for direction, lr, steps in (("sgd", 0.5, 50), ("adam", 4e-3, 300)):
        m = copy.deepcopy(model)
        opt = PoLAR(lora_param_groups(m), lr=lr, direction=direction)
        for _ in range(steps):
            opt.zero_grad()
            (0.0 * m[0].delta_weight().sum()).backward()
            opt.step()
        assert float(landing_distance(m[0].lora_U.detach())) < 0.01 * d0


def test_sgd_landing_is_orthogonally_equivariant() -> None:
    """(X O₁, O₁ᵀ Θ O₂, Y O₂) gives the same ΔW trajectory with direction='sgd' (ψ, d and the
    safe step are invariant); element-wise Adam is not."""
    gen = torch.Generator().manual_seed(6)
    O1, O2 = (qf(torch.randn(3, 3, dtype=F64, generator=gen)) for _ in range(2))
    for direction, equivariant in (("sgd", True), ("adam", False)):
        model, T = planted(init="stella", seed=7)
        with torch.no_grad():
            model[0].lora_S.add_(0.5 * torch.randn(3, 3, dtype=F64, generator=gen))
        twin = copy.deepcopy(model)
        with torch.no_grad():
            U, S, V = twin[0].adapter_parameters()
            U.copy_(U @ O1)
            S.copy_(O1.T @ S @ O2)
            V.copy_(V @ O2)
        opts = [PoLAR(lora_param_groups(m), lr=0.05, direction=direction) for m in (model, twin)]
        for _ in range(20):
            for m, o in zip((model, twin), opts):
                train(o, m[0], T, 1)
        dev = float((model[0].delta_weight() - twin[0].delta_weight()).detach().abs().max())
        assert (dev < 1e-12) if equivariant else (dev > 1e-6), (direction, dev)


# --- optimizer mechanics --------------------------------------------------------------------------
def test_exact_state_dict_resume() -> None:
    model, T = planted(init="stella", seed=8)
    opt = PoLAR(lora_param_groups(model), lr=1e-2, weight_decay=0.1)
    train(opt, model[0], T, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(opt, model[0], T, 5)
    resumed, _ = planted(init="polar", seed=8)
    resumed.load_state_dict(saved_model)
    opt2 = PoLAR(lora_param_groups(resumed), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved_opt)
    train(opt2, resumed[0], T, 5)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    st = opt2.state[resumed[0].lora_U]
    assert int(st["step"]) == 10 and st["exp_avg_V"].shape == (10, 3)


@pytest.mark.parametrize("init", ["polar", "stella"])
def test_degenerate_starts_train_without_nan(init: str) -> None:
    """S = 0 (PoLAR's init: no gradient reaches X, Y at first) and S with repeated entries."""
    model, T = planted(torch.float32, init=init)
    if init == "stella":
        with torch.no_grad():
            model[0].lora_S.fill_(1.0)  # rank-one S
    opt = PoLAR(lora_param_groups(model), lr=1e-2)
    first = loss_of(model[0], T).item()
    loss, dmax = train(opt, model[0], T, 400, track=True)
    assert loss == loss and loss < 0.05 * first
    assert dmax < 0.5  # measured: 0.39 from the rank-one S, 0.12 from S = 0


def test_bf16_parameters_keep_fp32_state() -> None:
    ref, T = planted(torch.float32, seed=9)
    model, _ = planted(torch.bfloat16, seed=9)
    losses = []
    for m in (ref, model):
        opt = PoLAR(lora_param_groups(m), lr=1e-2)
        losses.append(train(opt, m[0], T, 400)[0])
        st = opt.state[m[0].lora_U]
        assert st["exp_avg_U"].dtype == torch.float32 and st["exp_avg_sq_S"].dtype == torch.float32
    assert model[0].lora_U.dtype == torch.bfloat16
    assert losses[1] < 1e-2 and losses[0] < 1e-3  # measured: bf16 2e-4, fp32 2e-6


def test_ordinary_groups_get_adamw_and_validation() -> None:
    model, T = planted()
    head = nn.Linear(3, 3).double()
    groups = lora_param_groups(model) + [{"params": list(head.parameters())}]
    opt = PoLAR(groups, lr=1e-2)
    w = head.weight.detach().clone()
    ref = torch.optim.AdamW([w.requires_grad_()], lr=1e-2, weight_decay=0.01)
    for _ in range(3):
        opt.zero_grad()
        ref.zero_grad()
        (loss_of(model[0], T) + (head.weight**2).sum()).backward()
        (w**2).sum().backward()
        opt.step()
        ref.step()
    torch.testing.assert_close(head.weight, w, rtol=0, atol=0)
    pair = {"params": [torch.zeros(4, 2), torch.zeros(2, 3)], "lora_pair": True, "name": "p"}
    with pytest.raises(ValueError, match="not LoRA pairs"):
        PoLAR([pair])
    g = lora_param_groups(model)
    with pytest.raises(ValueError, match="landing_lambda"):
        PoLAR(g, landing_lambda=0.0)
    with pytest.raises(ValueError, match="direction"):
        PoLAR(g, direction="muon")
    with pytest.raises(ValueError, match="safe_eps"):
        PoLAR(g, safe_eps=1.5)
    with pytest.raises(ValueError, match="no robust start"):
        PoLAR(g, robust_steps=10)
    bad = dict(g[0], params=[g[0]["params"][0], torch.zeros(2, 2, dtype=F64), g[0]["params"][2]])
    with pytest.raises(ValueError, match="rank mismatch"):
        PoLAR([bad])
    opt = PoLAR(lora_param_groups(model))
    model[0].lora_U.grad = torch.full_like(model[0].lora_U, float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()
