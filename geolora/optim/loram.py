"""LoRAM: Riemannian Adam on fixed-rank (LoRAM-FR) and bounded-rank (LoRAM-BR) matrices.

Jiang, Wang & Stich, "LoRAM: Low-rank adaptation of large language models on manifold"
(``papers/loram.txt``, Algorithms 1–8).

Design: the optimizer owns the manifold point
--------------------------------------------
The model keeps its ordinary LoRA factors ``B: (m, r)``, ``A: (r, n)`` and its forward is
unchanged. The optimizer keeps, in each pair's state, the point of the manifold (fixed-shape
tensors in the compute dtype, stacked along dim 0 by :class:`~geolora.optim.base.LoRAOptimizer`
when same-shape pairs are batched) and writes ``B``, ``A`` back after every step:

* LoRAM-FR, point ``(U, S, V)`` of :class:`~geolora.manifolds.fixed_rank.FixedRank`:
  ``B = U diag(S)``, ``A = Vᵀ``. Autograd gives ``∇_B = ∇_X A ᵀ = ∇_X V`` — loram.txt Alg. 2's
  ``A.grad`` — and ``∇_Aᵀ = ∇_Xᵀ B = ∇_Xᵀ U diag(S)``, so ``∇_Xᵀ U = ∇_Aᵀ diag(S)⁻¹``. The
  column scaling by ``S`` is exact in floating point up to one rounding per entry whatever the
  size of ``S``; only ``S_i = 0`` loses the column ``∇_Xᵀ u_i`` (set to 0 then — ``rank X < r`` is
  not a point of FixedRank, and the retraction restores ``S_i > 0`` for a generic step).
* LoRAM-BR, point ``(K, V)`` of :class:`~geolora.manifolds.bounded_rank.BoundedRank`:
  ``B = K``, ``A = Vᵀ``: ``∇_B = ∇_X V`` and ``∇_Aᵀ = ∇_Xᵀ K`` are exactly the products
  ``rgrad_factored`` needs (Alg. 6), also at ``K = 0``.

Entering the manifold (the first geometric step of a pair) re-factors ``X = B A`` without
changing it: the rank-r truncated SVD ``X = U diag(S) Vᵀ`` of the factors
(:meth:`FixedRank.from_factors`, O((m + n) r²)); BR uses ``K = U diag(S)``, ``V``. Both depend on
``X`` only, so the whole iteration depends on ``X`` only (not on the factor gauge
``(B R, R⁻¹ A)``). On that first step autograd's gradients belong to the old factors
``(M, N) = (B, Aᵀ)``; with ``range(N) = range(V)``: ``∇_X V = ∇_M (VᵀN)⁻¹``, ``∇_Xᵀ U =
∇_N (UᵀM)⁻¹`` and ``∇_Xᵀ K = ∇_N (NᵀV)`` (r×r solves in float64).

Zero-initialised LoRA (``B = 0``): loram.txt starts from ``S = 0`` and obtains ``∇_X V``,
``∇_Xᵀ U`` from two extra modules (Alg. 2). Here:

* LoRAM-BR needs nothing: ``K = 0`` is a point of the desingularization and ``∇_B``, ``∇_A``
  give its gradient exactly (``V`` spans the rows of ``A``). Only a rank-deficient ``A`` (no
  ``∇_X V`` available) makes the first visit a re-factoring step without update: the point is
  entered, ``B``, ``A`` are rewritten (same ``X``) and the next step is the first update.
* LoRAM-FR uses the base class's robust start: while ``B`` or ``A`` is rank deficient (and for
  ``robust_steps`` steps) the factors take AdamW steps; then the truncated SVD enters the
  manifold, which does not change the model's function. Merely unbalanced factors
  (``(B R, R⁻¹ A)``, ill-conditioned ``R``) enter at once: the re-factoring removes the gauge.

Stability (measured, float64, 12×10 rank-3 regressions): the boxes keep the coordinate-wise
second moment ``v`` in place while the first moment is transported, so the transport can carry
momentum into coordinates whose gradient history is ~0 and ``m / (sqrt(v) + ε)`` explodes there.
From small or zero starts both optimizers converge (linearly, at constant lr 1e-2); from larger
random starts LoRAM-FR diverges at lr 1e-2 (stable at 1e-3), and LoRAM-BR — whose ``V̇p``
coordinates are angles, so ``X`` moves by ``σ·lr`` — diverges at lr ≥ 1e-3, and from a
rank-deficient ``A`` even at 3e-4. ``coordinate_wise=False`` (one norm-based step size per pair,
Bécigneul & Ganea 2019, which loram.txt Sec. 2 compares against) is stable in all these cases.

State per pair (all tensors): the point (``U``, ``S``, ``V`` or ``K``, ``V``), the first moment
``exp_avg_<field>`` and the coordinate-wise second moment ``exp_avg_sq_<field>`` for each field of
the tangent representation (one ``exp_avg_sq`` of shape ``(1, 1)`` with
``coordinate_wise=False``). ``state_dict()`` / ``load_state_dict()`` resume bitwise. Changing
``B``/``A`` from outside after the first step has no effect (the next step overwrites them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, transpose
from geolora.manifolds.bounded_rank import BoundedRank
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.types import (
    BoundedRankPoint,
    BoundedRankTangent,
    FactorPoint,
    FactorTangent,
    FixedRankPoint,
    FixedRankTangent,
)
from geolora.optim.base import LoRAOptimizer, _check_range, validate_betas
from geolora.optim.riemannian import adam_direction
from geolora.retractions.bounded_rank import NUCLEAR_MODES
from geolora.retractions.fixed_rank import thin_qr

__all__ = ["LoRAMBoundedRank", "LoRAMFixedRank", "ManifoldPairOptimizer"]

_ROBUST_KEYS = (
    "robust_exp_avg_B",
    "robust_exp_avg_sq_B",
    "robust_exp_avg_A",
    "robust_exp_avg_sq_A",
)


def rank_deficient(t: Tensor) -> bool:
    """``True`` if ``t: (p, k)`` (p ≥ k) is numerically rank deficient: ``σ_min ≤ tol σ_max`` or
    ``t = 0`` (tol 1e-12 in float64, 1e-6 otherwise, as the base class's robust-start test)."""
    t = t.detach().to(compute_dtype(t.dtype))
    s = torch.linalg.svdvals(t)
    tol = 1e-12 if t.dtype == torch.float64 else 1e-6
    return not (bool(s[0] > 0) and bool(s[-1] > tol * s[0]))


def right_solve(b: Tensor, c: Tensor) -> Tensor:
    """``b c⁻¹`` for ``b: (..., p, r)``, ``c: (..., r, r)``, solved in float64, ``b``'s dtype."""
    wd = torch.float64
    return torch.linalg.solve(c.to(wd), b.to(wd), left=False).to(b.dtype)


def _zeros(like: Tensor, *shape: int) -> Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _moments(
    like: Tensor, shapes: dict[str, tuple[int, ...]], coordinate_wise: bool
) -> dict[str, Tensor]:
    """Zero first moment per tangent field; second moment per field (coordinate-wise) or one
    number per pair, shape ``(1, 1)`` (norm-based)."""
    st: dict[str, Tensor] = {}
    for field, shape in shapes.items():
        st[f"exp_avg_{field}"] = _zeros(like, *shape)
        if coordinate_wise:
            st[f"exp_avg_sq_{field}"] = _zeros(like, *shape)
    if not coordinate_wise:
        st["exp_avg_sq"] = _zeros(like, 1, 1)
    return st


def _tangent(state: dict[str, Tensor], prefix: str, cls: type) -> Any:
    if prefix == "exp_avg_sq" and prefix in state:  # norm-based second moment
        return state[prefix]
    return cls(*(state[f"{prefix}_{f}"] for f in cls._fields))


def _store(state: dict[str, Tensor], prefix: str, t: Any) -> None:
    if isinstance(t, Tensor):
        state[prefix] = t
        return
    for f, v in zip(t._fields, t):
        state[f"{prefix}_{f}"] = v


class ManifoldPairOptimizer(LoRAOptimizer):
    """Base of the LoRA optimizers that own a manifold point per pair (module docstring).

    Subclasses implement :meth:`_init_pair_state` (enter the manifold from ``(B, A)``: point and
    zero moments), :meth:`_point_factors` (``(M, N)`` to write back for a state, batched or not),
    :meth:`_entry_policy` and :meth:`_update_pairs`. The entry policy replaces the base class's
    conditioning test (the re-factoring makes the factor gauge irrelevant, so badly balanced
    factors such as ``(B R, R⁻¹ A)`` enter at once); after the ``robust_steps`` AdamW steps it says
    what the first visit of a pair does:

    * ``"enter"``: enter the manifold and take the first update (gradient converted exactly);
    * ``"refactor"``: the gradient cannot be converted (a needed factor is rank deficient):
      enter the manifold and rewrite ``B``, ``A`` (same ``X``) without an update;
    * ``"robust"``: stay on the base class's AdamW path (its rank test is the stricter one).
    """

    def _point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        """``(M, N) = (B, Aᵀ)`` represented by the point stored in ``state``."""
        raise NotImplementedError

    def _entry_policy(self, B: Tensor, A: Tensor) -> str:
        """``"enter"``, ``"refactor"`` or ``"robust"`` for a pair not yet on the manifold."""
        return "enter"

    def _pair_phase(self, group: dict[str, Any], B: Tensor, A: Tensor) -> tuple | None:
        st = self.state[B]
        if "pair" not in st:
            if "step" not in st:
                st["step"] = torch.tensor(0.0)
                st["robust_step"] = torch.tensor(0.0)
            if int(st["robust_step"].item()) >= group["robust_steps"]:
                policy = self._entry_policy(B, A)
                if policy == "refactor":
                    for k in _ROBUST_KEYS:
                        st.pop(k, None)
                    st["full_rank"] = True
                    st["pair"] = True
                    st.update(self._init_pair_state(group, B, A))
                    f = self._point_factors(st)
                    B.copy_(f.M)
                    A.copy_(transpose(f.N))
                    return None
                if policy == "enter":
                    st["full_rank"] = True  # skips the base class's conditioning test
        return super()._pair_phase(group, B, A)

    @staticmethod
    def _adam(group: dict[str, Any], man: Any, pt: Any, grad: Any, state, step: int):
        """Moments and direction of the Riemannian Adam step (loram.txt Alg. 1 lines 5–8), from
        the moments stored in ``state`` as ``exp_avg_<field>`` / ``exp_avg_sq[_<field>]``."""
        cls = type(grad)
        d, m, v, _ = adam_direction(
            man,
            pt,
            grad,
            _tangent(state, "exp_avg", cls),
            _tangent(state, "exp_avg_sq", cls),
            step=step,
            betas=group["betas"],
            eps=group["eps"],
            coordinate_wise=group["coordinate_wise"],
            bias_correction=group["bias_correction"],
        )
        return d, m, v

    def _validate_adam(self, group: dict[str, Any]) -> None:
        validate_betas("betas", group["betas"])
        group["betas"] = tuple(group["betas"])
        _check_range("eps", group["eps"], 0.0)
        for key in ("bias_correction", "coordinate_wise"):
            if key in group and not isinstance(group[key], bool):
                raise ValueError(f"invalid {key}: {group[key]!r} (expected a bool)")


class LoRAMFixedRank(ManifoldPairOptimizer):
    """LoRAM-FR: Riemannian Adam with coordinate-wise step sizes on the fixed-rank manifold
    (loram.txt Alg. 1, with Alg. 2 gradient, Alg. 3 retraction, Alg. 4 transport).

    Per pair, at the point ``X = U diag(S) Vᵀ`` (``B = U diag(S)``, ``A = Vᵀ``)::

        g  = (Up, M, Vp) = P_T(∇_X f):  M = Uᵀ∇V,  Up = ∇V − U M,  Vp = ∇ᵀU − V Mᵀ     (Alg. 2)
        m  = β₁ w + (1 − β₁) g                         (w: momentum transported from last step)
        v  = β₂ v + (1 − β₂) g ⊙ g                     (coordinate-wise on M, Up, Vp; not moved)
        (U, S, V) ← R_X(−η m / (sqrt(v) + ε))           (truncated-SVD retraction, Alg. 3)
        w  = P_{T_{X⁺}}(m)                              (projection transport, Alg. 4)

    The box has no bias correction (``bias_correction=False``, the default; ``True`` divides
    ``m``, ``v`` by ``1 − βᵗ`` as Adam). ``coordinate_wise=False`` replaces ``v`` by the single
    step size ``β₂ v + (1 − β₂)‖g‖²`` of Bécigneul & Ganea (the variant the paper compares with,
    Sec. 2); see the module docstring for when to prefer it. Defaults from the paper:
    ``lr=5e-5`` (rank 16; 3e-5 at rank 32, Table 1), Adam's ``betas=(0.9, 0.999)``,
    ``eps=1e-8`` (not stated in the paper).
    Zero-initialised LoRA goes through the base class's robust AdamW start until ``B A`` has rank
    r, then the truncated SVD enters the manifold (module docstring). Memory per pair:
    ``2(m + n) r + r`` for the point plus ``2((m + n) r + r²)`` for the moments.
    """

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        coordinate_wise: bool = True,
        bias_correction: bool = False,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "coordinate_wise": coordinate_wise,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults, robust_steps=robust_steps, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        self._validate_adam(group)

    def _entry_policy(self, B: Tensor, A: Tensor) -> str:
        return "robust" if rank_deficient(B) or rank_deficient(A.T) else "enter"

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        m, r = B.shape
        n = A.shape[1]
        pt = FixedRank(m, n, r).from_factors(B.detach(), A.detach(), allow_zero=True)
        st = {"U": pt.U, "S": pt.S, "V": pt.V}
        shapes = {"M": (r, r), "Up": (m, r), "Vp": (n, r)}
        st.update(_moments(pt.U, shapes, group["coordinate_wise"]))
        return st

    def _point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        return FactorPoint(state["U"] * state["S"].unsqueeze(-2), state["V"])

    @staticmethod
    def _products(pt: FixedRankPoint, x: FactorPoint, g: FactorTangent, step: int):
        """``(∇_X V, ∇_Xᵀ U)`` from autograd's ``(∇_M, ∇_N) = (∇_X N, ∇_Xᵀ M)``."""
        if step == 1:  # (M, N) are the factors the manifold was entered from
            return right_solve(g.M, transpose(pt.V) @ x.N), right_solve(g.N, transpose(pt.U) @ x.M)
        s = pt.S.unsqueeze(-2)
        nz = s != 0
        return g.M, torch.where(nz, g.N / torch.where(nz, s, torch.ones_like(s)), 0.0)

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        pt = FixedRankPoint(state["U"], state["S"], state["V"])
        m, r = pt.U.shape[-2:]
        man = FixedRank(m, pt.V.shape[-2], r)
        zv, ztu = self._products(pt, x, g, step)
        grad = man.project_factored(pt, zv, ztu)
        d, m_new, v = self._adam(group, man, pt, grad, state, step)
        lr = group["lr"]
        new, w = man.retr_transp(pt, FixedRankTangent(*(-lr * t for t in d)), m_new)
        state["U"], state["S"], state["V"] = new
        _store(state, "exp_avg", w)
        _store(state, "exp_avg_sq", v)
        return self._point_factors(state)


def canonical_bounded_rank(x: BoundedRankPoint) -> BoundedRankPoint:
    """The representative ``(K Ψ, V Ψ)`` of ``(K, V)`` with ``K Ψ = Ū diag(S̄)`` (loram.txt Alg. 7
    lines 5–6: ``U⁺ S⁺ = Ū S̄``, ``V⁺ = Q H``), columns by decreasing singular value.

    ``Ψ`` are the right singular vectors of ``K`` (from the r×r factor of a QR of ``K``, SVD in
    float64); ``X = K Vᵀ`` is unchanged. The coordinate-wise second moment of LoRAM-BR is taken in
    this basis. Shapes ``(..., m, r)``, ``(..., n, r)``.
    """
    _, rk = thin_qr(x.K)
    _, _, psi_h = torch.linalg.svd(rk.to(torch.float64))
    psi = transpose(psi_h).to(x.K.dtype)
    return BoundedRankPoint(x.K @ psi, x.V @ psi)


def nuclear_subgradient(K: Tensor) -> Tensor:
    """``U₊ = K diag(S)⁺`` for canonical ``K = U diag(S)``: ``U₊ Vᵀ`` is the minimal-norm
    subgradient of ``‖X‖_*`` (columns with ``S_i = 0`` are 0).

    Where ``rank X = r`` it is the paper's ``U`` (Alg. 7 line 4) and the manifold's
    :meth:`~geolora.manifolds.bounded_rank.BoundedRank.nuclear_subgradient`; at a rank-deficient
    ``X`` (e.g. the ``K = 0`` start) it does not push ``X`` along arbitrary directions.
    """
    s = K.norm(dim=-2, keepdim=True)
    nz = s > 0
    return torch.where(nz, K / torch.where(nz, s, torch.ones_like(s)), 0.0)


class LoRAMBoundedRank(ManifoldPairOptimizer):
    """LoRAM-BR: Riemannian AdamW with coordinate-wise step sizes on the desingularization of
    bounded-rank matrices (loram.txt Alg. 5, with Alg. 6 gradient, Alg. 7 Q-factor retraction with
    nuclear norm, Alg. 8 transport).

    Per pair, at the point ``X = K Vᵀ``, ``K = U diag(S)`` (``B = K``, ``A = Vᵀ``)::

        g  = (Kg, Vpg) = (∇V, (I − VVᵀ) ∇ᵀK (KᵀK + 2αI)⁻¹)               (Alg. 6)
        m  = β₁ w + (1 − β₁) g;   v = β₂ v + (1 − β₂) g ⊙ g              (coordinate-wise)
        (K̇, V̇p) = −η m / (sqrt(v) + ε)
        V⁺ = qf(V + V̇p);  K⁺ = (X + K̇Vᵀ + KV̇pᵀ − λ U Vᵀ) V⁺                  (Alg. 7)
        K⁺ = Ū S̄ Hᵀ  →  (K⁺, V⁺) = (Ū S̄, V⁺ H)        (canonical representative)
        w  = projection transport of m to (K⁺, V⁺)                        (Alg. 8)

    ``λ = nuclear_norm`` is applied per step exactly as in Alg. 7 line 4 (not multiplied by the
    learning rate); ``U`` is taken as the minimal-norm subgradient (:func:`nuclear_subgradient`).
    ``nuclear_mode="prox"`` soft-thresholds the singular values of ``K⁺`` by ``λ`` instead.
    No bias correction in the box (``bias_correction=False``); ``coordinate_wise=False`` uses the
    norm-based single step size of Bécigneul & Ganea (module docstring).

    Defaults from the paper: ``lr=1e-4`` (Table 1), ``alpha=0.5`` (Alg. 6), ``nuclear_norm=1e-3``
    (Table 1 note b: worse with 0), Adam's ``betas``/``eps``. A zero-initialised ``B`` needs no
    robust start (``K = 0`` is a point); ``robust_steps`` still works if asked for.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        nuclear_norm: float = 1e-3,
        *,
        alpha: float = 0.5,
        nuclear_mode: str = "subgradient",
        coordinate_wise: bool = True,
        bias_correction: bool = False,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "nuclear_norm": nuclear_norm,
            "alpha": alpha,
            "nuclear_mode": nuclear_mode,
            "coordinate_wise": coordinate_wise,
            "bias_correction": bias_correction,
        }
        super().__init__(params, defaults, robust_steps=robust_steps, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        self._validate_adam(group)
        _check_range("nuclear_norm", group["nuclear_norm"], 0.0)
        a = group["alpha"]
        if not (isinstance(a, (int, float)) and 0 < a < float("inf")):
            raise ValueError(f"invalid alpha: {a!r} (expected a finite number > 0)")
        if group["nuclear_mode"] not in NUCLEAR_MODES:
            raise ValueError(
                f"invalid nuclear_mode: {group['nuclear_mode']!r} (expected one of {NUCLEAR_MODES})"
            )

    def _entry_policy(self, B: Tensor, A: Tensor) -> str:
        return "refactor" if rank_deficient(A.T) else "enter"

    def _init_pair_state(self, group, B: Tensor, A: Tensor) -> dict[str, Tensor]:
        m, r = B.shape
        n = A.shape[1]
        pt = FixedRank(m, n, r).from_factors(B.detach(), A.detach(), allow_zero=True)
        st = {"K": pt.U * pt.S.unsqueeze(-2), "V": pt.V}
        st.update(_moments(pt.U, {"K": (m, r), "Vp": (n, r)}, group["coordinate_wise"]))
        return st

    def _point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        return FactorPoint(state["K"], state["V"])

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        pt = BoundedRankPoint(state["K"], state["V"])
        m, r = pt.K.shape[-2:]
        man = BoundedRank(m, pt.V.shape[-2], r, alpha=group["alpha"])
        if step == 1:  # (M, N) are the factors the manifold was entered from
            gv, gtk = right_solve(g.M, transpose(pt.V) @ x.N), g.N @ (transpose(x.N) @ pt.V)
        else:
            gv, gtk = g.M, g.N
        grad = man.rgrad_factored(pt, gv, gtk)
        d, m_new, v = self._adam(group, man, pt, grad, state, step)
        lr, lam = group["lr"], group["nuclear_norm"]
        u = BoundedRankTangent(-lr * d.K, -lr * d.Vp)
        if lam and group["nuclear_mode"] == "subgradient":
            u = BoundedRankTangent(u.K - lam * nuclear_subgradient(pt.K), u.Vp)
            new = man.retr(pt, u)
        elif lam:
            new = man.retr(pt, u, nuclear_lambda=lam, nuclear_mode="prox")
        else:
            new = man.retr(pt, u)
        new = canonical_bounded_rank(new)
        w = man.transp(pt, new, m_new)
        state["K"], state["V"] = new
        _store(state, "exp_avg", w)
        _store(state, "exp_avg_sq", v)
        return self._point_factors(state)
