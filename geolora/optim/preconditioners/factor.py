"""Preconditioners in factor coordinates (:class:`~geolora.optim.geometry.FactorGeometry`).

Their state lives in the coordinates of ``M = B`` and ``N = Aᵀ``, so the optimizers built from
them are not transformation invariant unless the gradient they see is covariant and their
update equivariant (heavy ball on ScaledGD's gradient is; Adam's element-wise moments are not).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geolora.manifolds.types import FactorTangent
from geolora.optim.preconditioners.base import FactorDirection
from geolora.optim.validation import check_bool, check_range

__all__ = ["FactorAdamW", "FactorHeavyBall", "adamw_moments"]


def adamw_moments(
    g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, betas: tuple[float, float], eps: float, step: int
) -> tuple[Tensor, Tensor, Tensor]:
    """New ``(m, v, denom)`` of one AdamW step (Loshchilov & Hutter 2019, arXiv:1711.05101,
    Alg. 2) in ``torch.optim.AdamW``'s arithmetic (``foreach=False``), out of place:
    ``m = m + (1 − β₁)(g − m)``, ``v = β₂ v + (1 − β₂) g²``,
    ``denom = sqrt(v) / sqrt(1 − β₂ᵗ) + ε``; the step is ``−(lr / (1 − β₁ᵗ)) m / denom``."""
    beta1, beta2 = betas
    m = torch.lerp(exp_avg, g, 1 - beta1)
    v = torch.mul(exp_avg_sq, beta2).addcmul_(g, g.conj(), value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return m, v, denom


class FactorAdamW:
    """AdamW's moments on each factor, returned as Adam's quotient for
    :class:`~geolora.optim.geometry.FactorStep` (which applies it, and the decoupled decay, in
    ``torch.optim.AdamW``'s arithmetic). ``ratio`` (per-group hyperparameter, default 1)
    multiplies the learning rate of ``M = B`` (LoRA+, Hayou, Ghosh & Yu, "LoRA+: Efficient Low
    Rank Adaptation of Large Models", ICML 2024, arXiv:2402.12354). With ``ctx.extra["average"]``
    (a gauge policy's cluster average ``W``) the second moments are averaged over clusters,
    ``v ← v W`` (:mod:`geolora.optim.gauge`).

    State per pair: ``exp_avg_M``, ``exp_avg_sq_M: (m, r)``, ``exp_avg_N``, ``exp_avg_sq_N:
    (n, r)``. Hyperparameters: ``betas``, ``eps`` (and ``ratio`` when declared).
    """

    name = "factor_adamw"
    #: gradients are covectors: m moves like ∇ (× R⁻ᵀ, × R), v by the squared rule
    gauge_rules = {"exp_avg_M": "M", "exp_avg_N": "N", "exp_avg_sq_M": "M2", "exp_avg_sq_N": "N2"}
    functional_state = True
    row_shards = True  # element-wise

    def __init__(
        self,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        ratio: float | None = None,
    ) -> None:
        self.defaults: dict[str, Any] = {"betas": tuple(betas), "eps": eps}
        if ratio is not None:
            self.defaults["ratio"] = ratio

    def validate(self, hp: dict[str, Any]) -> None:
        if "ratio" in hp:
            ratio = hp["ratio"]
            if not (
                isinstance(ratio, (int, float))
                and not isinstance(ratio, bool)
                and math.isfinite(ratio)
                and ratio > 0
            ):
                raise ValueError(f"invalid ratio: {ratio!r} (expected a finite number > 0)")

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        z = like.new_zeros
        return {
            "exp_avg_M": z(m, r),
            "exp_avg_sq_M": z(m, r),
            "exp_avg_N": z(n, r),
            "exp_avg_sq_N": z(n, r),
        }

    def update(self, state, grad: FactorTangent, ctx, hp, step: int) -> FactorDirection:
        betas, eps = hp["betas"], hp["eps"]
        average = ctx.extra.get("average") if hasattr(ctx, "extra") else None
        nums, dens = [], []
        for side, gp in (("M", grad.M), ("N", grad.N)):
            if average is None:
                m, v, denom = adamw_moments(
                    gp, state[f"exp_avg_{side}"], state[f"exp_avg_sq_{side}"], betas, eps, step
                )
            else:
                b1, b2 = betas
                m = torch.lerp(state[f"exp_avg_{side}"], gp, 1 - b1)
                v = (state[f"exp_avg_sq_{side}"] * b2).addcmul_(gp, gp, value=1 - b2) @ average
                denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
            state[f"exp_avg_{side}"], state[f"exp_avg_sq_{side}"] = m, v
            nums.append(m)
            dens.append(denom)
        scale = (float(hp["ratio"]), 1.0) if "ratio" in hp else (1.0, 1.0)
        return FactorDirection(
            nums[0], nums[1], den=(dens[0], dens[1]), divisor=1 - betas[0] ** step, lr_scale=scale
        )


class FactorHeavyBall:
    """Heavy-ball momentum on each factor, torch SGD's convention (``dampening = 0``):
    ``b ← μ b + d``, direction ``b`` (Nesterov: ``d + μ b``). ``μ = 0``: the direction is the
    gradient itself (no state). State per pair (``μ > 0``): ``momentum_M: (m, r)``,
    ``momentum_N: (n, r)``, created when momentum is first switched on. Hyperparameters:
    ``momentum``, ``nesterov``."""

    name = "factor_heavy_ball"
    #: on the preconditioned metric's gradient, a vector: b moves like M (× R) and N (× R⁻ᵀ)
    gauge_rules = {"momentum_M": "MV", "momentum_N": "NV"}
    functional_state = True
    row_shards = True  # element-wise

    def __init__(self, *, momentum: float = 0.0, nesterov: bool = False) -> None:
        self.defaults: dict[str, Any] = {"momentum": momentum, "nesterov": nesterov}

    def validate(self, hp: dict[str, Any]) -> None:
        check_range("momentum", hp["momentum"], 0.0, 1.0, hi_open=True)
        check_bool("nesterov", hp["nesterov"])
        if hp["nesterov"] and hp["momentum"] == 0:
            raise ValueError("nesterov=True requires momentum > 0 (got momentum=0)")

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(self, state, grad: FactorTangent, ctx, hp, step: int) -> FactorTangent:
        mu = hp["momentum"]
        if not mu:
            return grad
        if "momentum_M" not in state:  # the first step with momentum: b = 0 before it
            state["momentum_M"], state["momentum_N"] = (
                torch.zeros_like(grad.M),
                torch.zeros_like(grad.N),
            )
        bM = torch.add(grad.M, state["momentum_M"], alpha=mu)
        bN = torch.add(grad.N, state["momentum_N"], alpha=mu)
        state["momentum_M"], state["momentum_N"] = bM, bN
        if hp["nesterov"]:
            return FactorTangent(torch.add(grad.M, bM, alpha=mu), torch.add(grad.N, bN, alpha=mu))
        return FactorTangent(bM, bN)
