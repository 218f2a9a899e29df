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
per pair: AdamW's ``2(m + n) r``. On FSDP2 row-sharded factors (docs/distributed.md) the gauge
comes from CholeskyQR2 frames of all-reduced Grams: two ``r x r`` all-reduces per step and bucket
(one for RefLoRA-S), equal to one process to rounding.
"""

from __future__ import annotations

from typing import Any

import torch

from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.base import PairOptimizer
from geolora.optim.gauge import (
    GAUGE_POLICIES,
    Gauge,
    GaugeHook,
    balanced_with_spectrum,
    reflora_preconditioner,
    scalar_factors,
)
from geolora.optim.geometry import FactorGeometry, FactorStep
from geolora.optim.manifold_pair import _cluster_weights
from geolora.optim.preconditioners.factor import FactorAdamW
from geolora.optim.sharding import LOCAL, RowSum
from geolora.optim.validation import check_choice

__all__ = ["REFLORA_MODES", "RefLoRA", "RefLoRAGauge", "reflora_gradients"]

#: ``mode`` values: refactor the factors and move the state, or precondition the gradients.
REFLORA_MODES = ("refactor", "precondition")


def reflora_gradients(x: FactorPoint, g: FactorTangent, reduce: RowSum = LOCAL) -> FactorTangent:
    """The authors' preconditioned factor gradients ``(∇_M S*, ∇_N S*⁻¹)`` with
    ``S* = G_N⁻¹ # G_M`` (:func:`~geolora.optim.gauge.reflora_preconditioner`); ``g``'s dtype.
    Shapes ``(..., m, r)``, ``(..., n, r)`` (row-sharded: the local rows, ``reduce`` the bucket's
    reducer; ``S*`` is replicated, the products row-local)."""
    S, S_inv = reflora_preconditioner(x.M, x.N, reduce)
    return FactorTangent(g.M @ S.to(g.M.dtype), g.N @ S_inv.to(g.N.dtype))


class RefLoRAGauge(GaugeHook):
    """RefLoRA's refactoring as the template's gauge hook: after ``warmup_steps``, every step,
    the ``policy`` representative (``"balanced"``: the optimal refactoring, with the cluster
    average of equal singular values handed to the preconditioner; ``"scalar"``: RefLoRA-S);
    ``mode="precondition"`` preconditions the gradients instead and moves nothing. Per-group
    hyperparameters ``policy``, ``mode``, ``warmup_steps``. Runs on row shards (FSDP2): the
    frames by CholeskyQR2 through the reducer, ``‖M‖_F``, ``‖N‖_F`` reduced for the scalar
    policy; a policy registered in ``GAUGE_POLICIES`` by the user is refused there."""

    row_shards = True  # every sum over rows through the reducer; the state moves are row-local

    def __init__(
        self, policy: str = "balanced", mode: str = "refactor", warmup_steps: int = 100
    ) -> None:
        super().__init__()
        self.defaults = {"policy": policy, "mode": mode, "warmup_steps": warmup_steps}

    def validate(self, group: dict[str, Any]) -> None:
        check_choice("policy", group["policy"], tuple(sorted(GAUGE_POLICIES)))
        check_choice("mode", group["mode"], REFLORA_MODES)
        if group["mode"] == "precondition" and group["policy"] != "balanced":
            raise ValueError(
                "mode='precondition' is the authors' form of the full (balanced) RefLoRA; "
                "use policy='balanced' or mode='refactor'"
            )
        w = group["warmup_steps"]
        if not (isinstance(w, int) and not isinstance(w, bool) and w >= 0):
            raise ValueError(f"invalid warmup_steps: {w!r} (expected an integer >= 0)")

    def due(self, group: dict[str, Any], step: int) -> bool:
        return step > group["warmup_steps"]

    def apply(self, x, g, state, group, step, reduce: RowSum = LOCAL):
        if self.due(group, step) and group["mode"] == "precondition":
            return x, reflora_gradients(x, g, reduce), {}
        return super().apply(x, g, state, group, step, reduce)

    def choose(
        self, x: FactorPoint, group: dict[str, Any], reduce: RowSum = LOCAL
    ) -> tuple[FactorPoint, Gauge, dict]:
        policy = group["policy"]
        if policy != "balanced":
            if not reduce.sharded:
                new, gauge = GAUGE_POLICIES[policy](x.M, x.N)
            elif GAUGE_POLICIES[policy] is scalar_factors:
                new, gauge = scalar_factors(x.M, x.N, reduce)
            else:
                raise NotImplementedError(
                    f"RefLoRA(policy={policy!r}) does not run on row-sharded factors: the policy "
                    f"is a function of the whole factors; use policy='balanced' or 'scalar', or "
                    f"sharded='gather'"
                )
            return new, gauge, {}
        new, gauge, sig, ok = balanced_with_spectrum(x.M, x.N, reduce=reduce)
        average = _cluster_weights(sig.to(x.M.dtype))
        if average is None:
            return new, gauge, {}
        # only balanced elements have aligned columns
        eye = torch.eye(sig.shape[-1], dtype=x.M.dtype, device=x.M.device)
        return new, gauge, {"average": torch.where(ok[..., None, None], average, eye)}


class RefLoRA(PairOptimizer):
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
        super().__init__(
            params,
            FactorAdamW(betas=betas, eps=eps),
            FactorGeometry("euclidean"),
            FactorStep(weight_decay=weight_decay),
            lr=lr,
            gauge=RefLoRAGauge(policy, mode, warmup_steps),
            **kwargs,
        )
