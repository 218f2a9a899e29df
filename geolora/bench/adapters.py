"""Build the adapted model of a bench run: the one place that knows the adapter kinds.

Every task with a real model calls :func:`adapt` (the optimizer spec's ``adapter`` field
reaches it through ``task.setup(adapter=...)``), so a new adapter kind is added here once and
every task, including a user's, can train it.

Kinds:

* ``"lora"``: :func:`geolora.lora.inject_lora` on the target linears, ``ΔW = s·B A`` with
  ``s = alpha / r``, ``B: (out, r)``, ``A: (r, in)`` (Hu et al., "LoRA: Low-Rank Adaptation
  of Large Language Models", ICLR 2022, arXiv:2106.09685, eq. 3); the start is then moved
  along the gauge orbit to ``(10^k B, 10^-k A)`` (same ΔW).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["ADAPTERS", "adapt"]

#: Adapter kinds :func:`adapt` builds.
ADAPTERS: tuple[str, ...] = ("lora",)


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
    from geolora.lora import inject_lora
    from geolora.optim.groups import lora_param_groups

    if adapter not in ADAPTERS:
        raise ValueError(
            f"adapter {adapter!r} is not one the bench can build; known adapters: "
            f"{', '.join(ADAPTERS)}"
        )
    target_arg: Any = target if isinstance(target, str) else list(target)
    inject_lora(within if within is not None else model, target=target_arg, r=rank, alpha=alpha,
                init=init, seed=seed)
    groups = lora_param_groups(model)
    rescale_lora_pairs(groups, factor_scale)
    return groups
