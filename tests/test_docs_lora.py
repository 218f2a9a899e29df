"""docs/peft.md and docs/custom_model.md run as written, and their results are what they say."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

try:
    from docs_runner import run_markdown_blocks
except ImportError:  # tests/ imported as a package
    from tests.docs_runner import run_markdown_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(autouse=True)
def _offline_scratch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Never touch the hub; run in a scratch directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def test_peft_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ns = run_markdown_blocks(DOCS / "peft.md")
    out = capsys.readouterr().out
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    # the 10-line loop: AdamS on lora_param_groups(peft_model) trains, past the robust start
    losses, opt = ns["losses"], ns["opt"]
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.2 * losses[0]
    pairs = ns["pairs"]
    assert len(pairs) == 13 and all(g["adapter"] == "default" for g in pairs)
    assert ns["groups"][-1]["name"] == "other"  # the classifier head (modules_to_save)
    # the Trainer variant: create_optimizer + the Trainer's LambdaLR schedule
    log = ns["log"]
    assert [step for step, _, _ in log] == [20, 40, 60]
    assert log[-1][1] < 0.5 * log[0][1]
    assert [lr for _, _, lr in log] == sorted((lr for _, _, lr in log), reverse=True)
    assert type(ns["trainer"].lr_scheduler).__name__ == "LambdaLR"
    trained = [g for g in ns["opt"].param_groups if g.get("lora_pair")]
    assert all(ns["opt"].state[g["params"][0]].get("pair") for g in trained)
    assert all(g["initial_lr"] == 3e-3 for g in opt.param_groups)
    assert "unknown optimizer name 'adam'; known optimizers: adamw" in out


def test_custom_model_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    ns = run_markdown_blocks(DOCS / "custom_model.md")
    out = capsys.readouterr().out
    assert ns["adapted"] == ["encoder.0", "encoder.2"]  # attn.out_proj skipped, head excluded
    assert ns["trainable"] == [f"encoder.{i}.lora_{f}" for i in (0, 2) for f in ("A", "B")]
    start = ns["mse"](ns["model"])  # the injected, untrained model = the base model
    for name, net in ns["results"].items():
        assert ns["mse"](net) < 1e-2 * start, name
    assert "merged == unmerged: True" in out
    assert all(m.merged for m in ns["lora_modules"](ns["deployed"]).values())
    assert not any(m.merged for m in ns["lora_modules"](ns["tuned"]).values())
    result = ns["result"]
    assert result.loaded == ["encoder.0", "encoder.2"] and not result.missing
    assert "same outputs: True" in out


def test_peft_page_optimizer_table_matches_registry() -> None:
    """The page's name table lists every non-grid registry entry with its invariance flag."""
    import re

    import geolora.bench.catalog  # noqa: F401  (registers the optimizers)
    from geolora.bench.registry import REGISTRY

    rows: dict[str, bool] = {}
    for line in (DOCS / "peft.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[2] in ("yes", "no"):
            for name in re.findall(r"`([a-z0-9_]+)`", cells[0]):
                rows[name] = cells[2] == "yes"
    expected = {n: REGISTRY[n].invariant for n in REGISTRY if not n.startswith("grid_")}
    assert rows == expected
