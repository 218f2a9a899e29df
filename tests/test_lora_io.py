"""save_lora / load_lora: bitwise round trip, validation, refusal of pickles."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import tiny_bert
from torch import nn

from geolora.lora import (
    init_lora_,
    inject_lora,
    load_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    read_lora_file,
    save_lora,
)


def mlp(r: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)  # same base weights for every call
    model = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6)).to(dtype)
    inject_lora(model, r=r, alpha=2 * r, init="gaussian", seed=seed)
    for i, m in enumerate(lora_modules(model).values()):
        init_lora_(m, "gaussian", std=0.3, generator=torch.Generator().manual_seed(seed + i))
    return model


def lora_bert(seed: int):
    model = tiny_bert().eval()
    inject_lora(model, ["query", "value", "dense"], r=4, alpha=8, init="gaussian", seed=seed)
    return model


def read_raw(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_roundtrip_bitwise_sequential(tmp_path: Path) -> None:
    src, dst = mlp(seed=1), mlp(seed=2)
    x = torch.randn(5, 12)
    assert not torch.equal(src(x), dst(x))
    path = tmp_path / "a.safetensors"
    save_lora(src, path, extra_metadata={"task": "demo", "step": 3})
    result = load_lora(dst, path)
    assert result.loaded == ["0", "2"] and result.missing == [] and result.unexpected == []
    assert torch.equal(src(x), dst(x))
    for k, t in lora_state_dict(src).items():
        assert torch.equal(t, lora_state_dict(dst)[k])
    tensors, header = read_lora_file(path)
    assert set(tensors) == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    assert header["modules"]["0"] == {
        "r": 3,
        "alpha": 6.0,
        "in_features": 12,
        "out_features": 10,
        "dtype": "float32",
        "dropout": 0.0,
    }
    assert header["target_names"] == ["0", "2"]
    assert header["extra"] == {"task": "demo", "step": 3}
    assert header["geolora_version"] and header["format"] == "geolora-lora"
    assert not list(tmp_path.glob("*.tmp-*"))


def test_roundtrip_bitwise_tiny_bert(tmp_path: Path) -> None:
    src, dst = lora_bert(1), lora_bert(2)
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    path = tmp_path / "bert.safetensors"
    save_lora(src, path)
    with torch.no_grad():
        y_src = src(input_ids=ids).last_hidden_state
        assert not torch.equal(y_src, dst(input_ids=ids).last_hidden_state)
        load_lora(dst, path)
        assert torch.equal(y_src, dst(input_ids=ids).last_hidden_state)
    assert read_lora_file(path)[1]["target_names"] == ["dense", "query", "value"]


def test_load_converts_dtype(tmp_path: Path) -> None:
    src, dst = mlp(), mlp(seed=5, dtype=torch.float64)
    save_lora(src, tmp_path / "a.safetensors")
    load_lora(dst, tmp_path / "a.safetensors")
    for k, t in lora_state_dict(src).items():
        assert torch.equal(t.double(), lora_state_dict(dst)[k])


def test_wrong_rank_names_module_and_leaves_model_untouched(tmp_path: Path) -> None:
    save_lora(mlp(r=3), tmp_path / "r3.safetensors")
    dst = mlp(r=2, seed=9)
    before = {k: t.clone() for k, t in lora_state_dict(dst).items()}
    with pytest.raises(ValueError, match=r"module '0': r=3 in the file but 2"):
        load_lora(dst, tmp_path / "r3.safetensors")
    for k, t in lora_state_dict(dst).items():
        assert torch.equal(t, before[k])


def test_alpha_and_shape_mismatch(tmp_path: Path) -> None:
    save_lora(mlp(), tmp_path / "a.safetensors")
    dst = mlp()
    lora_modules(dst)["2"].alpha = 1.0
    with pytest.raises(ValueError, match="module '2': alpha"):
        load_lora(dst, tmp_path / "a.safetensors")
    other = nn.Sequential(nn.Linear(12, 11), nn.Tanh(), nn.Linear(11, 6))
    inject_lora(other, r=3, alpha=6)
    with pytest.raises(ValueError, match="module '0': out_features=10 in the file but 11"):
        load_lora(other, tmp_path / "a.safetensors")


def test_missing_and_unexpected_modules(tmp_path: Path) -> None:
    src = mlp()
    save_lora(src, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    partial = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6), nn.Linear(6, 6))
    inject_lora(partial, ["0", "3"], r=3, alpha=6)
    with pytest.raises(
        ValueError, match=r"missing from the file \['3'\], unexpected in the file \['2'\]"
    ):
        load_lora(partial, tmp_path / "a.safetensors")
    result = load_lora(partial, tmp_path / "a.safetensors", strict=False)
    assert result == (["0"], ["3"], ["2"])
    assert torch.equal(lora_modules(partial)["0"].lora_A, lora_modules(src)["0"].lora_A)
    with pytest.raises(ValueError, match="call inject_lora"):
        load_lora(nn.Sequential(nn.Linear(2, 2)), tmp_path / "a.safetensors")


def test_merged_model_refused(tmp_path: Path) -> None:
    save_lora(mlp(), tmp_path / "a.safetensors")
    dst = mlp(seed=4)
    merge_lora(dst)
    with pytest.raises(ValueError, match="merged"):
        load_lora(dst, tmp_path / "a.safetensors")


def test_tampered_files(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    save_lora(mlp(), path)
    tensors, meta = read_raw(path)
    header = json.loads(meta["geolora"])

    # 1. one tensor value changed, metadata kept
    bad = dict(tensors)
    bad["2.lora_B"] = bad["2.lora_B"].clone()
    bad["2.lora_B"][0, 0] += 1e-3
    save_file(bad, tmp_path / "t1.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_lora(mlp(), tmp_path / "t1.safetensors")

    # 2. alpha edited in the metadata
    h2 = json.loads(json.dumps(header))
    h2["modules"]["0"]["alpha"] = 100.0
    save_file(tensors, tmp_path / "t2.safetensors", metadata={"geolora": json.dumps(h2)})
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_lora(mlp(), tmp_path / "t2.safetensors")

    # 3. rank in the metadata disagrees with the tensors
    h3 = json.loads(json.dumps(header))
    h3["modules"]["0"]["r"] = 2
    save_file(tensors, tmp_path / "t3.safetensors", metadata={"geolora": json.dumps(h3)})
    with pytest.raises(
        ValueError, match=r"tensor '0.lora_A' has shape \(3, 12\), metadata says \(2, 12\)"
    ):
        load_lora(mlp(), tmp_path / "t3.safetensors")

    # 4. a tensor removed / an extra tensor added
    save_file(
        {k: v for k, v in tensors.items() if k != "2.lora_A"},
        tmp_path / "t4.safetensors",
        metadata=meta,
    )
    with pytest.raises(ValueError, match="'2.lora_A' described in the metadata is missing"):
        load_lora(mlp(), tmp_path / "t4.safetensors")
    save_file({**tensors, "evil": torch.zeros(2)}, tmp_path / "t5.safetensors", metadata=meta)
    with pytest.raises(ValueError, match="evil"):
        load_lora(mlp(), tmp_path / "t5.safetensors")

    # 5. truncated file, garbage metadata, foreign safetensors file
    raw = path.read_bytes()
    (tmp_path / "t6.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_lora(mlp(), tmp_path / "t6.safetensors")
    save_file(tensors, tmp_path / "t7.safetensors", metadata={"geolora": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        load_lora(mlp(), tmp_path / "t7.safetensors")
    save_file(tensors, tmp_path / "t8.safetensors")
    with pytest.raises(ValueError, match="not a file written by save_lora"):
        load_lora(mlp(), tmp_path / "t8.safetensors")
    with pytest.raises(FileNotFoundError):
        load_lora(mlp(), tmp_path / "nope.safetensors")


class _Payload:
    """Unpickling this object creates a marker directory: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused(tmp_path: Path, writer: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    obj = {"0.lora_A": torch.zeros(3, 12), "payload": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(ValueError, match="never unpickled"):
        load_lora(mlp(), path)
    assert not marker.exists()


def test_save_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no LoRALinear"):
        save_lora(nn.Linear(2, 2), tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="extra_metadata"):
        save_lora(mlp(), tmp_path / "x.safetensors", extra_metadata={"bad": object()})
    with pytest.raises(TypeError, match="extra_metadata"):
        save_lora(mlp(), tmp_path / "x.safetensors", extra_metadata=[1])  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())
