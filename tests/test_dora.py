"""DoRA (peft ``use_dora=True``): magnitude groups in lora_param_groups, every zoo optimizer on
DoRA models with ordinary magnitudes, and InvariantDoRA (product geometry (B, A)/GL(r) × R^m):
gauge invariance of the (X, μ) trajectory, the magnitude step, equivalence with AdamS on plain
pairs, resume, zero init and bf16."""

from __future__ import annotations

import copy
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optim_zoo import ZOO, ZooEntry, zoo_ids  # noqa: E402

from geolora.checks import random_gl  # noqa: E402
from geolora.optim import AdamS, InvariantDoRA, lora_param_groups  # noqa: E402
from geolora.optim.dora import magnitude_adam_update  # noqa: E402

F64 = torch.float64


def dora_mlp(dtype=torch.float32, *, full_rank_b: bool = False, seed: int = 0, dora: bool = True):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], use_dora=dora)
    model = get_peft_model(base, config).to(dtype)  # peft keeps adapters in fp32 otherwise
    if full_rank_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=F64).to(dtype))
                if "lora_magnitude_vector" in name:  # any positive magnitudes
                    p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g, dtype=F64).to(dtype))
    return model


def data(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return torch.randn(64, 12, generator=g, dtype=F64).to(dtype), torch.randn(
        64, 6, generator=g, dtype=F64
    ).to(dtype)


def train(model, opt, steps: int, x, y) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def lora_products(model) -> list[torch.Tensor]:
    """``X = B A`` of every adapted module and the magnitudes, in a fixed order."""
    named = dict(model.named_parameters())
    out = []
    for key in ("0", "2"):
        pre = f"base_model.model.{key}."
        B, A = named[pre + "lora_B.default.weight"], named[pre + "lora_A.default.weight"]
        out += [(B @ A).detach(), named[pre + "lora_magnitude_vector.default.weight"].detach()]
    return out


# --- groups ---------------------------------------------------------------------------------------
def test_magnitude_groups() -> None:
    model = dora_mlp()
    ordinary = lora_param_groups(model)
    assert [len(g["params"]) for g in ordinary] == [2, 2, 2]  # pairs, then the magnitudes
    assert ordinary[-1]["name"] == "other" and all(p.dim() == 1 for p in ordinary[-1]["params"])
    linked = lora_param_groups(model, dora="linked", lr=1e-3)
    assert [(g["name"][-1], "lora_pair" in g, g.get("dora_magnitude")) for g in linked] == [
        ("0", True, None),
        ("0", False, True),
        ("2", True, None),
        ("2", False, True),
    ]
    assert linked[1]["adapter"] == "default" and linked[1]["lr"] == 1e-3
    assert linked[1]["params"][0].shape == (10,)
    with pytest.raises(ValueError, match="dora must be one of"):
        lora_param_groups(model, dora="joint")
    named = {"m.lora_magnitude_vector.default.weight": nn.Parameter(torch.ones(4))}
    with pytest.raises(ValueError, match="has no trainable LoRA pair"):
        lora_param_groups(named, dora="linked")
    named.update(
        {
            "m.lora_A.default.weight": nn.Parameter(torch.ones(2, 3)),
            "m.lora_B.default.weight": nn.Parameter(torch.ones(5, 2)),
        }
    )
    with pytest.raises(ValueError, match=r"expected \(5,\), the output size"):
        lora_param_groups(named, dora="linked")


@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_every_zoo_optimizer_trains_a_dora_model(entry: ZooEntry) -> None:
    """Magnitudes as ordinary parameters (the default groups): each optimizer's own rule for the
    pairs, AdamW for the magnitudes, from peft's zero-initialised B."""
    model = dora_mlp()
    x, y = data()
    mags = [p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n]
    opt = entry.factory(lora_param_groups(model), lr=1e-2, robust_steps=5)
    losses = train(model, opt, 40, x, y)
    assert all(v == v for v in losses) and losses[-1] < 0.9 * losses[0], losses[::10]
    now = [p.detach() for n, p in model.named_parameters() if "magnitude" in n]
    assert all(not torch.equal(a, b) for a, b in zip(mags, now))


# --- InvariantDoRA --------------------------------------------------------------------------------
def test_gauge_invariance_of_the_x_and_magnitude_trajectory() -> None:
    """From (B, A, μ) and (B R, R⁻¹ A, μ) (cond(R) = 100) the X = B A and μ trajectories
    coincide to 1e-10 in float64; AdamW's part at the first step."""
    model = dora_mlp(F64, full_rank_b=True)
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(3)
    named = dict(twin.named_parameters())
    with torch.no_grad():
        for key in ("0", "2"):
            pre = f"base_model.model.{key}."
            B, A = named[pre + "lora_B.default.weight"], named[pre + "lora_A.default.weight"]
            R = random_gl(3, B, cond=100.0, generator=gen)
            B.copy_(B @ R)
            A.copy_(torch.linalg.solve(R, A))
    x, y = data(F64)
    for kind, invariant in (("dora", True), ("adamw", False)):
        a, b = copy.deepcopy(model), copy.deepcopy(twin)
        if kind == "dora":
            opts = [
                InvariantDoRA(lora_param_groups(m, dora="linked"), lr=1e-2, robust_steps=0)
                for m in (a, b)
            ]
        else:
            opts = [
                torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                for m in (a, b)
            ]
        worst = 0.0
        for _ in range(15):
            train(a, opts[0], 1, x, y)
            train(b, opts[1], 1, x, y)
            for u, v in zip(lora_products(a), lora_products(b)):
                worst = max(worst, float((u - v).norm() / u.norm()))
        if invariant:
            assert worst < 1e-10, worst
        else:
            assert worst > 1e-4, worst


def test_magnitude_step_formulas() -> None:
    gen = torch.Generator().manual_seed(4)
    mu = 1 + torch.rand(6, dtype=F64, generator=gen)
    grads = [torch.randn(6, dtype=F64, generator=gen) for _ in range(3)]
    # euclidean: torch.optim.AdamW on μ, bit for bit
    ref = mu.clone().requires_grad_(True)
    torch_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.05, foreach=False)
    state = (mu.clone(), torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64))
    for k, g in enumerate(grads, 1):
        ref.grad = g
        torch_opt.step()
        hp = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
        state = magnitude_adam_update(*state[:1], g, *state[1:], step=k, metric="euclidean", **hp)
    assert torch.equal(state[0], ref.detach())
    # log: Adam on u = log μ with gradient μ ⊙ ∇_μ f, then μ = exp(u)
    u = mu.log().clone().requires_grad_(True)
    torch_opt = torch.optim.AdamW([u], lr=0.1, weight_decay=0.0, foreach=False)
    state = (mu.clone(), torch.zeros(6, dtype=F64), torch.zeros(6, dtype=F64))
    for k, g in enumerate(grads, 1):
        u.grad = u.detach().exp() * g
        torch_opt.step()
        hp = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}
        state = magnitude_adam_update(state[0], g, *state[1:], step=k, metric="log", **hp)
    torch.testing.assert_close(state[0], u.detach().exp(), rtol=1e-15, atol=0)


