"""Write docs/benchmarks.md from `geolora bench` output folders (results.json + PNGs).

Usage:
    python scripts/results_page.py RESULTS_DIR [RESULTS_DIR ...] --machine "..." [--docs docs]
        [--preface FILE] [--out FILE]

Every number on the page is read from the folders' results.json (one section per folder, in
the order given); the "what we found" list is derived from the same numbers by fixed rules
(:func:`findings`). The plots are copied to docs/img/bench/<task>_<name>.png.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
from pathlib import Path
from typing import Any

PROTOCOL = """\
## Protocol

`geolora bench` compares optimizers the way AlgoPerf, DeepOBS and Schmidt et al. (2021) ask
for: the same tuning budget for every optimizer, AdamW included; learning rates chosen on a
validation split, never on test; several seeds at the chosen setting; an interval, not a rank.

1. **Splits.** Every task has train / validation / test data. Learning rates are chosen on the
   validation metric only; the test metric is reported.
2. **Tuning.** Per optimizer, a log grid of `--lr-grid 5` learning rates spaced `--lr-step 0.5`
   decades around its centre (×0.1, ×0.32, ×1, ×3.2, ×10; the centre is the task's value for
   that optimizer, else the registry default), `--tune-seeds 1` seed each. The grid point with
   the best mean validation metric is chosen (ties: the lower rate; a grid point where a run
   diverged is never chosen). `make demo` reads the rates of the shipped tuning run
   (`geolora/bench/tuned_lrs.json`, with the command and the study that produced them);
   `--tune` redoes the tuning.
3. **Seeds.** `--seeds 3` runs (seeds 0, 1, 2) at the chosen rate. A seed draws the data order,
   the dropout masks and the adapter / head init; a run is deterministic given (optimizer, lr,
   seed), which is what lets a sweep resume.
4. **Statistics.** Per optimizer: the mean of the test metric over seeds and its 95 % Student-t
   interval `x̄ ± t(n−1, 0.975) · s/√n` (not a bootstrap: with 3 seeds a bootstrap interval is
   far too narrow); the paired difference to AdamW on the same seeds with its t-interval (the
   interval of `scipy.stats.ttest_rel`); the number of diverged runs; the lr robustness: the
   width in decades of the run of grid points around the chosen rate whose validation metric
   is within 10 % (relative, `--robust-tol`) of the best.
5. **Headline.** A winner is named only when its interval and the runner-up's are disjoint;
   otherwise the headline lists the optimizers whose intervals overlap the best one's as
   statistically tied.
6. **Init scale** (`--init-scales=-2,0,2`): the same comparison started from a nonzero init
   (`B ~ N(0, 10⁻⁴/r)`, `A ~ N(0, 1/in)`) moved along the gauge orbit to `(10^k B, 10^-k A)`,
   the same `ΔW` for every k, at each optimizer's chosen rate. A gauge-invariant optimizer
   gives the same result for every k.
7. **Sweeps.** Every run is recorded in an Optuna study (`--out/study.db`, or `--storage URL`)
   as soon as it ends; the same command resumes an interrupted sweep, and `--workers N` (or
   several machines on one `--storage`) share it. `--report-only` writes the tables and plots
   of a sweep in progress without running anything.
