"""Save and load three-factor adapters (:class:`~geolora.lora.three_factor.ThreeFactorLinear`)
as safetensors, with the conventions and checksum of geolora's LoRA files (:mod:`geolora.lora.io`).

File layout: keys ``"<module>.lora_U"`` ``(out, r)``, ``"<module>.lora_S"`` ``(r, r)`` (``(r,)``
for a diagonal ``S``) and ``"<module>.lora_V"`` ``(in, r)``; the metadata entry ``"geolora"`` is
the JSON header of :mod:`geolora.lora.io` with ``"format": "geolora-three-factor"`` and, per
module, ``{"r", "alpha", "in_features", "out_features", "dtype", "dropout", "diagonal"}``; its
``sha256`` covers the canonical module metadata and every tensor. :func:`load_three_factor`
validates everything before it writes into the model.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from geolora.lora.io import (
    _INT_FIELDS,
    LoRALoadResult,
    _check_digest,
    _check_module_tensors,
    _fail,
    _key,
    _match_modules,
    _module_meta,
    _read_container,
    _write_file,
)
from geolora.lora.three_factor import ThreeFactorLinear, three_factor_modules

__all__ = [
    "load_three_factor",
    "read_three_factor_file",
    "save_three_factor",
    "three_factor_state_dict",
]

FORMAT = "geolora-three-factor"
_FACTORS = ("lora_U", "lora_S", "lora_V")


def three_factor_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_U": U, "<module>.lora_S": S, "<module>.lora_V": V}`` (detached)."""
    out = {}
    for name, module in three_factor_modules(model).items():
        for factor in _FACTORS:
            out[_key(name, factor)] = getattr(module, factor).detach()
    return out


def _three_factor_meta(module: ThreeFactorLinear) -> dict[str, Any]:
    return {**_module_meta(module), "diagonal": module.diagonal}


def _shapes(name: str, meta: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    r = meta["r"]
    return {
        _key(name, "lora_U"): (meta["out_features"], r),
        _key(name, "lora_S"): (r,) if meta.get("diagonal") else (r, r),
        _key(name, "lora_V"): (meta["in_features"], r),
    }


def save_three_factor(
    model: nn.Module, path: str | os.PathLike[str], extra_metadata: dict[str, Any] | None = None
) -> None:
    """Write the three-factor adapters of ``model`` to a safetensors file (atomically).

    ``extra_metadata`` must be JSON-serializable; it is stored under ``"extra"``.
    """
    modules = three_factor_modules(model)
    if not modules:
        raise ValueError("model has no ThreeFactorLinear modules; nothing to save")
    if extra_metadata is not None and not isinstance(extra_metadata, dict):
        raise TypeError(f"extra_metadata must be a dict, got {type(extra_metadata).__name__}")
    tensors = {
        k: t.to("cpu").contiguous().clone() for k, t in three_factor_state_dict(model).items()
    }
    modules_meta = {name: _three_factor_meta(m) for name, m in modules.items()}
    _write_file(path, FORMAT, tensors, modules_meta, extra_metadata)


def read_three_factor_file(
    path: str | os.PathLike[str],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a file written by :func:`save_three_factor` without touching a model.

    Returns ``(tensors, header)``. Checks as :func:`geolora.lora.read_lora_file`: a safetensors
    file (pickles refused), the format, ``diagonal`` a bool, exactly the keys and shapes the
    metadata describes, and the checksum.
    """
    path = os.fspath(path)
    tensors, header = _read_container(path, FORMAT)
    modules_meta = header["modules"]
    for name, meta in modules_meta.items():
        if isinstance(meta, dict) and not isinstance(meta.get("diagonal"), bool):
            raise _fail(
                path,
                f"metadata of module {name!r}: diagonal={meta.get('diagonal')!r} is not a bool",
            )
    _check_module_tensors(path, tensors, modules_meta, _shapes)
    _check_digest(path, header, tensors)
    return tensors, header


def load_three_factor(
    model: nn.Module, path: str | os.PathLike[str], strict: bool = True
) -> LoRALoadResult:
    """Load factors saved by :func:`save_three_factor` into the three-factor modules of ``model``.

    Validated before the first write: the file, then for each common module ``r``,
    ``in_features``, ``out_features``, ``alpha`` and ``diagonal``, and that no module is merged.
    ``strict`` requires the same set of modules in the file and the model. Factors are copied
    into the model's device and dtype.
    """
    modules = three_factor_modules(model)
    if not modules:
        raise ValueError(
            "model has no ThreeFactorLinear modules; call inject_three_factor before loading"
        )
    tensors, header = read_three_factor_file(path)
    path = os.fspath(path)
    fields = (*_INT_FIELDS, "alpha", "diagonal")
    common, missing, unexpected = _match_modules(path, modules, header["modules"], strict, fields)
    with torch.no_grad():
        for name in common:
            for factor in _FACTORS:
                getattr(modules[name], factor).copy_(tensors[_key(name, factor)])
    return LoRALoadResult(loaded=common, missing=missing, unexpected=unexpected)
