"""LoRA-RITE: adaptive r×r matrix preconditioning in the orthonormal bases of the factors.

Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh & Kumar, "LoRA Done RITE: Robust Invariant
Transformation Equilibration for LoRA Optimization", ICLR 2025, arXiv:2410.20625 (§3.2
eqs. 11–17, Algorithm 1). Declared as ``(RITEPreconditioner, QuotientGeometry, OneSidedStep)``:
the preconditioner (:mod:`geolora.optim.preconditioners.rite`) holds the ``r x r`` moments and
their basis transport, the geometry the frames and unmagnified gradients, the move the update
``M ← M − η M̂ R_N⁻ᵀ``.
"""

from __future__ import annotations

from typing import Any

from geolora.optim.base import PairOptimizer
from geolora.optim.gauge import Rebalance
from geolora.optim.geometry import OneSidedStep, QuotientGeometry
from geolora.optim.preconditioners.rite import SECOND_MOMENT_MODES, RITEPreconditioner

__all__ = ["SECOND_MOMENT_MODES", "LoRARite"]


class LoRARite(PairOptimizer):
    """LoRA-RITE (Yen et al. 2025, Algorithm 1), transformation invariant.

    For the factor ``M`` (``N`` symmetrically, with the roles of the bases swapped), at step t:

    * frames ``M = U R_M``, ``N = V R_N`` (thin QR; the signs of ``diag R`` are immaterial,
      see below);
    * unmagnified gradient ``ḡ = ∇_M R_N⁻¹ = ∇_X V`` (eq. 11; ``R_N⁻¹`` from one float64
      triangular solve per step, then one product) and basis transport ``P = Vᵀ V_{t−1}``
      (line 5);
    * second moment ``V̄ = β₂ P V̄ Pᵀ + (1 − β₂) ḡᵀḡ`` (eq. 14 in EMA form, §3.2; ``"sum"`` mode:
      ``V̄ = P V̄ Pᵀ + ḡᵀḡ``, line 6 verbatim);
    * escaped mass ``ρ = β₂ (ρ + d_λ(V̄_{t−1}, P V̄_{t−1} Pᵀ))`` (eq. 15, line 7; ``"sum"``: no
      ``β₂``), ``d_λ(X₁, X₂) = maxᵢ |λᵢ(X₁) − λᵢ(X₂)|`` (sorted eigenvalues);
    * step ``S̄ = ḡ (V̂ + ρ̂ I)^{-1/2}`` (eq. 16, line 8), computed as ``ḡ Q diag(1/(√λ + ε)) Qᵀ``
      from ``eigh(V̂ + ρ̂ I) = Q Λ Qᵀ`` (r×r, float64);
    * first moment ``M̄ = β₁ M̄ Pᵀ + (1 − β₁) S̄`` (line 9);
    * ``M ← M − η (M̂ R_N⁻ᵀ + λ M)`` (eq. 17, line 10; ``λ`` decoupled weight decay).

    Hats are Adam's bias corrections ``/(1 − βᵗ)`` (``bias_correction=True``; the authors'
    PyTorch reimplementation does the same through bias-corrected decay rates). The box itself
    is ``second_moment="sum", bias_correction=False, eps=0, row_normalize=False``.

    Invariance (Theorem 2): from ``(M R, N R⁻ᵀ)`` the QR bases become ``U O``, ``V O'`` with
    ``O, O'`` orthogonal, so ``ḡ``, ``P``, ``V̄``, ``M̄`` change by the same orthogonal matrices,
    the spectra (``ρ``, ``ε``) do not change, and ``M̂ R_N⁻ᵀ`` becomes ``(M̂ R_N⁻ᵀ) R``: the ``X``
    trajectory is the same (to rounding). Weight decay scales both factors by the same number,
    which commutes with the gauge. The special case ``O = diag(±1)`` (the QR's sign convention)
    is exact in floating point, so the bases are used without a sign fix.

    Zero-initialised ``B`` (``M = 0``, ``R_M`` singular): by default the base class's robust
    start takes AdamW steps until both factors have full rank (``robust_steps`` more steps if
    asked). With ``pinv=True`` the inverses ``R⁻¹`` are Moore–Penrose pseudo-inverses, as in the
    authors' code, and RITE runs from the first step (``M``'s unmagnified gradient is exact,
    ``N`` receives ``ḡ_N = ∇_N R_M⁺ = 0`` until ``M ≠ 0``).

    Defaults from the paper (Table 5): ``betas=(0.9, 0.999)``, ``weight_decay=0``. The paper has
    no ε; ``eps=1e-6`` is the authors' PyTorch default, added to ``√λ`` like Adam's ε, in the
    unmagnified (gauge-free) coordinates. ``lr=1e-3`` and ``row_normalize=True`` are the
    authors' PyTorch reimplementation's: its second moment is ``ḡᵀḡ / rows`` (``rows`` = ``m``
    for ``M``, ``n`` for ``N``), which makes the step ``√rows`` times the paper's at the same
    ``lr`` and puts the learning rate near Adam's, so learning rates from that code transfer.
    The paper's ``ḡᵀḡ`` (eq. 14) is ``row_normalize=False``.
    Memory per pair: ``2(m + n) r`` (first moments) + ``(m + n) r`` (previous bases) + ``2r²``.

    Args:
        params: param groups (LoRA pairs ``{"params": [B, A], "lora_pair": True}`` and others).
        lr: learning rate η.
        betas: ``(β₁, β₂)``.
        eps: ε ≥ 0 added to the square roots of the eigenvalues.
        weight_decay: decoupled decay λ ≥ 0 of both factors.
        second_moment: ``"ema"`` (default) or ``"sum"`` (Adagrad accumulation of the box).
        escaped_mass: add ``ρ I`` (line 7); ``False`` drops it.
        bias_correction: Adam bias corrections of the EMAs.
        row_normalize: use ``ḡᵀḡ / rows`` as in the authors' PyTorch code (``False``: eq. 14).
        pinv: pseudo-inverses of ``R`` (runs from ``B = 0`` without robust start).
        qr_method: QR for the bases (see :func:`geolora.linalg.qr_pos`).
        rebalance_every, rebalance_threshold: function-preserving rebalancing of drifted pairs
            (:class:`~geolora.optim.gauge.Rebalance`); ``rebalance_every=0`` switches it off.
        **kwargs: :class:`~geolora.optim.base.LoRAOptimizer` options.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        *,
        second_moment: str = "ema",
        escaped_mass: bool = True,
        bias_correction: bool = True,
        row_normalize: bool = True,
        pinv: bool = False,
        qr_method: str = "auto",
        rebalance_every: int = 100,
        rebalance_threshold: float = 10.0,
        **kwargs: Any,
    ) -> None:
        pre = RITEPreconditioner(
            betas=betas,
            eps=eps,
            second_moment=second_moment,
            escaped_mass=escaped_mass,
            bias_correction=bias_correction,
            row_normalize=row_normalize,
        )
        # No QR sign fix: RITE is exactly covariant under the sign flips U → U D.
        geometry = QuotientGeometry(qr_method=qr_method, sign_fix=False)
        super().__init__(
            params,
            pre,
            geometry,
            OneSidedStep(weight_decay=weight_decay),
            lr=lr,
            defaults={"pinv": pinv},
            gauge=Rebalance(rebalance_every, rebalance_threshold),
            **kwargs,
        )
