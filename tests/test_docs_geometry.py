"""docs/geometry.md runs as written; docs/examples/bounded_rank_completion.py runs; the runner works."""

from __future__ import annotations

import importlib.util
import traceback
from pathlib import Path

import pytest
import torch

try:
    from docs_runner import extract_blocks, extract_python_blocks, run_markdown_blocks
except ImportError:  # tests/ imported as a package
    from tests.docs_runner import extract_blocks, extract_python_blocks, run_markdown_blocks

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "geometry.md"
EXAMPLE = ROOT / "docs" / "examples" / "bounded_rank_completion.py"


def test_geometry_page_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # the page saves gradient_check.png in the working directory
    ns = run_markdown_blocks(PAGE)
    out = capsys.readouterr().out
    assert ns["res"].slope > 1.9 and ns["res_wrong"].slope < 1.1
    assert ns["res_r"].slope > 1.9
    assert ns["res_t"].slope > 0.9 and ns["res_t"].tangent_residual < 1e-12
    assert ns["gd_error"] < 1e-3 and ns["momentum_error"] < ns["gd_error"]
    assert (tmp_path / "gradient_check.png").stat().st_size > 1000
    assert "Riemannian gradient: slope 2.00" in out
    assert len(extract_python_blocks(PAGE)) >= 6


def test_example_script_runs(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bounded_rank_completion", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    res = module.main(tmp_path / "out", steps=30)
    assert res["gradient_slope"] > 1.9 and res["wrong_gradient_slope"] < 1.1
    assert res["retraction_slope"] > 1.9
    assert res["gd_errors"][-1] < 0.1 * res["gd_errors"][0]
    assert res["momentum_errors"][-1] < res["gd_errors"][-1]
    for name in ("gradient_check.png", "retraction_check.png", "convergence.png"):
        assert (tmp_path / "out" / name).stat().st_size > 1000
    assert "plots in" in capsys.readouterr().out


# --- the runner itself ----------------------------------------------------------------------------
SAMPLE = """# Title

```python
a = 1
```

Text, then an output block that must not run:

```text
this is not python
```

~~~py
b = a + 1
~~~

1. A step inside a list item:

    ```python
    c = b * 10
    if c:
        d = c + 1
    ```

````markdown
```python
raise RuntimeError("nested example inside a 4-backtick fence must not run")
```
````
"""


def test_runner_extracts_and_runs_in_order(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(SAMPLE, encoding="utf-8")
    blocks = extract_blocks(SAMPLE)
    assert [b.language for b in blocks] == ["python", "text", "py", "python", "markdown"]
    assert [b.line for b in extract_python_blocks(page)] == [4, 14, 20]
    ns = run_markdown_blocks(page)
    assert (ns["a"], ns["b"], ns["c"], ns["d"]) == (1, 2, 20, 21)


def test_runner_reports_the_page_line(tmp_path: Path) -> None:
    page = tmp_path / "broken.md"
    page.write_text("intro\n\n```python\nx = 1\ny = undefined_name\n```\n", encoding="utf-8")
    with pytest.raises(NameError) as info:
        run_markdown_blocks(page)
    frames = traceback.extract_tb(info.value.__traceback__)
    assert frames[-1].filename == str(page) and frames[-1].lineno == 5


def test_runner_rejects_pages_without_code_and_unclosed_fences(tmp_path: Path) -> None:
    empty = tmp_path / "empty.md"
    empty.write_text("# nothing\n\n```text\nout\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no ```python"):
        run_markdown_blocks(empty)
    with pytest.raises(ValueError, match="unclosed code fence opened at line 2"):
        extract_blocks("x\n```python\nprint(1)\n")


def test_add_an_optimizer_page_builds_an_invariant_optimizer() -> None:
    """docs/howto/optimizer.md: the 40-line LiftedLion is invariant, trains, validates its lr
    and resumes exactly."""
    ns = run_markdown_blocks(ROOT / "docs" / "howto" / "optimizer.md")
    assert ns["res"].max_deviation < 1e-10
    B, A, loss = ns["B"], ns["A"], ns["loss"]
    assert loss(B, A).item() < 1e-2 * ns["first"]
    assert ns["opt"].param_groups[0]["betas"] == (0.9, 0.99)
    assert torch.equal(B, ns["B2"]) and torch.equal(A, ns["A2"])
