"""Tables, files and plots of ``geolora bench`` results."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CSV_FIELDS = (
    "task",
    "optimizer",
    "lr",
    "seed",
    "rank",
    "factor_scale",
    "steps",
    "final_train_loss",
    "primary_metric",
    "primary_value",
    "ms_per_step",
    "ms_optimizer_step",
    "step_ratio_vs_adamw",
    "state_mib",
    "wall_s",
    "diverged",
)


def summarize(results: Sequence[dict[str, Any]], primary: str) -> list[dict[str, Any]]:
    """One row per optimizer (at its run lr): means over seeds, ratios to AdamW's step time."""
    by_opt: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        by_opt[r["optimizer"]].append(r)
    adamw_ms = None
    if "adamw" in by_opt:
        adamw_ms = statistics.mean(r["ms_optimizer_step"] for r in by_opt["adamw"])
    rows = []
    for name, rs in by_opt.items():
        ok = [r for r in rs if not r["diverged"]]
        metric_vals = [r["metrics"].get(primary, math.nan) for r in ok]
        row = {
            "optimizer": name,
            "lr": rs[0]["lr"],
            "runs": len(rs),
            "diverged": len(rs) - len(ok),
            "final_train_loss": _mean([r["metrics"].get("final_train_loss", math.nan) for r in ok]),
            primary: _mean(metric_vals),
            "ms_per_step": _mean([r["ms_per_step"] for r in rs]),
            "ms_optimizer_step": _mean([r["ms_optimizer_step"] for r in rs]),
            "state_mib": _mean([r["state_mib"] for r in rs]),
        }
        for key in ("test_acc", "test_macro_f1", "accuracy", "macro_f1"):
            vals = [r["metrics"][key] for r in ok if key in r["metrics"]]
            if vals:
                row[key] = _mean(vals)
        row["step_ratio_vs_adamw"] = row["ms_optimizer_step"] / adamw_ms if adamw_ms else math.nan
        rows.append(row)
    return rows


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.mean(xs) if xs else math.nan


HEADERS = {
    "optimizer": "optimizer",
    "lr": "lr",
    "final_train_loss": "train loss",
    "accuracy": "test acc",
    "macro_f1": "macro-F1",
    "rel_error": "rel. error",
    "test_mse": "test MSE",
    "excess_mse": "excess MSE",
    "ms_per_step": "ms/step",
    "ms_optimizer_step": "opt ms/step",
    "step_ratio_vs_adamw": "opt step ×AdamW",
    "state_mib": "state MiB",
    "diverged": "diverged",
}


def print_table(rows: Sequence[dict[str, Any]], primary: str, title: str, console=None) -> None:
    """A rich table of the summary rows (columns: metrics present in the rows, then costs)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    metrics = [primary] + [
        k for k in ("accuracy", "macro_f1") if k != primary and any(k in r for r in rows)
    ]
    cols = ["optimizer", "lr", "final_train_loss", *metrics]
    cols += ["ms_per_step", "ms_optimizer_step", "step_ratio_vs_adamw", "state_mib", "diverged"]
    table = Table(title=title)
    for c in cols:
        table.add_column(HEADERS.get(c, c), justify="left" if c == "optimizer" else "right")
    for r in rows:
        table.add_row(*[_fmt(r.get(c)) for c in cols])
    console.print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def save_results(out: Path, results: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``results.json`` (every run, with loss curves, plus the summary) and ``results.csv``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps({"summary": summary, "runs": list(results)}, indent=1)
    )
    adamw: dict[tuple, float] = {}
    for r in results:
        if r["optimizer"] == "adamw":
            adamw[(r["task"], r["seed"])] = r["ms_optimizer_step"]
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            prim = summary.get("primary_metric", "")
            base = adamw.get((r["task"], r["seed"]))
            w.writerow(
                {
                    "task": r["task"],
                    "optimizer": r["optimizer"],
                    "lr": r["lr"],
                    "seed": r["seed"],
                    "rank": r["rank"],
                    "factor_scale": r["factor_scale"],
                    "steps": r["steps"],
                    "final_train_loss": r["metrics"].get("final_train_loss"),
                    "primary_metric": prim,
                    "primary_value": r["metrics"].get(prim),
                    "ms_per_step": r["ms_per_step"],
                    "ms_optimizer_step": r["ms_optimizer_step"],
                    "step_ratio_vs_adamw": (r["ms_optimizer_step"] / base) if base else "",
                    "state_mib": r["state_mib"],
                    "wall_s": r["wall_s"],
                    "diverged": r["diverged"],
                }
            )


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    beta = 1 - 1 / max(k, 1)
    for i, x in enumerate(xs):
        if not math.isfinite(x):
            break
        acc = beta * acc + (1 - beta) * x
        out.append(acc / (1 - beta ** (i + 1)))
    return out


def plot_losses(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per optimizer (EMA-smoothed, seed 0, log scale); with several learning
    rates per optimizer, the run with the lowest final training loss is drawn."""
    import math as _m

    best: dict[str, dict[str, Any]] = {}
    for r in results:
        if r["factor_scale"] != 0 or r["seed"] != 0:
            continue
        loss = r["metrics"].get("final_train_loss", _m.inf)
        loss = loss if (loss is not None and _m.isfinite(loss) and not r["diverged"]) else _m.inf
        cur = best.get(r["optimizer"])
        if cur is None or loss < cur[0]:
            best[r["optimizer"]] = (loss, r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (_, r) in best.items():
        ys = _smooth(r["losses"], max(1, len(r["losses"]) // 20))
        ax.plot(range(1, len(ys) + 1), ys, label=f"{name} (lr {r['lr']:.0e})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (EMA-smoothed)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_bars(rows: Sequence[dict[str, Any]], key: str, path: Path, title: str) -> None:
    """Bar chart of a summary metric per optimizer (the best bar highlighted)."""
    names = [r["optimizer"] for r in rows]
    vals = [r.get(key, math.nan) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    finite = [v for v in vals if math.isfinite(v)]
    best = max(finite) if finite else None
    colors = ["tab:green" if v == best else "tab:blue" for v in vals]
    ax.bar(names, [0 if not math.isfinite(v) else v for v in vals], color=colors)
    for i, v in enumerate(vals):
        if math.isfinite(v):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    if finite:
        lo = min(finite)
        ax.set_ylim(
            max(0.0, lo - 0.15 * (best - lo + 1e-3) - 0.05), best + 0.05 * (best - lo + 1e-2)
        )
    ax.set_ylabel(key)
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sensitivity(
    results: Sequence[dict[str, Any]], key: str, path: Path, title: str
) -> None:
    """Final metric vs learning rate per optimizer."""
    by: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        v = r["metrics"].get(key, math.nan) if not r["diverged"] else math.nan
        by[r["optimizer"]][r["lr"]].append(v)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, d in by.items():
        lrs = sorted(d)
        ax.plot(lrs, [_mean(d[lr]) for lr in lrs], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(key + " (diverged runs omitted)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_invariance(results: Sequence[dict[str, Any]], key: str, path: Path, title: str) -> None:
    """Final metric vs factor scaling 10^k: flat lines = invariant optimizers."""
    by: dict[str, dict[float, float]] = defaultdict(dict)
    for r in results:
        by[r["optimizer"]][r["factor_scale"]] = (
            r["metrics"].get(key, math.nan) if not r["diverged"] else math.nan
        )
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, d in by.items():
        ks = sorted(d)
        ax.plot(ks, [d[k] for k in ks], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("factor scaling k: start from (10^k B, 10^-k A) — the same adapter B A")
    ax.set_ylabel(key + " after training")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
