"""Build the adapted model of a bench run: the one place that knows the adapter kinds.

Every task with a real model calls :func:`adapt` (the optimizer spec's ``adapter`` field
reaches it through ``task.setup(adapter=...)``), so a new adapter kind is added here once and
every task, including a user's, can train it.

Kinds:

* ``"lora"``: :func:`geolora.lora.inject_lora` on the target linears, ``ΔW = s·B A`` with
  ``s = alpha / r``, ``B: (out, r)``, ``A: (r, in)`` (Hu et al., "LoRA: Low-Rank Adaptation
  of Large Language Models", ICLR 2022, arXiv:2106.09685, eq. 3); the start is then moved
  along the gauge orbit to ``(10^k B, 10^-k A)`` (same ΔW).
* ``"dora"``: peft's DoRA layers (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation",
  ICML 2024, arXiv:2402.09353) through :func:`geolora.lora.inject_adapter`, with each
  magnitude vector in a ``dora_magnitude`` group linked to its pair; the pairs start as LoRA's
  (``init="gaussian"`` draws ``B`` too) and move along the gauge orbit like LoRA's.
* ``"polar"``, ``"stella"``: three-factor adapters ``ΔW = s U S Vᵀ`` with their authors' inits
  (PoLAR: Lion et al., NeurIPS 2025, arXiv:2506.03133; StelLA: Li et al., NeurIPS 2025,
  arXiv:2510.01938). They have no ``(B, A)`` gauge, so init-scale runs (``factor_scale ≠ 0``)
  and ``init="gaussian"`` are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from geolora.lora.adapters import ADAPTER_KINDS

__all__ = ["ADAPTERS", "GAUGE_ADAPTERS", "adapt"]

#: Adapter kinds :func:`adapt` builds (those of :func:`geolora.lora.inject_adapter`).
ADAPTERS: tuple[str, ...] = ADAPTER_KINDS
#: Kinds whose adapters are ``(B, A)`` pairs with the gauge ``(B R, R⁻¹ A)`` (init-scale runs).
GAUGE_ADAPTERS: tuple[str, ...] = ("lora", "dora")


def adapt(
    model: nn.Module,
    adapter: str = "lora",
    *,
    rank: int,
    seed: int,
    target: str | Sequence[str] = "all-linear",
    alpha: float = 16.0,
    init: str = "zero",
    factor_scale: float = 0.0,
    within: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Inject an ``adapter`` into ``within`` (default: ``model``) and return ``model``'s groups.

    Args:
        model: the whole trainable model (its other trainable parameters, e.g. a head, end up
            in the plain group).
        adapter: a kind in :data:`ADAPTERS`.
        rank, alpha, target, init: adapter rank r, scale numerator, target linears (peft
            rule, see :func:`geolora.lora.inject_lora`) and init (``"zero"``: B = 0;
            ``"gaussian"``: both factors nonzero).
        seed: draws the adapter init (the global RNG is not touched).
        factor_scale: k; the pairs start at ``(10^k B, 10^-k A)``.
        within: the frozen sub-module to adapt; its base weights are frozen.

    Returns:
        geolora parameter groups: one ``{"params": [B, A], "lora_pair": True, ...}`` per
        adapted linear, then the plain group of the other trainable parameters.
    """
    from geolora.bench.tasks import rescale_lora_pairs
    from geolora.lora import inject_adapter, inject_lora
    from geolora.optim.groups import lora_param_groups

    if adapter not in ADAPTERS:
        raise ValueError(
            f"adapter {adapter!r} is not one the bench can build; known adapters: "
            f"{', '.join(ADAPTERS)}"
        )
    if adapter not in GAUGE_ADAPTERS and (factor_scale != 0 or init != "zero"):
        raise ValueError(
            f"the {adapter!r} adapter has no (B, A) gauge: init-scale runs (factor_scale="
            f"{factor_scale:g}, init={init!r}) apply to {' and '.join(GAUGE_ADAPTERS)} adapters only"
        )
    root = within if within is not None else model
    target_arg: Any = target if isinstance(target, str) else list(target)
    if adapter == "lora":
        inject_lora(root, target=target_arg, r=rank, alpha=alpha, init=init, seed=seed)
    else:
        dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), None)
        inject_adapter(root, adapter, target_arg, rank, alpha, seed=seed, dtype=dtype)
    groups = lora_param_groups(model, dora="linked" if adapter == "dora" else "ordinary")
    if adapter == "dora" and init != "zero":
        _gaussian_pairs(groups, init, seed)
    rescale_lora_pairs(groups, factor_scale)
    return groups


def _gaussian_pairs(groups: list[dict[str, Any]], init: str, seed: int) -> None:
    """LoRA's ``"gaussian"`` init on peft pairs: ``A ~ N(0, 1/in)``, ``B ~ N(0, 1e-4/r)``."""
    if init != "gaussian":
        raise ValueError(f"init must be 'zero' or 'gaussian' for the 'dora' adapter, got {init!r}")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in groups:
            if group.get("lora_pair"):
                B, A = group["params"]
                r, n = A.shape[0], A.shape[-1]
                A.copy_(torch.randn(A.shape, generator=gen, dtype=torch.float64) / n**0.5)
                B.copy_(torch.randn(B.shape, generator=gen, dtype=torch.float64) * (1e-2 / r**0.5))
