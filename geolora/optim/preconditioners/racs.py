"""RACS preconditioner on the matrix tangent space (Zheng & Wu, "LoRA-S: An Efficient Low Rank
Adaptation Scheme via Sylvester Equation", ICLR 2026, OpenReview Guo2XGgxZA, §4.3, eq. 14,
Alg. 3; RACS: Gong et al. 2025).

RACS ("row and column scaled SGD") approximates the Fisher matrix of a matrix parameter by a
Kronecker product of positive diagonal matrices ``F̃ = S ⊗ Q`` (``S = Diag(s)``, ``s ∈ R^n``
column scales; ``Q = Diag(q)``, ``q ∈ R^m`` row scales) and preconditions
``Ẋ = Diag(q)^{-1/2} G Diag(s)^{-1/2}``.

Normalisation of eq. 14. For diagonal ``S ⊗ Q`` only the diagonal of ``F = E[vec G vec Gᵀ]``
matters and ``‖S ⊗ Q − F‖_F² = Σ_ij (q_i s_j − E[G_ij²])² + const``. Setting its gradient to
zero gives the fixed-point equations (LoRA-S eq. 14, ``‖·‖_F̃`` there is the Frobenius norm)::

    s = Diag(E[Gᵀ Q G]) / ‖Q‖_F²,      q = Diag(E[G S Gᵀ]) / ‖S‖_F²,

i.e. the best rank-one approximation ``q sᵀ`` of the entrywise square ``E[G ∘ G]``, and their
alternation is a power iteration. RACS uses the one-sample estimate ``E[G ∘ G] ≈ G ∘ G`` and
5 iterations from ``q = 1`` (one iteration = update ``s`` from ``q``, then ``q`` from ``s``;
so ``q`` is scale-free and ``s`` carries the squared gradient scale).

Everything is computed from the factored ``G = A Bᵀ`` (``A: (m, k)``, ``B: (n, k)``, ``k = 2r``
for a tangent vector) without an ``m x n`` temporary (LoRA-S A.17, last paragraph):
``Diag(Gᵀ Q G) = rowsum((B C) ∘ B)`` with ``C = Aᵀ Q A`` and
``Diag(G S Gᵀ) = rowsum((A D) ∘ A)`` with ``D = Bᵀ S B``, ``O((m + n) k²)`` per iteration;
the descent is returned as the factored ``(Diag(q)^{-1/2} A) (Diag(s)^{-1/2} B)ᵀ``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, linalg

from geolora.linalg import transpose
from geolora.manifolds.frame import tangent_to_factors
from geolora.manifolds.types import FixedRankTangent
from geolora.optim.preconditioners.base import LowRank
from geolora.optim.sharding import LOCAL, RowSum, local_amax
from geolora.optim.validation import check_range


def racs_scalings(
    A: Tensor, B: Tensor, iters: int = 5, reduce: RowSum = LOCAL
) -> tuple[Tensor, Tensor]:
    """One-sample RACS scalings ``(s, q)`` of ``G = A Bᵀ`` (LoRA-S eq. 14).

    Starting from ``q = 1``, ``iters`` times: ``s = Diag(Gᵀ Q G) / ‖q‖²``, then
    ``q = Diag(G S Gᵀ) / ‖s‖²``, both from the factors in ``O((m + n) k²)``.
    Shapes ``A: (..., m, k)``, ``B: (..., n, k)`` → ``s: (..., n)``, ``q: (..., m)``.
    A zero ``G`` gives ``s = q = 0``. Row shards (``A``, ``q`` the local rows of the ``M``
    side, ``B``, ``s`` of the ``N`` side): ``Aᵀ Q A`` with ``‖q‖²`` and ``Bᵀ S B`` with ``‖s‖²``
    are sums over rows, two reductions per iteration.
    """
    tiny = torch.finfo(A.dtype).tiny
    # Row-major copies: the row-wise dot products below reduce along the contiguous dim.
    A, B = A.contiguous(), B.contiguous()
    At, Bt = transpose(A), transpose(B)
    # First iteration from q = 1: Aᵀ Diag(1) A = Aᵀ A and ‖q‖² = m.
    C = At @ A
    qq = A.new_full(A.shape[:-2] + (1,), float(reduce.rows("M", A.shape[-2])))
    if reduce.sharded:
        (C,), _ = reduce(M=[C])
    q = s = None
    for it in range(iters):
        if it:
            C = At @ (A * q.unsqueeze(-1))  # Aᵀ Diag(q) A
            qq = linalg.vecdot(q, q).unsqueeze(-1)
            if reduce.sharded:
                (C, qq), _ = reduce(M=[C, qq])
        s = linalg.vecdot(B @ C, B).clamp_min_(0).div_(qq.clamp_min(tiny))
        D = Bt @ (B * s.unsqueeze(-1))  # Bᵀ Diag(s) B
        ss = linalg.vecdot(s, s).unsqueeze(-1)
        if reduce.sharded:
            _, (D, ss) = reduce(N=[D, ss])
        q = linalg.vecdot(A @ D, A).clamp_min_(0).div_(ss.clamp_min(tiny))
    return s, q


def inv_sqrt_floored(v: Tensor, eps: float, top: Tensor | None = None) -> Tensor:
    """``max(v, eps · max(v))^{-1/2}`` along the last dim (a relative floor, so the result is
    scale-free and finite for zero rows/columns); an all-zero ``v`` maps to ones. ``top``: the
    maximum when it is known (over all row shards)."""
    if top is None:
        top = v.amax(dim=-1, keepdim=True)
    floor = torch.where(top > 0, (eps * top).clamp_min(torch.finfo(v.dtype).tiny), 1.0)
    return torch.maximum(v, floor).rsqrt()


class RACSPreconditioner:
    """Lifted RACS (LoRA-S Alg. 3, lines 4–12) on the projected gradient ``G = ξ``.

    ``(s_t, q_t)`` from :func:`racs_scalings`; ``m_s ← β m_s + (1−β) s_t``,
    ``m_q ← β m_q + (1−β) q_t`` (``bias_correction=True`` divides both by ``1 − βᵗ``; the
    paper's box has no bias correction); ``X̃ = Diag(m_q)^{-1/2} G Diag(m_s)^{-1/2}`` (with the relative
    floor ``eps`` of :func:`inv_sqrt_floored`); norm-growth limiter on the metric norm
    ``‖X̃‖_g = ‖lift(P_T X̃)‖_g``: ``η_t = γ / max(‖X̃‖_g / φ_{t−1}, γ)`` (``η_t = 1`` when
    ``φ_{t−1} = 0``, i.e. at ``t = 1``), ``φ_t = η_t ‖X̃‖_g``. Returns ``η_t P_T(X̃)``.

    State per pair: ``racs_s`` (n), ``racs_q`` (m), ``racs_phi`` (scalar): ``m + n + 1`` floats.
    Hyperparameters read from the group: ``beta``, ``gamma``, ``eps``.
    """

    name = "racs"
    gauge_rules: dict[str, str] = {}  # row/column scales of ξ: matrix space
    functional_state = True
    #: row shards: the power iteration's sums, the floors' maxima, the projection and the
    #: limiter's metric norm through the point's reducer (module docstring of sharding)
    row_shards = True
    state_sides: dict[str, str | None] = {"racs_s": "N", "racs_q": "M", "racs_phi": None}

    def __init__(
        self,
        power_iters: int = 5,
        bias_correction: bool = True,
        *,
        beta: float = 0.9,
        gamma: float = 1.01,
        eps: float = 1e-8,
    ) -> None:
        self.defaults = {"beta": beta, "gamma": gamma, "eps": eps}
        if not (isinstance(power_iters, int) and power_iters >= 1):
            raise ValueError(f"power_iters must be an integer >= 1, got {power_iters!r}")
        self.power_iters = power_iters
        self.bias_correction = bias_correction

    def validate(self, hp: dict[str, Any]) -> None:
        check_range("beta", hp["beta"], 0.0, 1.0, hi_open=True)
        check_range("gamma", hp["gamma"], 1.0, math.inf, hi_open=True)

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return {
            "racs_s": like.new_zeros(n),
            "racs_q": like.new_zeros(m),
            "racs_phi": like.new_zeros(()),
        }

    def update(
        self, state: dict[str, Tensor], xi: FixedRankTangent, ctx: Any, hp: dict, step: int
    ) -> FixedRankTangent:
        beta, gamma, eps = hp["beta"], hp["gamma"], hp["eps"]
        A, B = tangent_to_factors(ctx.frame, xi)
        reduce: RowSum = getattr(ctx.point, "reduce", LOCAL)
        s, q = racs_scalings(A, B, self.power_iters, reduce)
        ms = torch.mul(state["racs_s"], beta).add_(s, alpha=1 - beta)
        mq = torch.mul(state["racs_q"], beta).add_(q, alpha=1 - beta)
        state["racs_s"], state["racs_q"] = ms, mq
        bc = 1.0 - beta**step if self.bias_correction else 1.0
        mq, ms = mq / bc, ms / bc
        top_q = top_s = None
        if reduce.sharded:  # the relative floors need the maxima over all rows
            (top_q,), (top_s,) = reduce(
                M=[local_amax(mq, -1, keepdim=True)], N=[local_amax(ms, -1, keepdim=True)], op="max"
            )
        dq = inv_sqrt_floored(mq, eps, top_q)
        ds = inv_sqrt_floored(ms, eps, top_s)
        t = ctx.project(LowRank(A * dq.unsqueeze(-1), B * ds.unsqueeze(-1)))
        norm = ctx.metric_norm(t).to(ms.dtype)
        phi = state["racs_phi"]
        ratio = norm / torch.where(phi > 0, phi, torch.ones_like(phi))
        eta = torch.where(phi > 0, gamma / torch.clamp(ratio, min=gamma), torch.ones_like(phi))
        state["racs_phi"] = eta * norm
        e = eta.to(t.M.dtype)[..., None, None]
        return FixedRankTangent(e * t.M, e * t.Up, e * t.Vp)


__all__ = ["RACSPreconditioner", "inv_sqrt_floored", "racs_scalings"]
