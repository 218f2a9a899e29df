"""Element-wise Adam on the projected gradient ``ξ = P_T(∇_X f)`` (quotient geometries).

Zheng & Wu, "LoRA-S: An Efficient Low Rank Adaptation Scheme via Sylvester Equation", ICLR
2026 (OpenReview Guo2XGgxZA), eq. 13, Alg. 2 (dense moments) and Alg. 4 (low memory); the
moments live in the coordinates of the matrix ``X``, so the optimizer built from them is
transformation invariant under an invariant metric (Theorem 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from geolora.linalg import mm_t, transpose
from geolora.manifolds.frame import tangent_sqnorm, tangent_to_dense, tangent_to_factors
from geolora.optim.preconditioners.base import Products, _bias
from geolora.optim.preconditioners.momentum import FactoredMomentum

__all__ = ["DENSE_BLOCK_BYTES", "AdamPreconditioner", "EquivalentGradientAdam"]


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
    corrections, rearranged) is returned as its products with the frame, ``Products(Ẋ V, Ẋᵀ U,
    c)`` (two ``m x n`` by ``r`` products; the geometry projects them and applies ``c`` to the
    ``r``-wide result). On CPU the pairs are processed in blocks of
    :data:`DENSE_BLOCK_BYTES` so that ξ's block and the temporaries stay in cache (the values do
    not depend on the blocking).
    """

    name = "adam"
    gauge_rules: dict[str, str] = {}  # moments of ξ: matrix space
    functional_state = True

    def __init__(
        self,
        low_memory: bool = False,
        riemannian_second_moment: bool = False,
        bias_correction: bool = True,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.defaults = {"betas": tuple(betas), "eps": eps}
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

    def update(self, state, xi, ctx, hp, step) -> Products:
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
        return Products(ZV, ZtU, root2 / bc1)

    def _update_dense(self, state, xi, ctx, hp, step) -> Products:
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
        Xd = torch.div(m_dense, denom, out=denom)
        frame = ctx.frame
        return Products(mm_t(Xd, frame.V), mm_t(transpose(Xd), frame.U), root2 / bc1)


#: Bytes of one ``m x n`` block the dense Adam update processes at a time on CPU (pairs are
#: grouped so that a block stays in the L2 cache; results do not depend on it).
DENSE_BLOCK_BYTES = 1 << 20


class EquivalentGradientAdam:
    """Adam on the equivalent gradient ``g̃ = ξ / s`` (``ΔW = s X`` coordinates; ``s`` the pair's
    ``scaling``), returning ``P_T(m̂ / (√v̂ + ε)) / s`` in ``X`` coordinates — LoRA-Pro's
    preconditioner (Wang, Liang, He, Wang & Tan, "LoRA-Pro: Are Low-Rank Adapters Properly
    Optimized?", ICLR 2025, arXiv:2407.18242, Alg. 1): with the flat metric's minimal-norm lift
    ``ΔW`` moves by ``−lr P_T(D)`` to first order whatever ``s``. Dense moments ``exp_avg``,
    ``exp_avg_sq`` (``2mn`` per pair; the method's moments cannot be factored exactly)."""

    name = "equivalent_gradient_adam"
    gauge_rules: dict[str, str] = {}  # moments of ξ / s: matrix space
    functional_state = True

    def __init__(self, *, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self._adam = AdamPreconditioner(betas=betas, eps=eps)
        self.defaults = self._adam.defaults

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        return self._adam.init_state(m, n, r, like)

    def update(self, state, xi, ctx, hp, step):
        s = float(hp.get("scaling", 1.0))
        if s != 1.0:
            xi = type(xi)(*(t / s for t in xi))
        d = self._adam.update(state, xi, ctx, hp, step)
        return d if s == 1.0 else Products(d.ZV, d.ZtU, d.scale / s)
