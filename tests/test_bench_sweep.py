"""Sweeps on an Optuna study: the plan, resume after SIGINT / SIGTERM, two local workers.

The sweeps run the synthetic teacher-student task (a run takes well under a second), in a
subprocess exactly as a user runs ``geolora bench``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from geolora.bench.sweep import Plan, Protocol, RunKey, lr_grid

ROOT = Path(__file__).resolve().parents[1]
#: A small sweep: 2 optimizers x 3 grid points + the second seed of each = 8 runs.
SWEEP = ["--task", "teacher", "--optimizers", "adamw,adams", "--lr-grid", "3", "--seeds", "2",
         "--steps", "500", "--threads", "1"]
#: Keys that hold times, paths or versions: they differ between two runs of one sweep.
VOLATILE = {"wall_s", "runs_wall_s", "ms_per_step", "ms_optimizer_step", "step_ratio_vs_adamw",
            "study", "command", "versions"}


def _bench(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "geolora.cli", "bench", *SWEEP, "--out", str(out), *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _states(out: Path) -> list[str]:
    db = out / "study.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return [s for (s,) in con.execute("SELECT state FROM trials")]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []


def _normalize(obj):
    if isinstance(obj, dict):
        return {k: _normalize(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [_normalize(v) for v in obj]
    return obj


def _load(out: Path) -> dict:
    return _normalize(json.loads((out / "results.json").read_text()))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The sweep run once, uninterrupted, by one worker."""
    out = tmp_path_factory.mktemp("reference")
    rc, log = _finish(_bench(out, "--workers", "1"))
    assert rc == 0, log
    return out


def test_reference_sweep_is_complete(reference: Path) -> None:
    data = json.loads((reference / "results.json").read_text())
    rows = {r["optimizer"]: r for r in data["summary"]["rows"]}
    assert set(rows) == {"adamw", "adams"}
    for r in rows.values():
        assert r["n_seeds"] == 2 and len(r["lr_grid"]) == 3 and r["lr_chosen"] in [g[0] for g in r["lr_grid"]]
        assert r["ci95"][0] <= r["mean"] <= r["ci95"][1]
    assert len(data["runs"]) == 8
    assert _states(reference).count("COMPLETE") == 8
    # one row per run in the CSV
    assert len((reference / "results.csv").read_text().strip().splitlines()) == 1 + 8


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_sweep_resumes_to_the_same_results(reference: Path, tmp_path: Path, sig) -> None:
    out = tmp_path / "sweep"
    proc = _bench(out, "--workers", "1")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        states = _states(out)
        if states.count("COMPLETE") >= 2 and "RUNNING" in states:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    proc.send_signal(sig)
    rc, log = _finish(proc)
    assert rc == 128 + sig, log
    assert "interrupted" in log and not (out / "results.json").exists()
    states = _states(out)
    kept = states.count("COMPLETE")
    assert 2 <= kept < 8 and "RUNNING" not in states  # the claim in flight was released

    rc, log = _finish(_bench(out, "--workers", "1"))
    assert rc == 0, log
    assert _load(out) == _load(reference)
    # finished runs were not recomputed: one COMPLETE trial per run
    assert _states(out).count("COMPLETE") == 8


