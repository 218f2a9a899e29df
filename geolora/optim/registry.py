"""One table of geolora's optimizers: the single source of their names and properties.

``geolora.optim`` exports the classes, ``geolora bench`` (:mod:`geolora.bench.catalog`) builds its
benchmark entries and the test zoo (``tests/optim_zoo.py``) its battery from this table, with the
same name everywhere. Adding an optimizer means writing its module and one :class:`OptimizerInfo`
line here.

Fields: ``invariant`` — the ``X = B A`` trajectory does not depend on the factor gauge
``(B R, R⁻¹ A)`` (the method's claim, checked by the fuzz tests); ``needs_robust_start`` — from a
rank-deficient start (``B = 0``) a pair takes AdamW steps until ``X`` is well conditioned, even
with ``robust_steps=0``; ``adapter`` — the adapter it trains, a kind of
:func:`geolora.lora.inject_adapter` (``"lora"`` pairs; ``"dora"`` pairs with magnitudes linked by
``lora_param_groups(model, dora="linked")``; ``"polar"`` / ``"stella"`` three-factor
``U S Vᵀ`` adapters with their authors' inits); ``kwargs`` —
fixed constructor arguments of a variant (e.g. AdamS's low-memory form).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["ADAPTERS", "OPTIMIZERS", "PAIR_ADAPTERS", "OptimizerInfo", "get", "names"]

#: Adapter kinds (those of :func:`geolora.lora.inject_adapter`); the first two train ``(B, A)`` pairs.
ADAPTERS = ("lora", "dora", "polar", "stella")
PAIR_ADAPTERS = ("lora", "dora")


@dataclass(frozen=True)
class OptimizerInfo:
    """One registered optimizer (module docstring for the fields)."""

    name: str
    module: str
    attr: str
    invariant: bool
    needs_robust_start: bool
    description: str
    paper: str
    adapter: str = "lora"
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: a class factory applied to the attribute (``Lifted(torch.optim.Adam)``)
    wrap: Callable[[Any], type] | None = None

    def __post_init__(self) -> None:
        if not (self.name and self.name == self.name.strip().lower() and " " not in self.name):
            raise ValueError(f"invalid optimizer name {self.name!r} (lower case, no spaces)")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"{self.name}: adapter must be one of {ADAPTERS}, got {self.adapter!r}")

    @property
    def trains_pairs(self) -> bool:
        """True when the optimizer trains ``(B, A)`` LoRA pairs (adapter ``"lora"`` or ``"dora"``)."""
        return self.adapter in PAIR_ADAPTERS

    def load(self) -> type[torch.optim.Optimizer]:
        """The optimizer class (imported on first use)."""
        obj = getattr(importlib.import_module(self.module), self.attr)
        return self.wrap(obj) if self.wrap is not None else obj

    @property
    def default_lr(self) -> float | None:
        """The class's default learning rate (where it comes from: its docs page)."""
        lr = inspect.signature(self.load().__init__).parameters.get("lr")
        return None if lr is None or lr.default is inspect.Parameter.empty else lr.default

    def build(self, param_groups: Any, **overrides: Any) -> torch.optim.Optimizer:
        """The optimizer on ``param_groups`` with the variant's ``kwargs`` and ``overrides``."""
        return self.load()(param_groups, **{**self.kwargs, **overrides})


def _lifted_adam(Lifted: Any) -> type:  # noqa: N803 - the factory, as imported
    return Lifted(torch.optim.Adam)


