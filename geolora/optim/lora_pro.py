"""LoRA-Pro: factor updates whose induced change of ``ΔW`` is the (Adam-preconditioned) full
fine-tuning step projected onto what a LoRA step can reach.

Wang, Liang, He, Wang & Tan, "LoRA-Pro: Are Low-Rank Adapters Properly Optimized?", ICLR 2025,
arXiv:2407.18242 (Definition 2.1 equivalent gradient, Theorem 2.1 optimal factor gradients,
Theorem 2.3 the Sylvester equation fixing their free ``GL(r)`` part, Algorithm 1 with Adam);
authors' code: github.com/mrflogs/LoRA-Pro (``lorapro_full_adjustment`` in their DeepSpeed
ZeRO-2 optimizer).

Notation: ``ΔW = s B A`` (``B: (m, r)``, ``A: (r, n)``, ``s`` the group's ``scaling``), ``G`` the
gradient of the loss with respect to ``ΔW``; autograd gives ``∇_B = s G Aᵀ``, ``∇_A = s Bᵀ G``.
A step ``(B, A) ← (B − η g^B, A − η g^A)`` changes ``ΔW`` by ``−η g̃`` to first order, with the
*equivalent gradient* ``g̃ = s (B g^A + g^B A)`` (Def. 2.1). LoRA-Pro picks ``(g^A, g^B)``
minimising ``‖g̃ − G‖_F`` (Thm. 2.1)::

    g^A = (1/s²) (BᵀB)⁻¹ ∇_A + X A
    g^B = (1/s²) (I − B (BᵀB)⁻¹ Bᵀ) ∇_B (A Aᵀ)⁻¹ − B X

for any ``X ∈ R^{r×r}`` (the family is ``(g^A, g^B) + (X A, −B X)``, the orbit directions); then
``g̃ = P_T(G) = P_B G + G P_A − P_B G P_A``, the projection onto the tangent space of the
rank-r matrices at ``ΔW``. ``X`` is fixed by Thm. 2.3 (closest to the plain LoRA gradients)::

    BᵀB X + X A Aᵀ = −(1/s²) (BᵀB)⁻¹ ∇_A Aᵀ.

With Adam (Alg. 1) the moments are those of the equivalent gradient, full ``m × n`` matrices::

    m ← β₁ m + (1 − β₁) g̃,   v ← β₂ v + (1 − β₂) g̃²,   D = m̂ / (√v̂ + ε)
    (g^A, g^B) = Thm. 2.1 / 2.3 with (∇_A, ∇_B) replaced by (s Bᵀ D, s D Aᵀ)
    (B, A) ← (B − η g^B, A − η g^A)                        (plain SGD on the adjusted gradients)

so ``ΔW`` moves by ``−η P_T(D)``.

In geolora's terms (``M = B``, ``N = Aᵀ``, ``X = M Nᵀ = ΔW / s``): ``g̃ = ξ / s`` with
``ξ = P_T(∇_X f)`` the projected gradient, and ``(g^B, g^Aᵀ)`` is the horizontal lift of
``P_T(D) / s`` under the *flat* metric ``tr(ṀᵀṀ) + tr(ṄᵀṄ)``: both factor gradients in
Thm. 2.3 are horizontal for it (``Mᵀ∇_M = ∇_NᵀN``), so the ``X`` closest to them is the one of the
minimal-norm lift. LoRA-Pro is therefore :class:`~geolora.optim.lifted.LiftedOptimizer` with the
preconditioner :class:`LoRAProAdam` (Adam on ``ξ / s``, output divided by ``s``) and
:class:`~geolora.manifolds.metrics.FlatMetric` (whose lift solves the same Sylvester equation in
orthonormal coordinates). Not transformation invariant (the flat metric is not), although
``ΔW``'s first-order change ``−η P_T(D)`` is.

``lr`` is the authors' SGD learning rate: ``ΔW`` moves by ``lr · P_T(D)`` whatever ``s``, so a
learning rate transfers from their code (``2e-5`` for LLaMA-2-7B, rank 8, ``α = 16``).

Rank-deficient factors (LoRA's ``B = 0``): the full-rank lift divides by ``R_M``. While
``B A`` is rank deficient (``σ_r ≤ 10⁻³ σ_1``, the base class's test) the step follows the
authors' formulas verbatim with their damped inverses ``(BᵀB + δI)⁻¹``, ``(A Aᵀ + δI)⁻¹``,
``δ = 1e-8`` (:func:`lora_pro_step`): at ``B = 0`` this is their first-step branch
(``g̃ = G P_A``, only ``B`` moves). The Adam moments and the step count carry over to the
full-rank path. No robust start is needed (``robust_steps=0``).

Deviations from the authors' code:

* full rank: exact inverses (triangular solves with the QR factors of ``B``, ``Aᵀ`` and a float64
  eigen-solve of the Sylvester equation) instead of ``pinv(G + 1e-8 I)`` and a complex ``eig``
  based solver;
* rank deficient: the same damped formulas, plus ``δ`` in the Sylvester operator
  (``(BᵀB + δI) X + X (A Aᵀ + δI)``), which the authors' call leaves undamped — it only matters
  where both Gram matrices are singular, where their solve divides 0 by 0;
* ``v`` is accumulated in float32 (the authors cast ``g̃`` to bfloat16 for ``v``'s update);
* the authors' hyperparameters are fixed in their code (``β = (0.9, 0.999)``, ``ε = 1e-8``,
  scaling ``16/8``); here they are arguments, and weight decay (``decay`` as for
  :class:`~geolora.optim.lifted.LiftedOptimizer`, default 0 as in their runs) is available.

Memory per pair: the two dense moments, ``2 m n`` floats (the method's moments are those of
``m × n`` matrices, which no factored form represents exactly), as AdamS.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, solve_sylvester, sym, transpose
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.adamw import PendingAdamW
from geolora.optim.lifted import LiftedOptimizer
from geolora.optim.preconditioners import EquivalentGradientAdam
from geolora.optim.validation import validate_betas

__all__ = ["LORA_PRO_DAMPING", "LoRAPro", "LoRAProAdam", "lora_pro_step"]

#: The authors' δ in ``(BᵀB + δI)⁻¹``, ``(A Aᵀ + δI)⁻¹`` (rank-deficient steps only).
LORA_PRO_DAMPING = 1e-8


#: LoRA-Pro's preconditioner: Adam on the equivalent gradient (kept under its historical name).
LoRAProAdam = EquivalentGradientAdam


def _damped_inverse(G: Tensor, damping: float) -> Tensor:
    eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    return torch.linalg.inv(G + damping * eye)


def lora_pro_step(
    x: FactorPoint,
    grad: FactorTangent,
    scaling: float,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: int,
    betas: tuple[float, float],
    eps: float,
    damping: float = LORA_PRO_DAMPING,
) -> tuple[FactorTangent, Tensor, Tensor]:
    """One LoRA-Pro Adam step in the authors' dense form (Alg. 1 with Thm. 2.1 / 2.3, damped).

    ``x = (M, N) = (B, Aᵀ)``: ``(..., m, r)``, ``(..., n, r)``; ``grad = (∇_B, ∇_Aᵀ)`` from
    autograd (``∇_B = s G Aᵀ``, ``∇_A = s Bᵀ G``); ``exp_avg``, ``exp_avg_sq``: ``(..., m, n)``
    moments of the equivalent gradient (not modified); ``step``: 1-based. With
    ``I_B = (BᵀB + δI)⁻¹``, ``I_A = (A Aᵀ + δI)⁻¹``, ``P_B = B I_B Bᵀ``:

    ``g̃ = (1/s) (B I_B ∇_A + (I − P_B) ∇_B I_A A)``; Adam gives ``D``; with
    ``ĝ_A = s Bᵀ D``, ``ĝ_B = s D Aᵀ``: ``(BᵀB + δI) X + X (A Aᵀ + δI) = −(1/s²) I_B ĝ_A Aᵀ``,
    ``g^A = (1/s²) I_B ĝ_A + X A``, ``g^B = (1/s²) (I − P_B) ĝ_B I_A − B X``.

    Returns ``((g^B, g^Aᵀ), m, v)`` — the factor velocities in ``(M, N)`` layout (the step is
    ``(M, N) ← (M − η g^B, N − η g^Aᵀ)``) and the new moments. Valid at any rank (``B = 0``
    included: then ``g̃ = G P_A`` and ``g^A = 0``); ``δ = 0`` gives the exact Thm. 2.1 / 2.3
    formulas at full rank. The ``r x r`` work is done in float64.
    """
    s = float(scaling)
    wd = torch.float64
    M, N = x.M, x.N
    dt = M.dtype
    M64, N64 = M.to(wd), N.to(wd)
    IB = _damped_inverse(sym(transpose(M64) @ M64), damping)
    IA = _damped_inverse(sym(transpose(N64) @ N64), damping)
    # P_B Z = B I_B Bᵀ Z; the equivalent gradient in factored form (g̃ is m x n by nature):
    # g̃ = (1/s) [B I_B ∇_A + ∇_B I_A A − B I_B Bᵀ ∇_B I_A A].
    gA = transpose(grad.N).to(wd)  # ∇_A: (r, n)
    gB = grad.M.to(wd)  # ∇_B: (m, r)
    left = gB @ IA  # ∇_B I_A
    left = left - M64 @ (IB @ (transpose(M64) @ left))  # (I − P_B) ∇_B I_A
    equiv = (M64 @ (IB @ gA) + left @ transpose(N64)) / s
    b1, b2 = betas
    m_new = torch.lerp(exp_avg.to(wd), equiv, 1 - b1)
    v_new = exp_avg_sq.to(wd) * b2 + (1 - b2) * equiv * equiv
    bc1 = 1 - b1**step
    bc2 = 1 - b2**step
    D = (m_new / bc1) / (v_new.sqrt() / math.sqrt(bc2) + eps)
    hA = s * (transpose(M64) @ D)  # ĝ_A: (r, n)
    hB = s * (D @ N64)  # ĝ_B: (m, r)
    eye = torch.eye(IB.shape[-1], dtype=wd, device=IB.device)
    GM = sym(transpose(M64) @ M64) + damping * eye
    GN = sym(transpose(N64) @ N64) + damping * eye
    Xs = solve_sylvester(GM, GN, -(IB @ hA @ N64) / (s * s))
    vel_A = (IB @ hA) / (s * s) + Xs @ transpose(N64)  # g^A: (r, n)
    vel_B = hB @ IA
    vel_B = (vel_B - M64 @ (IB @ (transpose(M64) @ vel_B))) / (s * s) - M64 @ Xs  # g^B
    vel = FactorTangent(vel_B.to(dt), transpose(vel_A).to(dt))
    return vel, m_new.to(exp_avg.dtype), v_new.to(exp_avg_sq.dtype)


class LoRAPro(LiftedOptimizer):
    """LoRA-Pro with Adam (Wang et al., ICLR 2025, Alg. 1; module docstring).

    ``g̃ = P_T(G)``; dense Adam moments of ``g̃``; ``D = m̂ / (√v̂ + ε)``; the factors move by the
    minimal-norm (flat-metric) lift of ``P_T(D) / s`` times ``lr``, so that ``ΔW = s B A`` moves by
    ``−lr · P_T(D)`` to first order.

    Args:
        params: param groups (see :mod:`geolora.optim.base`); a pair's ``scaling`` is ``s``.
        lr: learning rate of the authors' outer SGD step (``ΔW`` units, independent of ``s``).
        betas, eps: Adam's ``(β₁, β₂)`` and ε (the authors' fixed values by default).
        weight_decay: decoupled decay λ ≥ 0 of the factors (0 in the authors' runs).
        robust_steps: AdamW warm-up steps (default 0: LoRA-Pro runs from ``B = 0`` itself).
        **kwargs: :class:`~geolora.optim.lifted.LiftedOptimizer` options (``decay``,
            ``qr_method``, ``nonfinite``, ``foreach``, ``other_*``); the metric is fixed to
            ``"flat"``.

    Memory per pair: ``2 m n`` (dense moments). Not transformation invariant.
    """

    def __init__(
        self,
        params,
        lr: float = 2e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        for key in ("metric", "damping", "preconditioner"):
            if key in kwargs:
                raise TypeError(
                    f"LoRAPro got {key}={kwargs[key]!r}: its lift is the flat (minimal-norm) one "
                    f"of Theorem 2.3 and its preconditioner is Adam on the equivalent gradient"
                )
        validate_betas("betas", betas)
        super().__init__(
            params,
            LoRAProAdam(),
            metric="flat",
            lr=lr,
            weight_decay=weight_decay,
            robust_steps=robust_steps,
            extra_defaults={"betas": tuple(betas), "eps": eps},
            **kwargs,
        )

    def _robust_update(self, group, st, factors, grads, label):
        """Inside ``robust_steps``: the AdamW robust start. After it, a pair whose ``B A`` is rank
        deficient takes the authors' damped step (:func:`lora_pro_step`) instead, with the same
        Adam moments as the full-rank path (computed on copies, written with the step)."""
        if int(st["robust_step"].item() if "robust_step" in st else 0) < group["robust_steps"]:
            return super()._robust_update(group, st, factors, grads, label)
        B, A = factors
        cdt = compute_dtype(B.dtype)
        new_state: dict[str, Any] = {"pair": True}
        if "pair" not in st:
            new_state.update(self._init_pair_state(group, B, A))
        moments = {**st, **new_state}
        x = FactorPoint(B.detach().to(cdt), transpose(A.detach()).to(cdt))
        gB = grads[0] if grads[0] is not None else torch.zeros_like(B)
        gA = grads[1] if grads[1] is not None else torch.zeros_like(A)
        g = FactorTangent(gB.to(cdt), transpose(gA).to(cdt))
        lam = group["weight_decay"]
        if lam and group["decay"] == "l2":
            # ∇_X (λ/2)‖X‖² = λX, i.e. (λ X N, λ Xᵀ M) on the factors, as ξ + λX on the
            # full-rank path
            g = FactorTangent(
                g.M + lam * x.M @ (transpose(x.N) @ x.N), g.N + lam * x.N @ (transpose(x.M) @ x.M)
            )
        step = st["step"] + 1 if "step" in st else torch.tensor(1.0)
        vel, m, v = lora_pro_step(
            x,
            g,
            group.get("scaling", 1.0),
            moments["exp_avg"],
            moments["exp_avg_sq"],
            int(step.item()),
            group["betas"],
            group["eps"],
        )
        lr, lam = group["lr"], group["weight_decay"]
        shrink = 1.0 - lr * lam if group["decay"] == "decoupled" else 1.0
        new = FactorPoint(shrink * x.M - lr * vel.M, shrink * x.N - lr * vel.N)
        new_state.update(exp_avg=m, exp_avg_sq=v, step=step)
        if "robust_step" not in st:
            new_state["robust_step"] = torch.tensor(0.0)
        return PendingAdamW.pair_write(group, label, B, A, new, st, new_state)
