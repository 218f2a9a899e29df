"""Optimizer registry for the benchmark harness.

Every optimizer the bench can run is described by an :class:`OptimizerSpec`: a name, a
factory ``factory(param_groups, lr, **kw) -> torch.optim.Optimizer``, a default learning
rate, whether it is invariant under the LoRA gauge ``(B, A) -> (B R, R^{-1} A)``, a one-line
description and the paper it implements.

Parameter groups follow the geolora convention: a LoRA pair is
``{"params": [B, A], "lora_pair": True, "scaling": s, "name": str}`` with ``B: (out, r)``,
``A: (r, in)`` and ``ΔW = s·B A``; every other parameter sits in a plain group. Factories
receive the groups unchanged (copied, never mutated) and must accept both kinds.

The module-level :data:`REGISTRY` holds the built-in entries; :func:`register`, :func:`get`
and :func:`names` act on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "REGISTRY",
    "OptimizerFactory",
    "OptimizerRegistry",
    "OptimizerSpec",
    "get",
    "names",
    "register",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""``factory(param_groups, lr, **kw) -> torch.optim.Optimizer``."""


@dataclass(frozen=True)
class OptimizerSpec:
    """Description of one benchmarkable optimizer.

    Attributes:
        name: registry key (lower case, no spaces), e.g. ``"adamw"``.
        factory: ``factory(param_groups, lr, **kw) -> torch.optim.Optimizer``.
        default_lr: learning rate used when the caller gives none.
        invariant: True when the X = B A trajectory does not depend on the factor gauge.
        description: one line for tables and ``--help``.
        paper: short citation of the method (empty for plain baselines).
        adapter: the adapter kind the optimizer trains (``"lora"``: ``ΔW = s·B A``); the bench
            builds the adapted model through :func:`geolora.bench.adapters.adapt`, which
            dispatches on this name.
    """

    name: str
    factory: OptimizerFactory
    default_lr: float
    invariant: bool
    description: str
    paper: str = ""
    adapter: str = "lora"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise ValueError(f"name must be a non-empty string without surrounding spaces, got {self.name!r}")
        if not callable(self.factory):
            raise TypeError(f"factory must be callable, got {type(self.factory).__name__}")
        if not (isinstance(self.default_lr, (int, float)) and self.default_lr > 0):
            raise ValueError(f"default_lr must be a positive number, got {self.default_lr!r}")
        if not isinstance(self.invariant, bool):
            raise TypeError(f"invariant must be a bool, got {type(self.invariant).__name__}")
        if not isinstance(self.adapter, str) or not self.adapter:
            raise ValueError(f"adapter must be a non-empty string, got {self.adapter!r}")

    def build(
        self, param_groups: Sequence[Mapping[str, Any]], lr: float | None = None, **kw: Any
    ) -> torch.optim.Optimizer:
        """Call the factory on copies of ``param_groups`` with ``lr`` (default: ``default_lr``)."""
        groups = [dict(g) for g in param_groups]
        return self.factory(groups, self.default_lr if lr is None else lr, **kw)


class OptimizerRegistry(Mapping[str, OptimizerSpec]):
    """A read-mostly mapping ``name -> OptimizerSpec`` that keeps registration order."""

    def __init__(self) -> None:
        self._specs: dict[str, OptimizerSpec] = {}

    def register(self, spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
        """Add ``spec``; a second spec with the same name needs ``replace=True``."""
        if not isinstance(spec, OptimizerSpec):
            raise TypeError(f"spec must be an OptimizerSpec, got {type(spec).__name__}")
        if spec.name in self._specs and not replace:
            raise ValueError(
                f"spec.name {spec.name!r} is already registered; pass replace=True to override it"
            )
        self._specs[spec.name] = spec
        return spec

    def get(self, name: str) -> OptimizerSpec:  # type: ignore[override]
        """The spec registered as ``name``; ``ValueError`` listing the known names otherwise."""
        try:
            return self._specs[name]
        except (KeyError, TypeError):
            known = ", ".join(self._specs) or "(none)"
            raise ValueError(f"unknown optimizer name {name!r}; known optimizers: {known}") from None

    def __getitem__(self, name: str) -> OptimizerSpec:
        return self.get(name)

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs


def _adamw_factory(
    param_groups: Sequence[Mapping[str, Any]], lr: float, *, weight_decay: float = 0.0, **kw: Any
) -> torch.optim.Optimizer:
    """Plain ``torch.optim.AdamW`` on B and A separately (Loshchilov & Hutter 2019).

    torch keeps unknown group keys (``lora_pair``, ``scaling``, ``name``) untouched and
    round-trips them through ``state_dict``, so the geolora groups pass through as they are.
    Weight decay defaults to 0 so the bench compares optimizers, not regularisers.
    """
    return torch.optim.AdamW([dict(g) for g in param_groups], lr=lr, weight_decay=weight_decay, **kw)


REGISTRY = OptimizerRegistry()
"""The registry the bench and the CLI read."""

REGISTRY.register(
    OptimizerSpec(
        name="adamw",
        factory=_adamw_factory,
        default_lr=1e-3,
        invariant=False,
        description="torch.optim.AdamW on the LoRA factors B and A separately (baseline)",
        paper="Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019",
    )
)


def register(spec: OptimizerSpec, *, replace: bool = False) -> OptimizerSpec:
    """Register ``spec`` in :data:`REGISTRY`."""
    return REGISTRY.register(spec, replace=replace)


def get(name: str) -> OptimizerSpec:
    """Look ``name`` up in :data:`REGISTRY` (``ValueError`` with the known names if absent)."""
    return REGISTRY.get(name)


def names() -> list[str]:
    """Names in :data:`REGISTRY`, in registration order."""
    return REGISTRY.names()
