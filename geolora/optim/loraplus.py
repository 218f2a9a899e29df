"""LoRA+: AdamW with a larger learning rate for ``B`` than for ``A``.

Hayou, Ghosh & Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models" (ICML 2024);
a baseline in lora-rite.txt (experiments, with ratio 4 for decoder models).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.base import LoRAOptimizer
from geolora.optim.scaled import adamw_pair_state, adamw_pair_step

__all__ = ["LoRAPlus"]


class LoRAPlus(LoRAOptimizer):
    """LoRA+ (Hayou et al. 2024): per-pair AdamW with ``η_B = ratio · η_A``, ``η_A = lr``.

    Each factor takes one ``torch.optim.AdamW`` step (decoupled decay ``p ← (1 − ηλ) p``,
    bias-corrected moments, ``m̂ / (√v̂ + ε)``) with its own learning rate: ``B`` (``M``) with
    ``ratio · lr`` and ``A`` (``N = Aᵀ``) with ``lr``. Same-shape pairs are updated in one
    batched call. Not transformation invariant (element-wise moments in factor coordinates).
    Ordinary (non-LoRA) groups use AdamW with ``other_lr`` (default ``lr``).

    Defaults: ``ratio = 16`` (the paper's recommended ``λ = 2⁴``), AdamW's ``betas=(0.9,
    0.999)``, ``eps=1e-8``, ``weight_decay=0`` (the authors' Hugging Face Trainer setting).
    Zero-initialised ``B`` needs nothing special (the pair never takes the robust start unless
    ``robust_steps > 0`` is asked for).

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        lr: learning rate of ``A`` (η_A).
        ratio: ``η_B / η_A`` > 0.
        betas, eps, weight_decay: AdamW hyperparameters of both factors.
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        ratio: float = 16.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "ratio": ratio,
            "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        ratio = group["ratio"]
        if not (isinstance(ratio, (int, float)) and math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"invalid ratio: {ratio!r} (expected a finite number > 0)")

    supports_row_shards = True  # element-wise: nothing to reduce

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        return False  # plain AdamW needs no full-rank factors: B = 0 needs no robust start

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        return adamw_pair_state(B, A)

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        lr = group["lr"]
        return adamw_pair_step(group, x, g, state, step, (group["ratio"] * lr, lr))
