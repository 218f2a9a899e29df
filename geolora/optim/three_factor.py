"""Parameter groups of three-factor adapters ``ΔW = s · U S Vᵀ`` (PoLAR, StelLA).

A three-factor adapter is the group ``{"params": [U, S, V], "lora_triple": True, "scaling": s,
"name": ...}`` with ``U: (m, r)``, ``S: (r, r)`` or its diagonal ``(r,)``, ``V: (n, r)``
(``m`` outputs, ``n`` inputs, ``1 ≤ r ≤ min(m, n)``); :func:`geolora.optim.lora_param_groups`
builds it for :class:`geolora.lora.ThreeFactorLinear` modules. ``U`` and ``V`` are the factors
meant to lie on Stiefel manifolds, ``S`` is Euclidean. This module validates such groups for the
optimizers that accept them (:class:`geolora.optim.PoLAR`, :func:`geolora.optim.StelLA`).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

__all__ = ["TRIPLE_KEY", "triple_labels", "validate_triple"]

TRIPLE_KEY = "lora_triple"
_FACTORS = ("lora_U", "lora_S", "lora_V")


def triple_labels(group: dict[str, Any]) -> list[str]:
    """Names of ``[U, S, V]`` for messages: the group's ``param_names`` or
    ``"<name>.lora_U"`` etc."""
    names = group.get("param_names")
    if names is not None and len(names) == 3:
        return [str(n) for n in names]
    base = group.get("name") or "<unnamed three-factor adapter>"
    return [f"{base}.{f}" for f in _FACTORS]


def validate_triple(group: dict[str, Any]) -> None:
    """``ValueError`` / ``TypeError`` naming the tensor unless ``group["params"]`` is
    ``[U (m, r), S (r, r) or (r,), V (n, r)]`` of one floating dtype and device with
    ``1 ≤ r ≤ min(m, n)`` and a finite ``scaling > 0``."""
    label = group.get("name", "<unnamed three-factor adapter>")
    params = group["params"]
    if len(params) != 3:
        raise ValueError(
            f"lora_triple group {label!r} must hold exactly three tensors [U, S, V], "
            f"got {len(params)}"
        )
    names = triple_labels(group)
    for nm, t in zip(names, params):
        if not isinstance(t, Tensor):
            raise TypeError(f"{nm} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{nm} must be floating point, got {t.dtype}")
    U, S, V = params
    for nm, t in ((names[0], U), (names[2], V)):
        if t.dim() != 2:
            raise ValueError(f"{nm} must be 2-D (rows, r), got shape {tuple(t.shape)}")
    (m, r), n = U.shape, V.shape[0]
    if V.shape[1] != r or tuple(S.shape) not in ((r, r), (r,)):
        raise ValueError(
            f"lora_triple {label!r}: rank mismatch, U is {tuple(U.shape)} (m, r), S is "
            f"{tuple(S.shape)} ((r, r) or (r,)), V is {tuple(V.shape)} (n, r)"
        )
    if r == 0 or r > min(m, n):
        raise ValueError(f"lora_triple {label!r}: rank r={r} must be in [1, min(m, n)={min(m, n)}]")
    if not (U.dtype == S.dtype == V.dtype):
        raise TypeError(f"lora_triple {label!r}: dtype mix {U.dtype}, {S.dtype}, {V.dtype}")
    if not (U.device == S.device == V.device):
        raise ValueError(f"lora_triple {label!r}: device mix {U.device}, {S.device}, {V.device}")
    s = group.get("scaling", 1.0)
    if not (isinstance(s, (int, float)) and math.isfinite(s) and s > 0):
        raise ValueError(f"lora_triple {label!r}: scaling must be a finite number > 0, got {s!r}")
