"""LoRA-RITE's preconditioner: adaptive ``r x r`` matrix moments in the orthonormal bases.

Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh & Kumar, "LoRA Done RITE: Robust Invariant
Transformation Equilibration for LoRA Optimization", ICLR 2025, arXiv:2410.20625, §3.2
eqs. 11–17, Algorithm 1. The paper writes ``Z = A Bᵀ``; in geolora's convention (``X = M Nᵀ``,
``M = lora_B``, ``N = lora_Aᵀ``) the paper's ``A`` is our ``M`` and its ``B`` is our ``N``; the
``M``-moments live in the basis of ``N`` and vice versa.

Input: the unmagnified gradients ``ḡ_M = ∇_X V``, ``ḡ_N = ∇_Xᵀ U`` (``wants = "products"``;
eq. 11). Output: the one-sided direction ``OneSided(M̄, N̄, 1 − β₁ᵗ)``, i.e.
``Ẋ = (M̄ Vᵀ + U N̄ᵀ) / (1 − β₁ᵗ)``; with :class:`~geolora.optim.geometry.OneSidedStep` this is
Algorithm 1 (``M ← M − η M̂ R_N⁻ᵀ``), with :class:`~geolora.optim.geometry.Lift` a RITE step
lifted under a quotient metric.

Basis transport (the preconditioner's documented transport): the state is stored with the bases
``(U, V)`` it lives in; at the next update ``P = Vᵀ V_old`` (and ``Uᵀ U_old``) maps the stored
``r x r`` second moment ``V̄ → P V̄ Pᵀ`` and the first moment ``M̄ → M̄ Pᵀ`` (Algorithm 1,
lines 5–6, 9); the eigenvalue change of the transport is the escaped mass (line 7).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import addmm_t, eigh_small, eigvalsh_small, gram64, mm_t, sym, transpose
from geolora.optim.preconditioners.base import OneSided, Products
from geolora.optim.sharding import LOCAL, RowSum
from geolora.optim.validation import check_bool, check_choice

__all__ = ["SECOND_MOMENT_MODES", "RITEPreconditioner"]

SECOND_MOMENT_MODES = ("ema", "sum")


class RITEPreconditioner:
    """LoRA-RITE's lines 5–9 (module docstring), for both factors at once.

    * ``V̄ = β₂ P V̄ Pᵀ + (1 − β₂) ḡᵀḡ`` (eq. 14 in EMA form; ``"sum"``: ``V̄ = P V̄ Pᵀ + ḡᵀḡ``,
      line 6 verbatim), ``ḡᵀḡ`` accumulated in float64 (divided by the row count with
      ``row_normalize``, as the authors' PyTorch code does);
    * escaped mass ``ρ = β₂ (ρ + d_λ(V̄_{t−1}, P V̄_{t−1} Pᵀ))`` (eq. 15, line 7),
      ``d_λ(X₁, X₂) = maxᵢ |λᵢ(X₁) − λᵢ(X₂)|``;
    * ``S̄ = ḡ (V̂ + ρ̂ I)^{-1/2}`` from ``eigh(V̂ + ρ̂ I) = Q Λ Qᵀ`` (float64; ε added to ``√λ``)
      (eq. 16, line 8);
    * ``M̄ = β₁ M̄ Pᵀ + (1 − β₁) S̄`` (line 9).

    Hats are Adam's bias corrections (``bias_correction``). State per pair: ``basis_U: (m, r)``,
    ``basis_V: (n, r)``, ``exp_avg_M: (m, r)``, ``exp_avg_N: (n, r)``, ``exp_avg_sq_M``,
    ``exp_avg_sq_N: (r, r)`` and ``escaped_M``, ``escaped_N: ()`` (float64). The sign
    convention of the bases is immaterial: with ``U D`` (``D = diag(±1)``) every quantity changes
    by the exact flips ``D``, so frames without a sign fix give the same iterates.
    """

    name = "rite"
    #: moments in orthonormal bases, carried across a change of basis by the transport P
    gauge_rules: dict[str, str] = {}
    wants = "products"
    functional_state = True
    #: row-sharded factors: P and the gradient Grams through the point's reducer (one
    #: all-reduce), everything else row-local or r×r
    row_shards = True
    #: which factor's rows each state tensor holds (``None``: ``r x r`` or scalar)
    state_sides: dict[str, str | None] = {
        "basis_U": "M",
        "exp_avg_M": "M",
        "basis_V": "N",
        "exp_avg_N": "N",
        "exp_avg_sq_M": None,
        "exp_avg_sq_N": None,
        "escaped_M": None,
        "escaped_N": None,
    }

    def __init__(
        self,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        second_moment: str = "ema",
        escaped_mass: bool = True,
        bias_correction: bool = True,
        row_normalize: bool = True,
    ) -> None:
        self.defaults = {
            "betas": tuple(betas),
            "eps": eps,
            "second_moment": second_moment,
            "escaped_mass": escaped_mass,
            "bias_correction": bias_correction,
            "row_normalize": row_normalize,
        }

    def validate(self, hp: dict[str, Any]) -> None:
        check_choice("second_moment", hp["second_moment"], SECOND_MOMENT_MODES)
        for key in ("escaped_mass", "bias_correction", "row_normalize"):
            check_bool(key, hp[key])

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        z = torch.zeros
        cdt, dev = like.dtype, like.device
        return {
            # Bases of the previous step (zero: P = 0 at step 1, where the moments are zero).
            "basis_U": z(m, r, dtype=cdt, device=dev),
            "basis_V": z(n, r, dtype=cdt, device=dev),
            "exp_avg_M": z(m, r, dtype=cdt, device=dev),
            "exp_avg_N": z(n, r, dtype=cdt, device=dev),
            # r×r second moments and escaped masses in float64.
            "exp_avg_sq_M": z(r, r, dtype=torch.float64, device=dev),
            "exp_avg_sq_N": z(r, r, dtype=torch.float64, device=dev),
            "escaped_M": z((), dtype=torch.float64, device=dev),
            "escaped_N": z((), dtype=torch.float64, device=dev),
        }

    def update(self, state, grad: Products, ctx, hp, step: int) -> OneSided:
        U, V = ctx.frame.U, ctx.frame.V
        gM_bar, gN_bar = grad.ZV, grad.ZtU
        # The M-moments live in the basis of N (P_M = Vᵀ V_old) and vice versa. P and the
        # gradient Grams are the step's only sums over rows: one reduction for row shards.
        reduce: RowSum = getattr(ctx.point, "reduce", LOCAL)
        P_N, P_M = transpose(U) @ state["basis_U"], transpose(V) @ state["basis_V"]
        if reduce.sharded:  # the transports travel with the float64 Grams: one buffer, one call
            P_N, P_M = P_N.to(torch.float64), P_M.to(torch.float64)
        (P_N, gram_M), (P_M, gram_N) = reduce(M=[P_N, gram64(gM_bar)], N=[P_M, gram64(gN_bar)])
        rows = (reduce.rows("M", gM_bar.shape[-2]), reduce.rows("N", gN_bar.shape[-2]))
        P = torch.stack([P_M, P_N]).to(U.dtype)
        precond = _preconditioners(hp, state, torch.stack([gram_M, gram_N]), rows, P, step)
        beta1 = hp["betas"][0]
        # M̄ = β₁ M̄_old Pᵀ + (1 − β₁) ḡ (V̂ + ρ̂ I)^{-1/2}: two fused products per factor.
        moms = []
        for i, (side, gbar) in enumerate((("M", gM_bar), ("N", gN_bar))):
            mom = addmm_t(
                mm_t(gbar, precond[i]), state[f"exp_avg_{side}"], transpose(P[i]), alpha=beta1
            )
            state[f"exp_avg_{side}"] = mom
            moms.append(mom)
        state["basis_U"], state["basis_V"] = U, V
        bc1 = 1.0 - beta1**step if hp["bias_correction"] else 1.0
        return OneSided(moms[0], moms[1], bc1)


def _preconditioners(
    hp: dict[str, Any],
    state: dict[str, Tensor],
    gram: Tensor,
    rows: tuple[int, int],
    P: Tensor,
    step: int,
) -> Tensor:
    """Lines 6–8 of Algorithm 1 for both factors at once (the ``r x r`` work stacked along a
    leading dim of size 2: ``M``, ``N``): updates the second moments and escaped masses in
    ``state`` and returns ``(1 − β₁)(V̂ + ρ̂ I)^{-1/2}`` of both, ``(2, ..., r, r)`` in the
    factors' dtype. ``gram``: the float64 Grams ``ḡᵀḡ`` of the unmagnified gradients, ``rows``
    their global row counts ``(m, n)``, ``P``: the basis transports ``(2, ..., r, r)``."""
    beta1, beta2 = hp["betas"]
    ema = hp["second_moment"] == "ema"
    wd = torch.float64
    P64 = P.to(wd)
    V_old = torch.stack([state["exp_avg_sq_M"], state["exp_avg_sq_N"]]).to(wd)
    V_tr = sym(P64 @ V_old @ transpose(P64))
    # (float64: the Grams' small eigenvalues set (V̂ + ρ̂ I)^{-1/2}, so they need more than the
    # u λ_max absolute accuracy of a float32 product)
    if hp["row_normalize"]:
        count = torch.tensor(rows, dtype=wd, device=gram.device)
        gram = gram / count.reshape((2,) + (1,) * (gram.dim() - 1))
    rho = torch.stack([state["escaped_M"], state["escaped_N"]]).to(wd)
    if hp["escaped_mass"]:
        lam_both = eigvalsh_small(torch.stack([V_old, V_tr]))
        rho = rho + (lam_both[0] - lam_both[1]).abs().amax(dim=-1)
    if ema:
        V_new = beta2 * V_tr + (1.0 - beta2) * gram
        rho = beta2 * rho
    else:
        V_new = V_tr + gram
    state["exp_avg_sq_M"], state["exp_avg_sq_N"] = V_new.unbind(0)
    state["escaped_M"], state["escaped_N"] = rho.unbind(0)
    bc2 = 1.0 - beta2**step if (hp["bias_correction"] and ema) else 1.0
    eye = torch.eye(V_new.shape[-1], dtype=wd, device=V_new.device)
    lam, Q = eigh_small((V_new + rho[..., None, None] * eye) / bc2)
    f = (1.0 - beta1) / (lam.clamp_min(0.0).sqrt() + hp["eps"])
    return ((Q * f.unsqueeze(-2)) @ transpose(Q)).to(P.dtype)