_TABLE = (
    OptimizerInfo(
        "adams",
        "geolora.optim.lifted",
        "AdamS",
        True,
        True,
        "Adam on P_T(∇X), lifted with the Sylvester decay matrix",
        "Zheng & Wu, LoRA-S, ICLR 2026 (Alg. 2)",
    ),
    OptimizerInfo(
        "adams_lm",
        "geolora.optim.lifted",
        "AdamS",
        True,
        True,
        "AdamS with a factored, transported first moment",
        "Zheng & Wu, LoRA-S, ICLR 2026 (Alg. 4)",
        kwargs={"low_memory": True},
    ),
    OptimizerInfo(
        "lracs",
        "geolora.optim.lracs",
        "LRACS",
        True,
        True,
        "lifted row/column-scaled RACS with norm-growth limiter",
        "Zheng & Wu, LoRA-S, ICLR 2026 (Alg. 3)",
    ),
    OptimizerInfo(
        "lifted_sgd",
        "geolora.optim.lifted_sgd",
        "LiftedSGD",
        True,
        True,
        "Riemannian SGD on the quotient (balanced metric)",
        "Zheng & Wu, LoRA-S, ICLR 2026 (Alg. 1, A.18.1)",
    ),
    OptimizerInfo(
        "lifted_shampoo",
        "geolora.optim.shampoo",
        "LiftedShampoo",
        True,
        True,
        "Shampoo on T_X, lifted",
        "Zheng & Wu, LoRA-S, ICLR 2026 (A.18.3)",
    ),
    OptimizerInfo(
        "lifted_adam",
        "geolora.optim.wrap",
        "Lifted",
        True,
        True,
        "torch.optim.Adam acting on P_T(∇X), lifted",
        "Zheng & Wu, LoRA-S, ICLR 2026 (Theorem 1)",
        wrap=_lifted_adam,
    ),
    OptimizerInfo(
        "lora_rite",
        "geolora.optim.lora_rite",
        "LoRARite",
        True,
        True,
        "invariant r×r matrix preconditioning with basis transport",
        "Yen et al., LoRA-RITE, ICLR 2025 (Alg. 1)",
    ),
    OptimizerInfo(
        "lora_rite_eq14",
        "geolora.optim.lora_rite",
        "LoRARite",
        True,
        True,
        "LoRA-RITE with the paper's second moment ḡᵀḡ (no row normalisation)",
        "Yen et al., LoRA-RITE, ICLR 2025 (Alg. 1, eq. 14)",
        kwargs={"row_normalize": False},
    ),
    OptimizerInfo(
        "scaled_gd",
        "geolora.optim.scaled",
        "ScaledGD",
        True,
        True,
        "scaled gradient descent (preconditioned-metric gradient)",
        "Tong, Ma & Chi, JMLR 2021",
    ),
    OptimizerInfo(
        "rpadamw",
        "geolora.optim.scaled",
        "RiemannianPreconditionedAdamW",
        False,
        False,
        "AdamW on (AAᵀ+δI)⁻¹-preconditioned factor gradients",
        "Zhang & Pilanci, Riemannian Preconditioned LoRA, ICML 2024",
    ),
    OptimizerInfo(
        "loraplus",
        "geolora.optim.loraplus",
        "LoRAPlus",
        False,
        False,
        "AdamW with lr_B = 16 lr_A",
        "Hayou, Ghosh & Yu, LoRA+, ICML 2024",
    ),
    OptimizerInfo(
        "loram_fr",
        "geolora.optim.loram",
        "LoRAMFixedRank",
        True,
        True,
        "Riemannian Adam on the fixed-rank manifold",
        "Jiang, Wang & Stich, LoRAM (Alg. 1-4)",
    ),
    OptimizerInfo(
        "loram_br",
        "geolora.optim.loram",
        "LoRAMBoundedRank",
        True,
        False,
        "Riemannian AdamW on desingularized bounded-rank matrices",
        "Jiang, Wang & Stich, LoRAM (Alg. 5-8)",
    ),
    OptimizerInfo(
        "stiefel_lora",
        "geolora.optim.stiefel_lora",
        "StiefelLoRA",
        False,
        False,
        "B on the Stiefel manifold (Riemannian Adam), A Euclidean",
        "Stiefel-LoRA, 2025, arXiv:2508.17901",
    ),
    OptimizerInfo(
        "lora_pro",
        "geolora.optim.lora_pro",
        "LoRAPro",
        False,
        False,
        "Adam on the equivalent gradient P_T(G), minimal-norm lift",
        "Wang et al., LoRA-Pro, ICLR 2025, arXiv:2407.18242",
    ),
    OptimizerInfo(
        "riemannion",
        "geolora.optim.riemannion",
        "Riemannion",
        True,
        True,
        "Muon on the fixed-rank manifold: polar factor of the transported momentum",
        "Bogachev et al., LoRA meets Riemannion, ICLR 2026, arXiv:2507.12142",
    ),
    OptimizerInfo(
        "reflora",
        "geolora.optim.reflora",
        "RefLoRA",
        False,
        False,
        "AdamW after the per-step optimal (balanced) refactoring",
        "Zhang, Li & Giannakis, RefLoRA, NeurIPS 2025, arXiv:2505.18877",
    ),
    OptimizerInfo(
        "reflora_s",
        "geolora.optim.reflora",
        "RefLoRA",
        False,
        False,
        "AdamW after the scalar refactoring (RefLoRA-S)",
        "Zhang, Li & Giannakis, RefLoRA, NeurIPS 2025, arXiv:2505.18877",
        kwargs={"policy": "scalar"},
    ),
    OptimizerInfo(
        "invariant_dora",
        "geolora.optim.dora",
        "InvariantDoRA",
        True,
        True,
        "Adam on DoRA's product geometry (B, A)/GL(r) × R^m",
        "DoRA (Liu et al., ICML 2024, arXiv:2402.09353) + LoRA-S lift",
        adapter="dora",
    ),
    OptimizerInfo(
        "polar",
        "geolora.optim.polar",
        "PoLAR",
        False,
        False,
        "X Θ Yᵀ, landing field (retraction-free) with Adam",
        "Lion et al., PoLAR, NeurIPS 2025, arXiv:2506.03133",
        adapter="polar",
    ),
    OptimizerInfo(
        "stella",
        "geolora.optim.stella",
        "StelLAAdamW",
        False,
        False,
        "U S Vᵀ on Stiefel, AdamW made Riemannian",
        "Li et al., StelLA, NeurIPS 2025, arXiv:2510.01938",
        adapter="stella",
    ),
)

#: Every registered optimizer by name.
OPTIMIZERS: dict[str, OptimizerInfo] = {info.name: info for info in _TABLE}
if len(OPTIMIZERS) != len(_TABLE):  # pragma: no cover - a table error
    raise RuntimeError("duplicate optimizer names in the registry")


def names(adapter: str | None = None) -> list[str]:
    """Registered names (of one adapter kind), in table order."""
    return [n for n, info in OPTIMIZERS.items() if adapter is None or info.adapter == adapter]


def get(name: str) -> OptimizerInfo:
    """The entry ``name`` (``KeyError`` listing the known names)."""
    try:
        return OPTIMIZERS[name]
    except KeyError:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}") from None

