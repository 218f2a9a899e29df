"""geolora optimizers on FSDP2-sharded LoRA factors (CPU, gloo, 2 and 4 processes).

One spawn of 4 processes, then one of 2, run every case; each case is compared with a single
process here.

* Training through ``fully_shard`` (float64 model; ``lora_B`` sharded along dim 0 with an uneven
  last shard, ``out = 13``; ``lora_A`` along dim 1 by :func:`fsdp2_shard_placement` where
  ``in`` divides evenly, else FSDP2's default dim 0, gathered by the optimizer): after 10 steps
  the factors equal one process on the same global batch to 1e-12 (the only difference is the
  summation order of the batch mean and of the r×r Grams). Covers the robust start from
  ``B = 0``, a pair left out of sharding next to sharded ones, every row-shardable optimizer
  (LoRA+, ScaledGD with momentum, RPAdamW, LoRA-RITE — 1e-11 for RITE, see ``TOL64_OPT`` —,
  LRACS under the balanced and the preconditioned metric, LiftedSGD with Nesterov momentum,
  StiefelLoRA with each retraction, coordinate-wise, from ``B = 0`` and from a rank-deficient
  ``B``, RefLoRA with warm-up 2 and 0, the scalar policy and ``mode="precondition"``, LoRAM-FR
  and LoRAM-BR from ``B = 0`` and with ``lora_A`` gathered, Riemannion with the SVD and, Nesterov,
  with Newton–Schulz, LiftedShampoo with Frequent-Directions sketches from ``B = 0`` and with
  ``lora_A`` gathered; its exact statistics are refused),
  the whole-pair gather of an optimizer without a
  row-sharded step (AdamS, ``sharded="gather"``), and the optimizer state stored as
  ``DTensor`` s with the factors' placements.
* bfloat16 and float32 parameters, float32 state: gradients are set from a closed form
  (identical in both runs, so that FSDP2's gradient reduction does not enter) and the factors
  must agree to the bit — the Grams are accumulated in float64 from exact products of float32
  entries, so the sharded and the single-process sums differ by ~1e-16 relative, far below the
  rounding of the float32 result. (With gradients from a forward/backward the float32 factors
  differ by the rounding of the batch mean — FSDP2 sums the ranks' gradients in another order
  than one process — amplified by the optimizer: the reordering noise measured for DDP in
  docs/distributed.md, ~1e-7–1e-5 after a few steps, not a property of the sharded step.)
* A NaN in one rank's gradient shard, or in one rank's state shard (so that only that rank's
  update is not finite), stops the step on every rank (``"raise"``) or skips the same pair on
  every rank (``"skip"``).
* Refusals name the optimizer; ``sharded="rows"`` refuses a rank-split ``lora_A``.
* ``torch.distributed.checkpoint``: saved after 5 steps on 4 processes, resumed on 2, 5 more
  steps == 10 steps of one process (RPAdamW, LoRA-RITE and StiefelLoRA from ``B = 0``).
* LoRA-RITE in float32: within 1e-6 relative of one process (its frames come from another QR
  algorithm, so not bitwise).
* RefLoRA in float32: within 1e-5 relative of one process (the same reason).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from optim_zoo import ZOO, ZooEntry, zoo_ids  # noqa: E402
from tiny_models import regression_batch  # noqa: E402
from tiny_models import trainable_parameters as trained  # noqa: E402

from geolora.lora import inject_lora, mark_only_lora_trainable
from geolora.optim import (
    LRACS,
    AdamS,
    LiftedSGD,
    LiftedShampoo,
    LoRAMBoundedRank,
    LoRAMFixedRank,
    LoRAPlus,
    LoRARite,
    RefLoRA,
    RiemannianPreconditionedAdamW,
    Riemannion,
    ScaledGD,
    StiefelLoRA,
)
from geolora.optim.groups import lora_param_groups

pytestmark = pytest.mark.slow

#: Forked workers inherit the imported torch (a spawned one spends seconds importing it again,
#: most of this file's run time); no process group exists in the parent.
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"

GLOBAL_BATCH = 16
LOW_PRECISION = {"bf16": torch.bfloat16, "fp32": torch.float32}
#: LoRA-RITE in float32 (not bitwise: see test_rite_fp32_sharded_within_rounding)
RITE_FP32 = "fp32_rite"
RITE_FP32_TOL = 1e-6  # measured 5e-8 relative after 10 steps
#: RefLoRA (balanced) in float32: float64 CholeskyQR2 frames against float32 Householder ones,
#: the difference carried by Adam's element-wise division (measured 7.2e-7 relative)
REFLORA_FP32, REFLORA_FP32_TOL = "fp32_reflora", 1e-5
#: LoRAM-BR with bfloat16 factors (its point and moments in float32, the compute dtype)
LORAM_BF16 = "bf16_loram"
#: every closed-form run of the workers: name -> (factor dtype, optimizer)
CLOSED_FORM_RUNS: dict[str, tuple[torch.dtype, str]] = {
    **{name: (dtype, "rpadamw") for name, dtype in LOW_PRECISION.items()},
    RITE_FP32: (torch.float32, "lora_rite"),
    REFLORA_FP32: (torch.float32, "reflora"),
    LORAM_BF16: (torch.bfloat16, "loram_br"),
}
STEPS = 10
TOL64 = 1e-12
#: LoRA-RITE's sharded frame is CholeskyQR2 (float64 Grams), one process's is Householder QR:
#: the two differ by rounding (~1e-16 relative), which RITE's inverse square root of the
#: gradient Grams amplifies where an eigenvalue is small (measured: 8.7e-13 on pair 4's A in
#: rite_default, 3e-14 elsewhere), hence a 10x looser bound for it.
#: LoRAM-FR from B = 0: after one robust step ‖X‖ ~ lr and each step moves X by as much, so the
#: truncated SVD keeps r of 2r singular values with a small gap, and every step amplifies
#: rounding. One process changing only its QR method (Householder -> CholeskyQR2) moves 5.6e-12;
#: the sharded run (CholeskyQR2, sums in another order) measured 1.3e-11 (5e-15 from a Gaussian B).
TOL64_OPT = {"lora_rite": 1e-11, "loram_fr": 1e-10}
# (RefLoRA's gauge uses CholeskyQR2 frames too, but nothing amplifies their rounding in the
# balanced factors U Φ Σ^{1/2}: measured at most 2.7e-15 over its cases, within TOL64)

OPTIMIZERS: dict[str, Any] = {
    "loraplus": lambda g, **k: LoRAPlus(g, lr=2e-3, robust_steps=1, **k),
    "scaled_gd": lambda g, **k: ScaledGD(g, lr=5e-2, momentum=0.9, robust_steps=1, **k),
    "rpadamw": lambda g, **k: RiemannianPreconditionedAdamW(g, lr=1e-2, robust_steps=1, **k),
    "adams_gather": lambda g, **k: AdamS(g, lr=1e-2, robust_steps=1, sharded="gather", **k),
    "adams": lambda g, **k: AdamS(g, lr=1e-2, robust_steps=1, **k),
    "lora_rite": lambda g, **k: LoRARite(g, lr=1e-2, robust_steps=1, **k),
    "lracs": lambda g, **k: LRACS(g, lr=1e-2, robust_steps=1, **k),
    "lifted_sgd_nesterov": lambda g, **k: LiftedSGD(
        g, lr=2e-2, momentum=0.9, nesterov=True, robust_steps=1, **k
    ),
    "lracs_precond": lambda g, **k: LRACS(g, lr=1e-2, robust_steps=1, metric="preconditioned", **k),
    "loram_fr": lambda g, **k: LoRAMFixedRank(g, lr=1e-3, robust_steps=1, **k),
    "loram_br": lambda g, **k: LoRAMBoundedRank(g, lr=1e-2, **k),
    "riemannion": lambda g, **k: Riemannion(g, lr=1e-2, robust_steps=1, **k),
    "riemannion_ns": lambda g, **k: Riemannion(
        g, lr=1e-2, robust_steps=1, nesterov=True, orthogonalize="newton_schulz", **k
    ),
    # (no robust start: B = 0 enters St(m, r) by a re-factoring step, the default)
    "stiefel_lora": lambda g, **k: StiefelLoRA(g, lr=1e-2, **k),
    "stiefel_polar": lambda g, **k: StiefelLoRA(g, lr=1e-2, retraction="polar", **k),
    "stiefel_cw": lambda g, **k: StiefelLoRA(g, lr=1e-2, coordinate_wise=True, **k),
    "stiefel_cayley": lambda g, **k: StiefelLoRA(g, lr=1e-2, retraction="cayley", **k),
    # RefLoRA: warmup_steps=2 so that 8 of the 10 steps refactor; no robust start (B = 0 takes
    # the identity gauge: plain AdamW)
    "reflora": lambda g, **k: RefLoRA(g, lr=1e-2, warmup_steps=2, **k),
    "reflora_w0": lambda g, **k: RefLoRA(g, lr=1e-2, warmup_steps=0, **k),
    "reflora_scalar": lambda g, **k: RefLoRA(g, lr=1e-2, policy="scalar", warmup_steps=2, **k),
    "reflora_precond": lambda g, **k: RefLoRA(
        g, lr=1e-2, mode="precondition", warmup_steps=2, **k
    ),
    # Frequent-Directions sketches of rank 4 < m, n (the exact statistics refuse row shards)
    "lifted_shampoo": lambda g, **k: LiftedShampoo(
        g, **{"lr": 5e-2, "sketch_rank": 4, "beta2": 0.9, "robust_steps": 1, **k}
    ),
}

# name -> (optimizer, init, lora_A placement ("rows": dim 1 where possible), replicated pair)
TRAIN: dict[str, tuple[str, str, str, bool]] = {
    "loraplus_rows_mixed": ("loraplus", "gaussian", "rows", True),
    "scaled_gd_rows": ("scaled_gd", "gaussian", "rows", False),
    "scaled_gd_zero_default": ("scaled_gd", "zero", "default", False),
    "rpadamw_zero_rows_mixed": ("rpadamw", "zero", "rows", True),
    "rpadamw_default": ("rpadamw", "gaussian", "default", False),
    "adams_gather": ("adams_gather", "gaussian", "rows", False),
    "rite_zero_rows_mixed": ("lora_rite", "zero", "rows", True),
    "rite_default": ("lora_rite", "gaussian", "default", False),
    "lracs_zero_rows_mixed": ("lracs", "zero", "rows", True),
    "lracs_precond_default": ("lracs_precond", "gaussian", "default", False),
    "lifted_sgd_nesterov_rows": ("lifted_sgd_nesterov", "gaussian", "rows", False),
    "loram_fr_zero_rows_mixed": ("loram_fr", "zero", "rows", True),
    "loram_fr_default": ("loram_fr", "gaussian", "default", False),
    "loram_br_zero_rows_mixed": ("loram_br", "zero", "rows", True),
    "loram_br_default": ("loram_br", "gaussian", "default", False),
    "riemannion_zero_rows_mixed": ("riemannion", "zero", "rows", True),
    "riemannion_ns_default": ("riemannion_ns", "gaussian", "default", False),
    "stiefel_rows_mixed": ("stiefel_lora", "gaussian", "rows", True),
    "stiefel_zero_rows": ("stiefel_lora", "zero", "rows", False),
    "stiefel_polar_default": ("stiefel_polar", "gaussian", "default", False),
    "stiefel_cw_zero_rows_mixed": ("stiefel_cw", "zero", "rows", True),
    "stiefel_cayley_rows": ("stiefel_cayley", "gaussian", "rows", False),
    "reflora_rows": ("reflora", "gaussian", "rows", False),
    "reflora_w0_default": ("reflora_w0", "gaussian", "default", False),
    "reflora_w0_zero_rows_mixed": ("reflora_w0", "zero", "rows", True),
    "reflora_scalar_rows_mixed": ("reflora_scalar", "gaussian", "rows", True),
    "reflora_precond_rows": ("reflora_precond", "gaussian", "rows", False),
    "shampoo_zero_rows_mixed": ("lifted_shampoo", "zero", "rows", True),
    "shampoo_default": ("lifted_shampoo", "gaussian", "default", False),
}
RUNS: dict[int, list[str]] = {
    4: [
        "loraplus_rows_mixed", "rpadamw_zero_rows_mixed", "scaled_gd_zero_default",
        "rite_zero_rows_mixed", "lracs_zero_rows_mixed", "loram_fr_zero_rows_mixed",
        "loram_br_zero_rows_mixed", "riemannion_zero_rows_mixed", "stiefel_rows_mixed",
        "stiefel_zero_rows",
        "stiefel_polar_default", "stiefel_cayley_rows", "reflora_rows",
        "reflora_w0_zero_rows_mixed", "reflora_precond_rows", "shampoo_zero_rows_mixed",
        "shampoo_default", "gram_qr", "dcp_save",
        "dcp_save_rite", "dcp_save_stiefel", "dcp_save_loram", "zoo",
    ],
    2: [
        *TRAIN, "bf16", "fp32", "fp32_rite", "nan_grad", "nan_state", "refuse", "gram_qr", "zoo",
        "dcp_resume", "dcp_resume_rite", "dcp_resume_stiefel", "dcp_resume_loram",
        "stiefel_deficient", "stiefel_nan", LORAM_BF16,
        "reflora_refuse", "fp32_reflora", "shampoo_refuse",
    ],
}


def build_model(init: str, dtype: torch.dtype = torch.float64) -> nn.Module:
    """``12 → 13 → 12 → 13 → 3`` MLP with LoRA (r = 3) on the first three linears (two pairs
    of one shape: a bucket of two) and a trainable ordinary head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(12, 13), nn.Tanh(), nn.Linear(13, 12), nn.Tanh(), nn.Linear(12, 13),
        nn.Tanh(), nn.Linear(13, 3),
    )
    inject_lora(model, ["0", "2", "4"], r=3, alpha=6.0, init=init, seed=1)
    mark_only_lora_trainable(model, keep=["6"])
    return model.to(dtype)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return regression_batch(step, GLOBAL_BATCH, 12, 3)


