"""The ``geolora`` command: ``geolora bench`` (compare optimizers) and ``geolora check``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _top_layers(s: str) -> int | None:
    if s == "all":
        return None
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'all', got {s!r}")
    return v


BENCH_EPILOG = """protocol: per optimizer, the lr is tuned on a log grid on the validation metric
(or read from the shipped tuning run; --tune redoes it), then --seeds runs at the chosen lr give
the test metric's mean and 95% t-interval and the paired difference to AdamW. Every run is
recorded in an Optuna study as it ends: rerunning the same command resumes. See
docs/benchmarks.md and docs/bench_custom.md."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="geolora", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser(
        "bench",
        help="compare optimizers on a task: tuned lrs, seeds, intervals (default task: plays)",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = b.add_argument_group("task")
    g.add_argument(
        "--task",
        default="plays",
        help="minilm (genre of unseen plays, LoRA on every linear layer), plays (which of 37 "
        "plays, LoRA on the top layers), sensing, teacher (synthetic), or module:Class / "
        "file.py:Class for your own Task (default: plays)",
    )
    g.add_argument("--model", type=Path, default=None, help="local Hugging Face encoder folder")
    g.add_argument("--data", type=Path, default=None, help="CSV/TSV/JSONL file of texts and labels")
    g.add_argument("--text-column", default="text", help="column of the texts (default: text)")
    g.add_argument("--label-column", default="label",
                   help="column of the labels: class names or integers (default: label)")
    g.add_argument("--split-column", default=None,
                   help="column with train/val/test (default: a random split, --data-seed)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="random split (default 0.1)")
    g.add_argument("--test-fraction", type=float, default=0.1, help="random split (default 0.1)")
    g.add_argument("--data-seed", type=int, default=0, help="seed of the random split / subsets")
    g.add_argument("--top-layers", type=_top_layers, default=argparse.SUPPRESS, metavar="K|all",
                   help="adapt the top K encoder layers (cache the rest) or all of them")
    o = b.add_argument_group("protocol")
    o.add_argument("--optimizers", type=_csv, default=None,
                   help="comma-separated registry names (default: adamw,loraplus,lora_rite,adams,loram_br)")
    o.add_argument("--full", action="store_true", help="every registered optimizer")
    o.add_argument("--seeds", type=int, default=3, help="seeds at the chosen lr (default 3)")
    o.add_argument("--steps", type=int, default=None, help="training steps (default: the task's)")
    o.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    o.add_argument("--tune", action="store_true",
                   help="tune every optimizer's lr even where a shipped tuning exists")
    o.add_argument("--lr-grid", type=int, default=5, metavar="N",
                   help="lr grid points per optimizer (the tuning budget, same for all; default 5)")
    o.add_argument("--lr-step", type=float, default=0.5, metavar="DECADES",
                   help="grid spacing in decades (default 0.5: x0.1 ... x10 with 5 points)")
    o.add_argument("--tune-seeds", type=int, default=1, help="seeds per grid point (default 1)")
    o.add_argument("--init-scales", type=_floats, default=None, metavar="K1,K2,...",
                   help="also start from (10^k B, 10^-k A) with a nonzero init; write "
                   "--init-scales=-2,0,2 (with '=': the value starts with '-')")
    o.add_argument("--init-seeds", type=int, default=1, help="seeds per init scale (default 1)")
    o.add_argument("--robust-tol", type=float, default=0.1,
                   help="lr robustness: relative tolerance to the best validation metric")
    o.add_argument("--quick", action="store_true", help="short runs (about 2 minutes in all)")
    r = b.add_argument_group("sweep")
    r.add_argument("--out", type=Path, default=Path("results/bench"),
                   help="results.json, results.csv, plots and study.db (default: results/bench)")
    r.add_argument("--storage", default=None,
                   help="Optuna storage URL shared by workers (default: sqlite:///OUT/study.db)")
    r.add_argument("--study", default="geolora-bench", help="Optuna study name")
    r.add_argument("--workers", type=int, default=None,
                   help="local worker processes (default: 2 when the machine has 2+ cores)")
    r.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    r.add_argument("--report-only", action="store_true",
                   help="run nothing: write results and plots from the runs already in the study")
    x = b.add_argument_group("other modes")
    x.add_argument("--perf", action="store_true", help="time the optimizer step vs AdamW")
    x.add_argument("--full-step", action="store_true",
                   help="with --perf: also time full MiniLM training steps (forward + backward + step)")
    x.add_argument("--grid", action="store_true", help="preconditioner x metric/manifold grid")
    x.add_argument("--list", action="store_true", help="list the registered optimizers and exit")
    c = sub.add_parser("check", help="numerical checks of every manifold (slopes, residuals)")
    c.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    return cmd_bench(args, argv)


# --- bench ------------------------------------------------------------------------------------
def task_ref(args: argparse.Namespace):
    """The :class:`~geolora.bench.protocol.TaskRef` of the command line."""
    from geolora.bench.protocol import TaskRef

    top: Any = getattr(args, "top_layers", "default")
    if args.data is not None:
        opts: dict[str, Any] = {
            "data": str(args.data),
            "model": None if args.model is None else str(args.model),
            "text_column": args.text_column,
            "label_column": args.label_column,
            "split_column": args.split_column,
            "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction,
            "data_seed": args.data_seed,
        }
        if top != "default":
            opts["top_layers"] = top
        return TaskRef("data", args.quick, opts)
    if args.model is not None:
        raise ValueError("--model needs --data FILE (the texts and labels to fine-tune on)")
    opts = {}
    if args.task in ("minilm", "plays"):
        if top != "default":
            opts["top_layers"] = top
        opts["data_seed"] = args.data_seed
    return TaskRef(args.task, args.quick, opts)


def cmd_bench(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    import signal

    import torch
    from rich.console import Console

    import geolora.bench.catalog as catalog
    from geolora.bench.registry import REGISTRY

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

    from geolora.bench.protocol import compare, full_optimizers
    from geolora.bench.sweep import Interrupted, install_signal_handlers

    try:
        if args.grid:
            names = args.optimizers or list(catalog.GRID)
        elif args.full:
            names = full_optimizers()
        else:
            names = args.optimizers
        for n in names or []:
            REGISTRY.get(n)  # a typo fails here, listing the known names
        ref = task_ref(args)
        ref.build()  # bad data, model or task: a clear error before any training
    except (ValueError, FileNotFoundError, TypeError) as err:
        console.print(f"[red]geolora bench: error:[/] {err}")
        return 2
    workers = args.workers or (2 if (os.cpu_count() or 1) >= 2 else 1)
    previous = install_signal_handlers()
    command = "geolora " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        compare(
            ref,
            optimizers=names,
            out=args.out,
            seeds=args.seeds,
            steps=args.steps,
            rank=args.rank,
            quick=args.quick,
            tune=args.tune,
            grid_points=args.lr_grid,
            grid_step=args.lr_step,
            tune_seeds=args.tune_seeds,
            init_scales=args.init_scales or (),
            init_seeds=args.init_seeds,
            robust_tol=args.robust_tol,
            storage=args.storage,
            study=args.study,
            workers=workers,
            threads=args.threads,
            console=console,
            command=command,
            report_only=args.report_only,
        )
    except Interrupted:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except (ValueError, FileNotFoundError) as err:
        console.print(f"[red]geolora bench: error:[/] {err}")
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def cmd_perf(args: argparse.Namespace, console) -> int:
    from rich.table import Table

    import geolora.bench.catalog as catalog
    from geolora.bench import perf

    names = args.optimizers or [n for n in catalog.DEFAULT_OPTIMIZERS if n != "adamw"] + [
        "adams_lm",
        "scaled_gd",
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
