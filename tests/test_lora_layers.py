"""LoRALinear, inject_lora, merge/unmerge and the initialization strategies."""

from __future__ import annotations

import copy
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_bert
from torch import nn

from geolora.lora import (
    INIT_STRATEGIES,
    LoRALinear,
    disable_lora,
    init_lora_,
    inject_lora,
    lora_modules,
    mark_only_lora_trainable,
    merge_lora,
    spectral_init_,
    unmerge_lora,
)


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)




# ----------------------------------------------------------------------------- layer


def test_forward_is_base_plus_low_rank_update_float64() -> None:
    lin = nn.Linear(12, 9).double()
    layer = LoRALinear(
        lin, r=3, alpha=6.0, init="gaussian", generator=torch.Generator().manual_seed(1)
    )
    assert layer.scaling == 2.0 and layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (9, 3)
    x = torch.randn(5, 4, 12, dtype=torch.float64)
    w_eff = lin.weight + 2.0 * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(
        layer.delta_weight(), 2.0 * layer.lora_B @ layer.lora_A, rtol=0, atol=0
    )
    torch.testing.assert_close(layer(x), F.linear(x, w_eff, lin.bias), rtol=1e-13, atol=1e-13)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad
    assert "r=3" in repr(layer) and "scaling=2" in repr(layer)


def test_zero_init_forward_equals_base_exactly() -> None:
    model = mlp()
    base = copy.deepcopy(model)
    names = inject_lora(model, r=4, alpha=8, seed=0)
    assert names == ["0", "2"]
    x = torch.randn(7, 12, dtype=torch.float64)
    assert torch.equal(model(x), base(x))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float64, 1e-13)])
def test_merge_unmerge_exact(dtype: torch.dtype, tol: float) -> None:
    model = mlp(dtype)
    inject_lora(model, r=4, alpha=8, init="gaussian", seed=3)
    for m in lora_modules(model).values():
        init_lora_(m, "gaussian", std=0.5, generator=torch.Generator().manual_seed(7))
    w0 = {n: m.base.weight.detach().clone() for n, m in lora_modules(model).items()}
    x = torch.randn(8, 12, dtype=dtype)
    y = model(x)
    merge_lora(model)
    merge_lora(model)  # idempotent
    for name, m in lora_modules(model).items():
        assert m.merged and "merged=True" in repr(m)
        assert (m.base.weight - w0[name]).abs().max() > 0.1  # ΔW really folded in
        # merged forward uses the base layer only
        assert torch.equal(m(x[:, : m.in_features]), m.base(x[:, : m.in_features]))
    torch.testing.assert_close(model(x), y, rtol=tol, atol=tol)
    unmerge_lora(model)
    unmerge_lora(model)
    for name, m in lora_modules(model).items():
        assert not m.merged
        assert (m.base.weight - w0[name]).abs().max() <= tol
    torch.testing.assert_close(model(x), y, rtol=tol, atol=tol)


def test_bf16_base_and_mixed_dtypes() -> None:
    ref = mlp(torch.float32)
    inject_lora(ref, r=3, init="gaussian", seed=0)
    for m in lora_modules(ref).values():
        init_lora_(m, "gaussian", std=0.3, generator=torch.Generator().manual_seed(0))
    x = torch.randn(6, 12)
    y_ref = ref(x)
    for lora_dtype in (None, torch.float32):
        model = copy.deepcopy(ref)
        for m in lora_modules(model).values():
            m.base.to(torch.bfloat16)
            if lora_dtype is None:
                m.lora_A.data = m.lora_A.data.bfloat16()
                m.lora_B.data = m.lora_B.data.bfloat16()
        y = model(x.bfloat16())
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.05)
    bf = mlp(torch.bfloat16)
    inject_lora(bf, r=2, seed=0)
    assert all(m.lora_A.dtype == torch.bfloat16 for m in lora_modules(bf).values())
    bf32 = mlp(torch.bfloat16)
    inject_lora(bf32, r=2, seed=0, dtype=torch.float32)
    assert all(m.lora_B.dtype == torch.float32 for m in lora_modules(bf32).values())
    assert bf32(torch.randn(2, 12).bfloat16()).dtype == torch.bfloat16


def test_to_and_compile() -> None:
    model = mlp(torch.float32)
    inject_lora(model, r=2, init="gaussian", seed=0)
    model = model.to(torch.float64)
    assert all(m.lora_A.dtype == torch.float64 for m in lora_modules(model).values())
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile unavailable")
    x = torch.randn(4, 12, dtype=torch.float64)
    compiled = torch.compile(model, backend="eager")
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=0, atol=0)
    y.square().sum().backward()
    assert all(
        m.lora_A.grad is not None and m.lora_B.grad is not None
        for m in lora_modules(model).values()
    )


