"""The documentation site: every page's Python blocks run, mkdocs.yml's nav matches the pages,
relative links resolve, the optimizer pages' default tables match the code, and the concepts
figure script reproduces its figure."""

from __future__ import annotations

import ast
import importlib.util
import inspect
import re
from pathlib import Path
from typing import Any

import pytest

try:
    from docs_runner import extract_python_blocks, run_markdown_blocks
except ImportError:  # tests/ imported as a package
    from tests.docs_runner import extract_python_blocks, run_markdown_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"
FIGURE_SCRIPT = DOCS / "examples" / "invariance_figure.py"
FIGURE = DOCS / "img" / "invariance.png"

#: Pages whose code another test file runs (with assertions on their results).
TESTED_ELSEWHERE = {
    "geometry.md": "tests/test_docs_geometry.py",
    "peft.md": "tests/test_docs_lora.py",
    "custom_model.md": "tests/test_docs_lora.py",
    "howto/optimizer.md": "tests/test_docs_geometry.py",
}
#: Pages whose code cannot run in one test process, and why.
NOT_RUNNABLE = {
    "distributed.md": "needs an initialised torch.distributed process group "
    "(tests/test_distributed.py, test_sharded.py and test_sharded_frameworks.py run the same "
    "setups with 2 and 4 processes)",
}
#: Pages that may hold no ```python block at all (tables and results).
CODE_FREE = {
    "bad_input.md",
    "benchmarks.md",
    "benchmarks/perf_notes.md",
    "benchmarks/gpu.md",
    "benchmarks/sharded.md",
}
#: Pages listed in the nav that other parts of the project write; they may not exist yet.
#: Trim this set once they do.
PENDING_PAGES: set[str] = set()


def _pages() -> list[str]:
    return sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))


RUN_PAGES = [p for p in _pages() if p not in TESTED_ELSEWHERE and p not in NOT_RUNNABLE]


# --- every page runs -----------------------------------------------------------------------------
@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DOCS / page
    if page in CODE_FREE and not extract_python_blocks(path):
        return  # a table or results page: nothing to execute
    monkeypatch.chdir(tmp_path)  # pages may save plots in the working directory
    run_markdown_blocks(path)


def test_exclusions_are_current() -> None:
    """The skip lists name real pages (or pages still to be written), with a reason that holds."""
    pages = set(_pages())
    for page in [*TESTED_ELSEWHERE, *NOT_RUNNABLE, *CODE_FREE]:
        assert page in pages or page in PENDING_PAGES, f"{page} is excluded but does not exist"
    for page, test in TESTED_ELSEWHERE.items():
        if page in pages and page not in PENDING_PAGES:
            assert (ROOT / test).is_file(), f"{page} is said to be run by {test}, which is missing"
    if "distributed.md" in pages:
        code = "".join(b.source for b in extract_python_blocks(DOCS / "distributed.md"))
        assert "init_process_group" in code


def test_teaching_pages_have_code() -> None:
    """Every page of the learning path carries runnable examples."""
    for page in RUN_PAGES:
        if page in CODE_FREE:
            continue
        assert extract_python_blocks(DOCS / page), f"{page} has no ```python block"


# --- site structure ------------------------------------------------------------------------------
def _nav_pages(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node] if node.endswith(".md") else []
    if isinstance(node, dict):
        return [p for v in node.values() for p in _nav_pages(v)]
    if isinstance(node, list):
        return [p for v in node for p in _nav_pages(v)]
    return []


def test_mkdocs_nav_matches_the_pages() -> None:
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))
    assert config["site_name"] == "geolora"
    assert config.get("docs_dir", "docs") == "docs"
    listed = _nav_pages(config["nav"])
    assert len(listed) == len(set(listed)), "a page is listed twice in the nav"
    missing = [p for p in listed if not (DOCS / p).is_file() and p not in PENDING_PAGES]
    assert not missing, f"nav lists pages that do not exist: {missing}"
    orphans = sorted(set(_pages()) - set(listed))
    assert not orphans, f"pages missing from the nav: {orphans}"
    for page in ("index.md", "concepts.md", "howto/metric.md", "optimizers/adams.md"):
        assert page in listed


