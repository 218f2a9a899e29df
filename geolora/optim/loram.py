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

Second moments in a moving frame
--------------------------------
The boxes keep the coordinate-wise second moment ``v`` in place while the first moment ``m`` is
transported. The coordinates are those of the SVD frame (FR: ``M``, ``Up``, ``Vp``; BR: ``K``,
``V̇p``), which the iteration re-chooses at every step. Taken literally this is unstable and, at
some inputs, not a function of ``X``. Four additions, each a no-op where the box is well defined
and stable (distinct singular values, ``r < min(m, n)``, ``|m| ≤ c_t sqrt(v)``):

1. *Identically zero blocks are masked.* ``Up ∈ range(I − UUᵀ)`` is 0 when ``r = m``, and ``Vp``
   is 0 when ``r = n`` (FR and BR). In floating point they hold rounding noise, which
   ``m / (sqrt(v) + ε)`` would scale up to a step of size ``lr``: they are set to exactly 0
   (in the gradient and in the transported momentum), as exact arithmetic gives.
2. *Clusters of equal singular values share their statistics.* Within a cluster of
   numerically equal singular values (consecutive gaps ``≤ sqrt(eps) σ₁``, chained; BR's zero
   singular values of a rank-deficient ``K`` included) the frame is defined only up to a rotation
   ``Q`` of those columns, under which the coordinates move as ``Up → Up Q``, ``M → Qᵀ M Q`` (BR:
   ``K̇ → K̇ Q``, ``V̇p → V̇p Q``). Averaging ``v`` over the cluster (:func:`cluster_average`,
   per row of ``Up``, ``Vp``, ``K̇``, per block of ``M``) makes ``v`` invariant and ``d = m /
   (sqrt(v) + ε)`` equivariant, so the step depends on ``X`` only again.
3. ``second_moment_transport="rotation"`` (default): ``v`` follows the frame as ``m`` does.
   With ``Q = polar(Fᵀ F⁺)`` the Procrustes rotation between the old and new frames (FR: ``Q_U``,
   ``Q_V`` from ``U``, ``V``; BR: from ``V``), a coordinate vector maps as ``c⁺ = c Q`` and ``v``
   as the diagonal of ``Qᵀ diag(v) Q``: ``v⁺ = v (Q ∘ Q)`` (:func:`frame_alignment`; for FR
   ``v_M⁺ = (Q_U ∘ Q_U)ᵀ v_M (Q_V ∘ Q_V)``, ``v_Up⁺ = v_Up (Q_V ∘ Q_V)``,
   ``v_Vp⁺ = v_Vp (Q_U ∘ Q_U)``). ``Q ∘ Q`` is doubly stochastic (``v`` stays ≥ 0, its mass is
   kept) and is exactly the permutation when the SVD reorders or flips columns (crossing
   singular values), where the box hands each coordinate another one's history; otherwise
   ``Q ∘ Q = I + O(step²)``. ``"none"``: the box's ``v`` in place.
4. ``momentum_bound=True`` (default): Adam's own bound. From zero moments Adam always has
   ``|m_t| ≤ c_t sqrt(v_t)`` with ``c_t² = (1 − β₁)²/(1 − β₂) Σ_{j<t} (β₁²/β₂)ʲ`` (Cauchy–Schwarz,
   tight; ``c_∞ = 7.27`` for (0.9, 0.999)), so no coordinate moves by more than ``c_t lr``.
   Transport breaks it: it moves momentum into coordinates whose gradient history is small
   (measured ``max |m|/sqrt(v)`` of the transported moments: 1.4e3 after the first step of FR
   from ``B, A ~ 0.3·N(0, 1)``, 12×10, r = 3, lr 1e-2; past 5e3 for BR from an ``A`` with two
   equal rows at lr 1e-3, while its loss goes 13.1 → 3.7e17 in 1000 steps).
   :func:`bound_momentum` scales ``m`` back into the bound (per cluster, so 2. is kept) and stores
   the scaled ``m``. Rotation (3.) alone does not cure this (that BR run: 13.1 → 7e5); the bound
   does (13.1 → 9e-2, ``max |m|/sqrt(v)`` ≤ 21 after transport).

``second_moment_transport="none", momentum_bound=False`` is the box verbatim (tested to 1e-10
against dense references written from Alg. 1–8); 1. and 2. do not change it where it is well
defined. Measured (float64, ``0.5‖X − X*‖²``, 300 steps, ``X*`` rank r plus noise, starts
``B, A ~ 0.5·N(0, 1)``): with the box FR's loss grows from lr 1e-3 on (40×30, r = 4:
141 → 2.2e3; lr 3e-3: → 9.8e4; lr 1e-2: up to 1e30) and BR diverges (→ 1e192 at lr 1e-3); with
the defaults FR's loss never rises above its start at any lr tried (1e-3 … 3e-2; 141 → 63 at
1e-3, → 22 at 3e-3). From small starts (``0.1·N``) both converge; after 300 steps the defaults'
excess loss is within a factor 2.5 of the box's (where above 1e-6).

LoRAM-BR keeps one weakness of coordinate-wise steps: ``V̇p`` entries are angles and each moves
by up to ``c_t·lr`` whatever ``σ``, so the row space turns by up to ``≈ c_t·lr·sqrt(n r)`` rad per
step and the Q-factor retraction inflates ``‖X‖`` by ``≈ sqrt(1 + ‖V̇p‖²)`` per step (measured:
0.2 rad and 2–7 % per step at lr 1e-2, 12×10, r = 3). From large starts it converges when
``lr·sqrt(n r) ≲ 1e-2`` (12×10, r = 3: lr 3e-3) and grows beyond (40×30, r = 4, lr 1e-3:
141 → 893; lr 3e-3: → 1.7e10). Use a small lr there (the paper: 1e-4) or ``coordinate_wise=False``
(one norm-based step size per pair, Bécigneul & Ganea 2019, compared in loram.txt Sec. 2), which
never raised the loss in any of these cases (lr up to 3e-2, both optimizers). A diverged ``K``
stops with ``FloatingPointError`` (its metric ``(KᵀK + 2αI)⁻¹`` is no longer finite).

