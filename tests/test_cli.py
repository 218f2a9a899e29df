"""`geolora bench --quick --task sensing` end to end (protocol files, plots, results page), and
`geolora check`."""

import importlib.util
import json
import math
from pathlib import Path

from geolora.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _results_page():
    spec = importlib.util.spec_from_file_location("results_page", ROOT / "scripts" / "results_page.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_quick_sensing_writes_documented_outputs(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--quick", "--task", "sensing", "--optimizers", "adamw,adams,lora_rite",
            "--steps", "60", "--seeds", "3", "--lr-grid", "3", "--init-scales=-2,0,2",
            "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    summary = data["summary"]
    rows = {r["optimizer"]: r for r in summary["rows"]}
    assert set(rows) == {"adamw", "adams", "lora_rite"}
    for r in rows.values():
        assert r["n_seeds"] == 3 and r["lr_chosen"] in [g[0] for g in r["lr_grid"]]
        lo, hi = r["ci95"]
        assert lo <= r["mean"] <= hi and r["mean"] == r["rel_error"]
        assert math.isfinite(r["lr_robust_decades"])
        for key in ("final_train_loss", "ms_per_step", "ms_optimizer_step", "step_ratio_vs_adamw",
                    "state_mib"):
            assert math.isfinite(r[key]), (r["optimizer"], key)
        d = r["diff_vs_adamw"]
        assert d["n"] == 3 and d["ci95"][0] <= d["mean"] <= d["ci95"][1]
    assert rows["adamw"]["step_ratio_vs_adamw"] == 1.0 and rows["adamw"]["diff_vs_adamw"]["mean"] == 0
    # the paired difference is the mean of per-seed differences
    diffs = [rows["adams"]["per_seed"][s] - rows["adamw"]["per_seed"][s] for s in "012"]
    assert abs(rows["adams"]["diff_vs_adamw"]["mean"] - sum(diffs) / 3) < 1e-12
    squash = "".join(printed.split())  # rich wraps long lines
    assert "".join(summary["headline"].split()) in squash and "bestaccuracy" not in squash
    assert summary["versions"]["torch"] and summary["command"].startswith("geolora bench")
    # init scale: invariant optimizers end at the same error for every k, AdamW does not
    init = summary["init_scale"]
    assert init["adams"]["range"] < 1e-4 and init["lora_rite"]["range"] < 1e-4
    assert init["adamw"]["range"] > 1e-2
    # one CSV row per run
    assert len((out / "results.csv").read_text().strip().splitlines()) == 1 + len(data["runs"])
    for name in ("loss_curves.png", "metric.png", "lr_sensitivity.png", "init_scale.png"):
        assert (out / name).stat().st_size > 0, name
    # a rerun of the same command recomputes nothing and writes the same summary rows
    assert main(argv) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["mean"] for r in again["summary"]["rows"]] == [r["mean"] for r in summary["rows"]]
    # the docs results page is generated from exactly these files
    mod = _results_page()
    page = mod.build([out], tmp_path / "docs", machine="CI")
    assert "| adams |" in page and summary["headline"] in page
    assert f"{rows['adams']['mean']:.4f}" in page
    assert (tmp_path / "docs" / "img" / "bench" / "sensing_init_scale.png").is_file()


def test_bench_rejects_unknown_optimizer_before_training(tmp_path, capsys):
    rc = main(["bench", "--task", "sensing", "--optimizers", "adamw,nope", "--out", str(tmp_path)])
    assert rc == 2
    assert "unknownoptimizername'nope'" in "".join(capsys.readouterr().out.split())
    assert not (tmp_path / "study.db").exists()


def test_check_command_passes():
    assert main(["check"]) == 0


def test_shipped_learning_rates_skip_tuning_unless_tune(tmp_path, monkeypatch, capsys):
    import geolora.bench.protocol as cmp

    shipped = tmp_path / "tuned.json"
    grid = [[0.01, 0.2, 0, None, None], [0.03, 0.1, 0, None, None]]
    config = cmp.optimizer_config("adamw")

    def ship(config):
        shipped.write_text(json.dumps({"sensing": {
            "rank": 8, "steps": 300, "signature": "x", "command": "geolora bench --tune",
            "study": "s.db", "versions": {},
            "optimizers": {"adamw": {"lr_chosen": 0.03, "lr_grid": grid, "config": config}}}}))

    ship(config)
    monkeypatch.setattr(cmp, "TUNED_LRS_FILE", shipped)
    base = ["bench", "--task", "sensing", "--optimizers", "adamw", "--steps", "20", "--seeds", "2",
            "--lr-grid", "3", "--workers", "1"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    data = json.loads((tmp_path / "a" / "results.json").read_text())
    (row,) = data["summary"]["rows"]
    assert row["lr_chosen"] == 0.03 and row["lr_source"].startswith("shipped")
    assert row["lr_grid"] == grid and row["lr_robust_decades"] == 0.0
    assert len(data["runs"]) == 2 and {r["lr"] for r in data["runs"]} == {0.03}
    assert data["summary"]["shipped_tuning"]["command"] == "geolora bench --tune"
    # --tune ignores the shipped rate: 3 grid points + seed 1 at the chosen one
    assert main([*base, "--tune", "--out", str(tmp_path / "b")]) == 0
    data = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(data["runs"]) == 4 and data["summary"]["rows"][0]["lr_source"] == "tuned in this sweep"
    # a different rank has no shipped entry: tuning
    assert cmp.shipped_lrs("sensing", 4) == {}
    # an lr tuned under another configuration of the optimizer (here: another eps) is stale
    ship({**config, "eps": 1e-6})
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    squash = "".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "shippedlrofadamwnotused" in squash and "eps1e-06->1e-08" in squash
    data = json.loads((tmp_path / "c" / "results.json").read_text())
    assert len(data["runs"]) == 4 and data["summary"]["rows"][0]["lr_source"] == "tuned in this sweep"
    assert data["summary"]["optimizer_configs"]["adamw"] == config
