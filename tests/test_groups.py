"""lora_param_groups on geolora LoRALinear models, peft models and bare named parameters."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tiny_models import tiny_bert
from torch import nn

from geolora.lora import inject_lora, lora_modules, mark_only_lora_trainable
from geolora.optim.groups import lora_param_groups


def geolora_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6), nn.Linear(6, 2))
    inject_lora(model, ["0", "2"], r=3, alpha=12)
    mark_only_lora_trainable(model, keep=["3"])
    return model


def peft_bert():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"])
    return get_peft_model(tiny_bert(), config)


def test_geolora_pairs_and_other_group() -> None:
    model = geolora_model()
    groups = lora_param_groups(model, lr=1e-3, other_lr=1e-2, other_weight_decay=0.1)
    assert [g["name"] for g in groups] == ["0", "2", "other"]
    for g, m in zip(groups, lora_modules(model).values()):
        assert g["lora_pair"] is True and g["scaling"] == 4.0 and g["lr"] == 1e-3
        b, a = g["params"]
        assert b is m.lora_B and a is m.lora_A and "adapter" not in g
    other = groups[-1]
    assert "lora_pair" not in other and other["lr"] == 1e-2 and other["weight_decay"] == 0.1
    assert other["params"] == [model[3].weight, model[3].bias]
    # frozen base weights appear nowhere
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert all(id(p) not in in_groups for p in model.parameters() if not p.requires_grad)
    # torch optimizers accept the groups as they are
    torch.optim.AdamW(groups).step()


def test_named_params_default_scaling_and_determinism() -> None:
    model = geolora_model()
    groups = lora_param_groups(model.named_parameters())
    assert [g["scaling"] for g in groups if g.get("lora_pair")] == [1.0, 1.0]
    assert "lr" not in groups[0] and "lr" not in groups[-1]
    again = lora_param_groups(dict(model.named_parameters()))
    assert [g["name"] for g in again] == [g["name"] for g in groups]
    assert all(
        [id(p) for p in g1["params"]] == [id(p) for p in g2["params"]]
        for g1, g2 in zip(groups, again)
    )


def test_peft_tiny_bert() -> None:
    model = peft_bert()
    groups = lora_param_groups(model, lr=2e-4)
    pairs = [g for g in groups if g.get("lora_pair")]
    assert len(pairs) == 6 and len(groups) == 6  # peft froze everything else
    names = [g["name"] for g in pairs]
    expected = [
        n for n, m in model.named_modules() if n.endswith(("query", "value", "intermediate.dense"))
    ]
    assert names == expected  # model order
    for g in pairs:
        module = model.get_submodule(g["name"])
        b, a = g["params"]
        assert g["adapter"] == "default" and g["scaling"] == 2.0 and g["lr"] == 2e-4
        assert b is module.lora_B["default"].weight and a is module.lora_A["default"].weight
        hidden = 32 if g["name"].endswith("intermediate.dense") else 16
        assert b.shape == (hidden, 4) and a.shape == (4, 16)
    # the pooler made trainable lands in the ordinary group
    model.base_model.model.pooler.dense.weight.requires_grad_(True)
    groups = lora_param_groups(model)
    assert groups[-1]["name"] == "other"
    assert groups[-1]["params"] == [model.base_model.model.pooler.dense.weight]


def test_peft_multiple_adapters() -> None:
    from peft import LoraConfig

    model = peft_bert()
    model.add_adapter(
        "second", LoraConfig(r=2, lora_alpha=6, target_modules=["query"], use_rslora=True)
    )
    for n, p in model.named_parameters():
        if ".second." in n:
            p.requires_grad_(True)
    groups = lora_param_groups(model)
    assert len(groups) == 8
    second = [g for g in groups if g["adapter"] == "second"]
    assert len(second) == 2
    for g in second:
        assert g["name"].endswith("attention.self.query")
        assert g["scaling"] == pytest.approx(6 / math.sqrt(2), rel=1e-15)
        assert g["params"][0].shape == (16, 2) and g["params"][1].shape == (2, 16)
    only = lora_param_groups(model, adapter="second")
    assert [g["adapter"] for g in only] == ["second", "second"]
    assert len(lora_param_groups(model, adapter=["default", "second"])) == 8
    with pytest.raises(ValueError, match="nope"):
        lora_param_groups(model, adapter="nope")


def test_missing_partner_and_bad_input() -> None:
    a = nn.Parameter(torch.zeros(3, 12))
    b = nn.Parameter(torch.zeros(10, 3))
    with pytest.raises(ValueError, match=r"'layer\.lora_A' has no trainable lora_B"):
        lora_param_groups([("layer.lora_A", a)])
    with pytest.raises(ValueError, match=r"'m\.lora_B\.x\.weight' has no trainable lora_A"):
        lora_param_groups([("m.lora_B.x.weight", b), ("m.lora_A.y.weight", a)], adapter="x")
    frozen = nn.Parameter(torch.zeros(10, 3), requires_grad=False)
    with pytest.raises(ValueError, match="missing or frozen"):
        lora_param_groups([("layer.lora_A", a), ("layer.lora_B", frozen)])
    with pytest.raises(ValueError, match="rank mismatch"):
        lora_param_groups([("l.lora_A", a), ("l.lora_B", nn.Parameter(torch.zeros(10, 2)))])
    with pytest.raises(ValueError, match="2-D"):
        lora_param_groups([("c.lora_A", nn.Parameter(torch.zeros(3, 4, 1, 1)))])
    # a peft convolution factor is a pair factor: alone, it lacks its partner
    with pytest.raises(ValueError, match="'c.lora_A.d.weight' has no trainable lora_B partner"):
        lora_param_groups([("c.lora_A.d.weight", nn.Parameter(torch.zeros(3, 4, 1, 1)))])
    with pytest.raises(TypeError, match="'w'"):
        lora_param_groups([("w", 3.0)])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="other_lr"):
        lora_param_groups([("l.lora_A", a), ("l.lora_B", b)], other_lr=-1.0)
    groups = lora_param_groups([("lora_A", a), ("lora_B", b), ("lora_A", a)])
    assert groups == [{"params": [b, a], "lora_pair": True, "scaling": 1.0, "name": ""}]


# --- peft layers beyond nn.Linear ---------------------------------------------------------------


class _Mixed(nn.Module):
    """An embedding, a Conv1d, a Conv2d and a linear head: every peft LoRA layer kind."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv1 = nn.Conv1d(6, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Linear(6, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (batch, seq, 6)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.conv2(h.unsqueeze(1)).mean(1)
        return self.head(h).mean(1)


