"""LoRA-RITE: adaptive r×r matrix preconditioning in the orthonormal bases of the factors.

Yen et al. 2025, "LoRA Done RITE: Robust Invariant Transformation Equilibration for LoRA
Optimization" (papers/lora-rite.txt, §3.2 eqs. 11–17, Algorithm 1). The paper writes
``Z = A Bᵀ``; in geolora's convention (``X = M Nᵀ``, ``M = lora_B``, ``N = lora_Aᵀ``) the
paper's ``A`` is our ``M`` and its ``B`` is our ``N``. The update of ``M`` uses the basis of
``N`` and vice versa.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import (
    addmm_t,
    compute_dtype,
    eigh_small,
    eigvalsh_small,
    mm_t,
    qr_pos,
    sym,
    transpose,
)
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.base import LoRAOptimizer

SECOND_MOMENT_MODES = ("ema", "sum")

__all__ = ["LoRARite"]


class LoRARite(LoRAOptimizer):
    """LoRA-RITE (lora-rite.txt Algorithm 1), transformation invariant.

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
        **kwargs: Any,
    ) -> None:
        if qr_method not in ("auto", "householder", "cholesky"):
            raise ValueError(
                f"qr_method must be 'auto', 'householder' or 'cholesky', got {qr_method!r}"
            )
        self.qr_method = qr_method
        defaults = {
            "lr": lr,
            "betas": tuple(betas) if isinstance(betas, (tuple, list)) else betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "second_moment": second_moment,
            "escaped_mass": escaped_mass,
            "bias_correction": bias_correction,
            "row_normalize": row_normalize,
            "pinv": pinv,
        }
        super().__init__(params, defaults, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        if group["second_moment"] not in SECOND_MOMENT_MODES:
            raise ValueError(
                f"second_moment must be one of {SECOND_MOMENT_MODES}, got {group['second_moment']!r}"
            )
        for key in ("escaped_mass", "bias_correction", "row_normalize", "pinv"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key} must be a bool, got {type(group[key]).__name__}")

    functional_state = True  # _update_pairs only assigns new tensors to state keys

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        # Pseudo-inverses handle rank-deficient factors: no robust start needed.
        return not group.get("pinv", False)

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        m, r = B.shape
        n = A.shape[1]
        cdt = compute_dtype(B.dtype)
        z = torch.zeros
        kw = {"device": B.device}
        return {
            # Bases of the previous step (zero: P = 0 at step 1, where the moments are zero).
            "basis_U": z(m, r, dtype=cdt, **kw),
            "basis_V": z(n, r, dtype=cdt, **kw),
            "exp_avg_M": z(m, r, dtype=cdt, **kw),
            "exp_avg_N": z(n, r, dtype=cdt, **kw),
            # r×r second moments and escaped masses in float64.
            "exp_avg_sq_M": z(r, r, dtype=torch.float64, **kw),
            "exp_avg_sq_N": z(r, r, dtype=torch.float64, **kw),
            "escaped_M": z((), dtype=torch.float64, **kw),
            "escaped_N": z((), dtype=torch.float64, **kw),
        }

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        # Orthonormal bases of the factors, M = U R_M, N = V R_N (thin QR). The diagonal signs
        # of R are not fixed: with U D, D R_M (D = diag(±1)) every quantity below changes by the
        # exact sign flips D (ḡ → ḡ D, P → D P D', V̄ → D V̄ D, M̄ → M̄ D) and the update
        # M̄ R_N⁻ᵀ does not change (Theorem 2's invariance for O = D): the same iterates, also
        # from bases stored with the other convention (P always maps the stored basis).
        U, RM = qr_pos(x.M, self.qr_method, sign_fix=False)
        V, RN = qr_pos(x.N, self.qr_method, sign_fix=False)
        if group["pinv"]:
            inv_RN = torch.linalg.pinv(RN)
            inv_RM = torch.linalg.pinv(RM)
            out_M, out_N = transpose(inv_RN), transpose(inv_RM)
        else:
            # R⁻¹ of both factors in one triangular solve (r×r, float64): ∇_M R_N⁻¹ = ∇_X V is
            # then one product, and R⁻ᵀ fuses the last step M̂ R_N⁻ᵀ with the update.
            R64 = torch.stack([RN, RM]).to(torch.float64)
            eye = torch.eye(R64.shape[-1], dtype=R64.dtype, device=R64.device)
            inv_RN, inv_RM = torch.linalg.solve_triangular(R64, eye, upper=True).unbind(0)
            out_M, out_N = transpose(inv_RN), transpose(inv_RM)
        dt = x.M.dtype
        gM_bar = mm_t(g.M, inv_RN.to(dt))  # ∇_M R_N⁻¹ = ∇_X V
        gN_bar = mm_t(g.N, inv_RM.to(dt))  # ∇_N R_M⁻¹ = ∇_Xᵀ U
        # The M-moments live in the basis of N (P_M = Vᵀ V_old) and vice versa.
        P = torch.stack([transpose(V) @ state["basis_V"], transpose(U) @ state["basis_U"]])
        precond = self._preconditioners(group, state, (gM_bar, gN_bar), P, step)
        beta1 = group["betas"][0]
        # M̄ = β₁ M̄_old Pᵀ + (1 − β₁) ḡ (V̂ + ρ̂ I)^{-1/2}: two fused products per factor.
        moms = []
        for i, (side, gbar) in enumerate((("M", gM_bar), ("N", gN_bar))):
            mom = addmm_t(
                mm_t(gbar, precond[i]), state[f"exp_avg_{side}"], transpose(P[i]), alpha=beta1
            )
            state[f"exp_avg_{side}"] = mom
            moms.append(mom)
        state["basis_U"], state["basis_V"] = U, V
        # M ← (1 − ηλ) M − (η / (1 − β₁ᵗ)) M̄ R_N⁻ᵀ  (and N likewise), one product each.
        lr, lam = group["lr"], group["weight_decay"]
        bc1 = 1.0 - beta1**step if group["bias_correction"] else 1.0
        shrink = 1.0 - lr * lam
        M = addmm_t(x.M, moms[0], out_M.to(dt), beta=shrink, alpha=-lr / bc1)
        N = addmm_t(x.N, moms[1], out_N.to(dt), beta=shrink, alpha=-lr / bc1)
        return FactorPoint(M, N)

    @staticmethod
    def _preconditioners(
        group: dict[str, Any],
        state: dict[str, Tensor],
        gbars: tuple[Tensor, Tensor],
        P: Tensor,
        step: int,
    ) -> Tensor:
        """Lines 6–8 of Algorithm 1 for both factors at once (the ``r x r`` work stacked along a
        leading dim of size 2: ``M``, ``N``): updates the second moments and escaped masses in
        ``state`` and returns ``(1 − β₁)(V̂ + ρ̂ I)^{-1/2}`` of both, ``(2, ..., r, r)`` in the
        factors' dtype. ``P``: the basis transports ``(2, ..., r, r)``."""
        beta1, beta2 = group["betas"]
        ema = group["second_moment"] == "ema"
        wd = torch.float64
        P64 = P.to(wd)
        V_old = torch.stack([state["exp_avg_sq_M"], state["exp_avg_sq_N"]]).to(wd)
        V_tr = sym(P64 @ V_old @ transpose(P64))
        gram = torch.stack([_gram64(gbars[0]), _gram64(gbars[1])])
        if group["row_normalize"]:
            rows = torch.tensor([gbars[0].shape[-2], gbars[1].shape[-2]], dtype=wd)
            gram = gram / rows.to(gram.device).reshape((2,) + (1,) * (gram.dim() - 1))
        rho = torch.stack([state["escaped_M"], state["escaped_N"]]).to(wd)
        if group["escaped_mass"]:
            lam_both = eigvalsh_small(torch.stack([V_old, V_tr]))
            rho = rho + (lam_both[0] - lam_both[1]).abs().amax(dim=-1)
        if ema:
            V_new = beta2 * V_tr + (1.0 - beta2) * gram
            rho = beta2 * rho
        else:
            V_new = V_tr + gram
        state["exp_avg_sq_M"], state["exp_avg_sq_N"] = V_new.unbind(0)
        state["escaped_M"], state["escaped_N"] = rho.unbind(0)
        bc2 = 1.0 - beta2**step if (group["bias_correction"] and ema) else 1.0
        eye = torch.eye(V_new.shape[-1], dtype=wd, device=V_new.device)
        lam, Q = eigh_small((V_new + rho[..., None, None] * eye) / bc2)
        f = (1.0 - beta1) / (lam.clamp_min(0.0).sqrt() + group["eps"])
        return ((Q * f.unsqueeze(-2)) @ transpose(Q)).to(gbars[0].dtype)


def _gram64(a: Tensor) -> Tensor:
    """``aᵀ a`` accumulated in float64 (``(..., rows, r) -> (..., r, r)``): its small
    eigenvalues set the preconditioner ``(V̂ + ρ̂ I)^{-1/2}``, so they need more than the
    ``u λ_max`` absolute accuracy of a float32 product."""
    a64 = a.to(torch.float64)
    return transpose(a64) @ a64
