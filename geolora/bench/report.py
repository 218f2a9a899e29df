"""Summaries, tables, files and plots of ``geolora bench`` results.

:func:`protocol_summary` turns the runs of a sweep into the rows of ``results.json`` (mean and
95 % t-interval over seeds, paired difference to AdamW, lr robustness, costs), the init-scale
table and the headline; :func:`save_results` writes ``results.json`` / ``results.csv``; the
``plot_*`` functions draw the figures of the results page.
"""

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
    "init",
    "steps",
    "final_train_loss",
    "primary_metric",
    "primary_value",
    "val_value",
    "ms_per_step",
    "ms_optimizer_step",
    "step_ratio_vs_adamw",
    "state_mib",
    "wall_s",
    "diverged",
)


def _metric(r: dict[str, Any], key: str) -> float:
    """``r["metrics"][key]`` of a finished run; NaN when diverged or missing."""
    if r.get("diverged"):
        return math.nan
    v = r.get("metrics", {}).get(key)
    return math.nan if v is None else float(v)


def protocol_summary(
    plan: Any,
    runs: Sequence[tuple[Any, dict[str, Any]]],
    *,
    robust_tol: float = 0.02,
    lr_sources: dict[str, str] | None = None,
    shipped_tables: dict[str, list[list[float]]] | None = None,
) -> dict[str, Any]:
    """Rows of the comparison, the init-scale table and the headline of one sweep.

    ``runs`` are ``(RunKey, result)`` pairs of :func:`geolora.bench.sweep.results_for`. Each
    row (one optimizer, its chosen lr, seeds ``0..seeds−1``, default init) holds: ``mean``,
    ``ci95`` (t-interval of the test primary metric over seeds), ``n_seeds``, ``val_mean``,
    ``val_ci95``, ``lr_chosen``, ``lr_source``, ``lr_grid`` (``[lr, mean val metric, diverged]``),
    ``lr_robust_decades``, ``diff_vs_adamw`` (``mean``, ``ci95``, ``n``: paired over the
    common seeds), ``diverged`` (count over all its runs), costs and ``<primary>`` (= mean).
    """
    from geolora.bench.stats import headline, lr_robust_decades, paired_difference, t_interval

    p = plan.p
    primary, higher = p.primary, p.higher_is_better
    done = {k: r for k, r in runs}
    lr_sources = lr_sources or {}
    shipped_tables = shipped_tables or {}
    main: dict[str, dict[int, dict[str, Any]]] = {}
    for opt in p.optimizers:
        lr = plan.chosen_lr(opt, done)
        main[opt] = {
            k.seed: r
            for k, r in runs
            if k.optimizer == opt and lr is not None and k.lr == lr and k.factor_scale == 0
            and k.init == "default" and k.seed < p.seeds
        }
    adamw_ms = None
    if main.get("adamw"):
        adamw_ms = _mean([r["ms_optimizer_step"] for r in main["adamw"].values()])
    adamw_vals = {s: _metric(r, primary) for s, r in main.get("adamw", {}).items()}
    rows, intervals = [], {}
    for opt in p.optimizers:
        lr = plan.chosen_lr(opt, done)
        rs = main[opt]
        vals = {s: _metric(r, primary) for s, r in sorted(rs.items())}
        iv = t_interval(list(vals.values()))
        val_iv = t_interval([_metric(r, f"val_{primary}") for r in rs.values()])
        grid = _grid_rows(plan, opt, runs) or shipped_tables.get(opt, [])
        robust = (
            lr_robust_decades([g[0] for g in grid], [g[1] for g in grid],
                              higher_is_better=higher, tol=robust_tol)
            if grid else math.nan
        )
        diff = paired_difference(vals, adamw_vals) if opt != "adamw" and adamw_vals else None
        all_runs = [r for k, r in runs if k.optimizer == opt]
        ok = [r for r in rs.values() if not r["diverged"]]
        row: dict[str, Any] = {
            "optimizer": opt,
            "lr": lr,
            "lr_chosen": lr,
            "lr_source": lr_sources.get(opt, "tuned in this sweep"),
            "lr_grid": grid,
            "lr_robust_decades": robust,
            "runs": len(all_runs),
            "diverged": sum(1 for r in all_runs if r["diverged"]),
            "n_seeds": iv.n,
            "mean": iv.mean,
            "ci95": iv.as_list(),
            primary: iv.mean,
            "per_seed": {str(s): v for s, v in vals.items()},
            "val_mean": val_iv.mean,
            "val_ci95": val_iv.as_list(),
            "diff_vs_adamw": (
                {"mean": 0.0, "ci95": [0.0, 0.0], "n": iv.n} if opt == "adamw"
                else {"mean": diff.mean, "ci95": diff.as_list(), "n": diff.n} if diff is not None
                else {"mean": math.nan, "ci95": [None, None], "n": 0}
            ),
            "final_train_loss": _mean([r["metrics"].get("final_train_loss", math.nan) for r in ok]),
            "ms_per_step": _mean([r["ms_per_step"] for r in rs.values()]),
            "ms_optimizer_step": _mean([r["ms_optimizer_step"] for r in rs.values()]),
            "state_mib": _mean([r["state_mib"] for r in rs.values()]),
            "wall_s": _mean([r["wall_s"] for r in rs.values()]),
        }
        for key in ("accuracy", "macro_f1"):
            if key != primary:
                kv = [_metric(r, key) for r in ok]
                if kv:
                    row[key] = _mean(kv)
        row["step_ratio_vs_adamw"] = row["ms_optimizer_step"] / adamw_ms if adamw_ms else math.nan
        rows.append(row)
        intervals[opt] = iv
    head = headline(intervals, metric=primary, higher_is_better=higher)
    init_table: dict[str, dict[str, Any]] = {}
    for opt in p.optimizers:
        lr = plan.chosen_lr(opt, done)
        by_k: dict[str, Any] = {}
        for k in p.init_scales:
            vals = [
                _metric(r, primary) for key, r in runs
                if key.optimizer == opt and key.lr == lr and key.factor_scale == float(k)
                and key.init == p.init_scale_init
            ]
            if vals:
                iv = t_interval(vals)
                by_k[_kstr(k)] = {"mean": iv.mean, "ci95": iv.as_list(), "n": iv.n,
                                  "diverged": sum(1 for v in vals if not math.isfinite(v))}
        if by_k:
            means = [v["mean"] for v in by_k.values() if math.isfinite(v["mean"])]
            init_table[opt] = {
                "by_k": by_k,
                "range": (max(means) - min(means)) if len(means) == len(by_k) else None,
            }
    return {
        "rows": rows,
        "headline": head.text,
        "winner": head.winner,
        "tied": list(head.tied),
        "init_scale": init_table,
    }


