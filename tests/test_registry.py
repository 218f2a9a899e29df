"""The optimizer registry (geolora.optim.registry) is the one table of names: every entry loads
and is exported by geolora.optim, every exported optimizer class is registered, and the test zoo
covers every pair optimizer of the table."""

from __future__ import annotations

import inspect

import pytest
import torch
from optim_zoo import EXPECTED_NAMES, ZOO

import geolora.optim as go
from geolora.optim import registry


def test_every_entry_loads_and_is_exported() -> None:
    exported = {getattr(go, n) for n in go.__all__}
    for name, info in registry.OPTIMIZERS.items():
        cls = info.load()
        assert isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer), name
        base = getattr(go, info.attr)
        assert base in exported, f"{name}: geolora.optim does not export {info.attr}"
        lr = info.default_lr
        assert lr is None or lr > 0, name


def test_every_exported_optimizer_class_is_registered() -> None:
    registered = {info.attr for info in registry.OPTIMIZERS.values()}
    generic = {"LoRAOptimizer", "PairOptimizer", "LiftedOptimizer", "RiemannianAdam", "RiemannianSGD"}
    for n in go.__all__:
        obj = getattr(go, n)
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and n not in generic:
            assert n in registered, f"geolora.optim exports {n}, which the registry lacks"


def test_the_zoo_covers_every_pair_optimizer() -> None:
    pair_kinds = {"lora", "dora"}
    want = [n for n in registry.names() if registry.get(n).adapter in pair_kinds]
    assert set(EXPECTED_NAMES) == {n for n in want if not registry.get(n).kwargs}
    assert [e.name for e in ZOO] == list(EXPECTED_NAMES)


def test_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: adams"):
        registry.get("adam_s")
