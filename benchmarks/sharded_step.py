"""Optimizer step on sharded vs replicated LoRA factors (issue 18, "Cost"): communication per
step and step time, 2 gloo processes on the CPU.

LoRA pairs shaped like all-MiniLM-L6-v2's linears (24 × 384×384, 6 × 1536×384, 6 × 384×1536;
``--rank``, default 8), float32, fixed random gradients (the same on every rank), the optimizer
step alone. Three layouts per optimizer:

* ``replicated``: ordinary tensors, every rank holds and steps every whole pair (the
  ``ignored_params`` recipe; its gradients were all-reduced before the step);
* ``rows``: ``B`` sharded along dim 0, ``A`` along dim 1 (``fsdp2_shard_placement``): the
  optimizer works on the local rows, ``r x r`` sums all-reduced;
* ``default``: FSDP2's default ``Shard(0)`` for both, so ``A`` is split along ``r`` and the
  optimizer gathers it (and its gradient) every step.

AdamS (dense moments, no row-sharded step) runs its ``sharded="gather"`` mode in the sharded
layouts. Reported per step (rank 0): median wall time after a barrier (``--steps`` timed steps after
``--warmup``), bytes all-reduced (the ``r x r`` sums), bytes gathered, the number of
collectives, and the bytes of all factors (``(m + n) r`` floats per pair). Writes
``--out`` (JSON) and prints a Markdown table. Usage::

    python benchmarks/sharded_step.py [--rank 8] [--steps 20] [--out sharded_step.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from geolora.bench.perf import MINILM_SHAPES

WORLD = 2
OPTIMIZERS = (
    "loraplus", "scaledgd", "rpadamw", "lora_rite", "lracs", "loram_fr", "loram_br",
    "stiefel_lora", "reflora", "riemannion", "adams",
)
LAYOUTS = ("replicated", "rows", "default")


def _optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    from geolora.optim import (
        LRACS,
        AdamS,
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

    # (class, options beyond lr=1e-4); AdamS has no row-sharded step (dense moments): the
    # explicit whole-pair gather
    table: dict[str, tuple[type, dict[str, Any]]] = {
        "loraplus": (LoRAPlus, {}),
        "scaledgd": (ScaledGD, {"momentum": 0.9}),
        "rpadamw": (RiemannianPreconditionedAdamW, {}),
        "lora_rite": (LoRARite, {}),
        "lracs": (LRACS, {"robust_steps": 0}),
        "loram_fr": (LoRAMFixedRank, {}),
        "loram_br": (LoRAMBoundedRank, {}),
        "stiefel_lora": (StiefelLoRA, {}),
        "reflora": (RefLoRA, {"warmup_steps": 0}),
        "riemannion": (Riemannion, {}),
        "adams": (AdamS, {"robust_steps": 0, "sharded": "gather"}),
    }
    cls, kw = table[name]
    return cls(groups, lr=1e-4, **kw)


def _pairs(layout: str, r: int) -> tuple[list[dict], list[tuple[torch.Tensor, ...]]]:
    """Param groups of the pairs in ``layout`` and the fixed gradients to set each step."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    g = torch.Generator().manual_seed(0)
    mesh = init_device_mesh("cpu", (WORLD,)) if layout != "replicated" else None
    groups, grads = [], []
    for m, n, count in MINILM_SHAPES:
        for i in range(count):
            full = [
                torch.randn(m, r, generator=g) / m**0.5,
                torch.randn(r, n, generator=g) / n**0.5,
                torch.randn(m, r, generator=g) * 1e-3,
                torch.randn(r, n, generator=g) * 1e-3,
            ]
            if mesh is not None:
                a_dim = 1 if layout == "rows" else 0
                place = [[Shard(0)], [Shard(a_dim)], [Shard(0)], [Shard(a_dim)]]
                full = [
                    distribute_tensor(t, mesh, p, src_data_rank=None) for t, p in zip(full, place)
                ]
            B, A = torch.nn.Parameter(full[0]), torch.nn.Parameter(full[1])
            groups.append({"params": [B, A], "lora_pair": True, "scaling": 2.0,
                           "name": f"{m}x{n}.{i}"})
            grads.append((B, A, full[2], full[3]))
    return groups, grads


def _run(rank: int, port: int, out: str, args: dict[str, int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    rows: list[dict[str, Any]] = []
    try:
        for name in OPTIMIZERS:
            for layout in LAYOUTS:
                groups, grads = _pairs(layout, args["rank"])
                opt = _optimizer(name, groups)
                times = []
                warmup, steps = args["warmup"], args["steps"]
                for it in range(warmup + steps):
                    for B, A, gB, gA in grads:
                        B.grad, A.grad = gB, gA
                    if it == warmup:
                        opt.engine.comm_stats.reset()
                    dist.barrier()
                    t0 = time.perf_counter()
                    opt.step()
                    times.append(time.perf_counter() - t0)
                st = opt.engine.comm_stats
                factor_bytes = sum(p.numel() * 4 for grp in groups for p in grp["params"])
                rows.append({
                    "optimizer": name,
                    "layout": layout,
                    "ms_per_step": 1e3 * statistics.median(times[warmup:]),
                    "all_reduce_bytes": st.all_reduce_bytes / steps,
                    "all_reduce_calls": st.all_reduce_calls / steps,
                    "gather_bytes": st.gather_bytes / steps,
                    "gather_calls": st.gather_calls / steps,
                    "flag_calls": st.flag_calls / steps,
                    "factor_bytes": factor_bytes,
                })
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def main(args: argparse.Namespace) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_out = str(Path(tmp) / "rows.json")
        opts = {"rank": args.rank, "steps": args.steps, "warmup": args.warmup}
        mp.spawn(_run, args=(port, tmp_out, opts), nprocs=WORLD)
        rows = json.loads(Path(tmp_out).read_text())
    meta = {
        "world": WORLD,
        "rank": args.rank,
        "shapes": MINILM_SHAPES,
        "steps": args.steps,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| optimizer | layout | ms/step | all-reduced KiB/step (calls) | gathered KiB/step "
          "(calls) | factors KiB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {r['layout']} | {r['ms_per_step']:.2f} | "
            f"{r['all_reduce_bytes'] / 1024:.1f} ({r['all_reduce_calls']:.0f}) | "
            f"{r['gather_bytes'] / 1024:.1f} ({r['gather_calls']:.0f}) | "
            f"{r['factor_bytes'] / 1024:.0f} |"
        )


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default="sharded_step.json")
    return p.parse_args()


if __name__ == "__main__":
    main(_parse())