8. **Configurations.** A run and a shipped learning rate carry the id of the optimizer's
   configuration: its class and every hyperparameter but the lr (`optimizer.defaults`, with
   the bench's fixed arguments). After a default changes, a resumed sweep reruns that
   optimizer and a shipped rate tuned under the old default is not used (the bench says which
   setting changed and tunes it again). `results.json` lists the configurations
   (`summary.optimizer_configs`).
"""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _ci(mean: Any, ci: list, signed: bool = False) -> str:
    if mean is None or not math.isfinite(mean):
        return "–"
    m = f"{mean:+.4f}" if signed else f"{mean:.4f}"
    if not ci or ci[0] is None or ci[1] is None:
        return m
    return f"{m} [{ci[0]:.4f}, {ci[1]:.4f}]"


def half_widths(summary: dict[str, Any]) -> list[float]:
    """Half widths of the 95 % intervals of the rows with a defined interval."""
    out = []
    for r in summary["rows"]:
        lo, hi = r["ci95"]
        if lo is not None and hi is not None:
            out.append((hi - lo) / 2)
    return out


def findings(summary: dict[str, Any]) -> list[str]:
    """Plain statements derived from the numbers by fixed rules (no judgement typed in)."""
    prim = summary["primary_metric"]
    out = [summary["headline"] + "."]
    better = [r["optimizer"] for r in summary["rows"] if r["optimizer"] != "adamw"
              and _excludes_zero(r["diff_vs_adamw"], summary["higher_is_better"], True)]
    worse = [r["optimizer"] for r in summary["rows"] if r["optimizer"] != "adamw"
             and _excludes_zero(r["diff_vs_adamw"], summary["higher_is_better"], False)]
    if better:
        out.append(f"Better than AdamW on the same seeds (paired 95 % interval excludes 0): "
                   f"{', '.join(better)}.")
    if worse:
        out.append(f"Worse than AdamW on the same seeds: {', '.join(worse)}.")
    if not better and not worse:
        out.append("No optimizer differs from AdamW on the same seeds (every paired 95 % interval "
                   "contains 0).")
    hw = half_widths(summary)
    if hw:
        out.append(f"Noise: the 95 % intervals of test {prim} over {summary['seeds']} seeds have "
                   f"half widths {min(hw):.4f}–{max(hw):.4f} (median {statistics.median(hw):.4f}).")
    rob = [(r["optimizer"], r["lr_robust_decades"]) for r in summary["rows"]
           if r["lr_robust_decades"] is not None]
    if rob:
        out.append("LR robustness (decades within 10 % of the best validation metric): "
                   + ", ".join(f"{n} {v:.1f}" for n, v in rob) + ".")
    init = summary.get("init_scale") or {}
    if init:
        flat = [n for n, row in init.items() if row.get("range") is not None and row["range"] < 1e-3]
        moved = [(n, row["range"]) for n, row in init.items()
                 if row.get("range") is not None and row["range"] >= 1e-3]
        if flat:
            out.append(f"Init scale k ∈ {{{', '.join(sorted(next(iter(init.values()))['by_k'], key=float))}}}: "
                       f"the same test {prim} for every k (range < 0.001): {', '.join(flat)}.")
        if moved:
            out.append("Test " + prim + " changes with k (max − min): "
                       + ", ".join(f"{n} {v:.3f}" for n, v in moved) + ".")
    return out


def _excludes_zero(diff: dict[str, Any], higher: bool, good: bool) -> bool:
    lo, hi = diff.get("ci95") or [None, None]
    if lo is None or hi is None:
        return False
    if good:
        return lo > 0 if higher else hi < 0
    return hi < 0 if higher else lo > 0


def section(results_dir: Path, docs: Path, machine: str) -> str:
    data = json.loads((results_dir / "results.json").read_text())
    s = data["summary"]
    task, prim = s["task"], s["primary_metric"]
    higher = "higher" if s["higher_is_better"] else "lower"
    v = s.get("versions", {})
    lines = [
        f"## Task `{task}`",
        "",
        f"**{s['headline']}**",
        "",
    ]
    if s.get("complete") is False:
        lines += [
            "*This sweep did not finish in the time its machine had: the table summarises the "
            "runs in its study so far (`--report-only`); rows without values are optimizers "
            "still tuning, and `seeds` counts the seeds done. Rerun the command to complete it.*",
            "",
        ]
    lines += [
        f"{s['steps']} training steps, LoRA rank {s['rank']}, {s['seeds']} seeds at the chosen rate; "
        f"primary metric: test `{prim}` ({higher} is better)"
        + (f"; majority-class baseline {s['baseline']:.4f}" if s.get("baseline") is not None else "")
        + ".",
        "",
        f"* Command: `{s['command']}`",
        f"* Machine: {machine}",
        "* Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"* Sweep signature `{s['signature']}`; {len(data['runs'])} runs, "
        f"{s.get('runs_wall_s', 0) / 60:.0f} min of run wall time in all (one worker, one thread).",
    ]
    if s.get("shipped_tuning"):
        st = s["shipped_tuning"]
        lines.append(f"* Learning rates: shipped, tuned by `{st.get('command')}` (study `{st.get('study')}`).")
    lines += [
        "",
        "### What we found",
        "",
        *[f"* {f}" for f in findings(s)],
        "",
        f"| optimizer | lr chosen | lr robust (decades) | test {prim} [95% CI] | seeds | Δ vs AdamW "
        f"[95% CI] | val {prim} | diverged | ms/step | opt. step × AdamW | state MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in s["rows"]:
        d = r["diff_vs_adamw"]
        lines.append(
            f"| {r['optimizer']} | {_fmt(r['lr_chosen'], 3)} | {_fmt(r['lr_robust_decades'], 2)} | "
            f"{_ci(r['mean'], r['ci95'])} | {r['n_seeds']} | "
            f"{'–' if r['optimizer'] == 'adamw' else _ci(d['mean'], d['ci95'], signed=True)} | "
            f"{_fmt(r['val_mean'])} | {r['diverged']} | {_fmt(r['ms_per_step'], 3)} | "
            f"{_fmt(r['step_ratio_vs_adamw'], 3)} | {_fmt(r['state_mib'], 3)} |"
        )
    lines += [
        "",
        "`ms/step` is the median wall time of a training step (forward, backward, optimizer) on "
        "a shared machine; `opt. step × AdamW` compares the optimizer step alone with AdamW's "
        "in the same sweep.",
        "",
        "Learning-rate grids (validation metric per grid point; `div` = diverged):",
        "",
        "| optimizer | lr: validation metric |",
        "|---|---|",
    ]
    for r in s["rows"]:
        cells = ", ".join(
            f"{g[0]:.3g}: {'div' if g[2] else _fmt(g[1])}" for g in r.get("lr_grid") or []
        )
        lines.append(f"| {r['optimizer']} | {cells or '–'} |")
    init = s.get("init_scale") or {}
    if init:
        ks = sorted({k for row in init.values() for k in row["by_k"]}, key=float)
        lines += [
            "",
            f"Init scale: test `{prim}` started from `(10^k B, 10^-k A)` (nonzero init, same ΔW), "
            f"{s['protocol'].get('init_seeds', 1)} seed(s) per k:",
            "",
            "| optimizer | " + " | ".join(f"k = {k}" for k in ks) + " | max − min |",
            "|---|" + "---|" * (len(ks) + 1),
        ]
        for name, row in init.items():
            cells = [_fmt(row["by_k"].get(k, {}).get("mean")) for k in ks]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt(row.get('range'), 3)} |")
    img = docs / "img" / "bench"
    img.mkdir(parents=True, exist_ok=True)
    figures = [
        ("metric.png", f"Test {prim} per optimizer: mean over seeds with its 95 % t-interval, each "
         "seed a dot, the majority class dashed. Green only for a winner the intervals separate."),
        ("lr_sensitivity.png", f"Validation {prim} over the tuning grid (bands: 95 % interval over "
         "tuning seeds, when there are several); the bar at the chosen rate is the interval over "
         "the comparison's seeds."),
        ("val_curves.png", f"Validation {prim} during training at each optimizer's chosen rate "
         "(mean over seeds; band: min–max)."),
        ("init_scale.png", f"Test {prim} from (10^k B, 10^-k A); solid lines: optimizers "
         "registered as gauge invariant."),
        ("loss_curves.png", "Training loss (EMA-smoothed), seed 0, lowest final loss over the grid."),
    ]
    for fname, caption in figures:
        src = results_dir / fname
        if src.is_file():
            dst = img / f"{task}_{fname}"
            shutil.copyfile(src, dst)
            lines += ["", f"![{caption}](img/bench/{dst.name})", "", caption]
    return "\n".join(lines) + "\n"


def build(results_dirs: list[Path], docs: Path, machine: str, preface: str = "") -> str:
    """The whole page: title, preface, protocol, one section per results folder, noise table."""
    parts = ["# Benchmark results", ""]
    if preface:
        parts += [preface.strip(), ""]
    noise = ["## Noise: interval width at 3 seeds", "",
             "| task | metric | seeds | 95 % half widths (min – max) | median |", "|---|---|---|---|---|"]
    for d in results_dirs:
        s = json.loads((d / "results.json").read_text())["summary"]
        hw = half_widths(s)
        if hw:
            noise.append(f"| {s['task']} | test {s['primary_metric']} | {s['seeds']} | "
                         f"{min(hw):.4f} – {max(hw):.4f} | {statistics.median(hw):.4f} |")
    parts += [PROTOCOL, *noise, ""]
    for d in results_dirs:
        parts.append(section(d, docs, machine))
    return "\n".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("results_dir", type=Path, nargs="+")
    p.add_argument("--machine", required=True)
    p.add_argument("--docs", type=Path, default=Path("docs"))
    p.add_argument("--out", type=Path, default=None, help="default: DOCS/benchmarks.md")
    p.add_argument("--preface", type=Path, default=None, help="Markdown inserted after the title")
    a = p.parse_args()
    preface = a.preface.read_text() if a.preface is not None else ""
    page = build(a.results_dir, a.docs, a.machine, preface)
    out = a.out or a.docs / "benchmarks.md"
    out.write_text(page)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
