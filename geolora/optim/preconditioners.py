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

from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from geolora.manifolds.frame import Frame, project_lowrank, tangent_to_dense, tangent_to_factors
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
    """``init_state`` / ``update`` pair (optax's GradientTransformation, in the tangent space)."""

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

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {}

    def update(self, state, xi, ctx, hp, step) -> Descent:
        return xi


def transport_factored(
    frame: Frame, U_old: Tensor, V_old: Tensor, t: FixedRankTangent
) -> FixedRankTangent:
    """Projection transport of a factored tangent vector stored at the old frame ``(U_old,
    V_old)`` onto the current tangent space: ``P_{T_X}(U_old S V_oldᵀ + Up V_oldᵀ + U_old Vpᵀ)``
    in O((m + n) r²) (the vector transport of Absil et al. 2008, §8.1.3)."""
    old = Frame(U_old, frame.RM, V_old, frame.RN)
    A, B = tangent_to_factors(old, t)
    return project_lowrank(frame, A, B)


class FactoredMomentum:
    """Heavy-ball / EMA first moment stored in factored form and transported by projection.

    ``m_t = β P_{T_t}(m_{t−1}) + c ξ_t`` with ``c = 1 − β`` (``dampening=True``, EMA) or ``c = 1``.
    Memory ``2(m + n) r + r²`` per pair (the frame ``U, V`` is stored with the coordinates).
    This is the invariant form of LoRA-S eq. 25: eq. 25 re-uses the old coordinates in the new
    frame, which depends on the factor gauge; projecting the represented matrix does not.
    """

    name = "momentum"

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
            mom = FixedRankTangent(*(beta * a + c * b for a, b in zip(tr, xi)))
        state[f"{p}_U"], state[f"{p}_V"] = ctx.frame.U, ctx.frame.V
        state[f"{p}_S"], state[f"{p}_Up"], state[f"{p}_Vp"] = mom
        return mom


class HeavyBall:
    """Lifted heavy-ball momentum ``m_t = β T(m_{t−1}) + ξ_t``, ``Ẋ = m_t`` (or Nesterov
    ``ξ_t + β m_t``), transported by projection (see :class:`FactoredMomentum`)."""

    name = "heavy_ball"

    def __init__(self, momentum: float = 0.9, nesterov: bool = False) -> None:
        self.mom = FactoredMomentum(momentum, dampening=False, prefix="momentum")
        self.nesterov = nesterov

    def init_state(self, m, n, r, like):
        return self.mom.init_state(m, n, r, like)

    def update(self, state, xi, ctx, hp, step) -> Descent:
        m = self.mom.update(state, xi, ctx, hp, step, beta=hp.get("momentum", self.mom.beta))
        if self.nesterov:
            b = hp.get("momentum", self.mom.beta)
            return FixedRankTangent(*(g + b * a for g, a in zip(xi, m)))
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
    """

    name = "adam"

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
        beta1, beta2 = hp["betas"]
        eps = hp["eps"]
        dense = tangent_to_dense(ctx.frame, xi)
        sq = dense * dense
        if self.riemannian_second_moment:
            fro = dense.flatten(-2).norm(dim=-1)
            ratio = ctx.metric_norm(xi) / fro.clamp_min(torch.finfo(fro.dtype).tiny)
            sq = sq * ratio[..., None, None]
        v = state["exp_avg_sq"]
        v.mul_(beta2).add_(sq, alpha=1 - beta2)
        if self.low_memory:
            mom = self._mom.update(state, xi, ctx, hp, step, beta=beta1)
            m_dense = tangent_to_dense(ctx.frame, mom)
        else:
            m_dense = state["exp_avg"]
            m_dense.lerp_(dense, 1 - beta1)
        bc1 = _bias(beta1, step, self.bias_correction)
        bc2 = _bias(beta2, step, self.bias_correction)
        denom = (v / bc2).sqrt_().add_(eps)
        return m_dense / (bc1 * denom)


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
