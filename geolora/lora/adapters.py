"""One entry point for the adapter shapes geolora's optimizers train: LoRA, PoLAR, StelLA, DoRA.

:func:`inject_adapter` replaces the selected ``nn.Linear`` modules of a model (the selection rule
of :func:`geolora.lora.inject_lora`) by the adapter a method needs, initialised as its authors
do, and freezes everything else inside the model:

* ``"lora"`` — :class:`~geolora.lora.LoRALinear`, ``ΔW = s B A``, ``B = 0`` (Hu et al. 2022);
* ``"polar"`` — :class:`~geolora.lora.ThreeFactorLinear`, ``init="polar"`` (``S = 0``), for
  :class:`geolora.optim.PoLAR`;
* ``"stella"`` — :class:`~geolora.lora.ThreeFactorLinear`, ``init="stella"`` (``S = I``), for
  :func:`geolora.optim.StelLA`;
* ``"dora"`` — peft's DoRA layers (``LoraConfig(use_dora=True)``, injected in place with
  ``peft.inject_adapter_in_model``; ``B = 0``, magnitudes ``‖W₀‖_row``), for
  :class:`geolora.optim.InvariantDoRA` with ``lora_param_groups(model, dora="linked")`` or any
  other optimizer with the default groups.

The parameter groups then come from :func:`geolora.optim.lora_param_groups`.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from geolora.lora.layers import Selector, _check_hparams, inject_lora, select_linear_targets
from geolora.lora.three_factor import inject_three_factor

__all__ = ["ADAPTER_KINDS", "inject_adapter"]

ADAPTER_KINDS = ("lora", "polar", "stella", "dora")


def inject_adapter(
    model: nn.Module,
    kind: str,
    target: Selector = "all-linear",
    r: int = 8,
    alpha: float = 16.0,
    *,
    exclude: Selector | None = None,
    seed: int | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Inject the adapter ``kind`` (one of :data:`ADAPTER_KINDS`) into ``model`` in place.

    ``target`` / ``exclude`` select modules as :func:`geolora.lora.inject_lora` does (also for
    ``"dora"``: the selected names are handed to peft as one full-match pattern). ``seed`` makes
    the random initialisation reproducible without touching the global RNG; ``dtype`` is the
    adapters' dtype (default: the base weights'; peft's DoRA default would be float32).

    Returns:
        the qualified names of the adapted modules, in ``named_modules`` order.
    """
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"unknown adapter kind {kind!r}; choose one of {ADAPTER_KINDS}")
    if kind == "lora":
        return inject_lora(
            model, target, r, alpha, init="zero", exclude=exclude, seed=seed, dtype=dtype
        )
    if kind in ("polar", "stella"):
        return inject_three_factor(
            model, target, r, alpha, init=kind, exclude=exclude, seed=seed, dtype=dtype
        )
    return _inject_dora(model, target, r, alpha, exclude, seed, dtype)


def _inject_dora(
    model: nn.Module,
    target: Selector,
    r: int,
    alpha: float,
    exclude: Selector | None,
    seed: int | None,
    dtype: torch.dtype | None,
) -> list[str]:
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive int, got r={r!r}")
    _check_hparams(alpha, 0.0)
    names = [name for name, _, _ in select_linear_targets(model, target, exclude, r).values()]
    pattern = "|".join(re.escape(n) for n in names)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=f"^(?:{pattern})$", use_dora=True)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        inject_adapter_in_model(config, model)
    if dtype is not None:
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.data = p.data.to(dtype)
    return names
