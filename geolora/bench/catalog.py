"""Registers every geolora optimizer in the bench registry (:mod:`geolora.bench.registry`).

The entries are read from :mod:`geolora.optim.registry` (names, classes, invariance, adapters
and papers come from there, so the bench, ``geolora.optim`` and the test zoo use the same names);
this module adds only what is particular to the bench: the centre of each learning-rate grid
(:data:`BENCH_LR`), fixed bench arguments (:data:`BENCH_KWARGS`) and the ``--grid`` entries.
Each optimizer's own docstring gives the paper's defaults. Imports are lazy so that listing
names stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from geolora.bench.registry import REGISTRY, OptimizerSpec
from geolora.optim import registry as optim_registry

#: AdamW steps before AdamS / LRACS switch to their own update in the bench (paper: 100, for
#: runs of thousands of steps; the bench runs 200). The exit also waits until X = B A is
#: well conditioned (``geolora.optim.base``), which from B = 0 takes a few steps.
BENCH_ROBUST_STEPS = 10

#: The optimizers ``geolora bench --perf`` times by default.
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

#: Centre of the learning-rate grid (and the lr of an untuned run) per registered optimizer:
#: AdamW-like steps 1e-3, SGD-like steps 1e-2. Names missing here use the class default.
BENCH_LR: dict[str, float] = {
    "adams": 1e-3,
    "adams_lm": 1e-3,
    "lracs": 1e-3,
    "lifted_sgd": 1e-2,
    "lifted_shampoo": 1e-3,
    "lifted_adam": 1e-3,
    # row-normalised second moment (the default): steps like Adam's; 2e-2 was the centre for
    # the unnormalised form, whose steps are smaller by the square root of the layer's rows.
    "lora_rite": 1e-3,
    "lora_rite_eq14": 2e-2,
    "scaled_gd": 1e-2,
    "rpadamw": 1e-3,
    "loraplus": 1e-3,
    "loram_fr": 5e-4,
    "loram_br": 1e-3,
    "stiefel_lora": 1e-3,
    "lora_pro": 1e-3,
    "riemannion": 1e-3,
    "reflora": 1e-3,
    "reflora_s": 1e-3,
    "invariant_dora": 1e-3,
    "polar": 4e-3,
    "stella": 1e-3,
}

#: Fixed bench arguments (the caller's keyword arguments still override them).
BENCH_KWARGS: dict[str, dict[str, Any]] = {
    "adams": {"robust_steps": BENCH_ROBUST_STEPS},
    "adams_lm": {"robust_steps": BENCH_ROBUST_STEPS},
    "lracs": {"robust_steps": BENCH_ROBUST_STEPS},
    "invariant_dora": {"robust_steps": BENCH_ROBUST_STEPS},
    "scaled_gd": {"momentum": 0.9},
    # exact statistics (the method as defined) on MiniLM's 1536-wide layers: 9 MiB per side
    "lifted_shampoo": {"max_dim": 4096},
    "stiefel_lora": {"coordinate_wise": True},
}


def _factory(info: optim_registry.OptimizerInfo) -> Callable[..., torch.optim.Optimizer]:
    """``factory(param_groups, lr, **kw)`` building ``info``'s class with the bench's arguments."""
    fixed = BENCH_KWARGS.get(info.name, {})

    def factory(param_groups, lr: float, **kw: Any) -> torch.optim.Optimizer:
        return info.build(param_groups, lr=lr, **{**fixed, **kw})

    factory.__name__ = f"{info.name}_factory"
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


def _default_lr(info: optim_registry.OptimizerInfo) -> float:
    lr = BENCH_LR.get(info.name, info.default_lr)
    if lr is None:  # pragma: no cover - a table error, caught by tests/test_bench_catalog.py
        raise RuntimeError(f"{info.name}: no bench lr and no class default lr")
    return lr


for _name in optim_registry.names():
    if _name in REGISTRY:
        continue
    _info = optim_registry.get(_name)
    REGISTRY.register(
        OptimizerSpec(
            _name,
            _factory(_info),
            _default_lr(_info),
            _info.invariant,
            _info.description,
            _info.paper,
            adapter=_info.adapter,
        )
    )

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
