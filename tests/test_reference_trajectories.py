"""Every optimizer reproduces the trajectories recorded before the optimizer package was
restructured (:mod:`reference_trajectories`): float64 to 1e-12 relative (bitwise where the order
of arithmetic is unchanged), float32 to 1e-5 relative (rounding can be reordered)."""

from __future__ import annotations

import pytest
import torch
from reference_trajectories import DATA, key_str, keys, run

REFERENCE = torch.load(DATA, weights_only=True)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@pytest.mark.parametrize("key", keys(), ids=[key_str(*k) for k in keys()])
def test_matches_reference(key) -> None:
    name, dtype, init = key
    got = run(name, dtype, init)
    ref = REFERENCE[key_str(*key)]
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err <= TOL[dtype], f"{key_str(*key)} parameter {i}: relative error {err:.3g}"


def test_reference_covers_every_case() -> None:
    assert set(REFERENCE) == {key_str(*k) for k in keys()}