def _grid_rows(plan: Any, opt: str, runs: Sequence[tuple[Any, dict[str, Any]]]) -> list[list[float]]:
    """``[lr, mean val metric, diverged, ci low, ci high]`` per tuning lr (NaN bounds with one
    tuning seed; mean NaN when a tuning seed diverged)."""
    from geolora.bench.stats import t_interval

    keys = plan.tune_keys(opt)
    if not keys:
        return []
    by_lr: dict[float, list[float]] = defaultdict(list)
    res = {k: r for k, r in runs}
    for k in keys:
        if k in res:
            by_lr[k.lr].append(_metric(res[k], f"val_{plan.p.primary}"))
    out = []
    for lr in sorted(by_lr):
        vals = by_lr[lr]
        div = sum(1 for v in vals if not math.isfinite(v))
        iv = t_interval(vals)
        mean = math.nan if div else iv.mean
        out.append([lr, mean, div, iv.low, iv.high])
    return out


def _kstr(k: float) -> str:
    return f"{float(k):g}"


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.mean(xs) if xs else math.nan


def print_protocol_table(
    rows: Sequence[dict[str, Any]], primary: str, title: str, console: Any = None
) -> None:
    """A rich table of the protocol rows: chosen lr, interval, paired difference, costs."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=title)
    for c in ("optimizer", "lr chosen", "lr robust (dec.)", f"test {primary} [95% CI]", "seeds",
              "Δ vs AdamW [95% CI]", f"val {primary}", "diverged", "ms/step", "opt step ×AdamW",
              "state MiB"):
        table.add_column(c, justify="left" if c == "optimizer" else "right")
    for r in rows:
        d = r["diff_vs_adamw"]
        table.add_row(
            r["optimizer"],
            _fmt(r["lr_chosen"]) if r["lr_chosen"] is not None
            else "all diverged" if r["runs"] and r["diverged"] == r["runs"] else "tuning",
            _fmt(r["lr_robust_decades"]),
            _fmt_ci(r["mean"], r["ci95"]),
            str(r["n_seeds"]),
            "–" if r["optimizer"] == "adamw" else _fmt_ci(d["mean"], d["ci95"], signed=True),
            _fmt(r["val_mean"]),
            str(r["diverged"]),
            _fmt(r["ms_per_step"]),
            _fmt(r["step_ratio_vs_adamw"]),
            _fmt(r["state_mib"]),
        )
    console.print(table)


def _fmt_ci(mean: float, ci: Sequence[float | None], signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "-"
    m = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    if ci[0] is None or ci[1] is None:
        return m
    return f"{m} [{ci[0]:.4f}, {ci[1]:.4f}]"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}"
    return str(v)


def save_results(out: Path, results: Sequence[dict[str, Any]], summary: dict[str, Any]) -> None:
    """``results.json`` (every run, with loss curves, plus the summary) and ``results.csv``
    (one row per run). Non-finite floats become null in the JSON."""
    out.mkdir(parents=True, exist_ok=True)
    blob = json.dumps({"summary": _clean(summary), "runs": _clean(list(results))}, indent=1)
    tmp = out / "results.json.tmp"
    tmp.write_text(blob)
    tmp.replace(out / "results.json")
    prim = summary.get("primary_metric", "")
    adamw: dict[tuple, float] = {}
    for r in results:
        if r["optimizer"] == "adamw":
            adamw.setdefault((r["task"], r["seed"]), r["ms_optimizer_step"])
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            base = adamw.get((r["task"], r["seed"]))
            w.writerow(
                {
                    "task": r["task"],
                    "optimizer": r["optimizer"],
                    "lr": r["lr"],
                    "seed": r["seed"],
                    "rank": r["rank"],
                    "factor_scale": r["factor_scale"],
                    "init": r.get("init") or "default",
                    "steps": r["steps"],
                    "final_train_loss": r["metrics"].get("final_train_loss"),
                    "primary_metric": prim,
                    "primary_value": r["metrics"].get(prim),
                    "val_value": r["metrics"].get(f"val_{prim}"),
                    "ms_per_step": r["ms_per_step"],
                    "ms_optimizer_step": r["ms_optimizer_step"],
                    "step_ratio_vs_adamw": (r["ms_optimizer_step"] / base) if base else "",
                    "state_mib": r["state_mib"],
                    "wall_s": r["wall_s"],
                    "diverged": r["diverged"],
                }
            )


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _smooth(xs: Sequence[float], k: int) -> list[float]:
    out, acc = [], 0.0
    beta = 1 - 1 / max(k, 1)
    for i, x in enumerate(xs):
        if x is None or not math.isfinite(x):
            break
        acc = beta * acc + (1 - beta) * x
        out.append(acc / (1 - beta ** (i + 1)))
    return out


def _colors(names: Sequence[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(i % cmap.N) for i, n in enumerate(names)}


def plot_losses(results: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Training loss per optimizer (EMA-smoothed, seed 0, default init, log scale); with several
    learning rates per optimizer, the run with the lowest final training loss is drawn."""
    best: dict[str, tuple[float, dict[str, Any]]] = {}
    for r in results:
        if r["factor_scale"] != 0 or r["seed"] != 0 or r.get("init") not in (None, "default"):
            continue
        loss = r["metrics"].get("final_train_loss", math.inf)
        loss = loss if (loss is not None and math.isfinite(loss) and not r["diverged"]) else math.inf
        cur = best.get(r["optimizer"])
        if cur is None or loss < cur[0]:
            best[r["optimizer"]] = (loss, r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, (_, r) in best.items():
        ys = _smooth(r["losses"], max(1, len(r["losses"]) // 20))
        ax.plot(range(1, len(ys) + 1), ys, label=f"{name} (lr {r['lr']:.2g})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (EMA-smoothed)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_metric_intervals(
    rows: Sequence[dict[str, Any]],
    primary: str,
    path: Path,
    title: str,
    *,
    higher_is_better: bool,
    winner: str | None,
    baseline: float | None = None,
) -> None:
    """Test metric per optimizer: mean over seeds with its 95 % t-interval as an error bar,
    every seed as a dot, the trivial baseline as a dashed line. Only a winner named by the
    headline (intervals disjoint) is coloured; the y-range covers every interval, dot and the
    baseline, so no bar is cut and no gap is blown up."""
    names = [r["optimizer"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.9 * len(names) + 2), 4.8))
    ys: list[float] = []
    for i, r in enumerate(rows):
        color = "tab:green" if r["optimizer"] == winner else "tab:gray"
        seeds = [v for v in r.get("per_seed", {}).values() if v is not None and math.isfinite(v)]
        ax.scatter([i] * len(seeds), seeds, s=12, color=color, alpha=0.5, zorder=2)
        ys += seeds
        m, ci = r["mean"], r["ci95"]
        if m is None or not math.isfinite(m):
            ax.text(i, 0.5, "diverged", transform=ax.get_xaxis_transform(), ha="center", rotation=90)
            continue
        if ci[0] is not None and ci[1] is not None:
            ax.errorbar([i], [m], yerr=[[m - ci[0]], [ci[1] - m]], fmt="o", color=color,
                        capsize=6, lw=2, zorder=3)
            ys += [ci[0], ci[1]]
        else:
            ax.plot([i], [m], "o", color=color, zorder=3)
        ys.append(m)
    if baseline is not None and math.isfinite(baseline):
        ax.axhline(baseline, ls="--", color="tab:red", lw=1, label=f"majority class ({baseline:.3f})")
        ys.append(baseline)
        ax.legend(fontsize=8, loc="best")
    if ys:
        lo, hi = min(ys), max(ys)
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    better = "higher" if higher_is_better else "lower"
    ax.set_ylabel(f"test {primary} ({better} is better)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_lr_sensitivity(rows: Sequence[dict[str, Any]], primary: str, path: Path, title: str) -> None:
    """Validation metric against the learning rate per optimizer (the tuning grid). A band
    shows the 95 % interval over tuning seeds where there are several; the open square with
    its error bar at the chosen lr is the mean and interval over the comparison's seeds.
    Diverged points are crosses on the x-axis."""
    names = [r["optimizer"] for r in rows]
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        grid = r.get("lr_grid") or []
        if not grid:
            continue
        c = colors[r["optimizer"]]
        lrs = [g[0] for g in grid]
        means = [g[1] if g[1] is not None else math.nan for g in grid]
        ax.plot(lrs, means, marker="o", color=c, label=r["optimizer"])
        lo = [g[3] if len(g) > 3 and g[3] is not None else math.nan for g in grid]
        hi = [g[4] if len(g) > 4 and g[4] is not None else math.nan for g in grid]
        if any(math.isfinite(v) for v in lo):
            ax.fill_between(lrs, lo, hi, color=c, alpha=0.15)
        div = [g[0] for g in grid if g[2]]
        if div:
            ax.plot(div, [0] * len(div), "x", color=c, transform=ax.get_xaxis_transform(), clip_on=False)
        vm, vci = r.get("val_mean"), r.get("val_ci95") or [None, None]
        if r.get("lr_chosen") and vm is not None and math.isfinite(vm) and vci[0] is not None:
            ax.errorbar([r["lr_chosen"]], [vm], yerr=[[vm - vci[0]], [vci[1] - vm]], color=c,
                        capsize=4, fmt="s", mfc="white", ms=5)
    ax.set_xscale("log")
    _log_y_if_wide(ax)
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {primary}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_y_if_wide(ax: Any) -> None:
    """Log y-axis when the plotted values are positive and span more than two decades (error
    metrics), so that small differences near the optimum stay visible."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata()
          if isinstance(y, (int, float)) and math.isfinite(y)]
    if ys and min(ys) > 0 and max(ys) / min(ys) > 100:
        ax.set_yscale("log")


def plot_init_scale(table: dict[str, dict[str, Any]], primary: str, path: Path, title: str,
                    invariant: dict[str, bool] | None = None) -> None:
    """Test metric against the init scale k (start from ``(10^k B, 10^-k A)``), per optimizer,
    with 95 % intervals over seeds where there are several; invariant optimizers solid."""
    names = list(table)
    colors = _colors(names)
    fig, ax = plt.subplots(figsize=(8, 5))
    n = max(1, len(names))
    for j, name in enumerate(names):
        by_k = table[name]["by_k"]
        ks = sorted(by_k, key=float)
        xs = [float(k) + 0.06 * (j - (n - 1) / 2) for k in ks]  # small dodge
        ms = [by_k[k]["mean"] if by_k[k]["mean"] is not None else math.nan for k in ks]
        ls = "-" if (invariant or {}).get(name, False) else "--"
        ax.plot(xs, ms, marker="o", ls=ls, color=colors[name], label=name)
        for x, k, m in zip(xs, ks, ms):
            ci = by_k[k]["ci95"]
            if ci[0] is not None and math.isfinite(m):
                ax.errorbar([x], [m], yerr=[[m - ci[0]], [ci[1] - m]], color=colors[name], capsize=3)
    _log_y_if_wide(ax)
    ax.set_xlabel("init scale k: start from (10^k B, 10^-k A), the same ΔW = B A")
    ax.set_ylabel(f"test {primary}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, title="solid: invariant", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_val_curves(
    rows: Sequence[dict[str, Any]], results: Sequence[dict[str, Any]], primary: str, path: Path,
    title: str,
) -> bool:
    """Validation metric during training at each optimizer's chosen lr (mean over seeds, band:
    min–max over seeds). Returns False (no file) when no run recorded a curve."""
    chosen = {r["optimizer"]: r["lr_chosen"] for r in rows}
    colors = _colors(list(chosen))
    curves: dict[str, list[list[list[float]]]] = defaultdict(list)
    for r in results:
        if (chosen.get(r["optimizer"]) == r["lr"] and r["factor_scale"] == 0
                and r.get("init") in (None, "default") and r.get("val_curve")):
            curves[r["optimizer"]].append(r["val_curve"])
    if not curves:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, cs in curves.items():
        steps = sorted({int(p[0]) for c in cs for p in c})
        per = [[p[1] for c in cs for p in c if int(p[0]) == s and p[1] is not None] for s in steps]
        mean = [statistics.mean(v) if v else math.nan for v in per]
        ax.plot(steps, mean, marker=".", color=colors[name], label=f"{name} ({len(cs)} seeds)")
        if len(cs) > 1:
            ax.fill_between(steps, [min(v) if v else math.nan for v in per],
                            [max(v) if v else math.nan for v in per], color=colors[name], alpha=0.12)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation {primary}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
