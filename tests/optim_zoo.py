"""The optimizer zoo the reliability, fuzz and distributed tests run over.

Every geolora LoRA optimizer gets one :class:`ZooEntry`: a lower-case name, a factory
``factory(param_groups, **overrides) -> torch.optim.Optimizer`` with a learning rate that works
on the tiny problems of the tests (``0.5‖s·B A − X*‖²`` with ``m, n ≈ 12``, ``r = 3``,
``X*`` of singular values in ``[1, 2]``) and flags the tests branch on.

The entries are the pair optimizers of :mod:`geolora.optim.registry` (the single table of names,
classes and properties); this file adds only what the tests need: a learning rate for the tiny
problems and per-entry test settings. An entry whose class fails to import is recorded in
:data:`IMPORT_ERRORS` so the failure is visible instead of silently shrinking the zoo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from geolora.optim import registry

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


#: Learning rates that work on the tiny test problems (``0.5‖s·B A − X*‖²``, ``m, n ≈ 12``,
#: ``r = 3``, ``X*`` with singular values in ``[1, 2]``), and per-entry test settings.
TINY_LR: dict[str, float] = {
    "adams": 1e-2,
    "lracs": 1e-2,
    "lifted_sgd": 5e-2,
    "lifted_shampoo": 5e-2,
    "lifted_adam": 1e-2,
    "lora_rite": 1e-2,
    "scaled_gd": 5e-2,
    "rpadamw": 1e-2,
    "loraplus": 2e-3,
    "loram_fr": 1e-3,
    "loram_br": 1e-3,
    "stiefel_lora": 1e-2,
    "lora_pro": 1e-2,
    "riemannion": 2e-2,
    "reflora": 1e-2,
    "invariant_dora": 1e-2,
}
#: RefLoRA is invariant with the balanced refactoring from step 1 (no AdamW warm-up).
ZOO_KWARGS: dict[str, dict[str, Any]] = {"reflora": {"warmup_steps": 0}}
ZOO_INVARIANT: dict[str, bool] = {"reflora": True}

#: The pair optimizers of the registry (variants with fixed kwargs are covered by their own
#: tests; three-factor optimizers train other adapters: tests/test_polar.py, test_stella.py).
EXPECTED_NAMES: tuple[str, ...] = tuple(
    n for n in registry.names() if registry.get(n).trains_pairs and not registry.get(n).kwargs
)

IMPORT_ERRORS: dict[str, str] = {}
"""``name -> reason`` for entries whose module exists but could not provide the class."""


def _load(name: str) -> ZooEntry | None:
    info = registry.get(name)
    try:
        cls = info.load()
    except Exception as exc:  # noqa: BLE001 - recorded and reported by test_zoo_complete
        IMPORT_ERRORS[name] = f"{info.module}.{info.attr}: {type(exc).__name__}: {exc}"
        return None
    return ZooEntry(
        name,
        cls,
        TINY_LR[name],
        dict(ZOO_KWARGS.get(name, {})),
        ZOO_INVARIANT.get(name, info.invariant),
        True,
        info.needs_robust_start,
    )


ZOO: list[ZooEntry] = [e for e in (_load(n) for n in EXPECTED_NAMES) if e is not None]
"""The optimizers available now, in registry order."""


def zoo_ids(entries: list[ZooEntry]) -> list[str]:
    """pytest ids for a list of entries."""
    return [e.name for e in entries]
