"""RefLoRA: AdamW on the LoRA factors after a per-step optimal refactoring.

Zhang, Li & Giannakis, "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of
Large Models", NeurIPS 2025, arXiv:2505.18877; authors' code: github.com/zhangyilang/RefLoRA.

``X = M Nᵀ`` (``M = B``, ``N = Aᵀ``) has the factorisations ``(M R, N R⁻ᵀ)``, ``R ∈ GL(r)``. A
gradient step on the factors changes ``X`` by an amount that depends on the factorisation;
RefLoRA chooses, every step, the factorisation that minimises an upper bound on the next loss.
Its closed form is ``S* = G_N⁻¹ # G_M`` (matrix geometric mean, ``S* G_N S* = G_M``,
``G_M = MᵀM``, ``G_N = NᵀN``), refactoring ``(M, N) → (M P⁻ᵀ, N P)`` with ``P Pᵀ = S*``; the
refactored pair is *balanced* (``G_M' = G_N'``), and the balanced pairs are exactly one
``O(r)`` orbit, so the choice is the balanced gauge of :mod:`geolora.optim.gauge`
(:func:`~geolora.optim.gauge.balanced_factors`: ``M' = U Φ Σ^{1/2}``, ``N' = V Ψ Σ^{1/2}``).
RefLoRA-S uses the scalar gauge ``c = (‖N‖_F / ‖M‖_F)^{1/2}`` instead (``policy="scalar"``).

One step for a stack of pairs, after ``warmup_steps`` plain AdamW steps::

    (M', N'), R = policy(M, N)                  # gauge R: M' = M R, N' = N R⁻ᵀ
    (∇_M', ∇_N') = (∇_M R⁻ᵀ, ∇_N R)             # exact: gradients are covectors
    m_M ← m_M R⁻ᵀ, m_N ← m_N R                  # Adam's first moments: exact
    v_M ← v_M (R⁻ᵀ ∘ R⁻ᵀ), v_N ← v_N (R ∘ R)    # second moments (exact for RefLoRA-S)
    (M, N) ← AdamW step from (M', N') with (∇_M', ∇_N')   (torch.optim.AdamW arithmetic)

``mode="precondition"`` is the authors' implementation of the full variant instead: the factors
are never refactored; the gradients are preconditioned, ``(∇_M S*, ∇_N S*⁻¹)`` (peft:
``∇_B S*``, ``S*⁻¹ ∇_A``), and AdamW steps on the original factors. For SGD both modes give the
same ``X`` trajectory (the factors differ by the gauge); for Adam they differ, because Adam's
element-wise moments are taken in different coordinates.

Transformation invariance: with ``policy="balanced"``, ``mode="refactor"`` and
``warmup_steps=0`` the ``X`` trajectory does not depend on the initial factorisation (for
distinct singular values of ``X``): the first refactoring maps every factorisation to the same
balanced pair up to a signed permutation of the columns, under which AdamW and the moment rule
are exactly equivariant. Where singular values of ``X`` are equal (within ``√ε σ₁``) the balanced
pair is defined only up to a rotation of those columns; there the second moments are averaged
over each such cluster (as LoRAM's, :func:`~geolora.optim.loram.cluster_average`), which makes the
step independent of the rotation and is a no-op for distinct singular values. Warm-up, the scalar policy and ``mode="precondition"`` are not
invariant (AdamW in the original coordinates).

Deviations from the authors' code (their ``Refactorer``):

* the full variant refactors the factors and moves Adam's state (``mode="refactor"``, default)
  where the authors precondition the gradients (available as ``mode="precondition"``);
* ``S*`` comes from the thin QRs of the factors and the float64 SVD of the ``r x r`` core
  (:func:`~geolora.optim.gauge.reflora_preconditioner`), not from two ``eigh`` of the Gram
  matrices with ``ε = finfo.eps`` added to the square roots; where ``X`` is numerically rank
  deficient (``B = 0``) the gauge is the identity (plain AdamW) instead of the authors'
  ``ε``-regularised inverse (which zeroes ``B``'s gradient at ``B = 0``);
* at clusters of equal singular values the second moments are averaged over the cluster (see
  above; the authors' AdamW has no such rule and is not invariant there);
* the authors apply RefLoRA-S after the AdamW step (a post-step hook), here before the next one —
  the same sequence of factors; the refactoring ``interval`` option (default 1) is not offered.

Defaults from the authors' scripts: AdamW (Hugging Face ``adamw_torch``) with
``betas=(0.9, 0.999)``, ``eps=1e-8``, ``weight_decay=0``, ``lr=2e-4`` (LLaMA commonsense
reasoning; ``1e-3`` for DeBERTaV3 on GLUE), ``warmup_steps=100`` (``reflora_warmup``). Memory
per pair: AdamW's ``2(m + n) r``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.base import LoRAOptimizer
from geolora.optim.gauge import (
    GAUGE_POLICIES,
    balanced_with_spectrum,
    move_factor_moments,
    move_gradients,
    reflora_preconditioner,
)
from geolora.optim.loram import _cluster_weights
from geolora.optim.scaled import adamw_pair_state, adamw_pair_step

__all__ = ["REFLORA_MODES", "RefLoRA", "reflora_gradients"]

#: ``mode`` values: refactor the factors and move the state, or precondition the gradients.
REFLORA_MODES = ("refactor", "precondition")


def reflora_gradients(x: FactorPoint, g: FactorTangent) -> FactorTangent:
    """The authors' preconditioned factor gradients ``(∇_M S*, ∇_N S*⁻¹)`` with
    ``S* = G_N⁻¹ # G_M`` (:func:`~geolora.optim.gauge.reflora_preconditioner`); ``g``'s dtype.
    Shapes ``(..., m, r)``, ``(..., n, r)``."""
    S, S_inv = reflora_preconditioner(x.M, x.N)
    return FactorTangent(g.M @ S.to(g.M.dtype), g.N @ S_inv.to(g.N.dtype))


class RefLoRA(LoRAOptimizer):
    """RefLoRA / RefLoRA-S (module docstring): AdamW on refactored LoRA factors.

    Args:
        params: param groups (see :mod:`geolora.optim.base`).
        lr: AdamW learning rate (both factors).
        betas, eps, weight_decay: AdamW hyperparameters (decoupled decay ``p ← (1 − ηλ) p``).
        policy: ``"balanced"`` (RefLoRA, the optimal refactoring) or ``"scalar"`` (RefLoRA-S).
        mode: ``"refactor"`` (refactor + move the state) or ``"precondition"`` (the authors'
            gradient preconditioning; only with ``policy="balanced"``).
        warmup_steps: plain AdamW steps before refactoring starts (the authors'
            ``reflora_warmup``).
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options (``robust_steps`` is not
            needed: a rank-deficient pair simply takes plain AdamW steps).
    """

    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        policy: str = "balanced",
        mode: str = "refactor",
        warmup_steps: int = 100,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "policy": policy,
            "mode": mode,
            "warmup_steps": warmup_steps,
        }
        super().__init__(params, defaults, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        if group["policy"] not in GAUGE_POLICIES:
            raise ValueError(
                f"invalid policy: {group['policy']!r} (expected one of {sorted(GAUGE_POLICIES)})"
            )
        if group["mode"] not in REFLORA_MODES:
            raise ValueError(f"invalid mode: {group['mode']!r} (expected one of {REFLORA_MODES})")
        if group["mode"] == "precondition" and group["policy"] != "balanced":
            raise ValueError(
                "mode='precondition' is the authors' form of the full (balanced) RefLoRA; "
                "use policy='balanced' or mode='refactor'"
            )
        w = group["warmup_steps"]
        if not (isinstance(w, int) and not isinstance(w, bool) and w >= 0):
            raise ValueError(f"invalid warmup_steps: {w!r} (expected an integer >= 0)")

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        # AdamW needs no full-rank factors (the gauge is the identity where X is rank
        # deficient): B = 0 needs no robust start.
        return False

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        return adamw_pair_state(B, A)

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        average = None
        if step > group["warmup_steps"]:
            if group["mode"] == "precondition":
                g = reflora_gradients(x, g)
            else:
                if group["policy"] == "balanced":
                    x, gauge, sig, ok = balanced_with_spectrum(x.M, x.N)
                    average = _cluster_weights(sig.to(x.M.dtype))
                    if average is not None:  # only balanced elements have aligned columns
                        eye = torch.eye(sig.shape[-1], dtype=x.M.dtype, device=x.M.device)
                        average = torch.where(ok[..., None, None], average, eye)
                else:
                    x, gauge = GAUGE_POLICIES[group["policy"]](x.M, x.N)
                g = move_gradients(g, gauge)
                mM, mN, vM, vN = move_factor_moments(
                    state["exp_avg_M"],
                    state["exp_avg_N"],
                    state["exp_avg_sq_M"],
                    state["exp_avg_sq_N"],
                    gauge,
                )
                state["exp_avg_M"], state["exp_avg_N"] = mM, mN
                state["exp_avg_sq_M"], state["exp_avg_sq_N"] = vM, vN
        lr = group["lr"]
        if average is not None:
            return _adamw_averaged(group, x, g, state, step, lr, average)
        return adamw_pair_step(group, x, g, state, step, (lr, lr))


def _adamw_averaged(
    group: dict[str, Any],
    x: FactorPoint,
    g: FactorTangent,
    state: dict[str, Tensor],
    step: int,
    lr: float,
    average: Tensor,
) -> FactorPoint:
    """The AdamW step of ``adamw_pair_step`` with the second moments averaged over the columns
    of each cluster of equal singular values (``v ← v W``, ``W`` from
    :func:`~geolora.optim.loram.cluster_average`): at a balanced pair those columns are defined
    only up to a rotation, under which ``m`` moves exactly and the averaged ``v`` is unchanged,
    so the step does not depend on the rotation."""
    b1, b2 = group["betas"]
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    out = []
    for side, p, gp in (("M", x.M, g.M), ("N", x.N, g.N)):
        m = torch.lerp(state[f"exp_avg_{side}"], gp, 1 - b1)
        v = (state[f"exp_avg_sq_{side}"] * b2).addcmul_(gp, gp, value=1 - b2) @ average
        state[f"exp_avg_{side}"], state[f"exp_avg_sq_{side}"] = m, v
        denom = (v.sqrt() / math.sqrt(bc2)).add_(group["eps"])
        p = p * (1 - lr * group["weight_decay"])
        out.append(p.addcdiv(m, denom, value=-lr / bc1))
    return FactorPoint(*out)
