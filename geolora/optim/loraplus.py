"""LoRA+: AdamW with a larger learning rate for ``B`` than for ``A``.

Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models", ICML 2024,
arXiv:2402.12354. Declared as ``(FactorAdamW(ratio), FactorGeometry("euclidean"), FactorStep)``.
"""

from __future__ import annotations

from typing import Any

from geolora.optim.base import PairOptimizer
from geolora.optim.geometry import FactorGeometry, FactorStep
from geolora.optim.preconditioners.factor import FactorAdamW

__all__ = ["LoRAPlus"]


class LoRAPlus(PairOptimizer):
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
        super().__init__(
            params,
            FactorAdamW(betas=betas, eps=eps, ratio=ratio),
            FactorGeometry("euclidean"),
            FactorStep(weight_decay=weight_decay),
            lr=lr,
            **kwargs,
        )
