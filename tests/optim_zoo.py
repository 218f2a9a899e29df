"""The optimizer zoo the reliability, fuzz and distributed tests run over.

Every geolora LoRA optimizer gets one :class:`ZooEntry`: a lower-case name, a factory
``factory(param_groups, **overrides) -> torch.optim.Optimizer`` with a learning rate that works
on the tiny problems of the tests (``0.5‖s·B A − X*‖²`` with ``m, n ≈ 12``, ``r = 3``,
``X*`` of singular values in ``[1, 2]``) and flags the tests branch on.

Optimizers are imported with :mod:`importlib` from their own modules: while a module does not
exist yet its entry is simply absent from :data:`ZOO` (``test_zoo_complete`` lists what is
missing). A module that exists but fails to import, or lacks the class, is recorded in
:data:`IMPORT_ERRORS` so the failure is visible instead of silently shrinking the zoo.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["EXPECTED_NAMES", "IMPORT_ERRORS", "ZOO", "ZooEntry", "zoo_ids"]


@dataclass(frozen=True)
class ZooEntry:
    """One optimizer of the zoo.

    Attributes:
        name: lower-case id (also the pytest id).
        cls: the optimizer class (for ``Lifted``, the class ``Lifted(torch.optim.Adam)``).
        lr: learning rate for the tiny test problems.
        kwargs: further constructor arguments of the factory.
        invariant: the ``X = B A`` trajectory does not depend on the factor gauge
            ``(B, A) -> (B R, R⁻¹ A)`` (the paper claims it; the fuzz tests check it).
        robust_start: accepts ``robust_steps`` (the LoRAOptimizer robust start with AdamW);
            tests that need the geometric update from step 1 pass ``robust_steps=0``.
        needs_robust_start: from a rank-deficient start (``B = 0``, duplicate columns) the pair
            takes AdamW steps until ``X`` is well conditioned even with ``robust_steps=0``;
            ``False``: its own update runs from step 1 (damping, bounded-rank or Stiefel
            geometry, or plain factor coordinates).
    """

    name: str
    cls: type
    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    invariant: bool = False
    robust_start: bool = True
    needs_robust_start: bool = True

    def factory(
        self, param_groups: list[dict[str, Any]], **overrides: Any
    ) -> torch.optim.Optimizer:
        """Build the optimizer on ``param_groups`` (``overrides`` replace the zoo defaults)."""
        kw = {"lr": self.lr, **self.kwargs, **overrides}
        if not self.robust_start:
            kw.pop("robust_steps", None)
        return self.cls(param_groups, **kw)


@dataclass(frozen=True)
class _Spec:
    name: str
    module: str
    attr: str
    lr: float
    kwargs: dict[str, Any] = field(default_factory=dict)
    invariant: bool = False
    robust_start: bool = True
    needs_robust_start: bool = True
    wrap: Callable[[Any], type] | None = None  # class factory, e.g. Lifted(torch.optim.Adam)


_SPECS: tuple[_Spec, ...] = (
    _Spec("adams", "geolora.optim.lifted", "AdamS", 1e-2, invariant=True),
    _Spec("lracs", "geolora.optim.lracs", "LRACS", 1e-2, invariant=True),
    _Spec("lifted_sgd", "geolora.optim.lifted_sgd", "LiftedSGD", 5e-2, invariant=True),
    _Spec("lifted_shampoo", "geolora.optim.shampoo", "LiftedShampoo", 5e-2, invariant=True),
    _Spec(
        "lifted_adam",
        "geolora.optim.wrap",
        "Lifted",
        1e-2,
        invariant=True,
        wrap=lambda Lifted: Lifted(torch.optim.Adam),
    ),
    _Spec("lora_rite", "geolora.optim.lora_rite", "LoRARite", 1e-2, invariant=True),
    _Spec("scaled_gd", "geolora.optim.scaled", "ScaledGD", 5e-2, invariant=True),
    _Spec(
        "riemannian_precond_adamw",
        "geolora.optim.scaled",
        "RiemannianPreconditionedAdamW",
        1e-2,
        needs_robust_start=False,  # damping 1e-6 by default
    ),
    _Spec("loraplus", "geolora.optim.loraplus", "LoRAPlus", 2e-3, needs_robust_start=False),
    _Spec("loram_fr", "geolora.optim.loram", "LoRAMFixedRank", 1e-3, invariant=True),
    _Spec(
        "loram_br",
        "geolora.optim.loram",
        "LoRAMBoundedRank",
        1e-3,
        invariant=True,
        needs_robust_start=False,
    ),
    _Spec(
        "stiefel_lora", "geolora.optim.stiefel_lora", "StiefelLoRA", 1e-2, needs_robust_start=False
    ),
    # LoRA-Pro runs from B = 0 with the authors' damped formulas (no robust start needed).
    _Spec("lora_pro", "geolora.optim.lora_pro", "LoRAPro", 1e-2, needs_robust_start=False),
    _Spec("riemannion", "geolora.optim.riemannion", "Riemannion", 2e-2, invariant=True),
    # Invariant with the balanced refactoring from step 1 (no AdamW warm-up).
    _Spec(
        "reflora",
        "geolora.optim.reflora",
        "RefLoRA",
        1e-2,
        kwargs={"warmup_steps": 0},
        invariant=True,
        needs_robust_start=False,
    ),
    # On plain pairs (no dora_magnitude groups) InvariantDoRA is AdamS; its magnitude part is
    # tested in tests/test_dora.py. PoLAR and StelLA train three-factor adapters (lora_triple
    # groups), not LoRA pairs, so they are not zoo entries (tests/test_polar.py, test_stella.py).
    _Spec("invariant_dora", "geolora.optim.dora", "InvariantDoRA", 1e-2, invariant=True),
)

EXPECTED_NAMES: tuple[str, ...] = tuple(s.name for s in _SPECS)
"""Every optimizer the zoo must hold once all modules have landed."""

IMPORT_ERRORS: dict[str, str] = {}
"""``name -> reason`` for specs whose module exists but could not provide the class."""


def _load(spec: _Spec) -> ZooEntry | None:
    try:
        found = importlib.util.find_spec(spec.module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        return None  # not written yet
    try:
        module = importlib.import_module(spec.module)
        obj = getattr(module, spec.attr)
        cls = spec.wrap(obj) if spec.wrap is not None else obj
    except Exception as exc:  # noqa: BLE001 - recorded and reported by test_zoo_complete
        IMPORT_ERRORS[spec.name] = f"{spec.module}.{spec.attr}: {type(exc).__name__}: {exc}"
        return None
    return ZooEntry(
        spec.name,
        cls,
        spec.lr,
        dict(spec.kwargs),
        spec.invariant,
        spec.robust_start,
        spec.needs_robust_start,
    )


ZOO: list[ZooEntry] = [e for e in (_load(s) for s in _SPECS) if e is not None]
"""The optimizers available now, in :data:`EXPECTED_NAMES` order."""


def zoo_ids(entries: list[ZooEntry]) -> list[str]:
    """pytest ids for a list of entries."""
    return [e.name for e in entries]
