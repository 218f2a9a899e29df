"""Gauge changes of LoRA factors: choose a factorisation of ``X = M Nᵀ`` and move the state.

A LoRA pair ``B: (m, r)``, ``A: (r, n)`` represents ``X = B A``; with ``M = B``, ``N = Aᵀ`` every
``R ∈ GL(r)`` gives the same ``X`` from ``(M R, N R⁻ᵀ)`` (peft layout: ``(B R, R⁻¹ A)``). A
*gauge policy* picks ``R`` from the current factors; this module holds the policies, the rule
that moves each kind of optimizer state along, and an imbalance measure — pure functions on
stacked ``(..., m, r)`` / ``(..., n, r)`` tensors, no optimizer state of their own.

Policies (each returns the new factors and the :class:`Gauge` ``(R, R⁻ᵀ)``):

* :func:`balanced_factors` — ``M' = U Φ Σ^{1/2}``, ``N' = V Ψ Σ^{1/2}`` from the frame
  ``M = U R_M``, ``N = V R_N`` and the SVD of the core ``W = R_M R_Nᵀ = Φ Σ Ψᵀ`` (so
  ``M'ᵀM' = N'ᵀN' = Σ``, the singular values of ``X``), ``R = R_M⁻¹ Φ Σ^{1/2}``,
  ``R⁻ᵀ = R_N⁻¹ Ψ Σ^{1/2}``. This is RefLoRA's optimal refactoring (Zhang, Li & Giannakis,
  "RefLoRA: Refactored Low-Rank Adaptation for Efficient Fine-Tuning of Large Models", NeurIPS
  2025, arXiv:2505.18877, the full variant): its closed form is ``S* = P Pᵀ`` with ``S*`` the
  matrix geometric mean ``G_N⁻¹ # G_M`` (``S* G_N S* = G_M``, ``G_M = MᵀM``, ``G_N = NᵀN``;
  peft: ``S (A Aᵀ) S = BᵀB``) and the refactored pair ``(M P⁻ᵀ, N P)``; every such ``P`` makes
  the pair balanced (``G_M' = G_N'``), and the balanced pairs are one ``O(r)`` orbit, of which
  the SVD-aligned one here is a member (the authors' ``P`` gives it up to a signed permutation
  of the columns). :func:`reflora_preconditioner` returns ``S*`` and ``S*⁻¹`` themselves.
* :func:`scalar_factors` — RefLoRA-S: ``R = c I`` with ``c = (‖N‖_F / ‖M‖_F)^{1/2}``, so
  ``‖M'‖_F = ‖N'‖_F``.

Where ``X`` is numerically rank deficient (``σ_r(X) ≤ tol · σ_1(X)``, tol ``1e-12`` in float64,
``1e-6`` otherwise, e.g. LoRA's ``B = 0``) or a factor is zero, the gauge is the identity: ``R``
would be singular and no state could be moved.

How state moves under ``(M, N) → (M R, N R⁻ᵀ)`` (:func:`move_factor_moments`):

* state in matrix space (the lifted optimizers' preconditioner state, dense or factored with its
  own frame) and a manifold point owned by the optimizer: unchanged — it describes ``X``, not the
  factors;
* factor gradients are covectors: ``∇_{M'} = ∇_M R⁻ᵀ``, ``∇_{N'} = ∇_N R``; first moments (linear
  in the gradients) move the same way, exactly;
* second moments (element-wise squares): ``v_M' = v_M (R⁻ᵀ ∘ R⁻ᵀ)``, ``v_N' = v_N (R ∘ R)``
  (``∘``: element-wise product) — the second moment of ``g R⁻ᵀ`` when the coordinates of ``g``
  are uncorrelated. Exact for diagonal ``R`` and signed permutations (so for RefLoRA-S, whose
  rule in the authors' code is ``v_A /= P²``, ``v_B *= P²``, and for the re-ordering of a
  balanced pair), non-negative and mass-preserving up to the scale of ``R`` otherwise.

:func:`imbalance` is the gauge measure ``(‖M‖_F² + ‖N‖_F²) / (2‖X‖_*) − 1 ≥ 0``, zero exactly at
the balanced pairs (``‖M‖_F² + ‖N‖_F² ≥ 2‖M Nᵀ‖_*`` with equality iff ``MᵀM = NᵀN``),
invariant under ``O(r)`` and under scaling ``X``. :func:`rebalance_` applies a policy to the
pairs of a live optimizer whose state rule is known, between steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from geolora.linalg import compute_dtype, svd_small, transpose
from geolora.manifolds.frame import Frame, make_frame
from geolora.manifolds.types import FactorPoint, FactorTangent
from geolora.optim.sharding import LOCAL, RowSum, gram_qr_pair

__all__ = [
    "GAUGE_POLICIES",
    "Gauge",
    "GaugeHook",
    "Rebalance",
    "balanced_factors",
    "balanced_with_spectrum",
    "factor_state_rule",
    "imbalance",
    "move_factor_moments",
    "move_gradients",
    "rebalance_",
    "reflora_preconditioner",
    "scalar_factors",
]


class Gauge(NamedTuple):
    """A change of factorisation ``M' = M R``, ``N' = N R⁻ᵀ`` (both ``(..., r, r)``)."""

    R: Tensor
    R_inv_t: Tensor


def _rank_tol(dtype: torch.dtype) -> float:
    return 1e-12 if dtype == torch.float64 else 1e-6


def _core_svd(M: Tensor, N: Tensor, reduce: RowSum = LOCAL) -> tuple[Any, Tensor, Tensor, Tensor]:
    """Frame ``M = U R_M``, ``N = V R_N`` and the float64 SVD ``R_M R_Nᵀ = Φ diag(σ) Ψᵀ``
    (row-sharded factors: :func:`_row_frame`)."""
    frame = _row_frame(M, N, reduce) if reduce.sharded else make_frame(M, N)
    wd = torch.float64
    phi, sig, psi_h = svd_small(frame.RM.to(wd) @ transpose(frame.RN.to(wd)))
    return frame, phi, sig, transpose(psi_h)


def _row_frame(M: Tensor, N: Tensor, reduce: RowSum) -> Frame:
    """The frame of row-sharded factors (local rows, sums over rows through ``reduce``):
    CholeskyQR2 of the all-reduced float64 Grams (:func:`~geolora.optim.sharding.gram_qr_pair`),
    so ``R_M``, ``R_N`` (float64) are the same on every rank and ``U``, ``V`` (``M``'s dtype) the
    local rows. A factor without full column rank (``B = 0``) gives NaN there; its ``R`` and
    rows are set to 0, so ``σ = 0`` and the gauge is the identity — a decision taken on the
    reduced Grams, hence the same on every rank."""
    (U, RM), (V, RN) = gram_qr_pair(M, N, reduce)

    def finite(t: Tensor) -> Tensor:
        return torch.where(torch.isfinite(t), t, 0.0)

    dt = M.dtype
    return Frame(finite(U).to(dt), finite(RM), finite(V).to(dt), finite(RN))


def _full_rank(sig: Tensor, dtype: torch.dtype) -> Tensor:
    """Batch mask: ``σ_r > tol σ_1`` (and ``σ_1 > 0``), ``sig: (..., r)`` descending."""
    return (sig[..., -1] > _rank_tol(dtype) * sig[..., 0]) & (sig[..., 0] > 0)


def _where(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return torch.where(mask[..., None, None], a, b)


def _eye_like(M: Tensor) -> Tensor:
    r = M.shape[-1]
    eye = torch.eye(r, dtype=torch.float64, device=M.device)
    return eye.expand(*M.shape[:-2], r, r)


def balanced_factors(M: Tensor, N: Tensor, reduce: RowSum = LOCAL) -> tuple[FactorPoint, Gauge]:
    """The balanced representative ``(U Φ Σ^{1/2}, V Ψ Σ^{1/2})`` of ``X = M Nᵀ`` and its gauge.

    ``M: (..., m, r)``, ``N: (..., n, r)`` (any float dtype; the new factors keep it). With the
    sign-fixed thin QRs ``M = U R_M``, ``N = V R_N`` and the float64 SVD
    ``W = R_M R_Nᵀ = Φ Σ Ψᵀ``: ``M' = U Φ Σ^{1/2}``, ``N' = V Ψ Σ^{1/2}`` (computed from the
    orthonormal ``U``, ``V``, so their accuracy does not depend on the old balance),
    ``R = R_M⁻¹ Φ Σ^{1/2}``, ``R⁻ᵀ = R_N⁻¹ Ψ Σ^{1/2}`` (float64). ``M'ᵀM' = N'ᵀN' = Σ``;
    ``M' N'ᵀ = X`` to rounding. Rank-deficient batch elements are returned unchanged with
    ``R = I`` (module docstring). Cost ``O((m + n) r²)``. Row-sharded factors (the local rows
    and the bucket's :class:`~geolora.optim.sharding.RowSum` ``reduce``): the frame from
    CholeskyQR2 (two ``r x r`` all-reduces), everything else replicated or row-local.
    """
    new, gauge, _, _ = balanced_with_spectrum(M, N, reduce=reduce)
    return new, gauge


def balanced_with_spectrum(
    M: Tensor, N: Tensor, threshold: float | None = None, reduce: RowSum = LOCAL
) -> tuple[FactorPoint, Gauge, Tensor, Tensor]:
    """:func:`balanced_factors` plus the singular values ``σ: (..., r)`` of ``X`` (float64,
    descending; the squared column norms of both new factors) and the batch mask of the
    elements that were balanced (``False``: rank deficient, gauge ``I``). With ``threshold``,
    only the elements whose :func:`imbalance` exceeds it are balanced (no host sync).
    ``reduce``: as :func:`balanced_factors`."""
    frame, phi, sig, psi = _core_svd(M, N, reduce)
    ok = _full_rank(sig, M.dtype)
    if threshold is not None:
        # (row shards: ‖M‖_F² + ‖N‖_F² = ‖R_M‖_F² + ‖R_N‖_F², already reduced)
        fro = (frame.RM, frame.RN) if reduce.sharded else (M, N)
        ok = ok & (_imbalance_from(*fro, sig) > threshold)
    root = sig.clamp_min(0).sqrt().unsqueeze(-2)
    a, b = phi * root, psi * root  # Φ Σ^{1/2}, Ψ Σ^{1/2}
    dt = M.dtype
    new_M = _where(ok, frame.U @ a.to(dt), M)
    new_N = _where(ok, frame.V @ b.to(dt), N)
    eye = _eye_like(M)
    # Triangular solves are only well defined where R_M, R_N are invertible: solve with the
    # identity elsewhere, then select.
    RM = _where(ok, frame.RM.to(torch.float64), eye)
    RN = _where(ok, frame.RN.to(torch.float64), eye)
    R = torch.linalg.solve_triangular(RM, _where(ok, a, eye), upper=True)
    R_inv_t = torch.linalg.solve_triangular(RN, _where(ok, b, eye), upper=True)
    return FactorPoint(new_M, new_N), Gauge(R, R_inv_t), sig, ok


def scalar_factors(M: Tensor, N: Tensor, reduce: RowSum = LOCAL) -> tuple[FactorPoint, Gauge]:
    """RefLoRA-S: ``(c M, N / c)`` with ``c = (‖N‖_F / ‖M‖_F)^{1/2}`` per batch element, so that
    ``‖M'‖_F = ‖N'‖_F = (‖M‖_F ‖N‖_F)^{1/2}``; ``R = c I``, ``R⁻ᵀ = I / c`` (float64). A zero
    factor gives ``c = 1``. Shapes as :func:`balanced_factors`; row-sharded factors: ``‖M‖_F² =
    Σ_ranks ‖M_local‖_F²`` (one all-reduce through ``reduce``)."""
    wd = torch.float64
    if reduce.sharded:
        (sq_m,), (sq_n,) = reduce(
            M=[M.to(wd).square().sum(dim=(-2, -1))], N=[N.to(wd).square().sum(dim=(-2, -1))]
        )
        nm, nn = sq_m.sqrt(), sq_n.sqrt()
    else:
        nm = M.to(wd).flatten(-2).norm(dim=-1)
        nn = N.to(wd).flatten(-2).norm(dim=-1)
    ok = (nm > 0) & (nn > 0) & torch.isfinite(nm) & torch.isfinite(nn)
    c = torch.where(ok, (nn / torch.where(ok, nm, 1.0)).sqrt(), 1.0)
    eye = _eye_like(M)
    cc = c[..., None, None]
    new = FactorPoint(M * cc.to(M.dtype), N / cc.to(N.dtype))
    return new, Gauge(eye * cc, eye / cc)


#: Gauge policies by name: ``policy(M, N) -> (new factors, gauge)`` (the built-in ones also
#: take a row-shard reducer, ``policy(M, N, reduce)``).
GAUGE_POLICIES: dict[str, Callable[[Tensor, Tensor], tuple[FactorPoint, Gauge]]] = {
    "balanced": balanced_factors,
    "scalar": scalar_factors,
}


def reflora_preconditioner(M: Tensor, N: Tensor, reduce: RowSum = LOCAL) -> tuple[Tensor, Tensor]:
    """RefLoRA's closed-form ``S* = G_N⁻¹ # G_M`` and ``S*⁻¹`` (float64, ``(..., r, r)``).

    ``S*`` is the symmetric positive definite solution of ``S G_N S = G_M`` (``G_M = MᵀM``,
    ``G_N = NᵀN``; peft: ``S (A Aᵀ) S = BᵀB``), the matrix geometric mean of ``G_N⁻¹`` and
    ``G_M``. A gradient step on the refactored pair ``(M P⁻ᵀ, N P)``, ``P Pᵀ = S*``, moves
    ``X`` as the step with the preconditioned factor gradients ``(∇_M S*, ∇_N S*⁻¹)`` on the
    original pair (the authors' code applies the full variant this way). From the balanced gauge
    (:func:`balanced_factors`, ``P = R⁻ᵀ``): ``S* = R⁻ᵀ R⁻¹``, ``S*⁻¹ = R Rᵀ``. Identity where
    ``X`` is rank deficient. ``reduce``: as :func:`balanced_factors` (``S*`` is replicated).
    """
    _, (R, R_inv_t) = balanced_factors(M, N, reduce)
    return R_inv_t @ transpose(R_inv_t), R @ transpose(R)


def move_gradients(g: FactorTangent, gauge: Gauge) -> FactorTangent:
    """Factor gradients at ``(M R, N R⁻ᵀ)`` from those at ``(M, N)``: ``(∇_M R⁻ᵀ, ∇_N R)``
    (exact: ``∇_{M'} = ∇_X N' = ∇_X N R⁻ᵀ``). ``g``'s dtype is kept."""
    dt = g.M.dtype
    return FactorTangent(g.M @ gauge.R_inv_t.to(dt), g.N @ gauge.R.to(dt))


def move_factor_moments(
    exp_avg_M: Tensor,
    exp_avg_N: Tensor,
    exp_avg_sq_M: Tensor | None,
    exp_avg_sq_N: Tensor | None,
    gauge: Gauge,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Adam moments of the factors ``M: (..., m, r)``, ``N: (..., n, r)`` re-expressed at
    ``(M R, N R⁻ᵀ)`` (module docstring): ``m_M R⁻ᵀ``, ``m_N R`` (exact),
    ``v_M (R⁻ᵀ ∘ R⁻ᵀ)``, ``v_N (R ∘ R)`` (exact for diagonal ``R`` and signed permutations).
    ``None`` second moments pass through. Dtypes are kept."""
    dt = exp_avg_M.dtype
    Ri, R = gauge.R_inv_t.to(dt), gauge.R.to(dt)
    vM = None if exp_avg_sq_M is None else exp_avg_sq_M @ (Ri * Ri)
    vN = None if exp_avg_sq_N is None else exp_avg_sq_N @ (R * R)
    return exp_avg_M @ Ri, exp_avg_N @ R, vM, vN


def imbalance(M: Tensor, N: Tensor) -> Tensor:
    """``(‖M‖_F² + ‖N‖_F²) / (2‖M Nᵀ‖_*) − 1 ≥ 0`` (float64, batch shape): 0 exactly when
    ``MᵀM = NᵀN`` (a balanced pair), ``inf`` when ``X = 0`` with a nonzero factor. Invariant under
    ``(M Q, N Q)``, ``Q`` orthogonal, and under ``(c M, c N)``; grows without bound as the pair
    drifts along its orbit (``(M t, N / t)``: ``≈ (t² ‖M‖² + ‖N‖²/t²) / (2‖X‖_*)``)."""
    _, _, sig, _ = _core_svd(M, N)
    return _imbalance_from(M, N, sig)


def _imbalance_from(M: Tensor, N: Tensor, sig: Tensor) -> Tensor:
    wd = torch.float64
    sq = M.to(wd).square().sum(dim=(-2, -1)) + N.to(wd).square().sum(dim=(-2, -1))
    nuc = sig.sum(-1)
    return torch.where(nuc > 0, sq / (2 * nuc.clamp_min(torch.finfo(wd).tiny)) - 1, torch.inf)


# --- applying a policy to a live optimizer ---------------------------------------------------------
#: Factor-coordinate state keys and how they move (see :func:`factor_state_rule`).
_FACTOR_KEYS = {
    "exp_avg_M": "M",
    "exp_avg_N": "N",
    "exp_avg_sq_M": "M2",
    "exp_avg_sq_N": "N2",
    # the base class's robust-start AdamW moments, in peft layout B: (m, r), A: (r, n)
    "robust_exp_avg_B": "M",
    "robust_exp_avg_sq_B": "M2",
    "robust_exp_avg_A": "A",
    "robust_exp_avg_sq_A": "A2",
}


#: How each rule moves a state entry under ``(M R, N R⁻ᵀ)`` (:func:`_move_one`): covectors
#: ``"M"`` (× R⁻ᵀ), ``"N"`` (× R) and their element-wise squares ``"M2"``, ``"N2"``; vectors
#: ``"MV"`` (× R, like ``M`` itself) and ``"NV"`` (× R⁻ᵀ); peft-layout ``A`` moments ``"A"``,
#: ``"A2"``.
GAUGE_RULES = ("M", "N", "M2", "N2", "MV", "NV", "A", "A2")


def factor_state_rule(key: str) -> str | None:
    """How the state entry ``key`` of a pair moves under a gauge change: ``"M"`` (× ``R⁻ᵀ`` on
    the right), ``"N"`` (× ``R``), ``"A"`` (peft-layout ``A`` moment: ``Rᵀ ×`` on the left),
    ``"M2"``, ``"N2"``, ``"A2"`` (the second-moment versions, element-wise squared matrices), or
    ``None`` (not a factor-coordinate moment)."""
    return _FACTOR_KEYS.get(key)


def _move_one(rule: str, t: Tensor, gauge: Gauge) -> Tensor:
    dt = t.dtype
    Ri, R = gauge.R_inv_t.to(dt), gauge.R.to(dt)
    if rule == "M":
        return t @ Ri
    if rule == "N":
        return t @ R
    if rule == "A":
        return transpose(R) @ t
    if rule == "M2":
        return t @ (Ri * Ri)
    if rule == "N2":
        return t @ (R * R)
    if rule == "MV":
        return t @ R
    if rule == "NV":
        return t @ Ri
    return transpose(R * R) @ t  # "A2"


def _gauge_rules(preconditioner: Any) -> dict[str, str] | None:
    """The state rules a preconditioner declares (``gauge_rules``: ``{key: rule}``, ``{}`` for
    state that lives in matrix space), or ``None`` when it declares none."""
    rules = getattr(preconditioner, "gauge_rules", None)
    if rules is None:
        return None
    bad = {k: v for k, v in rules.items() if v not in GAUGE_RULES}
    if bad:
        raise ValueError(f"unknown gauge rule(s) {bad}; expected one of {GAUGE_RULES}")
    return dict(rules)


class GaugeHook:
    """The template's gauge hook (:class:`~geolora.optim.base.PairOptimizer`): before a step,
    replace the representative ``(M, N)`` by ``(M R, N R⁻ᵀ)`` — same ``X`` — and move the
    gradient (a covector) and the preconditioner's factor-coordinate state along (module
    docstring). One mechanism, several policies: :class:`Rebalance` (the balanced
    representative when the pair has drifted; the ``X`` trajectory of an invariant optimizer is
    unchanged to rounding) and RefLoRA's per-step refactoring (:mod:`geolora.optim.reflora`).

    Subclasses implement :meth:`due` (host-side: act at this step?) and :meth:`choose` (the new
    factors, the gauge and what the preconditioner may use, e.g. a cluster average). The
    preconditioner must declare how its state moves (``gauge_rules``); without a declaration the
    hook refuses to be combined with it (:meth:`bind`). A hook whose :meth:`choose` takes every
    sum over rows through the reducer it is given sets :attr:`row_shards` (the state moves are
    row-local products with ``r x r`` matrices).
    """

    functional_state = True
    defaults: dict[str, Any] = {}
    #: ``True`` if :meth:`choose` runs on row shards (``choose(x, group, reduce)``)
    row_shards: bool = False

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}

    def bind(self, preconditioner: Any) -> None:
        """Read the preconditioner's state rules (``TypeError`` if it declares none)."""
        rules = _gauge_rules(preconditioner)
        if rules is None:
            raise TypeError(
                f"{type(self).__name__}: preconditioner {type(preconditioner).__name__} does not "
                f"declare how its state moves under a change of factorisation (gauge_rules); "
                f"use it without a gauge hook"
            )
        self.rules = rules

    def due(self, group: dict[str, Any], step: int) -> bool:
        raise NotImplementedError

    def choose(
        self, x: FactorPoint, group: dict[str, Any], reduce: RowSum = LOCAL
    ) -> tuple[FactorPoint, Gauge, dict]:
        raise NotImplementedError

    def apply(
        self,
        x: FactorPoint,
        g: FactorTangent,
        state: dict,
        group: dict[str, Any],
        step: int,
        reduce: RowSum = LOCAL,
    ) -> tuple[FactorPoint, FactorTangent, dict]:
        """``(x', g', extra)`` for a stack of pairs; the state moves by reassignment. ``reduce``:
        the bucket's row-shard reducer (only for hooks with :attr:`row_shards`)."""
        if not self.due(group, step):
            return x, g, {}
        new, gauge, extra = self.choose(x, group, reduce) if reduce.sharded else self.choose(x, group)
        g = move_gradients(g, gauge)
        for key, rule in self.rules.items():
            if key in state:
                state[key] = _move_one(rule, state[key], gauge)
        return new, g, extra


class Rebalance(GaugeHook):
    """Function-preserving rebalancing of drifted pairs (:func:`balanced_factors`, where
    :func:`imbalance` exceeds ``rebalance_threshold``), checked every ``rebalance_every`` steps
    (0: never). The invariant optimizers leave the representative free within its class, so
    over long runs the factors can drift apart and the float32 rounding of the step grows with
    the imbalance; the balanced representative has ``MᵀM = NᵀN = Σ``. Per-group
    hyperparameters ``rebalance_every`` (default 100) and ``rebalance_threshold`` (default 10:
    factor norms ≈ 4.5× those of the balanced pair)."""

    #: maintenance, not part of the algorithm: skipped for row-sharded pairs
    skip_when_sharded = True

    def __init__(self, every: int = 100, threshold: float = 10.0) -> None:
        super().__init__()
        self.defaults = {"rebalance_every": every, "rebalance_threshold": threshold}

    def validate(self, group: dict[str, Any]) -> None:
        e = group["rebalance_every"]
        if not (isinstance(e, int) and not isinstance(e, bool) and e >= 0):
            raise ValueError(f"invalid rebalance_every: {e!r} (expected an integer >= 0)")
        t = group["rebalance_threshold"]
        if not (isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0):
            raise ValueError(f"invalid rebalance_threshold: {t!r} (expected a number >= 0)")

    def due(self, group: dict[str, Any], step: int) -> bool:
        every = group["rebalance_every"]
        return every > 0 and step % every == 0

    def choose(
        self, x: FactorPoint, group: dict[str, Any], reduce: RowSum = LOCAL
    ) -> tuple[FactorPoint, Gauge, dict]:
        new, gauge, _, _ = balanced_with_spectrum(x.M, x.N, group["rebalance_threshold"])
        return new, gauge, {}


@torch.no_grad()
def rebalance_(optimizer: Any, *, policy: str = "balanced", threshold: float = 0.0) -> int:
    """Apply a gauge policy to every LoRA pair of ``optimizer`` whose :func:`imbalance` exceeds
    ``threshold``, between steps; returns the number of pairs changed.

    Function preserving (``B A`` unchanged to rounding). The pair's state moves by the rules of
    the module docstring: the robust-start AdamW moments and AdamW-style factor moments
    (``exp_avg_M`` ... of LoRA+, RP-AdamW, RefLoRA) by :func:`factor_state_rule`; every other
    state of a :class:`~geolora.optim.lifted.LiftedOptimizer` lives in matrix space and is left
    as it is. For other optimizers (a manifold point owned by the optimizer, LoRA-RITE's frame
    statistics) the rule is not declared and ``TypeError`` is raised. With an invariant
    optimizer the ``X`` trajectory is that of the run without rebalancing, to rounding.
    """
    from geolora.optim.base import LoRAOptimizer
    from geolora.optim.lifted import LiftedOptimizer

    if policy not in GAUGE_POLICIES:
        raise ValueError(f"unknown gauge policy {policy!r}; choose from {sorted(GAUGE_POLICIES)}")
    if not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    if not isinstance(optimizer, LoRAOptimizer):
        raise TypeError(f"rebalance_ needs a geolora LoRAOptimizer, got {type(optimizer).__name__}")
    matrix_state = isinstance(optimizer, LiftedOptimizer)
    changed = 0
    for group in optimizer.param_groups:
        if not group.get("lora_pair", False):
            continue
        B, A = group["params"]
        st = optimizer.state.get(B, {})
        own = [
            k
            for k, v in st.items()
            if isinstance(v, Tensor) and v.dim() >= 2 and factor_state_rule(k) is None
        ]
        if own and not matrix_state:
            raise TypeError(
                f"rebalance_: {type(optimizer).__name__} keeps state {sorted(own)} for pair "
                f"{group.get('name', '<unnamed>')!r} whose rule under a gauge change is not "
                f"declared; rebalancing would desynchronise it"
            )
        cdt = compute_dtype(B.dtype)
        M, N = B.detach().to(cdt), transpose(A.detach()).to(cdt)
        if not bool(imbalance(M, N) > threshold):
            continue
        new, gauge = GAUGE_POLICIES[policy](M, N)
        if bool((gauge.R == _eye_like(M)).all()):
            continue  # rank deficient: identity gauge
        for k, v in list(st.items()):
            rule = factor_state_rule(k)
            if rule is not None and isinstance(v, Tensor):
                st[k] = _move_one(rule, v, gauge)
        B.copy_(new.M.to(B.dtype))
        A.copy_(transpose(new.N).to(A.dtype))
        changed += 1
    return changed