def _peft_mixed(targets: list[str], **kw):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False, **kw)
    return get_peft_model(_Mixed().to(torch.float64), config)


def test_peft_embedding_lora_is_a_pair_with_the_geolora_orientation() -> None:
    """``[lora_embedding_B, lora_embedding_A]`` is a pair ``X = B A`` with peft's update
    ``ΔW = s Xᵀ``: autograd's gradients are ``∇_B = ∇_X Aᵀ``, ``∇_A = Bᵀ∇_X`` for
    ``∇_X = s (∇_W f)ᵀ`` (``∇_W``: the gradient of the embedding table)."""
    from geolora.optim import AdamS

    model = _peft_mixed(["emb", "head"])
    groups = lora_param_groups(model)
    emb = model.base_model.model.emb
    (pair,) = [g for g in groups if g.get("lora_pair") and g["name"].endswith("emb")]
    B, A = pair["params"]
    assert B is emb.lora_embedding_B["default"] and A is emb.lora_embedding_A["default"]
    assert B.shape == (6, 2) and A.shape == (2, 20)
    assert pair["scaling"] == emb.scaling["default"] == 3.0
    emb.base_layer.weight.requires_grad_(True)
    ids = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(1))
    model(ids).pow(2).sum().backward()
    G = pair["scaling"] * emb.base_layer.weight.grad.T  # ∇_X, (6, 20)
    assert torch.allclose(B.grad, G @ A.detach().T, rtol=1e-12, atol=1e-14)
    assert torch.allclose(A.grad, B.detach().T @ G, rtol=1e-12, atol=1e-14)
    emb.base_layer.weight.requires_grad_(False)
    # and the pair trains as one (its X moves, the geolora step takes it)
    X0 = (B @ A).detach().clone()
    AdamS(lora_param_groups(model), lr=1e-2, robust_steps=0).step()
    assert not torch.allclose(B @ A, X0)