def reference(opt_name: str, init: str, steps: int = STEPS) -> dict[str, torch.Tensor]:
    model = build_model(init)
    opt = OPTIMIZERS[opt_name](lora_param_groups(model))
    for t in range(steps):
        x, y = global_batch(t)
        opt.zero_grad(set_to_none=True)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return trained(model)


# --- the ranks ---------------------------------------------------------------------------------
def _shard(model: nn.Module, world: int, placement: str, mixed: bool) -> list[nn.Parameter]:
    """``fully_shard`` the model; returns the LoRA factors left replicated (``mixed``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from geolora.optim.sharding import fsdp2_shard_placement

    replicated = [p for n, p in model.named_parameters() if n.startswith("2.lora_")] if mixed else []
    fn = fsdp2_shard_placement(model, world) if placement == "rows" else None
    mesh = init_device_mesh("cpu", (world,))  # explicit: never CUDA, even on a GPU machine
    fully_shard(model, mesh=mesh, shard_placement_fn=fn, ignored_params=set(replicated))
    return replicated


def _train_steps(model, opt, replicated, rank: int, world: int, steps: range) -> None:
    local = GLOBAL_BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    for t in steps:
        x, y = global_batch(t)
        opt.zero_grad(set_to_none=True)
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        for p in replicated:  # FSDP2 averages only what it shards
            dist.all_reduce(p.grad)
            p.grad.div_(world)
        opt.step()


def _describe_state(opt, model) -> dict[str, str]:
    """``"<param>.<key>" -> "DTensor(<placements>)" | "Tensor"`` and dtypes, for the checks."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                kind = f"DTensor{tuple(v.placements)}" if hasattr(v, "placements") else "Tensor"
                out[f"{names[id(p)]}.{k}"] = f"{kind} {v.dtype} {tuple(v.shape)}"
    return out


