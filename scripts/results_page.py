"""Write docs/benchmarks.md from a `geolora bench` output folder (results.json + PNGs).

Usage:
    python scripts/results_page.py RESULTS_DIR --machine "..." [--docs docs]

The page reports every number from RESULTS_DIR/results.json: per optimizer the run at its
default learning rate and, when the run swept learning rates (`--lr-sweep`), the best one.
The plots of the run are copied to docs/img/bench/.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path


def _fmt(v, digits=4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def build(results_dir: Path, docs: Path, machine: str) -> str:
    data = json.loads((results_dir / "results.json").read_text())
    summary, runs = data["summary"], data["runs"]
    task = summary["task"]
    primary = summary["primary_metric"]
    higher = summary["higher_is_better"]
    main = [
        r
        for r in runs
        if r["task"] == task
        and r["factor_scale"] == 0
        and r.get("sweep") != "invariance"
        and r["requested_steps"] == summary["steps"]  # the main comparison's runs only
    ]
    by_opt: dict[str, list[dict]] = defaultdict(list)
    for r in main:
        by_opt[r["optimizer"]].append(r)
    rows = {r["optimizer"]: r for r in summary["rows"]}
    adamw_ms = rows.get("adamw", {}).get("ms_optimizer_step")

    def score(r):
        v = r["metrics"].get(primary, math.nan)
        return -math.inf if r["diverged"] or not math.isfinite(v) else (v if higher else -v)

    lines = [
        "# Benchmark results",
        "",
        f"Task **{task}**: {summary['steps']} training steps, LoRA rank {summary['rank']}, "
        f"{summary['seeds']} seed(s). Machine: {machine}.",
        "",
        f"Command: `{summary['command']}`",
        "",
        "Every number below is read from that run's `results.json` by "
        "`python scripts/results_page.py` — nothing is typed in by hand. Timings were taken on a "
        "shared machine; the optimizer-step ratios compare with AdamW measured in the same run.",
        "",
        "## At each optimizer's default learning rate",
        "",
        f"| optimizer | lr | train loss | {primary} | macro-F1 | ms/step | optimizer ms/step "
        "| × AdamW | state MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def spread(name: str, key: str) -> str:
        # mean ± sample standard deviation over seeds (runs at the row's lr)
        vals = [
            x["metrics"].get(key)
            for x in by_opt[name]
            if x["lr"] == rows[name]["lr"] and not x["diverged"]
        ]
        vals = [v for v in vals if v is not None and math.isfinite(v)]
        if len(vals) < 2:
            return _fmt(rows[name].get(key))
        mean = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
        return f"{mean:.4g} ± {sd:.2g}"

    for name, r in rows.items():
        lines.append(
            f"| {name} | {_fmt(r['lr'], 2)} | {_fmt(r.get('final_train_loss'))} | "
            f"{spread(name, primary)} | {spread(name, 'macro_f1')} | {_fmt(r.get('ms_per_step'), 3)} | "
            f"{_fmt(r.get('ms_optimizer_step'), 3)} | {_fmt(r.get('step_ratio_vs_adamw'), 3)} | "
            f"{_fmt(r.get('state_mib'), 3)} |"
        )
    if summary["seeds"] > 1:
        lines += ["", f"`a ± b`: mean ± standard deviation over the {summary['seeds']} seeds."]
    swept = any(len({r["lr"] for r in rs}) > 1 for rs in by_opt.values())
    if swept:
        lines += [
            "",
            "## Best learning rate of the sweep",
            "",
            f"| optimizer | best lr | {primary} | macro-F1 | train loss | {primary} at each lr |",
            "|---|---|---|---|---|---|",
        ]
        ranked = []
        for name, rs in by_opt.items():
            best = max(rs, key=score)
            per_lr = ", ".join(
                f"{_fmt(r['lr'], 2)}: {'diverged' if r['diverged'] else _fmt(r['metrics'].get(primary))}"
                for r in sorted(rs, key=lambda r: r["lr"])
            )
            ranked.append((score(best), name, best, per_lr))
        for _, name, best, per_lr in sorted(ranked, key=lambda t: -t[0]):
            m = best["metrics"]
            lines.append(
                f"| {name} | {_fmt(best['lr'], 2)} | {_fmt(m.get(primary))} | {_fmt(m.get('macro_f1'))} "
                f"| {_fmt(m.get('final_train_loss'))} | {per_lr} |"
            )
    if adamw_ms:
        lines += ["", f"AdamW's optimizer step in this run: {adamw_ms:.3g} ms (median)."]
    slow = [r for r in main if r["ms_per_step"] > 3 * min(x["ms_per_step"] for x in main)]
    if slow:
        lines += [
            "",
            "Runs whose step time is over 3× the fastest run's were slowed by other jobs on the "
            "machine, not by the optimizer (compare the same optimizer at its other learning rates): "
            + ", ".join(f"{r['optimizer']} at lr {_fmt(r['lr'], 2)}" for r in slow)
            + ".",
        ]
    img = docs / "img" / "bench"
    img.mkdir(parents=True, exist_ok=True)
    figures = [
        (
            "loss_curves.png",
            "Training loss (EMA-smoothed); with a sweep, each optimizer at its "
            "lowest-final-loss learning rate.",
        ),
        ("accuracy.png", "Test accuracy per optimizer at the default learning rates."),
        ("metric.png", f"{primary} per optimizer."),
        ("lr_sensitivity.png", f"{primary} against the learning rate."),
        (
            "invariance.png",
            "Sensing task started from (10^k B, 10^-k A): invariant optimizers give flat lines.",
        ),
    ]
    shown = False
    for fname, caption in figures:
        src = results_dir / fname
        if src.is_file():
            if not shown:
                lines += ["", "## Plots", ""]
                shown = True
            dst = img / f"{task}_{fname}"
            shutil.copyfile(src, dst)
            lines += [f"![{caption}](img/bench/{dst.name})", "", caption, ""]
    inv = summary.get("invariance")
    if inv:
        ks = sorted({int(k) for row in inv.values() for k in row["rel_error_by_k"]})
        lines += [
            "## Invariance (sensing task)",
            "",
            "| optimizer | " + " | ".join(f"k={k}" for k in ks) + " | max/min |",
            "|---|" + "---|" * (len(ks) + 1),
        ]
        for name, row in inv.items():
            vals = [row["rel_error_by_k"].get(str(k), row["rel_error_by_k"].get(k)) for k in ks]
            lines.append(
                f"| {name} | "
                + " | ".join(_fmt(v, 3) for v in vals)
                + f" | {_fmt(row['spread'], 3)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results_dir", type=Path, nargs="+", help="first: main task; more: appended")
    p.add_argument("--machine", required=True)
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--out", type=Path, default=None, help="default: DOCS/benchmarks.md")
    p.add_argument("--preface", type=Path, default=None, help="Markdown inserted after the title")
    a = p.parse_args()
    page = build(a.results_dir[0], a.docs, a.machine)
    for extra in a.results_dir[1:]:
        sub = build(extra, a.docs, a.machine).replace("## ", "### ")
        page += "\n" + sub.replace("# Benchmark results", "## Second run", 1)
    if a.preface is not None:
        head, rest = page.split("\n", 1)
        page = head + "\n\n" + a.preface.read_text().strip() + "\n" + rest
    out = a.out or a.docs / "benchmarks.md"
    out.write_text(page)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
