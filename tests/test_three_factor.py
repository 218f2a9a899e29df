"""Three-factor adapters ΔW = s·U S Vᵀ (PoLAR, StelLA): layer, inits, injection, parameter groups,
merge, and safetensors save/load with the LoRA file checksum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from geolora.lora import (
    ThreeFactorLinear,
    inject_lora,
    inject_three_factor,
    load_three_factor,
    lora_modules,
    merge_three_factor,
    read_three_factor_file,
    save_three_factor,
    three_factor_modules,
    three_factor_state_dict,
    unmerge_three_factor,
)
from geolora.optim import lora_param_groups

F64 = torch.float64


def mlp(dtype: torch.dtype = F64, **kw) -> nn.Sequential:
    torch.manual_seed(0)  # same base weights on every call
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)
    inject_three_factor(model, r=3, alpha=6, **{"init": "stella", "seed": 1, **kw})
    return model


def randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in three_factor_modules(model).values():
            for p in m.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype))


@pytest.mark.parametrize("diagonal", [False, True])
def test_forward_is_base_plus_three_factor_update(diagonal: bool) -> None:
    model = mlp(diagonal=diagonal)
    randomize(model, 3)
    layer = model[0]
    assert isinstance(layer, ThreeFactorLinear) and layer.lora_S.dim() == (1 if diagonal else 2)
    x = torch.randn(7, 12, dtype=F64)
    S = torch.diag(layer.lora_S) if diagonal else layer.lora_S
    delta = layer.scaling * layer.lora_U @ S @ layer.lora_V.T
    ref = x @ (layer.base.weight + delta).T + layer.base.bias
    torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-14)


def test_inits() -> None:
    eye = torch.eye(3, dtype=F64)
    polar = mlp(init="polar")[0]
    assert polar.delta_weight().abs().max() == 0
    for X in (polar.lora_U, polar.lora_V):
        torch.testing.assert_close(X.T @ X, eye, rtol=0, atol=1e-14)
    stella = mlp(init="stella")[0]
    torch.testing.assert_close(stella.lora_S, eye, rtol=0, atol=0)
    diag = mlp(init="stella", diagonal=True)[0]
    assert torch.equal(diag.lora_S, torch.ones(3, dtype=F64))
    # the same seed gives the same factors; polar and stella share the frames
    torch.testing.assert_close(polar.lora_U, stella.lora_U, rtol=0, atol=0)
    major, minor = mlp(init="svd_major")[0], mlp(init="svd_minor")[0]
    L, _, Rh = torch.linalg.svd(major.base.weight.detach())
    torch.testing.assert_close(major.lora_U, L[:, :3], rtol=0, atol=1e-12)
    torch.testing.assert_close(major.lora_V, Rh[:3].T, rtol=0, atol=1e-12)
    torch.testing.assert_close(minor.lora_V, Rh[7:10].T, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown init='nope'"):
        mlp(init="nope")


def test_injection_freezes_base_and_skips_adapted_layers() -> None:
    model = mlp()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == [f"{i}.lora_{f}" for i in (0, 2) for f in "USV"]
    # a second injection (either kind) does not wrap the adapters' base layers
    with pytest.raises(ValueError, match="already adapted \\(ThreeFactorLinear\\)"):
        inject_lora(model, r=2)
    model.append(nn.Linear(6, 4).double())
    inject_lora(model, target=["3"], r=2)
    assert list(lora_modules(model)) == ["3"] and list(three_factor_modules(model)) == ["0", "2"]
    assert [n for n, p in model.named_parameters() if p.requires_grad][-2:] == [
        "3.lora_A",
        "3.lora_B",
    ]
    with pytest.raises(ValueError, match="r=11 exceeds"):
        inject_three_factor(nn.Sequential(nn.Linear(12, 10)), r=11)


@pytest.mark.parametrize("dtype,tol", [(F64, 1e-15), (torch.float32, 1e-6)])
def test_merge_unmerge(dtype: torch.dtype, tol: float) -> None:
    model = mlp(dtype)
    randomize(model, 4)
    x = torch.randn(5, 12, dtype=dtype)
    w0 = model[0].base.weight.detach().clone()
    y = model(x)
    merge_three_factor(model)
    assert all(m.merged for m in three_factor_modules(model).values())
    torch.testing.assert_close(model(x), y, rtol=0, atol=20 * tol)
    unmerge_three_factor(model)
    torch.testing.assert_close(model[0].base.weight, w0, rtol=0, atol=tol)
    torch.testing.assert_close(model(x), y, rtol=0, atol=20 * tol)


def test_bf16_base_with_fp32_factors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10)).to(torch.bfloat16)
    inject_three_factor(model, r=3, init="stella", seed=0, dtype=torch.float32)
    assert model[0].lora_U.dtype == torch.float32
    out = model(torch.randn(4, 12, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_param_groups() -> None:
    model = mlp()
    model.append(nn.Linear(6, 2).double())  # trainable head: an ordinary parameter
    groups = lora_param_groups(model, lr=1e-3)
    assert [g["name"] for g in groups] == ["0", "2", "other"]
    g0 = groups[0]
    assert g0["lora_triple"] and g0["scaling"] == 2.0 and g0["lr"] == 1e-3
    assert [p is q for p, q in zip(g0["params"], model[0].adapter_parameters())] == [True] * 3
    assert "lora_pair" not in g0
    model[2].lora_S.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'2.lora_U' has no trainable \['lora_S'\]"):
        lora_param_groups(model)


def test_save_load_round_trip_bitwise(tmp_path: Path) -> None:
    model = mlp(torch.float32, diagonal=True)
    randomize(model, 5)
    path = tmp_path / "adapter.safetensors"
    save_three_factor(model, path, extra_metadata={"task": "test"})
    tensors, header = read_three_factor_file(path)
    assert header["format"] == "geolora-three-factor" and header["extra"] == {"task": "test"}
    assert header["modules"]["0"] == {
        "r": 3,
        "alpha": 6.0,
        "in_features": 12,
        "out_features": 10,
        "dtype": "float32",
        "dropout": 0.0,
        "diagonal": True,
    }
    assert sorted(tensors) == sorted(three_factor_state_dict(model))
    fresh = mlp(torch.float32, diagonal=True, seed=9)
    res = load_three_factor(fresh, path)
    assert res.loaded == ["0", "2"] and not res.missing and not res.unexpected
    for a, b in zip(fresh.parameters(), model.parameters()):
        assert torch.equal(a, b)
    # a model in float64 receives converted factors
    wide = mlp(F64, diagonal=True)
    load_three_factor(wide, path)
    assert torch.equal(wide[0].lora_U, model[0].lora_U.double())


def test_load_validates_before_writing(tmp_path: Path) -> None:
    model = mlp(torch.float32)
    path = tmp_path / "a.safetensors"
    save_three_factor(model, path)
    diag = mlp(torch.float32, diagonal=True, seed=7)
    before = [p.clone() for p in diag.parameters()]
    with pytest.raises(ValueError, match="diagonal=False in the file but True in the model"):
        load_three_factor(diag, path)
    assert all(torch.equal(a, b) for a, b in zip(before, diag.parameters()))
    merged = mlp(torch.float32)
    merge_three_factor(merged)
    with pytest.raises(ValueError, match="is merged"):
        load_three_factor(merged, path)
    small = nn.Sequential(nn.Linear(12, 10))
    inject_three_factor(small, r=3, alpha=6)
    with pytest.raises(
        ValueError, match=r"missing from the file \[\], unexpected in the file \['2'\]"
    ):
        load_three_factor(small, path)
    assert load_three_factor(small, path, strict=False).unexpected == ["2"]
    with pytest.raises(ValueError, match="no ThreeFactorLinear modules"):
        load_three_factor(nn.Sequential(nn.Linear(2, 2)), path)
    with pytest.raises(ValueError, match="nothing to save"):
        save_three_factor(nn.Sequential(nn.Linear(2, 2)), path)


def test_tampered_and_foreign_files(tmp_path: Path) -> None:
    model = mlp(torch.float32)
    path = tmp_path / "a.safetensors"
    save_three_factor(model, path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    bad = dict(tensors)
    bad["0.lora_S"] = bad["0.lora_S"] + 1e-3
    save_file(bad, str(tmp_path / "t.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_three_factor_file(tmp_path / "t.safetensors")
    header = json.loads(meta["geolora"])
    header["modules"]["0"]["diagonal"] = "yes"
    save_file(tensors, str(tmp_path / "d.safetensors"), metadata={"geolora": json.dumps(header)})
    with pytest.raises(ValueError, match="diagonal='yes' is not a bool"):
        read_three_factor_file(tmp_path / "d.safetensors")
    lora = nn.Sequential(nn.Linear(12, 10))
    inject_lora(lora, r=3)
    from geolora.lora import save_lora

    save_lora(lora, tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="metadata format is not 'geolora-three-factor'"):
        read_three_factor_file(tmp_path / "lora.safetensors")
    torch.save(tensors, tmp_path / "p.pt")
    with pytest.raises(ValueError, match="pickle"):
        read_three_factor_file(tmp_path / "p.pt")


@pytest.mark.parametrize("kind", ["lora", "polar", "stella", "dora"])
def test_inject_adapter_kinds(kind: str) -> None:
    from geolora.lora import inject_adapter

    def build(seed: int) -> nn.Sequential:
        torch.manual_seed(0)
        body = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6))
        model = nn.Sequential(body, nn.Linear(6, 3)).double()
        assert inject_adapter(body, kind, r=2, alpha=4, seed=seed, dtype=F64) == ["0", "2"]
        return model

    x = torch.randn(5, 8, dtype=F64)
    torch.manual_seed(0)
    plain = nn.Sequential(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 6)), nn.Linear(6, 3)
    )
    a, b = build(1), build(1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    out = a(x)
    # every method starts at the base model except StelLA (S = I: ΔW = s U Vᵀ)
    same = torch.allclose(out, plain.double()(x), rtol=0, atol=1e-12)
    assert same == (kind != "stella")
    groups = lora_param_groups(a, dora="linked")
    assert groups[-1]["name"] == "other" and len(groups[-1]["params"]) == 2  # the head trains
    sizes = {"lora": [2, 2], "polar": [3, 3], "stella": [3, 3], "dora": [2, 1, 2, 1]}[kind]
    assert [len(g["params"]) for g in groups[:-1]] == sizes
    with pytest.raises(ValueError, match="unknown adapter kind"):
        inject_adapter(nn.Sequential(nn.Linear(2, 2)), "vera")
