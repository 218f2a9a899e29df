"""Optimizer-step cost on a GPU: 224 LoRA pairs shaped like LLaMA-7B's linears vs fused AdamW.

Used by ``benchmarks/gpu_check.sh``. Shapes: :data:`geolora.bench.perf.LLAMA7B_SHAPES` (q, k, v, o
4096×4096 ×128; gate/up 11008×4096 ×64; down 4096×11008 ×32). The factored optimizers run on all
224 pairs; the dense ones (AdamS, AdamS-low-memory, Lifted(Adam): ``m x n`` state, 26 GB per
dense tensor at these shapes) on every 8th pair only (28 pairs), reported separately.
Writes ``gpu_perf.json`` and ``gpu_perf.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from geolora.bench.perf import LLAMA7B_SHAPES, bench_optimizer_step

FACTORED = (
    "lora_rite",
    "lracs",
    "scaledgd",
    "lifted_sgd",
    "loram_fr",
    "loram_br",
    "rpadamw",
    "loraplus",
    "stiefel_lora",
)
DENSE = ("adams_lm", "adams", "lifted_adam")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 64])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new runs after")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_perf.py needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dense_shapes = tuple((m, n, c // 8) for m, n, c in LLAMA7B_SHAPES)
    rows: list[dict] = []
    for r in args.ranks:
        for names, shapes, label in ((FACTORED, LLAMA7B_SHAPES, "224 pairs"), (DENSE, dense_shapes, "28 pairs")):
            for name in names:
                if time.time() - t0 > args.budget_s:
                    print(f"budget reached, skipping {name} r={r}", flush=True)
                    continue
                try:
                    res = bench_optimizer_step(
                        [name], [r], shapes, steps=args.steps, warmup=args.warmup, device="cuda"
                    )[0].to_dict()
                    res["set"] = label
                except torch.cuda.OutOfMemoryError as exc:
                    res = {"optimizer": name, "rank": r, "set": label, "error": f"OOM: {exc}"[:200]}
                torch.cuda.empty_cache()
                rows.append(res)
                print(json.dumps(res), flush=True)
    env = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rows": rows,
    }
    (args.out / "gpu_perf.json").write_text(json.dumps(env, indent=1))
    lines = [
        f"# Optimizer step on {env['device']} (torch {env['torch']}, CUDA {env['cuda']})",
        "",
        "| optimizer | set | r | step ms | fused AdamW ms | ratio | state MiB | AdamW state MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['optimizer']} | {row['set']} | {row['rank']} | {row['error']} |||||")
            continue
        lines.append(
            f"| {row['optimizer']} | {row['set']} | {row['rank']} | {row['step_ms']:.2f} | "
            f"{row['adamw_ms']:.2f} | {row['ratio']:.2f} | {row['state_mib']:.0f} | "
            f"{row['adamw_state_mib']:.0f} |"
        )
    (args.out / "gpu_perf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
