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

from geolora.linalg import compute_dtype, sym, transpose, tri_solve_right
from geolora.manifolds.frame import make_frame
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.base import LoRAOptimizer, _check_range, validate_betas

SECOND_MOMENT_MODES = ("ema", "sum")

__all__ = ["LoRARite"]


class LoRARite(LoRAOptimizer):
    """LoRA-RITE (lora-rite.txt Algorithm 1), transformation invariant.

    For the factor ``M`` (``N`` symmetrically, with the roles of the bases swapped), at step t:

    * frames ``M = U R_M``, ``N = V R_N`` (sign-fixed thin QR, :func:`make_frame`);
    * unmagnified gradient ``ḡ = ∇_M R_N⁻¹ = ∇_X V`` (eq. 11) and basis transport
      ``P = Vᵀ V_{t−1}`` (line 5);
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
    is ``second_moment="sum", bias_correction=False, eps=0``.

    Invariance (Theorem 2): from ``(M R, N R⁻ᵀ)`` the QR bases become ``U O``, ``V O'`` with
    ``O, O'`` orthogonal, so ``ḡ``, ``P``, ``V̄``, ``M̄`` change by the same orthogonal matrices,
    the spectra (``ρ``, ``ε``) do not change, and ``M̂ R_N⁻ᵀ`` becomes ``(M̂ R_N⁻ᵀ) R``: the ``X``
    trajectory is the same (to rounding). Weight decay scales both factors by the same number,
    which commutes with the gauge.

    Zero-initialised ``B`` (``M = 0``, ``R_M`` singular): by default the base class's robust
    start takes AdamW steps until both factors have full rank (``robust_steps`` more steps if
    asked). With ``pinv=True`` the inverses ``R⁻¹`` are Moore–Penrose pseudo-inverses, as in the
    authors' code, and RITE runs from the first step (``M``'s unmagnified gradient is exact,
    ``N`` receives ``ḡ_N = ∇_N R_M⁺ = 0`` until ``M ≠ 0``).

    Defaults from the paper (Table 5): ``betas=(0.9, 0.999)``, ``weight_decay=0``. The paper has
    no ε; ``eps=1e-6`` is the authors' PyTorch default, added to ``√λ`` like Adam's ε, in the
    unmagnified (gauge-free) coordinates. The paper's ``ḡᵀḡ`` is not divided by the row count
    (the authors' PyTorch code divides by it; ``row_normalize=True`` does that, which
    multiplies the step by ``√m`` and brings the learning rate near Adam's).
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
        row_normalize: use ``ḡᵀḡ / rows`` as in the authors' PyTorch code.
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
        row_normalize: bool = False,
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
        validate_betas("betas", group["betas"])
        _check_range("eps", group["eps"], 0.0)
        _check_range("weight_decay", group["weight_decay"], 0.0)
        if group["second_moment"] not in SECOND_MOMENT_MODES:
            raise ValueError(
                f"second_moment must be one of {SECOND_MOMENT_MODES}, got {group['second_moment']!r}"
            )
        for key in ("escaped_mass", "bias_correction", "row_normalize", "pinv"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key} must be a bool, got {type(group[key]).__name__}")

    def _pair_phase(self, group: dict[str, Any], B: Tensor, A: Tensor) -> tuple | None:
        if group.get("pinv", False):
            # Pseudo-inverses handle rank-deficient factors: skip the rank check that would
            # send the pair to the AdamW robust start.
            self.state[B].setdefault("full_rank", True)
        return super()._pair_phase(group, B, A)

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
        frame = make_frame(x.M, x.N, self.qr_method)
        if group["pinv"]:
            pinv_RM = torch.linalg.pinv(frame.RM)
            pinv_RN = torch.linalg.pinv(frame.RN)
            gM_bar = g.M @ pinv_RN
            gN_bar = g.N @ pinv_RM
        else:
            gM_bar = tri_solve_right(g.M, frame.RN)  # ∇_M R_N⁻¹ = ∇_X V
            gN_bar = tri_solve_right(g.N, frame.RM)  # ∇_N R_M⁻¹ = ∇_Xᵀ U
        # The M-moments live in the basis of N (P_M = Vᵀ V_old) and vice versa.
        P_M = transpose(frame.V) @ state["basis_V"]
        P_N = transpose(frame.U) @ state["basis_U"]
        dM = self._factor_step(group, state, "M", gM_bar, P_M, step)
        dN = self._factor_step(group, state, "N", gN_bar, P_N, step)
        state["basis_U"], state["basis_V"] = frame.U, frame.V
        if group["pinv"]:
            dM = dM @ transpose(pinv_RN)
            dN = dN @ transpose(pinv_RM)
        else:
            dM = tri_solve_right(dM, frame.RN, transpose_r=True)  # M̂ R_N⁻ᵀ
            dN = tri_solve_right(dN, frame.RM, transpose_r=True)
        lr, lam = group["lr"], group["weight_decay"]
        return FactorPoint(x.M - lr * (dM + lam * x.M), x.N - lr * (dN + lam * x.N))

    @staticmethod
    def _factor_step(
        group: dict[str, Any],
        state: dict[str, Tensor],
        side: str,
        gbar: Tensor,
        P: Tensor,
        step: int,
    ) -> Tensor:
        """Lines 6–9 of Algorithm 1 for one factor; returns the bias-corrected ``M̄`` (..., rows, r)."""
        beta1, beta2 = group["betas"]
        ema = group["second_moment"] == "ema"
        wd = torch.float64
        P64 = P.to(wd)
        g64 = gbar.to(wd)
        V_old = state[f"exp_avg_sq_{side}"].to(wd)
        V_tr = sym(P64 @ V_old @ transpose(P64))
        gram = transpose(g64) @ g64
        if group["row_normalize"]:
            gram = gram / gbar.shape[-2]
        rho = state[f"escaped_{side}"].to(wd)
        if group["escaped_mass"]:
            d = (torch.linalg.eigvalsh(V_old) - torch.linalg.eigvalsh(V_tr)).abs().amax(dim=-1)
            rho = rho + d
        if ema:
            V_new = beta2 * V_tr + (1.0 - beta2) * gram
            rho = beta2 * rho
        else:
            V_new = V_tr + gram
        state[f"exp_avg_sq_{side}"] = V_new
        state[f"escaped_{side}"] = rho
        bc1 = 1.0 - beta1**step if group["bias_correction"] else 1.0
        bc2 = 1.0 - beta2**step if (group["bias_correction"] and ema) else 1.0
        eye = torch.eye(V_new.shape[-1], dtype=wd, device=V_new.device)
        lam, Q = torch.linalg.eigh((V_new + rho[..., None, None] * eye) / bc2)
        f = 1.0 / (lam.clamp_min(0.0).sqrt() + group["eps"])
        precond = (Q * f.unsqueeze(-2)) @ transpose(Q)  # (V̂ + ρ̂ I)^{-1/2}
        S = gbar @ precond.to(gbar.dtype)
        mom = beta1 * (state[f"exp_avg_{side}"] @ transpose(P)) + (1.0 - beta1) * S
        state[f"exp_avg_{side}"] = mom
        return mom / bc1
