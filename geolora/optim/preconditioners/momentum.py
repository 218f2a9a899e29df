"""Momentum on ``T_X`` in factored form, transported by projection (quotient geometries).

The first moment of a projected gradient is a tangent vector at an *earlier* point. It is stored
with the frame it lives in and, at the next update, moved to the current tangent space by the
projection transport of Absil, Mahony & Sepulchre, "Optimization Algorithms on Matrix
Manifolds", 2008, §8.1.3 (the invariant form of eq. 25 of Zheng & Wu, "LoRA-S: An Efficient Low
Rank Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview Guo2XGgxZA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from geolora.linalg import mm_t, transpose
from geolora.manifolds.frame import Frame, addmm
from geolora.manifolds.types import FixedRankTangent
from geolora.optim.sharding import LOCAL, RowSum

__all__ = ["FactoredMomentum", "HeavyBall", "transport_factored"]


def transport_factored(
    frame: Frame, U_old: Tensor, V_old: Tensor, t: FixedRankTangent, reduce: RowSum = LOCAL
) -> FixedRankTangent:
    """Projection transport of a factored tangent vector stored at the old frame ``(U_old,
    V_old)`` onto the current tangent space: ``P_{T_X}(U_old S V_oldᵀ + Up V_oldᵀ + U_old Vpᵀ)``
    in O((m + n) r²) (the vector transport of Absil et al. 2008, §8.1.3).

    With ``Z`` that matrix and the ``r x r`` overlaps ``P_U = U_oldᵀ U``, ``P_V = V_oldᵀ V``,
    ``Q_V = Vpᵀ V``, ``R_U = Upᵀ U``: ``Z V = U_old (S P_V + Q_V) + Up P_V``,
    ``Zᵀ U = V_old (Sᵀ P_U + R_U) + Vp P_U`` and ``Uᵀ Z V = P_Uᵀ (S P_V + Q_V) + R_Uᵀ P_V``;
    then ``Up' = Z V − U S'``, ``Vp' = Zᵀ U − V S'ᵀ``. On row shards (``reduce``) the four
    overlaps are sums over rows: one reduction, the rest is row-local.
    """
    U, V = frame.U, frame.V
    S, Up, Vp = t
    PU = transpose(U_old) @ U
    PV = transpose(V_old) @ V
    QV = transpose(Vp) @ V
    RU = transpose(Up) @ U
    if reduce.sharded:
        (PU, RU), (PV, QV) = reduce(M=[PU, RU], N=[PV, QV])
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
    gauge_rules: dict[str, str] = {}  # matrix space: a tangent stored with its frame
    functional_state = True

    def __init__(self, beta: float = 0.9, dampening: bool = False, prefix: str = "exp_avg") -> None:
        self.beta, self.dampening, self.prefix = beta, dampening, prefix
        p = prefix
        #: which factor's rows each state tensor holds (row-sharded storage)
        self.state_sides: dict[str, str | None] = {
            f"{p}_U": "M", f"{p}_V": "N", f"{p}_S": None, f"{p}_Up": "M", f"{p}_Vp": "N",
        }

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
            reduce = getattr(ctx.point, "reduce", LOCAL)
            tr = transport_factored(ctx.frame, state[f"{p}_U"], state[f"{p}_V"], old, reduce)
            if c == 1.0:
                mom = FixedRankTangent(*(torch.add(b, a, alpha=beta) for a, b in zip(tr, xi)))
            else:
                mom = FixedRankTangent(*(a.mul(beta).add_(b, alpha=c) for a, b in zip(tr, xi)))
        state[f"{p}_U"], state[f"{p}_V"] = ctx.frame.U, ctx.frame.V
        state[f"{p}_S"], state[f"{p}_Up"], state[f"{p}_Vp"] = mom
        return mom


class HeavyBall:
    """Lifted heavy-ball momentum ``m_t = β T(m_{t−1}) + ξ_t``, ``Ẋ = m_t`` (or Nesterov
    ``ξ_t + β m_t``), transported by projection (see :class:`FactoredMomentum`).
    Hyperparameter ``momentum`` (β)."""

    name = "heavy_ball"
    gauge_rules: dict[str, str] = {}  # matrix space: a tangent stored with its frame
    functional_state = True
    row_shards = True  # the transport's overlaps through the point's reducer

    def __init__(self, momentum: float = 0.9, nesterov: bool = False) -> None:
        self.mom = FactoredMomentum(momentum, dampening=False, prefix="momentum")
        self.nesterov = nesterov
        self.defaults = {"momentum": momentum}
        self.state_sides = self.mom.state_sides

    def init_state(self, m, n, r, like):
        return self.mom.init_state(m, n, r, like)

    def update(self, state, xi, ctx, hp, step) -> FixedRankTangent:
        m = self.mom.update(state, xi, ctx, hp, step, beta=hp.get("momentum", self.mom.beta))
        if self.nesterov:
            b = hp.get("momentum", self.mom.beta)
            return FixedRankTangent(*(torch.add(g, a, alpha=b) for g, a in zip(xi, m)))
        return m
