"""Test-session settings: one intra-op thread per worker for every test (tiny r x r kernels are
dominated by thread start-up, `make test` runs two xdist workers on two cores instead, and one
thread keeps reductions in a fixed order, which the bitwise-resume tests rely on), and the
``device`` fixture of the device-parametrized tests (:mod:`devices`: CPU, plus CUDA where
available)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from devices import DEVICES  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device of :data:`devices.DEVICES` in turn."""
    return torch.device(request.param)
