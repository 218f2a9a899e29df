"""The shared optimizer machinery: AdamW path, batching, state_dict, groups, validation."""

import copy

import pytest
import torch

from geolora.optim import AdamS

f64 = torch.float64


def make_model(dtype=f64, seed=0, shapes=((9, 3, 7), (9, 3, 7), (5, 2, 6))):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i, (mm, rr, nn_) in enumerate(shapes):
        B = torch.nn.Parameter(torch.randn(mm, rr, dtype=dtype, generator=g))
        A = torch.nn.Parameter(torch.randn(rr, nn_, dtype=dtype, generator=g))
        pairs.append((f"layer{i}", B, A))
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=dtype, generator=g))
    bias = torch.nn.Parameter(torch.randn(4, dtype=dtype, generator=g))
    targets = [torch.randn(p[1].shape[0], p[2].shape[1], dtype=dtype, generator=g) for p in pairs]
    return pairs, [w, bias], targets


def groups(pairs, others):
    gs = [{"params": [B, A], "lora_pair": True, "name": nm} for nm, B, A in pairs]
    gs.append({"params": others})
    return gs


def loss_fn(pairs, others, targets):
    loss = sum(0.5 * ((B @ A - T) ** 2).sum() for (_, B, A), T in zip(pairs, targets))
    w, b = others
    return loss + ((w.sum(1) + b - 1.0) ** 2).sum()


def train(opt, pairs, others, targets, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(pairs, others, targets).backward()
        opt.step()


def assert_follows_adamw(opt, ref_opt, pairs, others, others_ref, targets, steps):
    """Train ``opt`` on the model and ``ref_opt`` (a ``torch.optim.AdamW``) on copies
    ``others_ref`` of the ordinary parameters under the same loss: they must agree to 1e-12."""
    for _ in range(steps):
        opt.zero_grad()
        ref_opt.zero_grad()
        loss_fn(pairs, others, targets).backward()
        w, b = others_ref
        ((w.sum(1) + b - 1.0) ** 2).sum().backward()
        opt.step()
        ref_opt.step()
    for p, q in zip(others, others_ref):
        assert (p - q).abs().max().item() < 1e-12


def test_ordinary_params_follow_torch_adamw_exactly():
    pairs, others, targets = make_model()
    others_ref = [p.detach().clone().requires_grad_() for p in others]
    opt = AdamS(groups(pairs, others), lr=1e-2, robust_steps=0, other_weight_decay=0.05)
    ref = torch.optim.AdamW(others_ref, lr=1e-2, weight_decay=0.05, foreach=False)
    assert_follows_adamw(opt, ref, pairs, others, others_ref, targets, steps=15)


def test_batched_equals_per_pair_reference():
    pairs1, others1, targets = make_model()
    pairs2, others2, _ = make_model()
    o1 = AdamS(groups(pairs1, others1), lr=1e-2, robust_steps=3, foreach=True)
    o2 = AdamS(groups(pairs2, others2), lr=1e-2, robust_steps=3, foreach=False)
    train(o1, pairs1, others1, targets, 12)
    train(o2, pairs2, others2, targets, 12)
    for (_, B1, A1), (_, B2, A2) in zip(pairs1, pairs2):
        assert (B1 - B2).abs().max() < 1e-12 and (A1 - A2).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, f64])
@pytest.mark.parametrize("low_memory", [False, True])
def test_state_dict_resume_is_bitwise(dtype, low_memory):
    pairs, others, targets = make_model(dtype)
    opt = AdamS(groups(pairs, others), lr=1e-2, robust_steps=2, low_memory=low_memory)
    train(opt, pairs, others, targets, 5)
    snap_params = [p.detach().clone() for _, B, A in pairs for p in (B, A)] + [
        p.detach().clone() for p in others
    ]
    sd = copy.deepcopy(opt.state_dict())
    train(opt, pairs, others, targets, 5)
    final = [p.detach().clone() for _, B, A in pairs for p in (B, A)] + [
        p.detach().clone() for p in others
    ]

    pairs2, others2, _ = make_model(dtype)
    params2 = [p for _, B, A in pairs2 for p in (B, A)] + others2
    with torch.no_grad():
        for p, v in zip(params2, snap_params):
            p.copy_(v)
    opt2 = AdamS(groups(pairs2, others2), lr=1e-2, robust_steps=2, low_memory=low_memory)
    opt2.load_state_dict(sd)
    train(opt2, pairs2, others2, targets, 5)
    for p, q in zip(params2, final):
        assert torch.equal(p.detach(), q)


