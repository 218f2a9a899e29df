"""`geolora bench --quick --task sensing` end to end, and `geolora check`."""

import json
import math

from geolora.cli import main


def test_bench_quick_sensing_writes_documented_outputs(tmp_path):
    out = tmp_path / "bench"
    rc = main(
        [
            "bench",
            "--quick",
            "--task",
            "sensing",
            "--optimizers",
            "adamw,adams,lora_rite",
            "--steps",
            "60",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    rows = {r["optimizer"]: r for r in data["summary"]["rows"]}
    assert set(rows) == {"adamw", "adams", "lora_rite"}
    for r in rows.values():
        for key in (
            "final_train_loss",
            "rel_error",
            "ms_per_step",
            "ms_optimizer_step",
            "step_ratio_vs_adamw",
            "state_mib",
        ):
            assert math.isfinite(r[key]), (r["optimizer"], key)
    assert rows["adamw"]["step_ratio_vs_adamw"] == 1.0
    runs = data["runs"]
    assert all(len(r["losses"]) == r["steps"] for r in runs)
    # invariance sweep: invariant optimizers end at the same error for every factor scaling
    inv = data["summary"]["invariance"]
    assert inv["adams"]["spread"] < 1.01 and inv["lora_rite"]["spread"] < 1.01
    assert inv["adamw"]["spread"] > 1.5
    for name in ("results.csv", "loss_curves.png", "metric.png", "invariance.png"):
        assert (out / name).stat().st_size > 0, name
    # the docs results page is generated from exactly these files
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "results_page", Path(__file__).parents[1] / "scripts" / "results_page.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    page = mod.build(out, tmp_path / "docs", machine="CI")
    assert "| adams |" in page and "Invariance (sensing task)" in page
    assert f"{rows['adams']['rel_error']:.4g}" in page
    assert (tmp_path / "docs" / "img" / "bench" / "sensing_invariance.png").is_file()


def test_check_command_passes():
    assert main(["check"]) == 0
