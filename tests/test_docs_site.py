"""The documentation site builds with ``mkdocs build --strict`` (what ``make docs`` and CI run),
and its pages load nothing from the network (no CDN scripts, stylesheets or fonts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# <script src=...>, <link href=...> and CSS url(...) / @import pointing off the site
_REMOTE = re.compile(
    r"<(?:script|link|img)\b[^>]*\b(?:src|href)=[\"']?(?:https?:)?//"
    r"|url\([\"']?(?:https?:)?//|@import\s+[\"']?(?:url\()?[\"']?(?:https?:)?//",
    re.I,
)


def test_site_builds_strict_and_offline(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]')")
    pytest.importorskip("material", reason="the docs extra (pip install -e '.[docs]')")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 30 and (site / "index.html").is_file()
    assert (site / "optimizers" / "lora_rite.html").is_file()
    remote = [
        f"{p.relative_to(site)}: {m.group(0)}"
        for p in [*pages, *site.rglob("*.css")]
        for m in _REMOTE.finditer(p.read_text(encoding="utf-8", errors="replace"))
    ]
    assert not remote, f"pages load resources from the network: {remote[:5]}"
