"""Bad input to the LoRA tooling (inject_lora, save_lora / load_lora, lora_param_groups): one
case per row of the "LoRA tooling" table of docs/bad_input.md (checked to be the same rows),
plus what the unkeyed checksum does and does not detect."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from geolora.lora import inject_lora, load_lora, read_lora_file, save_lora
from geolora.lora import io as lora_io
from geolora.optim import lora_param_groups

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_input.md"
HEADING = "## LoRA tooling"


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    inject_lora(model, r=2, alpha=4, init="gaussian", seed=0)
    return model


def _saved(tmp: Path, key: str | None = None) -> Path:
    path = tmp / "adapter.safetensors"
    save_lora(_model(), path, key=key)
    return path


def _peft(config_name: str, **kw):
    import peft

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.head = nn.Linear(2, 2)

    torch.manual_seed(0)
    return peft.get_peft_model(Net(), getattr(peft, config_name)(r=2, **kw))


@dataclass(frozen=True)
class Case:
    id: str
    input: str
    exc: type[Exception]
    excerpt: str
    run: Callable[[Path], object]

    def row(self) -> str:
        return f"| {self.id} | {self.input} | `{self.exc.__name__}` | `{self.excerpt}` |"


CASES = [
    Case(
        "inject_twice",
        "`inject_lora` on a model whose targets are already `LoRALinear`",
        ValueError,
        "selects only modules that are already adapted (LoRALinear): ['0', '2']",
        lambda tmp: inject_lora(_model(), r=2),
    ),
    Case(
        "load_directory",
        "`load_lora(model, path)` with `path` a directory",
        IsADirectoryError,
        "is a directory, not a LoRA file",
        lambda tmp: load_lora(_model(), tmp),
    ),
    Case(
        "hmac_wrong_key",
        "a file saved with `key=\"k1\"` loaded with `key=\"k2\"`",
        ValueError,
        "HMAC mismatch: wrong key, or the file was modified after it was signed",
        lambda tmp: load_lora(_model(), _saved(tmp, "k1"), key="k2"),
    ),
    Case(
        "hmac_missing_key",
        "a file saved with a key loaded without one",
        ValueError,
        "the file is signed with an HMAC key; pass key= to load it",
        lambda tmp: load_lora(_model(), _saved(tmp, "k1")),
    ),
    Case(
        "hmac_unsigned_file",
        "a file saved without a key loaded with `key=\"k1\"`",
        ValueError,
        "a key was given but the file carries no HMAC (saved without key=)",
        lambda tmp: load_lora(_model(), _saved(tmp), key="k1"),
    ),
    Case(
        "hmac_empty_key",
        "`save_lora(..., key=b\"\")`",
        ValueError,
        "key must not be empty",
        lambda tmp: save_lora(_model(), tmp / "a.safetensors", key=b""),
    ),
    Case(
        "peft_other_tuner",
        "`lora_param_groups` on a peft LoHa model",
        ValueError,
        "'base_model.model.head.hada_w1_a.default': an adapter parameter of "
        "peft.tuners.loha.layer.Linear, not a LoRA pair",
        lambda tmp: lora_param_groups(_peft("LoHaConfig", target_modules=["head"])),
    ),
    Case(
        "unsupported_mode",
        "`lora_param_groups(model, unsupported=\"ignore\")`",
        ValueError,
        "unsupported must be one of ('raise', 'ordinary'), got 'ignore'",
        lambda tmp: lora_param_groups(_model(), unsupported="ignore"),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tooling_bad_input(case: Case, tmp_path: Path) -> None:
    with pytest.raises(case.exc) as err:
        case.run(tmp_path)
    assert type(err.value) is case.exc
    assert case.excerpt in str(err.value), str(err.value)


def test_doc_table_is_the_cases() -> None:
    lines = DOC.read_text(encoding="utf-8").splitlines()
    start = lines.index(HEADING)
    section = []
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        section.append(line)
    rows = [ln for ln in section if ln.startswith("| ") and not ln.startswith(("| case", "| ---"))]
    assert rows == [c.row() for c in CASES]


def _raw(path: Path) -> tuple[dict, dict]:
    """Tensors and header of a LoRA file, unvalidated."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["geolora"])


def _rewrite(path: Path, tensors: dict, header: dict) -> None:
    save_file(tensors, str(path), metadata={"geolora": json.dumps(header), "format": "pt"})


def _tamper(path: Path) -> None:
    """Edit one tensor and recompute the unkeyed SHA-256, as anyone holding the file can."""
    tensors, header = _raw(path)
    tensors["0.lora_B"] = tensors["0.lora_B"] + 1.0
    header["sha256"] = lora_io._digest(header["modules"], tensors)
    _rewrite(path, tensors, header)


def test_checksum_detects_corruption_not_tampering_hmac_detects_both(tmp_path: Path) -> None:
    """The unkeyed SHA-256 catches a changed byte but not an edit whose author recomputed it;
    the HMAC catches both, and a signed file round-trips with its key."""
    plain = _saved(tmp_path)
    data = bytearray(plain.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last tensor
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_lora(_model(), corrupt)
    _tamper(plain)
    model = _model()
    load_lora(model, plain)  # accepted: the checksum cannot tell
    assert torch.equal(model[0].lora_B, _model()[0].lora_B + 1.0)

    signed = tmp_path / "signed"
    signed.mkdir()
    path = _saved(signed, "secret")
    model = _model()
    with torch.no_grad():
        model[0].lora_A.zero_()
    assert load_lora(model, path, key=b"secret").loaded == ["0", "2"]
    assert torch.equal(model[0].lora_A, _model()[0].lora_A)
    _tamper(path)
    with pytest.raises(ValueError, match="HMAC mismatch"):
        load_lora(_model(), path, key="secret")
    path = _saved(signed, "secret")
    tensors, header = _raw(path)
    header["extra"] = {"note": "edited"}  # the metadata is covered too
    _rewrite(path, tensors, header)
    with pytest.raises(ValueError, match="HMAC mismatch"):
        read_lora_file(path, key="secret")
