"""Save and load the LoRA factors of a model as safetensors (never pickle).

File layout: one tensor per factor, keys ``"<module>.lora_A"`` ``(r, in)`` and
``"<module>.lora_B"`` ``(out, r)``; the safetensors metadata entry ``"geolora"`` is a JSON
string::

    {"format": "geolora-lora", "format_version": 1, "geolora_version": "...",
     "modules": {"<module>": {"r", "alpha", "in_features", "out_features", "dtype",
                              "dropout"}, ...},
     "target_names": [...],          # last name component of the adapted modules
     "extra": {...},                 # the caller's extra_metadata
     "sha256": "...",                # over the canonical "modules" JSON and every tensor
     "hmac_sha256": "..."}           # only with save_lora(..., key=...): see below

:func:`load_lora` checks the file, the metadata, the checksum and every shape against the
model before it writes anything, and reports problems as ``ValueError`` naming the key.

The SHA-256 is unkeyed: it detects corruption (a truncated or bit-flipped file, an edited
tensor), not tampering — whoever edits the file can recompute it. ``save_lora(..., key=k)``
adds an HMAC-SHA256 (RFC 2104) under the secret ``k`` over the whole header (every entry but the
HMAC itself) and every tensor; ``load_lora(..., key=k)`` verifies it before anything else is
trusted. A signed file loaded without a key, an unsigned file loaded with one, or a wrong key
raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from importlib import metadata as importlib_metadata
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from geolora.lora.layers import LoRALinear, lora_modules

__all__ = ["LoRALoadResult", "load_lora", "lora_state_dict", "read_lora_file", "save_lora"]

FORMAT = "geolora-lora"
FORMAT_VERSION = 1
_META_KEY = "geolora"
_INT_FIELDS = ("r", "in_features", "out_features")


class LoRALoadResult(NamedTuple):
    """What :func:`load_lora` did: modules loaded, model modules absent from the file
    (``missing``) and file modules absent from the model (``unexpected``)."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]


def _key(module_name: str, factor: str) -> str:
    return f"{module_name}.{factor}" if module_name else factor


def _geolora_version() -> str:
    try:
        return importlib_metadata.version("geolora")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


_HMAC_KEY = "hmac_sha256"


def _update_tensors(h: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Feed each tensor's key, dtype, shape and bytes to the hash ``h``, in key order."""
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"\0{key}\0{_dtype_name(t.dtype)}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _digest(modules_meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the canonical ``modules`` JSON and of each tensor's key, dtype, shape, bytes."""
    h = hashlib.sha256(json.dumps(modules_meta, sort_keys=True).encode())
    _update_tensors(h, tensors)
    return h.hexdigest()


def _key_bytes(key: bytes | str | None) -> bytes | None:
    """``key`` as bytes (``str`` is UTF-8 encoded); ``None`` stays ``None``."""
    if key is None:
        return None
    if isinstance(key, str):
        key = key.encode()
    if not isinstance(key, bytes | bytearray):
        raise TypeError(f"key must be bytes or str, got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty")
    return bytes(key)


def _hmac(key: bytes, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """HMAC-SHA256 under ``key`` of the canonical header JSON (without the HMAC entry) and of
    every tensor (as :func:`_digest`)."""
    body = {k: v for k, v in header.items() if k != _HMAC_KEY}
    h = hmac.new(key, json.dumps(body, sort_keys=True).encode(), hashlib.sha256)
    _update_tensors(h, tensors)
    return h.hexdigest()


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.lora_A": A, "<module>.lora_B": B}`` (detached, sharing storage)."""
    out = {}
    for name, module in lora_modules(model).items():
        out[_key(name, "lora_A")] = module.lora_A.detach()
        out[_key(name, "lora_B")] = module.lora_B.detach()
    return out


def _module_meta(module: LoRALinear) -> dict[str, Any]:
    """The file metadata of an adapter module (any with ``adapter_parameters()``)."""
    return {
        "r": module.r,
        "alpha": module.alpha,
        "in_features": module.in_features,
        "out_features": module.out_features,
        "dtype": _dtype_name(module.adapter_parameters()[0].dtype),
        "dropout": module.dropout_p,
    }


def save_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    extra_metadata: dict[str, Any] | None = None,
    *,
    key: bytes | str | None = None,
) -> None:
    """Write the LoRA factors of ``model`` and their configuration to a safetensors file.

    ``extra_metadata`` must be JSON-serializable; it is stored under ``"extra"``. The file is
    written to a temporary name and renamed, so an interrupted save leaves no partial file.
    ``key`` (bytes, or a str taken as UTF-8) adds an HMAC-SHA256 of the header and the tensors
    under that secret, which :func:`load_lora` then requires (module docstring).
    """
    key_bytes = _key_bytes(key)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRALinear modules; nothing to save")
    if extra_metadata is not None and not isinstance(extra_metadata, dict):
        raise TypeError(f"extra_metadata must be a dict, got {type(extra_metadata).__name__}")
    tensors = {k: t.to("cpu").contiguous().clone() for k, t in lora_state_dict(model).items()}
    modules_meta = {name: _module_meta(m) for name, m in modules.items()}
    _write_file(path, FORMAT, tensors, modules_meta, extra_metadata, key_bytes)


def _write_file(
    path: str | os.PathLike[str],
    fmt: str,
    tensors: dict[str, torch.Tensor],
    modules_meta: dict[str, Any],
    extra_metadata: dict[str, Any] | None,
    key: bytes | None = None,
) -> None:
    """Write ``tensors`` with the ``geolora`` header of format ``fmt`` (module metadata, target
    names, ``extra``, checksum, and the HMAC under ``key`` if given) to ``path`` atomically
    (temporary name, then rename)."""
    header = {
        "format": fmt,
        "format_version": FORMAT_VERSION,
        "geolora_version": _geolora_version(),
        "modules": modules_meta,
        "target_names": sorted({name.rpartition(".")[2] for name in modules_meta}),
        "extra": extra_metadata or {},
        "sha256": _digest(modules_meta, tensors),
    }
    try:
        text = json.dumps(header, sort_keys=True)
    except (TypeError, ValueError) as err:
        raise TypeError(f"extra_metadata is not JSON-serializable: {err}") from err
    if key is not None:
        header[_HMAC_KEY] = _hmac(key, header, tensors)
        text = json.dumps(header, sort_keys=True)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={_META_KEY: text, "format": "pt"})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _fail(path: str, message: str) -> ValueError:
    return ValueError(f"{path}: {message}")