def _run_train(name: str, rank: int, world: int) -> dict[str, Any]:
    opt_name, init, placement, mixed = TRAIN[name]
    model = build_model(init)
    replicated = _shard(model, world, placement, mixed)
    opt = OPTIMIZERS[opt_name](lora_param_groups(model))
    _train_steps(model, opt, replicated, rank, world, range(STEPS))
    placements = {
        n: str(tuple(p.placements)) if hasattr(p, "placements") else "Tensor"
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    stats = opt.engine.comm_stats
    return {
        "params": trained(model),
        "state": _describe_state(opt, model),
        "placements": placements,
        "comm": (stats.all_reduce_calls, stats.gather_calls),
    }


class _Pairs(nn.Module):
    """Two LoRA pairs as bare parameters (the closed-form gradient cases)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        for i, (m, n) in enumerate(((13, 12), (9, 8))):
            self.register_parameter(f"B{i}", nn.Parameter(torch.randn(m, 3, generator=g).to(dtype)))
            self.register_parameter(f"A{i}", nn.Parameter(torch.randn(3, n, generator=g).to(dtype)))
            self.register_buffer(f"T{i}", torch.randn(m, n, generator=g, dtype=torch.float64))

    def groups(self) -> list[dict]:
        return [
            {"params": [self.get_parameter(f"B{i}"), self.get_parameter(f"A{i}")],
             "lora_pair": True, "scaling": 2.0, "name": f"pair{i}"}
            for i in range(2)
        ]


def _whole(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _set_closed_form_grads(mod: _Pairs) -> None:
    """``∇ 0.5‖s B A − T‖²`` from the whole factors in float64, cast to the factor dtype, each
    rank given its shard (identical in the single-process run)."""
    for i in range(2):
        B, A = mod.get_parameter(f"B{i}"), mod.get_parameter(f"A{i}")
        b, a, T = _whole(B).double(), _whole(A).double(), mod.get_buffer(f"T{i}")
        R = 2.0 * b @ a - T
        for p, g in ((B, 2.0 * R @ a.T), (A, 2.0 * b.T @ R)):
            g = g.to(p.dtype)
            if hasattr(p, "placements"):
                from torch.distributed.tensor import distribute_tensor

                g = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
            p.grad = g


def closed_form_run(
    dtype: torch.dtype,
    world: int = 1,
    opt_name: str = "rpadamw",
    factory: Any = None,
    steps: int = STEPS,
    prepare: Any = None,
) -> dict:
    """``STEPS`` steps of the two bare pairs with the closed-form gradients (sharded with
    ``lora_A`` along dim 1 when ``world > 1``); ``factory(groups)`` builds the optimizer
    (default: ``OPTIMIZERS[opt_name]``), ``prepare(module)`` changes the pairs before."""
    mod = _Pairs(dtype)
    if prepare is not None:
        prepare(mod)
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import Shard

        def placement(p):
            return Shard(1) if p.shape[0] == 3 else None

        fully_shard(mod, mesh=init_device_mesh("cpu", (world,)), shard_placement_fn=placement)
    opt = (factory or OPTIMIZERS[opt_name])(mod.groups())
    for _ in range(steps):
        _set_closed_form_grads(mod)
        opt.step()
    return {"params": {n: _whole(p).clone() for n, p in mod.named_parameters()},
            "state": _describe_state(opt, mod)}


def _repeat_column(mod: _Pairs) -> None:
    with torch.no_grad():
        mod.B0[:, 2] = mod.B0[:, 0]  # nonzero, rank 2 < r


def stiefel_deficient_run(world: int = 1) -> dict:
    """StiefelLoRA from a nonzero rank-deficient ``B`` (pair0). On row shards it takes AdamW
    robust steps until its reduced Gram says full rank, then enters: one process given
    ``robust_steps=1`` for that pair does the same (one process's default re-factors it with
    Householder QR instead)."""

    def factory(groups: list[dict]) -> StiefelLoRA:
        if world == 1:
            groups[0]["robust_steps"] = 1
        return StiefelLoRA(groups, lr=1e-2)

    return closed_form_run(torch.float64, world, factory=factory, steps=4, prepare=_repeat_column)


def _run_nan(kind: str, rank: int, world: int) -> dict[str, Any]:
    """Step 1 clean; step 2 with a NaN in rank 1's shard only (of ``pair0``'s B gradient, or
    of its ``exp_avg_M`` state), in ``raise`` and then in ``skip`` mode."""
    out: dict[str, Any] = {}
    for mode in ("raise", "skip"):
        mod = _Pairs(torch.float64)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(mod, mesh=init_device_mesh("cpu", (world,)))
        opt = RiemannianPreconditionedAdamW(mod.groups(), lr=1e-2, nonfinite=mode)
        _set_closed_form_grads(mod)
        opt.step()
        before = {n: _whole(p).clone() for n, p in mod.named_parameters()}
        _set_closed_form_grads(mod)
        B0 = mod.get_parameter("B0")
        if rank == 1:
            if kind == "grad":
                B0.grad._local_tensor[0, 0] = float("nan")
            else:
                opt.state[B0]["exp_avg_M"]._local_tensor[0, 0] = float("nan")
        try:
            opt.step()
            out[mode] = "stepped"
        except FloatingPointError as exc:
            out[mode] = f"FloatingPointError: {exc}"
        after = {n: _whole(p).clone() for n, p in mod.named_parameters()}
        out[f"{mode}_changed"] = sorted(n for n in before if not torch.equal(before[n], after[n]))
        out[f"{mode}_skips"] = int(opt.state[B0].get("nonfinite_skips", 0))
    return out


def _run_stiefel_nan(rank: int, world: int) -> dict[str, Any]:
    """StiefelLoRA with each retraction: two clean steps, then a NaN in rank 1's shard of
    ``pair0``'s ``exp_avg_B`` (only that rank's local sums are NaN before the reductions), in
    ``raise`` and ``skip`` mode: ``(outcome, parameters changed by that step)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    out: dict[str, Any] = {}
    for retraction in ("qr", "polar", "cayley"):
        for mode in ("raise", "skip"):
            mod = _Pairs(torch.float64)
            fully_shard(mod, mesh=init_device_mesh("cpu", (world,)),
                        shard_placement_fn=lambda p: Shard(1) if p.shape[0] == 3 else None)
            opt = StiefelLoRA(mod.groups(), lr=1e-2, nonfinite=mode, retraction=retraction)
            for _ in range(2):
                _set_closed_form_grads(mod)
                opt.step()
            before = {n: _whole(p).clone() for n, p in mod.named_parameters()}
            _set_closed_form_grads(mod)
            if rank == 1:
                opt.state[mod.get_parameter("B0")]["exp_avg_B"]._local_tensor[0, 0] = float("nan")
            try:
                opt.step()
                got = "stepped"
            except FloatingPointError:
                got = "FloatingPointError"
            changed = [n for n, p in mod.named_parameters() if not torch.equal(_whole(p), before[n])]
            out[f"{retraction}:{mode}"] = (got, sorted(changed))
    return out


