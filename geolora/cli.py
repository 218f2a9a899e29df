"""The ``geolora`` command: ``geolora bench`` (compare optimizers) and ``geolora check``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TASKS = ("minilm", "sensing", "teacher")
INVARIANCE_OPTIMIZERS = ("adamw", "loraplus", "adams", "lracs", "lora_rite", "loram_fr", "loram_br")
INVARIANCE_SCALES = (-3, -2, -1, 0, 1, 2, 3)


def make_task(name: str, quick: bool):
    """The bench task called ``name`` (``minilm`` | ``sensing`` | ``teacher``)."""
    from geolora.bench.tasks import SensingTask, TeacherStudentTask

    if name == "minilm":
        from geolora.bench.minilm import MiniLMGenreTask, default_cache_dir

        # the frozen lower layers' outputs are cached on disk, so a second bench run skips them
        task = MiniLMGenreTask.quick() if quick else MiniLMGenreTask()
        task.cache_dir = default_cache_dir()
        return task
    if name == "sensing":
        return SensingTask()
    if name == "teacher":
        return TeacherStudentTask()
    raise SystemExit(f"geolora bench: unknown task {name!r}; choose from {', '.join(TASKS)}")


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geolora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="compare optimizers on a task (default: MiniLM genre task)")
    b.add_argument("--task", default="minilm", choices=TASKS)
    b.add_argument("--optimizers", type=_csv, default=None, help="comma-separated registry names")
    b.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1)")
    b.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    b.add_argument(
        "--lr-sweep",
        type=_floats,
        default=None,
        metavar="F1,F2,...",
        help="multiply each optimizer's default lr by these factors",
    )
    b.add_argument("--rank", type=int, default=8)
    b.add_argument("--out", type=Path, default=Path("results/bench"))
    b.add_argument("--quick", action="store_true", help="short runs (~2 minutes in all)")
    b.add_argument("--perf", action="store_true", help="time the optimizer step vs AdamW")
    b.add_argument(
        "--full-step",
        action="store_true",
        help="with --perf: also time full MiniLM training steps (forward + backward + step)",
    )
    b.add_argument("--grid", action="store_true", help="preconditioner x metric/manifold grid")
    b.add_argument(
        "--no-invariance",
        action="store_true",
        help="skip the factor-scaling invariance sweep on the sensing task",
    )
    b.add_argument("--list", action="store_true", help="list the registered optimizers and exit")
    c = sub.add_parser("check", help="numerical checks of every manifold (slopes, residuals)")
    c.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    return cmd_bench(args)


# --- bench ------------------------------------------------------------------------------------
def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
    )


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    import geolora.bench.catalog as catalog
    from geolora.bench import report
    from geolora.bench.registry import REGISTRY
    from geolora.bench.runner import run

    console = Console(width=max(Console().width, 130))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.list:
        for name in REGISTRY.names():
            s = REGISTRY.get(name)
            console.print(
                f"{name:18s} lr={s.default_lr:<8g} invariant={s.invariant!s:5s} {s.description}"
            )
        return 0
    if args.perf:
        return cmd_perf(args, console)

    if args.grid:
        names = args.optimizers or list(catalog.GRID)
    else:
        names = args.optimizers or list(catalog.DEFAULT_OPTIMIZERS)
    for n in names:
        REGISTRY.get(n)  # fail early on a typo, listing the known names
    task = make_task(args.task, args.quick)
    steps = args.steps or (task.quick_steps if args.quick else task.default_steps)
    factors = args.lr_sweep or [1.0]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    console.print(
        f"[bold]geolora bench[/]: task={task.name}, steps={steps}, rank={args.rank}, "
        f"seeds={args.seeds}, optimizers={', '.join(names)}"
    )
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    with _progress() as progress:
        for seed in range(args.seeds):
            for name in names:
                for f in factors:
                    lr = _task_lr(task, name) * f
                    res = run(
                        task, name, lr=lr, steps=steps, seed=seed, rank=args.rank, progress=progress
                    )
                    results.append(res.to_dict())
    primary = task.primary_metric
    rows = report.summarize(
        [r for r in results if r["lr"] == _task_lr(task, r["optimizer"])] or results, primary
    )
    title = f"{task.name}: {steps} steps, r={args.rank}, {args.seeds} seed(s)"
    report.print_table(rows, primary, title, console)
    summary = {
        "task": task.name,
        "steps": steps,
        "rank": args.rank,
        "seeds": args.seeds,
        "primary_metric": primary,
        "higher_is_better": task.higher_is_better,
        "rows": rows,
        "command": "geolora " + " ".join(sys.argv[1:]),
    }
    report.plot_losses(results, out / "loss_curves.png", f"{title} — training loss")
    key = "accuracy" if "accuracy" in rows[0] else primary
    if task.higher_is_better or key == "accuracy":
        report.plot_metric_bars(
            rows, key, out / "accuracy.png", f"{task.name}: test {key} (higher is better)"
        )
    else:
        report.plot_metric_bars(rows, primary, out / "metric.png", f"{task.name}: {primary}")
    if args.lr_sweep:
        report.plot_lr_sensitivity(
            results, primary, out / "lr_sensitivity.png", f"{task.name}: {primary} vs learning rate"
        )
    if not args.no_invariance:
        inv = invariance_sweep(args, progress_factory=_progress)
        summary["invariance"] = inv["table"]
        results.extend(inv["runs"])
        report.plot_invariance(
            inv["runs"],
            "rel_error",
            out / "invariance.png",
            "Invariance: sensing task from (10^k B, 10^-k A)",
        )
        _print_invariance(inv["table"], console)
    report.save_results(out, results, summary)
    best = _best(rows, primary, task.higher_is_better)
    console.print(
        f"best {primary}: [bold]{best}[/] — wrote {out}/results.json, results.csv and plots "
        f"in {time.perf_counter() - t0:.0f} s"
    )
    return 0


def _task_lr(task, name: str) -> float:
    from geolora.bench.registry import REGISTRY

    return float(task.lr_overrides.get(name, REGISTRY.get(name).default_lr))


def _best(rows, key, higher) -> str:
    import math

    ok = [r for r in rows if math.isfinite(r.get(key, math.nan))]
    if not ok:
        return "-"
    r = max(ok, key=lambda r: r[key]) if higher else min(ok, key=lambda r: r[key])
    return f"{r['optimizer']} ({r[key]:.4g})"


def invariance_sweep(args: argparse.Namespace, progress_factory) -> dict[str, Any]:
    """Final relative error on the sensing task from (10^k B, 10^-k A), k = -3..3."""
    from geolora.bench.runner import run
    from geolora.bench.tasks import SensingTask

    task = SensingTask()
    steps = task.quick_steps
    runs = []
    with progress_factory() as progress:
        for name in INVARIANCE_OPTIMIZERS:
            for k in INVARIANCE_SCALES:
                res = run(
                    task,
                    name,
                    lr=_task_lr(task, name),
                    steps=steps,
                    seed=0,
                    rank=args.rank,
                    factor_scale=float(k),
                    progress=progress,
                    # no AdamW robust start: the factors start nonzero and the sweep measures
                    # the geometric optimizer itself
                    optimizer_kwargs={} if name == "adamw" else {"robust_steps": 0},
                )
                runs.append({**res.to_dict(), "sweep": "invariance"})
    table = {}
    for name in INVARIANCE_OPTIMIZERS:
        vals = [r["metrics"].get("rel_error") for r in runs if r["optimizer"] == name]
        finite = [v for v in vals if v is not None and v == v]
        table[name] = {
            "rel_error_by_k": dict(zip(INVARIANCE_SCALES, vals)),
            "spread": (max(finite) / min(finite)) if finite and min(finite) > 0 else None,
        }
    return {"runs": runs, "table": table}


def _print_invariance(table, console) -> None:
    from rich.table import Table

    t = Table(title="Invariance: sensing rel. error after training from (10^k B, 10^-k A)")
    t.add_column("optimizer")
    for k in INVARIANCE_SCALES:
        t.add_column(f"k={k}", justify="right")
    t.add_column("max/min", justify="right")
    for name, row in table.items():
        vals = [row["rel_error_by_k"][k] for k in INVARIANCE_SCALES]
        t.add_row(
            name,
            *[f"{v:.2e}" if v == v else "diverged" for v in vals],
            f"{row['spread']:.3g}" if row["spread"] else "-",
        )
    console.print(t)


def cmd_perf(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    import geolora.bench.catalog as catalog
    from geolora.bench import perf

    names = args.optimizers or [n for n in catalog.DEFAULT_OPTIMIZERS if n != "adamw"] + [
        "adams_lm",
        "scaledgd",
        "lifted_adam",
    ]
    ranks = [args.rank] if args.rank != 8 else [8, 32]
    steps = 10 if args.quick else 20
    with console.status("timing optimizer steps") as status:
        res = perf.bench_optimizer_step(
            names, ranks, steps=steps, warmup=3, progress=lambda s: status.update(f"timing {s}")
        )
    t = Table(
        title=f"optimizer step on {res[0].pairs} MiniLM-shaped LoRA pairs (median of {steps})"
    )
    for c in ("optimizer", "r", "step ms", "AdamW ms", "ratio", "state MiB", "AdamW state MiB"):
        t.add_column(c, justify="right")
    for r in res:
        t.add_row(
            r.optimizer,
            str(r.rank),
            f"{r.step_ms:.2f}",
            f"{r.adamw_ms:.2f}",
            f"{r.ratio:.2f}",
            f"{r.state_mib:.2f}",
            f"{r.adamw_state_mib:.2f}",
        )
    console.print(t)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    import json

    (out / "perf.json").write_text(json.dumps([r.to_dict() for r in res], indent=1))
    console.print(
        f"wrote {out / 'perf.json'} (on a shared machine, OMP_WAIT_POLICY=PASSIVE gives stable "
        "multi-thread timings; ratios always compare with AdamW timed in the same process)"
    )
    if args.full_step:
        with console.status("timing training steps") as status:
            full = perf.bench_training_step(
                names,
                ranks[0],
                steps=3 if args.quick else 6,
                progress=lambda s: status.update(f"timing {s}"),
            )
        t = Table(title=f"full MiniLM training step (32 x 64 tokens), r = {ranks[0]}, median")
        for c in ("optimizer", "step ms", "AdamW ms", "ratio"):
            t.add_column(c, justify="right")
        for r in full:
            t.add_row(r.optimizer, f"{r.step_ms:.0f}", f"{r.adamw_ms:.0f}", f"{r.ratio:.3f}")
        console.print(t)
        (out / "perf_train.json").write_text(json.dumps([r.to_dict() for r in full], indent=1))
        console.print(f"wrote {out / 'perf_train.json'}")
    return 0


# --- check ------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from geolora import checks
    from geolora.manifolds import BoundedRank, Euclidean, FactorQuotient, FixedRank, Stiefel

    g = torch.Generator().manual_seed(args.seed)
    manifolds = {
        "Euclidean(6, 4)": Euclidean(6, 4),
        "Stiefel(12, 3, qr)": Stiefel(12, 3),
        "Stiefel(12, 3, polar)": Stiefel(12, 3, retraction="polar"),
        "FixedRank(10, 8, 3)": FixedRank(10, 8, 3),
        "BoundedRank(10, 8, 3)": BoundedRank(10, 8, 3),
        "FactorQuotient balanced": FactorQuotient(10, 8, 3, "balanced"),
        "FactorQuotient preconditioned": FactorQuotient(10, 8, 3, "preconditioned"),
        "FactorQuotient flat": FactorQuotient(10, 8, 3, "flat"),
    }
    t = Table(title="geolora check: log-log slopes (gradient: 2 = correct; retraction: >= 2)")
    for c in (
        "manifold",
        "gradient slope",
        "retraction slope (all / tangential)",
        "transport slope",
        "lift residuals",
    ):
        t.add_column(c, justify="right")
    ok = True
    for name, M in manifolds.items():
        x = M.random_point(generator=g)
        target = torch.randn_like(M.to_matrix(x)) if hasattr(M, "to_matrix") else None

        def f(p, M=M, target=target):
            X = M.to_matrix(p) if target is not None else p
            ref = target if target is not None else torch.ones_like(X)
            return 0.5 * ((X - ref) ** 2).sum()

        cells = []
        try:
            if isinstance(M, FixedRank):
                gr = checks.check_gradient(
                    M, f, x, egrad=lambda p, M=M, T=target: M.to_matrix(p) - T, generator=g
                )
            else:
                gr = checks.check_gradient(M, f, x, generator=g)
            cells.append(f"{gr.slope:.3f}")
            ok &= gr.slope >= 1.9 or bool(getattr(gr, "exact", False))
        except Exception as e:  # report, don't crash the table
            cells.append(f"error: {e}")
            ok = False
        try:
            rt = checks.check_retraction(M, x, generator=g)
            main = "exact" if rt.exact else f"{rt.slope:.3f}"
            tg = rt.tangential
            second = "" if tg is None else (" / exact" if tg.exact else f" / {tg.slope:.3f}")
            cells.append(main + second)
        except Exception as e:
            cells.append(f"error: {e}")
            ok = False
        try:
            tr = checks.check_transport(M, x, generator=g)
            cells.append("exact" if getattr(tr, "exact", False) else f"{tr.slope:.3f}")
        except Exception as e:
            cells.append(f"error: {e}")
            ok = False
        if isinstance(M, FactorQuotient):
            xdot = torch.randn(M.m, M.n, dtype=x.M.dtype, generator=g)
            lr_ = checks.check_lift(M, x, xdot, generator=g)
            cells.append(
                f"diff {lr_.differential_residual:.1e}, horiz {lr_.horizontal_residual:.1e}, "
                f"equiv {lr_.equivariance_residual:.1e}"
            )
        else:
            cells.append("-")
        t.add_row(name, *cells)
    Console().print(t)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