def test_dropout_train_vs_eval() -> None:
    model = mlp()
    inject_lora(model, r=2, dropout=0.5, init="gaussian", seed=0)
    x = torch.randn(16, 12, dtype=torch.float64)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_seed_is_reproducible_and_leaves_global_rng() -> None:
    a, b = mlp(), mlp()
    state = torch.get_rng_state()
    inject_lora(a, r=3, init="gaussian", seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    inject_lora(b, r=3, init="gaussian", seed=11)
    for ma, mb in zip(lora_modules(a).values(), lora_modules(b).values()):
        assert torch.equal(ma.lora_A, mb.lora_A) and torch.equal(ma.lora_B, mb.lora_B)


def test_disable_lora_context() -> None:
    model = mlp()
    base = copy.deepcopy(model)
    inject_lora(model, r=2, init="gaussian", seed=0)
    x = torch.randn(3, 12, dtype=torch.float64)
    y = model(x)
    with disable_lora(model):
        assert torch.equal(model(x), base(x))
    assert torch.equal(model(x), y)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        with disable_lora(model):
            pass


# ----------------------------------------------------------------------------- injection


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(6, 6)
        self.q_proj = nn.Linear(6, 6)
        self.block = nn.ModuleDict({"q": nn.Linear(6, 6), "k_proj": nn.Linear(6, 3)})
        self.attn = nn.MultiheadAttention(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block["q"](self.q_proj(self.q(x)))
        h = self.attn(h, h, h, need_weights=False)[0]
        return self.block["k_proj"](h)


def test_target_matching_rules() -> None:
    assert inject_lora(Named(), ["q"], r=2) == ["q", "block.q"]
    assert inject_lora(Named(), {"q"}, r=2) == ["q", "block.q"]
    assert inject_lora(Named(), r".*_proj", r=2, exclude=["out_proj"]) == ["q_proj", "block.k_proj"]
    assert inject_lora(Named(), "all-linear", r=2, exclude=["k_proj"]) == ["q", "q_proj", "block.q"]
    model = Named()
    # all-linear skips the MultiheadAttention out_proj, which reads its weight directly
    assert inject_lora(model, r=2) == ["q", "q_proj", "block.q", "block.k_proj"]
    model(torch.randn(4, 1, 6))
    # a second injection does not wrap the wrapped bases again
    with pytest.raises(ValueError, match="all-linear"):
        inject_lora(model, r=2)


def test_shared_module_wrapped_once() -> None:
    lin = nn.Linear(5, 5)
    model = nn.Sequential(lin, nn.Tanh(), lin)
    assert inject_lora(model, r=2) == ["0"]
    assert model[0] is model[2] and isinstance(model[0], LoRALinear)


def test_injection_errors_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="empty"):
        inject_lora(Named(), [])
    with pytest.raises(ValueError, match="nomatch"):
        inject_lora(Named(), ["nomatch"])
    with pytest.raises(ValueError, match=r"ne\.\*"):
        inject_lora(Named(), "ne.*")
    with pytest.raises(ValueError, match="r must be positive"):
        inject_lora(Named(), r=0)
    model = Named()
    with pytest.raises(ValueError, match="block.k_proj"):
        inject_lora(model, r=4)  # k_proj is 6 -> 3
    assert lora_modules(model) == {}  # validated before any replacement
    with pytest.raises(ValueError, match="attn.out_proj"):
        inject_lora(Named(), ["out_proj"], r=2)
    with pytest.raises(ValueError, match="alpha"):
        inject_lora(Named(), r=2, alpha=0.0)
    with pytest.raises(ValueError, match="dropout"):
        inject_lora(Named(), r=2, dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        inject_lora(Named(), r=2, init="nope")
    with pytest.raises(TypeError, match="target"):
        inject_lora(Named(), 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model itself"):
        inject_lora(nn.Linear(4, 4), r=2)


def test_mark_only_lora_trainable_keep() -> None:
    model = mlp()
    inject_lora(model, ["0"], r=2)
    mark_only_lora_trainable(model, keep=["2"])
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["0.lora_A", "0.lora_B", "2.bias", "2.weight"]


def test_tiny_bert_injection() -> None:
    model = tiny_bert().eval()
    base = copy.deepcopy(model)
    names = inject_lora(model, ["query", "value"], r=4, alpha=8, seed=0)
    assert len(names) == 4 and all(n.endswith((".query", ".value")) for n in names)
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids).last_hidden_state, base(input_ids=ids).last_hidden_state
        )
    assert len(inject_lora(tiny_bert().eval(), r=2)) == 13
    assert len(inject_lora(tiny_bert().eval(), r=2, exclude=["pooler.dense"])) == 12
    # merge exactness on the transformer as a whole
    for m in lora_modules(model).values():
        init_lora_(m, "gaussian", std=0.2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(input_ids=ids).last_hidden_state
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, y, rtol=1e-5, atol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, y, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- init


def test_init_strategy_properties() -> None:
    g = torch.Generator().manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 192).double(), r=16, alpha=32)  # zero
    assert torch.count_nonzero(layer.lora_B) == 0
    assert layer.lora_A.abs().max() <= 1 / math.sqrt(256)
    assert layer.lora_A.std().item() == pytest.approx(1 / math.sqrt(3 * 256), rel=0.05)
    init_lora_(layer, "orthogonal", generator=g)
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(layer.lora_A @ layer.lora_A.T, eye, rtol=0, atol=1e-12)
    assert torch.count_nonzero(layer.lora_B) == 0
    init_lora_(layer, "stiefel", generator=g)
    torch.testing.assert_close(layer.lora_B.T @ layer.lora_B, eye, rtol=0, atol=1e-12)
    assert torch.count_nonzero(layer.lora_A) == 0
    init_lora_(layer, "gaussian", std=0.01, generator=g)
    x = torch.randn(512, 256, generator=g, dtype=torch.float64)
    out = F.linear(x, layer.delta_weight())
    assert out.std().item() == pytest.approx(layer.scaling * 0.01, rel=0.1)
    assert INIT_STRATEGIES["both"] is INIT_STRATEGIES["gaussian"] is INIT_STRATEGIES["biased"]
    with pytest.raises(ValueError, match="std"):
        init_lora_(layer, "zero", std=0.1)
    with pytest.raises(ValueError, match="std"):
        init_lora_(layer, "gaussian", std=-1.0)