def _run_refuse(rank: int, world: int) -> dict[str, str]:
    out = {}
    for case, (opt_name, placement, kw) in {
        "adams": ("adams", "rows", {}),
        "rows_split": ("rpadamw", "default", {"sharded": "rows"}),
        "rite_pinv": ("lora_rite", "rows", {"pinv": True}),
        "loram_norm": ("loram_br", "rows", {"coordinate_wise": False}),
        "loram_prox": ("loram_br", "rows", {"nuclear_mode": "prox"}),
    }.items():
        model = build_model("gaussian")
        replicated = _shard(model, world, placement, False)
        opt = OPTIMIZERS[opt_name](lora_param_groups(model), **kw)
        try:
            _train_steps(model, opt, replicated, rank, world, range(2))
            out[case] = "no error"
        except (NotImplementedError, ValueError) as exc:
            out[case] = f"{type(exc).__name__}: {exc}"
    return out


def _run_reflora_refuse(rank: int, world: int) -> dict[str, Any]:
    """RefLoRA with a gauge policy registered by the user (a function of whole factors) on row
    shards: one warm-up step, then the refusal; what the failed step changed (nothing)."""
    from geolora.optim.gauge import GAUGE_POLICIES, scalar_factors

    GAUGE_POLICIES["user"] = lambda M, N: scalar_factors(M, N)  # (this worker process only)
    try:
        model = build_model("gaussian")
        replicated = _shard(model, world, "rows", False)
        opt = RefLoRA(lora_param_groups(model), lr=1e-2, policy="user", warmup_steps=1)

        def snapshot() -> dict[str, torch.Tensor]:
            st = {f"{i}.{k}": _whole(v) for i, s in enumerate(opt.state.values())
                  for k, v in s.items() if isinstance(v, torch.Tensor)}
            return {**trained(model), **st}

        _train_steps(model, opt, replicated, rank, world, range(1))
        before = snapshot()
        try:
            _train_steps(model, opt, replicated, rank, world, range(1, 2))
            err = "no error"
        except NotImplementedError as exc:
            err = f"{type(exc).__name__}: {exc}"
        after = snapshot()
        changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
        return {"error": err, "changed": changed, "keys": len(before)}
    finally:
        del GAUGE_POLICIES["user"]