State per pair (all tensors): the point (``U``, ``S``, ``V`` or ``K``, ``V``), the first moment
``exp_avg_<field>`` and the coordinate-wise second moment ``exp_avg_sq_<field>`` for each field of
the tangent representation (one ``exp_avg_sq`` of shape ``(1, 1)`` with
``coordinate_wise=False``). ``state_dict()`` / ``load_state_dict()`` resume bitwise. Changing
``B``/``A`` from outside after the first step has no effect (the next step overwrites them).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from geolora.linalg import addmm_t, compute_dtype, mm_t, polar, svd_small, transpose
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
from geolora.optim.adamw import ROBUST_STATE_KEYS, PendingAdamW
from geolora.optim.base import LoRAOptimizer
from geolora.optim.riemannian import adam_direction
from geolora.optim.validation import check_range as _check_range
from geolora.retractions.bounded_rank import NUCLEAR_MODES, singular_value_threshold
from geolora.retractions.fixed_rank import thin_qr

__all__ = [
    "SECOND_MOMENT_TRANSPORTS",
    "LoRAMBoundedRank",
    "LoRAMFixedRank",
    "ManifoldPairOptimizer",
    "adam_ratio_bound",
    "bound_momentum",
    "cluster_average",
    "frame_alignment",
]

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


# --- second moments in a moving frame (module docstring, rules 2–4) ----------------------------
SECOND_MOMENT_TRANSPORTS = ("rotation", "none")
"""Values of ``second_moment_transport``: ``v ← v (Q ∘ Q)`` with the frame, or left in place."""


def _cluster_rtol(s: Tensor) -> float:
    """``sqrt(eps)`` of ``s``'s dtype: singular values closer than this (relative to the largest)
    are numerically equal, their singular vectors determined only up to a rotation."""
    return float(torch.finfo(s.dtype).eps) ** 0.5


def cluster_average(s: Tensor, rtol: float) -> Tensor:
    """Averaging matrix ``W: (..., r, r)`` over the clusters of numerically equal singular values.

    ``s: (..., r)`` sorted decreasingly (``s ≥ 0``). Consecutive values whose gap is at most
    ``rtol · s₁`` (chained) form a cluster ``c``; ``W_ij = 1/|c|`` if ``i, j ∈ c``, else 0.
    ``W`` is symmetric, doubly stochastic and idempotent; with distinct values ``W = I`` exactly.
    ``v W`` averages the columns of ``v`` within each cluster. ``s = 0`` is one cluster.
    """
    gaps = (s[..., :-1] - s[..., 1:]).abs()
    new = gaps > rtol * s[..., :1]
    zero = torch.zeros(s.shape[:-1] + (1,), dtype=torch.long, device=s.device)
    labels = torch.cat([zero, new.long().cumsum(-1)], dim=-1)
    same = (labels.unsqueeze(-1) == labels.unsqueeze(-2)).to(s.dtype)
    return same / same.sum(dim=-1, keepdim=True)


def adam_ratio_bound(step: int, betas: tuple[float, float]) -> float:
    """``c_t²``: the largest ``m_t² / v_t`` plain Adam can reach at step ``t`` (moments from 0).

    ``m_t = (1 − β₁) Σₖ β₁^{t−k} gₖ``, ``v_t = (1 − β₂) Σₖ β₂^{t−k} gₖ²``; Cauchy–Schwarz gives
    ``m_t² ≤ (1 − β₁)²/(1 − β₂) · Σ_{j<t} γʲ · v_t`` with ``γ = β₁²/β₂`` (equality for
    ``gₖ ∝ (β₁/β₂)^{t−k}``). For (0.9, 0.999): ``c₁ = 3.16``, ``c_∞ = 7.27``.
    """
    b1, b2 = betas
    if b2 == 0.0:  # v_t = g_t² only: momentum from earlier steps is not bounded by it
        return float("inf")
    gamma = b1 * b1 / b2
    geo = float(step) if gamma == 1.0 else (1.0 - gamma**step) / (1.0 - gamma)
    return (1.0 - b1) ** 2 / (1.0 - b2) * geo


def bound_momentum(m: Any, v: Any, step: int, betas: tuple[float, float], average=None) -> Any:
    """Scale the first moment back into Adam's bound ``avg(m ⊙ m) ≤ c_t² v`` (coordinate-wise).

    Plain Adam always satisfies it (:func:`adam_ratio_bound`), so this is a no-op there; a
    transported momentum can violate it (transport moves momentum into coordinates whose
    gradient history is small) and is scaled by ``sqrt(c_t² v / avg(m ⊙ m))`` where it does.
    ``average`` (the cluster average) makes the scale one number per block of equal singular
    values, so the bound is rotation invariant within a cluster.
    """
    avg = None if average is None else (lambda ls: _leaves(average(_like(m, ls))))
    return _like(m, _bound_leaves(_leaves(m), _leaves(v), adam_ratio_bound(step, betas), avg))


def _bound_leaves(ms: list[Tensor], vs: list[Tensor], c2: float, average=None) -> list[Tensor]:
    """:func:`bound_momentum` on lists of tensors (``average`` maps a list to a list).

    The scale ``sqrt(min(c₂ v / avg(m ⊙ m), 1))`` is exactly 1 where the bound holds
    (``c₂ v ≥ m²`` gives ``c₂ v / m² ≥ 1`` in floating point; ``m² = 0`` gives inf or NaN,
    which ``fmin`` maps to 1) and ``sqrt(c₂ v / m²)`` where it does not: the values of
    ``where(m² > c₂ v, m · sqrt(c₂ v / m²), m)`` with fewer passes over the tensors.
    """
    m2 = torch._foreach_mul(ms, ms)
    if average is not None:
        m2 = average(m2)
    ratio = torch._foreach_mul(vs, c2)
    torch._foreach_div_(ratio, m2)
    one = ms[0].new_ones(())
    ratio = [torch.fmin(t, one) for t in ratio]
    torch._foreach_sqrt_(ratio)
    return torch._foreach_mul(ms, ratio)