def test_add_param_group_and_zero_grad():
    pairs, others, targets = make_model()
    opt = AdamS(groups(pairs[:1], others), lr=1e-2, robust_steps=0)
    nm, B, A = pairs[1]
    opt.add_param_group({"params": [B, A], "lora_pair": True, "name": nm, "lr": 5e-3})
    assert opt.param_groups[-1]["lr"] == 5e-3 and opt.param_groups[-1]["betas"] == (0.9, 0.999)
    loss_fn(pairs, others, targets).backward()
    opt.step()
    assert "exp_avg_sq" in opt.state[B]
    opt.zero_grad()
    assert B.grad is None and A.grad is None
    loss_fn(pairs, others, targets).backward()
    opt.zero_grad(set_to_none=False)
    assert B.grad is not None and torch.count_nonzero(B.grad) == 0


def test_zero_init_uses_robust_start_and_never_nans():
    g = torch.Generator().manual_seed(0)
    B = torch.nn.Parameter(torch.zeros(10, 3, dtype=f64))
    A = torch.nn.Parameter(torch.randn(3, 8, dtype=f64, generator=g))
    T = torch.randn(10, 3, dtype=f64, generator=g) @ torch.randn(3, 8, dtype=f64, generator=g)
    opt = AdamS([{"params": [B, A], "lora_pair": True, "name": "l"}], lr=1e-2, robust_steps=0)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = 0.5 * ((B @ A - T) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.05 * losses[0]
    # the pair left the AdamW phase once it had full rank
    assert opt.state[B]["full_rank"] is True and opt.state[B]["step"] > 0


def test_validation_errors_name_the_problem():
    pairs, others, _ = make_model()
    nm, B, A = pairs[0]
    with pytest.raises(ValueError, match="rank mismatch"):
        AdamS([{"params": [B, pairs[2][2]], "lora_pair": True, "name": "bad"}])
    with pytest.raises(ValueError, match="exactly two"):
        AdamS([{"params": [B], "lora_pair": True, "name": "bad"}])
    with pytest.raises(ValueError, match="unknown option"):
        AdamS([{"params": [B, A], "lora_pair": True, "nme": "typo"}])
    with pytest.raises(ValueError, match="invalid lr"):
        AdamS([{"params": [B, A], "lora_pair": True}], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamS([{"params": [B, A], "lora_pair": True}], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="unknown option"):
        AdamS([{"params": [B, A], "lora_pair": True}], foo=1)
    opt = AdamS([{"params": [B, A], "lora_pair": True, "name": "layer0"}], robust_steps=0)
    B.grad = torch.full_like(B, float("nan"))
    A.grad = torch.zeros_like(A)
    before = B.detach().clone()
    with pytest.raises(FloatingPointError, match="layer0.lora_B"):
        opt.step()
    assert torch.equal(B.detach(), before) and len(opt.state) == 0


def test_ordinary_group_own_adamw_settings_are_honoured():
    """A plain group's weight_decay/betas (torch style) drive its AdamW, like torch.optim.AdamW."""
    pairs, others, targets = make_model()
    ref = [p.detach().clone().requires_grad_() for p in others]
    gs = groups(pairs, [])[:-1] + [{"params": others, "weight_decay": 0.5, "betas": (0.8, 0.99)}]
    opt = AdamS(gs, lr=1e-2, robust_steps=0)
    tref = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.5, betas=(0.8, 0.99), foreach=False)
    assert_follows_adamw(opt, tref, pairs, others, ref, targets, steps=5)


@pytest.mark.parametrize("foreach", [True, False])
def test_changed_group_hyperparameters_take_effect_between_steps(foreach):
    """The per-group hyperparameter key is cached: assigning ``group["lr"]`` (a schedule) must
    still reach the next step — here lr = 0 freezes one of two batched same-shape pairs while
    the other keeps moving, and ``foreach`` (batched) equals the per-pair path."""
    runs = []
    for fe in (foreach, False):
        pairs, others, targets = make_model()
        opt = AdamS(groups(pairs, others), lr=1e-2, robust_steps=0, foreach=fe)
        train(opt, pairs, others, targets, 3)
        opt.param_groups[1]["lr"] = 0.0
        frozen = [p.detach().clone() for p in pairs[1][1:]]
        moving = [p.detach().clone() for p in pairs[0][1:]]
        train(opt, pairs, others, targets, 3)
        assert all(torch.equal(a, b) for a, b in zip(frozen, pairs[1][1:]))
        assert not any(torch.equal(a, b) for a, b in zip(moving, pairs[0][1:]))
        opt.param_groups[1]["lr"] = 1e-2
        train(opt, pairs, others, targets, 2)
        assert not torch.equal(frozen[0], pairs[1][1])
        runs.append([p.detach() for _, B, A in pairs for p in (B, A)])
    for a, b in zip(*runs):
        assert (a - b).abs().max().item() < 1e-12
