"""Registers every geolora optimizer in the bench registry (:mod:`geolora.bench.registry`).

Default learning rates are those used by ``geolora bench`` on its tasks; each optimizer's own
docstring gives the paper's defaults. Imports are lazy so that listing names stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from geolora.bench.registry import REGISTRY, OptimizerSpec

#: AdamW steps before AdamS / LRACS switch to their own update in the bench (paper: 100, for
#: runs of thousands of steps; the bench runs 200). The exit also waits until X = B A is
#: well conditioned (``geolora.optim.base``), which from B = 0 takes a few steps.
BENCH_ROBUST_STEPS = 10

#: The optimizers ``geolora bench`` compares by default (issue: main job).
DEFAULT_OPTIMIZERS = (
    "adamw",
    "loraplus",
    "rpadamw",
    "lora_rite",
    "adams",
    "lracs",
    "loram_fr",
    "loram_br",
    "stiefel_lora",
)


def _lazy(module: str, cls: str, **fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    def factory(param_groups, lr: float, **kw: Any) -> torch.optim.Optimizer:
        import importlib

        klass = getattr(importlib.import_module(module), cls)
        return klass(param_groups, lr=lr, **{**fixed, **kw})

    factory.__name__ = f"{cls}_factory"
    return factory


def _lifted(preconditioner: str, metric: str) -> Callable[..., torch.optim.Optimizer]:
    """``LiftedOptimizer`` with a named preconditioner and metric (for ``--grid``)."""

    def factory(param_groups, lr: float, **kw: Any) -> torch.optim.Optimizer:
        from geolora.optim.lifted import LiftedOptimizer
        from geolora.optim.preconditioners import AdamPreconditioner, IdentityPreconditioner

        extra: dict[str, Any] = {}
        if preconditioner == "adam":
            pre: Any = AdamPreconditioner()
            extra = {"betas": (0.9, 0.999), "eps": 1e-8}
        else:
            pre = IdentityPreconditioner()
        kw.setdefault("robust_steps", BENCH_ROBUST_STEPS if preconditioner == "adam" else 0)
        return LiftedOptimizer(param_groups, pre, metric=metric, lr=lr, extra_defaults=extra, **kw)

    return factory


_SPECS = [
    OptimizerSpec(
        "loraplus",
        _lazy("geolora.optim.loraplus", "LoRAPlus"),
        1e-3,
        False,
        "AdamW with lr_B = 16 lr_A",
        "Hayou et al., LoRA+, ICML 2024",
    ),
    OptimizerSpec(
        "rpadamw",
        _lazy("geolora.optim.scaled", "RiemannianPreconditionedAdamW"),
        1e-3,
        False,
        "AdamW on (AAᵀ+δI)⁻¹-preconditioned factor gradients",
        "Zhang & Pilanci, Riemannian Preconditioned LoRA, ICML 2024",
    ),
    OptimizerSpec(
        "lora_rite",
        _lazy("geolora.optim.lora_rite", "LoRARite"),
        2e-2,
        True,
        "invariant matrix preconditioning with basis transport",
        "Yen et al., LoRA-RITE, ICLR 2025 (Alg. 1)",
    ),
    OptimizerSpec(
        "adams",
        _lazy("geolora.optim.lifted", "AdamS", robust_steps=BENCH_ROBUST_STEPS),
        1e-3,
        True,
        "Adam on P_T(∇X), lifted with the Sylvester decay matrix",
        "LoRA-S, ICLR 2026 (Alg. 2)",
    ),
    OptimizerSpec(
        "adams_lm",
        _lazy("geolora.optim.lifted", "AdamS", low_memory=True, robust_steps=BENCH_ROBUST_STEPS),
        1e-3,
        True,
        "AdamS with factored, transported first moment",
        "LoRA-S (Alg. 4)",
    ),
    OptimizerSpec(
        "lracs",
        _lazy("geolora.optim.lracs", "LRACS", robust_steps=BENCH_ROBUST_STEPS),
        1e-3,
        True,
        "lifted row/column-scaled RACS with norm-growth limiter",
        "LoRA-S (Alg. 3)",
    ),
    OptimizerSpec(
        "loram_fr",
        _lazy("geolora.optim.loram", "LoRAMFixedRank"),
        5e-4,
        True,
        "Riemannian Adam on the fixed-rank manifold",
        "Jiang, Wang & Stich, LoRAM, ICLR 2025 workshop (Alg. 1-4)",
    ),
    OptimizerSpec(
        "loram_br",
        _lazy("geolora.optim.loram", "LoRAMBoundedRank"),
        1e-3,
        True,
        "Riemannian AdamW on desingularized bounded-rank matrices",
        "Jiang, Wang & Stich, LoRAM, ICLR 2025 workshop (Alg. 5-8)",
    ),
    OptimizerSpec(
        "stiefel_lora",
        _lazy("geolora.optim.stiefel_lora", "StiefelLoRA", coordinate_wise=True),
        1e-3,
        False,
        "B on the Stiefel manifold (Riemannian Adam), A Euclidean",
        "Stiefel-LoRA",
    ),
    OptimizerSpec(
        "scaledgd",
        _lazy("geolora.optim.scaled", "ScaledGD", momentum=0.9),
        1e-2,
        True,
        "scaled gradient descent with momentum",
        "Tong, Ma & Chi, JMLR 2021",
    ),
    OptimizerSpec(
        "lifted_sgd",
        _lazy("geolora.optim.lifted_sgd", "LiftedSGD"),
        1e-2,
        True,
        "Riemannian SGD on the quotient (balanced metric)",
        "LoRA-S (Alg. 1)",
    ),
    OptimizerSpec(
        "lifted_shampoo",
        _lazy("geolora.optim.shampoo", "LiftedShampoo"),
        1e-3,
        True,
        "Shampoo on T_X, lifted",
        "LoRA-S (A.18)",
    ),
]


def _lifted_adam(param_groups, lr: float, **kw: Any) -> torch.optim.Optimizer:
    """``Lifted(torch.optim.Adam)``: torch's own Adam on a dense shadow of X, lifted."""
    from geolora.optim.wrap import Lifted

    return Lifted(torch.optim.Adam)(param_groups, lr=lr, **kw)


_SPECS.append(
    OptimizerSpec(
        "lifted_adam",
        _lifted_adam,
        1e-3,
        True,
        "torch.optim.Adam acting on P_T(∇X), lifted (= AdamS)",
        "LoRA-S (Theorem 1)",
    )
)

for _spec in _SPECS:
    if _spec.name not in REGISTRY:
        REGISTRY.register(_spec)

#: ``--grid``: preconditioner x move (metric lift or manifold retraction).
GRID: dict[str, tuple[str, str]] = {}
for _pre in ("sgd", "adam"):
    for _metric in ("balanced", "preconditioned", "flat"):
        _name = f"grid_{_pre}_{_metric}"
        GRID[_name] = (_pre, _metric)
        if _name not in REGISTRY:
            REGISTRY.register(
                OptimizerSpec(
                    _name,
                    _lifted("adam" if _pre == "adam" else "identity", _metric),
                    1e-3 if _pre == "adam" else 1e-2,
                    _metric != "flat",
                    f"lifted {_pre} under the {_metric} metric",
                    "geolora template",
                )
            )
GRID["loram_fr"] = ("adam", "fixed-rank retraction")
GRID["loram_br"] = ("adam", "bounded-rank retraction")