def test_two_workers_give_the_same_results(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    rc, log = _finish(_bench(out, "--workers", "2"))
    assert rc == 0, log
    assert _load(out) == _load(reference)
    assert _states(out).count("COMPLETE") >= 8


def test_sigkilled_worker_claim_is_released(reference: Path, tmp_path: Path) -> None:
    """A killed process cannot release its claim; the next start sees its pid is gone."""
    out = tmp_path / "killed"
    proc = _bench(out, "--workers", "1")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if "RUNNING" in _states(out) and _states(out).count("COMPLETE") >= 1:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert "RUNNING" in _states(out)
    rc, log = _finish(_bench(out, "--workers", "1"))
    assert rc == 0, log
    assert "released 1 stale claim" in log
    assert _load(out) == _load(reference)


def _protocol(**kw) -> Protocol:
    base = dict(optimizers=["adamw", "adams"], centers={"adamw": 1e-2, "adams": 1e-3},
                primary="acc", higher_is_better=True, seeds=3, grid_points=3, grid_step=1.0)
    return Protocol(**{**base, **kw})


def _res(val: float | None) -> dict:
    return {"diverged": val is None, "metrics": {} if val is None else {"val_acc": val}}


def test_plan_phases_tuning_then_seeds() -> None:
    plan = Plan(_protocol(shipped={"adams": 5e-4}, init_scales=(-2.0, 2.0)))
    assert lr_grid(1e-2, 3, 1.0) == [1e-3, 1e-2, 1e-1]
    pending = plan.pending({})
    assert pending == [RunKey("adamw", lr, 0) for lr in (1e-3, 1e-2, 1e-1)] + [
        RunKey("adams", 5e-4, s) for s in range(3)
    ] + [RunKey("adams", 5e-4, 0, k, "gaussian") for k in (-2.0, 2.0)]
    assert plan.expected_runs({}) == 3 + 2 + 2 + 5  # tuning, unknown seeds 1-2, init, adams
    done = {RunKey("adamw", 1e-3, 0): _res(0.5), RunKey("adamw", 1e-2, 0): _res(0.7),
            RunKey("adamw", 1e-1, 0): _res(None)}
    assert plan.chosen_lr("adamw", done) == 1e-2
    later = [k for k in plan.pending(done) if k.optimizer == "adamw"]
    # seed 0 at the chosen lr is the tuning run itself
    assert later == [RunKey("adamw", 1e-2, 1), RunKey("adamw", 1e-2, 2),
                     RunKey("adamw", 1e-2, 0, -2.0, "gaussian"), RunKey("adamw", 1e-2, 0, 2.0, "gaussian")]
    assert plan.expected_runs(done) == 3 + 4 + 5
    assert not plan.finished(done)
    # ties go to the lower lr; an all-diverged grid chooses nothing
    tie = {RunKey("adamw", lr, 0): _res(0.7) for lr in (1e-3, 1e-2, 1e-1)}
    assert plan.chosen_lr("adamw", tie) == 1e-3
    dead = {RunKey("adamw", lr, 0): _res(None) for lr in (1e-3, 1e-2, 1e-1)}
    assert plan.chosen_lr("adamw", dead) is None
    assert all(k.optimizer != "adamw" for k in plan.pending(dead))


def test_lr_grid_validation() -> None:
    assert lr_grid(1e-3) == pytest.approx([1e-4, 3.16228e-4, 1e-3, 3.16228e-3, 1e-2])
    assert lr_grid(2e-3, 1) == [2e-3]
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="center"):
            lr_grid(bad)
    with pytest.raises(ValueError, match="points"):
        lr_grid(1e-3, 0)


def test_runs_under_another_optimizer_config_are_not_reused(tmp_path: Path) -> None:
    """A run records its optimizer's configuration id; a store under another id (the
    optimizer's defaults changed) does not reuse it, a store under the same id does."""
    from geolora.bench.sweep import RunStore

    url = f"sqlite:///{tmp_path / 'study.db'}"
    key = RunKey("adams", 1e-3, 0)
    old = RunStore(url, "s", "sig", {"adams": "aaaa"})
    trial = old.claim(key)
    assert trial is not None
    old.finish(trial, {"metrics": {"val_accuracy": 0.5}}, 0.5)
    assert key in RunStore(url, "s", "sig", {"adams": "aaaa"}).snapshot()[0]
    changed = RunStore(url, "s", "sig", {"adams": "bbbb"})
    assert key not in changed.snapshot()[0]
    assert changed.claim(key) is not None  # the stale run does not block a new one


def test_optimizer_config_is_the_hyperparameters() -> None:
    """The configuration id changes with a default (LoRA-RITE's row_normalize), holds the
    hyperparameters only, and is the same in every process."""
    import geolora.bench.catalog  # noqa: F401
    from geolora.bench.protocol import config_changes, config_id, optimizer_config
    from geolora.bench.registry import REGISTRY, OptimizerRegistry, OptimizerSpec

    rite = optimizer_config("lora_rite")
    assert rite["row_normalize"] is True and rite["class"].endswith("LoRARite")
    spec = REGISTRY.get("lora_rite")
    reg = OptimizerRegistry()
    reg.register(OptimizerSpec("lora_rite", lambda g, lr, **kw: spec.factory(
        g, lr, **{"row_normalize": False, **kw}), spec.default_lr, spec.invariant, "", ""))
    other = optimizer_config("lora_rite", reg)
    assert config_id(other) != config_id(rite)
    assert config_changes(other, rite) == "row_normalize False -> True"
    assert config_changes(None, rite) == "no configuration recorded"
    a = optimizer_config("adams")
    assert a["robust_steps"] == 10 and a["betas"] == [0.9, 0.999]  # the bench's fixed argument
    assert "lr" not in a and "engine" not in a and "state" not in a
    code = ("import geolora.bench.catalog; from geolora.bench.protocol import config_id, "
            "optimizer_config as c; print(config_id(c('lora_rite')), config_id(c('adams')))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert got == [config_id(rite), config_id(a)]