def test_log_metric_keeps_magnitudes_positive() -> None:
    x, y = data()
    for metric in ("euclidean", "log"):
        model = dora_mlp(full_rank_b=True)
        groups = lora_param_groups(model, dora="linked")
        opt = InvariantDoRA(groups, lr=0.5, robust_steps=0, magnitude_metric=metric)
        train(model, opt, 30, x, 50 * y)  # a target that pulls some magnitudes through zero
        mins = min(float(g["params"][0].detach().min()) for g in groups if g.get("dora_magnitude"))
        assert (mins > 0) if metric == "log" else (mins < 0), (metric, mins)
    with torch.no_grad():
        groups[1]["params"][0][0] = -1.0
    opt = InvariantDoRA(groups, lr=0.5, robust_steps=0, magnitude_metric="log")
    with pytest.raises(ValueError, match="needs positive magnitudes"):
        train(model, opt, 1, x, y)


def test_plain_pairs_are_trained_exactly_as_adams() -> None:
    """Without magnitude groups the optimizer is AdamS (bitwise)."""
    a, b = dora_mlp(dora=False, full_rank_b=True), dora_mlp(dora=False, full_rank_b=True)
    x, y = data()
    train(a, InvariantDoRA(lora_param_groups(a), lr=1e-2, robust_steps=3), 10, x, y)
    train(b, AdamS(lora_param_groups(b), lr=1e-2, robust_steps=3), 10, x, y)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_zero_init_resume_and_bf16() -> None:
    x, y = data()
    model = dora_mlp()  # peft's B = 0: the robust start, then the invariant phase
    opt = InvariantDoRA(lora_param_groups(model, dora="linked"), lr=1e-2, robust_steps=5)
    losses = train(model, opt, 20, x, y)
    assert all(v == v for v in losses) and losses[-1] < 0.8 * losses[0]
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    train(model, opt, 5, x, y)
    resumed = dora_mlp(seed=1)
    resumed.load_state_dict(saved[0])
    opt2 = InvariantDoRA(lora_param_groups(resumed, dora="linked"), lr=1e-2, robust_steps=5)
    opt2.load_state_dict(saved[1])
    train(resumed, opt2, 5, x, y)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    bf = dora_mlp(torch.bfloat16)
    opt = InvariantDoRA(lora_param_groups(bf, dora="linked"), lr=1e-2, robust_steps=5)
    losses = train(bf, opt, 20, x.bfloat16(), y.bfloat16())
    assert losses[-1] < 0.8 * losses[0]
    mag = next(p for n, p in bf.named_parameters() if "magnitude" in n)
    assert mag.dtype == torch.bfloat16 and opt.state[mag]["exp_avg"].dtype == torch.float32


def test_validation() -> None:
    model = dora_mlp()
    groups = lora_param_groups(model, dora="linked")
    with pytest.raises(ValueError, match="no LoRA pair group of the same name"):
        InvariantDoRA([groups[1], groups[0]])
    with pytest.raises(ValueError, match="the pair's output size is 10"):
        InvariantDoRA([groups[0], dict(groups[3], name=groups[0]["name"])])
    with pytest.raises(ValueError, match="magnitude_metric"):
        InvariantDoRA(groups, magnitude_metric="spherical")
    with pytest.raises(ValueError, match="does not train 'dora_magnitude' groups"):
        AdamS(groups)  # the linked layout is for InvariantDoRA only


def test_create_optimizer_links_the_magnitudes_for_invariant_dora() -> None:
    from geolora.integrations import create_optimizer

    model = dora_mlp()
    opt = create_optimizer(model, "invariant_dora", lr=1e-2, robust_steps=1)
    kinds = [next(k for k in ("lora_pair", "dora_magnitude") if g.get(k)) for g in opt.param_groups
             if g.get("lora_pair") or g.get("dora_magnitude")]
    assert kinds == ["lora_pair", "dora_magnitude"] * 2
    x, y = data()
    losses = train(model, opt, 5, x, y)
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
