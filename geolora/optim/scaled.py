"""r×r-preconditioned factor gradients: ScaledGD and Riemannian-preconditioned AdamW.

Both precondition the factor gradients with the inverse Gram matrix of the other factor,
the Riemannian gradient of the metric ``tr(G_N ṀᵀṀ) + tr(G_M ṄᵀṄ)`` (Mishra–Sepulchre;
lora-s.txt A.18.5, the ``PreconditionedMetric`` of DESIGN.md):

    ``Ṁ = ∇_M (NᵀN + δI)⁻¹``,  ``Ṅ = ∇_N (MᵀM + δI)⁻¹``,

i.e. ``∇_B (A Aᵀ + δI)⁻¹`` and ``(BᵀB + δI)⁻¹ ∇_A`` for ``B: (out, r)``, ``A: (r, in)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, mm_t, spd_inverse, sym, transpose
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.adamw import adamw_update_
from geolora.optim.base import LoRAOptimizer
from geolora.optim.sharding import LOCAL, RowSum

__all__ = [
    "RiemannianPreconditionedAdamW",
    "ScaledGD",
    "adamw_pair_state",
    "adamw_pair_step",
    "scaled_gradients",
]


def _gram64(F: Tensor) -> Tensor:
    """``FᵀF`` in float64, ``(..., k, r) -> (..., r, r)`` (of the local rows when sharded)."""
    F64 = F.to(torch.float64)
    return transpose(F64) @ F64


def _damped_inverse(G: Tensor, damping: float) -> Tensor:
    """``(sym(G) + δI)⁻¹`` by Cholesky; NaN where it is not numerically positive definite (the
    caller's finiteness check raises)."""
    G = sym(G)
    if damping:
        G = G + damping * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return spd_inverse(G)


def scaled_gradients(
    x: FactorPoint, g: FactorTangent, damping: float = 0.0, reduce: RowSum = LOCAL
) -> FactorTangent:
    """``(∇_M (NᵀN + δI)⁻¹, ∇_N (MᵀM + δI)⁻¹)`` (Tong et al. 2021; Zhang & Pilanci 2024).

    Shapes: ``x.M, g.M: (..., m, r)``, ``x.N, g.N: (..., n, r)``; the r×r inverses are formed in
    float64, the result has ``g``'s dtype. With ``δ = 0`` it is gauge covariant: at
    ``(M R, N R⁻ᵀ)`` the result is ``(Ṁ R, Ṅ R⁻ᵀ)``.

    Row-sharded factors (``x``, ``g`` the local rows): the two Grams are the only sums over
    rows, reduced together in one round (``reduce``, :class:`~geolora.optim.sharding.RowSum`);
    the rest is row-local.
    """
    (G_M,), (G_N,) = reduce(M=[_gram64(x.M)], N=[_gram64(x.N)])
    inv_N = _damped_inverse(G_N, damping).to(g.M.dtype)
    inv_M = _damped_inverse(G_M, damping).to(g.N.dtype)
    return FactorTangent(mm_t(g.M, inv_N), mm_t(g.N, inv_M))


class _DampedPairs(LoRAOptimizer):
    """Shared hook: with damping δ > 0 a rank-deficient pair (``B = 0``) needs no robust start."""

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        return not group.get("damping", 0.0) > 0


class ScaledGD(_DampedPairs):
    """ScaledGD (Tong, Ma & Chi 2021; lora-s.txt A.18.5 "Scaled GD (RGD)"): Riemannian gradient
    descent on the factors under the metric ``tr(NᵀN ṀᵀṀ + MᵀM ṄᵀṄ)``.

    ``Ṁ = ∇_M (NᵀN + δI)⁻¹``, ``Ṅ = ∇_N (MᵀM + δI)⁻¹``; optional heavy-ball momentum
    ``b ← μ b + Ṁ`` (torch SGD convention, ``dampening = 0``; Nesterov: step ``Ṁ + μ b``);
    ``M ← (1 − ηλ) M − η b`` and likewise ``N``.

    Transformation invariant for ``δ = 0`` (the default, the method of Tong et al.): at
    ``(M R, N R⁻ᵀ)`` every factor quantity is right-multiplied by ``R`` resp. ``R⁻ᵀ``, momentum
    and the scalar decay included, so ``X = M Nᵀ`` follows the same trajectory. ``δ > 0``
    (Zhang & Pilanci use 1e-6) breaks invariance slightly but runs from ``B = 0`` without a
    robust start; with ``δ = 0`` a zero ``B`` takes the base class's AdamW robust start until
    both factors have full rank. Near-rank-deficient factors make the step large (``‖Ṅ‖`` up
    to ``‖∇_X‖ / (2√δ)``): use small learning rates or a robust start there.

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        lr: learning rate η.
        momentum: μ ∈ [0, 1).
        nesterov: Nesterov momentum (needs ``momentum > 0``).
        weight_decay: decoupled decay λ ≥ 0 of both factors.
        damping: δ ≥ 0.
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        nesterov: bool = False,
        damping: float = 0.0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "damping": damping,
        }
        super().__init__(params, defaults, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        if not isinstance(group["nesterov"], bool):
            raise TypeError(f"nesterov must be a bool, got {type(group['nesterov']).__name__}")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov=True requires momentum > 0 (got momentum=0)")

    functional_state = True  # _update_pairs only assigns new tensors to state keys
    supports_row_shards = True  # Grams through self.shard_sum, the rest row-local

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        if group["momentum"] == 0:
            return {}
        cdt = compute_dtype(B.dtype)
        return {
            "momentum_M": torch.zeros(B.shape, dtype=cdt, device=B.device),
            "momentum_N": torch.zeros(A.T.shape, dtype=cdt, device=A.device),
        }

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        d = scaled_gradients(x, g, group["damping"], self.shard_sum)
        mu = group["momentum"]
        if mu:
            if "momentum_M" not in state:  # momentum switched on after the first step
                state["momentum_M"], state["momentum_N"] = (
                    torch.zeros_like(d.M),
                    torch.zeros_like(d.N),
                )
            bM = torch.add(d.M, state["momentum_M"], alpha=mu)
            bN = torch.add(d.N, state["momentum_N"], alpha=mu)
            state["momentum_M"], state["momentum_N"] = bM, bN
            d = (
                FactorTangent(torch.add(d.M, bM, alpha=mu), torch.add(d.N, bN, alpha=mu))
                if group["nesterov"]
                else FactorTangent(bM, bN)
            )
        lr, lam = group["lr"], group["weight_decay"]
        shrink = 1.0 - lr * lam
        if shrink == 1.0:
            return FactorPoint(torch.add(x.M, d.M, alpha=-lr), torch.add(x.N, d.N, alpha=-lr))
        return FactorPoint(
            torch.add(x.M * shrink, d.M, alpha=-lr), torch.add(x.N * shrink, d.N, alpha=-lr)
        )


class RiemannianPreconditionedAdamW(_DampedPairs):
    """Riemannian-preconditioned AdamW ("scaled AdamW"; Zhang & Pilanci 2024, "Riemannian
    Preconditioned LoRA for Fine-Tuning Foundation Models"; lora-s.txt A.18.7 "Scaled AdamW").

    ``∇_B ← ∇_B (A Aᵀ + δI)⁻¹``, ``∇_A ← (BᵀB + δI)⁻¹ ∇_A`` (both from the current factors),
    then one ``torch.optim.AdamW`` step (same operations: decoupled decay ``p ← (1 − ηλ) p``,
    bias-corrected moments, ``m̂ / (√v̂ + ε)``) on each factor with these gradients.

    Not transformation invariant: Adam's element-wise second moment is taken in factor
    coordinates, which the gauge ``(B R, R⁻¹ A)`` mixes (lora-s.txt A.18.7). Defaults: ``δ = 1e-6``,
    ``eps = 1e-6`` and ``betas = (0.9, 0.999)`` as in the authors' ``riemannian_AdamW``
    (``reg``, ``eps``), ``weight_decay = 0.01`` as ``torch.optim.AdamW``. Thanks to ``δ > 0`` it runs from ``B = 0`` (``∇_A = 0`` there, so
    ``A`` waits one step) with ``robust_steps = 0``. The authors apply the decay after the Adam
    step; here it comes first, as in ``torch.optim.AdamW`` (difference O(η²λ)).

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        lr: learning rate η.
        betas: Adam's ``(β₁, β₂)``.
        eps: Adam's ε.
        weight_decay: decoupled decay λ ≥ 0.
        damping: δ ≥ 0 (0 = undamped inverse; then ``B = 0`` takes the robust start).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        *,
        damping: float = 1e-6,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "damping": damping,
        }
        super().__init__(params, defaults, **kwargs)

    supports_row_shards = True  # Grams through self.shard_sum, AdamW element-wise

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        return adamw_pair_state(B, A)

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        d = scaled_gradients(x, g, group["damping"], self.shard_sum)
        lrs = (group["lr"], group["lr"])
        return adamw_pair_step(group, x, d, state, step, lrs)


def adamw_pair_state(B: Tensor, A: Tensor) -> dict[str, Tensor]:
    """Zero AdamW moments of the stacked factors ``M = B: (m, r)`` and ``N = Aᵀ: (n, r)``."""
    cdt = compute_dtype(B.dtype)
    m, r = B.shape
    n = A.shape[1]
    st = {}
    for side, rows in (("M", m), ("N", n)):
        st[f"exp_avg_{side}"] = torch.zeros(rows, r, dtype=cdt, device=B.device)
        st[f"exp_avg_sq_{side}"] = torch.zeros(rows, r, dtype=cdt, device=B.device)
    return st


def adamw_pair_step(
    group: dict[str, Any],
    x: FactorPoint,
    d: FactorTangent,
    state: dict[str, Tensor],
    step: int,
    lrs: tuple[float, float],
) -> FactorPoint:
    """One AdamW step (``torch.optim.AdamW`` arithmetic) on stacked factors with gradients
    ``d`` and learning rates ``lrs = (η_M, η_N)``; element-wise, so batching changes nothing."""
    out = []
    for side, p, gp, lr in (("M", x.M, d.M, lrs[0]), ("N", x.N, d.N, lrs[1])):
        p = p.clone()
        adamw_update_(
            p,
            gp,
            state[f"exp_avg_{side}"],
            state[f"exp_avg_sq_{side}"],
            step,
            lr,
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )
        out.append(p)
    return FactorPoint(*out)
