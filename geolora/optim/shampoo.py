"""LiftedShampoo — Shampoo on the matrix tangent space + Sylvester lift (Zheng & Wu, "LoRA-S",
ICLR 2026, OpenReview Guo2XGgxZA, A.18.3 "Lift Shampoo"; Gupta, Koren & Singer, "Shampoo:
Preconditioned Stochastic Tensor Optimization", ICML 2018, arXiv:1802.09568, Alg. 1).

Declared as ``(ShampooPreconditioner, QuotientGeometry(metric), Lift)``; the statistics and
their Frequent-Directions sketches are in :mod:`geolora.optim.preconditioners.shampoo`.
"""

from __future__ import annotations

from typing import Any

from geolora.manifolds.metrics import QuotientMetric
from geolora.optim.lifted import LiftedOptimizer
from geolora.optim.preconditioners.shampoo import (
    ShampooPreconditioner,
    fd_update,
    inv_root_apply,
    psd_factor,
)


class LiftedShampoo(LiftedOptimizer):
    """Shampoo lifted to the horizontal space (LoRA-S A.18.3 "Lift Shampoo"; Gupta et al.
    2018; sketched statistics after Feinberg et al. 2023).

    ``ξ = P_T(∇_X f)``; ``L ← β L + ξ ξᵀ``, ``R ← β R + ξᵀ ξ`` (sketched, exact by default);
    ``Ẋ = (L + ε_L I)^{-1/4} ξ (R + ε_R I)^{-1/4}``; lift of ``P_T(Ẋ)`` (Sylvester ``K``);
    ``(M, N) ← (M − lr Ṁ, N − lr Ṅ)``. At ``t = 1`` (exact) ``Ẋ = P Qᵀ`` for ``ξ = P Σ Qᵀ``.

    Args:
        lr: learning rate (the paper gives none; 1e-2 default).
        beta2: statistics decay β ∈ (0, 1]; 1 = Shampoo's running sum (Gupta et al.).
        eps: relative damping ``ε = eps · λ_max`` of each factor.
        weight_decay, decay: see :class:`~geolora.optim.lifted.LiftedOptimizer`.
        sketch_rank: ``None`` (exact dense statistics, only when ``max(m, n) ≤ max_dim``) or
            the Frequent-Directions rank k ≥ 1 (memory ``(m + n) k``; ≥ 2r recommended).
        max_dim: largest layer dimension allowed with exact statistics.
        robust_steps: AdamW warm-up steps (A.16; default 0).
        metric: quotient metric of the lift (default LoRA-S ``"balanced"``).

    Invariant under ``(B, A) → (B R, R⁻¹ A)`` with an invariant metric. On FSDP2 row-sharded
    factors with a finite ``sketch_rank`` the sketches are stored with the factors' rows and
    each step takes 4 ``all_reduce`` s per bucket (docs/distributed.md); ``sketch_rank=None``
    refuses row shards (``sharded="gather"`` runs it on the gathered pair).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        beta2: float = 1.0,
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        sketch_rank: int | None = None,
        max_dim: int = 1024,
        robust_steps: int = 0,
        metric: str | QuotientMetric = "balanced",
        **kwargs: Any,
    ) -> None:
        if not (isinstance(max_dim, int) and max_dim >= 1):
            raise ValueError(f"max_dim must be an integer >= 1, got {max_dim!r}")
        self.max_dim = max_dim
        super().__init__(
            params,
            ShampooPreconditioner(sketch_rank, beta2=beta2, eps=eps),
            metric=metric,
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            **kwargs,
        )

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        if group.get("lora_pair") and self.preconditioner.sketch_rank is None:
            B, A = group["params"]
            big = max(B.shape[0], A.shape[1])
            if big > self.max_dim:
                raise ValueError(
                    f"LiftedShampoo: lora_pair {group.get('name', '')!r} has a dimension {big} > "
                    f"max_dim={self.max_dim}; exact statistics would need {big}² floats. Pass "
                    f"sketch_rank=k (memory (m + n) k) or raise max_dim."
                )


__all__ = ["LiftedShampoo", "ShampooPreconditioner", "fd_update", "inv_root_apply", "psd_factor"]
