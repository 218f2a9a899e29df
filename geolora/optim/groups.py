"""Build geolora parameter groups from a model or its named parameters.

A LoRA pair becomes the group ``{"params": [B, A], "lora_pair": True, "scaling": s,
"name": "<module>"}`` with ``B: (out, r)``, ``A: (r, in)`` and ``ΔW = s · B A``
(DESIGN.md: ``M = B``, ``N = Aᵀ``). Every other trainable parameter goes to one ordinary
group (no ``lora_pair`` key), which geolora optimizers update with AdamW.

Recognised names:

* geolora :class:`~geolora.lora.layers.LoRALinear`: ``<module>.lora_A``, ``<module>.lora_B``;
* peft LoRA: ``<module>.lora_A.<adapter>.weight``, ``<module>.lora_B.<adapter>.weight``
  (one group per (module, adapter); the group also carries ``"adapter"``).
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

    Returns:
        LoRA groups in order of first appearance of their factors, then the ordinary group
        ``{"params": [...], "name": "other"}`` if any parameter is left. Frozen parameters
        (``requires_grad=False``) are skipped; shared tensors are counted once.

    Raises:
        ValueError: a factor without its trainable partner, mismatched ranks, non-2-D
            factors, or an ``adapter`` that does not occur (messages name the parameter).
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
    if others:
        group = {"params": others, "name": "other"}
        if other_lr is not None:
            group["lr"] = other_lr
        if other_weight_decay is not None:
            group["weight_decay"] = other_weight_decay
        groups.append(group)
    return groups
