"""Optimizer-step cost on a GPU: 224 LoRA pairs shaped like LLaMA-7B's linears vs fused AdamW.

Used by ``benchmarks/gpu_check.sh``. Three parts, each written as soon as it is done:

1. ``solvers``: the batched ``r x r`` float64 work of one step for 224 pairs — SVD and
   ``eigh`` (cuSOLVER), both as a round trip through the CPU, and the SVD-free sign iterations of
   :func:`geolora.linalg.lyapunov_sequence` (``newton``, ``schulz``) for the balanced lift's
   Lyapunov equation — at r = 8 … 64 (cores with cond(W) = 1e2). This is the measurement behind
   :data:`geolora.manifolds.metrics.ACCELERATOR_SOLVER` and
   :data:`geolora.linalg.HOST_DECOMPOSITION_ABOVE`.
2. ``steps``: the optimizer step, ratio to fused ``torch.optim.AdamW`` timed in the same
   process (:func:`geolora.bench.perf.bench_optimizer_step`). Shapes
   :data:`geolora.bench.perf.LLAMA7B_SHAPES` (q, k, v, o 4096×4096 ×128; gate/up 11008×4096
   ×64; down 4096×11008 ×32). Factored optimizers on all 224 pairs; the dense ones (AdamS,
   AdamS-low-memory, Lifted(Adam): ``m x n`` state) on every 8th pair (28 pairs), reported
   separately. At r > 32 three lifted optimizers are also timed with the other core solvers
   (``lracs[svd]``, ``lracs[schulz]``, ...); the plain name is the default (``auto``).
3. ``gpu_perf.txt``: both tables; with ``--profile NAME ...`` also ``gpu_profile.txt``
   (``torch.profiler`` top operators of a step at r = 8, wall vs CPU time per step).

``--device cpu --shapes minilm`` runs the same code on the CPU (a dry run of the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from geolora import linalg
from geolora.bench.perf import LLAMA7B_SHAPES, MINILM_SHAPES, bench_optimizer_step, sync_device
from geolora.linalg import apply_lyapunov_sequence, lyapunov_sequence
from geolora.manifolds.metrics import use_core_solver

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
ALL, DENSE_SET = "all pairs", "1/8 of pairs"  # the pair sets of the table
#: Optimizers built on :class:`~geolora.manifolds.metrics.FrameCore` timed with each solver.
LIFTED_COMPARED = ("lracs", "lifted_sgd", "adams")
#: Optimizers whose r > 32 step is dominated by the host route of small decompositions.
HOST_ROUTED = ("lora_rite", "loram_fr", "loram_br")
SHAPES = {"llama7b": LLAMA7B_SHAPES, "minilm": MINILM_SHAPES}


def _time(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    sync_device(device)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync_device(device)
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def _routes(W: torch.Tensor, S: torch.Tensor, device: torch.device, threads: int) -> dict:
    """The ``r x r`` routes timed by :func:`bench_solvers` for cores ``W``, right-hand sides ``S``
    (``*_via_cpu_threads``: the host route split over ``threads`` workers, :func:`linalg.host_map`)."""
    A, C = W @ W.mT, S @ W.mT
    seq = lyapunov_sequence(A, "newton")

    def solve(method: str) -> torch.Tensor:
        return apply_lyapunov_sequence(lyapunov_sequence(A, method), C)

    def threaded(fn, a: torch.Tensor) -> list[torch.Tensor]:
        with linalg.use_host_threads(threads):
            return [t.to(device) for t in linalg.host_map(fn, a.cpu())]

    return {
        "svd": lambda: torch.linalg.svd(W),
        "eigh": lambda: torch.linalg.eigh(A),
        "svd_via_cpu": lambda: [t.to(device) for t in torch.linalg.svd(W.cpu())],
        "eigh_via_cpu": lambda: [t.to(device) for t in torch.linalg.eigh(A.cpu())],
        "svd_via_cpu_threads": lambda: threaded(torch.linalg.svd, W),
        "eigh_via_cpu_threads": lambda: threaded(torch.linalg.eigh, A),
        "newton": lambda: solve("newton"),
        "newton_2nd_rhs": lambda: apply_lyapunov_sequence(seq, C),
        "schulz": lambda: solve("schulz"),
    }


def bench_solvers(device: torch.device, ranks: list[int], batch: int, threads: int) -> list[dict]:
    """Median ms of each ``r x r`` route for ``batch`` cores ``W`` (float64, cond 1e2)."""
    rows = []
    g = torch.Generator(device=device).manual_seed(0)
    for r in ranks:
        kw = {"dtype": torch.float64, "device": device, "generator": g}
        p = torch.linalg.qr(torch.randn(batch, r, r, **kw))[0]
        q = torch.linalg.qr(torch.randn(batch, r, r, **kw))[0]
        s = torch.logspace(0, -2, r, dtype=torch.float64, device=device)
        W = (p * s) @ q.mT
        row: dict = {"rank": r, "batch": batch, "threads": threads}
        for name, fn in _routes(W, torch.randn(batch, r, r, **kw), device, threads).items():
            row[name] = _time(fn, device)
        A = W @ W.mT
        row["newton_iters"] = len(lyapunov_sequence(A, "newton").steps)
        row["schulz_iters"] = len(lyapunov_sequence(A, "schulz").steps)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_steps(args, device: torch.device, t0: float) -> list[dict]:
    shapes = SHAPES[args.shapes]
    dense_shapes = tuple((m, n, max(1, c // 8)) for m, n, c in shapes)
    rows: list[dict] = []
    for r in args.ranks:
        plan = []
        if r > 32 and device.type != "cpu" and args.compare_solvers:  # first (budget)
            for solver in ("svd", "schulz"):  # "newton" is the default (auto) below
                for n in LIFTED_COMPARED:
                    dense = n in DENSE
                    plan.append(
                        (n, dense_shapes if dense else shapes, DENSE_SET if dense else ALL, solver)
                    )
        k = args.host_threads
        plan = [(*row, k) for row in plan]
        plan += [(n, shapes, ALL, "auto", k) for n in FACTORED]
        plan += [(n, dense_shapes, DENSE_SET, "auto", k) for n in DENSE]
        if r > 32 and device.type != "cpu" and k > 1:  # the host route as one batched call
            plan += [(n, shapes, ALL, "auto", 1) for n in HOST_ROUTED]
        for name, sh, label, solver, threads in plan:
            tag = name if solver == "auto" else f"{name}[{solver}]"
            tag = tag if threads == k else f"{tag}[host x{threads}]"
            if time.time() - t0 > args.budget_s:
                print(f"budget reached, skipping {tag} r={r}", flush=True)
                continue
            try:
                with use_core_solver(solver), linalg.use_host_threads(threads):
                    res = bench_optimizer_step(
                        [name], [r], sh, steps=args.steps, warmup=args.warmup, device=device
                    )[0].to_dict()
                res.update(optimizer=tag, set=label)
            except torch.cuda.OutOfMemoryError as exc:
                res = {"optimizer": tag, "rank": r, "set": label, "error": f"OOM: {exc}"[:200]}
            if device.type == "cuda":
                torch.cuda.empty_cache()
            rows.append(res)
            print(json.dumps(res), flush=True)
    return rows


def profile_steps(names: list[str], rank: int, shapes, device: torch.device, top: int) -> str:
    """``torch.profiler`` table of 3 steps of each optimizer (after 3 warm-up steps): the
    operators with the largest device (or, on CPU, self CPU) time, plus the step's wall time
    and CPU time — on a GPU their gap shows how much of the step is host-side overhead."""
    from torch.profiler import ProfilerActivity, profile

    from geolora.bench.perf import make_pairs, optimizer_factories

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = []
    for name in names:
        opt = optimizer_factories([name])[name](make_pairs(shapes, rank, device=device), 1e-4)
        for _ in range(3):
            opt.step()
        sync_device(device)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(3):
            opt.step()
        sync_device(device)
        wall, cpu = (time.perf_counter() - t0) / 3e-3, (time.process_time() - c0) / 3e-3
        with profile(activities=acts) as prof:
            for _ in range(3):
                opt.step()
            sync_device(device)
        out.append(f"### {name}, r = {rank}: {wall:.2f} ms wall, {cpu:.2f} ms CPU per step\n")
        keys = ["self_cuda_time_total"] if device.type == "cuda" else []
        for key in [*keys, "self_cpu_time_total"]:  # device time, then host time per operator
            table = prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=48)
            out.append(f"sorted by {key}:\n```\n" + table + "\n```\n")
        del opt
    return "\n".join(out)


def write_report(out: Path, env: dict, solvers: list[dict], steps: list[dict]) -> None:
    (out / "gpu_perf.json").write_text(
        json.dumps({**env, "solvers": solvers, "rows": steps}, indent=1)
    )
    lines = [f"# Optimizer step on {env['device']} (torch {env['torch']}, CUDA {env['cuda']})", ""]
    if solvers:
        keys = ["svd", "eigh", "svd_via_cpu", "eigh_via_cpu", "svd_via_cpu_threads"]
        keys += ["eigh_via_cpu_threads", "newton", "newton_2nd_rhs", "schulz"]
        lines += [
            f"## Batched r x r float64 work ({solvers[0]['batch']} cores, cond(W) = 1e2), ms "
            f"(threads: {solvers[0]['threads']} host workers)",
            "",
            "| r | " + " | ".join(keys) + " | newton iters | schulz iters |",
            "|---:|" + "---:|" * (len(keys) + 2),
        ]
        for row in solvers:
            vals = " | ".join(f"{row[k]:.2f}" for k in keys)
            lines.append(
                f"| {row['rank']} | {vals} | {row['newton_iters']} | {row['schulz_iters']} |"
            )
        lines.append("")
    lines += [
        "## Optimizer step vs fused AdamW (same process)",
        "",
        "| optimizer | set | r | step ms | fused AdamW ms | ratio | state MiB | AdamW state MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in steps:
        if "error" in row:
            lines.append(
                f"| {row['optimizer']} | {row['set']} | {row['rank']} | {row['error']} |||||"
            )
            continue
        lines.append(
            f"| {row['optimizer']} | {row['set']} | {row['rank']} | {row['step_ms']:.2f} | "
            f"{row['adamw_ms']:.2f} | {row['ratio']:.2f} | {row['state_mib']:.0f} | "
            f"{row['adamw_state_mib']:.0f} |"
        )
    (out / "gpu_perf.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[8, 16, 64])
    p.add_argument("--solver-ranks", type=int, nargs="*", default=[8, 16, 32, 64])
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=360.0, help="stop starting new runs after")
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--no-compare-solvers",
        dest="compare_solvers",
        action="store_false",
        help="skip timing the lifted optimizers with the non-default core solvers at r > 32",
    )
    p.add_argument("--shapes", choices=sorted(SHAPES), default="llama7b")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks/gpu"))
    p.add_argument("--profile", nargs="*", default=[], help="optimizers to profile (r = 8)")
    p.add_argument("--profile-top", type=int, default=12)
    p.add_argument(
        "--host-threads",
        type=int,
        default=linalg.HOST_THREADS,
        help="workers of the host route (linalg.host_map): the solver table's threaded columns "
        "and every optimizer row; at r > 32 three optimizers are also timed with 1 worker",
    )
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_perf.py --device cuda needs a CUDA device")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "shapes": args.shapes,
    }
    npairs = sum(c for _, _, c in SHAPES[args.shapes])
    if args.profile:
        text = profile_steps(args.profile, 8, SHAPES[args.shapes], device, args.profile_top)
        (args.out / "gpu_profile.txt").write_text(text)
        print(text, flush=True)
    solvers = bench_solvers(device, args.solver_ranks, npairs, args.host_threads)
    write_report(args.out, env, solvers, [])
    steps = bench_steps(args, device, t0)
    write_report(args.out, env, solvers, steps)
    print((args.out / "gpu_perf.txt").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
