"""Optimizers that own a manifold point: the shared machinery of LoRAM-FR/BR, Stiefel-LoRA
and Riemannion, as geometries, preconditioners and a move of the template
(:mod:`geolora.optim.base`).

LoRAM: Jiang, Wang & Stich, "LoRAM: Low-Rank Adaptation of Large Language Models on Manifold",
ICLR 2025 Workshop on Sparsity in LLMs, OpenReview 6cLPObfitT (Algorithms 1–8).


* LoRAM-FR, point ``(U, S, V)`` of :class:`~geolora.manifolds.fixed_rank.FixedRank`:
  ``B = U diag(S)``, ``A = Vᵀ``. Autograd gives ``∇_B = ∇_X A ᵀ = ∇_X V`` — LoRAM Alg. 2's
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

Zero-initialised LoRA (``B = 0``): LoRAM starts from ``S = 0`` and obtains ``∇_X V``,
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
(one norm-based step size per pair, Bécigneul & Ganea 2019, compared in LoRAM §2), which
never raised the loss in any of these cases (lr up to 3e-2, both optimizers). A diverged ``K``
stops with ``FloatingPointError`` (its metric ``(KᵀK + 2αI)⁻¹`` is no longer finite).

State per pair (all tensors): the point (``U``, ``S``, ``V`` or ``K``, ``V``), the first moment
``exp_avg_<field>`` and the coordinate-wise second moment ``exp_avg_sq_<field>`` for each field of
the tangent representation (one ``exp_avg_sq`` of shape ``(1, 1)`` with
``coordinate_wise=False``). ``state_dict()`` / ``load_state_dict()`` resume bitwise. Changing
``B``/``A`` from outside after the first step has no effect (the next step overwrites them).

The parts
---------
* Geometries (:class:`FixedRankGeometry`, :class:`BoundedRankGeometry`,
  :class:`StiefelGeometry`): the point in the pair's state, entering it from ``(B, A)``, the
  gradient in the manifold's coordinates (including the first step's conversion from the factors
  the point was entered from), the retraction and the transport it induces, the factors to write
  back.
* Preconditioners (:class:`ManifoldAdam`, :class:`StiefelAdam`, :class:`SpectralMomentum`): the
  moments in the manifold's coordinates, moved along by the retraction's transport
  (``transport(state, transport)``; :class:`Transport`).
* The move :class:`Retraction`: retract along ``−lr · direction``, transport the
  preconditioner's state, store the new point, return its factors.

Retractions and transports are those of :mod:`geolora.retractions` (one implementation each).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from geolora.linalg import (
    addmm_t,
    compute_dtype,
    mm_t,
    polar,
    polar_overlap,
    qr_pos,
    rank_deficient,
    svd_small,
    sym,
    transpose,
)
from geolora.manifolds.bounded_rank import BoundedRank
from geolora.manifolds.fixed_rank import FixedRank
from geolora.manifolds.stiefel import Stiefel
from geolora.manifolds.types import (
    BoundedRankPoint,
    BoundedRankTangent,
    FactorPoint,
    FactorTangent,
    FixedRankPoint,
    FixedRankTangent,
)
from geolora.optim.adamw import PendingAdamW
from geolora.optim.preconditioners.factor import adamw_moments
from geolora.optim.riemannian import adam_direction
from geolora.optim.sharding import (
    LOCAL,
    RowSum,
    dtensor_gram,
    gram_polar,
    gram_qr,
    gram_qr_blocks,
    is_dtensor,
    local_amax,
    local_tensor,
)
from geolora.optim.validation import check_bool, check_choice, check_range
from geolora.retractions.bounded_rank import (
    canonical_qfactor_retraction,
    canonical_transport,
    metric_inverse_diag,
)
from geolora.retractions.fixed_rank import (
    fixed_rank_project,
    retract_with_overlaps,
    thin_qr,
    transport_with_overlaps,
)
from geolora.retractions.stiefel import STIEFEL_RETRACTIONS

__all__ = [
    "ORTHOGONALIZERS",
    "SECOND_MOMENT_TRANSPORTS",
    "BoundedRankGeometry",
    "FixedRankGeometry",
    "ManifoldAdam",
    "Retraction",
    "RowShardedStiefel",
    "SpectralMomentum",
    "StiefelAdam",
    "StiefelGeometry",
    "Transport",
    "adam_ratio_bound",
    "bound_momentum",
    "cluster_average",
    "frame_alignment",
    "msign",
    "rank_deficient",
    "right_solve",
    "tangent_msign",
]

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


#: The moment prefixes of :class:`ManifoldAdam`'s state keys ``<prefix>_<field>``.
_MOMENTS = ("exp_avg", "exp_avg_sq")


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
    of second-moment-like tensors to their cluster averages. Returns new lists
    ``(d, m, v)``."""
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
    ``c = oldᵀ new`` when it is already known. ``c: (..., r, r)``; Newton–Schulz for the
    overlap of nearby frames, the SVD where it does not converge (:func:`polar_overlap`)."""
    q = polar_overlap(c.to(torch.float64))
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


def _transports_v(group: dict[str, Any]) -> bool:
    # Groups saved before the option existed resume the box (second moment in place).
    return group.get("second_moment_transport", "none") == "rotation"


# --- the template's parts -----------------------------------------------------------------------
@dataclass
class Transport:
    """What a retraction hands the preconditioner to carry its state to the new point:
    ``vector(t)`` — a tangent vector at the old point to the new one (vector transport);
    ``coordinates(v)`` — a coordinate-wise statistic (a second moment) to the new frame
    (``v (Q ∘ Q)``, rule 3 of the module docstring), or ``None`` where the geometry has no
    moving frame."""

    vector: Callable[[Any], Any]
    coordinates: Callable[[Any], Any] | None = None


class _OwnedPoint:
    """Shared behaviour of the geometries whose point the optimizer owns (module docstring)."""

    functional_state = True
    defaults: dict[str, Any] = {}
    #: ``"enter"``/``"refactor"``/``"robust"`` decision for a pair not yet on the manifold.
    entry_checks: str = "both"

    def requires_full_rank(self, group: dict[str, Any]) -> bool:
        return True

    def entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        """How a pair enters the manifold after its robust steps (base class's contract)."""
        raise NotImplementedError

    def point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        """``(M, N) = (B, Aᵀ)`` represented by the point stored in ``state``."""
        raise NotImplementedError

    def refactor_update(
        self, group: dict, B: Tensor, A: Tensor, work: dict, st: dict, label: str
    ) -> PendingAdamW:
        """Enter the manifold without an update: the point's factors (same ``X``) are written to
        ``B``, ``A`` and its state stored, when the step is committed (row-sharded factors: the
        point's local rows into the local shards ``B``, ``A``)."""
        pt = self.point_factors(work)
        new = FactorPoint(local_tensor(pt.M), local_tensor(pt.N))
        return PendingAdamW.pair_write(group, label, B, A, new, st, work)

    def project(self, p: Any, d: Any) -> Any:
        return d  # directions are tangent vectors of the manifold already


def entry_svd(B: Tensor, A: Tensor, reduce: RowSum = LOCAL) -> FixedRankPoint:
    """The truncated SVD of ``X = B A`` by which a LoRA pair enters an owned fixed-rank or
    bounded-rank point: :meth:`FixedRank.from_factors` (``allow_zero=True``), or
    :func:`row_sharded_svd` for the local rows of sharded factors (``reduce`` sharded)."""
    if reduce.sharded:
        return row_sharded_svd(B, A, reduce)
    m, r = B.shape
    return FixedRank(m, A.shape[1], r).from_factors(B, A, allow_zero=True)


def row_sharded_svd(B: Tensor, A: Tensor, reduce: RowSum) -> FixedRankPoint:
    """:meth:`FixedRank.from_factors` (``allow_zero=True``) of ``X = B A`` for factors whose rows
    are sharded: ``B: (m_local, r)``, ``A: (r, n_local)`` the local parts. The QRs of ``B`` and
    ``Aᵀ`` from reduced Grams (:func:`~geolora.optim.sharding.gram_qr_blocks`: two rounds for both,
    one more where a factor is rank deficient), the ``r x r`` SVD of the core ``R_B R_Aᵀ`` in
    float64 (the same on every rank), ``U = Q_B Ũ``, ``V = Q_A Ṽ`` on the local rows. A
    rank-deficient ``A`` raises ``NotImplementedError`` (``V`` would not be orthonormal); a
    rank-deficient ``B`` gives zero columns of ``U`` where ``S = 0`` (``U diag(S)`` exact)."""
    cd = compute_dtype(torch.promote_types(B.dtype, A.dtype))
    (qb, rb), (qa, ra) = gram_qr_blocks([(B.to(cd), "M"), (transpose(A).to(cd), "N")], reduce)
    if rank_deficient(ra):  # Q_A would have zero columns: V not orthonormal
        raise NotImplementedError(
            "entering the manifold from a rank-deficient lora_A does not run on row-sharded "
            "factors (the orthonormal completion of its row space needs a Householder QR of the "
            "whole factor); use sharded='gather'"
        )
    uc, s, vch = torch.linalg.svd(rb @ transpose(ra), full_matrices=False)
    return FixedRankPoint((qb @ uc).to(cd), s.to(cd), (qa @ transpose(vch)).to(cd))


def gram_rank_deficient(gram: Tensor, rtol: float) -> bool:
    """``σ_min ≤ rtol σ_max`` (or ``F = 0``) for the singular values ``σ`` of a factor ``F`` given
    its float64 Gram ``FᵀF`` (whole, e.g. reduced over row shards: the same decision on every
    rank). The Gram's eigenvalues resolve ``σ_min`` only down to ``√eps σ_max``."""
    s = torch.linalg.eigvalsh(gram).clamp_min(0).sqrt()  # increasing
    return not (bool(s[-1] > 0) and bool(s[0] > rtol * s[-1]))


#: ``rtol`` of a rank test on a reduced Gram (:func:`gram_rank_deficient`): below ``1e-7`` the
#: float64 Gram's rounding decides.
_GRAM_RTOL = 1e-7


def factor_rank_deficient(F: Tensor, rows: int = 0) -> bool:
    """:func:`~geolora.linalg.rank_deficient` of ``B`` (``rows=0``) or of ``Aᵀ`` (``F = A``,
    ``rows=1``). A ``DTensor`` factor (FSDP2) is tested from its reduced float64 Gram
    (:func:`gram_rank_deficient`): ``σ_min ≤ max(rtol, 1e-7) σ_max``."""
    if not is_dtensor(F):
        return rank_deficient(F if rows == 0 else transpose(F))
    rtol = max(_GRAM_RTOL, 1e-12 if compute_dtype(F.dtype) == torch.float64 else 1e-6)
    return gram_rank_deficient(dtensor_gram(F, rows), rtol)


def _sharded_qr(reduce: RowSum) -> Callable[[list[Tensor]], list[tuple[Tensor, Tensor]]]:
    """The QR of a retraction's blocks ``[M-side, N-side]`` through ``reduce``."""
    return lambda blocks: gram_qr_blocks(list(zip(blocks, ("M", "N"))), reduce)


class FixedRankPair(NamedTuple):
    """A stack of pairs on the fixed-rank manifold: the point, the factors ``x`` of this step,
    the (global) shape and the row-shard reducer (:data:`~geolora.optim.sharding.LOCAL`: none)."""

    pt: FixedRankPoint
    x: FactorPoint
    m: int
    n: int
    r: int
    reduce: RowSum = LOCAL


class FixedRankGeometry(_OwnedPoint):
    """The embedded manifold of rank-r matrices, point ``(U, S, V)`` owned in the pair's state
    (``B = U diag(S)``, ``A = Vᵀ``; Vandereycken 2013; Jiang, Wang & Stich, "LoRAM", Alg. 1–4).

    Gradient: ``P_T(∇_X f) = (M, Up, Vp)`` from ``(∇_X V, ∇_Xᵀ U)`` (Alg. 2), with the blocks that
    vanish identically (``Up`` for ``r = m``, ``Vp`` for ``r = n``) set to exactly 0. Retraction:
    the truncated SVD of ``X + Ẋ`` (:func:`~geolora.retractions.fixed_rank.
    retract_with_overlaps`); transport by projection. Entry: a pair with a rank-deficient factor
    takes the robust start; otherwise the truncated SVD of ``B A`` enters (no gauge left).

    ``lr_units="dW"`` measures the step in ``ΔW = s X`` (the retraction goes ``−(lr / s) Ẋ``);
    a group's ``weight_decay`` (if declared) shrinks ``X`` by ``1 − lr λ`` before the step.

    Row-sharded factors (FSDP2): ``U``, ``V`` and the tangent blocks ``Up``, ``Vp`` are stored with
    the factors' rows, ``S`` and ``M`` whole. The sums over rows go through the point's reducer:
    the entry's QRs of ``B``, ``Aᵀ``, the projection ``UᵀZV`` (and at the first step ``UᵀM``,
    ``VᵀN``), the retraction's QRs of ``[U Up]``, ``[V Vp]`` (CholeskyQR2 on reduced Grams,
    :func:`~geolora.optim.sharding.gram_qr_blocks`) and the transport's ``UpᵀU⁺``, ``VpᵀV⁺``; the
    ``2r x 2r`` SVD and everything ``r x r`` is computed alike on every rank.
    """

    row_shards = True
    state_sides: dict[str, str | None] = {"U": "M", "S": None, "V": "N"}

    def __init__(self, lr_units: str = "X") -> None:
        check_choice("lr_units", lr_units, ("X", "dW"))
        self.lr_units = lr_units

    def entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        deficient = factor_rank_deficient(B) or factor_rank_deficient(A, 1)
        return "robust" if deficient else "enter"

    def init_state(
        self, group: dict[str, Any], B: Tensor, A: Tensor, reduce: RowSum = LOCAL
    ) -> dict[str, Tensor]:
        pt = entry_svd(B.detach(), A.detach(), reduce)
        return {"U": pt.U, "S": pt.S, "V": pt.V}

    def point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        return FactorPoint(state["U"] * state["S"].unsqueeze(-2), state["V"])

    def point(
        self, x: FactorPoint, state: dict, group: dict, step: int, reduce: RowSum = LOCAL
    ) -> FixedRankPair:
        pt = FixedRankPoint(state["U"], state["S"], state["V"])
        m, r = pt.U.shape[-2:]
        n = pt.V.shape[-2]
        return FixedRankPair(pt, x, reduce.rows("M", m), reduce.rows("N", n), r, reduce)

    @staticmethod
    def products(
        pt: FixedRankPoint, x: FactorPoint, g: FactorTangent, step: int, reduce: RowSum = LOCAL
    ):
        """``(∇_X V, ∇_Xᵀ U)`` from autograd's ``(∇_M, ∇_N) = (∇_X N, ∇_Xᵀ M)``."""
        if step == 1:  # (M, N) are the factors the manifold was entered from
            (um,), (vn,) = reduce(M=[transpose(pt.U) @ x.M], N=[transpose(pt.V) @ x.N])
            return right_solve(g.M, vn), right_solve(g.N, um)
        s = pt.S.unsqueeze(-2)
        # ∇_Xᵀ u_i = ∇_N[:, i] / S_i, and 0 where S_i = 0 (finite ∇_N / inf = 0: one pass).
        return g.M, g.N / torch.where(s != 0, s, torch.inf)

    def gradient(
        self, p: FixedRankPair, g: FactorTangent, group: dict, step: int, wants: str = "tangent"
    ) -> FixedRankTangent:
        u, _, v_ = p.pt
        zv, ztu = self.products(p.pt, p.x, g, step, p.reduce)
        # P_T(Z) from ZV, ZᵀU (Alg. 2): M = UᵀZV, Up = ZV − U M, Vp = ZᵀU − V Mᵀ.
        (mg,), _ = p.reduce(M=[transpose(u) @ zv])
        grad = FixedRankTangent(
            mg, addmm_t(zv, u, mg, alpha=-1.0), addmm_t(ztu, v_, transpose(mg), alpha=-1.0)
        )
        return self.mask(grad, p)

    @staticmethod
    def mask(t: FixedRankTangent, p: FixedRankPair) -> FixedRankTangent:
        """Zero the blocks that vanish identically: ``Up`` if ``r = m``, ``Vp`` if ``r = n``."""
        up = torch.zeros_like(t.Up) if p.r == p.m else t.Up
        vp = torch.zeros_like(t.Vp) if p.r == p.n else t.Vp
        return FixedRankTangent(t.M, up, vp)

    def manifold(self, p: FixedRankPair) -> FixedRank:
        return FixedRank(p.m, p.n, p.r)

    def cluster_weights(self, p: FixedRankPair) -> Tensor | None:
        """The cluster average of equal singular values (``None``: all distinct)."""
        return _cluster_weights(p.pt.S)

    def averaging(self, w: Tensor) -> Callable[[list[Tensor]], list[Tensor]]:
        """The cluster average ``W`` on the leaves ``[M, Up, Vp]`` of a coordinate-wise
        statistic: ``Wᵀ M W``, ``Up W``, ``Vp W``."""
        return lambda ls: [transpose(w) @ ls[0] @ w, mm_t(ls[1], w), mm_t(ls[2], w)]

    def tangent_type(self) -> type:
        return FixedRankTangent

    def retract(
        self, p: FixedRankPair, d: FixedRankTangent, group: dict[str, Any]
    ) -> tuple[FixedRankPoint, Transport]:
        lr = group["lr"]
        if self.lr_units == "dW":
            lr = lr / float(group.get("scaling", 1.0))
        lam = group.get("weight_decay", 0.0)
        pt = p.pt
        base = pt if not lam else FixedRankPoint(pt.U, pt.S * (1.0 - group["lr"] * lam), pt.V)
        sharded = p.reduce.sharded
        qr = _sharded_qr(p.reduce) if sharded else None
        new, cu64, cv64 = retract_with_overlaps(base, d.M, d.Up, d.Vp, -lr, qr)
        dt = pt.U.dtype
        cu, cv = cu64.to(dt), cv64.to(dt)  # UᵀU⁺, VᵀV⁺
        sums = p.reduce if sharded else None

        def vector(t: FixedRankTangent) -> FixedRankTangent:
            return self.mask(transport_with_overlaps(pt, new, cu, cv, t, sums), p)

        def coordinates(v: FixedRankTangent) -> FixedRankTangent:
            # frame_alignment(U, U⁺), frame_alignment(V, V⁺) from UᵀU⁺, VᵀV⁺
            pu, pv = _squared_polar(torch.stack([cu64, cv64])).unbind(0)
            pu, pv = pu.to(dt), pv.to(dt)
            return FixedRankTangent(transpose(pu) @ v.M @ pv, mm_t(v.Up, pv), mm_t(v.Vp, pu))

        return new, Transport(vector, coordinates)

    def store(self, state: dict[str, Tensor], new: FixedRankPoint) -> None:
        state["U"], state["S"], state["V"] = new


class BoundedRankPair(NamedTuple):
    """A stack of pairs on the desingularized bounded-rank manifold: the canonical point
    ``(K, V)``, the factors ``x``, the column norms ``s`` of ``K`` (its singular values), the
    (global) shape and the row-shard reducer."""

    pt: BoundedRankPoint
    x: FactorPoint
    s: Tensor
    m: int
    n: int
    r: int
    reduce: RowSum = LOCAL


class BoundedRankGeometry(_OwnedPoint):
    """The desingularization of ``{rank X ≤ r}`` (Khrulkov & Oseledets 2018; Rebjock & Boumal
    2024), point ``(K, V)`` owned in the pair's state (``B = K``, ``A = Vᵀ``), kept canonical
    (``K = U diag(S)``, columns by decreasing singular value; Jiang, Wang & Stich, "LoRAM",
    Alg. 5–8). Metric ``‖K̇‖² + tr(V̇p (KᵀK + 2αI) V̇pᵀ)`` (per-group ``alpha``).

    Gradient ``(∇V, (I − VVᵀ) ∇ᵀK (KᵀK + 2αI)⁻¹)`` (Alg. 6; the metric inverse is the diagonal
    ``1 / (s² + 2α)`` at a canonical ``K``), ``V̇p`` zeroed for ``r = n``. Retraction: the Q-factor
    retraction with the nuclear-norm term (per-group ``nuclear_norm``, ``nuclear_mode``; Alg. 7),
    then the canonical representative; transport by projection (Alg. 8). Entry: a rank-deficient
    ``A`` enters by re-factoring only (no gradient conversion exists); ``K = 0`` is a point.

    Row-sharded factors (FSDP2): ``K``, ``V`` and the moments of ``K̇``, ``V̇p`` are stored with
    the factors' rows. The sums over rows go through the point's reducer: the entry's QRs, the
    column norms of ``K``, ``VᵀZ`` of the gradient, the retraction's QRs of ``V + cV̇p`` and
    ``K⁺`` (CholeskyQR2, :func:`~geolora.optim.sharding.gram_qr_blocks`) with ``V̇pᵀQ``, and the
    transport's three overlaps; ``nuclear_mode="prox"`` refuses row shards.
    """

    row_shards = True
    state_sides: dict[str, str | None] = {"K": "M", "V": "N"}

    def entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        return "refactor" if factor_rank_deficient(A, 1) else "enter"

    def init_state(
        self, group: dict[str, Any], B: Tensor, A: Tensor, reduce: RowSum = LOCAL
    ) -> dict[str, Tensor]:
        pt = entry_svd(B.detach(), A.detach(), reduce)
        return {"K": pt.U * pt.S.unsqueeze(-2), "V": pt.V}

    def point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        return FactorPoint(state["K"], state["V"])

    def point(
        self, x: FactorPoint, state: dict, group: dict, step: int, reduce: RowSum = LOCAL
    ) -> BoundedRankPair:
        pt = BoundedRankPoint(state["K"], state["V"])
        m, r = pt.K.shape[-2:]
        n = pt.V.shape[-2]
        if reduce.sharded:  # column norms of K from the reduced sums of squares
            (sq,), _ = reduce(M=[(pt.K * pt.K).sum(dim=-2)])
            s = sq.sqrt()
        else:
            s = pt.K.norm(dim=-2)
        return BoundedRankPair(pt, x, s, reduce.rows("M", m), reduce.rows("N", n), r, reduce)

    def gradient(
        self, p: BoundedRankPair, g: FactorTangent, group: dict, step: int, wants: str = "tangent"
    ) -> BoundedRankTangent:
        k, v_ = p.pt
        if step == 1:  # (M, N) are the factors the manifold was entered from
            _, (vn,) = p.reduce(N=[transpose(v_) @ p.x.N])
            gv, gtk = right_solve(g.M, vn), g.N @ transpose(vn)
        else:
            gv, gtk = g.M, g.N
        # The stored K is canonical, K = U diag(S): its column norms are the singular values and
        # KᵀK = diag(s²), so the metric's (KᵀK + 2αI)⁻¹ is the diagonal 1/(s² + 2α).
        ginv = metric_inverse_diag(p.s.to(torch.float64), group["alpha"], k)
        # Alg. 6: (∇V, (I − VVᵀ) ∇ᵀK (KᵀK + 2αI)⁻¹)
        _, (vg,) = p.reduce(N=[transpose(v_) @ gtk])
        vpg = addmm_t(gtk, v_, vg, alpha=-1.0) * ginv.unsqueeze(-2)
        return self.mask(BoundedRankTangent(gv, vpg), p)

    @staticmethod
    def mask(t: BoundedRankTangent, p: BoundedRankPair) -> BoundedRankTangent:
        """Zero ``V̇p`` if ``r = n`` (then ``I − VVᵀ = 0``: the Grassmann part is a point)."""
        return BoundedRankTangent(t.K, torch.zeros_like(t.Vp)) if p.r == p.n else t

    def manifold(self, p: BoundedRankPair, group: dict[str, Any] | None = None) -> BoundedRank:
        return BoundedRank(p.m, p.n, p.r, alpha=(group or {}).get("alpha", 0.5))

    def cluster_weights(self, p: BoundedRankPair) -> Tensor | None:
        return _cluster_weights(p.s)

    def averaging(self, w: Tensor) -> Callable[[list[Tensor]], list[Tensor]]:
        """The cluster average ``W`` on the leaves ``[K̇, V̇p]`` of a coordinate-wise statistic:
        ``K̇ W``, ``V̇p W``."""
        return lambda ls: [mm_t(t, w) for t in ls]

    def tangent_type(self) -> type:
        return BoundedRankTangent

    def retract(
        self, p: BoundedRankPair, d: BoundedRankTangent, group: dict[str, Any]
    ) -> tuple[BoundedRankPoint, Transport]:
        sharded = p.reduce.sharded
        qr = (lambda F, side: gram_qr_blocks([(F, side)], p.reduce)[0]) if sharded else None
        sums = p.reduce if sharded else None
        new, sig, a = canonical_qfactor_retraction(
            p.pt, p.s, d, -group["lr"], group["nuclear_norm"], group["nuclear_mode"], qr, sums
        )
        alpha = group["alpha"]

        def vector(t: BoundedRankTangent) -> BoundedRankTangent:
            return self.mask(canonical_transport(p.pt, new, sig, a, t, alpha, sums), p)

        def coordinates(v: BoundedRankTangent) -> BoundedRankTangent:
            w = _squared_polar(a)  # frame_alignment(V, V⁺) from a = VᵀV⁺
            return BoundedRankTangent(mm_t(v.K, w), mm_t(v.Vp, w))

        return new, Transport(vector, coordinates)

    def store(self, state: dict[str, Tensor], new: BoundedRankPoint) -> None:
        state["K"], state["V"] = new.K, new.V


class StiefelPair(NamedTuple):
    """A stack of Stiefel-LoRA pairs: ``B ∈ St(m, r)`` (``q``), ``N = (R A)ᵀ``, the factors of
    this step, the Stiefel manifold and the bucket's reducer of sums over rows."""

    q: Tensor
    N: Tensor
    x: FactorPoint
    manifold: Stiefel
    reduce: RowSum = LOCAL


class RowShardedStiefel(Stiefel):
    """``St(m, r)`` on row shards (FSDP2): points and tangent vectors are the local rows
    ``(..., k, r)`` of ``(..., m, r)`` matrices, and every sum over rows goes through ``reduce``
    (:class:`~geolora.optim.sharding.RowSum`, one all-reduce of the bucket each):
    ``proj(X, Z) = Z − X sym(Σ XᵀZ)`` (so ``egrad2rgrad`` and the projection transport),
    ``inner = Σ tr(UᵀV)``, and the retractions from reduced ``r x r`` quantities: ``"qr"`` by
    CholeskyQR2 of the float64 Grams (:func:`~geolora.optim.sharding.gram_qr`, 2 rounds; one
    process uses Householder QR: the two agree to rounding), ``"polar"`` from the Gram's
    eigendecomposition (:func:`~geolora.optim.sharding.gram_polar`, 1 round) and ``"cayley"`` in
    Wen & Yin's low-rank (Woodbury) form (:meth:`_cayley`, 2 rounds). Nothing here raises on local
    values (a NaN propagates and the engine's global finiteness check refuses the step on every
    rank)."""

    def __init__(self, n: int, r: int, retraction: str, reduce: RowSum) -> None:
        super().__init__(n, r, retraction=retraction)
        self.reduce = reduce

    def _sum(self, t: Tensor) -> Tensor:
        return self.reduce(M=[t])[0][0]

    def _validate(self, **tensors: Tensor) -> None:  # local rows: only ``r`` is fixed
        for name, t in tensors.items():
            if t.dim() < 2 or t.shape[-1] != self.r:
                raise ValueError(f"{self}: {name} must be (..., k, {self.r}), got {tuple(t.shape)}")

    def proj(self, x: Tensor, u: Tensor) -> Tensor:
        """``P_X(Z) = Z − X sym(Σ XᵀZ)``."""
        self._validate(x=x, u=u)
        return u - x @ sym(self._sum(transpose(x) @ u))

    def inner(self, x: Tensor, u: Tensor, v: Tensor | None = None) -> Tensor:
        """``Σ tr(UᵀV)``; shape = batch shape."""
        v = u if v is None else v
        self._validate(x=x, u=u, v=v)
        return self._sum((u * v).sum(dim=(-2, -1)))

    def retr(self, x: Tensor, u: Tensor) -> Tensor:
        """``qf(X + U)`` (CholeskyQR2), ``polar(X + U)`` or the Cayley transform, from reduced
        ``r x r`` / ``2r x 2r`` quantities (class docstring)."""
        self._validate(x=x, u=u)
        if self.retraction == "cayley":
            return self._cayley(x, u)
        y = x + u
        if self.retraction == "qr":
            q = gram_qr(y, self.reduce, "M", self.n)[0]
        else:
            q = gram_polar(y, self.reduce, "M")
        return q.to(x.dtype)

    def _cayley(self, x: Tensor, u: Tensor) -> Tensor:
        """``(I − W/2)⁻¹(I + W/2) X`` with ``W = ĝXᵀ − Xĝᵀ = L Rᵀ``, ``ĝ = U − ½X(XᵀU)``,
        ``L = [ĝ, X]``, ``R = [X, −ĝ]`` (Wen & Yin, "A feasible method for optimization with
        orthogonality constraints", Math. Program. 2013, its low-rank form): by Woodbury ``Y = X + ½ L (C +
        K⁻¹(C + ½ RᵀL C))`` with ``C = RᵀX``, ``K = I − ½ RᵀL`` (``2r x 2r``), so only ``Σ XᵀU``
        (round 1) and ``Σ Xᵀĝ``, ``Σ XᵀX``, ``Σ ĝᵀĝ`` (round 2) sum over rows; float64."""
        wd, r = torch.float64, self.r
        x64, u64 = x.to(wd), u.to(wd)
        g = u64 - 0.5 * x64 @ self._sum(transpose(x64) @ u64)
        (xg, xx, gg), _ = self.reduce(
            M=[transpose(x64) @ g, transpose(x64) @ x64, transpose(g) @ g]
        )
        gx = transpose(xg)
        rl = torch.cat([torch.cat([xg, xx], -1), torch.cat([-gg, -gx], -1)], -2)
        c = torch.cat([xx, -gx], -2)
        k = torch.eye(2 * r, dtype=wd, device=x.device) - 0.5 * rl
        coef = c + torch.linalg.solve(k, c + 0.5 * (rl @ c))
        y = x64 + 0.5 * (g @ coef[..., :r, :] + x64 @ coef[..., r:, :])
        return y.to(x.dtype)

    def __repr__(self) -> str:
        return f"RowShardedStiefel(n={self.n}, r={self.r}, retraction={self.retraction!r})"


class StiefelTangent(NamedTuple):
    """``(Ḃ on St(m, r), Ṅ Euclidean)``."""

    B: Tensor
    N: Tensor


class StiefelGeometry(_OwnedPoint):
    """``B`` on the Stiefel manifold ``St(m, r)`` (embedded metric), ``A`` Euclidean; point
    ``(B, Aᵀ)`` owned in the pair's state (Park et al., "Riemannian Optimization for LoRA on the
    Stiefel Manifold", Findings of EMNLP 2025, arXiv:2508.17901). Entry: ``B = Q R`` (sign-fixed
    QR), point ``(Q, R A)``; a rank-deficient ``B`` enters by re-factoring only; ``B = 0`` becomes
    a deterministic orthonormal ``Q`` (seeded by the shape and the pair's name) with ``A = 0``.
    Gradient ``(∇_B − B sym(Bᵀ∇_B), ∇_N)``; retraction per-group ``retraction`` (QR, polar, Cayley)
    for ``B``, Euclidean for ``N``; transport by projection.

    Row-sharded factors (FSDP2): the point is stored as the local rows of ``B`` and ``N``; the
    sums over rows (``Bᵀ∇``, the first step's ``R = QᵀM``, ``‖g_B‖²``, the transport's ``B⁺ᵀm``,
    the retraction's Grams) go through the reducer (:class:`RowShardedStiefel`). Entry: ``B = Q R``
    by CholeskyQR2 (:func:`~geolora.optim.sharding.gram_qr`); ``B = 0`` (decided by a max over
    the ranks) takes the local rows of the same :func:`orthonormal_init` of the global shape on
    every rank; a nonzero ``B`` that is rank deficient by its reduced Gram (``λ_min ≤ 1e-14
    λ_max``) takes AdamW robust steps until it is not (one process re-factors it with Householder
    QR, whose completion of ``Q`` has no Gram form)."""

    row_shards = True  # sums over rows through the point's reducer (class docstring)
    state_sides: dict[str, str | None] = {"B": "M", "N": "N"}

    def validate(self, group: dict[str, Any]) -> None:
        check_choice("retraction", group["retraction"], tuple(sorted(STIEFEL_RETRACTIONS)))

    def entry_policy(self, group: dict[str, Any], B: Tensor, A: Tensor) -> str:
        if is_dtensor(B):  # row shards: decided on reduced quantities, alike on every rank
            gram = dtensor_gram(B, 0)
            if bool((torch.diagonal(gram) == 0).all()):  # B = 0 (a NaN is not zero)
                return "refactor"
            return "robust" if gram_rank_deficient(gram, _GRAM_RTOL) else "enter"
        return "refactor" if rank_deficient(B) else "enter"

    def init_state(
        self, group: dict[str, Any], B: Tensor, A: Tensor, reduce: RowSum = LOCAL
    ) -> dict[str, Tensor]:
        from geolora.optim.stiefel_lora import orthonormal_init

        cd = compute_dtype(B.dtype)
        b, n_ = B.detach().to(cd), transpose(A.detach()).to(cd)
        if reduce.sharded:  # local rows (class docstring)
            (top,), _ = reduce(M=[local_amax(b.abs()).reshape(1)], op="max")
            m = reduce.rows("M", b.shape[0])
            if bool(top == 0):
                q = orthonormal_init(m, b.shape[1], group.get("name"), like=b)
                return {"B": reduce.local_rows("M", q), "N": torch.zeros_like(n_)}
            q, rb = gram_qr(b, reduce, "M", m)
            return {"B": q.to(cd), "N": n_ @ transpose(rb.to(cd))}
        if not bool(b.any()):  # zero product from B = 0: any orthonormal B, A = 0
            q, np_ = orthonormal_init(b.shape[0], b.shape[1], group.get("name"), like=b), torch.zeros_like(n_)
        else:
            q, rb = qr_pos(b, "householder")  # B = Q R exactly, also when B is rank deficient
            np_ = n_ @ transpose(rb)  # (R A)ᵀ
        return {"B": q, "N": np_}

    def point_factors(self, state: dict[str, Tensor]) -> FactorPoint:
        return FactorPoint(state["B"], state["N"])

    def point(
        self, x: FactorPoint, state: dict, group: dict, step: int, reduce: RowSum = LOCAL
    ) -> StiefelPair:
        q = state["B"]
        m, r = q.shape[-2:]
        if reduce.sharded:
            man: Stiefel = RowShardedStiefel(reduce.rows("M", m), r, group["retraction"], reduce)
            return StiefelPair(q, state["N"], x, man, reduce)
        return StiefelPair(q, state["N"], x, Stiefel(m, r, retraction=group["retraction"]))

    def gradient(
        self, p: StiefelPair, g: FactorTangent, group: dict, step: int, wants: str = "tangent"
    ) -> StiefelTangent:
        if step == 1:  # (M, N) are the factors the manifold was entered from: M = Q R
            rb = transpose(p.q) @ p.x.M
            if p.reduce.sharded:
                rb = p.reduce(M=[rb])[0][0]
            g_q, g_np = g.M @ transpose(rb), right_solve(g.N, rb)
        else:
            g_q, g_np = g.M, g.N
        return StiefelTangent(p.manifold.egrad2rgrad(p.q, g_q), g_np)

    def retract(self, p: StiefelPair, d: Any, group: dict[str, Any]) -> tuple[Any, Transport]:
        lr = group["lr"]
        q_new = p.manifold.retr(p.q, -lr * d.B)
        np_ = p.N.clone()
        num, den, divisor = d.N
        np_.mul_(1 - lr * group["weight_decay"])
        np_.addcdiv_(num, den, value=-(lr / divisor))
        return (q_new, np_), Transport(lambda t: p.manifold.transp(p.q, q_new, t))

    def store(self, state: dict[str, Tensor], new: tuple[Tensor, Tensor]) -> None:
        state["B"], state["N"] = new


class Retraction:
    """The move of owned-point geometries: ``p⁺ = R_p(−lr · d)`` (the geometry's retraction,
    which also applies its own step options), then the preconditioner's state is carried to
    ``p⁺`` (``preconditioner.transport(state, transport)``), the point stored and its factors
    returned."""

    functional_state = True
    row_shards = True  # glue: the geometry's retraction and the preconditioner's transport
    defaults: dict[str, Any] = {}

    def apply(self, geometry: Any, p: Any, d: Any, state, group, step, pre) -> FactorPoint:
        new, transport = geometry.retract(p, d, group)
        move = getattr(pre, "transport", None)
        if move is not None:
            move(state, transport, group)
        geometry.store(state, new)
        return geometry.point_factors(state)


class ManifoldAdam:
    """Riemannian Adam in the coordinates of an owned point (Jiang, Wang & Stich, "LoRAM",
    Alg. 1 lines 5–8 and 11–12; Bécigneul & Ganea, "Riemannian Adaptive Optimization Methods",
    ICLR 2019, arXiv:1810.00760, for the norm-based variant).

    Coordinate-wise (``coordinate_wise=True``): ``m = β₁ w + (1 − β₁) g``,
    ``v = avg(β₂ v + (1 − β₂) g ⊙ g)``, with ``momentum_bound`` ``m ← bound_momentum(m, v)``,
    then ``d = (m / c₁) / (sqrt(v / c₂) + ε)`` (``c₁ = 1 − β₁ᵗ``, ``c₂ = 1 − β₂ᵗ`` with
    ``bias_correction``, else 1); ``avg`` is the cluster average of the point's equal singular
    values (module docstring, rule 2). Norm-based: one invariant second moment per pair
    (:func:`~geolora.optim.riemannian.adam_direction`). Transport (after the retraction): the
    first moment by the vector transport, the second moment by ``v (Q ∘ Q)`` with
    ``second_moment_transport="rotation"`` (rule 3) or left in place (``"none"``, the box).

    State per pair: ``exp_avg_<field>`` per tangent field and ``exp_avg_sq_<field>``
    (coordinate-wise) or ``exp_avg_sq: (1, 1)`` (norm-based). ``fields``: the tangent's fields
    and their shapes as functions of ``(m, n, r)``.
    """

    name = "manifold_adam"
    functional_state = True
    row_shards = True  # element-wise on the fields (the norm-based variant refuses row shards)
    gauge_rules: dict[str, str] = {}  # the point is owned: the factor gauge never reaches it

    def __init__(
        self,
        fields: dict[str, Callable[[int, int, int], tuple[int, ...]]],
        tangent_type: type,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        coordinate_wise: bool = True,
        bias_correction: bool = False,
        second_moment_transport: str | None = "rotation",
        momentum_bound: bool | None = True,
    ) -> None:
        self.fields = fields
        self.tangent_type = tangent_type
        # which factor's rows each moment holds (row-sharded storage), read off the shapes
        probe = {f: shape(-1, -2, -3)[0] for f, shape in fields.items()}
        side_of = {-1: "M", -2: "N"}
        self.state_sides: dict[str, str | None] = {
            f"{k}_{f}": side_of.get(first) for f, first in probe.items() for k in _MOMENTS
        }
        self.state_sides["exp_avg_sq"] = None
        self.defaults: dict[str, Any] = {
            "betas": betas,
            "eps": eps,
            "coordinate_wise": coordinate_wise,
            "bias_correction": bias_correction,
        }
        if second_moment_transport is not None:
            self.defaults["second_moment_transport"] = second_moment_transport
        if momentum_bound is not None:
            self.defaults["momentum_bound"] = momentum_bound

    def validate(self, hp: dict[str, Any]) -> None:
        hp["betas"] = tuple(hp["betas"])  # validated by the base class
        for key in ("bias_correction", "coordinate_wise", "momentum_bound"):
            if key in hp and not isinstance(hp[key], bool):
                raise ValueError(f"invalid {key}: {hp[key]!r} (expected a bool)")
        if "second_moment_transport" in hp:
            t = hp["second_moment_transport"]
            if t not in SECOND_MOMENT_TRANSPORTS:
                raise ValueError(
                    f"invalid second_moment_transport: {t!r} (expected one of "
                    f"{SECOND_MOMENT_TRANSPORTS})"
                )

    def init_state(
        self, m: int, n: int, r: int, like: Tensor, hp: dict | None = None
    ) -> dict[str, Tensor]:
        shapes = {f: shape(m, n, r) for f, shape in self.fields.items()}
        return _moments(like, shapes, (hp or self.defaults)["coordinate_wise"])

    def update(self, state, grad: Any, ctx: Any, hp: dict, step: int) -> Any:
        geo, p = ctx.geometry, ctx.point
        cls = self.tangent_type
        if hp["coordinate_wise"]:
            w_avg = geo.cluster_weights(p)
            # One list of leaves per statistic, the tangent's fields (concatenating fields of
            # equal width along the rows saved no time: the copies cost more than the calls).
            dl, ml, vl = _adam_leaves(
                hp,
                list(grad),
                list(_tangent(state, "exp_avg", cls)),
                list(_tangent(state, "exp_avg_sq", cls)),
                step,
                None if w_avg is None else geo.averaging(w_avg),
            )
            d, m, v = (cls(*t) for t in (dl, ml, vl))
        else:
            if p.reduce.sharded:
                raise NotImplementedError(
                    "LoRAM with coordinate_wise=False (one second moment per pair from the "
                    "Riemannian norm) does not run on row-sharded factors; use the default "
                    "coordinate_wise=True, or sharded='gather'"
                )
            b1, b2 = hp["betas"]
            man = geo.manifold(p, hp) if isinstance(geo, BoundedRankGeometry) else geo.manifold(p)
            d, m, v, _ = adam_direction(
                man,
                p.pt,
                grad,
                _tangent(state, "exp_avg", cls),
                _tangent(state, "exp_avg_sq", cls),
                step=step,
                betas=(b1, b2),
                eps=hp["eps"],
                coordinate_wise=False,
                bias_correction=hp["bias_correction"],
            )
        _store(state, "exp_avg", m)
        _store(state, "exp_avg_sq", v)
        return d

    def transport(self, state: dict[str, Tensor], transport: Transport, hp: dict) -> None:
        cls = self.tangent_type
        _store(state, "exp_avg", transport.vector(_tangent(state, "exp_avg", cls)))
        if hp["coordinate_wise"] and _transports_v(hp) and transport.coordinates is not None:
            _store(state, "exp_avg_sq", transport.coordinates(_tangent(state, "exp_avg_sq", cls)))


class StiefelAdam:
    """Stiefel-LoRA's preconditioner: geoopt's Riemannian Adam for ``B`` (norm-based second
    moment, or ``coordinate_wise``; Bécigneul & Ganea 2019), ``torch.optim.AdamW``'s moments for
    ``N = Aᵀ`` (applied with decoupled decay by the retraction). State per pair ``exp_avg_B:
    (m, r)``, ``exp_avg_sq_B: (m, r)`` or ``(1, 1)``, ``exp_avg_A``, ``exp_avg_sq_A: (n, r)``."""

    name = "stiefel_adam"
    functional_state = True
    gauge_rules: dict[str, str] = {}
    row_shards = True  # the norm through the point's (reducing) manifold; the rest element-wise
    #: the moments of ``B`` hold ``m`` rows (``exp_avg_sq_B`` only coordinate-wise; norm-based
    #: it is one ``(1, 1)`` number per pair, whole on every rank), those of ``A`` ``n`` rows
    state_sides: dict[str, Any] = {
        "exp_avg_B": "M",
        "exp_avg_sq_B": lambda group: "M" if group.get("coordinate_wise") else None,
        "exp_avg_A": "N",
        "exp_avg_sq_A": "N",
    }

    def __init__(
        self,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        coordinate_wise: bool = False,
        bias_correction: bool = True,
    ) -> None:
        self.defaults = {
            "betas": betas,
            "eps": eps,
            "coordinate_wise": coordinate_wise,
            "bias_correction": bias_correction,
        }

    def validate(self, hp: dict[str, Any]) -> None:
        hp["betas"] = tuple(hp["betas"])
        for key in ("bias_correction", "coordinate_wise"):
            if not isinstance(hp[key], bool):
                raise ValueError(f"invalid {key}: {hp[key]!r} (expected a bool)")

    def init_state(
        self, m: int, n: int, r: int, like: Tensor, hp: dict | None = None
    ) -> dict[str, Tensor]:
        sq_shape = (m, r) if (hp or self.defaults)["coordinate_wise"] else (1, 1)
        z = like.new_zeros
        return {
            "exp_avg_B": z(m, r),
            "exp_avg_sq_B": z(*sq_shape),
            "exp_avg_A": z(n, r),
            "exp_avg_sq_A": z(n, r),
        }

    def update(self, state, grad: StiefelTangent, ctx: Any, hp: dict, step: int) -> StiefelTangent:
        p = ctx.point
        dB, m, v, _ = adam_direction(
            p.manifold,
            p.q,
            grad.B,
            state["exp_avg_B"],
            state["exp_avg_sq_B"],
            step=step,
            betas=hp["betas"],
            eps=hp["eps"],
            coordinate_wise=hp["coordinate_wise"],
            bias_correction=hp["bias_correction"],
        )
        state["exp_avg_B"], state["exp_avg_sq_B"] = m, v
        mA, vA, den = adamw_moments(
            grad.N, state["exp_avg_A"], state["exp_avg_sq_A"], hp["betas"], hp["eps"], step
        )
        state["exp_avg_A"], state["exp_avg_sq_A"] = mA, vA
        return StiefelTangent(dB, (mA, den, 1 - hp["betas"][0] ** step))

    def transport(self, state: dict[str, Tensor], transport: Transport, hp: dict) -> None:
        state["exp_avg_B"] = transport.vector(state["exp_avg_B"])


#: ``orthogonalize`` values: exact polar factor (SVD) or Muon's Newton–Schulz iteration.
ORTHOGONALIZERS = ("svd", "newton_schulz")
#: Muon's quintic Newton–Schulz coefficients (Jordan et al. 2024).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def msign(K: Tensor, method: str = "svd", *, rtol: float, ns_steps: int = 5) -> Tensor:
    """Polar factor ``U_K V_Kᵀ`` of ``K: (..., p, q)`` (float64 in, float64 out).

    ``"svd"``: exact, singular values ``≤ rtol · σ₁`` count as zero (their directions are
    dropped; ``K = 0`` gives 0). ``"newton_schulz"``: ``ns_steps`` steps of Muon's quintic
    iteration ``Y ← a Y + b (Y Yᵀ) Y + c (Y Yᵀ)² Y`` from ``Y = K / ‖K‖_F`` — an approximation
    whose singular values end in about ``[0.7, 1.2]`` (not 1), as Muon's.
    """
    if method == "svd":
        u, s, vh = svd_small(K, full_matrices=False)
        keep = (s > rtol * s[..., :1]).to(K.dtype)
        return (u * keep.unsqueeze(-2)) @ vh
    if method != "newton_schulz":
        raise ValueError(f"orthogonalize must be one of {ORTHOGONALIZERS}, got {method!r}")
    a, b, c = _NS_COEFFS
    norm = K.flatten(-2).norm(dim=-1)[..., None, None]
    Y = K / norm.clamp_min(torch.finfo(K.dtype).tiny)
    for _ in range(ns_steps):
        G = Y @ transpose(Y)
        Y = a * Y + (b * G + c * (G @ G)) @ Y
    return Y


def tangent_msign(
    pt: FixedRankPoint,
    t: FixedRankTangent,
    method: str = "svd",
    *,
    ns_steps: int = 5,
    reduce: RowSum = LOCAL,
) -> FixedRankTangent:
    """``P_T(msign(Ẋ))`` for the tangent vector ``t = (M, Up, Vp)`` at ``pt = (U, S, V)``.

    ``Ẋ = [U Up] C [V Vp]ᵀ``, ``C = [[M, I], [I, 0]]``; thin QRs ``[U Up] = Q_L T_L``,
    ``[V Vp] = Q_R T_R`` and ``O = msign(T_L C T_Rᵀ)`` (float64, ``2r x 2r``) give
    ``msign(Ẋ) = Q_L O Q_Rᵀ``; with ``Q_Lᵀ U = T_L[:, :r]``, ``Q_Rᵀ V = T_R[:, :r]`` the products
    ``msign(Ẋ) V = Q_L (O T_R[:, :r])`` and ``msign(Ẋ)ᵀ U = Q_R (Oᵀ T_L[:, :r])`` feed the
    tangent projection. Any QR sign convention gives the same result. Cost ``O((m + n) r²)``;
    shapes as :class:`~geolora.manifolds.types.FixedRankTangent`, stacked ``(..., ·, ·)``.

    Row-sharded factors (``reduce`` sharded): the QRs through the reducer
    (:func:`~geolora.optim.sharding.gram_qr_blocks`; where a block is rank deficient its ``Q``
    has zero columns, which meet only zero rows of ``O``) and the projection's ``UᵀZV`` reduced.
    """
    u, _, v = pt
    r = u.shape[-1]
    dt = u.dtype
    blocks = [torch.cat([u, t.Up], dim=-1), torch.cat([v, t.Vp], dim=-1)]
    if reduce.sharded:
        (ql, tl), (qr_, tr) = _sharded_qr(reduce)(blocks)
        ql, qr_ = ql.to(dt), qr_.to(dt)
    else:
        (ql, tl), (qr_, tr) = thin_qr(blocks[0]), thin_qr(blocks[1])
    wd = torch.float64
    tl, tr = tl.to(wd), tr.to(wd)
    tl1, tl2 = tl[..., :r], tl[..., r:]
    tr1, tr2 = tr[..., :r], tr[..., r:]
    # T_L C T_Rᵀ = (T_L1 M + T_L2) T_R1ᵀ + T_L1 T_R2ᵀ
    core = (tl1 @ t.M.to(wd) + tl2) @ transpose(tr1) + tl1 @ transpose(tr2)
    O = msign(core, method, rtol=float(torch.finfo(dt).eps) ** 0.5, ns_steps=ns_steps)
    zv = ql @ (O @ tr1).to(dt)
    ztu = qr_ @ (transpose(O) @ tl1).to(dt)
    if not reduce.sharded:
        return fixed_rank_project(pt, zv, ztu)
    (m,), _ = reduce(M=[transpose(u) @ zv])  # fixed_rank_project with the reduced UᵀZV
    return FixedRankTangent(m, zv - u @ m, ztu - v @ transpose(m))


class SpectralMomentum:
    """Riemannion's preconditioner (Bogachev et al., "LoRA meets Riemannion", ICLR 2026,
    arXiv:2507.12142; see :mod:`geolora.optim.riemannion`): heavy-ball momentum of the Riemannian
    gradient on the fixed-rank manifold, ``m = β T(m) + ξ`` (``T`` the retraction's transport),
    and the direction ``D = P_T(msign(m))`` (Nesterov: ``msign(ξ + β m)``), the projected polar
    factor (:func:`tangent_msign`). State per pair ``momentum_M: (r, r)``, ``momentum_Up:
    (m, r)``, ``momentum_Vp: (n, r)``. Hyperparameters ``momentum``, ``nesterov``,
    ``orthogonalize``, ``ns_steps``."""

    name = "spectral_momentum"
    functional_state = True
    row_shards = True  # through tangent_msign's reducer (the point's)
    state_sides: dict[str, str | None] = {
        "momentum_M": None, "momentum_Up": "M", "momentum_Vp": "N"
    }
    gauge_rules: dict[str, str] = {}

    def __init__(
        self,
        *,
        momentum: float = 0.9,
        nesterov: bool = False,
        orthogonalize: str = "svd",
        ns_steps: int = 5,
    ) -> None:
        self.defaults = {
            "momentum": momentum,
            "nesterov": nesterov,
            "orthogonalize": orthogonalize,
            "ns_steps": ns_steps,
        }

    def validate(self, hp: dict[str, Any]) -> None:
        check_range("momentum", hp["momentum"], 0.0, 1.0, hi_open=True)
        check_bool("nesterov", hp["nesterov"])
        check_choice("orthogonalize", hp["orthogonalize"], ORTHOGONALIZERS)
        k = hp["ns_steps"]
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
            raise ValueError(f"invalid ns_steps: {k!r} (expected an integer >= 1)")

    def init_state(self, m: int, n: int, r: int, like: Tensor) -> dict[str, Tensor]:
        z = like.new_zeros
        return {"momentum_M": z(r, r), "momentum_Up": z(m, r), "momentum_Vp": z(n, r)}

    def update(self, state, xi: FixedRankTangent, ctx: Any, hp: dict, step: int):
        beta = hp["momentum"]
        if step == 1:
            mom = xi
        else:
            old = FixedRankTangent(state["momentum_M"], state["momentum_Up"], state["momentum_Vp"])
            mom = FixedRankTangent(*(torch.add(a, b, alpha=beta) for a, b in zip(xi, old)))
        d = mom
        if hp["nesterov"]:
            d = FixedRankTangent(*(torch.add(a, b, alpha=beta) for a, b in zip(xi, mom)))
        state["momentum_M"], state["momentum_Up"], state["momentum_Vp"] = mom
        p = ctx.point
        D = tangent_msign(p.pt, d, hp["orthogonalize"], ns_steps=hp["ns_steps"], reduce=p.reduce)
        return ctx.geometry.mask(D, p)

    def transport(self, state: dict[str, Tensor], transport: Transport, hp: dict) -> None:
        old = FixedRankTangent(state["momentum_M"], state["momentum_Up"], state["momentum_Vp"])
        state["momentum_M"], state["momentum_Up"], state["momentum_Vp"] = transport.vector(old)