_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_relative_links_resolve() -> None:
    """Links between pages and to images point at files that exist (or pages still pending)."""
    broken = []
    for page in _pages():
        text = (DOCS / page).read_text(encoding="utf-8")
        text = re.sub(r"```.*?```", "", text, flags=re.S)  # not inside code blocks
        for target in _LINK.findall(text):
            if re.match(r"^[a-z]+://", target) or target.startswith("#"):
                continue
            rel = (Path(page).parent / target.split("#")[0]).as_posix()
            resolved = (DOCS / rel).resolve()
            try:
                key = resolved.relative_to(DOCS.resolve()).as_posix()
            except ValueError:
                key = None
            if not resolved.exists() and key not in PENDING_PAGES:
                broken.append(f"{page} -> {target}")
    assert not broken, f"broken links: {broken}"


# --- documented defaults are the code's --------------------------------------------------------
_DEFAULTS_HEADING = re.compile(r"^#+ Defaults \(`(\w+)`\)\s*$")
_ROW = re.compile(r"^\|\s*`(\w+)`\s*\|\s*`([^`]+)`\s*\|")


def documented_defaults(path: Path) -> dict[str, dict[str, str]]:
    """``{class name: {argument: default as written}}`` from the ``Defaults (`Class`)`` tables."""
    tables: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = _DEFAULTS_HEADING.match(line)
        if m:
            current = tables.setdefault(m.group(1), {})
        elif line.startswith("#"):
            current = None
        elif current is not None and (row := _ROW.match(line)):
            current[row.group(1)] = row.group(2)
    return tables


def code_default(cls: type, name: str) -> Any:
    """Default of constructor argument ``name``, searched through the class hierarchy."""
    from geolora.optim.base import ADAMW_DEFAULTS

    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        param = inspect.signature(init).parameters.get(name)
        if param is not None and param.default is not inspect.Parameter.empty:
            return param.default
    if name in ADAMW_DEFAULTS:
        return ADAMW_DEFAULTS[name]
    raise KeyError(f"{cls.__name__} has no argument {name!r} with a default")


OPTIMIZER_PAGES = sorted(
    p for p in _pages() if p.startswith("optimizers/") and p != "optimizers/lifted.md"
)


@pytest.mark.parametrize("page", OPTIMIZER_PAGES)
def test_documented_defaults_match_the_code(page: str) -> None:
    import geolora.optim

    tables = documented_defaults(DOCS / page)
    assert tables, f"{page} has no 'Defaults (`Class`)' table"
    for cls_name, rows in tables.items():
        cls = getattr(geolora.optim, cls_name)
        for arg, written in rows.items():
            assert ast.literal_eval(written) == code_default(cls, arg), (
                f"{page}: {cls_name}({arg}=...) documented as {written}, "
                f"code has {code_default(cls, arg)!r}"
            )
        own = [
            n
            for n, p in inspect.signature(cls.__init__).parameters.items()
            if n not in ("self", "params") and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        ]
        undocumented = [n for n in own if n not in rows]
        assert not undocumented, f"{page}: {cls_name} arguments not in the table: {undocumented}"


# --- the concepts figure ---------------------------------------------------------------------------
def _load_figure_script():
    spec = importlib.util.spec_from_file_location("invariance_figure", FIGURE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_invariance_figure_script(tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "invariance.png"
    curves = _load_figure_script().main(out, steps=40)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    assert matplotlib.image.imread(out).shape == matplotlib.image.imread(FIGURE).shape
    adams, adamw = curves["AdamS"], curves["AdamW"]
    assert len(adams["deviation"]) == 41 and len(adamw["loss"]) == 40
    assert max(adams["deviation"]) < 1e-10  # invariant: the two trajectories coincide
    assert max(adamw["deviation"][1:]) > 1e-2  # not invariant: they part at the first step
    assert adams["loss"] == pytest.approx(adams["loss_gauged"], rel=1e-9)
    assert adamw["loss_gauged"][-1] > 2 * adamw["loss"][-1]
    assert "img/invariance.png" in (DOCS / "concepts.md").read_text(encoding="utf-8")