def _read_container(
    path: str, fmt: str, key: bytes | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Open a geolora safetensors adapter file and parse its ``geolora`` metadata: a
    safetensors file (pickles are refused, never unpickled), the format ``fmt``, the HMAC
    against ``key`` (a signed file needs the key, an unsigned one refuses a key), the
    :data:`FORMAT_VERSION`, a non-empty ``modules`` object. Returns ``(tensors, header)``."""
    if os.path.isdir(path):
        raise IsADirectoryError(
            f"{path} is a directory, not a LoRA file: pass the .safetensors file that was saved"
        )
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such LoRA file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            file_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        with open(path, "rb") as fh:
            magic = fh.read(2)
        hint = (
            " It looks like a pickle / torch.save file, which is never unpickled."
            if magic[:2] == b"PK" or magic[:1] == b"\x80"
            else ""
        )
        raise _fail(
            path, f"not a valid safetensors file ({type(err).__name__}: {err}).{hint}"
        ) from err
    if _META_KEY not in file_meta:
        raise _fail(path, f"no {_META_KEY!r} metadata entry: not a file written by save_lora")
    try:
        header = json.loads(file_meta[_META_KEY])
    except json.JSONDecodeError as err:
        raise _fail(path, f"the {_META_KEY!r} metadata is not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != fmt:
        raise _fail(path, f"metadata format is not {fmt!r}")
    _check_hmac(path, header, tensors, key)
    if header.get("format_version") != FORMAT_VERSION:
        raise _fail(
            path,
            f"unsupported format_version {header.get('format_version')!r} "
            f"(this geolora reads {FORMAT_VERSION})",
        )
    modules_meta = header.get("modules")
    if not isinstance(modules_meta, dict) or not modules_meta:
        raise _fail(path, "metadata 'modules' is missing or empty")
    return tensors, header


def _check_hmac(
    path: str, header: dict[str, Any], tensors: dict[str, torch.Tensor], key: bytes | None
) -> None:
    """``ValueError`` unless the file's HMAC and ``key`` agree (both absent is fine)."""
    signed = header.get(_HMAC_KEY)
    if signed is None and key is None:
        return
    if signed is None:
        raise _fail(path, "a key was given but the file carries no HMAC (saved without key=)")
    if key is None:
        raise _fail(path, "the file is signed with an HMAC key; pass key= to load it")
    if not (isinstance(signed, str) and hmac.compare_digest(signed, _hmac(key, header, tensors))):
        raise _fail(
            path,
            "HMAC mismatch: wrong key, or the file was modified after it was signed",
        )


def _check_digest(path: str, header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """The header's ``sha256`` must be the checksum of its module metadata and the tensors."""
    if header.get("sha256") != _digest(header["modules"], tensors):
        raise _fail(
            path,
            "checksum mismatch: the tensors or the module metadata were modified "
            "after saving (file tampered with or corrupted)",
        )


def _check_module_tensors(
    path: str,
    tensors: dict[str, torch.Tensor],
    modules_meta: dict[str, Any],
    shapes_of: Any,
) -> None:
    """Validate each module's metadata (positive integer ``r``, ``in_features``,
    ``out_features``; positive ``alpha``) and that the file holds exactly the floating-point
    tensors ``shapes_of(name, meta) -> {key: shape}`` describes."""
    expected = set()
    for name, meta in modules_meta.items():
        if not isinstance(meta, dict):
            raise _fail(path, f"metadata of module {name!r} is not an object")
        for field in _INT_FIELDS:
            value = meta.get(field)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise _fail(
                    path,
                    f"metadata of module {name!r}: {field}={value!r} is not a positive integer",
                )
        alpha = meta.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not alpha > 0:
            raise _fail(path, f"metadata of module {name!r}: alpha={alpha!r} is not positive")
        for key, shape in shapes_of(name, meta).items():
            expected.add(key)
            if key not in tensors:
                raise _fail(path, f"tensor {key!r} described in the metadata is missing")
            t = tensors[key]
            if tuple(t.shape) != shape:
                raise _fail(
                    path, f"tensor {key!r} has shape {tuple(t.shape)}, metadata says {shape}"
                )
            if not t.is_floating_point():
                raise _fail(path, f"tensor {key!r} has non-floating dtype {t.dtype}")
    extra_keys = sorted(set(tensors) - expected)
    if extra_keys:
        raise _fail(path, f"tensors not described in the metadata: {extra_keys[:5]}")


def read_lora_file(
    path: str | os.PathLike[str], *, key: bytes | str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a file written by :func:`save_lora` without touching any model.

    Returns ``(tensors, header)`` (tensors on CPU). Checks: a safetensors file (pickles are
    refused, never unpickled), a ``geolora`` metadata entry of the right format, the HMAC
    against ``key`` (a signed file needs the key, an unsigned one refuses a key), exactly the
    keys its ``modules`` describe, shapes ``(r, in)`` / ``(out, r)``, and the checksum.
    """
    key_bytes = _key_bytes(key)
    path = os.fspath(path)
    tensors, header = _read_container(path, FORMAT, key_bytes)
    modules_meta = header["modules"]

    _check_module_tensors(
        path,
        tensors,
        modules_meta,
        lambda name, meta: {
            _key(name, "lora_A"): (meta["r"], meta["in_features"]),
            _key(name, "lora_B"): (meta["out_features"], meta["r"]),
        },
    )
    _check_digest(path, header, tensors)
    return tensors, header


def _match_modules(
    path: str,
    modules: dict[str, nn.Module],
    file_modules: dict[str, dict[str, Any]],
    strict: bool,
    fields: tuple[str, ...] = (*_INT_FIELDS, "alpha"),
) -> tuple[list[str], list[str], list[str]]:
    """``(common, missing, unexpected)`` module names of a load, after checking that ``strict``
    holds, that some module is common, that none of them is merged and that each metadata
    ``field`` equals the module's attribute."""
    missing = [n for n in modules if n not in file_modules]
    unexpected = [n for n in file_modules if n not in modules]
    if strict and (missing or unexpected):
        raise _fail(
            path,
            f"modules do not match the model (strict=True): missing from the file "
            f"{missing[:5]}, unexpected in the file {unexpected[:5]}",
        )
    common = [n for n in modules if n in file_modules]
    if not common:
        raise _fail(
            path,
            f"no LoRA module of the file matches the model (file has {sorted(file_modules)[:5]})",
        )
    for name in common:
        module, meta = modules[name], file_modules[name]
        if module.merged:
            raise ValueError(f"LoRA module {name!r} is merged; unmerge it before loading")
        for field in fields:
            if meta[field] != getattr(module, field):
                raise _fail(
                    path,
                    f"module {name!r}: {field}={meta[field]!r} in the file but "
                    f"{getattr(module, field)!r} in the model",
                )
    return common, missing, unexpected


def load_lora(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    *,
    key: bytes | str | None = None,
) -> LoRALoadResult:
    """Load factors saved by :func:`save_lora` into the LoRA modules of ``model``.

    Everything is validated before the first write: the file (:func:`read_lora_file`), then
    for each module present in both the file and the model ``r``, ``in_features``,
    ``out_features`` and ``alpha`` (``alpha`` sets the function ``s B A``, so it must agree
    too), and that no module is merged. ``strict`` requires the file and the model to hold
    the same set of modules; with ``strict=False`` the common ones are loaded and the rest
    reported in the result. Factors are copied into the model's device and dtype. ``key``: the
    HMAC secret the file was saved with (required for a signed file, refused for an unsigned
    one).

    Raises:
        ValueError: any mismatch or bad file (HMAC included); the message names the module / key.
        FileNotFoundError: ``path`` does not exist.
        IsADirectoryError: ``path`` is a directory.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRALinear modules; call inject_lora before load_lora")
    tensors, header = read_lora_file(path, key=key)
    path = os.fspath(path)
    common, missing, unexpected = _match_modules(path, modules, header["modules"], strict)
    with torch.no_grad():
        for name in common:
            module = modules[name]
            module.lora_A.copy_(tensors[_key(name, "lora_A")])
            module.lora_B.copy_(tensors[_key(name, "lora_B")])
    return LoRALoadResult(loaded=common, missing=missing, unexpected=unexpected)
