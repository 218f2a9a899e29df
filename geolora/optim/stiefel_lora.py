"""Stiefel-LoRA: ``B`` on the Stiefel manifold (Riemannian Adam), ``A`` Euclidean (AdamW).

Park, Kang, Lee, Lee, Kim & Lee, "Riemannian Optimization for LoRA on the Stiefel Manifold",
Findings of EMNLP 2025, arXiv:2508.17901, implemented as its abstract states the method:
constraining ``BᵀB = I`` removes the basis redundancy of ``B`` and keeps its effective rank
full; ``A`` carries the scale of ``ΔW = s B A``. Declared as ``(StiefelAdam, StiefelGeometry,
Retraction)`` (:mod:`geolora.optim.manifold_pair`): the optimizer owns the point ``(B, Aᵀ)``
in the compute dtype, so low-precision parameters never break the constraint; entering the
manifold re-factors ``X = B A`` (``B = Q R``) without changing it, and ``B = 0`` becomes a
deterministic random orthonormal ``Q`` with ``A = 0``. No robust AdamW start is needed.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor

from geolora.linalg import qf
from geolora.optim.base import PairOptimizer
from geolora.optim.manifold_pair import Retraction, StiefelAdam, StiefelGeometry

__all__ = ["StiefelLoRA", "orthonormal_init"]


def orthonormal_init(m: int, r: int, name: str | None = None, *, like: Tensor) -> Tensor:
    """A deterministic random point of ``St(m, r)``: ``qf(G)`` of a Gaussian ``G`` drawn (in float64
    on the CPU) from a generator seeded by ``(m, r)`` and the CRC32 of ``name``; returned with
    ``like``'s dtype and device."""
    seed = (1_000_003 * m + 7919 * r + zlib.crc32((name or "").encode())) % (2**63)
    gen = torch.Generator().manual_seed(seed)
    G = torch.randn(m, r, dtype=torch.float64, generator=gen)
    return qf(G, "householder").to(dtype=like.dtype, device=like.device)


class StiefelLoRA(PairOptimizer):
    """``B`` by Riemannian Adam on ``St(m, r)``, ``A`` by AdamW (Stiefel-LoRA, module docstring).

    Per pair, with point ``(B, A)``, ``BᵀB = I``::

        g_B = ∇_B − B sym(Bᵀ∇_B)                                (egrad2rgrad, embedded metric)
        m_B ← β₁ m_B + (1−β₁) g_B;  v_B ← β₂ v_B + (1−β₂) ‖g_B‖²  (or g_B ⊙ g_B, coordinate_wise)
        B, m_B ← retr_transp(B, −lr m̂_B / (sqrt(v̂_B) + ε), m_B)   (QR retraction by default)
        A ← AdamW(A, ∇_A; lr, betas, eps, weight_decay)          (torch.optim.AdamW's update)

    The B step is geoopt's ``RiemannianAdam`` (Bécigneul & Ganea 2019), see
    :func:`geolora.optim.riemannian.riemannian_adam_update`; ``retraction`` picks ``"qr"``,
    ``"polar"`` or ``"cayley"`` (:class:`~geolora.manifolds.stiefel.Stiefel`). Weight decay acts on
    ``A`` only (``B`` has fixed norm). The abstract states no hyperparameters; the defaults are
    Adam's (``lr=1e-3``, ``betas=(0.9, 0.999)``, ``eps=1e-8``), ``weight_decay=0``, norm-based
    second moment for ``B`` (geoopt's), Adam's bias correction for both. Not transformation
    invariant (``A``'s coordinates depend on the basis ``B``). On row-sharded factors (FSDP2) it
    steps on the local rows, every sum over rows (``Bᵀ∇``, ``‖g_B‖²``, the retraction's Grams, the
    transport) through one all-reduce per round (:class:`~geolora.optim.manifold_pair.
    RowShardedStiefel`, docs/distributed.md).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        coordinate_wise: bool = False,
        retraction: str = "qr",
        bias_correction: bool = True,
        robust_steps: int = 0,
        **kwargs: Any,
    ) -> None:
        pre = StiefelAdam(
            betas=betas, eps=eps, coordinate_wise=coordinate_wise, bias_correction=bias_correction
        )
        super().__init__(
            params,
            pre,
            StiefelGeometry(),
            Retraction(),
            lr=lr,
            defaults={"weight_decay": weight_decay, "retraction": retraction},
            robust_steps=robust_steps,
            **kwargs,
        )
