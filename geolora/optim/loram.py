"""LoRAM: Riemannian Adam on fixed-rank (LoRAM-FR) and bounded-rank (LoRAM-BR) matrices.

Jiang, Wang & Stich, "LoRAM: Low-Rank Adaptation of Large Language Models on Manifold", ICLR 2025
Workshop on Sparsity in LLMs, OpenReview 6cLPObfitT (Algorithms 1–8). Each is a short declaration of
the template (:mod:`geolora.optim.base`):

* LoRAM-FR = ``(ManifoldAdam, FixedRankGeometry, Retraction)``;
* LoRAM-BR = ``(ManifoldAdam, BoundedRankGeometry, Retraction)``.

The owned point, the rules for coordinate-wise second moments in a moving frame (masking,
cluster averages, rotation with the frame, Adam's momentum bound) and their measured effect are
documented in :mod:`geolora.optim.manifold_pair`, which also holds the parts.
"""

from __future__ import annotations

from typing import Any

from geolora.manifolds.types import BoundedRankTangent, FixedRankTangent
from geolora.optim.base import PairOptimizer
from geolora.optim.manifold_pair import (
    SECOND_MOMENT_TRANSPORTS,
    BoundedRankGeometry,
    FixedRankGeometry,
    ManifoldAdam,
    Retraction,
    adam_ratio_bound,
    bound_momentum,
    cluster_average,
    frame_alignment,
    rank_deficient,
    right_solve,
)
from geolora.optim.validation import check_choice, check_positive, check_range
from geolora.retractions.bounded_rank import (
    NUCLEAR_MODES,
    canonical_bounded_rank,
    nuclear_subgradient,
)

__all__ = [
    "SECOND_MOMENT_TRANSPORTS",
    "LoRAMBoundedRank",
    "LoRAMFixedRank",
    "adam_ratio_bound",
    "bound_momentum",
    "canonical_bounded_rank",
    "cluster_average",
    "frame_alignment",
    "nuclear_subgradient",
    "rank_deficient",
    "right_solve",
]

#: Tangent fields of each manifold and their shapes ``(m, n, r) -> shape``.
_FR_FIELDS = {"M": lambda m, n, r: (r, r), "Up": lambda m, n, r: (m, r), "Vp": lambda m, n, r: (n, r)}
_BR_FIELDS = {"K": lambda m, n, r: (m, r), "Vp": lambda m, n, r: (n, r)}


def _adam(
    fields: dict, tangent: type, betas, eps, coordinate_wise, bias_correction, smt, bound
) -> ManifoldAdam:
    return ManifoldAdam(
        fields,
        tangent,
        betas=betas,
        eps=eps,
        coordinate_wise=coordinate_wise,
        bias_correction=bias_correction,
        second_moment_transport=smt,
        momentum_bound=bound,
    )


class LoRAMFixedRank(PairOptimizer):
    """LoRAM-FR: Riemannian Adam with coordinate-wise step sizes on the fixed-rank manifold
    (LoRAM Alg. 1, with Alg. 2 gradient, Alg. 3 retraction, Alg. 4 transport).

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
    ``2(m + n) r + r`` for the point plus ``2((m + n) r + r²)`` for the moments. Steps on
    row-sharded factors (FSDP2) with four ``r x r`` all-reduce rounds per bucket
    (:class:`~geolora.optim.manifold_pair.FixedRankGeometry`; not ``coordinate_wise=False``).
    """

    # Groups saved before these options existed resume the box.
    optional_on_load = frozenset({"second_moment_transport", "momentum_bound"})

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
        pre = _adam(
            _FR_FIELDS,
            FixedRankTangent,
            betas,
            eps,
            coordinate_wise,
            bias_correction,
            second_moment_transport,
            momentum_bound,
        )
        super().__init__(
            params,
            pre,
            FixedRankGeometry(),
            Retraction(),
            lr=lr,
            robust_steps=robust_steps,
            **kwargs,
        )


class LoRAMBoundedRank(PairOptimizer):
    """LoRAM-BR: Riemannian AdamW with coordinate-wise step sizes on the desingularization of
    bounded-rank matrices (LoRAM Alg. 5, with Alg. 6 gradient, Alg. 7 Q-factor retraction with
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
    robust start (``K = 0`` is a point); ``robust_steps`` still works if asked for. Steps on
    row-sharded factors (FSDP2) with eight ``r x r`` all-reduce rounds per bucket
    (:class:`~geolora.optim.manifold_pair.BoundedRankGeometry`; not ``coordinate_wise=False`` or
    ``nuclear_mode="prox"``).
    """

    optional_on_load = frozenset({"second_moment_transport", "momentum_bound"})

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
        pre = _adam(
            _BR_FIELDS,
            BoundedRankTangent,
            betas,
            eps,
            coordinate_wise,
            bias_correction,
            second_moment_transport,
            momentum_bound,
        )
        super().__init__(
            params,
            pre,
            BoundedRankGeometry(),
            Retraction(),
            lr=lr,
            defaults={"nuclear_norm": nuclear_norm, "alpha": alpha, "nuclear_mode": nuclear_mode},
            robust_steps=robust_steps,
            **kwargs,
        )

    def _validate_hyperparameters(self, group: dict[str, Any]) -> None:
        super()._validate_hyperparameters(group)
        check_range("nuclear_norm", group["nuclear_norm"], 0.0)
        check_positive("alpha", group["alpha"])
        check_choice("nuclear_mode", group["nuclear_mode"], NUCLEAR_MODES)