def _adam_leaves(
    group: dict[str, Any],
    g: list[Tensor],
    w: list[Tensor],
    v: list[Tensor],
    step: int,
    average=None,
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Coordinate-wise moments and direction (:meth:`ManifoldPairOptimizer._adam`) on lists of
    tensors: gradient ``g``, stored moments ``w``, ``v`` (not modified); ``average`` maps a list
    of second-moment-like tensors to their cluster averages. Fields of equal width may be
    concatenated along the rows by the caller (one pass per operation instead of one per
    field). Returns new lists ``(d, m, v)``."""
    b1, b2 = group["betas"]
    m = torch._foreach_lerp(g, w, b1)  # β₁ w + (1 − β₁) g
    v = torch._foreach_mul(v, b2)
    torch._foreach_addcmul_(v, g, g, value=1 - b2)
    if average is not None:
        v = average(v)
    bc1 = 1.0 - b1**step if group["bias_correction"] else 1.0
    bc2 = 1.0 - b2**step if group["bias_correction"] else 1.0
    c2 = adam_ratio_bound(step, (b1, b2))
    sqrt_v = None
    if group.get("momentum_bound", False) and c2 != float("inf"):  # absent: the box
        if average is None:
            # Without clusters the bound is a clamp: m · sqrt(c₂v / m²) = sign(m) sqrt(c₂v)
            # where m² > c₂v, m elsewhere (c₂ = inf: no bound, bound_momentum's no-op).
            sqrt_v = torch._foreach_sqrt(v)
            hi = torch._foreach_mul(sqrt_v, c2**0.5)
            m = [torch.clamp(a, min=-h, max=h) for a, h in zip(m, hi)]
        else:
            m = _bound_leaves(m, v, c2, average)
    if bc2 == 1.0 and sqrt_v is not None:
        den = sqrt_v
    else:
        den = torch._foreach_sqrt(torch._foreach_div(v, bc2) if bc2 != 1.0 else v)
    torch._foreach_add_(den, group["eps"])
    d = torch._foreach_div(torch._foreach_div(m, bc1) if bc1 != 1.0 else m, den)
    return d, m, v


def _leaves(t: Any) -> list[Tensor]:
    return [t] if isinstance(t, Tensor) else list(t)


def _like(ref: Any, leaves: list[Tensor]) -> Any:
    """``leaves`` in the structure of ``ref`` (a tensor or a NamedTuple of tensors)."""
    return leaves[0] if isinstance(ref, Tensor) else type(ref)(*leaves)


def frame_alignment(old: Tensor, new: Tensor) -> Tensor:
    """``Q ∘ Q`` (element-wise square) for the Procrustes rotation ``Q = polar(oldᵀ new)``.

    ``old, new: (..., p, r)`` orthonormal frames; ``Q: (..., r, r)`` is the orthogonal matrix
    closest to ``oldᵀ new`` (polar factor, float64). ``Q ∘ Q`` is doubly stochastic and equals
    the permutation ``P`` when ``new = old P D`` (``D`` signs) exactly.
    """
    c = (transpose(old) @ new).to(torch.float64)
    q = polar(c)
    return (q * q).to(old.dtype)


def _squared_polar(c: Tensor) -> Tensor:
    """``Q ∘ Q`` for ``Q = polar(c)`` (float64), in ``c``'s dtype: :func:`frame_alignment` from
    ``c = oldᵀ new`` when it is already known. ``c: (..., r, r)``."""
    q = polar(c.to(torch.float64))
    return (q * q).to(c.dtype)


def _cluster_weights(s: Tensor) -> Tensor | None:
    """:func:`cluster_average` of ``s: (..., r)`` (rtol :func:`_cluster_rtol`), or ``None`` when
    it is the identity: every consecutive gap is a new cluster (distinct singular values, the
    generic case). ``t W = t`` holds bitwise for finite ``t`` then, so the averaging products
    are skipped. One host sync on the ``(..., r - 1)`` gaps.
    """
    rtol = _cluster_rtol(s)
    if bool(((s[..., :-1] - s[..., 1:]).abs() > rtol * s[..., :1]).all()):
        return None
    return cluster_average(s, rtol)


def _hcat(a: Tensor, b: Tensor) -> Tensor:
    """``[a b]`` along the last dimension, stored column-major (LAPACK's layout, so the QR that
    follows needs no transposed copy). ``(..., p, k₁), (..., p, k₂) -> (..., p, k₁ + k₂)``."""
    return transpose(torch.cat([transpose(a), transpose(b)], dim=-2))


#: Widths above which the Householder ``Q`` of a CPU QR is applied implicitly
#: (``geqrf`` + ``ormqr``) instead of formed (``orgqr``): LAPACK's blocked ``orgqr`` (more than
#: 32 columns) is 2–5x slower than applying the reflectors to the ``r`` columns needed
#: (measured, MKL, ``(24, 384, 64)``: 19.9 vs 4.0 ms with ``OMP_WAIT_POLICY=PASSIVE``).
_IMPLICIT_Q_MIN_COLS = 33


class _ImplicitQ(NamedTuple):
    """Householder reflectors and scalars of ``torch.geqrf`` (``Q`` never formed)."""

    h: Tensor
    tau: Tensor


def _qr_signed(a: Tensor, implicit: bool = False) -> tuple[Tensor | _ImplicitQ, Tensor, Tensor]:
    """The sign-fixed thin QR of :func:`thin_qr` as ``(Q₀, R, d)``: ``Q = Q₀ diag(d)`` and
    ``R = diag(d) R₀`` (``diag R ≥ 0``), ``d: (..., k)`` of ±1.

    The sign flips of ``Q`` are exact, so callers fold ``d`` into the small matrix that ``Q`` is
    multiplied with instead of making a pass over the tall ``Q₀``. Same method as
    :func:`thin_qr`: Householder on CPU and for wide ``a``, else its own route (``d = 1``).
    ``implicit``: a tall CPU ``a`` with at least ``_IMPLICIT_Q_MIN_COLS`` columns returns ``Q₀``
    as :class:`_ImplicitQ` (use :func:`_q_times`).
    """
    p, k = a.shape[-2:]
    if a.device.type == "cpu" or p < k:
        if implicit and p >= k >= _IMPLICIT_Q_MIN_COLS and a.device.type == "cpu":
            h, tau = torch.geqrf(a)
            q, r = _ImplicitQ(h, tau), torch.triu(h[..., :k, :])
        else:
            q, r = torch.linalg.qr(a)
        dg = torch.diagonal(r, dim1=-2, dim2=-1)
        d = torch.where(dg < 0, -1.0, 1.0).to(dg.dtype)
        return q, r * d.unsqueeze(-1), d
    q, r = thin_qr(a)
    return q, r, torch.ones(r.shape[:-1], dtype=r.dtype, device=r.device)


def _q_times(q: Tensor | _ImplicitQ, c: Tensor) -> Tensor:
    """``Q₀ c`` for ``Q₀`` from :func:`_qr_signed` (``(..., p, k)``) and ``c: (..., k, j)``."""
    if isinstance(q, _ImplicitQ):
        p, k = q.h.shape[-2], c.shape[-2]
        return torch.ormqr(q.h, q.tau, torch.nn.functional.pad(c, (0, 0, 0, p - k)))
    return mm_t(q, c)


def _qr_r(a: Tensor) -> Tensor:
    """``R`` of the sign-fixed thin QR of a tall ``a: (..., p, k)`` (:func:`thin_qr`), without
    forming ``Q`` where the method allows (Householder on CPU)."""
    if a.device.type != "cpu":
        return thin_qr(a)[1]
    r = torch.linalg.qr(a, mode="r")[1]
    dg = torch.diagonal(r, dim1=-2, dim2=-1)
    return r * torch.where(dg < 0, -1.0, 1.0).to(dg.dtype).unsqueeze(-1)


def _fr_retraction(
    x: FixedRankPoint, m: Tensor, up: Tensor, vp: Tensor, c: float
) -> tuple[FixedRankPoint, Tensor, Tensor]:
    """:func:`~geolora.retractions.fixed_rank.fixed_rank_retraction` (loram.txt Alg. 3) along
    ``Ẋ = c (U M Vᵀ + Up Vᵀ + U Vpᵀ)`` for stacked ``(L, ·, ·)`` operands, with fewer passes
    over the tall factors.

    ``X + Ẋ = [U Up] C [V Vp]ᵀ``, ``C = [[diag(S) + cM, cI], [cI, 0]]`` (the scalar ``c`` goes
    into the core instead of a pass over ``Up``, ``Vp``); with the sign-fixed QRs
    ``[U Up] = Q_U R_U``, ``[V Vp] = Q_V R_V`` the core ``R_U C R_Vᵀ`` is formed blockwise as
    ``(R_U1 (diag(S) + cM) + c R_U2) R_V1ᵀ + c R_U1 R_V2ᵀ`` (float64), and its SVD ``Ũ S̃ Ṽᵀ``
    gives ``U⁺ = Q_U Ũ[:, :r]``, ``S⁺ = S̃[:r]``, ``V⁺ = Q_V Ṽ[:, :r]`` (the QR signs folded
    into ``Ũ``, ``Ṽ``). Cost: two QRs of ``(m or n) × 2r``, two ``(m or n) × 2r × r`` products.
    Also returns ``C_U = UᵀU⁺ = R_U1ᵀŨ``, ``C_V = VᵀV⁺ = R_V1ᵀṼ`` (float64, from ``U = Q_U R_U1``:
    no product of the tall factors).
    """
    u, s, v = x
    r = s.shape[-1]
    qu, ru, du = _qr_signed(_hcat(u, up), implicit=True)
    qv, rv, dv = _qr_signed(_hcat(v, vp), implicit=True)
    wd = torch.float64
    ru, rv = ru.to(wd), rv.to(wd)
    top = torch.diag_embed(s.to(wd)) + c * m.to(wd)
    ru1, rv1 = ru[..., :r], rv[..., :r]
    core = torch.baddbmm(
        ru1 @ transpose(rv[..., r:]),
        torch.baddbmm(ru[..., r:], ru1, top, beta=c),
        transpose(rv1),
        beta=c,
    )
    a, sig, bh = svd_small(core, full_matrices=False)
    a, b = a[..., :r], transpose(bh[..., :r, :])
    u_new = _q_times(qu, (du.unsqueeze(-1) * a).to(u.dtype))
    v_new = _q_times(qv, (dv.unsqueeze(-1) * b).to(v.dtype))
    # UᵀU⁺ = R_U1ᵀ Ũ and VᵀV⁺ = R_V1ᵀ Ṽ (U = Q_U R_U1, Q_UᵀQ_U = I): r × r, float64.
    cu = transpose(ru1) @ a
    cv = transpose(rv1) @ b
    return FixedRankPoint(u_new, sig[..., :r].to(s.dtype), v_new), cu, cv


def _fr_transport(
    x: FixedRankPoint, y: FixedRankPoint, cu: Tensor, cv: Tensor, t: FixedRankTangent
) -> FixedRankTangent:
    """Projection transport ``P_{T_Y}(Ẋ)`` (loram.txt Alg. 4) of ``t = (M, Up, Vp)`` at ``x``,
    given ``C_U = UᵀU_Y``, ``C_V = VᵀV_Y`` (stacked ``(L, ·, ·)``).

    With ``D_U = UpᵀU_Y``, ``D_V = VpᵀV_Y``: ``ẊV_Y = U E + Up C_V`` (``E = M C_V + D_V``),
    ``ẊᵀU_Y = V F + Vp C_U`` (``F = Mᵀ C_U + D_U``), ``M_Y = U_YᵀẊV_Y = C_Uᵀ E + D_Uᵀ C_V``,
    ``Up_Y = ẊV_Y − U_Y M_Y``, ``Vp_Y = ẊᵀU_Y − V_Y M_Yᵀ``: the same vector as
    :func:`~geolora.retractions.fixed_rank.fixed_rank_transport` with ``M_Y`` from ``r × r``
    products (no orthogonality of ``Up``, ``Vp`` to ``U``, ``V`` assumed).
    """
    mt, upt, vpt = t
    du = transpose(upt) @ y.U
    dv = transpose(vpt) @ y.V
    e = torch.baddbmm(dv, mt, cv)
    f = torch.baddbmm(du, transpose(mt), cu)
    m_y = torch.baddbmm(transpose(du) @ cv, transpose(cu), e)
    up_y = addmm_t(addmm_t(mm_t(x.U, e), upt, cv), y.U, m_y, alpha=-1.0)
    vp_y = addmm_t(addmm_t(mm_t(x.V, f), vpt, cu), y.V, transpose(m_y), alpha=-1.0)
    return FixedRankTangent(m_y, up_y, vp_y)


def _metric_inverse_diag(s64: Tensor, alpha: float, like: Tensor) -> Tensor:
    """``1 / (s² + 2α)``: the diagonal of ``(KᵀK + 2αI)⁻¹`` for a canonical ``K = U diag(s)``
    (``s: (..., r)`` float64), in ``like``'s dtype.

    ``FloatingPointError`` where :func:`~geolora.retractions.bounded_rank.metric_gram_inverse`'s
    Cholesky factorization fails for such a ``K``: ``s² + 2α`` not finite (a diverged ``K``).
    """
    den = s64 * s64 + 2.0 * alpha
    if not bool(torch.isfinite(den).all()):
        raise FloatingPointError(
            "BoundedRank: the metric Gram matrix KᵀK + 2αI is not positive definite, so K has "
            f"diverged (max |K| = {float(like.abs().amax()):.3g}; non-finite, or too large for "
            f"2α = {2 * alpha:g} to survive rounding). Lower the learning rate (LoRAM-BR: "
            "coordinate_wise=False is the stable variant)."
        )
    return (1.0 / den).to(like.dtype)


def _br_retraction(
    x: BoundedRankPoint,
    s: Tensor,
    d: BoundedRankTangent,
    c: float,
    lam: float,
    group: dict[str, Any],
) -> tuple[BoundedRankPoint, Tensor, Tensor]:
    """Q-factor retraction with the nuclear-norm term (loram.txt Alg. 7) along ``c·d``, then the
    canonical representative (:func:`canonical_bounded_rank`), for stacked ``(L, ·, ·)`` operands.

    ``V⁺ = qf(V + c V̇p)``; with ``Q = qf(V + c V̇p)`` (signs folded into the small matrices) and
    ``U₊ = K diag(s)⁺`` (:func:`nuclear_subgradient`, ``s`` the column norms of the canonical
    ``K``): ``K⁺ = (K + c K̇ − λU₊)(VᵀV⁺) + c K (V̇pᵀV⁺)
    = K (VᵀV⁺ + c V̇pᵀV⁺ − λ diag(s)⁺ VᵀV⁺) + K̇ (c VᵀV⁺)`` (``"subgradient"``, λ = 0 without
    the term; ``"prox"`` soft-thresholds the singular values of ``K⁺`` instead). ``VᵀQ =
    R_Qᵀ − c V̇pᵀQ`` from ``V + cV̇p = Q R_Q``: one ``n × r × r`` product for both. Then
    ``K⁺ = Ū S̄ Hᵀ`` (QR of ``K⁺``, SVD of its ``R`` in float64) gives ``(K⁺H, V⁺H)``.
    Returns ``((K⁺H, V⁺H), σ, VᵀV⁺H)`` with ``σ`` (float64) the singular values of ``K⁺``.
    """
    k, v = x
    dk, dvp = d
    q, rq, dq = _qr_signed(torch.add(v, dvp, alpha=c))  # V⁺ = q diag(dq)
    e = transpose(dvp) @ q  # V̇pᵀ q
    vq = transpose(rq) * dq.unsqueeze(-2) - c * e  # Vᵀ q = R₀ᵀ − c V̇pᵀ q  (R₀ = diag(dq) R)
    cq = vq * dq.unsqueeze(-2)  # VᵀV⁺
    a1 = cq + (c * e) * dq.unsqueeze(-2)  # VᵀV⁺ + c V̇pᵀV⁺
    if lam and group["nuclear_mode"] == "subgradient":
        inv_s = torch.where(s > 0, 1.0 / torch.where(s > 0, s, 1.0), 0.0)
        a1 = a1 - lam * inv_s.unsqueeze(-1) * cq
    k_new = addmm_t(mm_t(k, a1), dk, cq, alpha=c)
    if lam and group["nuclear_mode"] != "subgradient":
        k_new = singular_value_threshold(k_new, lam)
    rk = _qr_r(k_new)
    _, sig, psi_h = svd_small(rk.to(torch.float64))
    psi64 = transpose(psi_h)
    psi = psi64.to(k.dtype)
    k1 = mm_t(k_new, psi)
    v1 = mm_t(q, (dq.unsqueeze(-1) * psi64).to(v.dtype))
    return BoundedRankPoint(k1, v1), sig, cq @ psi


def _br_transport(
    x: BoundedRankPoint,
    y: BoundedRankPoint,
    sig: Tensor,
    a: Tensor,
    t: BoundedRankTangent,
    alpha: float,
) -> BoundedRankTangent:
    """Projection transport (loram.txt Alg. 8,
    :func:`~geolora.retractions.bounded_rank.projection_transport`) of ``t = (K̇, V̇p)`` at ``x``
    to the canonical ``y = (K⁺, V⁺)`` with singular values ``sig`` (float64), given
    ``A = VᵀV⁺``; stacked ``(L, ·, ·)`` operands.

    With ``B = V̇pᵀV⁺``: ``K̇⁺ = K̇A + KB`` and ``Y = ẊᵀK⁺ + 2α(V̇pVᵀ + VV̇pᵀ)V⁺ = V T₁ + V̇p T₂``
    (``T₁ = K̇ᵀK⁺ + 2αB``, ``T₂ = KᵀK⁺ + 2αA``), ``V⁺ᵀY = AᵀT₁ + BᵀT₂``, so
    ``V̇p⁺ = (V T₁ + V̇p T₂ − V⁺(AᵀT₁ + BᵀT₂)) diag(1/(σ² + 2α))``: three ``n × r × r``
    products, the metric inverse (diagonal at the canonical ``K⁺``) folded into the ``r × r``
    factors.
    """
    k, v = x
    kd, vp = t
    b = transpose(vp) @ y.V
    zv = addmm_t(mm_t(kd, a), k, b)
    t1 = torch.add(transpose(kd) @ y.K, b, alpha=2.0 * alpha)
    t2 = torch.add(transpose(k) @ y.K, a, alpha=2.0 * alpha)
    t3 = torch.baddbmm(transpose(b) @ t2, transpose(a), t1)
    g1 = _metric_inverse_diag(sig, alpha, y.K).unsqueeze(-2)
    vp1 = addmm_t(addmm_t(mm_t(v, t1 * g1), vp, t2 * g1), y.V, t3 * g1, alpha=-1.0)
    return BoundedRankTangent(zv, vp1)


def _transports_v(group: dict[str, Any]) -> bool:
    # Groups saved before the option existed resume the box (second moment in place).
    return group.get("second_moment_transport", "none") == "rotation"


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

    # Groups saved before these options existed resume the box (see ``_transports_v``).
    optional_on_load = frozenset({"second_moment_transport", "momentum_bound"})

    def _entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        """``"enter"``, ``"refactor"`` or ``"robust"`` for a pair not yet on the manifold (the
        base class's conditioning test of ``X`` is not used: the re-factoring removes the
        gauge)."""
        return "enter"

    def _refactor_update(
        self, group: dict, B: Tensor, A: Tensor, work: dict, st: dict, label: str
    ) -> PendingAdamW:
        """Enter the manifold without an update: the point's factors (same ``X``) are written to
        ``B``, ``A`` and its state stored, when the step is committed."""
        f = self._point_factors(work)
        return PendingAdamW(
            [group],
            label,
            targets=[B, A],
            values=[f.M.to(B.dtype), transpose(f.N).to(A.dtype)],
            states=[(st, work, ROBUST_STATE_KEYS)],
        )

    @staticmethod
    def _adam(group: dict[str, Any], man: Any, pt: Any, grad: Any, state, step: int, average=None):
        """Moments and direction of the Riemannian Adam step (loram.txt Alg. 1 lines 5–8), from
        the moments stored in ``state`` as ``exp_avg_<field>`` / ``exp_avg_sq[_<field>]``.

        Coordinate-wise: ``m = β₁ w + (1 − β₁) g``, ``v = avg(β₂ v + (1 − β₂) g ⊙ g)``, with
        ``momentum_bound`` ``m ← bound_momentum(m, v)``, then ``d = (m / c₁) / (sqrt(v / c₂) + ε)``
        (``c₁ = 1 − β₁ᵗ``, ``c₂ = 1 − β₂ᵗ`` with ``bias_correction``, else 1). ``average`` is the
        cluster average (identity for distinct singular values). Norm-based
        (``coordinate_wise=False``): :func:`~geolora.optim.riemannian.adam_direction`, whose
        ``v`` is one invariant number per pair. Returns ``(d, m, v)``.
        """
        cls = type(grad)
        b1, b2 = group["betas"]
        eps = group["eps"]
        if not group["coordinate_wise"]:
            d, m, v, _ = adam_direction(
                man,
                pt,
                grad,
                _tangent(state, "exp_avg", cls),
                _tangent(state, "exp_avg_sq", cls),
                step=step,
                betas=(b1, b2),
                eps=eps,
                coordinate_wise=False,
                bias_correction=group["bias_correction"],
            )
            return d, m, v
        # One foreach call per operation over the fields (new tensors: the state is not
        # modified in place, see ``functional_state``).
        avg = None if average is None else (lambda ls: list(average(cls(*ls))))
        d, m, v = _adam_leaves(
            group,
            list(grad),
            list(_tangent(state, "exp_avg", cls)),
            list(_tangent(state, "exp_avg_sq", cls)),
            step,
            avg,
        )
        return cls(*d), cls(*m), cls(*v)

    def _validate_adam(self, group: dict[str, Any]) -> None:
        group["betas"] = tuple(group["betas"])  # validated by the base class
        for key in ("bias_correction", "coordinate_wise", "momentum_bound"):
            if key in group and not isinstance(group[key], bool):
                raise ValueError(f"invalid {key}: {group[key]!r} (expected a bool)")
        if "second_moment_transport" in group:
            t = group["second_moment_transport"]
            if t not in SECOND_MOMENT_TRANSPORTS:
                raise ValueError(
                    f"invalid second_moment_transport: {t!r} (expected one of "
                    f"{SECOND_MOMENT_TRANSPORTS})"
                )


class LoRAMFixedRank(ManifoldPairOptimizer):
    """LoRAM-FR: Riemannian Adam with coordinate-wise step sizes on the fixed-rank manifold
    (loram.txt Alg. 1, with Alg. 2 gradient, Alg. 3 retraction, Alg. 4 transport).

    Per pair, at the point ``X = U diag(S) Vᵀ`` (``B = U diag(S)``, ``A = Vᵀ``)::

        g  = (Up, M, Vp) = P_T(∇_X f):  M = Uᵀ∇V,  Up = ∇V − U M,  Vp = ∇ᵀU − V Mᵀ     (Alg. 2)
        m  = β₁ w + (1 − β₁) g                         (w: momentum transported from last step)
        v  = β₂ v + (1 − β₂) g ⊙ g                     (coordinate-wise on M, Up, Vp)
        (U, S, V) ← R_X(−η m / (sqrt(v) + ε))           (truncated-SVD retraction, Alg. 3)
        w  = P_{T_{X⁺}}(m)                              (projection transport, Alg. 4)

    plus the module docstring's second-moment rules: ``Up`` (``r = m``) / ``Vp`` (``r = n``)
    masked, ``v`` averaged over clusters of equal ``S``, ``v`` transported with the frame
    (``second_moment_transport="rotation"``) and ``m`` kept in Adam's bound ``|m| ≤ c_t sqrt(v)``
    (``momentum_bound=True``). ``second_moment_transport="none", momentum_bound=False`` is the box
    verbatim. The box has no bias correction (``bias_correction=False``, the default; ``True``
    divides ``m``, ``v`` by ``1 − βᵗ`` as Adam). ``coordinate_wise=False`` replaces ``v`` by the
    single step size ``β₂ v + (1 − β₂)‖g‖²`` of Bécigneul & Ganea (the variant the paper compares
    with, Sec. 2). Defaults from the paper: ``lr=5e-5`` (rank 16; 3e-5 at rank 32, Table 1),
    Adam's ``betas=(0.9, 0.999)``, ``eps=1e-8`` (not stated in the paper).
    Zero-initialised LoRA goes through the base class's robust AdamW start until ``B A`` has rank
    r, then the truncated SVD enters the manifold (module docstring). Memory per pair:
    ``2(m + n) r + r`` for the point plus ``2((m + n) r + r²)`` for the moments.
    """

    functional_state = True  # _update_pairs only assigns new tensors to state keys

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        coordinate_wise: bool = True,
        bias_correction: bool = False,
        second_moment_transport: str = "rotation",
        momentum_bound: bool = True,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "coordinate_wise": coordinate_wise,
            "bias_correction": bias_correction,
            "second_moment_transport": second_moment_transport,
            "momentum_bound": momentum_bound,
        }
        super().__init__(params, defaults, robust_steps=robust_steps, **kwargs)

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        self._validate_adam(group)

    def _entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
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
        # ∇_Xᵀ u_i = ∇_N[:, i] / S_i, and 0 where S_i = 0 (finite ∇_N / inf = 0: one pass).
        return g.M, g.N / torch.where(s != 0, s, torch.inf)

    @staticmethod
    def _mix(v: FixedRankTangent, pu: Tensor, pv: Tensor) -> FixedRankTangent:
        """Second moment under a change of frame with column weights ``pu``, ``pv: (..., r, r)``:
        ``(puᵀ v_M pv, v_Up pv, v_Vp pu)`` (``Up`` pairs with ``V``'s columns, ``Vp`` with
        ``U``'s)."""
        return FixedRankTangent(transpose(pu) @ v.M @ pv, mm_t(v.Up, pv), mm_t(v.Vp, pu))

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        pt = FixedRankPoint(state["U"], state["S"], state["V"])
        u, s, v_ = pt
        m, r = u.shape[-2:]
        n = v_.shape[-2]
        man = FixedRank(m, n, r)
        zv, ztu = self._products(pt, x, g, step)
        # P_T(Z) from ZV, ZᵀU (Alg. 2): M = UᵀZV, Up = ZV − U M, Vp = ZᵀU − V Mᵀ.
        mg = transpose(u) @ zv
        grad = FixedRankTangent(
            mg, addmm_t(zv, u, mg, alpha=-1.0), addmm_t(ztu, v_, transpose(mg), alpha=-1.0)
        )
        grad = self._mask(grad, m, n, r)
        w_avg = _cluster_weights(s)
        if group["coordinate_wise"]:
            # Up and Vp (both r wide) concatenated along the rows: one pass per operation.
            def cat(prefix: str) -> list[Tensor]:
                up, vp = (state[f"{prefix}_{f}"] for f in ("Up", "Vp"))
                return [state[f"{prefix}_M"], torch.cat([up, vp], dim=-2)]

            def average(ls: list[Tensor]) -> list[Tensor]:
                return [transpose(w_avg) @ ls[0] @ w_avg, mm_t(ls[1], w_avg)]

            gl = [grad.M, torch.cat([grad.Up, grad.Vp], dim=-2)]
            dl, ml, vl = _adam_leaves(
                group,
                gl,
                cat("exp_avg"),
                cat("exp_avg_sq"),
                step,
                None if w_avg is None else average,
            )
            d, m_new, v = (
                FixedRankTangent(t[0], t[1][..., :m, :], t[1][..., m:, :]) for t in (dl, ml, vl)
            )
        else:
            d, m_new, v = self._adam(group, man, pt, grad, state, step)
        new, cu64, cv64 = _fr_retraction(pt, d.M, d.Up, d.Vp, -group["lr"])
        cu, cv = cu64.to(u.dtype), cv64.to(u.dtype)  # UᵀU⁺, VᵀV⁺
        w = _fr_transport(pt, new, cu, cv, m_new)
        if group["coordinate_wise"] and _transports_v(group):
            # frame_alignment(U, U⁺), frame_alignment(V, V⁺) from UᵀU⁺, VᵀV⁺
            pu, pv = _squared_polar(torch.stack([cu64, cv64])).unbind(0)
            v = self._mix(v, pu.to(u.dtype), pv.to(u.dtype))
        state["U"], state["S"], state["V"] = new
        _store(state, "exp_avg", self._mask(w, m, n, r))
        _store(state, "exp_avg_sq", v)
        return self._point_factors(state)

    @staticmethod
    def _mask(t: FixedRankTangent, m: int, n: int, r: int) -> FixedRankTangent:
        """Zero the blocks that vanish identically: ``Up`` if ``r = m``, ``Vp`` if ``r = n``."""
        up = torch.zeros_like(t.Up) if r == m else t.Up
        vp = torch.zeros_like(t.Vp) if r == n else t.Vp
        return FixedRankTangent(t.M, up, vp)


def canonical_bounded_rank(x: BoundedRankPoint) -> BoundedRankPoint:
    """The representative ``(K Ψ, V Ψ)`` of ``(K, V)`` with ``K Ψ = Ū diag(S̄)`` (loram.txt Alg. 7
    lines 5–6: ``U⁺ S⁺ = Ū S̄``, ``V⁺ = Q H``), columns by decreasing singular value.

    ``Ψ`` are the right singular vectors of ``K`` (from the r×r factor of a QR of ``K``, SVD in
    float64); ``X = K Vᵀ`` is unchanged. The coordinate-wise second moment of LoRAM-BR is taken in
    this basis. Shapes ``(..., m, r)``, ``(..., n, r)``.
    """
    _, rk = thin_qr(x.K)
    _, _, psi_h = svd_small(rk.to(torch.float64))
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
    Second moments as in the module docstring: ``V̇p`` masked when ``r = n``, ``v`` averaged over
    clusters of equal singular values of ``K`` (``K = 0`` is one cluster), transported with
    ``V``'s frame (``second_moment_transport="rotation"``), ``m`` kept in Adam's bound
    (``momentum_bound=True``); ``"none"``, ``False`` give the box verbatim. Coordinate-wise
    steps turn the row space by up to ``c_t·lr`` per ``V̇p`` entry: lr ≲ 3e-3 (module docstring).
    No bias correction in the box (``bias_correction=False``); ``coordinate_wise=False`` uses the
    norm-based single step size of Bécigneul & Ganea (module docstring).

    Defaults from the paper: ``lr=1e-4`` (Table 1), ``alpha=0.5`` (Alg. 6), ``nuclear_norm=1e-3``
    (Table 1 note b: worse with 0), Adam's ``betas``/``eps``. A zero-initialised ``B`` needs no
    robust start (``K = 0`` is a point); ``robust_steps`` still works if asked for.
    """

    functional_state = True  # _update_pairs only assigns new tensors to state keys

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
        second_moment_transport: str = "rotation",
        momentum_bound: bool = True,
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
            "second_moment_transport": second_moment_transport,
            "momentum_bound": momentum_bound,
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

    def _entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
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

    @staticmethod
    def _mix(v: BoundedRankTangent, p: Tensor) -> BoundedRankTangent:
        """Second moment under a change of frame with column weights ``p: (..., r, r)``."""
        return BoundedRankTangent(mm_t(v.K, p), mm_t(v.Vp, p))

    def _update_pairs(
        self, group, x: FactorPoint, g: FactorTangent, state, step: int
    ) -> FactorPoint:
        pt = BoundedRankPoint(state["K"], state["V"])
        k, v_ = pt
        m, r = k.shape[-2:]
        n = v_.shape[-2]
        alpha = group["alpha"]
        if step == 1:  # (M, N) are the factors the manifold was entered from
            gv, gtk = right_solve(g.M, transpose(v_) @ x.N), g.N @ (transpose(x.N) @ v_)
        else:
            gv, gtk = g.M, g.N
        # The stored K is canonical, K = U diag(S) (canonical_bounded_rank): its column norms
        # are the singular values and KᵀK = diag(s²), so the metric's (KᵀK + 2αI)⁻¹ is the
        # diagonal 1/(s² + 2α) (metric_gram_inverse without the r×r Cholesky).
        s = k.norm(dim=-2)
        ginv = _metric_inverse_diag(s.to(torch.float64), alpha, k)
        # Alg. 6: (∇V, (I − VVᵀ) ∇ᵀK (KᵀK + 2αI)⁻¹)
        vpg = addmm_t(gtk, v_, transpose(v_) @ gtk, alpha=-1.0) * ginv.unsqueeze(-2)
        grad = self._mask(BoundedRankTangent(gv, vpg), n, r)
        w_avg = _cluster_weights(s)
        if group["coordinate_wise"]:
            # K̇ and V̇p (both r wide) concatenated along the rows: one pass per operation.
            def cat(prefix: str) -> list[Tensor]:
                return [torch.cat([state[f"{prefix}_K"], state[f"{prefix}_Vp"]], dim=-2)]

            dl, ml, vl = _adam_leaves(
                group,
                [torch.cat(list(grad), dim=-2)],
                cat("exp_avg"),
                cat("exp_avg_sq"),
                step,
                None if w_avg is None else (lambda ls: [mm_t(ls[0], w_avg)]),
            )
            d, m_new, v = (
                BoundedRankTangent(t[0][..., :m, :], t[0][..., m:, :]) for t in (dl, ml, vl)
            )
        else:
            man = BoundedRank(m, n, r, alpha=alpha)
            d, m_new, v = self._adam(group, man, pt, grad, state, step)
        new, sig, a = _br_retraction(pt, s, d, -group["lr"], group["nuclear_norm"], group)
        w = self._mask(_br_transport(pt, new, sig, a, m_new, alpha), n, r)
        if group["coordinate_wise"] and _transports_v(group):
            v = self._mix(v, _squared_polar(a))  # frame_alignment(V, V⁺) from a = VᵀV⁺
        state["K"], state["V"] = new.K, new.V
        _store(state, "exp_avg", w)
        _store(state, "exp_avg_sq", v)
        return self._point_factors(state)

    @staticmethod
    def _mask(t: BoundedRankTangent, n: int, r: int) -> BoundedRankTangent:
        """Zero ``V̇p`` if ``r = n`` (then ``I − VVᵀ = 0``: the Grassmann part is a point)."""
        return BoundedRankTangent(t.K, torch.zeros_like(t.Vp)) if r == n else t
