"""Build geolora parameter groups from a model or its named parameters.

A LoRA pair becomes the group ``{"params": [B, A], "lora_pair": True, "scaling": s,
"name": "<module>"}`` with ``B: (out, r)``, ``A: (r, in)`` and ``ΔW = s · B A``
(DESIGN.md: ``M = B``, ``N = Aᵀ``). Every other trainable parameter goes to one ordinary
group (no ``lora_pair`` key), which geolora optimizers update with AdamW.

Recognised names:

* geolora :class:`~geolora.lora.layers.LoRALinear`: ``<module>.lora_A``, ``<module>.lora_B``;
* peft LoRA: ``<module>.lora_A.<adapter>.weight``, ``<module>.lora_B.<adapter>.weight``
  (one group per (module, adapter); the group also carries ``"adapter"``);
* peft DoRA magnitudes ``<module>.lora_magnitude_vector.<adapter>.weight`` ``(out,)``: ordinary
  parameters by default (``dora="ordinary"``, every optimizer trains them with its own rule);
  with ``dora="linked"`` each becomes the group ``{"params": [m], "dora_magnitude": True,
  "name": "<module>", "adapter": ...}`` right after its pair's group, for
  :class:`geolora.optim.InvariantDoRA`;
* three-factor adapters (:class:`geolora.lora.ThreeFactorLinear`): ``<module>.lora_U``,
  ``<module>.lora_S``, ``<module>.lora_V`` become ``{"params": [U, S, V], "lora_triple": True,
  "scaling": s, "name": "<module>"}`` (for :class:`geolora.optim.PoLAR` and
  :func:`geolora.optim.StelLA`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["lora_param_groups"]

_PEFT = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")
_GEOLORA = re.compile(r"^(?:(?P<module>.+)\.)?lora_(?P<factor>[AB])$")
_THREE = re.compile(r"^(?:(?P<module>.+)\.)?lora_(?P<factor>[USV])$")
_DORA = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector\.(?P<adapter>[^.]+)\.weight$")
DORA_MODES = ("ordinary", "linked")

NamedParams = Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor]


def _scaling(model: nn.Module | None, module_name: str, adapter: str | None) -> float:
    """``module.scaling`` (geolora) or ``module.scaling[adapter]`` (peft); 1.0 without a model
    or when the module has no ``scaling`` attribute."""
    if model is None:
        return 1.0
    module = model.get_submodule(module_name) if module_name else model
    scaling = getattr(module, "scaling", None)
    if scaling is None:
        return 1.0
    if adapter is not None:
        if not isinstance(scaling, Mapping) or adapter not in scaling:
            raise ValueError(f"module {module_name!r} has no scaling for adapter {adapter!r}")
        scaling = scaling[adapter]
    return float(scaling)


def lora_param_groups(
    model_or_named_params: nn.Module | NamedParams,
    *,
    lr: float | None = None,
    other_lr: float | None = None,
    other_weight_decay: float | None = None,
    adapter: str | Iterable[str] | None = None,
    dora: str = "ordinary",
) -> list[dict[str, Any]]:
    """Split trainable parameters into LoRA-pair groups and one ordinary group.

    Args:
        model_or_named_params: a model (scalings are read from its modules) or
            ``(name, tensor)`` pairs / a ``{name: tensor}`` mapping (scaling 1.0).
        lr: learning rate put in every LoRA group (omitted: the optimizer default).
        other_lr: learning rate of the ordinary group.
        other_weight_decay: weight decay of the ordinary group.
        adapter: restrict peft pairs to this adapter name (or names); factors of other
            peft adapters are left out of all groups. geolora pairs are always included.
        dora: where peft DoRA magnitude vectors go: ``"ordinary"`` (the ordinary group) or
            ``"linked"`` (one ``dora_magnitude`` group after its pair's group, see above).

    Returns:
        LoRA groups in order of first appearance of their factors, then the ordinary group
        ``{"params": [...], "name": "other"}`` if any parameter is left. Frozen parameters
        (``requires_grad=False``) are skipped; shared tensors are counted once.

    Raises:
        ValueError: a factor without its trainable partner, mismatched ranks, non-2-D
            factors, a linked DoRA magnitude without its pair or of the wrong length, or an
            ``adapter`` that does not occur (messages name the parameter).
    """
    model = model_or_named_params if isinstance(model_or_named_params, nn.Module) else None
    if model is not None:
        named = list(model.named_parameters())
    elif isinstance(model_or_named_params, Mapping):
        named = list(model_or_named_params.items())
    else:
        named = list(model_or_named_params)
    wanted = None if adapter is None else ({adapter} if isinstance(adapter, str) else set(adapter))
    for value, what in (
        (lr, "lr"),
        (other_lr, "other_lr"),
        (other_weight_decay, "other_weight_decay"),
    ):
        if value is not None and not value >= 0:
            raise ValueError(f"{what} must be non-negative, got {what}={value!r}")
    if dora not in DORA_MODES:
        raise ValueError(f"dora must be one of {DORA_MODES}, got {dora!r}")
    triples: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    magnitudes: dict[tuple[str, str], tuple[str, torch.Tensor]] = {}

    pairs: dict[tuple[str, str | None], dict[str, tuple[str, torch.Tensor]]] = {}
    others: list[torch.Tensor] = []
    seen: set[int] = set()
    adapters_found: set[str] = set()
    for name, p in named:
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"parameter {name!r} is a {type(p).__name__}, not a tensor")
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        three = _THREE.match(name)
        if three is not None:
            triples.setdefault(three["module"] or "", {})[three["factor"]] = (name, p)
            continue
        mag = _DORA.match(name) if dora == "linked" else None
        if mag is not None:
            adapters_found.add(mag["adapter"])
            if wanted is None or mag["adapter"] in wanted:
                magnitudes[(mag["module"], mag["adapter"])] = (name, p)
            continue
        match = _PEFT.match(name) or _GEOLORA.match(name)
        if match is None:
            others.append(p)
            continue
        ad = match.groupdict().get("adapter")
        if ad is not None:
            adapters_found.add(ad)
            if wanted is not None and ad not in wanted:
                continue
        if p.dim() != 2:
            raise ValueError(
                f"LoRA factor {name!r} has shape {tuple(p.shape)}; only 2-D "
                "(Linear) LoRA factors are supported"
            )
        pairs.setdefault((match["module"] or "", ad), {})[match["factor"]] = (name, p)
    if wanted is not None and not wanted <= adapters_found:
        raise ValueError(
            f"adapter {sorted(wanted - adapters_found)} not found among trainable "
            f"LoRA factors (found {sorted(adapters_found)})"
        )

    groups: list[dict[str, Any]] = []
    for (module_name, ad), factors in pairs.items():
        if set(factors) != {"A", "B"}:
            ((present_name, _),) = factors.values()
            absent = "lora_B" if "A" in factors else "lora_A"
            raise ValueError(
                f"LoRA factor {present_name!r} has no trainable {absent} partner "
                "(missing or frozen)"
            )
        (b_name, b), (a_name, a) = factors["B"], factors["A"]
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"rank mismatch: {b_name!r} is {tuple(b.shape)} (out, r) but "
                f"{a_name!r} is {tuple(a.shape)} (r, in)"
            )
        group: dict[str, Any] = {
            "params": [b, a],
            "lora_pair": True,
            "scaling": _scaling(model, module_name, ad),
            "name": module_name,
        }
        if ad is not None:
            group["adapter"] = ad
        if lr is not None:
            group["lr"] = lr
        groups.append(group)
        if ad is not None and (module_name, ad) in magnitudes:
            groups.append(_magnitude_group(magnitudes.pop((module_name, ad)), group, lr))
    if magnitudes:
        (m_name, _), *_ = magnitudes.values()
        raise ValueError(f"DoRA magnitude {m_name!r} has no trainable LoRA pair (lora_A, lora_B)")
    groups.extend(_triple_group(model, module_name, f, lr) for module_name, f in triples.items())
    if others:
        group = {"params": others, "name": "other"}
        if other_lr is not None:
            group["lr"] = other_lr
        if other_weight_decay is not None:
            group["weight_decay"] = other_weight_decay
        groups.append(group)
    return groups


def _magnitude_group(
    entry: tuple[str, torch.Tensor], pair: dict[str, Any], lr: float | None
) -> dict[str, Any]:
    """The linked group of a DoRA magnitude vector ``m: (out,)`` of ``pair``."""
    name, m = entry
    out = pair["params"][0].shape[0]
    if m.dim() != 1 or m.shape[0] != out:
        raise ValueError(
            f"DoRA magnitude {name!r} has shape {tuple(m.shape)}; expected ({out},), the output "
            f"size of LoRA pair {pair['name']!r}"
        )
    group: dict[str, Any] = {
        "params": [m],
        "dora_magnitude": True,
        "name": pair["name"],
        "adapter": pair["adapter"],
    }
    if lr is not None:
        group["lr"] = lr
    return group


def _triple_group(
    model: nn.Module | None,
    module_name: str,
    factors: dict[str, tuple[str, torch.Tensor]],
    lr: float | None,
) -> dict[str, Any]:
    """The ``lora_triple`` group ``[U, S, V]`` of a three-factor adapter, shapes checked."""
    absent = [f"lora_{f}" for f in "USV" if f not in factors]
    if absent:
        ((present, _), *_) = factors.values()
        raise ValueError(
            f"three-factor factor {present!r} has no trainable {absent} (missing or frozen)"
        )
    (u_name, U), (s_name, S), (v_name, V) = factors["U"], factors["S"], factors["V"]
    for nm, t in ((u_name, U), (v_name, V)):
        if t.dim() != 2:
            raise ValueError(f"three-factor factor {nm!r} must be 2-D, got {tuple(t.shape)}")
    r = U.shape[1]
    if V.shape[1] != r or tuple(S.shape) not in ((r, r), (r,)):
        raise ValueError(
            f"rank mismatch: {u_name!r} is {tuple(U.shape)} (out, r), {s_name!r} is "
            f"{tuple(S.shape)} ((r, r) or (r,)), {v_name!r} is {tuple(V.shape)} (in, r)"
        )
    group: dict[str, Any] = {
        "params": [U, S, V],
        "lora_triple": True,
        "scaling": _scaling(model, module_name, None),
        "name": module_name,
    }
    if lr is not None:
        group["lr"] = lr
    return group