def _run_shampoo_refuse(rank: int, world: int) -> dict[str, Any]:
    """LiftedShampoo with exact statistics (``sketch_rank=None``, the default) on row shards:
    the refusal at the first step, and what that step changed (nothing)."""
    model = build_model("gaussian")
    replicated = _shard(model, world, "rows", False)
    opt = OPTIMIZERS["lifted_shampoo"](lora_param_groups(model), sketch_rank=None)
    before = trained(model)
    try:
        _train_steps(model, opt, replicated, rank, world, range(1))
        err = "no error"
    except NotImplementedError as exc:
        err = f"{type(exc).__name__}: {exc}"
    after = trained(model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    return {"error": err, "changed": changed, "state": len(opt.state)}


def qr_inputs() -> dict[str, torch.Tensor]:
    """Tall ``(2, 13, 3)`` stacks: well conditioned (1e3) and beyond plain CholeskyQR (1e11)."""
    g = torch.Generator().manual_seed(7)
    out = {}
    for name, cond in (("cond1e3", 1e3), ("cond1e11", 1e11)):
        U = torch.linalg.qr(torch.randn(2, 13, 3, generator=g, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(2, 3, 3, generator=g, dtype=torch.float64))[0]
        s = torch.tensor([1.0, cond**-0.5, 1.0 / cond], dtype=torch.float64)
        out[name] = U * s @ V.mT
    return out


def _run_gram_qr(rank: int, world: int) -> dict[str, Any]:
    """This rank's rows of ``Q`` and the ``R`` of :func:`gram_qr` over row shards."""
    from geolora.optim.sharding import RowSum, gram_qr

    out = {}
    for name, F in qr_inputs().items():
        rows = torch.arange(F.shape[-2]).chunk(world)[rank]
        Q, R = gram_qr(F[:, rows], RowSum(dist.group.WORLD, m_rows=True), rows=F.shape[-2])
        out[name] = (Q, R)
    return out


ZOO_STEPS = 4  # one robust step, three of the optimizer's own
#: zoo entries built with other options here (in both runs): LiftedShampoo's default exact
#: statistics refuse row shards, its Frequent-Directions sketches (rank 2 < m, n) run on them
ZOO_SHARDED_KWARGS: dict[str, dict[str, Any]] = {"lifted_shampoo": {"sketch_rank": 2}}


def zoo_run(entry: ZooEntry, world: int = 1, **kw: Any) -> dict:
    kw = {**ZOO_SHARDED_KWARGS.get(entry.name, {}), **kw}
    return closed_form_run(
        torch.float64, world, steps=ZOO_STEPS,
        factory=lambda g: entry.factory(g, robust_steps=1, **kw),
    )


def _run_zoo(rank: int, world: int) -> dict[str, Any]:
    """Every zoo optimizer on the bare sharded pairs: ``"auto"`` (refused unless it has a
    row-sharded step) and ``sharded="gather"`` (its factors after the steps)."""
    out: dict[str, Any] = {}
    for e in ZOO:
        for mode in ("auto", "gather"):
            try:
                out[f"{e.name}:{mode}"] = zoo_run(e, world, sharded=mode)["params"]
            except Exception as exc:  # noqa: BLE001 - reported per optimizer by the test
                out[f"{e.name}:{mode}"] = f"{type(exc).__name__}: {exc}"
    return out


DCP_OPT, DCP_INIT = "rpadamw", "zero"
#: checkpoint case suffix -> optimizer (LoRA-RITE: factor-row state basis_U/V, r×r state whole)
DCP_CASES = {"": DCP_OPT, "_rite": "lora_rite", "_stiefel": "stiefel_lora", "_loram": "loram_br"}


def _run_dcp(stage: str, rank: int, world: int, ckpt: str, opt_name: str = DCP_OPT) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from geolora.optim.sharding import load_optimizer_state_dcp, optimizer_state_dcp

    model = build_model(DCP_INIT)
    _shard(model, world, "rows", False)
    opt = OPTIMIZERS[opt_name](lora_param_groups(model))
    half = STEPS // 2
    if stage == "save":
        _train_steps(model, opt, [], rank, world, range(half))
        dcp.save(
            {"model": get_model_state_dict(model), "optim": optimizer_state_dcp(opt, model)},
            checkpoint_id=ckpt,
        )
        return {"state": _describe_state(opt, model)}
    msd = get_model_state_dict(model)
    dcp.load({"model": msd}, checkpoint_id=ckpt)
    set_model_state_dict(model, msd)
    load_optimizer_state_dcp(opt, model, ckpt, key="optim")
    _train_steps(model, opt, [], rank, world, range(half, STEPS))
    return {"params": trained(model), "state": _describe_state(opt, model)}


def _worker(rank: int, world: int, port: int, out: str, names: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results: dict[str, Any] = {}
    ckpt = str(Path(out).parent / "dcp")
    runners: dict[str, Callable[[int, int], Any]] = {  # the cases that run as (rank, world)
        "refuse": _run_refuse,
        "gram_qr": _run_gram_qr,
        "zoo": _run_zoo,
        "stiefel_deficient": lambda rank, world: stiefel_deficient_run(world),
        "stiefel_nan": _run_stiefel_nan,
        "reflora_refuse": _run_reflora_refuse,
        "shampoo_refuse": _run_shampoo_refuse,
    }
    try:
        for name in names:
            try:
                if name in TRAIN:
                    results[name] = _run_train(name, rank, world)
                elif name in CLOSED_FORM_RUNS:
                    dtype, opt_name = CLOSED_FORM_RUNS[name]
                    results[name] = closed_form_run(dtype, world, opt_name)
                elif name.startswith("nan_"):
                    results[name] = _run_nan(name[4:], rank, world)
                elif name in runners:
                    results[name] = runners[name](rank, world)
                else:
                    stage, _, case = name[4:].partition("_")
                    case = f"_{case}" if case else ""
                    results[name] = _run_dcp(
                        stage, rank, world, f"{ckpt}{case}", DCP_CASES[case]
                    )
            except Exception as exc:  # noqa: BLE001 - reported per case by the tests
                results[name] = f"{type(exc).__name__}: {exc}"
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, list[dict[str, Any]]]:
    """``world -> [results of each rank]``: 4 processes first (they save the checkpoint the
    2-process run resumes from)."""
    root = tmp_path_factory.mktemp("sharded")
    out: dict[int, list[dict[str, Any]]] = {}
    for world in (4, 2):
        d = root / f"w{world}"
        d.mkdir()
        mp.start_processes(
            _worker, args=(world, _free_port(), str(d), RUNS[world]), nprocs=world,
            start_method=START_METHOD,
        )
        out[world] = [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(world)]
    return out


def _ok(res: Any) -> Any:
    assert not isinstance(res, str), res
    return res


def _max_dev(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b)
    return max((a[n] - b[n]).abs().max().item() for n in a)


TRAIN_CASES = [(w, n) for w in (4, 2) for n in RUNS[w] if n in TRAIN]


@pytest.mark.parametrize(("world", "name"), TRAIN_CASES, ids=[f"w{w}-{n}" for w, n in TRAIN_CASES])
def test_sharded_training_equals_single_process(world: int, name: str, runs) -> None:
    opt_name, init, placement, mixed = TRAIN[name]
    ranks = [_ok(r[name]) for r in runs[world]]
    got = ranks[0]["params"]
    for r in ranks[1:]:
        assert _max_dev(r["params"], got) == 0.0, "ranks disagree"
    want = reference(opt_name, init)
    start = trained(build_model(init))
    for n in want:
        assert not torch.equal(want[n], start[n]), f"{n} not trained"
    err = _max_dev(got, want)
    assert err <= TOL64_OPT.get(opt_name, TOL64), f"max |sharded − single| = {err:.3g}"
    pl = ranks[0]["placements"]
    assert pl["0.lora_B"] == "(Shard(dim=0),)"
    assert pl["0.lora_A"] == ("(Shard(dim=1),)" if placement == "rows" else "(Shard(dim=0),)")
    assert pl["2.lora_A"] == ("Tensor" if mixed else "(Shard(dim=0),)")  # in = 13: not even


def test_sharded_state_is_dtensor_with_factor_placements(runs) -> None:
    st = _ok(runs[2][0]["rpadamw_zero_rows_mixed"])["state"]
    assert st["0.lora_B.exp_avg_M"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.exp_avg_N"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["2.lora_B.exp_avg_M"] == "Tensor torch.float64 (12, 3)"  # the replicated pair
    assert st["6.weight.exp_avg"].startswith("DTensor(Shard(dim=0),)")  # ordinary, sharded
    assert not any("robust_exp_avg" in k for k in st)  # the robust start's moments dropped
    # lora_A split along r (default placement, in = 13): gathered, state whole on every rank
    st = _ok(runs[2][0]["rpadamw_default"])["state"]
    assert st["2.lora_B.exp_avg_N"] == "Tensor torch.float64 (13, 3)"
    assert st["2.lora_B.exp_avg_M"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    # whole-pair gather: state replicated as plain tensors
    st = _ok(runs[2][0]["adams_gather"])["state"]
    assert all("DTensor" not in v for k, v in st.items() if "lora" in k)


def test_row_sums_are_one_all_reduce_per_bucket_and_step(runs) -> None:
    # ScaledGD (rows): 2 buckets of row-sharded pairs (0+4: L = 2; 2: A gathered) x 9 geometric
    # steps, one all-reduce each; pair 2's A (in = 13) and its gradient gathered each step.
    reduce_calls, gathers = _ok(runs[2][0]["scaled_gd_rows"])["comm"]
    assert reduce_calls == 2 * (STEPS - 1)
    assert gathers == 2 * (STEPS - 1)  # its factor and its gradient
    # LoRA+: element-wise, nothing to reduce
    assert _ok(runs[2][0]["loraplus_rows_mixed"])["comm"][0] == 0


@pytest.mark.parametrize("name", list(LOW_PRECISION))
def test_low_precision_factors_fp32_state_bitwise(name: str, runs) -> None:
    """bf16 and fp32 factors (fp32 state) with identical gradients: bitwise one process."""
    got = [_ok(r[name]) for r in runs[2]]
    dtype = LOW_PRECISION[name]
    want = closed_form_run(dtype)
    for n, w in want["params"].items():
        assert w.dtype == dtype
        assert torch.equal(got[0]["params"][n], w), n
        assert torch.equal(got[1]["params"][n], w), n
    assert got[0]["state"]["B0.exp_avg_M"] == "DTensor(Shard(dim=0),) torch.float32 (13, 3)"
    assert got[0]["state"]["B0.exp_avg_N"] == "DTensor(Shard(dim=0),) torch.float32 (12, 3)"


@pytest.mark.parametrize("kind", ["grad", "state"])
def test_nonfinite_on_one_rank_stops_every_rank(kind: str, runs) -> None:
    res = [_ok(r[f"nan_{kind}"]) for r in runs[2]]
    for r in res:
        assert r["raise"].startswith("FloatingPointError"), r["raise"]
        assert r["raise_changed"] == []  # nothing written on any rank
        assert r["skip"] == "stepped"
        assert r["skip_skips"] == 1
        assert r["skip_changed"] == ["A1", "B1"]  # pair1 stepped, pair0 skipped everywhere
    assert "pair0" in res[0]["raise"] and "pair0" in res[1]["raise"]


def test_stiefel_nonfinite_on_one_rank_stops_every_rank(runs) -> None:
    res = [_ok(r["stiefel_nan"]) for r in runs[2]]
    assert res[1] == res[0]
    for retraction in ("qr", "polar", "cayley"):
        assert res[0][f"{retraction}:raise"] == ("FloatingPointError", [])  # nothing written
        assert res[0][f"{retraction}:skip"] == ("stepped", ["A1", "B1"])  # pair0 skipped


def test_refusals_are_clear(runs) -> None:
    res = [_ok(r["refuse"]) for r in runs[2]]
    msg = res[0]["adams"]
    assert msg.startswith("NotImplementedError: AdamS does not run on sharded LoRA factors")
    assert "sharded='gather'" in msg and "ignored_params" in msg
    msg = res[0]["rows_split"]
    assert msg.startswith("ValueError: RiemannianPreconditionedAdamW(sharded='rows')")
    assert "shard_placement_fn" in msg
    assert res[0]["rite_pinv"].startswith("NotImplementedError: pinv=True on row-sharded factors")
    assert res[0]["loram_norm"].startswith("NotImplementedError: LoRAM with coordinate_wise=False")
    assert res[0]["loram_prox"].startswith("NotImplementedError: nuclear_mode='prox' does not run")
    assert res[1] == res[0]


@pytest.mark.parametrize("case", list(DCP_CASES), ids=[DCP_CASES[c] for c in DCP_CASES])
def test_dcp_save_on_4_resume_on_2(case: str, runs) -> None:
    saved = _ok(runs[4][0][f"dcp_save{case}"])["state"]
    first = {"_stiefel": "exp_avg_B", "_loram": "exp_avg_K"}.get(case, "exp_avg_M")
    assert saved[f"0.lora_B.{first}"].startswith("DTensor(Shard(dim=0),)")
    got = _ok(runs[2][0][f"dcp_resume{case}"])
    assert got["state"][f"0.lora_B.{first}"].startswith("DTensor(Shard(dim=0),)")
    if case == "_stiefel":  # the owned point holds factor rows, the norm-based v_B is whole
        assert got["state"]["0.lora_B.B"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
        assert got["state"]["0.lora_B.exp_avg_sq_B"] == "Tensor torch.float64 (1, 1)"
    if case == "_loram":  # LoRAM-BR's owned point (K, V) holds factor rows
        assert got["state"]["0.lora_B.K"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
        assert got["state"]["0.lora_B.V"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    if case == "_rite":  # the bases are factor rows, the r×r statistics whole on every rank
        assert got["state"]["0.lora_B.basis_V"].startswith("DTensor(Shard(dim=0),)")
        assert got["state"]["0.lora_B.exp_avg_sq_N"] == "Tensor torch.float64 (3, 3)"
    want = reference(DCP_CASES[case], DCP_INIT)
    err = _max_dev(got["params"], want)
    assert err <= TOL64_OPT.get(DCP_CASES[case], TOL64), f"max |resumed − single 10 steps| = {err:.3g}"


def test_rite_state_sides_and_one_all_reduce_per_round(runs) -> None:
    """LoRA-RITE on row shards: bases and first moments stored with the factors' placements,
    ``r x r`` moments and escaped masses whole; per bucket and geometric step three
    all-reduces (CholeskyQR2's two Gram rounds for M and N together, then the transports and
    gradient Grams together)."""
    res = _ok(runs[2][0]["rite_zero_rows_mixed"])
    st = res["state"]
    assert st["0.lora_B.basis_U"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    # (basis_V holds rows of N = Aᵀ: stored like exp_avg_N, along dim 0)
    assert st["0.lora_B.basis_V"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["0.lora_B.exp_avg_M"].startswith("DTensor(Shard(dim=0),)")
    assert st["0.lora_B.exp_avg_sq_M"] == "Tensor torch.float64 (3, 3)"
    assert st["0.lora_B.escaped_N"] == "Tensor torch.float64 ()"
    assert st["2.lora_B.basis_U"] == "Tensor torch.float64 (12, 3)"  # the replicated pair
    # zero B: one robust step, then 9 RITE steps of one row-sharded bucket (pairs 0 and 4)
    assert res["comm"][0] == 3 * (STEPS - 1)


def test_lracs_state_sides_and_reductions(runs) -> None:
    """LRACS on row shards: the row scales ``racs_q`` (m) and column scales ``racs_s`` (n)
    stored with the factors' row placements; per bucket and geometric step 16 all-reduces: 2
    for the frames, 1 for the projected gradient's core, 10 for the 5 power iterations (the
    first ``AᵀA``; then ``AᵀQA`` with ``‖q‖²``, and ``BᵀSB`` with ``‖s‖²``), 1 max for the
    scales' floors, 1 for projecting the scaled direction, 1 for the limiter's metric norm."""
    res = _ok(runs[2][0]["lracs_zero_rows_mixed"])
    st = res["state"]
    assert st["0.lora_B.racs_q"] == "DTensor(Shard(dim=0),) torch.float64 (13,)"
    assert st["0.lora_B.racs_s"] == "DTensor(Shard(dim=0),) torch.float64 (12,)"
    assert st["0.lora_B.racs_phi"] == "Tensor torch.float64 ()"
    assert res["comm"][0] == 16 * (STEPS - 1)


def test_lifted_momentum_state_sides(runs) -> None:
    """LiftedSGD's factored heavy-ball momentum: the stored frame and ``Up``, ``Vp`` hold factor
    rows (DTensors with the factors' row placements), the core ``S`` is whole."""
    st = _ok(runs[2][0]["lifted_sgd_nesterov_rows"])["state"]
    for key, rows in (("U", 13), ("Up", 13), ("V", 12), ("Vp", 12)):
        assert st[f"0.lora_B.momentum_{key}"] == f"DTensor(Shard(dim=0),) torch.float64 ({rows}, 3)"
    assert st["0.lora_B.momentum_S"] == "Tensor torch.float64 (3, 3)"


def test_loram_state_sides_and_reductions(runs) -> None:
    """LoRAM on row shards: the owned point's frames and the moments of the tall tangent blocks
    stored with the factors' row placements, ``S`` and the ``M`` moments whole. All-reduces per
    bucket (pairs 0 and 4): LoRAM-FR 2 per pair to enter (the QRs of ``B``, ``Aᵀ`` together),
    then per step 1 (``UᵀZV``; 2 at the first) + 2 (CholeskyQR2 of ``[U Up]``, ``[V Vp]``) + 1
    (transport); LoRAM-BR enters at ``B = 0`` with 4 per pair (the shifted CholeskyQR3 rounds and
    one for the rank-deficient ``B``'s eigen-decomposition), then per step 1 (``‖K‖`` columns) +
    1 (``VᵀZ``; 2 at the first) + 5 (QR of ``V + cV̇p``, ``V̇pᵀQ``, QR of ``K⁺``) + 1 (transport)."""
    fr = _ok(runs[2][0]["loram_fr_zero_rows_mixed"])
    st = fr["state"]
    assert st["0.lora_B.U"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.V"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["0.lora_B.S"] == "Tensor torch.float64 (3,)"
    assert st["0.lora_B.exp_avg_M"] == "Tensor torch.float64 (3, 3)"
    assert st["0.lora_B.exp_avg_sq_Up"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.exp_avg_Vp"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["2.lora_B.U"] == "Tensor torch.float64 (12, 3)"  # the replicated pair
    assert fr["comm"][0] == 2 * 2 + 4 * (STEPS - 1) + 1  # one robust step first
    br = _ok(runs[2][0]["loram_br_zero_rows_mixed"])
    st = br["state"]
    assert st["0.lora_B.K"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.exp_avg_sq_K"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.exp_avg_Vp"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert br["comm"][0] == 2 * 4 + 8 * STEPS + 1
    # Riemannion: LoRAM-FR's geometry, plus the orthogonalised momentum's QRs (2) and UᵀZV (1)
    ri = _ok(runs[2][0]["riemannion_zero_rows_mixed"])
    st = ri["state"]
    assert st["0.lora_B.momentum_Up"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.momentum_Vp"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["0.lora_B.momentum_M"] == "Tensor torch.float64 (3, 3)"
    assert ri["comm"][0] == 2 * 2 + 7 * (STEPS - 1) + 1


def test_stiefel_state_sides_and_reductions(runs) -> None:
    """StiefelLoRA on row shards: the point (``B`` on St(m, r), ``N = (R A)ᵀ``) and the first
    moments stored with the factors' row placements, the norm-based second moment of ``B`` one
    number per pair (whole), the coordinate-wise one with ``B``'s rows. All-reduces: entry per
    sharded pair, 1 (``B = 0``: a max over the ranks) or 3 (that max and CholeskyQR2's two
    Grams); per bucket and step ``Bᵀ∇`` (1; step 1 also ``R = QᵀM``: 2), ``‖g_B‖²`` (1, norm-based
    only), the QR retraction's Grams (2) and the transport's ``B⁺ᵀm`` (1)."""
    res = _ok(runs[2][0]["stiefel_rows_mixed"])
    st = res["state"]
    assert st["0.lora_B.B"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    assert st["0.lora_B.N"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["0.lora_B.exp_avg_B"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    for key in ("exp_avg_A", "exp_avg_sq_A"):
        assert st[f"0.lora_B.{key}"] == "DTensor(Shard(dim=0),) torch.float64 (12, 3)"
    assert st["0.lora_B.exp_avg_sq_B"] == "Tensor torch.float64 (1, 1)"
    assert st["2.lora_B.B"] == "Tensor torch.float64 (12, 3)"  # the replicated pair
    # Gaussian init: 2 sharded pairs enter (3 each), then one bucket: 6 + 5 · 9
    assert res["comm"] == (2 * 3 + 6 + 5 * (STEPS - 1), 0)
    res = _ok(runs[2][0]["stiefel_cw_zero_rows_mixed"])
    assert res["state"]["0.lora_B.exp_avg_sq_B"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"
    # B = 0: a re-factoring step (1 each), then 9 coordinate-wise steps: 5 + 4 · 8
    assert res["comm"] == (2 * 1 + 5 + 4 * (STEPS - 2), 0)


def test_stiefel_rank_deficient_b_takes_robust_steps_on_shards(runs) -> None:
    got = [_ok(r["stiefel_deficient"]) for r in runs[2]]
    want = stiefel_deficient_run()["params"]
    for n, w in want.items():
        assert torch.equal(got[0]["params"][n], got[1]["params"][n]), "ranks disagree"
        err = (got[0]["params"][n] - w).abs().max().item()
        assert err <= TOL64, f"{n}: max |sharded − single (robust_steps=1)| = {err:.3g}"
    st = got[0]["state"]
    assert st["B0.B"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"  # entered afterwards
    assert not any("robust_exp_avg" in k for k in st)


def _assert_near_one_process(got: list[dict], want: dict, dtype: torch.dtype, tol: float) -> None:
    """Every factor trained, the ranks bitwise equal, and the sharded factors within ``tol``
    relative to the largest entry of one process's."""
    start = _Pairs(dtype)
    for n, w in want["params"].items():
        assert not torch.equal(w, start.get_parameter(n).detach()), f"{n} not trained"
        assert torch.equal(got[0]["params"][n], got[1]["params"][n]), "ranks disagree"
        rel = ((got[0]["params"][n].float() - w.float()).abs().max() / w.float().abs().max()).item()
        assert rel <= tol, f"{n}: relative deviation {rel:.3g}"


def test_loram_bf16_factors_fp32_state(runs) -> None:
    """LoRAM-BR with bfloat16 factors: its point and moments in float32 (DTensors with the
    factors' rows); the factors within one bfloat16 rounding (2⁻⁸ relative to the largest entry)
    of one process, whose float32 frames come from Householder QR (measured: bitwise equal)."""
    got = [_ok(r[LORAM_BF16]) for r in runs[2]]
    want = closed_form_run(torch.bfloat16, opt_name="loram_br")
    _assert_near_one_process(got, want, torch.bfloat16, 2.0**-8)
    assert got[0]["state"]["B0.K"] == "DTensor(Shard(dim=0),) torch.float32 (13, 3)"
    assert got[0]["state"]["B0.exp_avg_sq_Vp"] == "DTensor(Shard(dim=0),) torch.float32 (12, 3)"


def test_rite_fp32_sharded_within_rounding(runs) -> None:
    """float32 LoRA-RITE: the sharded frame is CholeskyQR2 in float64, one process uses
    Householder QR in float32, so the factors agree to the float32 rounding that those frames
    differ by (amplified over the steps), not to the bit."""
    got = [_ok(r[RITE_FP32]) for r in runs[2]]
    want = closed_form_run(torch.float32, opt_name="lora_rite")
    _assert_near_one_process(got, want, torch.float32, RITE_FP32_TOL)
    assert got[0]["state"]["B0.basis_U"] == "DTensor(Shard(dim=0),) torch.float32 (13, 3)"


@pytest.mark.parametrize("world", [2, 4])
def test_gram_qr_on_row_shards_equals_householder(world: int, runs) -> None:
    from geolora.linalg import qr_pos

    res = [_ok(r["gram_qr"]) for r in runs[world]]
    for name, F in qr_inputs().items():
        Q = torch.cat([r[name][0] for r in res], dim=-2)
        R = res[0][name][1]
        for r in res[1:]:
            assert torch.equal(r[name][1], R), "ranks disagree on R"
        Qh, Rh = qr_pos(F, "householder")
        # (Q's column of the smallest singular value is itself ill conditioned: it may differ
        # from Householder's by up to cond·u; the factorisation and R must not)
        assert (Q @ R - F).abs().max() < 1e-14, name
        assert (Q.mT @ Q - torch.eye(3, dtype=F.dtype)).abs().max() < 1e-14, name
        assert (R - Rh).abs().max() / Rh.abs().max() < 1e-14, name


ROW_SHARDED = {
    "loraplus", "scaled_gd", "rpadamw", "lora_rite", "lracs", "lifted_sgd", "loram_fr", "loram_br",
    "stiefel_lora", "reflora", "riemannion", "lifted_shampoo",
}


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("entry", ZOO, ids=zoo_ids(ZOO))
def test_every_optimizer_runs_sharded_or_refuses_and_gathers(
    entry: ZooEntry, world: int, runs
) -> None:
    """``"auto"``: the row-shardable optimizers step (== one process, 1e-12); the others refuse
    with a ``NotImplementedError`` naming the optimizer. ``sharded="gather"``: every optimizer
    steps on the gathered whole pairs, bitwise equal to one process. On 4 processes the 9-row
    pair leaves the last rank an empty shard (FSDP2 shards 3, 3, 3, 0 rows): every rank still
    takes the same collectives (an error on one rank alone would hang the others)."""
    res = [_ok(r["zoo"]) for r in runs[world]]
    want = zoo_run(entry)["params"]
    auto = res[0][f"{entry.name}:auto"]
    if entry.name in ROW_SHARDED:
        assert not isinstance(auto, str), auto
        assert _max_dev(auto, want) <= TOL64_OPT.get(entry.name, TOL64)
    else:
        cls = entry.cls.__name__
        assert isinstance(auto, str) and auto.startswith(
            f"NotImplementedError: {cls} does not run on sharded LoRA factors"
        ), auto
        assert res[1][f"{entry.name}:auto"] == auto
    for r in res:
        got = r[f"{entry.name}:gather"]
        assert not isinstance(got, str), got
        for n, w in want.items():
            assert torch.equal(got[n], w), f"{n}: max dev {(got[n] - w).abs().max().item():.3g}"


def test_reflora_state_sides_and_reductions(runs) -> None:
    """RefLoRA on row shards: Adam's moments stored with the factors' row placements (M side
    with B's rows, N side with Aᵀ's); per bucket and refactoring step two all-reduces for the
    balanced gauge (CholeskyQR2 of M and N together; a third, shifted, round at B = 0), one for
    the scalar policy (‖M‖_F², ‖N‖_F²), none in the warm-up."""
    res = _ok(runs[2][0]["reflora_w0_zero_rows_mixed"])
    st = res["state"]
    for key, rows in (("exp_avg_M", 13), ("exp_avg_sq_M", 13), ("exp_avg_N", 12),
                      ("exp_avg_sq_N", 12)):
        assert st[f"0.lora_B.{key}"] == f"DTensor(Shard(dim=0),) torch.float64 ({rows}, 3)"
    assert st["2.lora_B.exp_avg_M"] == "Tensor torch.float64 (12, 3)"  # the replicated pair
    # one row-sharded bucket (pairs 0 and 4): step 1 at B = 0 (shifted: 3), then 9 steps of 2
    assert res["comm"] == (3 + 2 * (STEPS - 1), 0)
    # two buckets (pairs 0+4; pair 2, A and its gradient gathered every step), 8 refactoring
    # steps after the warm-up
    assert _ok(runs[2][0]["reflora_rows"])["comm"] == (2 * 2 * (STEPS - 2), 2 * STEPS)
    assert _ok(runs[2][0]["reflora_scalar_rows_mixed"])["comm"][0] == STEPS - 2
    st = _ok(runs[2][0]["reflora_w0_default"])["state"]  # A split along r: gathered, N whole
    assert st["0.lora_B.exp_avg_sq_N"] == "Tensor torch.float64 (12, 3)"
    assert st["0.lora_B.exp_avg_sq_M"] == "DTensor(Shard(dim=0),) torch.float64 (13, 3)"


def test_reflora_user_policy_refused_on_row_shards(runs) -> None:
    res = [_ok(r["reflora_refuse"]) for r in runs[2]]
    for r in res:
        assert r["error"].startswith(
            "NotImplementedError: RefLoRA(policy='user') does not run on row-sharded factors"
        ), r["error"]
        assert r["changed"] == [] and r["keys"] > 0  # the failed step wrote nothing


def test_reflora_fp32_sharded_within_rounding(runs) -> None:
    """float32 RefLoRA (balanced gauge, warm-up 2): the sharded frames are CholeskyQR2 in float64,
    one process's Householder QR in float32, so the factors agree to that rounding as Adam
    carries it, not to the bit; the ranks agree bitwise."""
    got = [_ok(r[REFLORA_FP32]) for r in runs[2]]
    want = closed_form_run(torch.float32, opt_name="reflora")
    _assert_near_one_process(got, want, torch.float32, REFLORA_FP32_TOL)
    assert got[0]["state"]["B0.exp_avg_sq_N"] == "DTensor(Shard(dim=0),) torch.float32 (12, 3)"


def test_shampoo_state_sides_and_reductions(runs) -> None:
    """LiftedShampoo (sketch rank 4) on row shards: the Frequent-Directions sketches ``Z_L``
    (m x k) and ``Z_R`` (n x k) stored with the factors' row placements, the escaped masses
    whole; per bucket and geometric step 4 all-reduces: the frames (2), the projected
    gradient's core (1), and one for the sketches, the inverse fourth roots and the projection
    of the preconditioned direction together (``ZᵀZ``, ``ZᵀF``, ``FᵀF``, ``UᵀZ``, ``UᵀF`` of
    both sides)."""
    res = _ok(runs[2][0]["shampoo_zero_rows_mixed"])
    st = res["state"]
    assert st["0.lora_B.shampoo_L"] == "DTensor(Shard(dim=0),) torch.float64 (13, 4)"
    assert st["0.lora_B.shampoo_R"] == "DTensor(Shard(dim=0),) torch.float64 (12, 4)"
    assert st["0.lora_B.shampoo_L_rho"] == "Tensor torch.float64 ()"
    assert st["2.lora_B.shampoo_L"] == "Tensor torch.float64 (12, 4)"  # the replicated pair
    # B = 0: one robust step, then 9 steps of one row-sharded bucket (pairs 0 and 4)
    assert res["comm"] == (4 * (STEPS - 1), 0)
    # A split along r (default placements, gathered): two buckets (0+4; 2) with N whole; the
    # M side still takes 4 all-reduces per step
    res = _ok(runs[2][0]["shampoo_default"])
    assert res["comm"][0] == 2 * 4 * (STEPS - 1)
    assert res["state"]["0.lora_B.shampoo_R"] == "Tensor torch.float64 (12, 4)"
    assert res["state"]["0.lora_B.shampoo_L"] == "DTensor(Shard(dim=0),) torch.float64 (13, 4)"


def test_shampoo_exact_statistics_refused_on_row_shards(runs) -> None:
    res = [_ok(r["shampoo_refuse"]) for r in runs[2]]
    for r in res:
        msg = r["error"]
        assert msg.startswith("NotImplementedError: LiftedShampoo does not run on sharded"), msg
        assert "sketch_rank=None" in msg and "sketch_rank=k" in msg and "sharded='gather'" in msg
        assert r["changed"] == [] and r["state"] == 0  # the failed step wrote nothing
    assert res[1] == res[0]
