"""Optimizer-step time vs number of LoRA layers and vs rank (issue 8, "Scaling").

Two sweeps on stacks of 384×384 LoRA pairs (MiniLM's attention shape), each optimizer timed in
the same process as ``torch.optim.AdamW`` (``foreach=True``; ``fused=True`` on CUDA):

* layers ∈ {1, 4, 16, 64, 256} at ``--rank`` (default 8): step time and time per layer. The
  geolora optimizers are also timed with ``foreach=False`` (one pair at a time, the reference
  path), which shows what batching the same-shape pairs buys: the per-layer cost of the batched
  step falls as layers are added, the looped one stays flat;
* r ∈ {4, 8, 16, 32, 64} at ``--layers-for-rank`` layers (default 16).

Writes ``scaling.json``, ``scaling_layers.png`` and ``scaling_rank.png`` to ``--out``
(default ``docs/benchmarks``). Times are medians over ``--steps`` steps after ``--warmup``; the
default clock is the process CPU time with one thread, which is steady on a shared machine
(``--clock wall --threads 2`` for wall time). Usage::

    python benchmarks/scaling.py [--quick] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch

from geolora.bench.perf import adamw_factory, make_pairs, optimizer_factories, time_steps

OPTIMIZERS = ("adamw", "adams_lm", "lracs", "lora_rite", "scaledgd")
LAYERS = (1, 4, 16, 64, 256)
RANKS = (4, 8, 16, 32, 64)


def build(name: str, layers: int, rank: int, device, foreach: bool = True) -> torch.optim.Optimizer:
    groups = make_pairs(((384, 384, layers),), rank, device=device)
    if name == "adamw":
        return adamw_factory(device)(groups, 1e-4)
    return optimizer_factories([name])[name](groups, 1e-4, foreach=foreach)


def sweep(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    if device.type == "cuda" and args.clock == "cpu":
        clock = time.perf_counter
    layers = LAYERS[:4] if args.quick else LAYERS
    ranks = RANKS[:4] if args.quick else RANKS
    out: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": "wall" if clock is time.perf_counter else "process cpu",
        "shape": [384, 384],
        "rank_for_layers": args.rank,
        "layers_for_rank": args.layers_for_rank,
        "layers": {},
        "rank": {},
    }
    for name in args.optimizers:
        rows = []
        for n in layers:
            row = {"layers": n, "ms": time_steps(build(name, n, args.rank, device), device, args.steps, args.warmup, clock)}
            if name != "adamw" and n <= args.max_looped_layers:
                looped = build(name, n, args.rank, device, foreach=False)
                row["looped_ms"] = time_steps(looped, device, args.steps, args.warmup, clock)
            rows.append(row)
            print(f"{name:10s} layers={n:4d}: {row}", flush=True)
        out["layers"][name] = rows
        rows = []
        for r in ranks:
            ms = time_steps(build(name, args.layers_for_rank, r, device), device, args.steps, args.warmup, clock)
            rows.append({"rank": r, "ms": ms})
            print(f"{name:10s} r={r:3d}: {ms:.2f} ms", flush=True)
        out["rank"][name] = rows
    return out


def plot(res: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), dpi=80)
    for i, (name, rows) in enumerate(res["layers"].items()):
        color = f"C{i}"
        n = [r["layers"] for r in rows]
        axes[0].loglog(n, [r["ms"] for r in rows], "o-", color=color, label=name)
        axes[1].loglog(n, [r["ms"] / r["layers"] for r in rows], "o-", color=color, label=name)
        lo = [r for r in rows if "looped_ms" in r]
        if lo:
            axes[1].loglog(
                [r["layers"] for r in lo],
                [r["looped_ms"] / r["layers"] for r in lo],
                "x--",
                color=color,
                alpha=0.6,
                label=f"{name} (foreach=False)",
            )
    axes[0].set(xlabel="LoRA layers (384×384)", ylabel="step time [ms]", title="step time")
    axes[1].set(xlabel="LoRA layers (384×384)", ylabel="time per layer [ms]", title="per layer")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xticks(n, [str(v) for v in n])
        ax.minorticks_off()
    fig.suptitle(f"optimizer step, r = {res['rank_for_layers']} ({res['clock']} time, {res['device']})")
    fig.tight_layout()
    fig.savefig(out / "scaling_layers.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=80)
    for i, (name, rows) in enumerate(res["rank"].items()):
        ranks = [r["rank"] for r in rows]
        ax.loglog(ranks, [r["ms"] for r in rows], "o-", color=f"C{i}", label=name)
    ax.set_xticks(ranks, [str(v) for v in ranks])
    ax.minorticks_off()
    ax.set(
        xlabel="rank r",
        ylabel="step time [ms]",
        title=f"{res['layers_for_rank']} layers of 384×384 ({res['clock']} time)",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scaling_rank.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizers", nargs="*", default=list(OPTIMIZERS))
    p.add_argument("--rank", type=int, default=8, help="rank of the layer sweep")
    p.add_argument("--layers-for-rank", type=int, default=16, help="layers of the rank sweep")
    p.add_argument("--max-looped-layers", type=int, default=64, help="largest foreach=False run")
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="drop the largest layer count and rank")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    p.add_argument("--plot-only", action="store_true", help="redraw the PNGs from scaling.json")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads((args.out / "scaling.json").read_text()), args.out)
        return 0
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    res = sweep(args)
    (args.out / "scaling.json").write_text(json.dumps(res, indent=1))
    plot(res, args.out)
    print(f"wrote {args.out}/scaling.json, scaling_layers.png, scaling_rank.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
