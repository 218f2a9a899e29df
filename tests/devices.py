"""The devices the device-parametrized tests run on.

CPU always, plus CUDA where a CUDA device is available (``benchmarks/gpu_check.sh`` runs the
suite on a GPU machine). ``GEOLORA_TEST_DEVICES=cpu,cuda`` (comma-separated) overrides the
choice, e.g. ``GEOLORA_TEST_DEVICES=cuda`` to run the parametrized tests on the GPU only.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEVICES"]


def _devices() -> list[str]:
    env = os.environ.get("GEOLORA_TEST_DEVICES", "").strip()
    if env:
        return [d.strip() for d in env.split(",") if d.strip()]
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


#: Device names for ``pytest.mark.parametrize("device", DEVICES)`` and the ``device`` fixture.
DEVICES: list[str] = _devices()
