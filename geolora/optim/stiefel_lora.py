"""Stiefel-LoRA: ``B`` on the Stiefel manifold (Riemannian Adam), ``A`` Euclidean (AdamW).

Park et al., "Riemannian optimization for LoRA on the Stiefel manifold" (2025;
``papers/stiefel-lora-abstract.txt``): constraining ``BᵀB = I`` removes the basis redundancy of
``B`` and keeps its effective rank full; ``A`` carries the scale of ``ΔW = s B A``.

Design: as LoRAM (:mod:`geolora.optim.loram`), the optimizer owns the point — ``(B, Aᵀ)`` in the
compute dtype, ``B ∈ St(m, r)`` — in the pair's state and writes the model's factors back every
step, so low-precision parameters never break the constraint. Autograd's gradients are directly
the factor gradients of the point (``∇_B = ∇_X Aᵀ``, ``∇_A = Bᵀ∇_X``).

Entering the manifold re-factors ``X = B A`` without changing it: ``B = Q R`` (sign-fixed
Householder QR), point ``(Q, R A)``; on that first step the gradients of the old factors convert
exactly as ``∇_Q = ∇_B Rᵀ``, ``∇_{RA}ᵀ = ∇_Aᵀ R⁻¹``. A rank-deficient ``B`` (``R`` singular) is
entered without an update (re-factoring only, same ``X``); ``B = 0`` (LoRA's zero init, a zero
product) becomes a deterministic random orthonormal ``Q`` seeded by the shape and the pair's name,
with ``A = 0``. No robust AdamW start is needed.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, qf, qr_pos, transpose
from geolora.manifolds.stiefel import Stiefel
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.adamw import adamw_update_
from geolora.optim.loram import ManifoldPairOptimizer, rank_deficient, right_solve
from geolora.optim.riemannian import riemannian_adam_update
from geolora.retractions.stiefel import STIEFEL_RETRACTIONS

__all__ = ["StiefelLoRA", "orthonormal_init"]


def orthonormal_init(m: int, r: int, name: str | None = None, *, like: Tensor) -> Tensor:
    """A deterministic random point of ``St(m, r)``: ``qf(G)`` of a Gaussian ``G`` drawn (in float64
    on the CPU) from a generator seeded by ``(m, r)`` and the CRC32 of ``name``; returned with
    ``like``'s dtype and device."""
    seed = (1_000_003 * m + 7919 * r + zlib.crc32((name or "").encode())) % (2**63)
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, r, dtype=torch.float64, generator=gen)
    return qf(G, "householder").to(dtype=like.dtype, device=like.device)


class StiefelLoRA(ManifoldPairOptimizer):
    """``B`` by Riemannian Adam on ``St(m, r)``, ``A`` by AdamW (Stiefel-LoRA, module docstring).

    Per pair, with point ``(B, A)``, ``BᵀB = I``::

        g_B = ∇_B − B sym(Bᵀ∇_B)                                (egrad2rgrad, embedded metric)
        m_B ← β₁ m_B + (1−β₁) g_B;  v_B ← β₂ v_B + (1−β₂) ‖g_B‖²  (or g_B ⊙ g_B, coordinate_wise)
        B, m_B ← retr_transp(B, −lr m̂_B / (sqrt(v̂_B) + ε), m_B)   (QR retraction by default)
        A ← AdamW(A, ∇_A; lr, betas, eps, weight_decay)          (torch.optim.AdamW's update)

    The B step is geoopt's ``RiemannianAdam`` (Bécigneul & Ganea 2019), see
    :func:`geolora.optim.riemannian.riemannian_adam_update`; ``retraction`` picks ``"qr"``,
    ``"polar"`` or ``"cayley"`` (:class:`~geolora.manifolds.stiefel.Stiefel`). Weight decay acts on
    ``A`` only (``B`` has fixed norm). The abstract states no hyperparameters: the defaults are
    Adam's (``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``), ``weight_decay=0``, norm-based
    second moment for ``B`` (geoopt's), Adam's bias correction for both. Not transformation
    invariant (``A``'s coordinates depend on the basis ``B``).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        coordinate_wise: bool = False,
        retraction: str = "qr",
        bias_correction: bool = True,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "coordinate_wise": coordinate_wise,
            "retraction": retraction,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults, robust_steps=robust_steps, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        self._validate_adam(group)
        if group["retraction"] not in STIEFEL_RETRACTIONS:
            raise ValueError(
                f"invalid retraction: {group['retraction']!r} (expected one of "
                f"{sorted(STIEFEL_RETRACTIONS)})"
            )

    def _entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        return "refactor" if rank_deficient(B) else "enter"

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        cd = compute_dtype(B.dtype)
        b, n_ = B.detach().to(cd), transpose(A.detach()).to(cd)
        m, r = b.shape
        n = n_.shape[0]
        if not bool(b.any()):  # zero product from B = 0: any orthonormal B, A = 0
            q, np_ = orthonormal_init(m, r, group.get("name"), like=b), torch.zeros_like(n_)
        else:
            q, rb = qr_pos(b, "householder")  # B = Q R exactly, also when B is rank deficient
            np_ = n_ @ transpose(rb)  # (R A)ᵀ
        sq_shape = (m, r) if group["coordinate_wise"] else (1, 1)
        z = torch.zeros
        kw = {"dtype": cd, "device": b.device}
        return {
            "B": q,
            "N": np_,
            "exp_avg_B": z(m, r, **kw),
            "exp_avg_sq_B": z(*sq_shape, **kw),
            "exp_avg_A": z(n, r, **kw),
            "exp_avg_sq_A": z(n, r, **kw),
        }

    def _point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        return FactorPoint(state["B"], state["N"])

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        q, np_ = state["B"], state["N"]
        if step == 1:  # (M, N) are the factors the manifold was entered from: M = Q R
            rb = transpose(q) @ x.M
            g_q, g_np = g.M @ transpose(rb), right_solve(g.N, rb)
        else:
            g_q, g_np = g.M, g.N
        m, r = q.shape[-2:]
        man = Stiefel(m, r, retraction=group["retraction"])
        q_new, exp_avg, exp_avg_sq, _ = riemannian_adam_update(
            man,
            q,
            man.egrad2rgrad(q, g_q),
            state["exp_avg_B"],
            state["exp_avg_sq_B"],
            step=step,
            lr=group["lr"],
            betas=group["betas"],
            eps=group["eps"],
            coordinate_wise=group["coordinate_wise"],
            bias_correction=group["bias_correction"],
        )
        adamw_update_(
            np_,
            g_np,
            state["exp_avg_A"],
            state["exp_avg_sq_A"],
            step,
            group["lr"],
            group["betas"],
            group["eps"],
            group["weight_decay"],
        )
        state["B"], state["exp_avg_B"], state["exp_avg_sq_B"] = q_new, exp_avg, exp_avg_sq
        return self._point_factors(state)
