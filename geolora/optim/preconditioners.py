"""Preconditioners on the matrix tangent space ``T_X`` (step 2 of the template, DESIGN.md).

A preconditioner maps the projected gradient ``ξ = P_T(∇_X f)`` (a
:class:`~geolora.manifolds.types.FixedRankTangent` relative to the current frame) to a descent
matrix ``Ẋ``; the move (lift or retraction) then projects ``Ẋ`` onto ``T_X`` and steps *against*
it: ``X⁺ ≈ X − lr · P_T(Ẋ)``. Its state lives in matrix space (dense ``m x n`` or factored
``(U, S, V, Up, Vp)``), never in factor coordinates, so every optimizer built from it is
transformation invariant when the move is (LoRA-S Theorem 1).

The output is one of: a ``FixedRankTangent`` (already tangent, relative to ``ctx.frame``), a
dense ``(..., m, n)`` tensor, or a :class:`LowRank` ``A Bᵀ``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from geolora.linalg import mm_t, transpose
from geolora.manifolds.frame import (
    Frame,
    addmm,
    project_dense,
    project_products,
    tangent_sqnorm,
    tangent_to_dense,
    tangent_to_factors,
)
from geolora.manifolds.types import FixedRankTangent


class LowRank(NamedTuple):
    """A matrix ``A Bᵀ`` in factored form (``A: (..., m, k)``, ``B: (..., n, k)``)."""

    A: Tensor
    B: Tensor


Descent = FixedRankTangent | Tensor | LowRank


@dataclass
class StepContext:
    """What a preconditioner may use besides its state: the frame of ``X`` and the metric norm.

    ``metric_norm(t)`` returns the norm of the horizontal lift of the tangent vector ``t`` under
    the optimizer's metric (one extra Sylvester solve), shape = batch shape.
    """

    frame: Frame
    m: int
    n: int
    r: int
    metric_norm: Any  # Callable[[FixedRankTangent], Tensor]


class Preconditioner(Protocol):
    """``init_state`` / ``update`` pair (optax's GradientTransformation, in the tangent space).

    A preconditioner may set ``functional_state = True`` when ``update`` never modifies the
    state tensors it is given in place (it assigns new tensors to the keys); the optimizer then
    hands it its persistent state buffers without a defensive copy
    (:attr:`geolora.optim.base.LoRAOptimizer.functional_state`).
    """

    name: str

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        """Zero state of one pair; ``like`` gives dtype and device."""
        ...

    def update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: StepContext, hp: dict, step: int
    ) -> Descent:
        """Update ``state`` (stacked over pairs, in place or by reassignment) and return the
        descent matrix for gradient ``xi`` at 1-based ``step``; ``hp`` = the param group."""
        ...


def _bias(beta: float, step: int, enabled: bool) -> float:
    return 1.0 - beta**step if enabled else 1.0


class IdentityPreconditioner:
    """``Ẋ = ξ``: Riemannian gradient descent on the quotient (lifted SGD)."""

    name = "identity"
    functional_state = True

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(self, state, xi, ctx, hp, step) -> Descent:
        return xi


def transport_factored(
    frame: Frame, U_old: Tensor, V_old: Tensor, t: FixedRankTangent
) -> FixedRankTangent:
    """Projection transport of a factored tangent vector stored at the old frame ``(U_old,
    V_old)`` onto the current tangent space: ``P_{T_X}(U_old S V_oldᵀ + Up V_oldᵀ + U_old Vpᵀ)``
    in O((m + n) r²) (the vector transport of Absil et al. 2008, §8.1.3).

    With ``Z`` that matrix and the ``r x r`` overlaps ``P_U = U_oldᵀ U``, ``P_V = V_oldᵀ V``,
    ``Q_V = Vpᵀ V``, ``R_U = Upᵀ U``: ``Z V = U_old (S P_V + Q_V) + Up P_V``,
    ``Zᵀ U = V_old (Sᵀ P_U + R_U) + Vp P_U`` and ``Uᵀ Z V = P_Uᵀ (S P_V + Q_V) + R_Uᵀ P_V``;
    then ``Up' = Z V − U S'``, ``Vp' = Zᵀ U − V S'ᵀ``.
    """
    U, V = frame.U, frame.V
    S, Up, Vp = t
    PU = transpose(U_old) @ U
    PV = transpose(V_old) @ V
    QV = transpose(Vp) @ V
    RU = transpose(Up) @ U
    CM = S @ PV + QV
    CN = transpose(S) @ PU + RU
    ZV = addmm(mm_t(Up, PV), U_old, CM)
    ZtU = addmm(mm_t(Vp, PU), V_old, CN)
    S_new = transpose(PU) @ CM + transpose(RU) @ PV
    Up_new = addmm(ZV, U, S_new, alpha=-1.0)
    Vp_new = addmm(ZtU, V, transpose(S_new), alpha=-1.0)
    return FixedRankTangent(S_new, Up_new, Vp_new)


class FactoredMomentum:
    """Heavy-ball / EMA first moment stored in factored form and transported by projection.

    ``m_t = β P_{T_t}(m_{t−1}) + c ξ_t`` with ``c = 1 − β`` (``dampening=True``, EMA) or ``c = 1``.
    Memory ``2(m + n) r + r²`` per pair (the frame ``U, V`` is stored with the coordinates).
    This is the invariant form of LoRA-S eq. 25: eq. 25 re-uses the old coordinates in the new
    frame, which depends on the factor gauge; projecting the represented matrix does not.
    """

    name = "momentum"
    functional_state = True

    def __init__(self, beta: float = 0.9, dampening: bool = False, prefix: str = "exp_avg") -> None:
        self.beta, self.dampening, self.prefix = beta, dampening, prefix

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        z = like.new_zeros
        p = self.prefix
        return {
            f"{p}_U": z(m, r),
            f"{p}_V": z(n, r),
            f"{p}_S": z(r, r),
            f"{p}_Up": z(m, r),
            f"{p}_Vp": z(n, r),
        }

    def update(self, state, xi, ctx, hp, step, beta: float | None = None) -> FixedRankTangent:
        p = self.prefix
        beta = self.beta if beta is None else beta
        c = (1.0 - beta) if self.dampening else 1.0
        if step == 1:
            mom = FixedRankTangent(c * xi.M, c * xi.Up, c * xi.Vp)
        else:
            old = FixedRankTangent(state[f"{p}_S"], state[f"{p}_Up"], state[f"{p}_Vp"])
            tr = transport_factored(ctx.frame, state[f"{p}_U"], state[f"{p}_V"], old)
            if c == 1.0:
                mom = FixedRankTangent(*(torch.add(b, a, alpha=beta) for a, b in zip(tr, xi)))
            else:
                mom = FixedRankTangent(*(a.mul(beta).add_(b, alpha=c) for a, b in zip(tr, xi)))
        state[f"{p}_U"], state[f"{p}_V"] = ctx.frame.U, ctx.frame.V
        state[f"{p}_S"], state[f"{p}_Up"], state[f"{p}_Vp"] = mom
        return mom


class HeavyBall:
    """Lifted heavy-ball momentum ``m_t = β T(m_{t−1}) + ξ_t``, ``Ẋ = m_t`` (or Nesterov
    ``ξ_t + β m_t``), transported by projection (see :class:`FactoredMomentum`)."""

    name = "heavy_ball"
    functional_state = True

    def __init__(self, momentum: float = 0.9, nesterov: bool = False) -> None:
        self.mom = FactoredMomentum(momentum, dampening=False, prefix="momentum")
        self.nesterov = nesterov

    def init_state(self, m, n, r, like):
        return self.mom.init_state(m, n, r, like)

    def update(self, state, xi, ctx, hp, step) -> Descent:
        m = self.mom.update(state, xi, ctx, hp, step, beta=hp.get("momentum", self.mom.beta))
        if self.nesterov:
            b = hp.get("momentum", self.mom.beta)
            return FixedRankTangent(*(torch.add(g, a, alpha=b) for g, a in zip(xi, m)))
        return m


class AdamPreconditioner:
    """Element-wise Adam on the projected gradient (LoRA-S eq. 13, Alg. 2 / Alg. 4).

    ``m_t = β₁ m_{t−1} + (1 − β₁) ξ_t``, ``v_t = β₂ v_{t−1} + (1 − β₂) ξ_t²`` (entries of the
    dense ``m x n`` matrix ξ), ``Ẋ = m̂_t / (sqrt(v̂_t) + ε)`` with bias corrections
    ``m̂ = m / (1 − β₁ᵗ)``, ``v̂ = v / (1 − β₂ᵗ)`` (Adam; the paper's box omits them and ε — set
    ``bias_correction=False, eps=0`` for the box verbatim).

    * ``low_memory=False`` (Alg. 2): ``m`` and ``v`` dense, ``2mn`` floats.
    * ``low_memory=True`` (Alg. 4): ``m`` factored and transported by projection
      (:class:`FactoredMomentum`), ``v`` dense: ``mn + 2(m + n) r + r²`` floats.
    * ``riemannian_second_moment=True`` (LoRA-S §4.2): accumulate
      ``(‖ξ‖_g / ‖ξ‖_F) ξ²`` instead of ``ξ²``, ``‖ξ‖_g`` the metric norm of the lift.
    Hyperparameters read from the group: ``betas``, ``eps``.

    Cost per step (``m x n`` passes): ξ written once (``A Bᵀ`` of its width-2r factors), the
    moments updated out of place (the state tensors are never modified in place,
    ``functional_state``), ``sqrt(v)`` written into ξ's buffer, one division;
    ``Ẋ = c m / (sqrt(v) + ε √(1 − β₂ᵗ))`` with ``c = √(1 − β₂ᵗ) / (1 − β₁ᵗ)`` (Adam's bias
    corrections, rearranged) is projected onto ``T_X`` here (two ``m x n`` by ``r`` products)
    and ``c`` applied to the ``r``-wide result. On CPU the pairs are processed in blocks of
    :data:`DENSE_BLOCK_BYTES` so that ξ's block and the temporaries stay in cache (the values do
    not depend on the blocking). Returns the projected descent (a ``FixedRankTangent``).
    """

    name = "adam"
    functional_state = True

    def __init__(
        self,
        low_memory: bool = False,
        riemannian_second_moment: bool = False,
        bias_correction: bool = True,
    ) -> None:
        self.low_memory = low_memory
        self.riemannian_second_moment = riemannian_second_moment
        self.bias_correction = bias_correction
        self._mom = FactoredMomentum(dampening=True, prefix="exp_avg")

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        st = {"exp_avg_sq": like.new_zeros(m, n)}
        if self.low_memory:
            st.update(self._mom.init_state(m, n, r, like))
        else:
            st["exp_avg"] = like.new_zeros(m, n)
        return st

    def update(self, state, xi, ctx, hp, step) -> Descent:
        if state["exp_avg_sq"].dim() != 3:  # the blocked loop runs over one batch dim
            return self._update_dense(state, xi, ctx, hp, step)
        beta1, beta2 = hp["betas"]
        eps = hp["eps"]
        frame = ctx.frame
        A, B = tangent_to_factors(frame, xi)  # ξ = A Bᵀ
        if self.low_memory:
            mom = self._mom.update(state, xi, ctx, hp, step, beta=beta1)
            Am, Bm = tangent_to_factors(frame, mom)
        ratio = None
        if self.riemannian_second_moment:
            fro = tangent_sqnorm(xi).sqrt()
            ratio = ctx.metric_norm(xi) / fro.clamp_min(torch.finfo(fro.dtype).tiny)
            ratio = ratio.to(A.dtype)
        bc1 = _bias(beta1, step, self.bias_correction)
        root2 = math.sqrt(_bias(beta2, step, self.bias_correction))
        v_old = state["exp_avg_sq"]
        v = torch.empty_like(v_old)
        m_old = None if self.low_memory else state["exp_avg"]
        m_new = None if m_old is None else torch.empty_like(m_old)
        ZV = torch.empty_like(frame.U)
        ZtU = torch.empty_like(frame.V)
        # Blocks of pairs whose dense work fits in cache (same values as one batched pass).
        rows = max(1, DENSE_BLOCK_BYTES // max(1, v[0].numel() * v.element_size()))
        if v.device.type != "cpu":
            rows = v.shape[0]  # cache blocking is a CPU matter; one pass on accelerators
        for lo in range(0, v.shape[0], rows):
            sl = slice(lo, lo + rows)
            xi_d = A[sl] @ transpose(B[sl])
            if m_old is not None:
                m_d = torch.lerp(m_old[sl], xi_d, 1 - beta1, out=m_new[sl])
            if ratio is None:
                torch.mul(v_old[sl], beta2, out=v[sl]).addcmul_(xi_d, xi_d, value=1 - beta2)
            else:
                sq = xi_d.mul_(xi_d).mul_(ratio[sl, None, None])
                torch.lerp(v_old[sl], sq, 1 - beta2, out=v[sl])
            if m_old is None:
                m_d = Am[sl] @ transpose(Bm[sl])
            denom = torch.sqrt(v[sl], out=xi_d).add_(eps * root2)  # ξ's block is free now
            Xd = torch.div(m_d, denom, out=denom)
            ZV[sl] = mm_t(Xd, frame.V[sl])
            ZtU[sl] = mm_t(transpose(Xd), frame.U[sl])
        state["exp_avg_sq"] = v
        if m_new is not None:
            state["exp_avg"] = m_new
        t = project_products(frame, ZV, ZtU)
        c = root2 / bc1
        return FixedRankTangent(c * t.M, c * t.Up, c * t.Vp)

    def _update_dense(self, state, xi, ctx, hp, step) -> Descent:
        """The same update in whole-tensor operations (any batch shape)."""
        beta1, beta2 = hp["betas"]
        eps = hp["eps"]
        dense = tangent_to_dense(ctx.frame, xi)  # ξ, (..., m, n)
        if self.low_memory:
            mom = self._mom.update(state, xi, ctx, hp, step, beta=beta1)
        else:
            state["exp_avg"] = m_dense = torch.lerp(state["exp_avg"], dense, 1 - beta1)
        v = state["exp_avg_sq"]
        if self.riemannian_second_moment:
            fro = tangent_sqnorm(xi).sqrt()
            ratio = ctx.metric_norm(xi) / fro.clamp_min(torch.finfo(fro.dtype).tiny)
            sq = dense.mul_(dense).mul_(ratio.to(dense.dtype)[..., None, None])
            state["exp_avg_sq"] = v = torch.lerp(v, sq, 1 - beta2)
        else:
            state["exp_avg_sq"] = v = torch.mul(v, beta2).addcmul_(dense, dense, value=1 - beta2)
        if self.low_memory:
            m_dense = tangent_to_dense(ctx.frame, mom)
        bc1 = _bias(beta1, step, self.bias_correction)
        root2 = math.sqrt(_bias(beta2, step, self.bias_correction))
        denom = torch.sqrt(v, out=dense).add_(eps * root2)  # ξ's buffer is free now
        t = project_dense(ctx.frame, torch.div(m_dense, denom, out=denom))
        c = root2 / bc1
        return FixedRankTangent(c * t.M, c * t.Up, c * t.Vp)


#: Bytes of one ``m x n`` block the dense Adam update processes at a time on CPU (pairs are
#: grouped so that a block stays in the L2 cache; results do not depend on it).
DENSE_BLOCK_BYTES = 1 << 20


__all__ = [
    "AdamPreconditioner",
    "Descent",
    "FactoredMomentum",
    "HeavyBall",
    "IdentityPreconditioner",
    "LowRank",
    "Preconditioner",
    "StepContext",
    "transport_factored",
]