def test_peft_conv_lora_is_a_pair_of_matrix_views() -> None:
    """peft Conv1d/Conv2d LoRA: ``lora_B (out, r, 1, ...)`` and ``lora_A (r, in, k, ...)`` form a
    pair as they are (no copies), ``ΔW = s B A`` is the kernel update, autograd's gradients have
    the pair form on the matrix views, and a pair optimizer trains them."""
    from geolora.optim import AdamS

    model = _peft_mixed(["conv1", "conv2", "head"])
    groups = lora_param_groups(model)
    pairs = {g["name"].rpartition(".")[2]: g for g in groups if g.get("lora_pair")}
    assert sorted(pairs) == ["conv1", "conv2", "head"]
    for name, dim in (("conv1", 3), ("conv2", 4)):
        B, A = pairs[name]["params"]
        layer = getattr(model.base_model.model, name)
        assert B is layer.lora_B["default"].weight and A is layer.lora_A["default"].weight
        assert B.dim() == A.dim() == dim and B.shape[1] == A.shape[0] == 2
        assert all(s == 1 for s in B.shape[2:])
    ids = torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(2))
    model(ids).pow(2).sum().backward()
    conv2 = model.base_model.model.conv2
    B, A = pairs["conv2"]["params"]
    Bm, Am = B.detach().view(B.shape[0], -1), A.detach().view(A.shape[0], -1)
    # ∇_B = ∇_X Aᵀ and ∇_A = Bᵀ ∇_X for the matrix views: their cross products agree.
    gB, gA = B.grad.view(Bm.shape), A.grad.view(Am.shape)
    assert torch.allclose(Bm.T @ gB, gA @ Am.T, rtol=1e-10, atol=1e-12)
    before = [t.detach().clone() for t in (B, A)]
    AdamS(groups, lr=1e-2, robust_steps=0).step()
    assert B.shape == before[0].shape and not torch.equal(B.detach(), before[0])
    assert conv2.lora_B["default"].weight is B  # trained in place, same parameter


def test_dora_magnitude_is_ordinary_with_a_warning() -> None:
    from peft import LoraConfig, get_peft_model

    from geolora.optim.groups import UnsupportedLoRAWarning

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], use_dora=True))
    with pytest.warns(UnsupportedLoRAWarning, match="DoRA magnitude") as rec:
        groups = lora_param_groups(model)
    assert "0.lora_magnitude_vector.default" in str(rec[0].message)
    assert sum(bool(g.get("lora_pair")) for g in groups) == 2
    mags = [p for n, p in model.named_parameters() if "magnitude" in n]
    assert len(mags) == 2 and all(any(p is q for q in groups[-1]["params"]) for p in mags)


def test_other_peft_tuners_and_variants_are_refused() -> None:
    """LoHa, AdaLoRA (``lora_E``) and an unlisted LoRA variant raise naming the parameter;
    an unknown ``lora_*`` name among bare named parameters too."""
    from peft import AdaLoraConfig, LoHaConfig, LoraConfig, get_peft_model

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))

    loha = get_peft_model(net(), LoHaConfig(r=2, target_modules=["0"]))
    with pytest.raises(ValueError, match=r"0\.hada_w1_a\.default': an adapter parameter of peft"):
        lora_param_groups(loha)
    ada = get_peft_model(net(), AdaLoraConfig(r=2, target_modules=["0"], total_step=10))
    with pytest.raises(ValueError, match=r"0\.lora_E\.default"):
        lora_param_groups(ada)
    lora = get_peft_model(net(), LoraConfig(r=2, target_modules=["0", "1"]))

    class SomeVariant:  # stands for a peft variant whose forward is not lora_B(lora_A(x))
        pass

    lora.base_model.model[1].lora_variant["default"] = SomeVariant()
    with pytest.raises(ValueError, match=r"1\.lora_A\.default\.weight': peft LoRA variant Some"):
        lora_param_groups(lora)
    a, e = nn.Parameter(torch.zeros(2, 5)), nn.Parameter(torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"'m\.lora_E\.x'"):
        lora_param_groups([("m.lora_A.x.weight", a), ("m.lora_E.x", e)])


def test_named_params_embedding_pair() -> None:
    B, A = nn.Parameter(torch.zeros(6, 2)), nn.Parameter(torch.zeros(2, 20))
    (g,) = lora_param_groups([("e.lora_embedding_A.d", A), ("e.lora_embedding_B.d", B)])
    assert g["params"][0] is B and g["params"][1] is A and g["adapter"] == "d"
