"""Reference trajectories of every pair optimizer, recorded before the optimizer package was
restructured (issue: architecture), so that a refactoring can prove it changed no result.

Each case trains three LoRA pairs (two of one shape, so they share a bucket, and one of another)
plus an ordinary parameter on ``Σ ½‖s·B A − X*‖² + ½‖w − w*‖²`` for :data:`STEPS` steps, from a
random start and from ``B = 0``, in float64 and float32. ``python tests/reference_trajectories.py``
rewrites ``tests/data/reference_trajectories.pt`` (only do that for an intended change of
results, and say so in the commit message); ``tests/test_reference_trajectories.py`` compares.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

STEPS = 12
DATA = Path(__file__).resolve().parent / "data" / "reference_trajectories.pt"
SHAPES = ((12, 10, 3), (12, 10, 3), (9, 8, 2))  # (out, in, r)
SCALING = 0.5


def _cases() -> dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]]:
    from geolora import optim as go

    def lifted(cls, **kw):
        return lambda groups, **k: go.Lifted(cls, **kw)(groups, **k)

    return {
        "adams": (go.AdamS, {"lr": 1e-2, "robust_steps": 0}),
        "adams_low_memory": (go.AdamS, {"lr": 1e-2, "robust_steps": 0, "low_memory": True}),
        "adams_rsm_precond": (
            go.AdamS,
            {
                "lr": 1e-2,
                "robust_steps": 0,
                "riemannian_second_moment": True,
                "metric": "preconditioned",
            },
        ),
        "adams_l2": (
            go.AdamS,
            {"lr": 1e-2, "robust_steps": 0, "weight_decay": 0.1, "decay": "l2"},
        ),
        "adams_flat_decoupled": (
            go.AdamS,
            {"lr": 1e-2, "robust_steps": 0, "weight_decay": 0.1, "metric": "flat"},
        ),
        "lracs": (go.LRACS, {"lr": 1e-2, "robust_steps": 0}),
        "lracs_box": (go.LRACS, {"lr": 1e-2, "robust_steps": 0, "bias_correction": False}),
        "lifted_sgd": (go.LiftedSGD, {"lr": 5e-2}),
        "lifted_sgd_nesterov": (
            go.LiftedSGD,
            {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        ),
        "lifted_shampoo": (go.LiftedShampoo, {"lr": 5e-2, "robust_steps": 0}),
        "lifted_adam": (lifted(torch.optim.Adam), {"lr": 1e-2}),
        "lifted_sgd_momentum": (lifted(torch.optim.SGD, momentum=0.9), {"lr": 5e-2}),
        # row_normalize pinned: its default changed after the recording (issue 14 item 5)
        "lora_rite": (go.LoRARite, {"lr": 1e-2, "row_normalize": False}),
        "lora_rite_box_pinv": (
            go.LoRARite,
            {
                "lr": 1e-2,
                "second_moment": "sum",
                "pinv": True,
                "bias_correction": False,
                "row_normalize": False,
            },
        ),
        "lora_rite_wd_rows": (
            go.LoRARite,
            {"lr": 1e-3, "weight_decay": 0.1, "row_normalize": True, "escaped_mass": False},
        ),
        "scaled_gd": (go.ScaledGD, {"lr": 5e-2}),
        "scaled_gd_nesterov": (
            go.ScaledGD,
            {"lr": 5e-2, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1, "damping": 1e-6},
        ),
        "rpadamw": (go.RiemannianPreconditionedAdamW, {"lr": 1e-2}),
        "loraplus": (go.LoRAPlus, {"lr": 2e-3, "weight_decay": 0.1}),
        "loram_fr": (go.LoRAMFixedRank, {"lr": 1e-3}),
        "loram_fr_norm": (go.LoRAMFixedRank, {"lr": 1e-3, "coordinate_wise": False}),
        "loram_fr_box": (
            go.LoRAMFixedRank,
            {"lr": 1e-3, "second_moment_transport": "none", "momentum_bound": False},
        ),
        "loram_br": (go.LoRAMBoundedRank, {"lr": 1e-3}),
        "loram_br_prox_norm": (
            go.LoRAMBoundedRank,
            {"lr": 1e-3, "nuclear_mode": "prox", "coordinate_wise": False},
        ),
        "stiefel_lora": (go.StiefelLoRA, {"lr": 1e-2}),
        "stiefel_lora_polar_cw": (
            go.StiefelLoRA,
            {"lr": 1e-2, "retraction": "polar", "coordinate_wise": True, "weight_decay": 0.1},
        ),
    }


def _problem(dtype: torch.dtype, init: str) -> tuple[list[dict], list[torch.Tensor], Callable]:
    gen = torch.Generator().manual_seed(1234)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    groups: list[dict] = []
    targets = []
    for i, (m, n, r) in enumerate(SHAPES):
        B = rnd(m, r) * 0.5
        A = rnd(r, n) * 0.5
        if init == "zero":
            B = torch.zeros_like(B)
        X = rnd(m, r) @ rnd(r, n) * 0.3
        B.requires_grad_(True)
        A.requires_grad_(True)
        groups.append({"params": [B, A], "lora_pair": True, "scaling": SCALING, "name": f"p{i}"})
        targets.append(X)
    w = rnd(5).requires_grad_(True)
    w_star = rnd(5)
    groups.append({"params": [w]})

    def loss() -> torch.Tensor:
        tot = 0.5 * (w - w_star).pow(2).sum()
        for g, X in zip(groups[:-1], targets):
            B, A = g["params"]
            tot = tot + 0.5 * (SCALING * B @ A - X).pow(2).sum()
        return tot

    params = [p for g in groups for p in g["params"]]
    return groups, params, loss


def run(name: str, dtype: torch.dtype, init: str) -> list[torch.Tensor]:
    """The parameters after :data:`STEPS` steps of case ``name`` (an lr change at step 6)."""
    factory, kw = _cases()[name]
    kw = dict(kw)
    if init == "zero" and "robust_steps" in kw:
        kw["robust_steps"] = 3
    groups, params, loss = _problem(dtype, init)
    opt = factory(groups, **kw)
    for k in range(STEPS):
        if k == 6:
            for g in opt.param_groups:
                g["lr"] = g["lr"] * 0.5
        opt.zero_grad()
        loss().backward()
        opt.step()
    return [p.detach().clone() for p in params]


def keys() -> list[tuple[str, torch.dtype, str]]:
    return [
        (name, dt, init)
        for name in _cases()
        for dt in (torch.float64, torch.float32)
        for init in ("random", "zero")
    ]


def key_str(name: str, dtype: torch.dtype, init: str) -> str:
    return f"{name}/{str(dtype).removeprefix('torch.')}/{init}"


def record() -> None:
    torch.set_num_threads(1)
    out = {key_str(*k): run(*k) for k in keys()}
    DATA.parent.mkdir(exist_ok=True)
    torch.save(out, DATA)
    print(f"wrote {len(out)} trajectories to {DATA}")


if __name__ == "__main__":
    record()