def regression_problem():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    x = torch.randn(64, 8, dtype=torch.float64)
    with torch.no_grad():
        y = teacher(x)
    student = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    return student, (x, y)


def mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


@pytest.mark.parametrize("init", ["zero", "gaussian", "orthogonal", "stiefel", "spectral"])
def test_init_strategies_train(init: str) -> None:
    model, batch = regression_problem()
    inject_lora(model, r=2, alpha=4, init="zero" if init == "spectral" else init, seed=0)
    if init == "spectral":
        spectral_init_(model, mse, batch, gamma=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = mse(model, batch)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.9 * losses[0]
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 15


def test_spectral_init_formula_float64() -> None:
    model, batch = regression_problem()
    base = copy.deepcopy(model)
    inject_lora(model, r=2, alpha=6, init="gaussian", seed=0)  # nonzero before: gradient at base
    w0 = {n: m.base.weight.detach().clone() for n, m in lora_modules(model).items()}
    gamma = 0.3
    sv = spectral_init_(model, mse, batch, gamma=gamma)
    grads = torch.autograd.grad(mse(base, batch), [base[0].weight, base[2].weight])
    for (name, m), grad in zip(lora_modules(model).items(), grads):
        u, s, vh = torch.linalg.svd(-grad)
        expected = gamma * (u[:, :2] * s[:2]) @ vh[:2]
        torch.testing.assert_close(m.delta_weight(), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(sv[name], s[:2], rtol=1e-12, atol=0)
        # balanced factors: BᵀB = A Aᵀ = (γ/s) S_r
        torch.testing.assert_close(m.lora_B.T @ m.lora_B, m.lora_A @ m.lora_A.T, rtol=0, atol=1e-12)
        assert torch.equal(m.base.weight, w0[name])
        assert m.base.weight.grad is None and not m.base.weight.requires_grad
        assert m.lora_A.grad is None
    # one truncated gradient step with a small γ decreases the loss
    small = copy.deepcopy(model)
    spectral_init_(small, mse, batch, gamma=1e-3)
    assert mse(small, batch) < mse(base, batch)


def test_spectral_init_errors() -> None:
    model, batch = regression_problem()
    with pytest.raises(ValueError, match="inject_lora"):
        spectral_init_(model, mse, batch)
    inject_lora(model, r=2)
    with pytest.raises(ValueError, match="gamma"):
        spectral_init_(model, mse, batch, gamma=0.0)
    with pytest.raises(ValueError, match="'0'"):
        spectral_init_(
            model, lambda m, b: m[2](torch.randn(3, 16, dtype=torch.float64)).sum(), batch
        )
    with pytest.raises(ValueError, match="scalar"):
        spectral_init_(model, lambda m, b: m(b[0]), batch)
    assert not any(m.base.weight.requires_grad for m in lora_modules(model).values())
